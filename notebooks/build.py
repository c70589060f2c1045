"""Write the tutorial notebooks from the cell sources below, without outputs.

The notebooks are committed as this script writes them: no outputs, no
execution counts. Edit the cells here (or the notebooks in Jupyter, then strip
their outputs) and run ``python notebooks/build.py``. ``tests/test_notebooks.py``
executes every notebook and checks that none was committed with outputs.
"""

from __future__ import annotations

import os
import textwrap
from typing import List, Tuple

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))
Cell = Tuple[str, str]


def md(text: str) -> Cell:
    return ("markdown", textwrap.dedent(text).strip())


def code(text: str) -> Cell:
    return ("code", textwrap.dedent(text).strip())


SINE_SETUP = '''
import math
import time

import matplotlib.pyplot as plt
import torch

import fparams

torch.set_num_threads(1)  # a tiny network: more threads only add overhead


def sample_tasks(generator, n, shots=10, queries=10):
    """n sine tasks A*sin(x - phase): A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5]."""
    amplitude = torch.rand(n, 1, 1, generator=generator) * 4.9 + 0.1
    phase = torch.rand(n, 1, 1, generator=generator) * math.pi
    x = torch.rand(n, shots + queries, 1, generator=generator) * 10 - 5
    y = amplitude * torch.sin(x - phase)
    return x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:]
'''

