"""The "nss" engine (blackjax nested slice sampling): evidence bookkeeping against exact
integrals, exactness on the suite, honesty of its logZ error over repeated runs, input checks.
The checks are tests/harness.py's (nested samplers' weighted moments, logZ within
max(K err, LOGZ_FLOOR)); the ones every engine shares are in test_contract.py."""

from __future__ import annotations

import math

import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import bayeslik as bl
from bayeslik.engines import nss
from bayeslik.engines.nss import DeadPoints, NSSConfig
from bayeslik.errors import EngineError, ImproperPriorError
from bayeslik.models import nested_suite, reference
from tests.harness import (LOGZ_FLOOR, K, check_evidence, check_moments, check_nested_fit,
                           check_shell_balance, folded_reference)


# ----------------------------------------------------------------------------- bookkeeping
def test_num_live_of_a_plain_run():
    """n live points, one death at a time, then the final live points: n, ..., n, n-1, ..., 1."""
    n, steps = 5, 7
    logl = np.arange(steps + n, dtype=float)  # deaths in order, then the final live points
    birth = np.concatenate([np.full(n, np.nan), np.arange(steps, dtype=float)])
    # the point that dies at step i was born at the contour of an earlier death (or the prior)
    birth = np.full(steps + n, np.nan)
    birth[n:] = np.arange(steps)  # replacements born at the contours of deaths 0..steps-1
    order = np.argsort(logl)
    got = nss._num_live(logl[order], birth[order])
    np.testing.assert_array_equal(got, [n] * steps + list(range(n, 0, -1)))


def _synthetic_run(rng, n, logl_of_logx, depth=40.0, k=1):
    """A perfect nested sampling run in volume space: n live points, k deleted at a time; dead
    point volumes shrink by order statistics of uniforms (as a run with exact sampling)."""
    logx_live = np.log(rng.random(n))
    births = np.full(n, np.nan)
    out_x, out_birth = [], []
    while True:
        order = np.argsort(logx_live)[::-1]  # largest volume = lowest likelihood
        dead = order[:k]
        out_x.extend(logx_live[dead])
        out_birth.extend(births[dead])
        contour = logx_live[dead].min()
        if contour < -depth:
            break
        # replacements uniform in volume below the contour
        logx_live[dead] = contour + np.log(rng.random(k))
        births[dead] = logl_of_logx(contour)
    rest = np.setdiff1d(np.arange(n), np.argsort(logx_live)[::-1][:k])
    out_x.extend(logx_live[rest])
    out_birth.extend(births[rest])
    x = np.array(out_x)
    return DeadPoints(np.zeros((len(x), 1)), logl_of_logx(x), np.array(out_birth))


@pytest.mark.parametrize("k", [1, 10])
def test_evidence_of_a_synthetic_run(seed, k):
    """L(X) = exp(-X / eps) / eps on X in (0, 1): Z = 1 - exp(-1/eps). The engine's volume
    simulation recovers it within 4 of its own errors, also when deleting k points at once."""
    rng = np.random.default_rng(seed)
    eps = 1e-3
    logl_of_logx = lambda lx: -np.exp(lx) / eps - math.log(eps)  # noqa: E731
    dead = _synthetic_run(rng, 200, logl_of_logx, depth=25.0, k=k)
    ev = nss.evidence(np.random.default_rng(seed + 1), dead, 200)
    truth = math.log1p(-math.exp(-1 / eps))
    # error ~ sqrt(H / n), H = log(1/eps) - 1 ~ 5.9 nats
    assert 0.5 * math.sqrt(5.9 / 200) < ev["logzerr"] < 2 * math.sqrt(5.9 / 200)
    assert abs(ev["logz"] - truth) < K * ev["logzerr"]
    assert abs(np.logaddexp.reduce(ev["log_weight"])) < 1e-9


# ----------------------------------------------------------------------------- options and input
@pytest.mark.parametrize("options, name", [
    ({"num_live": 100, "num_delete": 100}, "num_delete"),
    ({"num_inner_steps": 0}, "num_inner_steps"),
    ({"dlogz": 0.0}, "dlogz"),
    ({"num_volume_samples": 1}, "num_volume_samples"),
    ({"max_iterations": -3}, "max_iterations"),
])
def test_bad_options_rejected(options, name):
    with pytest.raises(EngineError, match=name):
        NSSConfig(**options)


