"""Every notebook in notebooks/ runs top to bottom at small sizes (BAYESLIK_NOTEBOOK_FAST=1).

Each notebook reads that variable and shrinks its problem sizes; a notebook that raises fails
here with the cell that failed.
"""

from __future__ import annotations

import os
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
    nb = nbformat.read(path, as_version=4)
    # the kernel is this interpreter (the project's environment), whatever kernelspecs exist
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}},
        kernel_manager_kwargs={"kernel_cmd": [sys.executable, "-m", "ipykernel_launcher", "-f",
                                              "{connection_file}"]},
    )
    client.execute()


def test_notebooks_exist():
    assert NOTEBOOKS, "notebooks/ has no notebooks"