QUICKSTART: List[Cell] = [
    md("""
    # fparams quickstart: two faces, one engine

    fparams splits a module into an **architecture** (the `nn.Module`, used only as a function) and
    explicit **dicts** of parameters and buffers. On top of that it has two faces:

    * the **module face** keeps learn2learn's API (`MAML`, `MetaSGD`, `clone_module`,
      `update_module`, ...) for code that loops over tasks;
    * the **functional face** works on dicts (`split`, `adapt`, `map_tasks`,
      `meta_value_and_grad`) and composes with `torch.func` (`grad`, `vmap`) and `torch.compile`.

    This notebook does the same MAML step with both faces, checks they agree, and then migrates a
    learn2learn training loop line by line.
    """),
    code(
        SINE_SETUP
        + """

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 1))
xs, ys, xq, yq = (t[0] for t in sample_tasks(torch.Generator().manual_seed(0), 1))
mse = torch.nn.functional.mse_loss
"""
    ),
    md("""
    ## One MAML step, side by side

    | module face (learn2learn) | functional face |
    |---|---|
    | `maml = fparams.MAML(model, lr=0.1)` | `arch, params, buffers = fparams.split(model)` |
    | `learner = maml.clone()` | nothing to do: `params` is never changed in place |
    | `learner.adapt(mse(learner(xs), ys))` | `fast = fparams.adapt(loss_fn, params, xs, ys, lr=0.1)` |
    | `mse(learner(xq), yq)` | `loss_fn(fast, xq, yq)` |
    """),
    code("""
    # Module face
    maml = fparams.MAML(model, lr=0.1)
    learner = maml.clone()  # a copy of the module that stays in the autograd graph
    learner.adapt(mse(learner(xs), ys))  # one differentiable SGD step, written into `learner`
    module_loss = mse(learner(xq), yq)
    module_grads = torch.autograd.grad(module_loss, list(maml.parameters()))
    module_loss.item()
    """),
    code("""
    # Functional face
    arch, params, buffers = fparams.split(model)
    print(sorted(params))


    def loss_fn(p, x, y):
        return mse(arch(p, x), y)


    def task_loss(p):
        fast = fparams.adapt(loss_fn, p, xs, ys, lr=0.1)  # a new dict; `p` is untouched
        return loss_fn(fast, xq, yq)


    functional_grads, functional_loss = torch.func.grad_and_value(task_loss)(params)
    functional_loss.item()
    """),
    code("""
    assert torch.allclose(module_loss, functional_loss)
    for g, name in zip(module_grads, params):
        assert torch.allclose(g, functional_grads[name], atol=1e-6), name
    print("both faces give the same query loss and the same meta-gradient")
    """),
    md("""
    The learn2learn utilities are there too, and each has a pure dict counterpart:
    `clone_module` / `fparams.clone`, `update_module` / `fparams.apply_updates`,
    `detach_module` / `fparams.detach`.
    """),
    code("""
    clone = fparams.clone_module(model)
    grads = torch.autograd.grad(mse(clone(xs), ys), list(clone.parameters()), create_graph=True)
    clone = fparams.update_module(clone, updates=[-0.1 * g for g in grads])  # p + u, in place

    updates = {name: -0.1 * g for name, g in zip(params, grads)}
    new_params = fparams.apply_updates(fparams.clone(params), updates)  # p + u, a new dict
    assert torch.allclose(clone(xq), arch(new_params, xq))
    """),
    md("""
    ## Migrating a learn2learn training loop, line by line

    A typical learn2learn MAML loop:

    ```python
    import learn2learn as l2l

    maml = l2l.algorithms.MAML(model, lr=0.01)
    opt = torch.optim.Adam(maml.parameters(), lr=1e-3)
    for iteration in range(iterations):
        opt.zero_grad()
        for xs, ys, xq, yq in zip(*sample_tasks(generator, 10)):
            learner = maml.clone()
            learner.adapt(mse(learner(xs), ys))
            (mse(learner(xq), yq) / 10).backward()
        opt.step()
    ```

    **Step 1**: change `l2l.algorithms.MAML` to `fparams.MAML`. Nothing else changes.
    """),
    code("""
    def fresh_model():
        torch.manual_seed(1)
        return torch.nn.Sequential(
            torch.nn.Linear(1, 40), torch.nn.ReLU(),
            torch.nn.Linear(40, 40), torch.nn.ReLU(),
            torch.nn.Linear(40, 1),
        )


    iterations, tasks = 30, 10

    model_a = fresh_model()
    maml = fparams.MAML(model_a, lr=0.01)  # was: l2l.algorithms.MAML(model_a, lr=0.01)
    opt = torch.optim.Adam(maml.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for iteration in range(iterations):
        opt.zero_grad()
        for xs, ys, xq, yq in zip(*sample_tasks(generator, tasks)):
            learner = maml.clone()
            learner.adapt(mse(learner(xs), ys))
            (mse(learner(xq), yq) / tasks).backward()
        opt.step()
    loop_seconds = time.perf_counter() - start
    print(f"module face, one task at a time: {loop_seconds:.2f} s")
    """),
    md("""
    **Step 2**: go functional, and do all tasks of a meta-batch in one vectorised call.

    | learn2learn line | functional line |
    |---|---|
    | `maml = l2l.algorithms.MAML(model, lr=0.01)` | `arch, params, _ = fparams.split(model)` |
    | `opt = torch.optim.Adam(maml.parameters(), lr=1e-3)` | the same, over `model.parameters()` |
    | `for ... in zip(*tasks):` | gone: `meta_value_and_grad` maps the tasks (`map_tasks`, vmap) |
    | `learner = maml.clone()` | gone: adaptation returns a new dict |
    | `learner.adapt(mse(learner(xs), ys))` | `fast = fparams.adapt(loss_fn, p, xs, ys, lr=0.01)` |
    | `(mse(learner(xq), yq) / tasks).backward()` | `loss, grads = step(params, *tasks)` |
    | (`.backward()` filled `p.grad`) | `p.grad = grads[name]` for every name |
    | `opt.step()` | `opt.step()` |
    """),
    code("""
    model_b = fresh_model()
    arch, params, _ = fparams.split(model_b)
    opt = torch.optim.Adam(model_b.parameters(), lr=1e-3)


    def loss_fn(p, x, y):
        return mse(arch(p, x), y)


    def task_loss(p, xs, ys, xq, yq):
        return loss_fn(fparams.adapt(loss_fn, p, xs, ys, lr=0.01), xq, yq)


    step = fparams.meta_value_and_grad(task_loss)  # mean over tasks, and its gradient
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for iteration in range(iterations):
        loss, grads = step(params, *sample_tasks(generator, tasks))
        for name, p in params.items():
            p.grad = grads[name]
        opt.step()
    vmap_seconds = time.perf_counter() - start
    speedup = loop_seconds / vmap_seconds
    print(f"functional face, all tasks in one call: {vmap_seconds:.2f} s ({speedup:.1f}x faster)")
    """),
    md("Same initialisation, same tasks: both loops end at the same parameters."),
    code("""
    worst = max((a - b).abs().max().item() for a, b in zip(model_a.parameters(), model_b.parameters()))
    print(f"largest difference between the two trained models: {worst:.2e}")
    assert worst < 1e-4
    assert sum(1 for _ in model_a.parameters()) == len(params) == 6
    """),
]

