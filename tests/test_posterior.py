"""Posterior: densities, the Jacobian, flat <-> named, prior draws and the unit-cube transform."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer.util import potential_energy
from scipy import stats

import bayeslik as bl
from bayeslik.models import reference


def constrained_model(y):
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
    lo = numpyro.sample("lo", dist.Uniform(-1.0, 3.0))
    w = numpyro.sample("w", dist.Dirichlet(jnp.array([1.0, 2.0, 3.0])))
    with numpyro.plate("obs", y.shape[0]):
        numpyro.sample("y", dist.Normal(lo + w[0], sigma), obs=y)


Y = np.array([0.3, -1.2, 0.8, 2.0])


def test_jacobian_against_hand_computed_value(x64):
    post = bl.Posterior(constrained_model, y=Y)
    z_sigma, z_lo, z_w = 0.4, -0.3, np.array([0.2, -0.5])
    z = post.flatten({"sigma": z_sigma, "lo": z_lo, "w": z_w})
    # sigma = exp(z): log|J| = z.  lo = -1 + 4 sigmoid(z): log|J| = log 4 + log s + log(1 - s).
    sigma = math.exp(z_sigma)
    s = 1 / (1 + math.exp(-z_lo))
    lo = -1 + 4 * s
    # Dirichlet via numpyro's stick-breaking: check its log|J| through the transform itself,
    # and the two scalar ones by hand.
    t = dist.transforms.biject_to(dist.constraints.simplex)
    w = np.asarray(t(jnp.asarray(z_w)))
    logj_w = float(t.log_abs_det_jacobian(jnp.asarray(z_w), jnp.asarray(w)))
    expected_prior = (
        stats.halfnorm(scale=2.0).logpdf(sigma) + z_sigma
        + stats.uniform(-1, 4).logpdf(lo) + math.log(4) + math.log(s) + math.log(1 - s)
        + stats.dirichlet([1.0, 2.0, 3.0]).logpdf(w) + logj_w
    )
    expected_lik = stats.norm(lo + w[0], sigma).logpdf(Y).sum()
    assert float(post.logprior(z)) == pytest.approx(expected_prior, rel=1e-10)
    assert float(post.loglikelihood(z)) == pytest.approx(expected_lik, rel=1e-10)
    assert float(post.logdensity(z)) == pytest.approx(expected_prior + expected_lik, rel=1e-10)


def test_stick_breaking_jacobian_by_finite_differences(x64):
    """The simplex Jacobian: log|det| of d(w_1..w_{K-1})/dz, by autodiff of the transform."""
    t = dist.transforms.biject_to(dist.constraints.simplex)
    z = jnp.array([0.2, -0.5])
    J = jax.jacfwd(lambda z: t(z)[:-1])(z)
    expected = np.log(abs(np.linalg.det(np.asarray(J))))
    post = bl.Posterior(constrained_model, y=Y)
    full = post.flatten({"sigma": 0.0, "lo": 0.0, "w": z})
    zero_w = post.flatten({"sigma": 0.0, "lo": 0.0, "w": jnp.zeros(2)})
    # logprior differences isolate the Dirichlet term: density + log|J| at z vs at 0
    w, w0 = np.asarray(t(z)), np.asarray(t(jnp.zeros(2)))
    d = stats.dirichlet([1.0, 2.0, 3.0])
    jac0 = np.log(abs(np.linalg.det(np.asarray(jax.jacfwd(lambda z: t(z)[:-1])(jnp.zeros(2))))))
    lhs = float(post.logprior(full) - post.logprior(zero_w))
    rhs = d.logpdf(w) + expected - d.logpdf(w0) - jac0
    assert lhs == pytest.approx(rhs, rel=1e-9)


def test_matches_numpyro_potential_energy():
    post = bl.Posterior(constrained_model, y=Y)
    z = jnp.array([0.1, -0.2, 0.3, 0.5])
    params = post.unflatten(z)
    pe = potential_energy(constrained_model, (), {"y": Y}, params)
    assert float(post.logdensity(z)) == pytest.approx(-float(pe), rel=1e-5)


@pytest.mark.parametrize("name", ["normal_mean", "normal_inverse_gamma", "correlated_gaussian"])
def test_prior_plus_likelihood_is_density(name):
    post = reference.get(name).posterior()
    zs = jax.random.normal(jax.random.key(0), (5, post.ndim))
    lp = jax.vmap(post.logprior)(zs)
    ll = jax.vmap(post.loglikelihood)(zs)
    ld = jax.jit(jax.vmap(post.logdensity))(zs)
    np.testing.assert_allclose(lp + ll, ld, rtol=1e-5)
    pw = jax.vmap(post.pointwise_loglikelihood)(zs)
    np.testing.assert_allclose(sum(v.reshape(5, -1).sum(1) for v in pw.values()), ll, rtol=1e-5)
    ev = jax.vmap(post.evaluate)(zs)
    np.testing.assert_allclose(ev.logprior, lp, rtol=1e-5)
    np.testing.assert_allclose(ev.loglikelihood, ll, rtol=1e-5)


def dependent_support_model():
    scale = numpyro.sample("scale", dist.Exponential(1.0))
    numpyro.sample("u", dist.Uniform(-scale, scale))
    numpyro.sample("v", dist.Uniform(0.0, 1.0).expand([2, 3]).to_event(2))


def test_constrain_unconstrain_round_trip():
    post = bl.Posterior(constrained_model, y=Y)
    params = {"sigma": 1.7, "lo": 2.5, "w": np.array([0.2, 0.3, 0.5])}
    z = post.unconstrain(params)
    back = post.constrain(z)
    for k, v in params.items():
        np.testing.assert_allclose(back[k], v, rtol=1e-5)
    z2 = jax.random.normal(jax.random.key(1), (post.ndim,))
    np.testing.assert_allclose(post.unconstrain(post.constrain(z2)), z2, rtol=1e-4, atol=1e-5)
    # a support that depends on another site
    post = bl.Posterior(dependent_support_model)
    assert post.site_shapes == {"scale": (), "u": (), "v": (2, 3)}
    z = jax.random.normal(jax.random.key(2), (post.ndim,))
    x = post.constrain(z)
    assert abs(float(x["u"])) < float(x["scale"])
    np.testing.assert_allclose(post.unconstrain(x), z, rtol=1e-4, atol=1e-5)


def test_site_metadata_and_dims():
    post = bl.Posterior(constrained_model, y=Y)
    assert post.ndim == 4
    assert post.latent_names == ("sigma", "lo", "w")
    assert post.sites["w"].unconstrained_shape == (2,)
    assert post.sites["y"].kind == "observed" and post.sites["y"].dims == ("obs",)
    assert post.sites["y"].distribution == "Normal"
    np.testing.assert_array_equal(post.observed_data["y"], Y.astype(np.float32))  # as the model saw it
    assert "ndim=4" in repr(post)


def _ks(x, cdf):
    return stats.kstest(np.asarray(x).ravel(), cdf).pvalue


def nig_model():
    reference.normal_inverse_gamma_model(y=jnp.zeros(1), m0=0.5, kappa0=2.0, a0=3.0, b0=2.0)


def test_sample_prior_marginals():
    post = bl.Posterior(nig_model)
    z = post.sample_prior(jax.random.key(3), 2000)
    x = jax.vmap(post.constrain)(z)
    assert _ks(x["sigma2"], stats.invgamma(3.0, scale=2.0).cdf) > 1e-3
    # mu's prior marginal (sigma2 integrated out) is Student-t_{2 a0}(m0, sqrt(b0/(a0 kappa0)))
    t = stats.t(df=6.0, loc=0.5, scale=math.sqrt(2.0 / (3.0 * 2.0)))
    assert _ks(x["mu"], t.cdf) > 1e-3


def prior_zoo():
    s = numpyro.sample("s", dist.HalfNormal(1.5))
    numpyro.sample("m", dist.Normal(1.0, s))  # conditioned on s
    numpyro.sample("w", dist.Dirichlet(jnp.array([2.0, 1.0, 0.5])))
    numpyro.sample("b", dist.Beta(2.0, 5.0).expand([3]).to_event(1))
    numpyro.sample("x", dist.MultivariateNormal(jnp.array([1.0, -1.0]),
                                                covariance_matrix=jnp.array([[2.0, 0.9], [0.9, 1.0]])))


@pytest.fixture(scope="module")
def zoo_draws():
    """3000 draws of prior_zoo through the unit-cube transform (one compile, shared)."""
    post = bl.Posterior(prior_zoo)
    u = jax.random.uniform(jax.random.key(4), (3000, post.ndim))
    return jax.jit(jax.vmap(lambda u: post.constrain(post.prior_transform(u))))(u)


def test_prior_transform_maps_uniform_to_prior(zoo_draws):
    x, n = zoo_draws, 3000
    pvals = {
        "s": _ks(x["s"], stats.halfnorm(scale=1.5).cdf),
        "w0": _ks(x["w"][:, 0], stats.beta(2.0, 1.5).cdf),
        "w2": _ks(x["w"][:, 2], stats.beta(0.5, 3.0).cdf),
        "b1": _ks(x["b"][:, 1], stats.beta(2.0, 5.0).cdf),
        "x0": _ks(x["x"][:, 0], stats.norm(1.0, math.sqrt(2.0)).cdf),
        "x1": _ks(x["x"][:, 1], stats.norm(-1.0, 1.0).cdf),
    }
    # m | s ~ N(1, s): standardise with the conditioning value, then it must be N(0, 1)
    pvals["m|s"] = _ks((x["m"] - 1.0) / x["s"], stats.norm().cdf)
    for k, p in pvals.items():
        assert p > 1e-3, (k, p)
    np.testing.assert_allclose(np.asarray(x["w"]).sum(1), 1.0, rtol=1e-5)
    r = np.corrcoef(np.asarray(x["x"]).T)[0, 1]
    assert abs(r - 0.9 / math.sqrt(2.0)) < 4 * (1 - 0.9**2 / 2) / math.sqrt(n)


def test_prior_transform_ks_can_fail(zoo_draws):
    """The KS check above rejects a transform that is off: a sanity check of the harness."""
    assert _ks(zoo_draws["s"], stats.halfnorm(scale=1.3).cdf) < 1e-3


def test_functions_are_jittable_and_differentiable():
    post = reference.get("normal_inverse_gamma").posterior()
    z = jnp.array([0.1, 0.2])
    g = jax.jit(jax.grad(post.logdensity))(z)
    eps = 1e-3
    fd = [(post.logdensity(z + eps * e) - post.logdensity(z - eps * e)) / (2 * eps) for e in jnp.eye(2)]
    np.testing.assert_allclose(g, fd, rtol=2e-2)


# ---------------------------------------------------------------- construction at fixed points
# Posterior() inspects the program at deterministic points (every latent site at
# biject_to(support)(c) for a constant unconstrained c), never at prior draws: a prior draw that is
# valid but extreme (an overflowing recursion, a NaN Cholesky in float32) must not make a valid
# model fail, and a model that gives invalid numbers everywhere is a ModelError, not a DataError.

ARMA_Y = np.random.default_rng(0).normal(size=200).astype(np.float32)


def arma11(y, theta_loc=0.0, theta_scale=2.0, observe_err=False):
    """ARMA(1,1): err_t = y_t - mu - phi y_{t-1} - theta err_{t-1}, a 200-step lax.scan."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    phi = numpyro.sample("phi", dist.Normal(0.0, 2.0))
    theta = numpyro.sample("theta", dist.Normal(theta_loc, theta_scale))
    sigma = numpyro.sample("sigma", dist.HalfCauchy(2.5))

    def step(err_prev, t):
        nu = mu + phi * y[t - 1] + theta * err_prev
        return y[t] - nu, nu

    nu0 = mu + phi * mu
    err, nus = jax.lax.scan(step, y[0] - nu0, jnp.arange(1, y.shape[0]))
    if observe_err:  # posteriordb's form: the residuals are the "observation"
        errs = jnp.concatenate([jnp.reshape(y[0] - nu0, (1,)), y[1:] - nus])
        numpyro.sample("err", dist.Normal(0.0, sigma), obs=errs)
    else:
        nu = jnp.concatenate([jnp.reshape(nu0, (1,)), nus])
        numpyro.sample("y", dist.Normal(nu, sigma), obs=y)


