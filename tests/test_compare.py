"""bl.compare: the table's numbers are the fits' numbers, failures are rows, outputs are saved."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import jax
import numpy as np
import pytest

import bayeslik as bl
from bayeslik import api
from bayeslik.fit import Cost, Fit, build_datatree
from bayeslik.models import reference


@dataclass(frozen=True)
class ExactConfig:
    """A stand-in engine: iid draws from the exact posterior of normal_mean, exact log Z."""

    num_samples: int = 1000
    bias: float = 0.0
    fail: bool = False


def _exact_run(posterior, rng_key, config):
    if config.fail:
        raise bl.EngineError("this engine was told to fail")
    prob = reference.get("normal_mean")
    m, s = float(prob.posterior_mean["mu"]), float(prob.posterior_sd["mu"])
    x = m + config.bias * s + s * np.asarray(jax.random.normal(rng_key, (1, config.num_samples)))
    idata = build_datatree(posterior, {"mu": x})
    return Fit(idata=idata, engine="exact", config={}, seed=None, cost=Cost(wall_s=0.5),
               log_evidence=prob.log_evidence + 0.1, log_evidence_err=0.05, model=posterior.name)


@pytest.fixture
def exact_engine(monkeypatch):
    monkeypatch.setitem(api._REGISTRY, "exact",
                        api.EngineSpec("exact", ExactConfig, _exact_run, "test stand-in"))


@pytest.fixture(scope="module")
def problem():
    return reference.get("normal_mean")


def test_table_numbers_are_the_fits_numbers(exact_engine, problem):
    post = problem.posterior()
    cmp = bl.compare(post, {"good": "exact", "biased": ExactConfig(bias=1.0),
                            "broken": ExactConfig(fail=True)},
                     reference=problem, seeds=[0, 1], progress_bar=False)
    t = cmp.table.set_index(["engine", "seed"])
    assert len(cmp.table) == 6
    # an engine that raises is a row with its error, not an exception
    assert t.loc[("broken", 0), "status"].startswith("EngineError: this engine was told to fail")
    assert np.isnan(t.loc[("broken", 0), "wall_s"])
    # standardised mean error: ~0 for the exact engine, ~1 for the one biased by one sd
    assert t.loc[("good", 0), "mean_err_max"] < 4 / np.sqrt(1000)
    assert abs(t.loc[("biased", 1), "mean_err_max"] - 1.0) < 4 / np.sqrt(1000)
    assert abs(t.loc[("good", 0), "sd_ratio_min"] - 1.0) < 0.1
    # evidence error against the exact log Z
    assert t.loc[("good", 0), "log_evidence_error"] == pytest.approx(0.1)
    # ESS of iid draws is about the number of draws; ESS/s uses the fit's wall time
    ess = t.loc[("good", 0), "ess_bulk_min"]
    assert 700 < ess < 1300
    assert t.loc[("good", 0), "ess_bulk_per_s"] == pytest.approx(ess / 0.5)
    assert np.isnan(t.loc[("good", 0), "rhat_max"])  # one chain
    # the Fit is reachable for ArviZ; the summary averages over seeds
    assert cmp["good"].engine == "exact"
    assert cmp.summary().loc["good", "num_seeds"] == 2
    with pytest.raises(KeyError, match="broken"):
        cmp["broken"]


def test_executor_gives_the_same_table(exact_engine, problem):
    post = problem.posterior()
    a = bl.compare(post, ["exact"], reference=problem, seeds=3, progress_bar=False)
    with ThreadPoolExecutor(2) as ex:
        b = bl.compare(post, ["exact"], reference=problem, seeds=3, executor=ex,
                       progress_bar=False)
    cols = ["mean_err_max", "sd_ratio_min", "log_evidence"]
    np.testing.assert_allclose(a.table[cols].to_numpy(float), b.table[cols].to_numpy(float))


def test_nuts_against_reference_draws_and_w1(problem, seed):
    """With reference draws the 1-Wasserstein distance is reported (in reference sds)."""
    post = problem.posterior()
    ref = {"mu": problem.posterior_mean["mu"] + problem.posterior_sd["mu"]
           * np.random.default_rng(seed).standard_normal((1, 4000))}
    cmp = bl.compare(post, ["nuts"], reference=ref, seeds=[seed], progress_bar=False,
                     engine_options={"nuts": {"num_warmup": 300, "num_samples": 500,
                                              "num_chains": 2}})
    row = cmp.table.iloc[0]
    assert row["status"] == "ok"
    assert row["w1_max"] < 0.2 and row["mean_err_max"] < 0.2
    assert row["rhat_max"] < 1.05 and row["num_grad_evals"] > 0


def test_save_and_plots(exact_engine, problem, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    post = problem.posterior()
    cmp = bl.compare(post, ["exact"], reference=problem, seeds=[0], progress_bar=False)
    paths = cmp.save(str(tmp_path))
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["cost.png", "evidence.png", "exact_seed0.nc", "marginals.png", "table.csv"]
    back = bl.load_fit(str(tmp_path / "exact_seed0.nc"))
    np.testing.assert_array_equal(back.draws("mu"), cmp["exact"].draws("mu"))
    assert "exact" in cmp._repr_html_()


def test_bad_arguments_are_rejected_before_running(problem, no_jit):
    post = problem.posterior()
    with pytest.raises(bl.EngineError, match="unknown engine 'nutz'"):
        bl.compare(post, ["nutz"])
    with pytest.raises(bl.EngineError, match="no option"):
        bl.compare(post, ["nuts"], engine_options={"nuts": {"num_sample": 5}})
    with pytest.raises(bl.EngineError, match="not among the engines"):
        bl.compare(post, ["nuts"], engine_options={"smc": {}})
    with pytest.raises(bl.EngineError, match="string reference"):
        bl.compare(post, ["nuts"], reference="exact")
