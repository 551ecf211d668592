"""HMM inference (bayeslik.filtering.hmm) against brute-force enumeration and a NumPy reference.

Both implementations (sequential lax.scan, parallel lax.associative_scan) are checked on every
property. Exactness tests run in float64 (the ``x64`` fixture restores the flag afterwards);
the long-sequence accuracy tests compare float32 against float64.
"""

from __future__ import annotations

import doctest
import itertools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp

from bayeslik.filtering import hmm as H
from bayeslik.filtering.hmm import (
    choose_method,
    hmm_filter,
    hmm_loglik,
    hmm_sample_paths,
    hmm_smoother,
    hmm_viterbi,
)

METHODS = ("sequential", "parallel")


# ----------------------------------------------------------------------------- problems


def random_hmm(rng, K, T, time_varying=False, sticky=0.0):
    """Random normalised HMM in float64 NumPy: (log_init, log_trans, log_obs)."""
    log_init = np.log(rng.dirichlet(np.ones(K)))
    shape = (T - 1, K) if time_varying else (K,)
    trans = rng.dirichlet(np.ones(K), size=shape)
    trans = (1 - sticky) * trans + sticky * np.eye(K)
    log_obs = 1.5 * rng.normal(size=(T, K))
    return log_init, np.log(trans), log_obs


def gaussian_hmm(T, K=4, seed=0):
    """A sticky HMM with Gaussian emissions, simulated: realistic long-sequence log_obs."""
    rng = np.random.default_rng(seed)
    P = np.full((K, K), 0.05 / (K - 1))
    np.fill_diagonal(P, 0.95)
    # Simulate the chain by blocks of constant state (geometric holding times).
    z = np.empty(T, dtype=np.int64)
    t, state = 0, rng.integers(K)
    while t < T:
        hold = rng.geometric(0.05)
        z[t : t + hold] = state
        t += hold
        state = (state + rng.integers(1, K)) % K
    mu = np.arange(K, dtype=float)
    y = mu[z] + rng.normal(size=T)
    log_obs = -0.5 * (y[:, None] - mu[None, :]) ** 2 - 0.5 * np.log(2 * np.pi)
    return np.full(K, -np.log(K)), np.log(P), log_obs


def trans_at(log_trans, t):
    """Transition log-matrix of step t -> t+1."""
    return log_trans if log_trans.ndim == 2 else log_trans[t]


def enumerate_paths(log_init, log_trans, log_obs):
    """All K^T paths and their log weights."""
    T, K = log_obs.shape
    paths = np.array(list(itertools.product(range(K), repeat=T)), dtype=np.int64)
    lw = log_init[paths[:, 0]] + log_obs[np.arange(T), paths].sum(axis=1)
    for t in range(T - 1):
        lw = lw + trans_at(log_trans, t)[paths[:, t], paths[:, t + 1]]
    return paths, lw


def brute_force(log_init, log_trans, log_obs):
    """loglik, filtered and smoothed marginals, Viterbi path and path posterior, by enumeration."""
    T, K = log_obs.shape
    paths, lw = enumerate_paths(log_init, log_trans, log_obs)
    loglik = logsumexp(lw)
    post = np.exp(lw - loglik)
    smoothed = np.array([[post[paths[:, t] == k].sum() for k in range(K)] for t in range(T)])
    filtered = np.empty((T, K))
    for t in range(T):
        lt = log_trans if log_trans.ndim == 2 else log_trans[:t]
        p_t, lw_t = enumerate_paths(log_init, lt, log_obs[: t + 1])
        w = np.exp(lw_t - logsumexp(lw_t))
        filtered[t] = [w[p_t[:, t] == k].sum() for k in range(K)]
    return loglik, filtered, smoothed, paths[np.argmax(lw)], paths, post


def np_forward_backward(log_init, log_trans, log_obs):
    """Float64 NumPy forward-backward (unnormalised log messages) for moderate T."""
    T, K = log_obs.shape
    la = np.empty((T, K))
    la[0] = log_init + log_obs[0]
    for t in range(1, T):
        la[t] = logsumexp(la[t - 1][:, None] + trans_at(log_trans, t - 1), axis=0) + log_obs[t]
    lb = np.zeros((T, K))
    for t in range(T - 2, -1, -1):
        lb[t] = logsumexp(trans_at(log_trans, t) + (log_obs[t + 1] + lb[t + 1])[None], axis=1)
    loglik = logsumexp(la[-1])
    filtered = la - logsumexp(la, axis=1, keepdims=True)
    return loglik, filtered, la + lb - loglik


