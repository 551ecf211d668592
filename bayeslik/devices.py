"""CPU cores as JAX devices.

JAX runs a CPU computation on one core unless an operation is large enough to be split, so the
chains of a vectorised NUTS run share one core while the others idle. With one JAX CPU device
per core, NUTS puts its chains on different devices (``shard_map``; see
:mod:`bayeslik.engines.nuts`) and they run side by side: on a 2-core machine two chains take
the time of one, and no chain waits for another's longer tree.

Call :func:`use_cpu_cores` before JAX computes anything (first thing in a script or notebook);
the ``bayeslik`` command does it itself.
"""

from __future__ import annotations

import os

__all__ = ["use_cpu_cores"]


def use_cpu_cores(max_devices: int = 8) -> int:
    """Give JAX one CPU device per available core (at most ``max_devices``).

    Only possible before JAX has run anything; afterwards (or when ``XLA_FLAGS`` already sets
    ``--xla_force_host_platform_device_count``, which wins) nothing changes. Returns the number
    of CPU devices set, 0 when nothing was changed.

    >>> import bayeslik as bl
    >>> bl.use_cpu_cores() >= 0
    True
    """
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return 0
    import jax

    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1
    n = min(cores, int(max_devices))
    if n < 2 or getattr(jax.config, "jax_num_cpu_devices", None) == n:  # nothing to change
        return 0
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # JAX is already running: its devices stay as they are
        return 0
    return n
