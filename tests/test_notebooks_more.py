"""The other half of the notebook runs (see ``MORE`` in tests/test_notebooks.py)."""

from __future__ import annotations

import pytest

from tests.test_notebooks import MORE, NOTEBOOKS, run_notebook

PATHS = [p for p in NOTEBOOKS if p.stem in MORE]


def test_every_listed_notebook_exists():
    assert sorted(p.stem for p in PATHS) == sorted(MORE)


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_notebook_runs(path, monkeypatch, tmp_path):
    run_notebook(path, monkeypatch, tmp_path)
