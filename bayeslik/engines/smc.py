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
   is the particles' covariance (its diagonal above 100 dimensions). That covariance is
   cross-fitted: each half of the resampled population (sorted by parent) is moved with the
   covariance of the reweighted particles that are not its parents, as a move shaped by its own
   starting point is not invariant and biases the log evidence low (see :func:`_cross_covs`).
   The scale / step size is tuned from the population's acceptance rate after every step, and
   steps continue until the
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

Evidence error. One run (method ``"ess_lagcorr"``, :func:`single_run_variance`):
``var(log Z) ~ sum_t v_t + 2 sum_{s<t} (prod_{u=s}^{t-1} rho_u) sqrt(v_s v_t)``, where
``v_t = 1/ESS_t - 1/N`` is the variance of stage t's increment if the moves produced independent
draws from each tempered target (ESS_t the ESS of its incremental weights) and ``rho_u`` (clipped
to [0, 1]) is the correlation of the particles' log-likelihoods across stage u's moves, the memory
that carries one stage's error into the next; with independent moves it is the plain sum. Several
runs (``num_runs``): ``log Z = log mean_r Z_r`` and its standard error is the larger of
``sd_r(log Z_r) / sqrt(R)`` ("runs") and the one-run estimate divided by sqrt(R); and the runs
check their one-run errors (:func:`runs_consistency`: a chi-square test of their spread against
those errors, its p-value in the attrs as ``log_evidence_runs_pvalue``): below
:data:`RUNS_ALPHA` the Fit is flagged, the one-run error being underestimated by the factor the
message gives.

Layers, as in blackjax's ``smc.tempered``: the algorithm is :func:`init` and
:func:`build_kernel` (``kernel(rng_key, state, params) -> (SMCState, StageInfo)``, one stage),
whose MCMC move is an argument, a :class:`Move` (:func:`hmc_move`, :func:`rwm_move`, or one of
your own); :func:`run` drives the kernel from the prior to lambda = 1 on the engine kit
(:mod:`bayeslik.engines.kit`). The compiled functions (initial evaluation, one stage,
post-processing) take the data arrays as an argument and are cached by the Posterior's
``cache_key``: a second fit of the same Posterior, or of the same program with other data of the
same shapes, compiles nothing.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bayeslik.engines import kit
from bayeslik.engines.kit import Check, ProgramCache, Programs, pointwise_fn, values_fn
from bayeslik.errors import EngineError, InitializationError
from bayeslik.fit import Fit
from bayeslik.weights import RESAMPLING, log_ess, pad_rows

__all__ = ["SMCConfig", "SMC", "SMCState", "StageInfo", "StageParams", "Particle", "Move",
           "init", "build_kernel", "hmc_move", "rwm_move", "config_move", "dense_shape",
           "diagonal_shape", "stage_params", "next_temperature", "single_run_variance",
           "default_kernel", "needs_gradients", "resolve_kernel",
           "runs_consistency", "RUNS_ALPHA", "SINGLE_RUN_METHOD", "run"]

_KERNELS = ("hmc", "rwm")
_DEFAULT_ACCEPT = {"hmc": 0.65, "rwm": 0.234}


@dataclass(frozen=True)
class SMCConfig:
    """Settings of the tempered SMC engine.

    num_particles : particles per run.
    num_runs : independent runs (the Fit's chains); two or more give an empirical log Z error.
    target_ess : the next temperature makes the ESS of the incremental weights this fraction of
        num_particles (smaller: fewer, bigger steps in lambda, noisier evidence).
    kernel : "hmc" (gradient-based, inverse mass matrix from the particles' covariance) or
        "rwm" (random walk, proposal covariance from the particles' covariance); None (the
        default): "hmc", or "rwm" for a Posterior with external log-likelihood sites
        (``bl.external_loglikelihood``, no gradients), where "hmc" is refused.
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
    progress_bar : a tqdm bar that moves with the temperature of each stage (``lambda n/R``:
        the runs finished plus the current run's lambda). It shows the elapsed time but no
        time left from that rate: lambda grows unevenly (small steps first, the last stages
        jump to 1), so a rate in lambda predicts nothing. From the second run on, the time
        left is estimated from the latest completed run's wall time (its first stage, which
        compiles in run 1, left out and the rest scaled to all its stages): ``eta ~m:ss`` in
        the postfix.
    """

    num_particles: int = 2000
    num_runs: int = 1
    target_ess: float = 0.5
    kernel: str | None = None
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
        c = Check("SMC", self)
        c.integer("num_particles", "num_runs", "num_leapfrog_steps", "num_mutation_steps",
                  "max_mutation_steps", "max_stages")
        c.require(self.num_particles >= 10, "num_particles",
                  "must be at least 10 (a few hundred or more is usual).")
        if self.kernel is not None:
            c.choice("kernel", _KERNELS)
        c.choice("resampling", RESAMPLING)
        c.number("target_ess", low=0.0, high=1.0, hint="0.5 is usual")
        c.number("target_accept", low=0.0, high=1.0, optional=True,
                 hint="None is the kernel's default: 0.65 HMC, 0.234 random walk")
        c.require(self.max_mutation_steps >= self.num_mutation_steps, "max_mutation_steps",
                  f"must be at least num_mutation_steps={self.num_mutation_steps}.")
        c.number("corr_threshold", low=0.0, high=1.0, hint="0.1 is usual")
        for name in ("min_moved_fraction", "min_unique_fraction"):
            c.number(name, low=0.0, high=1.0, low_open=False, high_open=False)
        c.number("step_size", low=0.0, optional=True, hint="None is the default")
        c.require(self.dense_mass in (None, True, False), "dense_mass",
                  "must be True, False or None (dense up to 100 dimensions).")
        c.boolean("adapt")
        c.require(self.on_degenerate in ("raise", "flag"), "on_degenerate",
                  "must be 'raise' or 'flag'.")

    @property
    def accept_target(self) -> float:
        a = self.target_accept
        return _DEFAULT_ACCEPT[self.kernel or "hmc"] if a is None else float(a)


SMC = SMCConfig  # bl.engines.SMC(num_particles=...) reads better in user code


# ---------------------------------------------------------------------------- states and infos
class SMCState(NamedTuple):
    """One run's population, equally weighted, targeting pi_temperature.

    position : (N, D) the particles, flat unconstrained points.
    logprior, loglikelihood : (N,) their log prior (Jacobian included) and log-likelihood.
    temperature : lambda, the power of the likelihood in the target.
    log_evidence : the log evidence accumulated up to this temperature.
    log_scale : the log of the adapted random-walk scale / HMC step size, carried from stage to
        stage.
    """

    position: jax.Array
    logprior: jax.Array
    loglikelihood: jax.Array
    temperature: jax.Array
    log_evidence: jax.Array
    log_scale: jax.Array


