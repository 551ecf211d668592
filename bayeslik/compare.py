"""Run several engines on one Posterior and compare them: cost, sampling quality, accuracy.

``bl.compare(post, ["nuts", "smc", "nested"], reference=...)`` fits the posterior with every
engine (and every seed), then tabulates per run:

* cost: ``wall_s`` (the whole run), ``compile_s`` (the part spent compiling), ``sampling_s``
  (the rest), ``compile_cached`` (True where the run reused programs an earlier run compiled:
  its ``compile_s`` is then near zero, not a cold start's), true likelihood evaluations,
  gradient evaluations;
* sampling quality: the smallest bulk and tail ESS over all parameters, the smallest bulk ESS
  per second of sampling (``sampling_s``: compilation left out, so a run whose programs were
  cached and one that compiled them compare fairly), the largest R-hat (NaN with one chain),
  divergences, the number of flags the engine raised (``flags`` holds their text);
* evidence: ``log_evidence`` and its error where the engine estimates them, and the error
  against the reference's exact log evidence where known;
* accuracy against a reference posterior (where one is given): over all scalar parameters, the
  largest standardised mean error ``|mean - mean_ref| / sd_ref``, the standard-deviation ratios
  ``sd / sd_ref`` furthest below and above one, and the largest 1-Wasserstein distance between a
  marginal and the reference's, in units of the reference sd (reference draws needed).

The reference is exact moments (a :class:`bayeslik.models.reference.Problem`), reference draws
(a mapping ``{site: (chain, draw, ...)}``, e.g. posteriordb's), another Fit, or ``"nuts"``: a
long NUTS run made here (4 chains x 5000 draws). Runs that fail are rows with their error, not
an exception; an interrupted comparison keeps the finished runs.

>>> import bayeslik as bl
>>> from bayeslik.models import reference
>>> prob = reference.get("normal_mean")
>>> cmp = bl.compare(prob.posterior(), ["nuts"], reference=prob,
...                  engine_options={"nuts": {"num_samples": 500}})   # doctest: +SKIP
>>> cmp.table[["engine", "ess_bulk_min", "mean_err_max"]]            # doctest: +SKIP
"""

from __future__ import annotations

import os
import traceback
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from bayeslik.errors import BayeslikError, EngineError, OptionError
from bayeslik.fit import Fit
from bayeslik.posterior import Posterior

__all__ = ["compare", "Comparison", "Reference", "model_choice_table"]

#: Columns of :attr:`Comparison.table`, in order.
COLUMNS = [
    "engine", "seed", "status", "wall_s", "compile_s", "sampling_s", "compile_cached",
    "num_loglik_evals", "num_grad_evals", "ess_bulk_min", "ess_tail_min", "ess_bulk_per_s",
    "rhat_max", "divergences", "num_flags", "log_evidence", "log_evidence_err",
    "log_evidence_error", "mean_err_max", "sd_ratio_min", "sd_ratio_max", "w1_max", "num_draws",
    "flags",
]

#: The columns ``repr(cmp)`` and the notebook view show (those with a value), in order; the
#: table has them all.
SHOWN = [
    "engine", "seed", "status", "wall_s", "compile_s", "compile_cached", "ess_bulk_min",
    "ess_bulk_per_s", "rhat_max", "divergences", "num_flags", "log_evidence",
    "log_evidence_error", "mean_err_max", "sd_ratio_min", "sd_ratio_max", "w1_max",
]


