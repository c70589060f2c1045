"""Real architectures (transformers' own models, from tiny configs) through every fparams path.

Each model runs in float64 with torch's DEFAULT attention kernels (no ``sdpa_kernel`` on the
fparams side): forward equality after ``split``; second-order ``adapt`` and ``map_tasks``
(auto) against a plain-autograd reference (``torch.func.functional_call`` +
``torch.autograd.grad(create_graph=True)``, run under ``sdpa_kernel(SDPBackend.MATH)``, which the
reference needs to have a double backward at all) at 1e-9; ``MAML`` and
``clone_module``/``update_module``; ``filter`` on the head and on a ``peft`` model's LoRA
matrices; and ops without a double backward, which raise an fparams error naming the op.
Install with ``pip install -e .[models]``; without transformers the file is skipped.
"""

from __future__ import annotations

import contextlib
import functools
import re
import warnings
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import fparams
from fparams._kernels import NO_DOUBLE_BACKWARD
from tests.arch_zoo import NO_DOUBLE_BACKWARD_NETS, Arch, transformers_archs

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

ARCHS: Dict[str, Arch] = {a.name: a for a in transformers_archs()}
ATTENTION = {"vit", "t5", "bart", "llama_gqa_rope", "qwen2", "gpt2", "bert", "mistral"}
LR, STEPS, TASKS, SHOTS = 0.1, 2, 2, 2
TOL = 1e-9

Task = Tuple[Dict[str, Tensor], Tensor, Dict[str, Tensor], Tensor]


@functools.cache
def _setup(name: str) -> Tuple[nn.Module, List[Task]]:
    arch = ARCHS[name]
    torch.manual_seed(0)
    model = arch.build().train(arch.train)
    gen = torch.Generator().manual_seed(1)
    tasks = [(*arch.batch(SHOTS, gen), *arch.batch(SHOTS, gen)) for _ in range(TASKS)]
    return model, tasks  # type: ignore[return-value]


def _leaves(model: nn.Module) -> Dict[str, Tensor]:
    return {k: p.detach().clone().requires_grad_() for k, p in model.named_parameters()}


def _own_buffers(model: nn.Module) -> Dict[str, Tensor]:
    return {k: b.clone() for k, b in model.named_buffers()}


def _reference(
    arch: Arch, model: nn.Module, params: Dict[str, Tensor], task: Task, adapted: Optional[List[str]] = None
) -> Tensor:
    """The query loss after STEPS plain-autograd SGD steps (the math kernel: it has a double backward)."""
    xs, ys, xq, yq = task
    buffers = _own_buffers(model)
    names = list(params) if adapted is None else adapted

    def loss(p: Dict[str, Tensor], x: Dict[str, Tensor], y: Tensor) -> Tensor:
        return arch.loss(torch.func.functional_call(model, {**p, **buffers}, (), x), y)

    with sdpa_kernel(SDPBackend.MATH):
        fast = dict(params)
        for _ in range(STEPS):
            grads = torch.autograd.grad(loss(fast, xs, ys), [fast[k] for k in names], create_graph=True)
            fast = {**fast, **{k: fast[k] - LR * g for k, g in zip(names, grads)}}
        return loss(fast, xq, yq)


def _reference_grads(
    arch: Arch, model: nn.Module, adapted: Optional[List[str]] = None
) -> Tuple[Tensor, List[Tensor]]:
    params = _leaves(model)
    _, tasks = _setup(arch.name)
    total = sum(_reference(arch, model, params, t, adapted) for t in tasks)
    return total.detach(), list(torch.autograd.grad(total, list(params.values()), allow_unused=True))


@functools.cache
def _reference_cached(name: str) -> Tuple[Tensor, List[Tensor]]:
    model, _ = _setup(name)
    return _reference_grads(ARCHS[name], model)


