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
# # Implicit gradients: iMAML and a learned regulariser
#
# Unrolled MAML differentiates through every inner step, so its memory grows with the number of
# steps. Implicit differentiation needs only the *optimality condition* of the inner problem. If
# $\phi^\star(\theta)$ solves $F(\phi, \theta) = 0$, the implicit function theorem gives
#
# $$
# \frac{\partial \phi^\star}{\partial \theta}
#   = -\Big(\frac{\partial F}{\partial \phi}\Big)^{-1} \frac{\partial F}{\partial \theta},
# $$
#
# and a backward pass needs only products with it: solve
# $\big(\partial F / \partial \phi\big)^{\top} u = v$ for the cotangent $v$ of $\phi^\star$ (conjugate
# gradients, with vector-Jacobian products of $F$), then return
# $-\big(\partial F / \partial \theta\big)^{\top} u$. The solver's own steps are never differentiated.
#
# iMAML (Rajeswaran et al., 2019) adapts by minimising the task loss with a proximal term,
#
# $$
# \phi^\star(\theta) = \arg\min_\phi \; \mathcal{L}(\phi) + \frac{\lambda}{2}\lVert \phi - \theta \rVert^2,
# \qquad
# \frac{\partial \phi^\star}{\partial \theta}
#   = \lambda \big(\nabla^2 \mathcal{L}(\phi^\star) + \lambda I\big)^{-1},
# $$
#
# which is what `fparams.implicit.adapt` computes. This notebook compares it with unrolled MAML
# (`fparams.adapt`) on sine waves, in accuracy and in memory, then learns the L2 strength of a
# logistic regression with `fparams.implicit.custom_root`.

# %%
import ctypes
import ctypes.util
import gc
import math
import os
import sys
import time
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import matplotlib.ticker
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import fparams
import fparams.demo
import fparams.optim
from fparams import implicit

torch.set_num_threads(1)  # a tiny network: more threads only add overhead
start_notebook = time.perf_counter()


def sample_tasks(generator, n, shots=10, queries=10):
    """n sine tasks A*sin(x - phase), the demo's: A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5]."""
    return fparams.datasets.sine_tasks(n, shots, queries, generator=generator).data()


def make_model():
    return fparams.demo.make_model(0)  # the 1-40-40-1 ReLU MLP of the MAML paper


arch, _, _ = fparams.split(make_model())


def mse(p, x, y):
    return F.mse_loss(arch(p, x), y)


plt.rcParams["figure.dpi"] = 150  # sharp figures on the site and in Jupyter

# %% [markdown]
# ## Two learners
#
# Both meta-train the same network from the same initialisation on the same tasks for 150
# meta-steps of 25 tasks (Adam, learning rate $3\cdot 10^{-3}$). MAML takes 5 differentiable SGD
# steps (learning rate 0.02). iMAML takes 20 Adam steps (learning rate 0.02) on the proximal
# objective with $\lambda = 1$, and its meta-gradient comes from 10 iterations of conjugate
# gradients on the normal equations. The implicit gradient is exact only at the inner problem's
# minimiser, so, as in the iMAML paper, the inner solver must get close to it: 20 plain SGD steps
# at a rate that stays stable on this network leave it far off (iMAML then ended at twice MAML's
# error here), Adam's steps reach it. The sine network's Hessians are indefinite, so
# plain CG (`implicit.cg()`) stops with a clear error, and with `strict=False` its few iterations
# gave meta-gradients that did not learn here; the normal equations do. `strict=False` accepts
# the 10-iteration approximation, as the iMAML paper does with its fixed few CG steps.

# %%
LAM, INNER_LR = 1.0, 0.02
# iMAML's inner solver. Any: implicit.adapt's `lr` annotation does not list optimizers yet (its
# docstring and code accept them).
INNER_OPT: Any = fparams.optim.adam(INNER_LR)
SOLVE = implicit.normal_cg(maxiter=10, strict=False)


def imaml_task(p, xs, ys, xq, yq, steps=20):
    return mse(implicit.adapt(mse, p, xs, ys, lam=LAM, lr=INNER_OPT, steps=steps, solve=SOLVE), xq, yq)


def maml_task(p, xs, ys, xq, yq, steps=5):
    return mse(fparams.adapt(mse, p, xs, ys, lr=INNER_LR, steps=steps), xq, yq)


def meta_train(name, task_loss, iterations=150):
    model = make_model()
    params = dict(model.named_parameters())
    step = fparams.meta_value_and_grad(task_loss)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in tqdm(range(iterations), desc=f"meta-training {name}"):
        loss, grads = step(fparams.detach(params), *sample_tasks(generator, 25))
        for name, p in params.items():
            p.grad = grads[name]
        opt.step()
        losses.append(loss.item())
    return fparams.detach(params), losses


trained, curves, seconds = {}, {}, {}
for name, task_loss in (("MAML", maml_task), ("iMAML", imaml_task)):
    t0 = time.perf_counter()
    trained[name], curves[name] = meta_train(name, task_loss)
    seconds[name] = time.perf_counter() - t0
    last = sum(curves[name][-20:]) / 20
    print(f"{name}: 150 meta-steps in {seconds[name]:.1f} s, mean query MSE of the last 20: {last:.3f}")

