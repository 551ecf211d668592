"""Bad input is rejected in Python, before anything is compiled, naming the argument or site."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import bayeslik as bl
from bayeslik.models import reference


def normal_model(y, sigma):
    mu = numpyro.sample("mu", dist.Normal(0, 5))
    with numpyro.plate("obs", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, sigma), obs=y)


def test_nan_in_data_names_the_argument(no_jit):
    y = np.array([1.0, np.nan, 2.0, np.inf])
    with pytest.raises(bl.DataError, match=r"argument 'y' contains 1 NaN and 1 infinite.*index \(1,\)"):
        bl.Posterior(normal_model, y=y, sigma=1.0)
    with pytest.raises(bl.DataError, match="argument 'sigma'"):
        bl.Posterior(normal_model, y=np.ones(3), sigma=np.array([1.0, np.inf, 1.0]))


def test_nan_in_positional_argument(no_jit):
    with pytest.raises(bl.DataError, match=r"positional argument 'args\[0\]'"):
        bl.Posterior(normal_model, np.array([np.nan]), 1.0)


def test_nan_computed_inside_the_model_names_the_site(no_jit):
    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0, 1))
        numpyro.sample("logy", dist.Normal(mu, 1), obs=jnp.log(y))

    with pytest.raises(bl.DataError, match="observed site 'logy'"):
        bl.Posterior(model, y=np.array([1.0, -1.0]))


def test_inconsistent_shapes_name_the_site(no_jit):
    def model(y, x):
        b = numpyro.sample("b", dist.Normal(0, 1))
        numpyro.sample("y", dist.Normal(b * x, 1.0), obs=y)

    with pytest.raises(bl.DataError, match=r"observed site 'y'.*\(5,\).*\(4,\).*do not broadcast"):
        bl.Posterior(model, y=np.zeros(5), x=np.zeros(4))
    with pytest.raises(bl.DataError, match=r"observed site 'y'.*counted 3 times"):
        bl.Posterior(model, y=np.zeros(4), x=np.zeros((3, 4)))


def test_failing_model_reports_argument_shapes(no_jit):
    def model(y, x):
        b = numpyro.sample("b", dist.Normal(0, 1))
        with numpyro.plate("n", 5):
            numpyro.sample("y", dist.Normal(b * x, 1.0), obs=y)

    with pytest.raises(bl.DataError, match=r"y: \(5,\), x: \(4,\)"):
        bl.Posterior(model, y=np.zeros(5), x=np.zeros(4))


def test_data_outside_support(no_jit):
    def model(k):
        rate = numpyro.sample("rate", dist.Exponential(1.0))
        numpyro.sample("k", dist.Poisson(rate), obs=k)

    with pytest.raises(bl.DataError, match=r"observed site 'k' has 1 value\(s\) outside the support"):
        bl.Posterior(model, k=np.array([1, 2, -3]))


def test_discrete_latent_site(no_jit):
    def model(y):
        z = numpyro.sample("z", dist.Bernoulli(0.5))
        numpyro.sample("y", dist.Normal(z, 1.0), obs=y)

    with pytest.raises(bl.ModelError, match=r"site 'z' is a discrete latent variable \(Bernoulli.*Marginalise"):
        bl.Posterior(model, y=np.zeros(3))


def test_enumerated_site_is_rejected(no_jit):
    def model(y):
        z = numpyro.sample("z", dist.Bernoulli(0.5), infer={"enumerate": "parallel"})
        numpyro.sample("y", dist.Normal(z, 1.0), obs=y)

    with pytest.raises(bl.ModelError, match="site 'z' asks for enumeration"):
        bl.Posterior(model, y=np.zeros(3))


def test_subsampling_is_rejected(no_jit):
    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0, 1))
        with numpyro.plate("data", 10, subsample_size=5) as idx:
            numpyro.sample("y", dist.Normal(mu, 1.0), obs=y[idx])

    with pytest.raises(bl.ModelError, match="plate 'data' subsamples"):
        bl.Posterior(model, y=np.zeros(10))


def test_no_latent_site(no_jit):
    def model(y):
        numpyro.sample("y", dist.Normal(0, 1.0), obs=y)

    with pytest.raises(bl.ModelError, match="no latent sample site"):
        bl.Posterior(model, y=np.zeros(3))


def improper_model(y):
    sigma = numpyro.sample("sigma", dist.ImproperUniform(dist.constraints.positive, (), ()))
    numpyro.sample("y", dist.Normal(0.0, sigma), obs=y)


def test_improper_prior_where_a_proper_one_is_needed(no_jit):
    post = bl.Posterior(improper_model, y=np.ones(3))  # fine for NUTS
    assert not post.has_proper_prior
    with pytest.raises(bl.ImproperPriorError, match=r"site\(s\) \['sigma'\].*improper"):
        post.prior_transform
    with pytest.raises(bl.ImproperPriorError, match="sample_prior needs a proper prior"):
        post.sample_prior(None, 10)


def test_no_inverse_cdf_for_unit_cube(no_jit):
    def model():
        numpyro.sample("L", dist.LKJCholesky(3, 2.0))

    post = bl.Posterior(model)
    with pytest.raises(bl.PriorTransformError, match="'L'"):
        post.prior_transform


def test_unknown_engine_and_options(no_jit):
    post = reference.get("normal_mean").posterior()
    with pytest.raises(bl.EngineError, match=r"unknown engine 'nutz'.*'nuts'"):
        bl.fit(post, "nutz")
    with pytest.raises(bl.EngineError, match=r"no option\(s\) \['num_sample'\].*num_samples"):
        bl.fit(post, "nuts", num_sample=10)
    with pytest.raises(bl.EngineError, match="target_accept=1.5"):
        bl.fit(post, "nuts", target_accept=1.5)
    with pytest.raises(bl.EngineError, match="num_chains=0"):
        bl.fit(post, bl.engines.NUTS(), num_chains=0)
    with pytest.raises(bl.EngineError, match="chain_method"):
        bl.engines.NUTS(chain_method="parallel-ish")
    with pytest.raises(bl.EngineError, match="needs a bayeslik.Posterior"):
        bl.fit(normal_model, "nuts")


def test_no_finite_starting_point():
    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0, 1))
        # a support that depends on mu is not checked at construction; y = 50 lies outside it
        # for every plausible mu, so the log-likelihood is -inf at every candidate start
        numpyro.sample("y", dist.Uniform(mu - 1e-3, mu + 1e-3), obs=y)

    post = bl.Posterior(model, y=np.array([50.0]))
    with pytest.raises(bl.InitializationError, match="no finite starting point.*log-likelihood -inf"):
        bl.fit(post, "nuts", num_warmup=10, num_samples=10, progress_bar=False, init_radius=2.0)
