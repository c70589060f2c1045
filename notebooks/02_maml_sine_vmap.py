# %% [markdown]
# # MAML on sine waves, all tasks at once
#
# The few-shot regression benchmark of Finn et al. (2017). Each task is a sine wave
#
# $$y = A \sin(x - \varphi), \qquad A \sim U[0.1, 5], \quad \varphi \sim U[0, \pi], \quad
#   x \sim U[-5, 5];$$
#
# the learner sees $K = 10$ support points and is scored on 10 query points. MAML meta-learns an
# initialisation $\theta$ such that one gradient step on a task's support set fits it:
#
# $$\min_\theta \; \mathbb{E}_{\text{task}}\Big[\mathcal{L}_{\text{query}}\big(\theta - \alpha
#   \nabla_\theta \mathcal{L}_{\text{support}}(\theta)\big)\Big].$$
#
# `fparams.meta_value_and_grad` runs a whole meta-batch as one call: it maps the per-task loss over
# tasks with `torch.func.vmap` (through `fparams.map_tasks`) and differentiates the mean through the
# inner step. This notebook trains exactly what `python -m fparams.demo` trains (same network,
# seed, tasks and optimizer, 1000 meta-steps), written out step by step.

# %%
import time
import warnings

import matplotlib.pyplot as plt
import torch
from tqdm.auto import tqdm

import fparams
import fparams.demo
from fparams.datasets import sine_tasks

torch.set_num_threads(1)  # a tiny network: more threads only add overhead

model = fparams.demo.make_model(seed=0)  # 1-40-40-1 ReLU MLP
arch, params, _ = fparams.split(model)
fparams.summary(params)
plt.rcParams["figure.dpi"] = 150  # sharp figures on the site and in Jupyter


# %%
def mse(p, x, y):
    return (arch(p, x) - y).pow(2).mean()


def task_loss(p, xs, ys, xq, yq, steps=1):
    """One task: adapt on the support set with inner rate 0.01, score on the query set."""
    return mse(fparams.adapt(mse, p, xs, ys, lr=0.01, steps=steps), xq, yq)


# %% [markdown]
# ## Meta-training: one call per meta-batch of 25 tasks
#
# 1000 meta-steps, Adam with rate $3 \cdot 10^{-3}$ as the outer optimizer. The bar shows the
# meta-loss (the query MSE after one inner step, averaged over the meta-batch).

# %%
step = fparams.meta_value_and_grad(task_loss)
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
generator = torch.Generator().manual_seed(0)
losses = []
start = time.perf_counter()
for iteration in (bar := tqdm(range(1000), desc="meta-training")):
    # Detached: meta_value_and_grad computes the gradient itself, no outer graph is needed.
    loss, grads = step(fparams.detach(params), *sine_tasks(25, generator=generator).data())
    for name, p in params.items():
        p.grad = grads[name]
    opt.step()
    losses.append(loss.item())
    if iteration % 10 == 0:
        bar.set_postfix(meta_loss=f"{loss.item():.3f}")
train_seconds = time.perf_counter() - start

# %%
window = 25
smooth = torch.tensor(losses).unfold(0, window, 1).mean(1)
fig, ax = plt.subplots(figsize=(7, 3.2))
ax.plot(losses, color="tab:blue", alpha=0.25, lw=0.8, label="each meta-batch")
ax.plot(range(window - 1, len(losses)), smooth, color="tab:blue", label=f"mean of {window}")
ax.set_xlabel("meta-step")
ax.set_ylabel("query MSE after 1 inner step")
ax.set_title(f"meta-training: 1000 meta-steps of 25 tasks in {train_seconds:.0f} s")
ax.legend()
plt.show()

# %% [markdown]
# ## Held-out tasks: before and after adaptation
#
# 100 new tasks (seed 1234, 100 query points each), adapted with plain SGD at the inner rate used in
# training. These are the demo's held-out tasks and the demo's scoring function, so the numbers are
# the ones `python -m fparams.demo` prints on the same machine.

