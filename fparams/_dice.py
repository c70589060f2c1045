"""DiCE: the magic-box operator for higher-order score-function gradients."""

from __future__ import annotations

from typing import Any

import torch


def magic_box(x: Any) -> Any:
    """``exp(x - x.detach())``: evaluates to 1, and its gradient is ``dx``.

    Multiplying a cost by ``magic_box`` of the summed log-probabilities of the
    stochastic nodes it depends on gives an objective whose derivatives of
    every order are unbiased estimates of the true ones (Foerster et al.
    2018, "DiCE: The Infinitely Differentiable Monte-Carlo Estimator").
    Anything that is not a tensor is returned unchanged.

    Examples:
        >>> import torch, fparams
        >>> logp = torch.tensor([0.3], requires_grad=True)
        >>> (fparams.magic_box(logp) * 5.0).sum().backward(); logp.grad
        tensor([5.])
    """
    if isinstance(x, torch.Tensor):
        return torch.exp(x - x.detach())
    return x
