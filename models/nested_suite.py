"""Nested sampling's exactness suite: problems with known evidence, as NumPyro programs.

Each program has uniform priors and its likelihood as a ``numpyro.factor``, so
``logZ = log E_prior[L]`` is known in closed form or by a cheap one- or two-dimensional
quadrature:

* ``gaussian_shells_2d`` / ``gaussian_shells_5d``: two thin Gaussian shells (radius 2, width 0.1,
  centres +-3.5 on the first axis) in U(-6, 6)^D; logZ = -1.75 (2-D) and -5.67 (5-D) (Feroz &
  Hobson 2008; here computed by a radial quadrature).
* ``eggbox``: ``log L = (2 + cos(x/2) cos(y/2))^5`` on U(0, 10 pi)^2; logZ = 235.86 (a dense
  grid quadrature).
* ``loggamma_2d`` / ``loggamma_10d``: Beaujean & Caldwell's LogGamma problem on U(0, 1)^D, a
  product of mixtures of LogGamma and normal densities; logZ = 0 (the densities' mass outside the
  cube is below 1e-4).
* ``correlated_gaussian_3d``: a normalised 3-D Gaussian (unit variances, correlation 0.95) in
  U(-10, 10)^3; logZ = -3 ln 20.

The problems are :class:`bayeslik.models.reference.Problem` objects with ``log_evidence`` and the
exact posterior means and standard deviations of their site ``x`` (a D-vector).

>>> from bayeslik.models import nested_suite
>>> round(nested_suite.true_log_evidence("gaussian_shells_2d"), 2)
-1.75
>>> post = nested_suite.get("eggbox").posterior()
>>> post.ndim
2
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from scipy import integrate

from bayeslik.errors import OptionError
from bayeslik.models.reference import Problem

__all__ = [
    "names", "get", "true_log_evidence", "TRUE_LOG_EVIDENCE", "gaussian_shells_model",
    "eggbox_model", "loggamma_model", "correlated_gaussian_model",
    "shells_log_evidence", "eggbox_log_evidence", "folded_moments",
]

# the literature's values (rounded); the tests check them against quadrature
TRUE_LOG_EVIDENCE = {
    "gaussian_shells_2d": -1.75,
    "gaussian_shells_5d": -5.67,
    "eggbox": 235.86,
    "loggamma_2d": 0.0,
    "loggamma_10d": 0.0,
    "correlated_gaussian_3d": -3.0 * math.log(20.0),
}

SHELL_RADIUS, SHELL_WIDTH, SHELL_CENTRE, SHELL_BOX = 2.0, 0.1, 3.5, 6.0


def _check_positive(name: str, v) -> None:
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
        raise OptionError(f"{name} must be a positive integer, got {v!r}")


def _uniform_box(lo: float, hi: float, dim: int):
    return numpyro.sample("x", dist.Uniform(lo, hi).expand([dim]).to_event(1))


# ----------------------------------------------------------------------------- Gaussian shells
def gaussian_shells_model(dim: int = 2):
    r"""x ~ U(-6, 6)^D;  L = sum_{c = +-3.5 e_1} N(|x - c|; 2, 0.1^2) (a 1-D normal density in
    the distance to each centre)."""
    x = _uniform_box(-SHELL_BOX, SHELL_BOX, dim)
    centre = jnp.zeros(dim).at[0].set(SHELL_CENTRE)
    logn = -0.5 * math.log(2 * math.pi * SHELL_WIDTH**2)

    def log_shell(c):
        d = jnp.sqrt(jnp.sum((x - c) ** 2))
        return logn - 0.5 * ((d - SHELL_RADIUS) / SHELL_WIDTH) ** 2

    numpyro.factor("shells", jnp.logaddexp(log_shell(centre), log_shell(-centre)))


def _radial_moment(dim: int, k: int) -> float:
    """int_0^inf rho^k N(rho; r, w^2) d rho (numerically; the shell's radial profile)."""
    r, w = SHELL_RADIUS, SHELL_WIDTH

    def f(rho):
        return rho**k * math.exp(-0.5 * ((rho - r) / w) ** 2) / math.sqrt(2 * math.pi * w**2)

    return integrate.quad(f, 0.0, r + 20 * w, points=[r], limit=200)[0]


def shells_log_evidence(dim: int) -> float:
    r"""logZ of the shells: each shell (far inside the box, apart from the other) contributes
    ``S_{D-1} int rho^{D-1} N(rho; r, w^2) d rho`` with ``S_{D-1} = 2 pi^{D/2} / Gamma(D/2)``
    the unit sphere's area; Z = 2 x that / 12^D."""
    _check_positive("dim", dim)
    area = 2 * math.pi ** (dim / 2) / math.gamma(dim / 2)
    return math.log(2 * area * _radial_moment(dim, dim - 1)) - dim * math.log(2 * SHELL_BOX)


def _shells_moments(dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact posterior mean (0) and sd of x: around a centre, x - c = rho * (a uniform
    direction), so E[(x - c)_j^2] = E[rho^2] / D with rho weighted by rho^{D-1} N(rho)."""
    e_rho2 = _radial_moment(dim, dim + 1) / _radial_moment(dim, dim - 1)
    var = np.full(dim, e_rho2 / dim)
    var[0] += SHELL_CENTRE**2
    return np.zeros(dim), np.sqrt(var)


# ----------------------------------------------------------------------------- eggbox
EGGBOX_HIGH = 10 * math.pi


def eggbox_model():
    r"""x ~ U(0, 10 pi)^2;  log L = (2 + cos(x_1 / 2) cos(x_2 / 2))^5."""
    x = _uniform_box(0.0, EGGBOX_HIGH, 2)
    numpyro.factor("eggbox", (2.0 + jnp.cos(x[0] / 2) * jnp.cos(x[1] / 2)) ** 5)


@functools.lru_cache(maxsize=4)
def _eggbox_grid(n: int):
    # midpoint rule on an n x n grid: the integrand is smooth and periodic-ish, so this converges
    # fast; returns (logZ, mean, sd)
    h = EGGBOX_HIGH / n
    t = (np.arange(n) + 0.5) * h
    c = np.cos(t / 2)
    logl = (2.0 + c[:, None] * c[None, :]) ** 5
    m = logl.max()
    w = np.exp(logl - m)
    z = w.mean()
    p = w / w.sum()
    px = p.sum(axis=1)  # symmetric in x_1 <-> x_2
    mean = float(np.sum(px * t))
    sd = float(np.sqrt(np.sum(px * (t - mean) ** 2)))
    return float(m + np.log(z)), mean, sd


def eggbox_log_evidence(num_grid: int = 4000) -> float:
    """logZ of the eggbox by the midpoint rule on a num_grid^2 grid."""
    _check_positive("num_grid", num_grid)
    return _eggbox_grid(num_grid)[0]


# ----------------------------------------------------------------------------- LogGamma
_LG_SCALE = 1.0 / 30.0


def _loggamma_logpdf(x, loc):
    # LogGamma with shape 1: y = (x - loc)/s, density exp(y - e^y) / s
    y = (x - loc) / _LG_SCALE
    return y - jnp.exp(y) - math.log(_LG_SCALE)


def _normal_logpdf(x, loc):
    return -0.5 * ((x - loc) / _LG_SCALE) ** 2 - 0.5 * math.log(2 * math.pi * _LG_SCALE**2)


def loggamma_model(dim: int = 2):
    r"""Beaujean & Caldwell's LogGamma problem, x ~ U(0, 1)^D (D >= 2, even):
    L = [g_a(x_1) + g_b(x_1)]/2 * [n_c(x_2) + n_d(x_2)]/2 * prod_{i=3}^{D/2+1} g_b(x_i)
    * prod_{i=D/2+2}^{D} n_d(x_i), with g_a, g_b LogGamma(1) densities at 1/3, 2/3 and n_c, n_d
    normal densities at 1/3, 2/3, all of scale 1/30."""
    x = _uniform_box(0.0, 1.0, dim)
    half = dim // 2 + 1  # x_3..x_{D/2+1} (1-based) are g_b, the rest n_d
    ll = jnp.logaddexp(_loggamma_logpdf(x[0], 1 / 3), _loggamma_logpdf(x[0], 2 / 3)) - math.log(2)
    ll = ll + jnp.logaddexp(_normal_logpdf(x[1], 1 / 3), _normal_logpdf(x[1], 2 / 3)) - math.log(2)
    if dim > 2:
        ll = ll + jnp.sum(_loggamma_logpdf(x[2:half], 2 / 3))
        ll = ll + jnp.sum(_normal_logpdf(x[half:], 2 / 3))
    numpyro.factor("loggamma", ll)


def _loggamma_moments(dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Means and sds of the marginals (the mass outside the unit cube, < 1e-4, is ignored).
    LogGamma(1) at loc, scale s: mean loc - gamma_E s, variance s^2 pi^2 / 6."""
    s = _LG_SCALE
    g_mean = lambda loc: loc - np.euler_gamma * s  # noqa: E731
    g_var = s**2 * math.pi**2 / 6
    n_var = s**2

    def mixture(m1, m2, v):
        m = 0.5 * (m1 + m2)
        return m, 0.5 * (v + m1**2) + 0.5 * (v + m2**2) - m**2

    mean, var = np.zeros(dim), np.zeros(dim)
    mean[0], var[0] = mixture(g_mean(1 / 3), g_mean(2 / 3), g_var)
    mean[1], var[1] = mixture(1 / 3, 2 / 3, n_var)
    half = dim // 2 + 1
    mean[2:half], var[2:half] = g_mean(2 / 3), g_var
    mean[half:], var[half:] = 2 / 3, n_var
    return mean, np.sqrt(var)


# ----------------------------------------------------------------------------- correlated Gaussian
CORR_RHO, CORR_BOX = 0.95, 10.0


def _corr_cov(dim: int) -> np.ndarray:
    return (1 - CORR_RHO) * np.eye(dim) + CORR_RHO * np.ones((dim, dim))


def correlated_gaussian_model(dim: int = 3):
    r"""x ~ U(-10, 10)^D;  L = N(x; 0, Sigma), Sigma = unit variances, correlation 0.95 (a
    normalised density, so Z = 20^-D up to the mass outside the box, < 1e-20)."""
    x = _uniform_box(-CORR_BOX, CORR_BOX, dim)
    cov = jnp.asarray(_corr_cov(dim))
    numpyro.factor("gaussian", dist.MultivariateNormal(jnp.zeros(dim), covariance_matrix=cov).log_prob(x))


# ----------------------------------------------------------------------------- registry
def _shells(dim: int) -> Problem:
    mean, sd = _shells_moments(dim)
    return Problem(f"gaussian_shells_{dim}d", gaussian_shells_model, {"dim": dim},
                   f"two Gaussian shells in {dim}-D", posterior_mean={"x": mean},
                   posterior_sd={"x": sd}, log_evidence=shells_log_evidence(dim))


def _eggbox() -> Problem:
    logz, mean, sd = _eggbox_grid(4000)
    return Problem("eggbox", eggbox_model, {}, "eggbox on [0, 10 pi]^2",
                   posterior_mean={"x": np.full(2, mean)}, posterior_sd={"x": np.full(2, sd)},
                   log_evidence=logz)


def _loggamma(dim: int) -> Problem:
    mean, sd = _loggamma_moments(dim)
    return Problem(f"loggamma_{dim}d", loggamma_model, {"dim": dim},
                   f"LogGamma mixtures in {dim}-D", posterior_mean={"x": mean},
                   posterior_sd={"x": sd}, log_evidence=0.0)


def _corr(dim: int) -> Problem:
    cov = _corr_cov(dim)
    return Problem(f"correlated_gaussian_{dim}d", correlated_gaussian_model, {"dim": dim},
                   f"{dim}-D correlated Gaussian (rho={CORR_RHO}) in U(-10, 10)^{dim}",
                   posterior_mean={"x": np.zeros(dim)}, posterior_sd={"x": np.sqrt(np.diag(cov))},
                   posterior_cov={"x": cov}, log_evidence=-dim * math.log(2 * CORR_BOX))


_PROBLEMS = {
    "gaussian_shells_2d": lambda: _shells(2),
    "gaussian_shells_5d": lambda: _shells(5),
    "eggbox": _eggbox,
    "loggamma_2d": lambda: _loggamma(2),
    "loggamma_10d": lambda: _loggamma(10),
    "correlated_gaussian_3d": lambda: _corr(3),
}


# ----------------------------------------------------------------------------- folded moments
def _fold_shells(x):
    """|x_1| (both shells onto the one at +3.5); the other coordinates as they are."""
    return np.concatenate([np.abs(x[..., :1]), x[..., 1:]], axis=-1)


def _fold_eggbox(x):
    """Each coordinate's distance to the nearest multiple of 2 pi (every mode is at multiples
    of 2 pi, all of one shape)."""
    return np.abs(np.mod(x + np.pi, 2 * np.pi) - np.pi)


def _fold_loggamma(x):
    """The offsets of the two mixture coordinates from their component's centre (1/3 below 0.5,
    2/3 above); both components have one shape, so the offsets do not depend on the mixture
    weights."""
    out = np.array(x, dtype=np.float64, copy=True)
    for i in (0, 1):
        out[..., i] = x[..., i] - np.where(x[..., i] < 0.5, 1 / 3, 2 / 3)
    return out


@functools.lru_cache(maxsize=8)
def _folded(name: str):
    prob = get(name)
    mean, sd = np.asarray(prob.posterior_mean["x"], float), np.asarray(prob.posterior_sd["x"], float)
    if name.startswith("gaussian_shells"):
        return _fold_shells, np.concatenate([[SHELL_CENTRE], mean[1:]]), np.full_like(sd, sd[1])
    if name == "eggbox":
        n = 4000
        h = EGGBOX_HIGH / n
        t = (np.arange(n) + 0.5) * h
        c = np.cos(t / 2)
        logl = (2.0 + c[:, None] * c[None, :]) ** 5
        p = np.exp(logl - logl.max())
        px = p.sum(axis=1) / p.sum()
        d = _fold_eggbox(t)
        m = float(px @ d)
        v = float(px @ (d - m) ** 2)
        return _fold_eggbox, np.full(2, m), np.full(2, math.sqrt(v))
    if name.startswith("loggamma"):
        grid = np.linspace(0.0, 1.0, 400001)
        mean, sd = mean.copy(), sd.copy()
        for i, pieces in ((0, (_loggamma_logpdf, (1 / 3, 2 / 3))), (1, (_normal_logpdf, (1 / 3, 2 / 3)))):
            fn, locs = pieces
            dens = 0.5 * sum(np.exp(np.asarray(fn(jnp.asarray(grid), loc), np.float64)) for loc in locs)
            dens /= np.trapezoid(dens, grid)
            off = grid - np.where(grid < 0.5, 1 / 3, 2 / 3)
            mean[i] = np.trapezoid(off * dens, grid)
            sd[i] = math.sqrt(np.trapezoid((off - mean[i]) ** 2 * dens, grid))
        return _fold_loggamma, mean, sd
    return (lambda x: np.asarray(x, np.float64)), mean, sd


def folded_moments(name: str):
    """``(fold, mean, sd)``: a map of draws x (..., D) -> (..., D) that lays the modes of a
    multimodal problem onto one another, and the exact posterior mean and sd of the folded
    coordinates (the identity for unimodal problems).

    A nested sampler's weights between modes fluctuate much more than its effective sample
    size suggests (they are set by the live points each mode happens to hold), so a moment test
    with a tolerance from the ESS is honest only within a mode: the folded coordinates are
    that. Shells: |x_1|; eggbox: distance to the nearest multiple of 2 pi; LogGamma: the
    mixture coordinates' offsets from their component's centre.
    """
    if name not in _PROBLEMS:
        raise KeyError(f"unknown nested-suite problem {name!r}; known: {names()}")
    return _folded(name)


def names() -> list[str]:
    """The suite's problem names."""
    return list(_PROBLEMS)


def get(name: str) -> Problem:
    """The problem ``name`` (a reference.Problem; ``.posterior()`` binds it)."""
    if name not in _PROBLEMS:
        raise KeyError(f"unknown nested-suite problem {name!r}; known: {names()}")
    return _PROBLEMS[name]()


def true_log_evidence(name: str) -> float:
    """The literature's logZ of problem ``name`` (as quoted in the issue; the Problem's
    ``log_evidence`` is the more precise quadrature value)."""
    if name not in TRUE_LOG_EVIDENCE:
        raise KeyError(f"unknown nested-suite problem {name!r}; known: {names()}")
    return TRUE_LOG_EVIDENCE[name]