MAML_SINE: List[Cell] = [
    md("""
    # MAML on sine waves, all tasks at once

    The few-shot regression benchmark of Finn et al. (2017): each task is `A sin(x - phase)` with
    `A ~ U[0.1, 5]`, `phase ~ U[0, pi]`, `x ~ U[-5, 5]`; the learner sees 10 points and is scored
    on 10 others. `fparams.meta_value_and_grad` runs the whole meta-batch as one call: it maps the
    per-task loss over tasks with `torch.func.vmap` (through `fparams.map_tasks`) and differentiates
    the mean through the inner steps.
    """),
    code(
        SINE_SETUP
        + """

torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 40), torch.nn.ReLU(), torch.nn.Linear(40, 1)
)
arch, params, _ = fparams.split(model)


def mse(p, x, y):
    return (arch(p, x) - y).pow(2).mean()


def task_loss(p, xs, ys, xq, yq, steps=1):
    return mse(fparams.adapt(mse, p, xs, ys, lr=0.01, steps=steps), xq, yq)
"""
    ),
    md("## Meta-training: one call per meta-batch of 25 tasks"),
    code("""
    step = fparams.meta_value_and_grad(task_loss)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    start = time.perf_counter()
    for iteration in range(300):
        loss, grads = step(params, *sample_tasks(generator, 25))
        for name, p in params.items():
            p.grad = grads[name]
        opt.step()
        losses.append(loss.item())
    print(f"300 meta-steps in {time.perf_counter() - start:.1f} s")

    plt.figure(figsize=(6, 3))
    plt.plot(torch.tensor(losses).view(-1, 20).mean(1))
    plt.xlabel("meta-step / 20")
    plt.ylabel("query MSE after 1 step")
    plt.show()
    """),
    md("## Held-out tasks: before and after adaptation"),
    code("""
    held_out = sample_tasks(torch.Generator().manual_seed(1234), 100, queries=100)
    fixed = fparams.detach(params)
    scores = {}
    for steps in (0, 1, 10):
        per_task = fparams.map_tasks(lambda p, *task: task_loss(p, *task, steps=steps))(fixed, *held_out)
        scores[steps] = per_task.mean().item()
        print(f"held-out MSE after {steps:2d} inner steps: {scores[steps]:.3f}")
    """),
    code("""
    x = torch.linspace(-5, 5, 200).unsqueeze(-1)
    xs, ys, xq, yq = (t[:2] for t in held_out)


    def predict(p, xs, ys, steps):
        return arch(fparams.adapt(mse, p, xs, ys, lr=0.01, steps=steps), x)


    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for i, ax in enumerate(axes):
        order = xq[i, :, 0].argsort()
        ax.plot(xq[i, order], yq[i, order], "k", lw=2, label="true")
        for steps in (0, 1, 10):
            pred = predict(fixed, xs[i], ys[i], steps).detach()
            ax.plot(x, pred, label=f"{steps} steps")
        ax.scatter(xs[i], ys[i], color="red", zorder=3, label="support")
    axes[0].legend()
    plt.show()
    """),
    md("""
    ## The compiled meta-step

    `meta_value_and_grad(..., compile=True)` runs the same step through `torch.compile`
    (`fparams.compile`, which falls back to eager with a `CompileFallbackWarning` where compilation
    fails). The first call compiles; then each step is one fused kernel program. To keep compilation
    short this uses a one-hidden-layer network.
    """),
    code("""
    import warnings

    torch.manual_seed(0)
    small = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 1))
    small_arch, small_params, _ = fparams.split(small)
    small_params = fparams.detach(small_params)


    def small_mse(p, x, y):
        return (small_arch(p, x) - y).pow(2).mean()


    def small_task_loss(p, xs, ys, xq, yq):
        return small_mse(fparams.adapt(small_mse, p, xs, ys, lr=0.01), xq, yq)


    batch = sample_tasks(torch.Generator().manual_seed(0), 25)
    eager_step = fparams.meta_value_and_grad(small_task_loss)
    compiled_step = fparams.meta_value_and_grad(small_task_loss, compile=True)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", fparams.CompileFallbackWarning)
        start = time.perf_counter()
        compiled_loss, compiled_grads = compiled_step(small_params, *batch)
        print(f"first call (compiles): {time.perf_counter() - start:.1f} s")
    fell_back = any(issubclass(w.category, fparams.CompileFallbackWarning) for w in caught)
    print("compilation failed, running eagerly" if fell_back else "compiled")


    def seconds_per_step(step, repeats=30):
        step(small_params, *batch)
        start = time.perf_counter()
        for _ in range(repeats):
            step(small_params, *batch)
        return (time.perf_counter() - start) / repeats


    eager_s, compiled_s = seconds_per_step(eager_step), seconds_per_step(compiled_step)
    speedup = eager_s / compiled_s
    print(f"eager {1e3 * eager_s:.2f} ms/step, compiled {1e3 * compiled_s:.2f} ms/step: {speedup:.1f}x")
    """),
    code("""
    eager_loss, eager_grads = eager_step(small_params, *batch)
    assert torch.allclose(compiled_loss, eager_loss, atol=1e-5)
    for name in eager_grads:
        assert torch.allclose(compiled_grads[name], eager_grads[name], atol=1e-5), name
    assert math.isfinite(speedup) and speedup > 0
    # Meta-learning worked: adaptation on 10 points cuts the held-out error several-fold.
    assert scores[1] < 0.7 * scores[0], scores
    assert scores[10] < 0.4 * scores[0], scores
    """),
]