def _maybe_x64(request, use_x64):
    if use_x64:
        request.getfixturevalue("x64")


@pytest.mark.parametrize("use_x64", [False, True], ids=["f32", "f64"])
@pytest.mark.parametrize(
    "theta_loc, theta_scale, observe_err",
    [(0.0, 2.0, False), (-3.0, 0.1, False), (-50.0, 0.1, False), (-3.0, 0.1, True)],
)
def test_arma_constructs_whatever_the_prior_draw(
    request, use_x64, theta_loc, theta_scale, observe_err
):
    """theta ~ Normal(-3, 0.1) (f32) or Normal(-50, 0.1) (f64 too): every prior draw overflows the
    200-step recursion; Normal(0, 2) is the issue's prior, whose draws at seeds 0 and 1 did."""
    _maybe_x64(request, use_x64)
    kw = dict(y=ARMA_Y, theta_loc=theta_loc, theta_scale=theta_scale, observe_err=observe_err)
    post = bl.Posterior(arma11, **kw)
    assert post.latent_names == ("mu", "phi", "theta", "sigma")
    obs = "err" if observe_err else "y"
    assert post.sites[obs].kind == "observed" and post.sites[obs].shape == (200,)
    z = post.unconstrain({"mu": 0.0, "phi": 0.1, "theta": -0.2, "sigma": 1.0})
    assert np.isfinite(float(post.logdensity(z)))
    assert np.isfinite(float(jax.jit(post.logdensity)(z)))
    # the same facts under any global numpy / numpyro seed state
    for k in range(3):
        np.random.seed(k)
        with numpyro.handlers.seed(rng_seed=k):
            again = bl.Posterior(arma11, **kw)
        assert again.sites == post.sites