@dataclass(frozen=True)
class Reference:
    """What is known about the posterior: exact moments and/or draws, and the log evidence.

    ``mean``/``sd``: ``{site: array}`` exact marginal means and standard deviations; ``draws``:
    ``{site: (chain, draw, ...)}``; ``log_evidence``: exact log Z or None; ``name`` says where it
    came from. ``density``: exact marginal densities, ``{parameter: pdf}`` with ``pdf(x)`` the
    marginal posterior density at the points ``x`` (an array); a parameter is a scalar site's
    name or ``"site[j]"``, the j-th entry of a flattened vector site (as the figures name them).
    :func:`~bayeslik.plots.plot_marginals` draws these curves as "exact"; without one it draws
    the reference draws' density ("reference draws"), else a normal with the exact mean and sd
    ("normal approx.").
    """

    name: str
    mean: Mapping[str, np.ndarray] | None = None
    sd: Mapping[str, np.ndarray] | None = None
    draws: Mapping[str, np.ndarray] | None = None
    log_evidence: float | None = None
    density: Mapping[str, Callable[[np.ndarray], np.ndarray]] | None = None

    @property
    def variables(self) -> list[str]:
        return sorted((self.mean or self.draws or {}).keys())

    def moments(self, var: str) -> tuple[np.ndarray, np.ndarray | None]:
        """(mean, sd) of a variable, exact where known, else from the draws."""
        if self.mean is not None and var in self.mean:
            sd = None if self.sd is None or var not in self.sd else np.asarray(self.sd[var], float)
            if sd is None and self.draws is not None and var in self.draws:
                sd = _flat(self.draws[var]).std(0)
            return np.asarray(self.mean[var], float), sd
        flat = _flat(self.draws[var])
        return flat.mean(0), flat.std(0)

    @classmethod
    def make(cls, obj: Any, posterior: Posterior, *, seed: int = 0,
             progress_bar: bool = False) -> "Reference | None":
        """A Reference from what :func:`compare` accepts (None, Problem, Fit, draws, "nuts")."""
        if obj is None or isinstance(obj, Reference):
            return obj
        if isinstance(obj, str):
            if obj != "nuts":
                raise EngineError(f"reference={obj!r}: a string reference must be 'nuts' (a long "
                                  "NUTS run); or pass a Problem, a Fit or a dict of draws.")
            from bayeslik.api import fit as run_fit

            ref = run_fit(posterior, "nuts", seed=seed + 10_007, num_chains=4, num_warmup=1000,
                          num_samples=5000, progress_bar=progress_bar)
            return cls.make(ref, posterior)
        if isinstance(obj, Fit):
            names = [v for v in obj.idata["posterior"].data_vars if v in posterior.sites]
            return cls(name=f"{obj.engine} fit ({obj.num_chains} x {obj.num_draws} draws)",
                       draws={v: obj.draws(v) for v in names}, log_evidence=obj.log_evidence)
        if hasattr(obj, "posterior_mean") and hasattr(obj, "reference_draws"):  # a Problem
            return cls(name=f"reference problem {obj.name}", mean=obj.posterior_mean,
                       sd=obj.posterior_sd, draws=obj.reference_draws,
                       log_evidence=obj.log_evidence,
                       density=getattr(obj, "marginal_pdf", None) or None)
        if isinstance(obj, Mapping):
            bad = [k for k, v in obj.items() if np.ndim(v) < 2]
            if bad:
                raise EngineError(f"reference draws {bad} need leading (chain, draw) axes; give "
                                  "arrays shaped (chain, draw, *site_shape).")
            return cls(name="reference draws", draws={k: np.asarray(v) for k, v in obj.items()})
        raise EngineError(f"reference of type {type(obj).__name__} is not understood; give a "
                          "bayeslik.models.reference.Problem, a Fit, {site: draws} or 'nuts'.")


def _flat(a) -> np.ndarray:
    a = np.asarray(a, float)
    return a.reshape((-1,) + a.shape[2:])


@dataclass(frozen=True)
class _Run:
    label: str
    engine: Any
    seed: int
    options: Mapping[str, Any]


def _one(posterior: Posterior, run: _Run) -> tuple[Fit | None, str | None]:
    from bayeslik.api import fit_quietly  # compare warns once per flagged run, from its caller

    try:
        return fit_quietly(posterior, run.engine, seed=run.seed, **dict(run.options)), None
    except BayeslikError as e:
        return None, f"{type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 - a comparison reports a crashed engine and goes on
        tb = traceback.format_exception_only(type(e), e)[-1].strip()
        return None, f"crashed: {tb}"


def _warn_flags(posterior: Posterior, runs: list, results: dict) -> None:
    """One FitWarning per flag of each run, attributed to the caller of ``bl.compare`` (the
    engines' own warnings would point into this module) and naming the run's label and seed."""
    import warnings

    from bayeslik.convergence import FitWarning

    for r in runs:
        fit = results.get((r.label, r.seed), (None, None))[0]
        for flag in fit.flags if fit is not None else ():
            warnings.warn(f"{r.label} (seed {r.seed}) on '{posterior.name}': {flag}", FitWarning,
                          stacklevel=3)


