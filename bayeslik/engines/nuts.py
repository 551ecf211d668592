"""The NUTS engine: blackjax's iterative NUTS with Stan's windowed warmup, on a Posterior.

The algorithm is written as blackjax writes its own, in pure functions of NamedTuple states:

* :func:`init` ``(rng_key, position, logdensity_fn, config) -> ChainState`` starts a chain as
  Stan does (identity metric, the step size found by Stan's heuristic from 1);
* :func:`build_kernel` ``(logdensity_fn, config) -> kernel(rng_key, state) -> (ChainState,
  DrawInfo)`` is one plain NUTS transition at the state's step size and metric;
* :func:`build_warmup` ``(logdensity_fn, config) -> (init, kernel)`` is Stan's adaptive
  sampler around that kernel: ``kernel(rng_key, state, stage, window_end) -> (WarmupState,
  DrawInfo)`` makes one NUTS transition, then adapts by :func:`build_adapt` (dual averaging of
  the step size, the Welford metric windows, and at each window's end the metric update with the
  step size found again under the new metric, step for step as Stan's ``stan::mcmc``
  ``stepsize_adaptation``, ``windowed_adaptation`` and ``base_hmc::init_stepsize``);
  :func:`warmup_schedule` gives the stages, :func:`end_warmup` the step size to sample with.
  ``NUTSConfig(mass_adaptation="fisher")`` adapts the diagonal metric from the draws and their
  gradients instead (:func:`build_fisher_adapt`, :func:`fisher_inverse_mass`, nutpie's
  :func:`fisher_schedule`), in the same compiled warmup.

``run`` is the engine's logic on the run layer of :mod:`bayeslik.engines.kit`. Chains are
vectorised with ``vmap`` on one device and split over devices with ``shard_map`` when there are
several. The warmup and the sampling run as a few chunks of a ``lax.scan``, each chunk one call
of a function compiled once (warmup and sampling share it: the stage decides what is adapted),
so a progress bar can move between chunks and an interrupted run keeps every draw made before
the interrupt.

The compiled functions take the data arrays as an argument and are cached by the Posterior's
``cache_key`` (program, non-array arguments, data shapes) and the settings that change the code:
fitting the same Posterior again, or the same program to other data of the same shapes (SBC,
cross-validation, refits), compiles nothing.
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bayeslik.engines import kit
from bayeslik.errors import EngineError, InitializationError
from bayeslik.fit import Fit
from bayeslik.inits import default_init, start_candidates

__all__ = ["NUTSConfig", "NUTS", "run", "run_many", "init", "build_kernel", "build_warmup",
           "build_adapt", "end_warmup", "warmup_schedule", "dual_averaging",
           "find_reasonable_step_size", "ChainState", "DrawInfo", "WarmupState",
           "DualAveragingState", "INITIAL_STEP_SIZE", "FAST", "SLOW", "SAMPLING", "RESTART",
           "MASS_ADAPTATIONS", "build_fisher_adapt", "fisher_schedule", "schedule",
           "fisher_inverse_mass", "gradient_inverse_mass", "FisherMoments", "FisherState",
           "lowrank_inverse_mass", "lowrank_correction", "fisher_scales", "spd_geometric_mean",
           "LowRankState", "build_lowrank_adapt", "LOW_RANK_WINDOW", "LOW_RANK_EVERY",
           "LOW_RANK_MIN_DRAWS", "LOW_RANK_EIGVAL_CLIP",
           "FISHER_CLIP", "LOW_RANK_MAX_DIM", "resolve_adaptation"]


@dataclass(frozen=True)
class NUTSConfig:
    """Settings of the NUTS engine.

    num_warmup, num_samples : warmup (adaptation) and kept iterations per chain.
    num_chains : independent chains, each with its own adapted step size and mass matrix.
    target_accept : the dual-averaging target of the mean acceptance rate (0.8 as in Stan).
    max_tree_depth : at most 2**max_tree_depth - 1 leapfrog steps per iteration.
    dense_mass : adapt a dense inverse mass matrix instead of a diagonal one.
    mass_adaptation : how the warmup adapts the inverse mass matrix. "stan" (the default):
        Stan's windowed warmup, the regularised variance of the draws of each slow window
        (:func:`warmup_schedule`); it stays the default because both Fisher adaptations left a
        chain stuck (hundreds of divergences) on posteriordb's arma11 started far out, where
        Stan's recovers (docs/engines/nuts.md). "auto": "fisher_lowrank" up to
        :data:`LOW_RANK_MAX_DIM` parameters, "fisher" above, "stan" with ``dense_mass=True``
        (:func:`resolve_adaptation`). "fisher": the diagonal that minimises a Fisher
        divergence (Seyboldt et al. 2024, nutpie's default), ``sqrt(var(x) / var(grad log p))``
        elementwise from the draws and their gradients, on nutpie's schedule of overlapping
        windows (:func:`fisher_schedule`): started from the gradient at the starting point and
        updated after every early iteration; diagonal only (``dense_mass=False``).
        "fisher_lowrank": nutpie's low-rank-plus-diagonal version
        (:func:`lowrank_inverse_mass`): the Fisher diagonal, times ``I + U (Lambda - I) U^T``
        where ``U, Lambda`` are the eigenvectors and eigenvalues, outside ``[1/low_rank_cutoff,
        low_rank_cutoff]``, of the Fisher-optimal full metric in the span of the window's
        (diagonally scaled) draws and gradients: it learns strong correlations a diagonal
        cannot. It is held as a dense (ndim, ndim) matrix, so a leapfrog step costs O(ndim^2)
        and each update three (ndim, ndim) eigendecompositions: meant for up to a few hundred
        parameters. Same schedule as "fisher"; recomputed every :data:`LOW_RANK_EVERY` slow
        iterations, at window switches and at the step-size restart.
    low_rank_cutoff, low_rank_gamma : "fisher_lowrank" only: the eigenvalue cutoff (> 1; 2.0 as
        the nutpie R package's default, nutpie's Python default is 100: a larger cutoff keeps
        fewer directions, which there makes a leapfrog step cheaper, while here the matrix is
        dense anyway) and the regularisation of the draws' and gradients' covariances (nutpie's
        1e-5).
    init : "auto" (the default: the model's own starting point where it provides one, see
        :mod:`bayeslik.inits`, as the AR-HMM and mixture families do; otherwise "uniform"),
        "uniform" (uniform in [-init_radius, init_radius] in unconstrained space, as Stan),
        "prior" (draws from the prior), a dict {latent site: constrained value} such as a
        cheap point estimate: each chain starts near it, jittered uniformly by
        +-init_radius/20 on the unconstrained scale (sites the dict leaves out start uniform,
        as with "uniform"), or a NumPyro init strategy such as
        ``numpyro.infer.init_to_median()`` or ``init_to_value(values={...})``.
    chain_method : "vectorized" (vmap on one device, split over several devices) or
        "sequential" (one chain after the other; each iteration waits for no other chain).
    thinning : keep every thinning-th iteration: each chain runs ``num_samples * thinning``
        sampling iterations and keeps ``num_samples`` draws (NumPyro's MCMC instead runs
        ``num_samples`` and keeps ``num_samples // thinning``).
    progress_bar : a tqdm bar; num_chunks is how many times per phase it moves. It reads
        "(compiling)" (its elapsed time moving) until the first chunk returns, then names the
        phase: "NUTS <model> warmup", then "NUTS <model> sampling".
    """

    num_warmup: int = 1000
    num_samples: int = 1000
    num_chains: int = 4
    target_accept: float = 0.8
    max_tree_depth: int = 10
    dense_mass: bool = False
    mass_adaptation: str = "stan"
    low_rank_cutoff: float = 2.0
    low_rank_gamma: float = 1e-5
    init: Any = "auto"
    init_radius: float = 2.0
    chain_method: str = "vectorized"
    thinning: int = 1
    progress_bar: bool = True
    num_chunks: int = 20

    def __post_init__(self) -> None:
        check = kit.Check("NUTS", self)
        check.integer("num_samples", "num_chains", "max_tree_depth", "thinning", "num_chunks")
        check.integer("num_warmup", minimum=0)
        check.number("target_accept", low=0.0, high=1.0, hint="0.8 is Stan's default")
        check.require(isinstance(self.init, Mapping) or self.init in ("auto", "uniform", "prior")
                      or (callable(self.init) and not isinstance(self.init, type)), "init",
                      "must be 'auto', 'uniform', 'prior', a dict {site: value} or a NumPyro "
                      "init strategy such as numpyro.infer.init_to_median().")
        check.number("init_radius", low=0.0)
        check.choice("chain_method", ("vectorized", "sequential"))
        check.choice("mass_adaptation", MASS_ADAPTATIONS)
        check.number("low_rank_cutoff", low=1.0, hint="2 keeps every direction whose scale "
                     "the diagonal misses by more than a factor 2")
        check.number("low_rank_gamma", low=0.0, hint="1e-5 is nutpie's default")
        check.require(not (self.dense_mass and self.mass_adaptation not in ("stan", "auto")),
                      "mass_adaptation", "adapts a diagonal inverse mass matrix; use "
                      "dense_mass=False with it, or mass_adaptation='stan' for a dense one.")


NUTS = NUTSConfig  # bl.engines.NUTS(num_samples=...) reads better in user code

#: the values of NUTSConfig.mass_adaptation
MASS_ADAPTATIONS = ("auto", "stan", "fisher", "fisher_lowrank")
#: "auto" takes "fisher_lowrank" up to this many parameters, "fisher" above (the low-rank
#: metric is held dense: O(ndim^2) a leapfrog step and three (ndim, ndim) eigendecompositions
#: an update); "stan" with dense_mass=True
LOW_RANK_MAX_DIM = 200


def resolve_adaptation(config: "NUTSConfig", ndim: int) -> "NUTSConfig":
    """``config`` with ``mass_adaptation="auto"`` replaced by what it means for ``ndim``
    parameters: "stan" with ``dense_mass=True``, else "fisher_lowrank" up to
    :data:`LOW_RANK_MAX_DIM` parameters and "fisher" above (see ``NUTSConfig``).

    >>> auto = NUTSConfig(mass_adaptation="auto")
    >>> resolve_adaptation(auto, 12).mass_adaptation, resolve_adaptation(auto, 715).mass_adaptation
    ('fisher_lowrank', 'fisher')
    """
    if config.mass_adaptation != "auto":
        return config
    choice = ("stan" if config.dense_mass else
              "fisher_lowrank" if ndim <= LOW_RANK_MAX_DIM else "fisher")
    return dataclasses.replace(config, mass_adaptation=choice)


# ---------------------------------------------------------------------------- the algorithm
class ChainState(NamedTuple):
    """One NUTS chain: where it is and the metric it moves with.

    ``position`` the point on the unconstrained scale (ndim,); ``logdensity`` and
    ``logdensity_grad`` the log density there and its gradient (blackjax's ``HMCState``);
    ``step_size`` the leapfrog step size; ``inverse_mass_matrix`` the inverse metric, (ndim,)
    diagonal or (ndim, ndim) dense.
    """

    position: jax.Array
    logdensity: jax.Array
    logdensity_grad: jax.Array
    step_size: jax.Array
    inverse_mass_matrix: jax.Array


class DrawInfo(NamedTuple):
    """One transition, as kept per iteration: the new ``position`` and its ``logdensity``,
    whether it ``diverging``, its ``tree_depth`` (trajectory doublings), ``acceptance_rate``
    (the mean Metropolis acceptance over the trajectory, Stan's accept_stat), ``energy`` (the
    Hamiltonian at the new point), ``num_steps`` (leapfrog steps, gradient evaluations),
    ``num_nonfinite`` (1 where the trajectory reached a point whose log density is NaN or +inf:
    the trajectory ends there, counted as a divergence; else 0) and ``nonfinite_position`` (that
    point; the chunk programs keep the last one per chain and chunk, and give None here)."""

    position: jax.Array
    logdensity: jax.Array
    diverging: jax.Array
    tree_depth: jax.Array
    acceptance_rate: jax.Array
    energy: jax.Array
    num_steps: jax.Array
    num_nonfinite: jax.Array = None
    nonfinite_position: jax.Array = None


class DualAveragingState(NamedTuple):
    """Stan's step-size adaptation (``stan::mcmc::stepsize_adaptation``), one chain.

    ``counter`` iterations since the last restart, ``s_bar`` the averaged gap to the target
    acceptance, ``x_bar`` the averaged log step size, ``mu`` the shrinkage point
    (``log(10 * step size)`` at the restart), ``log_step_size`` the current log step size.
    """

    counter: jax.Array
    s_bar: jax.Array
    x_bar: jax.Array
    mu: jax.Array
    log_step_size: jax.Array


class WarmupState(NamedTuple):
    """One chain during Stan's windowed warmup.

    ``chain`` the :class:`ChainState` (its step size and inverse metric are the ones adapted so
    far); ``dual_averaging`` the :class:`DualAveragingState` of the step size; ``welford``
    blackjax's Welford estimate ``(mean, m2, sample_size)`` of the (co)variance of the positions
    of the current slow window (with ``mass_adaptation="fisher"``, a :class:`FisherState`: the
    windows of positions and gradients).
    """

    chain: ChainState
    dual_averaging: DualAveragingState
    welford: Any


#: Stan's default initial step size; the first dual-averaging restart shrinks towards 10x it
INITIAL_STEP_SIZE = 1.0
#: the stages of :func:`warmup_schedule`: adapt the step size; also the metric; nothing (sampling)
FAST, SLOW, SAMPLING = 0, 1, 2
#: the stage of :func:`fisher_schedule` that is :data:`SLOW` and then re-finds the step size
RESTART = 3


def dual_averaging(target_accept: float, gamma: float = 0.05, t0: float = 10.0,
                   kappa: float = 0.75):
    r"""Stan's dual averaging of the step size as ``(init, update, final)``.

    ``init(step_size)`` restarts with ``mu = log(10 * step_size)``;
    ``update(state, accept_stat)`` is Stan's ``learn_stepsize``:

    .. math::
        \eta = 1 / (n + t_0), \quad \bar s \leftarrow (1 - \eta)\bar s + \eta(\delta - a), \quad
        x = \mu - \bar s \sqrt{n} / \gamma, \quad
        \bar x \leftarrow (1 - n^{-\kappa}) \bar x + n^{-\kappa} x, \quad \epsilon = e^x,

    with the acceptance statistic ``a`` capped at 1 (a NaN one counts as 0);
    ``final(state)`` is the step size to sample with, ``exp(x_bar)``.
    """

    def init(step_size) -> DualAveragingState:
        step_size = jnp.asarray(step_size)
        zero = jnp.zeros_like(step_size)
        return DualAveragingState(zero, zero, zero, jnp.log(10.0 * step_size), jnp.log(step_size))

    def update(state: DualAveragingState, accept_stat) -> DualAveragingState:
        a = jnp.where(jnp.isnan(accept_stat), 0.0, jnp.minimum(accept_stat, 1.0))
        n = state.counter + 1
        eta = 1.0 / (n + t0)
        s_bar = (1.0 - eta) * state.s_bar + eta * (target_accept - a)
        x = state.mu - s_bar * jnp.sqrt(n) / gamma
        x_eta = n ** (-kappa)
        x_bar = (1.0 - x_eta) * state.x_bar + x_eta * x
        return DualAveragingState(n, s_bar, x_bar, state.mu, x)

    def final(state: DualAveragingState) -> jax.Array:
        return jnp.exp(state.x_bar)

    return init, update, final


def find_reasonable_step_size(rng_key, logdensity_fn, position, logdensity, logdensity_grad,
                              inverse_mass_matrix, step_size, max_iterations: int = 100):
    """Stan's ``init_stepsize`` heuristic: the step size at which one leapfrog step from
    ``position`` has an acceptance probability of about 0.8, under the given metric.

    One leapfrog step with a fresh momentum at ``step_size`` sets the direction (up if its
    energy change ``H0 - H1`` exceeds ``log 0.8``, else down); then, each time with a fresh
    momentum, the step size is doubled (halved) until the energy change falls below (rises
    above) ``log 0.8``. As in Stan, the first trial of the loop repeats the starting step size,
    a NaN energy counts as infinite, and a step size of 0, above 1e7 or NaN is returned as it is
    (Stan raises there; a chain that cannot move then shows as stuck in the diagnostics).
    ``max_iterations`` bounds the loop (2**100 covers every float).
    """
    from blackjax.mcmc.integrators import IntegratorState, velocity_verlet
    from blackjax.mcmc.metrics import default_metric

    metric = default_metric(inverse_mass_matrix)
    integrator = velocity_verlet(logdensity_fn, metric.kinetic_energy)
    log_08 = jnp.log(jnp.asarray(0.8, logdensity.dtype))

    def delta_h(key, eps):
        p = metric.sample_momentum(key, position)
        h0 = -logdensity + metric.kinetic_energy(p)
        new = integrator(IntegratorState(position, p, logdensity, logdensity_grad), eps)
        h = -new.logdensity + metric.kinetic_energy(new.momentum)
        h = jnp.where(jnp.isnan(h), jnp.inf, h)
        return h0 - h

    step_size = jnp.asarray(step_size, logdensity.dtype)
    key_first, key_loop = jax.random.split(rng_key)
    usable = (step_size > 0) & (step_size <= 1e7) & ~jnp.isnan(step_size)
    up = delta_h(key_first, step_size) > log_08

    def cond(carry):
        i, eps, done = carry
        return ~done & (i < max_iterations) & (eps > 0) & (eps <= 1e7)

    def body(carry):
        i, eps, _ = carry
        d = delta_h(jax.random.fold_in(key_loop, i), eps)
        stop = jnp.where(up, ~(d > log_08), ~(d < log_08))
        eps = jnp.where(stop, eps, jnp.where(up, 2.0 * eps, 0.5 * eps))
        return i + 1, eps, stop

    _, found, _ = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), step_size, ~usable))
    return found


def _identity(ndim: int, dtype, dense_mass: bool) -> jax.Array:
    return jnp.ones(ndim, dtype) if not dense_mass else jnp.eye(ndim, dtype=dtype)


def _mass_matrix(dense_mass: bool):
    """Stan's ``var_adaptation`` / ``covar_adaptation`` as ``(init, update, final)`` of the
    Welford state (blackjax's estimator) of a window: ``final(welford, previous)`` is the new
    inverse metric ``n/(n+5) * cov + 1e-3 * 5/(n+5) * I`` and a fresh Welford state. As Stan's
    ``sample_variance``, a window of one draw keeps the ``previous`` metric as its estimate."""
    from blackjax.adaptation.mass_matrix import welford_algorithm

    w_init, w_update, w_final = welford_algorithm(not dense_mass)

    def final(welford, previous):
        cov, n, _ = w_final(welford)
        cov = jnp.where(n > 1, jnp.nan_to_num(cov), previous).astype(previous.dtype)
        n = jnp.asarray(n, previous.dtype)
        ident = 1e-3 * (jnp.eye(previous.shape[0], dtype=previous.dtype) if dense_mass else 1.0)
        return (n / (n + 5.0)) * cov + (5.0 / (n + 5.0)) * ident, w_init(previous.shape[0])

    return w_init, w_update, final


class FisherMoments(NamedTuple):
    """Running moments of one window's draws and their gradients, for the Fisher estimate.

    ``count`` the draws (a float of the positions' dtype); ``mean_x``, ``m2_x`` and ``mean_g``,
    ``m2_g`` Welford's running mean and sum of squared deviations of the positions and of the
    gradients of the log density there (running sums of x and x^2 in a stable form: with raw
    sums, float32 loses the variance of a parameter whose mean is 1e4 times its sd).
    """

    count: jax.Array
    mean_x: jax.Array
    m2_x: jax.Array
    mean_g: jax.Array
    m2_g: jax.Array


class FisherState(NamedTuple):
    """The Fisher adaptation's estimators of one chain (``WarmupState.welford`` when
    ``mass_adaptation`` is "fisher").

    ``current`` the :class:`FisherMoments` the inverse metric is computed from; ``next`` the
    background window, started at the last switch, that replaces ``current`` at the next
    switch (nutpie's foreground and background estimators).
    """

    current: FisherMoments
    next: FisherMoments


#: the clip of the Fisher estimate of the inverse metric (nutpie's limits)
FISHER_CLIP = (1e-20, 1e20)


def _moments_init(ndim: int, dtype) -> FisherMoments:
    zero = jnp.zeros(ndim, dtype)
    return FisherMoments(jnp.zeros((), dtype), zero, zero, zero, zero)


def _moments_update(m: FisherMoments, x, g) -> FisherMoments:
    n = m.count + 1
    dx, dg = x - m.mean_x, g - m.mean_g
    mean_x, mean_g = m.mean_x + dx / n, m.mean_g + dg / n
    return FisherMoments(n, mean_x, m.m2_x + dx * (x - mean_x), mean_g, m.m2_g + dg * (g - mean_g))


def fisher_inverse_mass(moments: FisherMoments, previous: jax.Array) -> jax.Array:
    r"""The diagonal inverse metric that minimises the Fisher divergence, from a window's moments.

    For a diagonal linear map of the unconstrained space, the sample Fisher divergence between
    the draws' distribution and the posterior is smallest at the inverse mass matrix

    .. math::
        M^{-1}_{ii} = \sqrt{\operatorname{var}(x_i) / \operatorname{var}(\partial_i \log p(x))}

    (Seyboldt et al. 2024, "Preconditioning HMC by minimizing Fisher divergence"; nutpie's
    default). On a Gaussian with a diagonal covariance the gradient is ``-x / sigma**2``, so the
    estimate is ``sigma**2`` exactly, whatever the draws; it needs no draws from the posterior
    and far fewer than the variance does. It is clipped to :data:`FISHER_CLIP`; where there are
    fewer than three draws (as nutpie) or it is not a positive finite number (a chain that did
    not move, a gradient constant in that coordinate: ``var(g) = 0``) the ``previous`` value is
    kept.

    It is *not* shrunk as Stan shrinks its variance estimate (``n/(n+5) * var + 1e-3 *
    5/(n+5)``): that target is absolute, and on posteriordb's earnings-logearn_interaction,
    where the height slope's Fisher scale is 4e-6, the shrinkage over a 230-draw window made it
    2.5e-5 and cost 1.7 times nutpie's leapfrog steps per draw. The ratio needs no shrinkage
    to be defined; ``var(g) = 0`` is the one degenerate case, guarded above.
    """
    est = jnp.sqrt(moments.m2_x / moments.m2_g)  # the ratio of the two variances: ddof cancels
    ok = jnp.isfinite(est) & (est > 0) & (moments.count >= 3)
    return jnp.where(ok, jnp.clip(est, *FISHER_CLIP), previous).astype(previous.dtype)


def gradient_inverse_mass(logdensity_grad: jax.Array) -> jax.Array:
    """nutpie's starting diagonal inverse metric ``1 / |grad log p|`` at the starting point
    (clipped to :data:`FISHER_CLIP`; 1 where the gradient is 0 or not finite). On a Gaussian
    the gradient at ``x`` is ``-x / sigma**2``: the start has the posterior's variances, up to
    the factor ``1 / |x|``."""
    inv = 1.0 / jnp.abs(logdensity_grad)
    ok = jnp.isfinite(inv)
    return jnp.where(ok, jnp.clip(inv, *FISHER_CLIP), 1.0).astype(logdensity_grad.dtype)


#: rows of the window buffer of "fisher_lowrank": at least the longest current window of
#: :func:`fisher_schedule` for any num_warmup (two 80-draw windows and up to 79 more: 239)
LOW_RANK_WINDOW = 256
#: "fisher_lowrank" recomputes its metric at least every this many slow iterations
LOW_RANK_EVERY = 10


class LowRankState(NamedTuple):
    """The window of "fisher_lowrank" (``WarmupState.welford``): the last
    :data:`LOW_RANK_WINDOW` kept draws ``xs`` and their gradients ``gs`` (a ring buffer, row
    ``a % LOW_RANK_WINDOW`` for the a-th kept draw), ``count`` draws kept so far, the current
    window's first draw ``start`` and the background window's ``start_next`` (nutpie's
    foreground and background windows, as draw numbers), ``since`` iterations since the
    low-rank correction was last computed, ``scale`` the diagonal scales ``s`` and
    ``correction`` the (ndim, ndim) ``U (Lambda - I) U^T`` of :func:`lowrank_inverse_mass`
    (the inverse metric is ``s (I + correction) s``)."""

    xs: jax.Array
    gs: jax.Array
    count: jax.Array
    start: jax.Array
    start_next: jax.Array
    since: jax.Array
    scale: jax.Array
    correction: jax.Array


#: fewest draws in the window before "fisher_lowrank" estimates a correction (the diagonal
#: alone before); and the range its eigenvalues are clipped to (relative to the diagonal: the
#: metric is kept as a dense matrix, inverted and factorised in the working precision)
LOW_RANK_MIN_DRAWS = 10
LOW_RANK_EIGVAL_CLIP = (1e-4, 1e4)


def spd_geometric_mean(a: jax.Array, b: jax.Array) -> jax.Array:
    r"""The symmetric positive definite ``m`` with ``m b m = a``, the geometric mean of ``a``
    and ``b^{-1}``: ``b^{-1/2} (b^{1/2} a b^{1/2})^{1/2} b^{-1/2}``, from two eigendecompositions
    (both arguments symmetric positive definite).

    >>> import numpy as np
    >>> a, b = np.array([[2.0, 0.5], [0.5, 1.0]]), np.array([[1.0, 0.2], [0.2, 3.0]])
    >>> m = np.asarray(spd_geometric_mean(jnp.asarray(a), jnp.asarray(b)))
    >>> bool(np.allclose(m @ b @ m, a, atol=1e-5)), bool(np.allclose(m, m.T, atol=1e-6))
    (True, True)
    """
    eb, ub = jnp.linalg.eigh(b)
    eb = jnp.maximum(eb, jnp.finfo(b.dtype).tiny)
    b_half = (ub * jnp.sqrt(eb)) @ ub.T
    b_inv_half = (ub / jnp.sqrt(eb)) @ ub.T
    inner = b_half @ a @ b_half
    ei, ui = jnp.linalg.eigh((inner + inner.T) / 2)
    inner_half = (ui * jnp.sqrt(jnp.maximum(ei, 0.0))) @ ui.T
    m = b_inv_half @ inner_half @ b_inv_half
    return (m + m.T) / 2


def _window_moments(xs, gs, valid):
    w = valid.astype(xs.dtype)[:, None]
    n = jnp.sum(w)
    safe_n = jnp.maximum(n, 1.0)
    dx = (xs - jnp.sum(xs * w, 0) / safe_n) * w
    dg = (gs - jnp.sum(gs * w, 0) / safe_n) * w
    return n, dx, dg


def fisher_scales(xs: jax.Array, gs: jax.Array, valid: jax.Array,
                  previous: jax.Array) -> jax.Array:
    """The Fisher diagonal's scales ``s`` (``s^2 = sqrt(var(x) / var(g))``, the estimate of
    :func:`fisher_inverse_mass`, clipped alike) from the ``valid`` rows of a window of draws
    ``xs`` and gradients ``gs``; ``previous`` where fewer than three rows are valid, or
    elementwise where the estimate is not a positive finite number."""
    n, dx, dg = _window_moments(xs, gs, valid)
    est = jnp.sqrt(jnp.sqrt(jnp.sum(dx * dx, 0) / jnp.sum(dg * dg, 0)))
    ok = jnp.isfinite(est) & (est > 0) & (n >= 3)
    lo, hi = FISHER_CLIP
    return jnp.where(ok, jnp.clip(est, lo ** 0.5, hi ** 0.5), previous).astype(previous.dtype)


def lowrank_correction(xs: jax.Array, gs: jax.Array, valid: jax.Array, scale: jax.Array,
                       cutoff: float = 2.0, gamma: float = 1e-5) -> jax.Array:
    """The low-rank part ``U (Lambda - I) U^T`` of :func:`lowrank_inverse_mass`, in the
    coordinates scaled by ``scale``; zero where fewer than :data:`LOW_RANK_MIN_DRAWS` rows are
    valid or anything is not finite. Eigenvalues are clipped to :data:`LOW_RANK_EIGVAL_CLIP`."""
    dtype = xs.dtype
    n, dx, dg = _window_moments(xs, gs, valid)
    x, g = dx / scale, dg * scale
    eye = jnp.eye(xs.shape[1], dtype=dtype)
    safe_n = jnp.maximum(n, 1.0)
    c = 1.0 / (safe_n * safe_n * gamma)
    lam, vec = jnp.linalg.eigh(spd_geometric_mean(c * (x.T @ x) + eye, c * (g.T @ g) + eye))
    keep = (lam > cutoff) | (lam < 1.0 / cutoff)
    lam = jnp.clip(lam, *LOW_RANK_EIGVAL_CLIP)
    out = (vec * jnp.where(keep, lam - 1.0, 0.0)) @ vec.T
    out = (out + out.T) / 2
    ok = (n >= LOW_RANK_MIN_DRAWS) & jnp.all(jnp.isfinite(out))
    return jnp.where(ok, out, jnp.zeros_like(out)).astype(dtype)


def lowrank_inverse_mass(xs: jax.Array, gs: jax.Array, valid: jax.Array, previous: jax.Array,
                         cutoff: float = 2.0, gamma: float = 1e-5) -> jax.Array:
    r"""nutpie's low-rank-plus-diagonal inverse metric from a window of draws and gradients.

    ``xs``, ``gs`` (rows, ndim): draws and the gradients of the log density there; ``valid``
    (rows,) marks the rows of the window. With ``s`` the Fisher diagonal's scales
    (:func:`fisher_scales`), the draws are scaled to ``x / s`` and the gradients to ``g s``;
    their covariances ``C_x``, ``C_g`` (over the ``n`` rows, regularised as nutpie:
    ``C / (n gamma) + I``) give the metric ``A`` with ``A C_g A = C_x``
    (:func:`spd_geometric_mean`), the minimiser of the Fisher divergence over all linear maps
    (Seyboldt et al. 2024): on a Gaussian, where ``g = -Sigma^{-1} (x - mu)``, ``A`` is the
    (scaled) covariance itself once the window spans the space. Its eigenvalues outside
    ``[1/cutoff, cutoff]`` and their eigenvectors ``U``, ``Lambda`` are kept (directions outside
    the span of the window's draws and gradients have eigenvalue 1 and drop out, as they do from
    nutpie's projection onto that span; :func:`lowrank_correction`):

    .. math:: M^{-1} = S \left(I + U (\Lambda - I) U^T\right) S, \qquad S = \operatorname{diag}(s).

    Returned dense (ndim, ndim); ``previous`` where fewer than three rows are valid, the scales
    falling back to ``sqrt(diag(previous))`` elementwise as in :func:`fisher_scales`.
    """
    scale = fisher_scales(xs, gs, valid, jnp.sqrt(jnp.diag(previous)))
    corr = lowrank_correction(xs, gs, valid, scale, cutoff, gamma)
    eye = jnp.eye(xs.shape[1], dtype=previous.dtype)
    out = scale[:, None] * (eye + corr) * scale[None, :]
    return jnp.where(jnp.sum(valid) >= 3, out, previous)


def fisher_schedule(num_warmup: int, early_fraction: float = 0.3, final_fraction: float = 0.15,
                    early_switch: int = 10, switch: int = 80) -> tuple[np.ndarray, np.ndarray]:
    """nutpie's warmup schedule as (stage, switch) arrays of length num_warmup, for
    ``mass_adaptation="fisher"``.

    Every iteration before the final ``final_fraction`` is :data:`SLOW`: its draw and gradient
    join both estimators of :class:`FisherState` (the current and the background window) and the
    inverse metric is set from the current one. ``switch[t]`` marks where the background window
    (``early_switch`` draws long in the first ``early_fraction`` of the warmup, ``switch`` draws
    after it) becomes the current one and a new background window starts; a switch is skipped
    when the window after it would end in the final phase. The third iteration, the first
    whose window holds three draws, is :data:`RESTART`: the first metric update, after which the
    step size is found again. The final iterations are :data:`FAST` (the step size only); dual
    averaging is not restarted there (as nutpie: a restart for the last 150 iterations of 1,000
    left the step size smaller, the acceptance rate at 0.90 against the target 0.8, on three
    posteriordb regressions). Fewer than 20 iterations: step size only, as Stan.

    >>> stage, switch = fisher_schedule(1000)
    >>> int((stage != FAST).sum()), np.flatnonzero(stage == RESTART).tolist()
    (850, [2])
    >>> np.flatnonzero(switch)[[0, 1, 29, 30, -1]].tolist()
    [9, 19, 299, 379, 699]
    """
    stage = np.full(num_warmup, FAST, np.int32)
    end = np.zeros(num_warmup, bool)
    if num_warmup < 20:
        return stage, end
    early_end = int(early_fraction * num_warmup)
    final_start = num_warmup - int(final_fraction * num_warmup)
    count = 0  # draws in the background window
    for t in range(final_start):
        stage[t] = SLOW
        count += 1
        freq = early_switch if t < early_end else switch
        if count >= freq and t + freq <= final_start:
            end[t] = True
            count = 0
    stage[2] = RESTART
    return stage, end


def schedule(config: NUTSConfig) -> tuple[np.ndarray, np.ndarray]:
    """The warmup's (stage, window_end) arrays for ``config``: Stan's windows
    (:func:`warmup_schedule`), or nutpie's for ``mass_adaptation="fisher"``
    (:func:`fisher_schedule`)."""
    if config.mass_adaptation in ("fisher", "fisher_lowrank") or (
            config.mass_adaptation == "auto" and not config.dense_mass):
        return fisher_schedule(config.num_warmup)
    return warmup_schedule(config.num_warmup)


def init(rng_key: jax.Array, position: jax.Array, logdensity_fn, config: NUTSConfig) -> ChainState:
    """A chain at ``position`` as Stan starts its adaptive sampler: the identity metric (for
    ``mass_adaptation="fisher"`` nutpie's :func:`gradient_inverse_mass`) and the step size found
    by Stan's heuristic (:func:`find_reasonable_step_size`) from :data:`INITIAL_STEP_SIZE`
    under it."""
    import blackjax

    config = resolve_adaptation(config, position.shape[0])
    state = blackjax.nuts.init(position, logdensity_fn)
    if config.mass_adaptation == "fisher":
        inverse_mass_matrix = gradient_inverse_mass(state.logdensity_grad)
    elif config.mass_adaptation == "fisher_lowrank":
        inverse_mass_matrix = jnp.diag(gradient_inverse_mass(state.logdensity_grad))
    else:
        inverse_mass_matrix = _identity(position.shape[0], position.dtype, config.dense_mass)
    step_size = find_reasonable_step_size(
        rng_key, logdensity_fn, state.position, state.logdensity, state.logdensity_grad,
        inverse_mass_matrix, jnp.asarray(INITIAL_STEP_SIZE, position.dtype))
    return ChainState(state.position, state.logdensity, state.logdensity_grad, step_size,
                      inverse_mass_matrix)


def build_kernel(logdensity_fn, config: NUTSConfig):
    """``kernel(rng_key, state) -> (ChainState, DrawInfo)``: one NUTS transition (blackjax's
    iterative NUTS: multinomial sampling, generalised U-turn criterion) at the state's step
    size and inverse metric, of at most ``2**config.max_tree_depth - 1`` leapfrog steps. No
    adaptation: that is :func:`build_warmup`'s."""
    import blackjax
    from blackjax.mcmc.hmc import HMCState

    nuts_kernel = blackjax.nuts.build_kernel()

    def kernel(rng_key: jax.Array, state: ChainState) -> tuple[ChainState, DrawInfo]:
        hmc, info = nuts_kernel(
            rng_key, HMCState(state.position, state.logdensity, state.logdensity_grad),
            logdensity_fn, state.step_size, state.inverse_mass_matrix,
            max_num_doublings=config.max_tree_depth)
        new = state._replace(position=hmc.position, logdensity=hmc.logdensity,
                             logdensity_grad=hmc.logdensity_grad)
        # a NaN (or +inf) log density ends the trajectory at one of its two ends
        left, right = info.trajectory_leftmost_state, info.trajectory_rightmost_state
        bad_left, bad_right = kit.nonfinite_mask(left.logdensity), kit.nonfinite_mask(right.logdensity)
        return new, DrawInfo(hmc.position, hmc.logdensity, info.is_divergent,
                             info.num_trajectory_expansions, info.acceptance_rate, info.energy,
                             info.num_integration_steps,
                             (bad_left | bad_right).astype(jnp.int32),
                             jnp.where(bad_left, left.position, right.position))

    return kernel


def build_adapt(logdensity_fn, config: NUTSConfig, find_step_size=find_reasonable_step_size):
    """Stan's warmup update after one transition, step for step (``adapt_diag_e_nuts`` /
    ``adapt_dense_e_nuts``::transition), as
    ``adapt(rng_key, state, stage, window_end, accept_stat) -> WarmupState`` where
    ``state.chain`` is the chain after the transition and ``accept_stat`` its acceptance rate:

    1. ``learn_stepsize``: dual averaging with the acceptance statistic sets the next step size
       ``exp(x)``;
    2. ``learn_variance``: in a slow window (stage :data:`SLOW`) the position joins the Welford
       estimate;
    3. at a slow window's end (``window_end``) the regularised (co)variance becomes the inverse
       metric, the step size is found again by ``init_stepsize`` from the current one under the
       new metric at the current position, and dual averaging restarts with
       ``mu = log(10 * found)``.

    ``find_step_size`` is a parameter so tests can follow the logic with a stand-in.

    With ``config.mass_adaptation="fisher"`` it is :func:`build_fisher_adapt`'s update
    instead; ``diverging`` (whether the transition
    diverged) matters only there.
    """
    if config.mass_adaptation == "auto":  # resolved by the dimension, known at trace time
        def adapt_auto(rng_key, state: WarmupState, *args, **kwargs) -> WarmupState:
            resolved = resolve_adaptation(config, state.chain.position.shape[0])
            return build_adapt(logdensity_fn, resolved, find_step_size)(rng_key, state, *args,
                                                                        **kwargs)
        return adapt_auto
    if config.mass_adaptation == "fisher_lowrank":
        return build_lowrank_adapt(logdensity_fn, config, find_step_size)
    if config.mass_adaptation != "stan":
        return build_fisher_adapt(logdensity_fn, config, find_step_size)
    _, w_update, w_final = _mass_matrix(config.dense_mass)
    da_init, da_update, _ = dual_averaging(config.target_accept)

    def adapt(rng_key, state: WarmupState, stage, window_end, accept_stat,
              diverging=False) -> WarmupState:
        chain = state.chain
        da = da_update(state.dual_averaging, accept_stat)
        welford = jax.lax.cond(stage == SLOW, lambda w: w_update(w, chain.position),
                               lambda w: w, state.welford)

        def end_window(args):
            da, welford = args
            inverse_mass_matrix, welford = w_final(welford, chain.inverse_mass_matrix)
            eps = find_step_size(rng_key, logdensity_fn, chain.position, chain.logdensity,
                                 chain.logdensity_grad, inverse_mass_matrix,
                                 jnp.exp(da.log_step_size))
            eps = jnp.asarray(eps, chain.step_size.dtype)
            return da_init(eps), welford, inverse_mass_matrix, eps

        def keep(args):
            da, welford = args
            return da, welford, chain.inverse_mass_matrix, jnp.exp(da.log_step_size)

        da, welford, inverse_mass_matrix, eps = jax.lax.cond(window_end, end_window, keep,
                                                             (da, welford))
        chain = chain._replace(step_size=eps, inverse_mass_matrix=inverse_mass_matrix)
        return WarmupState(chain, da, welford)

    return adapt


def _restart_at(stage, da, rng_key, logdensity_fn, chain: ChainState, inverse_mass_matrix,
                find_step_size, da_init):
    """(dual averaging, step size): at the :data:`RESTART` stage the step size found again under
    the new metric (and dual averaging restarted from it), else dual averaging's current one."""
    def restart(da):
        eps = find_step_size(rng_key, logdensity_fn, chain.position, chain.logdensity,
                             chain.logdensity_grad, inverse_mass_matrix, jnp.exp(da.log_step_size))
        eps = jnp.asarray(eps, chain.step_size.dtype)
        return da_init(eps), eps

    return jax.lax.cond(stage == RESTART, restart, lambda da: (da, jnp.exp(da.log_step_size)), da)


def build_fisher_adapt(logdensity_fn, config: NUTSConfig,
                       find_step_size=find_reasonable_step_size):
    """The warmup update of the Fisher adaptation, as
    ``adapt(rng_key, state, stage, window_end, accept_stat, diverging) -> WarmupState``
    (``state.welford`` a :class:`FisherState`):

    1. dual averaging with the acceptance statistic sets the next step size, as Stan's;
    2. in stage :data:`SLOW` (or :data:`RESTART`) the position and its gradient join both
       windows' :class:`FisherMoments`, unless the transition diverged (nutpie leaves those
       draws out: a diverging trajectory's points sit where the gradient is huge);
    3. where ``window_end``, the background window becomes the current one and a new one starts;
    4. the inverse metric is set by :func:`fisher_inverse_mass` from the current window, at
       every slow iteration (nutpie);
    5. at the :data:`RESTART` iteration of :func:`fisher_schedule` the step size is found
       again by ``init_stepsize`` under the new metric and dual averaging restarts from it
       (nutpie re-initialises the step size at its first metric update; it does not restart
       at later updates, which change the metric a little at a time).

    The Fisher estimate on Stan's windows instead (the metric set at a window's end, the step
    size found again there) was measured and left out: on three posteriordb regressions its
    final 50 iterations of dual averaging left the acceptance rate at 0.93 against the target
    0.8, and it took 1.3-1.4 times the leapfrog steps per draw of nutpie's schedule.

    Every branch is taken on the schedule's ``stage`` and ``window_end`` (the same for all
    chains), so under ``vmap`` a step-size search runs only where the schedule asks for one.
    """
    da_init, da_update, _ = dual_averaging(config.target_accept)

    def adapt(rng_key, state: WarmupState, stage, window_end, accept_stat,
              diverging=False) -> WarmupState:
        chain = state.chain
        da = da_update(state.dual_averaging, accept_stat)
        est: FisherState = state.welford
        slow = (stage == SLOW) | (stage == RESTART)
        x, g = chain.position, chain.logdensity_grad
        good = slow & ~jnp.asarray(diverging) & jnp.all(jnp.isfinite(g))

        def add(m):
            return jax.tree.map(lambda new, old: jnp.where(good, new, old),
                                _moments_update(m, x, g), m)

        current, nxt = add(est.current), add(est.next)
        fresh = _moments_init(x.shape[0], x.dtype)
        switch = slow & window_end
        current = jax.tree.map(lambda a, b: jnp.where(switch, a, b), nxt, current)
        nxt = jax.tree.map(lambda a, b: jnp.where(switch, a, b), fresh, nxt)
        inverse_mass_matrix = jax.lax.cond(
            slow, lambda m: fisher_inverse_mass(current, m), lambda m: m,
            chain.inverse_mass_matrix)

        da, eps = _restart_at(stage, da, rng_key, logdensity_fn, chain, inverse_mass_matrix,
                              find_step_size, da_init)
        chain = chain._replace(step_size=eps, inverse_mass_matrix=inverse_mass_matrix)
        return WarmupState(chain, da, FisherState(current, nxt))

    return adapt


def build_lowrank_adapt(logdensity_fn, config: NUTSConfig,
                        find_step_size=find_reasonable_step_size):
    """The warmup update of ``mass_adaptation="fisher_lowrank"`` (``state.welford`` a
    :class:`LowRankState`), on :func:`fisher_schedule` as :func:`build_fisher_adapt`: dual
    averaging each iteration; in a slow stage the draw and its gradient join the ring buffer
    (not a diverging one); at a window switch the background window becomes the current one;
    the inverse metric is :func:`lowrank_inverse_mass` of the current window, recomputed at the
    :data:`RESTART` iteration (then the step size is found again and dual averaging restarts
    from it), at each switch and otherwise every :data:`LOW_RANK_EVERY` slow iterations (three
    eigendecompositions each time), held in between."""
    da_init, da_update, _ = dual_averaging(config.target_accept)
    cutoff, gamma = config.low_rank_cutoff, config.low_rank_gamma

    def adapt(rng_key, state: WarmupState, stage, window_end, accept_stat,
              diverging=False) -> WarmupState:
        chain = state.chain
        da = da_update(state.dual_averaging, accept_stat)
        est: LowRankState = state.welford
        slow = (stage == SLOW) | (stage == RESTART)
        x, g = chain.position, chain.logdensity_grad
        good = slow & ~jnp.asarray(diverging) & jnp.all(jnp.isfinite(g))
        row = est.count % LOW_RANK_WINDOW
        xs = jnp.where(good, est.xs.at[row].set(x), est.xs)
        gs = jnp.where(good, est.gs.at[row].set(g), est.gs)
        count = est.count + good.astype(jnp.int32)
        switch = slow & window_end
        start = jnp.where(switch, est.start_next, est.start)
        start_next = jnp.where(switch, count, est.start_next)
        update = slow & (switch | (stage == RESTART) | (est.since + 1 >= LOW_RANK_EVERY))

        slots = jnp.arange(LOW_RANK_WINDOW)
        # the draw number in each slot: the latest a < count with a % W == slot
        number = count - 1 - jnp.mod(count - 1 - slots, LOW_RANK_WINDOW)
        valid = (number >= start) & (number >= 0) & (number < count)
        # the diagonal every slow iteration (cheap, as "fisher"), the correction at the cadence
        scale = jnp.where(slow, fisher_scales(xs, gs, valid, est.scale), est.scale)
        correction = jax.lax.cond(
            update, lambda c: lowrank_correction(xs, gs, valid, scale, cutoff, gamma),
            lambda c: c, est.correction)
        eye = jnp.eye(x.shape[0], dtype=x.dtype)
        inverse_mass_matrix = jnp.where(slow, scale[:, None] * (eye + correction) * scale[None, :],
                                        chain.inverse_mass_matrix)
        since = jnp.where(update, 0, est.since + slow.astype(jnp.int32))

        da, eps = _restart_at(stage, da, rng_key, logdensity_fn, chain, inverse_mass_matrix,
                              find_step_size, da_init)
        chain = chain._replace(step_size=eps, inverse_mass_matrix=inverse_mass_matrix)
        return WarmupState(chain, da, LowRankState(xs, gs, count, start, start_next, since,
                                                   scale, correction))

    return adapt


def build_warmup(logdensity_fn, config: NUTSConfig, find_step_size=find_reasonable_step_size):
    """Stan's adaptive NUTS sampler as ``(init, kernel)``:

    * ``init(chain: ChainState) -> WarmupState``: dual averaging shrinking towards
      ``mu = log(10 * INITIAL_STEP_SIZE)`` from the chain's step size, an empty Welford window
      (with ``mass_adaptation="fisher"``, an empty :class:`FisherState`);
    * ``kernel(rng_key, state, stage, window_end) -> (WarmupState, DrawInfo)``: one transition
      of :func:`build_kernel`'s kernel, then :func:`build_adapt`'s update unless ``stage`` is
      :data:`SAMPLING` (the kept iterations: nothing is adapted). The key is split in two, for
      the transition and for the step-size search at a window's end.

    The stages and window ends of a warmup are :func:`schedule`'s (:func:`warmup_schedule`, or
    :func:`fisher_schedule`); after it, :func:`end_warmup` sets the step size to sample with.
    """
    kernel = build_kernel(logdensity_fn, config)
    adapt = build_adapt(logdensity_fn, config, find_step_size)
    da_init = dual_averaging(config.target_accept)[0]
    w_init = _mass_matrix(config.dense_mass)[0]

    def init(chain: ChainState) -> WarmupState:
        first = jnp.asarray(INITIAL_STEP_SIZE, chain.position.dtype)
        da = da_init(first)._replace(log_step_size=jnp.log(chain.step_size))
        ndim = chain.position.shape[0]
        adaptation = resolve_adaptation(config, ndim).mass_adaptation
        if adaptation == "stan":
            window = w_init(ndim)
        elif adaptation == "fisher_lowrank":
            buf = jnp.zeros((LOW_RANK_WINDOW, ndim), chain.position.dtype)
            zero = jnp.zeros((), jnp.int32)
            scale = jnp.sqrt(jnp.diag(chain.inverse_mass_matrix))
            window = LowRankState(buf, buf, zero, zero, zero, zero, scale,
                                  jnp.zeros((ndim, ndim), chain.position.dtype))
        else:
            empty = _moments_init(ndim, chain.position.dtype)
            window = FisherState(empty, empty)
        return WarmupState(chain, da, window)

    def warmup_kernel(rng_key, state: WarmupState, stage, window_end):
        k_move, k_adapt = jax.random.split(rng_key)
        chain, info = kernel(k_move, state.chain)
        state = jax.lax.cond(
            stage == SAMPLING, lambda s: s,
            lambda s: adapt(k_adapt, s, stage, window_end, info.acceptance_rate,
                            info.diverging),
            state._replace(chain=chain))
        return state, info

    return init, warmup_kernel


def end_warmup(state: WarmupState) -> WarmupState:
    """After the warmup, sample with the dual-averaged step size ``exp(x_bar)`` (Stan's
    ``complete_adaptation``)."""
    step_size = jnp.exp(state.dual_averaging.x_bar)
    return state._replace(chain=state.chain._replace(step_size=step_size))


def warmup_schedule(num_warmup: int, initial_buffer: int = 75, first_window: int = 25,
                    final_buffer: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Stan's warmup schedule as (stage, window_end) arrays of length num_warmup.

    Stan's ``windowed_adaptation``, counter for counter: a fast window (stage :data:`FAST`) of
    ``initial_buffer`` iterations, slow windows (stage :data:`SLOW`) of ``first_window``
    iterations and then doubling, where a window is stretched to the end of the slow phase when
    the window after it would not fit (``compute_next_window``), a final fast window of
    ``final_buffer`` iterations. Fewer than 20 iterations: step size only. Too few for the
    default windows: 15% / 75% / 10%.

    >>> stage, end = warmup_schedule(200)
    >>> int((stage == SLOW).sum()), np.flatnonzero(end).tolist()
    (75, [99, 149])
    """
    stage = np.full(num_warmup, FAST, np.int32)
    end = np.zeros(num_warmup, bool)
    if num_warmup < 20:
        return stage, end
    if initial_buffer + first_window + final_buffer > num_warmup:
        initial_buffer = int(0.15 * num_warmup)
        final_buffer = int(0.1 * num_warmup)
        first_window = num_warmup - (initial_buffer + final_buffer)
    last = num_warmup - final_buffer - 1  # the last iteration of the slow phase
    size, next_end = first_window, initial_buffer + first_window - 1
    for counter in range(num_warmup):
        # adaptation_window(): the counter lies in the slow phase
        if initial_buffer <= counter < num_warmup - final_buffer:
            stage[counter] = SLOW
        # end_adaptation_window(), then compute_next_window()
        if counter == next_end:
            end[counter] = True
            if next_end != last:
                size *= 2
                next_end = counter + size
                if next_end != last and next_end + 2 * size >= num_warmup - final_buffer:
                    next_end = last
    return stage, end


# ---------------------------------------------------------------------------- compiled programs
def _unless_padding(move, state: WarmupState, active):
    """``move(state)`` where ``active``; else the state as it is and a zero DrawInfo (at the
    current point) of the same shapes and dtypes (int64 under jax_enable_x64): pads a chunk."""

    def skip(s):
        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(move, s)[1])
        return s, zeros._replace(position=s.chain.position, logdensity=s.chain.logdensity)

    return jax.lax.cond(active, move, skip, state)


class _Programs(kit.Programs):
    """The compiled functions of one (Posterior, settings) pair, compiled once and reused.

    ``init``: candidates (chains, tries, ndim) -> (WarmupState per chain, index of the first
    finite candidate per chain, number of finite candidates per chain). ``chunk``: a scan of the
    warmup kernel over a chunk of the schedule (of :data:`SAMPLING` stages when sampling).
    ``values`` / ``pointwise``: constrained values / pointwise log-likelihood of a batch of
    draws (the second only run where the Fit keeps its log_likelihood group).
    """

    def __init__(self, posterior, config: NUTSConfig, mesh, batched: bool = False):
        super().__init__()

        # every function takes the data arrays as its last argument, so one compilation serves
        # every Posterior with the same cache_key (same program, same data shapes)
        def init_chain(candidates, key_data, data):
            logdensity = posterior.at(data).logdensity
            # one candidate at a time: a vmap over the 100 tries held 100 gradients of the whole
            # data at once (3.5 GB for 1e6 observations); the numbers are the same
            val, grad = jax.lax.map(jax.value_and_grad(logdensity), candidates)
            ok = jnp.isfinite(val) & jnp.all(jnp.isfinite(grad), axis=1)
            first = jnp.argmax(ok)
            chain = init(jax.random.wrap_key_data(key_data), candidates[first], logdensity, config)
            bad = kit.nonfinite_mask(val)
            return (build_warmup(logdensity, config)[0](chain), first, ok.sum(),
                    (bad.sum(), jnp.argmax(bad)))

        def chunk(state, key_data, offset, stage, end, active, data):
            kernel = build_warmup(posterior.at(data).logdensity, config)[1]

            def step(state, x):
                key, stage, window_end, active = x
                return _unless_padding(lambda s: kernel(key, s, stage, window_end), state, active)

            # the key of step t of a phase is fold_in(phase key, t): no key arrays on the host
            key = jax.random.wrap_key_data(key_data)
            keys = jax.vmap(lambda t: jax.random.fold_in(key, t))(offset + jnp.arange(stage.shape[0]))
            state, info = jax.lax.scan(step, state, (keys, stage, end, active))
            # of the points where the log density was NaN or +inf, the chunk keeps the last
            # (later ones are less likely to be early warmup's excursions far out)
            last = stage.shape[0] - 1 - jnp.argmax(info.num_nonfinite[::-1] > 0)
            point = info.nonfinite_position[last]
            return state, info._replace(nonfinite_position=None), point

        # batched: each chain has its own data (a leading axis of one row per chain)
        d = 0 if batched else None
        vinit = jax.vmap(init_chain, in_axes=(0, 0, d))
        vchunk = jax.vmap(chunk, in_axes=(0, 0, None, None, None, None, d))
        if mesh is not None:
            from jax.sharding import PartitionSpec as P

            c, r = P("chain"), P()
            vinit = jax.shard_map(vinit, mesh=mesh, in_specs=(c, c, r), out_specs=c, check_vma=False)
            vchunk = jax.shard_map(
                vchunk, mesh=mesh, in_specs=(c, c, r, r, r, r, r), out_specs=(c, c, c),
                check_vma=False
            )

        values, pointwise = kit.values_fn(posterior), kit.pointwise_fn(posterior)

        self._fns = {"init": jax.jit(vinit), "chunk": jax.jit(vchunk),
                     "values": jax.jit(jax.vmap(values) if batched else values),
                     "pointwise": jax.jit(jax.vmap(pointwise) if batched else pointwise)}


_CACHE = kit.ProgramCache(32)


def _programs(posterior, config: NUTSConfig, mesh, batched: bool = False) -> _Programs:
    """The compiled programs for this Posterior's cache_key and the settings that change the
    compiled code (least recently used ones are dropped beyond the cache's size)."""
    static = (config.target_accept, config.max_tree_depth, config.dense_mass,
              config.mass_adaptation, batched, config.low_rank_cutoff, config.low_rank_gamma)
    key = (posterior.cache_key, static, None if mesh is None else tuple(mesh.devices.flat))
    return _CACHE.get(key, lambda: _Programs(posterior, config, mesh, batched))


# ---------------------------------------------------------------------------- starting points
def _candidates(posterior, rng_key, num_chains: int, init, radius: float, num_tries: int):
    """Starting candidates (chains, tries, ndim): see :func:`bayeslik.inits.start_candidates`."""
    return start_candidates(posterior, rng_key, num_chains, init, radius, num_tries)


def _no_start_error(posterior, candidates, num_ok, init: str, radius: float) -> InitializationError:
    bad = np.flatnonzero(np.asarray(num_ok) == 0)
    z = jnp.asarray(candidates[bad[0], 0])
    lp, ll = float(posterior.logprior(z)), float(posterior.loglikelihood(z))
    where = ("init=<given point>" if isinstance(init, Mapping) else f"init={init!r}") + (
        f", init_radius={radius}" if not isinstance(init, str) or init == "uniform" else "")
    return InitializationError(
        f"no finite starting point for model '{posterior.name}': chain(s) {bad.tolist()} found "
        f"none in {candidates.shape[1]} tries ({where}). At the first candidate the log prior "
        f"was {lp} and the log-likelihood {ll}. Check that the data lie in the support of the "
        "likelihood for plausible parameters and that the model has no log(0) or division by "
        "zero; or try init='prior' or a smaller init_radius."
    )


class _Starts(NamedTuple):
    """Per chain row (posterior b's chains are rows b*C .. b*C + C-1): the starting candidates
    (rows, tries, ndim) and the key data of the start, the warmup and the sampling; the init
    each posterior used."""

    candidates: np.ndarray
    init_keys: np.ndarray
    warmup_keys: np.ndarray
    sample_keys: np.ndarray
    inits: list


def _starts(posteriors, rng_keys, config: NUTSConfig) -> _Starts:
    C = config.num_chains
    cands, keys, inits = [], [], []
    for p, key in zip(posteriors, rng_keys):
        k_init, *k_phases = jax.random.split(key, 4)
        inits.append((default_init(p) or "uniform") if config.init == "auto" else config.init)
        cands.append(_candidates(p, k_init, C, inits[-1], config.init_radius, num_tries=100))
        keys.append([np.asarray(jax.random.key_data(jax.random.split(k, C))) for k in k_phases])
    return _Starts(np.concatenate(cands), *(np.concatenate(k) for k in zip(*keys)), inits)


def _start(progs, posteriors, starts: _Starts, idx, data, config: NUTSConfig,
           work: dict | None = None) -> WarmupState:
    """The warmup states of the chain rows ``idx``, or the error naming a chain with no start;
    counts the candidates whose log density is NaN or +inf in ``work`` (with the first one)."""
    state, _, num_ok, (num_bad, first_bad) = progs("init", starts.candidates[idx],
                                                   starts.init_keys[idx], data)
    num_ok = np.asarray(num_ok)
    if work is not None:
        _count_nonfinite(work, idx, np.asarray(num_bad),
                         np.asarray(starts.candidates[idx])[np.arange(len(idx)),
                                                            np.asarray(first_bad)], "_init")
    if np.any(num_ok == 0):
        b = int(idx[np.argmin(num_ok)]) // config.num_chains
        raise _no_start_error(posteriors[b], np.asarray(starts.candidates[idx]), num_ok,
                              starts.inits[b], config.init_radius)
    return state


# ---------------------------------------------------------------------------- the run
class _Layout(NamedTuple):
    """Where a run's chain rows go: ``own`` the rows this process runs (all, unless several JAX
    processes split them: ``multi``), ``groups`` the rows that run together (one group, or one
    chain each when sequential), ``mesh`` the devices a group is split over (or None)."""

    batched: bool
    multi: bool
    own: np.ndarray
    groups: list
    mesh: Any


def _layout(num_posteriors: int, config: NUTSConfig) -> _Layout:
    C, batched = config.num_chains, num_posteriors > 1
    sequential = config.chain_method == "sequential" and not batched
    # several JAX processes (jax.distributed): each runs its own block of chains, then every
    # process gathers all of them, so each returns the same Fit
    num_procs, proc = jax.process_count(), jax.process_index()
    multi = num_procs > 1 and not batched
    own = np.arange(num_posteriors * C)
    if multi:
        if C % num_procs:
            raise EngineError(
                f"NUTS option num_chains={C}: the chains are split evenly over the {num_procs} "
                f"JAX processes (jax.distributed); use a multiple of {num_procs}.")
        own = np.arange(proc * C // num_procs, (proc + 1) * C // num_procs)
    mesh, devices = None, jax.local_devices()
    if not sequential and len(devices) > 1:
        # the most devices that take equal shares of the chains (4 chains on 8 CPU cores: 4)
        k = max(d for d in range(1, min(len(devices), len(own)) + 1) if len(own) % d == 0)
        if k > 1:
            mesh = jax.sharding.Mesh(np.array(devices[:k]), ("chain",))
    groups = [[int(c)] for c in own] if sequential else [[int(c) for c in own]]
    return _Layout(batched, multi, own, groups, mesh)


def _data(posteriors, num_chains: int):
    """The data arrays; batched, one row per chain (posterior b's arrays for its chains)."""
    if len(posteriors) == 1:
        return posteriors[0].data_arrays
    return jax.tree.map(lambda *a: jnp.repeat(jnp.stack(a), num_chains, axis=0),
                        *[p.data_arrays for p in posteriors])


def _take(data, idx, batched: bool):
    return jax.tree.map(lambda a: a[idx], data) if batched else data


def _chunks(total: int, num_chunks: int, multiple: int = 1) -> tuple[int, int]:
    """(chunk length, number of chunks) covering ``total`` steps; length is a multiple."""
    if total == 0:
        return multiple, 0
    length = math.ceil(total / min(num_chunks, total))
    length = multiple * math.ceil(length / multiple)
    return length, math.ceil(total / length)


def chunk_length(config: NUTSConfig) -> int:
    """One chunk length for the warmup and the sampling (a multiple of the thinning), so the
    chunk program compiles once: with a length per phase, num_warmup != num_samples * thinning
    compiled it twice (31.6 s against 18.0 s of CPU on eight schools, 1000 warmup/200 draws).
    The iterations' keys come from their index, so the length changes no number."""
    warm = _chunks(config.num_warmup, config.num_chunks)[0]
    draw = _chunks(config.num_samples * config.thinning, config.num_chunks, config.thinning)[0]
    return config.thinning * math.ceil(max(warm, draw) / config.thinning)


def _phase(progs, state, keys, stage, end, data, config: NUTSConfig):
    """Run the chunks of one phase (its ``stage`` and ``end`` arrays, padded to whole chunks);
    yields (state, DrawInfo as NumPy, number of real iterations, the last point per chain
    where the log density was NaN or +inf) after each chunk."""
    total = stage.shape[0]
    length = chunk_length(config)
    n = math.ceil(total / length)
    for i in range(n):
        sl = slice(i * length, min((i + 1) * length, total))
        k = sl.stop - sl.start
        pad = length - k
        state, info, point = progs("chunk", state, keys, np.int32(sl.start),
                                   np.pad(stage[sl], (0, pad)).astype(np.int32),
                                   np.pad(end[sl], (0, pad)).astype(bool), np.arange(length) < k,
                                   data)
        yield state, jax.tree.map(np.asarray, info), k, np.asarray(point)


def _count_nonfinite(work: dict, idx, counts: np.ndarray, points: np.ndarray,
                     phase: str = "") -> None:
    """Add the chain rows' counts of NaN / +inf log densities of a ``phase`` ("_init": the
    starting candidates, the first point kept; "": the trajectories, the latest kept)."""
    hit = counts > 0
    if phase:
        hit &= work[f"num_nonfinite{phase}"][idx] == 0
    work[f"nonfinite{phase}_point"][idx[hit]] = points[hit]
    work[f"num_nonfinite{phase}"][idx] += counts


def _warmup(progs, state, keys, data, config, idx, work, bar) -> WarmupState:
    """Stan's warmup of the chain rows ``idx``; counts their gradients and divergences."""
    stage, end = schedule(config)
    for state, info, k, point in _phase(progs, state, keys, stage, end, data, config):
        work["num_grad"][idx] += info.num_steps.sum(axis=1)
        work["warmup_divergences"][idx] += info.diverging.sum(axis=1)
        _count_nonfinite(work, idx, info.num_nonfinite.sum(axis=1), point)
        bar.update(k * len(idx))
    return end_warmup(state) if config.num_warmup else state


def _sample(progs, state, keys, data, config, idx, work, sink, kept, bar) -> None:
    """The kept iterations of the chain rows ``idx``, thinned, appended chunk by chunk to
    ``sink`` (one of ``kept``, whose divergences the bar shows)."""
    total, T = config.num_samples * config.thinning, config.thinning
    stage, end = np.full(total, SAMPLING, np.int32), np.zeros(total, bool)
    for state, info, k, point in _phase(progs, state, keys, stage, end, data, config):
        work["num_grad"][idx] += info.num_steps.sum(axis=1)
        _count_nonfinite(work, idx, info.num_nonfinite.sum(axis=1), point)
        # thinning: keep every T-th iteration, summing the work and divergences between
        draws = jax.tree.map(lambda a: a[:, T - 1:k:T], info)
        sink.append(draws._replace(
            diverging=info.diverging[:, :k].reshape(len(idx), -1, T).any(-1),
            num_steps=info.num_steps[:, :k].reshape(len(idx), -1, T).sum(-1),
            num_nonfinite=info.num_nonfinite[:, :k].reshape(len(idx), -1, T).sum(-1)))
        bar.update(k * len(idx))
        bar.set_postfix(divergences=sum(int(d.diverging.sum()) for kg in kept for d in kg))


def _collect(kept, step_sizes, groups):
    """(DrawInfo (rows, draws), step size per row, the rows) of the groups that kept draws,
    cut to the draws all of them have (an interrupted run's sequential chains may differ)."""
    done = [g for g in range(len(groups)) if kept[g]]
    per_group = [jax.tree.map(lambda *a: np.concatenate(a, axis=1), *kept[g]) for g in done]
    n = min(d.position.shape[1] for d in per_group)
    info = jax.tree.map(lambda *a: np.concatenate([x[:, :n] for x in a], axis=0), *per_group)
    step_size = np.concatenate([np.atleast_1d(step_sizes[g]) for g in done])
    return info, step_size, np.concatenate([np.array(groups[g]) for g in done])


def _gather_processes(info, step_size, rows_kept, work):
    """Every process's chains, in chain order, on every process (jax.distributed runs)."""
    from jax.experimental import multihost_utils

    n = multihost_utils.process_allgather(np.int32(info.position.shape[1]))
    if np.unique(n).size > 1:  # an interrupted process kept fewer draws: keep what all have
        info = jax.tree.map(lambda a: a[:, : int(n.min())], info)

    def gather(a):
        return np.asarray(multihost_utils.process_allgather(np.asarray(a), tiled=True))

    info = jax.tree.map(gather, info)
    step_size, all_rows = gather(step_size), gather(rows_kept)
    order = np.argsort(all_rows, kind="stable")
    info = jax.tree.map(lambda a: a[order], info)
    # each process counted only its own chains' work
    mine = np.zeros(len(work["num_grad"]), bool)
    mine[rows_kept] = True
    work = {k: gather(np.where(mine.reshape((-1,) + (1,) * (v.ndim - 1)), v, 0))
            .reshape((-1,) + v.shape).sum(0) for k, v in work.items()}
    return info, step_size[order], all_rows[order], work


def _constrained(progs, position, data, posteriors, lay: _Layout, num_chains: int, keep: bool):
    """{site: (posterior, chain, draw, ...)} constrained values and, where ``keep``, pointwise
    log-likelihood of the draws, each in chunks written into arrays allocated once."""
    post, B = posteriors[0], len(posteriors)
    if lay.batched:
        zs = position.reshape(B, -1, post.ndim)
        d = _take(data, np.arange(0, B * num_chains, num_chains), True)
        values = progs.map_into("values", zs, d, axis=1)
        pointwise = progs.map_into("pointwise", zs, d, axis=1) if keep else {}
    else:
        # padded to a power of two (at least 256): a new number of draws compiles nothing
        zs = position.reshape(-1, post.ndim)
        values = progs.map_into("values", zs, data, smallest=256)
        pointwise = progs.map_into("pointwise", zs, data, smallest=256) if keep else {}
    shape3 = (B, position.shape[0] // B, position.shape[1])
    values = {k: np.asarray(v).reshape(shape3 + v.shape[v.ndim - len(post.sites[k].shape):])
              for k, v in values.items()}
    pointwise = {k: np.asarray(v).reshape(shape3 + v.shape[(2 if lay.batched else 1):])
                 for k, v in pointwise.items()}
    return values, pointwise


def _nonfinite_counts(acct: kit.Run, work: dict, rows: slice, num_init: int) -> dict:
    """Cost.extra's counts of the log densities that were NaN or +inf in the chain ``rows``
    (starting candidates and trajectories), flagged on ``acct`` with the site that made them."""
    init, count = work["num_nonfinite_init"][rows], work["num_nonfinite"][rows]
    points = np.concatenate([work["nonfinite_init_point"][rows][init > 0],
                             work["nonfinite_point"][rows][count > 0]])
    return acct.nonfinite(int(init.sum() + count.sum()),
                          num_init + int(work["num_grad"][rows].sum()), what="log density",
                          point=points)


def _sample_stats(info: DrawInfo, step_size, config: NUTSConfig) -> dict:
    return {"diverging": info.diverging, "lp": info.logdensity, "tree_depth": info.tree_depth,
            "acceptance_rate": info.acceptance_rate, "energy": info.energy,
            "n_steps": info.num_steps,  # ArviZ's name
            "step_size": np.broadcast_to(step_size[:, None], info.diverging.shape).copy(),
            "reached_max_tree_depth": info.tree_depth >= config.max_tree_depth}


def _flags(info: DrawInfo, config: NUTSConfig, interrupted: str | None) -> list[str]:
    flags = []
    num_div = int(info.diverging.sum())
    if num_div:
        flags.append(f"{num_div} divergent transitions after warmup; consider target_accept=0.9 "
                     "or more, or a reparametrisation")
    num_deep = int((info.tree_depth >= config.max_tree_depth).sum())
    if num_deep:
        flags.append(f"{num_deep} iterations hit max_tree_depth={config.max_tree_depth}")
    return flags + ([interrupted] if interrupted else [])


def run(posterior, rng_key: jax.Array, config: NUTSConfig) -> Fit:
    """Run NUTS on ``posterior`` and return a Fit.

    >>> fit = run(post, jax.random.key(0), NUTSConfig(num_samples=500))  # doctest: +SKIP
    """
    return _run([posterior], [rng_key], config)[0]


def run_many(posteriors, rng_keys, config: NUTSConfig) -> list[Fit]:
    """NUTS on several Posteriors of one program whose data share shapes (equal ``cache_key``),
    vectorised: all their chains advance together in one compiled call per chunk (SBC,
    cross-validation folds, bootstrap refits). One Fit per Posterior, each as ``run`` would give
    (costs are shared equally; ``cost.extra["batch_size"]`` says how many were batched).
    """
    posteriors = list(posteriors)
    if not posteriors:
        return []
    key0 = posteriors[0].cache_key
    for i, p in enumerate(posteriors):
        if p.cache_key != key0:
            raise EngineError(
                f"run_many: posterior {i} differs from posterior 0 in its program, its non-array "
                "arguments or its data shapes; batch only datasets of one shape."
            )
    if config.chain_method == "sequential" or len(posteriors) == 1:
        return [f for p, k in zip(posteriors, rng_keys) for f in _run([p], [k], config)]
    return _run(posteriors, list(rng_keys), config)


def _run(posteriors, rng_keys, config: NUTSConfig) -> list[Fit]:
    """The chains of every posterior (rows b*C .. b*C + C-1 for posterior b), run together."""
    config = resolve_adaptation(config, posteriors[0].ndim)
    run = kit.Run("nuts", posteriors[0], config)
    B, C, S = len(posteriors), config.num_chains, config.num_samples
    lay = _layout(B, config)
    progs = run.track(_programs(posteriors[0], config, lay.mesh, lay.batched))
    data, starts = _data(posteriors, C), _starts(posteriors, rng_keys, config)
    bar = run.progress(total=(config.num_warmup + S * config.thinning) * len(lay.own),
                       desc=f"NUTS {posteriors[0].name}" + (f" x{B}" if lay.batched else ""),
                       unit="it", disable=not config.progress_bar or jax.process_index() != 0)
    # the initial gradient of each chain, then each transition's; the NaN / +inf log densities
    # (trajectories; starting candidates) and a point of each chain where one was
    zero, dim = np.zeros(B * C, np.int64), (B * C, posteriors[0].ndim)
    work = {"num_grad": np.ones(B * C, np.int64), "warmup_divergences": zero.copy(),
            "num_nonfinite": zero.copy(), "num_nonfinite_init": zero.copy(),
            "nonfinite_point": np.zeros(dim), "nonfinite_init_point": np.zeros(dim)}
    kept, step_sizes = [[] for _ in lay.groups], {}
    with run.interruptible(bar):
        for g, chains in enumerate(lay.groups):
            idx = np.array(chains)
            d = _take(data, idx, lay.batched)
            state = _start(progs, posteriors, starts, idx, d, config, work)
            bar.set_phase("warmup" if config.num_warmup else "sampling")
            state = _warmup(progs, state, starts.warmup_keys[idx], d, config, idx, work, bar)
            step_sizes[g] = np.asarray(state.chain.step_size)
            bar.set_phase("sampling")
            _sample(progs, state, starts.sample_keys[idx], d, config, idx, work, kept[g], kept, bar)
    run.require(any(kept), "NUTS was interrupted before any draw was kept")
    info, step_size, rows = _collect(kept, step_sizes, lay.groups)
    if lay.multi:
        info, step_size, rows, work = _gather_processes(info, step_size, rows, work)
    c, n = info.position.shape[0] // B, info.position.shape[1]
    keep = run.keep_loglikelihood(n, num_chains=c, num_fits=B)
    values, pointwise = _constrained(progs, info.position, data, posteriors, lay, C, keep)
    interrupted = (f"interrupted: kept {n} of {S} draws per chain"
                   + (f" in {c} of {C} chains" if c < C else "")) if run.interrupted else None
    batch = {"batch_size": B, "batch_wall_s": run.wall_s} if lay.batched else {}
    fits = []
    for b, post in enumerate(posteriors):
        inf = jax.tree.map(lambda a: a[b * c:(b + 1) * c], info)
        grads = int(work["num_grad"][rows[b * c:(b + 1) * c]].sum())
        extra = {"num_warmup_divergences": int(work["warmup_divergences"][b * C:(b + 1) * C].sum()),
                 "num_postprocess_evals": c * n, "num_init_evals": C * starts.candidates.shape[1],
                 **batch}
        nonfinite = kit.Run("nuts", post, config)  # this posterior's count, flag and site
        extra.update(_nonfinite_counts(nonfinite, work, slice(b * C, (b + 1) * C),
                                       C * starts.candidates.shape[1]))
        fits.append(kit.chains_fit(
            run, {k: v[b] for k, v in values.items()}, posterior=post,
            sample_stats=_sample_stats(inf, step_size[b * c:(b + 1) * c], config),
            log_likelihood={k: v[b] for k, v in pointwise.items()}, num_loglik_evals=grads,
            num_grad_evals=grads, extra=extra,
            flags=nonfinite.flags + _flags(inf, config, interrupted), share=B))
    return fits
