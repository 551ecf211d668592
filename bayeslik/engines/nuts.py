"""The NUTS engine: blackjax's iterative NUTS with Stan's windowed warmup, on a Posterior.

Chains are vectorised with ``vmap`` on one device and split over devices with ``shard_map``
when there are several. The warmup (Stan's schedule: a fast window for the step size, doubling
slow windows for the mass matrix, a final fast window) and the sampling run as a few chunks of a
``lax.scan``, each chunk one call of a function compiled once, so a progress bar can move
between chunks and an interrupted run keeps every draw made before the interrupt.

The compiled functions are cached per Posterior and settings: fitting the same Posterior again
compiles nothing.
"""

from __future__ import annotations

import dataclasses
import math
import time
import weakref
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bayeslik.errors import EngineError, InitializationError
from bayeslik.fit import Cost, Fit, build_datatree

__all__ = ["NUTSConfig", "NUTS", "run", "init", "build_warmup_step", "build_sample_step"]


@dataclass(frozen=True)
class NUTSConfig:
    """Settings of the NUTS engine.

    num_warmup, num_samples : warmup (adaptation) and kept iterations per chain.
    num_chains : independent chains, each with its own adapted step size and mass matrix.
    target_accept : the dual-averaging target of the mean acceptance rate (0.8 as in Stan).
    max_tree_depth : at most 2**max_tree_depth - 1 leapfrog steps per iteration.
    dense_mass : adapt a dense inverse mass matrix instead of a diagonal one.
    init : "uniform" (uniform in [-init_radius, init_radius] in unconstrained space, as Stan)
        or "prior" (draws from the prior).
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
    init: str = "uniform"
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
        if self.init not in ("uniform", "prior"):
            raise bad("init", "must be 'uniform' or 'prior'.")
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


def build_warmup_step(logdensity_fn, config: NUTSConfig):
    """``step(chain_state, (key, stage, window_end, active)) -> (chain_state, (n_steps, div))``.

    stage 0 adapts the step size only ("fast"), stage 1 also accumulates the mass matrix
    ("slow"); at a slow window's end the metric is recomputed and dual averaging restarts from
    the averaged step size. ``active`` False makes the step a no-op (used to pad the last chunk).
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
            ws = adapt(cs.warmup, stage, window_end, hmc.position, info.acceptance_rate)
            return ChainState(hmc, ws), (info.num_integration_steps, info.is_divergent)

        def skip(cs):
            return cs, (jnp.zeros((), jnp.int32), jnp.zeros((), bool))

        return jax.lax.cond(active, do, skip, cs)

    return step


def build_sample_step(logdensity_fn, config: NUTSConfig):
    """``step(hmc_state, (key, active), step_size, inverse_mass_matrix) -> (state, DrawInfo)``."""
    import blackjax

    kernel = blackjax.nuts.build_kernel()

    def step(hmc, x, step_size, inverse_mass_matrix):
        key, active = x

        def one(carry, k):
            st, n, div = carry
            st, info = kernel(
                k, st, logdensity_fn, step_size, inverse_mass_matrix,
                max_num_doublings=config.max_tree_depth,
            )
            return (st, n + info.num_integration_steps, div | info.is_divergent), info

        def do(hmc):
            keys = jax.random.split(key, config.thinning)
            (st, n, div), infos = jax.lax.scan(
                one, (hmc, jnp.zeros((), jnp.int32), jnp.zeros((), bool)), keys
            )
            last = jax.tree.map(lambda a: a[-1], infos)
            return st, DrawInfo(
                st.position, st.logdensity, div, last.num_trajectory_expansions,
                last.acceptance_rate, last.energy, n,
            )

        def skip(hmc):
            z = jnp.zeros_like
            return hmc, DrawInfo(
                hmc.position, hmc.logdensity, jnp.zeros((), bool), jnp.zeros((), jnp.int32),
                z(hmc.logdensity), z(hmc.logdensity), jnp.zeros((), jnp.int32),
            )

        return jax.lax.cond(active, do, skip, hmc)

    return step


