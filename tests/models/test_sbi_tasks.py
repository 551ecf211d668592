"""The sbibm tasks (bayeslik.models.sbi_tasks), their bundled reference files, and the C2ST of
benchmarks/sbi_tasks.py.

The simulators are checked against their definitions with tolerances from the Monte Carlo error
(k x standard error of a mean of independent simulations); the ODE tasks against an independent
solve by scipy's ``solve_ivp``; gaussian_linear's reference draws against its exact posterior.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bayeslik.errors import DataError, ModelError
from bayeslik.models import sbi_tasks

ROOT = Path(__file__).resolve().parents[2]
SIZES = {"two_moons": (2, 2), "slcp": (5, 8), "gaussian_linear": (10, 10),
         "lotka_volterra": (4, 20), "sir": (2, 10)}


def _bench():
    spec = importlib.util.spec_from_file_location("bench_sbi_tasks",
                                                  ROOT / "benchmarks" / "sbi_tasks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


#: simulations per call in these tests: SimulatorPosterior's batch, so one compile per task
NSIM = 1024


@functools.cache
def _post(name):
    """One SimulatorPosterior per task for the whole module (its compiled simulator is kept)."""
    return sbi_tasks.task(name).posterior(1)


def _sims(name, theta, seed=0):
    """NSIM simulations at one parameter vector, through the task's SimulatorPosterior."""
    post = _post(name)
    z = post.unconstrain({"theta": jnp.asarray(theta, jnp.float32)})
    x, bad = post.simulate(jax.random.key(seed), jnp.broadcast_to(z, (NSIM, post.ndim)))
    assert not bad.any()
    return x


@pytest.mark.parametrize("name", list(SIZES))
def test_simulator_shape_and_finite_at_prior_draws(name):
    t = sbi_tasks.task(name)
    d, n = SIZES[name]
    assert (t.dim_parameters, t.dim_data) == (d, n)
    post = _post(name)
    assert post.simulator_kind == "jax" and post.ndim == d and post.observed_shape == (n,)
    z = post.sample_prior(jax.random.key(0), NSIM)
    x, bad = post.simulate(jax.random.key(1), z)
    assert x.shape == (NSIM, n) and not bad.any() and np.isfinite(x).all()


@pytest.mark.parametrize("name", list(SIZES))
def test_bundled_files(name):
    t = sbi_tasks.task(name)
    for i in sbi_tasks.OBSERVATIONS:
        ref = t.reference_samples(i)
        assert ref.shape == (10_000, t.dim_parameters) and np.isfinite(ref).all()
        assert t.observation(i).shape == (t.dim_data,)
        assert t.true_parameters(i).shape == (t.dim_parameters,)


def test_two_moons_simulator_follows_its_definition():
    """Undoing the parameter shift leaves a point at radius r ~ N(0.1, 0.01^2) from (0.25, 0)
    at an angle in (-pi/2, pi/2)."""
    theta = np.array([0.3, -0.6])
    x = _sims("two_moons", theta)
    z0, z1 = (theta[0] + theta[1]) / math.sqrt(2), (theta[1] - theta[0]) / math.sqrt(2)
    u, v = x[:, 0] + abs(z0) - 0.25, x[:, 1] - z1
    r = np.hypot(u, v)
    assert abs(r.mean() - 0.1) < 4 * 0.01 / math.sqrt(r.size)
    assert abs(r.std() / 0.01 - 1) < 4 * math.sqrt(0.5 / r.size)
    assert (u > -1e-6).all()  # angle within (-pi/2, pi/2)
    # the angle is uniform: its mean 0, sd pi/sqrt(12)
    a = np.arctan2(v, u)
    assert abs(a.mean()) < 4 * (math.pi / math.sqrt(12)) / math.sqrt(a.size)


