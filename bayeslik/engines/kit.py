"""The engine kit: what every engine's ``run`` shares, written once.

An engine is its algorithm (pure ``init`` / ``build_kernel`` functions with NamedTuple states
and infos, for JAX-native engines) plus a short ``run(posterior, rng_key, config) -> Fit`` on
this layer:

* :class:`Run` -- one run's bookkeeping: the wall clock from the start, the compile seconds of
  the compiled programs it was given (:meth:`Run.track`), a tqdm progress bar that honours
  ``config.progress_bar`` (:meth:`Run.progress`), the interrupt policy (:meth:`Run.interruptible`:
  Ctrl-C stops the loop, the run keeps what it has and says so in a flag), and the flags;
* :func:`chains_fit` -- the Fit of an engine that makes chains of draws (NUTS, PMMH), with the
  convergence flags (R-hat, ESS) added;
* :func:`weighted_fit` -- the Fit of an engine that makes weighted points (nested sampling,
  SMC): equal-weight draws in ``posterior``, the weighted points and their log weights in an
  extra group, the evidence in the Fit and in the group's attributes;
* :class:`Programs` / :class:`ProgramCache` / :func:`draws_fn` -- compiled functions compiled
  once per argument signature and timed, cached per (Posterior ``cache_key``, settings); the
  constrained values and pointwise log-likelihood of a batch of draws (:func:`values_fn` and
  :func:`pointwise_fn` apart), run in bounded memory by :meth:`Programs.map_into`;
* the ``log_likelihood`` group, kept or left out as ``bl.fit(..., log_likelihood=...)`` says
  ("auto": kept when it takes at most :func:`loglikelihood_budget` bytes): the option reaches
  every engine through :class:`Run` (:meth:`Run.keep_loglikelihood`, asked before the group is
  computed; :func:`chains_fit` and :func:`weighted_fit` apply it to an engine that did not ask),
  and :func:`pointwise_loglikelihood` adds the group to a Fit later;
* :class:`Check` -- the validation of an engine's config, one message style for all:
  ``"<Engine> option <name>=<value>: <why>"``, raised as :class:`~bayeslik.errors.EngineError`.

See ``docs/engines/writing.md`` for an engine written on the kit from scratch.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os
import threading
import time
import weakref
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from bayeslik.convergence import convergence_flags
from bayeslik.engines._programs import (ProgramCache, Programs, draws_fn, pointwise_fn,
                                        values_fn)
from bayeslik.errors import EngineError, OptionError
from bayeslik.fit import Cost, Fit, build_datatree, format_bytes, site_dataset

__all__ = ["Run", "Check", "chains_fit", "weighted_fit", "Programs", "ProgramCache", "draws_fn",
           "values_fn", "pointwise_fn", "loglikelihood_option", "loglikelihood_budget",
           "pointwise_size", "pointwise_loglikelihood", "BUDGET_ENV", "DEFAULT_BUDGET",
           "LEFT_OUT"]


# ---------------------------------------------------------------------------- log_likelihood option
#: the environment variable that overrides the "auto" budget of the log_likelihood group (bytes)
BUDGET_ENV = "BAYESLIK_LOG_LIKELIHOOD_MAX_BYTES"
#: the "auto" budget of the log_likelihood group when the variable is not set: 1 GiB
DEFAULT_BUDGET = 2**30
#: how the flag of a Fit whose log_likelihood group was left out begins
LEFT_OUT = "log_likelihood group left out"

# bl.fit's log_likelihood option for the engine runs started inside it; engine runs started
# elsewhere (run_many, an engine's run called directly) see the default, "auto"
_OPTION: contextvars.ContextVar = contextvars.ContextVar("bayeslik_log_likelihood",
                                                         default="auto")


def loglikelihood_budget() -> int:
    """The most bytes an "auto" log_likelihood group may take: ``BAYESLIK_LOG_LIKELIHOOD_MAX_BYTES``
    (a whole number of bytes, e.g. ``500000000`` or ``5e8``) or 1 GiB. A value that is not one
    raises EngineError naming the variable."""
    raw = os.environ.get(BUDGET_ENV, "").strip()
    if not raw:
        return DEFAULT_BUDGET
    try:
        value = float(raw.replace("_", ""))
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value >= 0 and value == int(value)):
        raise EngineError(f"the environment variable {BUDGET_ENV}={raw!r}: must be a whole number "
                          f"of bytes >= 0 (unset, the budget is {DEFAULT_BUDGET} = 1 GiB).")
    return int(value)


@contextlib.contextmanager
def loglikelihood_option(value: Any, posterior: Any = None):
    """Run engines inside with bl.fit's ``log_likelihood`` option: ``"auto"`` (keep the group
    when it takes at most :func:`loglikelihood_budget` bytes, else leave it out with a flag),
    ``True`` (always), ``False`` (never, no flag). The value (and, for "auto", the budget) is
    checked on entry, before anything runs: EngineError. ``True`` for a posterior that has no
    pointwise log-likelihood (a StateSpacePosterior) is refused too.

    >>> with loglikelihood_option(False):
    ...     Run("demo", posterior=None, config=None).log_likelihood
    False
    """
    if isinstance(value, (bool, np.bool_)):
        value = bool(value)
    elif not (isinstance(value, str) and value == "auto"):
        raise EngineError(f"fit option log_likelihood={value!r}: must be 'auto', True or False.")
    if value == "auto":
        loglikelihood_budget()
    if value is True and posterior is not None and not hasattr(posterior,
                                                                "pointwise_loglikelihood"):
        raise EngineError(
            f"fit option log_likelihood=True: a {type(posterior).__name__} has no pointwise "
            "log-likelihood, so no engine can make a log_likelihood group for it; pass 'auto' "
            "or False.")
    token = _OPTION.set(value)
    try:
        yield value
    finally:
        _OPTION.reset(token)


def pointwise_size(posterior: Any) -> tuple[int, int]:
    """(the number of pointwise log-likelihood terms of one draw, bytes per term) of a
    Posterior, found abstractly (nothing is run); (0, 0) where it has no pointwise
    log-likelihood."""
    fn = getattr(posterior, "pointwise_loglikelihood", None)
    if fn is None:
        return 0, 0
    leaves = jax.tree.leaves(jax.eval_shape(fn, jnp.zeros(posterior.ndim)))
    return (int(sum(math.prod(a.shape) for a in leaves)),
            max((int(a.dtype.itemsize) for a in leaves), default=0))


# ---------------------------------------------------------------------------- the compile clock
# JAX reports each compilation as time spans: tracing to a jaxpr, lowering to MLIR, XLA's
# compile (only the last means a program was built; a bare trace, e.g. jax.eval_shape, is not)
_TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
_LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_BACKEND_EVENT = "/jax/core/compile/backend_compile_duration"
_CLOCK_STATE: dict[str, Any] = {"listening": False, "local": threading.local()}
_CLOCK_LOCK = threading.Lock()


class _CompileClock:
    """The JAX compile time spans seen in the thread that started the clock (a run's own
    compiles: runs in other threads, e.g. a ThreadPoolExecutor's, have their own clocks)."""

    __slots__ = ("spans", "built", "__weakref__")

    def __init__(self) -> None:
        self.spans: list[tuple[float, float]] = []
        self.built = False  # whether XLA compiled anything (not only traced)

    def seconds(self) -> float:
        """The length of the union of the spans (nested ones, e.g. an inner jit traced inside
        an outer one, count once)."""
        total, end = 0.0, -math.inf
        for a, b in sorted(self.spans):
            if b > end:
                total += b - max(a, end)
                end = b
        return total


def _on_compile_span(event: str, start: float, end: float, **_: Any) -> None:
    if event not in (_TRACE_EVENT, _LOWER_EVENT, _BACKEND_EVENT):
        return
    for ref in getattr(_CLOCK_STATE["local"], "clocks", ()):
        clock = ref()
        if clock is not None:
            clock.spans.append((start, end))
            clock.built = clock.built or event == _BACKEND_EVENT


def _start_compile_clock() -> _CompileClock | None:
    """A clock of this thread's JAX compiles from now on; None where this JAX cannot tell
    (no time-span listeners)."""
    register = getattr(jax.monitoring, "register_event_time_span_listener", None)
    if register is None:
        return None
    with _CLOCK_LOCK:
        if not _CLOCK_STATE["listening"]:
            register(_on_compile_span)
            _CLOCK_STATE["listening"] = True
    local = _CLOCK_STATE["local"]
    clock = _CompileClock()
    # the thread's clocks, weakly held: a finished run's clock goes with its Run
    local.clocks = [r for r in getattr(local, "clocks", ()) if r() is not None]
    local.clocks.append(weakref.ref(clock))
    return clock


def _num_compiled(programs: Any) -> int | None:
    """How many compiled programs a tracked object holds (a Programs, or an object with its
    Programs in ``_progs``, as the nested engine's likelihood); None where it cannot tell."""
    compiled = getattr(getattr(programs, "_progs", programs), "_compiled", None)
    return None if compiled is None else len(compiled)


def nonfinite_mask(x: Any) -> Any:
    """Where a log density ``x`` is NaN or +inf: a value no engine can weigh (-inf, a zero
    density, is legitimate). NumPy and JAX arrays alike (inside ``jit`` too)."""
    return (x != x) | (x == math.inf)


# ---------------------------------------------------------------------------- the run context
class Run:
    """One engine run: the timer, compile accounting, progress bar, interrupt policy, flags.

    >>> run = Run("demo", posterior=None, config=None)
    >>> with run.interruptible():
    ...     raise KeyboardInterrupt
    >>> run.interrupted
    True
    """

    def __init__(self, engine: str, posterior: Any, config: Any) -> None:
        self.engine = engine
        self.posterior = posterior
        self.config = config
        self.t_start = time.perf_counter()
        self.flags: list[str] = []
        self.interrupted = False
        self._tracked: list[tuple[Any, float]] = []
        #: bl.fit's log_likelihood option ("auto", True or False); see keep_loglikelihood
        self.log_likelihood = _OPTION.get()
        self._budget = loglikelihood_budget() if self.log_likelihood == "auto" else None
        self._keep: bool | None = None
        self._clock: _CompileClock | None = None  # started by the first track()
        self._held: list[int | None] = []  # per tracked Programs: compiled programs it held
        self._nonfinite_counts: dict[str, int] = {}  # what -> count (see nonfinite)
        self._nonfinite_found: tuple[str, bool] | None = None  # the site search, once per run

    # ---------------------------------------------------------------- accounting
    def track(self, programs: Any) -> Any:
        """Count the compile seconds ``programs.compile_s`` gains from now on; returns it.

        The first call also starts the run's compile clock: every JAX compilation in this
        thread from then on (eager operations, an engine's own jitted helpers, not only the
        tracked programs) counts in the Cost's ``compile_s`` (see :meth:`cost`). Whether
        ``programs`` already held compiled programs (it came from the cache, compiled by an
        earlier run) becomes the Cost's ``compile_cached``."""
        self._tracked.append((programs, float(programs.compile_s)))
        if not self._held:
            self._clock = _start_compile_clock()
        self._held.append(_num_compiled(programs))
        return programs

    @property
    def compile_s(self) -> float:
        """Seconds spent compiling, in this run, by the tracked programs."""
        return float(sum(p.compile_s - before for p, before in self._tracked))

    @property
    def wall_s(self) -> float:
        """Seconds since the run started."""
        return time.perf_counter() - self.t_start

    def flag(self, message: str | None) -> None:
        """Add a flag (a warning the user must see on the Fit); ``None`` adds nothing."""
        if message:
            self.flags.append(message)

    # ---------------------------------------------------------------- the log_likelihood group
    def keep_loglikelihood(self, num_draws: int, num_chains: int = 1, num_fits: int = 1) -> bool:
        """Whether this run computes and keeps the log_likelihood group of ``num_chains`` x
        ``num_draws`` draws (per Fit; ``num_fits`` Fits made together count together). Ask
        before computing it: where the answer is False, compute no log-likelihood at all.

        ``log_likelihood=True``: yes; ``False``: no; ``"auto"``: yes when the group(s) take at
        most :func:`loglikelihood_budget` bytes (draws x terms per draw x bytes per term),
        otherwise no, and the run gets a flag saying the size and how to get the group. The
        first answer is the run's: later calls return it."""
        if self._keep is None and self.log_likelihood != "auto":
            self._keep = bool(self.log_likelihood)
        if self._keep is None:
            terms, itemsize = pointwise_size(self.posterior)
            what = (f"{num_chains} chain(s) x {num_draws} draws x {terms} terms x {itemsize} "
                    "bytes" + (f" x {num_fits} fits" if num_fits > 1 else ""))
            self._decide(num_fits * num_chains * num_draws * terms * itemsize, what)
        return bool(self._keep)

    def _decide(self, nbytes: int, what: str) -> None:
        if self.log_likelihood != "auto":
            self._keep = bool(self.log_likelihood)
            return
        self._keep = nbytes <= self._budget
        if not self._keep:
            self.flag(f"{LEFT_OUT}: it would take {format_bytes(nbytes)} ({what}), more than the "
                      f"{format_bytes(self._budget)} budget ({BUDGET_ENV}); pass "
                      "log_likelihood=True to bl.fit to keep it, or add it later with "
                      "bl.pointwise_loglikelihood(fit, posterior)")

    def _kept_group(self, group: Mapping[str, np.ndarray] | None):
        """The log_likelihood group an engine gave, or None where the option leaves it out
        (decided here from the arrays if the engine did not ask keep_loglikelihood)."""
        if not group:
            return None
        if self._keep is None:
            arrays = [np.asarray(v) for v in group.values()]
            chains, draws = arrays[0].shape[:2]
            terms = sum(math.prod(a.shape[2:]) for a in arrays)
            self._decide(sum(a.nbytes for a in arrays),
                         f"{chains} chain(s) x {draws} draws x {terms} terms x "
                         f"{arrays[0].dtype.itemsize} bytes")
        return group if self._keep else None

    # ---------------------------------------------------------------- progress and interrupts
    def progress(self, **tqdm_kwargs: Any):
        """A progress bar from :func:`bayeslik.progress.bar` (``BAYESLIK_PROGRESS`` chooses its
        kind, or turns every bar off), disabled unless ``config.progress_bar`` (or ``disable=``
        says otherwise). It reads "(compiling)" until the engine's first ``update`` (give
        ``compiling=False`` where that first step compiles nothing); its rate and ETA count
        from there."""
        from bayeslik.progress import bar

        tqdm_kwargs.setdefault("disable", not getattr(self.config, "progress_bar", False))
        return bar(**tqdm_kwargs)

    @contextlib.contextmanager
    def interruptible(self, bar: Any = None):
        """Run a loop so that Ctrl-C (KeyboardInterrupt) ends it and the run goes on with what it
        has (``self.interrupted`` becomes True); the bar, if given, is closed either way.
        The engine decides what an interrupted run keeps: see :meth:`require`."""
        try:
            yield self
        except KeyboardInterrupt:
            self.interrupted = True
        finally:
            if bar is not None:
                try:
                    bar.close()
                except KeyboardInterrupt:  # a second Ctrl-C, or one landing in the bar's last write
                    self.interrupted = True

    def require(self, kept: bool, message: str) -> None:
        """After an interrupt: re-raise KeyboardInterrupt with ``message`` unless something
        usable was ``kept``; otherwise flag ``"interrupted: ..."`` is the engine's to add."""
        if not kept:
            raise KeyboardInterrupt(message)

    # ---------------------------------------------------------------- the Fit
    def cost(self, *, num_loglik_evals: int | None, num_grad_evals: int | None,
             extra: Mapping[str, Any] | None = None, share: int = 1) -> Cost:
        """The run's Cost now; ``share`` splits wall and compile time over a batch of fits.

        ``compile_s``: the tracked programs' compile seconds or, where XLA compiled anything
        in this thread since the first :meth:`track`, the time JAX spent compiling there
        (tracing, lowering, XLA; overlapping spans once), whichever is larger (the tracked
        programs may compile in other threads, e.g. the nested engine's pool). A run that
        compiled nothing has 0.0. ``compile_cached``: True where a tracked Programs held
        compiled programs when tracked (from the cache: this run did not pay for them), False
        where none did, None where the run tracked none."""
        wall = self.wall_s
        compile_s = self.compile_s
        clock = self._clock
        if clock is not None and clock.built:
            compile_s = min(max(compile_s, clock.seconds()), wall)
        held = [h for h in self._held if h is not None]
        return Cost(wall_s=wall / share, compile_s=compile_s / share,
                    num_loglik_evals=None if num_loglik_evals is None else int(num_loglik_evals),
                    num_grad_evals=None if num_grad_evals is None else int(num_grad_evals),
                    extra=dict(extra or {}),
                    compile_cached=any(h > 0 for h in held) if held else None)

    # ---------------------------------------------------------------- non-finite densities
    def nonfinite(self, count: int, total: int, *, what: str = "log-likelihood",
                  point: Any = None, where: str | None = None, scope: str = "") -> dict:
        """Record that ``count`` of the run's ``total`` evaluations of ``what`` ("log-likelihood",
        "log prior", "log density") were NaN or +inf, and flag the Fit when ``count`` > 0: the
        engine took them for zero density, so its answer is for the model truncated to where the
        density is finite. ``scope`` says which evaluations were checked where not all were
        (e.g. "at the initial live points"). Returns the entries to merge into ``Cost.extra``:
        ``num_nonfinite`` (all kinds, this run so far), ``num_nonfinite_<what>`` and
        ``num_<what>_checked`` (``what`` without spaces or dashes: ``num_nonfinite_loglikelihood``).

        The flag names the site where it can: ``where`` if the engine knows it, else
        :func:`bayeslik.posterior.nonfinite_sites` at ``point`` (an unconstrained point or a
        batch where the engine saw a non-finite value), else at 256 prior draws (a fixed key; for
        an improper prior, uniform points in ``[-2, 2]``); else the site is unknown. Where the only
        points found lie far out (a constrained site's unconstrained coordinate beyond 20: a
        scale that under- or overflowed, as early NUTS trajectories make; or a latent's prior
        term below -1e4 nats, see :func:`bayeslik.posterior.nonfinite_sites`) and the prior draws
        show none, the values are floating point giving up where the density is negligible, not
        the model: counted and described in ``Cost.extra["nonfinite_where"]``, not flagged.
        Every other count > 0 is flagged, ``nonfinite_where`` saying where. Only called after
        the run, from host numbers: no cost inside compiled loops.

        >>> run = Run("demo", posterior=None, config=None)
        >>> run.nonfinite(0, 100)
        {'num_nonfinite': 0, 'num_nonfinite_loglikelihood': 0, 'num_loglikelihood_checked': 100}
        >>> run.flags
        []
        """
        count, total = int(count), int(total)
        slug = what.replace(" ", "").replace("-", "").replace("_", "")
        self._nonfinite_counts[slug] = count
        out = {"num_nonfinite": int(sum(self._nonfinite_counts.values())),
               f"num_nonfinite_{slug}": count,
               f"num_{slug}_checked": total}
        if count > 0:
            far_out = False
            if where is None:
                where, far_out = self._nonfinite_where(point)
            out["nonfinite_where"] = where
            if far_out:
                return out
            self.flag(f"{count} of {total} {what} evaluations{' ' + scope if scope else ''} "
                      f"were NaN or +inf ({where}); the engine treated them as zero density, so "
                      "the result is for a model truncated to where the density is finite: "
                      "constrain the parameter (e.g. a positive prior for a scale) or fix the "
                      "density there")
        return out

    def _nonfinite_where(self, point: Any) -> tuple[str, bool]:
        """(which site made the non-finite values, in words; whether the only points found lie
        far out), found once per run."""
        if self._nonfinite_found is not None:
            return self._nonfinite_found
        from bayeslik.posterior import nonfinite_sites

        post, found, how = self.posterior, [], ""
        if post is not None and point is not None and np.size(point):
            found = nonfinite_sites(post, point)
        if post is not None and (not found or found[0].extreme):
            try:
                key = jax.random.key(0)
                if getattr(post, "has_proper_prior", False):
                    probe = post.__dict__.get("_nonfinite_probe")  # drawn once per Posterior
                    if probe is None:
                        probe = post.__dict__["_nonfinite_probe"] = np.asarray(
                            jax.jit(lambda k: post.sample_prior(k, 256))(key))
                    how = "of 256 prior draws"
                else:
                    probe = jax.random.uniform(key, (256, post.ndim), minval=-2.0, maxval=2.0)
                    how = "of 256 points uniform in [-2, 2] (unconstrained)"
                found = nonfinite_sites(post, probe) or found
            except Exception:  # a posterior kind without a prior to draw from: no probe
                how = ""
        far_out = bool(found) and found[0].extreme
        if found:
            text = "; ".join(s.describe() for s in found[:3])
            if far_out:
                text += (" (far out, where the prior has no mass and floating point under- or "
                         f"overflows; none {how} has a non-finite term)")
        else:
            text = ("which site made them is unknown" + (f": none {how} has a non-finite term"
                                                         if how else ""))
        self._nonfinite_found = (text, far_out)
        return text, far_out


def _attrs(run: Run, wall: float, attrs: Mapping[str, Any] | None) -> dict:
    return {"inference_library": "bayeslik", "engine": run.engine, "sampling_time": wall,
            **dict(attrs or {})}


def config_dict(config: Any) -> dict:
    """An engine config (a dataclass, a mapping or None) as a plain dict, as a Fit records it."""
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config or {})