def _schedule(num_warmup: int) -> tuple[np.ndarray, np.ndarray]:
    """Stan's warmup schedule as (stage, window_end) arrays of length num_warmup."""
    if num_warmup == 0:
        return np.zeros(0, np.int32), np.zeros(0, bool)
    from blackjax.adaptation.window_adaptation import build_schedule

    sched = build_schedule(num_warmup)
    stage = np.array([s for s, _ in sched], np.int32)
    end = np.array([e for _, e in sched], bool)
    return stage, end


# ---------------------------------------------------------------------------- compiled programs
class _Programs:
    """The jitted functions of one (Posterior, settings) pair, compiled once and reused."""

    def __init__(self, posterior, config: NUTSConfig, num_local_chains: int, mesh):
        self.compile_s = 0.0
        logdensity = posterior.logdensity
        self._compiled: dict[str, Any] = {}
        warm_step = build_warmup_step(logdensity, config)
        sample_step = build_sample_step(logdensity, config)

        def warm_chunk(cs, keys, stage, end, active):
            return jax.lax.scan(warm_step, cs, (keys, stage, end, active))

        def sample_chunk(hmc, keys, active, step_size, imm):
            return jax.lax.scan(
                lambda st, x: sample_step(st, x, step_size, imm), hmc, (keys, active)
            )

        def init_fn(z, key):
            return init(z, logdensity, key, config)

        vinit = jax.vmap(init_fn)
        vwarm = jax.vmap(warm_chunk, in_axes=(0, 0, None, None, None))
        vsample = jax.vmap(sample_chunk, in_axes=(0, 0, None, 0, 0))
        if mesh is not None:
            from jax.sharding import PartitionSpec as P

            c, r = P("chain"), P()
            vinit = jax.shard_map(vinit, mesh=mesh, in_specs=(c, c), out_specs=c, check_vma=False)
            vwarm = jax.shard_map(
                vwarm, mesh=mesh, in_specs=(c, c, r, r, r), out_specs=(c, c), check_vma=False
            )
            vsample = jax.shard_map(
                vsample, mesh=mesh, in_specs=(c, c, r, c, c), out_specs=(c, c), check_vma=False
            )
        self._fns = {"init": jax.jit(vinit), "warm": jax.jit(vwarm), "sample": jax.jit(vsample)}

        def post(z):
            ev = posterior.evaluate(z)
            return ev.values, ev.pointwise_loglikelihood

        self._fns["post"] = jax.jit(lambda zs: jax.lax.map(post, zs, batch_size=256))

    def __call__(self, name: str, *args):
        sig = (name,) + tuple(
            (np.shape(a), str(getattr(a, "dtype", type(a)))) for a in jax.tree.leaves(args)
        )
        exe = self._compiled.get(sig)
        if exe is None:
            t0 = time.perf_counter()
            exe = self._fns[name].lower(*args).compile()
            self.compile_s += time.perf_counter() - t0
            self._compiled[sig] = exe
        return exe(*args)


_CACHE: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _programs(posterior, config: NUTSConfig, num_local_chains: int, mesh) -> _Programs:
    static = dataclasses.replace(
        config, num_warmup=0, num_samples=1, num_chains=1, progress_bar=False, init="uniform"
    )
    key = (static, num_local_chains, None if mesh is None else tuple(mesh.devices.flat))
    per_post = _CACHE.setdefault(posterior, {})
    if key not in per_post:
        per_post[key] = _Programs(posterior, config, num_local_chains, mesh)
    return per_post[key]


