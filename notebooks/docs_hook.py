"""mkdocs hook (``hooks:`` in mkdocs.yml): the tutorial pages are the notebooks, executed.

- ``on_config``: the "Tutorials" section of the navigation lists every
  ``notebooks/NN_name.py``, so a new notebook appears without editing mkdocs.yml.
- ``on_pre_build``: ``docs/notebooks/NN_name.ipynb`` must be an executed copy of
  the current script. A copy whose recorded source hash matches is used as it
  is (CI's notebook tests write them, ``FPARAMS_EXECUTED_NOTEBOOKS=docs/notebooks``);
  any other notebook is executed here, which takes a few minutes for all of
  them. A notebook that fails fails the build.
- ``on_page_content``: the docstrings' Sphinx roles (``:func:`x```) read as
  plain code in the API reference.
- ``on_post_build``: MathJax for the notebooks' maths, copied into the site
  from the ``jupyter-server-mathjax`` package (the docs extra), so that the
  pages render formulas without fetching anything.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List

import nbformat

log = logging.getLogger("mkdocs.hooks.notebooks")
HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("notebooks_sync", HERE / "sync.py")
assert _spec is not None and _spec.loader is not None
sync: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sync)

SECTION = "Tutorials"


def on_config(config: Any) -> Any:
    pages = [f"notebooks/{source.stem}.ipynb" for source in sync.sources()]
    nav: List[Any] = config["nav"] or []
    for i, entry in enumerate(nav):
        if isinstance(entry, dict) and SECTION in entry:
            nav[i] = {SECTION: pages}
            break
    else:
        nav.append({SECTION: pages})
    return config


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


def on_page_content(html: str, **kwargs: Any) -> str:
    return _ROLE.sub(r"\1", html)


def on_post_build(config: Any) -> None:
    try:
        import jupyter_server_mathjax
    except ImportError:
        from mkdocs.exceptions import PluginError

        raise PluginError(
            "the notebooks' maths need MathJax from jupyter-server-mathjax: pip install -e '.[docs]'"
        ) from None
    static = Path(jupyter_server_mathjax.__file__).parent / "static"
    target = Path(config["site_dir"]) / "assets" / "mathjax"
    unused = shutil.ignore_patterns("png", "*.otf", "*.eot")  # CommonHTML output reads the woff fonts
    shutil.copytree(static, target, dirs_exist_ok=True, ignore=unused)
