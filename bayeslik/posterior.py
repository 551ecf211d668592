"""Posterior: a NumPyro program with its data bound, as pure functions on flat vectors.

Every engine talks to a model only through a :class:`Posterior`. It runs the program once at
construction (eagerly, nothing is compiled) to learn its sites and to check the data, then
exposes pure, jittable functions of a flat *unconstrained* vector ``z`` of length ``ndim``:

* ``logdensity(z) = logprior(z) + loglikelihood(z)``
* ``logprior(z)   = sum_latent log p(x_s | x_<s) + log|det J(z)|``  with ``x = constrain(z)``
* ``loglikelihood(z) = sum_observed log p(y | x) + sum numpyro.factor terms``

The Jacobian of the constraining map lives here and nowhere else: an engine that works in the
unconstrained space never needs to know about supports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to
from numpyro.distributions.util import sum_rightmost

from bayeslik.errors import DataError, ImproperPriorError, ModelError

__all__ = ["Posterior", "SiteInfo", "Evaluation", "PosteriorFunctions"]


class PosteriorFunctions(NamedTuple):
    """A Posterior's density functions with given data arrays (see ``Posterior.at``)."""

    logdensity: Callable
    logprior: Callable
    loglikelihood: Callable
    pointwise_loglikelihood: Callable
    evaluate: Callable
    constrain: Callable


class Evaluation(NamedTuple):
    """Everything one trace of the program gives at a point z (see ``Posterior.evaluate``)."""

    values: dict
    pointwise_loglikelihood: dict
    logprior: jax.Array
    loglikelihood: jax.Array


@dataclass(frozen=True)
class SiteInfo:
    """What a Posterior knows about one site of the program.

    ``shape`` is the constrained value's shape, ``unconstrained_shape`` the shape of its slice of
    ``z`` (they differ e.g. for a simplex of K entries, which has K-1 free coordinates);
    ``dims`` names each axis (plate names where the program uses plates).
    """

    name: str
    kind: str  # "latent", "observed", "factor" or "deterministic"
    shape: tuple[int, ...]
    unconstrained_shape: tuple[int, ...]
    distribution: str
    dims: tuple[str, ...]
    improper: bool = False

    @property
    def size(self) -> int:
        return math.prod(self.unconstrained_shape)


def _is_numeric_array(x: Any) -> bool:
    if isinstance(x, (np.ndarray, jax.Array)):
        return True
    if isinstance(x, (list, tuple)) and len(x) > 0:
        try:
            arr = np.asarray(x)
        except Exception:  # ragged lists etc. are the model's business
            return False
        return arr.dtype.kind in "biuf"
    return False


def _as_jax(x: Any) -> Any:
    if isinstance(x, np.ndarray) and x.dtype.kind in "biuf":
        return jnp.asarray(x)
    return x


def _check_finite(name: str, value: Any, what: str) -> None:
    arr = np.asarray(value)
    if arr.dtype.kind not in "fc":
        return
    bad = ~np.isfinite(arr)
    if bad.any():
        num_nan = int(np.isnan(arr).sum())
        num_inf = int(bad.sum()) - num_nan
        first = tuple(int(i) for i in np.argwhere(bad)[0]) if arr.ndim else ()
        raise DataError(
            f"{what} '{name}' contains {num_nan} NaN and {num_inf} infinite value(s) "
            f"(first at index {first} of shape {arr.shape}). Remove or impute them before binding "
            f"the data, or pass a mask and observe only the finite entries "
            f"(numpyro.handlers.mask / `obs_mask=` in numpyro.sample)."
        )


def _site_dims(site: dict, shape: tuple[int, ...], event_ndim: int) -> tuple[str, ...]:
    """Axis names of a site's value: plate names for plate axes, ``<site>_dim_<i>`` otherwise."""
    ndim = len(shape)
    batch_ndim = ndim - event_ndim
    dims: list[str | None] = [None] * ndim
    for frame in site.get("cond_indep_stack", ()):
        if frame.dim is None:
            continue
        axis = batch_ndim + frame.dim
        if 0 <= axis < batch_ndim and shape[axis] == frame.size:
            dims[axis] = frame.name
    return tuple(d if d is not None else f"{site['name']}_dim_{i}" for i, d in enumerate(dims))


