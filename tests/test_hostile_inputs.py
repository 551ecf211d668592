"""Hostile or careless input (issue 19, "cryptic or late errors"): each case is refused with a
BayeslikError that names the argument, site or option and the fix, before anything is compiled
(the ``no_jit`` fixture fails a test that compiles); where a message gives advice, the advice
is followed and shown to work."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import bayeslik as bl
from bayeslik import api
from bayeslik.errors import DataError, EngineError, OptionError
from bayeslik.filtering import particle
from bayeslik.models import arhmm, cmapss, meta, mixture, nested_suite, reference, tpp
from bayeslik.statespace import StateSpacePosterior


def plate_model(y):
    mu = numpyro.sample("mu", dist.Normal(0, 5))
    with numpyro.plate("obs", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def masked_model(y, ok):
    """The shape-keeping way the NaN and masked-array messages recommend."""
    mu = numpyro.sample("mu", dist.Normal(0, 5))
    with numpyro.plate("obs", y.shape[0]), numpyro.handlers.mask(mask=ok):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def sized_model(N, y):
    mu = numpyro.sample("mu", dist.Normal(0, 5))
    with numpyro.plate("obs", N):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def beta_model(y):
    a = numpyro.sample("a", dist.HalfNormal(2.0))
    b = numpyro.sample("b", dist.HalfNormal(2.0))
    with numpyro.plate("obs", y.shape[0]):
        numpyro.sample("y", dist.Beta(a, b), obs=y)


def scale_model(y):
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    numpyro.sample("y", dist.Normal(0.0, sigma), obs=y)


# ------------------------------------------------------------------------------ data: missing values
def test_masked_array_is_refused_naming_the_argument(no_jit):
    y = np.ma.array([0.3, -999.0, 1.2], mask=[False, True, False])
    with pytest.raises(DataError, match=r"argument 'y' is a numpy masked array with 1 masked "
                                        r"entry \(first at index \(1,\).*ignore the mask.*"
                                        r"handlers\.mask"):
        bl.Posterior(plate_model, y=y)


def test_masked_array_with_nothing_masked_is_its_data(no_jit):
    post = bl.Posterior(plate_model, y=np.ma.array([0.3, 1.2]))
    assert type(post.data["y"]) is not np.ma.MaskedArray
    np.testing.assert_allclose(np.asarray(post.data["y"]), [0.3, 1.2])


def _dropped_loglikelihood(y_kept, z):
    return float(bl.Posterior(plate_model, y=jnp.asarray(y_kept)).loglikelihood(z))


def test_the_nan_advice_works():
    y = np.array([0.3, np.nan, 1.2, -0.4])
    with pytest.raises(DataError) as info:
        bl.Posterior(plate_model, y=y)
    msg = str(info.value)
    assert "argument 'y' contains 1 NaN" in msg and "handlers.mask(mask=ok)" in msg
    # follow it: a finite placeholder inside the support, the mask as an argument
    ok = np.isfinite(y)
    post = bl.Posterior(masked_model, y=np.where(ok, y, np.mean(y[ok])), ok=ok)
    z = post.unconstrain({"mu": 0.4})
    assert np.isclose(float(post.loglikelihood(z)), _dropped_loglikelihood(y[ok], z), rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(jax.grad(post.logdensity)(z))))


def test_the_masked_array_advice_works():
    y = np.ma.array([0.3, -999.0, 1.2], mask=[False, True, False])
    ok = ~np.ma.getmaskarray(y)
    post = bl.Posterior(masked_model, y=y.filled(np.mean(y)), ok=ok)
    z = post.unconstrain({"mu": -0.2})
    assert np.isclose(float(post.loglikelihood(z)), _dropped_loglikelihood(y.compressed(), z),
                      rtol=1e-6)


# ------------------------------------------------------------------------------ data: type and shape
@pytest.mark.parametrize("y", [np.array([1.0 + 2.0j, 0.5]), jnp.array([1.0 + 0.0j]),
                               [1.0 + 1.0j, 2.0]], ids=["numpy", "jax", "list"])
def test_complex_data_is_refused(no_jit, y):
    with pytest.raises(DataError, match=r"argument 'y' is complex-valued.*np\.real"):
        bl.Posterior(plate_model, y=y)


def test_complex_observations_of_a_state_space_posterior_are_refused(no_jit):
    def prior():
        numpyro.sample("phi", dist.Uniform(-1, 1))

    with pytest.raises(DataError, match="ys is complex-valued"):
        StateSpacePosterior(prior, particle.stochastic_volatility_ssm(),
                            np.zeros(10, np.complex64))
    with pytest.raises(DataError, match=r"ys\['y'\] is a numpy masked array"):
        StateSpacePosterior(prior, particle.stochastic_volatility_ssm(),
                            {"y": np.ma.array(np.zeros(10), mask=np.arange(10) == 3)})


def test_empty_data_under_a_plate_names_the_argument(no_jit):
    with pytest.raises(DataError, match=r"plate has size 0.*argument\(s\) \['y'\] are empty"):
        bl.Posterior(plate_model, y=np.zeros(0))
    with pytest.raises(DataError, match=r"size arguments \['N=0'\] must be positive"):
        bl.Posterior(sized_model, N=0, y=np.zeros(0))


def test_empty_observed_site_is_refused(no_jit):
    with pytest.raises(DataError, match=r"observed site 'y' has no values \(shape \(0,\)\)"):
        bl.Posterior(scale_model, y=np.zeros(0))


def test_scalar_where_the_model_needs_an_array(no_jit):
    with pytest.raises(DataError, match=r"Argument\(s\) \['y'\] are Python scalars.*atleast_1d"):
        bl.Posterior(plate_model, y=1.5)
    with pytest.raises(DataError, match=r"argument\(s\) \['y'\] are scalars \(shape \(\)\)"):
        bl.Posterior(plate_model, y=np.float32(1.5))


# ------------------------------------------------------------------------------ data: the support
def test_beta_data_on_the_boundary_is_found_before_compiling(no_jit):
    with pytest.raises(DataError, match=r"observed site 'y' has 2 value\(s\) on the boundary of "
                                        r"the support .* of Beta.*first at index \(1,\).*np\.clip"):
        bl.Posterior(beta_model, y=np.array([0.3, 0.0, 0.7, 1.0]))
    bl.Posterior(beta_model, y=np.array([0.3, 0.01, 0.7, 0.99]))  # inside: fine


def test_dirichlet_data_with_a_zero_is_found_before_compiling(no_jit):
    def model(p):
        c = numpyro.sample("c", dist.HalfNormal(2.0).expand([3]).to_event(1))
        with numpyro.plate("obs", p.shape[0]):
            numpyro.sample("p", dist.Dirichlet(c), obs=p)

    p = np.array([[0.2, 0.3, 0.5], [0.0, 0.4, 0.6]])
    with pytest.raises(DataError, match=r"observed site 'p' has 1 value\(s\) on the boundary.*"
                                        r"index \(1,\)"):
        bl.Posterior(model, p=p)


def test_boundary_values_with_a_finite_density_are_fine(no_jit):
    def model(y):
        b = numpyro.sample("b", dist.HalfNormal(2.0))
        numpyro.sample("y", dist.Beta(1.0, b), obs=y)

    bl.Posterior(model, y=np.array([0.0, 0.5]))  # Beta(1, b)'s density at 0 is b


@pytest.mark.parametrize("family", [dist.LogNormal, dist.Gamma])
def test_zero_for_a_positive_distribution(no_jit, family):
    def model(y):
        s = numpyro.sample("s", dist.HalfNormal(1.0))
        numpyro.sample("y", family(s, 1.0) if family is dist.Gamma else family(0.0, s), obs=y)

    with pytest.raises(DataError, match=r"observed site 'y' has 1 value\(s\) outside the support"):
        bl.Posterior(model, y=np.array([1.0, 0.0]))


# ------------------------------------------------------------------------------ engine options
@pytest.fixture
def post():
    return reference.get("normal_mean").posterior()


@pytest.mark.parametrize("option, value, match", [
    ("target_accept", "0.8", r"NUTS option target_accept='0.8': must lie strictly between 0 and "
                             r"1 .*, not a str\."),
    ("num_samples", True, r"NUTS option num_samples=True: must be a positive integer, not a bool"),
    ("num_samples", 10.5, r"NUTS option num_samples=10.5: must be a positive integer, not a float"),
    ("target_accept", float("nan"), r"NUTS option target_accept=nan: .*, not nan\."),
    ("init_radius", float("inf"), r"NUTS option init_radius=inf: must be positive, not inf\."),
    ("init_radius", 10**400, r"NUTS option init_radius=1000.*: must be positive"),
])
def test_engine_options_of_the_wrong_type(no_jit, post, option, value, match):
    with pytest.raises(EngineError, match=match):
        bl.fit(post, "nuts", **{option: value})


class _Reached(Exception):
    pass


@pytest.fixture
def reached(monkeypatch):
    """bl.fit's "nuts" engine replaced by one that raises _Reached(key) at once."""
    def run(posterior, rng_key, config):
        raise _Reached(rng_key)

    spec = api.engine_spec("nuts")
    monkeypatch.setitem(api._REGISTRY, "nuts", dataclasses.replace(spec, run=run))


