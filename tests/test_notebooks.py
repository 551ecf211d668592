"""Every notebook in notebooks/ runs top to bottom at small sizes (BAYESLIK_NOTEBOOK_FAST=1).

Each notebook reads that variable and shrinks its problem sizes; a notebook that raises fails
here with the cell that failed.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))

#: XLA flags added for a notebook's small run. These notebooks are compile-bound at small sizes
#: (a few programs of ~10 s CPU each, sampling a second or two); XLA's unoptimised CPU backend
#: compiles them faster. Measured (CPU seconds of the whole test, default -> flag): workflow
#: 58 -> 36, quickstart 42 -> 27, point_processes 53 -> 37, compare_engines 63 -> 47, mixtures
#: 31 -> 24. Not for surrogates (74 -> 223: network training is run-bound) nor meta_learning /
#: arhmm_cmapss (no gain). It changes how fast the compiled code runs, not what the notebook
#: executes.
_UNOPTIMISED = "--xla_backend_optimization_level=0"
XLA_FLAGS = {nb: _UNOPTIMISED for nb in
             ("workflow", "quickstart", "point_processes", "compare_engines", "mixtures")}


#: the notebooks whose run is a test of tests/test_notebooks_more.py: a second file, so that
#: xdist (``--dist loadfile``) runs the two halves on different workers (~350 s in one file made
#: one worker finish minutes after the other). Every other notebook runs here.
MORE = ("sbi_chirp", "compare_engines", "meta_learning", "quickstart")
HERE = [p for p in NOTEBOOKS if p.stem not in MORE]


@pytest.mark.parametrize("path", HERE, ids=[p.stem for p in HERE])
def test_notebook_runs(path, monkeypatch, tmp_path):
    run_notebook(path, monkeypatch, tmp_path)


def run_notebook(path, monkeypatch, tmp_path):
    """Execute the notebook at ``path`` at small sizes; raises with the failing cell."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("BAYESLIK_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    if path.stem in XLA_FLAGS:
        flags = f"{os.environ.get('XLA_FLAGS', '')} {XLA_FLAGS[path.stem]}".strip()
        monkeypatch.setenv("XLA_FLAGS", flags)
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


def test_workflow_notebook_walks_the_workflow():
    """workflow.ipynb (issue 18's acceptance) takes the steps in order: pandas data, a prior
    predictive check, a fit with two engines, a posterior predictive check with ArviZ's plots,
    a LOO comparison of two models, save and load; stored executed, every code cell run."""
    nb = json.loads((NOTEBOOKS[0].parent / "workflow.ipynb").read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c.get("execution_count") for c in code), "workflow.ipynb is stored unexecuted"
    source = "\n".join("".join(c["source"]) for c in code)
    steps = ["pd.DataFrame(", "bl.Posterior(hierarchical, se=df[", "bl.prior_predictive(",
             "azp.plot_ppc_dist(prior", 'bl.compare(\n    post, ["nuts", "smc"]',
             "bl.posterior_predictive(", "azp.plot_ppc_dist(fit.idata", "azp.plot_loo_pit(",
             "azs.loo(", "azs.compare(", "fit.save(", "bl.load_fit("]
    at = [source.find(s) for s in steps]
    assert min(at) >= 0, [s for s, i in zip(steps, at) if i < 0]
    assert at == sorted(at), "the workflow's steps are out of order"
    images = sum("image/png" in o.get("data", {}) for c in code for o in c.get("outputs", []))
    assert images >= 6
