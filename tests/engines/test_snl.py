"""Sequential neural likelihood: the SimulatorPosterior kind, the flow, the engine.

Exact references: a linear Gaussian simulator (x ~ N(theta, s^2 I), theta ~ N(0, t^2 I)) has
the posterior N(x t^2 / (t^2 + s^2), t^2 s^2 / (t^2 + s^2)) and the likelihood in closed form.
One small module-scoped SNL run is shared by the tests that need a Fit; the slow tests run the
default-sized budgets.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import bayeslik as bl
from bayeslik.engines import snl
from bayeslik.errors import DataError, EngineError, ModelError

from tests.harness import SIM_DIM as D
from tests.harness import SIM_OBS as OBS
from tests.harness import SIM_SIG2 as SIG2
from tests.harness import SIM_TAU2 as TAU2
from tests.harness import sim_prior as prior
from tests.harness import sim_simulator as simulator
from tests.harness import simulator_problem, small

#: a budget that trains in seconds: the shared compiled programs make later fits cheap
SMALL = {**small("snl"), "progress_bar": False}


def exact_moments(obs):
    mean = obs * TAU2 / (TAU2 + SIG2)
    var = TAU2 * SIG2 / (TAU2 + SIG2)
    return mean, var


@pytest.fixture(scope="module")
def post():
    return simulator_problem()


@pytest.fixture(scope="module")
def small_fit(post):
    with warnings.catch_warnings():
        warnings.simplefilter("error", bl.FitWarning)  # a clean run: no flag
        return bl.fit(post, "snl", seed=3, **SMALL)


# ------------------------------------------------------------------ the posterior kind
def test_kind_and_simulate(post):
    assert post.simulator_kind == "jax" and post.ndim == D and post.observed_shape == (D,)
    z = post.sample_prior(jax.random.key(0), 5000)
    x, bad = post.simulate(jax.random.key(1), z)
    assert x.shape == (5000, D) and not bad.any()
    # x - theta is N(0, SIG2): the simulator got the constrained values it should
    resid = x - np.asarray(jax.vmap(post.constrain)(z)["theta"])
    assert abs(resid.var() - SIG2) < 5 * SIG2 * np.sqrt(2 / resid.size)


def test_python_simulator_with_executor_and_failures():
    def numpy_sim(key, p):
        rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
        if p["theta"][0] < -0.5:
            raise RuntimeError("solver diverged")
        return np.asarray(p["theta"]) + rng.normal(size=D) * np.sqrt(SIG2)

    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        post = bl.SimulatorPosterior(prior, numpy_sim, OBS, executor=ex)
        assert post.simulator_kind == "python"
        z = post.sample_prior(jax.random.key(0), 400)
        x, bad = post.simulate(jax.random.key(1), z)
    theta0 = np.asarray(jax.vmap(post.constrain)(z)["theta"])[:, 0]
    np.testing.assert_array_equal(bad, theta0 < -0.5)
    assert np.isnan(x[bad]).all() and np.isfinite(x[~bad]).all()


@pytest.mark.parametrize("make, error, words", [
    (lambda: bl.SimulatorPosterior(prior, lambda k, p: jnp.zeros(3), OBS), ModelError,
     ["shape (3,)", "(2,)"]),
    (lambda: bl.SimulatorPosterior(prior, simulator, np.array([0.1, np.nan])), DataError,
     ["NaN", "index (1,)"]),
    (lambda: bl.SimulatorPosterior(prior, simulator, np.zeros(0)), DataError, ["empty"]),
    (lambda: bl.SimulatorPosterior(prior, simulator, np.array([1 + 1j, 0])), DataError,
     ["complex"]),
    (lambda: bl.SimulatorPosterior(prior, "sim", OBS), ModelError, ["callable"]),
    (lambda: bl.SimulatorPosterior(prior, simulator, OBS, simulator_kind="gpu"), ModelError,
     ["simulator_kind"]),
    (lambda: bl.SimulatorPosterior(lambda: numpyro.sample("y", dist.Normal(), obs=1.0),
                                   simulator, OBS), ModelError, ["latent"]),
    (lambda: bl.SimulatorPosterior(
        lambda: (numpyro.sample("theta", dist.Normal(jnp.zeros(D), 1.0).to_event(1)),
                 numpyro.sample("y", dist.Normal(), obs=1.0)),
        simulator, OBS), ModelError, ["observed", "'y'"]),
    (lambda: bl.SimulatorPosterior(prior, lambda k, p: 1 / 0, OBS, simulator_kind="python"),
     ModelError, ["failed at a prior draw", "ZeroDivisionError"]),
    (lambda: bl.SimulatorPosterior(
        lambda: numpyro.sample("theta", dist.ImproperUniform(dist.constraints.real, (), (D,))),
        simulator, OBS), Exception, ["prior"]),
])
def test_bad_inputs_are_named(make, error, words):
    with pytest.raises(error) as e:
        make()
    for w in words:
        assert w in str(e.value), str(e.value)


def test_engines_refuse_the_wrong_kind(post):
    with pytest.raises(EngineError, match="'snl'"):
        bl.fit(post, "nuts")
    normal = bl.Posterior(lambda y: numpyro.sample("y", dist.Normal(
        numpyro.sample("m", dist.Normal()), 1.0), obs=y), y=np.zeros(3))
    with pytest.raises(EngineError, match="SimulatorPosterior"):
        bl.fit(normal, "snl")


@pytest.mark.parametrize("options, words", [
    (dict(num_simulations=30, num_rounds=2), ["num_simulations", "per round"]),
    (dict(sampler="pmmh"), ["sampler='pmmh'"]),
    (dict(sampler_options={"num_sampels": 10}), ["num_sampels"]),
    (dict(transformer="planar"), ["transformer"]),
    (dict(sampler_options=[1, 2]), ["sampler_options"]),
])
def test_bad_options_fail_before_simulating(post, options, words, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("simulated before checking the options")

    monkeypatch.setattr(type(post), "simulate", boom)
    with pytest.raises(EngineError) as e:
        bl.fit(post, "snl", progress_bar=False, **options)
    for w in words:
        assert w in str(e.value), str(e.value)


# ------------------------------------------------------------------ the flow
def test_learned_likelihood_matches_the_true_one():
    """Trained on 2000 prior simulations, the learned likelihood's expected KL divergence from
    the exact one, E_{theta, x}[log p(x | theta) - log q(x | theta)] over the joint, is below
    0.06 nats (measured 0.006 with this affine flow, 0.02 with a spline one; Monte Carlo sd of
    the estimate ~0.011), and the held-out loss is near the exact conditional entropy."""
    post = bl.SimulatorPosterior(prior, simulator, OBS)
    z = post.sample_prior(jax.random.key(0), 2000)
    x, _ = post.simulate(jax.random.key(1), z)
    config = snl.SNLConfig(**{k: v for k, v in SMALL.items() if k != "sampler_options"})
    spec = snl.FlowSpec.of(post, config)
    out = snl.train_flow(jax.random.key(2), x, np.asarray(z), spec, config)
    zt = post.sample_prior(jax.random.key(3), 500)
    xt, _ = post.simulate(jax.random.key(4), zt)
    theta = np.asarray(jax.vmap(post.constrain)(zt)["theta"])
    exact = np.asarray(dist.Normal(theta, np.sqrt(SIG2)).to_event(1).log_prob(xt))
    learned = np.asarray(snl._parts(spec).log_prob(out["vector"], jnp.asarray(xt),
                                                   jnp.asarray(zt)))
    kl = float(np.mean(exact - learned))
    assert -0.04 < kl < 0.06, kl
    # the held-out loss is the mean negative log-likelihood (200 held out: sd ~0.07)
    entropy = 0.5 * D * np.log(2 * np.pi * np.e * SIG2)
    assert abs(out["heldout_loss"] - entropy) < 0.2


def test_a_column_the_simulator_never_varies():
    """A data column that is the same in every simulation (a count that is always 0, a fixed
    summary) is learned as unit noise around its value: the flow's loss stays finite (it ran to
    -inf, then NaN, while the flow shrank onto the constant) and the column adds the same log
    density at every parameter, so the learned likelihood is the exact one up to a constant."""
    post = bl.SimulatorPosterior(prior, simulator, OBS)
    z = post.sample_prior(jax.random.key(0), 2000)
    x, _ = post.simulate(jax.random.key(1), z)
    x5 = np.concatenate([x, np.full((x.shape[0], 1), 5.0, x.dtype)], axis=1)
    config = snl.SNLConfig(**{k: v for k, v in SMALL.items() if k != "sampler_options"})
    spec = snl.FlowSpec(**{**dataclasses.asdict(snl.FlowSpec.of(post, config)), "num_data": D + 1})
    out = snl.train_flow(jax.random.key(2), x5, np.asarray(z), spec, config)
    assert np.isfinite(out["heldout_loss"])
    zt = post.sample_prior(jax.random.key(3), 500)
    xt, _ = post.simulate(jax.random.key(4), zt)
    theta = np.asarray(jax.vmap(post.constrain)(zt)["theta"])
    exact = np.asarray(dist.Normal(theta, np.sqrt(SIG2)).to_event(1).log_prob(xt))
    xt5 = jnp.asarray(np.concatenate([xt, np.full((500, 1), 5.0, xt.dtype)], axis=1))
    learned = np.asarray(snl._parts(spec).log_prob(out["vector"], xt5, jnp.asarray(zt)))
    gap = exact - learned
    # the constant column's share is log N(0; 0, 1) = -0.92 at every theta, learned to ~0.05
    assert abs(gap.mean() - 0.5 * np.log(2 * np.pi)) < 0.1, gap.mean()
    assert gap.std() < 0.15, gap.std()
    sims = np.asarray(snl._parts(spec).sample(out["vector"], jax.random.key(5), jnp.asarray(zt[0])))
    assert sims[-1] == 5.0  # and the flow's simulations keep it constant


def _poisson_prior():
    numpyro.sample("log_rate", dist.Normal(jnp.log(jnp.array([0.5, 2.0])), 0.3).to_event(1))


def _poisson_simulator(key, p):
    return jax.random.poisson(key, jnp.exp(p["log_rate"]), (2,)).astype(jnp.float32)


def test_counts_are_dequantised():
    """Whole-number data (counts) are learned with uniform dequantisation: a continuous flow on
    atoms has no upper bound (SIR's counts sent the loss to inf at 10,000 simulations); trained on
    x + U(-1/2, 1/2), the flow's density at a count is about its probability, so the learned
    log-likelihood is the exact Poisson log pmf to within ~0.1 nats on average (measured -0.05,
    sd 0.25; without dequantisation -4.0, sd 4.0: the flow piled its density onto the atoms)."""
    post = bl.SimulatorPosterior(_poisson_prior, _poisson_simulator, np.array([1.0, 2.0]))
    z = post.sample_prior(jax.random.key(0), 3000)
    x, _ = post.simulate(jax.random.key(1), z)
    assert np.all(x == np.round(x))
    config = snl.SNLConfig(**{k: v for k, v in SMALL.items() if k != "sampler_options"})
    spec = snl.FlowSpec.of(post, config)
    out = snl.train_flow(jax.random.key(2), x, np.asarray(z), spec, config)
    zt = post.sample_prior(jax.random.key(3), 1000)
    xt, _ = post.simulate(jax.random.key(4), zt)
    rate = np.exp(np.asarray(jax.vmap(post.constrain)(zt)["log_rate"]))
    exact = np.asarray(dist.Poisson(rate).to_event(1).log_prob(xt))
    learned = np.asarray(snl._parts(spec).log_prob(out["vector"], jnp.asarray(xt), jnp.asarray(zt)))
    gap = exact - learned
    assert abs(gap.mean()) < 0.15 and gap.std() < 0.5, (gap.mean(), gap.std())


def test_training_is_reproducible_by_seed(post):
    z = post.sample_prior(jax.random.key(0), 300)
    x, _ = post.simulate(jax.random.key(1), z)
    config = snl.SNLConfig(flow_layers=2, nn_width=32, knots=6, max_epochs=5)
    spec = snl.FlowSpec.of(post, config)
    a = snl.train_flow(jax.random.key(7), x, np.asarray(z), spec, config)
    b = snl.train_flow(jax.random.key(7), x, np.asarray(z), spec, config)
    c = snl.train_flow(jax.random.key(8), x, np.asarray(z), spec, config)
    np.testing.assert_array_equal(np.asarray(a["vector"]), np.asarray(b["vector"]))
    assert not np.array_equal(np.asarray(a["vector"]), np.asarray(c["vector"]))


# ------------------------------------------------------------------ the engine
def test_posterior_against_the_exact_one(small_fit):
    mean, var = exact_moments(OBS)
    draws = small_fit.draws("theta").reshape(-1, D)
    # 600 simulations: the learned likelihood's own error dominates the Monte Carlo error
    # (sd of the mean ~0.006 from 600 draws); within a fifth of a posterior sd, variance 30%
    assert np.all(np.abs(draws.mean(0) - mean) < 0.2 * np.sqrt(var)), draws.mean(0)
    assert np.all(np.abs(draws.var(0) / var - 1) < 0.3), draws.var(0)


def test_fit_records_the_rounds(small_fit):
    rounds = small_fit.idata["snl_rounds"].to_dataset()
    assert rounds.sizes["round"] == 2
    assert list(rounds["simulations_total"].values) == [300, 600]
    assert (rounds["epochs"].values >= 1).all() and np.isfinite(rounds["heldout_loss"]).all()
    assert rounds["draws_theta"].shape[0] == 2 and rounds["draws_theta"].shape[-1] == D
    assert 0 < rounds.attrs["predictive_p"] <= 1
    extra = small_fit.cost.extra
    assert extra["num_simulations"] == 600 and extra["num_failed_simulations"] == 0
    assert extra["train_s"] > 0 and extra["sample_s"] > 0
    assert small_fit.cost.num_loglik_evals is None and small_fit.cost.num_grad_evals > 0
    assert small_fit.engine == "snl" and small_fit.flags == ()
    assert set(small_fit.idata["observed_data"].to_dataset().data_vars) == {"x"}


def test_the_same_seed_gives_the_same_fit(post, small_fit):
    again = bl.fit(post, "snl", seed=3, **SMALL)
    np.testing.assert_array_equal(again.draws("theta"), small_fit.draws("theta"))
    assert again.cost.compile_s < small_fit.cost.compile_s  # every program was compiled already


def test_learned_posterior_runs_on_other_engines(post, small_fit):
    learned = snl.learned_posterior(post, small_fit)
    assert isinstance(learned, bl.Posterior) and learned.ndim == D
    z = jnp.asarray(np.asarray(small_fit.idata["snl_rounds"]["draws_theta"][-1, :5]))
    # the learned Posterior's log density is the prior plus the flow at the observation
    vector = small_fit.idata["snl_flow"]["vector"].values
    spec = snl.FlowSpec.of(post, snl.SNLConfig(**{k: v for k, v in SMALL.items()
                                                  if k not in ("sampler_options",)}))
    ll = snl._parts(spec).log_prob(jnp.asarray(vector), jnp.asarray(OBS), z)
    np.testing.assert_allclose(jax.vmap(learned.loglikelihood)(z), ll, rtol=1e-5, atol=1e-5)
    # the options of the SNL run's own sampler: its compiled program is reused
    again = bl.fit(learned, "nuts", **{**SMALL["sampler_options"], "progress_bar": False})
    assert abs(again.draws("theta").mean() - small_fit.draws("theta").mean()) < 0.05


def test_save_and_load(small_fit, tmp_path):
    small_fit.save(tmp_path / "snl.nc")
    back = bl.load_fit(tmp_path / "snl.nc")
    assert back.engine == "snl"
    np.testing.assert_array_equal(back.idata["snl_flow"]["vector"].values,
                                  small_fit.idata["snl_flow"]["vector"].values)


def test_misspecified_observation_is_flagged(post):
    """An observation 30 prior sds out is unlike any simulation at the posterior: the
    predictive check flags it (the same shapes: nothing new to compile)."""
    far = post.with_observed(np.array([10.0, -10.0]))
    with pytest.warns(bl.FitWarning, match="posterior predictive check"):
        fit = bl.fit(far, "snl", seed=3, **SMALL)
    assert fit.idata["snl_rounds"].attrs["predictive_p"] < 1e-3


def test_failed_simulations_are_counted_and_flagged():
    def fails_left(key, p):
        x = p["theta"] + jnp.sqrt(SIG2) * jax.random.normal(key, (D,))
        return jnp.where(p["theta"][0] < -0.3, jnp.nan, x)

    post = bl.SimulatorPosterior(prior, fails_left, OBS)
    with pytest.warns(bl.FitWarning, match="returned NaN or inf"):
        fit = bl.fit(post, "snl", seed=3, **SMALL)
    frac = fit.cost.extra["num_failed_simulations"] / fit.cost.extra["num_simulations"]
    assert 0.05 < frac < 0.3  # P(theta0 < -0.3) = 0.17 under the prior; fewer later
    assert any("returned NaN or inf" in f for f in fit.flags)


# ------------------------------------------------------------------ slow: default budgets
@pytest.mark.slow
def test_gaussian_linear_at_default_budget():
    """sbibm's gaussian_linear shape (10-D, prior N(0, 0.1 I), x ~ N(theta, 0.1 I)) at 10^4
    simulations over 10 rounds: moments within 10% of a posterior sd and sds within 10%."""
    D10 = 10

    def prior10():
        numpyro.sample("theta", dist.Normal(jnp.zeros(D10), jnp.sqrt(0.1)).to_event(1))

    def sim10(key, p):
        return p["theta"] + jnp.sqrt(0.1) * jax.random.normal(key, (D10,))

    obs = np.asarray(sim10(jax.random.key(11), {"theta": jnp.full(D10, 0.2)}))
    post = bl.SimulatorPosterior(prior10, sim10, obs)
    fit = bl.fit(post, "snl", seed=0, progress_bar=False)
    mean, var = obs / 2, 0.05
    d = fit.draws("theta").reshape(-1, D10)
    assert np.all(np.abs(d.mean(0) - mean) < 0.1 * np.sqrt(var) + 4 * np.sqrt(var / 1000))
    assert np.all(np.abs(d.std(0) / np.sqrt(var) - 1) < 0.1)


@pytest.mark.slow
def test_sbc_of_snl_passes():
    post = bl.SimulatorPosterior(prior, simulator, OBS)
    res = bl.sbc(post, "snl", num_simulations=50, num_draws=50, progress_bar=False,
                 engine_options={k: v for k, v in SMALL.items() if k != "progress_bar"})
    assert res.passed, res.table


def test_plot_rounds(small_fit, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from bayeslik.plots import plot_snl_rounds

    mean, var = exact_moments(OBS)
    exact = {"theta": np.random.default_rng(0).normal(mean, np.sqrt(var), (2000, D))}
    fig = plot_snl_rounds(small_fit, reference=exact)
    assert len([a for a in fig.axes if a.axison]) == D + 1
    fig.savefig(tmp_path / "rounds.png")
    with pytest.raises(DataError, match="no parameter"):
        plot_snl_rounds(small_fit, var_names=["phi"])


@pytest.mark.slow
def test_smc_sampler_gives_the_evidence_under_the_learned_likelihood(post):
    """sampler="smc": the log evidence under q near the exact one (x ~ N(0, (t^2 + s^2) I))."""
    fit = bl.fit(post, "snl", seed=1, **{**SMALL, "sampler": "smc",
                                         "sampler_options": {"num_particles": 1000}})
    exact = float(dist.Normal(0.0, np.sqrt(TAU2 + SIG2)).log_prob(OBS).sum())
    assert fit.log_evidence is not None
    # the flow's own error (KL ~0.02-0.05 nats at this budget) dominates SMC's
    assert abs(fit.log_evidence - exact) < 0.15 + 4 * fit.log_evidence_err, (
        fit.log_evidence, exact)