def test_a_huge_seed_names_the_range(no_jit, post):
    with pytest.raises(EngineError, match=r"seed=1180591620717411303424: must lie in \[-2\*\*63, "
                                          r"2\*\*63 - 1\]"):
        bl.fit(post, "nuts", seed=2**70)


def test_numpy_integer_seeds_are_accepted(no_jit, reached, post):
    with pytest.raises(_Reached) as info:
        bl.fit(post, "nuts", seed=np.int64(3))
    key = info.value.args[0]
    assert np.array_equal(jax.random.key_data(key), jax.random.key_data(jax.random.key(3)))
    for seed in (2**63 - 1, -(2**63)):  # the ends of the range are keys
        with pytest.raises(_Reached):
            bl.fit(post, "nuts", seed=seed)
    with pytest.raises(EngineError, match=r"seed=18446744073709551615: must lie in"):
        bl.fit(post, "nuts", seed=2**64 - 1)
    with pytest.raises(EngineError, match=r"seed must be an int, got True"):
        bl.fit(post, "nuts", seed=True)


def test_bad_seed_environment_variable(no_jit, post, monkeypatch):
    monkeypatch.setenv("BAYESLIK_SEED", "abc")
    with pytest.raises(EngineError, match=r"BAYESLIK_SEED, but it is 'abc'"):
        bl.fit(post, "nuts", seed=None)


