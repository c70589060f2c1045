"""``python -m fparams.demo``: runs, is deterministic, reports its numbers, rejects bad options."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

import fparams  # noqa: E402
from fparams import demo  # noqa: E402

TINY = ["--iterations", "3", "--tasks", "4"]
NUMBERS = re.compile(
    r"^\s+(before adaptation|after 1 step|after 10 steps):\s+([0-9.]+)(?:\s+\(expected .*\))?$", re.M
)


def run_demo(capsys: pytest.CaptureFixture[str], argv: List[str]) -> Dict[str, float]:
    assert demo.main(argv) == 0
    out = capsys.readouterr().out
    numbers = {label: float(value) for label, value in NUMBERS.findall(out)}
    assert sorted(numbers) == ["after 1 step", "after 10 steps", "before adaptation"], out
    saved = re.search(r"^plot saved to (.+)$", out, re.M)
    assert saved is not None, out
    assert Path(saved.group(1)).is_file()
    return numbers


def test_runs_prints_numbers_and_saves_the_plot(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "plot.png"
    numbers = run_demo(capsys, TINY + ["--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(v > 0 for v in numbers.values())


def test_run_returns_scores_and_figure_and_keeps_the_backend(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The notebook entry point: the command line's numbers, a Figure, matplotlib's backend untouched."""
    import matplotlib
    from matplotlib.figure import Figure

    def no_switching(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"the demo switched matplotlib's backend: matplotlib.use{args}")

    monkeypatch.setattr(matplotlib, "use", no_switching)
    result = demo.run(iterations=3, tasks=4, progress=False)
    assert isinstance(result.figure, Figure)
    assert len(result.figure.axes) == 3
    # Jupyter shows it as a PNG also where pyplot, and so the inline backend, was never imported.
    assert result.figure._repr_png_()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(ax.get_title().startswith("held-out task: A=") for ax in result.figure.axes)
    assert len(result.losses) == 3 and result.seconds > 0
    printed = run_demo(capsys, TINY + ["--out", str(tmp_path / "a.png")])
    assert [round(result.scores[s], 4) for s in (0, 1, 10)] == [
        printed[k] for k in ("before adaptation", "after 1 step", "after 10 steps")
    ]