# %% [markdown]
# ## Accuracy over inner steps
#
# On 100 held-out tasks, each learner adapts with its own inner loop for a range of step counts
# (MAML: plain SGD steps; iMAML: steps on its proximal objective), and we report the query MSE
# after adaptation.

# %%
STEPS = (0, 1, 5, 10, 20, 40)
held_out = sample_tasks(torch.Generator().manual_seed(1234), 100, queries=50)


def post_adaptation_mse(name, steps):
    params = trained[name]
    if steps == 0:
        return fparams.map_tasks(lambda p, xs, ys, xq, yq: mse(p, xq, yq))(params, *held_out).mean().item()
    task = imaml_task if name == "iMAML" else maml_task

    def adapted(p, xs, ys, xq, yq):
        return task(p, xs, ys, xq, yq, steps=steps)

    with torch.no_grad():  # no meta-gradient needed: the inner loop alone
        return fparams.map_tasks(adapted)(params, *held_out).mean().item()


accuracy = {name: [post_adaptation_mse(name, s) for s in STEPS] for name in trained}
for name, values in accuracy.items():
    print(name, " ".join(f"{s}: {v:.3f}" for s, v in zip(STEPS, values)))

# %% [markdown]
# ## Memory over inner steps
#
# Peak resident memory of one meta-step (forward and backward) over 100 tasks of 100 support
# points, measured in this process: freed heap pages are returned first (`malloc_trim`), the peak
# counter is reset (`/proc/self/clear_refs`), and the step's memory is the peak (`VmHWM`) minus
# the resident memory before it. That needs Linux's `/proc`: on macOS and Windows the cell says so
# and skips the measurement (notebook 07 measures peaks in fresh interpreters, on every system).

# %%
big = sample_tasks(torch.Generator().manual_seed(7), 100, shots=100, queries=100)
CAN_MEASURE = sys.platform.startswith("linux") and os.path.exists("/proc/self/clear_refs")


