"""Shared checks and settings for every engine's tests.

``K`` standard errors is the tolerance everywhere. ``check_moments`` compares posterior means
and standard deviations with the truth, within K Monte Carlo standard errors (ArviZ's
``mcse`` of the draws, combined in quadrature with a reference's own MCSE where given);
``check_evidence`` compares log Z with the truth within K ``fit.log_evidence_err`` (at least
``floor``). Nested samplers' moments are checked on their weighted dead points
(``check_moments(..., weighted=True)``, standard errors from the weights' Kish ESS), multimodal
problems on folded coordinates (``folded_reference``); ``check_nested_fit`` and
``check_shell_balance`` are the nested engines' own Fit checks.
``SMALL[engine]`` holds the cheapest options that still give a meaningful answer on a 1-3-D
problem; ``linear_gaussian_problem`` builds a tiny StateSpacePosterior whose exact
log-likelihood is the Kalman filter's.
"""

from __future__ import annotations

import contextlib
import pathlib
import re
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

import bayeslik as bl

K = 4.0  # standard errors

#: nats: the smallest logZ tolerance of the nested-sampling tests, |logZ - truth| <
#: max(K err, LOGZ_FLOOR) as the nested engine's issue asked
LOGZ_FLOOR = 0.2

#: the engine docs/engines/writing.md writes from scratch; the contract suite runs it too
EXAMPLE_ENGINE = "rwm"
EXAMPLE_PAGE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "engines" / "writing.md"

SMALL: dict[str, dict] = {
    "nuts": dict(num_warmup=200, num_samples=200, num_chains=2),
    "smc": dict(num_particles=300),
    "nested": dict(num_live=100),
    "nss": dict(num_live=100),
    # the accuracy rule, inline: the test likelihoods are cheap, so the cost rule (the default)
    # would never train, and the contract and float64 checks would not see the networks
    "nested+surrogate": dict(num_live=100, search=False, num_members=2, train_steps=300,
                             guard_num_points=50, switch="accuracy", background=False),
    "pmmh": dict(num_warmup=100, num_samples=100, num_chains=2, num_particles=50),
    # a 600-simulation, 2-round run with a small flow (tests/engines/test_snl.py shares it)
    "snl": dict(num_simulations=600, num_rounds=2, flow_layers=2, nn_width=32, knots=6,
                num_predictive=200,
                sampler_options={"num_chains": 2, "num_warmup": 200, "num_samples": 500}),
    EXAMPLE_ENGINE: dict(num_warmup=500, num_samples=1000, num_chains=2),
}


#: the linear Gaussian simulator of the SNL tests: theta ~ N(0, 0.1 I_2), x ~ N(theta, 0.1 I_2)
SIM_DIM, SIM_TAU2, SIM_SIG2 = 2, 0.1, 0.1
SIM_OBS = np.array([0.3, -0.2])


def sim_prior():
    numpyro.sample("theta", dist.Normal(jnp.zeros(SIM_DIM), jnp.sqrt(SIM_TAU2)).to_event(1))


def sim_simulator(key, p):
    return p["theta"] + jnp.sqrt(SIM_SIG2) * jax.random.normal(key, (SIM_DIM,))


def simulator_problem(observed=SIM_OBS):
    """The SimulatorPosterior of the linear Gaussian simulator (module-level functions, so
    every test that builds it shares the compiled programs)."""
    return bl.SimulatorPosterior(sim_prior, sim_simulator, np.asarray(observed))


def example_engine_source() -> str:
    """The first python block of docs/engines/writing.md: a whole engine."""
    return re.findall(r"```python\n(.*?)```", EXAMPLE_PAGE.read_text(), flags=re.S)[0]


@contextlib.contextmanager
def example_engine():
    """Execute the docs page's engine as a module and register it as ``EXAMPLE_ENGINE`` for the
    duration (unregistered after); yields the module."""
    from bayeslik.api import unregister_engine

    mod = types.ModuleType("rwm_example")
    sys.modules[mod.__name__] = mod  # dataclasses look their module up
    exec(compile(example_engine_source(), str(EXAMPLE_PAGE), "exec"), mod.__dict__)
    bl.register_engine(EXAMPLE_ENGINE, mod.RWMConfig, mod.run, "Random-walk Metropolis (docs example)")
    try:
        yield mod
    finally:
        unregister_engine(EXAMPLE_ENGINE)
        del sys.modules[mod.__name__]


def small(engine: str) -> dict:
    """SMALL[engine], or a failure telling the engine's author to add it."""
    if engine not in SMALL:
        raise AssertionError(f"engine {engine!r} has no entry in tests/harness.py SMALL: add the "
                             "cheapest options that still give a meaningful answer on a 1-3-D problem")
    return dict(SMALL[engine])


