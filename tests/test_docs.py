"""The documentation site builds with no warning (mkdocs --strict), API reference included."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_docs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d",
                          str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                         env=env, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "site" / "api" / "bayeslik" / "index.html").exists()


def test_every_page_is_in_the_nav():
    """A page missing from mkdocs.yml's nav is unreachable on the site."""
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = [p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")]
    missing = [p for p in pages if p not in nav]
    assert not missing, f"add these pages to mkdocs.yml's nav: {missing}"


def test_every_notebook_is_an_example_page():
    """Each notebook is linked into docs/examples/ (shown on the site with its stored outputs)
    and listed in the nav."""
    nav = (ROOT / "mkdocs.yml").read_text()
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        link = ROOT / "docs" / "examples" / nb.name
        assert link.exists() and link.resolve() == nb.resolve(), (
            f"link it: ln -s ../../notebooks/{nb.name} docs/examples/{nb.name}")
        assert f"examples/{nb.name}" in nav, f"add examples/{nb.name} to mkdocs.yml's nav"
