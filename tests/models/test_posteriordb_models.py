"""Tests for bayeslik.models.posteriordb: loading, and faithfulness of the NumPyro translations.

The reference log densities below are written by hand from the bundled ``.stan`` files with
NumPy/SciPy in float64, following the Stan loops. They are Stan's full log density: every ``~``
statement as its ``_lpdf`` with all normalising constants, implicit flat priors contributing 0, and no
Jacobian terms, since the values are constrained.
"""

import itertools
import json
import math
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.distributions import constraints
from numpyro.infer import MCMC, NUTS, Predictive
from numpyro.diagnostics import effective_sample_size
from numpyro.infer.util import initialize_model, log_density, log_likelihood, unconstrain_fn
from scipy import stats
from scipy.special import logsumexp

from bayeslik.models import posteriordb

NAMES = [
    "eight_schools-eight_schools_noncentered",
    "arK-arK",
    "garch-garch11",
    "hmm_example-hmm_example",
    "low_dim_gauss_mix-low_dim_gauss_mix",
]

# Reference shapes (after the (chains, draws) axes), from posteriordb's posterior.json dimensions.
REFERENCE_SHAPES = {
    "eight_schools-eight_schools_noncentered": {"theta": (8,), "mu": (), "tau": ()},
    "arK-arK": {"alpha": (), "beta": (5,), "sigma": ()},
    "garch-garch11": {"mu": (), "alpha0": (), "alpha1": (), "beta1": ()},
    "hmm_example-hmm_example": {"theta1": (2,), "theta2": (2,), "mu": (2,)},
    "low_dim_gauss_mix-low_dim_gauss_mix": {"mu": (2,), "sigma": (2,), "theta": ()},
}

# NumPyro log joint minus Stan's full log density. The NumPyro models use the half-line-normalised
# HalfCauchy / HalfNormal where Stan has cauchy / normal on a real<lower=0>: + log 2 per such scalar
# (eight schools: tau; arK: sigma; low_dim_gauss_mix: sigma[1], sigma[2]). Everything else is equal.
EXPECTED_OFFSET = {
    "eight_schools-eight_schools_noncentered": math.log(2.0),
    "arK-arK": math.log(2.0),
    "garch-garch11": 0.0,
    "hmm_example-hmm_example": 0.0,
    "low_dim_gauss_mix-low_dim_gauss_mix": 2.0 * math.log(2.0),
}

# A few reference draws (chain, draw) to evaluate the densities at.
DRAWS = [(0, 0), (3, 517), (9, 999)]


@pytest.fixture(scope="module")
def posteriors():
    return {name: posteriordb.load(name) for name in NAMES}


# --------------------------------------------------------------------------------------------------
# Stan log densities, written from the .stan files
# --------------------------------------------------------------------------------------------------
def stan_lp_eight_schools_noncentered(data, p):
    J, y, sigma = data["J"], data["y"], data["sigma"]
    theta, mu, tau = p["theta"], p["mu"], p["tau"]
    assert tau > 0
    theta_trans = (theta - mu) / tau  # the Stan parameter; theta = theta_trans * tau + mu
    lp = stats.norm.logpdf(theta_trans, 0, 1).sum()  # theta_trans ~ normal(0, 1)
    lp += sum(stats.norm.logpdf(y[j], theta[j], sigma[j]) for j in range(J))  # y ~ normal(theta, sigma)
    lp += stats.norm.logpdf(mu, 0, 5)  # mu ~ normal(0, 5)
    lp += stats.cauchy.logpdf(tau, 0, 5)  # tau ~ cauchy(0, 5)
    return lp


def stan_lp_arK(data, p):
    K, T, y = data["K"], data["T"], data["y"]
    alpha, beta, sigma = p["alpha"], p["beta"], p["sigma"]
    assert sigma > 0
    lp = stats.norm.logpdf(alpha, 0, 10)
    lp += stats.norm.logpdf(beta, 0, 10).sum()
    lp += stats.cauchy.logpdf(sigma, 0, 2.5)
    for t in range(K + 1, T + 1):  # Stan's 1-based t
        mu = alpha
        for k in range(1, K + 1):
            mu = mu + beta[k - 1] * y[t - k - 1]
        lp += stats.norm.logpdf(y[t - 1], mu, sigma)
    return lp


