"""Tests for bayeslik.models.posteriordb_ode: the two posteriordb ODE models, solved with diffrax.

The reference log densities are written by hand from the bundled ``.stan`` files in float64 with
SciPy: the ODE by ``scipy.integrate.solve_ivp`` (DOP853, rtol = atol = 1e-10), the densities by
``scipy.stats``. They are Stan's full log density (every ``~`` statement as its ``_lpdf`` with all
constants, no Jacobian, since the values are constrained).

Compiling a diffrax solve (and its reverse-mode gradient) takes seconds, so each test compiles one
function: the log density of a batch of draws under ``jax.vmap`` (which is also how bayeslik runs
chains), or its gradient at one draw; nothing runs op by op.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers
from numpyro.infer.util import log_density
from scipy import stats
from scipy.integrate import solve_ivp

from bayeslik.models import posteriordb, posteriordb_ode

NAMES = ["hudson_lynx_hare-lotka_volterra", "one_comp_mm_elim_abs-one_comp_mm_elim_abs"]

REFERENCE_SHAPES = {
    "hudson_lynx_hare-lotka_volterra": {"theta": (4,), "z_init": (2,), "sigma": (2,)},
    "one_comp_mm_elim_abs-one_comp_mm_elim_abs": {"k_a": (), "K_m": (), "V_m": (), "sigma": ()},
}
# Stan's transformed parameters (not in the reference draws), kept as deterministic sites
DETERMINISTIC_SHAPES = {
    "hudson_lynx_hare-lotka_volterra": {"z": (20, 2)},
    "one_comp_mm_elim_abs-one_comp_mm_elim_abs": {"C": (20, 1)},
}
OBSERVED_SHAPES = {
    "hudson_lynx_hare-lotka_volterra": {"y_init": (2,), "y": (20, 2)},
    "one_comp_mm_elim_abs-one_comp_mm_elim_abs": {"C_hat": (20,)},
}

# NumPyro log joint minus Stan's full log density, computed here independently of the module.
# Lotka-Volterra: TruncatedNormal(low=0) priors on theta, normalised, where Stan's normal on
# real<lower=0> is not: minus the log mass above 0 of each of the four priors.
# One-compartment: HalfCauchy(1) for Stan's cauchy(0, 1) on real<lower=0>: log 2 for each of four.
EXPECTED_OFFSET = {
    "hudson_lynx_hare-lotka_volterra": -float(
        np.sum(stats.norm.logsf(0.0, [1.0, 0.05, 1.0, 0.05], [0.5, 0.05, 0.5, 0.05]))
    ),
    "one_comp_mm_elim_abs-one_comp_mm_elim_abs": 4.0 * math.log(2.0),
}

DRAWS = [(0, 0), (3, 517), (9, 999)]
# appended to the batch of draws: a point where the solver fails (hare and lynx rates of 300 per
# year make the solution oscillate too fast for MAX_STEPS steps); its log density must be NaN (a
# divergence for NUTS), with the other points in the batch unaffected
FAILING = {"hudson_lynx_hare-lotka_volterra": {"theta": np.array([300.0, 0.05, 300.0, 0.05])}}
GRAD_DRAW = (3, 517)

# float32: the ODE is solved at rtol = atol = 1e-6 (float32 resolves 1.2e-7), which leaves a relative
# error of up to ~4e-6 in the solution after 20 output times; each lognormal term moves by about
# (residual / sigma^2) times that, with residuals ~0.1-0.3 and sigma ~0.13-0.25, and there are 20-42
# such terms, plus the float32 rounding of ~45 terms of size 1-10. Observed: up to 1.8e-6 relative
# (7e-5 absolute on a log density of -40). Asserted: 2e-5, a factor of 10 above that.
RTOL_FLOAT32 = 2e-5
# float64: the ODE is solved at rtol = atol = 1e-10 on both sides; observed agreement <= 9e-10 relative.
RTOL_FLOAT64 = 1e-8


# lotka_volterra solves at the Stan program's 1e-5 / 1e-3 by default (the reference draws were
# made so); to compare its mathematics with SciPy's 1e-10 solution the tests pass 1e-10 (never
# tighter than the dtype allows: 1e-6 in float32)
TIGHT = {"hudson_lynx_hare-lotka_volterra": {"rtol": 1e-10, "atol": 1e-10}}


@pytest.fixture(scope="module")
def posteriors():
    out = {name: posteriordb.load(name) for name in NAMES}
    for name, tol in TIGHT.items():
        out[name]["data"] = {**out[name]["data"], **tol}
    return out


def test_lotka_volterra_at_stans_tolerances(x64):
    """At the Stan program's own tolerances the log density moves by about 1e-2 (the ODE error at
    1e-5 / 1e-3), and no further: the default is Stan's model, not a different one."""
    name = "hudson_lynx_hare-lotka_volterra"
    post = posteriordb.load(name)
    ref = posteriordb.reference_params(name)
    for chain, draw in DRAWS:
        params = {k: jnp.asarray(v[chain, draw]) for k, v in ref.items()}
        lp_stan_tol = float(log_density(post["model"], (), post["data"], params)[0])
        expected = stan_lp_lotka_volterra(post["data"], _draw(ref, chain, draw))
        gap = abs(lp_stan_tol - EXPECTED_OFFSET[name] - expected)
        assert 0 < gap < 0.1, gap


