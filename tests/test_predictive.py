"""``bl.posterior_predictive`` and ``bl.prior_predictive``: new data drawn from the program.

The analytic model is y_i ~ N(mu, 1), mu ~ N(0, 1) (n observations): the posterior of mu is
N(m, v) with m = sum(y)/(n+1), v = 1/(n+1), so the posterior predictive of each y_i is
N(m, 1 + v) (two entries covary by v), the prior predictive N(0, 2) (covariance 1), and in
both ``y_rep - mu`` (the draw's own mu) is N(0, 1), independent of the draws' quality. Exact
posterior draws make a hand-built Fit; a nested-sampling fit (a weighted engine) and a NUTS
fit are checked through the residual, and ArviZ's loo_pit and plot_ppc_dist run on them.
Every check is within 5 standard errors. NUTS (about 15 s of compilation) and the zoo families
(mixture, Hawkes and log-normal mixture point processes, meta-learning, AR-HMM; big programs)
are in the slow suite.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import bayeslik as bl
from bayeslik import predictive
from bayeslik.errors import ImproperPriorError, ModelError, OptionError
from bayeslik.fit import Cost, Fit, build_datatree
from tests.harness import linear_gaussian_params, linear_gaussian_prior

Z = 5.0  # standard errors
Y = np.array([0.9, 1.6, -0.2, 0.4, 1.1, 0.7])


def _plated(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("obs", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def _unplated(y):
    """The same model without a plate: the likelihood broadcasts a scalar Normal over y."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def _exact_fit(post, y, num_chains=2, num_draws=1500, seed=0):
    """A Fit holding exact posterior draws of mu (chain, draw), as an engine would store them."""
    n = len(y)
    m, v = y.sum() / (n + 1), 1.0 / (n + 1)
    mu = m + np.sqrt(v) * np.random.default_rng(seed).standard_normal((num_chains, num_draws))
    mu = mu.astype(post.observed_data["y"].dtype)
    return Fit(idata=build_datatree(post, {"mu": mu}), engine="exact", config={"a": 1}, seed=seed,
               cost=Cost(wall_s=1.5), model=post.name, flags=("a flag",))


def _within(x, mean, var, what):
    """The sample mean and variance of x (iid) within Z standard errors of mean and var."""
    x = np.asarray(x, np.float64).ravel()
    se_mean = np.sqrt(var / x.size)
    se_var = var * np.sqrt(2.0 / (x.size - 1))
    assert abs(x.mean() - mean) < Z * se_mean, (what, x.mean(), mean, se_mean)
    assert abs(x.var(ddof=1) - var) < Z * se_var, (what, x.var(ddof=1), var, se_var)


def _check_residual(fit_pp):
    """y_rep - mu (each draw's own mu) is N(0, 1): the latent values were substituted."""
    pp = fit_pp.idata["posterior_predictive"]["y"].values
    mu = fit_pp.idata["posterior"]["mu"].values
    _within(pp - mu[..., None], 0.0, 1.0, "residual")


# ---------------------------------------------------------------------------- analytic
@pytest.mark.parametrize("model,precision", [(_plated, "float32"), (_plated, "float64"),
                                             (_unplated, "float32")])
def test_posterior_predictive_is_the_analytic_one(model, precision, request):
    if precision == "float64":
        request.getfixturevalue("x64")
    y = Y.astype(precision)
    post = bl.Posterior(model, y=y)
    fit = _exact_fit(post, Y)
    out = bl.posterior_predictive(fit, post, seed=1)
    pp = out.idata["posterior_predictive"]["y"]
    assert pp.shape == (2, 1500, len(Y)) and pp.dtype == np.dtype(precision)
    n = len(Y)
    m, v = Y.sum() / (n + 1), 1.0 / (n + 1)
    for i in range(n):  # each entry's marginal: N(m, 1 + v)
        _within(pp.values[..., i], m, 1 + v, f"y[{i}]")
    # entries covary through mu only (a scalar draw broadcast over y would make them equal)
    c = np.corrcoef(pp.values[..., 0].ravel(), pp.values[..., 1].ravel())[0, 1]
    rho, N = v / (1 + v), pp.values[..., 0].size
    assert abs(c - rho) < Z * (1 - rho**2) / np.sqrt(N)
    _check_residual(out)


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_prior_predictive_is_the_analytic_marginal(precision, request):
    if precision == "float64":
        request.getfixturevalue("x64")
    post = bl.Posterior(_plated, y=Y.astype(precision))
    tree = bl.prior_predictive(post, num_draws=3000, seed=2)
    assert set(tree.children) == {"prior", "prior_predictive", "observed_data"}
    mu = tree["prior"]["mu"].values
    pp = tree["prior_predictive"]["y"].values
    assert mu.shape == (1, 3000) and pp.shape == (1, 3000, len(Y))
    assert pp.dtype == np.dtype(precision) and mu.dtype == np.dtype(precision)
    assert tree["prior_predictive"]["y"].dims == ("chain", "draw", "obs")
    _within(mu, 0.0, 1.0, "mu")
    _within(pp[..., 3], 0.0, 2.0, "y[3]")          # the marginal N(0, 2)
    _within(pp - mu[..., None], 0.0, 1.0, "residual")
    c = np.corrcoef(pp[0, :, 0], pp[0, :, 1])[0, 1]  # covariance 1 of 2: correlation 1/2
    assert abs(c - 0.5) < Z * 0.75 / np.sqrt(3000)
    np.testing.assert_array_equal(tree["observed_data"]["y"].values, Y.astype(precision))
    again = bl.prior_predictive(post, num_draws=3000, seed=2)
    np.testing.assert_array_equal(again["prior_predictive"]["y"].values, pp)
    other = bl.prior_predictive(post, num_draws=3000, seed=3)
    assert not np.array_equal(other["prior_predictive"]["y"].values, pp)


