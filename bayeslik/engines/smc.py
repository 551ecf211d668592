"""Adaptive tempered SMC: from the prior to the posterior, with the log evidence.

The particles start as prior draws and move through the tempered targets

    pi_lambda(z)  propto  p(z) L(z)^lambda,        0 = lambda_0 < lambda_1 < ... < lambda_T = 1,

(``p`` the prior density in unconstrained space, Jacobian included, ``L`` the likelihood). Each
stage t

1. chooses ``lambda_t`` by bisection so that the effective sample size of the incremental weights
   ``w_i = L(z_i)^(lambda_t - lambda_{t-1})`` is ``target_ess * N`` (or takes lambda_t = 1 when
   that ESS is still above the target),
2. adds ``log( (1/N) sum_i w_i )`` to the log evidence (the particles are equally weighted at the
   start of every stage),
3. resamples (systematic by default), and
4. moves every particle with MCMC steps that leave ``pi_lambda_t`` invariant: a random walk whose
   proposal covariance is the particles' covariance times a scale, or HMC whose inverse mass matrix
   is the particles' covariance (its diagonal above 100 dimensions); the scale / step size is
   tuned from the population's acceptance rate after every step, and steps continue until the
   particles have decorrelated from where the stage started (largest |correlation| below
   ``corr_threshold``), most have moved (``min_moved_fraction``) and are distinct again
   (``min_unique_fraction``), up to ``max_mutation_steps``.

A stage that ends with fewer than ``min_unique_fraction`` distinct particles is *degenerate*
(the population collapsed onto copies, the moves could not spread it): the run stops with an
:class:`~bayeslik.errors.EngineError` saying what happened and what to change, or, with
``on_degenerate="flag"``, goes on and the Fit carries a flag; its log evidence is then not to be
trusted. A stage that runs out of steps still correlated is flagged. This is the guard against
the failure of untuned mutations, where a population of copies of a few points reaches
lambda = 1 quickly and returns a wrong log evidence without complaint.

Evidence error. One run: ``var(log Z) ~ sum_t (1/ESS_t - 1/N)``, the variance that the estimate
would have if the mutations produced independent draws from each tempered target (ESS_t is the
ESS of stage t's incremental weights); it is a lower bound when they do not. Several runs
(``num_runs``): ``log Z = log mean_r Z_r`` and its standard error is the larger of
``sd_r(log Z_r) / sqrt(R)`` and the one-run estimate divided by sqrt(R).

The compiled functions (initial evaluation, one stage, post-processing) take the data arrays as an
argument and are cached by the Posterior's ``cache_key``: a second fit of the same Posterior, or of
the same program with other data of the same shapes, compiles nothing.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bayeslik.engines._programs import ProgramCache, Programs, draws_fn
from bayeslik.errors import EngineError, InitializationError
from bayeslik.fit import Cost, Fit, build_datatree

__all__ = ["SMCConfig", "SMC", "SMCState", "StageInfo", "StageParams", "WeightedParticles",
           "init", "build_stage", "stage_params", "next_temperature", "run"]

_KERNELS = ("hmc", "rwm")
_RESAMPLING = ("systematic", "stratified", "multinomial", "residual")
_DEFAULT_ACCEPT = {"hmc": 0.65, "rwm": 0.234}


@dataclass(frozen=True)
class SMCConfig:
    """Settings of the tempered SMC engine.

    num_particles : particles per run.
    num_runs : independent runs (the Fit's chains); two or more give an empirical log Z error.
    target_ess : the next temperature makes the ESS of the incremental weights this fraction of
        num_particles (smaller: fewer, bigger steps in lambda, noisier evidence).
    kernel : "hmc" (gradient-based, inverse mass matrix from the particles' covariance) or
        "rwm" (random walk, proposal covariance from the particles' covariance).
    num_leapfrog_steps : leapfrog steps per HMC move (the step size is jittered by +-20%).
    dense_mass : HMC's inverse mass matrix is the particles' covariance (True) or its diagonal
        (False); None: dense up to 100 dimensions. The random walk always uses the covariance.
    target_accept : the acceptance rate the scale / step size is tuned toward; None: 0.65 for
        HMC, 0.234 for the random walk.
    num_mutation_steps : the fewest MCMC steps per stage.
    max_mutation_steps : the most MCMC steps per stage.
    corr_threshold : mutate until the largest |correlation| (across particles) between the start
        of the stage and now, along the population's principal axes and of the log-likelihood,
        is below this (or below 3/sqrt(num_particles), the noise floor of a sample correlation,
        if that is larger) ...
    min_moved_fraction : ... and at least this fraction of the particles has had a move
        accepted (a particle never moved still carries the previous stage's selection).
    min_unique_fraction : ... and at least this fraction of the particles is distinct. A
        stage that ends with fewer distinct particles is degenerate (see on_degenerate). The
        correlation target is dropped when the correlation, still above twice the target, has
        fallen by less than 10% over the last 20 steps (it has levelled off, e.g. particles
        staying in their modes); a stage that ends still correlated is flagged.
    resampling : "systematic", "stratified", "multinomial" or "residual".
    adapt : tune the mutation from the particles (True). False uses a fixed scale ``step_size``
        with an identity covariance / mass matrix (only to study what tuning buys).
    step_size : the initial (adapt=True) or fixed (adapt=False) random-walk scale or HMC step
        size; None: 2.38/sqrt(ndim) for the random walk, ndim**-0.25 for HMC.
    max_stages : at most this many stages per run; a run that needs more stops with an
        EngineError (whatever on_degenerate says: short of lambda=1 there is no answer).
    on_degenerate : "raise" (EngineError at the first degenerate stage) or "flag" (finish the
        run and flag the Fit).
    progress_bar : a tqdm bar that moves with the temperature of each stage.
    """

    num_particles: int = 2000
    num_runs: int = 1
    target_ess: float = 0.5
    kernel: str = "hmc"
    num_leapfrog_steps: int = 10
    dense_mass: bool | None = None
    target_accept: float | None = None
    num_mutation_steps: int = 2
    max_mutation_steps: int = 100
    corr_threshold: float = 0.1
    min_moved_fraction: float = 0.98
    min_unique_fraction: float = 0.9
    resampling: str = "systematic"
    adapt: bool = True
    step_size: float | None = None
    max_stages: int = 500
    on_degenerate: str = "raise"
    progress_bar: bool = True

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> EngineError:
            return EngineError(f"SMC option {name}={getattr(self, name)!r}: {why}")

        def positive_int(name: str) -> None:
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise bad(name, "must be a positive integer.")

        for name in ("num_particles", "num_runs", "num_leapfrog_steps", "num_mutation_steps",
                     "max_mutation_steps", "max_stages"):
            positive_int(name)
        if self.num_particles < 10:
            raise bad("num_particles", "must be at least 10 (a few hundred or more is usual).")
        if self.kernel not in _KERNELS:
            raise bad("kernel", f"must be one of {list(_KERNELS)}.")
        if self.resampling not in _RESAMPLING:
            raise bad("resampling", f"must be one of {list(_RESAMPLING)}.")
        if not 0.0 < float(self.target_ess) < 1.0:
            raise bad("target_ess", "must lie strictly between 0 and 1 (0.5 is usual).")
        if self.target_accept is not None and not 0.0 < float(self.target_accept) < 1.0:
            raise bad("target_accept", "must lie strictly between 0 and 1, or be None for the "
                      "kernel's default (0.65 HMC, 0.234 random walk).")
        if self.max_mutation_steps < self.num_mutation_steps:
            raise bad("max_mutation_steps", f"must be at least num_mutation_steps="
                      f"{self.num_mutation_steps}.")
        if not 0.0 < float(self.corr_threshold) < 1.0:
            raise bad("corr_threshold", "must lie strictly between 0 and 1 (0.1 is usual).")
        if not 0.0 <= float(self.min_moved_fraction) <= 1.0:
            raise bad("min_moved_fraction", "must lie in [0, 1].")
        if not 0.0 <= float(self.min_unique_fraction) <= 1.0:
            raise bad("min_unique_fraction", "must lie in [0, 1].")
        if self.step_size is not None and not float(self.step_size) > 0:
            raise bad("step_size", "must be positive, or None for the default.")
        if self.dense_mass not in (None, True, False):
            raise bad("dense_mass", "must be True, False or None (dense up to 100 dimensions).")
        if not isinstance(self.adapt, bool):
            raise bad("adapt", "must be True or False.")
        if self.on_degenerate not in ("raise", "flag"):
            raise bad("on_degenerate", "must be 'raise' or 'flag'.")

    @property
    def accept_target(self) -> float:
        a = self.target_accept
        return _DEFAULT_ACCEPT[self.kernel] if a is None else float(a)


SMC = SMCConfig  # bl.engines.SMC(num_particles=...) reads better in user code


# ---------------------------------------------------------------------------- pure building blocks
class SMCState(NamedTuple):
    """One run's population, equally weighted, targeting pi_temperature.

    ``log_scale`` is the log of the adapted random-walk scale / HMC step size, carried from
    stage to stage.
    """

    position: jax.Array  # (N, D)
    logprior: jax.Array  # (N,)
    loglikelihood: jax.Array  # (N,)
    temperature: jax.Array
    log_evidence: jax.Array
    log_scale: jax.Array


class StageInfo(NamedTuple):
    """What one stage did (scalars unless said otherwise)."""

    temperature: jax.Array  # lambda after the stage
    ess: jax.Array  # ESS of the incremental weights (particles)
    log_evidence_increment: jax.Array
    unique_resampled: jax.Array  # fraction of distinct particles after resampling
    unique_mutated: jax.Array  # ... after the mutation
    acceptance_rate: jax.Array  # mean acceptance probability over the mutation steps
    num_mutation_steps: jax.Array
    correlation: jax.Array  # the largest start/end |correlation| (principal axes, loglik)
    scale: jax.Array  # the scale / step size at the end of the stage
    degenerate: jax.Array  # bool: too few distinct particles after max_mutation_steps
    particle_acceptance: jax.Array  # (N,) mean acceptance probability per particle


class WeightedParticles(NamedTuple):
    """The reweighted population of a stage before resampling: positions and normalised log
    weights."""

    position: jax.Array
    log_weight: jax.Array


def _tempered_value_and_grad(eval_fn: Callable, z: jax.Array, lam: jax.Array):
    """((logprior, loglikelihood), gradient of logprior + lam * loglikelihood) at one z."""
    def f(x):
        lp, ll = eval_fn(x)
        return lp + lam * ll, (lp, ll)

    (_, (lp, ll)), g = jax.value_and_grad(f, has_aux=True)(z)
    return (lp, ll), g


def _clean(x: jax.Array) -> jax.Array:
    """NaN log densities count as -inf (rejected moves, zero weights)."""
    return jnp.where(jnp.isnan(x), -jnp.inf, x)


def init(position: jax.Array, eval_fn: Callable, log_scale: float) -> SMCState:
    """The initial population at temperature 0 from prior draws ``position`` (N, D).

    ``eval_fn(z) -> (logprior, loglikelihood)`` for one flat unconstrained z.
    """
    dtype = position.dtype
    lp, ll = jax.vmap(eval_fn)(position)
    return SMCState(position, _clean(lp), _clean(ll), jnp.zeros((), dtype), jnp.zeros((), dtype),
                    jnp.asarray(log_scale, dtype))


def _log_ess(lw: jax.Array) -> jax.Array:
    return 2 * jax.nn.logsumexp(lw) - jax.nn.logsumexp(2 * lw)


def _incremental(ll: jax.Array, delta: jax.Array) -> jax.Array:
    """delta * loglikelihood, with -inf (not NaN) where the likelihood is zero."""
    return jnp.where(jnp.isneginf(ll), -jnp.inf, delta * ll)


def next_temperature(loglikelihood: jax.Array, temperature: jax.Array, target_ess: float,
                     num_bisections: int = 60) -> jax.Array:
    """The next lambda: the largest delta in (0, 1 - lambda] with ESS(delta ll) >= target N,
    by bisection (the ESS falls as delta grows)."""
    n = loglikelihood.shape[0]
    log_target = jnp.log(target_ess * n)
    rest = 1.0 - temperature

    def ok(delta):
        return _log_ess(_incremental(loglikelihood, delta)) >= log_target

    def bisect(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        good = ok(mid)
        return jnp.where(good, mid, lo), jnp.where(good, hi, mid)

    lo, hi = jax.lax.fori_loop(0, num_bisections, bisect, (jnp.zeros_like(rest), rest))
    # lo is feasible, or 0 when no delta is (fewer than target_ess * N particles have a non-zero
    # likelihood): then a tiny step drops those particles and the run moves on
    delta = jnp.maximum(lo, jnp.minimum(rest, 1e-9))
    return jnp.where(ok(rest), 1.0, jnp.minimum(temperature + delta, 1.0))


def _resampler(name: str):
    from blackjax.smc import resampling

    return getattr(resampling, name)


def _weighted_moments(z: jax.Array, log_w: jax.Array):
    w = jnp.exp(log_w - jax.nn.logsumexp(log_w))
    mean = w @ z
    dz = z - mean
    cov = (dz * w[:, None]).T @ dz
    return mean, cov


class StageParams(NamedTuple):
    """The settings a stage takes as (traced) arguments: changing them compiles nothing."""

    target_ess: jax.Array
    target_accept: jax.Array
    num_mutation_steps: jax.Array
    max_mutation_steps: jax.Array
    corr_threshold: jax.Array
    min_moved_fraction: jax.Array
    min_unique_fraction: jax.Array
    adapt: jax.Array  # bool


def stage_params(config: SMCConfig) -> StageParams:
    """The traced settings of a stage from a config (the correlation threshold is raised to
    3/sqrt(num_particles), below which a sample correlation is noise)."""
    f32 = np.float32
    return StageParams(f32(config.target_ess), f32(config.accept_target),
                       np.int32(config.num_mutation_steps), np.int32(config.max_mutation_steps),
                       f32(max(config.corr_threshold, 3 / math.sqrt(config.num_particles))),
                       f32(config.min_moved_fraction), f32(config.min_unique_fraction),
                       np.bool_(config.adapt))


def build_stage(eval_fn: Callable, kernel: str = "hmc", num_leapfrog_steps: int = 10,
                dense_mass: bool | None = None, resampling: str = "systematic") -> Callable:
    """``stage(rng_key, state, params) -> (SMCState, StageInfo, WeightedParticles)``: one
    reweight / resample / move step of adaptive tempered SMC for
    ``eval_fn(z) -> (logprior, loglikelihood)``; ``params`` is a :class:`StageParams`."""
    L = num_leapfrog_steps
    resample = _resampler(resampling)
    gain = 1.0  # log-scale change per unit of (acceptance - target), per step

    def rwm_move(key, z, lp, ll, lam, scale, chol):
        k1, k2 = jax.random.split(key)
        prop = z + scale * (chol @ jax.random.normal(k1, z.shape, z.dtype))
        lp1, ll1 = eval_fn(prop)
        lp1, ll1 = _clean(lp1), _clean(ll1)
        log_acc = jnp.nan_to_num(lp1 + lam * ll1 - (lp + lam * ll), nan=-jnp.inf)
        accept = jnp.log(jax.random.uniform(k2, (), z.dtype)) < log_acc
        new = jax.tree.map(lambda a, b: jnp.where(accept, a, b), (prop, lp1, ll1), (z, lp, ll))
        return new, accept, jnp.minimum(1.0, jnp.exp(log_acc))

    def hmc_move(key, z, lp, ll, g, lam, eps, chol, dense):
        # inverse mass matrix chol @ chol.T (the particles' covariance, or its diagonal: then
        # chol is the vector of standard deviations); momentum p ~ N(0, (chol chol^T)^-1)
        k1, k2, k3 = jax.random.split(key, 3)
        eta = jax.random.normal(k1, z.shape, z.dtype)
        if dense:
            p0 = jax.scipy.linalg.solve_triangular(chol.T, eta, lower=False)

            def velocity(p):
                return chol @ (chol.T @ p)

            def kinetic(p):
                return 0.5 * jnp.sum((chol.T @ p) ** 2)
        else:
            p0 = eta / chol

            def velocity(p):
                return chol**2 * p

            def kinetic(p):
                return 0.5 * jnp.sum((chol * p) ** 2)
        e = eps * jax.random.uniform(k2, (), z.dtype, 0.8, 1.2)

        def leapfrog(carry, _):
            x, p, lp_, ll_, g_ = carry
            p = p + 0.5 * e * g_
            x = x + e * velocity(p)
            (lp_, ll_), g_ = _tempered_value_and_grad(eval_fn, x, lam)
            p = p + 0.5 * e * g_
            return (x, p, lp_, ll_, g_), None

        (x, p, lp1, ll1, g1), _ = jax.lax.scan(leapfrog, (z, p0, lp, ll, g), None, length=L)
        lp1, ll1 = _clean(lp1), _clean(ll1)
        log_acc = (lp1 + lam * ll1 - kinetic(p)) - (lp + lam * ll - kinetic(p0))
        log_acc = jnp.where(jnp.all(jnp.isfinite(g1)), jnp.nan_to_num(log_acc, nan=-jnp.inf),
                            -jnp.inf)
        accept = jnp.log(jax.random.uniform(k3, (), z.dtype)) < log_acc
        new = jax.tree.map(lambda a, b: jnp.where(accept, a, b), (x, lp1, ll1, g1), (z, lp, ll, g))
        return new, accept, jnp.minimum(1.0, jnp.exp(log_acc))

    def max_corr(z0, ll0, z, ll, axes):
        # |correlation| across the particles between start and now, along the principal axes
        # of the population (its slowest directions) and of the log-likelihood (what the next
        # weights are made of); absolute, as HMC can anti-correlate positions, and a
        # coordinate anti-correlated is correlated in its square
        f0 = jnp.concatenate([(z0 - z0.mean(0)) @ axes, ll0[:, None]], axis=1)
        f1 = jnp.concatenate([(z - z.mean(0)) @ axes, ll[:, None]], axis=1)
        d0, d1 = f0 - f0.mean(0), f1 - f1.mean(0)
        v0, v1 = (d0**2).mean(0), (d1**2).mean(0)
        c = jnp.abs((d0 * d1).mean(0) / jnp.sqrt(v0 * v1))
        # a coordinate on which the population has collapsed has not decorrelated
        c = jnp.where((v0 > 0) & (v1 > 0) & jnp.isfinite(c), c, 1.0)
        return jnp.max(c)

    def stage(rng_key, state: SMCState, params: StageParams):
        target_acc, adapt = params.target_accept, params.adapt
        min_steps, max_steps = params.num_mutation_steps, params.max_mutation_steps
        corr_thr, min_unique = params.corr_threshold, params.min_unique_fraction
        min_moved = params.min_moved_fraction
        n, dim = state.position.shape
        dtype = state.position.dtype
        k_res, k_mut = jax.random.split(rng_key)
        lam0 = state.temperature
        lam = next_temperature(state.loglikelihood, lam0, params.target_ess).astype(dtype)
        lw = _incremental(state.loglikelihood, lam - lam0)
        log_inc = jax.nn.logsumexp(lw) - jnp.log(n).astype(dtype)
        ess = jnp.exp(_log_ess(lw))
        log_w = lw - jax.nn.logsumexp(lw)
        weighted = WeightedParticles(state.position, log_w)

        idx = resample(k_res, jnp.exp(log_w), n)
        unique_res = jnp.zeros(n, jnp.int32).at[idx].set(1).sum() / n
        z0, lp0, ll0 = state.position[idx], state.logprior[idx], state.loglikelihood[idx]

        # the mutation's shape from the reweighted population
        _, cov = _weighted_moments(state.position, log_w)
        var = jnp.diag(cov)
        floor = 1e-10 + 1e-8 * jnp.mean(var)
        dense = kernel == "rwm" or (dense_mass if dense_mass is not None else dim <= 100)
        if dense:
            chol = jnp.linalg.cholesky(cov + floor * jnp.eye(dim, dtype=dtype))
            chol = jnp.where(jnp.all(jnp.isfinite(chol)), chol, jnp.diag(jnp.sqrt(var + floor)))
            chol = jnp.where(adapt, chol, jnp.eye(dim, dtype=dtype))
        else:
            chol = jnp.where(adapt, jnp.sqrt(var + floor), jnp.ones(dim, dtype))
        _, axes = jnp.linalg.eigh(cov + floor * jnp.eye(dim, dtype=dtype))
        axes = jnp.where(jnp.all(jnp.isfinite(axes)), axes, jnp.eye(dim, dtype=dtype))
        if kernel == "hmc":
            _, g0 = jax.vmap(lambda x: _tempered_value_and_grad(eval_fn, x, lam))(z0)
        else:
            g0 = jnp.zeros((n, 0), dtype)

        def unique_frac(moved):
            unmoved_groups = jnp.zeros(n, jnp.int32).at[idx].max((~moved).astype(jnp.int32))
            return (moved.sum() + unmoved_groups.sum()) / n

        # a correlation still above twice the threshold that fell by less than 10% over the last
        # W steps has levelled off (e.g. particles that stay in their mode): more steps would
        # not bring it under the threshold (nearer the threshold, noise could fake a plateau)
        W = 20

        def cond(c):
            step, moved, hist, corr, uniq = c[0], c[-4], c[-3], c[-2], c[-1]
            plateau = ((step >= min_steps + W) & (corr > 0.9 * hist[step % W])
                       & (corr > 2 * corr_thr))
            need = (((corr > corr_thr) & ~plateau) | (uniq < min_unique)
                    | (moved.mean() < min_moved))
            return (step < min_steps) | (need & (step < max_steps))

        def body(c):
            step, key, log_scale, pos, acc_sum, moved, hist, corr, _ = c
            hist = hist.at[step % W].set(corr)  # read back W steps later
            key, sub = jax.random.split(key)
            keys = jax.random.split(sub, n)
            scale = jnp.exp(log_scale)
            if kernel == "rwm":
                (z, lp, ll), acc, prob = jax.vmap(rwm_move, in_axes=(0, 0, 0, 0, None, None, None))(
                    keys, pos[0], pos[1], pos[2], lam, scale, chol)
                pos = (z, lp, ll, pos[3])
            else:
                pos, acc, prob = jax.vmap(
                    hmc_move, in_axes=(0, 0, 0, 0, 0, None, None, None, None))(
                    keys, *pos, lam, scale, chol, dense)
            mean_acc = prob.mean()
            log_scale = jnp.where(adapt, log_scale + gain * (mean_acc - target_acc), log_scale)
            moved = moved | acc
            return (step + 1, key, log_scale, pos, acc_sum + prob, moved, hist,
                    max_corr(z0, ll0, pos[0], pos[2], axes), unique_frac(moved))

        start = (jnp.zeros((), jnp.int32), k_mut, state.log_scale, (z0, lp0, ll0, g0),
                 jnp.zeros(n, dtype), jnp.zeros(n, bool), jnp.ones(W, dtype), jnp.ones((), dtype),
                 unique_res.astype(dtype))
        steps, _, log_scale, pos, acc_sum, moved, _, corr, uniq = jax.lax.while_loop(
            cond, body, start)
        degenerate = uniq < min_unique
        new_state = SMCState(pos[0], pos[1], pos[2], lam, state.log_evidence + log_inc, log_scale)
        particle_acc = acc_sum / jnp.maximum(steps, 1)
        info = StageInfo(lam, ess, log_inc, unique_res, uniq, particle_acc.mean(), steps, corr,
                         jnp.exp(log_scale), degenerate, particle_acc)
        return new_state, info, weighted

    return stage


def default_log_scale(config: SMCConfig, ndim: int) -> float:
    """The log of the first random-walk scale / HMC step size (``step_size`` if given)."""
    if config.step_size is not None:
        return math.log(float(config.step_size))
    return math.log(2.38 / math.sqrt(ndim)) if config.kernel == "rwm" else -0.25 * math.log(ndim)


# ---------------------------------------------------------------------------- compiled programs
class _Programs(Programs):
    """The compiled functions of one (Posterior, settings) pair, compiled once per shape.

    ``init``: prior draws (N, D) -> SMCState at temperature 0. ``stage``: one stage.
    ``post``: constrained values and pointwise log-likelihood of a batch of points.
    """

    def __init__(self, posterior, config: SMCConfig):
        super().__init__()

        def eval_fn_of(data):
            evaluate = posterior.at(data).evaluate

            def eval_fn(z):
                ev = evaluate(z)
                return ev.logprior, ev.loglikelihood

            return eval_fn

        def init_fn(position, log_scale, data):
            return init(position, eval_fn_of(data), log_scale)

        def stage_fn(state, key_data, stage_index, params, data):
            key = jax.random.fold_in(jax.random.wrap_key_data(key_data), stage_index)
            stage = build_stage(eval_fn_of(data), config.kernel, config.num_leapfrog_steps,
                                config.dense_mass, config.resampling)
            return stage(key, state, params)

        post = draws_fn(posterior)

        self._fns = {"init": jax.jit(init_fn), "stage": jax.jit(stage_fn), "post": jax.jit(post)}



_CACHE = ProgramCache(32)

# the settings that change the compiled code (the others are arguments or host-side)
_STATIC = ("kernel", "num_leapfrog_steps", "dense_mass", "resampling")


def _programs(posterior, config: SMCConfig) -> _Programs:
    static = tuple((k, getattr(config, k)) for k in _STATIC)
    key = (posterior.cache_key, static)
    return _CACHE.get(key, lambda: _Programs(posterior, config))


# ---------------------------------------------------------------------------- the run
_STAGE_FIELDS = ("temperature", "ess", "log_evidence_increment", "unique_resampled",
                 "unique_mutated", "acceptance_rate", "num_mutation_steps", "correlation", "scale",
                 "degenerate")


def _degenerate_message(posterior, run: int, stage: int, info: dict, config: SMCConfig) -> str:
    return (
        f"SMC on model '{posterior.name}' degenerated at stage {stage + 1} of run {run + 1} "
        f"(lambda={info['temperature']:.4g}): after resampling "
        f"{100 * info['unique_resampled']:.1f}% of the particles were distinct and after "
        f"{int(info['num_mutation_steps'])} mutation steps (max_mutation_steps="
        f"{config.max_mutation_steps}, mean acceptance {info['acceptance_rate']:.3f}, "
        f"{config.kernel} scale {info['scale']:.3g}) still only "
        f"{100 * info['unique_mutated']:.1f}% (min_unique_fraction={config.min_unique_fraction}). "
        "The population has collapsed onto copies of a few points, so its evidence estimate "
        "would be wrong. Try more particles (num_particles), more mutation steps "
        "(max_mutation_steps), a larger target_ess, adapt=True, or the other kernel."
    )


def _stuck_flag(histories, config: SMCConfig) -> str | None:
    """A flag for stages that ended with the particles still correlated with their starting
    points (expected where the posterior has separated modes)."""
    thr = float(stage_params(config).corr_threshold)
    stuck = [c for h in histories for c in h["correlation"] if c > thr]
    if not stuck:
        return None
    total = sum(len(h["temperature"]) for h in histories)
    return (f"{len(stuck)} of {total} stages ended with the particles still correlated with "
            f"their starting points (largest correlation {max(stuck):.2f} > threshold "
            f"{thr:.3g}; the correlation levelled off or max_mutation_steps="
            f"{config.max_mutation_steps} ran out): the moves mix slowly, so the evidence error "
            "may be underestimated. This is expected for well-separated modes, which the moves "
            "do not cross; otherwise raise max_mutation_steps or num_particles.")


def run(posterior, rng_key: jax.Array, config: SMCConfig) -> Fit:
    """Run adaptive tempered SMC on ``posterior`` and return a Fit with the log evidence.

    The Fit has the equal-weight final particles in ``posterior`` (one chain per run), the
    weighted particles of the last reweighting with their ``log_weight`` in the group
    ``particles``, and the stage history in the group ``smc_stages`` (dims chain x stage).

    >>> import bayeslik as bl
    >>> from bayeslik.models import reference
    >>> prob = reference.get("normal_mean")
    >>> fit = bl.fit(prob.posterior(), "smc", num_particles=500, progress_bar=False)
    >>> bool(abs(fit.log_evidence - prob.log_evidence) < 5 * fit.log_evidence_err)
    True
    """
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    posterior.require_proper_prior("tempered SMC (it starts from prior draws)")
    N, R, D = config.num_particles, config.num_runs, posterior.ndim
    if config.kernel == "rwm" and config.adapt and N <= D + 1:
        raise EngineError(
            f"SMC option num_particles={N}: the random-walk proposal covariance is estimated from "
            f"the particles and needs more than ndim+1={D + 1} of them; use many more (hundreds)."
        )
    progs = _programs(posterior, config)
    compile_before = progs.compile_s
    data = posterior.data_arrays
    log_scale0 = np.float32(default_log_scale(config, D))
    run_keys = jax.random.split(rng_key, R)
    params = stage_params(config)

    bar = tqdm(total=R, desc=f"SMC {posterior.name}", disable=not config.progress_bar,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| lambda {n:.3f}/{total} "
                          "[{elapsed}<{remaining}{postfix}]")
    finals: list[SMCState] = []
    weighted_last: list[WeightedParticles] = []
    histories: list[dict[str, np.ndarray]] = []
    final_acc: list[np.ndarray] = []
    flags: list[str] = []
    num_evals = 0
    num_grads = 0
    per_step = config.num_leapfrog_steps if config.kernel == "hmc" else 1
    interrupted = None
    num_degenerate = 0
    try:
        for r in range(R):
            k_prior, k_run = jax.random.split(run_keys[r])
            z = posterior.sample_prior(k_prior, N)
            state = progs("init", z, log_scale0, data)
            num_evals += N
            ll0 = np.asarray(state.loglikelihood)
            if not np.isfinite(ll0).any() or not np.isfinite(np.asarray(state.logprior)).any():
                raise InitializationError(
                    f"SMC on model '{posterior.name}': none of {N} prior draws has a finite log "
                    "prior and log-likelihood. Check that the data lie in the support of the "
                    "likelihood for parameters the prior allows, and that the model has no "
                    "log(0) or division by zero."
                )
            key_data = np.asarray(jax.random.key_data(k_run))
            stages: list[dict] = []
            lam = 0.0
            while lam < 1.0:
                if len(stages) >= config.max_stages:
                    # always an error: short of lambda=1 there is neither evidence nor posterior
                    raise EngineError(
                        f"SMC on model '{posterior.name}' did not reach lambda=1 within "
                        f"max_stages={config.max_stages} stages in run {r + 1} (lambda={lam:.4g}): "
                        "the likelihood is too sharp for the particle population. Raise "
                        "max_stages or num_particles, or lower target_ess.")
                state, info, weighted = progs("stage", state, key_data, np.int32(len(stages)),
                                              params, data)
                info = jax.tree.map(np.asarray, info)
                row = {f: info._asdict()[f].item() for f in _STAGE_FIELDS}
                stages.append(row)
                steps = int(row["num_mutation_steps"])
                hmc = config.kernel == "hmc"
                num_evals += N * steps * per_step + (N if hmc else 0)
                num_grads += N * steps * per_step + N if hmc else 0
                bar.update(row["temperature"] - lam)
                lam = row["temperature"]
                bar.set_postfix_str(f"run {r + 1}/{R} stage {len(stages)} steps {steps} "
                                    f"acc {row['acceptance_rate']:.2f}")
                if row["degenerate"]:
                    msg = _degenerate_message(posterior, r, len(stages) - 1, row, config)
                    if config.on_degenerate == "raise":
                        raise EngineError(msg)
                    num_degenerate += 1
                    if num_degenerate == 1:
                        flags.append(msg)
            finals.append(state)
            weighted_last.append(jax.tree.map(np.asarray, weighted))
            final_acc.append(np.asarray(info.particle_acceptance))
            histories.append({f: np.array([s[f] for s in stages]) for f in _STAGE_FIELDS})
    except KeyboardInterrupt:
        interrupted = len(finals)
    finally:
        bar.close()
    if num_degenerate > 1:
        flags.append(f"{num_degenerate} degenerate stages in all (the first is described above); "
                     "the log evidence is not to be trusted")
    if interrupted is not None:
        if not finals:
            raise KeyboardInterrupt(
                "SMC was interrupted before its first run reached lambda=1: a partial tempered run "
                "has neither a log evidence nor particles that target the posterior, so nothing "
                "was kept.")
        flags.append(f"interrupted: kept {len(finals)} of {R} completed runs")
    return _build_fit(posterior, config, progs, compile_before, t_start, finals, weighted_last,
                      histories, final_acc, flags, num_evals, num_grads)


def _evidence(log_z: np.ndarray, var_single: np.ndarray) -> tuple[float, float, str]:
    """(log Z, its standard error, the method) from per-run estimates and one-run variances."""
    R = log_z.size
    if R == 1:
        return float(log_z[0]), float(np.sqrt(var_single[0])), "ess"
    lz = float(np.logaddexp.reduce(log_z) - np.log(R))
    empirical = float(np.std(log_z, ddof=1) / np.sqrt(R))
    single = float(np.sqrt(var_single.mean() / R))
    return lz, max(empirical, single), "runs" if empirical >= single else "ess"


def _build_fit(posterior, config, progs, compile_before, t_start, finals, weighted_last, histories,
               final_acc, flags, num_evals, num_grads) -> Fit:
    R, N, D = len(finals), config.num_particles, posterior.ndim
    stuck = _stuck_flag(histories, config)
    if stuck:
        flags.append(stuck)
    data = posterior.data_arrays
    z_final = np.stack([np.asarray(s.position) for s in finals])  # (R, N, D)
    z_weighted = np.stack([w.position for w in weighted_last])
    log_weight = np.stack([w.log_weight for w in weighted_last])
    zs = jnp.asarray(np.concatenate([z_final, z_weighted]).reshape(-1, D))
    values, pointwise = progs("post", zs, data)

    def split(tree, part):
        return {k: np.asarray(v).reshape(2, R, N, *v.shape[1:])[part] for k, v in tree.items()}

    draws, weighted_values = split(values, 0), split(values, 1)
    pointwise = split(pointwise, 0)
    lp = np.stack([np.asarray(s.logprior + s.loglikelihood) for s in finals])

    log_z = np.array([float(s.log_evidence) for s in finals])
    var_single = np.array([float(np.sum(1.0 / h["ess"] - 1.0 / N)) for h in histories])
    log_evidence, err, method = _evidence(log_z, var_single)
    if not np.isfinite(log_evidence):
        flags.append("the log evidence is not finite: every particle had zero likelihood weight")

    num_stages = max(len(h["temperature"]) for h in histories)

    def pad(a, fill):
        out = np.full(num_stages, fill, dtype=a.dtype)
        out[: a.size] = a
        return out

    stage_vars = {}
    for f in _STAGE_FIELDS:
        dtype, fill = {"degenerate": (bool, False), "num_mutation_steps": (np.int64, -1)}.get(
            f, (np.float64, np.nan))
        stage_vars[f] = (("chain", "stage"),
                         np.stack([pad(h[f].astype(dtype), fill) for h in histories]))
    evidence_attrs = {
        "log_evidence": log_evidence, "log_evidence_err": err, "log_evidence_err_method": method,
        "log_evidence_runs": log_z, "log_evidence_err_runs": np.sqrt(var_single),
        "num_particles": N, "num_runs": R,
    }
    wall = time.perf_counter() - t_start
    idata = build_datatree(
        posterior, draws,
        sample_stats={"lp": lp, "acceptance_rate": np.stack(final_acc)},
        log_likelihood=pointwise,
        extra_groups={"particles": {**weighted_values, "log_weight": log_weight}},
        attrs={"inference_library": "bayeslik", "engine": "smc", "sampling_time": wall,
               "log_evidence": log_evidence, "log_evidence_err": err},
    )
    import xarray as xr

    idata["particles"].attrs.update(evidence_attrs)
    stages = xr.Dataset(stage_vars, coords={"chain": np.arange(R), "stage": np.arange(num_stages)})
    stages.attrs["description"] = ("per stage of each run (chain): the temperature reached, the "
                                   "ESS of the incremental weights, the log evidence increment, "
                                   "distinct fractions after resampling and after mutation, mean "
                                   "acceptance, mutation steps, largest start/end correlation, "
                                   "scale/step size; NaN/-1 pad runs with fewer stages")
    idata["smc_stages"] = xr.DataTree(stages)
    compile_s = progs.compile_s - compile_before
    cost = Cost(wall_s=wall, compile_s=compile_s, num_loglik_evals=int(num_evals),
                num_grad_evals=int(num_grads) if config.kernel == "hmc" else 0,
                extra={"num_stages": [len(h["temperature"]) for h in histories],
                       "num_postprocess_evals": 2 * R * N})
    return Fit(idata=idata, engine="smc", config=dataclasses.asdict(config), seed=None, cost=cost,
               log_evidence=log_evidence, log_evidence_err=err, model=posterior.name,
               flags=tuple(flags))
