"""The NUTS engine: blackjax's iterative NUTS with Stan's windowed warmup, on a Posterior.

The warmup is Stan's, step for step (``stan::mcmc`` ``stepsize_adaptation``,
``windowed_adaptation``, ``base_hmc::init_stepsize``): after each metric update the step size is
found again under the new metric and dual averaging restarts there (see :func:`build_adapt`).

Chains are vectorised with ``vmap`` on one device and split over devices with ``shard_map``
when there are several. The warmup (Stan's schedule: a fast window for the step size, doubling
slow windows for the mass matrix, a final fast window) and the sampling run as a few chunks of a
``lax.scan``, each chunk one call of a function compiled once, so a progress bar can move
between chunks and an interrupted run keeps every draw made before the interrupt.

The compiled functions take the data arrays as an argument and are cached by the Posterior's
``cache_key`` (program, non-array arguments, data shapes) and the settings that change the code:
fitting the same Posterior again, or the same program to other data of the same shapes (SBC,
cross-validation, refits), compiles nothing.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bayeslik.convergence import convergence_flags
from bayeslik.engines._programs import ProgramCache, Programs, draws_fn
from bayeslik.errors import EngineError, InitializationError
from bayeslik.fit import Cost, Fit, build_datatree
from bayeslik.inits import default_init

__all__ = ["NUTSConfig", "NUTS", "run", "run_many", "init", "build_step", "build_adapt",
           "end_warmup", "dual_averaging", "find_reasonable_step_size", "ChainState",
           "WarmupState", "DualAveragingState", "MetricState", "DrawInfo"]


@dataclass(frozen=True)
class NUTSConfig:
    """Settings of the NUTS engine.

    num_warmup, num_samples : warmup (adaptation) and kept iterations per chain.
    num_chains : independent chains, each with its own adapted step size and mass matrix.
    target_accept : the dual-averaging target of the mean acceptance rate (0.8 as in Stan).
    max_tree_depth : at most 2**max_tree_depth - 1 leapfrog steps per iteration.
    dense_mass : adapt a dense inverse mass matrix instead of a diagonal one.
    init : "auto" (the default: the model's own starting point where it provides one, see
        :mod:`bayeslik.inits`, as the AR-HMM and mixture families do; otherwise "uniform"),
        "uniform" (uniform in [-init_radius, init_radius] in unconstrained space, as Stan),
        "prior" (draws from the prior), or a dict {latent site: constrained value} such as a
        cheap point estimate: each chain starts near it, jittered uniformly by
        +-init_radius/20 on the unconstrained scale.
    chain_method : "vectorized" (vmap on one device, split over several devices) or
        "sequential" (one chain after the other; each iteration waits for no other chain).
    thinning : keep every thinning-th iteration.
    progress_bar : a tqdm bar; num_chunks is how many times per phase it moves.
    """

    num_warmup: int = 1000
    num_samples: int = 1000
    num_chains: int = 4
    target_accept: float = 0.8
    max_tree_depth: int = 10
    dense_mass: bool = False
    init: Any = "auto"
    init_radius: float = 2.0
    chain_method: str = "vectorized"
    thinning: int = 1
    progress_bar: bool = True
    num_chunks: int = 20

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> EngineError:
            return EngineError(f"NUTS option {name}={getattr(self, name)!r}: {why}")

        for name in ("num_samples", "num_chains", "max_tree_depth", "thinning", "num_chunks"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise bad(name, "must be a positive integer.")
        if not isinstance(self.num_warmup, (int, np.integer)) or self.num_warmup < 0:
            raise bad("num_warmup", "must be a non-negative integer.")
        if not 0.0 < float(self.target_accept) < 1.0:
            raise bad("target_accept", "must lie strictly between 0 and 1 (0.8 is Stan's default).")
        if not (isinstance(self.init, Mapping) or self.init in ("auto", "uniform", "prior")):
            raise bad("init", "must be 'auto', 'uniform', 'prior' or a dict {site: value}.")
        if not float(self.init_radius) > 0:
            raise bad("init_radius", "must be positive.")
        if self.chain_method not in ("vectorized", "sequential"):
            raise bad("chain_method", "must be 'vectorized' or 'sequential'.")


NUTS = NUTSConfig  # bl.engines.NUTS(num_samples=...) reads better in user code


# ---------------------------------------------------------------------------- pure building blocks
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


class WarmupState(NamedTuple):
    """Stan's windowed adaptation: dual averaging of the step size, Welford mass matrix."""

    ss_state: DualAveragingState
    imm_state: Any
    step_size: jax.Array
    inverse_mass_matrix: jax.Array