GP_X = np.linspace(0.0, 10.0, 20).astype(np.float32)


def gp_model(x, y, jitter=1e-10):
    """A latent GP with a Cholesky factor and a tiny jitter: with the lengthscale prior's draws
    (about 20 on a grid of spacing 0.5) the kernel is numerically singular and float32's Cholesky
    is NaN."""
    ls = numpyro.sample("ls", dist.LogNormal(3.0, 0.1))
    amp = numpyro.sample("amp", dist.LogNormal(0.0, 0.1))
    noise = numpyro.sample("noise", dist.HalfNormal(0.1))
    d2 = (x[:, None] - x[None, :]) ** 2
    K = amp**2 * jnp.exp(-0.5 * d2 / ls**2) + jitter * jnp.eye(x.shape[0])
    L = jnp.linalg.cholesky(K)
    eta = numpyro.sample("eta", dist.Normal(0.0, 1.0).expand([x.shape[0]]).to_event(1))
    numpyro.sample("y", dist.Normal(L @ eta, noise), obs=y)


@pytest.mark.parametrize("use_x64", [False, True], ids=["f32", "f64"])
def test_gp_with_tiny_jitter_constructs(request, use_x64):
    _maybe_x64(request, use_x64)
    # the prior's draws give a NaN Cholesky in float32 (the reason construction used to fail)
    if not use_x64:
        draws = jnp.exp(3.0 + 0.1 * jax.random.normal(jax.random.key(0), (2,)))
        d2 = (GP_X[:, None] - GP_X[None, :]) ** 2
        eye = 1e-10 * jnp.eye(20)
        chols = [jnp.linalg.cholesky(jnp.exp(-0.5 * d2 / ls**2) + eye) for ls in draws]
        assert any(bool(jnp.isnan(c).any()) for c in chols)
    post = bl.Posterior(gp_model, x=GP_X, y=np.sin(GP_X))
    assert post.ndim == 23 and post.site_shapes["eta"] == (20,)
    z = post.unconstrain({"ls": 1.0, "amp": 1.0, "noise": 0.1, "eta": np.zeros(20)})
    assert np.isfinite(float(post.logdensity(z)))