def test_engine_config_class_instead_of_an_instance(no_jit, post):
    with pytest.raises(EngineError, match=r"engine NUTS is an engine config class.*call it, "
                                          r"NUTS\(\).*'nuts'"):
        bl.fit(post, bl.engines.NUTS)
    with pytest.raises(EngineError, match=r"call it"):
        bl.fit(post, bl.engines.NUTS, num_samples=10)


# ------------------------------------------------------------------------------ inits
def test_init_naming_an_unknown_site(no_jit):
    post = bl.Posterior(scale_model, y=np.ones(3))
    with pytest.raises(EngineError, match=r"NUTS option init: 'sigam' is not a latent site of "
                                          r"model 'scale_model'; the latent sites are \['sigma'\]"):
        bl.fit(post, "nuts", init={"sigam": 1.0})
    with pytest.raises(EngineError, match=r"'y' \(observed site\) is not a latent site"):
        bl.fit(post, "nuts", init={"sigma": 1.0, "y": 0.0})


def test_init_outside_the_support(no_jit):
    post = bl.Posterior(scale_model, y=np.ones(3))
    with pytest.raises(EngineError, match=r"NUTS option init: init\['sigma'\] = -1 is outside the "
                                          r"support of site 'sigma' \(HalfNormal, support "
                                          r"Positive"):
        bl.fit(post, "nuts", init={"sigma": -1.0})
    with pytest.raises(EngineError, match=r"init\['sigma'\] has shape \(2,\), but site 'sigma' has "
                                          r"shape \(\)"):
        bl.fit(post, "nuts", init={"sigma": [1.0, 2.0]})
    with pytest.raises(EngineError, match=r"init\['sigma'\] = nan is not finite"):
        bl.fit(post, "nuts", init={"sigma": float("nan")})
    with pytest.raises(EngineError, match=r"init\['sigma'\] = 'one' is not a number"):
        bl.fit(post, "nuts", init={"sigma": "one"})