def chains_fit(run: Run, values: Mapping[str, np.ndarray], *, posterior: Any = None,
               sample_stats: Mapping[str, np.ndarray] | None = None,
               log_likelihood: Mapping[str, np.ndarray] | None = None,
               num_loglik_evals: int | None = None, num_grad_evals: int | None = None,
               extra: Mapping[str, Any] | None = None, flags: Iterable[str] = (),
               attrs: Mapping[str, Any] | None = None, extra_groups: Mapping | None = None,
               share: int = 1, log_evidence: float | None = None,
               log_evidence_err: float | None = None) -> Fit:
    """The Fit of chains of draws: ``values`` {site: (chain, draw, ...)} of every site the
    program records, ``sample_stats`` and ``log_likelihood`` with the same leading axes (the
    latter left out where the run's log_likelihood option says so: see
    :meth:`Run.keep_loglikelihood`).

    The run's flags come first, then ``flags`` (per-fit ones), then the convergence flags of
    the latent sites (split R-hat, bulk and tail ESS; see :mod:`bayeslik.convergence`).
    ``share`` > 1 is one of a batch of fits made together (wall and compile time split).
    """
    posterior = run.posterior if posterior is None else posterior
    log_likelihood = run._kept_group(log_likelihood)
    wall = run.wall_s / share
    all_flags = list(run.flags) + list(flags)
    all_flags.extend(convergence_flags({k: v for k, v in values.items()
                                        if k in posterior.sites
                                        and posterior.sites[k].kind == "latent"}))
    idata = build_datatree(posterior, values, sample_stats=sample_stats,
                           log_likelihood=log_likelihood, extra_groups=extra_groups,
                           attrs=_attrs(run, wall, attrs))
    cost = run.cost(num_loglik_evals=num_loglik_evals, num_grad_evals=num_grad_evals,
                    extra=extra, share=share)
    return Fit(idata=idata, engine=run.engine, config=config_dict(run.config), seed=None,
               cost=cost, log_evidence=log_evidence, log_evidence_err=log_evidence_err,
               model=posterior.name, flags=tuple(all_flags))


