"""Reference problems with exact answers, as NumPyro programs, for every engine's tests.

* ``normal_mean``: a normal mean with known noise and a normal prior (conjugate): exact posterior
  and evidence.
* ``normal_inverse_gamma``: unknown mean and variance with the conjugate Normal-Inverse-Gamma
  prior (the mean's prior depends on the variance, so a unit-cube transform must condition):
  exact marginal posteriors (Student-t and inverse gamma) and evidence.
* ``correlated_gaussian``: a D-dimensional Gaussian prior observed through strongly correlated
  Gaussian noise: exact posterior (mean, covariance) and evidence.
* ``eight_schools``: the non-centred eight schools of posteriordb, with its reference draws.

>>> from bayeslik.models import reference
>>> prob = reference.get("normal_mean")
>>> post = prob.posterior()                  # a bayeslik.Posterior with the data bound
>>> round(prob.log_evidence, 3)              # exact, from the marginal of y
-25.523
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from scipy import special, stats

from bayeslik.errors import OptionError

__all__ = [
    "Problem", "get", "names", "normal_mean", "normal_inverse_gamma", "correlated_gaussian",
    "eight_schools",
]


@dataclass(frozen=True)
class Problem:
    """A model, its data, and what is known exactly about its posterior.

    ``posterior_mean`` and ``posterior_sd`` map site names to exact values (None where only
    reference draws are known); ``posterior_cov`` holds exact covariances of vector sites;
    ``reference_draws`` maps site names to (chains, draws, ...) arrays (e.g. posteriordb);
    ``marginal_pdf`` maps parameters (a scalar site's name, or ``"site[j]"`` for the j-th entry of
    a flattened vector site) to their exact marginal posterior densities ``pdf(x)``, where known.
    """

    name: str
    model: Callable
    data: dict[str, Any]
    description: str
    posterior_mean: dict[str, np.ndarray] | None = None
    posterior_sd: dict[str, np.ndarray] | None = None
    posterior_cov: dict[str, np.ndarray] = field(default_factory=dict)
    log_evidence: float | None = None
    reference_draws: dict[str, np.ndarray] | None = None
    marginal_pdf: dict[str, Callable[[np.ndarray], np.ndarray]] = field(default_factory=dict)

    def posterior(self):
        """The bayeslik.Posterior of this problem's model with its data bound."""
        from bayeslik.posterior import Posterior

        return Posterior(self.model, **self.data)


# ----------------------------------------------------------------------------- normal mean
def normal_mean_model(y, sigma=1.0, prior_mean=0.0, prior_sd=10.0):
    r"""mu ~ Normal(prior_mean, prior_sd);  y_i ~ Normal(mu, sigma), i = 1..n (sigma known)."""
    mu = numpyro.sample("mu", dist.Normal(prior_mean, prior_sd))
    with numpyro.plate("obs", jnp.shape(y)[0]):
        numpyro.sample("y", dist.Normal(mu, sigma), obs=y)


def normal_mean(y=None, sigma=1.0, prior_mean=0.0, prior_sd=10.0) -> Problem:
    r"""The conjugate normal mean.

    Posterior: mu | y ~ N(m_n, s_n^2) with 1/s_n^2 = 1/s0^2 + n/sigma^2 and
    m_n = s_n^2 (m0/s0^2 + sum(y)/sigma^2). Evidence: y ~ N(m0 1, sigma^2 I + s0^2 1 1^T), whose
    log density follows from the matrix determinant lemma and Sherman-Morrison.
    """
    if y is None:
        y = np.random.default_rng(1).normal(1.5, sigma, size=20)
    y = np.asarray(y, dtype=np.float64)
    n = y.size
    prec = 1 / prior_sd**2 + n / sigma**2
    mean = (prior_mean / prior_sd**2 + y.sum() / sigma**2) / prec
    r = y - prior_mean
    c = prior_sd**2 / sigma**2
    logdet = n * math.log(sigma**2) + math.log1p(n * c)
    quad = (r @ r - c * r.sum() ** 2 / (1 + n * c)) / sigma**2
    logz = -0.5 * (n * math.log(2 * math.pi) + logdet + quad)
    return Problem(
        "normal_mean", normal_mean_model,
        {"y": y.astype(np.float32), "sigma": sigma, "prior_mean": prior_mean, "prior_sd": prior_sd},
        "normal mean, known noise, normal prior (conjugate)",
        posterior_mean={"mu": np.array(mean)}, posterior_sd={"mu": np.array(prec**-0.5)},
        log_evidence=float(logz), marginal_pdf={"mu": stats.norm(mean, prec**-0.5).pdf},
    )


# ----------------------------------------------------------------------------- NIG
def normal_inverse_gamma_model(y, m0=0.0, kappa0=1.0, a0=2.0, b0=2.0):
    r"""sigma2 ~ InvGamma(a0, b0);  mu | sigma2 ~ N(m0, sigma2/kappa0);  y_i ~ N(mu, sigma2)."""
    sigma2 = numpyro.sample("sigma2", dist.InverseGamma(a0, b0))
    mu = numpyro.sample("mu", dist.Normal(m0, jnp.sqrt(sigma2 / kappa0)))
    with numpyro.plate("obs", jnp.shape(y)[0]):
        numpyro.sample("y", dist.Normal(mu, jnp.sqrt(sigma2)), obs=y)


