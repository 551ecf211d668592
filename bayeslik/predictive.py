"""Prior and posterior predictive draws: new data simulated from the program, for ArviZ's
predictive checks (``plot_ppc_*``, ``loo_pit``, ``plot_prior_posterior``).

* :func:`posterior_predictive` -- a Fit with a ``posterior_predictive`` group: for every draw of
  its ``posterior`` group, the program run with the latent sites set to that draw and fresh
  values drawn at the observed sites;
* :func:`prior_predictive` -- a DataTree with ``prior`` (latent sites drawn from the prior) and
  ``prior_predictive`` (the observed sites drawn given them) groups, and ``observed_data``.

Why not numpyro's ``Predictive``: a program written ``numpyro.sample("y", d, obs=y)`` with its
data bound keeps ``obs=y``, so ``Predictive`` returns the observed ``y`` in every row. Here the
observed sites are un-observed while the program runs (their ``obs`` dropped, the distribution
sampled with the draw's key; a site whose distribution has a smaller batch shape than the data,
``dist.Normal(mu, 1)`` observed on a vector without a plate, is expanded to the data's shape).

Each Posterior's programs (one vmapped function of (rng_key, latent values) per group, the data
arrays an argument) are compiled once per :attr:`~bayeslik.Posterior.cache_key` and kept; the
draws are mapped in chunks of :data:`CHUNK_ROWS` draws (fewer where their values would take
more than :data:`CHUNK_BYTES`), each padded to that size, so one shape compiles for any number
of draws, in bounded memory (:meth:`bayeslik.engines.kit.Programs.map_into`).
The draws of row ``i`` use the ``i``-th key of ``jax.random.split(PRNGKey(seed), n)``, so they do
not depend on the chunking.

What is drawn: every observed sample site, entries under ``numpyro.handlers.mask`` included (a
draw from the model's distribution there, i.e. a prediction of the missing value; the
``observed_data`` group holds the placeholder that was bound). ``numpyro.factor`` sites have no
distribution to sample: they are skipped (named in the group's ``skipped_factor_sites``
attribute), and a program with factor sites only is refused. Deterministic sites are not
recorded. A :class:`~bayeslik.StateSpacePosterior` is refused: its observations have a density
(``observation_logdensity_fn``) but no sampler.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
import xarray as xr
from numpyro import handlers
from numpyro.primitives import Messenger

from bayeslik.api import check_seed
from bayeslik.engines.kit import ProgramCache, Programs, matching_draws
from bayeslik.errors import ModelError, OptionError
from bayeslik.fit import Fit, site_dataset
from bayeslik.posterior import Posterior, PosteriorBase

__all__ = ["posterior_predictive", "prior_predictive"]

#: the most bytes of draws one chunk makes (None: :data:`bayeslik.engines.kit` Programs' 64 MiB)
CHUNK_BYTES: int | None = None
#: draws per chunk (a power of two; fewer where a chunk's draws would pass CHUNK_BYTES): every
#: chunk is padded to it, so one shape compiles whatever the number of draws
CHUNK_ROWS = 256


class _Unobserve(Messenger):
    """Draw fresh values at the named observed sites: their ``obs`` is dropped (``value=None``,
    ``is_observed=False``) and a distribution of a smaller batch shape than the bound data is
    expanded to it, so the seed handler outside gives the site a key and numpyro samples it."""

    def __init__(self, fn, shapes: dict[str, tuple[int, ...]]) -> None:
        self.shapes = shapes
        self.current: str | None = None  # the site being sampled (for an error naming it)
        super().__init__(fn)

    def process_message(self, msg) -> None:
        name = msg.get("name")
        if msg["type"] != "sample" or name not in self.shapes or not msg["is_observed"]:
            return
        fn, shape = msg["fn"], self.shapes[name]
        batch = shape[: len(shape) - len(fn.event_shape)]
        if tuple(fn.batch_shape) != batch:
            fn = fn.expand(batch)
        msg["fn"], msg["value"], msg["is_observed"] = fn, None, False
        self.current = name

    def postprocess_message(self, msg) -> None:
        if msg.get("name") == self.current:
            self.current = None


class _PredictivePrograms(Programs):
    """``posterior``: ({"key": (n, 2), "values": {latent: (n, ...)}}, data) -> {observed: (n,
    ...)}; ``prior``: (keys (n, 2), data) -> ({observed: (n, ...)}, {latent: (n, ...)})."""

    def __init__(self, posterior: Posterior, observed: tuple[str, ...]) -> None:
        super().__init__()
        model, args, kwargs = posterior.model, posterior.args, posterior.data
        latent = posterior.latent_names
        shapes = {n: tuple(posterior.sites[n].shape) for n in observed}
        label = posterior.name

        def simulate(key, values, data):
            call_args = tuple(data.get(f"args[{i}]", a) for i, a in enumerate(args))
            call_kwargs = {k: data.get(k, v) for k, v in kwargs.items()}
            fn = model if values is None else handlers.substitute(model, data=values)
            unobserve = _Unobserve(fn, shapes)
            try:
                tr = handlers.trace(handlers.seed(unobserve, rng_seed=key)).get_trace(
                    *call_args, **call_kwargs)
            except NotImplementedError as e:
                if unobserve.current is None:
                    raise
                raise ModelError(
                    f"observed site '{unobserve.current}' of model '{label}': its distribution "
                    f"cannot draw values ({type(e).__name__}: {e}), so there are no predictive "
                    "draws of it. Give the distribution a `sample` method.") from e
            stuck = [n for n in observed if n not in tr or tr[n]["is_observed"]]
            if stuck:
                raise ModelError(
                    f"observed site(s) {stuck} of model '{label}' could not be un-observed to "
                    "draw fresh values (e.g. sites inside numpyro.contrib.control_flow.scan); "
                    "write the program with jax.lax.scan inside a distribution instead.")
            return ({n: tr[n]["value"] for n in observed}, {n: tr[n]["value"] for n in latent})

        def posterior_fn(rows, data):
            return jax.vmap(lambda r: simulate(r["key"], r["values"], data)[0])(rows)

        def prior_fn(keys, data):
            return jax.vmap(lambda k: simulate(k, None, data))(keys)

        self._fns = {"posterior": jax.jit(posterior_fn), "prior": jax.jit(prior_fn)}


# keyed by (cache_key, observed sites, x64): one compilation per program and data shapes
_PROGRAMS = ProgramCache(8)


def _programs(posterior: Posterior, observed: tuple[str, ...]) -> _PredictivePrograms:
    key = (posterior.cache_key, observed, bool(jax.config.read("jax_enable_x64")))
    return _PROGRAMS.get(key, lambda: _PredictivePrograms(posterior, observed))


# ---------------------------------------------------------------------------- checks
def _observed_sites(posterior: Any, who: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(observed sample sites, factor sites) of a Posterior; OptionError for other kinds or a
    program with nothing to draw."""
    if not isinstance(posterior, PosteriorBase):
        raise OptionError(f"{who}: `posterior` must be a bayeslik Posterior, got "
                          f"{type(posterior).__name__}.")
    if not isinstance(posterior, Posterior):
        raise OptionError(
            f"{who}: a {type(posterior).__name__} is not supported: its observations have a "
            "density (the state-space model's observation_logdensity_fn) but no sampler, so "
            "there is nothing to draw predictive values from. Simulate from the state-space "
            "model by hand, or write the model as a Posterior with observed sample sites.")
    observed = tuple(n for n, s in posterior.sites.items() if s.kind == "observed")
    factors = tuple(n for n, s in posterior.sites.items() if s.kind == "factor")
    if not observed:
        raise OptionError(
            f"{who}: model '{posterior.name}' has no observed sample site to draw"
            + (f" (its likelihood is numpyro.factor site(s) {list(factors)}, which have no "
               "distribution to sample)" if factors else "")
            + ". Write the likelihood as numpyro.sample(name, distribution, obs=data).")
    return observed, factors


