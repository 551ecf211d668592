"""A likelihood made slow on purpose, for the cost-aware surrogate's tests: every evaluation
sleeps ``cost_s`` seconds per point in a host callback (``jax.pure_callback``, batched over
points), so the true likelihood costs what an expensive one would while its values stay the
model's own."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro import handlers


def _sleeper(cost_s: float, counter: list):
    def sleep(v):
        v = np.asarray(v)
        n = int(v.size)
        counter[0] += n
        time.sleep(cost_s * n)
        return np.zeros(v.shape, v.dtype)

    return sleep


def slowed(model, cost_s: float, counter: list | None = None):
    """``model`` with a factor of 0 that sleeps ``cost_s`` seconds per point evaluated;
    ``counter[0]`` (if given) counts the points the callback saw (padding included)."""
    counter = counter if counter is not None else [0]
    sleep = _sleeper(float(cost_s), counter)

    def slow_model(*args, **kwargs):
        with handlers.trace() as tr:
            model(*args, **kwargs)
        latent = [s["value"] for s in tr.values()
                  if s["type"] == "sample" and not s["is_observed"]]
        v = jnp.sum(jnp.asarray(latent[0]))
        numpyro.factor("slow_down", jax.pure_callback(
            sleep, jax.ShapeDtypeStruct(v.shape, v.dtype), v, vmap_method="expand_dims"))

    slow_model.__name__ = f"slow_{getattr(model, '__name__', 'model')}"
    return slow_model
