"""NUTS with mass_adaptation="fisher_lowrank": nutpie's low-rank-plus-diagonal metric from the
draws and their gradients. The estimate against exact answers (a Gaussian's covariance from its
own draws and gradients), the ring buffer's window against the schedule, and the sampler on a
strongly correlated Gaussian (moments against the exact ones, fewer leapfrog steps than the
diagonal adaptations), float32 and float64."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bayeslik.engines import nuts
from bayeslik.errors import EngineError


def _gaussian(d=8, lo=1e-2, hi=1e2, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return (q * np.geomspace(lo, hi, d)) @ q.T


def _window(cov, n, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, cov.shape[0])) @ np.linalg.cholesky(cov).T + 3.0
    g = -np.linalg.solve(cov, (x - 3.0).T).T
    dtype = jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32
    return jnp.asarray(x, dtype), jnp.asarray(g, dtype)


def _rtol(x):
    # float32: a coordinate of mean 3 and sd 1e-3 keeps ~4 digits of its deviations
    return 1e-3 if x.dtype == jnp.float32 else 1e-9


def test_geometric_mean_solves_m_b_m_equals_a():
    rng = np.random.default_rng(0)
    for d in (1, 3, 7):
        a = rng.normal(size=(d, 2 * d)); a = a @ a.T / d + 0.1 * np.eye(d)
        b = rng.normal(size=(d, 2 * d)); b = b @ b.T / d + 0.1 * np.eye(d)
        m = np.asarray(nuts.spd_geometric_mean(jnp.asarray(a), jnp.asarray(b)))
        np.testing.assert_allclose(m @ b @ m, a, rtol=1e-4, atol=1e-5)
        assert np.all(np.linalg.eigvalsh(m) > 0)


def test_recovers_a_gaussian_covariance_from_its_draws_and_gradients():
    # on a Gaussian g = -Sigma^{-1}(x - mu): the Fisher-optimal metric is Sigma whatever the
    # draws (once they span the space); with every eigenvalue kept it is Sigma up to the
    # regularisation (gamma / eigenvalue of the scaled covariances, ~1e-4 here)
    cov = _gaussian()
    x, g = _window(cov, 64)
    m = nuts.lowrank_inverse_mass(x, g, jnp.ones(64, bool), jnp.eye(8, dtype=x.dtype),
                                  cutoff=1.0 + 1e-9, gamma=1e-7)
    np.testing.assert_allclose(np.asarray(m), cov, atol=2e-3 * np.abs(cov).max())


def test_only_the_valid_rows_count():
    cov = _gaussian(d=5, seed=3)
    x, g = _window(cov, 40)
    junk = jnp.full((20, 5), 1e3)
    xs, gs = jnp.concatenate([x, junk]), jnp.concatenate([g, -junk])
    valid = jnp.arange(60) < 40
    prev = jnp.eye(5, dtype=x.dtype)
    a = nuts.lowrank_inverse_mass(xs, gs, valid, prev, 1.0 + 1e-9, 1e-7)
    b = nuts.lowrank_inverse_mass(x, g, jnp.ones(40, bool), prev, 1.0 + 1e-9, 1e-7)
    # the same numbers up to the working precision's rounding (summation order; eigenvalues of
    # condition number 1e4 in float32)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=_rtol(x), atol=1e-9)


def test_uncorrelated_posterior_gives_the_fisher_diagonal():
    # independent coordinates: every eigenvalue of the scaled metric is near 1, inside the
    # cutoff, so the metric is the Fisher diagonal (sigma^2 exactly on a Gaussian)
    sd = np.array([1e-3, 0.5, 2.0, 40.0])
    cov = np.diag(sd ** 2)
    x, g = _window(cov, 100)
    m = np.asarray(nuts.lowrank_inverse_mass(x, g, jnp.ones(100, bool), jnp.eye(4, dtype=x.dtype)))
    np.testing.assert_allclose(np.diag(m), sd ** 2, rtol=_rtol(x))
    assert np.abs(m - np.diag(np.diag(m))).max() == 0.0


def test_too_few_draws_keep_the_previous_metric_and_skip_the_correction():
    cov = _gaussian(d=4, seed=2)
    x, g = _window(cov, 12)
    prev = 3.0 * jnp.eye(4, dtype=x.dtype)
    two = nuts.lowrank_inverse_mass(x, g, jnp.arange(12) < 2, prev)
    np.testing.assert_array_equal(np.asarray(two), np.asarray(prev))
    few = jnp.arange(12) < nuts.LOW_RANK_MIN_DRAWS - 1
    corr = nuts.lowrank_correction(x, g, few, jnp.ones(4, x.dtype))
    assert np.all(np.asarray(corr) == 0.0)
    bad = x.at[3, 1].set(jnp.nan)
    out = nuts.lowrank_inverse_mass(bad, g, jnp.ones(12, bool), prev)
    assert np.all(np.isfinite(np.asarray(out)))


@pytest.mark.parametrize("num_warmup", [20, 150, 1000, 2345, 10_000])
def test_the_ring_buffer_holds_every_current_window(num_warmup):
    # the current window runs from the last-but-one switch to now; it must fit the buffer
    stage, switch = nuts.fisher_schedule(num_warmup)
    starts, longest = [0, 0], 0
    for t in range(num_warmup):
        if stage[t] in (nuts.SLOW, nuts.RESTART):
            if switch[t]:
                starts = [starts[1], t + 1]
            longest = max(longest, t + 1 - starts[0])
    assert longest <= nuts.LOW_RANK_WINDOW


def test_options_are_checked():
    with pytest.raises(EngineError, match="low_rank_cutoff"):
        nuts.NUTSConfig(mass_adaptation="fisher_lowrank", low_rank_cutoff=1.0)
    with pytest.raises(EngineError, match="low_rank_gamma"):
        nuts.NUTSConfig(mass_adaptation="fisher_lowrank", low_rank_gamma=0.0)
    with pytest.raises(EngineError, match="mass_adaptation"):
        nuts.NUTSConfig(mass_adaptation="fisher_lowrank", dense_mass=True)


_SAMPLER = """
import json, numpy as np, jax.numpy as jnp, numpyro, numpyro.distributions as dist
import bayeslik as bl
rng = np.random.default_rng(0)
d = 8
q, _ = np.linalg.qr(rng.normal(size=(d, d)))
cov = (q * np.geomspace(1e-2, 1e2, d)) @ q.T
mu = np.arange(d) - 3.0
def model():
    numpyro.sample("x", dist.MultivariateNormal(jnp.asarray(mu), covariance_matrix=jnp.asarray(cov)))