def _assert_close(got: List[Optional[Tensor]], want: List[Optional[Tensor]]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        g = torch.zeros(()) if g is None else g
        w = torch.zeros(()) if w is None else w
        scale = max(float(w.abs().max()), 1e-3) if w.numel() else 1.0
        assert float((g - w).abs().max()) <= TOL * scale, (float((g - w).abs().max()), scale)


def _task_fn(arch: Arch, split: Any, shared: Dict[str, Tensor], filter: Any = None) -> Any:
    def loss_fn(p: Dict[str, Tensor], x: Dict[str, Tensor], y: Tensor, buffers: Dict[str, Tensor]) -> Tensor:
        return arch.loss(split(p, buffers=buffers, **x), y)

    def task(p: Dict[str, Tensor], xs: Any, ys: Tensor, xq: Any, yq: Tensor, b: Any = None) -> Tensor:
        b = shared if b is None else b
        fast = fparams.adapt(loss_fn, p, xs, ys, lr=LR, steps=STEPS, buffers=b, filter=filter)
        return loss_fn(fast, xq, yq, b)

    return task


@pytest.mark.parametrize("name", list(ARCHS))
def test_forward_after_split_is_the_models(name: str) -> None:
    model, tasks = _setup(name)
    arch, params, buffers = fparams.split(model)
    x = tasks[0][0]
    with torch.no_grad():
        want = ARCHS[name].loss(model(**x), tasks[0][1])
        got = ARCHS[name].loss(arch(params, buffers=_own_buffers(model), **x), tasks[0][1])
    assert float((got - want).abs()) <= 1e-12


@pytest.mark.parametrize("name", list(ARCHS))
def test_second_order_adapt_matches_plain_autograd(name: str) -> None:
    arch = ARCHS[name]
    model, tasks = _setup(name)
    split, params, _ = fparams.split(model)
    want_value, want = _reference_cached(name)
    params = _leaves(model)
    task = _task_fn(arch, split, {})
    value = sum(task(params, *t, _own_buffers(model)) for t in tasks)
    got = torch.autograd.grad(value, list(params.values()), allow_unused=True)
    assert abs(float(value.detach()) - float(want_value)) <= TOL
    _assert_close(list(got), want)


@pytest.mark.parametrize("name", list(ARCHS))
def test_map_tasks_auto_matches_plain_autograd(name: str) -> None:
    arch = ARCHS[name]
    model, tasks = _setup(name)
    split, _, buffers = fparams.split(model)
    params = _leaves(model)
    stacked = [torch.utils._pytree.tree_map(lambda *ts: torch.stack(ts), *parts) for parts in zip(*tasks)]
    if arch.train:  # BatchNorm statistics: one private copy per task
        shared: Dict[str, Tensor] = {}
        stacked.append(fparams.stack_tasks(buffers, TASKS))
    else:
        shared = _own_buffers(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "auto" may say that it loops: the numbers are the point here
        losses = fparams.map_tasks(_task_fn(arch, split, shared))(params, *stacked)
    got = torch.autograd.grad(losses.sum(), list(params.values()), allow_unused=True)
    want_value, want = _reference_cached(name)
    assert abs(float(losses.detach().sum()) - float(want_value)) <= TOL
    _assert_close(list(got), want)


def _eager(name: str) -> nn.Module:
    """The model with transformers' eager attention: the user-side fix for MAML by hand."""
    model, _ = _setup(name)
    if name not in ATTENTION:
        return model
    torch.manual_seed(0)
    arch = ARCHS[name]
    eager = arch.build().train(arch.train)
    if hasattr(eager, "set_attn_implementation"):  # transformers >= 4.56
        eager.set_attn_implementation("eager")
    else:  # pragma: no cover - older transformers read it from the config at each forward
        eager.config._attn_implementation = "eager"
    eager.load_state_dict(model.state_dict())
    return eager


def _maml_grads(name: str, model: nn.Module) -> List[Optional[Tensor]]:
    arch = ARCHS[name]
    _, tasks = _setup(name)
    maml = fparams.MAML(model, lr=LR)
    maml.zero_grad()
    for xs, ys, xq, yq in tasks:
        learner = maml.clone()
        for _ in range(STEPS):
            learner.adapt(arch.loss(learner(**xs), ys))
        arch.loss(learner(**xq), yq).backward()
    return [p.grad for p in maml.parameters()]


@pytest.mark.parametrize("name", list(ARCHS))
def test_maml_matches_plain_autograd(name: str) -> None:
    # MAML's forward is the user's own: on attention models it runs under the fix that the
    # error names (sdpa_kernel(SDPBackend.MATH)); conv nets run as they are.
    model, _ = _setup(name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with sdpa_kernel(SDPBackend.MATH) if name in ATTENTION else contextlib.nullcontext():
        got = _maml_grads(name, model)
    model.load_state_dict(state)  # BatchNorm statistics back, for the other tests
    _assert_close(got, _reference_cached(name)[1])


@pytest.mark.parametrize("name", ["gpt2", "bert", "t5"])
def test_maml_with_eager_attention_matches_plain_autograd(name: str) -> None:
    # The other fix the error names. (LLaMA-style eager attention takes its softmax in
    # float32, so only these models' eager path is float64-exact.)
    _assert_close(_maml_grads(name, _eager(name)), _reference_cached(name)[1])


@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_maml_with_fused_attention_names_the_fix(name: str) -> None:
    model, _ = _setup(name)
    with pytest.raises(fparams.FparamsRuntimeError) as err:
        _maml_grads(name, model)
    text = str(err.value)
    assert re.search(r"the gradient goes through `aten::_scaled_dot_product_\w+_backward`", text), text
    for fix in ("sdpa_kernel(SDPBackend.MATH)", 'attn_implementation="eager"', "first_order=True"):
        assert fix in text
    # first order needs no double backward: it runs on the fused kernels
    maml = fparams.MAML(model, lr=LR, first_order=True)
    xs, ys, _, _ = _setup(name)[1][0]
    learner = maml.clone()
    learner.adapt(ARCHS[name].loss(learner(**xs), ys))


@pytest.mark.parametrize("name", ["resnet", "gpt2", "t5"])
def test_clone_module_and_update_module_by_hand(name: str) -> None:
    arch = ARCHS[name]
    model = _eager(name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    _, tasks = _setup(name)
    model.zero_grad()
    for xs, ys, xq, yq in tasks:
        clone = fparams.clone_module(model)
        for _ in range(STEPS):
            loss = arch.loss(clone(**xs), ys)
            grads = torch.autograd.grad(loss, list(clone.parameters()), create_graph=True)
            fparams.update_module(clone, updates=[-LR * g for g in grads])
        arch.loss(clone(**xq), yq).backward()
    got = [p.grad for p in model.parameters()]
    model.load_state_dict(state)
    _assert_close(got, _reference_cached(name)[1])


@pytest.mark.parametrize("name", ["resnet", "vit", "llama_gqa_rope"])
def test_filter_on_the_head_matches_plain_autograd(name: str) -> None:
    arch = ARCHS[name]
    model, tasks = _setup(name)
    split, params, _ = fparams.split(model)
    adapted = [k for k in params if re.fullmatch(arch.head.replace(".", r"\.").replace("*", ".*"), k)]
    assert adapted
    params = _leaves(model)
    task = _task_fn(arch, split, {}, filter=arch.head)
    value = sum(task(params, *t, _own_buffers(model)) for t in tasks)
    got = torch.autograd.grad(value, list(params.values()), allow_unused=True)
    _, want = _reference_grads(arch, model, adapted)
    _assert_close(list(got), want)


def test_filter_on_lora_matrices_of_a_peft_model() -> None:
    peft = pytest.importorskip("peft")
    arch = ARCHS["llama_gqa_rope"]
    torch.manual_seed(0)
    base = arch.build()
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(base, config).double().eval()
    for name, p in model.named_parameters():  # LoRA's B starts at zero: give it values to differentiate
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    split, params, buffers = fparams.split(model)
    lora = [k for k in params if "lora_" in k]
    assert len(lora) == 4
    _, tasks = _setup("llama_gqa_rope")
    params = _leaves(model)
    task = _task_fn(arch, split, buffers, filter="*lora_*")
    value = sum(task(params, *t) for t in tasks)
    got = torch.autograd.grad(value, list(params.values()), allow_unused=True)
    total = sum(_reference(arch, model, params, t, lora) for t in tasks)
    want = torch.autograd.grad(total, list(params.values()), allow_unused=True)
    assert abs(float(value.detach()) - float(total.detach())) <= TOL
    _assert_close(list(got), list(want))


# -- ops without a double backward ---------------------------------------------------------------


def _gated(name: str) -> Tuple[Any, Dict[str, Tensor], Tensor, Tensor]:
    torch.manual_seed(0)
    net = NO_DOUBLE_BACKWARD_NETS[name][0]()
    split, params, _ = fparams.split(net)
    x = torch.randn(5, 4, dtype=torch.float64)
    return split, params, x, torch.randn(5, 1, dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(NO_DOUBLE_BACKWARD_NETS))
def test_adapt_names_an_op_without_double_backward(name: str) -> None:
    split, params, x, y = _gated(name)
    op = NO_DOUBLE_BACKWARD_NETS[name][1]
    assert op in NO_DOUBLE_BACKWARD  # the documented list has it

    def mse(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return (split(p, x) - y).pow(2).mean()

    body = (
        f"the inner gradient goes through `{op}`, which torch cannot differentiate again (it has no "
        f"double backward), so the second-order meta-gradient cannot be computed (torch would fail "
        f"at the outer backward). Pass `first_order=True`, or replace the op; "
        f"docs/guides/architectures.md lists such ops and their replacements."
    )
    # TRANSITION: the "fparams.adapt: " prefix comes with adapt's @public (the adapt branch)
    with pytest.raises(fparams.FparamsRuntimeError, match=r"^(fparams\.adapt: )?" + re.escape(body) + "$"):
        fparams.adapt(mse, params, x, y, lr=LR, steps=STEPS)
    with pytest.raises(fparams.FparamsRuntimeError, match=re.escape(op)):
        fparams.map_tasks(lambda p, x, y: mse(fparams.adapt(mse, p, x, y, lr=LR), x, y), strategy="vmap")(
            params, x.expand(2, 5, 4), y.expand(2, 5, 1)
        )
    # first order, and no grad at all, run as they are
    fast = fparams.adapt(mse, params, x, y, lr=LR, steps=STEPS, first_order=True)
    mse(fast, x, y).backward()
    with torch.no_grad():
        fparams.adapt(mse, params, x, y, lr=LR, steps=STEPS)


@pytest.mark.parametrize("name", sorted(NO_DOUBLE_BACKWARD_NETS))
def test_maml_names_an_op_without_double_backward(name: str) -> None:
    torch.manual_seed(0)
    net = NO_DOUBLE_BACKWARD_NETS[name][0]()
    op = NO_DOUBLE_BACKWARD_NETS[name][1]
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    learner = fparams.MAML(net, lr=LR).clone()
    body = f"the gradient goes through `{op}`, which"
    with pytest.raises(fparams.FparamsRuntimeError, match=re.escape(body)):
        learner.adapt((learner(x) - y).pow(2).mean())
    learner = fparams.MAML(net, lr=LR, first_order=True).clone()
    learner.adapt((learner(x) - y).pow(2).mean())
    (learner(x) - y).pow(2).mean().backward()
