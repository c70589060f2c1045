# %% [markdown]
# # fparams quickstart: two faces, one engine
#
# fparams splits a module into an **architecture** (the `nn.Module`, used only as a function) and
# explicit **dicts** of parameters and buffers. On top of that it has two faces:
#
# * the **module face** keeps learn2learn's API (`MAML`, `MetaSGD`, `clone_module`,
#   `update_module`, ...) for code that loops over tasks;
# * the **functional face** works on dicts (`split`, `adapt`, `map_tasks`,
#   `meta_value_and_grad`) and composes with `torch.func` (`grad`, `vmap`) and `torch.compile`.
#
# This notebook does the same MAML step with both faces, checks that they agree, and then migrates a
# learn2learn training loop line by line. The tasks are the sine waves of `fparams.datasets.sine_tasks`:
# $y = A \sin(x - \varphi)$ with $A \sim U[0.1, 5]$, $\varphi \sim U[0, \pi]$, $x \sim U[-5, 5]$.

# %%
import time

import matplotlib.pyplot as plt
import torch
from tqdm.auto import tqdm

import fparams
from fparams.datasets import sine_tasks

torch.set_num_threads(1)  # a tiny network: more threads only add overhead
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 1))
xs, ys, xq, yq = (t[0] for t in sine_tasks(1, generator=torch.Generator().manual_seed(0)).data())
mse = torch.nn.functional.mse_loss
plt.rcParams["figure.dpi"] = 150  # sharp figures on the site and in Jupyter

# %% [markdown]
# ## One MAML step, side by side
#
# With support set $(x_s, y_s)$, query set $(x_q, y_q)$ and inner rate $\alpha$, one MAML step
# adapts the parameters $\theta$ and scores the result on the query set:
#
# $$\theta_{\text{task}} = \theta - \alpha \nabla_\theta \mathcal{L}(\theta; x_s, y_s), \qquad
#   \text{meta-loss} = \mathcal{L}(\theta_{\text{task}}; x_q, y_q).$$
#
# | module face (learn2learn) | functional face |
# |---|---|
# | `maml = fparams.MAML(model, lr=0.1)` | `arch, params, buffers = fparams.split(model)` |
# | `learner = maml.clone()` | nothing to do: `params` is never changed in place |
# | `learner.adapt(mse(learner(xs), ys))` | `fast = fparams.adapt(loss_fn, params, xs, ys, lr=0.1)` |
# | `mse(learner(xq), yq)` | `loss_fn(fast, xq, yq)` |

# %%
# Module face
maml = fparams.MAML(model, lr=0.1)
learner = maml.clone()  # a copy of the module that stays in the autograd graph
learner.adapt(mse(learner(xs), ys))  # one differentiable SGD step, written into `learner`
module_loss = mse(learner(xq), yq)
module_grads = torch.autograd.grad(module_loss, list(maml.parameters()))
learner

# %% [markdown]
# The functional face holds the same tensors as a dict; `fparams.summary` lists them without
# printing their values.

# %%
# Functional face
arch, params, buffers = fparams.split(model)


def loss_fn(p, x, y):
    return mse(arch(p, x), y)


def task_loss(p):
    fast = fparams.adapt(loss_fn, p, xs, ys, lr=0.1)  # a new dict; `p` is untouched
    return loss_fn(fast, xq, yq)


functional_grads, functional_loss = torch.func.grad_and_value(task_loss)(params)
fparams.summary(params)

# %%
same_grads = all(
    torch.allclose(g, functional_grads[name], atol=1e-6) for g, name in zip(module_grads, params)
)
print(f"query loss: module face {module_loss.item():.6f}, functional face {functional_loss.item():.6f}")
print("same meta-gradient:", same_grads)

# %% [markdown]
# The learn2learn utilities are there too, and each has a pure dict counterpart:
# `clone_module` / `fparams.clone`, `update_module` / `fparams.apply_updates`,
# `detach_module` / `fparams.detach`.

# %%
clone = fparams.clone_module(model)
grads = torch.autograd.grad(mse(clone(xs), ys), list(clone.parameters()), create_graph=True)
clone = fparams.update_module(clone, updates=[-0.1 * g for g in grads])  # p + u, in place

updates = {name: -0.1 * g for name, g in zip(params, grads)}
new_params = fparams.apply_updates(fparams.clone(params), updates)  # p + u, a new dict
same_update = torch.allclose(clone(xq), arch(new_params, xq))
print("update_module and apply_updates agree:", same_update)

# %% [markdown]
# ## Migrating a learn2learn training loop, line by line
#
# A typical learn2learn MAML loop:
#
# ```python
# import learn2learn as l2l
#
# maml = l2l.algorithms.MAML(model, lr=0.01)
# opt = torch.optim.Adam(maml.parameters(), lr=3e-3)
# for iteration in range(iterations):
#     opt.zero_grad()
#     for xs, ys, xq, yq in zip(*sine_tasks(10, generator=generator).data()):
#         learner = maml.clone()
#         learner.adapt(mse(learner(xs), ys))
#         (mse(learner(xq), yq) / 10).backward()
#     opt.step()
# ```
#
# **Step 1**: change `l2l.algorithms.MAML` to `fparams.MAML`. Nothing else changes.