_WRAPPERS = ("ExpandedDistribution", "MaskedDistribution", "Independent")


def _dist_name(fn: Any) -> str:
    """The distribution's family name, seen through expand/mask/to_event wrappers."""
    while type(fn).__name__ in _WRAPPERS and hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return type(fn).__name__


def _is_improper(fn: Any) -> bool:
    from numpyro.distributions import ImproperUniform

    base = fn
    for _ in range(8):  # unwrap Independent / Masked / Expanded wrappers
        if isinstance(base, ImproperUniform):
            return True
        if hasattr(base, "base_dist"):
            base = base.base_dist
        else:
            break
    return False


def _same_support(a: Any, b: Any) -> bool:
    """True when two traces' supports of a site agree, i.e. the support does not depend on
    latent parameters and the data can be checked against it once."""
    if b is None or type(a) is not type(b):
        return False
    va, vb = vars(a), vars(b)
    for k in va:
        x, y = va[k], vb.get(k)
        if isinstance(x, constraints.Constraint):
            if not _same_support(x, y):
                return False
        elif isinstance(x, (jax.Array, np.ndarray, float, int)):
            if np.shape(x) != np.shape(y) or not np.array_equal(np.asarray(x), np.asarray(y)):
                return False
    return True


def _improper_stand_in(site: dict) -> Any:
    """A value for an improper site (which cannot be sampled): a point in its support."""
    if site["type"] != "sample" or site["is_observed"] or not _is_improper(site["fn"]):
        return None
    fn = site["fn"]
    transform = biject_to(fn.support)
    return transform(jnp.full(transform.inverse_shape(fn.shape()), 0.1))


