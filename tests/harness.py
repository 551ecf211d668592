"""Shared checks and settings for every engine's tests.

``K`` standard errors is the tolerance everywhere. ``check_moments`` compares posterior means
and standard deviations with the truth, within K Monte Carlo standard errors (ArviZ's
``mcse`` of the draws, combined in quadrature with a reference's own MCSE where given);
``check_evidence`` compares log Z with the truth within K ``fit.log_evidence_err``.
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

import arviz_stats as azs
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

import bayeslik as bl

K = 4.0  # standard errors

#: the engine docs/engines/writing.md writes from scratch; the contract suite runs it too
EXAMPLE_ENGINE = "rwm"
EXAMPLE_PAGE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "engines" / "writing.md"

SMALL: dict[str, dict] = {
    "nuts": dict(num_warmup=200, num_samples=200, num_chains=2),
    "smc": dict(num_particles=300),
    "nested": dict(num_live=100),
    "nss": dict(num_live=100),
    "nested+surrogate": dict(num_live=100, search=False, num_members=2, train_steps=300,
                             guard_num_points=50),
    "pmmh": dict(num_warmup=100, num_samples=100, num_chains=2, num_particles=50),
    EXAMPLE_ENGINE: dict(num_warmup=500, num_samples=1000, num_chains=2),
}


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


def check_moments(fit, mean, sd, site: str = "x", k: float = K, mean_mcse=None, sd_mcse=None):
    """Posterior mean and sd of ``site`` within k MCSE of the truth (``mean``, ``sd``). The MCSE
    of the mean and of the sd come from ArviZ (``arviz_stats.mcse``) on the draws (a chain, or a
    weighted engine's equal-weight draws); a reference's own MCSE (``mean_mcse``/``sd_mcse``,
    for references known from draws) is added in quadrature."""
    x = _draws(fit, site)
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


def check_evidence(fit, log_z: float, k: float = K) -> None:
    """log Z within k ``fit.log_evidence_err`` of the exact ``log_z``."""
    err = fit.log_evidence_err
    assert fit.log_evidence is not None and err is not None and err > 0, (fit.log_evidence, err)
    assert abs(fit.log_evidence - log_z) < k * err, (
        f"logZ {fit.log_evidence:.3f} +- {err:.3f} vs exact {log_z:.3f}")


def _lg_prior():
    numpyro.sample("phi", dist.Uniform(-1.0, 1.0))


def _lg_params(v):
    return {"m0": jnp.zeros(1), "P0": jnp.eye(1), "F": v["phi"] * jnp.eye(1),
            "Q": 0.5 * jnp.eye(1), "H": jnp.eye(1), "R": 0.5 * jnp.eye(1)}


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