def test_observed_values_are_never_returned_for_obs_y_programs():
    """numpyro's Predictive returns the bound y in every row of such a program: not here."""
    post = bl.Posterior(_plated, y=Y)
    fit = _exact_fit(post, Y, num_draws=200)
    trap = numpyro.infer.Predictive(_plated, posterior_samples={"mu": fit.draws("mu")[0, :5]})
    assert np.all(np.asarray(trap(jax.random.PRNGKey(0), y=Y)["y"]) == Y.astype(np.float32))
    pp = bl.posterior_predictive(fit, post).idata["posterior_predictive"]["y"].values
    prior = bl.prior_predictive(post, num_draws=200)["prior_predictive"]["y"].values
    for draws in (pp, prior):
        rows = draws.reshape(-1, len(Y))
        assert not np.any(rows == Y.astype(np.float32))
        assert np.all(rows.std(axis=0) > 0.5)  # sd about 1.07 (posterior), 1.41 (prior)


def test_the_input_fit_is_unchanged_and_the_facts_are_kept():
    post = bl.Posterior(_plated, y=Y)
    fit = _exact_fit(post, Y, num_draws=100)
    before = set(fit.idata.children)
    out = bl.posterior_predictive(fit, post, seed=4)
    assert set(fit.idata.children) == before and "posterior_predictive" not in before
    assert set(out.idata.children) == before | {"posterior_predictive"}
    for name in ("engine", "config", "seed", "cost", "flags", "model", "log_evidence"):
        assert getattr(out, name) == getattr(fit, name)
    np.testing.assert_array_equal(out.draws("mu"), fit.draws("mu"))
    group = out.idata["posterior_predictive"]
    np.testing.assert_array_equal(group["chain"].values, fit.idata["posterior"]["chain"].values)
    np.testing.assert_array_equal(group["draw"].values, fit.idata["posterior"]["draw"].values)
    assert group.attrs["seed"] == 4
    # a Fit without observed_data gets it
    tree = fit.idata.copy()
    del tree["observed_data"]
    bare = bl.posterior_predictive(Fit(idata=tree, engine="x", config={}, seed=0,
                                       cost=Cost(0.0)), post)
    np.testing.assert_array_equal(bare.idata["observed_data"]["y"].values, Y.astype(np.float32))


def test_save_and_load_keep_the_group(tmp_path):
    post = bl.Posterior(_plated, y=Y)
    out = bl.posterior_predictive(_exact_fit(post, Y, num_draws=50), post)
    out.save(tmp_path / "pp.nc")
    back = bl.load_fit(tmp_path / "pp.nc")
    np.testing.assert_array_equal(back.idata["posterior_predictive"]["y"].values,
                                  out.idata["posterior_predictive"]["y"].values)


