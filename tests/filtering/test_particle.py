"""Particle filters: resampling unbiasedness, the likelihood estimate against exact answers
(Kalman filter, HMM forward algorithm), the nonlinear stochastic volatility model, online RUL.

Tolerances come from the estimates' own Monte Carlo error over repeated filters (vmapped, so
each configuration compiles once)."""

from __future__ import annotations

import os
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bayeslik.errors import EngineError
from bayeslik.filtering import hmm_filter, hmm_loglik, kalman
from bayeslik.filtering import particle as pf
from bayeslik.models import arhmm
from bayeslik.models import arhmm_statespace as arhmm_ss
from tests.harness import K

#: BAYESLIK_TEST_SEED (see tests/conftest.py) shifts every key of this file
SEED = int(os.environ.get("BAYESLIK_TEST_SEED", "0"))


def _key(i: int) -> jax.Array:
    return jax.random.key(i + SEED)


LG = {"m0": np.zeros(1), "P0": np.eye(1), "F": 0.9 * np.eye(1), "Q": 0.5 * np.eye(1),
      "H": np.eye(1), "R": 0.7 * np.eye(1)}
SV = {"mu": -1.0, "phi": 0.95, "sigma": 0.3}


@pytest.fixture(scope="module")
def lg_data():
    ssm = pf.linear_gaussian_ssm(1)
    p = {k: jnp.asarray(v, jnp.float32) for k, v in LG.items()}
    _, ys = pf.simulate_ssm(_key(11), ssm, p, 30,
                            lambda k, q, x, t: q["H"] @ x + jnp.sqrt(q["R"][0, 0]) * jax.random.normal(k, (1,)))
    return ssm, p, np.asarray(ys)


def _repeat(fn, seed, num):
    return jax.tree.map(np.asarray, jax.vmap(fn)(jax.random.split(_key(seed), num)))


def _ratio_check(lls, exact, k=K):
    """The likelihood estimate is unbiased: mean(exp(ll - exact)) = 1 within k standard errors."""
    r = np.exp(np.asarray(lls, np.float64) - exact)
    se = r.std(ddof=1) / np.sqrt(len(r))
    assert abs(r.mean() - 1) < k * se + 1e-3, (r.mean(), se)
    return r


# ------------------------------------------------------------------------------------- resampling
@pytest.mark.parametrize("method", pf.RESAMPLING)
def test_resampling_offspring_are_unbiased(method, seed):
    w = jnp.asarray(np.random.default_rng(seed).dirichlet(np.ones(7) * 0.7), jnp.float32)
    n, reps = 7, 20_000
    counts = _repeat(lambda k: pf.offspring_counts(pf.resample(k, w, n, method=method), n), seed, reps)
    assert np.all(counts.sum(1) == n)
    mean, se = counts.mean(0), counts.std(0, ddof=1) / np.sqrt(reps)
    expected = n * np.asarray(w)
    # exact in expectation: N w_i offspring, within Monte Carlo error (se = 0 only if exact)
    assert np.all(np.abs(mean - expected) <= 5 * se + 1e-3), (method, mean, expected)
    if method == "systematic":  # floor(N w) or ceil(N w) copies, nothing else
        assert np.all(np.abs(counts - expected) < 1 + 1e-5)
    if method == "residual":  # at least the deterministic floor(N w) copies
        assert np.all(counts >= np.floor(expected - 1e-5))


def test_resampling_degenerate_and_validation(no_jit):
    with pytest.raises(ValueError, match="resampling must be one of"):
        pf.resample(None, jnp.ones(3), method="bogus")


def test_resampling_degenerate_weights():
    for method in pf.RESAMPLING:
        idx = pf.resample(_key(0), jnp.array([0.0, 0.0, 3.0, 0.0]), 6, method=method)
        assert idx.tolist() == [2] * 6, method


def test_indices_from_counts_is_repeat():
    counts = jnp.array([2, 0, 1, 3, 0])
    from bayeslik.weights import _indices_from_counts

    assert _indices_from_counts(counts, 6).tolist() == [0, 0, 2, 3, 3, 3]


# ------------------------------------------------------------------------------ linear Gaussian
LG_N, LG_R = 1000, 50


@pytest.fixture(scope="module")
def lg_runs(lg_data):
    """LG_R independent filters of LG_N particles per method (one compile each)."""
    ssm, p, ys = lg_data
    return {m: _repeat(lambda k: pf.particle_filter(k, ssm, p, ys, LG_N, method=m,
                                                    quantiles=(0.5,)), 1, LG_R)
            for m in ("bootstrap", "guided", "auxiliary")}


