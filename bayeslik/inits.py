"""Default starting points that a model provides, picked up by the engines that take an init.

Some model families have a cheap point estimate that puts every chain in the main mode: k-means
for an AR-HMM's states, EM for a mixture. A model announces it with :func:`set_default_init`;
an engine whose ``init`` is ``"auto"`` (the NUTS default) then starts there, and a user's own
``init=`` still wins.

The hook is a function with the model's own signature that returns ``{latent site: constrained
value}``: it is called with the arguments the Posterior was built with.

>>> import numpyro, numpyro.distributions as dist
>>> def model(y):
...     mu = numpyro.sample("mu", dist.Normal(0, 10))
...     numpyro.sample("y", dist.Normal(mu, 1), obs=y)
>>> _ = set_default_init(model, lambda y: {"mu": float(y.mean())})
>>> import jax.numpy as jnp, bayeslik as bl
>>> default_init(bl.Posterior(model, y=jnp.array([1.0, 3.0])))
{'mu': 2.0}
"""

from __future__ import annotations

from typing import Callable, Mapping

from bayeslik.errors import ModelError

__all__ = ["set_default_init", "default_init", "ATTRIBUTE"]

#: the attribute of a model function that holds its default-init hook
ATTRIBUTE = "default_init"


def set_default_init(model: Callable, init_fn: Callable) -> Callable:
    """Attach ``init_fn(*model_args, **model_kwargs) -> {site: constrained value}`` to
    ``model`` as its default starting point; returns ``model``."""
    if not callable(init_fn):
        raise ModelError(f"set_default_init: init_fn must be callable, got {type(init_fn).__name__}")
    setattr(model, ATTRIBUTE, init_fn)
    return model


def default_init(posterior) -> dict | None:
    """The model's default starting point for this Posterior's data, or None if it has none.

    Raises a ModelError naming the sites when the hook leaves latent sites out or names sites
    the model does not have.
    """
    fn = getattr(posterior.model, ATTRIBUTE, None)
    if fn is None:
        return None
    try:
        point = fn(*posterior._args, **posterior._kwargs)
    except Exception as e:  # the hook is the model author's code: say whose it is
        raise ModelError(
            f"the default init of model '{posterior.name}' ({getattr(fn, '__name__', fn)!r}) "
            f"failed with {type(e).__name__}: {e}. Pass init='uniform' (or a dict) to the engine "
            "to start elsewhere.") from e
    if not isinstance(point, Mapping):
        raise ModelError(f"the default init of model '{posterior.name}' returned "
                         f"{type(point).__name__}, not a dict {{site: value}}.")
    latent = set(posterior.latent_names)
    missing, extra = sorted(latent - set(point)), sorted(set(point) - latent)
    if missing or extra:
        raise ModelError(
            f"the default init of model '{posterior.name}' does not match its latent sites: "
            + (f"missing {missing}" if missing else "")
            + ("; " if missing and extra else "") + (f"unknown {extra}" if extra else "")
            + ". Fix the model's init function.")
    return dict(point)
