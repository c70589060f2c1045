"""fparams.datasets: sine tasks, synthetic image tasks and the N-way K-shot episode sampler."""

from __future__ import annotations

import re

import pytest
import torch
from torch.utils.data import TensorDataset

import fparams
from fparams import datasets


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_sine_tasks_shapes_ranges_and_truth() -> None:
    tasks = datasets.sine_tasks(64, 5, 7, generator=gen())
    assert tasks.support_x.shape == tasks.support_y.shape == (64, 5, 1)
    assert tasks.query_x.shape == tasks.query_y.shape == (64, 7, 1)
    assert 0.1 <= float(tasks.amplitude.min()) and float(tasks.amplitude.max()) <= 5.0
    assert 0.0 <= float(tasks.phase.min()) and float(tasks.phase.max()) <= torch.pi
    assert float(tasks.support_x.abs().max()) <= 5.0
    # independent reference: the formula written out task by task
    for i in range(64):
        expected = tasks.amplitude[i] * torch.sin(tasks.query_x[i] - tasks.phase[i])
        torch.testing.assert_close(tasks.query_y[i], expected)
    assert repr(tasks) == "SineTasks(tasks=64, shots=5, queries=7)"


def test_sine_tasks_are_the_demos_draws() -> None:
    """The demo, notebooks and benchmarks moved here: the same seed gives the same numbers as before."""
    g = gen(3)
    amplitude = torch.rand(4, generator=g) * 4.9 + 0.1
    phase = torch.rand(4, generator=g) * torch.pi
    x = torch.rand(4, 20, 1, generator=g) * 10.0 - 5.0
    tasks = datasets.sine_tasks(4, generator=gen(3))
    torch.testing.assert_close(tasks.amplitude, amplitude)
    torch.testing.assert_close(tasks.phase, phase)
    torch.testing.assert_close(torch.cat([tasks.support_x, tasks.query_x], 1), x)


def test_same_seed_same_tasks_other_seed_other_tasks() -> None:
    a, b, c = (datasets.sine_tasks(3, generator=gen(s)) for s in (1, 1, 2))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.support_x, c.support_x)


