r"""Three more posteriordb posteriors as NumPyro programs: a GP regression and two basketball HMMs.

Part of the posteriordb corpus of :mod:`bayeslik.models.posteriordb` (same source commit, same
conventions, loaded with ``posteriordb.load(name)``). The Stan code, data, reference draws and info
files are bundled under ``data/posteriordb/<posterior>/``. Posteriors, their models and the models'
sites:

* ``gp_pois_regr-gp_regr``: :func:`gp_regr`: ``rho``, ``alpha``, ``sigma``; observed ``y`` (N,);
* ``bball_drive_event_0-hmm_drive_0``: :func:`hmm_drive_0` (exponential emissions): ``theta1[2]``,
  ``theta2[2]``, ``phi[2]``, ``lambda[2]``, deterministic ``theta[2, 2]``; observed ``uv`` (N, 2);
* ``bball_drive_event_1-hmm_drive_1``: :func:`hmm_drive_1` (normal emissions): the same sites.

The HMMs emit two series per time step, ``u`` (inverse speed) and ``v`` (distance to the hoop), which
are not independent given the parameters once the states are summed out. So they form one observed
site ``uv`` with value ``stack([u, v], -1)``; the programs take ``u`` and ``v`` as in the Stan data
and build it. For prior predictive simulation pass ``u=None, v=None``; the simulated pair is
``samples["uv"][..., 0]`` (u) and ``samples["uv"][..., 1]`` (v).

**How the log density compares with Stan's** (``stan_lp_offset`` = NumPyro log joint minus Stan's full
log density, all constants kept, no Jacobian, at any constrained point):

* ``gp_pois_regr-gp_regr``: ``2 log 2``. ``alpha ~ normal(0, 2)`` and ``sigma ~ normal(0, 1)`` on
  ``real<lower=0>`` become the half-line-normalised ``HalfNormal(2)`` and ``HalfNormal(1)`` (each
  ``log 2`` above Stan's ``normal_lpdf``); ``rho ~ gamma(25, 4)`` is ``Gamma(25, rate=4)``, equal;
* ``bball_drive_event_0-hmm_drive_0`` and ``bball_drive_event_1-hmm_drive_1``: ``0``. The
  ``dirichlet_lpdf`` terms are NumPyro's normalised ``Dirichlet``; the normal priors on the
  (positive-)ordered ``phi`` and ``lambda`` are left unnormalised on the ordered set, as in Stan
  (``RestrictedNormal``); the emission and forward-algorithm terms are equal.

Example
-------
>>> from bayeslik.models import posteriordb
>>> post = posteriordb.load("bball_drive_event_0-hmm_drive_0")
>>> post["reference"]["phi"].shape
(10, 1000, 2)
>>> post["data"]["alpha"].shape
(2, 2)
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from jax import lax, random
from numpyro.distributions import constraints

from bayeslik.errors import DataError, ModelError

__all__ = ["MODELS", "gp_regr", "hmm_drive_0", "hmm_drive_1"]


# --------------------------------------------------------------------------------------------------
# helper distribution
# --------------------------------------------------------------------------------------------------
class _ForwardHMM(dist.Distribution):
    r"""Marginal density of an HMM's observations with the states summed out, as the Stan forward loop.

    ``trans[..., j, k] = P(z_t = k | z_{t-1} = j)``; ``emission`` is a distribution with batch shape
    ``(..., K)`` (one emission law per state) and event shape ``(D,)``; the value has shape
    ``(..., N, D)``. With :math:`e_t(k) = \log p(x_t \mid z_t = k)`:

    .. math::
        \gamma_1(k) = e_1(k), \qquad
        \gamma_t(k) = \operatorname{logsumexp}_j \big[\gamma_{t-1}(j) + \log \mathrm{trans}_{jk}\big]
                      + e_t(k), \qquad
        \log p(x_{1:N}) = \operatorname{logsumexp}_k \gamma_N(k),

    computed in a ``lax.scan``. As in the Stan code there is no initial-state distribution, so
    ``exp(log_prob)`` integrates to ``K`` (it is ``K`` times the HMM with a uniform initial state).
    ``sample`` draws from that HMM (uniform initial state), the normalised version of the same density.
    """

    arg_constraints = {"trans": constraints.dependent}
    support = constraints.dependent  # replaced per instance in __init__
    pytree_data_fields = ("trans", "emission", "support")

    def __init__(self, trans, emission, num_steps, *, validate_args=None):
        if len(emission.event_shape) != 1:
            raise ModelError("the emission distribution must have event shape (D,)")
        self.trans = jnp.asarray(trans)
        self.emission = emission
        self.support = constraints.independent(emission.support, 1)
        batch_shape = jnp.broadcast_shapes(self.trans.shape[:-2], emission.batch_shape[:-1])
        super().__init__(
            batch_shape=batch_shape,
            event_shape=(int(num_steps),) + tuple(emission.event_shape),
            validate_args=validate_args,
        )

    def log_prob(self, value):
        log_trans = jnp.log(self.trans)  # (..., K, K), [j, k]
        # emission log densities, time axis first: (N, ..., K)
        emission = self.emission.log_prob(jnp.moveaxis(value, -2, 0)[..., None, :])
        return forward_logsumexp(emission, log_trans)

    def sample(self, key, sample_shape=()):
        shape = tuple(sample_shape) + self.batch_shape
        num_steps = self.event_shape[0]
        num_states = self.trans.shape[-1]
        log_trans = jnp.broadcast_to(jnp.log(self.trans), shape + (num_states, num_states))
        key_init, key_path, key_emit = random.split(key, 3)
        z_first = random.randint(key_init, shape, 0, num_states)

        def step(z_prev, k):
            rows = jnp.take_along_axis(log_trans, z_prev[..., None, None], axis=-2)[..., 0, :]
            z = random.categorical(k, rows)
            return z, z

        _, z_rest = lax.scan(step, z_first, random.split(key_path, num_steps - 1))
        z = jnp.concatenate([z_first[None], z_rest])  # (N, *shape)
        # one emission draw per time and state, then pick the state's: (N, *shape, K, D) -> (N, *shape, D)
        emission = self.emission.expand(shape + (num_states,))
        draws = emission.sample(key_emit, (num_steps,))
        picked = jnp.take_along_axis(draws, z[..., None, None], axis=-2)[..., 0, :]
        return jnp.moveaxis(picked, 0, -2)


def _hmm_priors(K, alpha, loc, support):
    """theta1, theta2 ~ Dirichlet(alpha[0]), Dirichlet(alpha[1]); phi, lambda ~ ordered normals."""
    if K != 2:
        raise ModelError(
            "the hmm_drive Stan programs hard-code K = 2 states (theta[1] = theta1, theta[2] = theta2)"
        )
    if alpha is None:
        raise DataError("the hmm_drive models need alpha (the K x K Dirichlet parameters)")
    alpha = jnp.asarray(alpha)
    if alpha.shape != (K, K):
        raise DataError(f"alpha has shape {alpha.shape}, expected {(K, K)}")
    theta1 = numpyro.sample("theta1", dist.Dirichlet(alpha[0]))
    theta2 = numpyro.sample("theta2", dist.Dirichlet(alpha[1]))
    loc = jnp.asarray(loc)
    phi = numpyro.sample("phi", RestrictedNormal(loc, 1.0, support))
    lam = numpyro.sample("lambda", RestrictedNormal(loc, 1.0, support))
    theta = numpyro.deterministic("theta", jnp.stack([theta1, theta2]))
    return theta, phi, lam


def _hmm_observations(N, u, v):
    if (u is None) != (v is None):
        raise DataError("give both u and v (or neither, to simulate them)")
    if u is None:
        return None
    check_length(u, N, "u")
    check_length(v, N, "v")
    return jnp.stack([jnp.asarray(u), jnp.asarray(v)], axis=-1)


# --------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------
def gp_regr(N, x, y=None, k=None):
    r"""Gaussian-process regression with an exponentiated-quadratic kernel (``gp_regr.stan``).

    .. math::
        \rho \sim \mathrm{Gamma}(25, 4)\ \text{(shape, rate)}, \quad \alpha \sim N^+(0, 2), \quad
        \sigma \sim N^+(0, 1), \\
        \Sigma_{ij} = \alpha^2 \exp\!\Big(-\frac{(x_i - x_j)^2}{2\rho^2}\Big) + \sigma\,\delta_{ij},
        \quad y \sim N(0, \Sigma) \ \text{(via its Cholesky factor)}.

    Note that, as in the Stan code (``diag_matrix(rep_vector(sigma, N))``), the noise term on the
    diagonal is :math:`\sigma`, not :math:`\sigma^2`. No jitter is added: :math:`\sigma > 0` already
    keeps :math:`\Sigma` positive definite.

    Sample sites ``rho``, ``alpha``, ``sigma`` (all > 0); observed ``y`` (N,), a
    ``MultivariateNormal`` with ``scale_tril = cholesky(Sigma)``. ``alpha`` and ``sigma`` have
    ``HalfNormal(2)`` and ``HalfNormal(1)`` priors (Stan's ``normal`` on ``real<lower=0>``, normalised
    on the half line: log density higher by ``2 log 2`` in all).

    Args:
        N: number of observations.
        x: inputs (N,).
        y: outputs (N,), or ``None`` to sample them.
        k: ignored. The bundled data set ``gp_pois_regr`` also holds counts ``k`` for a Poisson
            variant of the model; ``gp_regr.stan`` does not use them.

    Example:
        >>> from bayeslik.models import posteriordb
        >>> post = posteriordb.load("gp_pois_regr-gp_regr")
        >>> post["data"]["N"], post["data"]["x"].shape
        (11, (11,))
    """
    del k  # data of the Poisson variant, unused by gp_regr.stan
    x = jnp.asarray(x)
    check_length(x, N, "x")
    check_length(y, N, "y")
    rho = numpyro.sample("rho", dist.Gamma(25.0, 4.0))
    alpha = numpyro.sample("alpha", dist.HalfNormal(2.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    diff = x[:, None] - x[None, :]
    cov = alpha**2 * jnp.exp(-0.5 * diff**2 / rho**2) + sigma * jnp.eye(N, dtype=x.dtype)
    scale_tril = jnp.linalg.cholesky(cov)
    numpyro.sample("y", dist.MultivariateNormal(jnp.zeros(N, x.dtype), scale_tril=scale_tril), obs=y)


def hmm_drive_0(K, N, u=None, v=None, alpha=None):
    r"""Two-state basketball "drive" HMM with exponential emissions (``hmm_drive_0.stan``).

    .. math::
        \theta_k \sim \mathrm{Dirichlet}(\alpha_{k,\cdot}) \ (k = 1, 2), \quad
        \phi, \lambda \in \{0 < x_1 < x_2\}, \ \ \phi_1, \lambda_1 \sim N(0, 1),\
        \phi_2, \lambda_2 \sim N(3, 1), \\
        z_t \mid z_{t-1} = j \sim \mathrm{Categorical}(\theta_j), \quad
        u_t \mid z_t = k \sim \mathrm{Exponential}(\phi_k), \quad
        v_t \mid z_t = k \sim \mathrm{Exponential}(\lambda_k)

    (rates, as Stan's ``exponential_lpdf(u | phi)``; ``u`` and ``v`` independent given the state),
    with the states :math:`z_{1:N}` summed out exactly by the forward algorithm (``logsumexp`` in a
    ``lax.scan``), as in the Stan code, with no initial-state distribution:
    :math:`\gamma_1(k) = \log p(u_1, v_1 \mid k)`, :math:`\log p = \operatorname{logsumexp}_k \gamma_N(k)`.

    Sample sites ``theta1``, ``theta2`` (K,) on the simplex; ``phi``, ``lambda`` (K,) positive-ordered
    with the normal priors above, unnormalised on the ordered set as in Stan; deterministic ``theta``
    (K, K) with ``theta[j] = theta{j+1}`` (transition matrix, rows = current state); observed ``uv``
    (N, 2) ``= stack([u, v], -1)``. The Stan program hard-codes two states, so ``K`` must be 2. The
    Stan program's generated quantities (the Viterbi path) are not translated.

    Args:
        K: number of states (must be 2).
        N: length of the process.
        u: inverse speed (N,), or ``None`` (with ``v=None``) to sample ``uv``.
        v: distance to the hoop (N,), or ``None``.
        alpha: Dirichlet parameters of the transition rows (K, K), required.

    Example:
        >>> from bayeslik.models import posteriordb
        >>> post = posteriordb.load("bball_drive_event_0-hmm_drive_0")
        >>> post["data"]["N"], post["data"]["u"].shape
        (416, (416,))
    """
    obs = _hmm_observations(N, u, v)  # check the data before sampling anything
    theta, phi, lam = _hmm_priors(K, alpha, [0.0, 3.0], constraints.positive_ordered_vector)
    rates = jnp.stack([phi, lam], axis=-1)  # (K, 2): [state, (u, v)]
    emission = dist.Exponential(rates).to_event(1)
    numpyro.sample("uv", _ForwardHMM(theta, emission, N), obs=obs)


def hmm_drive_1(K, N, u=None, v=None, alpha=None, tau=None, rho=None):
    r"""Two-state basketball "drive" HMM with normal emissions (``hmm_drive_1.stan``).

    .. math::
        \theta_k \sim \mathrm{Dirichlet}(\alpha_{k,\cdot}) \ (k = 1, 2), \quad
        \phi, \lambda \in \{x_1 < x_2\}, \ \ \phi_1, \lambda_1 \sim N(0, 1),\
        \phi_2, \lambda_2 \sim N(3, 1), \\
        z_t \mid z_{t-1} = j \sim \mathrm{Categorical}(\theta_j), \quad
        u_t \mid z_t = k \sim N(\phi_k, \tau), \quad
        v_t \mid z_t = k \sim N(\lambda_k, \rho),

    with the fixed (data) standard deviations :math:`\tau, \rho` and the states summed out by the
    forward algorithm as in :func:`hmm_drive_0` (no initial-state distribution).

    Unlike ``hmm_drive_0``, ``phi`` and ``lambda`` are ``ordered`` (not positive): sample sites
    ``theta1``, ``theta2`` (K,) on the simplex; ``phi``, ``lambda`` (K,) ordered with the normal priors
    above, unnormalised on the ordered set as in Stan; deterministic ``theta`` (K, K); observed ``uv``
    (N, 2) ``= stack([u, v], -1)``. ``K`` must be 2.

    Args:
        K: number of states (must be 2).
        N: length of the process.
        u: transformed speed (N,), or ``None`` (with ``v=None``) to sample ``uv``.
        v: transformed distance to the hoop (N,), or ``None``.
        alpha: Dirichlet parameters of the transition rows (K, K), required.
        tau: emission sd of ``u``, required.
        rho: emission sd of ``v``, required.

    Example:
        >>> from bayeslik.models import posteriordb
        >>> post = posteriordb.load("bball_drive_event_1-hmm_drive_1")
        >>> post["data"]["tau"], post["data"]["rho"]
        (0.1, 0.1)
    """
    if tau is None or rho is None:
        raise DataError("hmm_drive_1 needs tau and rho (the emission standard deviations)")
    obs = _hmm_observations(N, u, v)  # check the data before sampling anything
    theta, phi, lam = _hmm_priors(K, alpha, [0.0, 3.0], constraints.ordered_vector)
    loc = jnp.stack([phi, lam], axis=-1)  # (K, 2): [state, (u, v)]
    scale = jnp.asarray([tau, rho], dtype=loc.dtype)
    emission = dist.Normal(loc, scale).to_event(1)
    numpyro.sample("uv", _ForwardHMM(theta, emission, N), obs=obs)


#: posteriordb name -> (NumPyro program, stan_lp_offset); merged into ``posteriordb.load``'s registry.
MODELS = {
    "gp_pois_regr-gp_regr": (gp_regr, 2.0 * math.log(2.0)),
    "bball_drive_event_0-hmm_drive_0": (hmm_drive_0, 0.0),
    "bball_drive_event_1-hmm_drive_1": (hmm_drive_1, 0.0),
}

# The shared helpers live in posteriordb, which imports this module at its end to merge MODELS. The
# import stays here, after MODELS, so that importing this module first also works: posteriordb then
# runs to its end while this module is half-initialised, and it finds MODELS already defined. The
# helpers are only looked up when a model runs.
from bayeslik.models.posteriordb import (  # noqa: E402
    check_length,
    forward_logsumexp,
    RestrictedNormal,
)
