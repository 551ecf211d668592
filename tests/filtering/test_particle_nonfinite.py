"""Non-finite densities in the particle filter (issue 19): a particle whose log weight is NaN or
+inf gets zero weight and is counted, per step, in ``PFResult.num_nonfinite`` (and in
``PFStepInfo.num_nonfinite``, ``num_nonfinite_total``); a -inf (a legitimate zero density) gets
zero weight and is not counted; a step where no particle has a finite weight makes the estimate
-inf. PMMH's use of the counts is tested in tests/engines/test_pmmh.py.

Every count is checked exactly against the particles themselves (``keep_history=True``) and every
step's estimate against a NumPy recomputation from them: with ``ess_threshold=1`` the filter
resamples at every step, so log p-hat(y_t | y_{0:t-1}) = log sum_j w_t^j - log N over the finite
weights. One model covers every case through its parameters (traced: one compile per dtype):

    x_0 ~ N(0, 1), x_t = 0.5 x_{t-1} + N(0, 1),  y_t ~ N(x_t, s^2) with s = a + x_t,

whose log density is NaN where s < 0 (the log of a negative scale), changed to -inf where
x_t > zero_above or y_t > 1000 and to +inf where x_t > inf_above.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bayeslik.filtering import particle as pf

SEED = int(os.environ.get("BAYESLIK_TEST_SEED", "0"))
T, N = 6, 16
OFF = 1e6  # a threshold no particle reaches


def _obs(p, x, y, t):
    s = p["a"] + x
    lg = -0.5 * ((y - x) / s) ** 2 - jnp.log(s) - 0.5 * jnp.log(2 * jnp.pi)
    lg = jnp.where((x > p["zero_above"]) | (y > 1e3), -jnp.inf, lg)
    return jnp.where(x > p["inf_above"], jnp.inf, lg)


SSM = pf.reparametrised_ssm(lambda p, e: e, lambda p, x, e, t: 0.5 * x + e, _obs)

CLEAN = dict(a=50.0, zero_above=OFF, inf_above=OFF)
#: case -> (params, {step: the observation put there})
CASES = {
    "nan": (dict(CLEAN, a=0.3), {}),  # ~40% of the particles NaN
    "posinf": (dict(CLEAN, inf_above=0.5), {}),
    "neginf": (dict(CLEAN, zero_above=0.5), {}),
    "clean": (CLEAN, {}),
    "nan_step": (CLEAN, {2: np.nan}),  # every particle NaN at t = 2
    "all_nan": (dict(CLEAN, a=-100.0), {}),  # every particle NaN at every step
    "zero_then_nan": (CLEAN, {2: 1e4, 4: np.nan}),  # all zero at t = 2, then all NaN
}


def _inputs(case: str, dtype):
    params, put = CASES[case]
    ys = np.random.default_rng(SEED).normal(size=T).astype(dtype)
    for t, value in put.items():
        ys[t] = value
    return {k: np.asarray(v, dtype) for k, v in params.items()}, ys


def _filter(case: str, dtype, key: int = 0) -> tuple[pf.PFResult, dict, np.ndarray]:
    params, ys = _inputs(case, dtype)
    res = pf.particle_filter(jax.random.key(SEED + key), SSM, params, ys, N, ess_threshold=1.0,
                             quantiles=(), keep_history=True)
    return res, params, ys


def _reference(xs: np.ndarray, ys: np.ndarray, params: dict) -> tuple[np.ndarray, np.ndarray]:
    """(count of NaN / +inf log weights per step, the step estimates) from the particles xs
    (T, N), in float64. Counted while the running estimate is finite (up to and including the
    first step whose estimate is -inf)."""
    x = np.asarray(xs, np.float64)
    y = np.asarray(ys, np.float64)[:, None]
    p = {k: float(v) for k, v in params.items()}
    with np.errstate(invalid="ignore", divide="ignore"):
        s = p["a"] + x
        lg = -0.5 * ((y - x) / s) ** 2 - np.log(s) - 0.5 * np.log(2 * np.pi)
    lg = np.where((x > p["zero_above"]) | (y > 1e3), -np.inf, lg)
    lg = np.where(x > p["inf_above"], np.inf, lg)
    bad = np.isnan(lg) | (lg == np.inf)
    w = np.where(bad, -np.inf, lg)
    top = w.max(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        inc = np.log(np.exp(w - np.where(np.isfinite(top), top, 0.0)).sum(axis=1)) \
            + np.where(np.isfinite(top[:, 0]), top[:, 0], -np.inf) - np.log(N)
    live = np.concatenate([[True], np.cumsum(inc)[:-1] > -np.inf])
    return np.where(live, bad.sum(axis=1), 0), inc


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    if request.param == "float64":
        request.getfixturevalue("x64")
    return np.dtype(request.param)


@pytest.mark.parametrize("case", list(CASES))
def test_counts_and_estimates_match_the_particles(case, dtype):
    res, params, ys = _filter(case, dtype)
    assert res.particles.dtype == dtype and res.log_likelihood.dtype == dtype
    assert res.num_nonfinite.shape == (T,) and res.num_nonfinite.dtype == jnp.int32
    count, inc = _reference(res.history_particles, ys, params)
    np.testing.assert_array_equal(np.asarray(res.num_nonfinite), count)
    assert int(res.num_nonfinite_total) == int(count.sum())
    # every step's estimate from the finite weights alone (float rounding of the log-sum-exp)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    got = np.asarray(res.log_likelihood_increments, np.float64)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(inc))
    np.testing.assert_allclose(got, inc, rtol=tol, atol=tol)
    total = float(res.log_likelihood)
    if case in ("clean", "neginf"):  # -inf is a zero density, not counted
        assert int(res.num_nonfinite_total) == 0 and np.isfinite(total)
    elif case in ("nan", "posinf"):  # some particles: counted, zero weight, a finite estimate
        assert int(res.num_nonfinite_total) > 0 and np.isfinite(total)
        assert np.all(count < N)
    elif case == "nan_step":  # every particle NaN at step 2: that step and the estimate -inf
        assert count[2] == N and int(res.num_nonfinite_total) == N
        assert got[2] == -np.inf and total == -np.inf
        assert np.all(np.isfinite(np.delete(got, 2)))  # the filter goes on with uniform weights
    elif case == "all_nan":  # counted at step 0, after which the estimate is -inf
        assert np.asarray(res.num_nonfinite).tolist() == [N] + [0] * (T - 1)
        assert np.all(got == -np.inf) and total == -np.inf
    else:  # a legitimate zero at step 2 (not counted); the NaN at step 4 comes after it
        assert int(res.num_nonfinite_total) == 0 and got[2] == got[4] == -np.inf
        assert total == -np.inf
    if case == "posinf":  # before issue 19 one +inf weight made the step's estimate -inf
        assert np.all(np.isfinite(got))


def test_lookahead_densities_are_counted_and_get_no_offspring():
    """method="auxiliary": a NaN look-ahead eta(x_{t-1}) counts once per particle at step t, and
    those particles get zero first-stage weight, so no particle descends from one."""

    def lookahead(p, x_prev, y, t):
        return jnp.where(x_prev < -0.3, jnp.nan, -0.5 * (y - 0.5 * x_prev) ** 2)

    ssm = SSM._replace(lookahead_logdensity_fn=lookahead)
    params, ys = _inputs("clean", np.float32)
    res = pf.particle_filter(jax.random.key(SEED), ssm, params, ys, N, method="auxiliary",
                             ess_threshold=1.0, quantiles=(), keep_history=True)
    xs = np.asarray(res.history_particles)
    expected = np.concatenate([[0], (xs[:-1] < -0.3).sum(axis=1)])
    np.testing.assert_array_equal(np.asarray(res.num_nonfinite), expected)
    assert expected.sum() > 0 and np.isfinite(float(res.log_likelihood))
    anc = np.asarray(res.history_ancestors)
    for t in range(1, T):
        assert np.all(xs[t - 1][anc[t]] >= -0.3), t


def test_online_steps_report_the_same_counts():
    """filter_init / filter_step with the keys particle_filter splits give its counts."""
    res, params, ys = _filter("nan", np.float32)
    keys = jax.random.split(jax.random.key(SEED), T)
    state, info = pf.filter_init(keys[0], SSM, params, ys[0], N)
    counts = [int(info.num_nonfinite)]
    for t in range(1, T):
        state, info = pf.filter_step(keys[t], SSM, params, state, ys[t], t, ess_threshold=1.0)
        counts.append(int(info.num_nonfinite))
    assert counts == np.asarray(res.num_nonfinite).tolist() and sum(counts) > 0


def test_log_likelihood_fn_returns_the_count():
    """The pure function PMMH runs: (estimate, num_nonfinite_total) of the filter with the same
    pre-drawn noise."""
    params, ys = _inputs("nan", np.float32)
    u = pf.draw_noise(jax.random.key(SEED), SSM, T, N)
    fn = jax.jit(pf.log_likelihood_fn(SSM, N, ess_threshold=1.0, correlated=True,
                                      count_nonfinite=True))
    ll, num = fn(params, ys, u)
    res = pf.particle_filter(None, SSM, params, ys, N, ess_threshold=1.0, quantiles=(), u=u)
    assert int(num) == int(res.num_nonfinite_total) > 0
    assert float(ll) == float(res.log_likelihood)
    plain = pf.log_likelihood_fn(SSM, N, ess_threshold=1.0, correlated=True)
    assert float(jax.jit(plain)(params, ys, u)) == float(ll)


def test_results_still_build_positionally():
    """The new fields trail with defaults: existing positional construction keeps working."""
    res = pf.PFResult(*range(8))
    assert res.history_ancestors is None and res.num_nonfinite is None
    assert res.num_nonfinite_total is None
    assert pf.PFStepInfo(*range(4)).num_nonfinite is None