def test_model_failing_at_the_first_point_is_retried():
    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(1.0 / mu, 1.0), obs=y)  # inf loc at mu = 0 only

    post = bl.Posterior(model, y=np.zeros(3))
    assert post.latent_names == ("mu",) and post.sites["y"].shape == (3,)


def negative_scale_model(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    s = numpyro.sample("s", dist.HalfNormal(1.0))
    with numpyro.plate("obs", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, -s), obs=y)


def overflow_model(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    s = numpyro.sample("s", dist.HalfNormal(1.0))
    big = jnp.exp(1e3 * (1.0 + mu**2))  # inf at every parameter value, f32 and f64
    numpyro.sample("y", dist.Normal(big - big, s), obs=y)


@pytest.mark.parametrize("use_x64", [False, True], ids=["f32", "f64"])
@pytest.mark.parametrize("model, arg", [(negative_scale_model, "scale"), (overflow_model, "loc")])
def test_invalid_numbers_at_every_point_is_a_model_error(request, use_x64, model, arg):
    _maybe_x64(request, use_x64)
    from numpyro.distributions import distribution as _d

    before = (_d._VALIDATION_ENABLED, _d.Distribution._validate_args)
    with pytest.raises(bl.ModelError) as info:
        bl.Posterior(model, y=np.zeros(3))
    assert not isinstance(info.value, bl.DataError)
    msg = str(info.value)
    assert "raised at every parameter value tried" in msg
    assert "z=0: mu=0, s=1" in msg and "z=0.5: mu=0.5, s=1.65" in msg  # the points, site=value
    assert f"invalid {arg} parameter" in msg  # the original exception, quoted
    assert f"Normal '{arg}' of site 'y'" in msg
    assert "not a problem of the data" in msg
    assert "shapes {" not in msg and "agree with each other" not in msg  # no blame on shapes
    assert isinstance(info.value.__cause__, ValueError)
    assert (_d._VALIDATION_ENABLED, _d.Distribution._validate_args) == before


@pytest.mark.parametrize("use_x64", [False, True], ids=["f32", "f64"])
def test_invalid_argument_from_the_data_is_a_data_error(request, use_x64):
    """An argument that is invalid at every point but does not depend on the parameters comes
    from the data: a DataError naming the site and the argument."""
    _maybe_x64(request, use_x64)

    def model(y, log_s):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(mu, jnp.exp(log_s) - 2.0), obs=y)

    match = r"site 'y': the 'scale' argument of its Normal.*does not depend on the parameters"
    with pytest.raises(bl.DataError, match=match):
        bl.Posterior(model, y=np.zeros(3), log_s=np.zeros(3))


