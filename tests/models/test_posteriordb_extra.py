"""Tests for bayeslik.models.posteriordb_extra: gp_regr and the two basketball drive HMMs.

The reference log densities below are written by hand from the bundled ``.stan`` files with
NumPy/SciPy in float64, following the Stan loops. They are Stan's full log density: every ``~`` /
``target +=`` statement as its ``_lpdf`` with all normalising constants, and no Jacobian terms, since
the values are constrained.
"""

import itertools
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from numpyro.distributions import constraints
from numpyro.infer import Predictive
from numpyro.infer.util import initialize_model, log_density, log_likelihood, unconstrain_fn
from scipy import stats
from scipy.special import gammaln, logsumexp

from bayeslik.models import posteriordb, posteriordb_extra

GP = "gp_pois_regr-gp_regr"
DRIVE0 = "bball_drive_event_0-hmm_drive_0"
DRIVE1 = "bball_drive_event_1-hmm_drive_1"
NAMES = [GP, DRIVE0, DRIVE1]
HMMS = [DRIVE0, DRIVE1]

# Reference shapes (after the (chains, draws) axes), from posteriordb's posterior.json dimensions.
REFERENCE_SHAPES = {
    GP: {"rho": (), "alpha": (), "sigma": ()},
    DRIVE0: {"theta1": (2,), "theta2": (2,), "phi": (2,), "lambda": (2,)},
    DRIVE1: {"theta1": (2,), "theta2": (2,), "phi": (2,), "lambda": (2,)},
}

# NumPyro log joint minus Stan's full log density: gp_regr uses HalfNormal for Stan's normal(0, 2)
# on alpha and normal(0, 1) on sigma, both real<lower=0>: + log 2 each. The HMMs match exactly.
EXPECTED_OFFSET = {GP: 2.0 * math.log(2.0), DRIVE0: 0.0, DRIVE1: 0.0}

# A few reference draws (chain, draw) to evaluate the densities at.
DRAWS = [(0, 0), (3, 517), (9, 999)]


@pytest.fixture(scope="module")
def posteriors():
    return {name: posteriordb.load(name) for name in NAMES}


def _draw(tree, chain, draw):
    return {k: v[chain, draw] for k, v in tree.items()}


# --------------------------------------------------------------------------------------------------
# Stan log densities, written from the .stan files
# --------------------------------------------------------------------------------------------------
def stan_lp_gp_regr(data, p):
    N, x, y = data["N"], data["x"], data["y"]
    rho, alpha, sigma = p["rho"], p["alpha"], p["sigma"]
    assert rho > 0 and alpha > 0 and sigma > 0
    # cov = gp_exp_quad_cov(x, alpha, rho) + diag_matrix(rep_vector(sigma, N))
    cov = np.empty((N, N))
    for i in range(N):
        for j in range(N):
            cov[i, j] = alpha**2 * math.exp(-((x[i] - x[j]) ** 2) / (2 * rho**2))
        cov[i, i] += sigma
    L = np.linalg.cholesky(cov)
    lp = stats.gamma.logpdf(rho, 25, scale=1 / 4)  # rho ~ gamma(25, 4): shape, rate
    lp += stats.norm.logpdf(alpha, 0, 2)
    lp += stats.norm.logpdf(sigma, 0, 1)
    # y ~ multi_normal_cholesky(0, L)
    z = scipy.linalg.solve_triangular(L, y, lower=True)
    lp += -0.5 * N * math.log(2 * math.pi) - np.log(np.diag(L)).sum() - 0.5 * z @ z
    return lp


def dirichlet_lpdf(theta, a):
    return gammaln(a.sum()) - gammaln(a).sum() + ((a - 1) * np.log(theta)).sum()


def stan_forward(theta, emission):
    """Stan's forward loop. emission[t, k] = log p(u_t, v_t | z_t = k); theta[j][k]: j -> k."""
    N, K = emission.shape
    gamma = np.empty((N, K))
    for k in range(K):
        gamma[0, k] = emission[0, k]
    for t in range(1, N):
        for k in range(K):
            acc = [gamma[t - 1, j] + math.log(theta[j][k]) + emission[t, k] for j in range(K)]
            gamma[t, k] = logsumexp(acc)
    return logsumexp(gamma[N - 1])