class StageInfo(NamedTuple):
    """What one stage did (scalars unless said otherwise).

    temperature : lambda after the stage.
    ess : ESS (in particles) of the incremental weights.
    log_evidence_increment : log of the mean incremental weight, added to the log evidence.
    unique_resampled : fraction of distinct particles after resampling ...
    unique_mutated : ... and after the mutation.
    acceptance_rate : mean acceptance probability over the particles and mutation steps.
    num_mutation_steps : the MCMC steps the stage made.
    correlation : the largest start/end |correlation| (principal axes, log-likelihood).
    scale : the scale / step size at the end of the stage.
    degenerate : bool, too few distinct particles after the mutation.
    particle_acceptance : (N,) mean acceptance probability per particle.
    log_weight : (N,) the normalised log weights of the reweighting, of the positions the stage
        started from (before resampling).
    num_nonfinite_loglikelihood, num_nonfinite_logprior : the moves' evaluations whose
        log-likelihood / log prior was NaN or +inf (taken as zero density: rejected), as the
        move reports them (0 for a move that does not; see :class:`Move`).
    nonfinite_position : (D,) a point where one was (zeros where none was).
    loglikelihood_correlation : the signed correlation across the particles between their
        log-likelihoods at the start and at the end of the moves (1 where either is constant):
        the moves' memory that carries one stage's evidence error into the next (see
        :func:`single_run_variance`).
    """

    temperature: jax.Array
    ess: jax.Array
    log_evidence_increment: jax.Array
    unique_resampled: jax.Array
    unique_mutated: jax.Array
    acceptance_rate: jax.Array
    num_mutation_steps: jax.Array
    correlation: jax.Array
    scale: jax.Array
    degenerate: jax.Array
    particle_acceptance: jax.Array
    log_weight: jax.Array
    num_nonfinite_loglikelihood: jax.Array = None
    num_nonfinite_logprior: jax.Array = None
    nonfinite_position: jax.Array = None
    loglikelihood_correlation: jax.Array = None


class StageParams(NamedTuple):
    """The settings a stage takes as (traced) arguments: changing them compiles nothing.
    Fields as in :class:`SMCConfig` (``target_accept`` resolved, ``corr_threshold`` raised to
    the noise floor, ``adapt`` a bool array); see :func:`stage_params`."""

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


# ---------------------------------------------------------------------------- the moves
class Particle(NamedTuple):
    """One particle as a move sees it: ``position`` (D,), its ``logprior`` and
    ``loglikelihood``, and ``aux``, what the move carries besides (HMC: the gradient of the
    tempered log density; the random walk: an empty array)."""

    position: jax.Array
    logprior: jax.Array
    loglikelihood: jax.Array
    aux: jax.Array


class Move(NamedTuple):
    """An MCMC move that leaves the tempered target ``p(z) L(z)^lambda`` invariant: the argument
    of :func:`build_kernel`. Built by :func:`hmc_move` or :func:`rwm_move`, or by hand.

    precondition(cov, adapt) -> shape : the move's shape for a stage from the weighted
        covariance ``cov`` (D, D) of reweighted particles; ``adapt`` (a traced bool) False
        asks for the untuned shape (identity). Any array; the steps of the stage get it. It is
        called twice a stage, once for each half of the population, with the covariance of the
        particles that are not that half's parents (cross-fitting, :func:`_cross_covs`).
    init(position, eval_fn, temperature) -> aux : one particle's ``aux`` (see :class:`Particle`)
        after resampling, at the stage's temperature.
    step(rng_key, particle, eval_fn, temperature, scale, shape) -> (Particle, accepted,
        acceptance_probability) : one move of one particle (mapped over the population);
        ``scale`` is the adapted step size / scale, tuned toward ``target_accept`` from the mean
        acceptance probability. A step may return a fourth output, ``(nonfinite, point)``:
        int (2,), how many of its ``eval_fn`` calls gave a NaN or +inf (log-likelihood, log
        prior), and a point (D,) where one did (any point where none did); the built-in moves
        do, and the engine counts and flags them (:class:`StageInfo`).

    ``eval_fn(z) -> (logprior, loglikelihood)`` at one flat unconstrained ``z``.
    """

    precondition: Callable
    init: Callable
    step: Callable


def _clean(x: jax.Array) -> jax.Array:
    """NaN log densities count as -inf (rejected moves, zero weights)."""
    return jnp.where(jnp.isnan(x), -jnp.inf, x)


def _nonfinite(lp: jax.Array, ll: jax.Array) -> jax.Array:
    """int (2,): whether the log-likelihood ``ll`` and the log prior ``lp`` are NaN or +inf
    (-inf, a zero density, is legitimate): the counts of :class:`StageInfo`."""
    return jnp.stack([kit.nonfinite_mask(ll), kit.nonfinite_mask(lp)]).astype(jnp.int32)


def _tempered_value_and_grad(eval_fn: Callable, z: jax.Array, lam: jax.Array):
    """((logprior, loglikelihood), gradient of logprior + lam * loglikelihood) at one z."""
    def f(x):
        lp, ll = eval_fn(x)
        return lp + lam * ll, (lp, ll)

    (_, (lp, ll)), g = jax.value_and_grad(f, has_aux=True)(z)
    return (lp, ll), g


def _floor(cov: jax.Array) -> jax.Array:
    return 1e-10 + 1e-8 * jnp.mean(jnp.diag(cov))


def dense_shape(cov: jax.Array, adapt: jax.Array) -> jax.Array:
    """The Cholesky factor of ``cov`` (regularised; its diagonal's square root where the factor
    fails), or the identity unless ``adapt``: a :attr:`Move.precondition`."""
    dim, dtype = cov.shape[0], cov.dtype
    var, floor = jnp.diag(cov), _floor(cov)
    chol = jnp.linalg.cholesky(cov + floor * jnp.eye(dim, dtype=dtype))
    chol = jnp.where(jnp.all(jnp.isfinite(chol)), chol, jnp.diag(jnp.sqrt(var + floor)))
    return jnp.where(adapt, chol, jnp.eye(dim, dtype=dtype))


def diagonal_shape(cov: jax.Array, adapt: jax.Array) -> jax.Array:
    """The standard deviations of ``cov`` (regularised), or ones unless ``adapt``."""
    return jnp.where(adapt, jnp.sqrt(jnp.diag(cov) + _floor(cov)), jnp.ones(cov.shape[0], cov.dtype))