# --------------------------------------------------------------------------------------------------
# Stan log densities, written from the .stan files
# --------------------------------------------------------------------------------------------------
def _lognormal_logpdf(y, mu, sigma):
    """Stan's lognormal_lpdf(y | mu, sigma)."""
    return stats.lognorm.logpdf(y, s=sigma, scale=np.exp(mu))


def lotka_volterra_solution(data, theta, z_init):
    def dz_dt(t, z, alpha, beta, gamma, delta):
        u, v = z
        return [(alpha - beta * v) * u, (-gamma + delta * u) * v]

    ts = data["ts"]
    sol = solve_ivp(dz_dt, (0.0, ts[-1]), z_init, method="DOP853", t_eval=ts, args=tuple(theta),
                    rtol=1e-10, atol=1e-10)
    assert sol.success
    return sol.y.T  # (N, 2)


def stan_lp_lotka_volterra(data, p):
    theta, z_init, sigma = p["theta"], p["z_init"], p["sigma"]
    assert np.all(theta > 0) and np.all(z_init > 0) and np.all(sigma > 0)
    z = lotka_volterra_solution(data, theta, z_init)
    lp = stats.norm.logpdf(theta[[0, 2]], 1, 0.5).sum()  # theta[{1, 3}] ~ normal(1, 0.5)
    lp += stats.norm.logpdf(theta[[1, 3]], 0.05, 0.05).sum()  # theta[{2, 4}] ~ normal(0.05, 0.05)
    lp += _lognormal_logpdf(sigma, -1, 1).sum()  # sigma ~ lognormal(-1, 1)
    lp += _lognormal_logpdf(z_init, math.log(10), 1).sum()  # z_init ~ lognormal(log(10), 1)
    for k in range(2):
        lp += _lognormal_logpdf(data["y_init"][k], math.log(z_init[k]), sigma[k])
        lp += _lognormal_logpdf(data["y"][:, k], np.log(z[:, k]), sigma[k]).sum()
    return lp


def one_comp_solution(data, k_a, K_m, V_m):
    D, V = data["D"], data["V"]

    def dC_dt(t, y):
        dose = math.exp(-k_a * t) * D * k_a / V if t > 0 else 0.0
        elim = (V_m / V) * y[0] / (K_m + y[0])
        return [dose - elim]

    times = data["times"]
    sol = solve_ivp(dC_dt, (data["t0"], times[-1]), [0.0], method="DOP853", t_eval=times,
                    rtol=1e-10, atol=1e-10)
    assert sol.success
    return sol.y.T  # (N_t, 1)


