r"""SimulatorPosterior: a prior program plus a simulator, for models whose likelihood is not
available, only samples from it.

A sibling of :class:`~bayeslik.Posterior` and
:class:`~bayeslik.statespace.StateSpacePosterior` (all three derive from
:class:`~bayeslik.posterior.PosteriorBase`, the prior half): the parameters' prior is a NumPyro
program (latent sample sites, no observed or factor site), so ``constrain``/``unconstrain``/
``logprior``/``sample_prior``/``sites``/``ndim``/``cache_key`` are the usual ones. The
likelihood is a *simulator*: ``simulator(rng_key, params) -> x`` draws one dataset ``x ~ p(x |
theta)`` at the constrained parameters ``params = {site: value}``, with the shape of ``observed``.

* A JAX simulator (traceable: ``jax.numpy``, ``jax.random``, ``lax``, diffrax, ...) is vmapped
  and compiled once; batches of simulations run in one call.
* A plain Python simulator (NumPy, a C library, a subprocess) is called on the host, one
  simulation per call, in batches, through ``executor`` (any
  :class:`concurrent.futures.Executor`, e.g. :class:`bayeslik.executors.RayExecutor`) when
  given. It receives a JAX key too: ``np.random.default_rng(np.asarray(jax.random.key_data(
  rng_key)))`` makes a NumPy generator of it.

``simulator_kind="auto"`` (the default) traces the simulator once with abstract values and
takes the JAX path where that works, the Python path where it does not.

There is no ``loglikelihood``, ``logdensity``, ``evaluate`` or ``at``: engines that need a
likelihood refuse a SimulatorPosterior at ``bl.fit``; the ``"snl"`` engine
(:mod:`bayeslik.engines.snl`) learns one from simulations.

Construction checks, before anything expensive: the prior program as for every posterior;
``observed`` numeric, real and finite; the simulator callable, and one simulation at a prior
draw: it must run and return an array of ``observed``'s shape (the error names both shapes).
Simulations that return NaN or inf are counted and reported by :meth:`simulate` (the engine
leaves them out of training and flags the Fit).

Example
-------
>>> import jax, jax.numpy as jnp, numpy as np, numpyro, numpyro.distributions as dist
>>> def prior():
...     numpyro.sample("mu", dist.Normal(0.0, 1.0))
>>> def simulator(key, params):
...     return params["mu"] + 0.5 * jax.random.normal(key, (5,))
>>> post = SimulatorPosterior(prior, simulator, np.zeros(5))
>>> post.ndim, post.simulator_kind, post.observed_shape
(1, 'jax', (5,))
>>> x, bad = post.simulate(jax.random.key(0), jnp.zeros((3, 1)))
>>> x.shape, int(bad.sum())
((3, 5), 0)
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from bayeslik.errors import DataError, ModelError
from bayeslik.posterior import PosteriorBase
from bayeslik.weights import bucket

__all__ = ["SimulatorPosterior"]

#: simulations per compiled call of a JAX simulator (batches are padded to it: one compile)
JAX_BATCH = 1024


class SimulatorPosterior(PosteriorBase):
    r"""A prior program, a simulator and the observation (see the module docstring).

    Arguments:
        prior: a NumPyro program sampling the parameters (latent sites only).
        simulator: ``simulator(rng_key, params) -> x``, ``params`` the constrained values
            ``{site: value}`` (latent and deterministic sites of ``prior``).
        observed: the observed dataset, an array (any shape); simulations must have its shape.
        simulator_kind: ``"auto"``, ``"jax"`` (vmapped and compiled) or ``"python"`` (called on
            the host, one simulation per call).
        executor: for a Python simulator, a :class:`concurrent.futures.Executor` that runs the
            calls of a batch (None: one after the other in this process).
        **prior_args: the prior program's arguments.

    Raises :class:`~bayeslik.errors.ModelError` for a bad prior program or simulator and
    :class:`~bayeslik.errors.DataError` for a bad ``observed``.
    """

    def __init__(self, prior: Callable, simulator: Callable, observed: Any, *,
                 simulator_kind: str = "auto", executor: Any = None, **prior_args: Any) -> None:
        if not callable(simulator):
            raise ModelError(f"simulator must be a callable simulator(rng_key, params) -> x, got "
                             f"{type(simulator).__name__}")
        if simulator_kind not in ("auto", "jax", "python"):
            raise ModelError(f"simulator_kind={simulator_kind!r}: must be 'auto', 'jax' or "
                             "'python'.")
        if executor is not None and not hasattr(executor, "map"):
            raise ModelError(f"executor must be a concurrent.futures.Executor (with .map), got "
                             f"{type(executor).__name__}")
        obs = _check_observed(observed)
        super().__init__(prior, **prior_args)
        extra = [n for n, s in self._sites.items() if s.kind in ("observed", "factor")]
        if extra:
            raise ModelError(
                f"the prior program of a SimulatorPosterior must hold only the prior, but it has "
                f"observed/factor site(s) {extra}; the data goes in `observed` and the way it is "
                "made in `simulator`.")
        self.require_proper_prior("a SimulatorPosterior (simulations start from prior draws)")
        self.simulator = simulator
        self.observed = obs
        self.observed_shape = tuple(obs.shape)
        self.executor = executor
        self.name = getattr(prior, "__name__", "model")
        self.simulator_kind = self._detect(simulator_kind)
        self._jax_sim = None

    # ------------------------------------------------------------------ simulation
    def _detect(self, kind: str) -> str:
        """The simulator's kind, after one simulation at a prior draw (checked for shape)."""
        key = jax.random.key(0)
        z0 = self.sample_prior(jax.random.key(1), 1)[0]
        params = self.constrain(z0)
        if kind in ("auto", "jax"):
            try:
                out = jax.eval_shape(self.simulator, key, params)
            except Exception as e:  # not traceable: a host simulator (or a broken one)
                if kind == "jax":
                    raise ModelError(f"simulator_kind='jax', but the simulator cannot be traced "
                                     f"by JAX: {type(e).__name__}: {e}") from e
            else:
                if not hasattr(out, "shape"):
                    raise ModelError(f"the simulator must return one array, got "
                                     f"{type(out).__name__}")
                self._check_shape(tuple(out.shape), "the simulator")
                return "jax"
        try:
            x = self.simulator(key, jax.tree.map(np.asarray, params))
        except Exception as e:
            raise ModelError(f"the simulator failed at a prior draw {_brief(params)}: "
                             f"{type(e).__name__}: {e}") from e
        x = np.asarray(x)
        self._check_shape(tuple(x.shape), "the simulator")
        if x.dtype.kind not in "biuf":
            raise ModelError(f"the simulator returned {x.dtype} values; it must return real "
                             "numbers")
        return "python"

    def _check_shape(self, shape: tuple, what: str) -> None:
        if shape != self.observed_shape:
            raise ModelError(f"{what} returned an array of shape {shape}, but observed has shape "
                             f"{self.observed_shape}: each simulation must have the "
                             "observation's shape.")

    @property
    def num_data(self) -> int:
        """Numbers in one simulation (the dimension of ``x``)."""
        return int(math.prod(self.observed_shape))

    def simulate(self, rng_key: jax.Array, z: jax.Array) -> tuple[np.ndarray, np.ndarray]:
        """``(x, bad)``: one simulation at each unconstrained point of ``z`` (n, ndim), ``x``
        (n, *observed_shape) as a NumPy array, ``bad`` (n,) True where it holds NaN or inf (or
        the Python simulator raised; its ``x`` is then NaN)."""
        z = jnp.asarray(z)
        n = int(z.shape[0])
        keys = jax.random.split(rng_key, n)
        if self.simulator_kind == "jax":
            x = self._simulate_jax(keys, z)
        else:
            x = self._simulate_python(keys, z)
        bad = ~np.all(np.isfinite(x.reshape(n, -1)), axis=1)
        return x, bad

    def _simulate_jax(self, keys, z) -> np.ndarray:
        if self._jax_sim is None:
            sim = self.simulator
            constrain = self.constrain

            def batch(keys, z):
                return jax.vmap(lambda k, zi: jnp.asarray(sim(k, constrain(zi))))(keys, z)

            self._jax_sim = jax.jit(batch)
        n = int(z.shape[0])
        out = []
        for start in range(0, n, JAX_BATCH):
            kb, zb = keys[start:start + JAX_BATCH], z[start:start + JAX_BATCH]
            m = int(zb.shape[0])
            pad = JAX_BATCH - m if n > JAX_BATCH or m == JAX_BATCH else bucket(m) - m
            if pad:
                kb = jnp.concatenate([kb, jnp.broadcast_to(kb[:1], (pad,) + kb.shape[1:])])
                zb = jnp.concatenate([zb, jnp.broadcast_to(zb[:1], (pad,) + zb.shape[1:])])
            out.append(np.asarray(self._jax_sim(kb, zb))[:m])
        return np.concatenate(out).astype(np.result_type(self.observed.dtype, np.float32))

    def _simulate_python(self, keys, z) -> np.ndarray:
        params = jax.tree.map(np.asarray, jax.vmap(self.constrain)(z))
        n = int(z.shape[0])
        per = [{k: v[i] for k, v in params.items()} for i in range(n)]
        keys = list(keys)
        sim = _Guarded(self.simulator, self.observed_shape)
        results = list(self.executor.map(sim, keys, per)) if self.executor is not None else \
            [sim(k, p) for k, p in zip(keys, per)]
        return np.stack(results).astype(np.result_type(self.observed.dtype, np.float32))

    # ------------------------------------------------------------------ the rest of the kind
    def with_observed(self, observed: Any) -> "SimulatorPosterior":
        """The same prior and simulator with another observation of the same shape (no new
        test simulation)."""
        obs = _check_observed(observed)
        if tuple(obs.shape) != self.observed_shape:
            raise DataError(f"with_observed: observed has shape {tuple(obs.shape)}, this "
                            f"SimulatorPosterior's simulations have shape {self.observed_shape}")
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.observed = obs
        return new

    @property
    def observed_data(self) -> dict:
        """``{"x": observed}``."""
        return {"x": np.asarray(self.observed)}

    @property
    def cache_key(self) -> tuple:
        """The prior program's key plus the simulator and the observation's shape."""
        return super().cache_key + (self.simulator, self.observed_shape,
                                    str(self.observed.dtype))

    def __repr__(self) -> str:
        return (f"{super().__repr__()[:-1]}; simulator {getattr(self.simulator, '__name__', '?')}"
                f" ({self.simulator_kind}), x {self.observed_shape})")


