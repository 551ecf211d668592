"""Tests of the hierarchical few-shot meta-learner (models/meta.py).

Exact (float64, sample-free): the per-task marginal likelihood against the full-covariance
Gaussian and against numerical integration over w (1-D quad, 2-D grid); masking equals dropping
rows; the few-shot predictive against explicit joint-Gaussian conditioning and the mixture
quantiles against a root-finder; the streaming update against the exact conjugate NIW update in
the limit where every task reveals its weights.
Statistical (fixed seed): the NIW prior's sampled moments (and the unit-cube prior transform)
against the analytic NIW moments within k standard errors and scipy's invwishart by KS; NUTS
recovers known (mu0, Sigma0, sigma) within k posterior sd; the streaming posterior mean of mu0
(averaged over task orders) within 0.3 posterior sd of NUTS's; the hierarchical predictive beats per-task ridge at 2 and
5 shots by several standard errors of the paired difference.
Errors: bad input is a ValueError naming the argument, raised before any compile.
"""

from __future__ import annotations

import math

import arviz_stats as azs
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats as st
from scipy import integrate, optimize
from scipy.special import logsumexp

import bayeslik as bl
from bayeslik.models import meta
from tests.harness import K  # the tolerance, in standard errors / posterior sds


# --------------------------------------------------------------------------------- helpers
def _random_task(rng, n, p):
    phi = rng.normal(size=(n, p))
    y = rng.normal(size=n)
    mu0 = rng.normal(size=p)
    Lr = rng.normal(size=(p, p)) * 0.5 + np.eye(p)
    Sigma0 = Lr @ Lr.T
    return phi, y, mu0, Sigma0, 0.4


def _full_gaussian(phi, y, mu0, Sigma0, sigma):
    C = phi @ Sigma0 @ phi.T + sigma**2 * np.eye(len(y))
    return st.multivariate_normal(phi @ mu0, C).logpdf(y)


def _prec_chol(Sigma0):
    return np.linalg.cholesky(np.linalg.inv(Sigma0))


def _loglik(phi, y, mask, mu0, Sigma0, sigma):
    return float(meta.task_loglik(jnp.asarray(phi), jnp.asarray(y), jnp.asarray(mask),
                                  jnp.asarray(mu0), jnp.asarray(_prec_chol(Sigma0)), sigma))


# --------------------------------------------------------------------------------- marginal
@pytest.mark.parametrize("n,p", [(1, 1), (3, 4), (7, 9)])
def test_marginal_equals_full_covariance_gaussian(x64, rng, n, p):
    """Woodbury/determinant-lemma form == log N(y | Phi mu0, Phi Sigma0 Phi' + s2 I), incl. n < p."""
    phi, y, mu0, Sigma0, sigma = _random_task(rng, n, p)
    got = _loglik(phi, y, np.ones(n), mu0, Sigma0, sigma)
    assert got == pytest.approx(_full_gaussian(phi, y, mu0, Sigma0, sigma), rel=1e-11, abs=1e-11)


def test_marginal_equals_numerical_integral_1d(x64):
    phi = np.array([[1.3], [-0.4], [2.0]])
    y = np.array([0.7, -0.2, 1.9])
    mu0, s0, sigma = np.array([0.3]), 0.8, 0.5

    def integrand(w):
        return math.exp(st.norm(phi[:, 0] * w, sigma).logpdf(y).sum() + st.norm(mu0[0], s0).logpdf(w))

    val, err = integrate.quad(integrand, -12, 12, epsabs=1e-14, epsrel=1e-12, points=[0.9])
    got = _loglik(phi, y, np.ones(3), mu0, np.array([[s0**2]]), sigma)
    assert got == pytest.approx(math.log(val), abs=1e-9)


