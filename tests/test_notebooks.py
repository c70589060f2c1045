"""The tutorial notebooks: sources in sync with their committed ``.ipynb``, and every one runs.

The sources are the jupytext percent scripts ``notebooks/NN_name.py``
(``notebooks/sync.py`` writes their ``.ipynb`` twins). Each notebook ends
with a self-check cell that asserts its key numbers, so running it checks them.

The kernel is this interpreter (``sync.execute``), so the notebooks run
against the same fparams and torch as the rest of the tests, with
matplotlib's inline backend as in Jupyter. A cell
that raises, or runs past ``CELL_TIMEOUT`` seconds, fails the test. With
``FPARAMS_EXECUTED_NOTEBOOKS=DIR`` set, the executed notebooks are written to
``DIR`` (CI passes ``docs/notebooks``, from where the documentation uses them).
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from typing import Any

import pytest

# Notebooks and benchmark runs take tens of seconds: CI runs them (-m slow), quick local runs skip them.
pytestmark = pytest.mark.slow

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("jupytext")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

FOLDER = Path(__file__).resolve().parent.parent / "notebooks"
_spec = importlib.util.spec_from_file_location("notebooks_sync", FOLDER / "sync.py")
assert _spec is not None and _spec.loader is not None
sync: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sync)

SOURCES = sync.sources(FOLDER)
CELL_TIMEOUT = 600  # seconds per cell: generous, the machines running CI are shared


def test_every_notebook_has_its_source() -> None:
    assert len(SOURCES) >= 5
    orphans = sorted(p.name for p in FOLDER.glob("*.ipynb") if not p.with_suffix(".py").exists())
    assert not orphans, f"{orphans}: no notebooks/NN_name.py source; the .py scripts are the sources"


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_committed_ipynb_matches_its_source(source: Path) -> None:
    problem = sync.problem(source)
    assert problem is None, f"notebooks/{problem}. Regenerate the .ipynb files with: {sync.COMMAND}"


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_ends_with_a_self_check(source: Path) -> None:
    cells = sync.notebook(source).cells
    assert len(cells) >= 2 and cells[-1].cell_type == "code" and "assert" in cells[-1].source, (
        f"{source.name} must end with a code cell of assertions on its key numbers"
    )
    assert cells[-2].cell_type == "markdown" and "## Self-check" in cells[-2].source, (
        f"{source.name}: head the final checks with a markdown cell '## Self-check'"
    )


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_notebook_runs(source: Path, tmp_path: Path) -> None:
    if "import transformers" in source.read_text() or "from transformers" in source.read_text():
        pytest.importorskip("transformers", reason="the models extra: pip install -e '.[models]'")
        pytest.importorskip("peft", reason="the models extra: pip install -e '.[models]'")
    start = time.perf_counter()
    try:
        nb = sync.execute(source, cwd=tmp_path, timeout=CELL_TIMEOUT)
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"{source.name} failed:\n{err}", pytrace=False)
    print(f"{source.name}: {time.perf_counter() - start:.1f} s")
    images = sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))
    plots = sum("plt.show()" in cell.source or "fparams.demo.plot(" in cell.source for cell in nb.cells)
    assert images >= plots, f"{source.name}: {plots} plotting cells but only {images} images came out"
    out = os.environ.get("FPARAMS_EXECUTED_NOTEBOOKS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, Path(out) / source.with_suffix(".ipynb").name)
