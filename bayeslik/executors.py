"""Executors for many independent fits (comparisons, SBC, choosing K): Ray for clusters.

Every function in bayeslik that runs many fits takes ``executor=``, any
:class:`concurrent.futures.Executor`. In one process a ``ThreadPoolExecutor`` overlaps fits
whose work happens inside JAX (which releases the GIL); across processes or machines,
:class:`RayExecutor` sends each fit to a Ray worker. Posteriors travel by cloudpickle (their
compiled functions are rebuilt on the worker), so the worker only needs bayeslik installed.

Many chains or particles of *one* fit stay inside JAX instead (sharded over the local devices,
see the NUTS engine); multi-host JAX goes through ``jax.distributed.initialize`` on each host.

>>> from bayeslik.executors import RayExecutor                       # doctest: +SKIP
>>> with RayExecutor(num_cpus=4) as ex:                               # doctest: +SKIP
...     cmp = bl.compare(post, ["nuts", "smc"], seeds=8, executor=ex)
"""

from __future__ import annotations

from concurrent.futures import Executor, Future
from typing import Any, Callable

from bayeslik.errors import OptionError

__all__ = ["RayExecutor"]


def _call(fn: Callable, args: tuple, kwargs: dict) -> Any:
    return fn(*args, **kwargs)


class RayExecutor(Executor):
    """A :class:`concurrent.futures.Executor` that runs each call as a Ray task.

    Args:
        address: a running cluster's address (``"auto"`` to join the local one); None starts a
            private local instance, which ``shutdown`` stops again.
        num_cpus: CPUs of that local instance (None: all).
        cpus_per_task: CPUs Ray reserves for each call (a fit uses JAX's threads inside).
        **init_kwargs: passed to ``ray.init``.

    Needs the extra: ``pip install 'bayeslik[ray]'``.
    """

    def __init__(self, address: str | None = None, *, num_cpus: int | None = None,
                 cpus_per_task: float = 1.0, **init_kwargs: Any) -> None:
        try:
            import ray
        except ImportError:
            raise ImportError("RayExecutor needs Ray: pip install 'bayeslik[ray]' (or ray>=2.9)") \
                from None
        if cpus_per_task <= 0:
            raise OptionError(f"cpus_per_task must be positive, got {cpus_per_task!r}")
        self._ray = ray
        self._owns = not ray.is_initialized()
        if self._owns:
            kw = dict(include_dashboard=False, log_to_driver=False)
            kw.update(init_kwargs)
            if address is None and num_cpus is not None:
                kw["num_cpus"] = int(num_cpus)
            ray.init(address=address, **kw)
        self._task = ray.remote(num_cpus=cpus_per_task)(_call)
        self._closed = False

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        if self._closed:
            raise RuntimeError("cannot submit to a RayExecutor after shutdown")
        return self._task.remote(fn, args, kwargs).future()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()