# ---------------------------------------------------------------------------- initialisation
def initial_positions(posterior, rng_key: jax.Array, num_chains: int, init: str = "uniform",
                      radius: float = 2.0, num_tries: int = 100) -> np.ndarray:
    """A finite starting point per chain, (num_chains, ndim).

    Tries ``num_tries`` candidates per chain (uniform in [-radius, radius] on the unconstrained
    scale, or prior draws) and keeps the first whose log density and gradient are finite.
    Raises InitializationError, saying which term is not finite, when a chain has none.
    """
    n = num_chains * num_tries
    if init == "prior":
        cand = posterior.sample_prior(rng_key, n)
    else:
        cand = jax.random.uniform(rng_key, (n, posterior.ndim), minval=-radius, maxval=radius)
    vg = jax.jit(jax.vmap(jax.value_and_grad(posterior.logdensity)))
    val, grad = vg(cand)
    ok = np.isfinite(np.asarray(val)) & np.isfinite(np.asarray(grad)).all(axis=1)
    ok = ok.reshape(num_chains, num_tries)
    cand = np.asarray(cand).reshape(num_chains, num_tries, -1)
    if not ok.any():
        z = jnp.asarray(cand[0, 0])
        lp, ll = float(posterior.logprior(z)), float(posterior.loglikelihood(z))
        raise InitializationError(
            f"no finite starting point for model '{posterior.name}' in {num_tries} tries per chain "
            f"(init={init!r}, radius {radius}). At the first candidate the log prior was {lp} and "
            f"the log-likelihood {ll}. Check that the data lie in the support of the likelihood "
            "for plausible parameters, that the model has no log(0) or division by zero, or try "
            "init='prior' or a smaller init_radius."
        )
    bad = np.flatnonzero(~ok.any(axis=1))
    if bad.size:
        raise InitializationError(
            f"chains {bad.tolist()} found no finite starting point in {num_tries} tries "
            f"(init={init!r}); only {int(ok.sum())} of {n} candidates were finite. Try "
            "init='prior' or a smaller init_radius."
        )
    first = ok.argmax(axis=1)
    return cand[np.arange(num_chains), first]


# ---------------------------------------------------------------------------- the run
def _chunks(total: int, num_chunks: int) -> tuple[int, int]:
    """(chunk length, number of chunks) covering ``total`` steps."""
    if total == 0:
        return 1, 0
    length = math.ceil(total / min(num_chunks, total))
    return length, math.ceil(total / length)


def _split_keys(key, num_chains: int, num_steps: int):
    return jax.random.split(key, (num_chains, num_steps))


