r"""Distributions shared by the models of the zoo, each with a unit-cube transform for nested
sampling.

:class:`OrderedNormal`
    the order statistics of ``K`` iid normal draws: a proper prior on an ordered vector
    :math:`x_0 < x_1 < \dots < x_{K-1}`, used to identify the labels of a model whose likelihood
    is invariant under permuting its components (the ordered means of a 1-D mixture,
    :mod:`bayeslik.models.mixture`; the ordered state intercepts of an AR-HMM,
    :mod:`bayeslik.models.arhmm`).

Example
-------
>>> import jax, jax.numpy as jnp
>>> d = OrderedNormal(0.0, 2.0, 3)
>>> x = d.sample(jax.random.key(0), (5,))
>>> x.shape, bool(jnp.all(jnp.diff(x, axis=-1) > 0))
((5, 3), True)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax.scipy.special import ndtri
from numpyro.distributions import constraints

__all__ = ["OrderedNormal"]


class OrderedNormal(dist.Distribution):
    r"""Order statistics of ``size`` iid ``Normal(loc, scale)`` draws: a proper prior on the
    ordered set :math:`\{x \in \mathbb{R}^K : x_0 < x_1 < \dots < x_{K-1}\}`.

    If :math:`z_1, \dots, z_K` are iid :math:`\mathcal{N}(\mu, \sigma^2)` and
    :math:`x = \mathrm{sort}(z)`, each ordered vector is reached by the :math:`K!` permutations
    of :math:`z`, so its density is

    .. math::

        p(x) = K! \prod_{k=0}^{K-1} \mathcal{N}(x_k \mid \mu, \sigma^2), \qquad
        x_0 < \dots < x_{K-1},

    which integrates to one over the ordered set (and is zero elsewhere). The prior says no
    more than "``K`` iid normals, labelled in increasing order": ordering the component
    locations this way identifies the labels of a mixture or an HMM without changing what the
    prior believes about the unordered set of locations.

    * ``log_prob(x)`` is :math:`\log K! + \sum_k \log \mathcal{N}(x_k \mid \mu, \sigma^2)`; the
      order is the support (``constraints.ordered_vector``), checked only with
      ``validate_args=True``, and NUTS moves on it through numpyro's ordered transform.
    * ``sample`` sorts iid normal draws.
    * ``unit_cube_transform(u)`` (nested sampling's prior transform, see
      :func:`bayeslik.icdf.icdf`) sorts the normal quantiles :math:`\mu + \sigma\,\Phi^{-1}(u_k)`:
      for uniform ``u`` these are iid normals, and sorted they are the order statistics. It is
      not a bijection (every permutation of ``u`` maps to one point), which nested sampling
      does not need.

    Args:
        loc: :math:`\mu`, a scalar (shared by the ``K`` draws).
        scale: :math:`\sigma > 0`, a scalar.
        size: ``K``, the length of the ordered vector (the event shape is ``(K,)``).

    >>> import jax.numpy as jnp
    >>> d = OrderedNormal(0.0, 1.0, 2)
    >>> d.event_shape, d.batch_shape
    ((2,), ())
    >>> round(float(d.log_prob(jnp.array([-1.0, 1.0]))), 4)   # log 2 - log(2 pi) - 1
    -2.1447
    >>> d.unit_cube_transform(jnp.array([0.9, 0.5])).round(4)   # sorted normal quantiles
    Array([0.    , 1.2816], dtype=float32)
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.ordered_vector
    pytree_aux_fields = ("size",)
    reparametrized_params = ["loc", "scale"]

    def __init__(self, loc, scale, size: int, *, validate_args=None):
        self.loc, self.scale, self.size = jnp.asarray(loc), jnp.asarray(scale), int(size)
        super().__init__(batch_shape=(), event_shape=(self.size,), validate_args=validate_args)

    def sample(self, key, sample_shape=()):
        eps = jax.random.normal(key, tuple(sample_shape) + (self.size,))
        return jnp.sort(self.loc + self.scale * eps, axis=-1)

    def log_prob(self, value):
        lp = dist.Normal(self.loc, self.scale).log_prob(value).sum(-1)
        return lp + math.lgamma(self.size + 1)

    def unit_cube_transform(self, u):
        """Nested sampling's prior transform: the sorted normal quantiles of ``u`` (``(K,)``,
        entries in ``(0, 1)``), distributed as the order statistics when ``u`` is uniform."""
        return jnp.sort(self.loc + self.scale * ndtri(u), axis=-1)
