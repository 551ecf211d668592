"""The other half of the notebook runs (see ``MORE`` in tests/test_notebooks.py)."""

from __future__ import annotations

import pytest

from tests.test_notebooks import MORE, NOTEBOOKS, run_notebook

PATHS = [p for p in NOTEBOOKS if p.stem in MORE]
#: notebooks whose small run is in the slow suite only (the default suite's time): sbi_chirp
#: (about a minute: SNL rounds on the chirp; its model has tests/models/test_chirp.py, the
#: engine tests/engines/test_snl.py, and its stored outputs are scanned by test_notebook_output)
SLOW = ("sbi_chirp",)


def test_every_listed_notebook_exists():
    assert sorted(p.stem for p in PATHS) == sorted(MORE)


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if p.stem in SLOW else p
                                  for p in PATHS], ids=[p.stem for p in PATHS])
def test_notebook_runs(path, monkeypatch, tmp_path):
    run_notebook(path, monkeypatch, tmp_path)
