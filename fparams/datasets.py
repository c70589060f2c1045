"""Task samplers for meta-learning: sine regression, synthetic images, N-way K-shot episodes.

Every sampler returns a batch of tasks with the tasks on dim 0, ready for
:func:`fparams.map_tasks` and :func:`fparams.meta_value_and_grad`:
``step(params, *batch.data())`` maps a per-task loss
``task_loss(params, support_x, support_y, query_x, query_y)`` over them.

- :func:`sine_tasks`: the few-shot regression benchmark of Finn et al. (2017),
  ``A sin(x - phase)``; what ``python -m fparams.demo`` and the tutorials train on.
- :func:`image_tasks`: synthetic N-way K-shot classification, each class a
  random prototype image plus noise; no download, for tests and examples.
- :class:`EpisodeSampler`: N-way K-shot episodes drawn from any labelled tensors
  (an MNIST or Omniglot tensor, a ``TensorDataset``), with the labels of each
  episode renumbered ``0 .. ways - 1``: learn2learn's ``TaskDataset`` with
  ``NWays``, ``KShots``, ``LoadData`` and ``RemapLabels`` in one call.

Randomness comes from the ``generator`` you pass (``torch.Generator().manual_seed(0)``),
or torch's global one: the same seed gives the same tasks.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from ._checks import check_instance, check_int, check_positive
from ._errors import FparamsTypeError, FparamsValueError, public

__all__ = [
    "AMPLITUDE",
    "INPUT_RANGE",
    "PHASE",
    "EpisodeSampler",
    "Episodes",
    "SineTasks",
    "image_tasks",
    "sine",
    "sine_tasks",
]

#: Sine tasks' amplitude range ``U[0.1, 5]`` (Finn et al., 2017).
AMPLITUDE: Tuple[float, float] = (0.1, 5.0)
#: Sine tasks' phase range ``U[0, pi]``.
PHASE: Tuple[float, float] = (0.0, math.pi)
#: Sine tasks' input range ``U[-5, 5]``.
INPUT_RANGE: Tuple[float, float] = (-5.0, 5.0)


class SineTasks(NamedTuple):
    """``n`` sine-regression tasks; every tensor holds the tasks on dim 0.

    Attributes:
        support_x: ``(n, shots, 1)`` inputs the learner adapts on.
        support_y: ``(n, shots, 1)`` their targets.
        query_x: ``(n, queries, 1)`` inputs the adapted learner is scored on.
        query_y: ``(n, queries, 1)`` their targets.
        amplitude: ``(n,)`` each task's amplitude.
        phase: ``(n,)`` each task's phase.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    amplitude: Tensor
    phase: Tensor

    def data(self) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """The arguments of a per-task loss: ``support_x, support_y, query_x, query_y``."""
        return self.support_x, self.support_y, self.query_x, self.query_y

    def __repr__(self) -> str:
        n, shots, _ = self.support_x.shape
        return f"SineTasks(tasks={n}, shots={shots}, queries={self.query_x.shape[1]})"


