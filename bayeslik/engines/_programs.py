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
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Hashable

import jax
import numpy as np

from bayeslik.weights import bucket, pad_rows


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


class ProgramCache:
    """A least-recently-used cache of :class:`Programs` instances, at most ``size`` of them."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[Hashable, Programs] = OrderedDict()

    def get(self, key: Hashable, build: Callable[[], Programs]) -> Programs:
        """The instance for ``key``, built by ``build()`` on a miss."""
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
