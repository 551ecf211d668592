"""Compiled programs shared by the JAX engines: compile once per argument signature, time it,
and keep the compiled programs of recently used (Posterior, settings) pairs.

An engine subclasses :class:`Programs`, puts its jitted functions in ``self._fns`` and calls them
by name: ``progs("chunk", state, key_data, data)``. The first call with a new signature (the
shapes and dtypes of the arguments' leaves) lowers and compiles ahead of time and adds the
seconds to ``compile_s``, so a Fit's Cost can separate compilation from sampling. Every function
takes the data arrays as an argument (``posterior.at(data)``), so one compilation serves every
Posterior with the same ``cache_key`` (same program, same data shapes): :class:`ProgramCache`
keys the instances by ``(posterior.cache_key, static settings)`` and drops the least recently
used beyond its size.

:meth:`Programs.map_into` runs a program on many rows in bounded memory (each chunk's results
written into arrays allocated once at their final size); :func:`values_fn` and
:func:`pointwise_fn` are the post-processing programs of a batch of draws (constrained values;
pointwise log-likelihood), so an engine computes the second only where it keeps it.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Hashable

import jax
import numpy as np

from bayeslik.weights import bucket, pad_rows

#: the most bytes one chunk of :meth:`Programs.map_into`'s results takes (64 MiB)
CHUNK_BYTES = 64 * 2**20


class Programs:
    """Named jitted functions, compiled once per argument signature (see the module docs)."""

    def __init__(self) -> None:
        self.compile_s = 0.0
        self._fns: dict[str, Any] = {}
        self._compiled: dict[tuple, Any] = {}
        self._lock = threading.Lock()  # dynesty's pool threads call the nested programs

    def __call__(self, name: str, *args):
        sig = (name,) + tuple((np.shape(a), str(getattr(a, "dtype", type(a))))
                              for a in jax.tree.leaves(args))
        with self._lock:
            exe = self._compiled.get(sig)
            if exe is None:
                t0 = time.perf_counter()
                exe = self._fns[name].lower(*args).compile()
                self.compile_s += time.perf_counter() - t0
                self._compiled[sig] = exe
        return exe(*args)

    def map_padded(self, name: str, rows: Any, *args: Any, smallest: int = 1,
                   largest: int | None = None, fill: Any = None):
        """``self(name, rows, *args)`` on any number of ``rows`` with a handful of compiled
        shapes: in chunks of at most ``largest`` rows, each padded to a power of two (at least
        ``smallest``; :func:`bayeslik.weights.bucket`) with ``fill`` (default: a copy of the
        first row, a valid point), the results (a pytree of arrays with the rows leading) cut
        back and concatenated. The program must treat rows independently."""
        rows = np.asarray(rows)
        n = rows.shape[0]
        step = n if largest is None else int(largest)
        outs = []
        for start in range(0, max(n, 1), max(step, 1)):
            chunk = rows[start:start + step]
            out = self(name, pad_rows(chunk, bucket(chunk.shape[0], smallest), fill=fill), *args)
            outs.append(jax.tree.map(lambda a, k=chunk.shape[0]: np.asarray(a)[:k], out))
        return jax.tree.map(lambda *a: np.concatenate(a, axis=0), *outs)

    def map_into(self, name: str, rows: Any, *args: Any, smallest: int = 1,
                 largest: int | None = None, fill: Any = None, axis: int = 0,
                 chunk_bytes: int | None = None):
        """:meth:`map_padded` in bounded memory: the results are written, chunk by chunk, into
        NumPy arrays allocated once at their final size (the peak is about those arrays plus one
        chunk's results, never a list of chunks and their concatenation). A chunk has at most
        ``largest`` rows and at most ``chunk_bytes`` (default :data:`CHUNK_BYTES`) of results (a
        power of two of rows, at least one; a row's results are sized abstractly, nothing is
        run for it); each is padded to a power of two, at least ``min(smallest, that cap)``, so
        a handful of shapes compile. ``rows``: an array, or a pytree of arrays, with the rows along ``axis`` (1 for
        a program vmapped over posteriors first); the results have their rows there too."""
        rows = jax.tree.map(np.asarray, rows)
        leaves = jax.tree.leaves(rows)
        n = leaves[0].shape[axis]
        one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
            a.shape[:axis] + (1,) + a.shape[axis + 1:], a.dtype), rows)
        spec = jax.eval_shape(self._fns[name], one, *args)
        specs, tree = jax.tree.flatten(spec)
        row_bytes = sum(math.prod(s.shape) * s.dtype.itemsize for s in specs)
        chunk_bytes = CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
        fit_rows = max(1, chunk_bytes // max(row_bytes, 1))
        cap = 1 << (fit_rows.bit_length() - 1)  # the largest power of two <= fit_rows
        step = cap if largest is None else max(1, min(cap, int(largest)))
        low = min(int(smallest), cap)
        lead = (slice(None),) * axis
        outs = [np.empty(s.shape[:axis] + (n,) + s.shape[axis + 1:], s.dtype) for s in specs]
        for start in range(0, n, step):
            k = min(step, n - start)
            size = bucket(k, low)
            chunk = jax.tree.map(
                lambda a: _pad(a[lead + (slice(start, start + k),)], size, axis, fill), rows)
            res = jax.tree.leaves(self(name, chunk, *args))
            for out, r in zip(outs, res):
                out[lead + (slice(start, start + k),)] = np.asarray(r)[lead + (slice(0, k),)]
            del res, chunk
        return jax.tree.unflatten(tree, outs)


def _pad(a: np.ndarray, size: int, axis: int, fill: Any) -> np.ndarray:
    """``a`` padded to ``size`` rows along ``axis`` (see :func:`bayeslik.weights.pad_rows`)."""
    if a.shape[axis] == size:
        return a
    if axis == 0:
        return pad_rows(a, size, fill=fill)
    return np.moveaxis(pad_rows(np.moveaxis(a, axis, 0), size, fill=fill), 0, axis)


class ProgramCache:
    """A least-recently-used cache of :class:`Programs` instances, at most ``size`` of them."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[Hashable, Programs] = OrderedDict()

    def get(self, key: Hashable, build: Callable[[], Programs]) -> Programs:
        """The instance for ``key``, built by ``build()`` on a miss.

        The key is taken together with ``jax_enable_x64``: programs traced in one precision are
        never reused in the other (a data-less Posterior's key would not tell them apart)."""
        key = (key, bool(jax.config.jax_enable_x64))
        if key in self._items:
            self._items.move_to_end(key)
        else:
            self._items[key] = build()
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return self._items[key]

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


def draws_fn(posterior) -> Callable:
    """``(zs (n, ndim), data) -> (constrained values, pointwise log-likelihood)`` of a batch of
    unconstrained points, mapped in batches of 256 (bounded memory for long runs)."""

    def draws(zs, data):
        evaluate = posterior.at(data).evaluate

        def one(z):
            ev = evaluate(z)
            return ev.values, ev.pointwise_loglikelihood

        return jax.lax.map(one, zs, batch_size=256)

    return draws


def values_fn(posterior) -> Callable:
    """``(zs (n, ndim), data) -> constrained values`` {latent and deterministic site: (n, ...)}
    of a batch of unconstrained points, mapped in batches of 256 (the values half of
    :func:`draws_fn`: the same numbers, and no log-likelihood computed)."""

    def values(zs, data):
        return jax.lax.map(posterior.at(data).constrain, zs, batch_size=256)

    return values


def pointwise_fn(posterior) -> Callable:
    """``(zs (n, ndim), data) -> pointwise log-likelihood`` {observed site: (n, ...)} of a batch
    of unconstrained points, mapped in batches of 256 (the other half of :func:`draws_fn`)."""

    def pointwise(zs, data):
        return jax.lax.map(posterior.at(data).pointwise_loglikelihood, zs, batch_size=256)

    return pointwise