def test_same_seed_same_numbers(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    first = run_demo(capsys, TINY + ["--seed", "7", "--out", str(tmp_path / "a.png")])
    second = run_demo(capsys, TINY + ["--seed", "7", "--out", str(tmp_path / "b.png")])
    other = run_demo(capsys, TINY + ["--seed", "8", "--out", str(tmp_path / "c.png")])
    assert first == second
    assert first != other


def test_first_order_and_more_steps(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    second_order = run_demo(capsys, TINY + ["--steps", "2", "--out", str(tmp_path / "a.png")])
    first_order = run_demo(capsys, TINY + ["--steps", "2", "--first-order", "--out", str(tmp_path / "b.png")])
    assert second_order != first_order


def test_compile_reaches_meta_value_and_grad(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Compiling this step is too slow for the fast tests; notebook 02 runs a compiled step for real.
    seen = []
    real = fparams.meta_value_and_grad

    def spy(task_fn: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("compile"))
        return real(task_fn, **{**kwargs, "compile": False})

    monkeypatch.setattr(fparams, "meta_value_and_grad", spy)
    run_demo(capsys, TINY + ["--compile", "--out", str(tmp_path / "a.png")])
    run_demo(capsys, TINY + ["--out", str(tmp_path / "b.png")])
    assert seen == [True, False]


def test_leaves_the_thread_count_as_it_was(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    before = torch.get_num_threads()
    run_demo(capsys, TINY + ["--threads", "2", "--out", str(tmp_path / "a.png")])
    assert torch.get_num_threads() == before


def test_meta_training_lowers_the_adapted_loss() -> None:
    """The pieces a multi-process driver reuses: sample, meta_step, evaluate."""
    model = demo.make_model(0)
    arch, params, _ = fparams.split(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    meta_grad = demo.make_meta_grad(arch, lr=0.01, steps=1)
    generator = torch.Generator().manual_seed(0)
    held_out = demo.sample_tasks(torch.Generator().manual_seed(1), 50)
    before = demo.evaluate(arch, params, held_out, lr=0.01, steps=(1,))[1]
    for _ in range(150):
        demo.meta_step(meta_grad, params, optimizer, demo.sample_tasks(generator, 10))
    after = demo.evaluate(arch, params, held_out, lr=0.01, steps=(1,))[1]
    assert after < 0.85 * before, (before, after)


@pytest.mark.slow
def test_default_run_falls_in_the_published_ranges() -> None:
    """The numbers README, notebook 02, the docs and --help quote: the default run, on this machine."""
    result = demo.run(progress=False)
    for steps, expected in demo.EXPECTED.items():
        assert result.scores[steps] in expected, (steps, result.scores[steps], str(expected))


def test_the_ranges_are_quoted_everywhere_alike() -> None:
    root = Path(__file__).resolve().parent.parent
    ranges = [str(demo.EXPECTED[s]) for s in (0, 1, 10)]
    texts = {
        "--help": demo.build_parser().format_help().replace("\n", " "),
        "notebooks/02_maml_sine_vmap.py": (root / "notebooks" / "02_maml_sine_vmap.py").read_text(),
        "docs/index.md": (root / "docs" / "index.md").read_text(),
        "README.md": (root / "README.md").read_text(),
    }
    for where, text in texts.items():
        for quoted in ranges:
            assert quoted in " ".join(text.split()), f"{where} does not quote the demo's range {quoted}"


def test_result_repr_is_one_short_line_and_the_figure_class_is_shared() -> None:
    first = demo.run(iterations=2, tasks=3, progress=False)
    second = demo.run(iterations=2, tasks=3, progress=False)
    text = repr(first)
    assert "\n" not in text and len(text) < 160, text
    assert text.startswith("DemoResult(scores={0: ") and "iterations=2" in text
    assert type(first.figure) is type(second.figure) is demo.ShownFigure
    # the legend sits outside the panels: no axes holds one that could cover a curve
    assert first.figure is not None and all(ax.get_legend() is None for ax in first.figure.axes)
    assert first.figure.legends


def test_the_expected_hint_is_printed_only_for_the_default_training(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_demo(capsys, TINY + ["--out", str(tmp_path / "a.png")])
    assert "expected" not in capsys.readouterr().out
    fake = demo.DemoResult({0: 2.7, 1: 0.8, 10: 0.4}, None, [1.0], None, {}, 1.0)  # type: ignore[arg-type]
    monkeypatch.setattr(demo._cli, "run", lambda **kwargs: fake)
    assert demo.main(["--out", str(tmp_path / "b.png")]) == 0
    printed = capsys.readouterr().out
    assert f"(expected {demo.EXPECTED[0]})" in printed and f"(expected {demo.EXPECTED[10]})" in printed


def test_sample_tasks_shapes_and_ranges() -> None:
    batch = demo.sample_tasks(torch.Generator().manual_seed(0), 64)
    assert batch.support_x.shape == batch.support_y.shape == (64, 10, 1)
    assert batch.query_x.shape == batch.query_y.shape == (64, 10, 1)
    assert batch.amplitude.min() >= 0.1 and batch.amplitude.max() <= 5.0
    assert batch.phase.min() >= 0 and batch.phase.max() <= torch.pi
    assert batch.support_x.abs().max() <= 5.0
    assert torch.allclose(batch.support_y, demo.sine(batch.support_x, batch.amplitude, batch.phase))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tasks", "0"], "argument --tasks: must be a positive integer; got '0'"),
        (["--iterations", "-5"], "argument --iterations: must be a positive integer; got '-5'"),
        (["--steps", "two"], "argument --steps: must be a positive integer; got 'two'"),
        (["--lr", "0"], "argument --lr: must be a positive, finite number; got '0'"),
        (["--meta-lr", "nan"], "argument --meta-lr: must be a positive, finite number; got 'nan'"),
        (["--threads", "0"], "argument --threads: must be a positive integer; got '0'"),
        (["--seed", "x"], "argument --seed: invalid int value: 'x'"),
        (["--out", "/no/such/dir/plot.png"], "argument --out: the directory '/no/such/dir' does not exist"),
        (["--out", "plot.unknownformat"], "argument --out: cannot tell the image format"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_options_exit_with_a_message(
    capsys: pytest.CaptureFixture[str], argv: List[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exc:
        demo.main(argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_out_may_not_be_a_directory(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        demo.main(["--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "is a directory" in capsys.readouterr().err


def test_missing_extras_name_the_demo_extra(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # makes `import tqdm` raise ImportError
    with pytest.raises(SystemExit) as exc:
        demo.main(TINY)
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "needs tqdm" in err and "pip install 'fparams[demo]'" in err


def test_help_from_the_command_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fparams.demo", "--help"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    for option in ("--iterations", "--tasks", "--steps", "--first-order", "--compile", "--seed", "--out"):
        assert option in result.stdout
    assert "sine" in result.stdout


def test_bad_option_from_the_command_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fparams.demo", "--tasks", "0"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2
    assert "must be a positive integer" in result.stderr
    assert "Traceback" not in result.stderr


def test_importing_fparams_does_not_import_the_demo_dependencies() -> None:
    # torch itself may import tqdm, so compare against `import torch` alone.
    code = (
        "import sys, torch; before = set(sys.modules); import fparams; "
        "print(sorted({'matplotlib', 'tqdm', 'fparams.demo'} & (set(sys.modules) - before)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