def as_jnp(*arrays, dtype=None):
    return tuple(jnp.asarray(a, dtype=dtype) for a in arrays)


@partial(jax.jit, static_argnames="method")
def run_all(log_init, log_trans, log_obs, mask, method):
    """Every deterministic output in one compile (the parallel scans are slow to compile)."""
    kw = dict(mask=mask, method=method)
    filt = hmm_filter(log_init, log_trans, log_obs, **kw)
    smooth = hmm_smoother(log_init, log_trans, log_obs, **kw)
    return dict(
        loglik=hmm_loglik(log_init, log_trans, log_obs, **kw),
        filter_loglik=filt.loglik,
        filter_filtered=filt.log_filtered,
        smoother_loglik=smooth.loglik,
        filtered=smooth.log_filtered,
        smoothed=smooth.log_smoothed,
        viterbi=hmm_viterbi(log_init, log_trans, log_obs, **kw),
    )


def check_against(out, loglik, filtered, smoothed, best, rtol, atol):
    """All outputs of run_all against reference values (probabilities, not logs)."""
    for key in ("loglik", "filter_loglik", "smoother_loglik"):
        np.testing.assert_allclose(out[key], loglik, rtol=rtol, err_msg=key)
    for key in ("filter_filtered", "filtered"):
        np.testing.assert_allclose(np.exp(out[key]), filtered, atol=atol, err_msg=key)
    np.testing.assert_allclose(np.exp(out["smoothed"]), smoothed, atol=atol, err_msg="smoothed")
    assert out["viterbi"].dtype == jnp.int32
    np.testing.assert_array_equal(out["viterbi"], best, err_msg="viterbi")


# ----------------------------------------------------------------------------- enumeration

