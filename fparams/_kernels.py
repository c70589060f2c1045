"""Kernels for steps that are differentiated twice, and ops that cannot be.

A second-order meta-gradient differentiates the inner gradient, so every op's
*backward* in the inner step must have a derivative of its own. torch's fused
attention kernels (flash, memory-efficient, cuDNN; on CPU and CUDA) have none:
``torch.nn.functional.scaled_dot_product_attention``, which transformers' models
call by default, then fails at the outer backward. Its math kernel is made of
ordinary differentiable ops. :func:`second_order_kernels` selects it around the
forward and backward that fparams differentiates twice (``adapt``'s inner steps,
and so ``map_tasks``, ``implicit.adapt`` and the tasks API), and nowhere else:
first-order steps and the outer (query) pass keep the fast kernels.

A few other ops have no double backward at all (:data:`NO_DOUBLE_BACKWARD`).
:func:`check_double_backward` finds them, once, in the graph of the first
inner gradient and raises an :class:`~fparams.FparamsRuntimeError` naming the
op and the fix (``first_order=True``) instead of torch's error at the outer
backward. Where fparams does not run the forward (a user's own forward before
``MAML.adapt``, ``clone_module`` + ``update_module`` by hand) the same check
names the ways to choose a differentiable attention kernel.
"""

from __future__ import annotations

from typing import Any, ContextManager, Iterable, Literal

from torch.nn.attention import SDPBackend, sdpa_kernel

from ._errors import FparamsRuntimeError
from ._torch_compat import ops_without_double_backward

__all__ = ["NO_DOUBLE_BACKWARD", "check_double_backward", "second_order_kernels", "vmap_kernels"]

#: The ops whose backward torch cannot differentiate (torch 2.3 to 2.13), what
#: calls them, and the fix. ``docs/guides/architectures.md`` shows the same table.
NO_DOUBLE_BACKWARD = {
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward": "F.scaled_dot_product_attention, "
    "fused kernel (CPU): fparams selects the math kernel in its inner steps",
    "aten::_scaled_dot_product_flash_attention_backward": "F.scaled_dot_product_attention, "
    "flash kernel (CUDA): fparams selects the math kernel in its inner steps",
    "aten::_scaled_dot_product_efficient_attention_backward": "F.scaled_dot_product_attention, "
    "memory-efficient kernel (CUDA): fparams selects the math kernel in its inner steps",
    "aten::_scaled_dot_product_cudnn_attention_backward": "F.scaled_dot_product_attention, "
    "cuDNN kernel (CUDA): fparams selects the math kernel in its inner steps",
    "aten::hardsigmoid_backward": "nn.Hardsigmoid, F.hardsigmoid (MobileNetV3's squeeze-excite "
    "gates): first_order=True, or a smooth gate (torch.sigmoid)",
    "aten::multi_margin_loss_backward": "F.multi_margin_loss: first_order=True, or cross-entropy",
    "aten::multilabel_margin_loss_backward": "F.multilabel_margin_loss: first_order=True",
    "aten::_ctc_loss_backward": "F.ctc_loss: first_order=True",
    "aten::_cdist_backward": "torch.cdist: first_order=True, or distances from matmuls "
    "((a * a).sum(-1) - 2 a @ b.T + ...)",
    "aten::_pdist_backward": "F.pdist: first_order=True, or torch.cdist written with matmuls",
}

_ATTENTION = ("attention",)
_FIRST_ORDER = {
    "fparams": "Pass `first_order=True`",
    "user": "Take a first-order step (`first_order=True` in MAML / MetaSGD; `create_graph=False` in "
    "your own torch.autograd.grad)",
}


