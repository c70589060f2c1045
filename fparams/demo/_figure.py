"""The demo's figure: three held-out tasks before and after adaptation."""

from __future__ import annotations

import io
from typing import Dict

import torch
from matplotlib.figure import Figure
from torch import Tensor

import fparams
from fparams.datasets import INPUT_RANGE, SineTasks, sine

from ._training import DPI, predict


class ShownFigure(Figure):
    """A ``Figure`` that Jupyter shows as a PNG even where pyplot (and so its inline backend) was never
    imported; where it was, IPython's formatter for figures draws it as usual."""

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.savefig(buffer, format="png", dpi=DPI)
        return buffer.getvalue()


def plot(
    arch: fparams.Architecture,
    params: Dict[str, Tensor],
    batch: SineTasks,
    lr: float,
    scores: Dict[int, float],
) -> Figure:
    """Three held-out tasks: true curve, support points, predictions before and after adapting.

    A :class:`matplotlib.figure.Figure` made directly, without pyplot: the
    matplotlib backend (a notebook's inline one included) is left as it is.
    The legend sits below the panels, where it covers no curve.
    """
    shown = SineTasks(*(t[:3] for t in batch))
    x = torch.linspace(*INPUT_RANGE, 200).unsqueeze(-1)
    truth = sine(x.expand(3, -1, -1), shown.amplitude, shown.phase)
    curves = {s: predict(arch, params, shown, lr, s, x) for s in (0, 1, 10)}
    fig = ShownFigure(figsize=(13, 4.4), layout="constrained")
    axes = fig.subplots(1, 3, sharey=True)
    for i, ax in enumerate(axes):
        ax.plot(x, truth[i], color="black", lw=2, label="true function")
        ax.plot(x, curves[0][i], "--", color="tab:gray", label="meta-learned init (0 steps)")
        ax.plot(x, curves[1][i], color="tab:orange", label="after 1 step")
        ax.plot(x, curves[10][i], color="tab:blue", label="after 10 steps")
        ax.scatter(
            shown.support_x[i], shown.support_y[i], color="tab:red", zorder=3, label="10 support points"
        )
        ax.set_title(f"held-out task: A={float(shown.amplitude[i]):.2f}, phase={float(shown.phase[i]):.2f}")
        ax.set_xlabel("x")
    axes[0].set_ylabel("y")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=5, frameon=False)
    fig.suptitle(
        f"MAML on sine waves with fparams: held-out MSE {scores[0]:.2f} before adaptation, "
        f"{scores[1]:.2f} after 1 step, {scores[10]:.2f} after 10 steps"
    )
    return fig
