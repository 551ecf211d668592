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
  constrained values and pointwise log-likelihood of a batch of draws;
* :class:`Check` -- the validation of an engine's config, one message style for all:
  ``"<Engine> option <name>=<value>: <why>"``, raised as :class:`~bayeslik.errors.EngineError`.

See ``docs/engines/writing.md`` for an engine written on the kit from scratch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Iterable, Mapping

import numpy as np

from bayeslik.convergence import convergence_flags
from bayeslik.engines._programs import ProgramCache, Programs, draws_fn
from bayeslik.errors import EngineError
from bayeslik.fit import Cost, Fit, build_datatree

__all__ = ["Run", "Check", "chains_fit", "weighted_fit", "Programs", "ProgramCache", "draws_fn"]


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

    # ---------------------------------------------------------------- accounting
    def track(self, programs: Any) -> Any:
        """Count the compile seconds ``programs.compile_s`` gains from now on; returns it."""
        self._tracked.append((programs, float(programs.compile_s)))
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

    # ---------------------------------------------------------------- progress and interrupts
    def progress(self, **tqdm_kwargs: Any):
        """A tqdm bar, disabled unless ``config.progress_bar`` (or ``disable=`` says otherwise)."""
        from tqdm.auto import tqdm

        tqdm_kwargs.setdefault("disable", not getattr(self.config, "progress_bar", False))
        return tqdm(**tqdm_kwargs)

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
        """The run's Cost now; ``share`` splits wall and compile time over a batch of fits."""
        return Cost(wall_s=self.wall_s / share, compile_s=self.compile_s / share,
                    num_loglik_evals=None if num_loglik_evals is None else int(num_loglik_evals),
                    num_grad_evals=None if num_grad_evals is None else int(num_grad_evals),
                    extra=dict(extra or {}))


def _attrs(run: Run, wall: float, attrs: Mapping[str, Any] | None) -> dict:
    return {"inference_library": "bayeslik", "engine": run.engine, "sampling_time": wall,
            **dict(attrs or {})}


def _config_dict(config: Any) -> dict:
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
    program records, ``sample_stats`` and ``log_likelihood`` with the same leading axes.

    The run's flags come first, then ``flags`` (per-fit ones), then the convergence flags of
    the latent sites (split R-hat, bulk and tail ESS; see :mod:`bayeslik.convergence`).
    ``share`` > 1 is one of a batch of fits made together (wall and compile time split).
    """
    posterior = run.posterior if posterior is None else posterior
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
    return Fit(idata=idata, engine=run.engine, config=_config_dict(run.config), seed=None,
               cost=cost, log_evidence=log_evidence, log_evidence_err=log_evidence_err,
               model=posterior.name, flags=tuple(all_flags))


def weighted_fit(run: Run, draws: Mapping[str, np.ndarray], *, group: str,
                 weighted: Mapping[str, np.ndarray], log_weight: np.ndarray,
                 log_evidence: float, log_evidence_err: float,
                 log_likelihood: Mapping[str, np.ndarray] | None = None,
                 sample_stats: Mapping[str, np.ndarray] | None = None,
                 group_attrs: Mapping[str, Any] | None = None,
                 num_loglik_evals: int | None = None, num_grad_evals: int | None = 0,
                 extra: Mapping[str, Any] | None = None,
                 more_groups: Mapping[str, Any] | None = None) -> Fit:
    """The Fit of weighted points: equal-weight ``draws`` {site: (chain, draw, ...)} in
    ``posterior``; the weighted points ``weighted`` {name: (chain, point, ...)} with their
    ``log_weight`` (chain, point) in the extra group ``group``, whose attributes get
    ``group_attrs`` and the evidence; the evidence also in the Fit and the root attributes.
    ``more_groups`` {name: xarray.Dataset} are added as they are (e.g. SMC's stage history).
    """
    import xarray as xr

    posterior = run.posterior
    wall = run.wall_s
    evidence = {"log_evidence": log_evidence, "log_evidence_err": log_evidence_err}
    idata = build_datatree(posterior, draws, sample_stats=sample_stats,
                           log_likelihood=log_likelihood,
                           extra_groups={group: {**weighted, "log_weight": log_weight}},
                           attrs=_attrs(run, wall, evidence))
    idata[group].attrs.update({**evidence, **dict(group_attrs or {})})
    for name, ds in (more_groups or {}).items():
        idata[name] = xr.DataTree(ds)
    cost = run.cost(num_loglik_evals=num_loglik_evals, num_grad_evals=num_grad_evals, extra=extra)
    return Fit(idata=idata, engine=run.engine, config=_config_dict(run.config), seed=None,
               cost=cost, log_evidence=log_evidence, log_evidence_err=log_evidence_err,
               model=posterior.name, flags=tuple(run.flags))


# ---------------------------------------------------------------------------- config checks
def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


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
                                 f"{' (' + hint + ')' if hint else ''}.")
        return self

    def number(self, name: str, *, low: float | None = None, high: float | None = None,
               low_open: bool = True, high_open: bool = True, optional: bool = False,
               hint: str = "") -> "Check":
        """The option is a number in the interval (open or closed at each end)."""
        v = getattr(self.config, name)
        if optional and v is None:
            return self
        ok = _is_number(v) and np.isfinite(float(v))
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
                             f"{' (' + hint + ')' if hint else ''}.")
        return self

    def choice(self, name: str, options: Iterable[Any]) -> "Check":
        """The option is one of ``options``."""
        options = list(options)
        if getattr(self.config, name) not in options:
            raise self.error(name, f"must be one of {options}.")
        return self

    def boolean(self, *names: str) -> "Check":
        """Each option is True or False."""
        for name in names:
            if not isinstance(getattr(self.config, name), bool):
                raise self.error(name, "must be True or False.")
        return self