def _quality(fit: Fit) -> dict[str, float]:
    """Smallest bulk / tail ESS and largest R-hat over the posterior's scalar elements that vary
    (a constant element, e.g. a fixed entry of a left-to-right transition row, has no ESS or
    R-hat: ArviZ would divide 0 by 0 there, and its NaN would say nothing)."""
    from bayeslik.convergence import element_diagnostics

    out = {"ess_bulk_min": np.nan, "ess_tail_min": np.nan, "rhat_max": np.nan}
    post = fit.idata["posterior"]
    diag = element_diagnostics({v: np.asarray(post[v]) for v in post.data_vars})
    if diag is None:
        return out

    def extreme(v, pick) -> float:
        return float(pick(v)) if v is not None and np.isfinite(v).any() else np.nan

    out["ess_bulk_min"] = extreme(diag["ess_bulk"], np.nanmin)
    out["ess_tail_min"] = extreme(diag["ess_tail"], np.nanmin)
    out["rhat_max"] = extreme(diag["rhat"], np.nanmax)
    return out


def _accuracy(fit: Fit, ref: Reference) -> dict[str, float]:
    from scipy.stats import wasserstein_distance

    errs, ratios, w1s = [], [], []
    for var in ref.variables:
        if var not in fit.idata["posterior"]:
            continue
        ours = _flat(fit.draws(var))
        m_ref, s_ref = ref.moments(var)
        if s_ref is None:
            continue
        s_ref = np.broadcast_to(s_ref, ours.shape[1:])
        errs.append((np.abs(ours.mean(0) - m_ref) / s_ref).ravel())
        ratios.append((ours.std(0) / s_ref).ravel())
        if ref.draws is not None and var in ref.draws:
            r = _flat(ref.draws[var]).reshape(len(_flat(ref.draws[var])), -1)
            o = ours.reshape(len(ours), -1)
            w1s.append([wasserstein_distance(o[:, j], r[:, j]) / s for j, s in
                        enumerate(s_ref.ravel())])
    cat = lambda xs: np.concatenate([np.ravel(x) for x in xs]) if xs else np.array([np.nan])  # noqa: E731
    e, r, w = cat(errs), cat(ratios), cat(w1s)
    return {"mean_err_max": float(np.nanmax(e)) if np.isfinite(e).any() else np.nan,
            "sd_ratio_min": float(np.nanmin(r)) if np.isfinite(r).any() else np.nan,
            "sd_ratio_max": float(np.nanmax(r)) if np.isfinite(r).any() else np.nan,
            "w1_max": float(np.nanmax(w)) if np.isfinite(w).any() else np.nan}


def _row(run: _Run, fit: Fit | None, error: str | None, ref: Reference | None) -> dict:
    row = {c: np.nan for c in COLUMNS}
    row.update(engine=run.label, seed=run.seed, flags="", num_flags=0, compile_cached=None)
    if fit is None:
        row.update(status=error or "failed")
        return row
    c = fit.cost
    sampling_s = max(c.wall_s - c.compile_s, 0.0)
    row.update(status="ok", wall_s=c.wall_s, compile_s=c.compile_s, sampling_s=sampling_s,
               compile_cached=getattr(c, "compile_cached", None),
               num_loglik_evals=c.num_loglik_evals if c.num_loglik_evals is not None else np.nan,
               num_grad_evals=c.num_grad_evals if c.num_grad_evals is not None else np.nan,
               num_flags=len(fit.flags), flags=" | ".join(fit.flags),
               num_draws=fit.num_chains * fit.num_draws)
    row.update(_quality(fit))
    if np.isfinite(row["ess_bulk_min"]) and sampling_s > 0:
        # per second of sampling: compilation (paid once per process, or not at all when an
        # earlier run's programs are reused) would make the same run look 100x slower or faster
        row["ess_bulk_per_s"] = row["ess_bulk_min"] / sampling_s
    if "sample_stats" in fit.idata.children and "diverging" in fit.idata["sample_stats"]:
        row["divergences"] = int(np.asarray(fit.idata["sample_stats"]["diverging"]).sum())
    if fit.log_evidence is not None:
        row["log_evidence"] = fit.log_evidence
        row["log_evidence_err"] = fit.log_evidence_err if fit.log_evidence_err is not None else np.nan
        if ref is not None and ref.log_evidence is not None:
            row["log_evidence_error"] = fit.log_evidence - ref.log_evidence
    if ref is not None:
        row.update(_accuracy(fit, ref))
    return row