def weighted_fit(run: Run, draws: Mapping[str, np.ndarray], *, group: str,
                 weighted: Mapping[str, np.ndarray], log_weight: np.ndarray,
                 log_evidence: float, log_evidence_err: float, point_dim: str = "point",
                 log_likelihood: Mapping[str, np.ndarray] | None = None,
                 sample_stats: Mapping[str, np.ndarray] | None = None,
                 group_attrs: Mapping[str, Any] | None = None,
                 num_loglik_evals: int | None = None, num_grad_evals: int | None = 0,
                 extra: Mapping[str, Any] | None = None,
                 more_groups: Mapping[str, Any] | None = None) -> Fit:
    """The Fit of weighted points: equal-weight ``draws`` {site: (chain, draw, ...)} in
    ``posterior``; the weighted points ``weighted`` {name: (run, point, ...)} with their
    ``log_weight`` (run, point) in the extra group ``group``, whose attributes get
    ``group_attrs`` and the evidence; the evidence also in the Fit and the root attributes.

    The weighted group's dimensions are ``("run", point_dim, ...)``, never ``chain`` / ``draw``:
    the points are not draws, and ArviZ must not summarise them as draws (see
    :func:`bayeslik.weights.weighted_summary`). The trailing axes of a site take its dimension
    names (plate names) and the coordinates of the ``posterior`` group or the Posterior's
    ``coords``; other variables' axes are named ``<name>_dim_<i>``.
    ``more_groups`` {name: xarray.Dataset} are added as they are (e.g. SMC's stage history).
    ``log_likelihood`` is left out where the run's option says so (:meth:`Run.keep_loglikelihood`).
    """
    import xarray as xr

    posterior = run.posterior
    log_likelihood = run._kept_group(log_likelihood)
    wall = run.wall_s
    evidence = {"log_evidence": log_evidence, "log_evidence_err": log_evidence_err}
    idata = build_datatree(posterior, draws, sample_stats=sample_stats,
                           log_likelihood=log_likelihood, attrs=_attrs(run, wall, evidence))
    idata[group] = xr.DataTree(_weighted_dataset(
        posterior, {**weighted, "log_weight": log_weight}, point_dim,
        {**evidence, **dict(group_attrs or {})}))
    for name, ds in (more_groups or {}).items():
        idata[name] = xr.DataTree(ds)
    cost = run.cost(num_loglik_evals=num_loglik_evals, num_grad_evals=num_grad_evals, extra=extra)
    return Fit(idata=idata, engine=run.engine, config=config_dict(run.config), seed=None,
               cost=cost, log_evidence=log_evidence, log_evidence_err=log_evidence_err,
               model=posterior.name, flags=tuple(run.flags))


