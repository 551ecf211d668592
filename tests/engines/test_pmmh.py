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


# ------------------------------------------------------- non-finite filter densities (issue 19)
def _scale_obs(p, x, y, t):
    """y_t ~ N(x_t, s^2) with s = a + x_t (raw = 1: NaN where a + x_t < 0, the log of a
    negative scale) or |a + x_t| + 1 (raw = 0: finite everywhere); raw rides in ys, so both
    cases share one compile."""
    raw = y["raw"]
    s = raw * (p["a"] + x) + (1 - raw) * (jnp.abs(p["a"] + x) + 1.0)
    return -0.5 * ((y["y"] - x) / s) ** 2 - jnp.log(s) - 0.5 * jnp.log(2 * jnp.pi)


SCALE_SSM = pf.reparametrised_ssm(lambda p, e: e, lambda p, x, e, t: 0.5 * x + e, _scale_obs)
#: tiny runs: 2 chains x (4 starting candidates + 10 warmup + 10 kept) = 48 filters of 8 x 8
SCALE_RUN = dict(num_warmup=10, num_samples=10, num_chains=2, num_particles=8, num_init_tries=4,
                 num_variance_checks=0, chunk_size=10, progress_bar=False)
SCALE_T = 8


def _scale_prior():
    # a + x_t < 0 for a fifth of the particles at a = 1 (x_t has sd 1.15): most filters meet one
    numpyro.sample("a", dist.Normal(1.0, 0.5))


def _scale_posterior(raw: float, dtype=np.float32):
    y = np.random.default_rng(SEED).normal(size=SCALE_T).astype(dtype)
    return pmmh.StateSpacePosterior(_scale_prior, SCALE_SSM,
                                    {"y": y, "raw": np.full(SCALE_T, raw, dtype)})


@pytest.fixture(scope="module")
def scale_fits():
    """{"nan": (fit, its FitWarnings), "clean": ...}: the NaN case first (it compiles)."""
    import warnings

    from bayeslik.convergence import FitWarning

    out = {}
    for case, raw in (("nan", 1.0), ("clean", 0.0)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit = bl.fit(_scale_posterior(raw), "pmmh", seed=SEED, **SCALE_RUN)
        out[case] = fit, [str(w.message) for w in caught if issubclass(w.category, FitWarning)]
    return out


def _nonfinite_flag(flags) -> list[str]:
    return [f for f in flags if "NaN or +inf" in f]


def test_pmmh_counts_filters_that_met_nan_observation_densities(scale_fits):
    fit, warned = scale_fits["nan"]
    extra = fit.cost.extra
    num, dens = extra["num_nonfinite_loglikelihood"], extra["num_nonfinite_particle_densities"]
    assert extra["num_loglikelihood_checked"] == extra["num_logprior_checked"] == 48
    # a filter counts once however many of its 8 x 8 particle log weights were NaN
    assert 0 < num <= 48 and num <= dens <= num * 8 * SCALE_T, (num, dens)
    assert extra["num_nonfinite_logprior"] == 0 and extra["num_nonfinite"] == num
    (flag,) = _nonfinite_flag(fit.flags)
    assert flag.startswith(
        f"{num} of 48 log-likelihood evaluations were NaN or +inf (the state-space model's "
        "observation log density (observation_logdensity_fn) in the particle filter: "
        f"{dens} particle log weights were NaN or +inf in all, each given zero weight; one "
        "filter with them ran at a="), flag
    assert extra["nonfinite_where"] in flag
    assert any(w.endswith(flag) for w in warned), warned  # bl.fit's FitWarning


def test_pmmh_clean_state_space_model_counts_nothing(scale_fits):
    fit, warned = scale_fits["clean"]
    extra = fit.cost.extra
    assert fit.cost.compile_s == 0.0  # the NaN case's programs (raw is data)
    assert extra["num_loglikelihood_checked"] == 48
    assert extra["num_nonfinite"] == extra["num_nonfinite_loglikelihood"] == 0
    assert extra["num_nonfinite_particle_densities"] == 0 and "nonfinite_where" not in extra
    assert not _nonfinite_flag(fit.flags) and not _nonfinite_flag(warned)


def test_pmmh_nonfinite_counts_from_proposals_and_candidates(no_jit):
    """The host-side bookkeeping on hand-made batches (nothing compiled): an evaluation counts
    when its estimate is NaN / +inf or its filter met non-finite particle densities, only where
    the log prior is finite; the first such proposal's position is where the flag says."""
    counts: dict = {}
    z = np.array([[[0.5], [0.25]], [[0.75], [1.5]]], np.float32)  # (chains, iterations, d)
    ll = np.array([[-3.0, -np.inf], [np.nan, -2.0]])
    lp = np.array([[-1.0, -1.0], [-1.0, np.nan]])
    num_bad = np.array([[0, 7], [0, 5]])  # the last is where the prior is NaN: no filter ran
    pmmh._count_nonfinite(counts, ll, lp, z, num_bad)
    assert (counts["loglikelihood"], counts["logprior"], counts["checked"]) == (2, 1, 4)
    assert counts["particle_densities"] == 7
    assert counts["density_point"].tolist() == [0.25] and counts["point"].tolist() == [0.75]
    pmmh._count_nonfinite(counts, np.array([-1.0, -1.0]), np.array([-1.0, -1.0]),
                          np.array([[2.0], [3.0]]), np.array([0, 4]))  # candidates, later
    assert counts["loglikelihood"] == 3 and counts["particle_densities"] == 11
    assert counts["density_point"].tolist() == [0.25]  # the first one kept


def test_pmmh_nonfinite_flag_names_the_filters_densities():
    post = _scale_posterior(1.0)
    from bayeslik.engines import kit

    run = kit.Run("pmmh", post, pmmh.PMMHConfig(method="guided"))
    counts = {"loglikelihood": 3, "logprior": 0, "checked": 10, "particle_densities": 11,
              "density_point": np.array([0.25], np.float32)}
    extra = pmmh._nonfinite_extra(run, counts)
    assert extra["num_nonfinite"] == 3 and extra["num_nonfinite_particle_densities"] == 11
    (flag,) = run.flags
    # a is Normal(1, 0.5) on the real line: the unconstrained point is the value
    assert flag.startswith(
        "3 of 10 log-likelihood evaluations were NaN or +inf (the state-space model's "
        "observation, transition or proposal log density in the particle filter: 11 particle "
        "log weights were NaN or +inf in all, each given zero weight; one filter with them ran "
        "at a=0.25); the engine treated them as zero density"), flag


@pytest.mark.slow
def test_pmmh_counts_nan_observation_densities_in_float64(x64):
    """The NaN case in float64 (its own compile: slow)."""
    from bayeslik.convergence import FitWarning

    with pytest.warns(FitWarning, match=r"log-likelihood evaluations were NaN or \+inf \(the "
                                        "state-space model's observation log density"):
        fit = bl.fit(_scale_posterior(1.0, np.float64), "pmmh", seed=SEED, **SCALE_RUN)
    assert fit.idata["posterior"]["a"].dtype == np.float64
    extra = fit.cost.extra
    assert 0 < extra["num_nonfinite_loglikelihood"] <= extra["num_nonfinite_particle_densities"]
    assert extra["num_loglikelihood_checked"] == 48
