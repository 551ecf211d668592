"""The NUTS engine: blackjax's iterative NUTS with Stan's windowed warmup, on a Posterior.

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

from bayeslik.engines._programs import ProgramCache, Programs, draws_fn
from bayeslik.errors import EngineError, InitializationError
from bayeslik.fit import Cost, Fit, build_datatree

__all__ = ["NUTSConfig", "NUTS", "run", "init", "build_step", "end_warmup"]


@dataclass(frozen=True)
class NUTSConfig:
    """Settings of the NUTS engine.

    num_warmup, num_samples : warmup (adaptation) and kept iterations per chain.
    num_chains : independent chains, each with its own adapted step size and mass matrix.
    target_accept : the dual-averaging target of the mean acceptance rate (0.8 as in Stan).
    max_tree_depth : at most 2**max_tree_depth - 1 leapfrog steps per iteration.
    dense_mass : adapt a dense inverse mass matrix instead of a diagonal one.
    init : "uniform" (uniform in [-init_radius, init_radius] in unconstrained space, as Stan),
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
    init: Any = "uniform"
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
        if not (isinstance(self.init, Mapping) or self.init in ("uniform", "prior")):
            raise bad("init", "must be 'uniform', 'prior' or a dict {site: value}.")
        if not float(self.init_radius) > 0:
            raise bad("init_radius", "must be positive.")
        if self.chain_method not in ("vectorized", "sequential"):
            raise bad("chain_method", "must be 'vectorized' or 'sequential'.")


NUTS = NUTSConfig  # bl.engines.NUTS(num_samples=...) reads better in user code


# ---------------------------------------------------------------------------- pure building blocks
class WarmupState(NamedTuple):
    """Stan's windowed adaptation: dual averaging of the step size, Welford mass matrix."""

    ss_state: Any
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


def _adaptation(target_accept: float, dense_mass: bool):
    from blackjax.adaptation.mass_matrix import mass_matrix_adaptation
    from blackjax.adaptation.step_size import dual_averaging_adaptation

    mm = mass_matrix_adaptation(not dense_mass)
    da = dual_averaging_adaptation(target_accept)
    return mm, da


def init(position: jax.Array, logdensity_fn, rng_key: jax.Array, config: NUTSConfig) -> ChainState:
    """Initial state of one chain: NUTS state, a reasonable first step size, identity metric."""
    import blackjax
    from blackjax.adaptation.step_size import find_reasonable_step_size

    (mm_init, _, _), (da_init, _, _) = _adaptation(config.target_accept, config.dense_mass)
    state = blackjax.nuts.init(position, logdensity_fn)
    imm_state = mm_init(position.shape[0])
    hmc_kernel = blackjax.hmc.build_kernel()

    def kernel_generator(step_size):
        return lambda key, st: hmc_kernel(
            key, st, logdensity_fn, step_size, imm_state.inverse_mass_matrix, 1
        )

    step_size = find_reasonable_step_size(
        rng_key, kernel_generator, state, jnp.asarray(1.0, position.dtype), config.target_accept
    )
    ws = WarmupState(da_init(step_size), imm_state, step_size, imm_state.inverse_mass_matrix)
    return ChainState(state, ws)


SAMPLING = 2  # the stage of kept iterations: no adaptation


def build_step(logdensity_fn, config: NUTSConfig):
    """``step(chain_state, (key, stage, window_end, active)) -> (chain_state, DrawInfo)``.

    One NUTS transition, then adaptation by stage: 0 adapts the step size only ("fast"),
    1 also accumulates the mass matrix ("slow"; at a slow window's end the metric is recomputed
    and dual averaging restarts from the averaged step size), 2 (``SAMPLING``) adapts nothing.
    ``active`` False makes the step a no-op (used to pad the last chunk of a phase).
    """
    import blackjax

    (_, mm_update, mm_final), (da_init, da_update, da_final) = _adaptation(
        config.target_accept, config.dense_mass
    )
    kernel = blackjax.nuts.build_kernel()

    def adapt(ws: WarmupState, stage, window_end, position, acceptance_rate) -> WarmupState:
        ss = da_update(ws.ss_state, acceptance_rate)
        imm = jax.lax.cond(
            stage == 1, lambda s: mm_update(s, position), lambda s: s, ws.imm_state
        )

        def end_window(args):
            ss, imm = args
            imm = mm_final(imm)
            return da_init(da_final(ss)), imm, imm.inverse_mass_matrix

        ss, imm, inv_mass = jax.lax.cond(
            window_end, end_window, lambda a: (a[0], a[1], ws.inverse_mass_matrix), (ss, imm)
        )
        return WarmupState(ss, imm, jnp.exp(ss.log_step_size), inv_mass)

    def step(cs: ChainState, x):
        key, stage, window_end, active = x

        def do(cs):
            hmc, info = kernel(
                key, cs.hmc, logdensity_fn, cs.warmup.step_size, cs.warmup.inverse_mass_matrix,
                max_num_doublings=config.max_tree_depth,
            )
            ws = jax.lax.cond(
                stage == SAMPLING,
                lambda w: w,
                lambda w: adapt(w, stage, window_end, hmc.position, info.acceptance_rate),
                cs.warmup,
            )
            return ChainState(hmc, ws), DrawInfo(
                hmc.position, hmc.logdensity, info.is_divergent, info.num_trajectory_expansions,
                info.acceptance_rate, info.energy, info.num_integration_steps,
            )

        def skip(cs):
            h = cs.hmc
            zero = jnp.zeros_like(h.logdensity)
            return cs, DrawInfo(
                h.position, h.logdensity, jnp.zeros((), bool), jnp.zeros((), jnp.int32), zero,
                zero, jnp.zeros((), jnp.int32),
            )

        return jax.lax.cond(active, do, skip, cs)

    return step


def end_warmup(cs: ChainState) -> ChainState:
    """After the warmup, sample with the dual-averaged step size (Stan's choice)."""
    ws = cs.warmup
    return cs._replace(warmup=ws._replace(step_size=jnp.exp(ws.ss_state.log_step_size_avg)))


def _schedule(num_warmup: int, initial_buffer: int = 75, first_window: int = 25,
              final_buffer: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Stan's warmup schedule as (stage, window_end) arrays of length num_warmup.

    A fast window (stage 0) of ``initial_buffer`` steps, slow windows (stage 1) starting at
    ``first_window`` steps and doubling (a window that could not be followed by one twice its
    size takes the rest), a final fast window of ``final_buffer`` steps. Fewer than 20 steps:
    step size only. Too few for the default windows: 15% / 75% / 10%, as Stan does.
    """
    stage = np.zeros(num_warmup, np.int32)
    end = np.zeros(num_warmup, bool)
    if num_warmup < 20:
        return stage, end
    if initial_buffer + first_window + final_buffer > num_warmup:
        initial_buffer = int(0.15 * num_warmup)
        final_buffer = int(0.1 * num_warmup)
        first_window = num_warmup - initial_buffer - final_buffer
    slow_end = num_warmup - final_buffer
    start, size = initial_buffer, first_window
    while start < slow_end:
        if 3 * size > slow_end - start:  # no room for a window twice this size after it
            size = slow_end - start
        stage[start:start + size] = 1
        end[start + size - 1] = True
        start, size = start + size, 2 * size
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
    for p, key in zip(posteriors, rng_keys):
        k_init, k_step, k_warm, k_samp = jax.random.split(key, 4)
        cands.append(_candidates(p, k_init, C, config.init, config.init_radius, num_tries=100))
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
                raise _no_start_error(bad, np.asarray(candidates[idx]), num_ok, config.init,
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
