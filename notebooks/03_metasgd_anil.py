# %% [markdown]
# # Meta-SGD and ANIL: per-parameter rates and filters
#
# Both are small changes to MAML's inner step $\theta_{\text{task}} = \theta - \alpha \nabla_\theta
# \mathcal{L}_{\text{support}}(\theta)$, and in fparams both are arguments of `fparams.adapt`:
#
# * **Meta-SGD** (Li et al. 2017) learns one inner rate per parameter entry, $\theta_{\text{task}} =
#   \theta - \boldsymbol{\alpha} \odot \nabla_\theta \mathcal{L}_{\text{support}}(\theta)$, with
#   $\boldsymbol{\alpha}$ meta-learned next to $\theta$: pass `lr` as a dict of tensors.
# * **ANIL** (Raghu et al. 2020) adapts only the head: $\theta = (\theta_{\text{body}},
#   \theta_{\text{head}})$ and only $\theta_{\text{head}}$ takes inner steps. Pass
#   `filter="head.*"` (a glob, a regex, a list of them or a predicate); the body stays as it is in
#   the inner loop and still gets outer gradients.
#
# All three are trained here on the sine tasks of `fparams.datasets` with the same budget, then compared.

# %%
from collections import OrderedDict

import matplotlib.pyplot as plt
import torch
from tqdm.auto import tqdm

import fparams
from fparams.datasets import sine_tasks

torch.set_num_threads(1)  # a tiny network: more threads only add overhead
ITERATIONS = 500


def make_model(seed=0):
    torch.manual_seed(seed)
    body = torch.nn.Sequential(
        torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 40), torch.nn.ReLU()
    )
    return torch.nn.Sequential(OrderedDict(body=body, head=torch.nn.Linear(40, 1)))


held_out = sine_tasks(100, queries=100, generator=torch.Generator().manual_seed(1234)).data()


def leaves(tree):
    """The tensors of a dict, or of a dict of dicts, in order."""
    return [t for v in tree.values() for t in (leaves(v) if isinstance(v, dict) else [v])]


def detached(state):
    """The values of `state` cut from autograd's graph: the meta-step takes its own gradient."""
    return {k: fparams.detach(v) if isinstance(v, dict) else v.detach() for k, v in state.items()}


def train(task_loss, state, desc, iterations=ITERATIONS, meta_lr=3e-3):
    """Adam on the tensors of `state` (a dict, or a dict of dicts), one meta_value_and_grad call per step."""
    opt = torch.optim.Adam(leaves(state), lr=meta_lr)
    step = fparams.meta_value_and_grad(task_loss)
    generator = torch.Generator().manual_seed(0)
    for _ in (bar := tqdm(range(iterations), desc=desc)):
        loss, grads = step(detached(state), *sine_tasks(25, generator=generator).data())
        for p, g in zip(leaves(state), leaves(grads)):
            p.grad = g
        opt.step()
        bar.set_postfix(meta_loss=f"{loss.item():.3f}")


class Score(float):
    """A mean over the held-out tasks that carries its standard error, `.sem`."""

    sem = 0.0


def held_out_mse(task_loss, state, steps):
    """Mean query MSE over the 100 held-out tasks after `steps` inner steps (with its standard error)."""
    frozen = detached(state)
    per_task = fparams.map_tasks(lambda s, *task: task_loss(s, *task, steps=steps))(frozen, *held_out)
    score = Score(per_task.mean().item())
    score.sem = (per_task.std() / per_task.numel() ** 0.5).item()
    return score


STEPS = list(range(6))  # inner steps at evaluation
plt.rcParams["figure.dpi"] = 150  # sharp figures on the site and in Jupyter

# %% [markdown]
# ## MAML, the baseline

# %%
model = make_model()
arch, params, _ = fparams.split(model)


def mse(p, x, y):
    return (arch(p, x) - y).pow(2).mean()


def maml_loss(p, xs, ys, xq, yq, steps=1):
    return mse(fparams.adapt(mse, p, xs, ys, lr=0.01, steps=steps), xq, yq)


train(maml_loss, params, "MAML")
maml = {s: held_out_mse(maml_loss, params, s) for s in STEPS}
print(f"MAML held-out MSE: {maml[0]:.3f} before, {maml[1]:.3f} after one step")

# %% [markdown]
# ## Meta-SGD with a dict of rates
#
# The meta-learned state is a dict of dicts, `{"params": ..., "lrs": ...}`, and
# `meta_value_and_grad` differentiates with respect to all of it.

# %%
model = make_model()
arch, params, _ = fparams.split(model)
lrs = {name: torch.full_like(p, 0.01, requires_grad=True) for name, p in params.items()}
state = {"params": params, "lrs": lrs}


def metasgd_loss(state, xs, ys, xq, yq, steps=1):
    fast = fparams.adapt(mse, state["params"], xs, ys, lr=state["lrs"], steps=steps)
    return mse(fast, xq, yq)


train(metasgd_loss, state, "Meta-SGD")
metasgd = {s: held_out_mse(metasgd_loss, state, s) for s in STEPS}
print(f"Meta-SGD held-out MSE: {metasgd[0]:.3f} before, {metasgd[1]:.3f} after one step")

# %% [markdown]
# The learned rates, one box per parameter tensor (all started at 0.01): the box holds the middle
# half of a tensor's rates, the whiskers the 5th to 95th percentiles (the few rates beyond are not
# drawn, so that they do not squash the boxes). Meta-SGD gives some entries much larger steps than
# MAML's single rate, and some negative ones.

