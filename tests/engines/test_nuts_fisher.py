"""NUTS's Fisher-divergence mass-matrix adaptation (``mass_adaptation="fisher"``, issue #17).

The estimate ``sqrt(var(x) / var(grad log p))`` is checked three ways: on iid draws of a
correlated Gaussian against its limit, within the window size's own standard error; through a
whole warmup on a Gaussian with scales 0.01..100, where it is exact (the gradient is
``-x / sigma**2``, so the ratio is ``sigma**2`` whatever the draws); and iteration by iteration
against a NumPy reference of the schedule (nutpie's overlapping windows, or Stan's) driven by the
same draws. The draws then pass the moment check of the other NUTS tests, in float32 and float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import bayeslik as bl
from bayeslik.engines import nuts
from bayeslik.errors import EngineError
from bayeslik.models import reference
from tests.harness import K, check_moments

SCALES = np.logspace(-2, 2, 5)  # 0.01, 0.1, 1, 10, 100


def _scaled_model(scales):
    numpyro.sample("x", dist.Normal(0.0, scales))


def _scaled_posterior():
    # the scales are a data array, so a float32 and a float64 Posterior differ in cache_key:
    # without data, a float64 run in this process reused the float32 run's programs, whose
    # Posterior unflattens to float32 (a metric off by 3e-8 relative)
    return bl.Posterior(_scaled_model, scales=jnp.asarray(SCALES))


# ------------------------------------------------------------------ options
def test_options_are_checked_before_compiling(no_jit):
    with pytest.raises(EngineError, match=r"mass_adaptation='nutpie'.*one of \['auto', 'stan', 'fisher', 'fisher_lowrank'"):
        nuts.NUTSConfig(mass_adaptation="nutpie")
    with pytest.raises(EngineError, match="mass_adaptation='fisher'.*dense_mass=False"):
        nuts.NUTSConfig(mass_adaptation="fisher", dense_mass=True)
    post = _scaled_posterior()
    with pytest.raises(EngineError, match="mass_adaptation"):
        bl.fit(post, "nuts", mass_adaptation="Fisher", progress_bar=False)
    # the default: the Fisher adaptations leave a chain stuck on arma11 started far out
    # (test_nuts_warmup's far-out arma test fails with either)
    assert nuts.NUTSConfig().mass_adaptation == "stan"


# ------------------------------------------------------------------ the estimate
def test_estimate_on_iid_draws_within_its_standard_error(rng):
    """A Gaussian with correlation rho: the diagonal that minimises the Fisher divergence is
    sqrt(Sigma_ii / P_ii) = sigma_i^2 sqrt(1 - rho^2) (P the precision), not the variance.
    From n iid draws, log(estimate) has sd |rho| / sqrt(n) (delta method: x_i and g_i have
    correlation -sqrt(1 - rho^2)); every estimate lies within K of those of the limit, and
    the variance (Stan's estimate) would lie far outside."""
    rho, sig = 0.9, np.array([0.05, 20.0])
    cov = np.array([[1, rho], [rho, 1]]) * np.outer(sig, sig)
    prec = np.linalg.inv(cov)
    limit = sig**2 * np.sqrt(1 - rho**2)
    update = jax.jit(nuts._moments_update)
    for n in (50, 400):
        for _ in range(5):
            x = rng.multivariate_normal(np.zeros(2), cov, size=n)
            m = nuts._moments_init(2, jnp.float32)
            for xi in x:
                m = update(m, jnp.asarray(xi, jnp.float32), jnp.asarray(-prec @ xi, jnp.float32))
            est = np.asarray(nuts.fisher_inverse_mass(m, jnp.ones(2)))
            z = np.abs(np.log(est / limit)) / (rho / np.sqrt(n))
            assert np.all(z < K), (n, est, limit, z)
            # Welford in float32 keeps the 0.05-scale coordinate (raw sums of x^2 would not)
            np.testing.assert_allclose(float(m.count), n)
    # the variance is off by the factor 1/sqrt(1 - rho^2) = 2.3: over four times the tolerance
    assert np.all(np.abs(np.log(sig**2 / limit)) > 4 * K * rho / np.sqrt(400))


def test_estimate_keeps_the_previous_value_where_it_is_undefined():
    """Fewer than three draws, a coordinate that did not move, a constant gradient."""
    prev = jnp.array([2.0, 3.0, 4.0])
    m = nuts._moments_init(3, jnp.float32)
    xs = [jnp.array([0.0, 1.0, 1.0]), jnp.array([1.0, 1.0, 2.0]), jnp.array([3.0, 1.0, 5.0])]
    for i, x in enumerate(xs):
        g = jnp.array([-x[0], -x[1], 7.0])  # coordinate 2: a linear log density
        m = nuts._moments_update(m, x, g)
        inv = np.asarray(nuts.fisher_inverse_mass(m, prev))
        if i < 2:
            np.testing.assert_array_equal(inv, prev)
    # coordinate 0: gradient -x, so the estimate is 1 (not shrunk as Stan shrinks variances)
    np.testing.assert_allclose(inv, [1.0, 3.0, 4.0], rtol=1e-6)
    g0 = nuts.gradient_inverse_mass(jnp.array([-4.0, 0.0, jnp.nan, 1e-30]))
    np.testing.assert_allclose(np.asarray(g0), [0.25, 1.0, 1.0, 1e20], rtol=1e-6)


# ------------------------------------------------------------------ schedule and updates
@pytest.mark.parametrize("num_warmup", [0, 19, 20, 50, 100, 151, 300, 1000, 2000])
def test_fisher_schedule(num_warmup):
    stage, switch = nuts.fisher_schedule(num_warmup)
    assert stage.shape == switch.shape == (num_warmup,)
    if num_warmup < 20:
        assert not stage.any() and not switch.any()
        return
    final = num_warmup - int(0.15 * num_warmup)
    early = int(0.3 * num_warmup)
    assert np.all(stage[:final] != nuts.FAST) and np.all(stage[final:] == nuts.FAST)
    assert np.flatnonzero(stage == nuts.RESTART).tolist() == [2]
    # a switch is the first iteration whose background window is full (10 draws before 30% of
    # the warmup, then 80) and after which another full window fits before the final phase
    freq = lambda t: 10 if t < early else 80  # noqa: E731
    ends = np.flatnonzero(switch)
    last = -1
    for t in range(final):
        due = t - last >= freq(t) and t + freq(t) <= final
        assert bool(switch[t]) == due, (t, last)
        if due:
            last = t
    assert len(ends) >= (1 if num_warmup >= 50 else 0)
    assert not switch[final:].any()


def _reference_fisher(stage, switch, xs, gs, div, prev):
    """The Fisher adaptation's windows in NumPy: the inverse metric after each iteration."""
    cur, bg, out = [], [], []
    for t in range(len(stage)):
        slow = stage[t] in (nuts.SLOW, nuts.RESTART)
        if slow and not div[t]:
            cur.append(t)
            bg.append(t)
        if slow and switch[t]:
            cur, bg = bg, []
        if slow and len(cur) >= 3:
            prev = np.clip(np.sqrt(xs[cur].var(0) / gs[cur].var(0)), *nuts.FISHER_CLIP)
        out.append(prev.copy())
    return np.array(out)


def test_updates_follow_the_windows(x64):
    """Driven by given draws, gradients and divergences (as the Stan port's test drives Stan's
    adaptation), the inverse metric after every iteration equals a NumPy reference to 1e-9: the
    draws of diverging transitions left out, the background window switched in, the metric
    set after every slow iteration; the step size found again once, under the new metric."""
    rng = np.random.default_rng(1)
    num_warmup, d = 300, 3
    scales = np.array([0.1, 1.0, 30.0])
    xs = rng.standard_t(5, size=(num_warmup, d)) * scales + 2.0
    # the gradient of a Student-t(5) log density, plus noise: not a Gaussian's
    gs = -6.0 * (xs - 2.0) / (5.0 * scales**2 + (xs - 2.0) ** 2) + 0.1 * rng.normal(size=xs.shape)
    div = rng.uniform(size=num_warmup) < 0.1
    cfg = nuts.NUTSConfig(mass_adaptation="fisher")
    stage, switch = nuts.fisher_schedule(num_warmup)

    def finder(key, fn, position, logdensity, grad, inv_mass, eps):
        return 1000.0 + jnp.sum(inv_mass)  # marks where it was called, and with which metric

    adapt = nuts.build_adapt(lambda z: -0.5 * z @ z, cfg, find_step_size=finder)
    init = nuts.build_warmup(lambda z: -0.5 * z @ z, cfg, find_step_size=finder)[0]
    state = init(nuts.ChainState(jnp.zeros(d), jnp.zeros(()), jnp.zeros(d), jnp.asarray(0.3),
                                 jnp.ones(d)))

    def step(state, inp):
        x, g, st, end, dv = inp
        state = state._replace(chain=state.chain._replace(position=x, logdensity_grad=g))
        state = adapt(jax.random.key(0), state, st, end, 0.7, dv)
        return state, (state.chain.inverse_mass_matrix, state.chain.step_size)

    _, (metrics, steps) = jax.jit(lambda s, xs: jax.lax.scan(step, s, xs))(
        state, (jnp.asarray(xs), jnp.asarray(gs), jnp.asarray(stage), jnp.asarray(switch),
                jnp.asarray(div)))
    ref = _reference_fisher(stage, switch, xs, gs, div, np.ones(d))
    np.testing.assert_allclose(np.asarray(metrics), ref, rtol=1e-9)
    assert not np.allclose(ref[-1], 1.0)
    # the step size is found again, under the new metric, at the RESTART iteration only;
    # elsewhere dual averaging sets it
    steps = np.asarray(steps)
    np.testing.assert_allclose(steps[2], 1000.0 + ref[2].sum(), rtol=1e-12)
    marked = np.isclose(steps, 1000.0 + ref.sum(1), rtol=1e-12, atol=0)
    assert np.flatnonzero(marked).tolist() == [2]


# ------------------------------------------------------------------ whole runs
#: the runs' settings: one chunk length (143) for the warmup-only and the whole runs, so each
#: dtype compiles one chunk program for all of them
RUN = dict(num_warmup=300, num_samples=1000, num_chains=2, progress_bar=False,
           mass_adaptation="fisher", num_chunks=7)


def _warmup_metric(mass_adaptation: str, num_warmup: int, seed: int):
    """(inverse metric, step size, draws in the final window, work counts) of 2 chains after a whole
    warmup on the scaled Gaussian, through the engine's own compiled programs."""
    post = _scaled_posterior()
    cfg = nuts.NUTSConfig(**{**RUN, "num_warmup": num_warmup, "mass_adaptation": mass_adaptation})
    lay = nuts._layout(1, cfg)
    progs = nuts._programs(post, cfg, lay.mesh, lay.batched)
    starts = nuts._starts([post], [jax.random.key(seed)], cfg)
    idx = np.arange(2)
    data = nuts._data([post], 2)
    work = {"num_grad": np.zeros(2, np.int64), "warmup_divergences": np.zeros(2, np.int64),
            "num_nonfinite": np.zeros(2, np.int64), "num_nonfinite_init": np.zeros(2, np.int64),
            "nonfinite_point": np.zeros((2, 5)), "nonfinite_init_point": np.zeros((2, 5))}

    class Bar:
        def update(self, n):
            pass

    state = nuts._start(progs, [post], starts, idx, data, cfg, work)
    state = nuts._warmup(progs, state, starts.warmup_keys[idx], data, cfg, idx, work, Bar())
    return (np.asarray(state.chain.inverse_mass_matrix), np.asarray(state.chain.step_size),
            np.asarray(state.welford.current.count), work)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_warmup_metric_is_the_variances_on_a_scaled_gaussian(dtype, seed, request):
    """Scales 0.01..100: after the warmup, the Fisher inverse metric of each chain is sigma^2
    to float rounding (exact: the gradient is -x / sigma^2), and the warmup is cheap."""
    if dtype == "float64":
        request.getfixturevalue("x64")
    inv, eps, n, work = _warmup_metric("fisher", 300, seed)
    assert inv.dtype == np.dtype(dtype)
    # 300 iterations: the last switch at 169, so the final window holds the draws 90..254
    # (fewer where a transition diverged)
    assert np.all((n > 100) & (n <= 165)), n
    np.testing.assert_allclose(inv, np.broadcast_to(SCALES**2, inv.shape),
                               rtol=2e-5 if dtype == "float32" else 1e-10)
    assert np.all((eps > 0.3) & (eps < 2.0)), eps  # ~1 for a unit Gaussian in 5-D
    # under 10 gradients an iteration (measured: 5.3-6.4 for 8 chains; Stan's windows 140-210,
    # their first 75 iterations moving with the identity metric across scales 1e4 apart)
    assert np.all(work["num_grad"] < 10 * 300), work["num_grad"]


def test_draws_pass_the_moment_check(seed):
    """The scaled Gaussian (exact mean 0, sd SCALES), float32: draws within K MCSE of the exact
    moments and no flag; one chunk program served warmup and sampling (and the warmup-only
    runs above), and a second fit compiles nothing."""
    post = _scaled_posterior()
    fit = bl.fit(post, "nuts", seed=seed, **RUN)
    assert not fit.flags, fit.flags
    check_moments(fit, np.zeros(5), SCALES, site="x")
    cfg = nuts.NUTSConfig(**RUN)
    lay = nuts._layout(1, cfg)
    progs = nuts._programs(post, cfg, lay.mesh, lay.batched)
    assert sum(sig[0] == "chunk" for sig in progs._compiled) == 1
    again = bl.fit(post, "nuts", seed=seed + 1, **RUN)
    assert again.cost.compile_s < 1.0 and again.cost.compile_cached


@pytest.mark.slow
def test_correlated_gaussian_within_mcse(seed):
    """The 6-D correlated Gaussian of the reference problems (where the Fisher diagonal is not
    the variance): moments within K MCSE, R-hat below 1.01, no flag."""
    import arviz_stats as azs

    prob = reference.get("correlated_gaussian")
    fit = bl.fit(prob.posterior(), "nuts", seed=seed, num_warmup=500, num_samples=2000,
                 num_chains=4, progress_bar=False, mass_adaptation="fisher")
    assert not fit.flags, fit.flags
    for var, mean in prob.posterior_mean.items():
        check_moments(fit, mean, prob.posterior_sd[var], site=var)
    rhat = azs.rhat(fit.idata, group="posterior")
    assert max(float(v.max()) for v in rhat.data_vars.values()) < 1.01


def test_draws_pass_the_moment_check_in_float64(x64, seed):
    fit = bl.fit(_scaled_posterior(), "nuts", seed=seed, **RUN)
    assert fit.draws("x").dtype == np.float64
    assert not fit.flags, fit.flags
    check_moments(fit, np.zeros(5), SCALES, site="x")