def _weighted_dataset(posterior: Any, values: Mapping[str, np.ndarray], point_dim: str,
                      attrs: Mapping[str, Any]):
    """The weighted points {name: (run, point, ...)} as an xarray.Dataset with dims
    ``("run", point_dim, *site dims)``, labelled as :func:`bayeslik.fit.site_dataset` labels
    the other groups, without the ``sample_dims`` attribute (ArviZ would take them for
    draws)."""
    ds = site_dataset(posterior, values, ["run", point_dim],
                      attrs={"weighted_dims": ["run", point_dim], **attrs})
    ds.attrs.pop("sample_dims", None)
    return ds


# ---------------------------------------------------------------------------- the group, later
class _LaterPrograms(Programs):
    """``pointwise``: the pointwise log-likelihood of constrained draws {latent site: (n, ...)}
    (each mapped back to its unconstrained point, then evaluated)."""

    def __init__(self, posterior: Any) -> None:
        super().__init__()

        def pointwise(values, data):
            fn = posterior.at(data).pointwise_loglikelihood
            return jax.lax.map(lambda v: fn(posterior.unconstrain(v)), values, batch_size=256)

        self._fns = {"pointwise": jax.jit(pointwise)}


# keyed by the Posterior object: unconstrain traces the program with its own bound arguments
_LATER = ProgramCache(8)


