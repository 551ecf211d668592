r"""StateSpacePosterior: a prior program plus a state-space model, whose likelihood is known only
through particle filters.

A sibling of :class:`~bayeslik.Posterior` (both derive from
:class:`~bayeslik.posterior.PosteriorBase`, the prior half): the parameters' prior is a NumPyro
program (latent sample sites, no observed site), so ``constrain``/``unconstrain``/``logprior``/
``sample_prior``/``sites``/``ndim``/``flatten``/``cache_key`` are the usual ones; the likelihood

.. math::

    p_\theta(y_{0:T-1}) = \int \mu_\theta(x_0) g_\theta(y_0 \mid x_0)
    \prod_{t \ge 1} f_\theta(x_t \mid x_{t-1})\, g_\theta(y_t \mid x_t)\, dx_{0:T-1}

is a :class:`~bayeslik.filtering.particle.StateSpaceModel`'s at :math:`\theta` =
``params_fn(constrain(z))``, with no closed form. There is no ``loglikelihood``,
``logdensity``, ``pointwise_loglikelihood``, ``evaluate`` or ``at``: the engines that need them
refuse a StateSpacePosterior at ``bl.fit`` (the registry's ``accepts``), and the ``"pmmh"``
engine runs on it with a particle filter's unbiased estimate of the likelihood
(:meth:`StateSpacePosterior.estimated_loglikelihood`).

Example
-------
>>> import numpy as np, numpyro, numpyro.distributions as dist
>>> from bayeslik.filtering import particle
>>> def prior():
...     numpyro.sample("phi", dist.Uniform(-1, 1))
>>> post = StateSpacePosterior(prior, particle.stochastic_volatility_ssm(), np.zeros(20),
...                            params_fn=lambda v: {"mu": -1.0, "phi": v["phi"], "sigma": 0.3})
>>> post.ndim, post.num_steps
(1, 20)
>>> hasattr(post, "loglikelihood")
False
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from bayeslik.errors import DataError, ModelError
from bayeslik.filtering import particle as _pf
from bayeslik.posterior import PosteriorBase

__all__ = ["StateSpacePosterior"]


class StateSpacePosterior(PosteriorBase):
    r"""A prior program, a state-space model and its observations (see the module docstring).

    ``prior_model`` is a NumPyro program with the parameters' prior as latent sample sites and
    no observed or factor site (``prior_kwargs`` are its arguments). ``params_fn(values) ->
    params`` maps the constrained values (``{site: value}``, latent and deterministic sites) to
    the ``params`` pytree of ``ssm`` (default: the values dict itself). ``ys`` are the
    observations (an array or pytree of arrays with a leading time axis; finite).

    Raises :class:`~bayeslik.errors.ModelError` for a bad ``ssm``/``params_fn``/program and
    :class:`~bayeslik.errors.DataError` for bad ``ys``.
    """

    def __init__(self, prior_model: Callable, ssm: _pf.StateSpaceModel, ys: Any, *,
                 params_fn: Callable | None = None, **prior_kwargs: Any) -> None:
        if not isinstance(ssm, _pf.StateSpaceModel):
            raise ModelError(f"ssm must be a bayeslik.filtering.particle.StateSpaceModel, got "
                             f"{type(ssm).__name__}")
        if params_fn is not None and not callable(params_fn):
            raise ModelError("params_fn must be a callable {site: value} -> the ssm's params")
        for path, leaf in jax.tree_util.tree_leaves_with_path(ys):
            where = "ys" + jax.tree_util.keystr(path)
            if isinstance(leaf, np.ma.MaskedArray):
                raise DataError(
                    f"{where} is a numpy masked array; bayeslik would ignore its mask and use the "
                    "values under it. Pass plain arrays: fill the masked entries with a finite "
                    "placeholder and give the state-space model the mask as an array of its own "
                    "in ys (a dict {'y': ..., 'mask': ...}) that its observation density reads, or "
                    "drop or impute the masked steps.")
            kind = np.asarray(leaf).dtype.kind
            if kind == "c":
                raise DataError(f"{where} is complex-valued ({np.asarray(leaf).dtype}); the "
                                "observations must be real (pass real and imaginary parts as "
                                "two real arrays).")
            if kind not in "biuf":
                raise DataError(f"{where} holds non-numeric data ({np.asarray(leaf).dtype}).")
        self.num_steps = _pf.num_steps(ys)
        for leaf in jax.tree.leaves(ys):
            arr = np.asarray(leaf)
            if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
                raise DataError("ys contains NaN or infinite values; remove or impute them "
                                "(or give the state-space model a mask in ys)"
                                ": every array in ys must be finite, even where masked, so "
                                "replace missing values by a finite placeholder and mark them "
                                "in a mask array that the state-space model reads.")
        super().__init__(prior_model, **prior_kwargs)
        observed = [n for n, s in self._sites.items() if s.kind in ("observed", "factor")]
        if observed:
            raise ModelError(
                f"prior_model of a StateSpacePosterior must hold only the prior, but it has "
                f"observed/factor site(s) {observed}; the observations go in `ys` and their "
                "likelihood in the state-space model.")
        self.ssm = ssm
        self.ys = jax.tree.map(jnp.asarray, ys)
        self.params_fn = params_fn if params_fn is not None else _identity
        self.name = getattr(prior_model, "__name__", "model")

    def params(self, z: jax.Array) -> Any:
        """The state-space model's params at the unconstrained point ``z``."""
        return self.params_fn(self.constrain(z))

    def estimated_loglikelihood(self, rng_key: jax.Array, z: jax.Array, num_particles: int,
                                **filter_options: Any) -> jax.Array:
        r"""log of a particle filter's unbiased estimate :math:`\hat p_\theta(y)` at ``z``
        (``filter_options`` as in :func:`~bayeslik.filtering.particle.particle_filter`)."""
        return _pf.particle_filter(rng_key, self.ssm, self.params(z), self.ys, num_particles,
                                   quantiles=(), **filter_options).log_likelihood

    @property
    def observed_data(self) -> dict:
        """The observations as {name: array}: ``{"y": ys}`` for an array, ``{"y_<key>": ...}``
        for a dict, ``{"y_<i>": ...}`` for a tuple or list."""
        if isinstance(self.ys, Mapping):
            return {f"y_{k}": np.asarray(v) for k, v in self.ys.items()}
        return {"y": np.asarray(self.ys)} if not isinstance(self.ys, (tuple, list)) else \
            {f"y_{i}": np.asarray(v) for i, v in enumerate(self.ys)}

    @property
    def cache_key(self) -> tuple:
        """The prior program's key plus the ssm, ``params_fn`` and the shapes of ``ys``."""
        shapes = tuple((tuple(np.shape(a)), str(jnp.asarray(a).dtype))
                       for a in jax.tree.leaves(self.ys))
        return super().cache_key + (self.ssm, self.params_fn, jax.tree.structure(self.ys), shapes)

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}; T={self.num_steps})"


def _identity(v):
    return v