def _metropolis(key, log_acc, new: tuple, old: tuple):
    accept = jnp.log(jax.random.uniform(key, (), log_acc.dtype)) < log_acc
    chosen = jax.tree.map(lambda a, b: jnp.where(accept, a, b), new, old)
    return chosen, accept, jnp.minimum(1.0, jnp.exp(log_acc))


def rwm_move() -> Move:
    """The Gaussian random walk ``z + scale * chol @ eps``, ``chol`` the Cholesky factor of the
    particles' covariance (:func:`dense_shape`)."""

    def init(position, eval_fn, temperature):
        return jnp.zeros((0,), position.dtype)

    def step(rng_key, particle, eval_fn, lam, scale, chol):
        z, lp, ll, aux = particle
        k1, k2 = jax.random.split(rng_key)
        prop = z + scale * (chol @ jax.random.normal(k1, z.shape, z.dtype))
        lp1, ll1 = eval_fn(prop)
        bad = _nonfinite(lp1, ll1)
        lp1, ll1 = _clean(lp1), _clean(ll1)
        log_acc = jnp.nan_to_num(lp1 + lam * ll1 - (lp + lam * ll), nan=-jnp.inf)
        (z, lp, ll), accept, prob = _metropolis(k2, log_acc, (prop, lp1, ll1), (z, lp, ll))
        return Particle(z, lp, ll, aux), accept, prob, (bad, prop)

    return Move(dense_shape, init, step)


def hmc_move(num_leapfrog_steps: int = 10, dense_mass: bool | None = None) -> Move:
    """HMC with ``num_leapfrog_steps`` leapfrog steps of the step size ``scale`` jittered by
    +-20%; the inverse mass matrix is the particles' covariance (``dense_mass`` True), its
    diagonal (False), or dense up to 100 dimensions (None)."""

    def precondition(cov, adapt):
        dense = dense_mass if dense_mass is not None else cov.shape[0] <= 100
        return (dense_shape if dense else diagonal_shape)(cov, adapt)

    def init(position, eval_fn, temperature):
        return _tempered_value_and_grad(eval_fn, position, temperature)[1]

    def step(rng_key, particle, eval_fn, lam, eps, chol):
        # inverse mass matrix chol @ chol.T (the particles' covariance, or its diagonal: then
        # chol is the vector of standard deviations); momentum p ~ N(0, (chol chol^T)^-1)
        z, lp, ll, g = particle
        k1, k2, k3 = jax.random.split(rng_key, 3)
        eta = jax.random.normal(k1, z.shape, z.dtype)
        if chol.ndim == 2:
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
            x, p, lp_, ll_, g_, bad, x_bad = carry
            p = p + 0.5 * e * g_
            x = x + e * velocity(p)
            (lp_, ll_), g_ = _tempered_value_and_grad(eval_fn, x, lam)
            p = p + 0.5 * e * g_
            now = _nonfinite(lp_, ll_)
            x_bad = jnp.where((bad.sum() == 0) & (now.sum() > 0), x, x_bad)  # the first
            return (x, p, lp_, ll_, g_, bad + now, x_bad), None

        (x, p, lp1, ll1, g1, bad, x_bad), _ = jax.lax.scan(
            leapfrog, (z, p0, lp, ll, g, jnp.zeros(2, jnp.int32), z), None,
            length=num_leapfrog_steps)
        lp1, ll1 = _clean(lp1), _clean(ll1)
        log_acc = (lp1 + lam * ll1 - kinetic(p)) - (lp + lam * ll - kinetic(p0))
        log_acc = jnp.where(jnp.all(jnp.isfinite(g1)), jnp.nan_to_num(log_acc, nan=-jnp.inf),
                            -jnp.inf)
        new, accept, prob = _metropolis(k3, log_acc, (x, lp1, ll1, g1), (z, lp, ll, g))
        return Particle(*new), accept, prob, (bad, x_bad)

    return Move(precondition, init, step)


def default_kernel(posterior) -> str:
    """The move kernel ``kernel=None`` means: "rwm" for a posterior with external
    log-likelihood sites (host callbacks without gradients), else "hmc"."""
    return "rwm" if getattr(posterior, "external_sites", ()) else "hmc"


def needs_gradients(config: SMCConfig) -> bool:
    """Whether SMC with ``config`` differentiates the log density: its HMC moves do
    (``kernel=None`` is the random walk on a posterior where that matters)."""
    return config.kernel == "hmc"


def resolve_kernel(config: SMCConfig, posterior) -> SMCConfig:
    """``config`` with its kernel chosen for ``posterior`` (``kernel=None``: see
    :func:`default_kernel`); an EngineError for HMC moves on external log-likelihood sites."""
    external = tuple(getattr(posterior, "external_sites", ()) or ())
    if config.kernel == "hmc" and external:
        raise EngineError(
            f"SMC option kernel='hmc': HMC moves differentiate the log density, but the "
            f"likelihood site(s) {list(external)} are external (bl.external_loglikelihood, no "
            "gradient). Pass kernel='rwm' or leave kernel unset (the random walk is then the "
            "default).")
    return config if config.kernel is not None else replace(config,
                                                            kernel=default_kernel(posterior))


def config_move(config: SMCConfig) -> Move:
    """The built-in move ``config.kernel`` names, with the config's settings."""
    if config.kernel == "hmc":
        return hmc_move(config.num_leapfrog_steps, config.dense_mass)
    return rwm_move()


# ---------------------------------------------------------------------------- the algorithm
def init(position: jax.Array, eval_fn: Callable, log_scale: float) -> SMCState:
    """The initial population at temperature 0 from prior draws ``position`` (N, D).

    ``eval_fn(z) -> (logprior, loglikelihood)`` for one flat unconstrained z.
    """
    dtype = position.dtype
    lp, ll = jax.vmap(eval_fn)(position)
    return SMCState(position, _clean(lp), _clean(ll), jnp.zeros((), dtype), jnp.zeros((), dtype),
                    jnp.asarray(log_scale, dtype))


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
        return log_ess(_incremental(loglikelihood, delta)) >= log_target

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
    # blackjax's schemes, not bayeslik.weights': theirs draw other indices at the same key
    from blackjax.smc import resampling

    return getattr(resampling, name)


def _weighted_cov(z: jax.Array, log_w: jax.Array) -> jax.Array:
    w = jnp.exp(log_w - jax.nn.logsumexp(log_w))
    dz = z - w @ z
    return (dz * w[:, None]).T @ dz


