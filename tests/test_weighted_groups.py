"""Weighted points are not draws: the ``nested_samples`` / ``particles`` groups have dims
(run, point) / (run, particle), ArviZ does not summarise them, ``bayeslik.weights`` gives their
weighted summary, and files saved with the old (chain, draw) layout still load."""

from __future__ import annotations

import types

import arviz as az
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
import xarray as xr

import bayeslik as bl
from bayeslik.engines import kit
from bayeslik.models import reference
from bayeslik.weights import (point_weights, upgrade_weighted_groups, weighted_points,
                              weighted_summary)

PROB = reference.get("normal_mean")  # conjugate normal: mu | y is normal, known mean and sd
# tiny settings (a few seconds each, mostly compiling)
SETTINGS = {"nested": ("nested_samples", "point", dict(num_live=50)),
            "nss": ("nested_samples", "point", dict(num_live=50, num_inner_steps=5, num_delete=5)),
            "smc": ("particles", "particle", dict(num_particles=200, num_runs=2))}


@pytest.fixture(scope="module")
def fits():
    post = PROB.posterior()
    return {eng: bl.fit(post, eng, seed=0, progress_bar=False, **kw)
            for eng, (_, _, kw) in SETTINGS.items()}


@pytest.mark.parametrize("engine", list(SETTINGS))
def test_weighted_group_dims(fits, engine):
    fit = fits[engine]
    group, point, kw = SETTINGS[engine]
    g = fit.idata[group]
    runs = kw.get("num_runs", 1)
    assert g["log_weight"].dims == ("run", point)
    assert g["mu"].dims == ("run", point)
    assert g.sizes["run"] == runs and "chain" not in g.dims and "draw" not in g.dims
    assert "sample_dims" not in g.attrs and g.attrs["weighted_dims"] == ["run", point]
    assert g.attrs["log_evidence"] == fit.log_evidence
    # every run's log weights normalised; the point weights sum to one over all runs
    np.testing.assert_allclose(np.logaddexp.reduce(g["log_weight"].values, axis=1), 0.0,
                               atol=1e-4)
    w = point_weights(fit)
    assert w.dims == ("run", point)
    np.testing.assert_allclose(w.sum(point).values, 1.0 / runs, rtol=1e-6)
    # the posterior group holds the equal-weight draws, with (chain, draw)
    assert fit.idata["posterior"]["mu"].dims == ("chain", "draw")
    # ArviZ summarises the draws only, and refuses the weighted points as draws
    assert list(az.summary(fit.idata).index) == ["mu"]
    with pytest.raises(ValueError, match="sample_dims"):
        az.summary(fit.idata, group=group)
    # nothing but the log joint is called lp
    stats = set(fit.idata["sample_stats"].data_vars)
    assert stats == ({"lp", "acceptance_rate"} if engine == "smc" else {"loglikelihood"})


@pytest.mark.parametrize("engine", list(SETTINGS))
def test_weighted_mean_is_the_analytic_one(fits, engine):
    s = weighted_summary(fits[engine])
    assert list(s.index) == ["mu"]
    assert list(s.columns) == ["mean", "sd", "eti89_lb", "eti89_ub", "ess_kish", "mcse_mean"]
    mean, sd = float(PROB.posterior_mean["mu"]), float(PROB.posterior_sd["mu"])
    row = s.loc["mu"]
    assert abs(row["mean"] - mean) < 5 * row["mcse_mean"], (row, mean)
    # the sd to the error of a sample sd (sd / sqrt(2 ESS)), the interval to its normal one
    assert abs(row["sd"] - sd) < 5 * sd / np.sqrt(2 * row["ess_kish"]), (row, sd)
    assert row["eti89_lb"] < mean - sd < mean + sd < row["eti89_ub"]
    g = weighted_points(fits[engine])
    w = point_weights(fits[engine])
    assert float((w * g["mu"]).sum()) == pytest.approx(row["mean"], rel=1e-6)
    assert row["ess_kish"] == pytest.approx(1.0 / float((w ** 2).sum()), rel=1e-9)


def test_old_layout_loads(fits, tmp_path):
    """A file saved with (chain, draw) dims and ArviZ's sample_dims in the weighted group (the
    layout before) loads, and reads the same through the helpers."""
    fit = fits["nested"]
    new = fit.idata["nested_samples"].to_dataset(inherit=False)
    old = new.rename({"run": "chain", "point": "draw"})
    old.attrs = {k: v for k, v in new.attrs.items() if k != "weighted_dims"}
    old.attrs["sample_dims"] = ["chain", "draw"]
    tree = fit.idata.copy()
    tree["nested_samples"] = xr.DataTree(old)
    path = tmp_path / "old.nc"
    bl.Fit(idata=tree, engine=fit.engine, config=fit.config, seed=fit.seed, cost=fit.cost,
           log_evidence=fit.log_evidence, log_evidence_err=fit.log_evidence_err,
           model=fit.model, flags=fit.flags).save(path)
    loaded = bl.load_fit(path)
    assert loaded.log_evidence == fit.log_evidence
    g = weighted_points(loaded)
    assert g["log_weight"].dims == ("run", "point") and "sample_dims" not in g.attrs
    np.testing.assert_array_equal(g["mu"].values, new["mu"].values)
    assert weighted_summary(loaded).equals(weighted_summary(fit))
    up = upgrade_weighted_groups(loaded.idata.copy())
    assert up["nested_samples"]["mu"].dims == ("run", "point")
    assert "sample_dims" not in up["nested_samples"].attrs


def _plated():
    with numpyro.plate("school", 3):
        numpyro.sample("theta", dist.Normal(0.0, 1.0))


class _WithCoords:
    """A Posterior with ``coords`` (as the ones labelled by the user have)."""

    def __init__(self, post, coords):
        self._post, self.coords = post, coords

    def __getattr__(self, name):
        return getattr(self._post, name)


def test_site_dims_and_coords_label_the_trailing_axes():
    post = _WithCoords(bl.Posterior(_plated), {"school": ["a", "b", "c"]})
    run = kit.Run("demo", post, None)
    rng = np.random.default_rng(0)
    fit = kit.weighted_fit(
        run, {"theta": rng.normal(size=(1, 4, 3))}, group="nested_samples",
        weighted={"theta": rng.normal(size=(1, 6, 3)), "u": rng.random((1, 6, 3))},
        log_weight=np.log(np.full((1, 6), 1 / 6)), log_evidence=-1.0, log_evidence_err=0.1)
    g = fit.idata["nested_samples"]
    assert g["theta"].dims == ("run", "point", "school")
    assert g["u"].dims == ("run", "point", "u_dim_0")
    assert list(g["school"].values) == ["a", "b", "c"]
    s = weighted_summary(fit)
    assert list(s.index) == ["theta[a]", "theta[b]", "theta[c]"]
    np.testing.assert_allclose(s["mean"].values, g["theta"].values[0].mean(0), rtol=1e-6)
    np.testing.assert_allclose(s["sd"].values, g["theta"].values[0].std(0, ddof=1), rtol=1e-6)
    assert s["ess_kish"].iloc[0] == pytest.approx(6.0)


def test_errors_name_the_fix():
    tree = xr.DataTree.from_dict({"posterior": xr.Dataset(
        {"mu": (("chain", "draw"), np.zeros((1, 3)))})})
    with pytest.raises(bl.OptionError, match="no weighted points"):
        weighted_summary(types.SimpleNamespace(idata=tree))
    with pytest.raises(bl.OptionError, match="group='posterior'"):
        point_weights(tree, group="posterior")