def _check_count(value: Any, who: str, most: int | None = None, what: str = "") -> int:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if not ok or int(value) < 1 or (most is not None and int(value) > most):
        top = f" and at most {most}{what}" if most is not None else ""
        raise OptionError(f"{who}: num_draws={value!r} must be a positive integer{top}"
                          + (" (or None: all draws)" if most is not None else "") + ".")
    return int(value)


def _keys(seed: int, n: int) -> np.ndarray:
    return np.asarray(jax.random.split(jax.random.PRNGKey(seed), n))


def _group_attrs(seed: int, factors: tuple[str, ...]) -> dict:
    attrs = {"inference_library": "bayeslik", "seed": seed}
    if factors:
        attrs["skipped_factor_sites"] = ", ".join(factors)
    return attrs


# ---------------------------------------------------------------------------- public
def posterior_predictive(fit: Fit, posterior: Posterior, *, seed: int = 0,
                         num_draws: int | None = None) -> Fit:
    """A copy of ``fit`` with a ``posterior_predictive`` group: new data for its posterior draws.

    For each draw of the Fit's ``posterior`` group (for weighted engines, nested sampling and
    SMC, those are the equal-weight draws, one chain), the program is run with the latent sites
    set to the draw and a fresh value drawn at every observed site (never the bound data; see
    the module docs). The group holds {observed site: (chain, draw, *site dims)}, dims named as
    in ``observed_data`` (plate names; the Posterior's coords where it has them). The other
    groups, ``observed_data`` included, are kept (``observed_data`` is added if missing); the
    engine, config, cost and flags are the Fit's; ``fit`` itself is not changed.

    Parameters
    ----------
    fit : Fit
        A Fit of ``posterior`` (any engine).
    posterior : Posterior
        The Posterior the Fit was made from (same latent sites and data shapes).
    seed : int
        Seed of the predictive draws (independent of the fit's).
    num_draws : int or None
        None: every draw. An int: that many draws per chain, evenly thinned (draw indices
        ``i * S // num_draws`` for ``i < num_draws`` of the ``S`` per chain; the group's ``draw``
        coordinate keeps their labels). ``az.loo_pit`` needs every draw (it pairs the group with
        ``log_likelihood``).

    Raises OptionError for a Fit that does not fit the Posterior, a StateSpacePosterior, a
    program with no observed sample site, or a bad ``seed`` or ``num_draws``.

    >>> fit = bl.fit(post, "nuts", seed=0)                       # doctest: +SKIP
    >>> fit = bl.posterior_predictive(fit, post)                 # doctest: +SKIP
    >>> azp.plot_ppc_dist(fit.idata)                             # doctest: +SKIP
    """
    who = "posterior_predictive"
    if not isinstance(fit, Fit):
        raise OptionError(f"{who}: needs a bayeslik Fit, got {type(fit).__name__}.")
    observed, factors = _observed_sites(posterior, who)
    seed = check_seed(seed, OptionError, who)
    draws, C, S = matching_draws(fit, posterior, lambda why: OptionError(f"{who}: {why}"))
    sites = posterior.sites
    if num_draws is None:
        index = np.arange(S)
    else:
        k = _check_count(num_draws, who, most=S, what=f" (the Fit has {S} draws per chain)")
        index = (np.arange(k) * S) // k
    K = len(index)
    values = {n: np.asarray(draws[n].values)[:, index].reshape((C * K,) + tuple(sites[n].shape))
              for n in posterior.latent_names}
    rows = {"key": _keys(seed, C * K), "values": values}
    progs = _programs(posterior, observed)
    out = progs.map_into("posterior", rows, posterior.data_arrays, smallest=CHUNK_ROWS,
                         largest=CHUNK_ROWS, chunk_bytes=CHUNK_BYTES)
    out = {n: v.reshape((C, K) + v.shape[1:]) for n, v in out.items()}
    group = site_dataset(posterior, out, ["chain", "draw"],
                         coords={"chain": draws["chain"].values,
                                 "draw": draws["draw"].values[index]},
                         attrs=_group_attrs(seed, factors))
    tree = fit.idata.copy()
    tree["posterior_predictive"] = xr.DataTree(group)
    if "observed_data" not in tree.children:
        tree["observed_data"] = xr.DataTree(site_dataset(posterior, posterior.observed_data, []))
    return dataclasses.replace(fit, idata=tree)