def stan_lp_garch11(data, p):
    T, y, sigma1 = data["T"], data["y"], data["sigma1"]
    mu, alpha0, alpha1, beta1 = p["mu"], p["alpha0"], p["alpha1"], p["beta1"]
    assert alpha0 > 0 and 0 < alpha1 < 1 and 0 < beta1 < 1 - alpha1
    sigma = np.empty(T)
    sigma[0] = sigma1
    for t in range(1, T):
        sigma[t] = math.sqrt(alpha0 + alpha1 * (y[t - 1] - mu) ** 2 + beta1 * sigma[t - 1] ** 2)
    return stats.norm.logpdf(y, mu, sigma).sum()  # all priors implicit and flat


def stan_hmm_forward(y, theta1, theta2, mu):
    N, K = len(y), len(mu)
    theta = [theta1, theta2]
    gamma = np.empty((N, K))
    for k in range(K):
        gamma[0, k] = stats.norm.logpdf(y[0], mu[k], 1)
    for t in range(1, N):
        for k in range(K):
            acc = [
                gamma[t - 1, j] + math.log(theta[j][k]) + stats.norm.logpdf(y[t], mu[k], 1)
                for j in range(K)
            ]
            gamma[t, k] = logsumexp(acc)
    return logsumexp(gamma[N - 1])


def stan_lp_hmm_example(data, p):
    theta1, theta2, mu = p["theta1"], p["theta2"], p["mu"]
    assert 0 < mu[0] < mu[1]
    assert np.all(theta1 > 0) and np.all(theta2 > 0)
    assert abs(theta1.sum() - 1) < 1e-8 and abs(theta2.sum() - 1) < 1e-8
    lp = stats.norm.logpdf(mu[0], 3, 1) + stats.norm.logpdf(mu[1], 10, 1)
    return lp + stan_hmm_forward(data["y"], theta1, theta2, mu)


def stan_lp_low_dim_gauss_mix(data, p):
    y = data["y"]
    mu, sigma, theta = p["mu"], p["sigma"], p["theta"]
    assert mu[0] < mu[1] and np.all(sigma > 0) and 0 < theta < 1
    lp = stats.norm.logpdf(sigma, 0, 2).sum()
    lp += stats.norm.logpdf(mu, 0, 2).sum()
    lp += stats.beta.logpdf(theta, 5, 5)
    # log_mix(theta, lp1, lp2) = log(theta exp(lp1) + (1 - theta) exp(lp2))
    lp1 = stats.norm.logpdf(y, mu[0], sigma[0])
    lp2 = stats.norm.logpdf(y, mu[1], sigma[1])
    lp += np.logaddexp(math.log(theta) + lp1, math.log1p(-theta) + lp2).sum()
    return lp


STAN_LP = {
    "eight_schools-eight_schools_noncentered": stan_lp_eight_schools_noncentered,
    "arK-arK": stan_lp_arK,
    "garch-garch11": stan_lp_garch11,
    "hmm_example-hmm_example": stan_lp_hmm_example,
    "low_dim_gauss_mix-low_dim_gauss_mix": stan_lp_low_dim_gauss_mix,
}


def _draw(tree, chain, draw):
    return {k: v[chain, draw] for k, v in tree.items()}


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------
def test_names():
    """The first five, then the rest of the corpus (31 posteriors, all with reference draws)."""
    names = posteriordb.names()
    assert names[:5] == NAMES and len(names) == len(set(names))
    for name in names:
        assert (posteriordb.DATA_DIR / name / "posterior.json").exists(), name