def _draws(fit, site):
    """(chain, draw, k) draws of a site: the chains, or a weighted engine's equal-weight draws."""
    x = np.asarray(fit.idata["posterior"][site].values, np.float64)
    return x.reshape(x.shape[0], x.shape[1], -1)


def check_moments(fit, mean, sd, site: str = "x", k: float = K, mean_mcse=None, sd_mcse=None,
                  *, fold=None, weighted: bool = False):
    """Posterior mean and sd of ``site`` within k MCSE of the truth (``mean``, ``sd``). The MCSE
    of the mean and of the sd come from ArviZ (``arviz_stats.mcse``) on the draws (a chain, or a
    weighted engine's equal-weight draws); a reference's own MCSE (``mean_mcse``/``sd_mcse``,
    for references known from draws) is added in quadrature. ``fold`` maps draws (n, k) to the
    coordinates checked (``folded_reference``). ``weighted=True`` checks a nested sampler's
    weighted dead points instead (``check_weighted_moments``)."""
    if weighted:
        if mean_mcse is not None or sd_mcse is not None:
            raise TypeError("check_moments(weighted=True) takes no reference MCSE")
        check_weighted_moments(fit, mean, sd, site=site, k=k, fold=fold)
        return
    import arviz_stats as azs  # here: 0.4 s to import, and only this check needs it

    x = _draws(fit, site)
    if fold is not None:
        x = np.asarray(fold(x.reshape(-1, x.shape[-1])), np.float64).reshape(*x.shape[:2], -1)
    mean, sd = np.ravel(mean), np.ravel(sd)
    for j in range(x.shape[-1]):
        xj = x[..., j]
        se_m = float(azs.mcse(xj, method="mean"))
        se_s = float(azs.mcse(xj, method="sd"))
        if mean_mcse is not None:
            se_m = np.hypot(se_m, np.ravel(mean_mcse)[j])
        if sd_mcse is not None:
            se_s = np.hypot(se_s, np.ravel(sd_mcse)[j])
        m, s = xj.mean(), xj.std()
        assert abs(m - mean[j]) < k * se_m, f"{site}[{j}] mean {m:.4f} vs {mean[j]:.4f} (mcse {se_m:.4f})"
        assert abs(s - sd[j]) < k * se_s, f"{site}[{j}] sd {s:.4f} vs {sd[j]:.4f} (mcse {se_s:.4f})"


def weighted_moments(fit, site: str = "x", fold=None):
    """(mean, sd, 4th central moment, Kish ESS) of a site (folded by ``fold``) from a nested
    sampler's weighted dead points (the Fit's ``nested_samples`` group)."""
    g = fit.idata["nested_samples"]
    lw = np.asarray(g["log_weight"].values[0], np.float64)
    w = np.exp(lw - lw.max())
    w /= w.sum()
    x = np.asarray(g[site].values[0], np.float64).reshape(len(w), -1)
    if fold is not None:
        x = fold(x)
    mean = w @ x
    var = w @ (x - mean) ** 2
    m4 = w @ (x - mean) ** 4
    ess = 1.0 / np.sum(w**2)
    return mean, np.sqrt(var), m4, ess


def check_weighted_moments(fit, mean, sd, site: str = "x", k: float = K, fold=None) -> None:
    """A nested sampler's moments: the weighted dead points' mean within k sd/sqrt(ESS) and
    variance within k sqrt((m4 - var^2)/ESS) (the delta-method standard error of a variance),
    ESS the weights' Kish effective sample size; the equal-weight draws' mean too, with the
    resampling's extra variance.

    These standard errors hold within a mode only: between modes, nested sampling's weights
    fluctuate by about the logZ error, far more than 1/sqrt(ESS). Multimodal problems are
    therefore checked on folded coordinates (``folded_reference``)."""
    mean_true = np.ravel(mean)
    sd_true = np.ravel(sd)
    m, s, m4, ess = weighted_moments(fit, site, fold)
    se_mean = sd_true / np.sqrt(ess)
    assert np.all(np.abs(m - mean_true) < k * se_mean), (m, mean_true, se_mean, ess)
    se_var = np.sqrt(np.maximum(m4 - s**4, 1e-30) / ess)
    assert np.all(np.abs(s**2 - sd_true**2) < k * se_var), (s, sd_true, se_var, ess)
    draws = fit.draws(site).reshape(-1, mean_true.size)
    if fold is not None:
        draws = fold(draws)
    se_draws = sd_true * np.sqrt(1.0 / ess + 1.0 / len(draws))
    assert np.all(np.abs(draws.mean(0) - mean_true) < k * se_draws), (draws.mean(0), mean_true)


def folded_reference(name: str) -> dict:
    """``check_moments`` keywords (mean, sd, site, fold) for nested-suite problem ``name``: the
    exact moments of its folded coordinates (``nested_suite.folded_moments``)."""
    from bayeslik.models import nested_suite

    fold, mean, sd = nested_suite.folded_moments(name)
    return dict(mean=mean, sd=sd, site="x", fold=fold)