# %%
def fresh_model():
    torch.manual_seed(1)
    return torch.nn.Sequential(
        torch.nn.Linear(1, 40),
        torch.nn.ReLU(),
        torch.nn.Linear(40, 40),
        torch.nn.ReLU(),
        torch.nn.Linear(40, 1),
    )


iterations, tasks = 150, 10

model_a = fresh_model()
maml = fparams.MAML(model_a, lr=0.01)  # was: l2l.algorithms.MAML(model_a, lr=0.01)
opt = torch.optim.Adam(maml.parameters(), lr=3e-3)
generator = torch.Generator().manual_seed(0)
loop_losses = []
start = time.perf_counter()
for _ in (bar := tqdm(range(iterations), desc="module face, task by task")):
    opt.zero_grad()
    meta_loss = 0.0
    for xs_i, ys_i, xq_i, yq_i in zip(*sine_tasks(tasks, generator=generator).data()):
        learner = maml.clone()
        learner.adapt(mse(learner(xs_i), ys_i))
        task_meta_loss = mse(learner(xq_i), yq_i) / tasks
        task_meta_loss.backward()
        meta_loss += task_meta_loss.item()
    opt.step()
    loop_losses.append(meta_loss)
    bar.set_postfix(meta_loss=f"{meta_loss:.3f}")
loop_seconds = time.perf_counter() - start

# %% [markdown]
# **Step 2**: go functional, and do all tasks of a meta-batch in one vectorised call.
#
# | learn2learn line | functional line |
# |---|---|
# | `maml = l2l.algorithms.MAML(model, lr=0.01)` | `arch, params, _ = fparams.split(model)` |
# | `opt = torch.optim.Adam(maml.parameters(), lr=3e-3)` | the same, over `model.parameters()` |
# | `for ... in zip(*tasks):` | gone: `meta_value_and_grad` maps the tasks (`map_tasks`, vmap) |
# | `learner = maml.clone()` | gone: adaptation returns a new dict |
# | `learner.adapt(mse(learner(xs), ys))` | `fast = fparams.adapt(sine_mse, p, xs, ys, lr=0.01)` |
# | `(mse(learner(xq), yq) / tasks).backward()` | `loss, grads = step(fparams.detach(params), *tasks)` |
# | (`.backward()` filled `p.grad`) | `p.grad = grads[name]` for every name |
# | `opt.step()` | `opt.step()` |

# %%
model_b = fresh_model()
arch, params, _ = fparams.split(model_b)
opt = torch.optim.Adam(model_b.parameters(), lr=3e-3)


def sine_mse(p, x, y):
    return mse(arch(p, x), y)


def sine_task_loss(p, xs, ys, xq, yq):
    return sine_mse(fparams.adapt(sine_mse, p, xs, ys, lr=0.01), xq, yq)


step = fparams.meta_value_and_grad(sine_task_loss)  # mean over tasks, and its gradient
generator = torch.Generator().manual_seed(0)
vmap_losses = []
start = time.perf_counter()
for _ in (bar := tqdm(range(iterations), desc="functional face, all tasks at once")):
    # detached: the step takes the meta-gradient itself, one task's graph at a time
    loss, grads = step(fparams.detach(params), *sine_tasks(tasks, generator=generator).data())
    for name, p in params.items():
        p.grad = grads[name]
    opt.step()
    vmap_losses.append(loss.item())
    bar.set_postfix(meta_loss=f"{loss.item():.3f}")
vmap_seconds = time.perf_counter() - start
speedup = loop_seconds / vmap_seconds

# %% [markdown]
# Same initialisation, same tasks: both loops follow the same meta-loss curve and end at the same
# parameters. The vectorised one is faster.

# %%
worst = max((a - b).abs().max().item() for a, b in zip(model_a.parameters(), model_b.parameters()))
print(f"largest difference between the two trained models: {worst:.2e}")

fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.5), gridspec_kw={"width_ratios": [2, 1]})
left.plot(loop_losses, lw=4, alpha=0.4, color="tab:blue", label="module face (task by task)")
left.plot(vmap_losses, "o", ms=3, color="tab:orange", label="functional face (vmap)")
window = 10  # the meta-loss of one batch is noisy: its running mean shows the learning
smooth = torch.tensor(vmap_losses).unfold(0, window, 1).mean(1)
left.plot(range(window - 1, iterations), smooth, color="black", lw=1.5, label=f"running mean of {window}")
left.set_xlabel("meta-step")
left.set_ylabel("meta-loss (query MSE after 1 step)")
left.set_title("the same training, step for step")
left.legend()
right.barh(["task by task", "vmap"], [loop_seconds, vmap_seconds], color=["tab:blue", "tab:orange"])
right.set_xlabel(f"seconds for {iterations} meta-steps")
right.set_title(f"{speedup:.1f}x faster with vmap")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Self-check
#
# The numbers this notebook states, checked; CI runs every notebook and fails here if one drifts.

# %%
assert torch.allclose(module_loss, functional_loss)
assert same_grads and same_update
assert worst < 1e-4, worst
assert smooth[-1] < 0.7 * smooth[0], smooth  # meta-training lowered the loss after adaptation
assert sum(1 for _ in model_a.parameters()) == len(params) == 6
assert "lr=0.1" in repr(fparams.MAML(model, lr=0.1))
print("self-check passed")