class _Guarded:
    """A Python simulator call that returns NaN of the right shape where it raises."""

    def __init__(self, fn: Callable, shape: tuple) -> None:
        self.fn, self.shape = fn, shape

    def __call__(self, key, params):
        try:
            x = np.asarray(self.fn(key, params), dtype=np.float64)
        except Exception:  # counted as a failed simulation by simulate()
            return np.full(self.shape, np.nan)
        return x.reshape(self.shape) if x.size == math.prod(self.shape) else \
            np.full(self.shape, np.nan)


def _check_observed(observed: Any) -> np.ndarray:
    if isinstance(observed, np.ma.MaskedArray):
        raise DataError("observed is a numpy masked array; bayeslik would ignore its mask. Pass a "
                        "plain array (a simulator cannot produce masked values).")
    try:
        obs = np.asarray(observed)
    except Exception as e:
        raise DataError(f"observed must be an array of numbers: {e}") from e
    if obs.dtype.kind == "c":
        raise DataError(f"observed is complex-valued ({obs.dtype}); pass real and imaginary "
                        "parts as real numbers.")
    if obs.dtype.kind not in "biuf":
        raise DataError(f"observed holds non-numeric data ({obs.dtype}).")
    if obs.size == 0:
        raise DataError(f"observed is empty (shape {obs.shape}); there is nothing to condition on.")
    if obs.dtype.kind == "f" and not np.all(np.isfinite(obs)):
        idx = tuple(int(i) for i in np.argwhere(~np.isfinite(obs))[0])
        raise DataError(f"observed holds NaN or infinite values (the first at index {idx}); a "
                        "simulator's output cannot match them: remove or impute them.")
    if obs.dtype.kind != "f":
        obs = obs.astype(np.float64 if jax.config.read("jax_enable_x64") else np.float32)
    return obs


def _brief(params: dict) -> str:
    parts = []
    for k, v in params.items():
        a = np.asarray(v)
        parts.append(f"{k}={float(a):.3g}" if a.size == 1 else f"{k}=<{a.shape} array>")
    return "{" + ", ".join(parts[:6]) + (", ..." if len(parts) > 6 else "") + "}"