def _cross_covs(z: jax.Array, log_w: jax.Array, idx: jax.Array, cov: jax.Array):
    """The covariances that shape the moves of the two halves of the resampled population, each
    from the reweighted particles that are no parent of that half (cross-fitting).

    ``idx`` (sorted) are the parents of the resampled particles; the first half
    (``idx[:N//2]``) has parents up to ``idx[N//2 - 1]``, so its covariance is that of the
    particles after it, and the second half's that of the particles before ``idx[N//2]``. A
    move shaped by a covariance that its own starting point entered is not invariant: the
    copies of a particle far out stretch the covariance along their own direction (by about
    ndim x its weight), the moves are not reversible, and the error does not vanish with the
    mixing unless the moves forget where they started (-0.15 nats, 1.5 of its standard errors,
    on the 20-D correlated Gaussian with 2000 particles). Sorting keeps the copies of a parent
    together, and as resampling keeps families contiguous from stage to stage, the halves are
    also nearly disjoint in their earlier ancestry. Where the other half carries less than 1%
    of the weight or fewer than ndim+1 effective particles (a few particles hold nearly all the
    weight) the half takes the covariance of all, ``cov``."""
    n, dim = z.shape
    h = n // 2
    j = jnp.arange(n)

    def of(mask):
        lw = jnp.where(mask, log_w, -jnp.inf)
        enough = (jax.nn.logsumexp(lw) > jnp.log(0.01)) & (jnp.exp(log_ess(lw)) > dim + 1)
        safe = jnp.where(enough, lw, log_w)  # never all -inf
        return jnp.where(enough, _weighted_cov(z, safe), cov)

    return of(j > idx[h - 1]), of(j < idx[h])


def _max_corr(z0, ll0, z, ll, axes):
    """|correlation| across the particles between start and now, along the principal axes of the
    population (its slowest directions) and of the log-likelihood (what the next weights are
    made of); absolute, as HMC can anti-correlate positions, and a coordinate anti-correlated is
    correlated in its square. A coordinate on which the population collapsed counts as 1."""
    f0 = jnp.concatenate([(z0 - z0.mean(0)) @ axes, ll0[:, None]], axis=1)
    f1 = jnp.concatenate([(z - z.mean(0)) @ axes, ll[:, None]], axis=1)
    d0, d1 = f0 - f0.mean(0), f1 - f1.mean(0)
    v0, v1 = (d0**2).mean(0), (d1**2).mean(0)
    c = jnp.abs((d0 * d1).mean(0) / jnp.sqrt(v0 * v1))
    return jnp.max(jnp.where((v0 > 0) & (v1 > 0) & jnp.isfinite(c), c, 1.0))


def _signed_corr(a: jax.Array, b: jax.Array) -> jax.Array:
    """The correlation of ``a`` and ``b`` (N,) across the particles; 1 where either is constant
    or not finite (no evidence of forgetting)."""
    ok = jnp.isfinite(a) & jnp.isfinite(b)
    a, b = jnp.where(ok, a, 0.0), jnp.where(ok, b, 0.0)
    m = jnp.maximum(ok.sum(), 1)
    da, db = a - a.sum() / m, b - b.sum() / m
    da, db = jnp.where(ok, da, 0.0), jnp.where(ok, db, 0.0)
    va, vb = (da**2).sum(), (db**2).sum()
    c = (da * db).sum() / jnp.sqrt(va * vb)
    return jnp.where((va > 0) & (vb > 0) & jnp.isfinite(c), c, 1.0)


def build_kernel(eval_fn: Callable, move: Move, resampling: str = "systematic") -> Callable:
    """``kernel(rng_key, state, params) -> (SMCState, StageInfo)``: one stage (reweight,
    resample, move) of adaptive tempered SMC for ``eval_fn(z) -> (logprior, loglikelihood)``,
    moving the particles with ``move`` (a :class:`Move`), each half of the resampled population
    shaped by the other half's parents' covariance; ``params`` is a :class:`StageParams`,
    ``resampling`` one of :data:`bayeslik.weights.RESAMPLING`."""
    resample = _resampler(resampling)
    gain = 1.0  # log-scale change per unit of (acceptance - target), per step
    W = 20  # the window over which a levelled-off correlation is detected

    def kernel(rng_key, state: SMCState, params: StageParams):
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
        ess = jnp.exp(log_ess(lw))
        log_w = lw - jax.nn.logsumexp(lw)

        idx = jnp.sort(resample(k_res, jnp.exp(log_w), n))  # a parent's copies side by side
        unique_res = jnp.zeros(n, jnp.int32).at[idx].set(1).sum() / n
        z0, lp0, ll0 = state.position[idx], state.logprior[idx], state.loglikelihood[idx]

        # the moves' shapes (each half's from the particles that are not its parents) and the
        # population's principal axes (from all) from the reweighted particles
        cov = _weighted_cov(state.position, log_w)
        half = n // 2
        cov_first, cov_second = _cross_covs(state.position, log_w, idx, cov)
        shapes = (move.precondition(cov_first, adapt), move.precondition(cov_second, adapt))
        _, axes = jnp.linalg.eigh(cov + _floor(cov) * jnp.eye(dim, dtype=dtype))
        axes = jnp.where(jnp.all(jnp.isfinite(axes)), axes, jnp.eye(dim, dtype=dtype))
        aux0 = jax.vmap(lambda x: move.init(x, eval_fn, lam))(z0)

        def unique_frac(moved):
            unmoved_groups = jnp.zeros(n, jnp.int32).at[idx].max((~moved).astype(jnp.int32))
            return (moved.sum() + unmoved_groups.sum()) / n

        # a correlation still above twice the threshold that fell by less than 10% over the last
        # W steps has levelled off (e.g. particles that stay in their mode): more steps would
        # not bring it under the threshold (nearer the threshold, noise could fake a plateau)
        def cond(c):
            step, moved, hist, corr, uniq = c[0], c[-4], c[-3], c[-2], c[-1]
            plateau = ((step >= min_steps + W) & (corr > 0.9 * hist[step % W])
                       & (corr > 2 * corr_thr))
            need = (((corr > corr_thr) & ~plateau) | (uniq < min_unique)
                    | (moved.mean() < min_moved))
            return (step < min_steps) | (need & (step < max_steps))

        def body(c):
            step, key, log_scale, pos, acc_sum, (bad, bad_z), moved, hist, corr, _ = c
            hist = hist.at[step % W].set(corr)  # read back W steps later
            key, sub = jax.random.split(key)
            keys = jax.random.split(sub, n)
            scale = jnp.exp(log_scale)
            out = [jax.vmap(lambda k, p, shape=shape: move.step(k, p, eval_fn, lam, scale, shape))(
                       keys[part], jax.tree.map(lambda a: a[part], pos))
                   for part, shape in zip((slice(0, half), slice(half, n)), shapes)]
            out = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), *out)
            pos, acc, prob = out[:3]
            if len(out) > 3:  # the move counts its NaN / +inf evaluations
                counts, points = out[3]
                hit = jnp.sum(counts, axis=1) > 0
                bad = bad + jnp.sum(counts, axis=0).astype(jnp.int32)
                bad_z = jnp.where(hit.any(), points[jnp.argmax(hit)].astype(dtype), bad_z)
            mean_acc = prob.mean()
            log_scale = jnp.where(adapt, log_scale + gain * (mean_acc - target_acc), log_scale)
            moved = moved | acc
            return (step + 1, key, log_scale, pos, acc_sum + prob, (bad, bad_z), moved, hist,
                    _max_corr(z0, ll0, pos.position, pos.loglikelihood, axes), unique_frac(moved))

        start = (jnp.zeros((), jnp.int32), k_mut, state.log_scale, Particle(z0, lp0, ll0, aux0),
                 jnp.zeros(n, dtype), (jnp.zeros(2, jnp.int32), jnp.zeros(dim, dtype)),
                 jnp.zeros(n, bool), jnp.ones(W, dtype), jnp.ones((), dtype),
                 unique_res.astype(dtype))
        steps, _, log_scale, pos, acc_sum, (bad, bad_z), moved, _, corr, uniq = \
            jax.lax.while_loop(cond, body, start)
        new_state = SMCState(pos.position, pos.logprior, pos.loglikelihood, lam,
                             state.log_evidence + log_inc, log_scale)
        particle_acc = acc_sum / jnp.maximum(steps, 1)
        info = StageInfo(lam, ess, log_inc, unique_res, uniq, particle_acc.mean(), steps, corr,
                         jnp.exp(log_scale), uniq < min_unique, particle_acc, log_w, bad[0], bad[1],
                         bad_z, _signed_corr(ll0, pos.loglikelihood))
        return new_state, info

    return kernel