def test_slcp_simulator_follows_its_definition():
    theta = np.array([0.5, -1.0, 1.2, -0.8, 0.7])
    x = _sims("slcp", theta).reshape(-1, 2)  # 4 draws per simulation, all independent
    s1, s2, rho = theta[2] ** 2, theta[3] ** 2, math.tanh(theta[4])
    n = x.shape[0]
    np.testing.assert_array_less(np.abs(x.mean(0) - theta[:2]), 4 * np.array([s1, s2]) /
                                 math.sqrt(n))
    sd = x.std(0)
    np.testing.assert_array_less(np.abs(sd / np.array([s1, s2]) - 1), 4 * math.sqrt(0.5 / n))
    r = np.corrcoef(x.T)[0, 1]
    assert abs(r - rho) < 4 * (1 - rho ** 2) / math.sqrt(n)


def _scipy_solution(field, u0, ts, theta):
    from scipy.integrate import solve_ivp

    sol = solve_ivp(lambda t, u: field(t, u, theta), (0.0, ts[-1]), u0, t_eval=ts,
                    method="DOP853", rtol=1e-10, atol=1e-10)
    assert sol.success
    return sol.y  # (state, time)


def test_lotka_volterra_against_scipy():
    """log x = log u(t) + 0.1 eps: the mean of log x over simulations is the ODE solution (an
    independent scipy solve) within 4 standard errors, and its sd is 0.1."""
    t = sbi_tasks.task("lotka_volterra")
    theta = t.true_parameters(1)

    def field(_, u, p):
        return [p[0] * u[0] - p[1] * u[0] * u[1], -p[2] * u[1] + p[3] * u[0] * u[1]]

    ts = np.array(sbi_tasks.LV_TIMES)
    assert ts.size == 10 and ts[1] == pytest.approx(2.1) and ts[-1] == pytest.approx(18.9)
    u = _scipy_solution(field, [30.0, 1.0], ts, theta)
    logx = np.log(_sims("lotka_volterra", theta))
    expect = np.log(np.clip(u.reshape(-1), 1e-10, 1e4))  # prey's 10 values, then predators'
    se = 0.1 / math.sqrt(logx.shape[0])
    # float32 ODE (rtol 1e-6) and float32 logs: 1e-4 absolute on top of the Monte Carlo error
    np.testing.assert_array_less(np.abs(logx.mean(0) - expect), 4 * se + 1e-4)
    np.testing.assert_array_less(np.abs(logx.std(0) / 0.1 - 1), 4 * math.sqrt(0.5 / NSIM))


def test_sir_against_scipy():
    """x_j ~ Binomial(1000, I(t_j) / N): the mean count is 1000 I(t_j)/N (scipy solve) within 4
    binomial standard errors."""
    t = sbi_tasks.task("sir")
    theta = t.true_parameters(1)
    N = sbi_tasks.SIR_N

    def field(_, u, p):
        inf = p[0] * u[0] * u[1] / N
        return [-inf, inf - p[1] * u[1], p[1] * u[1]]

    ts = np.array(sbi_tasks.SIR_TIMES)
    assert ts.size == 10 and ts[1] == 17 and ts[-1] == 153
    u = _scipy_solution(field, [N - 1, 1.0, 0.0], ts, theta)
    p = np.clip(u[1] / N, 0, 1)
    x = _sims("sir", theta)
    assert (x == np.round(x)).all() and (x >= 0).all() and (x <= 1000).all()
    se = np.sqrt(1000 * p * (1 - p) / x.shape[0])
    np.testing.assert_array_less(np.abs(x.mean(0) - 1000 * p), 4 * se + 0.05)