def test_image_tasks_classes_are_separable_by_their_prototypes() -> None:
    tasks = datasets.image_tasks(
        6, ways=4, shots=3, queries=5, image_shape=(2, 8, 8), noise=0.3, generator=gen()
    )
    assert tasks.support_x.shape == (6, 12, 2, 8, 8) and tasks.query_x.shape == (6, 20, 2, 8, 8)
    assert tasks.support_y[0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert tasks.support_y.dtype == torch.int64 and tasks.classes.tolist() == [[0, 1, 2, 3]] * 6
    # nearest class mean of the support set classifies every query: the labels match the images
    means = tasks.support_x.view(6, 4, 3, -1).mean(2)
    dist = torch.cdist(tasks.query_x.flatten(2), means)
    assert torch.equal(dist.argmin(-1), tasks.query_y)


def test_episode_sampler_draws_distinct_classes_and_examples_with_remapped_labels() -> None:
    labels = torch.tensor([7, 3, 9, 1, 5]).repeat_interleave(torch.tensor([4, 6, 5, 2, 8]))
    data = torch.stack([torch.arange(len(labels)).float(), labels.float()], 1)  # row id, label
    sampler = datasets.EpisodeSampler(data, labels, ways=3, shots=2, queries=2, generator=gen())
    assert repr(sampler) == "EpisodeSampler(examples=25, classes=4, ways=3, shots=2, queries=2)"
    batch = sampler.sample(200)
    assert batch.support_x.shape == (200, 6, 2) and batch.query_y.shape == (200, 6)
    seen = set()
    for t in range(200):
        classes = batch.classes[t]
        assert len(set(classes.tolist())) == 3 and 1 not in classes.tolist()  # class 1 has 2 < 4 examples
        rows = torch.cat([batch.support_x[t], batch.query_x[t]])
        assert len(set(rows[:, 0].tolist())) == 12  # no example twice in an episode
        torch.testing.assert_close(batch.support_x[t, :, 1], classes[batch.support_y[t]].float())
        torch.testing.assert_close(batch.query_x[t, :, 1], classes[batch.query_y[t]].float())
        seen |= set(rows[:, 0].long().tolist())
    eligible = {i for i, label in enumerate(labels.tolist()) if label != 1}
    assert seen == eligible  # every example of every eligible class is drawn at some point


def test_episode_sampler_takes_a_tensor_dataset_and_feeds_map_tasks() -> None:
    labels = torch.arange(60) % 6
    sampler = datasets.EpisodeSampler(TensorDataset(torch.randn(60, 4), labels), ways=3, shots=2, queries=3)
    batch = sampler.sample(5)
    w = torch.zeros(4, 3)

    def task_loss(w: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor):
        return torch.nn.functional.cross_entropy(xq @ w, yq) + 0 * xs.sum() + 0 * ys.sum()

    losses = fparams.map_tasks(task_loss)(w, *batch.data())
    torch.testing.assert_close(losses, torch.full((5,), float(torch.log(torch.tensor(3.0)))))


@pytest.mark.parametrize(
    "call, kind, message",
    [
        (
            lambda: datasets.sine_tasks(0),
            fparams.FparamsValueError,
            "fparams.datasets.sine_tasks: `n` must be an int >= 1; got 0.",
        ),
        (
            lambda: datasets.sine_tasks(2, shots=1.5),
            fparams.FparamsTypeError,
            "fparams.datasets.sine_tasks: `shots` must be an int; got float 1.5.",
        ),
        (
            lambda: datasets.sine_tasks(2, generator=0),
            fparams.FparamsTypeError,
            "fparams.datasets.sine_tasks: `generator` must be a torch.Generator or None; got int.",
        ),
        (
            lambda: datasets.image_tasks(2, noise=0.0),
            fparams.FparamsValueError,
            "fparams.datasets.image_tasks: `noise` must be a finite number > 0; got 0.0.",
        ),
        (
            lambda: datasets.image_tasks(2, image_shape=[1, 2]),
            fparams.FparamsTypeError,
            (
                "fparams.datasets.image_tasks: `image_shape` must be a tuple of ints such as (1, 28, "
                "28); got list."
            ),
        ),
        (
            lambda: datasets.EpisodeSampler([1, 2], torch.zeros(2)),
            fparams.FparamsTypeError,
            "fparams.datasets.EpisodeSampler: `data` must be a tensor of examples on dim 0; got list.",
        ),
        (
            lambda: datasets.EpisodeSampler(torch.zeros(4, 2), torch.zeros(4)),
            fparams.FparamsTypeError,
            (
                "fparams.datasets.EpisodeSampler: `labels` must hold integer class labels; got dtype "
                "torch.float32. Convert with labels.long()."
            ),
        ),
        (
            lambda: datasets.EpisodeSampler(torch.zeros(4, 2), torch.zeros(3, dtype=torch.long)),
            fparams.FparamsValueError,
            (
                "fparams.datasets.EpisodeSampler: `labels` must be 1-D with one label per example of "
                "`data`; got labels of shape (3,) for data of shape (4, 2)."
            ),
        ),
        (
            lambda: datasets.EpisodeSampler(
                torch.zeros(8, 2), torch.arange(8) % 4, ways=5, shots=1, queries=1
            ),
            fparams.FparamsValueError,
            (
                "fparams.datasets.EpisodeSampler: `ways`=5 needs 5 classes with at least shots + "
                "queries = 2 examples each; `labels` has 4 such classes (of 4). Lower `ways`, `shots` "
                "or `queries`."
            ),
        ),
        (
            lambda: datasets.EpisodeSampler(TensorDataset(torch.zeros(3)), ways=1),
            fparams.FparamsValueError,
            (
                "fparams.datasets.EpisodeSampler: `data` must be a TensorDataset(data, labels); got "
                "one of 1 tensors."
            ),
        ),
        (
            lambda: datasets.EpisodeSampler(
                torch.zeros(8, 2), torch.arange(8) % 2, ways=2, shots=1, queries=1
            ).sample(0),
            fparams.FparamsValueError,
            "fparams.datasets.EpisodeSampler.sample: `tasks` must be an int >= 1; got 0.",
        ),
    ],
)
def test_bad_input_names_the_function_argument_and_fix(call, kind, message: str) -> None:  # noqa: ANN001
    with pytest.raises(kind, match=re.escape(message)):
        call()