@dataclass(frozen=True, eq=False)
class Comparison:
    """The result of :func:`compare`.

    ``table``: one row per (engine, seed) with the columns of :data:`COLUMNS` (a pandas
    DataFrame); ``fits``: ``{label: [Fit or None per seed]}``; ``reference``: the
    :class:`Reference` used (or None); ``posterior``: the Posterior compared on.
    ``cmp["nuts"]`` is the first seed's Fit of that engine, ready for ArviZ plots
    (``arviz_plots.plot_trace(cmp["nuts"].idata)``).
    """

    table: Any
    fits: Mapping[str, list]
    reference: Reference | None
    posterior: Posterior
    seeds: tuple[int, ...] = field(default=())

    def __getitem__(self, label: str) -> Fit:
        fits = [f for f in self.fits[label] if f is not None]
        if not fits:
            raise KeyError(f"engine {label!r} has no successful fit: {self.table.set_index('engine').loc[label, 'status']}")
        return fits[0]

    def summary(self):
        """Per engine, the mean over seeds of the numeric columns (and the seed count)."""
        t = self.table[self.table["status"] == "ok"]
        num = t.select_dtypes("number").drop(columns=["seed"], errors="ignore")
        out = num.groupby(t["engine"], sort=False).mean()
        out.insert(0, "num_seeds", t.groupby("engine", sort=False).size())
        return out

    def _shown(self) -> tuple[Any, str]:
        """(the :data:`SHOWN` columns that have a value, ``compile_cached`` written "yes*" /
        "no"; the footnote on cached runs, or "")."""
        t = self.table
        view = t[[c for c in SHOWN if t[c].notna().any()]].copy()
        known = t["compile_cached"].map(_known_bool)
        cached = known.map(lambda v: v is True)
        if "compile_cached" in view:
            view["compile_cached"] = known.map(
                lambda v: "yes*" if v is True else "no" if v is False else "")
        note = ("* compile_cached: compiled programs reused from an earlier run, so compile_s is "
                "not a cold start's; ess_bulk_per_s is per second of sampling (wall_s - "
                "compile_s) for every run") if cached.any() else ""
        return view, note

    def _repr_html_(self) -> str:
        import html

        ref = f"reference: {self.reference.name}" if self.reference else "no reference"
        view, note = self._shown()
        return (f"<div><b>bayeslik comparison</b> of {html.escape(self.posterior.name)} "
                f"({html.escape(ref)})"
                + view.to_html(index=False, float_format=lambda x: f"{x:.4g}", na_rep="")
                + (f"<p><small>{html.escape(note)}</small></p>" if note else "")
                + "<p><small>cmp.table has every column</small></p></div>")

    def __repr__(self) -> str:
        view, note = self._shown()
        return (f"Comparison of {self.posterior.name}\n" + view.to_string(index=False)
                + (f"\n{note}" if note else ""))

    # ------------------------------------------------------------------ figures
    def plot(self, kind: str = "all", var_names: Sequence[str] | None = None):
        """Figures: ``"marginals"`` (every engine's marginal densities overlaid, with the
        reference: exact where known), ``"cost"`` (wall time split into compile and sampling,
        and bulk ESS per second of sampling; cached runs marked), ``"evidence"`` (log Z with error
        bars, the exact value as a line); ``"all"`` returns a dict of the three."""
        from bayeslik import plots

        kinds = {"marginals": plots.plot_marginals, "cost": plots.plot_cost,
                 "evidence": plots.plot_evidence}
        if kind == "all":
            return {k: (f(self, var_names=var_names) if k == "marginals" else f(self))
                    for k, f in kinds.items()}
        if kind not in kinds:
            raise OptionError(f"kind must be one of {sorted(kinds) + ['all']}, got {kind!r}")
        return kinds[kind](self, var_names=var_names) if kind == "marginals" else kinds[kind](self)

    def save(self, folder: str) -> list[str]:
        """Write ``table.csv``, one PNG per figure and one netCDF per fit into ``folder``;
        returns the paths written."""
        import matplotlib.pyplot as plt

        os.makedirs(folder, exist_ok=True)
        paths = [os.path.join(folder, "table.csv")]
        self.table.to_csv(paths[0], index=False)
        for name, fig in self.plot("all").items():
            p = os.path.join(folder, f"{name}.png")
            fig.savefig(p, dpi=110, bbox_inches="tight")
            plt.close(fig)
            paths.append(p)
        for label, fits in self.fits.items():
            for seed, f in zip(self.seeds, fits):
                if f is not None:
                    p = os.path.join(folder, f"{_safe(label)}_seed{seed}.nc")
                    f.save(p)
                    paths.append(p)
        return paths


