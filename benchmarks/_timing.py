"""Interleaved timing shared by the benchmark scripts."""

from __future__ import annotations

import gc
import statistics
import time
from typing import Any, Callable, Dict, List

#: ``--clock``: wall time, or the process's CPU time (steadier while other
#: processes share the cores; it leaves out time spent waiting for a core).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def per_call(fn: Callable[[], Any], number: int, clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds per call of ``fn`` over ``number`` calls."""
    start = clock()
    for _ in range(number):
        fn()
    return (clock() - start) / number


def time_interleaved(
    fns: Dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int,
    target_s: float,
    clock: Callable[[], float] = time.perf_counter,
) -> Dict[str, float]:
    """Median seconds per call of each function, the functions taking turns.

    Each sample runs a function ``number`` times, with ``number`` chosen so a
    sample lasts about ``target_s`` (wall time); the order of the functions
    rotates from round to round, so a noisy neighbour hits them all alike.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    numbers = {n: max(1, round(target_s / max(per_call(fns[n], 1), 1e-7))) for n in names}
    samples: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()
            samples[name].append(per_call(fns[name], numbers[name], clock))
    return {n: statistics.median(s) for n, s in samples.items()}
