"""The nested-sampling exactness suite: each program's likelihood against an independent
implementation, and the true evidences and moments by quadrature, where that is cheap."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from bayeslik.models import nested_suite


def _grid_loglik(post, lo, hi, n):
    """The Posterior's log-likelihood on the midpoints of an n x n grid of the box [lo, hi]^2
    (through unconstrain, so the program itself is checked)."""
    t = lo + (np.arange(n) + 0.5) * (hi - lo) / n
    xs = np.stack(np.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
    fn = jax.jit(jax.vmap(lambda x: post.loglikelihood(post.unconstrain({"x": x}))))
    ll = np.concatenate([np.asarray(fn(jnp.asarray(c))) for c in np.array_split(xs, 16)])
    return t, xs, ll.astype(np.float64)


def _log_mean_exp(a):
    return float(np.logaddexp.reduce(a) - math.log(a.size))


def test_names_and_literature_values():
    assert set(nested_suite.names()) == {
        "gaussian_shells_2d", "gaussian_shells_5d", "eggbox", "loggamma_2d", "loggamma_10d",
        "correlated_gaussian_3d"}
    for name in nested_suite.names():
        prob = nested_suite.get(name)
        # the quadrature value agrees with the literature's rounded one
        assert abs(prob.log_evidence - nested_suite.true_log_evidence(name)) < 0.006, name
    with pytest.raises(KeyError, match="known"):
        nested_suite.get("banana")


@pytest.mark.parametrize("name, lo, hi", [
    ("gaussian_shells_5d", -6.0, 6.0), ("eggbox", 0.0, 10 * math.pi), ("loggamma_10d", 0.0, 1.0),
    ("correlated_gaussian_3d", -10.0, 10.0)])
def test_prior_is_the_uniform_box(name, lo, hi, rng):
    post = nested_suite.get(name).posterior()
    u = rng.uniform(0.01, 0.99, size=(5, post.ndim))
    fn = jax.jit(jax.vmap(lambda v: post.constrain(post.prior_transform(v))["x"]))
    x = np.asarray(fn(jnp.asarray(u, jnp.float32)))
    np.testing.assert_allclose(x, lo + (hi - lo) * u, rtol=1e-4, atol=1e-4 * (hi - lo))


def test_shells_2d_by_grid_quadrature():
    """logZ and the posterior sd by a 1500^2 midpoint grid of the program's likelihood (the
    shells are 0.1 wide, the grid step 0.008)."""
    prob = nested_suite.get("gaussian_shells_2d")
    t, xs, ll = _grid_loglik(prob.posterior(), -6.0, 6.0, 1500)
    assert abs(_log_mean_exp(ll) - prob.log_evidence) < 2e-3
    w = np.exp(ll - ll.max())
    w /= w.sum()
    mean = w @ xs
    sd = np.sqrt(w @ (xs - mean) ** 2)
    np.testing.assert_allclose(mean, prob.posterior_mean["x"], atol=2e-3)
    np.testing.assert_allclose(sd, prob.posterior_sd["x"], rtol=2e-3)


def test_shells_5d_likelihood_and_radial_formula():
    """In 5-D a grid is too dear: the program's likelihood is checked pointwise against the
    definition, and the radial formula (checked by the 2-D grid above) gives -5.67."""
    prob = nested_suite.get("gaussian_shells_5d")
    post = prob.posterior()
    rng = np.random.default_rng(0)
    x = rng.uniform(-6, 6, size=(20, 5))
    x[:5] = [3.5, 0, 0, 0, 0] + 2.0 * _unit(rng, 5, 5)  # on a shell
    c = np.zeros(5)
    c[0] = 3.5
    d1, d2 = np.linalg.norm(x - c, axis=1), np.linalg.norm(x + c, axis=1)
    want = np.logaddexp(stats.norm(2.0, 0.1).logpdf(d1), stats.norm(2.0, 0.1).logpdf(d2))
    got = [float(post.loglikelihood(post.unconstrain({"x": jnp.asarray(xi)}))) for xi in x]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    assert abs(nested_suite.shells_log_evidence(5) - (-5.67)) < 0.005
    assert abs(nested_suite.shells_log_evidence(2) - (-1.75)) < 0.005


def _unit(rng, n, d):
    v = rng.normal(size=(n, d))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_eggbox_by_grid_quadrature():
    """The program's eggbox on a 1000^2 grid gives logZ = 235.86 (and the module's finer
    NumPy grid agrees)."""
    prob = nested_suite.get("eggbox")
    t, xs, ll = _grid_loglik(prob.posterior(), 0.0, 10 * math.pi, 1000)
    logz = _log_mean_exp(ll)
    assert abs(logz - 235.86) < 0.005
    assert abs(logz - prob.log_evidence) < 1e-3
    w = np.exp(ll - ll.max())
    w /= w.sum()
    np.testing.assert_allclose(w @ xs, prob.posterior_mean["x"], rtol=1e-3)


def _loggamma_1d(kind, x):
    s = 1 / 30
    g = lambda loc: stats.loggamma(1.0, loc=loc, scale=s)  # noqa: E731
    n = lambda loc: stats.norm(loc, s)  # noqa: E731
    return {
        "mix_g": lambda: np.logaddexp(g(1 / 3).logpdf(x), g(2 / 3).logpdf(x)) - math.log(2),
        "mix_n": lambda: np.logaddexp(n(1 / 3).logpdf(x), n(2 / 3).logpdf(x)) - math.log(2),
        "g": lambda: g(2 / 3).logpdf(x),
        "n": lambda: n(2 / 3).logpdf(x),
    }[kind]()


def _loggamma_kinds(dim):
    half = dim // 2 + 1
    return ["mix_g", "mix_n"] + ["g"] * (half - 2) + ["n"] * (dim - half)


@pytest.mark.parametrize("dim", [2, 10])
def test_loggamma_against_scipy(dim, rng):
    """The program's likelihood equals the product of scipy's densities, and their mass inside
    the unit cube (scipy's CDFs) makes logZ = 0 to 1e-4."""
    prob = nested_suite.get(f"loggamma_{dim}d")
    post = prob.posterior()
    kinds = _loggamma_kinds(dim)
    x = rng.uniform(0.2, 0.8, size=(10, dim))
    want = sum(_loggamma_1d(k, x[:, i]) for i, k in enumerate(kinds))
    got = [float(post.loglikelihood(post.unconstrain({"x": jnp.asarray(xi)}))) for xi in x]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-3)
    s = 1 / 30
    mass = {
        "mix_g": np.mean([np.diff(stats.loggamma(1.0, loc=m, scale=s).cdf([0, 1]))
                          for m in (1 / 3, 2 / 3)]),
        "mix_n": np.mean([np.diff(stats.norm(m, s).cdf([0, 1])) for m in (1 / 3, 2 / 3)]),
        "g": np.diff(stats.loggamma(1.0, loc=2 / 3, scale=s).cdf([0, 1]))[0],
        "n": np.diff(stats.norm(2 / 3, s).cdf([0, 1]))[0],
    }
    logz = sum(math.log(mass[k]) for k in kinds)
    assert abs(logz - prob.log_evidence) < 1e-4
    # moments: the mixtures' by scipy's numerical integration over the cube
    grid = np.linspace(0, 1, 200001)
    for i, k in enumerate(kinds[:3]):
        p = np.exp(_loggamma_1d(k, grid))
        p /= np.trapezoid(p, grid)
        m = np.trapezoid(grid * p, grid)
        sd = math.sqrt(np.trapezoid((grid - m) ** 2 * p, grid))
        assert abs(m - prob.posterior_mean["x"][i]) < 1e-4
        assert abs(sd - prob.posterior_sd["x"][i]) < 1e-4


def test_correlated_gaussian_against_scipy(rng):
    prob = nested_suite.get("correlated_gaussian_3d")
    post = prob.posterior()
    cov = prob.posterior_cov["x"]
    x = rng.normal(size=(10, 3))
    want = stats.multivariate_normal(np.zeros(3), cov).logpdf(x)
    got = [float(post.loglikelihood(post.unconstrain({"x": jnp.asarray(xi)}))) for xi in x]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # the mass outside the box (10 sds) is negligible: logZ = -3 log 20
    assert prob.log_evidence == pytest.approx(-3 * math.log(20))
