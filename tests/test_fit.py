"""Fit: the DataTree schema, netCDF round trip with nothing lost, text and HTML summaries."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import bayeslik as bl
from bayeslik.models import reference


@pytest.fixture(scope="module")
def small_fit():
    post = reference.get("correlated_gaussian").posterior()
    return bl.fit(post, "nuts", seed=3, num_warmup=200, num_samples=100, num_chains=2,
                  progress_bar=False)


def test_multivariate_observation_and_cost(small_fit):
    """What the engine-wide schema test (tests/engines/test_contract.py) leaves out: one
    multivariate observation has no event axis in the pointwise log-likelihood, and the config
    and cost of a NUTS fit."""
    tree = small_fit.idata
    assert tree["posterior"]["x"].dims == ("chain", "draw", "x_dim_0")
    assert tree["posterior"]["x"].shape == (2, 100, 6)
    assert tree["log_likelihood"]["y"].shape == (2, 100)
    assert tree["observed_data"]["y"].shape == (6,)
    assert small_fit.log_evidence is None and small_fit.log_evidence_err is None
    assert small_fit.seed == 3 and small_fit.engine == "nuts"
    assert small_fit.config["num_samples"] == 100
    assert small_fit.cost.num_grad_evals >= 2 * 300
    assert small_fit.cost.wall_s > small_fit.cost.compile_s >= 0


def test_netcdf_round_trip_loses_nothing(small_fit, tmp_path):
    path = tmp_path / "fit.nc"
    small_fit.save(str(path))
    back = bl.load_fit(str(path))
    for group in small_fit.idata.children:
        xr.testing.assert_identical(small_fit.idata[group].to_dataset(), back.idata[group].to_dataset())
    assert back.engine == small_fit.engine
    assert back.config == small_fit.config
    assert back.seed == small_fit.seed
    assert back.cost == small_fit.cost
    assert back.log_evidence == small_fit.log_evidence
    assert back.flags == small_fit.flags and back.model == small_fit.model
    assert {k: v for k, v in back.idata.attrs.items()} == dict(small_fit.idata.attrs)


def test_round_trip_keeps_evidence(small_fit, tmp_path):
    import dataclasses

    fit = dataclasses.replace(small_fit, log_evidence=-17.9, log_evidence_err=0.12, flags=("x",))
    fit.save(str(tmp_path / "f.nc"))
    back = bl.load_fit(str(tmp_path / "f.nc"))
    assert (back.log_evidence, back.log_evidence_err, back.flags) == (-17.9, 0.12, ("x",))


def test_load_rejects_other_files(tmp_path):
    xr.Dataset({"a": ("x", np.arange(3))}).to_netcdf(tmp_path / "other.nc", engine="h5netcdf")
    with pytest.raises(ValueError, match="not a bayeslik Fit"):
        bl.load_fit(str(tmp_path / "other.nc"))


def test_text_and_html(small_fit):
    text = repr(small_fit)
    assert "engine           nuts" in text and "2 chains x 100" in text and "x[0]" in text
    html = small_fit._repr_html_()
    assert "<table" in html and "nuts" in html
    table = bl.summary(small_fit)
    assert "ess_bulk" in table.columns and len(table) == 6


def test_pointwise_loglik_with_fewer_axes_than_the_data():
    """One log-likelihood per sequence of a (B, T, D) observation: the data keeps its axes, the
    log-likelihood its batch axis, and they share that axis's name."""
    import numpyro
    import numpyro.distributions as dist

    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0, 1))
        with numpyro.plate("seq", y.shape[0]):
            numpyro.sample("y", dist.Normal(mu, 1).expand(y.shape[1:]).to_event(2), obs=y)

    post = bl.Posterior(model, y=np.zeros((5, 7, 2)))
    fit = bl.fit(post, "nuts", num_warmup=20, num_samples=10, num_chains=1, progress_bar=False)
    assert fit.idata["observed_data"]["y"].dims == ("seq", "y_dim_1", "y_dim_2")
    assert fit.idata["log_likelihood"]["y"].dims == ("chain", "draw", "seq")