def normal_inverse_gamma(y=None, m0=0.0, kappa0=1.0, a0=2.0, b0=2.0) -> Problem:
    r"""Normal data with unknown mean and variance under the conjugate NIG prior.

    With ybar, S = sum (y - ybar)^2: kappa_n = kappa0 + n, m_n = (kappa0 m0 + n ybar)/kappa_n,
    a_n = a0 + n/2, b_n = b0 + S/2 + kappa0 n (ybar - m0)^2 / (2 kappa_n). Then
    sigma2 | y ~ InvGamma(a_n, b_n), mu | y ~ t_{2 a_n}(m_n, b_n / (a_n kappa_n)) and
    log Z = lgamma(a_n) - lgamma(a0) + a0 log b0 - a_n log b_n + (1/2) log(kappa0/kappa_n)
            - (n/2) log(2 pi).
    """
    if y is None:
        y = np.random.default_rng(2).normal(-0.7, 1.3, size=25)
    y = np.asarray(y, dtype=np.float64)
    n, ybar = y.size, y.mean()
    S = ((y - ybar) ** 2).sum()
    kn = kappa0 + n
    mn = (kappa0 * m0 + n * ybar) / kn
    an = a0 + n / 2
    bn = b0 + S / 2 + kappa0 * n * (ybar - m0) ** 2 / (2 * kn)
    logz = (special.gammaln(an) - special.gammaln(a0) + a0 * math.log(b0) - an * math.log(bn)
            + 0.5 * math.log(kappa0 / kn) - n / 2 * math.log(2 * math.pi))
    t = stats.t(df=2 * an, loc=mn, scale=math.sqrt(bn / (an * kn)))
    ig = stats.invgamma(an, scale=bn)
    return Problem(
        "normal_inverse_gamma", normal_inverse_gamma_model,
        {"y": y.astype(np.float32), "m0": m0, "kappa0": kappa0, "a0": a0, "b0": b0},
        "normal data, unknown mean and variance, Normal-Inverse-Gamma prior (conjugate)",
        posterior_mean={"mu": np.array(t.mean()), "sigma2": np.array(ig.mean())},
        posterior_sd={"mu": np.array(t.std()), "sigma2": np.array(ig.std())},
        log_evidence=float(logz), marginal_pdf={"mu": t.pdf, "sigma2": ig.pdf},
    )


# ----------------------------------------------------------------------------- correlated
def correlated_gaussian_model(y, prior_cov, noise_cov):
    r"""x ~ MVN(0, prior_cov);  y ~ MVN(x, noise_cov) (one D-vector observed)."""
    D = jnp.shape(y)[-1]
    x = numpyro.sample("x", dist.MultivariateNormal(jnp.zeros(D), covariance_matrix=prior_cov))
    numpyro.sample("y", dist.MultivariateNormal(x, covariance_matrix=noise_cov), obs=y)


def correlated_gaussian(dim: int = 6, rho: float = 0.95, prior_scale: float = 3.0,
                        noise_scale: float = 1.0, seed: int = 3) -> Problem:
    r"""A D-dimensional Gaussian posterior with strong correlations (exact).

    Noise covariance N_ij = noise_scale^2 rho^|i-j| (AR(1)-like, condition number grows with rho),
    prior P = prior_scale^2 I. Posterior covariance C = (P^-1 + N^-1)^-1, mean C N^-1 y;
    evidence y ~ N(0, P + N).
    """
    if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool) or dim < 1:
        raise OptionError(f"correlated_gaussian: dim must be a positive integer, got {dim!r}")
    if not (-1 < rho < 1 and prior_scale > 0 and noise_scale > 0):
        raise OptionError(f"correlated_gaussian: need -1 < rho < 1 and positive scales, got "
                          f"rho={rho!r}, prior_scale={prior_scale!r}, noise_scale={noise_scale!r}")
    rng = np.random.default_rng(seed)
    idx = np.arange(dim)
    N = noise_scale**2 * rho ** np.abs(idx[:, None] - idx[None, :])
    P = prior_scale**2 * np.eye(dim)
    x_true = rng.normal(0, prior_scale, size=dim)
    y = rng.multivariate_normal(x_true, N)
    C = np.linalg.inv(np.linalg.inv(P) + np.linalg.inv(N))
    mean = C @ np.linalg.solve(N, y)
    logz = stats.multivariate_normal(np.zeros(dim), P + N).logpdf(y)
    return Problem(
        "correlated_gaussian", correlated_gaussian_model,
        {"y": y.astype(np.float32), "prior_cov": P.astype(np.float32),
         "noise_cov": N.astype(np.float32)},
        f"{dim}-D Gaussian posterior, correlated noise (rho={rho})",
        posterior_mean={"x": mean}, posterior_sd={"x": np.sqrt(np.diag(C))},
        posterior_cov={"x": C}, log_evidence=float(logz),
        marginal_pdf={f"x[{j}]": stats.norm(mean[j], math.sqrt(C[j, j])).pdf for j in range(dim)},
    )


# ----------------------------------------------------------------------------- eight schools
def eight_schools() -> Problem:
    """posteriordb's eight_schools_noncentered with its reference draws (10 x 1000)."""
    from bayeslik.models import posteriordb

    p = posteriordb.load("eight_schools-eight_schools_noncentered")
    return Problem(
        "eight_schools", p["model"], p["data"],
        "eight schools, non-centred (posteriordb reference draws)",
        reference_draws=p["reference"],
    )


_PROBLEMS: dict[str, Callable[[], Problem]] = {
    "normal_mean": normal_mean,
    "normal_inverse_gamma": normal_inverse_gamma,
    "correlated_gaussian": correlated_gaussian,
    "eight_schools": eight_schools,
}


def names() -> list[str]:
    """The reference problems' names."""
    return list(_PROBLEMS)


def get(name: str) -> Problem:
    """The reference problem ``name`` with its default data."""
    if name not in _PROBLEMS:
        raise KeyError(f"unknown reference problem {name!r}; known: {names()}")
    return _PROBLEMS[name]()