def _known_bool(v: Any) -> bool | None:
    """True or False for a bool (NumPy's too), None for anything else (NaN, None)."""
    return bool(v) if isinstance(v, (bool, np.bool_)) else None


def _safe(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)


def _label(engine: Any) -> str:
    if isinstance(engine, str):
        return engine
    from bayeslik.api import resolve_engine

    return resolve_engine(engine, {})[0].name


def compare(posterior: Posterior, engines: Sequence[Any] | Mapping[str, Any] = ("nuts",), *,
            reference: Any = None, seeds: Sequence[int] | int = (0,),
            engine_options: Mapping[str, Mapping[str, Any]] | None = None,
            executor: Executor | None = None, progress_bar: bool = True) -> Comparison:
    """Fit ``posterior`` with every engine and seed and tabulate cost, quality and accuracy.

    Args:
        posterior: the :class:`~bayeslik.Posterior` to fit.
        engines: engine names or config objects, or ``{label: engine}`` to name them (e.g. two
            NUTS settings).
        reference: None, a :class:`~bayeslik.models.reference.Problem` (exact moments, evidence,
            draws), a Fit, ``{site: (chain, draw, ...)}`` draws, or ``"nuts"`` (a long NUTS run).
        seeds: the seeds of every engine's runs (an int ``n`` means ``range(n)``).
        engine_options: ``{label: {option: value}}`` passed to that engine.
        executor: a :class:`concurrent.futures.Executor` to run the fits on (e.g. a
            ``ThreadPoolExecutor`` or :class:`bayeslik.executors.RayExecutor`); default: one after
            another in this process.
        progress_bar: show a bar over the runs (the engines' own bars are off unless
            ``engine_options`` turns them on).

    Returns:
        a :class:`Comparison`.

    Bad arguments (unknown engines or options) are rejected before anything runs.
    """
    import pandas as pd

    # what every Fit is built and judged with, imported before the first run starts its clock
    # (so the first run does not pay seconds of imports the others do not)
    import arviz_base  # noqa: F401
    import arviz_stats  # noqa: F401
    import xarray  # noqa: F401

    from bayeslik import progress
    from bayeslik.api import posterior_kinds, resolve_engine

    kinds = posterior_kinds()
    if not isinstance(posterior, kinds):
        raise EngineError(f"compare() needs a posterior of a kind some engine runs on "
                          f"({' or '.join(k.__name__ for k in kinds)}), got "
                          f"{type(posterior).__name__}.")
    if isinstance(seeds, int):
        seeds = tuple(range(seeds))
    seeds = tuple(int(s) for s in seeds)
    if not seeds:
        raise EngineError("seeds is empty: give at least one seed.")
    named = dict(engines) if isinstance(engines, Mapping) else {_label(e): e for e in engines}
    if not named:
        raise EngineError("engines is empty: give at least one engine name or config.")
    if isinstance(engines, Sequence) and not isinstance(engines, str) and len(named) < len(engines):
        raise EngineError("two engines in the list have the same name; pass {label: engine} to "
                          "tell them apart.")
    engine_options = dict(engine_options or {})
    unknown = sorted(set(engine_options) - set(named))
    if unknown:
        raise EngineError(f"engine_options for {unknown}, which are not among the engines "
                          f"{sorted(named)}.")
    runs = []
    for label, eng in named.items():
        opts = dict(engine_options.get(label, {}))
        spec, _ = resolve_engine(eng, opts)  # unknown engines / options fail here, before running
        spec.check_accepts(posterior)  # so does an engine that does not run on this kind
        field_names = {f for f in spec.config_cls.__dataclass_fields__}
        if "progress_bar" in field_names and "progress_bar" not in opts:
            opts["progress_bar"] = False
        runs.extend(_Run(label, eng, s, opts) for s in seeds)
    ref = Reference.make(reference, posterior, seed=seeds[0], progress_bar=progress_bar)

    results: dict[tuple[str, int], tuple[Fit | None, str | None]] = {}
    bar = progress.bar(total=len(runs), desc=f"compare {posterior.name}",
                       disable=not progress_bar, unit="fit", compiling=False)
    try:
        if executor is None:
            for r in runs:
                bar.set_postfix(engine=r.label, seed=r.seed)
                results[(r.label, r.seed)] = _one(posterior, r)
                bar.update()
        else:
            futures = {executor.submit(_one, posterior, r): r for r in runs}
            from concurrent.futures import as_completed

            for fut in as_completed(futures):
                r = futures[fut]
                results[(r.label, r.seed)] = fut.result()
                bar.update()
    except KeyboardInterrupt:
        pass  # keep the finished runs; the others are rows marked "interrupted"
    finally:
        bar.close()

    rows, fits = [], {label: [] for label in named}
    for r in runs:
        fit, err = results.get((r.label, r.seed), (None, "interrupted"))
        rows.append(_row(r, fit, err, ref))
        fits[r.label].append(fit)
    table = pd.DataFrame(rows, columns=COLUMNS)
    _warn_flags(posterior, runs, results)
    # True / False / None as Python objects (pandas would make an all-known column numpy bools)
    table["compile_cached"] = pd.Series([_known_bool(v) for v in table["compile_cached"]],
                                        index=table.index, dtype=object)
    return Comparison(table=table, fits=fits, reference=ref, posterior=posterior, seeds=seeds)