def drive_emission(name, data, phi, lam, n=None):
    u, v = data["u"][:n], data["v"][:n]
    if name == DRIVE0:  # exponential_lpdf(u | phi[k]) + exponential_lpdf(v | lambda[k]), rates
        cols = [stats.expon.logpdf(u, scale=1 / phi[k]) + stats.expon.logpdf(v, scale=1 / lam[k]) for k in range(2)]
    else:  # normal_lpdf(u | phi[k], tau) + normal_lpdf(v | lambda[k], rho)
        tau, rho = data["tau"], data["rho"]
        cols = [stats.norm.logpdf(u, phi[k], tau) + stats.norm.logpdf(v, lam[k], rho) for k in range(2)]
    return np.stack(cols, axis=-1)


def stan_lp_drive(name, data, p):
    theta1, theta2, phi, lam = p["theta1"], p["theta2"], p["phi"], p["lambda"]
    if name == DRIVE0:
        assert 0 < phi[0] < phi[1] and 0 < lam[0] < lam[1]
    else:
        assert phi[0] < phi[1] and lam[0] < lam[1]
    assert abs(theta1.sum() - 1) < 1e-8 and abs(theta2.sum() - 1) < 1e-8
    alpha = data["alpha"]
    lp = dirichlet_lpdf(theta1, alpha[0]) + dirichlet_lpdf(theta2, alpha[1])
    lp += stats.norm.logpdf(phi[0], 0, 1) + stats.norm.logpdf(phi[1], 3, 1)
    lp += stats.norm.logpdf(lam[0], 0, 1) + stats.norm.logpdf(lam[1], 3, 1)
    return lp + stan_forward([theta1, theta2], drive_emission(name, data, phi, lam))


STAN_LP = {
    GP: stan_lp_gp_regr,
    DRIVE0: lambda data, p: stan_lp_drive(DRIVE0, data, p),
    DRIVE1: lambda data, p: stan_lp_drive(DRIVE1, data, p),
}


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------
def test_registered():
    assert set(posteriordb_extra.MODELS) == set(NAMES)
    assert set(NAMES) <= set(posteriordb.names())


