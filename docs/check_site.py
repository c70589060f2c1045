"""Check a built site: every asset a page references is in it, and the API reference is complete.

Run after ``mkdocs build --strict`` (CI does)::

    python docs/check_site.py            # checks site/; exit 1 and a list of problems if any
    python docs/check_site.py --site DIR

Three checks:

1. Every local file a page loads or links (``src=``, ``href=``, stylesheets,
   scripts, images, the MathJax configuration and the web fonts it asks for)
   exists under the site, and no page loads a script, stylesheet, image or font
   from the network: the site works offline.
2. Every public name (``__all__``) of ``fparams``, ``fparams.optim``,
   ``fparams.implicit``, ``fparams.distributed`` and ``fparams.datasets`` has
   an entry in the built API reference (an element with ``id="module.name"``).
3. The API pages show no reST or Sphinx markup (``:func:``, a ``::`` literal
   marker) and no ``@overload`` stub signature (``= ...``).

:func:`missing_entries` also checks the Markdown sources (``::: module.name``
lines in ``docs/api``) without a build; ``tests/test_docs.py`` runs it.
"""

from __future__ import annotations

import argparse
import html
import importlib
import re
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Set, Tuple
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parent.parent
#: The modules whose every public name must have an API entry.
MODULES = ("fparams", "fparams.optim", "fparams.implicit", "fparams.distributed", "fparams.datasets")
#: What MathJax loads at view time (its configuration names them; the page does not).
MATHJAX_FILES = (
    "MathJax.js",
    "config/TeX-AMS-MML_HTMLorMML-full.js",
    "config/Safe.js",
    "config/local/fparams.js",
    "jax/output/HTML-CSS/fonts/STIX-Web/fontdata.js",
)
MATHJAX_FONTS = "fonts/HTML-CSS/STIX-Web/woff"
_LOADS = {("script", "src"), ("img", "src"), ("source", "src"), ("link", "href")}


class _References(HTMLParser):
    """The URLs of a page: ``(tag, attribute, url)`` for every ``src`` and ``href``."""

    def __init__(self) -> None:
        super().__init__()
        self.found: List[Tuple[str, str, str]] = []

    def handle_starttag(self, tag: str, attrs: List[Tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.found.append((tag, name, value))


def public_names() -> Dict[str, List[str]]:
    """``{module: its __all__}`` for :data:`MODULES`, imported from this checkout."""
    sys.path.insert(0, str(ROOT))
    return {name: list(importlib.import_module(name).__all__) for name in MODULES}


def missing_entries(api_dir: Path = ROOT / "docs" / "api") -> List[str]:
    """``module.name`` of every public name without a ``::: module.name`` line in ``api_dir``."""
    text = "\n".join(p.read_text() for p in sorted(api_dir.glob("*.md")))
    documented = set(re.findall(r"^:::\s+(\S+)", text, re.M))
    return [f"{m}.{n}" for m, names in public_names().items() for n in names if f"{m}.{n}" not in documented]


def _pages(site: Path) -> Iterator[Path]:
    yield from sorted(site.rglob("*.html"))


def _target(site: Path, page: Path, url: str) -> Path | None:
    """The file a relative URL of ``page`` names, or None for an external or in-page one."""
    parts = urlsplit(url)
    if parts.scheme or parts.netloc or not parts.path or url.startswith(("#", "mailto:", "javascript:")):
        return None
    path = unquote(parts.path)
    target = (site / path.lstrip("/")) if path.startswith("/") else (page.parent / path)
    target = target.resolve()
    return target / "index.html" if path.endswith("/") or target.is_dir() else target


def asset_problems(site: Path) -> List[str]:
    """Missing local files, network loads, and MathJax's files where a page uses MathJax."""
    problems: List[str] = []
    mathjax_dirs: Set[Path] = set()
    for page in _pages(site):
        parser = _References()
        parser.feed(page.read_text(errors="replace"))
        name = page.relative_to(site)
        for tag, attr, url in parser.found:
            remote = urlsplit(url).scheme in ("http", "https")
            if remote and (tag, attr) in _LOADS and (tag != "link" or _is_loaded_link(page, url)):
                problems.append(f"{name}: loads {url} from the network")
                continue
            target = _target(site, page, url)
            if target is not None and not target.exists():
                problems.append(
                    f"{name}: {tag} {attr}={url!r}: {target.relative_to(site.resolve())} is missing"
                )
            if target is not None and target.name == "MathJax.js":
                mathjax_dirs.add(target.parent)
    for folder in sorted(mathjax_dirs):
        problems += [f"MathJax: {folder / f} is missing" for f in MATHJAX_FILES if not (folder / f).exists()]
        if not any((folder / MATHJAX_FONTS).glob("*.woff")):
            problems.append(f"MathJax: no web fonts in {folder / MATHJAX_FONTS}")
    return problems


def _is_loaded_link(page: Path, url: str) -> bool:
    """Whether a ``<link href=url>`` on ``page`` is a stylesheet, font, icon or preload (loaded)."""
    pattern = re.compile(r"<link\b[^>]*href=\"" + re.escape(url) + r"\"[^>]*>")
    return any(
        re.search(r'rel="(stylesheet|preload|icon|shortcut icon|modulepreload)"', tag)
        for tag in pattern.findall(page.read_text(errors="replace"))
    )


def api_problems(site: Path) -> List[str]:
    """Public names without an entry in the built API pages, and markup that leaked into them."""
    pages = sorted((site / "api").rglob("*.html"))
    text = "\n".join(p.read_text(errors="replace") for p in pages)
    ids = set(re.findall(r'id="([^"]+)"', text))
    problems = [
        f"API reference: no entry for {m}.{n}"
        for m, names in public_names().items()
        for n in names
        if f"{m}.{n}" not in ids
    ]
    for page in pages:
        plain = html.unescape(re.sub(r"<[^>]+>", "", page.read_text(errors="replace")))
        for marker in (":func:", ":class:", ":meth:", ":mod:", ":data:", ":attr:", ":exc:", "::", "= ..."):
            if marker in plain:
                at = plain.index(marker)
                snippet = " ".join(plain[max(0, at - 60) : at + 20].split())
                problems.append(f"{page.relative_to(site)}: shows {marker!r}: ...{snippet}...")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--site", type=Path, default=ROOT / "site", help="the built site (default: site/)")
    args = parser.parse_args(argv)
    if not (args.site / "index.html").exists():
        parser.error(f"{args.site} holds no built site; run `mkdocs build --strict` first")
    problems = asset_problems(args.site) + api_problems(args.site)
    for problem in problems:
        print(problem, file=sys.stderr)
    pages = sum(1 for _ in _pages(args.site))
    print(f"{pages} pages checked: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