def default_log_scale(config: SMCConfig, ndim: int) -> float:
    """The log of the first random-walk scale / HMC step size (``step_size`` if given)."""
    if config.step_size is not None:
        return math.log(float(config.step_size))
    return math.log(2.38 / math.sqrt(ndim)) if config.kernel == "rwm" else -0.25 * math.log(ndim)


# ---------------------------------------------------------------------------- compiled programs
class _Programs(Programs):
    """The compiled functions of one (Posterior, settings) pair, compiled once per shape.

    ``init``: prior draws (N, D) -> SMCState at temperature 0. ``stage``: one stage, its key
    folded from the run's key data and the stage index. ``values`` / ``pointwise``: constrained
    values / pointwise log-likelihood of a batch of points (the second run only where the Fit
    keeps it).
    """

    def __init__(self, posterior, config: SMCConfig):
        super().__init__()
        move = config_move(config)

        def eval_fn_of(data):
            evaluate = posterior.at(data).evaluate

            def eval_fn(z):
                ev = evaluate(z)
                return ev.logprior, ev.loglikelihood

            return eval_fn

        def init_fn(position, log_scale, data):
            # and the prior draws whose log-likelihood / log prior is NaN or +inf: their
            # counts (2,) and the first such draw's index
            eval_fn = eval_fn_of(data)
            bad = jax.vmap(lambda z: _nonfinite(*eval_fn(z)))(position)
            return (init(position, eval_fn, log_scale), bad.sum(axis=0),
                    jnp.argmax(bad.sum(axis=1) > 0))

        def stage_fn(key_data, stage_index, state, params, data):
            key = jax.random.fold_in(jax.random.wrap_key_data(key_data), stage_index)
            return build_kernel(eval_fn_of(data), move, config.resampling)(key, state, params)

        self._fns = {"init": jax.jit(init_fn), "stage": jax.jit(stage_fn),
                     "values": jax.jit(values_fn(posterior)),
                     "pointwise": jax.jit(pointwise_fn(posterior))}


_CACHE = ProgramCache(32)

# the settings that change the compiled code (the others are arguments or host-side)
_STATIC = ("kernel", "num_leapfrog_steps", "dense_mass", "resampling")


def _programs(posterior, config: SMCConfig) -> _Programs:
    static = tuple((k, getattr(config, k)) for k in _STATIC)
    return _CACHE.get((posterior.cache_key, static), lambda: _Programs(posterior, config))


# ---------------------------------------------------------------------------- the run
_STAGE_FIELDS = ("temperature", "ess", "log_evidence_increment", "unique_resampled",
                 "unique_mutated", "acceptance_rate", "num_mutation_steps", "correlation", "scale",
                 "degenerate", "loglikelihood_correlation")


class _Completed(NamedTuple):
    """A run that reached lambda = 1: its final state, the positions and info of its last
    stage (the last reweighting), and its stage rows {field: (num_stages,)}."""

    state: SMCState
    weighted_position: np.ndarray
    last: StageInfo
    history: dict