def matching_draws(fit: Fit, posterior: Any, refuse) -> tuple[Any, int, int]:
    """(the Fit's posterior group as a Dataset, chains, draws) after checking that the Fit was
    made from ``posterior``: its latent sites and their shapes, the observed data's shapes;
    ``refuse(why)`` makes the error raised otherwise (e.g. an OptionError naming the caller)."""
    if "posterior" not in fit.idata.children:
        raise refuse("the Fit has no posterior group to draw from.")
    draws = fit.idata["posterior"].to_dataset()
    sites = posterior.sites
    missing = [n for n in posterior.latent_names if n not in draws.data_vars]
    if missing:
        raise refuse(f"the Fit's posterior group lacks the latent site(s) {missing} of "
                     f"{posterior.name!r}; pass the Posterior the Fit was made from.")
    C, S = int(draws.sizes["chain"]), int(draws.sizes["draw"])
    for n in posterior.latent_names:
        if draws[n].shape != (C, S) + tuple(sites[n].shape):
            raise refuse(f"site {n!r} has shape {draws[n].shape[2:]} in the Fit and "
                         f"{tuple(sites[n].shape)} in {posterior.name!r}; pass the Posterior "
                         "the Fit was made from.")
    if "observed_data" in fit.idata.children:
        given = fit.idata["observed_data"].to_dataset()
        for n, v in posterior.observed_data.items():
            if n in given.data_vars and given[n].shape != np.shape(v):
                raise refuse(f"observed site {n!r} has shape {given[n].shape} in the Fit and "
                             f"{np.shape(v)} in the Posterior; pass the Posterior the Fit was "
                             "made from.")
    return draws, C, S


