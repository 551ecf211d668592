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

from typing import Any, Callable, Mapping

import numpy as np

from bayeslik.errors import EngineError, ModelError

__all__ = ["set_default_init", "default_init", "check_init", "start_candidates", "ATTRIBUTE"]

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


def check_init(posterior, init: Mapping, label: str = "engine") -> None:
    """Check a starting point ``init`` {latent site: constrained value} given to an engine
    (``label``: its name in messages, e.g. "NUTS") before anything runs: every key a latent site
    of ``posterior``, every value a finite number array of the site's shape inside its support
    (where the support depends on other sites, at the values given for them). Raises
    :class:`~bayeslik.errors.EngineError` naming the site; missing sites are left to the
    engine (``posterior.unconstrain`` names them).

    >>> import numpyro, numpyro.distributions as dist, jax.numpy as jnp, bayeslik as bl
    >>> def model(y):
    ...     sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    ...     numpyro.sample("y", dist.Normal(0.0, sigma), obs=y)
    >>> check_init(bl.Posterior(model, y=jnp.ones(3)), {"sigma": -1.0}, "NUTS")
    Traceback (most recent call last):
    ...
    bayeslik.errors.EngineError: NUTS option init: init['sigma'] = -1 is outside the support of site 'sigma' (HalfNormal, support Positive(lower_bound=0.0)); give a value inside it.
    """
    import jax.numpy as jnp
    from numpyro import handlers

    latent = list(posterior.latent_names)
    where = f"{label} option init"
    unknown = [k for k in init if k not in latent]
    if unknown:
        sites = posterior.sites
        kinds = [f"{k!r} ({sites[k].kind} site)" if k in sites else repr(k) for k in unknown]
        verb = "is not a latent site" if len(unknown) == 1 else "are not latent sites"
        raise EngineError(f"{where}: {', '.join(kinds)} {verb} of model '{posterior.name}'; the "
                          f"latent sites are {latent}.")
    values = {}
    for name, value in init.items():
        try:
            arr = np.asarray(value, dtype=float)
        except (TypeError, ValueError):
            raise EngineError(f"{where}: init[{name!r}] = {value!r} is not a number or an array "
                              "of numbers.") from None
        shape = tuple(posterior.sites[name].shape)
        if arr.shape != shape:
            raise EngineError(f"{where}: init[{name!r}] has shape {arr.shape}, but site {name!r} "
                              f"has shape {shape}.")
        if not np.all(np.isfinite(arr)):
            raise EngineError(f"{where}: init[{name!r}] = {_brief(arr)} is not finite.")
        values[name] = jnp.asarray(arr)

    def check(site: dict) -> Any:
        name = site["name"]
        if site["type"] != "sample" or site["is_observed"] or name not in values:
            return None
        fn, value = site["fn"], values[name]
        try:
            ok = bool(np.all(np.asarray(fn.support(value))))
        except Exception:  # a support that cannot be checked elementwise: the engine will tell
            ok = True
        if not ok:
            raise EngineError(
                f"{where}: init[{name!r}] = {_brief(value)} is outside the support of site "
                f"{name!r} ({_dist_name(fn)}, support {fn.support}); give a value inside it.")
        return value

    model = handlers.substitute(handlers.seed(posterior.model, rng_seed=0), substitute_fn=check)
    try:
        handlers.trace(model).get_trace(*posterior.args, **posterior.data)
    except EngineError:
        raise
    except Exception:  # the model fails at this point for other reasons: the engine reports it
        return


def start_candidates(posterior, rng_key, num_chains: int, init: Any, radius: float,
                     num_tries: int) -> np.ndarray:
    """Starting candidates (chains, tries, ndim) on the unconstrained scale for an engine's
    ``init``:

    * ``"uniform"``: uniform in [-radius, radius] (Stan's default);
    * ``"prior"``: draws from the prior;
    * a dict {latent site: constrained value}: the given sites jittered by +-radius/20 around the
      point, the sites it leaves out uniform in [-radius, radius] as with ``"uniform"`` (Stan's
      rule for a partial init);
    * a NumPyro init strategy (``numpyro.infer.init_to_median()``, ``init_to_sample``,
      ``init_to_uniform(radius=1)``, ``init_to_value(values=...)``, ... or any
      ``fn(site) -> value or None``): every candidate from the strategy under its own key
      (vectorised: one compiled trace of the model).
    """
    import jax
    import jax.numpy as jnp

    shape = (num_chains, num_tries, posterior.ndim)
    if isinstance(init, Mapping):
        missing = [n for n in posterior.latent_names if n not in init]
        if not missing:  # a whole point: jittered around it
            z0 = np.asarray(posterior.unconstrain(init))
            return z0 + np.asarray(jax.random.uniform(rng_key, shape, minval=-radius / 20,
                                                      maxval=radius / 20))
        k_fill, k_jitter = jax.random.split(rng_key)
        uniform = np.asarray(jax.random.uniform(k_fill, shape, minval=-radius, maxval=radius))
        filled = posterior.constrain(jnp.asarray(uniform[0, 0]))  # stand-ins for the left-out
        z0 = np.asarray(posterior.unconstrain({**{n: filled[n] for n in missing}, **init}))
        index = posterior.unflatten(jnp.arange(posterior.ndim, dtype=jnp.float32))
        given = np.zeros(posterior.ndim, bool)
        for name in init:
            given[np.rint(np.asarray(index[name])).astype(int).ravel()] = True
        jitter = np.asarray(jax.random.uniform(k_jitter, shape, minval=-radius / 20,
                                               maxval=radius / 20))
        return np.where(given, z0 + jitter, uniform)
    if isinstance(init, str) and init == "prior":
        cand = posterior.sample_prior(rng_key, num_chains * num_tries)
        return np.asarray(cand).reshape(shape)
    if callable(init):
        return np.asarray(_strategy_draws(posterior, init)(
            jax.random.split(rng_key, num_chains * num_tries))).reshape(shape)
    return np.asarray(jax.random.uniform(rng_key, shape, minval=-radius, maxval=radius))


def _strategy_draws(posterior, strategy: Callable) -> Callable:
    """A compiled ``keys (n,) -> (n, ndim)``: the unconstrained point a NumPyro init strategy
    gives under each key (the strategy sees every sample site, as in ``numpyro.infer``)."""
    import jax
    from numpyro import handlers

    from bayeslik.posterior import flat_unconstrained

    latent = posterior.latent_names

    def one(key):
        model = handlers.substitute(handlers.seed(posterior.model, rng_seed=key),
                                    substitute_fn=strategy)
        tr = handlers.trace(model).get_trace(*posterior.args, **posterior.data)
        return flat_unconstrained(tr, latent)

    return jax.jit(jax.vmap(one))


def _brief(value: Any) -> str:
    """A short rendering of a value for a message: '-1', '[1, 2]', '<shape (9,), -1..3>'."""
    a = np.asarray(value, dtype=float)
    if a.size == 1:
        return f"{a.item():.3g}"
    if a.size <= 4:
        return "[" + ", ".join(f"{x:.3g}" for x in a.ravel()) + "]"
    return f"<shape {a.shape}, {np.nanmin(a):.3g}..{np.nanmax(a):.3g}>"


def _dist_name(fn: Any) -> str:
    """A distribution's family name, seen through expand/mask/to_event wrappers."""
    for _ in range(8):
        if type(fn).__name__ not in ("ExpandedDistribution", "MaskedDistribution", "Independent") \
                or not hasattr(fn, "base_dist"):
            break
        fn = fn.base_dist
    return type(fn).__name__