@pytest.mark.parametrize("method", ["bootstrap", "guided", "auxiliary"])
def test_linear_gaussian_against_kalman(lg_data, lg_runs, method):
    ssm, p, ys = lg_data
    exact = kalman.kalman_filter(p, ys)
    N, R = LG_N, LG_R
    out = lg_runs[method]
    _ratio_check(out.log_likelihood, float(exact.log_likelihood))
    # the filtered means: averaged over R filters, within 5 standard errors of the Kalman means
    # (their O(1/N) bias is ~sqrt(R/N) = 0.2 standard errors here)
    mean, se = out.filtered_mean.mean(0), out.filtered_mean.std(0, ddof=1) / np.sqrt(R)
    z = np.abs(mean - np.asarray(exact.filtered_means)) / se
    assert z.max() < 5, (method, z.max())
    # the filtered median of a Gaussian is its mean: within 5 standard errors over the runs plus
    # the spacing of particles at the median (a weighted quantile lands on a particle), sd*sqrt(2 pi)/N
    sd = np.sqrt(np.asarray(exact.filtered_covs)[:, 0, 0])
    med = out.filtered_quantiles[:, 0, :, 0]
    err = np.abs(med.mean(0) - np.asarray(exact.filtered_means)[:, 0])
    assert np.all(err < 5 * med.std(0, ddof=1) / np.sqrt(R) + sd * np.sqrt(2 * np.pi) / N), err
    if method == "auxiliary":  # fully adapted: resampled every step, the new weights are uniform
        res = pf.particle_filter(_key(0), ssm, p, ys, N, method=method, ess_threshold=1.0)
        assert np.allclose(res.ess[1:], N, rtol=1e-3)


def test_adapted_filters_beat_bootstrap(lg_runs):
    """Variance ordering: the guided (locally optimal proposal) and the fully adapted filters'
    estimates vary less than the bootstrap's (F-test: a variance ratio of R = 50 samples below
    0.5 has probability < 1e-2 when the variances are equal)."""
    var = {m: out.log_likelihood.var(ddof=1) for m, out in lg_runs.items()}
    assert var["guided"] < 0.5 * var["bootstrap"], var
    assert var["auxiliary"] < 0.5 * var["bootstrap"], var


def test_ess_threshold_triggers_resampling(lg_data):
    ssm, p, ys = lg_data
    N = 200
    for thr in (0.0, 1.0, 0.5):
        res = pf.particle_filter(_key(3), ssm, p, ys, N, ess_threshold=thr, quantiles=())
        r, e = np.asarray(res.resampled), np.asarray(res.ess)
        assert not r[0]
        if thr == 0.0:
            assert not r.any()
        elif thr == 1.0:
            assert r[1:].all()
        else:  # bootstrap: step t resamples iff the ESS of step t-1's weights is below N/2
            assert np.array_equal(r[1:], e[:-1] < thr * N)
            assert 0 < r.sum() < len(r) - 1


def test_pre_drawn_noise_is_deterministic_and_correlated(lg_data):
    ssm, p, ys = lg_data
    u = pf.draw_noise(_key(5), ssm, len(ys), 100)
    a = pf.particle_filter(None, ssm, p, ys, 100, u=u).log_likelihood
    b = pf.particle_filter(None, ssm, p, ys, 100, u=u).log_likelihood
    assert float(a) == float(b)
    # with u fixed, a small parameter change moves the estimate smoothly (correlated filters):
    # the difference varies far less than that of two independent estimates (sd * sqrt 2)
    p2 = {**p, "F": p["F"] * 1.01}

    def diff(k):
        uk = pf.draw_noise(k, ssm, len(ys), 100)
        return (pf.particle_filter(None, ssm, p2, ys, 100, u=uk, quantiles=()).log_likelihood,
                pf.particle_filter(None, ssm, p, ys, 100, u=uk, quantiles=()).log_likelihood)

    a, b = _repeat(diff, 6, 40)
    assert np.std(a - b) < 0.25 * np.std(b) * np.sqrt(2), (np.std(a - b), np.std(b))


def test_history_and_ancestral_paths(lg_data):
    ssm, p, ys = lg_data
    res = pf.particle_filter(_key(4), ssm, p, ys, 64, keep_history=True)
    paths = np.asarray(pf.ancestral_paths(res))
    assert paths.shape == (64, len(ys), 1)
    hp, ha = np.asarray(res.history_particles), np.asarray(res.history_ancestors)
    assert np.allclose(paths[:, -1], np.asarray(res.particles))
    # follow particle 5 back by hand
    i = 5
    for t in range(len(ys) - 1, -1, -1):
        assert np.allclose(paths[5, t], hp[t, i])
        i = ha[t, i]
    # without resampling every particle is its own ancestor
    res0 = pf.particle_filter(_key(4), ssm, p, ys, 64, keep_history=True, ess_threshold=0.0)
    assert np.allclose(np.asarray(pf.ancestral_paths(res0))[:, :, 0], np.asarray(res0.history_particles)[..., 0].T)


