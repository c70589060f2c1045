"""One second-order MAML meta-step over the LoRA adapters of a GPT-2-small-shaped model on next-token tasks.

The model is built from its config (no download). fparams (default, and ``checkpoint=True``)
against higher, learn2learn where it installs, and fparams' learn2learn-style ``MAML`` class:
time (interleaved, one process) and peak memory (each path in a fresh interpreter).

Full size: GPT-2 small (12 layers, 768 wide, 12 heads, vocabulary 50257), LoRA r=8 on ``c_attn``,
4 tasks of 8 support and 8 query sequences of 64 tokens, 10 inner steps::

    python benchmarks/bench_lora.py
    python benchmarks/bench_lora.py --layers 2 --embd 64 --heads 4 --vocab 512 --seq 16 --steps 3  # small

fparams runs with torch's default attention kernels (it selects the math kernel for its inner
steps). higher runs the user's own forward, so its path is wrapped in
``sdpa_kernel(SDPBackend.MATH)``, the fix fparams' error names; without it torch fails at the
outer backward (the fused kernels have no double backward).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import fparams

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import CLOCKS, time_interleaved  # noqa: E402
from bench_resnet12 import available, peak_mib  # noqa: E402

PATHS = ["fparams", "fparams_checkpoint", "fparams.MAML", "higher", "learn2learn"]


def build(args: argparse.Namespace) -> nn.Module:
    import peft
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=args.layers,
        n_embd=args.embd,
        n_head=args.heads,
        vocab_size=args.vocab,
        n_positions=max(args.seq, 16),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    lora = peft.LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        target_modules=["c_attn"],
        lora_dropout=0.0,
        fan_in_fan_out=True,
    )
    model = peft.get_peft_model(GPT2LMHeadModel(config), lora)
    for name, p in model.named_parameters():  # LoRA's B starts at zero; a meta-trained one does not
        if "lora_B" in name:
            nn.init.normal_(p, std=0.02)
    return model.eval()


def tasks(args: argparse.Namespace) -> List[Tensor]:
    """Per task, sequences that count up by a task-specific stride (mod the vocabulary)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(2):  # support, query
        start = torch.randint(0, args.vocab, (args.tasks, args.shots, 1), generator=g)
        stride = torch.randint(1, 8, (args.tasks, 1, 1), generator=g)
        out.append((start + stride * torch.arange(args.seq)) % args.vocab)
    return out


def next_token_loss(logits: Tensor, ids: Tensor) -> Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def meta_step(path: str, args: argparse.Namespace) -> Callable[[], Any]:
    model = build(args)
    support, query = tasks(args)
    if path in ("fparams", "fparams_checkpoint"):  # "fparams.MAML" is the learn2learn-style class
        return _fparams_step(model, support, query, args, path == "fparams_checkpoint")
    if path == "higher":
        return _higher_step(model, support, query, args)
    return _l2l_step(model, support, query, args, path)


def _fparams_step(
    model: nn.Module, support: Tensor, query: Tensor, args: argparse.Namespace, checkpoint: bool
) -> Callable[[], Any]:
    arch, params, buffers = fparams.split(model)
    lora = {k: p.detach() for k, p in params.items() if "lora_" in k}
    frozen = {k: p.detach() for k, p in params.items() if "lora_" not in k}

    def loss(p: Dict[str, Tensor], ids: Tensor) -> Tensor:
        return next_token_loss(arch({**frozen, **p}, input_ids=ids, buffers=buffers).logits, ids)

    def task(p: Dict[str, Tensor], s: Tensor, q: Tensor) -> Tensor:
        return loss(fparams.adapt(loss, p, s, lr=args.lr, steps=args.steps, checkpoint=checkpoint), q)

    step = fparams.meta_value_and_grad(task)
    return lambda: step(lora, support, query)


def _higher_step(
    model: nn.Module, support: Tensor, query: Tensor, args: argparse.Namespace
) -> Callable[[], Any]:
    import higher

    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    inner = torch.optim.SGD(lora, lr=args.lr)

    def run() -> Any:
        model.zero_grad()
        with sdpa_kernel(SDPBackend.MATH):
            for s, q in zip(support, query):
                with higher.innerloop_ctx(model, inner, copy_initial_weights=False) as (fnet, diffopt):
                    for _ in range(args.steps):
                        diffopt.step(next_token_loss(fnet(input_ids=s).logits, s))
                    next_token_loss(fnet(input_ids=q).logits, q).backward()

    return run


def _l2l_step(
    model: nn.Module, support: Tensor, query: Tensor, args: argparse.Namespace, path: str
) -> Callable[[], Any]:
    """learn2learn's MAML class, or fparams' drop-in copy of it (``fparams.MAML``)."""
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    if path == "learn2learn":
        import learn2learn as l2l

        maml = l2l.algorithms.MAML(model, lr=args.lr, allow_nograd=True)
    else:
        maml = fparams.MAML(model, lr=args.lr, allow_nograd=True)

    def run() -> Any:
        model.zero_grad()
        with sdpa_kernel(SDPBackend.MATH):
            for s, q in zip(support, query):
                learner = maml.clone()
                for _ in range(args.steps):
                    learner.adapt(next_token_loss(learner(input_ids=s).logits, s))
                next_token_loss(learner(input_ids=q).logits, q).backward()

    return run


def one_peak(path: str, argv: Sequence[str]) -> Optional[float]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--peak-of", path]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--embd", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--shots", type=int, default=8)
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--peak-of", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, Any]]:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    if args.peak_of:
        run = meta_step(args.peak_of, args)
        before = peak_mib()
        run()
        after = peak_mib()
        print(json.dumps(None if before is None or after is None else after - before))
        return {}
    paths = [p for p in PATHS if available(p)]
    own = list(argv if argv is not None else sys.argv[1:])
    steps, failed = {}, {}
    for p in paths:
        try:
            steps[p] = meta_step(p, args)
            steps[p]()  # a path that cannot run this model is reported, not timed
        except Exception as err:  # noqa: BLE001 - a peer library's failure is a result here
            failed[p] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
            steps.pop(p, None)
    paths = list(steps)
    times = time_interleaved(steps, args.repeats, 1, 0.0, CLOCKS[args.clock])
    peaks = {p: None if args.no_memory else one_peak(p, own) for p in paths}
    print(
        f"\nMAML over LoRA (r={args.rank}) of GPT-2 ({args.layers} layers, {args.embd} wide, vocabulary "
        f"{args.vocab}), {args.tasks} tasks x {args.shots}+{args.shots} sequences of {args.seq}, "
        f"{args.steps} inner steps"
    )
    print(f"{'path':20s} {'s / meta-step':>14s} {'peak MiB':>10s}")
    for p in paths:
        mem = peaks[p]
        print(f"{p:20s} {times[p]:14.3f} {'-' if mem is None else f'{mem:.0f}':>10s}")
    for p, why in failed.items():
        print(f"{p:20s} cannot run this model: {why}")
    missing = sorted(set(PATHS) - set(paths) - set(failed))
    if missing:
        print(f"\nnot installed, left out: {', '.join(missing)}")
    return {p: {"s": times[p], "peak_mib": peaks[p]} for p in paths}


if __name__ == "__main__":
    main()