# %%
held_out = sine_tasks(100, queries=100, generator=torch.Generator().manual_seed(1234))
inner_steps = list(range(11))
scores = fparams.demo.evaluate(arch, params, held_out, lr=0.01, steps=inner_steps)
for s in (0, 1, 10):
    print(f"held-out MSE after {s:2d} inner steps: {scores[s]:.4f}")

fig, ax = plt.subplots(figsize=(6, 3.2))
ax.plot(inner_steps, [scores[s] for s in inner_steps], "o-")
ax.set_xlabel("inner SGD steps on the 10 support points")
ax.set_ylabel("held-out query MSE")
ax.set_title("adapting the meta-learned initialisation")
ax.set_ylim(bottom=0)
plt.show()

# %% [markdown]
# Three held-out tasks, with the true function, the support points and the predictions before and
# after adaptation (the demo's figure: `fparams.demo.plot` returns a `matplotlib.figure.Figure`).

# %%
fparams.demo.plot(arch, params, held_out, 0.01, scores)

# %% [markdown]
# ## The compiled meta-step
#
# `meta_value_and_grad(..., compile=True)` runs the same step through `torch.compile`
# (`fparams.compile`, which falls back to eager with a `CompileFallbackWarning` where compilation
# fails). To keep compilation short this uses a one-hidden-layer network.
#
# **The first call compiles, which takes about 20 seconds on a laptop CPU and up to a few minutes on
# a busy machine; the cell prints nothing until it is done.** Later calls reuse the compiled code.

# %%
torch.manual_seed(0)
small = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 1))
small_arch, small_params, _ = fparams.split(small)
small_params = fparams.detach(small_params)


def small_mse(p, x, y):
    return (small_arch(p, x) - y).pow(2).mean()


def small_task_loss(p, xs, ys, xq, yq):
    return small_mse(fparams.adapt(small_mse, p, xs, ys, lr=0.01), xq, yq)


batch = sine_tasks(25, generator=torch.Generator().manual_seed(0)).data()
eager_step = fparams.meta_value_and_grad(small_task_loss)
compiled_step = fparams.meta_value_and_grad(small_task_loss, compile=True)

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", fparams.CompileFallbackWarning)
    start = time.perf_counter()
    compiled_loss, compiled_grads = compiled_step(small_params, *batch)
    compile_seconds = time.perf_counter() - start
fell_back = any(issubclass(w.category, fparams.CompileFallbackWarning) for w in caught)
print(
    f"first call: {compile_seconds:.1f} s,",
    "compilation failed, running eagerly" if fell_back else "compiled",
)


# %%
def seconds_per_step(step, repeats=30):
    step(small_params, *batch)
    start = time.perf_counter()
    for _ in range(repeats):
        step(small_params, *batch)
    return (time.perf_counter() - start) / repeats


eager_s, compiled_s = seconds_per_step(eager_step), seconds_per_step(compiled_step)
speedup = eager_s / compiled_s
print(f"eager {1e3 * eager_s:.2f} ms/step, compiled {1e3 * compiled_s:.2f} ms/step: {speedup:.1f}x")
eager_loss, eager_grads = eager_step(small_params, *batch)

# %% [markdown]
# ## Self-check
#
# The numbers this notebook states, checked; CI runs every notebook and fails here if one drifts.

# %%
# The compiled step computes what the eager one does.
assert torch.allclose(compiled_loss, eager_loss, atol=1e-5)
for name in eager_grads:
    assert torch.allclose(compiled_grads[name], eager_grads[name], atol=1e-5), name
assert speedup > 0
# Meta-learning worked as in the demo: its held-out MSE falls in the ranges that hold on any
# machine (2.5-3.0 before adaptation, 0.5-0.95 after 1 step, 0.2-0.6 after 10 steps).
for steps, expected in fparams.demo.EXPECTED.items():
    assert scores[steps] in expected, (steps, scores[steps], str(expected))
print("self-check passed")