def run(posterior, rng_key: jax.Array, config: SMCConfig) -> Fit:
    """Run adaptive tempered SMC on ``posterior`` and return a Fit with the log evidence.

    The Fit has the equal-weight final particles in ``posterior`` (one chain per run), the
    weighted particles of the last reweighting with their ``log_weight`` in the group
    ``particles``, and the stage history in the group ``smc_stages`` (dims chain x stage).

    Ctrl-C (KeyboardInterrupt) keeps the runs that reached lambda = 1 (flagged
    ``interrupted: kept k of R completed runs``); the run in progress is dropped, as a partial
    tempered run targets ``p(z) L(z)^lambda`` with lambda < 1, not the posterior, and has no
    log evidence. An interrupt before the first run finished raises KeyboardInterrupt saying
    where the run was and how to keep part of a long fit: split it into runs (``num_runs``).

    Log densities that are NaN or +inf (at the prior draws or a move's proposals) count as zero
    density; they are counted in ``cost.extra`` (``num_nonfinite_loglikelihood``,
    ``num_nonfinite_logprior``) and flagged with the site that made them.

    >>> import bayeslik as bl
    >>> from bayeslik.models import reference
    >>> prob = reference.get("normal_mean")
    >>> fit = bl.fit(prob.posterior(), "smc", num_particles=500, progress_bar=False)
    >>> bool(abs(fit.log_evidence - prob.log_evidence) < 5 * fit.log_evidence_err)
    True
    """
    posterior.require_proper_prior("tempered SMC (it starts from prior draws)")
    config = resolve_kernel(config, posterior)
    N, R, D = config.num_particles, config.num_runs, posterior.ndim
    Check("SMC", config).require(
        config.kernel != "rwm" or not config.adapt or N > D + 1, "num_particles",
        f"the random-walk proposal covariance is estimated from the particles and needs more "
        f"than ndim+1={D + 1} of them; use many more (hundreds).")
    run = kit.Run("smc", posterior, config)
    progs = run.track(_programs(posterior, config))
    # no {remaining}: a rate in lambda predicts nothing (see the config's progress_bar)
    bar = run.progress(total=R, desc=f"SMC {posterior.name}",
                       bar_format="{desc}: {percentage:3.0f}%|{bar}| lambda {n:.3f}/{total} "
                                  "[{elapsed}{postfix}]")
    runs: list[_Completed] = []
    tally = {"evals": 0, "grads": 0, "degenerate": 0}
    with run.interruptible(bar):
        for r, key in enumerate(jax.random.split(rng_key, R)):
            runs.append(_tempered_run(key, run, progs, r, bar, tally))
    if tally["degenerate"] > 1:
        run.flag(f"{tally['degenerate']} degenerate stages in all (the first is described "
                 "above); the log evidence is not to be trusted")
    if run.interrupted:
        run.require(bool(runs), _interrupted_message(run, tally))
        run.flag(f"interrupted: kept {len(runs)} of {R} completed runs (the run in progress "
                 "was dropped)")
    nonfinite = _nonfinite_extra(run, tally)
    run.flag(_stuck_flag([c.history for c in runs], config))
    R = len(runs)
    keep = run.keep_loglikelihood(config.num_particles, num_chains=R)
    draws, weighted, pointwise = _constrained(progs, posterior, runs, keep)
    log_z = np.array([float(c.state.log_evidence) for c in runs])
    var_single = np.array([single_run_variance(c.history["ess"],
                                               c.history["loglikelihood_correlation"], N)
                           for c in runs])
    var_iid = np.array([single_run_variance(c.history["ess"], np.zeros_like(c.history["ess"]), N)
                        for c in runs])
    log_evidence, err, method = _evidence(log_z, var_single)
    checks = {}
    if R >= 2:
        checks["log_evidence_runs_pvalue"], flag = _consistency_flag(log_z, np.sqrt(var_single),
                                                                     config)
        run.flag(flag)
    if not np.isfinite(log_evidence):
        run.flag("the log evidence is not finite: every particle had zero likelihood weight")
    return kit.weighted_fit(
        run, draws, group="particles", point_dim="particle", weighted=weighted,
        log_weight=np.stack([c.last.log_weight for c in runs]),
        log_evidence=log_evidence, log_evidence_err=err, log_likelihood=pointwise,
        sample_stats={"lp": np.stack([np.asarray(c.state.logprior + c.state.loglikelihood)
                                      for c in runs]),
                      "acceptance_rate": np.stack([c.last.particle_acceptance for c in runs])},
        group_attrs={"log_evidence_err_method": method, "log_evidence_runs": log_z,
                     "log_evidence_err_runs": np.sqrt(var_single),
                     "log_evidence_err_runs_iid": np.sqrt(var_iid), "num_particles": N,
                     "num_runs": R, **checks},
        num_loglik_evals=tally["evals"], num_grad_evals=tally["grads"],
        extra={"num_stages": [len(c.history["temperature"]) for c in runs],
               "num_postprocess_evals": 2 * R * N, **nonfinite},
        more_groups={"smc_stages": _stage_dataset([c.history for c in runs])})


def _tempered_run(rng_key: jax.Array, run: kit.Run, progs: _Programs, r: int, bar,
                  tally: dict) -> _Completed:
    """Run ``r`` from prior draws to lambda = 1, adding its costs and degenerate stages to
    ``tally`` as it goes (an interrupted run's work is counted too)."""
    posterior, config = run.posterior, run.config
    N, R, data = config.num_particles, config.num_runs, posterior.data_arrays
    params = stage_params(config)
    k_prior, k_run = jax.random.split(rng_key)
    prior = posterior.sample_prior(k_prior, N)
    state, bad, first = progs("init", prior, np.float32(default_log_scale(config, posterior.ndim)),
                              data)
    tally["evals"] += N
    _count_nonfinite(tally, np.asarray(bad), N, np.asarray(prior[first]))
    tally["progress"] = (r, 0, 0.0)
    if not (np.isfinite(np.asarray(state.loglikelihood)).any()
            and np.isfinite(np.asarray(state.logprior)).any()):
        raise InitializationError(
            f"SMC on model '{posterior.name}': none of {N} prior draws has a finite log "
            "prior and log-likelihood. Check that the data lie in the support of the "
            "likelihood for parameters the prior allows, and that the model has no "
            "log(0) or division by zero.")
    key_data = np.asarray(jax.random.key_data(k_run))
    started = first_stage = time.perf_counter()
    hmc = config.kernel == "hmc"
    per_step = config.num_leapfrog_steps if hmc else 1
    rows: list[dict] = []
    lam = 0.0
    while lam < 1.0:
        if len(rows) >= config.max_stages:
            # always an error: short of lambda=1 there is neither evidence nor posterior
            raise EngineError(
                f"SMC on model '{posterior.name}' did not reach lambda=1 within "
                f"max_stages={config.max_stages} stages in run {r + 1} (lambda={lam:.4g}): "
                "the likelihood is too sharp for the particle population. Raise "
                "max_stages or num_particles, or lower target_ess.")
        start = state.position
        state, info = progs("stage", key_data, np.int32(len(rows)), state, params, data)
        info = jax.tree.map(np.asarray, info)
        row = {f: getattr(info, f).item() for f in _STAGE_FIELDS}
        rows.append(row)
        steps = int(row["num_mutation_steps"])
        tally["evals"] += N * steps * per_step + (N if hmc else 0)
        _count_nonfinite(tally, np.array([info.num_nonfinite_loglikelihood,
                                          info.num_nonfinite_logprior]), N * steps * per_step,
                         info.nonfinite_position)
        tally["progress"] = (r, len(rows), row["temperature"])
        tally["grads"] += N * steps * per_step + N if hmc else 0
        if len(rows) == 1:
            first_stage = time.perf_counter()
        bar.update(row["temperature"] - lam)
        lam = row["temperature"]
        bar.set_postfix_str(f"run {r + 1}/{R} stage {len(rows)} steps {steps} "
                            f"acc {row['acceptance_rate']:.2f}" + _eta(tally, r, R, started))
        if row["degenerate"]:
            msg = _degenerate_message(posterior, r, len(rows) - 1, row, config)
            if config.on_degenerate == "raise":
                raise EngineError(msg)
            tally["degenerate"] += 1
            if tally["degenerate"] == 1:
                run.flag(msg)
    # the run's wall time without its first stage (which compiles the programs in run 1), scaled
    # to all its stages: what a further run takes
    end = time.perf_counter()
    per_run = ((end - first_stage) * len(rows) / (len(rows) - 1) if len(rows) > 1
               else end - started)
    tally.setdefault("run_walls", []).append(per_run)
    return _Completed(state, np.asarray(start), info,
                      {f: np.array([s[f] for s in rows]) for f in _STAGE_FIELDS})


