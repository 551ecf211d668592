"""Expensive, non-JAX log-likelihoods inside a NumPyro program.

:func:`external_loglikelihood` puts a log-likelihood written in NumPy, plain Python or a
compiled code (a Boltzmann solver, a simulator's likelihood, a C library) into a NumPyro
program as one likelihood term:

>>> import numpy as np, numpyro, numpyro.distributions as dist, bayeslik as bl
>>> y = np.array([0.3, -0.2, 0.5])
>>> def gauss_loglik(mu):                      # NumPy on the host, one point at a time
...     return float(-0.5 * np.sum((y - mu) ** 2) - 1.5 * np.log(2 * np.pi))
>>> def model():
...     mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
...     bl.external_loglikelihood("loglik", gauss_loglik, mu)
>>> post = bl.Posterior(model)
>>> post.external_sites
('loglik',)
>>> fit = bl.fit(post, "nested", num_live=50, progress_bar=False)   # doctest: +SKIP

How it works. The call adds a factor-like site ``name`` (a :class:`ExternalLikelihood`, a
``numpyro`` ``Unit`` distribution whose ``log_prob`` is the host call), so the Posterior counts
it in ``loglikelihood`` (never in ``logprior``), nested sampling and tempered SMC see it as
likelihood, and the pointwise log-likelihood has one term ``name`` per draw. The host call is a
:func:`jax.pure_callback`; it runs only where the log density is evaluated: building the
Posterior, ``constrain``, ``unconstrain`` and ``sample_prior`` never call ``fn``.

Batches. Under ``jax.vmap`` (nss, SMC's particles, the nested engine's batches of points) the
callback receives the whole batch in ONE host call (``vmap_method="broadcast_all"``), and:

* ``batched=True``: ``fn`` takes the batch, ``theta`` with a leading axis ``(n, ...)`` (a dict:
  every value with that axis) and returns ``(n,)`` log-likelihoods, in chunks of at most
  ``batch_size`` rows (None: the whole batch);
* ``batched=False`` (default): ``fn`` takes one point and returns one number; the host maps it
  over the rows.

Rows that are exactly equal within a batch (the padding engines add to reach a compiled
shape, resampled copies) are evaluated once, and each site keeps the values of its last
:data:`CACHE_SIZE` distinct points (the padding row comes back in every padded batch).
With ``executor=`` (any :class:`concurrent.futures.Executor`: threads, processes,
:class:`bayeslik.executors.RayExecutor`) the rows (``batched=False``) or the chunks
(``batched=True``) of one batch are evaluated concurrently; ``fn`` must then be picklable
for a process or Ray executor (a module-level function).

Precision. ``theta`` reaches ``fn`` as NumPy arrays in JAX's float type (float64 under
``jax_enable_x64``, else float32); the result is cast to that type.

Failures. A NaN or +inf result is passed on: the engines count it with the other non-finite
evaluations and flag the Fit (-inf is a legitimate zero likelihood). An exception raised by
``fn`` stops the run with an :class:`ExternalLikelihoodError` naming the site, the function and
the point (JAX re-raises it as a ``JaxRuntimeError`` whose message holds that text), unless
``on_error="nan"``: then the point's log-likelihood is NaN (counted and flagged as above).

No gradients. The site has no derivative: ``jax.grad`` of the log density raises an
ExternalLikelihoodError naming the site, and ``bl.fit`` refuses, before compiling anything,
the engines that differentiate the log density ("nuts", "smc" with ``kernel="hmc"``). The
engines that run on it: "nested", "nss", "nested+surrogate", and "smc" (its random-walk moves,
the default for such a Posterior). See ``docs/external.md``.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from concurrent.futures import Executor
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from bayeslik.errors import BayeslikError, ModelError

__all__ = ["external_loglikelihood", "ExternalLikelihood", "ExternalLikelihoodError",
           "HostCall", "INFER_KEY", "ON_ERROR", "CACHE_SIZE", "is_external_site"]

#: the key in a site's ``infer`` dict that marks it as an external log-likelihood
INFER_KEY = "bayeslik_external"

#: what ``on_error`` may say: re-raise (naming the site), or a NaN log-likelihood at that point
ON_ERROR = ("raise", "nan")

#: the most recent distinct points whose values a site keeps, so that a point asked for again
#: in the next batches (the padding row engines add to reach a compiled shape) is not
#: evaluated again
CACHE_SIZE = 64


class ExternalLikelihoodError(BayeslikError, RuntimeError):
    """An external log-likelihood function failed (raised, or returned something that is not
    one number per point), or was differentiated; the message names the site."""


def is_external_site(site: Mapping[str, Any]) -> bool:
    """Whether a NumPyro trace site was made by :func:`external_loglikelihood`."""
    return bool((site.get("infer") or {}).get(INFER_KEY, False))


def _brief(theta: Any) -> str:
    """A short rendering of one point for a message."""
    def one(a):
        a = np.asarray(a)
        if a.size <= 4:
            return np.array2string(a, precision=4, separator=", ")
        return f"<shape {a.shape}, {a.min():.3g}..{a.max():.3g}>"

    if isinstance(theta, Mapping):
        return "{" + ", ".join(f"{k!r}: {one(v)}" for k, v in theta.items()) + "}"
    return one(theta)


class HostCall:
    """The host side of one external site: ``fn`` on a batch of rows, as
    :func:`jax.pure_callback` calls it.

    ``__call__(*leaves)`` takes theta's leaves, each with the same leading batch axes (none when
    not vmapped, several under nested vmaps), and returns the log-likelihoods of those batch
    shape in ``dtype``. ``num_host_calls``, ``num_points`` (distinct rows evaluated),
    ``num_fn_calls`` (calls of ``fn``), ``num_errors`` (rows or chunks whose call raised, with
    ``on_error="nan"``) and ``host_s`` (seconds in ``fn``) are counted as it goes. Equal rows
    of a batch are evaluated once, and the values of the last :data:`CACHE_SIZE` distinct
    points are kept (``num_cached``: rows answered from them).
    """

    def __init__(self, name: str, fn: Callable, treedef: Any, shapes: tuple, dtype: Any, *,
                 batched: bool, batch_size: int | None, executor: Executor | None,
                 on_error: str) -> None:
        self.name, self.fn, self.treedef, self.shapes = name, fn, treedef, shapes
        self.dtype = np.dtype(dtype)
        self.batched, self.batch_size, self.executor = batched, batch_size, executor
        self.on_error = on_error
        self.num_host_calls = self.num_points = self.num_fn_calls = self.num_errors = 0
        self.num_cached = 0
        self.host_s = 0.0
        self._cache: OrderedDict = OrderedDict()  # row bytes -> value, most recent last
        self._lock = threading.Lock()  # the cache, where two fits share a compiled program

    @property
    def fn_name(self) -> str:
        return getattr(self.fn, "__qualname__", None) or type(self.fn).__name__

    # ------------------------------------------------------------------ the batch
    def __call__(self, *leaves: Any) -> np.ndarray:
        leaves = [np.asarray(a) for a in leaves]
        lead = leaves[0].shape[:leaves[0].ndim - len(self.shapes[0])]
        n = math.prod(lead)
        rows = [a.reshape((n,) + s) for a, s in zip(leaves, self.shapes)]
        self.num_host_calls += 1
        if n == 0:
            return np.zeros(lead, self.dtype)
        unique, inverse, keys = _distinct_rows(rows)
        values = np.empty(len(unique), np.float64)
        known = np.zeros(len(unique), bool)
        with self._lock:
            for i, k in enumerate(keys):
                v = self._cache.get(k)
                if v is not None:
                    known[i], values[i] = True, v
                    self._cache.move_to_end(k)
        self.num_cached += int(known.sum())
        todo = unique[~known]
        if todo.size:
            rows = [a[todo] for a in rows]
            start = time.perf_counter()
            try:
                new = self._evaluate(rows) if self.batched else self._map(rows)
            finally:
                self.host_s += time.perf_counter() - start
            values[~known] = new
            self.num_points += int(todo.size)
            with self._lock:
                for k, v in zip((k for k, hit in zip(keys, known) if not hit), new):
                    self._cache[k] = float(v)
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
        return values[inverse].reshape(lead).astype(self.dtype)

    def _theta(self, rows: list, i: int | slice) -> Any:
        return self.treedef.unflatten([a[i] for a in rows])

    def _failed(self, err: Exception, theta: Any, what: str) -> ExternalLikelihoodError:
        return ExternalLikelihoodError(
            f"external log-likelihood '{self.name}': {self.fn_name} raised "
            f"{type(err).__name__}: {err} ({what} {_brief(theta)}). Fix the function there, "
            "or pass on_error='nan' to bl.external_loglikelihood to count such points as "
            "non-finite evaluations (the Fit is flagged).")

    # ------------------------------------------------------------------ one point at a time
    def _one(self, theta: Any) -> float:
        self.num_fn_calls += 1
        try:
            value = self.fn(theta)
        except Exception as e:  # the user's code: any failure is reported with the site
            if self.on_error == "nan":
                self.num_errors += 1
                return math.nan
            raise self._failed(e, theta, "at theta =") from e
        return self._scalar(value, theta)

    def _scalar(self, value: Any, theta: Any) -> float:
        arr = np.asarray(value) if value is not None else np.asarray(None, object)
        if arr.size != 1 or arr.dtype.kind not in "biuf":
            raise ExternalLikelihoodError(
                f"external log-likelihood '{self.name}': {self.fn_name} returned "
                f"{_describe(value)} at theta = {_brief(theta)}; it must return one real number "
                "(the log-likelihood at that point). If it takes a batch of points and returns "
                "one value per point, pass batched=True.")
        return float(arr.reshape(()))

    def _map(self, rows: list) -> np.ndarray:
        n = rows[0].shape[0]
        points = [self._theta(rows, i) for i in range(n)]
        if self.executor is None or n == 1:
            return np.array([self._one(t) for t in points], np.float64)
        futures = [self.executor.submit(self.fn, t) for t in points]
        out = np.empty(n, np.float64)
        for i, (t, f) in enumerate(zip(points, futures)):
            self.num_fn_calls += 1
            try:
                value = f.result()
            except Exception as e:
                if self.on_error != "nan":
                    for g in futures[i + 1:]:
                        g.cancel()
                    raise self._failed(e, t, "at theta =") from e
                self.num_errors += 1
                out[i] = math.nan
                continue
            out[i] = self._scalar(value, t)
        return out

    # ------------------------------------------------------------------ a batched fn
    def _chunks(self, n: int) -> list[slice]:
        size = n if self.batch_size is None else self.batch_size
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    def _check_batch(self, value: Any, m: int, theta: Any) -> np.ndarray:
        arr = np.asarray(value) if value is not None else np.asarray(None, object)
        if arr.shape != (m,) or arr.dtype.kind not in "biuf":
            raise ExternalLikelihoodError(
                f"external log-likelihood '{self.name}': the batched {self.fn_name} was given "
                f"{m} point(s) and returned {_describe(value)}; with batched=True it must return "
                f"an array of shape ({m},), one log-likelihood per point (first point: "
                f"{_brief(jax.tree.map(lambda a: a[0], theta))}). A function of one point takes "
                "batched=False.")
        return arr.astype(np.float64)

    def _evaluate(self, rows: list) -> np.ndarray:
        chunks = self._chunks(rows[0].shape[0])
        thetas = [self._theta(rows, c) for c in chunks]
        if self.executor is None or len(chunks) == 1:
            results = []
            for theta in thetas:
                self.num_fn_calls += 1
                try:
                    results.append(("ok", self.fn(theta)))
                except Exception as e:
                    results.append(("error", e))
        else:
            futures = [self.executor.submit(self.fn, t) for t in thetas]
            results = []
            for f in futures:
                self.num_fn_calls += 1
                try:
                    results.append(("ok", f.result()))
                except Exception as e:
                    results.append(("error", e))
        out = []
        for c, theta, (status, value) in zip(chunks, thetas, results):
            m = c.stop - c.start
            if status == "error":
                if self.on_error != "nan":
                    raise self._failed(value, jax.tree.map(lambda a: a[0], theta),
                                       f"on a batch of {m} point(s), the first") from value
                self.num_errors += 1
                out.append(np.full(m, math.nan))
            else:
                out.append(self._check_batch(value, m, theta))
        return np.concatenate(out)


def _describe(value: Any) -> str:
    if value is None:
        return "None"
    try:
        arr = np.asarray(value)
    except Exception:
        return f"a {type(value).__name__}"
    if arr.dtype.kind not in "biuf":
        return f"a {type(value).__name__} (dtype {arr.dtype})"
    return f"an array of shape {arr.shape}" if arr.ndim else f"the number {arr.item()!r}"


def _distinct_rows(rows: list) -> tuple[np.ndarray, np.ndarray, list]:
    """(indices of the first occurrence of each distinct row, in order; for each row, its
    position in that list; the distinct rows' bytes): rows compared by their bytes, every leaf
    together."""
    n = rows[0].shape[0]
    flat = np.concatenate([np.ascontiguousarray(a.reshape(n, -1)).view(np.uint8).reshape(n, -1)
                           for a in rows], axis=1)
    if flat.shape[1] == 0:  # theta of empty arrays: every row is the same
        return np.zeros(1, np.int64), np.zeros(n, np.int64), [b""]
    keys = np.ascontiguousarray(flat).view(np.dtype((np.void, flat.shape[1]))).ravel()
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    order = np.argsort(first)  # keep the rows in the order they came
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    first = first[order]
    return first, rank[inverse.ravel()], [flat[i].tobytes() for i in first]


class ExternalLikelihood(dist.Unit):
    """The distribution of an external log-likelihood site: a ``Unit`` (no value, like
    ``numpyro.factor``) whose ``log_prob`` is the host call of ``fn`` at ``theta``.

    The call happens only when ``log_prob`` is evaluated, so tracing the program (to constrain,
    unconstrain or draw from the prior) never calls ``fn``. Under ``jax.vmap`` the whole batch
    reaches the host in one call. It has no derivative: differentiating it raises an
    :class:`ExternalLikelihoodError` naming the site.
    """

    def __init__(self, host: HostCall, leaves: list) -> None:
        self.host = host
        self.leaves = leaves
        super().__init__(jnp.zeros((), host.dtype))

    def log_prob(self, value: Any, intermediates: Any = None) -> jax.Array:
        return _call(self.host, *self.leaves)


def _call(host: HostCall, *leaves: Any) -> jax.Array:
    """``pure_callback`` of ``host`` on the leaves, with a derivative rule that refuses."""

    @jax.custom_jvp
    def call(*xs):
        return jax.pure_callback(host, jax.ShapeDtypeStruct((), host.dtype), *xs,
                                 vmap_method="broadcast_all")

    @call.defjvp
    def no_derivative(primals, tangents):
        raise ExternalLikelihoodError(
            f"external log-likelihood '{host.name}' ({host.fn_name}) has no derivative: it is "
            "a host callback, opaque to JAX. Use an engine that needs no gradients: 'nested', "
            "'nss', 'nested+surrogate', or 'smc' with kernel='rwm' (its default for a "
            "Posterior with external sites).")

    return call(*leaves)


def _check_options(name: Any, fn: Any, batched: Any, batch_size: Any, executor: Any,
                   on_error: Any) -> None:
    if not isinstance(name, str) or not name:
        raise ModelError(f"bl.external_loglikelihood: name must be a non-empty string (the "
                         f"site's name), got {name!r}.")
    where = f"bl.external_loglikelihood('{name}', ...)"
    if not callable(fn):
        raise ModelError(f"{where}: fn must be a callable, fn(theta) -> log-likelihood, got "
                         f"{type(fn).__name__} {fn!r:.60}.")
    if not isinstance(batched, (bool, np.bool_)):
        raise ModelError(f"{where}: batched must be True (fn takes a batch (n, ...) and returns "
                         f"(n,)) or False (one point, one number), got {batched!r}.")
    if batch_size is not None and (isinstance(batch_size, (bool, np.bool_))
                                   or not isinstance(batch_size, (int, np.integer))
                                   or batch_size < 1):
        raise ModelError(f"{where}: batch_size must be a positive integer (the most points per "
                         f"call of a batched fn) or None (the whole batch), got {batch_size!r}.")
    if batch_size is not None and not batched:
        raise ModelError(f"{where}: batch_size={batch_size} is for a batched fn; pass "
                         "batched=True too, or leave batch_size out.")
    if executor is not None and not isinstance(executor, Executor):
        raise ModelError(f"{where}: executor must be a concurrent.futures.Executor (e.g. "
                         "ThreadPoolExecutor, ProcessPoolExecutor, "
                         f"bayeslik.executors.RayExecutor) or None, got {type(executor).__name__}.")
    if on_error not in ON_ERROR:
        raise ModelError(f"{where}: on_error must be one of {list(ON_ERROR)}, got {on_error!r}.")


def _leaves(name: str, theta: Any) -> tuple[list, Any]:
    """theta's leaves as JAX arrays (floating ones in JAX's float type) and its treedef; a
    ModelError naming the site for anything but an array or a dict of arrays."""
    where = f"bl.external_loglikelihood('{name}', ...)"
    if theta is None or (isinstance(theta, Mapping) and not theta):
        raise ModelError(f"{where}: theta must be an array or a non-empty dict of arrays (the "
                         f"parameters fn needs), got {theta!r}.")
    if isinstance(theta, Mapping):
        bad = [k for k in theta if not isinstance(k, str)]
        if bad:
            raise ModelError(f"{where}: theta's keys must be strings, got {bad[:3]}.")
        theta = dict(theta)
    leaves, treedef = jax.tree.flatten(theta)
    if isinstance(theta, dict) and len(leaves) != len(theta):
        raise ModelError(f"{where}: theta must be a dict of arrays, not of nested containers.")
    out = []
    for leaf in leaves:
        try:
            a = jnp.asarray(leaf)
        except (TypeError, ValueError):
            raise ModelError(f"{where}: theta holds a {type(leaf).__name__}, not an array of "
                             "numbers.") from None
        if not (jnp.issubdtype(a.dtype, jnp.floating) or jnp.issubdtype(a.dtype, jnp.integer)
                or a.dtype == jnp.bool_):
            raise ModelError(f"{where}: theta holds an array of dtype {a.dtype}; it must be "
                             "real numbers.")
        if jnp.issubdtype(a.dtype, jnp.floating):
            a = a.astype(jnp.result_type(float))
        out.append(a)
    return out, treedef


def external_loglikelihood(name: str, fn: Callable, theta: Any, *, batched: bool = False,
                           batch_size: int | None = None, executor: Executor | None = None,
                           on_error: str = "raise") -> None:
    """Add ``fn(theta)``, a log-likelihood computed outside JAX, as the program's likelihood
    term ``name``.

    Call it inside a NumPyro program, outside any plate, once per name. ``theta`` is a JAX
    array or a dict of them (e.g. the latent sites, or quantities computed from them); ``fn``
    gets them as NumPy arrays (JAX's float type: float64 under ``jax_enable_x64``) and returns
    log p(data | theta), a real number (higher is better; -inf for a zero likelihood).

    Args:
        name: the site's name (unique in the program); the pointwise log-likelihood and the
            Fit's ``log_likelihood`` group have a term of that name.
        fn: ``fn(theta) -> float``, or with ``batched=True`` ``fn(theta_batch) -> (n,)`` where
            every array of ``theta_batch`` has a leading axis of the n points. Deterministic:
            equal rows of a batch are evaluated once.
        theta: an array or a dict of arrays.
        batched: whether ``fn`` takes a batch of points (one call per batch) or one point (the
            host maps it over the batch's rows).
        batch_size: with ``batched=True``, the most points per call of ``fn`` (None: the whole
            batch); with an executor, the chunks run concurrently.
        executor: a :class:`concurrent.futures.Executor` (threads, processes,
            :class:`bayeslik.executors.RayExecutor`) over which the rows (or chunks) of one
            batch are evaluated concurrently; None: one after the other in the calling thread.
        on_error: ``"raise"`` (default: an exception of ``fn`` stops the run with an
            :class:`ExternalLikelihoodError` naming the site and the point) or ``"nan"`` (the
            point's log-likelihood is NaN, which the engines count and flag).

    Returns None: the term is evaluated lazily, only where the log density is (never while the
    program is traced to constrain or sample the prior).

    Bad arguments raise a :class:`~bayeslik.errors.ModelError` naming the site when the program
    is first run, i.e. when ``bl.Posterior`` is built.

    Example
    -------
    >>> import numpy as np, jax.numpy as jnp, numpyro, numpyro.distributions as dist
    >>> import bayeslik as bl
    >>> def loglik(theta):                       # theta: {"mu": (2,) array}
    ...     return float(-0.5 * np.sum((theta["mu"] - 1.0) ** 2))
    >>> def model():
    ...     mu = numpyro.sample("mu", dist.Normal(jnp.zeros(2), 1.0).to_event(1))
    ...     bl.external_loglikelihood("loglik", loglik, {"mu": mu})
    >>> post = bl.Posterior(model)
    >>> float(post.loglikelihood(post.unconstrain({"mu": jnp.array([1.0, 3.0])})))
    -2.0
    """
    _check_options(name, fn, batched, batch_size, executor, on_error)
    leaves, treedef = _leaves(name, theta)
    host = HostCall(name, fn, treedef, tuple(tuple(a.shape) for a in leaves),
                    jnp.result_type(float), batched=bool(batched), batch_size=batch_size,
                    executor=executor, on_error=on_error)
    d = ExternalLikelihood(host, leaves)
    numpyro.sample(name, d, obs=d.sample(None),
                   infer={"is_auxiliary": True, INFER_KEY: True})
