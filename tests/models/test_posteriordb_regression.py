"""Tests for bayeslik.models.posteriordb_regression: the twenty posteriordb linear regressions.

The reference log densities below are written by hand from the bundled ``.stan`` files with
NumPy/SciPy in float64, following the Stan code line by line (transformed data block, then the model
block). They are Stan's full log density: every ``~`` statement as its ``_lpdf`` with all normalising
constants, implicit flat priors contributing 0, and no Jacobian terms (the values are constrained).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest
from numpyro.infer import Predictive
from numpyro.infer.util import initialize_model, log_density
from scipy import stats

from bayeslik.errors import DataError
from bayeslik.models import posteriordb, posteriordb_regression

NAMES = [
    "earnings-earn_height",
    "earnings-log10earn_height",
    "earnings-logearn_height_male",
    "earnings-logearn_interaction",
    "earnings-logearn_interaction_z",
    "earnings-logearn_logheight_male",
    "kidiq-kidscore_interaction",
    "kidiq-kidscore_momhs",
    "kidiq-kidscore_momhsiq",
    "kidiq_with_mom_work-kidscore_interaction_c",
    "kidiq_with_mom_work-kidscore_interaction_c2",
    "kidiq_with_mom_work-kidscore_interaction_z",
    "kidiq_with_mom_work-kidscore_mom_work",
    "mesquite-logmesquite",
    "mesquite-logmesquite_logva",
    "mesquite-logmesquite_logvas",
    "mesquite-logmesquite_logvash",
    "mesquite-logmesquite_logvolume",
    "mesquite-mesquite",
    "diamonds-diamonds",
]

# length of beta in each Gelman & Hill regression (from the .stan parameters blocks)
NUM_BETA = {
    "earnings-earn_height": 2,
    "earnings-log10earn_height": 2,
    "earnings-logearn_height_male": 3,
    "earnings-logearn_interaction": 4,
    "earnings-logearn_interaction_z": 4,
    "earnings-logearn_logheight_male": 3,
    "kidiq-kidscore_interaction": 4,
    "kidiq-kidscore_momhs": 2,
    "kidiq-kidscore_momhsiq": 3,
    "kidiq_with_mom_work-kidscore_interaction_c": 4,
    "kidiq_with_mom_work-kidscore_interaction_c2": 4,
    "kidiq_with_mom_work-kidscore_interaction_z": 4,
    "kidiq_with_mom_work-kidscore_mom_work": 4,
    "mesquite-logmesquite": 7,
    "mesquite-logmesquite_logva": 4,
    "mesquite-logmesquite_logvas": 7,
    "mesquite-logmesquite_logvash": 6,
    "mesquite-logmesquite_logvolume": 2,
    "mesquite-mesquite": 7,
}

# Reference shapes (after the (chains, draws) axes).
REFERENCE_SHAPES = {name: {"beta": (k,), "sigma": ()} for name, k in NUM_BETA.items()}
REFERENCE_SHAPES["diamonds-diamonds"] = {"b": (24,), "Intercept": (), "sigma": ()}

# The observed site: the Stan vector on the left of the likelihood's `~`.
OBSERVED = {
    "earnings-earn_height": "earn",
    "earnings-log10earn_height": "log10_earn",
    "earnings-logearn_height_male": "log_earn",
    "earnings-logearn_interaction": "log_earn",
    "earnings-logearn_interaction_z": "log_earn",
    "earnings-logearn_logheight_male": "log_earn",
    **{name: "kid_score" for name in NAMES if name.startswith("kidiq")},
    **{name: "log_weight" for name in NAMES if name.startswith("mesquite-log")},
    "mesquite-mesquite": "weight",
    "diamonds-diamonds": "Y",
}

# NumPyro log joint minus Stan's full log density: log 2 for the HalfCauchy(2.5) that stands for
# Stan's `sigma ~ cauchy(0, 2.5)` on a real<lower=0> (kidiq models); 0 everywhere else (flat priors;
# diamonds normalises its half Student-t in the Stan code itself).
EXPECTED_OFFSET = {name: 0.0 for name in NAMES}
for _name in ("kidiq-kidscore_interaction", "kidiq-kidscore_momhs", "kidiq-kidscore_momhsiq"):
    EXPECTED_OFFSET[_name] = math.log(2.0)

# A few reference draws (chain, draw) to evaluate the densities at.
DRAWS = [(0, 0), (3, 517), (9, 999)]


@pytest.fixture(scope="module")
def posteriors():
    return {name: posteriordb.load(name) for name in NAMES}


def _draw(values, chain, draw):
    return {k: v[chain, draw] for k, v in values.items()}


# --------------------------------------------------------------------------------------------------
# Stan log densities, written from the .stan files
# --------------------------------------------------------------------------------------------------
def stan_mean(x):
    return sum(x) / len(x)


def stan_sd(x):  # Stan's sd(): sample standard deviation, divisor N - 1
    m = stan_mean(x)
    return math.sqrt(sum((xi - m) ** 2 for xi in x) / (len(x) - 1))


def normal_lpdf(y, mu, sigma):
    return stats.norm.logpdf(y, mu, sigma).sum()


def stan_lp_earn_height(d, p):
    beta, sigma = p["beta"], p["sigma"]
    return normal_lpdf(d["earn"], beta[0] + beta[1] * d["height"], sigma)


def stan_lp_log10earn_height(d, p):
    beta, sigma = p["beta"], p["sigma"]
    log10_earn = np.array([math.log10(e) for e in d["earn"]])
    return normal_lpdf(log10_earn, beta[0] + beta[1] * d["height"], sigma)


def stan_lp_logearn_height_male(d, p):
    beta, sigma = p["beta"], p["sigma"]
    log_earn = np.log(d["earn"])
    return normal_lpdf(log_earn, beta[0] + beta[1] * d["height"] + beta[2] * d["male"], sigma)


def stan_lp_logearn_interaction(d, p):
    beta, sigma = p["beta"], p["sigma"]
    log_earn = np.log(d["earn"])
    inter = d["height"] * d["male"]
    mu = beta[0] + beta[1] * d["height"] + beta[2] * d["male"] + beta[3] * inter
    return normal_lpdf(log_earn, mu, sigma)


def stan_lp_logearn_interaction_z(d, p):
    beta, sigma = p["beta"], p["sigma"]
    log_earn = np.log(d["earn"])
    z_height = (d["height"] - stan_mean(d["height"])) / stan_sd(d["height"])
    inter = z_height * d["male"]
    mu = beta[0] + beta[1] * z_height + beta[2] * d["male"] + beta[3] * inter
    return normal_lpdf(log_earn, mu, sigma)


def stan_lp_logearn_logheight_male(d, p):
    beta, sigma = p["beta"], p["sigma"]
    log_earn, log_height = np.log(d["earn"]), np.log(d["height"])
    return normal_lpdf(log_earn, beta[0] + beta[1] * log_height + beta[2] * d["male"], sigma)


def stan_lp_kidscore_interaction(d, p):
    beta, sigma = p["beta"], p["sigma"]
    inter = d["mom_hs"] * d["mom_iq"]
    lp = stats.cauchy.logpdf(sigma, 0, 2.5)  # sigma ~ cauchy(0, 2.5)
    mu = beta[0] + beta[1] * d["mom_hs"] + beta[2] * d["mom_iq"] + beta[3] * inter
    return lp + normal_lpdf(d["kid_score"], mu, sigma)


def stan_lp_kidscore_momhs(d, p):
    beta, sigma = p["beta"], p["sigma"]
    lp = stats.cauchy.logpdf(sigma, 0, 2.5)
    return lp + normal_lpdf(d["kid_score"], beta[0] + beta[1] * d["mom_hs"], sigma)


def stan_lp_kidscore_momhsiq(d, p):
    beta, sigma = p["beta"], p["sigma"]
    lp = stats.cauchy.logpdf(sigma, 0, 2.5)
    mu = beta[0] + beta[1] * d["mom_hs"] + beta[2] * d["mom_iq"]
    return lp + normal_lpdf(d["kid_score"], mu, sigma)


def _kid_interaction(d, p, hs, iq):
    beta, sigma = p["beta"], p["sigma"]
    inter = hs * iq
    mu = beta[0] + beta[1] * hs + beta[2] * iq + beta[3] * inter
    return normal_lpdf(d["kid_score"], mu, sigma)


def stan_lp_kidscore_interaction_c(d, p):
    c_mom_hs = d["mom_hs"] - stan_mean(d["mom_hs"])
    c_mom_iq = d["mom_iq"] - stan_mean(d["mom_iq"])
    return _kid_interaction(d, p, c_mom_hs, c_mom_iq)


def stan_lp_kidscore_interaction_c2(d, p):
    return _kid_interaction(d, p, d["mom_hs"] - 0.5, d["mom_iq"] - 100)


def stan_lp_kidscore_interaction_z(d, p):
    z_mom_hs = (d["mom_hs"] - stan_mean(d["mom_hs"])) / (2 * stan_sd(d["mom_hs"]))
    z_mom_iq = (d["mom_iq"] - stan_mean(d["mom_iq"])) / (2 * stan_sd(d["mom_iq"]))
    return _kid_interaction(d, p, z_mom_hs, z_mom_iq)


def stan_lp_kidscore_mom_work(d, p):
    beta, sigma = p["beta"], p["sigma"]
    N = d["N"]
    work2, work3, work4 = np.empty(N), np.empty(N), np.empty(N)
    for i in range(N):
        work2[i] = d["mom_work"][i] == 2
        work3[i] = d["mom_work"][i] == 3
        work4[i] = d["mom_work"][i] == 4
    mu = beta[0] + beta[1] * work2 + beta[2] * work3 + beta[3] * work4
    return normal_lpdf(d["kid_score"], mu, sigma)


def stan_lp_logmesquite(d, p):
    beta, sigma = p["beta"], p["sigma"]
    mu = (
        beta[0]
        + beta[1] * np.log(d["diam1"])
        + beta[2] * np.log(d["diam2"])
        + beta[3] * np.log(d["canopy_height"])
        + beta[4] * np.log(d["total_height"])
        + beta[5] * np.log(d["density"])
        + beta[6] * d["group"]
    )
    return normal_lpdf(np.log(d["weight"]), mu, sigma)


def stan_lp_logmesquite_logva(d, p):
    beta, sigma = p["beta"], p["sigma"]
    log_canopy_volume = np.log(d["diam1"] * d["diam2"] * d["canopy_height"])
    log_canopy_area = np.log(d["diam1"] * d["diam2"])
    mu = beta[0] + beta[1] * log_canopy_volume + beta[2] * log_canopy_area + beta[3] * d["group"]
    return normal_lpdf(np.log(d["weight"]), mu, sigma)


def stan_lp_logmesquite_logvas(d, p):
    beta, sigma = p["beta"], p["sigma"]
    log_canopy_volume = np.log(d["diam1"] * d["diam2"] * d["canopy_height"])
    log_canopy_area = np.log(d["diam1"] * d["diam2"])
    log_canopy_shape = np.log(d["diam1"] / d["diam2"])
    mu = (
        beta[0]
        + beta[1] * log_canopy_volume
        + beta[2] * log_canopy_area
        + beta[3] * log_canopy_shape
        + beta[4] * np.log(d["total_height"])
        + beta[5] * np.log(d["density"])
        + beta[6] * d["group"]
    )
    return normal_lpdf(np.log(d["weight"]), mu, sigma)


def stan_lp_logmesquite_logvash(d, p):
    beta, sigma = p["beta"], p["sigma"]
    log_canopy_volume = np.log(d["diam1"] * d["diam2"] * d["canopy_height"])
    log_canopy_area = np.log(d["diam1"] * d["diam2"])
    log_canopy_shape = np.log(d["diam1"] / d["diam2"])
    mu = (
        beta[0]
        + beta[1] * log_canopy_volume
        + beta[2] * log_canopy_area
        + beta[3] * log_canopy_shape
        + beta[4] * np.log(d["total_height"])
        + beta[5] * d["group"]
    )
    return normal_lpdf(np.log(d["weight"]), mu, sigma)


def stan_lp_logmesquite_logvolume(d, p):
    beta, sigma = p["beta"], p["sigma"]
    log_canopy_volume = np.log(d["diam1"] * d["diam2"] * d["canopy_height"])
    return normal_lpdf(np.log(d["weight"]), beta[0] + beta[1] * log_canopy_volume, sigma)


def stan_lp_mesquite(d, p):
    beta, sigma = p["beta"], p["sigma"]
    mu = (
        beta[0]
        + beta[1] * d["diam1"]
        + beta[2] * d["diam2"]
        + beta[3] * d["canopy_height"]
        + beta[4] * d["total_height"]
        + beta[5] * d["density"]
        + beta[6] * d["group"]
    )
    return normal_lpdf(d["weight"], mu, sigma)


def stan_lp_diamonds(d, p):
    N, K, X, Y = d["N"], d["K"], d["X"], d["Y"]
    b, intercept, sigma = p["b"], p["Intercept"], p["sigma"]
    Kc = K - 1
    Xc, means_X = np.empty((N, Kc)), np.empty(Kc)
    for i in range(2, K + 1):  # Stan's 1-based column index
        means_X[i - 2] = stan_mean(X[:, i - 1])
        Xc[:, i - 2] = X[:, i - 1] - means_X[i - 2]
    lp = stats.norm.logpdf(b, 0, 1).sum()
    lp += stats.t.logpdf(intercept, 3, 8, 10)
    lp += stats.t.logpdf(sigma, 3, 0, 10) - 1 * stats.t.logsf(0, 3, 0, 10)
    if not d["prior_only"]:
        lp += normal_lpdf(Y, intercept + Xc @ b, sigma)  # normal_id_glm_lpdf
    return lp


STAN_LP = {
    "earnings-earn_height": stan_lp_earn_height,
    "earnings-log10earn_height": stan_lp_log10earn_height,
    "earnings-logearn_height_male": stan_lp_logearn_height_male,
    "earnings-logearn_interaction": stan_lp_logearn_interaction,
    "earnings-logearn_interaction_z": stan_lp_logearn_interaction_z,
    "earnings-logearn_logheight_male": stan_lp_logearn_logheight_male,
    "kidiq-kidscore_interaction": stan_lp_kidscore_interaction,
    "kidiq-kidscore_momhs": stan_lp_kidscore_momhs,
    "kidiq-kidscore_momhsiq": stan_lp_kidscore_momhsiq,
    "kidiq_with_mom_work-kidscore_interaction_c": stan_lp_kidscore_interaction_c,
    "kidiq_with_mom_work-kidscore_interaction_c2": stan_lp_kidscore_interaction_c2,
    "kidiq_with_mom_work-kidscore_interaction_z": stan_lp_kidscore_interaction_z,
    "kidiq_with_mom_work-kidscore_mom_work": stan_lp_kidscore_mom_work,
    "mesquite-logmesquite": stan_lp_logmesquite,
    "mesquite-logmesquite_logva": stan_lp_logmesquite_logva,
    "mesquite-logmesquite_logvas": stan_lp_logmesquite_logvas,
    "mesquite-logmesquite_logvash": stan_lp_logmesquite_logvash,
    "mesquite-logmesquite_logvolume": stan_lp_logmesquite_logvolume,
    "mesquite-mesquite": stan_lp_mesquite,
    "diamonds-diamonds": stan_lp_diamonds,
}


# --------------------------------------------------------------------------------------------------
# loading and sites
# --------------------------------------------------------------------------------------------------
def test_registry_has_all_twenty():
    assert set(posteriordb_regression.MODELS) == set(NAMES)
    assert set(NAMES) <= set(posteriordb.names())


@pytest.mark.parametrize("name", NAMES)
def test_load_and_reference_shapes(posteriors, name):
    post = posteriors[name]
    assert post["info"]["name"] == name
    assert post["model"] is posteriordb_regression.MODELS[name][0]
    assert post["info"]["stan_lp_offset"] == pytest.approx(EXPECTED_OFFSET[name], abs=1e-15)
    ref = post["reference"]
    assert {k: v.shape for k, v in ref.items()} == {
        k: (10, 1000) + s for k, s in REFERENCE_SHAPES[name].items()
    }
    assert np.all(ref["sigma"] > 0)
    assert all(np.all(np.isfinite(v)) for v in ref.values())


@pytest.mark.parametrize("name", NAMES)
def test_reference_names_are_sites_of_the_model(posteriors, name):
    post = posteriors[name]
    params = _draw(post["reference"], 4, 321)
    model = numpyro.handlers.substitute(numpyro.handlers.seed(post["model"], 0), params)
    trace = numpyro.handlers.trace(model).get_trace(**post["data"])
    latent = {k for k, s in trace.items() if s["type"] == "sample" and not s["is_observed"]}
    assert latent == set(params)
    for key, value in params.items():
        assert trace[key]["value"].shape == np.shape(value), key
        np.testing.assert_allclose(trace[key]["value"], value, rtol=1e-6)
    obs = trace[OBSERVED[name]]
    assert obs["type"] == "sample" and obs["is_observed"]
    assert obs["value"].shape == (post["data"]["N"],)
    assert obs["cond_indep_stack"][0].name == "data"


# --------------------------------------------------------------------------------------------------
# faithfulness: NumPyro log joint == Stan's log density (+ the documented constant)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_log_density_matches_stan_float64(posteriors, name, x64):
    post = posteriors[name]
    for chain, draw in DRAWS:
        params = _draw(post["reference"], chain, draw)
        lp, _ = log_density(post["model"], (), post["data"], params)
        assert jnp.asarray(lp).dtype == jnp.float64
        expected = STAN_LP[name](post["data"], params) + EXPECTED_OFFSET[name]
        assert float(lp) == pytest.approx(expected, rel=1e-8), (chain, draw)


@pytest.mark.parametrize("name", NAMES)
def test_log_density_matches_stan_float32(posteriors, name):
    post = posteriors[name]
    for chain, draw in DRAWS:
        params = _draw(post["reference"], chain, draw)
        lp, _ = log_density(post["model"], (), post["data"], params)
        assert jnp.asarray(lp).dtype == jnp.float32
        expected = STAN_LP[name](post["data"], params) + EXPECTED_OFFSET[name]
        assert float(lp) == pytest.approx(expected, rel=1e-5), (chain, draw)


def test_log_density_differs_between_draws(posteriors, x64):
    # guards against a reference function and a program that both ignore the parameters
    post = posteriors["mesquite-logmesquite_logva"]
    lps = [
        float(log_density(post["model"], (), post["data"], _draw(post["reference"], c, d))[0])
        for c, d in DRAWS
    ]
    assert len(set(lps)) == len(lps)


# --------------------------------------------------------------------------------------------------
# data handling and NumPyro machinery
# --------------------------------------------------------------------------------------------------
def test_shared_data_sets_accept_unused_variables_but_not_unknown_ones(posteriors):
    post = posteriors["earnings-earn_height"]
    params = _draw(post["reference"], 0, 0)
    assert "male" in post["data"]  # not used by earn_height.stan
    log_density(post["model"], (), post["data"], params)
    with pytest.raises(DataError, match="unexpected data"):
        log_density(post["model"], (), dict(post["data"], hieght=post["data"]["height"]), params)


def test_data_length_checked(posteriors):
    data = dict(posteriors["kidiq-kidscore_momhsiq"]["data"])
    data["mom_iq"] = data["mom_iq"][:-1]
    with pytest.raises(ValueError, match="shape"):
        posteriordb_regression.kidscore_momhsiq(**data)
    data = dict(posteriors["diamonds-diamonds"]["data"])
    data["X"] = data["X"][:, :-1]
    with pytest.raises(ValueError, match="shape"):
        posteriordb_regression.diamonds(**data)


def test_diamonds_prior_only_drops_the_likelihood(posteriors, x64):
    post = posteriors["diamonds-diamonds"]
    params = _draw(post["reference"], 2, 2)
    data = dict(post["data"], prior_only=1)
    trace = numpyro.handlers.trace(
        numpyro.handlers.substitute(numpyro.handlers.seed(post["model"], 0), params)
    ).get_trace(**data)
    assert "Y" not in trace
    lp, _ = log_density(post["model"], (), data, params)
    assert float(lp) == pytest.approx(stan_lp_diamonds(data, params), rel=1e-12)


def test_posterior_predictive_of_a_transformed_observation(posteriors):
    post = posteriors["mesquite-logmesquite_logvolume"]
    samples = {k: v[0, :20] for k, v in post["reference"].items()}
    data = dict(post["data"], weight=None)
    pred = Predictive(post["model"], posterior_samples=samples)(jax.random.key(0), **data)
    log_weight = np.asarray(pred["log_weight"])
    assert log_weight.shape == (20, post["data"]["N"])
    # residual sd of the simulated log weights is about sigma (0.43)
    resid = log_weight - np.log(post["data"]["weight"])
    assert 0.2 < resid.std() < 1.0


@pytest.mark.parametrize(
    "name", ["earnings-logearn_interaction_z", "kidiq-kidscore_momhs", "diamonds-diamonds"]
)
def test_initialize_model(posteriors, name):
    post = posteriors[name]
    info = initialize_model(jax.random.key(1), post["model"], model_kwargs=post["data"])
    assert set(info.param_info.z) == set(post["reference"])
    assert np.isfinite(float(info.param_info.potential_energy))
    grads = jax.tree_util.tree_leaves(info.param_info.z_grad)
    assert all(np.all(np.isfinite(g)) for g in grads)
    constrained = info.postprocess_fn(info.param_info.z)
    assert float(constrained["sigma"]) > 0


def test_half_student_t_is_the_truncated_t_and_samples_without_tfp():
    """diamonds' sigma prior: the density of TruncatedDistribution(StudentT(3, 0, 10), low=0),
    drawn as |t| (the truncated one needs tensorflow_probability to draw); its median is the
    t quantile at 0.75 times the scale."""
    import jax
    import numpyro.distributions as dist
    from scipy import stats

    from bayeslik.models.posteriordb_regression import HalfStudentT

    x = np.array([1e-3, 0.5, 7.0, 80.0])
    ref = dist.TruncatedDistribution(dist.StudentT(3.0, 0.0, 10.0), low=0.0).log_prob(x)
    np.testing.assert_allclose(HalfStudentT(3.0, 10.0).log_prob(x), ref, rtol=1e-6)
    draws = np.asarray(HalfStudentT(3.0, 10.0).sample(jax.random.key(0), (40_000,)))
    assert draws.min() > 0
    median = 10.0 * stats.t.ppf(0.75, 3)
    # the sample median's sd: sqrt(p(1-p)/n) / density at the median
    se = np.sqrt(0.25 / draws.size) / (2 * stats.t.pdf(median / 10.0, 3) / 10.0)
    assert abs(np.median(draws) - median) < 4 * se