# ---------------------------------------------------------------------------- compile once
def test_compiled_once_per_cache_key_and_the_data_is_an_argument():
    def regression(x, y):
        b = numpyro.sample("b", dist.Normal(0.0, 1.0))
        with numpyro.plate("obs", x.shape[0]):
            numpyro.sample("y", dist.Normal(b * x, 1.0), obs=y)

    rng = np.random.default_rng(5)
    x1, x2 = rng.normal(size=(2, 8)).astype(np.float32) * 3
    post1 = bl.Posterior(regression, x=x1, y=rng.normal(size=8).astype(np.float32))
    post2 = bl.Posterior(regression, x=x2, y=rng.normal(size=8).astype(np.float32))
    assert post1.cache_key == post2.cache_key
    b = rng.normal(size=(2, 500)).astype(np.float32)
    fits = [Fit(idata=build_datatree(p, {"b": b}), engine="x", config={}, seed=0, cost=Cost(0.0))
            for p in (post1, post2)]
    bl.posterior_predictive(fits[0], post1)
    progs = predictive._programs(post1, ("y",))
    compiled, seconds = len(progs._compiled), progs.compile_s
    assert compiled == 1 and seconds > 0
    out = [bl.posterior_predictive(f, p, seed=s) for f, p in zip(fits, (post1, post2))
           for s in (0, 1)]
    few = bl.posterior_predictive(fits[1], post2, num_draws=7)  # another number of draws
    assert few.idata["posterior_predictive"]["y"].shape == (2, 7, 8)
    assert len(progs._compiled) == compiled and progs.compile_s == seconds  # nothing compiled
    for o, x in zip(out, (x1, x1, x2, x2)):  # the second Posterior's covariates are used
        pp = o.idata["posterior_predictive"]["y"].values
        _within(pp - b[..., None] * x, 0.0, 1.0, "regression residual")
    assert not np.array_equal(out[0].idata["posterior_predictive"]["y"].values,
                              out[1].idata["posterior_predictive"]["y"].values)


@pytest.mark.slow
def test_chunks_do_not_change_the_draws(monkeypatch):
    """Row i's draws come from the i-th key: smaller chunks (another compiled shape) agree."""
    post = bl.Posterior(_plated, y=Y)
    fit = _exact_fit(post, Y, num_draws=300)
    whole = bl.posterior_predictive(fit, post, seed=7)
    monkeypatch.setattr(predictive, "CHUNK_BYTES", 64 * len(Y) * 4)  # 64 draws a chunk
    chunked = bl.posterior_predictive(fit, post, seed=7)
    np.testing.assert_array_equal(chunked.idata["posterior_predictive"]["y"].values,
                                  whole.idata["posterior_predictive"]["y"].values)


# ---------------------------------------------------------------------------- num_draws, seed
def test_num_draws_thins_each_chain_evenly():
    post = bl.Posterior(_plated, y=Y)
    fit = _exact_fit(post, Y, num_draws=10)
    out = bl.posterior_predictive(fit, post, num_draws=4)
    group = out.idata["posterior_predictive"]
    assert group["y"].shape == (2, 4, len(Y))
    np.testing.assert_array_equal(group["draw"].values, [0, 2, 5, 7])  # i * 10 // 4
    assert bl.posterior_predictive(fit, post, num_draws=np.int64(10)).idata[
        "posterior_predictive"]["y"].shape == (2, 10, len(Y))


@pytest.mark.parametrize("bad", [0, -1, 11, 2.5, True, "5", np.nan])
def test_bad_num_draws_are_refused(bad):
    post = bl.Posterior(_plated, y=Y)
    fit = _exact_fit(post, Y, num_draws=10)
    with pytest.raises(OptionError, match="num_draws"):
        bl.posterior_predictive(fit, post, num_draws=bad)
    if bad != 11:
        with pytest.raises(OptionError, match="num_draws"):
            bl.prior_predictive(post, num_draws=bad)


@pytest.mark.parametrize("bad", [1.0, "0", None, True, 2**64])
def test_bad_seeds_are_refused(bad):
    post = bl.Posterior(_plated, y=Y)
    with pytest.raises(OptionError, match="seed"):
        bl.prior_predictive(post, seed=bad)
    with pytest.raises(OptionError, match="seed"):
        bl.posterior_predictive(_exact_fit(post, Y, num_draws=5), post, seed=bad)


# ---------------------------------------------------------------------------- refusals
def test_a_fit_of_another_posterior_is_refused():
    post = bl.Posterior(_plated, y=Y)
    fit = _exact_fit(post, Y, num_draws=5)
    with pytest.raises(OptionError, match="needs a bayeslik Fit"):
        bl.posterior_predictive(fit.idata, post)

    def other(y):
        theta = numpyro.sample("theta", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(theta, 1.0), obs=y)

    with pytest.raises(OptionError, match=r"lacks the latent site\(s\) \['theta'\]"):
        bl.posterior_predictive(fit, bl.Posterior(other, y=Y))
    with pytest.raises(OptionError, match="observed site 'y' has shape"):
        bl.posterior_predictive(fit, bl.Posterior(_plated, y=Y[:3]))


