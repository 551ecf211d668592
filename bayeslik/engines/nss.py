"""The "nss" engine: JAX-native nested slice sampling (blackjax.nss) on a Posterior.

Nested sampling with a constrained hit-and-run slice sampler (Yallup, Kroupa & Handley): at each
step the ``num_delete`` live points of lowest likelihood die and are replaced by points found by
``num_inner_steps`` slice moves (along directions shaped by the live points' covariance) inside
the contour ``L > L_dead``, each started from a surviving live point. It works on the flat
*unconstrained* vector ``z`` of the Posterior with ``logprior(z)`` (Jacobian included) and
``loglikelihood(z)`` directly: no unit-cube transform is needed, only prior draws
(``Posterior.sample_prior``) to start from. Everything runs in compiled JAX (a ``lax.scan`` of
steps per chunk; a host loop between chunks checks the stopping rule and moves the progress bar),
so it runs on a GPU unchanged.

Evidence and error
    Dead point i (sorted by likelihood) has prior volume ``X_i = prod_{j<=i} t_j`` with
    ``t_j ~ Beta(n_j, 1)``, ``n_j`` the number of live points when it died (deleting k points at
    once counts as k single deaths, Fowlie, Handley & Su 2021). ``logZ = log sum_i L_i dX_i``
    with trapezoid volume elements. The engine simulates ``num_volume_samples`` volume sequences:
    ``log_evidence`` is the mean of the simulated logZ and ``log_evidence_err`` their standard
    deviation (Skilling's error from the volumes' randomness; it does not see an inner sampler that
    mixes badly).

Stopping rule
    Stop once the live points could add little: ``log(Z_dead + Z_live) - log Z_dead < dlogz``
    with ``Z_live = X * mean(L_live)``; then the live points join the dead ones. ``max_iterations``
    (steps of ``num_delete`` deaths) is a hard cap (flagged).

What the Fit holds (as for "nested")
    ``posterior``: equal-weight draws (chain=1); ``log_likelihood``: their pointwise
    log-likelihood; ``nested_samples``: every dead point (constrained values per site,
    ``log_weight`` normalised to ``logsumexp = 0``, ``loglikelihood``, ``loglikelihood_birth``,
    ``log_volume``) with the evidence in its attributes; ``Fit.log_evidence`` and its error;
    ``Cost.num_loglik_evals``: every likelihood evaluation (the initial live points and each
    slice sampler's bracket, step-out and shrink evaluations).

Example
-------
>>> import bayeslik as bl
>>> from bayeslik.models import nested_suite
>>> post = nested_suite.get("gaussian_shells_2d").posterior()
>>> fit = bl.fit(post, "nss", num_live=500, progress_bar=False)   # doctest: +SKIP
>>> round(fit.log_evidence, 1)                                     # doctest: +SKIP
-1.7
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bayeslik.engines import kit
from bayeslik.engines._programs import ProgramCache, Programs, pointwise_fn, values_fn
from bayeslik.errors import EngineError, ImproperPriorError, InitializationError
from bayeslik.fit import Fit
from bayeslik.weights import equal_weight_indices, kish_ess

__all__ = ["NSSConfig", "NSS", "run", "DeadPoints", "log_weights", "evidence"]


@dataclass(frozen=True)
class NSSConfig:
    """Settings of the nested slice sampling engine.

    num_live : live points. The logZ error shrinks as sqrt(H / num_live), H the information.
    num_delete : points replaced per step (None: max(1, num_live // 10)); larger values do more
        in parallel (GPU) at the same accuracy per dead point.
    num_inner_steps : slice moves per new point (None: max(5, 5 * ndim)); too few bias logZ
        upwards in many dimensions and leave the live points clumped (the new point stays
        correlated with its start): on the 5-D Gaussian shells 15 steps gave posterior means
        3-4 standard errors off in 2 of 3 runs, 40 steps none.
    dlogz : stop when the live points could raise logZ by less than this (nats).
    max_iterations : at most this many steps (None: no cap; flagged if reached).
    num_volume_samples : simulated prior-volume sequences for logZ's error.
    steps_per_chunk : steps per compiled chunk between host checks (None: about one e-fold of
        prior volume, num_live // num_delete).
    progress_bar : a tqdm bar over e-folds of compression.
    num_equal_weight_draws : draws in the ``posterior`` group (None: the Kish effective sample
        size of the weights).
    """

    num_live: int = 500
    num_delete: int | None = None
    num_inner_steps: int | None = None
    dlogz: float = 0.01
    max_iterations: int | None = None
    num_volume_samples: int = 100
    steps_per_chunk: int | None = None
    progress_bar: bool = True
    num_equal_weight_draws: int | None = None

    def __post_init__(self) -> None:
        check = kit.Check("NSS", self)
        check.integer("num_live", minimum=2, hint="a few hundred is typical")
        check.integer("num_delete", "num_inner_steps", "max_iterations", "steps_per_chunk",
                      "num_equal_weight_draws", optional=True)
        check.require(self.num_delete is None or self.num_delete < self.num_live, "num_delete",
                      f"must be smaller than num_live={self.num_live} (e.g. "
                      f"{max(1, self.num_live // 10)}).")
        check.integer("num_volume_samples", minimum=2, hint="100 is typical")
        check.number("dlogz", low=0.0, hint="nats, e.g. 0.01")

    def resolved(self, ndim: int) -> tuple[int, int, int]:
        """(num_delete, num_inner_steps, steps_per_chunk) with the defaults filled in."""
        k = self.num_delete or max(1, self.num_live // 10)
        inner = self.num_inner_steps or max(5, 5 * ndim)
        chunk = self.steps_per_chunk or max(1, self.num_live // k)
        return k, inner, chunk


NSS = NSSConfig


class DeadPoints(NamedTuple):
    """Dead points of a run (host arrays): unconstrained positions (n, ndim), log-likelihood at
    death, and the contour they were born in (NaN for the initial live points)."""

    position: np.ndarray
    loglikelihood: np.ndarray
    loglikelihood_birth: np.ndarray


# ---------------------------------------------------------------------------- evidence (NumPy)
def _num_live(logl: np.ndarray, birth: np.ndarray) -> np.ndarray:
    """Live points at each death, for points sorted by ``logl`` (Fowlie, Handley & Su 2021):
    births (+1) and deaths (-1) sorted by likelihood, NaN births (the prior) first."""
    n = len(logl)
    levels = np.concatenate([birth, logl])
    step = np.concatenate([np.ones(n, int), -np.ones(n, int)])
    finite = ~np.isnan(levels)
    order = np.lexsort((step, np.where(finite, levels, -np.inf), finite))
    counts = np.maximum(np.cumsum(step[order]), 0)
    return counts[step[order] == -1] + 1


def log_weights(rng: np.random.Generator, dead: DeadPoints, num_samples: int):
    """(order, log_w (n, num_samples), logX (n, num_samples)): the dead points sorted by
    likelihood (``order`` indexes ``dead``) and their log weights ``log L_i + log dX_i`` for
    ``num_samples`` simulated volume sequences (trapezoid rule)."""
    order = np.argsort(dead.loglikelihood, kind="stable")
    logl = dead.loglikelihood[order].astype(np.float64)
    nlive = _num_live(logl, dead.loglikelihood_birth[order].astype(np.float64))
    t = np.log(rng.random((len(logl), num_samples))) / nlive[:, None]  # log Beta(n, 1)
    logx = np.cumsum(t, axis=0)
    prev = np.vstack([np.zeros((1, num_samples)), logx[:-1]])
    nxt = np.vstack([logx[1:], np.full((1, num_samples), -np.inf)])
    # dX_i = (X_{i-1} - X_{i+1}) / 2
    log_dx = prev + np.log1p(-np.exp(np.minimum(nxt - prev, -1e-300))) - math.log(2)
    return order, logl[:, None] + log_dx, logx


def evidence(rng: np.random.Generator, dead: DeadPoints, num_samples: int = 100) -> dict:
    """logZ (mean over simulated volume sequences), its standard deviation, normalised log
    weights (of the mean weight), the expected log volumes, in ``dead``'s order."""
    order, log_w, logx = log_weights(rng, dead, num_samples)
    logz_samples = np.logaddexp.reduce(log_w, axis=0)
    mean_w = np.logaddexp.reduce(log_w, axis=1) - math.log(num_samples)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    lw = mean_w[inverse]
    return {
        "logz": float(np.mean(logz_samples)),
        "logzerr": float(np.std(logz_samples, ddof=1)),
        "log_weight": lw - np.logaddexp.reduce(lw),
        "log_volume": logx.mean(axis=1)[inverse],
    }


# ---------------------------------------------------------------------------- compiled programs
class _Programs(Programs):
    """``init``: live states from prior draws; ``chunk``: a scan of NS steps returning the dead
    points and likelihood-evaluation counts; ``values`` / ``pointwise``: constrained values /
    pointwise log-likelihood (the second run only where the Fit keeps it). All take the data
    arrays, so they are shared by Posteriors with one cache_key."""

    def __init__(self, posterior, num_delete: int, num_inner: int, chunk_len: int):
        import blackjax

        super().__init__()

        def algorithm(data):
            fns = posterior.at(data)

            def loglik(z):
                ll = fns.loglikelihood(z)
                return jnp.where(jnp.isnan(ll), -jnp.inf, ll)

            return blackjax.nss(fns.logprior, loglik, num_inner_steps=num_inner,
                                num_delete=num_delete)

        def init(positions, key_data, data):
            # and the prior draws whose log-likelihood / log prior is NaN or +inf: their counts
            # (2,) and the first such draw's index
            fns = posterior.at(data)
            bad = jnp.stack([_nonfinite(jax.vmap(fns.loglikelihood)(positions)),
                             _nonfinite(jax.vmap(fns.logprior)(positions))], axis=1)
            return (algorithm(data).init(positions, jax.random.wrap_key_data(key_data)),
                    bad.sum(axis=0), jnp.argmax(bad.any(axis=1)))

        def chunk(state, key_data, data):
            step = algorithm(data).step
            keys = jax.random.split(jax.random.wrap_key_data(key_data), chunk_len)

            def body(st, key):
                st, info = step(key, st)
                ui = info.update_info
                num_evals = jnp.sum(2 + ui.num_expansions + ui.num_shrink)
                p = info.particles
                return st, (p.position, p.loglikelihood, p.loglikelihood_birth, num_evals)

            return jax.lax.scan(body, state, keys)

        self._fns = {"init": jax.jit(init), "chunk": jax.jit(chunk),
                     "values": jax.jit(values_fn(posterior)),
                     "pointwise": jax.jit(pointwise_fn(posterior))}



def _nonfinite(x: jax.Array) -> jax.Array:
    """:func:`kit.nonfinite_mask` as int32."""
    return kit.nonfinite_mask(x).astype(jnp.int32)


_CACHE = ProgramCache(16)


def _programs(posterior, num_delete: int, num_inner: int, chunk_len: int) -> _Programs:
    key = (posterior.cache_key, num_delete, num_inner, chunk_len)
    return _CACHE.get(key, lambda: _Programs(posterior, num_delete, num_inner, chunk_len))


def _check_posterior(posterior, config: NSSConfig) -> tuple[int, int, int]:
    """Reject what the engine cannot use, before anything is compiled; returns
    ``config.resolved(ndim)``."""
    try:
        posterior.require_proper_prior("engine 'nss' (it starts from prior draws)")
    except ImproperPriorError as e:
        raise type(e)(str(e)) from e
    ndim = posterior.ndim
    if config.num_live <= ndim + 1:
        raise EngineError(
            f"NSS option num_live={config.num_live}: needs more than ndim + 1 = {ndim + 1} live "
            f"points for model '{posterior.name}' (the slice directions come from their "
            f"covariance); use e.g. num_live={max(100, 25 * ndim)}.")
    k, inner, chunk_len = config.resolved(ndim)
    if k >= config.num_live:
        raise EngineError(f"NSS option num_delete={k} must be smaller than num_live.")
    return k, inner, chunk_len


def _initial_state(progs: _Programs, posterior, config: NSSConfig, k_prior, k_init, data):
    """(the live state of ``num_live`` prior draws (an InitializationError if none has a finite
    log-likelihood), the counts (log-likelihood, log prior) of draws where it was NaN or +inf,
    the first such draw)."""
    positions = np.asarray(posterior.sample_prior(k_prior, config.num_live))
    state, bad, first = progs("init", positions, np.asarray(jax.random.key_data(k_init)), data)
    if not np.isfinite(np.asarray(state.particles.loglikelihood)).any():
        raise InitializationError(
            f"model '{posterior.name}': the log-likelihood is -inf or NaN at all "
            f"{config.num_live} prior draws. Check that the data fit the likelihood's support "
            "for parameters the prior allows.")
    return state, np.asarray(bad), positions[int(first)]


def _advance(bar, integrator) -> float:
    """How much the live points could still add to logZ, ``log(Z_dead + Z_live) - log Z_dead``
    (inf while Z_dead is 0); moves the bar to the e-folds of compression so far."""
    logz, logz_live = float(integrator.logZ), float(integrator.logZ_live)
    remaining = np.logaddexp(logz, logz_live) - logz if np.isfinite(logz) else np.inf
    bar.update(-float(integrator.logX) - bar.n)
    bar.set_postfix(logz=f"{logz:.3f}", dlogz=f"{remaining:.3g}")
    return remaining


def _dead_points(chunks: list, live, ndim: int) -> DeadPoints:
    """The dead points of the chunks (outputs with leading (steps, num_delete)) and the final
    live points, sorted by likelihood (stored in order of death)."""
    if chunks:
        pos = np.concatenate([c[0].reshape(-1, ndim) for c in chunks])
        logl = np.concatenate([c[1].reshape(-1) for c in chunks])
        birth = np.concatenate([c[2].reshape(-1) for c in chunks])
    else:
        pos, logl, birth = np.zeros((0, ndim), np.float32), np.zeros(0), np.zeros(0)
    dead = DeadPoints(
        np.concatenate([pos, np.asarray(live.position)]),
        np.concatenate([logl, np.asarray(live.loglikelihood)]).astype(np.float64),
        np.concatenate([birth, np.asarray(live.loglikelihood_birth)]).astype(np.float64),
    )
    order = np.argsort(dead.loglikelihood, kind="stable")
    return DeadPoints(*(a[order] for a in dead))


def _constrained(progs: _Programs, name: str, zs: np.ndarray, data) -> dict:
    """Constrained values (``name="values"``) or pointwise log-likelihood (``"pointwise"``) of
    the points ``zs`` (n, ndim), in chunks of at most 4096 padded to a power of two (at least
    256), written into arrays allocated once."""
    return progs.map_into(name, zs, data, smallest=256, largest=4096)


def _flags(config: NSSConfig, steps: int, ess: float, hit_max: bool,
           interrupted: bool) -> list[str]:
    """The flags of a run stopped before its dlogz criterion, or with few effective samples."""
    flags = []
    if hit_max:
        flags.append(f"stopped at max_iterations={config.max_iterations} before the dlogz "
                     "criterion: the live points were added as they stood")
    if interrupted:
        flags.append(f"interrupted after {steps} steps: the live points were added as they "
                     "stood, so logZ and the posterior are those of an unfinished run")
    if ess < 100:
        flags.append(f"only {ess:.0f} effective samples in the weighted dead points; use more "
                     "live points")
    return flags


def _cost_extra(dead: DeadPoints, steps: int, ess: float, num_delete: int, num_inner: int,
                num_draws: int) -> dict:
    """The engine's Cost.extra."""
    n = int(len(dead.loglikelihood))
    return {"num_steps": steps, "num_dead": n, "ess": ess, "num_delete": num_delete,
            "num_inner_steps": num_inner,
            "num_zero_likelihood": int(np.sum(~np.isfinite(dead.loglikelihood))),
            "num_postprocess_evals": n + int(num_draws)}


def _one_chain(values: dict) -> dict:
    """{name: array} with a leading chain axis of length one."""
    return {k: np.asarray(v)[None] for k, v in values.items()}


def _rng(key) -> np.random.Generator:
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())


# ---------------------------------------------------------------------------- the run
def run(posterior, rng_key: jax.Array, config: NSSConfig) -> Fit:
    """Run nested slice sampling on ``posterior``; a Fit with logZ, its error, weighted dead
    points and equal-weight draws.

    >>> fit = run(post, jax.random.key(0), NSSConfig(num_live=500))  # doctest: +SKIP
    """
    if not isinstance(config, NSSConfig):
        raise EngineError(f"run needs an NSSConfig, got {type(config).__name__}.")
    k, inner, chunk_len = _check_posterior(posterior, config)
    run = kit.Run("nss", posterior, config)
    progs = run.track(_programs(posterior, k, inner, chunk_len))
    data = posterior.data_arrays
    k_prior, k_init, k_run, k_vol, k_draw = jax.random.split(rng_key, 5)
    state, bad, point = _initial_state(progs, posterior, config, k_prior, k_init, data)
    num_evals, steps, chunks, hit_max = config.num_live, 0, [], False
    bar = run.progress(desc=f"NSS {posterior.name}", unit="e-fold",
                       bar_format="{desc}: {n:.1f} e-folds [{elapsed}{postfix}]")
    with run.interruptible(bar):
        for chunk_index in itertools.count():
            if config.max_iterations is not None and steps >= config.max_iterations:
                hit_max = True
                break
            key = np.asarray(jax.random.key_data(jax.random.fold_in(k_run, chunk_index)))
            state, out = progs("chunk", state, key, data)
            out = jax.tree.map(np.asarray, out)
            chunks.append(out)
            steps += chunk_len
            num_evals += int(out[3].sum())
            if _advance(bar, state.integrator) < config.dlogz:
                break

    dead = _dead_points(chunks, state.particles, posterior.ndim)
    ev = evidence(_rng(k_vol), dead, config.num_volume_samples)
    log_w = ev["log_weight"]
    ess = kish_ess(log_w)
    num_draws = config.num_equal_weight_draws or max(1, int(round(ess)))
    idx = equal_weight_indices(_rng(k_draw), log_w, num_draws)
    dead_values = _constrained(progs, "values", dead.position, data)
    keep = run.keep_loglikelihood(len(idx))
    pointwise = _constrained(progs, "pointwise", dead.position[idx], data) if keep else {}
    for flag in _flags(config, steps, ess, hit_max, run.interrupted):
        run.flag(flag)
    # the initial live points only: the slice proposals' values do not leave blackjax's step
    nonfinite = {**run.nonfinite(int(bad[0]), config.num_live, what="log-likelihood",
                                 point=point, scope="at the initial live points"),
                 **run.nonfinite(int(bad[1]), config.num_live, what="log prior", point=point,
                                 scope="at the initial live points")}
    attrs = {"num_live": config.num_live, "num_delete": k, "num_inner_steps": inner,
             "num_steps": steps, "ess": ess, "logz_integrator": float(state.integrator.logZ)}
    return kit.weighted_fit(
        run, _one_chain({n: np.asarray(v)[idx] for n, v in dead_values.items()}),
        group="nested_samples",
        weighted={**_one_chain(dead_values), "loglikelihood": dead.loglikelihood[None],
                  "loglikelihood_birth": dead.loglikelihood_birth[None],
                  "log_volume": ev["log_volume"][None]},
        log_weight=log_w[None], log_evidence=ev["logz"], log_evidence_err=ev["logzerr"],
        log_likelihood=_one_chain(pointwise),
        sample_stats={"loglikelihood": dead.loglikelihood[idx][None]}, group_attrs=attrs,
        num_loglik_evals=num_evals, num_grad_evals=0,
        extra={**_cost_extra(dead, steps, ess, k, inner, len(idx)), **nonfinite})
