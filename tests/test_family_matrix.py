"""benchmarks/family_matrix.py's pieces on fake inputs (the matrix itself takes hours): the
family x engine table and the CSV from made-up rows, the agreement numbers of two hand-built
Fits against ArviZ's MCSE, and the relabelling that matches a fit's components to the NUTS
fit's."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import math
import types
from pathlib import Path

import numpy as np
import pytest

from bayeslik.fit import Cost, Fit, build_datatree

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fm():
    spec = importlib.util.spec_from_file_location("family_matrix",
                                                  ROOT / "benchmarks" / "family_matrix.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ROWS = [
    {"family": "hawkes", "engine": "nuts", "status": "ok", "wall_s": 95.2, "process_s": 110.0,
     "cpu_s": 180.5, "num_loglik_evals": 123456, "flags": []},
    {"family": "hawkes", "engine": "smc", "status": "ok", "wall_s": 300.4, "process_s": 310.0,
     "cpu_s": 590.0, "num_loglik_evals": 9000000, "z_max": 1.25, "z_param": "alpha[0,1]",
     "sd_ratio_min": 0.95, "sd_ratio_max": 1.04, "log_evidence": -123.456,
     "log_evidence_err": 0.21, "flags": []},
    {"family": "hawkes", "engine": "nested", "status": "ok", "wall_s": 500.0, "process_s": 510.0,
     "cpu_s": 1000.0, "num_loglik_evals": 50000, "z_max": 9.3, "z_param": "mu[2]",
     "sd_ratio_min": 0.68, "sd_ratio_max": 1.27, "log_evidence": -125.0,
     "log_evidence_err": 0.3, "flags": ["a flag | with a bar"]},
    {"family": "hawkes", "engine": "nested+surrogate", "status": "timeout", "process_s": 720.0,
     "cpu_s": 1400.0, "message": "did not finish in 720 s"},
    {"family": "meta", "engine": "nuts", "status": "error", "process_s": 3.0, "cpu_s": 3.0,
     "message": "EngineError: boom"},
]


def test_cells_of_the_family_by_engine_table(fm):
    by = {(r["family"], r["engine"]): r for r in ROWS}
    assert fm.cell_text(by["hawkes", "nuts"]) == "ok 95 s"
    assert fm.cell_text(by["hawkes", "smc"]) == \
        "ok 300 s, z 1.2, sd 0.95-1.04, log Z -123.46 ± 0.21"
    assert fm.cell_text(by["hawkes", "nested"]) == \
        "**ok 500 s, z 9.3, sd 0.68-1.27, log Z -125.00 ± 0.30, 1 flag**"
    assert fm.cell_text(by["hawkes", "nested+surrogate"]) == \
        "**timeout** (did not finish in 720 s)"
    assert fm.cell_text(by["meta", "nuts"]) == "**error**: EngineError: boom"
    # sd ratios alone beyond 10% make a cell bold; z within Z_BAD and sds within 10% do not
    assert fm.cell_text(dict(by["hawkes", "smc"], sd_ratio_min=0.85)).startswith("**")
    assert not fm.cell_text(dict(by["hawkes", "smc"], z_max=3.9)).startswith("**")


def test_markdown_and_csv_from_rows(fm, tmp_path):
    md = fm.markdown(ROWS, note="test")
    lines = md.splitlines()
    assert lines[0] == "# Family x engine matrix (test)"
    assert lines[2] == "| family | nuts | smc | nested | nested+surrogate |"   # no nss row: left out
    assert lines[4] == ("| hawkes | ok 95 s | ok 300 s, z 1.2, sd 0.95-1.04, log Z -123.46 ± 0.21 "
                        "| **ok 500 s, z 9.3, sd 0.68-1.27, log Z -125.00 ± 0.30, 1 flag** | "
                        "**timeout** (did not finish in 720 s) |")
    assert lines[5] == "| meta | **error**: EngineError: boom | not run | not run | not run |"
    detail = [ln for ln in lines if ln.startswith("| hawkes | nested |")]
    assert detail == ["| hawkes | nested | ok | 500.0 | 510.0 | 1000.0 | 50,000 | 9.30 (mu[2]) | "
                      "0.680 | 1.270 | -125.000 ± 0.300 | a flag / with a bar |"]
    csv_path, md_path = fm.write(ROWS, tmp_path / "out", note="test")
    assert md_path.read_text() == md
    with open(csv_path) as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == fm.COLUMNS and len(table) == len(ROWS)
    assert table[2]["flags"] == "a flag | with a bar" and table[2]["num_flags"] == "1"
    assert table[3]["status"] == "timeout" and table[3]["wall_s"] == ""
    assert float(table[1]["z_max"]) == 1.25


def _fit(draws, lp=None):
    post = types.SimpleNamespace(sites={}, observed_data={}, data={}, name="fake")
    C, D = next(iter(draws.values())).shape[:2]
    lp = np.random.default_rng(1).normal(size=(C, D)) if lp is None else lp
    tree = build_datatree(post, draws, sample_stats={"lp": lp})
    return Fit(idata=tree, engine="hand", config={}, seed=None, cost=Cost(wall_s=0.0),
               model="fake")


def test_agreement_is_z_in_combined_mcse_and_sd_ratios(fm):
    import arviz_base as azb
    import arviz_stats as azs

    rng = np.random.default_rng(0)
    a = {"mu": rng.normal(size=(2, 400)), "theta": rng.normal(size=(2, 400, 3))}
    ref = _fit(a)
    assert fm.agreement(ref, ref) == {"z_max": 0.0, "z_param": "mu", "sd_ratio_min": 1.0,
                                      "sd_ratio_max": 1.0}
    b = {"mu": a["mu"].copy(), "theta": a["theta"] * np.array([1.0, 2.0, 0.5])}
    b["theta"][..., 1] += 0.3
    got = fm.agreement(_fit(b), ref)
    mcse = lambda x: float(azs.mcse(azb.from_dict({"posterior": {"x": x}}), method="mean")["x"])
    diff = b["theta"][..., 1].mean() - a["theta"][..., 1].mean()      # 0.3 + mean(a)
    want = abs(diff) / math.hypot(mcse(b["theta"][..., 1]), mcse(a["theta"][..., 1]))
    assert want > 2
    assert got["z_param"] == "theta[1]" and got["z_max"] == pytest.approx(want, rel=1e-6)
    assert got["sd_ratio_min"] == pytest.approx(0.5) and got["sd_ratio_max"] == pytest.approx(2.0)


def test_relabel_to_matches_components_to_the_reference(fm):
    """Two fits of a 3-component log-normal mixture, the second the first with its components
    swapped globally and its draws permuted at random: relabel_to gives both the same labels,
    exactly (the family's registered spec, then one matching permutation)."""
    from bayeslik.models import tpp
    from bayeslik.relabel import permute_fit

    rng = np.random.default_rng(3)
    C, D, M, K = 2, 30, 3, 3
    shapes = {"decay": (), "mark_bias": (M,), "mark_weight": (M, M), "mix_bias": (M, K),
              "mix_weight": (M, K), "loc_bias": (M, K), "loc_weight": (M, K),
              "log_scale_bias": (M, K), "log_scale_weight": (M, K)}
    draws = {k: 0.05 * rng.normal(size=(C, D) + s) for k, s in shapes.items()}
    draws["loc_bias"] += np.linspace(-2.0, 2.0, K)
    ref = _fit(draws)
    other = permute_fit(ref, np.tile([2, 0, 1], (C * D, 1)), "lognormmix")
    other = permute_fit(other, np.array([rng.permutation(K) for _ in range(C * D)]), "lognormmix")
    out = fm.relabel_to({"nuts": ref, "smc": other}, "lognormmix")
    for site in tpp.LOGNORMMIX_RELABEL_SPEC:
        np.testing.assert_array_equal(out["smc"].draws(site), out["nuts"].draws(site))
    # and a reference whose own labels were already consistent keeps them
    np.testing.assert_array_equal(out["nuts"].draws("loc_bias"), ref.draws("loc_bias"))
    assert fm.agreement(out["smc"], out["nuts"])["z_max"] == 0.0
    assert dataclasses.is_dataclass(out["smc"])