@pytest.mark.parametrize("name", NAMES)
def test_load_shapes(posteriors, name):
    post = posteriors[name]
    assert set(post) == {"model", "data", "reference", "info"}
    assert callable(post["model"])
    assert post["info"]["name"] == name
    assert "stan-dev/posteriordb" in post["info"]["source"]
    ref = post["reference"]
    assert set(ref) == set(REFERENCE_SHAPES[name])
    for key, shape in REFERENCE_SHAPES[name].items():
        assert ref[key].shape == (10, 1000) + shape, key
        assert ref[key].dtype == np.float64
        assert np.all(np.isfinite(ref[key]))


def test_data_shapes(posteriors):
    d = posteriors["eight_schools-eight_schools_noncentered"]["data"]
    assert d["J"] == 8 and d["y"].shape == (8,) and d["sigma"].shape == (8,)
    assert np.all(d["sigma"] > 0)
    d = posteriors["arK-arK"]["data"]
    assert (d["K"], d["T"]) == (5, 200) and d["y"].shape == (200,)
    d = posteriors["garch-garch11"]["data"]
    assert d["T"] == 200 and d["y"].shape == (200,) and d["sigma1"] == 0.5
    d = posteriors["hmm_example-hmm_example"]["data"]
    assert (d["N"], d["K"]) == (100, 2) and d["y"].shape == (100,)
    d = posteriors["low_dim_gauss_mix-low_dim_gauss_mix"]["data"]
    assert d["N"] == 1000 and d["y"].shape == (1000,)
    for post in posteriors.values():
        for value in post["data"].values():
            assert isinstance(value, (int, float, np.ndarray))


@pytest.mark.parametrize(
    "name, key", [("eight_schools-eight_schools_noncentered", "theta"), ("hmm_example-hmm_example", "mu")]
)
def test_reference_reassembly_matches_raw_draws(posteriors, name, key):
    path = posteriordb.DATA_DIR / name / f"{name}.draws.json.zip"
    with zipfile.ZipFile(path) as archive:
        chains = json.loads(archive.read(f"{name}.json"))
    ref = posteriors[name]["reference"][key]
    for i in range(ref.shape[-1]):
        np.testing.assert_array_equal(ref[..., i], np.array([c[f"{key}[{i + 1}]"] for c in chains]))


def test_reference_draws_satisfy_stan_constraints(posteriors):
    ref = posteriors["hmm_example-hmm_example"]["reference"]
    assert bool(np.all(constraints.positive_ordered_vector.check(ref["mu"])))
    assert bool(np.all(constraints.simplex.check(ref["theta1"])))
    assert bool(np.all(constraints.simplex.check(ref["theta2"])))
    ref = posteriors["low_dim_gauss_mix-low_dim_gauss_mix"]["reference"]
    assert bool(np.all(constraints.ordered_vector.check(ref["mu"])))
    ref = posteriors["garch-garch11"]["reference"]
    assert np.all((ref["beta1"] > 0) & (ref["beta1"] < 1 - ref["alpha1"]))


def test_load_is_a_fresh_copy_and_accepts_short_names():
    a = posteriordb.load("garch11")
    assert a["info"]["name"] == "garch-garch11"
    a["reference"]["mu"][0, 0] = 1e9
    assert posteriordb.load("garch-garch11")["reference"]["mu"][0, 0] != 1e9
    with pytest.raises(KeyError):
        posteriordb.load("no_such_posterior")


def test_stan_code_is_bundled():
    assert "positive_ordered[K] mu;" in posteriordb.stan_code("hmm_example-hmm_example")


