"""The "pmmh" engine: its posterior against exact answers (a linear Gaussian model whose
likelihood the Kalman filter gives exactly) and against NUTS on the AR-HMM with the states
marginalised; its Fit; its errors. The linear Gaussian problem is tests/harness.py's; the checks
every engine shares (compile once, progress bar, Ctrl-C, save/load, schema, the wrong posterior
kind) are in test_contract.py."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import bayeslik as bl
from bayeslik.engines import pmmh
from bayeslik.errors import EngineError, ModelError
from bayeslik.filtering import kalman
from bayeslik.filtering import particle as pf
from tests.harness import (K, check_moments, linear_gaussian_params, linear_gaussian_prior,
                           linear_gaussian_problem)

#: BAYESLIK_TEST_SEED (see tests/conftest.py) shifts every key of this file
SEED = int(os.environ.get("BAYESLIK_TEST_SEED", "0"))


def _key(i: int) -> jax.Array:
    return jax.random.key(i + SEED)


T = 50


def _lg_posterior(ys, ssm=None):
    """A StateSpacePosterior of the harness's linear Gaussian model on data ``ys``."""
    ssm = pf.linear_gaussian_ssm(1) if ssm is None else ssm
    return pmmh.StateSpacePosterior(linear_gaussian_prior, ssm, ys, params_fn=linear_gaussian_params)


@pytest.fixture(scope="module")
def lg_post():
    """The harness's linear Gaussian problem (phi = 0.7), T steps simulated from key 3 + SEED."""
    return linear_gaussian_problem(T=T, phi=0.7, seed=3 + SEED)[0]


@pytest.fixture(scope="module")
def lg_exact(lg_post):
    """Posterior mean and sd of phi by quadrature of prior x Kalman likelihood (float64 sums)."""
    grid = np.linspace(-0.9995, 0.9995, 4001)
    def loglik(f):
        return kalman._filter(linear_gaussian_params({"phi": f}), lg_post.ys).log_likelihood

    ll = np.asarray(jax.vmap(loglik)(jnp.asarray(grid, jnp.float32)), np.float64)
    w = np.exp(ll - ll.max())
    w /= w.sum()
    m = (w * grid).sum()
    return m, np.sqrt((w * (grid - m) ** 2).sum())


@pytest.fixture(scope="module")
def lg_fit(lg_post):
    return bl.fit(lg_post, "pmmh", seed=1 + SEED, num_warmup=500, num_samples=1000,
                  num_chains=4, num_particles=100, progress_bar=False)


def test_pmmh_matches_the_exact_posterior(lg_fit, lg_exact):
    import arviz as az

    m, sd = lg_exact
    d = lg_fit.draws("phi")
    s = az.summary(lg_fit.idata, var_names=["phi"])
    ess = float(s.loc["phi", "ess_bulk"])
    # the MCSE below is trustworthy from a bulk ESS of about 100 (Vehtari et al. 2021); this
    # chain makes ~150-350 from 4000 draws (pseudo-marginal noise, sd of log p-hat ~ 1)
    assert ess > 100 and float(s.loc["phi", "r_hat"]) < 1.05, s
    # mean and sd within K of ArviZ's MCSE
    check_moments(lg_fit, m, sd, site="phi")
    # and the sd as that of a sample of ESS draws: relative standard error ~ 1/sqrt(2 ESS)
    assert abs(d.std() - sd) < K * sd / np.sqrt(2 * ess), (d.std(), sd, ess)


def test_pmmh_fit_contents(lg_fit, lg_post):
    fit = lg_fit
    ss = fit.idata["sample_stats"]
    for name in ("acceptance_rate", "accepted", "lp", "loglikelihood_estimate"):
        assert ss[name].shape == (4, 1000), name
    acc = float(ss["accepted"].mean())
    assert 0.1 <= acc <= 0.35, acc  # the adaptation's target is 0.2
    # num_loglik_evals counts particle filter runs: 4 chains x 1500 iterations + 4 x 20 starting
    # candidates + 80 (one batch) for the spread of the estimate at the posterior mean
    assert fit.cost.num_loglik_evals == 4 * 1500 + 80 + 80
    assert fit.cost.extra["num_particle_steps"] == fit.cost.num_loglik_evals * 100 * T
    assert fit.cost.extra["loglikelihood_sd_at_posterior_mean"] > 0
    assert np.allclose(fit.idata["observed_data"]["y"].values, np.asarray(lg_post.ys))


def test_pmmh_flags_low_acceptance(lg_post, lg_fit):
    # no warmup and a proposal 100 times too wide: almost nothing is accepted, and the Fit says
    # so (same static settings as lg_fit, other numbers of iterations: nothing is compiled)
    fit = bl.fit(lg_post, "pmmh", num_warmup=0, num_samples=100, num_chains=4, num_particles=100,
                 initial_scale=30.0, progress_bar=False)
    assert fit.cost.compile_s == 0.0
    assert float(fit.idata["sample_stats"]["accepted"].mean()) < 0.05
    assert any("low acceptance" in f for f in fit.flags), fit.flags