def test_marginal_equals_numerical_integral_2d(x64):
    """Grid integration over (w1, w2): the integrand is a smooth Gaussian bump well inside the
    grid, so the trapezoid rule is accurate to far below the 1e-6 tolerance."""
    phi = np.array([[1.0, 0.5], [1.0, -1.2], [1.0, 2.1], [1.0, 0.0]])
    y = np.array([0.4, -0.9, 1.8, 0.1])
    mu0 = np.array([0.2, 0.5])
    Sigma0 = np.array([[0.6, 0.2], [0.2, 0.9]])
    sigma = 0.7
    g = np.linspace(-6, 6, 601)
    W1, W2 = np.meshgrid(g, g, indexing="ij")
    W = np.stack([W1.ravel(), W2.ravel()], 1)
    log_f = st.multivariate_normal(mu0, Sigma0).logpdf(W)
    log_f = log_f + st.norm.logpdf(y[None], W @ phi.T, sigma).sum(1)
    h = g[1] - g[0]
    wts = np.ones_like(g)
    wts[[0, -1]] = 0.5
    log_w = np.log(np.outer(wts, wts).ravel() * h * h)
    ref = logsumexp(log_f + log_w)
    assert _loglik(phi, y, np.ones(4), mu0, Sigma0, sigma) == pytest.approx(ref, abs=1e-6)


def test_mask_equals_dropping_rows(x64, rng):
    phi, y, mu0, Sigma0, sigma = _random_task(rng, 9, 4)
    mask = np.array([1, 0, 1, 1, 0, 0, 1, 1, 0], float)
    junk_phi, junk_y = phi.copy(), y.copy()
    junk_phi[mask == 0] = 1e6   # padding values must never be read
    junk_y[mask == 0] = -3e5
    keep = mask == 1
    got = _loglik(junk_phi, junk_y, mask, mu0, Sigma0, sigma)
    ref = _loglik(phi[keep], y[keep], np.ones(keep.sum()), mu0, Sigma0, sigma)
    assert got == pytest.approx(ref, rel=1e-12)
    assert _loglik(junk_phi, junk_y, np.zeros(9), mu0, Sigma0, sigma) == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------------- predictive
def _conditioned(phis, ys, phiq, mu0, Sigma0, sigma):
    """Explicit joint Gaussian of (y_support, y_query), conditioned on the support."""
    Phi = np.vstack([phis, phiq])
    C = Phi @ Sigma0 @ Phi.T + sigma**2 * np.eye(len(Phi))
    k = len(phis)
    Css, Cqs, Cqq = C[:k, :k], C[k:, :k], C[k:, k:]
    mean = phiq @ mu0 + Cqs @ np.linalg.solve(Css, ys - phis @ mu0)
    cov = Cqq - Cqs @ np.linalg.solve(Css, Cqs.T)
    return mean, np.sqrt(np.diag(cov))