def test_import_order_does_not_matter():
    # posteriordb imports posteriordb_extra at its end; importing posteriordb_extra first must work too
    code = (
        "import bayeslik.models.posteriordb_extra as e; from bayeslik.models import posteriordb as p; "
        "assert set(e.MODELS) <= set(p.names()), p.names()"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("name", NAMES)
def test_load_shapes(posteriors, name):
    post = posteriors[name]
    assert set(post) == {"model", "data", "reference", "info"}
    assert post["info"]["name"] == name
    assert "stan-dev/posteriordb" in post["info"]["source"]
    ref = post["reference"]
    assert set(ref) == set(REFERENCE_SHAPES[name])
    for key, shape in REFERENCE_SHAPES[name].items():
        assert ref[key].shape == (10, 1000) + shape, key
        assert np.all(np.isfinite(ref[key]))
    # every reference name is a sample or deterministic site of the same shape
    trace = jax.tree_util.tree_map(np.shape, _trace_values(post["model"], post["data"], _draw(ref, 0, 0)))
    for key, shape in REFERENCE_SHAPES[name].items():
        assert trace[key] == shape, key


def _trace_values(model, data, params):
    from numpyro.handlers import substitute, trace

    tr = trace(substitute(model, data=params)).get_trace(**data)
    return {k: s["value"] for k, s in tr.items() if s["type"] in ("sample", "deterministic")}


def test_data_shapes(posteriors):
    d = posteriors[GP]["data"]
    assert d["N"] == 11 and d["x"].shape == (11,) and d["y"].shape == (11,) and d["k"].shape == (11,)
    for name in HMMS:
        d = posteriors[name]["data"]
        assert (d["K"], d["N"]) == (2, 416) and d["u"].shape == (416,) and d["v"].shape == (416,)
        np.testing.assert_array_equal(d["alpha"], [[4.0, 2.0], [2.0, 4.0]])
    assert posteriors[DRIVE1]["data"]["tau"] == 0.1 and posteriors[DRIVE1]["data"]["rho"] == 0.1
    assert np.all(posteriors[DRIVE0]["data"]["u"] > 0) and np.all(posteriors[DRIVE0]["data"]["v"] > 0)


def test_stan_code_is_bundled():
    assert "diag_matrix(rep_vector(sigma, N))" in posteriordb.stan_code(GP)
    assert "positive_ordered[K] phi;" in posteriordb.stan_code(DRIVE0)
    assert "ordered[K] phi;" in posteriordb.stan_code(DRIVE1)


def test_reference_draws_satisfy_stan_constraints(posteriors):
    for name, support in [(DRIVE0, constraints.positive_ordered_vector), (DRIVE1, constraints.ordered_vector)]:
        ref = posteriors[name]["reference"]
        assert bool(np.all(support.check(ref["phi"])))
        assert bool(np.all(support.check(ref["lambda"])))
        assert bool(np.all(constraints.simplex.check(ref["theta1"])))
        assert bool(np.all(constraints.simplex.check(ref["theta2"])))


# --------------------------------------------------------------------------------------------------
# faithfulness: NumPyro log joint == Stan's log density (+ the documented constant)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_stan_lp_offset_is_documented(posteriors, name):
    assert posteriors[name]["info"]["stan_lp_offset"] == pytest.approx(EXPECTED_OFFSET[name], abs=1e-15)


@pytest.mark.parametrize("name", NAMES)
def test_log_density_matches_stan_float64(posteriors, name, x64):
    post = posteriors[name]
    ref = post["reference"]
    for chain, draw in DRAWS:
        lp, _ = log_density(post["model"], (), post["data"], _draw(ref, chain, draw))
        assert jnp.asarray(lp).dtype == jnp.float64
        expected = STAN_LP[name](post["data"], _draw(ref, chain, draw)) + EXPECTED_OFFSET[name]
        assert float(lp) == pytest.approx(expected, rel=1e-8, abs=1e-9), (chain, draw)


@pytest.mark.parametrize("name", NAMES)
def test_log_density_matches_stan_float32(posteriors, name):
    post = posteriors[name]
    ref = post["reference"]
    for chain, draw in DRAWS:
        lp, _ = log_density(post["model"], (), post["data"], _draw(ref, chain, draw))
        assert jnp.asarray(lp).dtype == jnp.float32
        expected = STAN_LP[name](post["data"], _draw(ref, chain, draw)) + EXPECTED_OFFSET[name]
        assert float(lp) == pytest.approx(expected, rel=1e-5), (chain, draw)


def test_gp_log_density_matches_scipy_multivariate_normal(posteriors, x64):
    post = posteriors[GP]
    d, p = post["data"], _draw(post["reference"], 4, 321)
    cov = p["alpha"] ** 2 * np.exp(-((d["x"][:, None] - d["x"][None, :]) ** 2) / (2 * p["rho"] ** 2))
    cov += p["sigma"] * np.eye(d["N"])  # sigma, not sigma^2, as in the Stan code
    loglik = log_likelihood(post["model"], {k: v[None] for k, v in p.items()}, **d)["y"]
    assert float(loglik[0]) == pytest.approx(stats.multivariate_normal.logpdf(d["y"], np.zeros(d["N"]), cov), rel=1e-12)


@pytest.mark.parametrize("name", HMMS)
def test_hmm_marginal_likelihood_matches_brute_force_enumeration(posteriors, name, x64):
    post = posteriors[name]
    n, K = 8, 2
    data = dict(post["data"], N=n, u=post["data"]["u"][:n], v=post["data"]["v"][:n])
    ref = post["reference"]
    draws = [(1, 10), (5, 500), (8, 900)]
    batch = {k: np.stack([v[c, d] for c, d in draws]) for k, v in ref.items()}
    loglik = np.asarray(log_likelihood(post["model"], batch, **data)["uv"])
    assert loglik.shape == (3,)
    for i, (c, d) in enumerate(draws):
        theta = np.stack([ref["theta1"][c, d], ref["theta2"][c, d]])  # theta[j, k]: j -> k
        emission = drive_emission(name, post["data"], ref["phi"][c, d], ref["lambda"][c, d], n=n)
        path_logps = []
        for z in itertools.product(range(K), repeat=n):  # 2**8 = 256 state paths
            lp = sum(emission[t, z[t]] for t in range(n))
            lp += sum(math.log(theta[z[t - 1], z[t]]) for t in range(1, n))  # no initial term
            path_logps.append(lp)
        assert loglik[i] == pytest.approx(logsumexp(path_logps), rel=1e-12, abs=1e-10)
        assert loglik[i] == pytest.approx(stan_forward(theta, emission), rel=1e-12, abs=1e-10)


def test_hmm_needs_two_states_and_its_data(posteriors):
    d = posteriors[DRIVE1]["data"]
    p = _draw(posteriors[DRIVE1]["reference"], 0, 0)
    with pytest.raises(ValueError, match="K = 2"):
        log_density(posteriordb_extra.hmm_drive_1, (), dict(d, K=3), p)
    with pytest.raises(ValueError, match="both u and v"):
        log_density(posteriordb_extra.hmm_drive_1, (), dict(d, v=None), p)
    with pytest.raises(ValueError, match="tau and rho"):
        log_density(posteriordb_extra.hmm_drive_1, (), dict(d, tau=None), p)
    with pytest.raises(ValueError, match="alpha"):
        log_density(posteriordb_extra.hmm_drive_0, (), dict(posteriors[DRIVE0]["data"], alpha=None), p)
    with pytest.raises(ValueError, match="length"):
        posteriordb_extra.hmm_drive_0(K=2, N=5, u=np.ones(4), v=np.ones(4), alpha=np.ones((2, 2)))


# --------------------------------------------------------------------------------------------------
# the models run through NumPyro's machinery
# --------------------------------------------------------------------------------------------------
SUPPORTS = {
    GP: {"rho": constraints.positive, "alpha": constraints.positive, "sigma": constraints.positive},
    DRIVE0: {
        "theta1": constraints.simplex,
        "theta2": constraints.simplex,
        "phi": constraints.positive_ordered_vector,
        "lambda": constraints.positive_ordered_vector,
    },
    DRIVE1: {
        "theta1": constraints.simplex,
        "theta2": constraints.simplex,
        "phi": constraints.ordered_vector,
        "lambda": constraints.ordered_vector,
    },
}


@pytest.mark.parametrize("name", NAMES)
def test_initialize_and_round_trip(posteriors, name):
    post = posteriors[name]
    info = initialize_model(jax.random.key(1), post["model"], model_kwargs=post["data"])
    assert set(info.param_info.z) == set(REFERENCE_SHAPES[name])
    assert np.isfinite(float(info.param_info.potential_energy))
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(info.param_info.z_grad))
    constrained = info.postprocess_fn(info.param_info.z)
    for site, support in SUPPORTS[name].items():
        assert bool(np.all(support.check(constrained[site]))), site
    for chain, draw in DRAWS:
        values = _draw(post["reference"], chain, draw)
        recovered = info.postprocess_fn(unconstrain_fn(post["model"], (), post["data"], values))
        for site, value in values.items():
            np.testing.assert_allclose(recovered[site], value, rtol=1e-5, atol=1e-6, err_msg=site)


