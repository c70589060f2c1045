"""README's quickstart snippets run as written."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
# The distributed sketch names the user's own make_net / sample_tasks; the demo runs it for real.
RUNNABLE = [b for b in BLOCKS if "make_net" not in b]


def test_readme_has_quickstarts() -> None:
    assert len(RUNNABLE) >= 2


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.splitlines()[0][:40])
def test_readme_snippet_runs(block: str) -> None:
    exec(compile(block, str(README), "exec"), {})