def pointwise_loglikelihood(fit: Fit, posterior: Any, *, chunk_bytes: int | None = None) -> Fit:
    """``fit`` with its ``log_likelihood`` group (pointwise log-likelihood of every draw in its
    ``posterior`` group: for weighted engines, the equal-weight draws), computed from
    ``posterior`` (the Posterior it was fitted to) in chunks written into arrays allocated
    once, so a Fit made with ``log_likelihood=False`` (or left without it by "auto") can get it
    for LOO later. A group already there is computed again; the flag saying it was left out is
    dropped. A Posterior that does not fit the Fit (other latent sites or shapes, other data
    shapes) or has no pointwise log-likelihood raises OptionError. ``chunk_bytes``: the most
    bytes of results one chunk makes (default 64 MiB; the peak is about the group plus that).

    >>> fit = bl.fit(post, "nuts", log_likelihood=False)      # doctest: +SKIP
    >>> fit = bl.pointwise_loglikelihood(fit, post)           # doctest: +SKIP
    >>> "log_likelihood" in fit.idata.children                # doctest: +SKIP
    True
    """
    import xarray as xr

    def refuse(why: str) -> OptionError:
        return OptionError(f"pointwise_loglikelihood: {why}")

    if not isinstance(fit, Fit):
        raise refuse(f"needs a bayeslik Fit, got {type(fit).__name__}.")
    if not hasattr(posterior, "pointwise_loglikelihood"):
        raise refuse(f"a {type(posterior).__name__} has no pointwise log-likelihood.")
    draws, C, S = matching_draws(fit, posterior, refuse)
    sites = posterior.sites
    rows = {n: np.asarray(draws[n].values).reshape((C * S,) + tuple(sites[n].shape))
            for n in posterior.latent_names}
    progs = _LATER.get(posterior, lambda: _LaterPrograms(posterior))
    pointwise = progs.map_into("pointwise", rows, posterior.data_arrays, chunk_bytes=chunk_bytes)
    pointwise = {k: v.reshape((C, S) + v.shape[1:]) for k, v in pointwise.items()}
    group = build_datatree(posterior, {}, log_likelihood=pointwise)["log_likelihood"].to_dataset()
    group = group.assign_coords(chain=draws["chain"].values, draw=draws["draw"].values)
    tree = fit.idata.copy()
    tree["log_likelihood"] = xr.DataTree(group)
    return dataclasses.replace(fit, idata=tree,
                               flags=tuple(f for f in fit.flags if not f.startswith(LEFT_OUT)))