def test_init_support_that_depends_on_another_site(no_jit):
    def model(y):
        top = numpyro.sample("top", dist.HalfNormal(5.0))
        x = numpyro.sample("x", dist.Uniform(0.0, top))
        numpyro.sample("y", dist.Normal(x, 1.0), obs=y)

    post = bl.Posterior(model, y=np.ones(2))
    with pytest.raises(EngineError, match=r"init\['x'\] = 3 is outside the support of site 'x'"):
        bl.fit(post, "nuts", init={"top": 2.0, "x": 3.0})


# ------------------------------------------------------------------------------ zoo simulators, loaders
def test_arhmm_simulator_sizes(no_jit):
    key = jax.random.key(0)
    for kwargs, name in (({"num_steps": 0}, "num_steps"), ({"num_steps": -5}, "num_steps"),
                         ({"num_steps": 10, "num_states": 0}, "num_states"),
                         ({"num_steps": 10, "dim": 0}, "dim"),
                         ({"num_steps": 10, "num_lags": 0}, "num_lags")):
        with pytest.raises(OptionError, match=f"simulate: {name} must be a positive integer"):
            arhmm.simulate(key, **kwargs)
    with pytest.raises(OptionError, match="default_params: num_states must be a positive integer"):
        arhmm.default_params(num_states=0)
    with pytest.raises(OptionError, match="init_params: num_states must be a positive integer"):
        arhmm.init_params(np.zeros((20, 1)), 0)


def test_mixture_simulator_sizes(no_jit):
    key = jax.random.key(0)
    for kwargs, name in (({"num_points": 0}, "num_points"),
                         ({"num_points": 10, "num_components": 0}, "num_components"),
                         ({"num_points": 10, "dim": 0}, "dim"),
                         ({"num_points": -1}, "num_points")):
        with pytest.raises(OptionError, match=f"simulate: {name} must be a positive integer"):
            mixture.simulate(key, **kwargs)
    with pytest.raises(OptionError, match="weights must be 3 non-negative numbers"):
        mixture.simulate(key, 10, weights=[0.0, 0.0, 0.0])


def test_tpp_simulator_sizes(no_jit):
    key, params = jax.random.key(0), {"mu": [1.0], "alpha": [[0.5]], "beta": [2.0]}
    with pytest.raises(OptionError, match="num_sequences must be a positive integer, got 0"):
        tpp.simulate_hawkes(key, params, 10.0, num_sequences=0)
    with pytest.raises(OptionError, match="max_events must be a positive integer"):
        tpp.simulate_hawkes(key, params, 10.0, max_events=0)
    with pytest.raises(OptionError, match="finite t_start < t_end"):
        tpp.simulate_hawkes(key, params, 0.0)


def test_meta_and_reference_sizes(no_jit):
    with pytest.raises(DataError, match=r"at least one task and one point, got shape \(0, 5\)"):
        meta.make_data(np.zeros((0, 5)), np.zeros((0, 5)))
    with pytest.raises(OptionError, match="num_tasks must be a positive integer"):
        meta.simulate_tasks(jax.random.key(0), 0)
    with pytest.raises(OptionError, match="correlated_gaussian: dim must be a positive integer"):
        reference.correlated_gaussian(dim=0)
    with pytest.raises(OptionError, match="dim must be a positive integer"):
        nested_suite.shells_log_evidence(0)


def test_cmapss_short_run_to_failure_unit(no_jit):
    d = cmapss.load()
    hi = cmapss.HealthIndicator.fit(d["train"])
    train = d["train"]
    short = train[(train["unit"] != 1) | (train["cycle"] <= 40)]  # unit 1 cut to 40 cycles
    with pytest.raises(DataError, match=r"1 run-to-failure unit\(s\) are too short.*unit 1 with "
                                        r"40 cycles.*need 46 cycles.*isin\(\[1\]\)"):
        cmapss.degradation_data(short[short["unit"] <= 3], hi, 3, run_to_failure=True)
    ok = cmapss.degradation_data(train[train["unit"] <= 3], hi, 3, run_to_failure=True)
    assert ok["labels"].shape[0] == 3
    test_units = cmapss.degradation_data(short[short["unit"] <= 3], hi, 3, run_to_failure=False)
    assert test_units["length"][0] == 40  # test units carry no final labels: fine
    with pytest.raises(OptionError, match="num_states must be an integer >= 2"):
        cmapss.degradation_data(train[train["unit"] <= 3], hi, 1, run_to_failure=True)