@pytest.mark.parametrize("name", HMMS)
def test_hmm_prior_and_posterior_predictive(posteriors, name):
    post = posteriors[name]
    data = dict(post["data"], N=30, u=None, v=None)
    prior = Predictive(post["model"], num_samples=40)(jax.random.key(3), **data)
    assert prior["uv"].shape == (40, 30, 2) and prior["theta"].shape == (40, 2, 2)
    support = SUPPORTS[name]["phi"]
    assert bool(np.all(support.check(prior["phi"]))) and bool(np.all(support.check(prior["lambda"])))
    if name == DRIVE0:
        assert np.all(np.asarray(prior["uv"]) > 0)
    # posterior predictive: every simulated u_t is one of the state laws' draws; for the normal
    # emissions (sd 0.1) each u_t lies within 6 sd of one of the two phi
    ref = post["reference"]
    samples = {k: v[0, :20] for k, v in ref.items()}
    uv = np.asarray(Predictive(post["model"], posterior_samples=samples)(jax.random.key(4), **data)["uv"])
    assert uv.shape == (20, 30, 2) and np.all(np.isfinite(uv))
    if name == DRIVE1:
        gap = np.min(np.abs(uv[..., 0, None] - samples["phi"][:, None, :]), axis=-1)
        assert np.all(gap < 6 * post["data"]["tau"])


def test_gp_prior_predictive_and_float32_cholesky(posteriors):
    post = posteriors[GP]
    prior = Predictive(post["model"], num_samples=50)(jax.random.key(5), **dict(post["data"], y=None))
    assert prior["y"].shape == (50, 11) and np.all(np.isfinite(prior["y"]))
    # float32 Cholesky is finite at all reference draws (sigma on the diagonal keeps it well conditioned)
    ref = {k: v[:, ::10].reshape(-1) for k, v in post["reference"].items()}
    loglik = log_likelihood(post["model"], ref, **post["data"])["y"]
    assert loglik.dtype == jnp.float32 and np.all(np.isfinite(loglik))