def prior_predictive(posterior: Posterior, *, num_draws: int = 500, seed: int = 0) -> xr.DataTree:
    """Draws from the prior and data simulated from them, as an ArviZ DataTree.

    Groups: ``prior`` {latent site: (chain=1, draw, ...)}, ``prior_predictive`` {observed site:
    (1, draw, *site dims)} (a fresh value at every observed site, never the bound data; see the
    module docs) and ``observed_data``; dims named by the program's plates, the Posterior's
    coords where it has them. ``num_draws`` joint draws from ``seed``. An improper prior (e.g.
    ImproperUniform) is refused with an ImproperPriorError naming its sites; a
    StateSpacePosterior, a program with no observed sample site, or a bad ``seed`` or
    ``num_draws`` with an OptionError.

    Examples:
        >>> import numpy as np, numpyro, numpyro.distributions as dist, bayeslik as bl
        >>> def model(y):
        ...     mu = numpyro.sample("mu", dist.Normal(0, 1))
        ...     with numpyro.plate("obs", y.shape[0]):
        ...         numpyro.sample("y", dist.Normal(mu, 1), obs=y)
        >>> tree = bl.prior_predictive(bl.Posterior(model, y=np.zeros(3)), num_draws=100)
        >>> tree["prior_predictive"]["y"].dims, tree["prior"]["mu"].shape
        (('chain', 'draw', 'obs'), (1, 100))
    """
    who = "prior_predictive"
    observed, factors = _observed_sites(posterior, who)
    n = _check_count(num_draws, who)
    seed = check_seed(seed, OptionError, who)
    posterior.require_proper_prior(f"{who} (draws from the prior)")
    progs = _programs(posterior, observed)
    obs, latent = progs.map_into("prior", _keys(seed, n), posterior.data_arrays,
                                 smallest=CHUNK_ROWS, largest=CHUNK_ROWS,
                                 chunk_bytes=CHUNK_BYTES)
    coords = {"chain": np.arange(1), "draw": np.arange(n)}
    attrs = _group_attrs(seed, factors)

    def lead(group):
        return {k: v.reshape((1, n) + v.shape[1:]) for k, v in group.items()}

    tree = xr.DataTree.from_dict({
        "prior": site_dataset(posterior, lead(latent), ["chain", "draw"], coords=coords,
                              attrs=attrs),
        "prior_predictive": site_dataset(posterior, lead(obs), ["chain", "draw"],
                                         coords=coords, attrs=attrs),
        "observed_data": site_dataset(posterior, posterior.observed_data, []),
    })
    tree.attrs.update({"inference_library": "bayeslik", "model": posterior.name})
    return tree