def stan_lp_one_comp(data, p):
    k_a, K_m, V_m, sigma = (float(p[k]) for k in ("k_a", "K_m", "V_m", "sigma"))
    assert min(k_a, K_m, V_m, sigma) > 0
    C = one_comp_solution(data, k_a, K_m, V_m)
    lp = stats.cauchy.logpdf([k_a, K_m, V_m, sigma], 0, 1).sum()  # each ~ cauchy(0, 1)
    lp += _lognormal_logpdf(data["C_hat"], np.log(C[:, 0]), sigma).sum()
    return lp


STAN_LP = {
    "hudson_lynx_hare-lotka_volterra": stan_lp_lotka_volterra,
    "one_comp_mm_elim_abs-one_comp_mm_elim_abs": stan_lp_one_comp,
}
# name of the deterministic site holding the ODE solution, and the SciPy solution
SOLUTION = {
    "hudson_lynx_hare-lotka_volterra": (
        "z", lambda d, p: lotka_volterra_solution(d, p["theta"], p["z_init"])
    ),
    "one_comp_mm_elim_abs-one_comp_mm_elim_abs": (
        "C", lambda d, p: one_comp_solution(d, p["k_a"], p["K_m"], p["V_m"])
    ),
}


def _draw(tree, chain, draw):
    return {k: v[chain, draw] for k, v in tree.items()}


def _batch(tree, draws):
    return {k: np.stack([v[c, d] for c, d in draws]) for k, v in tree.items()}


def _site_values(post):
    """Function of the parameters: (log joint, values of the sample / deterministic sites)."""

    def fn(params):
        lp, trace = log_density(post["model"], (), post["data"], params)
        values = {k: s["value"] for k, s in trace.items() if s["type"] in ("sample", "deterministic")}
        return lp, values

    return fn


# --------------------------------------------------------------------------------------------------
# loading and sites
# --------------------------------------------------------------------------------------------------
def test_registered():
    assert set(NAMES) <= set(posteriordb.names())
    assert set(posteriordb_ode.MODELS) == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_load_and_sites(posteriors, name):
    post = posteriors[name]
    assert set(post) == {"model", "data", "reference", "info"}
    assert post["info"]["name"] == name
    assert post["info"]["stan_lp_offset"] == pytest.approx(EXPECTED_OFFSET[name], rel=1e-12)
    assert "integrate_ode" in posteriordb.stan_code(name)
    ref = post["reference"]
    assert set(ref) == set(REFERENCE_SHAPES[name])
    for key, shape in REFERENCE_SHAPES[name].items():
        assert ref[key].shape == (10, 1000) + shape, key
        assert np.all(ref[key] > 0), key
    # site types and shapes from a trace, evaluated abstractly (nothing is compiled)
    types = {}

    def trace_values(params):
        trace = handlers.trace(handlers.substitute(post["model"], params)).get_trace(**post["data"])
        types.update({k: (s["type"], s.get("is_observed", False)) for k, s in trace.items()})
        return {k: s["value"] for k, s in trace.items() if s["type"] in ("sample", "deterministic")}

    shapes = jax.eval_shape(trace_values, _draw(ref, 0, 0))
    for key, shape in REFERENCE_SHAPES[name].items():
        assert types[key] == ("sample", False), key
        assert shapes[key].shape == shape, key
    for key, shape in DETERMINISTIC_SHAPES[name].items():
        assert types[key][0] == "deterministic" and shapes[key].shape == shape, key
    for key, shape in OBSERVED_SHAPES[name].items():
        assert types[key] == ("sample", True) and shapes[key].shape == shape, key


def test_data_checked():
    with pytest.raises(ValueError, match="length"):
        posteriordb_ode.one_comp_mm_elim_abs(0.0, 30.0, 2.0, 3, np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="shape"):
        posteriordb_ode.lotka_volterra(2, np.array([1.0, 2.0]), np.ones(2), np.ones((2, 3)))


