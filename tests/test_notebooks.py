"""Every notebook in notebooks/ runs top to bottom at small sizes (BAYESLIK_NOTEBOOK_FAST=1).

Each notebook reads that variable and shrinks its problem sizes; a notebook that raises fails
here with the cell that failed.
"""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("BAYESLIK_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # the kernel is this interpreter (the project's environment), whatever kernelspecs exist
    spec = tmp_path / "kernels" / "bayeslik-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "bayeslik tests", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="bayeslik-test",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()


def test_notebooks_exist():
    assert NOTEBOOKS, "notebooks/ has no notebooks"