def test_config_errors_before_compiling(no_jit, lg_post):
    with pytest.raises(EngineError, match=r"PMMH option rho=1.0: must lie in \[0, 1\)"):
        pmmh.PMMHConfig(rho=1.0)
    with pytest.raises(EngineError, match="PMMH option num_particles=0: must be a positive integer"):
        pmmh.PMMHConfig(num_particles=0)
    with pytest.raises(EngineError, match="PMMH option target_accept=1.5"):
        pmmh.PMMHConfig(target_accept=1.5)
    with pytest.raises(EngineError, match="PMMH option resampling='bogus': must be one of"):
        pmmh.PMMHConfig(resampling="bogus")
    # correlated filters need a reparametrised model
    ssm = pf.linear_gaussian_ssm(1)._replace(init_transform_fn=None)
    post = _lg_posterior(np.zeros((5, 1)), ssm)
    with pytest.raises(EngineError, match="correlated=False"):
        bl.fit(post, "pmmh")


def test_state_space_posterior_checks(no_jit):
    def with_obs():
        numpyro.sample("a", dist.Normal(0, 1))
        numpyro.sample("y", dist.Normal(0, 1), obs=1.0)

    with pytest.raises(ModelError, match="observed/factor site"):
        pmmh.StateSpacePosterior(with_obs, pf.linear_gaussian_ssm(1), np.zeros((5, 1)))
    post = _lg_posterior(np.zeros((5, 1)))
    # a sibling of Posterior: the prior half only, no likelihood-side functions at all
    assert not isinstance(post, bl.Posterior)
    for name in ("loglikelihood", "logdensity", "pointwise_loglikelihood", "evaluate", "at"):
        assert not hasattr(post, name), name
    assert np.isfinite(float(post.logprior(jnp.zeros(1))))
    assert post.ndim == 1 and post.num_steps == 5


# ------------------------------------------------------------------------- against NUTS: AR-HMM
@pytest.mark.slow
def test_pmmh_matches_nuts_on_the_arhmm():
    """PMMH on the AR-HMM (K = 2, T = 80) with the state sequence filtered by particles, against
    NUTS on the same model with the states summed out exactly: every posterior mean within K
    combined MCSEs."""
    import arviz as az

    from bayeslik.models import arhmm

    data = arhmm.simulate(_key(0), num_steps=80, num_states=2)
    y = data["y"]

    def prior():
        arhmm.prior(2)

    post_nuts = bl.Posterior(arhmm.model, y=y, num_states=2)
    from bayeslik.models import arhmm_statespace as arhmm_ss

    post_pm = pmmh.StateSpacePosterior(prior, arhmm_ss.arhmm_ssm(), arhmm_ss.arhmm_observations(y))
    init = arhmm.init_params(y, 2)
    fit_n = bl.fit(post_nuts, "nuts", seed=0 + SEED, num_warmup=500, num_samples=1000, num_chains=4,
                   init=init, progress_bar=False)
    fit_p = bl.fit(post_pm, "pmmh", seed=0 + SEED, num_warmup=2000, num_samples=6000, num_chains=4,
                   num_particles=50, method="auxiliary", init=init, progress_bar=False)
    assert not fit_p.flags, fit_p.flags
    for name in ("b0", "A", "sigma", "pi", "trans"):
        sn = az.summary(fit_n.idata, var_names=[name])
        sp = az.summary(fit_p.idata, var_names=[name])
        for row in sn.index:
            diff = abs(sn.loc[row, "mean"] - sp.loc[row, "mean"])
            se = np.hypot(sn.loc[row, "mcse_mean"], sp.loc[row, "mcse_mean"])
            assert diff < K * se, (row, sn.loc[row, "mean"], sp.loc[row, "mean"], se)
            assert sp.loc[row, "ess_bulk"] > 100, (row, sp.loc[row, "ess_bulk"])


def test_other_engines_refuse_the_intractable_likelihood(no_jit):
    """Every engine but pmmh refuses a StateSpacePosterior at bl.fit, and pmmh refuses a
    Posterior: an EngineError naming the kinds, before anything is compiled (no_jit)."""
    post = _lg_posterior(np.zeros((5, 1)))
    from bayeslik.api import engine_spec

    names = [n for n in bl.engines.available() if n in bl.engines.__all__ and n != "pmmh"]
    assert {"nuts", "nested", "smc"} <= set(names), names
    for name in names:
        assert bl.StateSpacePosterior not in engine_spec(name).accepts, name
        with pytest.raises(EngineError, match="StateSpacePosterior.*pmmh"):
            bl.fit(post, name)
    assert engine_spec("pmmh").accepts == (bl.StateSpacePosterior,)

    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0, 1))
        numpyro.sample("y", dist.Normal(mu, 1), obs=y)

    with pytest.raises(EngineError, match="runs on a StateSpacePosterior, not a Posterior"):
        bl.fit(bl.Posterior(model, y=np.zeros(3)), "pmmh")


def test_statespace_posterior_is_importable_from_everywhere():
    from bayeslik.engines.pmmh import StateSpacePosterior as a
    from bayeslik.statespace import StateSpacePosterior as b

    assert a is b is bl.StateSpacePosterior is bl.engines.StateSpacePosterior