class ChainState(NamedTuple):
    """One chain: the NUTS state and the adaptation state."""

    hmc: Any
    warmup: WarmupState


class DrawInfo(NamedTuple):
    """What is kept per kept iteration, per chain."""

    position: jax.Array
    lp: jax.Array
    diverging: jax.Array
    tree_depth: jax.Array
    acceptance_rate: jax.Array
    energy: jax.Array
    n_steps: jax.Array


class MetricState(NamedTuple):
    """The inverse metric and the Welford estimate of the current slow window."""

    inverse_mass_matrix: jax.Array
    welford: Any


def _mass_matrix(dense_mass: bool):
    """Stan's ``var_adaptation`` / ``covar_adaptation`` as ``(init, update, final)``: Welford
    (blackjax's estimator) over a window, then ``n/(n+5) * cov + 1e-3 * 5/(n+5) * I``. As Stan's
    ``sample_variance``, a window of one draw keeps the previous metric as its estimate."""
    from blackjax.adaptation.mass_matrix import welford_algorithm

    w_init, w_update, w_final = welford_algorithm(not dense_mass)

    def init(ndim: int, dtype=None) -> MetricState:
        eye = jnp.ones(ndim, dtype) if not dense_mass else jnp.eye(ndim, dtype=dtype)
        return MetricState(eye, w_init(ndim))

    def update(state: MetricState, position) -> MetricState:
        return state._replace(welford=w_update(state.welford, position))

    def final(state: MetricState) -> MetricState:
        cov, n, _ = w_final(state.welford)
        prev = state.inverse_mass_matrix
        cov = jnp.where(n > 1, jnp.nan_to_num(cov), prev).astype(prev.dtype)
        n = jnp.asarray(n, prev.dtype)
        ident = 1e-3 * (jnp.eye(prev.shape[0], dtype=prev.dtype) if dense_mass else 1.0)
        imm = (n / (n + 5.0)) * cov + (5.0 / (n + 5.0)) * ident
        return MetricState(imm, w_init(prev.shape[0]))

    return init, update, final


#: Stan's default initial step size; the first dual-averaging restart shrinks towards 10x it
INITIAL_STEP_SIZE = 1.0


def init(position: jax.Array, logdensity_fn, rng_key: jax.Array, config: NUTSConfig) -> ChainState:
    """Initial state of one chain, as Stan starts its adaptive sampler: identity metric, dual
    averaging with ``mu = log(10 * 1)``, and the step size found by Stan's heuristic from 1."""
    import blackjax

    mm_init, _, _ = _mass_matrix(config.dense_mass)
    da_init, _, _ = dual_averaging(config.target_accept)
    state = blackjax.nuts.init(position, logdensity_fn)
    imm_state = mm_init(position.shape[0], position.dtype)
    first = jnp.asarray(INITIAL_STEP_SIZE, position.dtype)
    step_size = find_reasonable_step_size(
        rng_key, logdensity_fn, state.position, state.logdensity, state.logdensity_grad,
        imm_state.inverse_mass_matrix, first)
    ss = da_init(first)._replace(log_step_size=jnp.log(step_size))
    return ChainState(state, WarmupState(ss, imm_state, step_size, imm_state.inverse_mass_matrix))