# --------------------------------------------------------------------------------------------------
# faithfulness: NumPyro log joint == Stan's log density + the documented constant
# --------------------------------------------------------------------------------------------------
def _check_log_density(post, name, rtol, float_dtype):
    ref = post["reference"]
    fn = jax.jit(jax.vmap(_site_values(post)))
    batch = _batch(ref, DRAWS)
    if name in FAILING:
        bad = dict(_draw(ref, *DRAWS[0]), **FAILING[name])
        batch = {k: np.concatenate([v, bad[k][None]]) for k, v in batch.items()}
    lp, values = fn(batch)
    assert lp.dtype == float_dtype
    if name in FAILING:
        assert np.isnan(float(lp[-1]))
        assert np.all(np.isnan(values[SOLUTION[name][0]][-1]))  # the solver failed: all NaN
    key, solution = SOLUTION[name]
    for i, (chain, draw) in enumerate(DRAWS):
        p = _draw(ref, chain, draw)
        expected = STAN_LP[name](post["data"], p) + EXPECTED_OFFSET[name]
        assert float(lp[i]) == pytest.approx(expected, rel=rtol), (chain, draw)
        # the deterministic site holds the ODE solution (Stan's transformed parameter)
        np.testing.assert_allclose(values[key][i], solution(post["data"], p), rtol=100 * rtol)
        for site in REFERENCE_SHAPES[name]:
            np.testing.assert_allclose(values[site][i], p[site], rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_log_density_matches_stan_float64(x64, posteriors, name):
    _check_log_density(posteriors[name], name, RTOL_FLOAT64, jnp.float64)


@pytest.mark.parametrize("name", NAMES)
def test_log_density_matches_stan_float32(posteriors, name):
    _check_log_density(posteriors[name], name, RTOL_FLOAT32, jnp.float32)


# --------------------------------------------------------------------------------------------------
# gradients through the solver
# --------------------------------------------------------------------------------------------------
def _gradient(post):
    params = _draw(post["reference"], *GRAD_DRAW)
    return params, jax.jit(jax.grad(lambda p: _site_values(post)(p)[0]))(params)


@pytest.mark.parametrize("name", NAMES)
def test_gradient_float64_matches_finite_differences(x64, posteriors, name):
    post = posteriors[name]
    params, grad = _gradient(post)
    # central differences of the SciPy reference, one coordinate at a time
    for site, value in params.items():
        g = np.asarray(grad[site])
        assert g.shape == np.shape(value) and g.dtype == np.float64 and np.all(np.isfinite(g)), site
        for index in np.ndindex(np.shape(value)):
            h = 1e-5 * abs(float(value[index]))
            up, down = dict(params), dict(params)
            up[site] = np.array(value, dtype=float, copy=True)
            down[site] = np.array(value, dtype=float, copy=True)
            up[site][index] += h
            down[site][index] -= h
            fd = (STAN_LP[name](post["data"], up) - STAN_LP[name](post["data"], down)) / (2 * h)
            assert g[index] == pytest.approx(fd, rel=1e-4, abs=1e-3), (site, index)


@pytest.mark.parametrize("name", NAMES)
def test_gradient_float32_is_finite(posteriors, name):
    post = posteriors[name]
    params, grad = _gradient(post)
    for site, value in params.items():
        g = np.asarray(grad[site])
        assert g.shape == np.shape(value) and g.dtype == np.float32, site
        assert np.all(np.isfinite(g)), site


# --------------------------------------------------------------------------------------------------
# a failed solve is a NaN log density, not an exception
# --------------------------------------------------------------------------------------------------
def test_failed_solve_gives_nan():
    def decay(k, max_steps):
        field = lambda t, y, k: -k * y  # noqa: E731
        return posteriordb_ode.solve_ode(field, jnp.ones(1), 0.0, jnp.array([1.0, 2.0]), k,
                                         max_steps=max_steps)

    assert np.all(np.isnan(np.asarray(jax.jit(decay, static_argnums=1)(0.5, 2))))
