"""Tests of bayeslik.icdf: unit-cube (inverse-CDF) prior transforms.

Every supported univariate family is checked three ways: a Kolmogorov-Smirnov test of
icdf(uniform draws) against the scipy.stats CDF (float32, n = 2000, fixed seed), quantiles
against scipy.stats (ppf below 1/2, isf above) on a grid reaching 1e-15 into both tails
(float64, rtol 1e-6), and monotonicity of the quantile function. The KS test is shown to
reject wrong parameters. Multivariate families are checked through marginal KS tests and
moments. Most calls are eager: the expensive Gamma / Beta inversions inside icdf are
jitted on their own and so compile once per shape and dtype for the whole file; jitting
icdf as a whole is checked separately.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
import scipy.special as sps
import scipy.stats as st
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.distributions import transforms as T
from numpyro.distributions.transforms import biject_to

from bayeslik.errors import PriorTransformError
from bayeslik.icdf import check_icdf, icdf, unit_cube_shape

N_KS = 2000
KS_ALPHA = 1e-3  # a correct transform fails with probability 1e-3 (the seed is fixed)
# Quantile grid (float64), down to 1e-15 in both tails. All float64 quantile checks use
# this one shape and all float32 KS checks the shape of ks_draws(), so that compiled code
# (the Gamma / Beta inversions are jitted per shape) is shared between tests.
U_GRID = np.array(
    [1e-15, 1e-12, 1e-6, 1e-3, 0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 0.98]
    + [1 - 1e-3, 1 - 1e-6, 1 - 1e-12, 1 - 1e-15]
)
N_MV = 4000  # draws for multivariate moment checks, unit-cube shape (N_MV, 3)


# ----------------------------------------------------------------------------------
# reference distributions without a scipy.stats equivalent
# ----------------------------------------------------------------------------------


class Ref:
    """A minimal scipy-like reference: cdf, ppf and isf (the upper-tail quantile)."""

    def __init__(self, cdf, ppf, isf=None):
        self.cdf, self.ppf = cdf, ppf
        self.isf = isf if isf is not None else (lambda q: ppf(1.0 - q))


def reference_quantile(ref, u):
    """ppf(u) below 1/2 and isf(1 - u) above, so both tails keep their precision."""
    return np.where(u < 0.5, ref.ppf(np.minimum(u, 0.5)), ref.isf(np.minimum(1.0 - u, 0.5)))


def truncated_ref(base, low=-np.inf, high=np.inf):
    """``base`` truncated to [low, high], each quantile computed from the smaller tail.

    (scipy's truncnorm.isf loses accuracy far in the tails, hence this reference.)
    """
    f_low, s_low, f_high, s_high = base.cdf(low), base.sf(low), base.cdf(high), base.sf(high)
    mass = s_low - s_high if f_low > 0.5 else f_high - f_low

    def ppf(u):
        return base.ppf(f_low + u * mass) if f_low < 0.5 else base.isf(s_low - u * mass)

    def isf(q):
        return base.isf(s_high + q * mass) if s_high < 0.5 else base.ppf(f_high - q * mass)

    return Ref(lambda x: np.clip((base.cdf(x) - f_low) / mass, 0.0, 1.0), ppf, isf)


def half_normal_ref(scale):
    # scipy's halfnorm.ppf goes through (1 + u) / 2 and loses the relative precision of
    # both tails; erfinv(u) and isf((1 - u) / 2) keep it
    return Ref(
        st.halfnorm(scale=scale).cdf,
        lambda u: scale * np.sqrt(2.0) * sps.erfinv(u),
        lambda q: scale * st.norm.isf(0.5 * q),
    )


def half_cauchy_ref(scale):
    # tan(pi u / 2) = 1 / tan(pi (1 - u) / 2), the latter accurate next to the pole
    return Ref(
        st.halfcauchy(scale=scale).cdf,
        lambda u: scale * np.tan(0.5 * np.pi * u),
        lambda q: scale / np.tan(0.5 * np.pi * q),
    )


def kumaraswamy_ref(a, b):
    return Ref(
        lambda x: 1.0 - (1.0 - np.clip(x, 0, 1) ** a) ** b,
        lambda u: (-np.expm1(np.log1p(-u) / b)) ** (1.0 / a),
        lambda q: (-np.expm1(np.log(q) / b)) ** (1.0 / a),
    )


def soft_laplace_ref(loc, scale):
    return Ref(
        lambda x: np.arctan(np.exp((x - loc) / scale)) * 2.0 / np.pi,
        lambda u: loc + scale * np.log(np.tan(0.5 * np.pi * u)),
        lambda q: loc - scale * np.log(np.tan(0.5 * np.pi * q)),
    )


def soft_laplace_sf(x):
    return np.arctan(np.exp(-x)) * 2.0 / np.pi


def logit_normal_ref(mu, sigma):
    return Ref(
        lambda x: st.norm.cdf((sps.logit(x) - mu) / sigma),
        lambda u: sps.expit(mu + sigma * st.norm.ppf(u)),
        lambda q: sps.expit(mu + sigma * st.norm.isf(q)),
    )


def truncated_soft_laplace_ref(low):
    base = soft_laplace_ref(0.0, 1.0)
    mass = soft_laplace_sf(low)
    return Ref(
        lambda x: np.clip((base.cdf(x) - base.cdf(low)) / mass, 0.0, 1.0),
        lambda u: base.isf(mass * (1.0 - u)),
        lambda q: base.isf(q * mass),
    )


# (id, factory of the numpyro distribution, factory of the reference). Factories are
# called inside the test, so parameters take the precision the test runs in.
UNIVARIATE = [
    ("Normal", lambda: dist.Normal(1.5, 2.0), lambda: st.norm(1.5, 2.0)),
    ("HalfNormal", lambda: dist.HalfNormal(2.0), lambda: half_normal_ref(2.0)),
    ("Cauchy", lambda: dist.Cauchy(-1.0, 0.5), lambda: st.cauchy(-1.0, 0.5)),
    ("HalfCauchy", lambda: dist.HalfCauchy(1.5), lambda: half_cauchy_ref(1.5)),
    ("StudentT", lambda: dist.StudentT(3.5, 1.0, 2.0), lambda: st.t(3.5, 1.0, 2.0)),
    ("StudentT-df0.7", lambda: dist.StudentT(0.7, 0.0, 1.0), lambda: st.t(0.7)),
    ("StudentT-df50", lambda: dist.StudentT(50.0, 0.0, 1.0), lambda: st.t(50.0)),
    ("StudentT-df1e4", lambda: dist.StudentT(1e4, 0.0, 1.0), lambda: st.t(1e4)),
    ("Laplace", lambda: dist.Laplace(0.5, 1.5), lambda: st.laplace(0.5, 1.5)),
    ("Logistic", lambda: dist.Logistic(0.5, 1.5), lambda: st.logistic(0.5, 1.5)),
    ("Gumbel", lambda: dist.Gumbel(0.5, 1.5), lambda: st.gumbel_r(0.5, 1.5)),
    ("Exponential", lambda: dist.Exponential(2.5), lambda: st.expon(scale=0.4)),
    ("Uniform", lambda: dist.Uniform(-1.0, 3.0), lambda: st.uniform(-1.0, 4.0)),
    ("Gamma-0.5", lambda: dist.Gamma(0.5, 2.0), lambda: st.gamma(0.5, scale=0.5)),
    ("Gamma-3", lambda: dist.Gamma(3.0, 1.0), lambda: st.gamma(3.0)),
    ("Gamma-50", lambda: dist.Gamma(50.0, 3.0), lambda: st.gamma(50.0, scale=1 / 3.0)),
    ("Chi2", lambda: dist.Chi2(4.0), lambda: st.chi2(4.0)),
    ("InverseGamma", lambda: dist.InverseGamma(3.0, 2.0), lambda: st.invgamma(3.0, scale=2.0)),
    ("Beta-0.5-0.5", lambda: dist.Beta(0.5, 0.5), lambda: st.beta(0.5, 0.5)),
    ("Beta-2-5", lambda: dist.Beta(2.0, 5.0), lambda: st.beta(2.0, 5.0)),
    ("Beta-50-0.5", lambda: dist.Beta(50.0, 0.5), lambda: st.beta(50.0, 0.5)),
    ("BetaProportion", lambda: dist.BetaProportion(0.3, 10.0), lambda: st.beta(3.0, 7.0)),
    (
        "LogNormal",
        lambda: dist.LogNormal(0.5, 0.8),
        lambda: st.lognorm(s=0.8, scale=np.exp(0.5)),
    ),
    ("LogUniform", lambda: dist.LogUniform(0.1, 100.0), lambda: st.loguniform(0.1, 100.0)),
    ("Pareto", lambda: dist.Pareto(2.0, 3.0), lambda: st.pareto(3.0, scale=2.0)),
    ("Weibull", lambda: dist.Weibull(2.0, 1.5), lambda: st.weibull_min(1.5, scale=2.0)),
    ("Gompertz", lambda: dist.Gompertz(0.5, 2.0), lambda: st.gompertz(0.5, scale=0.5)),
    ("Levy", lambda: dist.Levy(0.05, 2.0), lambda: st.levy(0.05, 2.0)),
    ("Dagum", lambda: dist.Dagum(2.0, 3.0, 1.5), lambda: st.burr(c=3.0, d=2.0, scale=1.5)),
    ("Kumaraswamy", lambda: dist.Kumaraswamy(2.0, 3.0), lambda: kumaraswamy_ref(2.0, 3.0)),
    ("SoftLaplace", lambda: dist.SoftLaplace(0.5, 1.5), lambda: soft_laplace_ref(0.5, 1.5)),
    (
        "AsymmetricLaplace",
        lambda: dist.AsymmetricLaplace(0.5, 1.5, 2.0),
        lambda: st.laplace_asymmetric(2.0, loc=0.5, scale=1.5),
    ),
    (
        "AsymmetricLaplaceQuantile",
        lambda: dist.AsymmetricLaplaceQuantile(0.5, 1.5, 0.3),
        lambda: st.laplace_asymmetric(
            np.sqrt(0.3 / 0.7), loc=0.5, scale=1.5 / np.sqrt(0.3 * 0.7)
        ),
    ),
    # truncations (numpyro's TruncatedNormal etc. are factories of these classes)
    (
        "TruncatedNormal-left",
        lambda: dist.TruncatedNormal(1.0, 2.0, low=0.0),
        lambda: truncated_ref(st.norm(1.0, 2.0), low=0.0),
    ),
    (
        "TruncatedNormal-right",
        lambda: dist.TruncatedNormal(1.0, 2.0, high=0.0),
        lambda: truncated_ref(st.norm(1.0, 2.0), high=0.0),
    ),
    (
        "TruncatedNormal-two-sided",
        lambda: dist.TruncatedNormal(1.0, 2.0, low=-1.0, high=2.0),
        lambda: truncated_ref(st.norm(1.0, 2.0), -1.0, 2.0),
    ),
    (
        "TruncatedNormal-far-tail",
        lambda: dist.TruncatedNormal(0.0, 1.0, low=7.0),
        lambda: truncated_ref(st.norm(), low=7.0),
    ),
    (
        "TruncatedNormal-far-band",
        lambda: dist.TruncatedNormal(0.0, 1.0, low=-6.0, high=-5.0),
        lambda: truncated_ref(st.norm(), -6.0, -5.0),
    ),
    (
        "TruncatedCauchy",
        lambda: dist.TruncatedCauchy(0.0, 1.0, low=-1.0, high=2.0),
        lambda: truncated_ref(st.cauchy(), -1.0, 2.0),
    ),
    (
        "Truncated-StudentT",
        lambda: dist.TruncatedDistribution(dist.StudentT(4.0, 0.0, 1.0), low=1.0),
        lambda: truncated_ref(st.t(4.0), low=1.0),
    ),
    (
        "Truncated-Laplace",
        lambda: dist.TruncatedDistribution(dist.Laplace(0.0, 1.0), high=-0.5),
        lambda: truncated_ref(st.laplace(), high=-0.5),
    ),
    (
        "Truncated-Logistic",
        lambda: dist.TruncatedDistribution(dist.Logistic(1.0, 0.5), low=0.0, high=3.0),
        lambda: truncated_ref(st.logistic(1.0, 0.5), 0.0, 3.0),
    ),
    (
        "Truncated-SoftLaplace",
        lambda: dist.TruncatedDistribution(dist.SoftLaplace(0.0, 1.0), low=0.5),
        lambda: truncated_soft_laplace_ref(0.5),
    ),
    (
        "TruncatedGamma-two-sided",
        lambda: dist.TruncatedGamma(2.0, 1.0, low=0.5, high=3.0),
        lambda: truncated_ref(st.gamma(2.0), 0.5, 3.0),
    ),
    (
        "TruncatedGamma-left",
        lambda: dist.TruncatedGamma(2.0, 1.5, low=4.0),
        lambda: truncated_ref(st.gamma(2.0, scale=1 / 1.5), low=4.0),
    ),
    (
        "TruncatedGamma-right",
        lambda: dist.TruncatedGamma(0.5, 1.0, high=0.2),
        lambda: truncated_ref(st.gamma(0.5), high=0.2),
    ),
    # elementwise monotone transforms, including decreasing ones
    (
        "Affine-negative-scale",
        lambda: dist.TransformedDistribution(dist.Normal(0.0, 1.0), T.AffineTransform(2.0, -3.0)),
        lambda: st.norm(2.0, 3.0),
    ),
    (
        "Sigmoid-of-Normal",
        lambda: dist.TransformedDistribution(dist.Normal(0.3, 1.2), T.SigmoidTransform()),
        lambda: logit_normal_ref(0.3, 1.2),
    ),
    (
        "Power-of-HalfNormal",
        lambda: dist.TransformedDistribution(dist.HalfNormal(1.0), T.PowerTransform(2.0)),
        lambda: st.chi2(1.0),
    ),
    (
        "Inverse-Exp-of-LogNormal",
        lambda: dist.TransformedDistribution(dist.LogNormal(0.3, 1.2), T.ExpTransform().inv),
        lambda: st.norm(0.3, 1.2),
    ),
    (
        "Compose-Exp-Affine",
        lambda: dist.TransformedDistribution(
            dist.Normal(0.2, 0.5),
            T.ComposeTransform([T.ExpTransform(), T.AffineTransform(1.0, 2.0)]),
        ),
        lambda: st.lognorm(s=0.5, loc=1.0, scale=2.0 * np.exp(0.2)),
    ),
    (
        "Reciprocal-of-Gamma-via-Affine",
        lambda: dist.TransformedDistribution(
            dist.Gamma(2.0, 1.0), [T.PowerTransform(-1.0), T.AffineTransform(0.0, -1.0)]
        ),
        lambda: Ref(
            lambda x: st.invgamma(2.0).sf(-x),
            lambda u: -st.invgamma(2.0).isf(u),
            lambda q: -st.invgamma(2.0).ppf(q),
        ),
    ),
    ("Masked-Gamma", lambda: dist.Gamma(3.0, 1.0).mask(False), lambda: st.gamma(3.0)),
]
UNIVARIATE_IDS = [case[0] for case in UNIVARIATE]


def ks_pvalue(x, cdf) -> float:
    return st.kstest(np.asarray(x, dtype=np.float64).ravel(), cdf).pvalue


def uniform_draws(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).uniform(size=shape).astype(dtype)


def ks_draws(seed=0):
    """N_KS uniform draws followed by the endpoints 0 and 1 (float32)."""
    return jnp.asarray(np.concatenate([uniform_draws(N_KS, seed), np.float32([0.0, 1.0])]))


def assert_in_support(fn, x):
    ok = np.asarray(fn.support(jnp.asarray(x)))
    assert ok.all(), f"{type(fn).__name__}: values outside the support"


# ----------------------------------------------------------------------------------
# univariate families
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name, make_fn, make_ref", UNIVARIATE, ids=UNIVARIATE_IDS)
def test_univariate_ks_float32(name, make_fn, make_ref):
    """icdf(uniform) passes a KS test; u = 0 and u = 1 map to finite values in the support."""
    fn, ref = make_fn(), make_ref()
    assert unit_cube_shape(fn) == ()
    x = np.asarray(icdf(fn, ks_draws(seed=len(name))))
    assert x.shape == (N_KS + 2,) and x.dtype == np.float32
    assert np.isfinite(x).all()
    assert_in_support(fn, x)
    assert np.isfinite(np.asarray(biject_to(fn.support).inv(jnp.asarray(x)))).all()
    assert ks_pvalue(x[:N_KS], ref.cdf) > KS_ALPHA


@pytest.mark.parametrize("name, make_fn, make_ref", UNIVARIATE, ids=UNIVARIATE_IDS)
def test_univariate_quantiles_float64(name, make_fn, make_ref, x64):
    """Quantiles match scipy to 1e-6 from 1e-12 to 1 - 1e-12 and increase with u."""
    fn, ref = make_fn(), make_ref()
    x = np.asarray(icdf(fn, jnp.asarray(U_GRID)))
    assert x.dtype == np.float64
    np.testing.assert_allclose(x, reference_quantile(ref, U_GRID), rtol=1e-6, atol=1e-12)
    assert (np.diff(x) >= 0).all(), "the quantile function must be nondecreasing"
    assert_in_support(fn, x)


@pytest.mark.parametrize(
    "fn_wrong, ref_right",
    [
        (lambda: dist.Normal(0.2, 1.0), st.norm(0.0, 1.0)),  # location off by 0.2 sd
        (lambda: dist.Normal(0.0, 1.25), st.norm(0.0, 1.0)),  # scale off by 25%
        (lambda: dist.Gamma(2.0, 2.0), st.gamma(2.0, scale=2.0)),  # rate read as scale
        (lambda: dist.StudentT(4.0, 0.0, 1.0), st.norm()),  # tails too heavy
        (lambda: dist.Beta(2.0, 5.0), st.beta(2.5, 5.0)),  # shape off by 25%
    ],
    ids=["location", "scale", "rate-as-scale", "df", "beta-shape"],
)
def test_ks_rejects_wrong_parameters(fn_wrong, ref_right):
    """The KS check used above has the power to catch a wrongly parametrised transform."""
    x = icdf(fn_wrong(), ks_draws())[:N_KS]
    assert ks_pvalue(x, ref_right.cdf) < KS_ALPHA


JIT_CASES = [
    lambda: dist.Normal(jnp.zeros(3), 1.0).expand((2, 3)).to_event(1),
    lambda: dist.TruncatedNormal(1.0, 2.0, low=-1.0, high=2.0),
    lambda: dist.InverseGamma(3.0, 2.0),
    lambda: dist.MultivariateNormal(jnp.zeros(2), jnp.asarray([[2.0, 0.3], [0.3, 1.0]])),
]


@pytest.mark.parametrize("make_fn", JIT_CASES, ids=["expanded", "truncated", "invgamma", "mvn"])
def test_jit_matches_eager(make_fn):
    fn = make_fn()
    u = jnp.asarray(uniform_draws((50,) + unit_cube_shape(fn), seed=11))
    eager = np.asarray(icdf(fn, u))
    jitted = np.asarray(jax.jit(lambda u: icdf(fn, u))(u))
    assert jitted.shape == (50,) + fn.shape()
    np.testing.assert_allclose(jitted, eager, rtol=2e-5, atol=1e-6)


def test_vmap_over_unit_cube_points():
    fn = dist.MultivariateNormal(jnp.asarray([1.0, -1.0]), jnp.asarray([[2.0, 0.3], [0.3, 1.0]]))
    u = jnp.asarray(uniform_draws((7, 2), seed=12))
    np.testing.assert_allclose(
        np.asarray(jax.vmap(lambda v: icdf(fn, v))(u)), np.asarray(icdf(fn, u)), rtol=1e-6
    )


def test_median_of_normal_is_exact():
    assert float(icdf(dist.Normal(1.25, 3.0), jnp.asarray(0.5))) == 1.25


def test_gamma_beta_student_quantiles_against_scipy(x64):
    """Numerical inversions: shape parameters from 1e-2 to 1e4, tails to 1e-15, rtol 1e-10."""
    u = U_GRID
    for a in [0.01, 0.1, 0.5, 1.0, 2.5, 10.0, 50.0, 300.0, 1e4]:
        ref = np.where(u < 0.5, sps.gammaincinv(a, u), sps.gammainccinv(a, 1 - u))
        x = np.asarray(icdf(dist.Gamma(a, 1.0), jnp.asarray(u)))
        keep = ref > 1e-300  # smaller quantiles underflow (and are clipped to tiny)
        np.testing.assert_allclose(x[keep], ref[keep], rtol=1e-10, err_msg=f"Gamma({a})")
    for a, b in [(0.5, 0.5), (0.1, 3.0), (2.0, 5.0), (50.0, 0.5), (1e3, 2e3), (0.02, 0.02)]:
        ref = np.where(u < 0.5, sps.betaincinv(a, b, u), sps.betainccinv(a, b, 1 - u))
        x = np.asarray(icdf(dist.Beta(a, b), jnp.asarray(u)))
        keep = (ref > 1e-300) & (ref < 1 - 1e-12)  # beyond, 1 - x is not representable
        np.testing.assert_allclose(x[keep], ref[keep], rtol=1e-10, err_msg=f"Beta({a}, {b})")
    for df in [0.5, 1.0, 2.0, 5.0, 30.0, 1e3, 1e5]:
        x = np.asarray(icdf(dist.StudentT(df), jnp.asarray(u)))
        ref = np.where(u < 0.5, st.t.ppf(u, df), st.t.isf(1 - u, df))
        np.testing.assert_allclose(x, ref, rtol=1e-9, err_msg=f"StudentT({df})")


# ----------------------------------------------------------------------------------
# batches and wrappers
# ----------------------------------------------------------------------------------


def test_expanded_independent_masked_batches():
    loc = jnp.asarray([-1.0, 0.0, 2.0])
    scale = jnp.asarray([0.5, 1.0, 2.0])
    fn = dist.Normal(loc, scale).expand((4, 3)).to_event(1).mask(False)
    assert unit_cube_shape(fn) == (4, 3)
    u = uniform_draws((500, 4, 3), seed=3)
    x = np.asarray(icdf(fn, jnp.asarray(u)))
    assert x.shape == (500, 4, 3)
    for j in range(3):
        assert ks_pvalue(x[:, :, j], st.norm(loc[j], scale[j]).cdf) > KS_ALPHA
    # parameters broadcast against u: the same u gives the same value in every row
    one = np.asarray(icdf(fn, jnp.broadcast_to(jnp.asarray([0.2, 0.5, 0.9]), (4, 3))))
    np.testing.assert_allclose(one, np.broadcast_to(one[0], (4, 3)))


def test_batched_parameters_gamma():
    conc = jnp.asarray([0.5, 2.0, 20.0])
    fn = dist.Gamma(conc, 2.0).expand((4, 3))
    u = uniform_draws((500, 4, 3), seed=4)
    x = np.asarray(icdf(fn, jnp.asarray(u)))
    for j, a in enumerate(np.asarray(conc)):
        assert ks_pvalue(x[:, :, j], st.gamma(a, scale=0.5).cdf) > KS_ALPHA


def test_mixed_sign_affine_is_increasing(x64):
    fn = dist.TransformedDistribution(
        dist.Normal(jnp.zeros(2), 1.0), T.AffineTransform(1.0, jnp.asarray([2.0, -3.0]))
    )
    u = jnp.asarray(np.stack([U_GRID, U_GRID], -1))
    x = np.asarray(icdf(fn, u))
    np.testing.assert_allclose(x[:, 0], st.norm(1.0, 2.0).ppf(U_GRID), rtol=1e-9)
    np.testing.assert_allclose(x[:, 1], st.norm(1.0, 3.0).ppf(U_GRID), rtol=1e-9)


def test_u_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match="unit-cube slice of shape"):
        icdf(dist.Dirichlet(jnp.ones(4)), jnp.full((4,), 0.5))


# ----------------------------------------------------------------------------------
# Dirichlet
# ----------------------------------------------------------------------------------


def dirichlet_moments(alpha):
    a0 = alpha.sum()
    mean = alpha / a0
    cov = (np.diag(alpha) * a0 - np.outer(alpha, alpha)) / (a0**2 * (a0 + 1))
    return mean, cov


def assert_moments(x, mean, cov, n_se=5.0):
    """Sample mean and covariance within n_se standard errors of the analytic values."""
    n = x.shape[0]
    m = x.mean(0)
    se_mean = np.sqrt(np.diag(cov) / n)
    assert (np.abs(m - mean) < n_se * se_mean).all(), (m, mean)
    c = x - m
    prods = c[:, :, None] * c[:, None, :]
    s = prods.mean(0)
    se_cov = prods.std(0) / np.sqrt(n)
    assert (np.abs(s - cov) < n_se * se_cov + 1e-12).all(), (s, cov)


def test_dirichlet_marginals_moments_and_simplex():
    alpha = np.array([0.3, 1.0, 2.5, 5.0])
    fn = dist.Dirichlet(jnp.asarray(alpha))
    assert unit_cube_shape(fn) == (3,)
    u = uniform_draws((N_MV, 3), seed=5)
    x = np.asarray(icdf(fn, jnp.asarray(u)), dtype=np.float64)
    assert x.shape == (N_MV, 4)
    assert (x > 0).all()
    np.testing.assert_allclose(x.sum(-1), 1.0, atol=1e-5)
    for i, a in enumerate(alpha):
        assert ks_pvalue(x[:, i], st.beta(a, alpha.sum() - a).cdf) > KS_ALPHA
    assert_moments(x, *dirichlet_moments(alpha))


def test_dirichlet_batched_and_small_concentrations(x64):
    # float64: with concentrations of 0.05, 6% of a component's mass lies within 6e-8 of 1,
    # which float32 rounds to 1.0 (a representation limit that a KS test would flag)
    alpha = jnp.asarray([[0.05, 0.05, 0.05], [2.0, 3.0, 4.0]])
    fn = dist.Dirichlet(alpha)
    assert unit_cube_shape(fn) == (2, 2)
    u = uniform_draws((2000, 2, 2), seed=6, dtype=np.float64)
    x = np.asarray(icdf(fn, jnp.asarray(u)))
    assert x.shape == (2000, 2, 3)
    assert (x > 0).all() and np.isfinite(x).all()
    np.testing.assert_allclose(x.sum(-1), 1.0, atol=1e-5)
    assert np.isfinite(np.asarray(fn.log_prob(jnp.asarray(x)))).all()
    assert np.isfinite(np.asarray(biject_to(fn.support).inv(jnp.asarray(x)))).all()
    for b in range(2):
        a = np.asarray(alpha[b], dtype=np.float64)
        for i in range(3):
            assert ks_pvalue(x[:, b, i], st.beta(a[i], a.sum() - a[i]).cdf) > KS_ALPHA


# ----------------------------------------------------------------------------------
# multivariate normal family
# ----------------------------------------------------------------------------------

LOC = np.array([1.0, -2.0, 0.5])
COV = np.array([[2.0, 0.6, -0.3], [0.6, 1.0, 0.2], [-0.3, 0.2, 0.5]])


@pytest.mark.parametrize("param", ["covariance_matrix", "precision_matrix", "scale_tril"])
def test_multivariate_normal(param):
    value = {
        "covariance_matrix": COV,
        "precision_matrix": np.linalg.inv(COV),
        "scale_tril": np.linalg.cholesky(COV),
    }[param]
    fn = dist.MultivariateNormal(jnp.asarray(LOC), **{param: jnp.asarray(value)})
    assert unit_cube_shape(fn) == (3,)
    np.testing.assert_allclose(np.asarray(icdf(fn, jnp.full((3,), 0.5))), LOC, atol=1e-6)
    x = np.asarray(icdf(fn, jnp.asarray(uniform_draws((N_MV, 3), seed=7))), dtype=np.float64)
    assert_moments(x, LOC, COV)
    for i in range(3):
        assert ks_pvalue(x[:, i], st.norm(LOC[i], np.sqrt(COV[i, i])).cdf) > KS_ALPHA


def test_multivariate_normal_exact_median(x64):
    fn = dist.MultivariateNormal(jnp.asarray(LOC), jnp.asarray(COV))
    np.testing.assert_array_equal(np.asarray(icdf(fn, jnp.full((3,), 0.5))), LOC)


def test_multivariate_normal_batched():
    locs = jnp.asarray([LOC, -LOC])
    fn = dist.MultivariateNormal(locs, jnp.asarray(COV)).expand((5, 2))
    assert unit_cube_shape(fn) == (5, 2, 3)
    x = icdf(fn, jnp.full((5, 2, 3), 0.5))
    expected = np.broadcast_to(np.asarray(locs), (5, 2, 3))
    np.testing.assert_allclose(np.asarray(x), expected, atol=1e-6)


def test_low_rank_multivariate_normal():
    w = np.array([[1.0, 0.2], [0.5, -0.4], [0.0, 0.8]])
    d = np.array([0.3, 0.5, 0.2])
    fn = dist.LowRankMultivariateNormal(jnp.asarray(LOC), jnp.asarray(w), jnp.asarray(d))
    assert unit_cube_shape(fn) == (3,)
    x = np.asarray(icdf(fn, jnp.asarray(uniform_draws((N_MV, 3), seed=8))), np.float64)
    assert_moments(x, LOC, w @ w.T + np.diag(d))


def test_multivariate_student_t():
    df = 5.0
    scale_tril = np.linalg.cholesky(COV)
    fn = dist.MultivariateStudentT(df, jnp.asarray(LOC), jnp.asarray(scale_tril))
    assert unit_cube_shape(fn) == (3,)
    x = np.asarray(icdf(fn, jnp.asarray(uniform_draws((N_MV, 3), seed=9))), np.float64)
    for i in range(3):
        ref = st.t(df, LOC[i], np.sqrt(COV[i, i]))
        assert ks_pvalue(x[:, i], ref.cdf) > KS_ALPHA
    # the joint: (x - mu)' Sigma^-1 (x - mu) / D ~ F(D, df)
    r = x - LOC
    maha = np.einsum("ni,ij,nj->n", r, np.linalg.inv(COV), r) / 3
    assert ks_pvalue(maha, st.f(3, df).cdf) > KS_ALPHA


def test_gaussian_random_walk():
    fn = dist.GaussianRandomWalk(0.7, num_steps=3)
    assert unit_cube_shape(fn) == (3,)
    x = np.asarray(icdf(fn, jnp.asarray(uniform_draws((N_MV, 3), seed=10))))
    steps = np.diff(x, axis=-1, prepend=0.0)
    for i in range(3):
        assert ks_pvalue(steps[:, i], st.norm(0, 0.7).cdf) > KS_ALPHA
    assert abs(np.corrcoef(steps[:, 1], steps[:, 2])[0, 1]) < 0.1


# ----------------------------------------------------------------------------------
# unit_cube_shape
# ----------------------------------------------------------------------------------

SHAPE_CASES = [
    (lambda: dist.Normal(0.0, 1.0), ()),
    (lambda: dist.Normal(jnp.zeros(3), 1.0), (3,)),
    (lambda: dist.Normal(jnp.zeros(3), 1.0).expand((4, 3)), (4, 3)),
    (lambda: dist.Normal(jnp.zeros(3), 1.0).expand((4, 3)).to_event(2), (4, 3)),
    (lambda: dist.HalfCauchy(jnp.ones((2, 1))).expand((2, 5)).mask(False), (2, 5)),
    (lambda: dist.Beta(2.0, 3.0).expand((6,)).to_event(1), (6,)),
    (lambda: dist.LogNormal(jnp.zeros(2), 1.0), (2,)),
    (lambda: dist.TruncatedNormal(jnp.zeros(3), 1.0, low=0.0), (3,)),
    (lambda: dist.Dirichlet(jnp.ones(5)), (4,)),
    (lambda: dist.Dirichlet(jnp.ones((2, 5))), (2, 4)),
    (lambda: dist.Dirichlet(jnp.ones(5)).expand((3,)), (3, 4)),
    (lambda: dist.Dirichlet(jnp.ones(5)).expand((3,)).to_event(1), (3, 4)),
    (lambda: dist.MultivariateNormal(jnp.zeros(4), jnp.eye(4)), (4,)),
    (lambda: dist.MultivariateNormal(jnp.zeros(4), jnp.eye(4)).expand((2,)), (2, 4)),
    (lambda: dist.MultivariateStudentT(3.0, jnp.zeros(2), jnp.eye(2)), (2,)),
    (lambda: dist.GaussianRandomWalk(1.0, num_steps=7), (7,)),
]


@pytest.mark.parametrize("make_fn, expected", SHAPE_CASES)
def test_unit_cube_shape_is_the_unconstrained_shape(make_fn, expected):
    fn = make_fn()
    assert unit_cube_shape(fn) == expected
    assert unit_cube_shape(fn) == tuple(biject_to(fn.support).inverse_shape(fn.shape()))


# ----------------------------------------------------------------------------------
# check_icdf
# ----------------------------------------------------------------------------------

UNSUPPORTED = [
    ("LKJCholesky", lambda: dist.LKJCholesky(3, 2.0), "L", ("LKJCholesky", "Cholesky", "nuts")),
    ("LKJ", lambda: dist.LKJ(3, 2.0), "corr", ("LKJ", "reparametrise", "nuts")),
    ("Poisson", lambda: dist.Poisson(3.0), "k", ("Poisson", "discrete", "observed")),
    (
        "Bernoulli-in-plate",
        lambda: dist.Bernoulli(0.3).expand((5,)).to_event(1),
        "z",
        ("Bernoulli", "Independent", "discrete"),
    ),
    (
        "ImproperUniform",
        lambda: dist.ImproperUniform(constraints.real, (), ()),
        "theta",
        ("ImproperUniform", "improper", "proper prior", "nuts"),
    ),
    ("Delta", lambda: dist.Delta(1.0), "c", ("Delta", "deterministic")),
    (
        "Wishart",
        lambda: dist.Wishart(4.0, scale_matrix=jnp.eye(2)),
        "W",
        ("Wishart", "reparametrise", "smc"),
    ),
    (
        "StickBreaking",
        lambda: dist.TransformedDistribution(
            dist.Normal(jnp.zeros(3), 1.0).to_event(1), T.StickBreakingTransform()
        ),
        "w",
        ("StickBreakingTransform", "monotone", "nuts"),
    ),
    ("Folded", lambda: dist.FoldedDistribution(dist.Normal(1.0, 1.0)), "f", ("AbsTransform",)),
    (
        "Mixture",
        lambda: dist.MixtureSameFamily(
            dist.Categorical(jnp.ones(2) / 2), dist.Normal(jnp.zeros(2), 1.0)
        ),
        "m",
        ("MixtureSameFamily", "Supported priors", "nuts"),
    ),
]


@pytest.mark.parametrize(
    "make_fn, site, needles", [c[1:] for c in UNSUPPORTED], ids=[c[0] for c in UNSUPPORTED]
)
def test_check_icdf_raises_with_an_actionable_message(make_fn, site, needles):
    fn = make_fn()
    with pytest.raises(PriorTransformError) as info:
        check_icdf(fn, site)
    message = str(info.value)
    assert f"'{site}'" in message
    assert type(fn).__name__ in message
    for needle in needles:
        assert needle.lower() in message.lower(), (needle, message)


def test_check_icdf_compiles_nothing(no_jit):
    for _, make_fn, _ in UNIVARIATE:
        check_icdf(make_fn(), "x")
    check_icdf(dist.Dirichlet(jnp.ones(3)).expand((2,)).to_event(1), "w")
    check_icdf(dist.MultivariateNormal(jnp.zeros(2), jnp.eye(2)), "mvn")
    for _, make_fn, site, _ in UNSUPPORTED:
        with pytest.raises(PriorTransformError, match=site):
            check_icdf(make_fn(), site)


def test_unsupported_distribution_is_refused_by_icdf_and_unit_cube_shape():
    with pytest.raises(PriorTransformError):
        unit_cube_shape(dist.Poisson(2.0))
    with pytest.raises(PriorTransformError):
        icdf(dist.LKJCholesky(3, 1.0), jnp.full((3,), 0.5))


# ----------------------------------------------------------------------------------
# as Posterior uses it: a sequential model under handlers.substitute
# ----------------------------------------------------------------------------------


def test_sequential_model_under_substitute():
    def model():
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with numpyro.plate("groups", 3):
            numpyro.sample("theta", dist.Normal(mu, 1.0))
        numpyro.sample("w", dist.Dirichlet(jnp.ones(3)))

    trace = handlers.trace(handlers.seed(model, rng_seed=0)).get_trace()
    shapes = {}
    for name in ("mu", "theta", "w"):
        fn = trace[name]["fn"]
        check_icdf(fn, name)
        shapes[name] = unit_cube_shape(fn)
        assert shapes[name] == tuple(biject_to(fn.support).inverse_shape(fn.shape()))
    assert shapes == {"mu": (), "theta": (3,), "w": (2,)}

    cube = {"mu": jnp.asarray(0.9), "theta": jnp.full((3,), 0.5), "w": jnp.asarray([0.5, 0.5])}

    def substitute_fn(site):
        if site["type"] == "sample" and site["name"] in cube:
            return icdf(site["fn"], cube[site["name"]])
        return None

    @jax.jit
    def transform():
        seeded = handlers.seed(model, rng_seed=0)
        tr = handlers.trace(handlers.substitute(seeded, substitute_fn=substitute_fn)).get_trace()
        return tr["mu"]["value"], tr["theta"]["value"], tr["w"]["value"]

    mu, theta, w = transform()
    assert float(mu) == pytest.approx(st.norm.ppf(0.9), rel=1e-5)
    np.testing.assert_allclose(np.asarray(theta), float(mu), rtol=1e-6)  # median given mu
    np.testing.assert_allclose(float(jnp.sum(w)), 1.0, rtol=1e-6)