def _eta(tally: dict, r: int, R: int, started: float) -> str:
    """The bar's time left (", eta ~m:ss") once a run has finished: the latest completed run's
    wall time (its compile left out) for each run not finished, less the time the current one
    has run; "" before (within one run nothing predicts the stages still to come)."""
    walls = tally.get("run_walls") or []
    if not walls:
        return ""
    left = max(walls[-1] * (R - r) - (time.perf_counter() - started), 0.0)
    return f", eta ~{_clock(left)}"


def _clock(seconds: float) -> str:
    """``m:ss`` (``h:mm:ss`` from an hour), as tqdm writes times."""
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def _count_nonfinite(tally: dict, bad: np.ndarray, checked: int, point=None) -> None:
    """Add (log-likelihood, log prior) counts of NaN / +inf evaluations out of ``checked``; keep
    the ``point`` given where there were some (a prior draw or a proposal; up to 16)."""
    tally["nonfinite"] = tally.get("nonfinite", np.zeros(2, np.int64)) + bad.astype(np.int64)
    tally["checked"] = tally.get("checked", 0) + int(checked)
    points = tally.setdefault("points", [])
    if point is not None and bad.sum() > 0 and len(points) < 16:
        points.append(np.asarray(point))


def _nonfinite_extra(run: kit.Run, tally: dict) -> dict:
    """Cost.extra's counts of NaN / +inf log-likelihoods and log priors (prior draws and every
    move's proposals), flagged with the site that made them."""
    bad, checked = tally.get("nonfinite", np.zeros(2)), tally.get("checked", 0)
    point = np.stack(tally["points"]) if tally.get("points") else None
    return {**run.nonfinite(int(bad[0]), checked, what="log-likelihood", point=point),
            **run.nonfinite(int(bad[1]), checked, what="log prior", point=point)}


def _interrupted_message(run: kit.Run, tally: dict) -> str:
    """What an interrupt before the first run reached lambda=1 loses, and how to keep it."""
    config = run.config
    r, stages, lam = tally.get("progress", (0, 0, 0.0))
    R, N = config.num_runs, config.num_particles
    how = (f"split it into runs (e.g. num_runs=4, num_particles={max(N // 4, 10)})" if R == 1
           else f"use more, smaller runs (e.g. num_runs={2 * R}, num_particles={max(N // 2, 10)})")
    return (f"SMC was interrupted in run {r + 1} of {R} at stage {stages} (lambda={lam:.3g}, "
            f"after {run.wall_s:.0f} s), before its first run reached lambda=1: a partial "
            "tempered run targets p(z) L(z)^lambda, not the posterior, and has no log evidence, "
            "so nothing was kept. An interrupted fit keeps the runs it finished: to keep part "
            f"of a long fit, {how}.")


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


#: the significance level of the runs' self-check (:func:`runs_consistency`)
RUNS_ALPHA = 1e-3

#: the name of the one-run error in the group attrs ``log_evidence_err_method``
SINGLE_RUN_METHOD = "ess_lagcorr"


def single_run_variance(ess, lag_corr, num_particles: int) -> float:
    r"""The variance of one run's log evidence from its stages' ESS and the moves' memory.

    ``ess`` (T,): the ESS of each stage's incremental weights; ``lag_corr`` (T,): the signed
    correlation across the particles between their log-likelihoods before and after each
    stage's moves (:attr:`StageInfo.loglikelihood_correlation`); ``num_particles``: N.

    Derivation. The log evidence is :math:`\sum_t \log \hat Z_t`, where :math:`\hat Z_t`
    is the mean incremental weight :math:`w_t = L^{\lambda_t - \lambda_{t-1}}` over the
    population that stage t-1's moves left. Its error :math:`e_t \approx \hat Z_t / Z_t - 1`
    has variance :math:`v_t = 1/\mathrm{ESS}_t - 1/N` when that population is N independent
    draws of :math:`\pi_{t-1}` (the chi-square distance of :math:`w_t`, estimated by the
    weights' ESS). Moves that do not quite forget where they started leave each particle
    correlated with its start: take their action on functions of the log-likelihood (the
    weights of every stage are such functions) to be autoregressive, :math:`E[f(X_{end}) |
    X_{start}] - \pi f \approx \rho_t (f(X_{start}) - \pi f)`, with :math:`\rho_t` the
    measured start/end correlation of the log-likelihood. Then the error that stage t's
    population carries in the function of the next weights is :math:`\rho_t` times the error
    of its starting (resampled) population, which shares the error :math:`e_t` of the
    reweighting through the same particles: :math:`\mathrm{cov}(e_t, e_{t+1}) \le \rho_t
    \sqrt{v_t v_{t+1}}` (the correlation of the two weight functions bounded by one), and
    over several stages :math:`\mathrm{cov}(e_s, e_t) \le \prod_{u=s}^{t-1} \rho_u
    \sqrt{v_s v_t}`. So

    .. math::

        \mathrm{var}(\log \hat Z) \approx \sum_t v_t
            + 2 \sum_{s < t} \Big(\prod_{u=s}^{t-1} \rho_u\Big) \sqrt{v_s v_t},

    with :math:`\rho_u` clipped to [0, 1]: a negative correlation (antithetic moves, as HMC's
    can be) would lower the variance, which this estimate does not claim. With independent
    moves (all :math:`\rho = 0`) it is the perfect-mixing :math:`\sum_t v_t`; with moves that
    never forget (all :math:`\rho = 1`) it is :math:`(\sum_t \sqrt{v_t})^2`, errors that
    add up instead of averaging out. The last stage's moves carry no error into a later
    reweighting, so its correlation does not enter. The estimate of :math:`\rho` is noisy
    (standard error about :math:`1/\sqrt N`); clipped at 0 it adds about
    :math:`0.4/\sqrt N` per stage where the moves are independent, which the sum scales by
    at most :math:`2 v_t` each.

    >>> single_run_variance([500.0, 500.0], [0.0, 0.0], 1000)  # 2 (1/500 - 1/1000)
    0.002
    >>> round(single_run_variance([500.0, 500.0], [0.5, 0.0], 1000), 6)  # + 2 x 0.5 x 0.001
    0.003
    """
    ess = np.asarray(ess, dtype=np.float64)
    rho = np.clip(np.nan_to_num(np.asarray(lag_corr, dtype=np.float64), nan=1.0), 0.0, 1.0)
    v = np.maximum(1.0 / ess - 1.0 / num_particles, 0.0)
    sd = np.sqrt(v)
    total, carried = float(v.sum()), 0.0
    for t in range(1, v.size):
        # carried = sum_{s<t} prod_{u=s}^{t-1} rho_u sd_s
        carried = rho[t - 1] * (carried + sd[t - 1])
        total += 2.0 * carried * sd[t]
    return float(total)