def trim_heap():
    """Return freed heap pages to the system (glibc's malloc_trim); nothing elsewhere."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # musl, or no C library by that name
        pass


def resident_mib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))


def step_memory_mib(task_loss, steps):
    params = {k: t.clone().requires_grad_() for k, t in trained["MAML"].items()}
    gc.collect()
    trim_heap()
    base = resident_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fparams.map_tasks(lambda p, *t: task_loss(p, *t, steps=steps))(params, *big).mean().backward()
    return resident_mib("VmHWM") - base


MEMORY_STEPS = (1, 5, 10, 20, 40)
memory = {}
if CAN_MEASURE:
    step_memory_mib(imaml_task, 1)  # warm-up: torch's one-off allocations are not a step's memory
    for name, task in (("MAML", maml_task), ("iMAML", imaml_task)):
        memory[name] = [step_memory_mib(task, s) for s in tqdm(MEMORY_STEPS, desc=f"memory of {name}")]
        print(name, " ".join(f"{s}: {v:.0f} MiB" for s, v in zip(MEMORY_STEPS, memory[name])))
else:
    print(f"no /proc/self/clear_refs on {sys.platform}: memory not measured here (see notebook 07)")

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
for name, marker in (("MAML", "o"), ("iMAML", "s")):
    ax1.plot(STEPS, accuracy[name], marker=marker, label=name)
    if name in memory:
        ax2.plot(MEMORY_STEPS, memory[name], marker=marker, label=name)
ax1.set(xlabel="inner steps at test time", ylabel="held-out query MSE", yscale="log")
ax1.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())  # 0.5, 1, 2: not 6x10^0
ax1.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
ax1.set_yticks([0.1, 0.2, 0.5, 1, 2, 5])
ax1.set_title("error after adaptation")
ax2.set(xlabel="inner steps", ylabel="peak memory of a meta-step (MiB)", title="memory (100 tasks)")
ax1.legend()
if memory:
    ax2.legend()
else:
    ax2.text(0.5, 0.5, "not measured: needs Linux's /proc", ha="center", transform=ax2.transAxes)
plt.tight_layout()
plt.show()

# %% [markdown]
# Unrolled MAML keeps every inner step's activations for the backward pass, so its memory grows
# linearly with the steps; iMAML's stays flat, since its backward pass needs only the adapted
# parameters and a few Hessian-vector products. In accuracy the two end close together once each
# takes the steps it was trained for or more (MAML 5, iMAML 20): iMAML's meta-parameters are
# trained for the proximal solution reached after many steps, so its first steps help less.
#
# ## Learning a regulariser with `custom_root`
#
# A logistic regression on 40 training points in 20 dimensions overfits without a penalty. Its
# weights minimise
#
# $$
# f(w, \rho) = \frac{1}{n}\sum_i \log\big(1 + e^{-y_i x_i^\top w}\big)
#   + \frac{e^{\rho}}{2}\lVert w\rVert^2,
# \qquad \lambda = e^{\rho},
# $$
#
# so $\nabla_w f(w^\star, \rho) = 0$ is the optimality condition. Newton's method solves it; the
# gradient of the validation loss with respect to $\rho$ comes through `custom_root` and CG (the
# Hessian is positive definite here).

# %%
g = torch.Generator().manual_seed(0)
D = torch.float64
true_w = torch.randn(20, generator=g, dtype=D) * (torch.rand(20, generator=g, dtype=D) < 0.3)
X_all = torch.randn(1040, 20, generator=g, dtype=D)
y_all = torch.sign(X_all @ true_w + 0.5 * torch.randn(1040, generator=g, dtype=D))
X_train, y_train, X_val, y_val = X_all[:40], y_all[:40], X_all[40:], y_all[40:]


def train_loss(w, rho, X, y):
    return F.softplus(-y * (X @ w)).mean() + 0.5 * rho.exp() * w.pow(2).sum()


def optimality(w, rho, X, y):
    return torch.func.grad(train_loss)(w, rho, X, y)


@implicit.custom_root(optimality, solve=implicit.cg(maxiter=50, tol=1e-10))
def fit(w, rho, X, y):
    for _ in range(30):  # Newton's method: the loss is strictly convex
        hessian = torch.func.hessian(train_loss)(w, rho, X, y)
        w = w - torch.linalg.solve(hessian, optimality(w, rho, X, y))
    return w


def val_loss(rho):
    w = fit(torch.zeros(20, dtype=D), rho, X_train, y_train)
    return F.softplus(-y_val * (X_val @ w)).mean()


# The hypergradient, against central finite differences, far from the optimum (near -3.8)
rho0 = torch.tensor(1.0, dtype=D)
hypergrad = torch.func.grad(val_loss)(rho0)
eps = 1e-5
finite_diff = (val_loss(rho0 + eps) - val_loss(rho0 - eps)) / (2 * eps)
print(f"d val / d rho: implicit {hypergrad.item():.8f}, finite differences {finite_diff.item():.8f}")

# %%
rho = rho0.clone().requires_grad_()
opt = torch.optim.Adam([rho], lr=0.2)
path = []
for _iteration in range(60):
    opt.zero_grad()
    val = val_loss(rho)
    val.backward()
    opt.step()
    path.append((rho.item(), val.item()))

grid = torch.linspace(-8, 2, 41, dtype=D)
curve = torch.stack([val_loss(r) for r in grid])
plt.figure(figsize=(6, 3))
plt.plot(grid, curve, label="validation loss")
plt.plot(*zip(*path), ".", label="Adam on rho, by implicit gradients")
plt.xlabel(r"$\rho = \log \lambda$")
plt.ylabel("validation log-loss")
plt.legend()
plt.show()
learned = math.exp(path[-1][0])
print(f"learned lambda = {learned:.4f}, validation loss {path[-1][1]:.4f}; grid best {curve.min():.4f}")

# %% [markdown]
# ## Self-check

# %%
# iMAML's meta-gradient equals the closed form on linear regression (float64)
Xs, ys = torch.randn(12, 3, dtype=D), torch.randn(12, dtype=D)
Xq, yq = torch.randn(12, 3, dtype=D), torch.randn(12, dtype=D)
theta = torch.randn(3, dtype=D)


def lin(p, X, y):
    return 0.5 * (X @ p["w"] - y).pow(2).mean()


def by_implicit(theta):
    tight = implicit.cg(maxiter=100, tol=1e-12)
    return lin(implicit.adapt(lin, {"w": theta}, Xs, ys, lam=2.0, lr=0.3, steps=300, solve=tight), Xq, yq)


def closed_form(theta):
    A = Xs.T @ Xs / 12 + 2.0 * torch.eye(3, dtype=D)
    return lin({"w": torch.linalg.solve(A, Xs.T @ ys / 12 + 2.0 * theta)}, Xq, yq)


g_implicit, g_closed = torch.func.grad(by_implicit)(theta), torch.func.grad(closed_form)(theta)
assert (g_implicit - g_closed).norm() / g_closed.norm() < 1e-5

# Adaptation with the step count each learner trained with halves its error at least,
# and iMAML's memory does not grow with the inner steps while MAML's does
for name, trained_steps in (("MAML", 5), ("iMAML", 20)):
    assert accuracy[name][STEPS.index(trained_steps)] < 0.5 * accuracy[name][0], name
# ...and iMAML's error after adaptation is comparable to MAML's (within 1.6x at 20 and 40 steps)
for steps in (20, 40):
    assert accuracy["iMAML"][STEPS.index(steps)] < 1.6 * accuracy["MAML"][STEPS.index(steps)], steps
if memory:  # measured where /proc is there (Linux)
    assert max(memory["iMAML"]) < 0.25 * memory["MAML"][-1]
    assert memory["MAML"][-1] > 4 * memory["MAML"][0]

# The hypergradient matches finite differences, and the learned penalty is near the best on the grid
assert abs(hypergrad - finite_diff) < 1e-6 * max(1.0, abs(finite_diff))
assert path[-1][1] < curve.min() + 1e-3
print(f"all checks passed; the notebook ran in {time.perf_counter() - start_notebook:.0f} s")