@pytest.mark.parametrize("use_x64", [False, True], ids=["f32", "f64"])
def test_shape_mismatch_is_still_a_data_error_naming_the_shapes(request, use_x64):
    """A broadcast failure is a DataError naming the shapes, even in a model whose numbers would
    also be invalid at every parameter point (the abstract run sees the shapes first)."""
    _maybe_x64(request, use_x64)

    def model(y, x):
        b = numpyro.sample("b", dist.Normal(0.0, 1.0))
        big = jnp.exp(1e3 * (1.0 + b**2))
        with numpyro.plate("n", 5):
            numpyro.sample("y", dist.Normal(b * x + (big - big), 1.0), obs=y)

    with pytest.raises(bl.DataError, match=r"y: \(5,\), x: \(4,\)") as info:
        bl.Posterior(model, y=np.zeros(5), x=np.zeros(4))
    assert "raised at every parameter value" not in str(info.value)
    with pytest.raises(bl.DataError, match=r"observed site 'y'.*\(5,\).*\(4,\).*do not broadcast"):
        bl.Posterior(lambda y, x: numpyro.sample(
            "y", dist.Normal(numpyro.sample("b", dist.Normal(0, 1)) * x, 1.0), obs=y),
            y=np.zeros(5), x=np.zeros(4))


def test_construction_is_deterministic():
    """The same model and data give the same sites and observed data whatever the global numpy /
    numpyro seed state, and whatever the prior's location and scale (nothing is drawn)."""

    def model(y, loc, scale):
        theta = numpyro.sample("theta", dist.Normal(loc, scale))
        s = numpyro.sample("s", dist.LogNormal(loc, scale))
        # a support that depends on the parameters: no data check against it
        numpyro.sample("u", dist.Uniform(-s, s), obs=y[:1])
        # MA(1): err_t = y_t - theta err_{t-1}; overflows for |theta| >> 1 (prior locs +-30)
        _, err_prev = jax.lax.scan(lambda e, yt: (yt - theta * e, e), 0.0, y)
        numpyro.sample("y", dist.Normal(theta * err_prev, s), obs=y)

    y = jnp.asarray(ARMA_Y[:50])
    ref = bl.Posterior(model, y=y, loc=0.0, scale=1.0)
    for k, (loc, scale) in enumerate([(0.0, 1.0), (-30.0, 0.01), (30.0, 0.01), (3.0, 5.0)]):
        np.random.seed(100 + k)
        _ = jax.random.normal(jax.random.key(k), (3,))
        with numpyro.handlers.seed(rng_seed=k):
            post = bl.Posterior(model, y=y, loc=loc, scale=scale)
        assert post.sites == ref.sites
        for n in ("u", "y"):
            np.testing.assert_array_equal(post.observed_data[n], ref.observed_data[n])