def runs_consistency(log_z, err) -> tuple[float, float]:
    r"""(p-value, factor): whether R >= 2 runs' log evidences ``log_z`` scatter as their own
    one-run standard errors ``err`` say.

    The statistic is :math:`X = \sum_r (\log Z_r - m)^2 / \mathrm{err}_r^2` around the
    precision-weighted mean m; with the runs independent and each error right it is
    chi-square with R-1 degrees of freedom, and the p-value is its upper tail. ``factor`` is
    :math:`\sqrt{X / (R - 1)}`, about how many times the runs' spread exceeds the claimed
    errors. NaN, NaN for fewer than two runs or errors that are not positive and finite.

    >>> p, f = runs_consistency([0.0, 0.1, -0.1, 0.05], [0.1, 0.1, 0.1, 0.1])
    >>> bool(p > 0.1), round(f, 2)
    (True, 0.85)
    >>> p, f = runs_consistency([0.0, 1.0, -1.0, 0.5], [0.1, 0.1, 0.1, 0.1])
    >>> bool(p < 1e-3), round(f, 1)
    (True, 8.5)
    """
    from scipy import stats

    log_z, err = np.asarray(log_z, dtype=np.float64), np.asarray(err, dtype=np.float64)
    R = log_z.size
    if R < 2 or not (np.all(np.isfinite(log_z)) and np.all(np.isfinite(err)) and np.all(err > 0)):
        return float("nan"), float("nan")
    w = 1.0 / err**2
    m = float(np.sum(w * log_z) / np.sum(w))
    x = float(np.sum(w * (log_z - m) ** 2))
    return float(stats.chi2.sf(x, R - 1)), math.sqrt(x / (R - 1))


def _consistency_flag(log_z, err, config: SMCConfig) -> tuple[float, str | None]:
    """The runs' self-check: its p-value and, below :data:`RUNS_ALPHA`, the flag."""
    p, factor = runs_consistency(log_z, err)
    if not (p < RUNS_ALPHA):
        return p, None
    R = len(log_z)
    return p, (
        f"the {R} runs' log evidences scatter {factor:.2g} times more than their one-run "
        f"errors allow (chi-square test, p = {p:.1e} < {RUNS_ALPHA:g}): the error of a single "
        "run is underestimated by about that factor, as the moves carry each stage's error into "
        "the next. The Fit's log_evidence_err is taken from the runs' spread; to trust single "
        "runs, let the moves mix more (raise num_mutation_steps, lower corr_threshold) or "
        f"raise num_particles (now {config.num_particles}), and keep num_runs >= 4.")


def _evidence(log_z: np.ndarray, var_single: np.ndarray) -> tuple[float, float, str]:
    """(log Z, its standard error, the method) from per-run estimates and one-run variances
    (:func:`single_run_variance`): one run reports its own error; several runs
    ``log mean_r Z_r`` and the larger of sd_r(log Z_r)/sqrt(R) ("runs") and the mean one-run
    error over sqrt(R) (:data:`SINGLE_RUN_METHOD`)."""
    R = log_z.size
    if R == 1:
        return float(log_z[0]), float(np.sqrt(var_single[0])), SINGLE_RUN_METHOD
    lz = float(np.logaddexp.reduce(log_z) - np.log(R))
    empirical = float(np.std(log_z, ddof=1) / np.sqrt(R))
    single = float(np.sqrt(var_single.mean() / R))
    return lz, max(empirical, single), "runs" if empirical >= single else SINGLE_RUN_METHOD


def _constrained(progs: _Programs, posterior, runs: list[_Completed], keep: bool):
    """(draws, weighted values, pointwise log-likelihood of the draws, or {} unless ``keep``),
    {name: (R, N, ...)}: the final particles and the last reweighting's, constrained in one
    batch; the draws' log-likelihood in chunks written into arrays allocated once."""
    R, D = len(runs), posterior.ndim
    z_final = np.stack([np.asarray(c.state.position) for c in runs])  # (R, N, D)
    z_weighted = np.stack([c.weighted_position for c in runs])
    zs = np.concatenate([z_final, z_weighted]).reshape(-1, D)
    values = progs.map_into("values", zs, posterior.data_arrays)
    pointwise = (progs.map_into("pointwise", z_final.reshape(-1, D), posterior.data_arrays)
                 if keep else {})

    def split(tree, part, parts=2):
        return {k: np.asarray(v).reshape(parts, R, -1, *v.shape[1:])[part] for k, v in tree.items()}

    return split(values, 0), split(values, 1), split(pointwise, 0, parts=1)


def _stage_dataset(histories: list[dict]):
    """The stage history, dims (chain, stage), runs with fewer stages padded with NaN / -1."""
    import xarray as xr

    num_stages = max(len(h["temperature"]) for h in histories)
    stage_vars = {}
    for f in _STAGE_FIELDS:
        dtype, fill = {"degenerate": (bool, False), "num_mutation_steps": (np.int64, -1)}.get(
            f, (np.float64, np.nan))
        stage_vars[f] = (("chain", "stage"), np.stack([pad_rows(h[f].astype(dtype), num_stages,
                                                                fill) for h in histories]))
    stages = xr.Dataset(stage_vars, coords={"chain": np.arange(len(histories)),
                                            "stage": np.arange(num_stages)})
    stages.attrs["description"] = ("per stage of each run (chain): the temperature reached, the "
                                   "ESS of the incremental weights, the log evidence increment, "
                                   "distinct fractions after resampling and after mutation, mean "
                                   "acceptance, mutation steps, largest start/end correlation, "
                                   "scale/step size; NaN/-1 pad runs with fewer stages")
    return stages