def run(posterior, rng_key: jax.Array, config: NUTSConfig) -> Fit:
    """Run NUTS on ``posterior`` and return a Fit.

    >>> fit = run(post, jax.random.key(0), NUTSConfig(num_samples=500))  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    devices = jax.local_devices()
    sequential = config.chain_method == "sequential"
    mesh = None
    if not sequential and len(devices) > 1 and config.num_chains % len(devices) == 0:
        mesh = jax.sharding.Mesh(np.array(devices), ("chain",))
    groups = [[c] for c in range(config.num_chains)] if sequential else [list(range(config.num_chains))]
    local = len(groups[0])
    progs = _programs(posterior, config, local, mesh)
    compile_before = progs.compile_s

    k_init, k_step, k_warm, k_samp = jax.random.split(rng_key, 4)
    z0 = initial_positions(
        posterior, k_init, config.num_chains, config.init, config.init_radius
    )
    stage, wend = _schedule(config.num_warmup)
    wlen, wn = _chunks(config.num_warmup, config.num_chunks)
    slen, sn = _chunks(config.num_samples, config.num_chunks)
    step_keys = jax.random.split(k_step, config.num_chains)
    warm_keys = _split_keys(k_warm, config.num_chains, max(wlen * wn, 1))
    samp_keys = _split_keys(k_samp, config.num_chains, slen * sn)

    total = (config.num_warmup + config.num_samples) * config.num_chains
    bar = tqdm(total=total, desc=f"NUTS {posterior.name}", disable=not config.progress_bar,
               unit="it", leave=True)
    num_grad = config.num_chains  # the initial gradient of each chain
    warm_div = 0
    draws: list[list[DrawInfo]] = [[] for _ in groups]
    step_sizes = []
    interrupted = None
    try:
        for g, chains in enumerate(groups):
            cs = progs("init", jnp.asarray(z0[chains]), step_keys[np.array(chains)])
            for i in range(wn):
                sl = slice(i * wlen, (i + 1) * wlen)
                st, en = stage[sl], wend[sl]
                act = np.ones(wlen, bool)
                act[len(st):] = False
                st = np.pad(st, (0, wlen - len(st)))
                en = np.pad(en, (0, wlen - len(en)))
                cs, (nsteps, div) = progs("warm", cs, warm_keys[np.array(chains), sl.start:sl.stop],
                                          jnp.asarray(st), jnp.asarray(en), jnp.asarray(act))
                num_grad += int(np.sum(nsteps))
                warm_div += int(np.sum(div))
                bar.update(int(act.sum()) * len(chains))
            step_size = jnp.exp(cs.warmup.ss_state.log_step_size_avg) if config.num_warmup else cs.warmup.step_size
            imm = cs.warmup.inverse_mass_matrix
            step_sizes.append(np.asarray(step_size))
            hmc = cs.hmc
            for i in range(sn):
                act = np.arange(i * slen, (i + 1) * slen) < config.num_samples
                hmc, info = progs("sample", hmc, samp_keys[np.array(chains), i * slen:(i + 1) * slen],
                                  jnp.asarray(act), step_size, imm)
                info = jax.tree.map(lambda a: np.asarray(a)[:, : int(act.sum())], info)
                draws[g].append(info)
                num_grad += int(info.n_steps.sum())
                bar.update(int(act.sum()) * len(chains))
                bar.set_postfix(divergences=sum(int(d.diverging.sum()) for dg in draws for d in dg))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()

    done = [np.concatenate([getattr(d, "position") for d in dg], axis=1) if dg else None for dg in draws]
    if interrupted and (not draws[0] or any(d is None for d in done)):
        raise KeyboardInterrupt("NUTS interrupted before any draw was kept by every chain")
    n_kept = min(d.shape[1] for d in done)
    info = DrawInfo(*[
        np.concatenate([np.concatenate([getattr(d, f) for d in dg], axis=1)[:, :n_kept] for dg in draws], axis=0)
        for f in DrawInfo._fields
    ])
    step_size = np.concatenate([np.atleast_1d(s) for s in step_sizes])

    # constrained values and pointwise log-likelihood of every draw, in one compiled pass
    zs = info.position.reshape(-1, posterior.ndim)
    values, pointwise = progs("post", jnp.asarray(zs))
    shape2 = info.position.shape[:2]
    values = {k: np.asarray(v).reshape(shape2 + v.shape[1:]) for k, v in values.items()}
    pointwise = {k: np.asarray(v).reshape(shape2 + v.shape[1:]) for k, v in pointwise.items()}

    sample_stats = {
        "diverging": info.diverging,
        "lp": info.lp,
        "tree_depth": info.tree_depth,
        "acceptance_rate": info.acceptance_rate,
        "energy": info.energy,
        "n_steps": info.n_steps,
        "step_size": np.broadcast_to(step_size[:, None], shape2).copy(),
    }
    wall = time.perf_counter() - t_start
    flags = []
    ndiv = int(info.diverging.sum())
    if ndiv:
        flags.append(f"{ndiv} divergent transitions after warmup; consider target_accept=0.9+ "
                     "or a reparametrisation")
    if interrupted:
        flags.append(f"interrupted: kept {n_kept} of {config.num_samples} draws per chain")
    maxdepth = int((info.tree_depth >= config.max_tree_depth).sum())
    if maxdepth:
        flags.append(f"{maxdepth} iterations hit max_tree_depth={config.max_tree_depth}")
    cfg = dataclasses.asdict(config)
    idata = build_datatree(
        posterior, values, sample_stats=sample_stats, log_likelihood=pointwise,
        attrs={"inference_library": "bayeslik", "engine": "nuts", "sampling_time": wall},
    )
    cost = Cost(
        wall_s=wall,
        compile_s=progs.compile_s - compile_before,
        num_loglik_evals=num_grad,
        num_grad_evals=num_grad,
        extra={"num_warmup_divergences": warm_div, "num_postprocess_evals": int(zs.shape[0])},
    )
    return Fit(idata=idata, engine="nuts", config=cfg, seed=None, cost=cost, model=posterior.name,
               flags=tuple(flags))
