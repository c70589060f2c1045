"""The tutorial notebooks' sources are the jupytext percent scripts ``notebooks/NN_name.py``.

Each script has an ``NN_name.ipynb`` twin, committed without outputs so that
the repository can be browsed and opened in Jupyter. This script writes the
twins; tests/test_notebooks.py and CI fail when one is missing or stale::

    python notebooks/sync.py            # (re)write every notebooks/NN_name.ipynb from its .py
    python notebooks/sync.py --check    # list the .ipynb files that are missing or stale; exit 1 if any

Every ``notebooks/[0-9][0-9]_*.py`` is picked up; a new notebook needs no
registration. Cell ids are numbered (``cell-00``, ...), so that writing the
same script twice gives the same file.

:func:`execute` runs a script as a notebook (for the tests and the docs) and
turns its progress bars into their final text, which a static page can show.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import jupytext
import nbformat as _nbformat

nbformat: Any = _nbformat  # untyped package: its calls are Any, under mypy --strict too

HERE = Path(__file__).resolve().parent
COMMAND = "python notebooks/sync.py"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def sources(folder: Path = HERE) -> List[Path]:
    """The notebook scripts, ``NN_name.py``, in order."""
    return sorted(folder.glob("[0-9][0-9]_*.py"))


def source_hash(source: Path) -> str:
    return hashlib.sha256(source.read_bytes()).hexdigest()


def notebook(source: Path) -> Any:
    """The ``.ipynb`` that is committed for ``source``: its cells, no outputs, stable ids."""
    nb = jupytext.read(source, fmt="py:percent")
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    nb.nbformat, nb.nbformat_minor = 4, 5
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:02d}"
        cell.metadata = {}
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nbformat.validate(nb)
    return nb


def problem(source: Path) -> Optional[str]:
    """Why ``source``'s committed ``.ipynb`` is not what :func:`notebook` makes of it; None if it is."""
    target = source.with_suffix(".ipynb")
    if not target.exists():
        return f"{target.name} is missing"
    if target.read_text() != nbformat.writes(notebook(source)) + "\n":
        return f"{target.name} differs from {source.name} (edited by hand, run with outputs, or stale)"
    return None


def write(source: Path) -> bool:
    """Write ``source``'s ``.ipynb``; True if the file changed."""
    target = source.with_suffix(".ipynb")
    text = nbformat.writes(notebook(source)) + "\n"
    if target.exists() and target.read_text() == text:
        return False
    target.write_text(text)
    return True


def execute(source: Path, cwd: Optional[Path] = None, timeout: int = 600) -> Any:
    """``source`` run as a notebook: outputs in place, progress bars as their final text.

    The kernel is this interpreter (so the same fparams and torch), with
    Jupyter's inline matplotlib backend. The notebook's metadata records the
    script's hash (``fparams.source_sha256``), so that the docs build can tell
    whether an executed copy is current. Raises
    ``nbclient.exceptions.CellExecutionError`` when a cell fails.
    """
    import nbclient

    nb = notebook(source)
    with _this_interpreter() as kernel_name:
        client: Any = nbclient.NotebookClient(
            nb, kernel_name=kernel_name, timeout=timeout, resources={"metadata": {"path": str(cwd or HERE)}}
        )
        client.execute()
    _freeze_progress_bars(nb)
    nb.metadata["fparams"] = {"source": source.name, "source_sha256": source_hash(source)}
    return nb


@contextlib.contextmanager
def _this_interpreter() -> Iterator[str]:
    """A kernelspec, in a temporary ``JUPYTER_PATH``, that starts this very interpreter."""
    name = "fparams-notebooks"
    old = os.environ.get("JUPYTER_PATH")
    with tempfile.TemporaryDirectory() as root:
        spec = Path(root) / "kernels" / name
        spec.mkdir(parents=True)
        kernel = {
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": name,
            "language": "python",
            # Jupyter's backend, not the Agg that a test run or CI may have set.
            "env": {"MPLBACKEND": "module://matplotlib_inline.backend_inline"},
        }
        (spec / "kernel.json").write_text(json.dumps(kernel))
        os.environ["JUPYTER_PATH"] = root + (os.pathsep + old if old else "")
        try:
            yield name
        finally:
            if old is None:
                os.environ.pop("JUPYTER_PATH", None)
            else:
                os.environ["JUPYTER_PATH"] = old


def _freeze_progress_bars(nb: Any) -> None:
    """Replace each tqdm widget by its final text (``label: 100%|...| 1000/1000 [...]``).

    A static page has no widget manager: without this it would show the bar's
    text as it was when the bar appeared, at 0%.
    """
    state: Dict[str, Any] = nb.metadata.pop("widgets", {}).get(WIDGET_STATE, {}).get("state", {})

    def text(model_id: str) -> Optional[str]:
        box = state.get(model_id, {}).get("state", {})
        parts = [state.get(c.split("IPY_MODEL_")[-1], {}).get("state", {}) for c in box.get("children", [])]
        if len(parts) != 3:
            return None
        left, bar, right = parts
        done = bar.get("value", 0) / bar.get("max", 1) if bar.get("max") else 0.0
        filled = round(20 * min(max(done, 0.0), 1.0))
        meter = "█" * filled + " " * (20 - filled)
        return f"{_plain(left.get('value', ''))} |{meter}| {_plain(right.get('value', ''))}"

    for cell in nb.cells:
        for output in cell.get("outputs", []):
            view = output.get("data", {}).get(WIDGET_VIEW)
            if view is None:
                continue
            frozen = text(view.get("model_id", ""))
            output.data = {"text/plain": frozen if frozen is not None else output.data.get("text/plain", "")}


def _plain(html: str) -> str:
    return html.replace("&nbsp;", " ").replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&").strip()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report missing or stale .ipynb files")
    args = parser.parse_args(argv)
    if args.check:
        problems = [p for p in map(problem, sources()) if p]
        for p in problems:
            print(f"notebooks/{p}; regenerate with: {COMMAND}", file=sys.stderr)
        return 1 if problems else 0
    for source in sources():
        print(f"{'wrote' if write(source) else 'unchanged'}: notebooks/{source.with_suffix('.ipynb').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