# %%
fig, ax = plt.subplots(figsize=(8, 3.2))
ax.boxplot([r.detach().flatten() for r in lrs.values()], whis=(5, 95), showfliers=False)
ax.set_xticks(range(1, len(lrs) + 1), list(lrs))
ax.axhline(0.01, color="tab:gray", ls="--", lw=1, label="initial rate 0.01 (MAML's)")
ax.set_xlabel("parameter tensor")
ax.set_ylabel(r"learned inner rate $\alpha$")
ax.set_title(f"Meta-SGD's learned rates after {ITERATIONS} meta-steps")
ax.legend()
plt.show()

# %% [markdown]
# ## The same step with the learn2learn-style `MetaSGD` class
#
# `fparams.MetaSGD` keeps one rate tensor per `model.parameters()` entry in `meta.lrs`. One step of
# the class and one step of `adapt` with a dict of rates give the same meta-gradients.

# %%
model = make_model(seed=3)
meta = fparams.MetaSGD(model, lr=0.05)
xs, ys, xq, yq = (t[0] for t in held_out)

learner = meta.clone()
learner.adapt(torch.nn.functional.mse_loss(learner(xs), ys))
torch.nn.functional.mse_loss(learner(xq), yq).backward()

arch, params, _ = fparams.split(model)
grads = torch.func.grad(lambda s: metasgd_loss(s, xs, ys, xq, yq))(
    {"params": params, "lrs": dict(zip(params, meta.lrs))}
)
class_agrees = all(
    p.grad is not None
    and rate.grad is not None
    and torch.allclose(p.grad, grads["params"][name], atol=1e-6)
    and torch.allclose(rate.grad, grads["lrs"][name], atol=1e-6)
    for (name, p), rate in zip(params.items(), meta.lrs)
)
print("MetaSGD class and adapt(lr=dict) agree on the gradients of weights and rates:", class_agrees)
learner

# %% [markdown]
# ## ANIL: adapt the head only
#
# `filter="head.*"` picks the parameters that adapt. `fparams.partition` shows which ones those
# are; `fparams.combine` puts the halves back together.

# %%
model = make_model()
arch, params, _ = fparams.split(model)
head, body = fparams.partition(params, "head.*")
print("adapted in the inner loop:", sorted(head))
print("frozen in the inner loop: ", sorted(body))


def anil_loss(p, xs, ys, xq, yq, steps=5):
    return mse(fparams.adapt(mse, p, xs, ys, lr=0.05, steps=steps, filter="head.*"), xq, yq)


fast = fparams.adapt(mse, params, xs, ys, lr=0.05, steps=5, filter="head.*")
body_untouched = all(fast[name] is params[name] for name in body)  # passed through as they are
outer = torch.func.grad(lambda p: anil_loss(p, xs, ys, xq, yq))(params)
body_gets_gradients = all(outer[name].abs().sum() > 0 for name in body)  # ...and still meta-learned
print(f"body passed through: {body_untouched}; body gets outer gradients: {body_gets_gradients}")

train(anil_loss, params, "ANIL (5 head-only steps)")
anil = {s: held_out_mse(anil_loss, params, s) for s in STEPS}
print(f"ANIL held-out MSE: {anil[0]:.3f} before, {anil[5]:.3f} after five head-only steps")

# %% [markdown]
# ## MAML vs Meta-SGD vs ANIL
#
# Held-out MSE before adaptation and after adapting as each was meta-trained: MAML and Meta-SGD one
# step, ANIL five head-only steps; the error bars are the standard error of the mean over the 100
# tasks. Meta-SGD's rates are learned for exactly one step: iterated five times they overshoot
# (the last line below).

# %%
methods = {
    "MAML\n(1 step)": (maml, 1),
    "Meta-SGD\n(1 step)": (metasgd, 1),
    "ANIL\n(5 head-only steps)": (anil, 5),
}
positions = torch.arange(len(methods)).float()
before = [scores[0] for scores, _ in methods.values()]
after = [scores[steps] for scores, steps in methods.values()]
fig, ax = plt.subplots(figsize=(7, 3.5))
ax.bar(
    positions - 0.2,
    before,
    0.4,
    yerr=[s.sem for s in before],
    capsize=4,
    color="tab:gray",
    label="before adaptation",
)
bars = ax.bar(
    positions + 0.2,
    after,
    0.4,
    yerr=[s.sem for s in after],
    capsize=4,
    color="tab:blue",
    label="after adaptation (± standard error)",
)
ax.bar_label(bars, fmt="%.2f", padding=6)
ax.set_xticks(positions.tolist(), list(methods))
ax.set_ylabel("held-out query MSE")
ax.set_title(f"100 held-out sine tasks, {ITERATIONS} meta-steps each")
ax.set_ylim(0, 1.3 * max(before))  # room for the legend above the bars
ax.legend(ncol=2, loc="upper center")
plt.show()
print(f"Meta-SGD after five steps of its one-step rates: {metasgd[5]:.3g}")

# %% [markdown]
# ## Self-check
#
# The numbers this notebook states, checked; CI runs every notebook and fails here if one drifts.

# %%
assert class_agrees and body_untouched and body_gets_gradients
assert fparams.combine(head, body).keys() == params.keys()
assert maml[1] < 0.6 * maml[0], maml
assert metasgd[1] < 0.5 * metasgd[0], metasgd
assert metasgd[1] < maml[1], (metasgd, maml)  # learned rates beat one fixed rate after one step
assert anil[5] < 0.7 * anil[0], anil
moved = max((rate - 0.01).abs().max().item() for rate in lrs.values())
assert moved > 1e-3, moved  # the rates were meta-learned
print("self-check passed")
