# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Memory that stays flat: checkpointed inner loops and per-task meta-gradients
#
# A second-order MAML step keeps, for every inner step, the activations of the
# forward pass and of the backward pass that produced the inner gradient, so
# that the outer backward pass can differentiate through them. Peak memory
# therefore grows linearly with the number of inner steps $K$, and with the
# number of tasks $T$ whose graphs are alive at once:
#
# $$\text{peak} \approx T \cdot K \cdot \text{(one step's activations)}.$$
#
# fparams has two knobs that remove those factors without changing the
# meta-gradient:
#
# * `fparams.adapt(..., checkpoint=True)` drops each inner step's saved
#   tensors when the step returns and recomputes them when the outer backward
#   pass reaches that step: memory is then about $K$ copies of the parameters
#   plus **one** step's activations, for about one more forward and backward
#   pass per step.
# * `fparams.meta_value_and_grad` takes each task's (or each chunk's) gradient
#   and frees its graph before the next task runs: memory is that of **one**
#   task, where `map_tasks(...).mean().backward()` holds all $T$ graphs until
#   the backward pass.
#
# This notebook measures both on a 4-block conv net, each measurement in a
# fresh Python process.

# %%
import json
import os
import subprocess
import sys
import textwrap

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

import fparams

torch.set_num_threads(1)
plt.rcParams["figure.dpi"] = 150  # sharp figures on the site and in Jupyter

# %% [markdown]
# ## Measuring a meta-step's peak memory
#
# The peak is the resident-set high-water mark of a fresh interpreter after one
# meta-step, minus the mark before it: `VmHWM` on Linux, `ru_maxrss` on macOS,
# the peak working set on Windows (with `pip install psutil`). glibc's allocator
# normally keeps freed blocks of a few MiB in its heap, where the process's
# resident memory stays high after tensors are freed; setting
# `MALLOC_MMAP_THRESHOLD_` gives every large tensor its own mapping, returned
# to the system when freed, so the measurement follows the tensors that are
# alive (what a GPU's `torch.cuda.max_memory_allocated` reports). The
# benchmark `benchmarks/bench_memory.py` reports both.

# %%
STEP = textwrap.dedent(
    """
    import json, sys, torch, torch.nn.functional as F
    from torch import nn
    import fparams

    def peak():  # MiB: Linux's VmHWM, else the OS's peak resident set of this fresh process
        try:
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        try:
            import resource  # macOS: bytes; other Unixes: KiB

            unit = 2**20 if sys.platform == "darwin" else 2**10
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / unit
        except ImportError:  # Windows: psutil's peak working set
            import psutil
            return psutil.Process().memory_info().peak_wset / 2**20

    how, steps, tasks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    layers, cin = [], 1
    for _ in range(4):
        layers += [nn.Conv2d(cin, 32, 3, padding=1),
                   nn.BatchNorm2d(32, track_running_stats=False), nn.ReLU(), nn.MaxPool2d(2)]
        cin = 32
    net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(32, 5))
    arch, params, _ = fparams.split(net)
    xs, xq = torch.randn(tasks, 25, 1, 28, 28), torch.randn(tasks, 50, 1, 28, 28)
    ys, yq = torch.arange(5).repeat(tasks, 5), torch.arange(5).repeat(tasks, 10)
    ce = lambda p, x, y: F.cross_entropy(arch(p, x), y)

    def task(p, xs, ys, xq, yq):
        fast = fparams.adapt(ce, p, xs, ys, lr=0.4, steps=steps, checkpoint=how == "checkpoint")
        return ce(fast, xq, yq)

    def run():
        if how == "meta_value_and_grad":
            return fparams.meta_value_and_grad(task, batch_stats=True)(fparams.detach(params), xs, ys, xq, yq)
        net.zero_grad()
        fparams.map_tasks(task, batch_stats=True)(params, xs, ys, xq, yq).mean().backward()

    before = peak()
    run()
    print(json.dumps(peak() - before))
    """
)


def peak_mib(how: str, steps: int, tasks: int = 1) -> float:
    """Peak MiB of one meta-step, in a fresh interpreter."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, "-c", STEP, how, str(steps), str(tasks)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# %% [markdown]
# ## Over inner steps: `adapt` against `adapt(checkpoint=True)`

# %%
ks = [1, 5, 10, 20]
unrolled = [peak_mib("unrolled", k) for k in ks]
checkpointed = [peak_mib("checkpoint", k) for k in ks]
for k, u, c in zip(ks, unrolled, checkpointed):
    print(f"K={k:2d}: unrolled {u:6.0f} MiB, checkpointed {c:6.0f} MiB ({c / u:.2f}x)")

# %% [markdown]
# ## Over tasks: `.backward()` against `meta_value_and_grad`
#
# Five inner steps per task; `strategy="auto"` loops over these tasks (they
# are large: see `fparams.map_tasks`), so `meta_value_and_grad` holds one
# task's graph at a time.

# %%
ts = [1, 2, 4]
backward = [peak_mib("backward", 5, t) for t in ts]
pure = [peak_mib("meta_value_and_grad", 5, t) for t in ts]
for t, b, p in zip(ts, backward, pure):
    print(f"T={t}: .backward() {b:6.0f} MiB, meta_value_and_grad {p:6.0f} MiB ({p / b:.2f}x)")

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
left.plot(ks, unrolled, "o-", label="adapt (unrolled)")
left.plot(ks, checkpointed, "s-", label="adapt(checkpoint=True)")
left.set_xlabel("inner steps $K$ (one task)")
left.set_ylabel("peak memory of one meta-step (MiB)")
left.set_title("Checkpointing the inner loop")
left.legend()
right.plot(ts, backward, "o-", label="map_tasks(...).mean().backward()")
right.plot(ts, pure, "s-", label="meta_value_and_grad (detached params)")
right.set_xlabel("tasks $T$ ($K = 5$)")
right.set_xticks(ts)
left.set_xticks(ks)
right.set_ylabel("peak memory of one meta-step (MiB)")
right.set_title("One task's graph at a time")
right.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## The same meta-gradient
#
# Checkpointing and chunking only change *when* tensors are computed, not
# what: in float64 the meta-gradients agree to rounding.

# %%
torch.manual_seed(0)
mlp = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1)).double()
arch, params, _ = fparams.split(mlp)
data = [torch.randn(6, 10, n, dtype=torch.float64) for n in (3, 1, 3, 1)]


def mse(p, x, y):
    return F.mse_loss(arch(p, x), y)


def task_fn(checkpoint):
    def task(p, xs, ys, xq, yq):
        return mse(fparams.adapt(mse, p, xs, ys, lr=0.1, steps=10, checkpoint=checkpoint), xq, yq)

    return task


_, plain = fparams.meta_value_and_grad(task_fn(False), strategy="vmap")(fparams.detach(params), *data)
_, light = fparams.meta_value_and_grad(task_fn(True), strategy="loop")(fparams.detach(params), *data)
worst = max(((plain[k] - light[k]).abs().max() / plain[k].abs().max()).item() for k in plain)
print(f"largest relative difference: {worst:.1e}")

# %% [markdown]
# ## Self-check
#
# The numbers this notebook shows, checked so that CI notices when they drift.

# %%
assert worst < 1e-10
assert checkpointed[-1] < 0.5 * unrolled[-1], (checkpointed, unrolled)
assert pure[-1] < 0.5 * backward[-1], (pure, backward)