METASGD_ANIL: List[Cell] = [
    md("""
    # Meta-SGD and ANIL: per-parameter rates and filters

    Both are small changes to MAML's inner loop, and in fparams both are arguments of
    `fparams.adapt`:

    * **Meta-SGD** (Li et al. 2017) learns one inner learning rate per parameter entry: pass
      `lr` as a dict of tensors, and meta-learn it with the parameters.
    * **ANIL** (Raghu et al. 2020) adapts only the head: pass `filter="head.*"` (a glob, a regex,
      a list of them or a predicate); the body stays as it is in the inner loop and still gets
      outer gradients.
    """),
    code(
        SINE_SETUP
        + '''

from collections import OrderedDict


def make_model(seed=0):
    torch.manual_seed(seed)
    body = torch.nn.Sequential(
        torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 40), torch.nn.ReLU()
    )
    return torch.nn.Sequential(OrderedDict(body=body, head=torch.nn.Linear(40, 1)))


held_out = sample_tasks(torch.Generator().manual_seed(1234), 100, queries=100)


def train(task_loss, state, iterations=200, meta_lr=3e-3):
    """Adam on any pytree of leaf tensors `state`, one meta_value_and_grad call per step."""
    leaves = torch.utils._pytree.tree_leaves(state)
    opt = torch.optim.Adam(leaves, lr=meta_lr)
    step = fparams.meta_value_and_grad(task_loss)
    generator = torch.Generator().manual_seed(0)
    for _ in range(iterations):
        loss, grads = step(state, *sample_tasks(generator, 25))
        for p, g in zip(leaves, torch.utils._pytree.tree_leaves(grads)):
            p.grad = g
        opt.step()
    return loss.item()
'''
    ),
    md("""
    ## Meta-SGD with a dict of rates

    The meta-learned state is a pytree: `{"params": ..., "lrs": ...}`. `meta_value_and_grad`
    differentiates with respect to all of it.
    """),
    code("""
    model = make_model()
    arch, params, _ = fparams.split(model)
    lrs = {name: torch.full_like(p, 0.01, requires_grad=True) for name, p in params.items()}
    state = {"params": params, "lrs": lrs}


    def mse(p, x, y):
        return (arch(p, x) - y).pow(2).mean()


    def metasgd_loss(state, xs, ys, xq, yq, steps=1):
        fast = fparams.adapt(mse, state["params"], xs, ys, lr=state["lrs"], steps=steps)
        return mse(fast, xq, yq)


    start = time.perf_counter()
    train(metasgd_loss, state)
    print(f"Meta-SGD: 200 meta-steps in {time.perf_counter() - start:.1f} s")
    for name, rate in lrs.items():
        print(f"{name:15s} learned rates from {rate.min().item():+.3f} to {rate.max().item():+.3f}")


    def held_out_mse(task_loss, state, steps):
        frozen = torch.utils._pytree.tree_map(lambda t: t.detach(), state)
        per_task = fparams.map_tasks(lambda s, *task: task_loss(s, *task, steps=steps))(frozen, *held_out)
        return per_task.mean().item()


    metasgd = {s: held_out_mse(metasgd_loss, state, s) for s in (0, 1)}
    print(f"Meta-SGD held-out MSE: {metasgd[0]:.3f} before, {metasgd[1]:.3f} after one step")
    """),
    md("""
    ## The same step with the learn2learn-style `MetaSGD` class

    `fparams.MetaSGD` keeps one rate tensor per `model.parameters()` entry in `meta.lrs`. One step of
    the class and one step of `adapt` with a dict of rates give the same meta-gradients.
    """),
    code("""
    model = make_model(seed=3)
    meta = fparams.MetaSGD(model, lr=0.05)
    xs, ys, xq, yq = (t[0] for t in held_out)

    learner = meta.clone()
    learner.adapt(torch.nn.functional.mse_loss(learner(xs), ys))
    torch.nn.functional.mse_loss(learner(xq), yq).backward()

    arch, params, _ = fparams.split(model)
    lr_dict = dict(zip(params, meta.lrs))
    state = {"params": params, "lrs": lr_dict}
    grads = torch.func.grad(lambda s: metasgd_loss(s, xs, ys, xq, yq))(state)
    for (name, p), rate in zip(params.items(), meta.lrs):
        assert torch.allclose(p.grad, grads["params"][name], atol=1e-6), name
        assert torch.allclose(rate.grad, grads["lrs"][name], atol=1e-6), name
    print("MetaSGD class and adapt(lr=dict) agree on the gradients of weights and rates")
    """),
    md("""
    ## ANIL: adapt the head only

    `filter="head.*"` picks the parameters that adapt. `fparams.partition` shows which ones those
    are; `fparams.combine` puts the halves back together.
    """),
    code("""
    model = make_model()
    arch, params, _ = fparams.split(model)
    head, body = fparams.partition(params, "head.*")
    print("adapted in the inner loop:", sorted(head))
    print("frozen in the inner loop: ", sorted(body))
    assert fparams.combine(head, body).keys() == params.keys()


    def mse(p, x, y):
        return (arch(p, x) - y).pow(2).mean()


    def anil_loss(p, xs, ys, xq, yq, steps=5):
        return mse(fparams.adapt(mse, p, xs, ys, lr=0.05, steps=steps, filter="head.*"), xq, yq)


    xs, ys, xq, yq = (t[0] for t in held_out)
    fast = fparams.adapt(mse, params, xs, ys, lr=0.05, steps=5, filter="head.*")
    assert all(fast[name] is params[name] for name in body)  # the body is passed through untouched
    assert not torch.equal(fast["head.weight"], params["head.weight"])

    outer = torch.func.grad(lambda p: anil_loss(p, xs, ys, xq, yq))(params)
    assert all(outer[name].abs().sum() > 0 for name in body)  # ...and still gets outer gradients

    start = time.perf_counter()
    train(anil_loss, params)
    print(f"ANIL: 200 meta-steps in {time.perf_counter() - start:.1f} s")
    anil = {s: held_out_mse(anil_loss, params, s) for s in (0, 5)}
    print(f"ANIL held-out MSE: {anil[0]:.3f} before, {anil[5]:.3f} after five head-only steps")
    """),
    code("""
    assert metasgd[1] < 0.5 * metasgd[0], metasgd
    assert anil[5] < 0.7 * anil[0], anil
    moved = max((rate - 0.01).abs().max().item() for rate in lrs.values())
    assert moved > 1e-3, moved  # the rates were meta-learned
    """),
]