def test_step_by_step_equals_scan(lg_data):
    ssm, p, ys = lg_data
    key = _key(9)
    full = pf.particle_filter(key, ssm, p, ys, 50, quantiles=())
    keys = jax.random.split(key, len(ys))
    state, _ = pf.filter_init(keys[0], ssm, p, ys[0], 50)
    for t in range(1, len(ys)):
        state, _ = pf.filter_step(keys[t], ssm, p, state, ys[t], t)
    assert np.allclose(state.log_likelihood, full.log_likelihood, atol=1e-4)
    assert np.allclose(state.particles, full.particles, atol=1e-5)


def test_bad_input_rejected_before_compiling(no_jit, lg_data):
    ssm, p, ys = lg_data
    key = _key(0)
    with pytest.raises(ValueError, match="num_particles must be a positive int"):
        pf.particle_filter(key, ssm, p, ys, 0)
    with pytest.raises(ValueError, match="resampling must be one of"):
        pf.particle_filter(key, ssm, p, ys, 10, resampling="sys")
    with pytest.raises(ValueError, match="ess_threshold must be in"):
        pf.particle_filter(key, ssm, p, ys, 10, ess_threshold=2.0)
    with pytest.raises(ValueError, match="guided' needs"):
        pf.particle_filter(key, pf.stochastic_volatility_ssm(), SV, ys[:, 0], 10, method="guided")
    with pytest.raises(ValueError, match=r"u\['transition'\] must have shape"):
        pf.particle_filter(None, ssm, p, ys, 10, u=pf.draw_noise(key, ssm, 5, 10))
    with pytest.raises(ValueError, match="same leading time axis"):
        pf.particle_filter(key, ssm, p, {"a": np.zeros(3), "b": np.zeros(4)}, 10)
    with pytest.raises(EngineError, match="jax.random.key"):
        pf.particle_filter(jax.random.PRNGKey(0), ssm, p, ys, 10)


# ---------------------------------------------------------------------------------------- AR-HMM
@pytest.fixture(scope="module")
def hmm_data():
    data = arhmm.simulate(_key(0), num_steps=60, num_states=2)
    p = {k: jnp.asarray(v, jnp.float32) for k, v in data["params"].items()}
    return p, data["y"]


@pytest.mark.parametrize("method", ["bootstrap", "auxiliary"])
def test_arhmm_against_forward_algorithm(hmm_data, method):
    p, y = hmm_data
    li, lt, lo = arhmm.hmm_inputs(p, y)
    exact = float(hmm_loglik(li, lt, lo))
    probs = np.exp(np.asarray(hmm_filter(li, lt, lo).log_filtered))
    ys = arhmm_ss.arhmm_observations(y)
    R, N = 100, 200
    out = _repeat(lambda k: pf.particle_filter(k, arhmm_ss.arhmm_ssm(), p, ys, N, method=method,
                                               quantiles=()), 7, R)
    _ratio_check(out.log_likelihood, exact)
    # filtered mean of the state index = p(z_t = 1 | y_0:t)
    m, se = out.filtered_mean.mean(0), out.filtered_mean.std(0, ddof=1) / np.sqrt(R)
    z = np.abs(m - probs[:, 1]) / np.maximum(se, 1e-3 / np.sqrt(R))
    assert z.max() < 5, z.max()


# --------------------------------------------------------------------------- stochastic volatility
@pytest.fixture(scope="module")
def sv_data():
    ssm = pf.stochastic_volatility_ssm()
    p = {k: jnp.float32(v) for k, v in SV.items()}
    xs, ys = pf.simulate_ssm(_key(21), ssm, p, 100,
                             lambda k, q, x, t: jnp.exp(x / 2) * jax.random.normal(k))
    return ssm, p, np.asarray(ys)