class Episodes(NamedTuple):
    """A batch of N-way K-shot classification episodes, the tasks on dim 0.

    Attributes:
        support_x: ``(tasks, ways * shots, *example_shape)``, class by class.
        support_y: ``(tasks, ways * shots)`` int64 labels in ``0 .. ways - 1``.
        query_x: ``(tasks, ways * queries, *example_shape)``, class by class.
        query_y: ``(tasks, ways * queries)`` int64 labels in ``0 .. ways - 1``.
        classes: ``(tasks, ways)`` the original label of each episode label.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    classes: Tensor

    def data(self) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """The arguments of a per-task loss: ``support_x, support_y, query_x, query_y``."""
        return self.support_x, self.support_y, self.query_x, self.query_y

    def __repr__(self) -> str:
        tasks, ways = self.classes.shape
        return (
            f"Episodes(tasks={tasks}, ways={ways}, shots={self.support_x.shape[1] // ways}, "
            f"queries={self.query_x.shape[1] // ways}, example_shape={tuple(self.support_x.shape[2:])})"
        )


def sine(x: Tensor, amplitude: Tensor, phase: Tensor) -> Tensor:
    """``amplitude * sin(x - phase)``, with one amplitude and phase per task on dim 0 of ``x``.

    Args:
        x: ``(tasks, points, 1)`` inputs.
        amplitude: ``(tasks,)``.
        phase: ``(tasks,)``.

    Returns:
        Each task's true function at its inputs, ``(tasks, points, 1)``.

    Examples:
        >>> import torch
        >>> from fparams.datasets import sine
        >>> sine(torch.zeros(2, 3, 1), torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0])).shape
        torch.Size([2, 3, 1])
    """
    return amplitude.view(-1, 1, 1) * torch.sin(x - phase.view(-1, 1, 1))


def _uniform(generator: Optional[torch.Generator], low_high: Tuple[float, float], *shape: int) -> Tensor:
    low, high = low_high
    device = generator.device if generator is not None else None
    return torch.rand(*shape, generator=generator, device=device) * (high - low) + low


def _check_generator(generator: object) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise FparamsTypeError(
            f"`generator` must be a torch.Generator or None; got {type(generator).__name__}. "
            "Pass torch.Generator().manual_seed(seed) for reproducible tasks."
        )


@public("datasets.sine_tasks")
def sine_tasks(
    n: int, shots: int = 10, queries: int = 10, *, generator: Optional[torch.Generator] = None
) -> SineTasks:
    """Draw ``n`` sine-regression tasks, each with ``shots`` support and ``queries`` query points.

    A task is ``A sin(x - phase)`` with ``A ~ U[0.1, 5]``, ``phase ~ U[0, pi]``
    and inputs ``x ~ U[-5, 5]`` (:data:`AMPLITUDE`, :data:`PHASE`,
    :data:`INPUT_RANGE`), as in the MAML paper. Tensors are float32, on the
    generator's device.

    Args:
        n: how many tasks (dim 0 of every tensor).
        shots: support points per task.
        queries: query points per task.
        generator: the source of randomness; torch's global one when ``None``.

    Returns:
        The tasks; ``tasks.data()`` is the support and query sets, for a per-task loss.

    Raises:
        FparamsTypeError: ``n``, ``shots`` or ``queries`` is not an int, or
            ``generator`` is not a ``torch.Generator``.
        FparamsValueError: ``n``, ``shots`` or ``queries`` is below 1.

    Examples:
        >>> import torch
        >>> from fparams.datasets import sine_tasks
        >>> tasks = sine_tasks(25, generator=torch.Generator().manual_seed(0))
        >>> tasks
        SineTasks(tasks=25, shots=10, queries=10)
        >>> [tuple(t.shape) for t in tasks.data()]
        [(25, 10, 1), (25, 10, 1), (25, 10, 1), (25, 10, 1)]
    """
    check_int("n", n, 1)
    check_int("shots", shots, 1)
    check_int("queries", queries, 1)
    _check_generator(generator)
    amplitude = _uniform(generator, AMPLITUDE, n)
    phase = _uniform(generator, PHASE, n)
    x = _uniform(generator, INPUT_RANGE, n, shots + queries, 1)
    y = sine(x, amplitude, phase)
    return SineTasks(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:], amplitude, phase)


def _episode_labels(tasks: int, ways: int, per_class: int, device: torch.device) -> Tensor:
    """``(tasks, ways * per_class)``: ``0 0 .. 1 1 .. ways-1``, class by class."""
    return torch.arange(ways, device=device).repeat_interleave(per_class).expand(tasks, -1).contiguous()


@public("datasets.image_tasks")
def image_tasks(
    n: int,
    ways: int = 5,
    shots: int = 1,
    queries: int = 15,
    *,
    image_shape: Tuple[int, ...] = (1, 28, 28),
    noise: float = 0.5,
    generator: Optional[torch.Generator] = None,
) -> Episodes:
    """Draw ``n`` synthetic ``ways``-way ``shots``-shot image classification tasks.

    Each task has ``ways`` classes of its own; a class is a random prototype
    image (standard normal pixels) and its examples are the prototype plus
    Gaussian ``noise``. Nothing is downloaded: a stand-in for Omniglot or
    mini-ImageNet in tests, examples and benchmarks, with the same shapes.

    Args:
        n: how many tasks.
        ways: classes per task.
        shots: support examples per class.
        queries: query examples per class.
        image_shape: one example's shape, ``(channels, height, width)`` or any other.
        noise: the standard deviation of the examples around their prototype (> 0);
            larger is harder.
        generator: the source of randomness; torch's global one when ``None``.

    Returns:
        Episodes with ``support_x`` ``(n, ways * shots, *image_shape)`` and labels
        ``0 .. ways - 1``, class by class; ``classes`` is ``arange(ways)`` per task.

    Raises:
        FparamsTypeError: a count is not an int, ``noise`` is not a number or
            ``generator`` is not a ``torch.Generator``.
        FparamsValueError: a count is below 1 or ``noise`` is not > 0.

    Examples:
        >>> import torch
        >>> from fparams.datasets import image_tasks
        >>> tasks = image_tasks(4, ways=5, shots=1, generator=torch.Generator().manual_seed(0))
        >>> tasks
        Episodes(tasks=4, ways=5, shots=1, queries=15, example_shape=(1, 28, 28))
        >>> tasks.support_y[0].tolist()
        [0, 1, 2, 3, 4]
    """
    for name, value in (("n", n), ("ways", ways), ("shots", shots), ("queries", queries)):
        check_int(name, value, 1)
    check_instance("image_shape", image_shape, tuple, "a tuple of ints such as (1, 28, 28)")
    for size in image_shape:
        check_int("image_shape", size, 1)
    check_positive("noise", noise)
    _check_generator(generator)
    device = generator.device if generator is not None else None
    prototypes = torch.randn(n, ways, 1, *image_shape, generator=generator, device=device)
    per_class = shots + queries
    examples = prototypes + noise * torch.randn(
        n, ways, per_class, *image_shape, generator=generator, device=device
    )
    support = examples[:, :, :shots].reshape(n, ways * shots, *image_shape)
    query = examples[:, :, shots:].reshape(n, ways * queries, *image_shape)
    where = prototypes.device
    classes = torch.arange(ways, device=where).expand(n, -1).contiguous()
    return Episodes(
        support,
        _episode_labels(n, ways, shots, where),
        query,
        _episode_labels(n, ways, queries, where),
        classes,
    )


class EpisodeSampler:
    """N-way K-shot episodes over any labelled tensors, many tasks per call.

    Each episode picks ``ways`` distinct classes among those with at least
    ``shots + queries`` examples, then ``shots + queries`` distinct examples of
    each, and renumbers the classes ``0 .. ways - 1`` in the order picked.
    The per-class index is built once here; :meth:`sample` is a few vectorised
    torch calls, whatever the number of tasks.

    Args:
        data: ``(examples, *example_shape)``, or a ``TensorDataset(data, labels)``
            with ``labels`` left out.
        labels: ``(examples,)`` integer class labels (any values).
        ways: classes per episode.
        shots: support examples per class.
        queries: query examples per class.
        generator: the source of randomness; torch's global one when ``None``.

    Raises:
        FparamsTypeError: ``data`` or ``labels`` is not a tensor, ``labels`` is not
            integer, or a count is not an int.
        FparamsValueError: ``labels`` is not 1-D with one label per example, or fewer
            than ``ways`` classes have ``shots + queries`` examples.

    Examples:
        >>> import torch
        >>> from fparams.datasets import EpisodeSampler
        >>> labels = torch.arange(100) % 10  # 10 classes of 10 examples
        >>> data = torch.stack([labels.float(), torch.randn(100), torch.randn(100)], dim=1)
        >>> sampler = EpisodeSampler(data, labels, ways=5, shots=1, queries=2,
        ...                          generator=torch.Generator().manual_seed(0))
        >>> sampler
        EpisodeSampler(examples=100, classes=10, ways=5, shots=1, queries=2)
        >>> batch = sampler.sample(8)
        >>> tuple(batch.support_x.shape), tuple(batch.query_y.shape)
        ((8, 5, 3), (8, 10))
        >>> original = batch.classes.gather(1, batch.support_y)  # each example's own label
        >>> bool((batch.support_x[..., 0] == original).all())
        True
    """

    @public("datasets.EpisodeSampler")
    def __init__(
        self,
        data: Union[Tensor, TensorDataset],
        labels: Optional[Tensor] = None,
        *,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        if isinstance(data, TensorDataset) and labels is None:
            if len(data.tensors) != 2:
                raise FparamsValueError(
                    f"`data` must be a TensorDataset(data, labels); got one of {len(data.tensors)} tensors."
                )
            data, labels = data.tensors
        self.data, self.labels = _checked_data(data, labels)
        for name, value in (("ways", ways), ("shots", shots), ("queries", queries)):
            check_int(name, value, 1)
        _check_generator(generator)
        self.ways, self.shots, self.queries, self.generator = ways, shots, queries, generator
        self._classes, self._index, self._counts = _class_index(self.labels, shots + queries, ways)

    def __repr__(self) -> str:
        return (
            f"EpisodeSampler(examples={self.data.shape[0]}, classes={self._classes.numel()}, "
            f"ways={self.ways}, shots={self.shots}, queries={self.queries})"
        )

    @public("datasets.EpisodeSampler.sample")
    def sample(self, tasks: int = 1) -> Episodes:
        """Draw ``tasks`` episodes.

        Args:
            tasks: how many episodes (dim 0 of every tensor).

        Returns:
            ``support_x`` ``(tasks, ways * shots, *example_shape)`` and ``query_x``
            ``(tasks, ways * queries, ...)``, class by class, their labels in
            ``0 .. ways - 1``, and each episode's original ``classes``.
        """
        check_int("tasks", tasks, 1)
        device, width = self._index.device, self._index.shape[1]
        picked = self._rand(tasks, self._classes.numel()).to(device).argsort(dim=1)[:, : self.ways]
        keys = self._rand(tasks, self.ways, width).to(device)  # a random order of each class's rows
        keys = keys.masked_fill(~_valid(self._counts[picked], width), 2.0)  # padding sorts last
        take = self.shots + self.queries
        slots = keys.argsort(dim=2)[..., :take]  # distinct examples of each class
        rows = self._index[picked.unsqueeze(-1), slots]  # (tasks, ways, take)
        examples = self.data[rows.to(self.data.device)]
        shape = self.data.shape[1:]
        support = examples[:, :, : self.shots].reshape(tasks, self.ways * self.shots, *shape)
        query = examples[:, :, self.shots :].reshape(tasks, self.ways * self.queries, *shape)
        where = self.labels.device
        return Episodes(
            support,
            _episode_labels(tasks, self.ways, self.shots, where),
            query,
            _episode_labels(tasks, self.ways, self.queries, where),
            self._classes[picked].to(where),
        )

    def _rand(self, *shape: int) -> Tensor:
        device = self.generator.device if self.generator is not None else None
        return torch.rand(*shape, generator=self.generator, device=device)


def _valid(counts: Tensor, width: int) -> Tensor:
    """``(..., width)``: True at the slots below each class's example count."""
    return torch.arange(width, device=counts.device) < counts.unsqueeze(-1)