def test_predictive_equals_joint_gaussian_conditioning(x64, rng):
    fmap = meta.FeatureMap("fourier")
    mu0 = np.array([0.1, -0.2, 1.0, 0.5])
    L = rng.normal(size=(4, 4)) * 0.3 + np.eye(4)
    Sigma0, sigma = L @ L.T, 0.3
    sx, sy = np.array([-1.0, 0.5, 2.0]), np.array([0.3, 1.1, -0.4])
    qx = np.linspace(-4, 4, 7)
    pred = meta.predict({"mu0": mu0, "Sigma0": Sigma0, "sigma": sigma}, sx, sy, qx, features=fmap)
    mean, sd = _conditioned(np.asarray(fmap(sx)), sy, np.asarray(fmap(qx)), mu0, Sigma0, sigma)
    np.testing.assert_allclose(pred.mean, mean, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(pred.sd, sd, rtol=1e-10)
    z = st.norm.ppf(0.95)
    np.testing.assert_allclose(pred.lower, mean - z * sd, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(pred.upper, mean + z * sd, rtol=1e-8, atol=1e-8)
    # a support point with mask 0 gives the prior predictive N(phi mu0, phi Sigma0 phi' + s2)
    prior = meta.predict({"mu0": mu0, "Sigma0": Sigma0, "sigma": sigma}, [1.0], [5.0], qx,
                         support_mask=[0.0])
    Pq = np.asarray(fmap(qx))
    np.testing.assert_allclose(prior.mean, Pq @ mu0, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(prior.sd, np.sqrt(np.einsum("mp,pq,mq->m", Pq, Sigma0, Pq) + sigma**2),
                               rtol=1e-10)


def test_predictive_mixture_over_draws(x64, rng):
    """Two draws: mean/sd are the mixture moments, lower/upper the mixture quantiles (brentq)."""
    draws = {"mu0": np.array([[0.0, 1.0, 0.0, 0.0], [0.5, -1.0, 2.0, 0.0]]),
             "Sigma0": np.stack([np.eye(4) * 0.5, np.eye(4) * 2.0]), "sigma": np.array([0.2, 0.6])}
    sx, sy, qx = np.array([0.3, 1.5]), np.array([0.4, -0.2]), np.array([-2.0, 0.0, 3.0])
    pred = meta.predict(draws, sx, sy, qx, quantiles=(0.1, 0.8))
    ms, ss = [], []
    for s in range(2):
        m, sd = _conditioned(np.asarray(meta.features(sx)), sy, np.asarray(meta.features(qx)),
                             draws["mu0"][s], draws["Sigma0"][s], draws["sigma"][s])
        ms.append(m), ss.append(sd)
    ms, ss = np.array(ms), np.array(ss)
    np.testing.assert_allclose(pred.draw_mean, ms, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(pred.mean, ms.mean(0), rtol=1e-10)
    np.testing.assert_allclose(pred.sd, np.sqrt((ss**2 + ms**2).mean(0) - ms.mean(0) ** 2), rtol=1e-9)
    for j in range(3):
        def cdf(q, prob):
            return st.norm.cdf(q, ms[:, j], ss[:, j]).mean() - prob
        for prob, got in ((0.1, pred.lower[j]), (0.8, pred.upper[j])):
            ref = optimize.brentq(cdf, -50, 50, args=(prob,), xtol=1e-13)
            assert got == pytest.approx(ref, abs=1e-8)


def test_predictive_batched_equals_single(rng):
    params = {"mu0": np.zeros(4), "Sigma0": np.eye(4), "sigma": 0.3}
    sx, sy, qx = rng.uniform(-3, 3, (3, 5)), rng.normal(size=(3, 5)), rng.uniform(-3, 3, (3, 4))
    both = meta.predict(params, sx, sy, qx)
    for b in range(3):
        one = meta.predict(params, sx[b], sy[b], qx[b])
        np.testing.assert_allclose(both.mean[b], one.mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(both.upper[b], one.upper, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------- NIW prior
def _prior_post(p, **prior):
    x = np.linspace(-1, 1, 2 * p).reshape(1, 2 * p)
    data = meta.make_data(x, np.zeros_like(x), kind="poly", degree=p - 1)
    return bl.Posterior(meta.model, **data, **prior)


P_NIW, NU_NIW, KAPPA_NIW = 2, 12.0, 2.0
PSI_NIW = np.array([[2.0, 0.6], [0.6, 1.0]]) * (NU_NIW - P_NIW - 1)
M0_NIW = np.array([0.5, -1.0])


def _check_niw_draws(S, mu, seed):
    """Sigma0 and mu0 draws vs the analytic NIW moments (K standard errors, from the draws' own
    moments) and Sigma0 vs scipy.stats.invwishart draws (two-sample KS)."""
    N, p = len(S), P_NIW
    ref = meta.prior_moments(p, m0=M0_NIW, kappa0=KAPPA_NIW, nu0=NU_NIW, psi0=PSI_NIW)
    se_mean = S.std(0) / math.sqrt(N)
    assert np.all(np.abs(S.mean(0) - ref["Sigma0_mean"]) < K * se_mean), (S.mean(0), ref["Sigma0_mean"])
    se_var = ((S - S.mean(0)) ** 2).std(0) / math.sqrt(N)
    assert np.all(np.abs(S.var(0) - ref["Sigma0_var"]) < K * se_var), (S.var(0), ref["Sigma0_var"])
    # the same check rejects an Inverse-Wishart with one more degree of freedom
    wrong = meta.prior_moments(p, nu0=NU_NIW + 1, psi0=PSI_NIW)["Sigma0_mean"]
    assert np.any(np.abs(S.mean(0) - wrong) > K * se_mean)
    ref_draws = st.invwishart(df=NU_NIW, scale=PSI_NIW).rvs(N, random_state=np.random.default_rng(seed))
    for i, j in ((0, 0), (1, 1), (0, 1)):
        assert st.ks_2samp(S[:, i, j], ref_draws[:, i, j]).pvalue > 1e-3, (i, j)
    if mu is not None:
        assert np.all(np.abs(mu.mean(0) - ref["mu0_mean"]) < K * mu.std(0) / math.sqrt(N))
        cov = np.cov(mu.T)
        c = mu - mu.mean(0)
        se_cov = np.array([[(c[:, i] * c[:, j]).std() for j in range(p)] for i in range(p)])
        assert np.all(np.abs(cov - ref["mu0_cov"]) < K * se_cov / math.sqrt(N)), (cov, ref["mu0_cov"])


_NIW_POST = []


def _niw_post():
    """One float32 Posterior of the NIW test prior, built once (eager tracing is not free)."""
    if not _NIW_POST:
        _NIW_POST.append(_prior_post(P_NIW, m0=M0_NIW, kappa0=KAPPA_NIW, nu0=NU_NIW, psi0=PSI_NIW))
    return _NIW_POST[0]


def test_niw_prior_is_the_inverse_wishart(seed):
    """The Bartlett sites, drawn from their own priors (numpy) and mapped by the model, give
    Sigma0 ~ IW(nu0, Psi0): analytic moments within K standard errors and scipy's invwishart by
    KS. (The samplers' paths, sample_prior and the unit-cube transform, are in the slow tier.)"""
    post = _niw_post()
    N, p = 20000, P_NIW
    rng = np.random.default_rng(seed)
    draws = {"Sigma0_chi2": rng.chisquare(NU_NIW - np.arange(p), (N, p)),
             "Sigma0_tril": rng.normal(size=(N, 1)), "mu0": np.zeros((N, p)), "sigma2": np.ones(N)}
    vals = jax.jit(jax.vmap(lambda d: post.constrain(post.unconstrain(d))))(
        {k: jnp.asarray(v, jnp.float32) for k, v in draws.items()})
    _check_niw_draws(np.asarray(vals["Sigma0"], float), None, seed)


def test_niw_log_prior_is_exact(rng):
    """The model's log prior (with the log-Jacobian of the positive sites) equals the hand-written
    density of its sites: chi2 x normal (Bartlett) x N(mu0 | m0, Sigma0 / kappa0) x IG(sigma2).
    The model runs in float32 (the reference in float64): relative tolerance 1e-5."""
    post = _niw_post()
    logprior_and_values = jax.jit(lambda z: (post.logprior(z), post.constrain(z)["Sigma0"]))
    for _ in range(3):
        chi2, tril = rng.chisquare(NU_NIW - np.arange(2)), rng.normal(size=1)
        mu0, s2 = rng.normal(size=2), rng.gamma(2.0)
        z = np.concatenate([np.log(chi2), tril, mu0, [np.log(s2)]])  # the flat layout: sorted names
        assert post.offsets == {"Sigma0_chi2": (0, 2), "Sigma0_tril": (2, 3), "mu0": (3, 5),
                                "sigma2": (5, 6)}
        logprior, Sigma0 = logprior_and_values(jnp.asarray(z, jnp.float32))
        Sigma0 = np.asarray(Sigma0, float)
        # Sigma0 is the Bartlett map: Sigma0^{-1} = L A A' L', L = chol(Psi0^{-1}) (float64 here)
        L = np.linalg.cholesky(np.linalg.inv(PSI_NIW))
        A = np.array([[math.sqrt(chi2[0]), 0.0], [tril[0], math.sqrt(chi2[1])]])
        Sigma_ref = np.linalg.inv(L @ A @ A.T @ L.T)
        np.testing.assert_allclose(Sigma0, Sigma_ref, rtol=1e-5, atol=1e-6)
        ref = (st.chi2(NU_NIW - np.arange(2)).logpdf(chi2).sum() + st.norm.logpdf(tril).sum()
               + st.multivariate_normal(M0_NIW, Sigma_ref / KAPPA_NIW).logpdf(mu0)
               + st.invgamma(meta.NOISE_SHAPE, scale=meta.NOISE_RATE).logpdf(s2)
               + np.log(chi2).sum() + np.log(s2))  # log|J| of the exp transforms
        assert float(logprior) == pytest.approx(ref, rel=1e-5)


@pytest.mark.slow
def test_prior_sampler_is_the_niw(seed):
    """Posterior.sample_prior (what SMC starts from): the NIW moments of Sigma0 and mu0."""
    post = _niw_post()
    vals = jax.jit(lambda key: jax.vmap(post.constrain)(post.sample_prior(key, 20000)))(
        jax.random.key(seed))
    _check_niw_draws(np.asarray(vals["Sigma0"], float), np.asarray(vals["mu0"], float), seed)


@pytest.mark.slow
def test_unit_cube_prior_transform_is_the_niw(seed):
    """Nested sampling's unit-cube transform of the model gives the NIW too."""
    post = _niw_post()
    u = jax.random.uniform(jax.random.key(seed), (20000, post.ndim), minval=1e-7, maxval=1 - 1e-7)
    vals = jax.jit(jax.vmap(lambda v: post.constrain(post.prior_transform(v))))(u)
    _check_niw_draws(np.asarray(vals["Sigma0"], float), np.asarray(vals["mu0"], float), seed)


# --------------------------------------------------------------------------------- NUTS fit
TRUE_MU0 = np.array([0.4, -0.2, 1.5, -0.8])
_L = np.array([[0.3, 0, 0, 0], [0.05, 0.1, 0, 0], [0.2, 0.0, 1.0, 0], [0.0, 0.05, -0.4, 0.6]])
TRUE_SIGMA0 = _L @ _L.T
TRUE_NOISE = 0.3


def _gaussian_tasks(key, T, n):
    return meta.simulate(key, num_tasks=T, num_points=n, kind="gaussian", noise=TRUE_NOISE,
                         mu0=TRUE_MU0, Sigma0=TRUE_SIGMA0)


@pytest.fixture(scope="module")
def fitted():
    """One NUTS fit on 60 tasks of 8 (ten of them 5) points from a known population."""
    from tests.conftest import SEED

    d = _gaussian_tasks(jax.random.key(SEED), 60, 8)
    mask = np.ones((60, 8))
    mask[:10, 5:] = 0  # ten tasks have 5 points only
    d.update(meta.make_data(d["x"], d["y"], mask))
    post = bl.Posterior(meta.model, phi=d["phi"], y=d["y"], mask=d["mask"])
    fit = bl.fit(post, "nuts", seed=SEED, num_warmup=300, num_samples=300, num_chains=2,
                 progress_bar=False)
    return d, post, fit


def test_nuts_recovers_population(fitted):
    _, _, fit = fitted
    assert fit.num_chains == 2 and not any("diverg" in f and "warmup" not in f for f in fit.flags), fit.flags
    mu = fit.draws("mu0").reshape(-1, 4)
    S = fit.draws("Sigma0").reshape(-1, 4, 4)
    sig = fit.draws("sigma").reshape(-1)
    assert np.all(np.abs(mu.mean(0) - TRUE_MU0) < K * mu.std(0)), (mu.mean(0), mu.std(0))
    dS = np.abs(S.mean(0) - TRUE_SIGMA0) / S.std(0)
    assert np.all(dS < K), dS
    assert abs(sig.mean() - TRUE_NOISE) < K * sig.std()


def test_pointwise_loglik_is_one_gaussian_marginal_per_task(fitted):
    """The Fit's log_likelihood group: one term per task, each the task's Gaussian marginal
    (scipy, float64, observed rows only) at that draw's (mu0, Sigma0, sigma); float32 model."""
    d, _, fit = fitted
    ll = np.asarray(fit.idata["log_likelihood"]["y"].values)
    assert ll.shape == (2, 300, 60)
    for c, i in ((0, 0), (1, 123)):
        mu0, S0 = fit.draws("mu0")[c, i], fit.draws("Sigma0")[c, i]
        sig = float(fit.draws("sigma")[c, i])
        for t in (0, 5, 30, 59):
            keep = d["mask"][t] > 0
            ref = _full_gaussian(np.asarray(d["phi"][t][keep], float), d["y"][t][keep], mu0, S0, sig)
            assert ll[c, i, t] == pytest.approx(ref, rel=1e-4, abs=1e-3), (c, i, t)


def test_streaming_close_to_nuts(fitted):
    """The one-pass streaming mean of mu0 against NUTS's posterior mean, in posterior sds.

    One pass is not order invariant (early tasks are seen under a vaguer approximation). On this
    population (measured with all 60 tasks at 8 points, over 100 random orders, NUTS with
    4 x 2000 draws as the reference), the streaming
    mean deviated from NUTS's by -0.06..+0.05 sd on average over orders, with an order-to-order
    sd of 0.22 sd for the intercept (0.04-0.08 for the others). The requirements: over 8 random
    orders the order-averaged mean is within 0.3 sd (+ 3 MCSE of NUTS's mean) of NUTS's, and the
    order-to-order spread is below half a posterior sd: the approximation error must stay small
    against the statistical uncertainty that any answer has."""
    d, _, fit = fitted
    mu = fit.draws("mu0").reshape(-1, 4)
    post_mean, post_sd = mu.mean(0), mu.std(0)
    mcse = np.asarray(azs.mcse(fit.idata, group="posterior", var_names=["mu0"], method="mean")["mu0"])
    s = meta.stream_fit(meta.stream_init(4), d["phi"], d["y"], d["mask"])
    assert int(s.num_tasks) == 60
    rng = np.random.default_rng(0)
    ms = []
    for _ in range(8):
        perm = rng.permutation(60)
        ms.append(meta.stream_fit(meta.stream_init(4), d["phi"][perm], d["y"][perm],
                                  d["mask"][perm]).m)
    ms = np.asarray(ms)
    bias = np.abs(ms.mean(0) - post_mean)
    assert np.all(bias < 0.3 * post_sd + 3 * mcse), bias / post_sd
    assert np.all(ms.std(0, ddof=1) < 0.5 * post_sd), ms.std(0, ddof=1) / post_sd
    # the streaming sd of mu0 is of the size of NUTS's (mean-field makes it a bit smaller)
    assert np.all((s.mu0_sd > 0.5 * post_sd) & (s.mu0_sd < 1.5 * post_sd)), (s.mu0_sd, post_sd)


def test_few_shot_beats_per_task_ridge(fitted, seed):
    """On new tasks from the same population, the hierarchical predictive's query MSE is lower
    than per-task ridge's (the zero-mean isotropic prior with the population's second moment
    and the true noise) by more than 4 standard errors of the paired per-task difference."""
    _, _, fit = fitted
    te = _gaussian_tasks(jax.random.key(seed + 1), 1000, 25)
    tau2 = float(np.mean(np.diag(TRUE_SIGMA0) + TRUE_MU0**2))
    ridge = {"mu0": np.zeros(4), "Sigma0": tau2 * np.eye(4), "sigma": TRUE_NOISE}
    for k in (2, 5):
        # k support points as the first k of 5 with a mask: one shape, one compile
        smask = np.zeros((len(te["x"]), 5))
        smask[:, :k] = 1
        args = (te["x"][:, :5], te["y"][:, :5], te["x"][:, 5:])
        h = meta.predict(fit, *args, max_draws=50, support_mask=smask)
        r = meta.predict(ridge, *args, support_mask=smask)
        qy = te["y"][:, 5:]
        diff = ((r.mean - qy) ** 2).mean(1) - ((h.mean - qy) ** 2).mean(1)
        assert diff.mean() > K * diff.std() / math.sqrt(len(diff)), (k, diff.mean(), diff.std())
        # coverage of the 90% intervals. With the true population parameters ("oracle") the
        # predictive is exact, so its coverage is 0.9 within Monte Carlo error (standard error
        # from the per-task coverages: the query points of one task share its support). The
        # fitted predictive is conditional on one training set of 60 tasks, whose estimation
        # error is not Monte Carlo error: it is only required to be within 0.03 of 0.9.
        oracle = meta.predict({"mu0": TRUE_MU0, "Sigma0": TRUE_SIGMA0, "sigma": TRUE_NOISE}, *args,
                              support_mask=smask)
        per_task = np.mean((qy >= oracle.lower) & (qy <= oracle.upper), axis=1)
        se = per_task.std(ddof=1) / math.sqrt(len(per_task))
        assert abs(per_task.mean() - 0.9) < K * se, (k, per_task.mean(), se)
        cover = np.mean((qy >= h.lower) & (qy <= h.upper))
        assert abs(cover - 0.9) < 0.03, (k, cover)


# --------------------------------------------------------------------------------- streaming
def test_streaming_is_exact_conjugate_update_when_weights_are_revealed(x64, rng):
    """With known, tiny noise and many points per task, q(w_t) is a point mass at w_t and the
    update must equal the exact conjugate NIW posterior given the weights themselves."""
    p, T, n, noise = 3, 25, 60, 1e-4
    w = rng.normal(size=(T, p)) * [1.0, 0.5, 2.0] + [0.3, -1.0, 0.5]
    x = rng.uniform(-1, 1, (T, n))
    phi = np.asarray(meta.features(x, "poly", degree=2))
    y = np.einsum("tnp,tp->tn", phi, w) + noise * rng.normal(size=(T, n))
    m0, kappa0, nu0, psi0 = np.array([0.0, 0.5, 0.0]), 2.0, 7.0, 1.5 * np.eye(p)
    s = meta.stream_fit(meta.stream_init(p, m0=m0, kappa0=kappa0, nu0=nu0, psi0=psi0),
                        phi, y, noise=noise)
    # in this limit each task's weights are revealed as its least-squares fit (the prior's
    # precision is ~1e-9 of the data's, V_t ~ noise^2 (Phi'Phi)^-1 ~ 1e-8): relative error ~1e-7
    w = np.stack([np.linalg.lstsq(phi[t], y[t], rcond=None)[0] for t in range(T)])
    wbar = w.mean(0)
    Sw = (w - wbar).T @ (w - wbar)
    m_ref = (kappa0 * m0 + T * wbar) / (kappa0 + T)
    psi_ref = psi0 + Sw + kappa0 * T / (kappa0 + T) * np.outer(wbar - m0, wbar - m0)
    np.testing.assert_allclose(s.m, m_ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(s.Psi, psi_ref, rtol=1e-6, atol=1e-7)
    assert float(s.nu) == nu0 + T and float(s.kappa) == kappa0 + T


def test_streaming_constant_memory_and_chunks():
    """An endless stream in chunks: the state never grows, and chunked == task by task."""
    d = meta.simulate(jax.random.key(3), num_tasks=40, num_points=6)
    s0 = meta.stream_init(4)
    one = s0
    for t in range(40):
        one = meta.stream_update(one, d["phi"][t], d["y"][t], d["mask"][t])
    s = s0
    for c in range(0, 40, 10):
        s = meta.stream_fit(s, d["phi"][c:c + 10], d["y"][c:c + 10], d["mask"][c:c + 10])
        assert [np.shape(a) for a in s] == [np.shape(a) for a in s0]
        assert sum(np.asarray(a).nbytes for a in s) == sum(np.asarray(a).nbytes for a in s0)
    for a, b in zip(s, one):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(s.num_tasks) == 40


def test_stream_draws_match_the_state(seed):
    """stream_draws samples NIW(m, kappa, nu, Psi) x IG(a, b): E[Sigma0] = Psi / (nu - p - 1),
    E[mu0] = m, E[sigma^2] = b / (a - 1), within K standard errors of 20000 draws."""
    d = meta.simulate(jax.random.key(4), num_tasks=12, num_points=6)
    s = meta.stream_fit(meta.stream_init(4), d["phi"], d["y"], d["mask"])
    N = 20000
    dr = meta.stream_draws(jax.random.key(seed), s, N)
    S, mu, s2 = dr["Sigma0"], dr["mu0"], dr["sigma"] ** 2
    assert np.all(np.abs(S.mean(0) - s.Sigma0_mean) < K * S.std(0) / math.sqrt(N))
    assert np.all(np.abs(mu.mean(0) - np.asarray(s.m)) < K * mu.std(0) / math.sqrt(N))
    np.testing.assert_allclose(mu.std(0), s.mu0_sd, rtol=0.05)
    assert abs(s2.mean() - float(s.b) / (float(s.a) - 1)) < K * s2.std() / math.sqrt(N)
    again = meta.stream_draws(jax.random.key(seed), s, N)
    np.testing.assert_array_equal(again["mu0"], mu)


# --------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("call,argname", [
    (lambda d: bl.Posterior(meta.model, phi=d["phi"], y=d["y"][:, :-1], mask=d["mask"]), "y"),
    (lambda d: bl.Posterior(meta.model, phi=d["phi"][0], y=d["y"], mask=d["mask"]), "phi"),
    (lambda d: bl.Posterior(meta.model, phi=d["phi"], y=d["y"], mask=d["mask"][:, :2]), "mask"),
    (lambda d: bl.Posterior(meta.model, phi=d["phi"], y=np.where(np.eye(3, 4) > 0, np.nan, d["y"]),
                            mask=d["mask"]), "y"),
    (lambda d: bl.Posterior(meta.model, **d, nu0=2.0), "nu0"),
    (lambda d: bl.Posterior(meta.model, **d, noise=-1.0), "noise"),
    (lambda d: meta.features(np.zeros(3), "wavelet"), "kind"),
    (lambda d: meta.make_data(np.zeros((2, 3)), np.zeros((2, 4))), "y"),
    (lambda d: meta.make_data(np.zeros((2, 3)), np.full((2, 3), np.nan)), "y"),
    (lambda d: meta.predict({"mu0": np.zeros(4), "Sigma0": np.eye(4), "sigma": 1.0},
                            np.zeros(0), np.zeros(0), np.zeros(3)), "support_x"),
    (lambda d: meta.predict({"mu0": np.zeros(4), "Sigma0": np.eye(4), "sigma": 1.0},
                            np.zeros(2), np.zeros(3), np.zeros(3)), "support_y"),
    (lambda d: meta.predict({"mu0": np.zeros(4), "Sigma0": np.eye(4), "sigma": 1.0},
                            np.zeros(2), [0.0, np.nan], np.zeros(3)), "support_y"),
    (lambda d: meta.predict({"mu0": np.zeros(4), "Sigma0": np.eye(4), "sigma": 1.0},
                            np.zeros(2), np.zeros(2), np.zeros(3),
                            features=meta.FeatureMap("poly", degree=1)), "features"),
    (lambda d: meta.predict({"mu0": np.zeros(4)}, np.zeros(2), np.zeros(2), np.zeros(3)),
     "fit_or_params"),
    (lambda d: meta.stream_update(meta.stream_init(3), d["phi"][0], d["y"][0]), "features"),
    (lambda d: meta.simulate_tasks(jax.random.key(0), 0), "num_tasks"),
])
def test_bad_input_is_rejected_before_compiling(no_jit, call, argname):
    d = {"phi": np.ones((3, 4, 4)), "y": np.zeros((3, 4)), "mask": np.ones((3, 4))}
    with pytest.raises(ValueError, match=argname):
        call(d)


# --------------------------------------------------------------------------------- other engines
@pytest.mark.slow
@pytest.mark.parametrize("engine,options", [("nested", {"num_live": 200})])
def test_other_engines_agree_with_nuts(fitted, engine, options, seed):
    """Nested sampling (dynesty, through the unit-cube transform) on the same posterior agrees
    with NUTS on mu0 within one posterior sd. (SMC with 1000 particles passed the same check but
    took 9 min on shared cores, too long for the slow tier.)"""
    _, post, fit = fitted
    other = bl.fit(post, engine, seed=seed, progress_bar=False, **options)
    a = fit.draws("mu0").reshape(-1, 4)
    b = other.draws("mu0").reshape(-1, 4)
    assert np.all(np.abs(a.mean(0) - b.mean(0)) < 1.0 * a.std(0)), (a.mean(0), b.mean(0))