ENUM_CASES = {
    "K2_T6_fixed": (2, 6, False),
    "K3_T5_varying": (3, 5, True),
    "K3_T2_varying": (3, 2, True),
    "K3_T1": (3, 1, False),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", list(ENUM_CASES))
def test_exact_inference_matches_enumeration(case, method, x64):
    K, T, tv = ENUM_CASES[case]
    prob = random_hmm(np.random.default_rng(11), K, T, tv)
    loglik, filtered, smoothed, best, _, _ = brute_force(*prob)
    out = run_all(*as_jnp(*prob), None, method)
    assert out["loglik"].dtype == jnp.float64 and out["smoothed"].shape == (T, K)
    check_against(out, loglik, filtered, smoothed, best, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_float32_matches_enumeration(method):
    prob = random_hmm(np.random.default_rng(5), 3, 5, True)
    loglik, filtered, smoothed, best, _, _ = brute_force(*prob)
    out = run_all(*as_jnp(*prob, dtype=jnp.float32), None, method)
    assert out["loglik"].dtype == jnp.float32 and out["smoothed"].dtype == jnp.float32
    check_against(out, loglik, filtered, smoothed, best, rtol=1e-6, atol=2e-6)


@pytest.mark.parametrize("method", METHODS)
def test_structural_zeros_left_to_right(method, x64):
    """-inf transitions and initial probabilities: exact values and finite gradients."""
    K, T = 3, 5
    rng = np.random.default_rng(3)
    with np.errstate(divide="ignore"):
        log_init = np.log(np.array([1.0, 0.0, 0.0]))
        log_trans = np.log(np.array([[0.6, 0.4, 0.0], [0.0, 0.7, 0.3], [0.0, 0.0, 1.0]]))
    log_obs = rng.normal(size=(T, K))
    loglik, filtered, smoothed, best, _, _ = brute_force(log_init, log_trans, log_obs)
    args = as_jnp(log_init, log_trans, log_obs)
    check_against(run_all(*args, None, method), loglik, filtered, smoothed, best, 1e-12, 1e-12)
    grads = jax.grad(lambda a, b, c: hmm_loglik(a, b, c, method=method), argnums=(0, 1, 2))(*args)
    for g in grads:
        assert np.all(np.isfinite(g))
    np.testing.assert_allclose(grads[2], smoothed, atol=1e-12)
    assert np.all(grads[1][np.isneginf(log_trans)] == 0)


@pytest.mark.parametrize("method", METHODS)
def test_viterbi_ties_break_to_lowest_state_consistently(method):
    """All paths equally likely: both methods return the all-zero path, never a mixed one."""
    K, T = 3, 9
    args = as_jnp(np.zeros(K), np.zeros((K, K)), np.zeros((T, K)), dtype=jnp.float32)
    np.testing.assert_array_equal(hmm_viterbi(*args, method=method), np.zeros(T))
    # Two tied optimal paths 0,0,...,0 and 1,1,...,1 (no switching): the result must be one of
    # them, not a per-step mixture.
    log_trans = np.log(np.eye(2) * 0.9 + 0.05)
    log_obs = np.zeros((T, 2))
    path = np.asarray(hmm_viterbi(*as_jnp(np.zeros(2), log_trans, log_obs), method=method))
    assert np.all(path == path[0])


# ----------------------------------------------------------------------------- sampling


def chi_square_pvalue(samples, probs, min_expected=5.0):
    """Pearson chi-square p-value of sampled path indices against exact path probabilities.

    Cells with expected count below ``min_expected`` are pooled into one.
    """
    n = samples.shape[0]
    observed = np.bincount(samples, minlength=probs.size).astype(float)
    expected = n * probs
    small = expected < min_expected
    obs_c = np.append(observed[~small], observed[small].sum())
    exp_c = np.append(expected[~small], expected[small].sum())
    if exp_c[-1] == 0:
        assert obs_c[-1] == 0, "a zero-probability path was sampled"
        obs_c, exp_c = obs_c[:-1], exp_c[:-1]
    stat = ((obs_c - exp_c) ** 2 / exp_c).sum()
    return stats.chi2.sf(stat, df=obs_c.size - 1)


def path_index(paths, K):
    return (paths * K ** np.arange(paths.shape[1])[::-1]).sum(axis=1)


@pytest.fixture(scope="module")
def sampling_problem():
    """K=3, T=4 sticky HMM (81 paths) plus its exact path posterior; padded to T=6 for masks."""
    K, T, pad = 3, 4, 2
    prob = random_hmm(np.random.default_rng(7), K, T, time_varying=True, sticky=0.6)
    prob = (prob[0], prob[1], 0.5 * prob[2])
    _, _, smoothed, _, paths, post = brute_force(*prob)
    assert np.array_equal(path_index(paths, K), np.arange(K**T))
    log_init, log_trans, log_obs = prob
    padded = (
        log_init,
        np.concatenate([log_trans, np.log(np.full((pad, K, K), 1.0 / K))]),
        np.concatenate([log_obs, 50.0 * np.random.default_rng(8).normal(size=(pad, K))]),
    )
    mask = np.arange(T + pad) < T
    return dict(K=K, T=T, prob=prob, post=post, smoothed=smoothed, padded=padded, mask=mask)


N_SAMPLES = 20_000


@pytest.mark.parametrize("padded", [False, True], ids=["plain", "masked"])
@pytest.mark.parametrize("method", METHODS)
def test_ffbs_path_frequencies_chi_square(sampling_problem, method, padded, seed):
    sp = sampling_problem
    K, T = sp["K"], sp["T"]
    if padded:
        args, mask = as_jnp(*sp["padded"], dtype=jnp.float32), jnp.asarray(sp["mask"])
    else:
        args, mask = as_jnp(*sp["prob"], dtype=jnp.float32), None
    paths = np.asarray(
        hmm_sample_paths(jax.random.key(2024 + seed), *args, num_samples=N_SAMPLES, mask=mask,
                         method=method)
    )
    assert paths.shape == (N_SAMPLES, args[2].shape[0]) and paths.dtype == np.int32
    if padded:  # padded steps repeat the last valid state
        np.testing.assert_array_equal(paths[:, T:], np.repeat(paths[:, T - 1 : T], 2, axis=1))
    p = chi_square_pvalue(path_index(paths[:, :T], K), sp["post"])
    assert p > 1e-3, f"FFBS path frequencies disagree with the exact posterior (p={p:.2e})"


def test_chi_square_rejects_wrong_samplers(sampling_problem):
    """The same test has power: it rejects samplers with the right marginals but wrong paths."""
    sp = sampling_problem
    K, T = sp["K"], sp["T"]
    rng = np.random.default_rng(1)
    # 1. Independent draws from the exact smoothed marginals (marginals right, joint wrong).
    u = rng.random((N_SAMPLES, T, 1))
    indep = (u > np.cumsum(sp["smoothed"], axis=1)[None]).sum(axis=2)
    assert chi_square_pvalue(path_index(indep, K), sp["post"]) < 1e-6
    # 2. A plausible bug: transition matrices transposed (row/column confusion).
    log_init, log_trans, log_obs = sp["prob"]
    wrong = as_jnp(log_init, np.swapaxes(log_trans, -1, -2), log_obs, dtype=jnp.float32)
    paths = np.asarray(
        hmm_sample_paths(jax.random.key(2024), *wrong, num_samples=N_SAMPLES, method="sequential")
    )
    assert chi_square_pvalue(path_index(paths, K), sp["post"]) < 1e-6


def test_sampling_methods_agree_for_the_same_key(x64):
    """Both methods draw by inversion from the same uniforms: the same paths for the same key."""
    prob = random_hmm(np.random.default_rng(9), 3, 40, time_varying=True)
    args = as_jnp(*prob)
    key = jax.random.key(5)
    seq = hmm_sample_paths(key, *args, num_samples=300, method="sequential")
    par = hmm_sample_paths(key, *args, num_samples=300, method="parallel")
    np.testing.assert_array_equal(seq, par)
    assert len({tuple(p) for p in np.asarray(seq).tolist()}) > 10  # genuinely random paths


# ----------------------------------------------------------------------------- time-varying, masks

MEDIUM = dict(K=4, T=30)  # one float32 shape shared by several tests: compiled once


@pytest.mark.parametrize("method", METHODS)
def test_time_varying_equals_fixed_when_constant(method):
    K, T = MEDIUM["K"], MEDIUM["T"]
    log_init, log_trans, log_obs = random_hmm(np.random.default_rng(4), K, T)
    fixed = run_all(*as_jnp(log_init, log_trans, log_obs, dtype=jnp.float32), None, method)
    varying = run_all(
        *as_jnp(log_init, np.broadcast_to(log_trans, (T - 1, K, K)), log_obs, dtype=jnp.float32),
        None, method,
    )
    ref_ll, ref_f, ref_s = np_forward_backward(log_init, log_trans, log_obs)
    for out in (fixed, varying):
        np.testing.assert_allclose(out["loglik"], ref_ll, rtol=1e-6)
        np.testing.assert_allclose(np.exp(out["filtered"]), np.exp(ref_f), atol=1e-5)
        np.testing.assert_allclose(np.exp(out["smoothed"]), np.exp(ref_s), atol=1e-5)
    np.testing.assert_array_equal(fixed["viterbi"], varying["viterbi"])


@pytest.mark.parametrize("method", METHODS)
def test_mask_gives_the_valid_prefix(method, x64):
    K, T, L = 3, 12, 7
    rng = np.random.default_rng(6)
    log_init, log_trans, log_obs = random_hmm(rng, K, T, time_varying=True)
    log_obs[L:] = 100 * rng.normal(size=(T - L, K))  # junk that must be ignored
    log_trans[L - 1 :] = 10 * rng.normal(size=(T - L, K, K))  # unnormalised junk too
    mask = jnp.arange(T) < L
    loglik, filtered, smoothed, best, _, _ = brute_force(log_init, log_trans[: L - 1], log_obs[:L])
    args = as_jnp(log_init, log_trans, log_obs)

    pad = T - L  # padded steps repeat the last valid step
    check_against(
        run_all(*args, mask, method),
        loglik,
        np.concatenate([filtered, np.repeat(filtered[-1:], pad, axis=0)]),
        np.concatenate([smoothed, np.repeat(smoothed[-1:], pad, axis=0)]),
        np.concatenate([best, np.full(pad, best[-1])]),
        rtol=1e-12,
        atol=1e-12,
    )
    # Gradient wrt log_obs: the smoothed marginals on valid steps, zero on padded ones.
    g = jax.grad(lambda lo: hmm_loglik(args[0], args[1], lo, mask=mask, method=method))(args[2])
    np.testing.assert_allclose(g[:L], smoothed, atol=1e-12)
    assert np.all(np.asarray(g[L:]) == 0)


@pytest.mark.parametrize("method", METHODS)
def test_empty_sequence_has_zero_loglik(method):
    K, T = 2, 3
    log_init, log_trans, log_obs = random_hmm(np.random.default_rng(0), K, T)
    args = as_jnp(log_init + 0.7, log_trans, log_obs, dtype=jnp.float32)  # unnormalised init
    mask = jnp.zeros(T, dtype=bool)
    assert float(hmm_loglik(*args, mask=mask, method=method)) == 0.0
    assert float(hmm_filter(*args, mask=mask, method=method).loglik) == 0.0


@pytest.mark.parametrize("method", METHODS)
def test_vmap_over_a_batch_with_masks(method, x64):
    """(B, T, K) observations with (B, T) masks of unequal lengths, by jax.vmap."""
    K, T = 2, 12
    lengths = [1, 3, 8, 12, 12]
    rng = np.random.default_rng(12)
    log_init, log_trans, _ = random_hmm(rng, K, T)
    obs_b = 1.5 * rng.normal(size=(len(lengths), T, K))
    mask_b = np.arange(T)[None, :] < np.array(lengths)[:, None]
    li, lt = as_jnp(log_init, log_trans)

    def total_loglik(lo, masks):
        per_seq = jax.vmap(lambda o, m: hmm_loglik(li, lt, o, mask=m, method=method))(lo, masks)
        return per_seq.sum(), per_seq

    (total, logliks), grad = jax.jit(jax.value_and_grad(total_loglik, has_aux=True))(
        jnp.asarray(obs_b), jnp.asarray(mask_b)
    )
    smoothed = jax.jit(jax.vmap(lambda o, m: hmm_smoother(li, lt, o, mask=m, method=method)))(
        jnp.asarray(obs_b), jnp.asarray(mask_b)
    ).log_smoothed
    assert logliks.shape == (len(lengths),) and smoothed.shape == (len(lengths), T, K)
    for b, L in enumerate(lengths):
        ref_ll, _, ref_sm = np_forward_backward(log_init, log_trans, obs_b[b, :L])
        np.testing.assert_allclose(logliks[b], ref_ll, rtol=1e-12)
        np.testing.assert_allclose(smoothed[b, :L], ref_sm, atol=1e-12)
        np.testing.assert_allclose(grad[b, :L], np.exp(ref_sm), atol=1e-12)
    np.testing.assert_allclose(total, np.sum(logliks), rtol=1e-12)
    assert np.all(np.asarray(grad)[~mask_b] == 0)


# ----------------------------------------------------------------------------- methods agree


def test_sequential_equals_parallel_float32():
    K, T, L = 5, 1000, 900
    prob = random_hmm(np.random.default_rng(21), K, T, time_varying=True, sticky=0.5)
    args = as_jnp(*prob, dtype=jnp.float32)
    mask = jnp.arange(T) < L
    s = run_all(*args, mask, "sequential")
    p = run_all(*args, mask, "parallel")
    for key in ("loglik", "filter_loglik", "smoother_loglik"):
        np.testing.assert_allclose(p[key], s[key], rtol=2e-6, err_msg=key)
    for key in ("filter_filtered", "filtered", "smoothed"):
        np.testing.assert_allclose(np.exp(p[key]), np.exp(s[key]), atol=2e-5, err_msg=key)
    # Argmax decisions can flip only at float32 near-ties.
    assert np.mean(np.asarray(s["viterbi"]) == np.asarray(p["viterbi"])) > 0.99
    ref_ll, _, ref_sm = np_forward_backward(prob[0], prob[1][: L - 1], prob[2][:L])
    np.testing.assert_allclose(s["loglik"], ref_ll, rtol=1e-6)
    np.testing.assert_allclose(np.exp(s["smoothed"][:L]), np.exp(ref_sm), atol=2e-5)


def test_auto_method_rule():
    cpu_min = H.CPU_PARALLEL_MIN_T
    assert choose_method(10**6, backend="cpu") == (
        "parallel" if cpu_min is not None and cpu_min <= 10**6 else "sequential"
    )
    assert choose_method(2, backend="cpu") == "sequential"
    assert choose_method(H.ACCELERATOR_PARALLEL_MIN_T - 1, backend="gpu") == "sequential"
    assert choose_method(H.ACCELERATOR_PARALLEL_MIN_T, backend="gpu") == "parallel"
    assert choose_method(10**5, backend="tpu") == "parallel"
    with pytest.raises(ValueError, match="method must be one of"):
        H._resolve("fast", 10)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("method", METHODS)
def test_grad_wrt_log_obs_is_the_smoothed_marginals(method):
    K, T = MEDIUM["K"], MEDIUM["T"]
    prob = random_hmm(np.random.default_rng(31), K, T, sticky=0.5)
    li, lt, lo = as_jnp(*prob, dtype=jnp.float32)
    value, grad = jax.jit(
        jax.value_and_grad(lambda o: hmm_loglik(li, lt, o, method=method))
    )(lo)
    out = run_all(li, lt, lo, None, method)
    np.testing.assert_allclose(value, out["loglik"], rtol=1e-6)
    np.testing.assert_allclose(grad, np.exp(out["smoothed"]), atol=1e-5)
    ref_ll, _, ref_sm = np_forward_backward(*prob)
    np.testing.assert_allclose(grad, np.exp(ref_sm), atol=1e-5)
    np.testing.assert_allclose(value, ref_ll, rtol=1e-6)


def central_differences(f, x, eps):
    x = np.array(x, dtype=np.float64)
    out = np.empty_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        out[idx] = (f(xp) - f(xm)) / (2 * eps)
    return out


@pytest.mark.parametrize("time_varying", [False, True], ids=["fixed", "varying"])
@pytest.mark.parametrize("method", METHODS)
def test_grad_wrt_log_trans_and_log_init_finite_differences(method, time_varying, x64):
    K, T, L = 3, 8, 6
    li, lt, lo = random_hmm(np.random.default_rng(41), K, T, time_varying)
    mask = jnp.arange(T) < L
    ll = jax.jit(lambda a, b: hmm_loglik(a, b, jnp.asarray(lo), mask=mask, method=method))
    g_init, g_trans = jax.jit(jax.grad(ll, argnums=(0, 1)))(jnp.asarray(li), jnp.asarray(lt))
    fd_trans = central_differences(lambda b: float(ll(jnp.asarray(li), jnp.asarray(b))), lt, 1e-6)
    fd_init = central_differences(lambda a: float(ll(jnp.asarray(a), jnp.asarray(lt))), li, 1e-6)
    np.testing.assert_allclose(g_trans, fd_trans, atol=1e-8)
    np.testing.assert_allclose(g_init, fd_init, atol=1e-8)
    # The identity behind it: d loglik / d log_trans[t, i, j] = p(z_t = i, z_{t+1} = j | y),
    # zero for the transitions into padded steps.
    _, _, _, _, paths, post = brute_force(li, lt if lt.ndim == 2 else lt[: L - 1], lo[:L])
    pair = np.zeros((L - 1, K, K))
    for t in range(L - 1):
        np.add.at(pair[t], (paths[:, t], paths[:, t + 1]), post)
    expected = np.concatenate([pair, np.zeros((T - L, K, K))]) if time_varying else pair.sum(0)
    np.testing.assert_allclose(g_trans, expected, atol=1e-12)


# ----------------------------------------------------------------------------- long sequences


def flat_hmm(T, K=4, seed=0):
    """Nearly uninformative observations: every step adds almost the same log normaliser, so a
    single running float32 sum rounds the same way every step and drifts."""
    rng = np.random.default_rng(seed)
    P = np.full((K, K), 0.05 / (K - 1))
    np.fill_diagonal(P, 0.95)
    log_obs = -1.2345 + 1e-3 * rng.normal(size=(T, K))
    return np.full(K, -np.log(K)), np.log(P), log_obs


def naive_float32_loglik(log_init, log_trans, log_obs):
    """The drifting design: one running float32 sum of the log normalisers in the carry."""

    def step(carry, obs):
        f, total = carry
        x = jax.nn.logsumexp(f[:, None] + log_trans, axis=0) + obs
        c = jax.nn.logsumexp(x)
        return (x - c, total + c), None

    x0 = log_init + log_obs[0]
    c0 = jax.nn.logsumexp(x0)
    (_, total), _ = jax.lax.scan(step, (x0 - c0, c0), log_obs[1:])
    return total


def float64_reference(problems, with_filtered):
    """Float64 log-likelihoods (both methods) and filtered marginals; restores the x64 flag."""
    old = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    try:
        out = {}
        for name, prob in problems.items():
            a64 = as_jnp(*prob, dtype=jnp.float64)
            ll = {m: float(hmm_loglik(*a64, method=m)) for m in METHODS}
            filt = hmm_filter(*a64, method="sequential").log_filtered if with_filtered else None
            out[name] = (ll, None if filt is None else np.exp(np.asarray(filt)))
        return out
    finally:
        jax.config.update("jax_enable_x64", old)


def long_problems(T):
    return {"gaussian": gaussian_hmm(T), "flat": flat_hmm(T)}


@pytest.fixture(scope="module")
def reference_1e5():
    problems = long_problems(100_000)
    return problems, float64_reference(problems, with_filtered=True)


@pytest.fixture(scope="module")
def reference_1e6():
    problems = long_problems(1_000_000)
    return problems, float64_reference(problems, with_filtered=True)


def check_float32_accuracy(problems, reference, filter_methods):
    T = problems["gaussian"][2].shape[0]
    for name, prob in problems.items():
        ll64, filt64 = reference[name]
        np.testing.assert_allclose(ll64["parallel"], ll64["sequential"], rtol=1e-12)
        ref = ll64["sequential"]
        a32 = as_jnp(*prob, dtype=jnp.float32)
        for method in METHODS:
            got = hmm_loglik(*a32, method=method)
            assert got.dtype == jnp.float32
            rel = abs(float(got) - ref) / abs(ref)
            assert rel < 1e-5, f"{name}/{method}: float32 loglik off by {rel:.1e} rel. at T={T}"
        for method in filter_methods:
            filt = hmm_filter(*a32, method=method)
            rel = abs(float(filt.loglik) - ref) / abs(ref)
            assert rel < 1e-5, f"{name}/{method}: filter loglik off by {rel:.1e} rel. at T={T}"
            err = np.max(np.abs(np.exp(np.asarray(filt.log_filtered, np.float64)) - filt64))
            assert err < 1e-4, f"{name}/{method}: filtered marginals off by {err:.1e} at T={T}"


def test_float32_accuracy_long_sequence_1e5(reference_1e5):
    problems, reference = reference_1e5
    check_float32_accuracy(problems, reference, filter_methods=("sequential",))
    # The test has power: one running float32 sum misses the target on the flat problem.
    ref = reference["flat"][0]["sequential"]
    naive = float(jax.jit(naive_float32_loglik)(*as_jnp(*problems["flat"], dtype=jnp.float32)))
    assert abs(naive - ref) / abs(ref) > 1e-5


@pytest.mark.slow
def test_float32_accuracy_long_sequence_1e6(reference_1e6):
    problems, reference = reference_1e6
    check_float32_accuracy(problems, reference, filter_methods=METHODS)


# ----------------------------------------------------------------------------- misc


def test_input_validation():
    li, lt, lo = as_jnp(*random_hmm(np.random.default_rng(0), 3, 5), dtype=jnp.float32)
    with pytest.raises(ValueError, match="log_obs must have shape"):
        hmm_loglik(li, lt, lo[None])
    with pytest.raises(ValueError, match="log_init must have shape"):
        hmm_loglik(li[:2], lt, lo)
    with pytest.raises(ValueError, match="log_trans must have shape"):
        hmm_loglik(li, jnp.zeros((5, 3, 3)), lo)
    with pytest.raises(ValueError, match="mask must have shape"):
        hmm_loglik(li, lt, lo, mask=jnp.ones(4, bool))
    with pytest.raises(ValueError, match="mask must be boolean"):
        hmm_loglik(li, lt, lo, mask=jnp.ones(5))
    with pytest.raises(ValueError, match="method must be one of"):
        hmm_viterbi(li, lt, lo, method="fast")


def test_docstring_examples():
    failures, tried = doctest.testmod(H, optionflags=doctest.ELLIPSIS)
    assert tried > 5 and failures == 0
