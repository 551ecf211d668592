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

Self-check (are the new points fresh draws?)
    Nested sampling is exact only if each new point is a draw from the prior inside the contour,
    independent of the live point its slice chain started from; chains too short to forget
    their start (``num_inner_steps`` too small for the dimension or the shape) bias logZ, and
    ``log_evidence_err`` cannot see it. Inside the compiled chunk, each new point is ranked by
    log-likelihood among the ``num_live - num_delete`` points that stayed live (its insertion
    index), and so is its chain's start. For correct draws the insertion rank is uniform
    (Fowlie, Handley & Su 2020) and independent of the start's rank (the start is picked
    uniformly). :func:`self_check` tests both over the whole run and in windows of about
    ``num_live`` new points (Kolmogorov-Smirnov for uniformity; one-sided for a rank correlation
    above ``START_RHO_MIN`` = 0.08, the memory a healthy run may keep; windows Sidak-corrected,
    the four p-values Bonferroni-combined into ``selfcheck_pvalue``). Below ``SELFCHECK_ALPHA``
    = 1e-3 the Fit is flagged (and ``bl.fit`` warns): the new points are not independent
    draws; use more ``num_inner_steps``. The p-values, the mean insertion rank (0.5
    expected), the start-rank correlation (0 expected)
    and the number of ranked points are in the ``nested_samples`` group's attributes. The
    start-rank test is the sharp one: an undermixed chain moves its point little, so the point
    inherits its start's (uniform) insertion rank, while its start's rank predicts it. With
    separated modes of different shapes no slice chain leaves its start's mode, so the
    correlation stays however long the chains (the flag is then right that the draws are not
    independent, but more steps will not help). Not checked: the log-likelihood values the
    slice proposals meet inside blackjax's step-out and shrink loops (NaN there is taken as
    -inf, outside the contour, and not counted; only a bool leaves those loops). Nor does it
    reliably see live points spread over the separated label modes of an exchangeable mixture,
    where the one live covariance spans the gaps between modes and the moves inside a mode are
    short (on ``mixture.example()``'s data unordered, ``num_live=100``: posterior sds 0.77-0.91 of NUTS's, means up
    to 9.8 standard errors off, p = 0.008, not flagged): identify the labels in the model
    (``mixture.model(..., order_by=j)``, same evidence; ``docs/mixtures.md``), as the example now does.

What the Fit holds (as for "nested")
    ``posterior``: equal-weight draws (chain=1); ``log_likelihood``: their pointwise
    log-likelihood; ``nested_samples``: every dead point (constrained values per site,
    ``log_weight`` normalised to ``logsumexp = 0``, ``loglikelihood``, ``loglikelihood_birth``,
    ``log_volume``) with the evidence and the self-check's p-values in its attributes;
    ``Fit.log_evidence`` and its error;
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

__all__ = ["NSSConfig", "NSS", "run", "DeadPoints", "log_weights", "evidence", "self_check",
           "SELFCHECK_ALPHA"]