SAMPLING = 2  # the stage of kept iterations: no adaptation


def build_adapt(logdensity_fn, config: NUTSConfig, find_step_size=find_reasonable_step_size):
    """Stan's warmup update after one transition, step for step (``adapt_diag_e_nuts`` /
    ``adapt_dense_e_nuts``::transition):

    1. ``learn_stepsize``: dual averaging with the transition's acceptance statistic sets the
       next step size ``exp(x)``;
    2. ``learn_variance``: in a slow window (stage 1) the position joins the Welford estimate;
    3. at a slow window's end the regularised (co)variance becomes the inverse metric, the
       step size is found again by ``init_stepsize`` from the current one under the new metric
       at the current position, and dual averaging restarts with ``mu = log(10 * found)``.

    Returns ``adapt(rng_key, warmup_state, stage, window_end, hmc_state, accept_stat)``.
    ``find_step_size`` is a parameter so tests can follow the logic with a stand-in.
    """
    _, mm_update, mm_final = _mass_matrix(config.dense_mass)
    da_init, da_update, _ = dual_averaging(config.target_accept)

    def adapt(rng_key, ws: WarmupState, stage, window_end, hmc, accept_stat) -> WarmupState:
        ss = da_update(ws.ss_state, accept_stat)
        imm = jax.lax.cond(stage == 1, lambda s: mm_update(s, hmc.position), lambda s: s,
                           ws.imm_state)

        def end_window(args):
            ss, imm = args
            imm = mm_final(imm)
            inv_mass = imm.inverse_mass_matrix
            eps = find_step_size(rng_key, logdensity_fn, hmc.position, hmc.logdensity,
                                 hmc.logdensity_grad, inv_mass, jnp.exp(ss.log_step_size))
            eps = jnp.asarray(eps, ws.step_size.dtype)
            ss = da_init(eps)
            return ss, imm, inv_mass, eps

        def keep(args):
            ss, imm = args
            return ss, imm, ws.inverse_mass_matrix, jnp.exp(ss.log_step_size)

        ss, imm, inv_mass, eps = jax.lax.cond(window_end, end_window, keep, (ss, imm))
        return WarmupState(ss, imm, eps, inv_mass)

    return adapt


def build_step(logdensity_fn, config: NUTSConfig):
    """``step(chain_state, (key, stage, window_end, active)) -> (chain_state, DrawInfo)``.

    One NUTS transition, then Stan's adaptation by stage (see :func:`build_adapt`): 0 adapts
    the step size only ("fast"), 1 also the metric ("slow"), 2 (``SAMPLING``) nothing.
    ``active`` False makes the step a no-op (used to pad the last chunk of a phase).
    """
    import blackjax

    adapt = build_adapt(logdensity_fn, config)
    kernel = blackjax.nuts.build_kernel()

    def step(cs: ChainState, x):
        key, stage, window_end, active = x

        def do(cs):
            k_move, k_adapt = jax.random.split(key)
            hmc, info = kernel(
                k_move, cs.hmc, logdensity_fn, cs.warmup.step_size, cs.warmup.inverse_mass_matrix,
                max_num_doublings=config.max_tree_depth,
            )
            ws = jax.lax.cond(
                stage == SAMPLING,
                lambda w: w,
                lambda w: adapt(k_adapt, w, stage, window_end, hmc, info.acceptance_rate),
                cs.warmup,
            )
            return ChainState(hmc, ws), DrawInfo(
                hmc.position, hmc.logdensity, info.is_divergent, info.num_trajectory_expansions,
                info.acceptance_rate, info.energy, info.num_integration_steps,
            )

        def skip(cs):
            # zeros of the same shapes and dtypes as a real step's (int64 under jax_enable_x64)
            shapes = jax.eval_shape(do, cs)[1]
            zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
            return cs, zeros._replace(position=cs.hmc.position, lp=cs.hmc.logdensity)

        return jax.lax.cond(active, do, skip, cs)

    return step