def test_an_improper_prior_is_refused_for_the_prior_predictive_only():
    def flat(y):
        mu = numpyro.sample("mu", dist.ImproperUniform(dist.constraints.real, (), ()))
        with numpyro.plate("obs", y.shape[0]):
            numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    post = bl.Posterior(flat, y=Y)
    with pytest.raises(ImproperPriorError, match=r"prior_predictive .*needs a proper prior.*'mu'"):
        bl.prior_predictive(post)
    mu = np.random.default_rng(0).normal(size=(1, 400)).astype(np.float32)
    fit = Fit(idata=build_datatree(post, {"mu": mu}), engine="x", config={}, seed=0,
              cost=Cost(0.0))
    _check_residual(bl.posterior_predictive(fit, post))


def test_a_state_space_posterior_is_refused():
    from bayeslik.filtering import particle

    post = bl.StateSpacePosterior(
        linear_gaussian_prior, particle.linear_gaussian_ssm(1), np.zeros((10, 1), np.float32),
        params_fn=linear_gaussian_params)
    with pytest.raises(OptionError, match="StateSpacePosterior is not supported.*no sampler"):
        bl.prior_predictive(post)
    fit = Fit(idata=build_datatree(post, {"phi": np.zeros((1, 4), np.float32)}), engine="x",
              config={}, seed=0, cost=Cost(0.0))
    with pytest.raises(OptionError, match="StateSpacePosterior is not supported"):
        bl.posterior_predictive(fit, post)