def _improper_model():
    x = numpyro.sample("x", dist.ImproperUniform(dist.constraints.real, (), ()))
    numpyro.factor("f", -x**2)


def test_improper_prior_rejected_before_compile(no_jit):
    with pytest.raises(ImproperPriorError, match="'x'|x"):
        bl.fit(bl.Posterior(_improper_model), "nss", progress_bar=False)


def test_too_few_live_points_rejected_before_compile(no_jit):
    post = nested_suite.get("loggamma_10d").posterior()
    with pytest.raises(EngineError, match="num_live=10"):
        bl.fit(post, "nss", num_live=10, progress_bar=False)


# ----------------------------------------------------------------------------- exactness
@pytest.fixture(scope="module")
def shells():
    prob = nested_suite.get("gaussian_shells_2d")
    return prob, prob.posterior()


CFG = dict(num_live=300, progress_bar=False)


def test_shells_2d(shells, seed):
    prob, post = shells
    fit = bl.fit(post, "nss", seed=seed, **CFG)
    check_nested_fit(fit, post, "nss")
    check_evidence(fit, prob.log_evidence, floor=LOGZ_FLOOR)
    check_moments(fit, **folded_reference("gaussian_shells_2d"), weighted=True)
    check_shell_balance(fit)
    assert not fit.flags
    # likelihood calls: the initial live points plus >= 2 per slice move per new point
    extra = fit.cost.extra
    new_points = extra["num_steps"] * extra["num_delete"]
    assert fit.cost.num_loglik_evals >= 300 + 2 * extra["num_inner_steps"] * new_points


def test_logz_error_is_honest(shells, seed):
    """Over 12 seeds, the spread of logZ agrees with the reported error and the mean with the
    truth (compiled once: each run takes well under a second)."""
    prob, post = shells
    fits = [bl.fit(post, "nss", seed=seed + 100 + i, **CFG) for i in range(12)]
    logz = np.array([f.log_evidence for f in fits])
    err = np.mean([f.log_evidence_err for f in fits])
    # the sample sd of 12 normals is within a factor (0.5, 1.6) of the truth with prob > 0.99
    assert 0.5 * err < logz.std(ddof=1) < 1.6 * err, (logz, err)
    assert abs(logz.mean() - prob.log_evidence) < K * err / math.sqrt(len(logz))


@pytest.mark.slow
def test_normal_inverse_gamma(seed):
    """A prior with a conditional scale (mu | sigma2): nss needs no unit-cube transform."""
    prob = reference.get("normal_inverse_gamma")
    post = prob.posterior()
    fit = bl.fit(post, "nss", seed=seed, **CFG)
    check_evidence(fit, prob.log_evidence, floor=LOGZ_FLOOR)
    for site in ("mu", "sigma2"):
        check_moments(fit, prob.posterior_mean[site], prob.posterior_sd[site], site=site,
                      weighted=True)


def test_max_iterations_flagged(shells, seed):
    fit = bl.fit(shells[1], "nss", seed=seed, max_iterations=3, **CFG)  # stops after 1 chunk
    assert any("max_iterations" in f for f in fit.flags)


# ----------------------------------------------------------------------------- the suite (slow)
SUITE_SETTINGS = {
    "gaussian_shells_2d": dict(num_live=500),
    # thin shells: slice chains must be long to go round them (15 steps left clumps)
    "gaussian_shells_5d": dict(num_live=1000, num_inner_steps=40),
    "eggbox": dict(num_live=1000),
    "loggamma_2d": dict(num_live=500),
    "loggamma_10d": dict(num_live=1000),
    "correlated_gaussian_3d": dict(num_live=500),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", nested_suite.names())
def test_suite(name, seed):
    prob = nested_suite.get(name)
    post = prob.posterior()
    fit = bl.fit(post, "nss", seed=seed, progress_bar=False, **SUITE_SETTINGS[name])
    check_evidence(fit, prob.log_evidence, floor=LOGZ_FLOOR)
    check_moments(fit, **folded_reference(name), weighted=True)
    if name.startswith("gaussian_shells"):
        check_shell_balance(fit)


@pytest.mark.slow
def test_normal_mean(seed):
    prob = reference.get("normal_mean")
    fit = bl.fit(prob.posterior(), "nss", seed=seed, num_live=500, progress_bar=False)
    check_evidence(fit, prob.log_evidence, floor=LOGZ_FLOOR)
    check_moments(fit, prob.posterior_mean["mu"], prob.posterior_sd["mu"], site="mu", weighted=True)
