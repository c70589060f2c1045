"""fparams/_tasks is a package with one file per job, layered like the package itself."""

from __future__ import annotations

import ast
import pathlib

import pytest

import fparams._tasks

ROOT = pathlib.Path(fparams._tasks.__file__).parent

# Lower files never import higher ones (tests/test_layout.py keeps the package as a whole at
# the layer of "_tasks").
ORDER = {"batching": 0, "plan": 1, "fallback": 2, "map": 3, "compiled": 4, "meta_grad": 5, "__init__": 6}


@pytest.mark.parametrize("path", sorted(ROOT.glob("*.py")), ids=lambda p: p.name)
def test_files_of_the_tasks_package_import_only_lower_ones(path: pathlib.Path) -> None:
    me = path.stem
    assert me in ORDER, f"{path.name} has no place in ORDER: add it"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            other = node.module.split(".")[0]
            assert ORDER[other] < ORDER[me], f"{path.name} imports .{other}"


@pytest.mark.parametrize("path", sorted(ROOT.glob("*.py")), ids=lambda p: p.name)
def test_no_module_over_450_lines_and_no_function_over_60(path: pathlib.Path) -> None:
    source = path.read_text()
    assert len(source.splitlines()) <= 450
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0]
            doc = first.end_lineno - first.lineno + 1 if ast.get_docstring(node) and first.end_lineno else 0
            assert node.end_lineno is not None
            assert node.end_lineno - node.lineno + 1 - doc <= 60, f"{node.name} is too long"