def test_reference_params_eight_schools(posteriors):
    ref = posteriors["eight_schools-eight_schools_noncentered"]["reference"]
    params = posteriordb.reference_params("eight_schools-eight_schools_noncentered")
    assert set(params) == {"theta_trans", "mu", "tau"}
    rebuilt = params["theta_trans"] * params["tau"][..., None] + params["mu"][..., None]
    np.testing.assert_allclose(rebuilt, ref["theta"], rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------------
# faithfulness: NumPyro log joint == Stan's log density (+ the documented constant)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_stan_lp_offset_is_documented(posteriors, name):
    assert posteriors[name]["info"]["stan_lp_offset"] == pytest.approx(EXPECTED_OFFSET[name], abs=1e-15)


@pytest.mark.parametrize("name", NAMES)
def test_log_density_matches_stan_float64(posteriors, name):
    post = posteriors[name]
    ref = post["reference"]
    params = posteriordb.reference_params(name)
    with jax.enable_x64(True):
        for chain, draw in DRAWS:
            lp, _ = log_density(post["model"], (), post["data"], _draw(params, chain, draw))
            assert jnp.asarray(lp).dtype == jnp.float64
            expected = STAN_LP[name](post["data"], _draw(ref, chain, draw)) + EXPECTED_OFFSET[name]
            assert float(lp) == pytest.approx(expected, rel=1e-10, abs=1e-9), (chain, draw)


@pytest.mark.parametrize("name", NAMES)
def test_log_density_matches_stan_float32(posteriors, name):
    post = posteriors[name]
    ref = post["reference"]
    params = posteriordb.reference_params(name)
    for chain, draw in DRAWS:
        lp, _ = log_density(post["model"], (), post["data"], _draw(params, chain, draw))
        expected = STAN_LP[name](post["data"], _draw(ref, chain, draw)) + EXPECTED_OFFSET[name]
        assert float(lp) == pytest.approx(expected, rel=1e-5), (chain, draw)


def test_hmm_marginal_likelihood_matches_brute_force_enumeration(posteriors):
    post = posteriors["hmm_example-hmm_example"]
    y = post["data"]["y"][:6]
    K = 2
    ref = post["reference"]
    draws = [(1, 10), (5, 500), (8, 900)]
    batch = {k: np.stack([v[c, d] for c, d in draws]) for k, v in ref.items()}
    with jax.enable_x64(True):
        loglik = np.asarray(log_likelihood(post["model"], batch, N=6, K=K, y=y)["y"])
    assert loglik.shape == (3,)
    for i, (c, d) in enumerate(draws):
        theta = np.stack([ref["theta1"][c, d], ref["theta2"][c, d]])  # theta[j, k]: j -> k
        mu = ref["mu"][c, d]
        path_logps = []
        for z in itertools.product(range(K), repeat=len(y)):  # 2**6 = 64 state paths
            lp = sum(stats.norm.logpdf(y[t], mu[z[t]], 1) for t in range(len(y)))
            lp += sum(math.log(theta[z[t - 1], z[t]]) for t in range(1, len(y)))  # no initial term
            path_logps.append(lp)
        brute = logsumexp(path_logps)
        assert loglik[i] == pytest.approx(brute, rel=1e-12, abs=1e-10)
        assert loglik[i] == pytest.approx(stan_hmm_forward(y, theta[0], theta[1], mu), rel=1e-12)


def test_hmm_needs_two_states():
    y = np.zeros(3)
    with pytest.raises(ValueError, match="K = 2"):
        log_density(
            posteriordb.hmm_example,
            (),
            {"N": 3, "K": 3, "y": y},
            {"theta1": np.ones(3) / 3, "theta2": np.ones(3) / 3, "mu": np.arange(1.0, 4.0)},
        )


def test_data_length_checked():
    with pytest.raises(ValueError, match="length"):
        posteriordb.low_dim_gauss_mix(N=5, y=np.zeros(4))


# --------------------------------------------------------------------------------------------------
# the models run through NumPyro's machinery
# --------------------------------------------------------------------------------------------------
SUPPORTS = {
    "eight_schools-eight_schools_noncentered": {"tau": constraints.positive},
    "arK-arK": {"sigma": constraints.positive},
    "garch-garch11": {"alpha0": constraints.positive, "alpha1": constraints.unit_interval},
    "hmm_example-hmm_example": {
        "mu": constraints.positive_ordered_vector,
        "theta1": constraints.simplex,
        "theta2": constraints.simplex,
    },
    "low_dim_gauss_mix-low_dim_gauss_mix": {
        "mu": constraints.ordered_vector,
        "sigma": constraints.positive,
        "theta": constraints.unit_interval,
    },
}


@pytest.mark.parametrize("name", NAMES)
def test_initialize_model(posteriors, name):
    post = posteriors[name]
    info = initialize_model(jax.random.key(1), post["model"], model_kwargs=post["data"])
    z = info.param_info.z
    assert set(z) == set(posteriordb.reference_params(name))
    assert np.isfinite(float(info.param_info.potential_energy))
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(info.param_info.z_grad))
    constrained = info.postprocess_fn(z)
    for site, support in SUPPORTS[name].items():
        assert bool(np.all(support.check(constrained[site]))), site
    if name == "garch-garch11":
        assert 0 < constrained["beta1"] < 1 - constrained["alpha1"]
    if name == "eight_schools-eight_schools_noncentered":
        assert constrained["theta"].shape == (8,)


