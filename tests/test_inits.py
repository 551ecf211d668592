"""Engine starting points: partial init dicts (Stan's rule: left-out sites start uniform) and
NumPyro's init strategies, for NUTS."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import init_to_median, init_to_value

import bayeslik as bl
from bayeslik.inits import start_candidates


def model(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    sigma = numpyro.sample("sigma", dist.LogNormal(0.0, 1.0))
    with numpyro.plate("obs", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, sigma), obs=y)


@pytest.fixture(scope="module")
def post():
    return bl.Posterior(model, y=jnp.array([0.5, 1.5, 1.0, 2.0]))


def _columns(post):
    idx = post.unflatten(jnp.arange(post.ndim, dtype=jnp.float32))
    return {k: int(np.asarray(v).ravel()[0]) for k, v in idx.items()}


def test_partial_dict_jitters_given_sites_and_draws_the_rest_uniformly(post):
    col = _columns(post)
    cand = start_candidates(post, jax.random.key(0), 4, {"mu": 5.0}, 2.0, 100)
    assert cand.shape == (4, 100, post.ndim)
    mu = cand[..., col["mu"]]
    assert np.all(np.abs(mu - 5.0) <= 2.0 / 20 + 1e-6)  # mu is unconstrained as itself
    log_sigma = cand[..., col["sigma"]]
    assert np.all(np.abs(log_sigma) <= 2.0) and log_sigma.std() > 0.9  # uniform on [-2, 2]
    # a whole dict is unchanged: jittered around the point in every coordinate
    whole = start_candidates(post, jax.random.key(0), 4, {"mu": 5.0, "sigma": 1.0}, 2.0, 100)
    assert np.all(np.abs(whole[..., col["sigma"]]) <= 0.1 + 1e-6)


def test_numpyro_strategies_give_candidates(post):
    col = _columns(post)
    cand = start_candidates(post, jax.random.key(1), 2, init_to_value(values={"mu": 3.0}), 2.0, 5)
    np.testing.assert_allclose(cand[..., col["mu"]], 3.0, rtol=1e-6)  # the given value
    assert np.ptp(cand[..., col["sigma"]]) > 0  # the rest from init_to_uniform, per key
    med = start_candidates(post, jax.random.key(2), 2, init_to_median(num_samples=101), 2.0, 5)
    assert np.all(np.abs(med[..., col["mu"]]) < 3.0)  # prior median of N(0, 10) is 0 (+- sd)
    assert np.all(np.abs(med[..., col["sigma"]]) < 0.5)  # median of LogNormal(0, 1) is e^0


@pytest.mark.filterwarnings("ignore:.*ESS:bayeslik.convergence.FitWarning")  # a tiny run
def test_nuts_runs_from_a_strategy_and_refuses_bad_inits(post):
    opts = dict(num_warmup=60, num_samples=60, num_chains=2, progress_bar=False)
    fit = bl.fit(post, bl.engines.NUTS(init=init_to_median(), **opts), seed=0)
    assert abs(float(fit.posterior["mu"].mean()) - 1.25) < 1.5
    assert "init_to_median" in repr(fit.config["init"])  # the strategy is recorded
    with pytest.raises(bl.EngineError, match="init"):
        bl.engines.NUTS(init=dict)  # a class, not a strategy
    with pytest.raises(bl.EngineError, match="init"):
        bl.engines.NUTS(init=3)
    with pytest.raises(bl.EngineError, match="not a latent site"):
        bl.fit(post, bl.engines.NUTS(init={"nu": 1.0}, **opts), seed=0)