def test_factor_sites_are_skipped_and_a_factor_only_program_is_refused():
    def factor_only(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        numpyro.factor("lik", -0.5 * jnp.sum((y - mu) ** 2))

    def with_factor(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        numpyro.factor("penalty", -0.5 * mu**2)
        with numpyro.plate("obs", y.shape[0]):
            numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    with pytest.raises(OptionError, match=r"no observed sample site.*factor site\(s\) \['lik'\]"):
        bl.prior_predictive(bl.Posterior(factor_only, y=Y))
    post = bl.Posterior(with_factor, y=Y)
    tree = bl.prior_predictive(post, num_draws=20)
    assert list(tree["prior_predictive"].data_vars) == ["y"]
    assert tree["prior_predictive"].attrs["skipped_factor_sites"] == "penalty"


def test_a_distribution_without_a_sampler_is_named():
    class NoSample(dist.Normal):
        def sample(self, key, sample_shape=()):
            raise NotImplementedError

    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with numpyro.plate("obs", y.shape[0]):
            numpyro.sample("y", NoSample(mu, 1.0), obs=y)

    with pytest.raises(ModelError, match="observed site 'y'.*cannot draw values"):
        bl.prior_predictive(bl.Posterior(model, y=Y), num_draws=4)


# ---------------------------------------------------------------------------- dims and coords
def _grouped(y, group):
    """Nested named plates, a vector observation per entry, a mask."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("group", y.shape[1], dim=-1):
        shift = numpyro.sample("shift", dist.Normal(0.0, 1.0))
        with numpyro.plate("unit", y.shape[0], dim=-2):
            with numpyro.handlers.mask(mask=group > 0):
                numpyro.sample("y", dist.Normal(mu + shift, 1.0), obs=y)


class _Labelled(bl.Posterior):
    """A Posterior with ArviZ coords (the ``coords`` property, dim -> labels)."""

    @property
    def coords(self):
        return {"group": ["a", "b", "c"], "unit": [f"u{i}" for i in range(4)], "other": [1]}


def test_plate_names_and_coords_name_the_new_groups():
    y = np.arange(12, dtype=np.float32).reshape(4, 3) / 4
    group = np.array([[1, 1, 0]] * 4)
    for cls in (bl.Posterior, _Labelled):
        post = cls(_grouped, y=y, group=group)
        tree = bl.prior_predictive(post, num_draws=16)
        assert tree["prior_predictive"]["y"].dims == ("chain", "draw", "unit", "group")
        assert tree["prior"]["shift"].dims == ("chain", "draw", "group")
        draws = {n: tree["prior"][n].values for n in post.latent_names}
        fit = Fit(idata=build_datatree(post, draws), engine="x", config={}, seed=0,
                  cost=Cost(0.0))
        pp = bl.posterior_predictive(fit, post).idata["posterior_predictive"]["y"]
        assert pp.dims == ("chain", "draw", "unit", "group") and pp.shape == (1, 16, 4, 3)
        assert np.all(np.isfinite(pp.values))  # masked entries get draws too
        if cls is _Labelled:
            for g in (pp, tree["prior_predictive"]["y"], tree["prior"]["shift"]):
                assert list(g["group"].values) == ["a", "b", "c"]
            assert list(pp["unit"].values) == ["u0", "u1", "u2", "u3"]
            assert list(tree["observed_data"]["y"]["unit"].values)[0] == "u0"
            assert "other" not in tree["prior_predictive"].coords
    if hasattr(bl.Posterior, "with_coords"):  # user dims and coords, as ArviZ's dims=/coords=
        post = bl.Posterior(_grouped, y=y, group=group).with_coords(
            coords={"school": list("xyz")}, dims={"y": ["pupil", "school"]})
        tree = bl.prior_predictive(post, num_draws=16)
        g = tree["prior_predictive"]["y"]
        assert g.dims == ("chain", "draw", "pupil", "school")
        assert list(g["school"].values) == ["x", "y", "z"]


# ---------------------------------------------------------------------------- engines and ArviZ
#: the engines' small settings; NUTS compiles for about 15 s of CPU: slow suite
ENGINES = {"nested": dict(num_live=100),
           "nuts": dict(num_warmup=150, num_samples=200, num_chains=2)}


@pytest.fixture(scope="module", params=["nested", pytest.param("nuts", marks=pytest.mark.slow)])
def engine_fit(request):
    """(engine, Posterior, Fit) of the analytic model by nested sampling (a weighted engine:
    its equal-weight draws, one chain) and by NUTS (chains of draws)."""
    post = bl.Posterior(_plated, y=Y.astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence flags of tiny runs are not this file's
        fit = bl.fit(post, request.param, seed=0, progress_bar=False, **ENGINES[request.param])
    return request.param, post, fit


def test_engine_fits(engine_fit):
    engine, post, fit = engine_fit
    out = bl.posterior_predictive(fit, post, seed=3)
    C, S = fit.num_chains, fit.num_draws
    assert out.idata["posterior_predictive"]["y"].shape == (C, S, len(Y))
    assert C == (1 if engine == "nested" else 2)
    _check_residual(out)
    assert out.engine == engine and out.flags == fit.flags and out.cost == fit.cost


def test_arviz_predictive_checks_run_on_the_output(engine_fit):
    """The point of the feature: ArviZ's LOO-PIT and predictive plots work on the groups."""
    import arviz_plots as azp
    import arviz_stats as azs
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, post, fit = engine_fit
    out = bl.posterior_predictive(fit, post)
    pit = azs.loo_pit(out.idata)
    values = np.asarray(pit["y"].values)
    assert values.shape == (len(Y),) and np.all((values >= 0) & (values <= 1))
    azp.plot_ppc_dist(out.idata, backend="matplotlib")
    azp.plot_ppc_dist(bl.prior_predictive(post, num_draws=100), group="prior_predictive",
                      backend="matplotlib")
    plt.close("all")


# ---------------------------------------------------------------------------- the zoo
def _zoo():
    from bayeslik.models import arhmm, meta, mixture, tpp

    def first(example, n):
        """An example problem cut to its first n rows (sequences, tasks, points, steps)."""
        model, data = example()
        return bl.Posterior(model, **{k: v[:n] if np.ndim(v) else v for k, v in data.items()})

    return {"mixture": lambda: first(mixture.example, 60), "hawkes": lambda: first(tpp.example, 3),
            "lognormmix": lambda: first(tpp.example_lognormmix, 3),
            "meta": lambda: first(meta.example, 6), "arhmm": lambda: first(arhmm.example, 80)}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixture", "hawkes", "lognormmix", "meta", "arhmm"])
def test_zoo_families(family):
    """Prior draws, then the posterior predictive of a Fit made of them: the observed shapes,
    dims and fresh values (the tpp samplers give NaN times where a sequence overflows its
    slots, so only the shapes are checked there)."""
    post = _zoo()[family]()
    tree = bl.prior_predictive(post, num_draws=8, seed=1)
    draws = {n: tree["prior"][n].values for n in post.latent_names}
    fit = Fit(idata=build_datatree(post, draws), engine="x", config={}, seed=0, cost=Cost(0.0))
    out = bl.posterior_predictive(fit, post, seed=2)
    for name, y in post.observed_data.items():
        for group in (tree["prior_predictive"], out.idata["posterior_predictive"]):
            v = group[name]
            assert v.shape == (1, 8) + y.shape
            assert v.dims[2:] == tuple(post.sites[name].dims)
            if family not in ("hawkes", "lognormmix"):
                assert np.all(np.isfinite(v.values)) and not np.any(v.values == y)
