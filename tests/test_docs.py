"""The documentation: every public name has an API entry, and docs/check_site.py catches what it must."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("check_site", ROOT / "docs" / "check_site.py")
assert _spec is not None and _spec.loader is not None
check_site: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_site)


def test_every_public_name_has_an_api_entry() -> None:
    """Derived from each module's __all__: a name added anywhere fails here until it is documented."""
    missing = check_site.missing_entries()
    assert not missing, f"add a `::: name` entry to a page in docs/api/ for: {', '.join(missing)}"


def test_a_missing_entry_is_reported(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "docs" / "api", tmp_path / "api")
    page = tmp_path / "api" / "fparams.md"
    page.write_text(page.read_text().replace("::: fparams.adapt\n", ""))
    assert check_site.missing_entries(tmp_path / "api") == ["fparams.adapt"]


def test_the_public_names_include_every_module_and_the_errors() -> None:
    names = check_site.public_names()
    assert set(names) == set(check_site.MODULES)
    assert {"adapt", "FparamsError", "MAML"} <= set(names["fparams"])
    assert {"sine_tasks", "EpisodeSampler"} <= set(names["fparams.datasets"])


def _site(tmp_path: Path, body: str) -> Path:
    site = tmp_path / "site"
    (site / "api" / "fparams").mkdir(parents=True)
    (site / "index.html").write_text(f"<html><head></head><body>{body}</body></html>")
    (site / "style.css").write_text("")
    (site / "api" / "fparams" / "index.html").write_text('<h3 id="fparams.adapt">adapt</h3>')
    return site


def test_check_site_reports_missing_assets_network_loads_and_mathjax_fonts(tmp_path: Path) -> None:
    site = _site(
        tmp_path,
        '<link rel="stylesheet" href="style.css"><link rel="stylesheet" href="gone.css">'
        '<script src="https://cdn.example.org/x.js"></script><a href="https://example.org">ok</a>'
        '<script src="assets/mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full"></script>',
    )
    (site / "assets" / "mathjax").mkdir(parents=True)
    (site / "assets" / "mathjax" / "MathJax.js").write_text("")
    problems = check_site.asset_problems(site)
    assert "index.html: link href='gone.css': gone.css is missing" in problems
    assert "index.html: loads https://cdn.example.org/x.js from the network" in problems
    assert any(
        p.startswith("MathJax: ") and p.endswith("config/local/fparams.js is missing") for p in problems
    )
    assert any("no web fonts" in p for p in problems)
    assert not any("style.css" in p or "example.org\n" in p for p in problems)
    assert len([p for p in problems if "example.org" in p]) == 1  # a plain link is not a load


def test_check_site_reports_api_gaps_and_leaked_markup(tmp_path: Path) -> None:
    site = _site(tmp_path, "")
    (site / "api" / "fparams" / "index.html").write_text(
        '<h3 id="fparams.adapt">adapt</h3><p>see :func:<code>x</code> and this::</p><code>f(a = ...)</code>'
    )
    problems = check_site.api_problems(site)
    assert "API reference: no entry for fparams.split" in problems
    assert "API reference: no entry for fparams.adapt" not in problems
    leaked = [p for p in problems if "shows" in p]
    for marker in (":func:", "::", "= ..."):
        assert any(f"shows {marker!r}" in p for p in leaked), (marker, leaked)


@pytest.mark.skipif(
    not (ROOT / "site" / "index.html").exists(), reason="no built site (mkdocs build --strict)"
)
def test_the_built_site_passes_its_checks() -> None:
    assert check_site.main(["--site", str(ROOT / "site")]) == 0