DICE: List[Cell] = [
    md("""
    # DiCE: derivatives of every order from samples

    A softmax policy with logits `theta` picks arm `a` of a two-armed bandit with probability
    `pi = softmax(theta)` and gets the fixed reward `r[a]`. The expected return and its derivatives
    are known in closed form:

    * `J = sum_a pi_a r_a`
    * `dJ/dtheta_i = pi_i (r_i - J)`
    * `d2J/dtheta_i dtheta_j = pi_i (delta_ij - pi_j)(r_i - J) - pi_i pi_j (r_j - J)`

    From samples, the **score-function surrogate** `mean(log pi(a) * r)` has the right gradient but
    the wrong second derivative: differentiating it twice drops the `grad log pi grad log pi^T`
    term. **DiCE** (Foerster et al. 2018) multiplies the reward by `magic_box(log pi(a))`, which
    evaluates to 1 and whose derivatives of every order are unbiased.
    """),
    code("""
    import matplotlib.pyplot as plt
    import torch

    import fparams

    torch.set_num_threads(1)
    torch.manual_seed(0)
    theta0 = torch.tensor([0.4, -0.3], dtype=torch.float64)
    rewards = torch.tensor([1.0, 3.0], dtype=torch.float64)

    pi = theta0.softmax(0)
    J = (pi * rewards).sum()
    true_grad = pi * (rewards - J)
    eye = torch.eye(2, dtype=torch.float64)
    true_hess = (pi[:, None] * (eye - pi[None, :]) * (rewards - J)[:, None]
                 - pi[:, None] * pi[None, :] * (rewards - J)[None, :])
    print("gradient:", true_grad)
    print("Hessian:\\n", true_hess)

    # The closed forms agree with autograd on the exact objective.
    exact = lambda th: (th.softmax(0) * rewards).sum()  # noqa: E731
    assert torch.allclose(torch.func.grad(exact)(theta0), true_grad)
    assert torch.allclose(torch.func.hessian(exact)(theta0), true_hess)
    """),
    code("""
    def estimates(surrogate, n, seed=0):
        \"\"\"Gradient and Hessian of a surrogate objective built from n sampled arms.\"\"\"
        theta = theta0.clone().requires_grad_()
        generator = torch.Generator().manual_seed(seed)
        arms = torch.multinomial(theta0.softmax(0), n, replacement=True, generator=generator)
        logp = theta.log_softmax(0)[arms]
        objective = surrogate(logp, rewards[arms])
        (grad,) = torch.autograd.grad(objective, theta, create_graph=True)
        hess = torch.stack([torch.autograd.grad(grad[i], theta, retain_graph=True)[0] for i in range(2)])
        return grad.detach(), hess


    def dice(logp, r):
        return (fparams.magic_box(logp) * r).mean()


    def score_function(logp, r):
        return (logp * r).mean()


    sizes = [10**k for k in range(2, 7)]
    errors = {"DiCE": [], "score function": []}
    for n in sizes:
        for name, surrogate in (("DiCE", dice), ("score function", score_function)):
            grad, hess = estimates(surrogate, n)
            grad_error = (grad - true_grad).abs().max().item()
            errors[name].append((grad_error, (hess - true_hess).abs().max().item()))
    for name, rows in errors.items():
        print(name)
        for n, (g, h) in zip(sizes, rows):
            print(f"  n={n:>8}: gradient error {g:.4f}, Hessian error {h:.4f}")
    """),
    code("""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
    for ax, which, title in zip(axes, (0, 1), ("first derivative", "second derivative")):
        for name, rows in errors.items():
            ax.loglog(sizes, [row[which] for row in rows], "o-", label=name)
        ax.set_title(f"{title}: largest error")
        ax.set_xlabel("samples")
    axes[0].legend()
    plt.show()
    """),
    md("""
    With a million samples both estimators have the gradient right; only DiCE has the Hessian
    right. The score-function surrogate's Hessian converges to the wrong matrix,
    `E[grad^2 log pi * r]`, missing `E[grad log pi grad log pi^T * r]`.
    """),
    code("""
    dice_grad_err, dice_hess_err = errors["DiCE"][-1]
    sf_grad_err, sf_hess_err = errors["score function"][-1]
    scale = true_hess.abs().max().item()
    assert dice_grad_err < 0.01 and sf_grad_err < 0.01, (dice_grad_err, sf_grad_err)
    assert dice_hess_err < 0.05 * scale, (dice_hess_err, scale)
    assert sf_hess_err > 0.3 * scale, (sf_hess_err, scale)  # biased: does not shrink with samples
    assert errors["score function"][-1][1] > 0.5 * errors["score function"][0][1]
    """),
]