post = bl.Posterior(model)
out = {}
for ad in ("fisher", "fisher_lowrank"):
    fit = bl.fit(post, "nuts", seed=1, progress_bar=False, mass_adaptation=ad,
                 num_warmup=500, num_samples=500)
    x = fit.draws("x").reshape(-1, d)
    s = fit.summary()
    out[ad] = {"steps": float(np.asarray(fit.idata["sample_stats"]["n_steps"]).mean()),
               "flags": list(fit.flags), "mean": x.mean(0).tolist(),
               "mcse": s["mcse_mean"].to_numpy().tolist(), "cov": np.cov(x.T).tolist(),
               "ess": float(s["ess_bulk"].min()), "dtype": str(x.dtype)}
out["exact_mean"], out["exact_cov"] = mu.tolist(), cov.tolist()
print("RESULT" + json.dumps(out))
"""


@pytest.mark.parametrize("x64", [False, True], ids=["float32", "float64"])
def test_samples_a_correlated_gaussian_right_in_fewer_steps(x64):
    env = {"JAX_ENABLE_X64": "1" if x64 else "0", "JAX_PLATFORMS": "cpu"}
    import os

    res = subprocess.run([sys.executable, "-c", textwrap.dedent(_SAMPLER)], capture_output=True,
                         text=True, env={**os.environ, **env}, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    import json

    out = json.loads(res.stdout.split("RESULT", 1)[1])
    lr, fi = out["fisher_lowrank"], out["fisher"]
    assert lr["dtype"] == ("float64" if x64 else "float32")
    assert lr["flags"] == [], lr["flags"]
    mean, mcse = np.array(lr["mean"]), np.array(lr["mcse"])
    z = (mean - np.array(out["exact_mean"])) / mcse
    assert np.abs(z).max() < 4.5, z
    cov, exact = np.array(lr["cov"]), np.array(out["exact_cov"])
    # variances within 15% (2,000 draws, ESS in the thousands: the sd of a variance estimate
    # is ~sqrt(2/ESS) ~ 3%), the correlations' scale too
    np.testing.assert_allclose(np.diag(cov), np.diag(exact), rtol=0.15)
    # condition number 1e4: the diagonal metrics need tens of steps per draw, the low-rank
    # metric learns the rotation (measured: 5 against 72 on a 10-D version)
    assert lr["steps"] < 0.3 * fi["steps"], (lr["steps"], fi["steps"])
    assert lr["ess"] > 1000


def test_auto_resolves_by_dimension_and_runs():
    auto = nuts.NUTSConfig(mass_adaptation="auto")
    assert nuts.resolve_adaptation(auto, nuts.LOW_RANK_MAX_DIM).mass_adaptation == "fisher_lowrank"
    assert nuts.resolve_adaptation(auto, nuts.LOW_RANK_MAX_DIM + 1).mass_adaptation == "fisher"
    dense = nuts.NUTSConfig(mass_adaptation="auto", dense_mass=True)
    assert nuts.resolve_adaptation(dense, 3).mass_adaptation == "stan"
    assert nuts.resolve_adaptation(nuts.NUTSConfig(), 3).mass_adaptation == "stan"
    # the low-level pieces resolve it from the position's size, as the engine does
    logp = lambda z: -0.5 * jnp.sum(z * z)  # noqa: E731
    chain = nuts.init(jax.random.key(0), jnp.ones(3), logp, auto)
    assert chain.inverse_mass_matrix.shape == (3, 3)
    init, kernel = nuts.build_warmup(logp, auto)
    state = init(chain)
    assert isinstance(state.welford, nuts.LowRankState)
    stage, switch = nuts.schedule(auto)
    state, info = kernel(jax.random.key(1), state, stage[0], switch[0])
    assert np.all(np.isfinite(np.asarray(state.chain.inverse_mass_matrix)))