@pytest.mark.parametrize("name", NAMES)
def test_unconstrain_then_postprocess_recovers_reference_draws(posteriors, name):
    # MCMC returns samples through postprocess_fn; with a parameter-dependent support (garch11's
    # beta1 < 1 - alpha1) it must use the bounds of each draw, not of the initial trace.
    post = posteriors[name]
    info = initialize_model(jax.random.key(1), post["model"], model_kwargs=post["data"])
    params = posteriordb.reference_params(name)
    for chain, draw in DRAWS:
        constrained = _draw(params, chain, draw)
        unconstrained = unconstrain_fn(post["model"], (), post["data"], constrained)
        recovered = info.postprocess_fn(unconstrained)
        for site, value in constrained.items():
            np.testing.assert_allclose(recovered[site], value, rtol=1e-5, atol=1e-6, err_msg=site)
        if "theta" in recovered and name.startswith("eight_schools"):
            np.testing.assert_allclose(
                recovered["theta"], post["reference"]["theta"][chain, draw], rtol=1e-5, atol=1e-5
            )


def test_posterior_predictive_hmm(posteriors):
    post = posteriors["hmm_example-hmm_example"]
    ref = post["reference"]
    samples = {k: v[0, :50] for k, v in ref.items()}
    data = dict(post["data"], y=None)
    y = Predictive(post["model"], posterior_samples=samples)(jax.random.key(2), **data)["y"]
    assert y.shape == (50, 100)
    # every simulated point lies near one of the two state means (emission sd = 1)
    dist_to_state = np.min(np.abs(np.asarray(y)[..., None] - samples["mu"][:, None, :]), axis=-1)
    assert np.all(np.isfinite(dist_to_state)) and np.mean(dist_to_state < 3.0) > 0.99


def test_prior_predictive_restricted_normal_is_ordered():
    prior = Predictive(posteriordb.low_dim_gauss_mix, num_samples=300)(jax.random.key(3), N=4)
    mu = np.asarray(prior["mu"])
    assert mu.shape == (300, 2) and np.all(mu[:, 0] < mu[:, 1])
    assert prior["y"].shape == (300, 4)
    # the larger of two N(0, 2) draws has mean 2 / sqrt(pi) ~ 1.13; 300 draws: s.e. ~ 0.08
    assert abs(mu[:, 1].mean() - 2 / math.sqrt(math.pi)) < 0.4


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_nuts_reproduces_reference_means(posteriors, name):
    """End to end: NUTS on the NumPyro program agrees with the Stan reference posterior means."""
    post = posteriors[name]
    mcmc = MCMC(NUTS(post["model"]), num_warmup=500, num_samples=1000, progress_bar=False)
    mcmc.run(jax.random.key(0), **post["data"])
    samples = mcmc.get_samples()
    for key, ref in post["reference"].items():
        draws = np.asarray(samples[key])
        ref = ref.reshape((-1,) + ref.shape[2:])
        ess = np.asarray(effective_sample_size(draws[None]))
        mcse = np.sqrt(draws.var(0) / ess + ref.var(0) / ref.shape[0])
        z = (draws.mean(0) - ref.mean(0)) / mcse
        assert np.all(np.abs(z) < 5), (key, z)