def end_warmup(cs: ChainState) -> ChainState:
    """After the warmup, sample with the dual-averaged step size ``exp(x_bar)`` (Stan's
    ``complete_adaptation``)."""
    ws = cs.warmup
    return cs._replace(warmup=ws._replace(step_size=jnp.exp(ws.ss_state.x_bar)))


def _schedule(num_warmup: int, initial_buffer: int = 75, first_window: int = 25,
              final_buffer: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Stan's warmup schedule as (stage, window_end) arrays of length num_warmup.

    Stan's ``windowed_adaptation``, counter for counter: a fast window (stage 0) of
    ``initial_buffer`` iterations, slow windows (stage 1) of ``first_window`` iterations and then
    doubling, where a window is stretched to the end of the slow phase when the window after it
    would not fit (``compute_next_window``), a final fast window of ``final_buffer`` iterations.
    Fewer than 20 iterations: step size only. Too few for the default windows: 15% / 75% / 10%.
    """
    stage = np.zeros(num_warmup, np.int32)
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
            stage[counter] = 1
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
class _Programs(Programs):
    """The compiled functions of one (Posterior, settings) pair, compiled once and reused.

    ``init``: candidates (chains, tries, ndim) -> (ChainState per chain, index of the first
    finite candidate per chain, number of finite candidates per chain). ``chunk``: a scan of NUTS
    steps over a chunk of the schedule. ``post``: constrained values and pointwise
    log-likelihood of a batch of draws.
    """

    def __init__(self, posterior, config: NUTSConfig, mesh, batched: bool = False):
        super().__init__()

        # every function takes the data arrays as its last argument, so one compilation serves
        # every Posterior with the same cache_key (same program, same data shapes)
        def init_chain(candidates, key_data, data):
            logdensity = posterior.at(data).logdensity
            key = jax.random.wrap_key_data(key_data)
            val, grad = jax.vmap(jax.value_and_grad(logdensity))(candidates)
            ok = jnp.isfinite(val) & jnp.all(jnp.isfinite(grad), axis=1)
            first = jnp.argmax(ok)
            return init(candidates[first], logdensity, key, config), first, ok.sum()

        def chunk(cs, key_data, offset, stage, end, active, data):
            step = build_step(posterior.at(data).logdensity, config)
            # the key of step t of a phase is fold_in(phase key, t): no key arrays on the host
            key = jax.random.wrap_key_data(key_data)
            keys = jax.vmap(lambda t: jax.random.fold_in(key, t))(offset + jnp.arange(stage.shape[0]))
            return jax.lax.scan(step, cs, (keys, stage, end, active))

        # batched: each chain has its own data (a leading axis of one row per chain)
        d = 0 if batched else None
        vinit = jax.vmap(init_chain, in_axes=(0, 0, d))
        vchunk = jax.vmap(chunk, in_axes=(0, 0, None, None, None, None, d))
        if mesh is not None:
            from jax.sharding import PartitionSpec as P

            c, r = P("chain"), P()
            vinit = jax.shard_map(vinit, mesh=mesh, in_specs=(c, c, r), out_specs=c, check_vma=False)
            vchunk = jax.shard_map(
                vchunk, mesh=mesh, in_specs=(c, c, r, r, r, r, r), out_specs=(c, c), check_vma=False
            )

        post = draws_fn(posterior)

        self._fns = {"init": jax.jit(vinit), "chunk": jax.jit(vchunk),
                     "post": jax.jit(jax.vmap(post) if batched else post)}



_CACHE = ProgramCache(32)


def _programs(posterior, config: NUTSConfig, mesh, batched: bool = False) -> _Programs:
    """The compiled programs for this Posterior's cache_key and the settings that change the
    compiled code (least recently used ones are dropped beyond _CACHE_SIZE)."""
    static = (config.target_accept, config.max_tree_depth, config.dense_mass, batched)
    key = (posterior.cache_key, static, None if mesh is None else tuple(mesh.devices.flat))
    return _CACHE.get(key, lambda: _Programs(posterior, config, mesh, batched))


def _candidates(posterior, rng_key, num_chains: int, init, radius: float, num_tries: int):
    """Starting candidates (chains, tries, ndim): uniform on [-radius, radius], prior draws, or
    a given point jittered by +-radius/20."""
    if isinstance(init, Mapping):
        z0 = np.asarray(posterior.unconstrain(init))
        jitter = jax.random.uniform(rng_key, (num_chains, num_tries, posterior.ndim),
                                    minval=-radius / 20, maxval=radius / 20)
        return z0 + np.asarray(jitter)
    if init == "prior":
        cand = posterior.sample_prior(rng_key, num_chains * num_tries)
        return np.asarray(cand).reshape(num_chains, num_tries, posterior.ndim)
    return np.asarray(jax.random.uniform(
        rng_key, (num_chains, num_tries, posterior.ndim), minval=-radius, maxval=radius
    ))


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


# ---------------------------------------------------------------------------- the run
def _chunks(total: int, num_chunks: int, multiple: int = 1) -> tuple[int, int]:
    """(chunk length, number of chunks) covering ``total`` steps; length is a multiple."""
    if total == 0:
        return multiple, 0
    length = math.ceil(total / min(num_chunks, total))
    length = multiple * math.ceil(length / multiple)
    return length, math.ceil(total / length)


def _phase(total: int, length: int, n: int, stage: np.ndarray, end: np.ndarray):
    """The (stage, window_end, active) arrays of each chunk of a phase, padded to length."""
    for i in range(n):
        sl = slice(i * length, min((i + 1) * length, total))
        k = sl.stop - sl.start
        pad = length - k
        yield (sl, np.pad(stage[sl], (0, pad)).astype(np.int32),
               np.pad(end[sl], (0, pad)).astype(bool), np.arange(length) < k)


def _gather_processes(info, step_size, rows_kept, num_grad, warm_div):
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
    mine = np.zeros(num_grad.shape, bool)
    mine[rows_kept] = True
    num_grad = gather(np.where(mine, num_grad, 0)).reshape(-1, num_grad.size).sum(0)
    warm_div = gather(np.where(mine, warm_div, 0)).reshape(-1, warm_div.size).sum(0)
    return info, step_size[order], all_rows[order], num_grad, warm_div


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
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    posterior, B, C = posteriors[0], len(posteriors), config.num_chains
    batched = B > 1
    rows = B * C
    devices = jax.local_devices()
    sequential = config.chain_method == "sequential" and not batched
    # several JAX processes (jax.distributed): each runs its own block of chains, then every
    # process gathers all of them, so each returns the same Fit
    num_procs, proc = jax.process_count(), jax.process_index()
    multi = num_procs > 1 and not batched
    own = np.arange(rows)
    if multi:
        if C % num_procs:
            raise EngineError(
                f"NUTS option num_chains={C}: the chains are split evenly over the {num_procs} "
                f"JAX processes (jax.distributed); use a multiple of {num_procs}.")
        own = np.arange(proc * C // num_procs, (proc + 1) * C // num_procs)
    mesh = None
    if not sequential and len(devices) > 1:
        # the most devices that take equal shares of the chains (4 chains on 8 CPU cores: 4)
        k = max(d for d in range(1, min(len(devices), len(own)) + 1) if len(own) % d == 0)
        if k > 1:
            mesh = jax.sharding.Mesh(np.array(devices[:k]), ("chain",))
    groups = [[int(c)] for c in own] if sequential else [[int(c) for c in own]]
    progs = _programs(posterior, config, mesh, batched)
    compile_before = progs.compile_s
    if batched:  # one data row per chain: posterior b's arrays for its C chains
        data = jax.tree.map(lambda *a: jnp.repeat(jnp.stack(a), C, axis=0),
                            *[p.data_arrays for p in posteriors])
    else:
        data = posterior.data_arrays

    def take(d, idx):
        return jax.tree.map(lambda a: a[idx], d) if batched else d

    W, S, T = config.num_warmup, config.num_samples, config.thinning
    cands, init_keys, warm_keys, samp_keys = [], [], [], []
    init_used = []
    for p, key in zip(posteriors, rng_keys):
        k_init, k_step, k_warm, k_samp = jax.random.split(key, 4)
        start = config.init
        if start == "auto":
            start = default_init(p) or "uniform"
        init_used.append(start)
        cands.append(_candidates(p, k_init, C, start, config.init_radius, num_tries=100))
        for out, k in ((init_keys, k_step), (warm_keys, k_warm), (samp_keys, k_samp)):
            out.append(np.asarray(jax.random.key_data(jax.random.split(k, C))))
    candidates = np.concatenate(cands)
    init_keys, warm_keys, samp_keys = (np.concatenate(k) for k in (init_keys, warm_keys, samp_keys))
    w_stage, w_end = _schedule(W)
    s_stage, s_end = np.full(S * T, SAMPLING, np.int32), np.zeros(S * T, bool)
    wlen, wn = _chunks(W, config.num_chunks)
    slen, sn = _chunks(S * T, config.num_chunks, multiple=T)

    name = posterior.name + (f" x{B}" if batched else "")
    bar = tqdm(total=(W + S * T) * len(own), desc=f"NUTS {name}",
               disable=not config.progress_bar or proc != 0, unit="it")
    num_grad = np.ones(rows, np.int64)  # the initial gradient of each chain
    warm_div = np.zeros(rows, np.int64)
    kept: list[list[DrawInfo]] = [[] for _ in groups]
    step_sizes = {}
    interrupted = False
    try:
        for g, chains in enumerate(groups):
            idx = np.array(chains)
            d = take(data, idx)
            cs, _, num_ok = progs("init", candidates[idx], init_keys[idx], d)
            if np.any(np.asarray(num_ok) == 0):
                bad = posteriors[int(idx[np.argmin(np.asarray(num_ok))]) // C]
                b = int(idx[np.argmin(np.asarray(num_ok))]) // C
                raise _no_start_error(bad, np.asarray(candidates[idx]), num_ok, init_used[b],
                                      config.init_radius)
            for sl, st, en, act in _phase(W, wlen, wn, w_stage, w_end):
                cs, info = progs("chunk", cs, warm_keys[idx], np.int32(sl.start), st, en, act, d)
                num_grad[idx] += np.asarray(info.n_steps).sum(axis=1)
                warm_div[idx] += np.asarray(info.diverging).sum(axis=1)
                bar.update(int(act.sum()) * len(chains))
            if W:
                cs = end_warmup(cs)
            step_sizes[g] = np.asarray(cs.warmup.step_size)
            for sl, st, en, act in _phase(S * T, slen, sn, s_stage, s_end):
                cs, info = progs("chunk", cs, samp_keys[idx], np.int32(sl.start), st, en, act, d)
                info = jax.tree.map(np.asarray, info)
                num_grad[idx] += info.n_steps.sum(axis=1)
                k = int(act.sum())
                # thinning: keep every T-th iteration, summing the work and divergences between
                draws = jax.tree.map(lambda a: a[:, T - 1:k:T], info)
                draws = draws._replace(
                    diverging=info.diverging[:, :k].reshape(len(chains), -1, T).any(-1),
                    n_steps=info.n_steps[:, :k].reshape(len(chains), -1, T).sum(-1),
                )
                kept[g].append(draws)
                bar.update(k * len(chains))
                bar.set_postfix(divergences=sum(int(d.diverging.sum()) for kg in kept for d in kg))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()

    # an interrupted run keeps the chains that made draws (sequential chains may not all have)
    done = [g for g in range(len(groups)) if kept[g]]
    if not done:
        raise KeyboardInterrupt("NUTS was interrupted before any draw was kept")
    per_group = [jax.tree.map(lambda *a: np.concatenate(a, axis=1), *kept[g]) for g in done]
    n_kept = min(d.position.shape[1] for d in per_group)
    info = jax.tree.map(lambda *a: np.concatenate([x[:, :n_kept] for x in a], axis=0), *per_group)
    step_size = np.concatenate([np.atleast_1d(step_sizes[g]) for g in done])
    rows_kept = np.concatenate([np.array(groups[g]) for g in done])
    if multi:
        info, step_size, rows_kept, num_grad, warm_div = _gather_processes(
            info, step_size, rows_kept, num_grad, warm_div)
    chains_kept = info.position.shape[0] // B

    # constrained values and pointwise log-likelihood of every draw, in one compiled pass
    if batched:
        zs = jnp.asarray(info.position.reshape(B, -1, posterior.ndim))
        values, pointwise = progs("post", zs, take(data, np.arange(0, rows, C)))
    else:
        zs = jnp.asarray(info.position.reshape(-1, posterior.ndim))
        values, pointwise = progs("post", zs, data)
    shape3 = (B, chains_kept, n_kept)
    values = {k: np.asarray(v).reshape(shape3 + v.shape[v.ndim - len(posterior.sites[k].shape):])
              for k, v in values.items()}
    pointwise = {k: np.asarray(v).reshape(shape3 + v.shape[(2 if batched else 1):])
                 for k, v in pointwise.items()}
    wall = time.perf_counter() - t_start
    compile_s = progs.compile_s - compile_before

    fits = []
    for b, post in enumerate(posteriors):
        r = slice(b * chains_kept, (b + 1) * chains_kept)
        inf = jax.tree.map(lambda a: a[r], info)
        sample_stats = {
            "diverging": inf.diverging, "lp": inf.lp, "tree_depth": inf.tree_depth,
            "acceptance_rate": inf.acceptance_rate, "energy": inf.energy, "n_steps": inf.n_steps,
            "step_size": np.broadcast_to(step_size[r][:, None], (chains_kept, n_kept)).copy(),
            "reached_max_tree_depth": inf.tree_depth >= config.max_tree_depth,
        }
        flags = []
        ndiv = int(inf.diverging.sum())
        if ndiv:
            flags.append(f"{ndiv} divergent transitions after warmup; consider target_accept=0.9 "
                         "or more, or a reparametrisation")
        maxdepth = int((inf.tree_depth >= config.max_tree_depth).sum())
        if maxdepth:
            flags.append(f"{maxdepth} iterations hit max_tree_depth={config.max_tree_depth}")
        if interrupted:
            flags.append(f"interrupted: kept {n_kept} of {S} draws per chain"
                         + (f" in {chains_kept} of {C} chains" if chains_kept < C else ""))
        flags.extend(convergence_flags({k: v[b] for k, v in values.items()
                                        if k in post.sites and post.sites[k].kind == "latent"}))
        idata = build_datatree(
            post, {k: v[b] for k, v in values.items()}, sample_stats=sample_stats,
            log_likelihood={k: v[b] for k, v in pointwise.items()},
            attrs={"inference_library": "bayeslik", "engine": "nuts", "sampling_time": wall / B},
        )
        mine = rows_kept[r]
        grads = int(num_grad[mine].sum())  # the rows of posterior b that kept draws
        extra = {"num_warmup_divergences": int(warm_div[b * C:(b + 1) * C].sum()),
                 "num_postprocess_evals": chains_kept * n_kept,
                 "num_init_evals": C * candidates.shape[1]}
        if batched:
            extra.update(batch_size=B, batch_wall_s=wall)
        cost = Cost(wall_s=wall / B, compile_s=compile_s / B, num_loglik_evals=grads,
                    num_grad_evals=grads, extra=extra)
        fits.append(Fit(idata=idata, engine="nuts", config=dataclasses.asdict(config), seed=None,
                        cost=cost, model=post.name, flags=tuple(flags)))
    return fits