def model_choice_table(rows: list[dict], elpd_pointwise: Mapping[Any, np.ndarray] | None,
                       criterion: str, engine: str, where: str):
    """The table of an evidence/LOO choice among models indexed by ``K`` (``choose_k`` of the
    mixtures, ``choose_states`` of the AR-HMM): one row per K (a ``"K"`` key, and
    ``"log_evidence"`` where the engine gives one, ``"elpd_loo"`` where LOO was computed), and
    each K's pointwise elpd.

    Adds ``p_k`` (posterior model probabilities from the log evidences under a uniform prior
    over K) and ``attrs["best_evidence"]`` when every K has a log evidence (an
    :class:`~bayeslik.errors.OptionError` naming ``where`` when ``criterion="evidence"`` asks for
    one the engine does not give); and ``elpd_diff``, ``se_diff`` (against the best K by LOO)
    and ``attrs["best_loo"]``: the smallest K within two standard errors of the best.
    """
    import pandas as pd

    table = pd.DataFrame(rows).set_index("K")
    ks = list(table.index)
    if "log_evidence" in table and table["log_evidence"].notna().all():
        lz = table["log_evidence"].to_numpy(float)
        table["p_k"] = np.exp(lz - np.logaddexp.reduce(lz))
        table.attrs["best_evidence"] = int(table.index[np.argmax(lz)])
    elif criterion == "evidence":
        raise OptionError(f"{where}: engine {engine!r} does not estimate the evidence; use "
                          "criterion='loo' or an evidence engine such as 'smc', 'nss' or "
                          "'nested'")
    if "elpd_loo" in table and elpd_pointwise:
        top = int(table.index[np.argmax(table["elpd_loo"].to_numpy(float))])
        diff = {K: elpd_pointwise[K] - elpd_pointwise[top] for K in ks}
        table["elpd_diff"] = [float(diff[K].sum()) for K in ks]
        table["se_diff"] = [float(np.sqrt(len(diff[K]) * np.var(diff[K]))) for K in ks]
        close = [K for K in ks if table.loc[K, "elpd_diff"] >= -2 * table.loc[K, "se_diff"]]
        table.attrs["best_loo"] = min(close)
    return table