@pytest.mark.slow
def test_stochastic_volatility_variance_falls_as_one_over_n(sv_data):
    """Nothing exact exists: the estimate's variance falls like 1/N and independent batches of
    seeds agree within their standard errors."""
    ssm, p, ys = sv_data
    R = 200
    lls = {N: _repeat(lambda k: pf.particle_filter(k, ssm, p, ys, N, quantiles=()).log_likelihood, 30 + N, R)
           for N in (250, 1000)}
    ratio = lls[250].var(ddof=1) / lls[1000].var(ddof=1)
    # var ratio of two independent samples of R: log-sd about sqrt(2/(R-1) * 2) ~ 0.14 (x1.5 for
    # non-normal tails); 4 * exp(+-4 * 0.21) = [1.7, 9.3]
    assert 1.7 < ratio < 9.3, ratio
    a, b = lls[1000][: R // 2], lls[1000][R // 2:]
    se = np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    assert abs(a.mean() - b.mean()) < K * se
    # the 4-fold larger filter is the better one: its mean estimate of log p(y) is higher
    # (the log of an unbiased estimate is biased low by about var/2)
    assert lls[1000].mean() > lls[250].mean() - K * np.sqrt(lls[1000].var() / R + lls[250].var() / R)


def test_stochastic_volatility_filtered_intervals_cover(sv_data):
    """The filtered 90% interval of x_t covers the simulated x_t 90% of the time on average over
    simulated data sets (the model is well specified); the per-data-set coverages are correlated
    in time, so the standard error comes from the spread across the 40 data sets."""
    ssm, p, _ = sv_data

    def one(k):
        k1, k2 = jax.random.split(k)
        xs, ys = pf.simulate_ssm(k1, ssm, p, 100, lambda k, q, x, t: jnp.exp(x / 2) * jax.random.normal(k))
        res = pf.particle_filter(k2, ssm, p, ys, 1000, quantiles=(0.05, 0.95))
        q = res.filtered_quantiles
        return jnp.mean((xs >= q[0]) & (xs <= q[1])), res.log_likelihood

    cover, ll = _repeat(one, 40, 40)
    se = cover.std(ddof=1) / np.sqrt(len(cover))
    assert abs(cover.mean() - 0.9) < K * se, (cover.mean(), se)
    assert np.all(np.isfinite(ll))


# ------------------------------------------------------------------------------- online C-MAPSS
@pytest.fixture(scope="module")
def cmapss_unit():
    from bayeslik.models import cmapss

    d = cmapss.load()
    hi = cmapss.HealthIndicator.fit(d["train"])
    num_states = 4
    seqs = hi.sequences(d["train"])
    init = arhmm.init_params(seqs[1][:, None], num_states, left_to_right=True)
    trans = np.zeros((num_states, num_states), np.float32)
    for k in range(num_states - 1):
        trans[k, k:] = init[f"trans_{k}"]
    trans[-1, -1] = 1.0
    params = {"pi": np.eye(num_states, dtype=np.float32)[0], "trans": trans,
              "b": init["b0"][:, None], "A": init["A"], "sigma": init["sigma"]}
    te = cmapss.degradation_data(d["test"], hi, num_states, run_to_failure=False)
    i = 0
    n = te["length"][i]
    unit = {"y": te["y"][i, :n], "labels": te["labels"][i, :n]}
    return params, unit, te, num_states


def test_online_rul_matches_the_exact_filter(cmapss_unit):
    from bayeslik.models import cmapss

    params, unit, te, num_states = cmapss_unit
    out = arhmm_ss.online_rul(_key(0), params, unit["y"], labels=unit["labels"],
                        num_particles=2000)
    T = len(unit["y"])
    assert out["state_probs"].shape == (T, num_states) and out["rul_pmf"].shape == (T, 415)
    li, lt, lo = arhmm.hmm_inputs({k: jnp.asarray(v) for k, v in params.items()}, unit["y"],
                                  labels=unit["labels"], left_to_right=True)
    exact = np.exp(np.asarray(hmm_filter(li, lt, lo).log_filtered))
    # multinomial-type error of N = 2000 particles (ESS >= N/2 after resampling):
    # se <= sqrt(p(1-p) / (N/2))
    se = np.sqrt(exact * (1 - exact) / 1000) + 1e-3
    assert np.all(np.abs(out["state_probs"] - exact) < 5 * se), np.abs(out["state_probs"] - exact).max()
    # the last cycle's RUL distribution agrees with cmapss.rul_distribution (exact filter)
    data1 = {k: te[k][:1] for k in ("y", "mask", "labels")}
    pmf_exact = cmapss.rul_distribution({k: np.asarray(v)[None] for k, v in params.items()}, data1,
                                        num_states)[0]
    tv = 0.5 * np.abs(out["rul_pmf"][-1] - pmf_exact).sum()
    assert tv < 0.5 * np.abs(out["state_probs"][-1] - exact[-1]).sum() + 1e-4, tv
    # and the same rule applied to the exact probabilities reproduces it to float precision
    assert np.allclose(cmapss.rul_from_state_probs(jnp.asarray(exact[-1]), params["trans"]), pmf_exact,
                       atol=1e-5)
    # the RUL shrinks as the unit ages: the median falls over the observed cycles
    assert out["rul_median"][-1] <= out["rul_median"][30]