@dataclass(frozen=True)
class NSSConfig:
    """Settings of the nested slice sampling engine.

    num_live : live points. The logZ error shrinks as sqrt(H / num_live), H the information.
    num_delete : points replaced per step (None: max(1, num_live // 10)); larger values do more
        in parallel (GPU) at the same accuracy per dead point.
    num_inner_steps : slice moves per new point (None: max(5, 5 * ndim)); too few bias logZ
        in many dimensions and leave the live points clumped (the new point stays correlated
        with its start): on the 5-D Gaussian shells 15 steps gave posterior means 3-4 standard
        errors off in 2 of 3 runs, 40 steps none. The run's self-check (module docs) flags
        new points whose likelihood rank follows their start's or is not uniform among the
        live points: the sign that this is too small.
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


# ---------------------------------------------------------------------------- the self-check
#: a run is flagged when its self-check p-value (:func:`self_check`) is below this
SELFCHECK_ALPHA = 1e-3
#: the start-rank test asks whether the rank correlation between new points and their starts
#: exceeds this: healthy default runs keep a little memory (eggbox, 10 moves in 2-D: 0.06,
#: at most 0.10 over 20 seeds), while 5 moves on the 6-D correlated Gaussian (0.125) already
#: understate logZ's error ~1.5x
START_RHO_MIN = 0.08
#: fewer ranked new points than this: no check (p-values NaN, no flag)
SELFCHECK_MIN_POINTS = 50


def _ks_pvalue(u: np.ndarray, inflation: float) -> float:
    """Kolmogorov-Smirnov p-value of ``u`` against U(0, 1), for draws whose empirical process
    has ``inflation`` times the variance of independent ones (the effective size is
    ``len(u) / inflation``); Stephens' finite-size form of the asymptotic distribution."""
    from scipy import special

    x = np.sort(u)
    i = np.arange(1, len(x) + 1)
    d = max(np.max(i / len(x) - x), np.max(x - (i - 1) / len(x)))
    n = len(u) / inflation
    return float(special.kolmogorov((math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d))


def _dependence_pvalue(s: np.ndarray, u: np.ndarray, rho_min: float = 0.0) -> float:
    """One-sided p-value of the hypothesis that the correlation of the uniforms ``s`` and ``u``
    is at most ``rho_min``, from ``T = sum (s - 1/2)(u - 1/2)`` (mean ``rho n / 12``). At
    ``rho_min = 0``, with each ``s`` U(0, 1) and independent of ``u`` and of the past, ``T`` is a
    martingale; it is standardised by its realised variance ``sum (u - 1/2)^2 / 12``."""
    from scipy import special

    du = u - 0.5
    t = np.sum((s - 0.5) * du) - rho_min * len(u) / 12.0
    return float(special.ndtr(-t / math.sqrt(max(np.sum(du**2) / 12.0, 1e-300))))


def _windowed(pvalue, *arrays: np.ndarray, steps: int) -> tuple[float, int]:
    """(the smallest of ``pvalue`` over consecutive windows of ``steps`` steps (the last one
    longer), Sidak-corrected for their number ``m``: ``1 - (1 - p_min)^m``; m)."""
    m = max(1, len(arrays[0]) // steps)
    p_min = min(pvalue(*(a.ravel() for a in w))
                for w in zip(*(np.array_split(a, m) for a in arrays)))
    return float(-np.expm1(m * np.log1p(-min(p_min, 1.0 - 1e-16)))), m


def self_check(rng: np.random.Generator, counts, num_live: int, num_delete: int,
               rho_min: float = START_RHO_MIN) -> dict:
    """The self-check of a run from each step's rank counts (:func:`_rank_counts`, stacked over
    steps in their order): are the new points fresh draws from the prior inside the contour?

    Each step's new points are ranked (by log-likelihood) among the ``M = num_live -
    num_delete`` points that stayed live, ties broken at random and the rank jittered:
    ``u = (below + U(0, tied + 1)) / (M + 1)``; the survivor each one's slice chain started
    from is ranked likewise, ``s`` (on 0..M-1, divided by M). For correctly drawn points
    ``u ~ U(0, 1)`` (the insertion-index test of Fowlie, Handley & Su 2020) and ``s`` (the start
    is picked uniformly) is independent of ``u``. Four p-values:

    * ``insertion_pvalue_run``: Kolmogorov-Smirnov of u over the run. The new points of one
      step share their reference points, which makes the empirical process of the u's
      ``1 + (num_delete - 1) / M`` times as variable as that of independent draws: the KS
      p-values use that effective size;
    * ``insertion_pvalue_windows``: the same in consecutive windows of about ``num_live`` new
      points (a failure in part of the run only), the smallest corrected for the number of
      windows ``m`` by Sidak, ``1 - (1 - p_min)^m`` (windows share no points);
    * ``start_pvalue_run`` / ``start_pvalue_windows``: the one-sided test that the rank
      correlation of u and s is at most ``rho_min`` (:func:`_dependence_pvalue`; at
      ``rho_min = 0`` the statistic is a martingale needing no correction for shared reference
      points, as the starts are drawn independently). A slice chain too short to forget its
      start leaves a new point near it in likelihood: the rank correlation
      ``start_rank_correlation`` is positive. The floor ``rho_min``
      (:data:`START_RHO_MIN`) keeps the small memory healthy runs have (a p-value test of
      exactly 0 rejects it in long runs) from flagging. This is the stronger test: an
      undermixed chain moves its point little, so its insertion rank stays nearly uniform
      (it inherits its start's) while the start's rank predicts it;

    ``selfcheck_pvalue = min(1, 4 min(all four))`` (Bonferroni), flagged below
    :data:`SELFCHECK_ALPHA`. Also the number of ranked points and windows and the mean of u
    (0.5 expected). Steps whose survivors are not all strictly above the contour (a -inf
    contour with zero-likelihood survivors, a plateau) are left out.
    """
    below, tied, start_below, start_tied, usable = (np.asarray(c) for c in counts)
    usable = usable.reshape(-1).astype(bool)
    shape = (len(usable), num_delete)
    below, tied, start_below, start_tied = (np.asarray(a, np.float64).reshape(shape)[usable]
                                            for a in (below, tied, start_below, start_tied))
    m_ref = num_live - num_delete
    u = (below + rng.random(below.shape) * (tied + 1.0)) / (m_ref + 1.0)
    s = (start_below + rng.random(below.shape) * (start_tied + 1.0)) / m_ref
    n = int(u.size)
    out = {"selfcheck_pvalue": math.nan, "insertion_pvalue_run": math.nan,
           "insertion_pvalue_windows": math.nan, "start_pvalue_run": math.nan,
           "start_pvalue_windows": math.nan, "selfcheck_num_points": n,
           "selfcheck_num_windows": 0, "insertion_mean_rank": math.nan,
           "start_rank_correlation": math.nan}
    if n < SELFCHECK_MIN_POINTS:
        return out
    inflation = 1.0 + (num_delete - 1) / m_ref
    ks = lambda x: _ks_pvalue(x, inflation)  # noqa: E731
    steps = max(1, int(round(num_live / num_delete)))
    p_ins, m = _windowed(ks, u, steps=steps)
    dep = lambda a, b: _dependence_pvalue(a, b, rho_min)  # noqa: E731
    p_dep, _ = _windowed(dep, s, u, steps=steps)
    found = {"insertion_pvalue_run": ks(u.ravel()), "insertion_pvalue_windows": p_ins,
             "start_pvalue_run": dep(s.ravel(), u.ravel()),
             "start_pvalue_windows": p_dep}
    out.update(found, selfcheck_pvalue=min(1.0, 4.0 * min(found.values())),
               selfcheck_num_windows=m, insertion_mean_rank=float(u.mean()),
               start_rank_correlation=float(np.corrcoef(s.ravel(), u.ravel())[0, 1]))
    return out


def _selfcheck_flag(check: dict, inner: int, ndim: int) -> str | None:
    """The flag of a run whose self-check rejects (None where it passes)."""
    p = check["selfcheck_pvalue"]
    if not p < SELFCHECK_ALPHA:
        return None
    seen = []
    if min(check["start_pvalue_run"], check["start_pvalue_windows"]) * 4 < SELFCHECK_ALPHA:
        seen.append(f"a new point's likelihood rank follows that of the live point its slice "
                    f"chain started from (rank correlation "
                    f"{check['start_rank_correlation']:.3f}, 0 expected, more than "
                    f"{START_RHO_MIN:g} is flagged)")
    if min(check["insertion_pvalue_run"], check["insertion_pvalue_windows"]) * 4 \
            < SELFCHECK_ALPHA:
        seen.append(f"the ranks of new points among the live ones are not uniform (mean "
                    f"{check['insertion_mean_rank']:.3f}, 0.5 expected)")
    return (f"self-check failed (p = {p:.2g} < {SELFCHECK_ALPHA:g} over "
            f"{check['selfcheck_num_points']} new points): {'; '.join(seen)}. The new points are "
            "not fresh draws from the prior inside the likelihood contour: the slice chains "
            "are too short to forget their starts, which biases logZ and makes its error too "
            f"small. Use more slice moves per new point: num_inner_steps="
            f"{max(2 * inner, 5 * ndim)} or more (now {inner}); if the posterior has separated "
            "modes of different shapes, chains cannot leave their start's mode and more steps "
            "will not clear this")


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
                                num_delete=num_delete, update_strategy=_take_last_with_starts)

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
                old = st.particles.loglikelihood
                st, info = step(key, st)
                ui, start = info.update_info
                num_evals = jnp.sum(2 + ui.num_expansions + ui.num_shrink)
                p = info.particles
                ranks = _rank_counts(old, st.particles.loglikelihood, start, num_delete)
                return st, (p.position, p.loglikelihood, p.loglikelihood_birth, num_evals,
                            ranks)

            return jax.lax.scan(body, state, keys)

        self._fns = {"init": jax.jit(init), "chunk": jax.jit(chunk),
                     "values": jax.jit(values_fn(posterior)),
                     "pointwise": jax.jit(pointwise_fn(posterior))}



def _take_last_with_starts(constrained_step, num_inner: int, num_delete: int):
    """blackjax's ``update_strategy`` seam: each of the ``num_delete`` new points is the last of
    ``num_inner`` constrained moves from a live point drawn uniformly among those strictly
    inside the contour (all of them where none is), born at the contour. Its update info is
    (the moves' infos (num_delete, num_inner), the start indices (num_delete,)): the self-check
    ranks the starts."""

    def update(rng_key, state, loglikelihood_0, **params):
        pick, move = jax.random.split(rng_key)
        inside = state.particles.loglikelihood > loglikelihood_0
        logits = jnp.where(inside | ~jnp.any(inside), 0.0, -jnp.inf)
        start = jax.random.categorical(pick, logits, shape=(num_delete,))

        def chain(key, particle):
            def one(p, k):
                return constrained_step(k, p, loglikelihood_0, **params)

            return jax.lax.scan(one, particle, jax.random.split(key, num_inner))

        first = jax.tree.map(lambda x: x[start], state.particles)
        new, infos = jax.vmap(chain)(jax.random.split(move, num_delete), first)
        birth = jnp.full_like(new.loglikelihood_birth, loglikelihood_0)
        return new._replace(loglikelihood_birth=birth), (infos, start)

    return update


def _rank_counts(old: jax.Array, new: jax.Array, start: jax.Array, num_delete: int):
    """The ranks of one step, from the live log-likelihoods before (``old``) and after (``new``)
    it and the start indices of its slice chains: the slots blackjax overwrote are the
    ``num_delete`` of lowest ``old`` (its ``delete_fn``: the same ``top_k``, so the same slots);
    the reference set is the points that stayed live. Returns (below, tied (num_delete,):
    survivors with a lower / equal log-likelihood than each new point; start_below, start_tied:
    the same for each start (itself not counted); usable (): whether every survivor lies
    strictly above the contour, the condition under which a correct point's rank is uniform)."""
    _, dead = jax.lax.top_k(-old, num_delete)
    survivor = jnp.ones(old.shape, bool).at[dead].set(False)

    def count(values, minus=0):
        less = survivor[None] & (old[None] < values[:, None])
        same = survivor[None] & (old[None] == values[:, None])
        return (jnp.sum(less, axis=1, dtype=jnp.int32),
                jnp.sum(same, axis=1, dtype=jnp.int32) - minus)

    usable = jnp.all(jnp.where(survivor, old > jnp.max(old[dead]), True))
    return (*count(new[dead]), *count(old[start], minus=1), usable)


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
    counts = [np.concatenate([c[4][i] for c in chunks]) if chunks else np.zeros((0, k))
              for i in range(5)]
    check = self_check(_rng(jax.random.fold_in(k_vol, 1)), counts, config.num_live, k)
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
    run.flag(_selfcheck_flag(check, inner, posterior.ndim))
    # the initial live points only: the slice proposals' values do not leave blackjax's step
    nonfinite = {**run.nonfinite(int(bad[0]), config.num_live, what="log-likelihood",
                                 point=point, scope="at the initial live points"),
                 **run.nonfinite(int(bad[1]), config.num_live, what="log prior", point=point,
                                 scope="at the initial live points")}
    attrs = {"num_live": config.num_live, "num_delete": k, "num_inner_steps": inner,
             "num_steps": steps, "ess": ess, "logz_integrator": float(state.integrator.logZ),
             **check}
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