def second_order_kernels() -> ContextManager[Any]:
    """A context in which attention runs on a kernel that has a double backward.

    ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``: only the math kernel
    of ``scaled_dot_product_attention``, whose backward is made of ordinary
    differentiable ops. Slower than the fused kernels, so fparams enters it
    only around the forward and backward it differentiates twice.

    Examples:
        >>> import torch
        >>> from fparams._kernels import second_order_kernels
        >>> q = torch.randn(1, 2, 3, 4, requires_grad=True)
        >>> with second_order_kernels():
        ...     out = torch.nn.functional.scaled_dot_product_attention(q, q, q).sum()
        ...     (g,) = torch.autograd.grad(out, q, create_graph=True)
        >>> g.sum().backward()  # the double backward exists
        >>> q.grad.shape
        torch.Size([1, 2, 3, 4])
    """
    return sdpa_kernel(SDPBackend.MATH)


def vmap_kernels() -> ContextManager[Any]:
    """The attention kernel for a ``vmap`` over tasks: the math kernel, as :func:`second_order_kernels`.

    Under ``vmap`` the fused kernels have no batching rule (torch runs them
    task by task, with its "performance drop" warning), and torch 2.13 sends a
    batched attention mask that requires grad (T5's learned position bias)
    to the CPU flash kernel, which refuses it. The math kernel is batched
    like any other op. ``map_tasks`` enters this around its ``vmap``.

    Examples:
        >>> import torch
        >>> from fparams._kernels import vmap_kernels
        >>> q = torch.randn(2, 1, 3, 4)
        >>> with vmap_kernels():
        ...     out = torch.func.vmap(lambda q: torch.nn.functional.scaled_dot_product_attention(q, q, q))(q)
        >>> out.shape
        torch.Size([2, 1, 3, 4])
    """
    return sdpa_kernel(SDPBackend.MATH)


def _is_attention(op: str) -> bool:
    return any(word in op for word in _ATTENTION)


def check_double_backward(grads: Iterable[Any], forward: Literal["fparams", "user"]) -> None:
    """Raise where the graph of ``grads`` holds an op whose backward has no derivative.

    ``forward="fparams"``: fparams ran the forward (``adapt``), so the fix is
    ``first_order=True`` or another op. ``forward="user"``: the user's own
    forward made the graph (``MAML.adapt``, ``update_module``), so a fused
    attention kernel is reported with the ways to avoid it. One walk over the
    graph: call it once per adaptation, not per step.

    Examples:
        >>> import torch
        >>> from fparams._kernels import check_double_backward
        >>> x = torch.randn(3, requires_grad=True)
        >>> (g,) = torch.autograd.grad(torch.nn.functional.hardsigmoid(x).sum(), x, create_graph=True)
        >>> try:
        ...     check_double_backward([g], "fparams")
        ... except RuntimeError as err:
        ...     print(str(err)[:65])
        the inner gradient goes through `aten::hardsigmoid_backward`, whi
    """
    ops = ops_without_double_backward(grads)
    if not ops:
        return
    named = ", ".join(f"`{op}`" for op in ops)
    attention = [op for op in ops if _is_attention(op)]
    if forward == "user" and attention:
        raise FparamsRuntimeError(
            f"the gradient goes through {named}: the loss was computed with a fused attention kernel, "
            f"which has no double backward, so the second-order meta-gradient cannot be computed "
            f"(torch would fail at the outer backward). Compute the loss under "
            f"`with torch.nn.attention.sdpa_kernel(SDPBackend.MATH):`, or build the model with "
            f'`attn_implementation="eager"`, or take a first-order step (`first_order=True` in MAML / '
            f"MetaSGD; `create_graph=False` in your own torch.autograd.grad)."
        )
    where = "inner gradient" if forward == "fparams" else "gradient"
    raise FparamsRuntimeError(
        f"the {where} goes through {named}, which torch cannot differentiate again (it has no "
        f"double backward), so the second-order meta-gradient cannot be computed (torch would fail "
        f"at the outer backward). {_FIRST_ORDER[forward]}, or replace the op; "
        f"docs/guides/architectures.md lists such ops and their replacements."
    )