class Posterior:
    """A NumPyro program with its data bound, as pure functions on flat unconstrained vectors.

    Construction runs the program once, eagerly, and checks it: non-finite data, observed values
    whose shape or support does not fit their distribution, discrete latent sites, subsampled
    plates. Every problem raises a :class:`~bayeslik.errors.DataError` or
    :class:`~bayeslik.errors.ModelError` that names the argument or site, before anything is
    compiled.

    All function attributes (``logdensity``, ``logprior``, ``loglikelihood``,
    ``pointwise_loglikelihood``, ``constrain``, ``unconstrain``, ``prior_transform``,
    ``sample_prior``) are plain closures: pass them to ``jax.jit``, ``jax.grad`` or ``jax.vmap``.

    Example
    -------
    >>> import jax, numpyro, numpyro.distributions as dist, bayeslik as bl
    >>> def model(y):
    ...     mu = numpyro.sample("mu", dist.Normal(0, 10))
    ...     sigma = numpyro.sample("sigma", dist.HalfNormal(1))
    ...     numpyro.sample("y", dist.Normal(mu, sigma), obs=y)
    >>> post = bl.Posterior(model, y=jax.numpy.array([0.3, -1.2, 0.8]))
    >>> post.ndim
    2
    >>> z = post.unconstrain({"mu": 0.0, "sigma": 1.0})
    >>> bool(abs(post.logprior(z) + post.loglikelihood(z) - post.logdensity(z)) < 1e-5)
    True
    """

    def __init__(self, model: Callable, *args: Any, **kwargs: Any) -> None:
        if not callable(model):
            raise ModelError(f"`model` must be a NumPyro program (a callable), got {type(model).__name__}.")
        for i, a in enumerate(args):
            if _is_numeric_array(a):
                _check_finite(f"args[{i}]", a, "positional argument")
        for k, v in kwargs.items():
            if _is_numeric_array(v):
                _check_finite(k, v, "argument")
        self._model = model
        # NumPy data becomes JAX arrays once: numpyro mixes np and jnp ops on tracers badly
        self._args = tuple(_as_jax(a) for a in args)
        self._kwargs = {k: _as_jax(v) for k, v in kwargs.items()}
        self.name = getattr(model, "__name__", type(model).__name__)
        # the array arguments are the "data": engines may pass other arrays of the same shapes
        # in their place (data = {"args[i]" or keyword: array}), so compiled code is reused
        self._data = {
            **{f"args[{i}]": a for i, a in enumerate(self._args) if isinstance(a, jax.Array)},
            **{k: v for k, v in self._kwargs.items() if isinstance(v, jax.Array)},
        }

        trace = self._trace_once()
        self._sites = self._inspect(trace, self._trace_once(rng_seed=1))
        latent = [s for s in self._sites.values() if s.kind == "latent"]
        if not latent:
            raise ModelError(
                f"model '{self.name}' has no latent sample site: there is nothing to infer. "
                "Check that the parameters are numpyro.sample sites without `obs=`."
            )
        self._latent_names = tuple(s.name for s in latent)
        # The flat layout: ravel_pytree orders a dict by key, which fixes z's layout once.
        template = {s.name: jnp.zeros(s.unconstrained_shape) for s in latent}
        flat, self._unravel = ravel_pytree(template)
        self.ndim = int(flat.shape[0])
        offsets, start = {}, 0
        for name in sorted(template):
            size = self._sites[name].size
            offsets[name] = (start, start + size)
            start += size
        self.offsets = offsets
        self._observed_data = {
            name: np.asarray(trace[name]["value"])
            for name, s in self._sites.items()
            if s.kind == "observed"
        }
        self._improper = tuple(s.name for s in latent if s.improper)
        self._prior_transform = None

        self.logdensity = self._make_logdensity("joint")
        self.logprior = self._make_logdensity("prior")
        self.loglikelihood = self._make_logdensity("likelihood")
        self.pointwise_loglikelihood = self._make_pointwise()
        self.constrain = self._make_constrain()
        self.unconstrain = self._make_unconstrain()
        self.sample_prior = self._make_sample_prior()
        self.evaluate = self._make_evaluate()

    # ------------------------------------------------------------------ inspection
    def _trace_once(self, rng_seed: int = 0) -> dict:
        try:
            seeded = handlers.seed(
                handlers.substitute(self._model, substitute_fn=_improper_stand_in), rng_seed=rng_seed
            )
            return handlers.trace(seeded).get_trace(*self._args, **self._kwargs)
        except (ValueError, TypeError, IndexError) as e:
            shapes = ", ".join(
                f"{k}: {np.shape(v)}" for k, v in self._kwargs.items() if _is_numeric_array(v)
            )
            raise DataError(
                f"running model '{self.name}' on the given data failed with "
                f"{type(e).__name__}: {e}\nThe array arguments have shapes {{{shapes}}}; check that "
                "they agree with each other and with what the model expects."
            ) from e

    def _inspect(self, trace: dict, other: dict) -> dict[str, SiteInfo]:
        """Site facts from one trace; ``other`` (another seed) tells static supports apart."""
        sites: dict[str, SiteInfo] = {}
        for name, site in trace.items():
            if site["type"] == "plate":
                if site["args"][1] is not None and site["args"][1] != site["args"][0]:
                    raise ModelError(
                        f"plate '{name}' subsamples ({site['args'][1]} of {site['args'][0]}); "
                        "bayeslik's engines need the full likelihood. Remove `subsample_size`."
                    )
                continue
            if site["type"] == "deterministic":
                shape = tuple(np.shape(site["value"]))
                sites[name] = SiteInfo(
                    name, "deterministic", shape, shape, "Deterministic", _site_dims(site, shape, 0)
                )
                continue
            if site["type"] != "sample":
                continue
            fn = site["fn"]
            if site["is_observed"]:
                self._check_observed(site, other.get(name))
                kind = "factor" if _dist_name(fn) == "Unit" else "observed"
                shape = tuple(np.shape(site["value"]))
                sites[name] = SiteInfo(
                    name, kind, shape, shape, _dist_name(fn),
                    _site_dims(site, shape, len(fn.event_shape)),
                )
                continue
            if site["infer"].get("enumerate"):
                raise ModelError(
                    f"site '{name}' asks for enumeration; bayeslik's engines do not enumerate. "
                    "Marginalise the discrete variable in the program (log-sum-exp over its values, "
                    "the forward algorithm for hidden state sequences)."
                )
            if fn.is_discrete:
                raise ModelError(
                    f"site '{name}' is a discrete latent variable ({_dist_name(fn)}); no engine in "
                    "bayeslik samples discrete parameters. Marginalise it out in the program "
                    "(sum over its values with jax.nn.logsumexp and numpyro.factor; for hidden state "
                    "sequences, the forward algorithm), or observe it with `obs=`."
                )
            shape = tuple(fn.shape())
            try:
                transform = biject_to(fn.support)
            except NotImplementedError as e:
                raise ModelError(
                    f"site '{name}' has support {fn.support!r}, which has no bijection to "
                    "unconstrained space; reparametrise it (e.g. numpyro.handlers.reparam)."
                ) from e
            ushape = tuple(transform.inverse_shape(shape))
            sites[name] = SiteInfo(
                name, "latent", shape, ushape, _dist_name(fn),
                _site_dims(site, shape, len(fn.event_shape)), improper=_is_improper(fn),
            )
        return sites

    def _check_observed(self, site: dict, twin: dict | None) -> None:
        name, fn, value = site["name"], site["fn"], site["value"]
        if _dist_name(fn) == "Unit":  # numpyro.factor
            _check_finite(name, value, "factor")
            return
        _check_finite(name, value, "observed site")
        vshape, dshape = tuple(np.shape(value)), tuple(fn.shape())
        try:
            bshape = tuple(np.broadcast_shapes(vshape, dshape))
        except ValueError:
            raise DataError(
                f"observed site '{name}': the data has shape {vshape} but its distribution "
                f"{_dist_name(fn)} has shape {dshape} (batch {tuple(fn.batch_shape)}, event "
                f"{tuple(fn.event_shape)}); they do not broadcast. Make the data and the "
                "parameter/plate shapes agree."
            ) from None
        if bshape != vshape:
            raise DataError(
                f"observed site '{name}': the data has shape {vshape} but its distribution "
                f"{_dist_name(fn)} has the larger shape {dshape}, so each datum would be counted "
                f"{math.prod(bshape) // max(math.prod(vshape), 1)} times. Check the plate sizes "
                "and parameter shapes against the data."
            )
        if not fn.is_discrete and not np.issubdtype(np.asarray(value).dtype, np.number):
            raise DataError(f"observed site '{name}' holds non-numeric data ({np.asarray(value).dtype}).")
        if not _same_support(fn.support, None if twin is None else twin["fn"].support):
            return  # the support depends on parameters (e.g. Uniform(0, theta)): no fixed check
        try:
            ok = np.asarray(fn.support(jnp.asarray(value)))
        except Exception:  # some supports cannot be checked elementwise; the density will tell
            return
        if not ok.all():
            bad = np.argwhere(~np.broadcast_to(ok, ok.shape))
            first = tuple(int(i) for i in bad[0]) if ok.ndim else ()
            raise DataError(
                f"observed site '{name}' has {int((~ok).sum())} value(s) outside the support "
                f"{fn.support} of {_dist_name(fn)} (first at index {first}). "
                "Check the data's units, sign and type (e.g. counts must be non-negative integers)."
            )

    # ------------------------------------------------------------------ core evaluation
    def _call_args(self, data: dict | None) -> tuple[tuple, dict]:
        """The program's (args, kwargs), with the data arrays taken from ``data`` if given."""
        if data is None:
            return self._args, self._kwargs
        args = tuple(data.get(f"args[{i}]", a) for i, a in enumerate(self._args))
        kwargs = {k: data.get(k, v) for k, v in self._kwargs.items()}
        return args, kwargs

    def _run(self, z: jax.Array, data: dict | None = None) -> tuple[dict, jax.Array]:
        """Trace the program with the latent sites set from ``z``; return (trace, log|J|)."""
        params = self._unravel(z)
        log_jac = []

        def substitute_fn(site):
            if site["type"] != "sample" or site["is_observed"] or site["name"] not in params:
                return None
            fn = site["fn"]
            transform = biject_to(fn.support)
            u = params[site["name"]]
            x = transform(u)
            ld = transform.log_abs_det_jacobian(u, x)
            ld = sum_rightmost(ld, jnp.ndim(ld) - jnp.ndim(x) + len(fn.event_shape))
            log_jac.append(jnp.sum(ld))
            return x

        seeded = handlers.seed(self._model, rng_seed=0)
        args, kwargs = self._call_args(data)
        tr = handlers.trace(handlers.substitute(seeded, substitute_fn=substitute_fn)).get_trace(
            *args, **kwargs
        )
        return tr, sum(log_jac) if log_jac else jnp.zeros(())

    @staticmethod
    def _site_logprob(site: dict) -> jax.Array:
        lp = site["fn"].log_prob(site["value"])
        if site.get("scale") is not None:
            lp = site["scale"] * lp
        return lp

    def _make_logdensity(self, which: str, data: dict | None = None) -> Callable[[jax.Array], jax.Array]:
        latent = set(self._latent_names)

        def fn(z):
            tr, log_jac = self._run(z, data)
            total = jnp.zeros(())
            for name, site in tr.items():
                if site["type"] != "sample":
                    continue
                is_latent = name in latent
                if (which == "prior" and not is_latent) or (which == "likelihood" and is_latent):
                    continue
                total = total + jnp.sum(self._site_logprob(site))
            if which != "likelihood":
                total = total + log_jac
            return total

        fn.__name__ = f"{which}_logdensity" if which != "joint" else "logdensity"
        fn.__doc__ = {
            "joint": "log p(x, y) + log|J| at the unconstrained point z (the engines' target).",
            "prior": "log p(x) + log|J| at the unconstrained point z.",
            "likelihood": "log p(y | x), observed sites and factors, at the unconstrained point z.",
        }[which]
        return fn

    def _make_pointwise(self, data: dict | None = None) -> Callable[[jax.Array], dict]:
        names = tuple(n for n, s in self._sites.items() if s.kind in ("observed", "factor"))

        def pointwise_loglikelihood(z):
            """Per-observation log-likelihood: {observed site: array of the data's batch shape}."""
            tr, _ = self._run(z, data)
            return {n: self._site_logprob(tr[n]) for n in names}

        return pointwise_loglikelihood

    def _make_evaluate(self, data: dict | None = None) -> Callable:
        latent = set(self._latent_names)
        keep = tuple(n for n, s in self._sites.items() if s.kind in ("latent", "deterministic"))
        obs = tuple(n for n, s in self._sites.items() if s.kind in ("observed", "factor"))

        def evaluate(z) -> Evaluation:
            """One trace at z: constrained values (latent and deterministic sites), pointwise
            log-likelihood per observed site, log prior (with the Jacobian) and log-likelihood."""
            tr, log_jac = self._run(z, data)
            lp = {n: self._site_logprob(s) for n, s in tr.items() if s["type"] == "sample"}
            logprior = sum((jnp.sum(v) for n, v in lp.items() if n in latent), log_jac)
            loglik = sum((jnp.sum(v) for n, v in lp.items() if n not in latent), jnp.zeros(()))
            return Evaluation(
                {n: tr[n]["value"] for n in keep}, {n: lp[n] for n in obs}, logprior, loglik
            )

        return evaluate

    def _make_constrain(self, data: dict | None = None) -> Callable:
        keep = tuple(n for n, s in self._sites.items() if s.kind in ("latent", "deterministic"))

        def constrain(z):
            """{site: constrained value} for the latent and deterministic sites at z."""
            tr, _ = self._run(z, data)
            return {n: tr[n]["value"] for n in keep}

        return constrain

    def _make_unconstrain(self) -> Callable:
        latent = self._latent_names

        def unconstrain(params: dict) -> jax.Array:
            """Flat unconstrained z from {latent site: constrained value} (all latent sites)."""
            missing = [n for n in latent if n not in params]
            if missing:
                raise ModelError(f"unconstrain: missing value(s) for latent site(s) {missing}.")
            seeded = handlers.seed(self._model, rng_seed=0)
            data = {n: jnp.asarray(params[n]) for n in latent}
            tr = handlers.trace(handlers.substitute(seeded, data=data)).get_trace(
                *self._args, **self._kwargs
            )
            u = {n: biject_to(tr[n]["fn"].support).inv(tr[n]["value"]) for n in latent}
            return ravel_pytree(u)[0]

        return unconstrain

    def _make_sample_prior(self) -> Callable:
        latent = self._latent_names

        def sample_prior(rng_key: jax.Array, num_samples: int) -> jax.Array:
            """``num_samples`` draws from the prior as flat unconstrained vectors, (n, ndim)."""
            self.require_proper_prior("sample_prior")

            def one(key):
                tr = handlers.trace(handlers.seed(self._model, rng_seed=key)).get_trace(
                    *self._args, **self._kwargs
                )
                u = {n: biject_to(tr[n]["fn"].support).inv(tr[n]["value"]) for n in latent}
                return ravel_pytree(u)[0]

            return jax.vmap(one)(jax.random.split(rng_key, num_samples))

        return sample_prior

    # ------------------------------------------------------------------ public helpers
    @property
    def prior_transform(self) -> Callable[[jax.Array], jax.Array]:
        """Unit cube -> prior: maps ``u`` in (0,1)^ndim to a flat unconstrained ``z``.

        Site by site in program order, each latent value is the inverse CDF of its prior,
        conditioned on the values of the earlier sites, at that site's slice of ``u`` (Dirichlet
        by stick-breaking, multivariate normals through their Cholesky factor). If ``u`` is
        uniform, ``z`` is distributed as the prior. Accessing this property checks every site
        and raises :class:`~bayeslik.errors.PriorTransformError` naming the first site whose
        prior has no inverse CDF here.
        """
        if self._prior_transform is None:
            self._prior_transform = self._make_prior_transform()
        return self._prior_transform

    def _make_prior_transform(self) -> Callable:
        from bayeslik import icdf as _icdf

        self.require_proper_prior("a unit-cube prior transform")
        trace = self._trace_once()
        for name in self._latent_names:
            _icdf.check_icdf(trace[name]["fn"], name)
        latent = self._latent_names
        unravel = self._unravel

        def prior_transform(u: jax.Array) -> jax.Array:
            cube = unravel(u)
            values = {}

            def substitute_fn(site):
                name = site["name"]
                if site["type"] != "sample" or site["is_observed"] or name not in cube:
                    return None
                x = _icdf.icdf(site["fn"], cube[name])
                values[name] = biject_to(site["fn"].support).inv(x)
                return x

            seeded = handlers.seed(self._model, rng_seed=0)
            handlers.trace(handlers.substitute(seeded, substitute_fn=substitute_fn)).get_trace(
                *self._args, **self._kwargs
            )
            return ravel_pytree({n: values[n] for n in latent})[0]

        return prior_transform

    def require_proper_prior(self, purpose: str) -> None:
        """Raise ImproperPriorError naming the improper sites if ``purpose`` needs a proper prior."""
        if self._improper:
            raise ImproperPriorError(
                f"{purpose} needs a proper prior, but site(s) {list(self._improper)} of model "
                f"'{self.name}' have an improper prior (ImproperUniform, Stan's implicit flat "
                "prior). Give them a proper prior (e.g. Normal, HalfNormal, Uniform on a bounded "
                "range), or use an engine that does not need one, such as 'nuts'."
            )

    @property
    def sites(self) -> dict[str, SiteInfo]:
        """All sites of the program by name (latent, observed, factor, deterministic)."""
        return dict(self._sites)

    @property
    def latent_names(self) -> tuple[str, ...]:
        return self._latent_names

    @property
    def site_shapes(self) -> dict[str, tuple[int, ...]]:
        """Constrained shapes of the latent sites."""
        return {n: self._sites[n].shape for n in self._latent_names}

    @property
    def observed_data(self) -> dict[str, np.ndarray]:
        return dict(self._observed_data)

    @property
    def has_proper_prior(self) -> bool:
        return not self._improper

    @property
    def model(self) -> Callable:
        return self._model

    @property
    def data(self) -> dict[str, Any]:
        """The keyword arguments bound to the program."""
        return dict(self._kwargs)

    @property
    def data_arrays(self) -> dict[str, jax.Array]:
        """The array arguments ("data"): {keyword or "args[i]": array}. See :meth:`at`."""
        return dict(self._data)

    def at(self, data: dict[str, jax.Array]) -> "PosteriorFunctions":
        """The density functions with other data arrays of the same shapes in place of the bound
        ones (``data`` as in :attr:`data_arrays`; the arrays may be JAX tracers). Engines compile
        ``lambda z, data: post.at(data).logdensity(z)`` once and reuse it for every dataset
        that shares this Posterior's :attr:`cache_key`."""
        return PosteriorFunctions(
            self._make_logdensity("joint", data), self._make_logdensity("prior", data),
            self._make_logdensity("likelihood", data), self._make_pointwise(data),
            self._make_evaluate(data), self._make_constrain(data),
        )

    @property
    def cache_key(self) -> tuple:
        """Equal for Posteriors whose compiled functions can be shared: the same program, the
        same non-array arguments, data arrays of the same shapes and dtypes."""
        static = [(f"args[{i}]", a) for i, a in enumerate(self._args) if not isinstance(a, jax.Array)]
        static += [(k, v) for k, v in self._kwargs.items() if not isinstance(v, jax.Array)]
        try:
            hash(tuple(static))
        except TypeError:  # unhashable static arguments: share nothing
            static = [("posterior", id(self))]
        shapes = tuple((k, tuple(v.shape), str(v.dtype)) for k, v in sorted(self._data.items()))
        return (self._model, tuple(static), shapes)

    def replace_data(self, **data: Any) -> "Posterior":
        """A new Posterior of the same program with some arguments replaced (checked again)."""
        unknown = [k for k in data if k not in self._kwargs]
        if unknown:
            raise DataError(f"replace_data: {unknown} are not arguments bound to this Posterior; "
                            f"they are {sorted(self._kwargs)}.")
        return Posterior(self._model, *self._args, **{**self._kwargs, **data})

    @property
    def args(self) -> tuple:
        return self._args

    def unflatten(self, z: jax.Array) -> dict[str, jax.Array]:
        """{latent site: unconstrained value} from a flat z (the inverse of ``flatten``)."""
        return self._unravel(z)

    def flatten(self, params_unconstrained: dict) -> jax.Array:
        """Flat z from {latent site: unconstrained value}."""
        return ravel_pytree({n: jnp.asarray(params_unconstrained[n]) for n in self._latent_names})[0]

    def __repr__(self) -> str:
        lat = ", ".join(f"{n}{list(self._sites[n].shape)}" for n in self._latent_names)
        obs = ", ".join(
            f"{n}{list(s.shape)}" for n, s in self._sites.items() if s.kind == "observed"
        )
        return f"Posterior({self.name}: ndim={self.ndim}; latent: {lat}; observed: {obs})"
