"""mkdocs hook (``hooks:`` in mkdocs.yml): the tutorial pages are the notebooks, executed.

- ``on_config``: the "Tutorials" section of the navigation lists every
  ``notebooks/NN_name.py``, so a new notebook appears without editing mkdocs.yml;
  a guide named in the navigation whose page is not written yet is left out.
- ``on_pre_build``: ``docs/notebooks/NN_name.ipynb`` must be an executed copy of
  the current script. A copy whose recorded source hash matches is used as it
  is (CI's notebook tests write them, ``FPARAMS_EXECUTED_NOTEBOOKS=docs/notebooks``);
  any other notebook is executed here, which takes a few minutes for all of
  them. A notebook that fails fails the build.
- ``on_page_content``: the docstrings' Sphinx roles (``:func:`x```) read as
  plain code in the API reference, and a reST literal-block marker (a paragraph
  ending in ``::``) ends in one colon.
- ``on_post_build``: MathJax for the notebooks' maths, copied into the site
  from the ``jupyter-server-mathjax`` package (the docs extra), with a local
  configuration that selects the STIX-Web fonts the package ships (MathJax's
  default TeX fonts are not in it), so that the pages render formulas without
  fetching anything.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List

import nbformat as _nbformat

nbformat: Any = _nbformat  # untyped package: its calls are Any, under mypy --strict too

log = logging.getLogger("mkdocs.hooks.notebooks")
HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("notebooks_sync", HERE / "sync.py")
assert _spec is not None and _spec.loader is not None
sync: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sync)

SECTION = "Tutorials"
GUIDES = "Guides"


def on_config(config: Any) -> Any:
    pages = [f"notebooks/{source.stem}.ipynb" for source in sync.sources()]
    nav: List[Any] = config["nav"] or []
    for i, entry in enumerate(nav):
        if isinstance(entry, dict) and SECTION in entry:
            nav[i] = {SECTION: pages}
            break
    else:
        nav.append({SECTION: pages})
    _drop_unwritten(nav, Path(config["docs_dir"]))
    return config


def _drop_unwritten(nav: List[Any], docs: Path) -> None:
    """Leave the guides whose pages do not exist (yet) out of the "Guides" section."""
    for entry in nav:
        if isinstance(entry, dict) and GUIDES in entry:
            written = [g for g in entry[GUIDES] if (docs / next(iter(g.values()))).exists()]
            for guide in entry[GUIDES]:
                if guide not in written:
                    log.info("guides: %s is not written yet; left out of the navigation", guide)
            entry[GUIDES] = written


def _current(target: Path, source: Path) -> bool:
    if not target.exists():
        return False
    meta: Dict[str, Any] = nbformat.read(target, as_version=4).metadata.get("fparams", {})
    return bool(meta.get("source_sha256") == sync.source_hash(source))


def on_pre_build(config: Any) -> None:
    out = Path(config["docs_dir"]) / "notebooks"
    out.mkdir(parents=True, exist_ok=True)
    for source in sync.sources():
        target = out / f"{source.stem}.ipynb"
        if _current(target, source):
            log.info("notebooks/%s: using the executed copy in %s", source.name, out)
            continue
        log.info("notebooks/%s: executing it for the docs", source.name)
        with tempfile.TemporaryDirectory() as cwd:
            nb = sync.execute(source, cwd=Path(cwd))
        nbformat.write(nb, target)


_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):(<code>)")


_LITERAL_MARKER = re.compile(r"::(\s*</p>)")


def on_page_content(html: str, **kwargs: Any) -> str:
    return _LITERAL_MARKER.sub(r":\1", _ROLE.sub(r"\1", html))


#: MathJax 2's configuration for the site, ``config=...,local/fparams`` in mkdocs.yml: HTML-CSS
#: output with the STIX-Web web fonts, the only ones jupyter-server-mathjax ships.
MATHJAX_CONFIG = """MathJax.Hub.Config({
  jax: ["input/TeX", "output/HTML-CSS"],
  "HTML-CSS": {availableFonts: [], preferredFont: null, webFont: "STIX-Web", imageFont: null},
  menuSettings: {renderer: "HTML-CSS"}
});
MathJax.Ajax.loadComplete("[MathJax]/config/local/fparams.js");
"""


def on_post_build(config: Any) -> None:
    # Located, not imported: only its files are needed (importing it needs jupyter_server).
    spec = importlib.util.find_spec("jupyter_server_mathjax")
    if spec is None or spec.origin is None:
        from mkdocs.exceptions import PluginError

        raise PluginError(
            "the notebooks' maths need MathJax from jupyter-server-mathjax: pip install -e '.[docs]'"
        )
    static = Path(spec.origin).parent / "static"
    target = Path(config["site_dir"]) / "assets" / "mathjax"
    unused = shutil.ignore_patterns("png", "*.otf", "*.eot")  # HTML-CSS output reads the woff fonts
    shutil.copytree(static, target, dirs_exist_ok=True, ignore=unused)
    local = target / "config" / "local"
    local.mkdir(parents=True, exist_ok=True)
    (local / "fparams.js").write_text(MATHJAX_CONFIG)
