r"""posteriordb reference posteriors as NumPyro programs, with their data and reference draws.

Thirty-one posteriors from `posteriordb <https://github.com/stan-dev/posteriordb>`_ (BSD-3-Clause,
commit ``28f8d3d6``), all with reference draws made by rstan. Their Stan code, data, reference draws
and info files are bundled under ``data/posteriordb/`` (see the README there). Each Stan model is
translated by hand into a NumPyro program with the same parameters (site names equal the Stan
names), the same constraints, the same priors and the same likelihood; :func:`names` lists them,
:func:`load` gives model, data and draws, :func:`check_against_reference` compares draws with the
reference, and ``NUTS_OPTIONS`` records any setting NUTS needs beyond its defaults. This module holds
six of them (below) and the loader; ``posteriordb_regression`` (earnings, kidiq, kidiq_with_mom_work,
mesquite, diamonds), ``posteriordb_extra`` (gp_regr, the two basketball drive HMMs) and
``posteriordb_ode`` (lotka_volterra, one_comp_mm_elim_abs, solved with diffrax) the rest. The six
here, their models and the models' sample sites:

* ``eight_schools-eight_schools_noncentered``: :func:`eight_schools_noncentered`: ``theta_trans[J]``,
  ``mu``, ``tau``, plus the deterministic ``theta[J]``;
* ``arK-arK``: :func:`arK`: ``alpha``, ``beta[K]``, ``sigma``;
* ``garch-garch11``: :func:`garch11`: ``mu``, ``alpha0``, ``alpha1``, ``beta1``;
* ``hmm_example-hmm_example``: :func:`hmm_example`: ``theta1[K]``, ``theta2[K]``, ``mu[K]``, plus the
  deterministic ``theta[K, K]``;
* ``low_dim_gauss_mix-low_dim_gauss_mix``: :func:`low_dim_gauss_mix`: ``mu[2]``, ``sigma[2]``,
  ``theta``;
* ``arma-arma11``: :func:`arma11`: ``mu``, ``phi``, ``theta``, ``sigma`` (observed site ``err``).

The first five models' observed site is ``y``.

**How the log density compares with Stan's.** Where a Stan parameter with a one-sided bound has a
prior ``x ~ cauchy(0, s)`` or ``x ~ normal(0, s)``, the NumPyro program uses the *normalised*
``HalfCauchy(s)`` / ``HalfNormal(s)``. Stan's ``cauchy_lpdf`` / ``normal_lpdf`` is not renormalised
to the half line, so the NumPyro log joint is Stan's full log density (all constants kept, no Jacobian)
plus ``log 2`` for each such scalar. This constant does not change the posterior, and it makes these
priors proper. ``load(name)["info"]["stan_lp_offset"]`` gives the constant: 0 for garch11 and
hmm_example, ``log 2`` for eight_schools_noncentered and arK, ``2 log 2`` for low_dim_gauss_mix. Every
other term matches Stan's exactly:

* implicit flat priors: flat on the real line or half line -> ``ImproperUniform`` (log density 0);
  flat on a fixed interval of length 1 -> ``Uniform`` (log density 0); flat on the simplex ->
  ``Dirichlet(1, ..., 1)`` (log density ``log (K-1)!``, which is 0 for K = 2);
* garch11's ``beta1`` lies in ``(0, 1 - alpha1)``, a bound that depends on another parameter. Its flat
  prior has log density 0 on that interval (a small flat distribution whose support is the bare
  ``interval`` constraint), **not** ``Uniform(0, 1 - alpha1)``: the Uniform would add
  ``-log(1 - alpha1)`` and change the posterior of ``alpha1``;
* normal priors on ``ordered`` / ``positive_ordered`` vectors are left unnormalised on the constrained
  set, as in Stan (the sample site's distribution is a product of normals restricted to that set).

Example
-------
>>> import jax
>>> from numpyro.infer import MCMC, NUTS
>>> from bayeslik.models import posteriordb
>>> post = posteriordb.load("eight_schools-eight_schools_noncentered")
>>> post["reference"]["tau"].shape                          # (chains, draws)
(10, 1000)
>>> mcmc = MCMC(NUTS(post["model"]), num_warmup=500, num_samples=500)    # doctest: +SKIP
>>> mcmc.run(jax.random.key(0), **post["data"])                          # doctest: +SKIP
>>> mcmc.get_samples()["tau"].mean(), post["reference"]["tau"].mean()    # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import re
import zipfile
from functools import lru_cache
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax import lax, random
from jax.scipy.special import logsumexp
from numpyro.distributions import constraints
from bayeslik.errors import DataError, ModelError

__all__ = [
    "DATA_DIR",
    "arK",
    "arma11",
    "eight_schools_noncentered",
    "garch11",
    "hmm_example",
    "load",
    "low_dim_gauss_mix",
    "names",
    "NUTS_OPTIONS",
    "check_against_reference",
    "check_length",
    "forward_logsumexp",
    "RestrictedNormal",
    "reference_params",
    "stan_code",
]

#: Folder holding the bundled posteriordb files (one sub-folder per posterior).
DATA_DIR = Path(__file__).resolve().parent / "data" / "posteriordb"

_SOURCE = (
    "github.com/stan-dev/posteriordb @ 28f8d3d6e975315f42aa274a8399f21e07a43b30, "
    "posterior_database/"
)
_LOG2 = math.log(2.0)


# --------------------------------------------------------------------------------------------------
# helper distributions
# --------------------------------------------------------------------------------------------------
class RestrictedNormal(dist.Distribution):
    r"""Independent normals restricted to a constrained set, **unnormalised** as in Stan.

    ``log_prob(x) = sum_i log N(x_i | loc_i, scale_i)`` for ``x`` in ``support`` (an event-dim-1
    constraint such as ``ordered_vector``). The mass of the support under the product normal is *not*
    divided out, which matches Stan's ``mu ~ normal(...)`` on an ``ordered`` / ``positive_ordered``
    parameter. ``sample`` draws from the normalised restricted distribution (rejection from the product
    normal), so a prior draw has the right distribution even though ``log_prob`` is off by a constant.
    """

    arg_constraints = {"loc": constraints.real_vector, "scale": constraints.positive}
    support = constraints.dependent  # replaced per instance in __init__
    pytree_data_fields = ("loc", "scale", "support")
    reparametrized_params = []

    def __init__(self, loc, scale, support, *, validate_args=None):
        loc = jnp.asarray(loc)
        self.loc, self.scale = jnp.broadcast_arrays(loc, jnp.asarray(scale, dtype=loc.dtype))
        self.support = support
        super().__init__(
            batch_shape=self.loc.shape[:-1],
            event_shape=self.loc.shape[-1:],
            validate_args=validate_args,
        )

    def log_prob(self, value):
        return jnp.sum(dist.Normal(self.loc, self.scale).log_prob(value), axis=-1)

    def sample(self, key, sample_shape=()):
        shape = tuple(sample_shape) + self.batch_shape + self.event_shape
        loc = jnp.broadcast_to(self.loc, shape)
        scale = jnp.broadcast_to(self.scale, shape)
        check = self.support.check

        def cond(state):
            return ~jnp.all(state[2])

        def body(state):
            key, x, done = state
            key, sub = random.split(key)
            proposal = loc + scale * random.normal(sub, shape, dtype=loc.dtype)
            accept = jnp.logical_and(~done, check(proposal))
            return key, jnp.where(accept[..., None], proposal, x), jnp.logical_or(done, accept)

        init = (key, jnp.zeros(shape, loc.dtype), jnp.zeros(shape[:-1], bool))
        return lax.while_loop(cond, body, init)[1]


class _FlatInterval(dist.Distribution):
    r"""Flat density 1 (log density 0) on ``(low, high)``: Stan's implicit prior for a bounded parameter.

    Unlike ``Uniform(low, high)`` the density is not divided by ``high - low``, which matters when
    the bounds depend on other parameters (garch11's ``beta1 < 1 - alpha1``). Unlike ``ImproperUniform``
    the support is the bare ``interval`` constraint, so NumPyro notices that the bounds are dynamic and
    replays the model when it maps unconstrained samples back (with ``ImproperUniform`` the interval is
    wrapped in ``independent(., 0)``; NumPyro 0.22 then reuses the transform of the first trace, and
    ``MCMC.get_samples()`` returns wrong values). ``sample`` draws uniformly on the interval.
    """

    arg_constraints = {"low": constraints.dependent, "high": constraints.dependent}
    support = constraints.dependent  # replaced per instance in __init__
    pytree_data_fields = ("low", "high", "support")
    reparametrized_params = ["low", "high"]

    def __init__(self, low, high, *, validate_args=None):
        self.low, self.high = jnp.broadcast_arrays(jnp.asarray(low), jnp.asarray(high))
        self.support = constraints.interval(self.low, self.high)
        super().__init__(batch_shape=jnp.shape(self.low), validate_args=validate_args)

    def log_prob(self, value):
        return jnp.zeros(jnp.broadcast_shapes(jnp.shape(value), self.batch_shape))

    def sample(self, key, sample_shape=()):
        shape = tuple(sample_shape) + self.batch_shape
        u = random.uniform(key, shape, dtype=jnp.result_type(self.low, float))
        return self.low + (self.high - self.low) * u


def forward_logsumexp(emission, log_trans):
    r"""Stan's forward algorithm with no initial distribution: ``emission`` (N, ..., K) the
    per-step emission log densities, ``log_trans[..., j, k]`` the log transition matrix;
    returns :math:`\operatorname{logsumexp}_k \gamma_N(k)` with :math:`\gamma_1 =` the first
    emission row (the hmm_example and basketball drive models share it)."""

    def step(gamma_prev, emission_t):
        gamma = logsumexp(gamma_prev[..., :, None] + log_trans, axis=-2) + emission_t
        return gamma, None

    gamma_last, _ = lax.scan(step, emission[0], emission[1:])
    return logsumexp(gamma_last, axis=-1)


class _StanForwardHMM(dist.Distribution):
    r"""Marginal density of ``y[1:N]`` in hmm_example.stan: Gaussian emissions with sd 1, states summed out.

    With transition matrix ``trans[j, k] = P(z_t = k | z_{t-1} = j)`` and emission means ``mu``:

    .. math::
        \gamma_1(k) = \log N(y_1 \mid \mu_k, 1), \qquad
        \gamma_t(k) = \operatorname{logsumexp}_j \big[\gamma_{t-1}(j) + \log \mathrm{trans}_{jk}\big]
                      + \log N(y_t \mid \mu_k, 1), \qquad
        \log p(y) = \operatorname{logsumexp}_k \gamma_N(k).

    As in the Stan code there is no initial-state distribution, so ``exp(log_prob)`` integrates to ``K``
    over ``y`` (it is ``K`` times an HMM with a uniform initial state). ``sample`` draws from that
    HMM (uniform initial state), which is the normalised version of the same density.
    """

    support = constraints.real_vector
    pytree_data_fields = ("trans", "mu")

    def __init__(self, trans, mu, num_steps, *, validate_args=None):
        self.trans = jnp.asarray(trans)
        self.mu = jnp.asarray(mu)
        batch_shape = jnp.broadcast_shapes(self.trans.shape[:-2], self.mu.shape[:-1])
        super().__init__(
            batch_shape=batch_shape, event_shape=(int(num_steps),), validate_args=validate_args
        )

    def log_prob(self, value):
        log_trans = jnp.log(self.trans)  # (..., K, K), [j, k]
        # emission log densities, time axis first: (N, ..., K)
        emission = dist.Normal(self.mu, 1.0).log_prob(jnp.moveaxis(value, -1, 0)[..., None])
        return forward_logsumexp(emission, log_trans)

    def sample(self, key, sample_shape=()):
        shape = tuple(sample_shape) + self.batch_shape
        num_states = self.mu.shape[-1]
        log_trans = jnp.broadcast_to(jnp.log(self.trans), shape + (num_states, num_states))
        mu = jnp.broadcast_to(self.mu, shape + (num_states,))
        key_init, key_path, key_noise = random.split(key, 3)
        z_first = random.randint(key_init, shape, 0, num_states)

        def step(z_prev, k):
            rows = jnp.take_along_axis(log_trans, z_prev[..., None, None], axis=-2)[..., 0, :]
            z = random.categorical(k, rows)
            return z, z

        _, z_rest = lax.scan(step, z_first, random.split(key_path, self.event_shape[0] - 1))
        z = jnp.concatenate([z_first[..., None], jnp.moveaxis(z_rest, 0, -1)], axis=-1)
        means = jnp.take_along_axis(mu, z, axis=-1)
        return means + random.normal(key_noise, means.shape, dtype=mu.dtype)


def check_length(value, length, what):
    """Raise a DataError naming ``what`` when ``value`` (if given) does not have ``length`` rows:
    the models' check of a Stan data block's declared sizes."""
    if value is not None and np.shape(value)[0] != length:
        raise DataError(f"{what} has length {np.shape(value)[0]}, expected {length}")


# --------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------
def eight_schools_noncentered(J, y=None, sigma=None):
    r"""Eight schools, non-centred parametrisation (``eight_schools_noncentered.stan``).

    .. math::
        \tilde\theta_j \sim N(0, 1), \quad \mu \sim N(0, 5), \quad
        \tau \sim \mathrm{Cauchy}^+(0, 5), \quad
        \theta_j = \mu + \tau\,\tilde\theta_j, \quad y_j \sim N(\theta_j, \sigma_j),
        \qquad j = 1, \dots, J.

    Sample sites ``theta_trans`` (J,), ``mu``, ``tau`` (> 0); deterministic ``theta`` (J,); observed
    ``y`` (J,). ``tau`` has a ``HalfCauchy(5)`` prior: this is Stan's ``cauchy(0, 5)`` on
    ``real<lower=0>``, normalised on the half line (log density higher by ``log 2``).

    Args:
        J: number of schools.
        y: estimated treatment effects (J,), or ``None`` to sample them.
        sigma: standard errors of the effects (J,), required.

    Example:
        >>> post = load("eight_schools-eight_schools_noncentered")
        >>> numpyro.infer.util.log_density(post["model"], (), post["data"],
        ...     {"theta_trans": jnp.zeros(8), "mu": 4.0, "tau": 3.0})[0]    # doctest: +SKIP
    """
    if sigma is None:
        raise DataError("eight_schools_noncentered needs sigma (the J standard errors)")
    check_length(y, J, "y")
    check_length(sigma, J, "sigma")
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("school", J):
        theta_trans = numpyro.sample("theta_trans", dist.Normal(0.0, 1.0))
        theta = numpyro.deterministic("theta", theta_trans * tau + mu)
        numpyro.sample("y", dist.Normal(theta, jnp.asarray(sigma)), obs=y)


def arK(K, T, y):
    r"""Autoregressive model of order K (``arK.stan``).

    .. math::
        \alpha \sim N(0, 10), \quad \beta_k \sim N(0, 10), \quad \sigma \sim \mathrm{Cauchy}^+(0, 2.5),
        \quad y_t \sim N\Big(\alpha + \sum_{k=1}^{K} \beta_k\, y_{t-k},\ \sigma\Big),
        \qquad t = K+1, \dots, T.

    The first K observations are conditioned on, not modelled. Sample sites ``alpha``, ``beta`` (K,),
    ``sigma`` (> 0). Observed site ``y`` holds ``y[K:]`` (T - K values). ``sigma`` has a
    ``HalfCauchy(2.5)`` prior (Stan's ``cauchy(0, 2.5)`` on ``real<lower=0>``, normalised: log density
    higher by ``log 2``). The conditional means depend only on observed data, so they come from one
    gather of the lagged observations, not from a recursion.

    Args:
        K: order of the autoregression.
        T: length of the series.
        y: the series (T,), required (the model conditions on its lags).

    Example:
        >>> post = load("arK-arK")
        >>> post["data"]["K"], post["data"]["y"].shape
        (5, (200,))
    """
    y = jnp.asarray(y)
    check_length(y, T, "y")
    alpha = numpyro.sample("alpha", dist.Normal(0.0, 10.0))
    with numpyro.plate("lag", K):
        beta = numpyro.sample("beta", dist.Normal(0.0, 10.0))
    sigma = numpyro.sample("sigma", dist.HalfCauchy(2.5))
    # lags[i, k - 1] = y[t - k] for t = K + i (0-based), k = 1..K
    lags = y[jnp.arange(K, T)[:, None] - jnp.arange(1, K + 1)[None, :]]
    mean = alpha + lags @ beta
    with numpyro.plate("time", T - K):
        numpyro.sample("y", dist.Normal(mean, sigma), obs=y[K:])


def garch11(T, y, sigma1):
    r"""GARCH(1, 1) model (``garch11.stan``).

    .. math::
        \sigma_1 = \texttt{sigma1}, \quad
        \sigma_t^2 = \alpha_0 + \alpha_1 (y_{t-1} - \mu)^2 + \beta_1 \sigma_{t-1}^2 \ (t \ge 2),
        \quad y_t \sim N(\mu, \sigma_t), \qquad t = 1, \dots, T,

    with the constraints and implicit flat priors of the Stan program: :math:`\mu \in \mathbb R`
    (``ImproperUniform``), :math:`\alpha_0 > 0` (``ImproperUniform`` on the half line),
    :math:`\alpha_1 \in (0, 1)` (``Uniform(0, 1)``, log density 0),
    :math:`\beta_1 \in (0, 1 - \alpha_1)` (flat with log density 0 on that interval; not
    ``Uniform(0, 1 - alpha1)``, whose ``-log(1 - alpha1)`` would change the posterior). The prior is
    improper, so prior predictive sampling is not possible. The variance recursion is a ``lax.scan``.

    Args:
        T: length of the series.
        y: the series (T,), required.
        sigma1: the fixed volatility of the first observation.

    Example:
        >>> post = load("garch-garch11")
        >>> sorted(post["reference"])
        ['alpha0', 'alpha1', 'beta1', 'mu']
    """
    y = jnp.asarray(y)
    check_length(y, T, "y")
    mu = numpyro.sample("mu", dist.ImproperUniform(constraints.real, (), ()))
    alpha0 = numpyro.sample("alpha0", dist.ImproperUniform(constraints.positive, (), ()))
    alpha1 = numpyro.sample("alpha1", dist.Uniform(0.0, 1.0))
    beta1 = numpyro.sample("beta1", _FlatInterval(0.0, 1.0 - alpha1))

    def step(var_prev, y_prev):
        var = alpha0 + alpha1 * jnp.square(y_prev - mu) + beta1 * var_prev
        return var, var

    # the scan carry takes the shape and dtype of the parameters
    var_first = jnp.square(jnp.asarray(sigma1, dtype=y.dtype)) + jnp.zeros_like(alpha0 + beta1)
    _, var_rest = lax.scan(step, var_first, y[:-1])
    sigma = jnp.sqrt(jnp.concatenate([var_first[None], var_rest]))
    with numpyro.plate("time", T):
        numpyro.sample("y", dist.Normal(mu, sigma), obs=y)


def hmm_example(N, K, y=None):
    r"""Two-state hidden Markov model with Gaussian emissions (``hmm_example.stan``).

    .. math::
        \theta_1, \theta_2 \sim \text{flat on the simplex}, \quad
        \mu \in \{0 < \mu_1 < \mu_2\}, \ \ \mu_1 \sim N(3, 1),\ \mu_2 \sim N(10, 1), \\
        z_t \mid z_{t-1} = j \sim \mathrm{Categorical}(\theta_j), \quad
        y_t \mid z_t = k \sim N(\mu_k, 1),

    with the states :math:`z_{1:N}` summed out exactly by the forward algorithm (``logsumexp`` in a
    ``lax.scan``), as in the Stan code. As in Stan, there is no initial-state distribution:
    :math:`\log p(y) = \operatorname{logsumexp}_k \gamma_N(k)` with
    :math:`\gamma_1(k) = \log N(y_1 \mid \mu_k, 1)`.

    Sample sites ``theta1``, ``theta2`` (K,) on the simplex with ``Dirichlet(1, 1)`` priors (density 1,
    the same as Stan's flat prior), ``mu`` (K,) positive-ordered with the unnormalised normal priors
    above; deterministic ``theta`` (K, K) with ``theta[j] = theta{j+1}`` (transition matrix, rows =
    current state); observed ``y`` (N,). The Stan program hard-codes two states, so ``K`` must be 2.

    Args:
        N: number of observations.
        K: number of states (must be 2).
        y: observations (N,), or ``None`` to sample them given the parameters.

    Example:
        >>> post = load("hmm_example-hmm_example")
        >>> post["reference"]["mu"].shape
        (10, 1000, 2)
    """
    if K != 2:
        raise ModelError("hmm_example.stan hard-codes K = 2 states (theta[1], theta[2], mu[1], mu[2])")
    check_length(y, N, "y")
    theta1 = numpyro.sample("theta1", dist.Dirichlet(jnp.ones(K)))
    theta2 = numpyro.sample("theta2", dist.Dirichlet(jnp.ones(K)))
    mu = numpyro.sample(
        "mu", RestrictedNormal(jnp.array([3.0, 10.0]), 1.0, constraints.positive_ordered_vector)
    )
    theta = numpyro.deterministic("theta", jnp.stack([theta1, theta2]))
    numpyro.sample("y", _StanForwardHMM(theta, mu, N), obs=y)


def low_dim_gauss_mix(N, y=None):
    r"""Two-component Gaussian mixture (``low_dim_gauss_mix.stan``).

    .. math::
        \mu \in \{\mu_1 < \mu_2\},\ \ \mu_i \sim N(0, 2), \quad \sigma_i \sim N^+(0, 2), \quad
        \theta \sim \mathrm{Beta}(5, 5), \\
        y_n \sim \theta\, N(\mu_1, \sigma_1) + (1 - \theta)\, N(\mu_2, \sigma_2), \qquad n = 1, \dots, N.

    Sample sites ``mu`` (2,) ordered (normal prior unnormalised on the ordered set, as in Stan),
    ``sigma`` (2,) > 0 with ``HalfNormal(2)`` priors (Stan's ``normal(0, 2)`` on ``real<lower=0>``,
    normalised: log density higher by ``2 log 2`` in all), ``theta`` in (0, 1); observed ``y`` (N,),
    a ``MixtureSameFamily``, the same as Stan's ``log_mix``.

    Args:
        N: number of observations.
        y: observations (N,), or ``None`` to sample them.

    Example:
        >>> post = load("low_dim_gauss_mix-low_dim_gauss_mix")
        >>> post["data"]["N"]
        1000
    """
    check_length(y, N, "y")
    mu = numpyro.sample("mu", RestrictedNormal(jnp.zeros(2), 2.0, constraints.ordered_vector))
    with numpyro.plate("component", 2):
        sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
    theta = numpyro.sample("theta", dist.Beta(5.0, 5.0))
    weights = dist.Categorical(logits=jnp.stack([jnp.log(theta), jnp.log1p(-theta)]))
    with numpyro.plate("data", N):
        numpyro.sample("y", dist.MixtureSameFamily(weights, dist.Normal(mu, sigma)), obs=y)


def arma11(T, y):
    r"""ARMA(1, 1) model (``arma11.stan``).

    .. math::
        \mu \sim N(0, 10), \quad \phi \sim N(0, 2), \quad \theta \sim N(0, 2), \quad
        \sigma \sim \mathrm{Cauchy}^+(0, 2.5), \\
        \nu_1 = \mu + \phi\mu, \quad \nu_t = \mu + \phi\, y_{t-1} + \theta\, \epsilon_{t-1}, \quad
        \epsilon_t = y_t - \nu_t, \quad \epsilon_t \sim N(0, \sigma), \qquad t = 1, \dots, T.

    ``phi`` and ``theta`` are unbounded, as in the Stan code: with :math:`|\theta| > 1` the error
    recursion grows like :math:`\theta^T` (200 steps), so the log density is astronomically low
    there (or overflows in float32). A chain started out there must find its way back; this is the
    posterior on which a warmup that does not re-find its step size after each metric update gets
    stuck. Sample sites ``mu``, ``phi``, ``theta``, ``sigma`` (> 0, ``HalfCauchy(2.5)``: Stan's
    ``cauchy(0, 2.5)`` normalised on the half line, log density higher by ``log 2``). The observed
    site ``err`` is the vector of one-step errors (a deterministic function of ``y`` and the
    parameters), as in the Stan program, so the likelihood is Stan's exactly.

    Args:
        T: length of the series.
        y: the series (T,), required.

    Example:
        >>> post = load("arma-arma11")
        >>> post["data"]["T"]
        200
    """
    y = jnp.asarray(y)
    check_length(y, T, "y")
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    phi = numpyro.sample("phi", dist.Normal(0.0, 2.0))
    theta = numpyro.sample("theta", dist.Normal(0.0, 2.0))
    sigma = numpyro.sample("sigma", dist.HalfCauchy(2.5))

    def step(err_prev, t):
        err = y[t] - (mu + phi * y[t - 1] + theta * err_prev)
        return err, err

    err_first = y[0] - (mu + phi * mu)
    _, err_rest = lax.scan(step, err_first, jnp.arange(1, T))
    err = jnp.concatenate([err_first[None], err_rest])
    with numpyro.plate("time", T):
        numpyro.sample("err", dist.Normal(0.0, sigma), obs=err)


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------
_MODELS = {
    "eight_schools-eight_schools_noncentered": (eight_schools_noncentered, _LOG2),
    "arK-arK": (arK, _LOG2),
    "garch-garch11": (garch11, 0.0),
    "hmm_example-hmm_example": (hmm_example, 0.0),
    "low_dim_gauss_mix-low_dim_gauss_mix": (low_dim_gauss_mix, 2.0 * _LOG2),
    "arma-arma11": (arma11, _LOG2),
}

_DRAW_NAME = re.compile(r"^([A-Za-z_]\w*)(?:\[(\d+(?:,\d+)*)\])?$")


def names() -> list[str]:
    """The posteriordb names of the bundled posteriors, e.g. ``"arK-arK"``."""
    return list(_MODELS)


def _resolve(name: str) -> str:
    if name in _MODELS:
        return name
    matches = [p for p in _MODELS if name in p.split("-")]  # model or data name alone
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise KeyError(f"{name!r} names {len(matches)} posteriors ({matches}); give the full "
                       "posterior name")
    raise KeyError(f"unknown posterior {name!r}; choose one of {names()}")


@lru_cache(maxsize=None)
def _posterior_meta(name: str) -> dict:
    return json.loads((DATA_DIR / name / "posterior.json").read_text())


def stan_code(name: str) -> str:
    """The bundled Stan source of a posterior's model."""
    name = _resolve(name)
    return (DATA_DIR / name / f"{_posterior_meta(name)['model_name']}.stan").read_text()


def _load_data(name: str) -> dict:
    raw = json.loads((DATA_DIR / name / f"{_posterior_meta(name)['data_name']}.json").read_text())
    data = {}
    for key, value in raw.items():
        if isinstance(value, list):
            data[key] = np.asarray(value, dtype=np.float64)  # all bundled array data are Stan reals
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DataError(f"unexpected data entry {key!r} in {name}")
        else:
            data[key] = value  # int stays int (sizes), float stays float
    return data


@lru_cache(maxsize=None)
def _load_reference(name: str) -> dict:
    with zipfile.ZipFile(DATA_DIR / name / f"{name}.draws.json.zip") as archive:
        chains = json.loads(archive.read(f"{name}.json"))
    columns: dict[str, dict[tuple[int, ...], np.ndarray]] = {}
    for flat_name in chains[0]:
        match = _DRAW_NAME.match(flat_name)
        if match is None:
            raise DataError(f"cannot parse draw name {flat_name!r} in {name}")
        base, index = match.group(1), match.group(2)
        key = tuple(int(i) - 1 for i in index.split(",")) if index else ()
        columns.setdefault(base, {})[key] = np.array([c[flat_name] for c in chains], np.float64)
    reference = {}
    for base, parts in columns.items():
        shape = tuple(max(k[d] for k in parts) + 1 for d in range(len(next(iter(parts)))))
        if len(parts) != math.prod(shape):
            raise DataError(f"{name}: draws of {base} do not fill a {shape} array")
        first = next(iter(parts.values()))
        array = np.empty(first.shape + shape, np.float64)
        for key, column in parts.items():
            array[(Ellipsis, *key)] = column
        array.setflags(write=False)
        reference[base] = array
    return reference


def load(name: str) -> dict:
    """Load one posterior: NumPyro model, data, reference draws and a short info dict.

    Args:
        name: a posteriordb posterior name from :func:`names` (``"garch-garch11"``), or its model or data
            name alone (``"garch11"``).

    Returns:
        ``{"model": fn, "data": dict, "reference": dict, "info": dict}``:

        * ``model``: the NumPyro program; call it as ``model(**data)``;
        * ``data``: keyword arguments named as in posteriordb (sizes as ``int``, arrays as float64
          NumPy arrays);
        * ``reference``: Stan parameter (or transformed parameter) name -> float64 array of shape
          ``(chains, draws, *shape)``, i.e. ``(10, 1000, ...)``; flattened entries like ``theta[1]`` are
          reassembled. For the eight schools this holds ``theta`` (not ``theta_trans``); use
          :func:`reference_params` for the values of the sample sites;
        * ``info``: ``name``, ``model_name``, ``data_name``, ``source``, ``licence`` and
          ``stan_lp_offset`` (NumPyro log joint minus Stan's full log density; see the module docs).

    Example:
        >>> post = load("arK-arK")
        >>> post["reference"]["beta"].shape
        (10, 1000, 5)
    """
    name = _resolve(name)
    model, offset = _MODELS[name]
    meta = _posterior_meta(name)
    return {
        "model": model,
        "data": _load_data(name),
        "reference": {k: v.copy() for k, v in _load_reference(name).items()},
        "info": {
            "name": name,
            "model_name": meta["model_name"],
            "data_name": meta["data_name"],
            "source": _SOURCE,
            "licence": "BSD-3-Clause",
            "stan_lp_offset": offset,
        },
    }


def reference_params(name: str, reference: dict | None = None) -> dict:
    """Reference draws as values of the model's sample sites (constrained), ``(chains, draws, ...)``.

    The same as ``load(name)["reference"]`` except for the eight schools, where the sample site
    ``theta_trans = (theta - mu) / tau`` takes the place of the transformed parameter ``theta``. Slice
    out one draw (``{k: v[c, d] for k, v in ...items()}``) to pass it to
    ``numpyro.infer.util.log_density``.
    """
    name = _resolve(name)
    ref = dict(load(name)["reference"] if reference is None else reference)
    if name == "eight_schools-eight_schools_noncentered":
        theta = ref.pop("theta")
        ref["theta_trans"] = (theta - ref["mu"][..., None]) / ref["tau"][..., None]
    return ref



#: NUTS settings a posterior needs beyond the defaults (4 chains x 1000 warmup + 1000 draws,
#: target_accept 0.8, diagonal metric), with the reason. Empty entries pass at defaults.
NUTS_OPTIONS: dict[str, dict] = {
    # log(height) is about 4.1 +- 0.05: the intercept and its slope are correlated beyond 0.999,
    # so a diagonal metric needs step sizes of 0.008 and hits max_tree_depth (362 of 4000
    # iterations, float32, seed 0); a dense one takes steps of 0.7 at depth 2-3
    "earnings-logearn_logheight_male": {"dense_mass": True},
    # brms's diamonds regression (24 correlated coefficients), the standard example for dense
    # metric adaptation: diagonal 211 s with tree-depth hits, dense 30 s and clean
    "diamonds-diamonds": {"dense_mass": True},
    # mom_iq uncentred (about 100) with an interaction: diagonal step sizes 0.03, trees of depth
    # 6-8, and R-hat 1.02 in float64 at seed 0; dense: step 0.7, depth 2-3, clean in both dtypes
    "kidiq-kidscore_interaction": {"dense_mass": True},
    # the funnel of the non-centred eight schools still gives an occasional divergence at
    # target_accept 0.8 (1 in 4000 in float32, seed 0); 0.9 is the usual setting for it
    "eight_schools-eight_schools_noncentered": {"target_accept": 0.9},
    # K_m and V_m have very heavy right tails (K_m: sd 7.3, maximum 296 in the reference) along a
    # ridge; at defaults 5 divergences and tail ESS 265 (float64, seed 0). The reference needed
    # adapt_delta 0.99 and max treedepth 20 in Stan; here 0.99, depth 12 and 4000 draws a chain
    # (60 s float64, 42 s float32, clean)
    "one_comp_mm_elim_abs-one_comp_mm_elim_abs": {"target_accept": 0.99, "max_tree_depth": 12,
                                                  "num_samples": 4000},
}


def check_against_reference(name: str, draws: dict, reference: dict | None = None, *,
                            k: float = 4.0, sd_tol: float = 0.10) -> dict:
    """Compare draws ``{site: (chain, draw, ...)}`` with the posterior's reference draws.

    For every scalar element of every reference parameter: ``z`` = |our mean - reference mean|
    / sqrt(our MCSE^2 + reference MCSE^2), both MCSEs from ArviZ (``arviz_stats.mcse``, method
    "mean"), and the ratio of the standard deviations. An element passes when ``z < k`` and its
    sd ratio lies within ``sd_tol`` of 1, or, where the sd itself is too noisy for that, when the
    sds differ by less than ``k`` combined MCSEs of the sd (method "sd"). The second clause only
    matters for heavy tails: one_comp_mm_elim_abs's K_m has a reference sd of 7.3 with an MCSE
    of 0.84 (11%), and the two halves of the reference's own chains give 5.7 and 8.6.

    Returns ``{"passed", "worst_z", "worst_z_param", "worst_sd_ratio", "worst_sd_param", "z",
    "sd_ratio", "sd_z"}``; ``worst_sd_ratio`` is the ratio farthest from 1 among the elements
    that fail the 10% rule (or among all when none fails it).
    """
    import arviz_base as azb
    import arviz_stats as azs

    ref = load(name)["reference"] if reference is None else reference
    ours = {key: np.asarray(draws[key], dtype=np.float64) for key in ref}

    def mcse(d, method):
        out = azs.mcse(azb.from_dict({"posterior": d}), group="posterior", method=method)
        return {key: np.asarray(out[key]) for key in d}

    m_ref, m_ours = mcse(ref, "mean"), mcse(ours, "mean")
    s_ref, s_ours = mcse(ref, "sd"), mcse(ours, "sd")
    z, ratio, sd_z, ok = {}, {}, {}, True
    for key, r in ref.items():
        rf = r.reshape((-1,) + r.shape[2:])
        of = ours[key].reshape((-1,) + r.shape[2:])
        z[key] = np.atleast_1d(np.abs(of.mean(0) - rf.mean(0))
                               / np.sqrt(m_ours[key] ** 2 + m_ref[key] ** 2))
        ratio[key] = np.atleast_1d(of.std(0) / rf.std(0))
        sd_z[key] = np.atleast_1d(np.abs(of.std(0) - rf.std(0))
                                  / np.sqrt(s_ours[key] ** 2 + s_ref[key] ** 2))
        sd_ok = (np.abs(ratio[key] - 1) < sd_tol) | (sd_z[key] < k)
        ok = ok and bool(np.all(z[key] < k)) and bool(np.all(sd_ok))
    wz = max(z, key=lambda key: np.nanmax(z[key]))
    wr = max(ratio, key=lambda key: np.nanmax(np.abs(ratio[key] - 1)))
    worst_ratio = ratio[wr].flat[int(np.nanargmax(np.abs(ratio[wr] - 1)))]
    return {"passed": ok, "worst_z": float(np.nanmax(z[wz])), "worst_z_param": wz,
            "worst_sd_ratio": float(worst_ratio), "worst_sd_param": wr, "z": z,
            "sd_ratio": ratio, "sd_z": sd_z}


# the rest of the corpus lives in sibling modules (each exposes MODELS = {name: (fn, offset)});
# imported last so that they can use the helper distributions above
def _register_corpus() -> None:
    from bayeslik.models import posteriordb_extra, posteriordb_ode, posteriordb_regression

    for module in (posteriordb_regression, posteriordb_extra, posteriordb_ode):
        _MODELS.update(module.MODELS)


_register_corpus()