def _checked_data(data: object, labels: object) -> Tuple[Tensor, Tensor]:
    if not isinstance(data, Tensor):
        raise FparamsTypeError(f"`data` must be a tensor of examples on dim 0; got {type(data).__name__}.")
    if not isinstance(labels, Tensor):
        raise FparamsTypeError(
            f"`labels` must be a tensor of integer class labels, one per example; "
            f"got {type(labels).__name__}."
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise FparamsTypeError(
            f"`labels` must hold integer class labels; got dtype {labels.dtype}. Convert with labels.long()."
        )
    if labels.dim() != 1 or data.dim() < 1 or labels.shape[0] != data.shape[0]:
        raise FparamsValueError(
            f"`labels` must be 1-D with one label per example of `data`; got labels of shape "
            f"{tuple(labels.shape)} for data of shape {tuple(data.shape)}."
        )
    return data, labels


def _class_index(labels: Tensor, needed: int, ways: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The classes with ``needed`` examples, a ``(classes, most)`` matrix of their example rows
    (padded with 0), and each class's count: built once, so sampling needs no Python loop."""
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    keep = counts >= needed
    if int(keep.sum()) < ways:
        raise FparamsValueError(
            f"`ways`={ways} needs {ways} classes with at least shots + queries = {needed} examples each; "
            f"`labels` has {int(keep.sum())} such classes (of {classes.numel()}). Lower `ways`, "
            "`shots` or `queries`."
        )
    order = torch.argsort(inverse, stable=True)  # rows grouped by class
    starts = torch.cumsum(counts, 0) - counts
    width = int(counts.max())
    slot = torch.arange(width, device=labels.device)
    index = starts.unsqueeze(1) + slot
    index = torch.where(_valid(counts, width), order[index.clamp(max=labels.shape[0] - 1)], 0)
    return classes[keep], index[keep], counts[keep]
