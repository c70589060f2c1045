"""The package layout stays honest: lower layers never import higher ones,
and the package namespace holds only what ``__all__`` names."""

from __future__ import annotations

import ast
import pathlib

import pytest

import fparams

ROOT = pathlib.Path(fparams.__file__).parent

# Layer of each module (lower number = lower layer). A module may import only
# modules of its own layer or below.
LAYERS = {
    "_version": 0,
    "_types": 0,
    "_torch_compat": 0,
    "_errors": 0,
    "_checks": 0,
    "_filters": 0,
    "_summary": 0,
    "_state": 1,
    "_transforms": 2,
    "_call": 3,
    "_compile": 3,
    "_module_api": 4,
    "_dice": 4,
    # --- core ---
    "_distributions": 4,
    "optim": 5,
    "_norms": 5,
    "_grads": 5,
    "_checkpoint": 5,
    "_inner": 6,
    # --- adapt ---
    "_rates": 6,
    "_inner_step": 6,
    "implicit": 7,
    "_tasks": 8,
    # --- tasks ---: "_tasks" is a package (batching, plan, fallback, map, compiled, meta_grad);
    # tests/test_tasks_layout.py orders its files.
    "_maml": 8,
    "distributed": 9,
    # --- core ---
    "_collectives": 9,
    "demo": 10,
    # --- docs ---
    "datasets": 0,  # task samplers: imports only torch (and the errors and checks)
    # --- arch ---
    "_kernels": 0,
}


def _module_key(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return rel.parts[0]


def _imports(path: pathlib.Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            depth = len(path.relative_to(ROOT).parts) - 1
            if node.level > depth + 1:
                continue
            if node.level == depth + 1:  # relative to the package root
                if node.module:
                    yield node.module.split(".")[0]
                else:
                    yield from (alias.name for alias in node.names)
            # level <= depth: inside the same subpackage
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fparams."):
            yield node.module.split(".")[1]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("fparams."):
                    yield alias.name.split(".")[1]


SOURCES = [p for p in ROOT.rglob("*.py") if p.name != "__init__.py" or p.parent != ROOT]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_lower_layers_never_import_higher_ones(path: pathlib.Path) -> None:
    key = _module_key(path)
    assert key in LAYERS, f"{key} has no layer in tests/test_layout.py: add it"
    for imported in _imports(path):
        assert imported in LAYERS, f"{path.name} imports {imported}, which has no layer"
        assert LAYERS[imported] <= LAYERS[key], (
            f"{path.relative_to(ROOT)} (layer {LAYERS[key]}) imports {imported} (layer {LAYERS[imported]})"
        )


def test_namespace_is_exactly_all() -> None:
    public = {name for name in vars(fparams) if not name.startswith("_")}
    submodules = {"optim", "implicit", "distributed", "demo"}
    submodules |= {"datasets"}  # --- docs ---
    assert public - submodules - set(fparams.__all__) == set()
    assert not hasattr(fparams, "torch")
    for name in fparams.__all__:
        assert hasattr(fparams, name), name


def test_every_public_callable_is_documented_with_an_example() -> None:
    aliases = {"Params", "Buffers", "Updates", "Grads", "LR", "Filter", "CompileFallbackWarning"}
    aliases |= {"FparamsTypeError", "FparamsValueError", "FparamsRuntimeError"}  # FparamsError shows them
    for name in sorted(set(fparams.__all__) - aliases - {"__version__"}):
        doc = getattr(fparams, name).__doc__ or ""
        assert ">>>" in doc, f"fparams.{name} has no runnable example in its docstring"