BATCHNORM: List[Cell] = [
    md("""
    # BatchNorm over tasks: an exact meta-gradient under vmap

    Batch normalization inside a task computes statistics over that task's batch. Under
    `torch.func.vmap`, torch 2.13's batching rules for the native `batch_norm` kernel give a
    **silently wrong second-order gradient** when a parameterised layer comes before the
    normalization, exactly the case of a MAML meta-gradient through an inner step. fparams'
    `map_tasks` (and so `meta_value_and_grad`) runs the normalization layers under
    `fparams.exact_norms`, which writes them with plain tensor ops whose vmap rules are exact.

    The reference is float64 central finite differences of the same objective computed one task at a
    time, without vmap.
    """),
    code("""
    import time

    import torch

    import fparams

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(1, 8),
        torch.nn.BatchNorm1d(8, track_running_stats=False),  # batch statistics in every call
        torch.nn.ReLU(),
        torch.nn.Linear(8, 1),
    ).double()
    arch, params, _ = fparams.split(model)
    params = fparams.detach(params)


    def mse(p, x, y):
        return (arch(p, x) - y).pow(2).mean()


    def task_loss(p, xs, ys, xq, yq):
        return mse(fparams.adapt(mse, p, xs, ys, lr=0.1), xq, yq)


    tasks = 4
    xs, xq = (torch.randn(tasks, 10, 1, dtype=torch.float64) for _ in range(2))
    ys, yq = torch.sin(xs), torch.sin(xq)
    """),
    md("## Three meta-gradients of the mean query loss"),
    code("""
    # 1. raw torch.func: vmap over tasks, grad of the mean
    raw = torch.func.grad(
        lambda p: torch.func.vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(p, xs, ys, xq, yq).mean()
    )(params)

    # 2. fparams: the same per-task function, mapped by map_tasks under exact_norms
    _, ours = fparams.meta_value_and_grad(task_loss)(params, xs, ys, xq, yq)


    # 3. the reference: central finite differences of the task-by-task loop, no vmap
    def objective(p):
        return sum(task_loss(p, xs[i], ys[i], xq[i], yq[i]) for i in range(tasks)) / tasks


    def finite_differences(p, eps=1e-6):
        out = {}
        for name, t in p.items():
            g = torch.zeros_like(t)
            for j in range(t.numel()):
                bumped = dict(p)
                for sign in (1, -1):
                    shifted = t.clone()
                    shifted.view(-1)[j] += sign * eps
                    bumped[name] = shifted
                    g.view(-1)[j] += sign * objective(bumped) / (2 * eps)
            out[name] = g
        return out


    start = time.perf_counter()
    reference = finite_differences(params)
    print(f"finite differences: {time.perf_counter() - start:.1f} s")
    """),
    code("""
    def flat(g):
        return torch.cat([g[name].reshape(-1) for name in params])


    def relative_error(g):
        return ((flat(g) - flat(reference)).norm() / flat(reference).norm()).item()


    raw_error, ours_error = relative_error(raw), relative_error(ours)
    print(f"raw vmap:  relative error {raw_error:.1e}")
    print(f"fparams:   relative error {ours_error:.1e}")
    for name in params:
        worst = (raw[name] - reference[name]).abs().max().item()
        print(f"  {name:10s} raw vmap off by up to {worst:.1e}")
    """),
    md("""
    The raw vmap gradient is off by about a percent, in float64 where finite differences agree to
    eight digits: not rounding, a wrong batching rule for the double backward of the fused kernel.
    fparams' meta-gradient matches the reference.

    To give every task its own running statistics instead (BatchNorm with
    `track_running_stats=True`), pass `fparams.stack_tasks(buffers, num_tasks)` as a task argument
    and `buffers=` to `arch` and `fparams.adapt`; or use `map_tasks(..., batch_stats=True)` to
    normalize with batch statistics only.
    """),
    code("""
    assert ours_error < 1e-6, ours_error
    assert raw_error > 1e-4, (
        f"raw vmap's meta-gradient is now right (relative error {raw_error:.1e}): "
        "torch fixed its batch_norm batching rule; update this notebook"
    )
    """),
]

NOTEBOOKS = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_maml_sine_vmap.ipynb": MAML_SINE,
    "03_metasgd_anil.ipynb": METASGD_ANIL,
    "04_dice.ipynb": DICE,
    "05_batchnorm_over_tasks.ipynb": BATCHNORM,
}


def build(cells: List[Cell]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    for kind, source in cells:
        make = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        nb.cells.append(make(source))
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"  # stable ids: rebuilding gives the same files
    return nb


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        nb = build(cells)
        nbformat.validate(nb)
        nbformat.write(nb, os.path.join(HERE, name))
        print(f"wrote notebooks/{name}")


if __name__ == "__main__":
    main()