def test_priors_as_in_sbibm():
    """Prior moments from many draws: the log-normal parameters of Lotka-Volterra and SIR, the
    uniform boxes and the gaussian_linear variance 0.1."""
    n = 4096
    checks = {
        "lotka_volterra": ("log", np.array([-0.125, -3.0, -0.125, -3.0]), np.full(4, 0.5)),
        "sir": ("log", np.array([math.log(0.4), math.log(0.125)]), np.array([0.5, 0.2])),
        "gaussian_linear": ("id", np.zeros(10), np.full(10, math.sqrt(0.1))),
        "two_moons": ("id", np.zeros(2), np.full(2, 2 / math.sqrt(12))),
        "slcp": ("id", np.zeros(5), np.full(5, 6 / math.sqrt(12))),
    }
    for name, (kind, mean, sd) in checks.items():
        post = _post(name)
        # NSIM draws per call: the program compiled for the shape test is reused
        z = np.concatenate([post.sample_prior(jax.random.key(2 + i), NSIM)
                            for i in range(n // NSIM)])
        theta = np.asarray(jax.vmap(post.constrain)(z)["theta"])
        v = np.log(theta) if kind == "log" else theta
        np.testing.assert_array_less(np.abs(v.mean(0) - mean), 4 * sd / math.sqrt(n))
        # relative se of a normal sample sd: sqrt(1 / (2n)) (smaller for a uniform)
        np.testing.assert_array_less(np.abs(v.std(0) / sd - 1), 4 * math.sqrt(0.5 / n))
    box = np.asarray(jax.vmap(_post("slcp").constrain)(
        jnp.full((1, 5), 30.0))["theta"])
    assert np.all(box <= 3.0) and np.all(box > 2.99)


@pytest.mark.parametrize("i", sbi_tasks.OBSERVATIONS)
def test_gaussian_linear_reference_matches_the_exact_posterior(i):
    """sbibm's reference draws of gaussian_linear are independent draws of N(x/2, 0.05 I): their
    mean is within 4 MCSE (sqrt(0.05 / 10000)) of x/2 and their variance within 4 of its
    standard errors (0.05 sqrt(2 / 10000)) of 0.05."""
    t = sbi_tasks.task("gaussian_linear")
    mean, var = t.analytic_posterior(t.observation(i))
    ref = t.reference_samples(i)
    n = ref.shape[0]
    np.testing.assert_array_less(np.abs(ref.mean(0) - mean), 4 * np.sqrt(var / n))
    np.testing.assert_array_less(np.abs(ref.var(0) - var), 4 * var * math.sqrt(2 / n))


def test_errors_name_the_argument(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match="unknown sbibm task.*two_moons"):
        sbi_tasks.task("two_moon")
    with pytest.raises(DataError, match="observation_index=7"):
        sbi_tasks.task("sir").reference_samples(7)
    with pytest.raises(ModelError, match="gaussian_linear"):
        sbi_tasks.task("sir").analytic_posterior(np.zeros(10))
    monkeypatch.setenv("BAYESLIK_SBIBM_DATA", str(tmp_path))
    with pytest.raises(DataError, match="BAYESLIK_SBIBM_DATA"):
        sbi_tasks.task("sir").observation(1)


# ---------------------------------------------------------------------------- C2ST
def test_c2st_of_one_distribution_is_near_one_half():
    """Two samples of N(0, I_2), 200 each: the cross-validated accuracy of a classifier that
    cannot do better than chance has sd about sqrt(0.25 / 400) = 0.025; within 0.1 (4 sd)."""
    c2st = _bench().c2st
    rng = np.random.default_rng(0)
    acc = c2st(rng.normal(size=(200, 2)), rng.normal(size=(200, 2)))
    assert abs(acc - 0.5) < 0.1, acc


def test_c2st_of_separated_distributions_is_near_one():
    c2st = _bench().c2st
    rng = np.random.default_rng(1)
    acc = c2st(rng.normal(size=(300, 2)), rng.normal(size=(300, 2)) + np.array([6.0, 0.0]))
    assert acc > 0.98, acc
    # a shift of one sd is partly separable: Bayes accuracy Phi(1/2) = 0.69
    acc = c2st(rng.normal(size=(300, 1)), rng.normal(size=(300, 1)) + 1.0)
    assert 0.6 < acc < 0.78, acc


def test_benchmark_table_puts_ours_beside_the_published():
    bench = _bench()
    rows = bench.merge_rows([], [{"task": "sir", "method": "snl", "budget": 1000,
                                  "observation": 1, "seed": 0, "c2st": 0.7, "wall_s": 12.0}])
    rows = bench.merge_rows(rows, [{"task": "sir", "method": "snl", "budget": 1000,
                                    "observation": 1, "seed": 0, "c2st": 0.8, "wall_s": 10.0}])
    assert len(rows) == 1 and rows[0]["c2st"] == 0.8  # the same run replaces the old row
    md = bench.markdown(rows)
    sir = next(line for line in md.splitlines() if line.startswith("| sir"))
    assert "0.800 (n=1, 10 s)" in sir and "0.745" in sir and "0.650" in sir