def check_shell_balance(fit, k: float = K) -> None:
    """Gaussian shells: the two shells hold half the posterior mass each. Each shell's evidence
    is estimated by about half the live points, with log error sigma_k ~ sqrt(2) x the run's
    logZ error sigma, so the weight fraction f = Z_1 / (Z_1 + Z_2) has error f (1 - f)
    sqrt(sigma_1^2 + sigma_2^2) ~ sigma / 2: check |f - 1/2| < k sigma / 2."""
    g = fit.idata["nested_samples"]
    w = np.exp(g["log_weight"].values[0])
    f = float(w[g["x"].values[0][:, 0] > 0].sum())
    assert abs(f - 0.5) < k * fit.log_evidence_err / 2, (f, fit.log_evidence_err)


def check_nested_fit(fit, post, engine: str) -> None:
    """What a nested sampler's Fit holds beyond the common schema: the ``nested_samples`` group
    (normalised log weights, dead points in likelihood order, log volumes, the evidence in its
    attrs), one chain, and a pointwise log-likelihood that sums to each draw's."""
    assert fit.engine == engine
    tree = fit.idata
    for group in ("posterior", "log_likelihood", "nested_samples"):
        assert group in tree.children, group
    g = tree["nested_samples"]
    n = g.sizes["point"]
    for var in ("log_weight", "loglikelihood", "log_volume"):
        assert g[var].dims == ("run", "point") and g[var].shape == (1, n)
    lw = g["log_weight"].values[0]
    assert abs(np.logaddexp.reduce(lw)) < 1e-6  # normalised
    assert np.all(np.diff(g["loglikelihood"].values[0]) >= -1e-6)  # dead points in order
    assert g.attrs["log_evidence"] == fit.log_evidence
    assert tree.attrs["log_evidence"] == fit.log_evidence
    assert fit.num_chains == 1
    for site in post.latent_names:
        assert site in tree["posterior"]
        assert site in g
    # pointwise log-likelihood of the draws sums to their log-likelihood
    ll = sum(np.asarray(v.values).reshape(fit.num_draws, -1).sum(1)
             for v in tree["log_likelihood"].data_vars.values())
    np.testing.assert_allclose(ll, tree["sample_stats"]["loglikelihood"].values[0],
                               rtol=1e-4, atol=1e-3)
    assert fit.cost.num_loglik_evals > 0


def check_evidence(fit, log_z: float, k: float = K, floor: float = 0.0) -> None:
    """log Z within k ``fit.log_evidence_err`` of the exact ``log_z`` (or within ``floor``
    nats, whichever is wider: ``LOGZ_FLOOR`` for the nested samplers)."""
    err = fit.log_evidence_err
    assert fit.log_evidence is not None and err is not None and err > 0, (fit.log_evidence, err)
    tol = max(k * err, floor)
    assert abs(fit.log_evidence - log_z) < tol, (
        f"logZ {fit.log_evidence:.3f} +- {err:.3f} vs exact {log_z:.3f} (tol {tol:.3f})")


def _lg_prior():
    numpyro.sample("phi", dist.Uniform(-1.0, 1.0))


def _lg_params(v):
    return {"m0": jnp.zeros(1), "P0": jnp.eye(1), "F": v["phi"] * jnp.eye(1),
            "Q": 0.5 * jnp.eye(1), "H": jnp.eye(1), "R": 0.5 * jnp.eye(1)}


#: the linear Gaussian problem's prior (phi ~ U(-1, 1)) and params_fn, for tests that build
#: StateSpacePosteriors of their own on it
linear_gaussian_prior = _lg_prior
linear_gaussian_params = _lg_params


def linear_gaussian_problem(T: int = 30, phi: float = 0.7, seed: int = 3):
    """(StateSpacePosterior, exact_loglik) for the 1-D linear Gaussian ssm of
    bayeslik.filtering.particle with phi ~ U(-1, 1); ``exact_loglik(phi)`` is the Kalman
    log-likelihood."""
    from bayeslik.filtering import kalman
    from bayeslik.filtering import particle as pf

    p = _lg_params({"phi": jnp.float32(phi)})
    _, ys = pf.simulate_ssm(jax.random.key(seed), pf.linear_gaussian_ssm(1), p, T,
                            lambda k, q, x, t: x + jnp.sqrt(0.5) * jax.random.normal(k, (1,)))
    ys = np.asarray(ys)
    post = bl.StateSpacePosterior(_lg_prior, pf.linear_gaussian_ssm(1), ys, params_fn=_lg_params)

    def exact_loglik(f):
        return float(kalman._filter(_lg_params({"phi": jnp.float32(f)}), jnp.asarray(ys)).log_likelihood)

    return post, exact_loglik