# ---------------------------------------------------------------------------- config checks
def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _finite(v: Any) -> bool:
    """A number that is finite as a float (an int too large for a float is not)."""
    try:
        return bool(np.isfinite(float(v)))
    except OverflowError:
        return False


def _not(v: Any, number: bool) -> str:
    """", not a <type>" for a value of the wrong type (", not nan" for a non-finite number)."""
    if number and _is_number(v):
        return "" if _finite(v) else f", not {v!r}"
    return f", not a {type(v).__name__}"


class Check:
    """Checks of one engine config, each raising ``EngineError("<label> option <name>=<value>:
    <why>")`` on failure. Call from the config's ``__post_init__``:

    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class DemoConfig:
    ...     num_steps: int = 10
    ...     def __post_init__(self):
    ...         Check("Demo", self).integer("num_steps", minimum=1)
    >>> DemoConfig(num_steps=0)
    Traceback (most recent call last):
    ...
    bayeslik.errors.EngineError: Demo option num_steps=0: must be a positive integer.
    """

    def __init__(self, label: str, config: Any) -> None:
        self.label = label
        self.config = config

    def error(self, name: str, why: str) -> EngineError:
        """The error for option ``name`` with the reason ``why`` (a sentence)."""
        return EngineError(f"{self.label} option {name}={getattr(self.config, name)!r}: {why}")

    def fail(self, name: str, why: str) -> None:
        raise self.error(name, why)

    def require(self, ok: bool, name: str, why: str) -> "Check":
        """Raise the error for ``name`` with ``why`` unless ``ok``."""
        if not ok:
            raise self.error(name, why)
        return self

    def integer(self, *names: str, minimum: int = 1, optional: bool = False,
                hint: str = "") -> "Check":
        """Each option is an integer >= ``minimum`` (or None where ``optional``)."""
        for name in names:
            v = getattr(self.config, name)
            if optional and v is None:
                continue
            if not _is_int(v) or v < minimum:
                what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
                raise self.error(name, f"must be {what}{' or None' if optional else ''}"
                                 f"{' (' + hint + ')' if hint else ''}"
                                 f"{'' if _is_int(v) else _not(v, number=False)}.")
        return self

    def number(self, name: str, *, low: float | None = None, high: float | None = None,
               low_open: bool = True, high_open: bool = True, optional: bool = False,
               hint: str = "") -> "Check":
        """The option is a number in the interval (open or closed at each end)."""
        v = getattr(self.config, name)
        if optional and v is None:
            return self
        ok = _is_number(v) and _finite(v)
        if ok and low is not None:
            ok = float(v) > low if low_open else float(v) >= low
        if ok and high is not None:
            ok = float(v) < high if high_open else float(v) <= high
        if not ok:
            if low is not None and high is not None:
                if low_open and high_open:
                    where = f"lie strictly between {low:g} and {high:g}"
                else:
                    where = (f"lie in {'(' if low_open else '['}{low:g}, {high:g}"
                             f"{')' if high_open else ']'}")
            elif low is not None:
                where = ("be positive" if low == 0 and low_open else
                         f"be {'>' if low_open else '>='} {low:g}")
            else:
                where = "be a number"
            raise self.error(name, f"must {where}{' or None' if optional else ''}"
                             f"{' (' + hint + ')' if hint else ''}{_not(v, number=True)}.")
        return self

    def choice(self, name: str, options: Iterable[Any]) -> "Check":
        """The option is one of ``options``."""
        options = list(options)
        value = getattr(self.config, name)
        try:
            ok = value in options
        except Exception:  # an array or another value that does not compare to a bool
            ok = False
        if ok and isinstance(value, bool):  # True == 1: a bool is a choice only if listed
            ok = any(o is value for o in options)
        if not ok:
            raise self.error(name, f"must be one of {options}.")
        return self

    def boolean(self, *names: str) -> "Check":
        """Each option is True or False."""
        for name in names:
            if not isinstance(getattr(self.config, name), bool):
                raise self.error(name, "must be True or False.")
        return self
