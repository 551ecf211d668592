"""Every zoo family's ``example()`` through every engine, at default options (issue 24).

Run:  python benchmarks/family_matrix.py [--families cosmology arhmm ...]
                                         [--engines nuts smc nested nss nested+surrogate]
                                         [--time-limit 720] [--quick] [--seed 0]
                                         [--out-dir benchmarks/results] [--work DIR]

Families: :data:`bayeslik.cli.FAMILIES` (the CLI's names: arhmm, cosmology, mixture, meta,
hawkes, lognormmix), each the problem its module's ``example()`` (or ``example_<name>()``) returns,
as ``bayeslik fit NAME`` runs it. Engines: nuts, smc, nested (dynesty), nss, nested+surrogate,
at their defaults (``--quick``: the smaller settings of :data:`QUICK`, to check the script, not
to judge the engines).

One fit at a time, each in its own process (``python benchmarks/family_matrix.py --cell FAMILY
ENGINE ...``) with a wall-time limit (``--time-limit`` seconds, imports and compiling included):
a cell past it is sent SIGTERM (its partial Fit, where the engine keeps one, is not used), then
SIGKILL after 30 s, and recorded as ``timeout``. A cell that raises is ``error`` with the
message's first line. Per cell:

* ``wall_s``: the Fit's own wall time (``Fit.cost.wall_s``); ``process_s``: the whole process
  (imports, the Posterior, the save); ``cpu_s``: the process's CPU seconds (user + system, its
  children included: ``getrusage(RUSAGE_CHILDREN)`` around it), which on several cores exceeds
  the wall time;
* ``num_loglik_evals``: true likelihood evaluations (``Fit.cost``);
* against the family's NUTS fit (where both finished): ``z_max``, the worst
  ``|mean - mean_nuts| / sqrt(mcse^2 + mcse_nuts^2)`` over every scalar parameter
  (:func:`bayeslik.diagnostics.error_vs_reference`: ArviZ's MCSE of the equal-weight draws,
  both fits' combined), ``z_param`` which one, ``sd_ratio_min`` / ``sd_ratio_max`` (sd /
  sd_nuts). Families with exchangeable components (mixture, arhmm, lognormmix: :data:`RELABEL`)
  are relabelled first (:func:`bayeslik.relabel.relabel`, the family's registered spec; then
  each fit's components are matched to the NUTS fit's by their mean cost-site features, one
  permutation per fit), else the label switching alone would give huge z;
* ``log_evidence`` +- ``log_evidence_err`` (evidence engines), ``num_flags`` and ``flags``.

Writes ``family_matrix.csv`` (one row per cell, :data:`COLUMNS`) and ``family_matrix.md`` (the
family x engine table of issue 24, then the details) in ``--out-dir``; the fits are kept as
netCDF under ``--work`` (default a temporary folder). The full matrix takes hours on two cores;
``--families`` / ``--engines`` pick part of it. This is a benchmark: it writes a table and never
fails.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "benchmarks" / "results"
STEM = "family_matrix"
ENGINES = ("nuts", "smc", "nested", "nss", "nested+surrogate")
#: family -> the relabel spec its module registers (label-switching families)
RELABEL = {"mixture": "mixture", "arhmm": "arhmm", "lognormmix": "lognormmix"}
#: --quick: smaller settings, to check the script end to end (not to judge the engines)
QUICK = {"nuts": dict(num_warmup=300, num_samples=300, num_chains=2),
         "smc": dict(num_particles=400), "nested": dict(num_live=100),
         "nss": dict(num_live=100), "nested+surrogate": dict(num_live=100)}
#: seconds between SIGTERM and SIGKILL for a cell past its time limit
GRACE_S = 30.0
#: |z| above this counts as a disagreement with NUTS in the table
Z_BAD = 4.0
COLUMNS = ["family", "engine", "status", "wall_s", "process_s", "cpu_s", "num_loglik_evals",
           "z_max", "z_param", "sd_ratio_min", "sd_ratio_max", "log_evidence",
           "log_evidence_err", "num_flags", "flags", "message"]


# ------------------------------------------------------------------------------- one cell
def load_family(name: str):
    """(model, data) of the zoo family ``name`` (a key of bayeslik.cli.FAMILIES), as the CLI
    loads it: the module's ``example_<name>()`` where the name is not the module's, else
    ``example()``."""
    from bayeslik.cli import FAMILIES

    if name not in FAMILIES:
        raise SystemExit(f"unknown family {name!r}; the families are {sorted(FAMILIES)}")
    module, _ = FAMILIES[name]
    mod = importlib.import_module(f"bayeslik.models.{module}")
    fn = getattr(mod, f"example_{name}", None) if name != module else None
    return (fn or mod.example)()


def engine_options(engine: str, quick: bool) -> dict:
    """The options a cell passes to bl.fit: none at the defaults, :data:`QUICK` with --quick;
    no progress bar either way (logs)."""
    return {**(QUICK.get(engine, {}) if quick else {}), "progress_bar": False}


def run_cell(family: str, engine: str, *, quick: bool, seed: int, fit_path: str,
             info_path: str) -> None:
    """The child's work: fit, save the Fit, write its facts as JSON."""
    import bayeslik as bl

    model, data = load_family(family)
    post = bl.Posterior(model, **data)
    fit = bl.fit(post, engine, seed=seed, **engine_options(engine, quick))
    fit.save(fit_path)
    info = {"wall_s": fit.cost.wall_s, "num_loglik_evals": fit.cost.num_loglik_evals,
            "log_evidence": fit.log_evidence, "log_evidence_err": fit.log_evidence_err,
            "flags": list(fit.flags)}
    Path(info_path).write_text(json.dumps(info))


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def launch(family: str, engine: str, *, quick: bool, seed: int, time_limit: float,
           work: Path) -> dict:
    """Run one cell in a subprocess with a time limit; its facts (``status`` ok / timeout /
    error, ``process_s``, ``cpu_s``, ``fit_path`` where it finished, the child's JSON)."""
    stem = f"{family}_{engine.replace('+', '_')}"
    fit_path, info_path, log_path = (work / f"{stem}.nc", work / f"{stem}.json",
                                     work / f"{stem}.log")
    for p in (fit_path, info_path):
        p.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--cell", family, engine,
           "--seed", str(seed), "--fit-path", str(fit_path), "--info-path", str(info_path)]
    cmd += ["--quick"] if quick else []
    cpu0, t0 = _children_cpu(), time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=str(ROOT))
        status = "ok"
        try:
            proc.wait(timeout=time_limit)
        except subprocess.TimeoutExpired:
            status = "timeout"
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    out: dict[str, Any] = {"family": family, "engine": engine,
                           "process_s": time.perf_counter() - t0, "cpu_s": _children_cpu() - cpu0}
    if status == "ok" and (proc.returncode != 0 or not info_path.exists()):
        status = "error"
        out["message"] = _last_error(log_path.read_text(errors="replace"))
    out["status"] = status
    if status == "timeout":
        out["message"] = f"did not finish in {time_limit:g} s"
    if status == "ok":
        out.update(json.loads(info_path.read_text()))
        out["fit_path"] = str(fit_path)
    return out


def _last_error(log: str) -> str:
    """The last line of a child's log that names an exception, else its last line."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln.split(":")[0] or ln.startswith(("bayeslik.", "KeyboardInterrupt")):
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


# ------------------------------------------------------------------------------- comparison
def _component_features(fit, spec) -> Any:
    """(K, P) mean features of the components of ``fit`` on the spec's cost sites (a site with
    two component axes: its diagonal)."""
    import numpy as np

    cost = [c for c in (spec.cost_sites or spec.components) if c in fit.idata["posterior"]]
    feats = []
    for site in cost:
        x = fit.draws(site).mean((0, 1))
        axes = spec.components[site]
        if len(axes) == 1:
            f = np.moveaxis(x, axes[0], 0)
        else:
            f = np.moveaxis(np.diagonal(x, axis1=axes[0], axis2=axes[1]), -1, 0)
        feats.append(f.reshape(f.shape[0], -1))
    return np.concatenate(feats, axis=1)


def relabel_to(fits: Mapping[str, Any], spec_name: str, reference: str = "nuts") -> dict:
    """Each fit relabelled with the registered spec ``spec_name``, then its components matched
    to the ``reference`` fit's (Hungarian assignment on the mean cost-site features, one
    permutation for the whole fit)."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    import bayeslik as bl
    from bayeslik.relabel import permute_fit, registered_components

    spec = registered_components()[spec_name]
    out = {name: bl.relabel(fit, spec_name) for name, fit in fits.items()}
    if reference not in out:
        return out
    ref = _component_features(out[reference], spec)
    scale = np.where(ref.std(0) > 0, ref.std(0), 1.0)
    for name, fit in out.items():
        if name == reference:
            continue
        f = _component_features(fit, spec)
        cost = (((f[:, None, :] - ref[None, :, :]) / scale) ** 2).sum(-1)   # (old, new)
        rows, cols = linear_sum_assignment(cost)
        perm = np.empty(len(cols), np.int64)
        perm[cols] = rows                                  # new component k = old perm[k]
        if np.any(perm != np.arange(len(perm))):
            n = fit.num_chains * fit.num_draws
            out[name] = permute_fit(fit, np.tile(perm, (n, 1)), spec_name)
    return out


def agreement(fit, reference) -> dict:
    """``z_max`` (and which parameter), ``sd_ratio_min`` / ``sd_ratio_max`` of ``fit`` against
    the ``reference`` fit over every scalar parameter both have."""
    import numpy as np

    from bayeslik.diagnostics import error_vs_reference

    sites = [k for k in reference.posterior.data_vars if k in fit.posterior.data_vars]
    err = error_vs_reference(fit, draws={k: reference.draws(k) for k in sites})
    best = (-1.0, "")
    ratios = []
    for site, e in err.items():
        z = np.abs(np.atleast_1d(np.asarray(e["z"], np.float64))).reshape(-1)
        r = np.atleast_1d(np.asarray(e["sd_ratio"], np.float64)).reshape(-1)
        ok = np.isfinite(z)
        if ok.any():
            i = int(np.nanargmax(np.where(ok, z, -1)))
            if z[i] > best[0]:
                shape = np.shape(e["z"])
                idx = np.unravel_index(i, shape) if shape else ()
                best = (float(z[i]), site + (f"[{','.join(map(str, idx))}]" if idx else ""))
        ratios.extend(r[np.isfinite(r)].tolist())
    return {"z_max": best[0] if best[1] else math.nan, "z_param": best[1],
            "sd_ratio_min": min(ratios) if ratios else math.nan,
            "sd_ratio_max": max(ratios) if ratios else math.nan}


def compare_family(family: str, cells: Sequence[dict], reference: str = "nuts") -> list[dict]:
    """The cells' rows with the agreement columns filled against the family's ``reference``
    cell (where it and the cell finished)."""
    import bayeslik as bl

    rows = [dict(c) for c in cells]
    done = {r["engine"]: r for r in rows if r.get("status") == "ok" and r.get("fit_path")}
    if reference not in done:
        return rows
    fits = {e: bl.load_fit(r["fit_path"]) for e, r in done.items()}
    if family in RELABEL:
        load_family(family)  # imports the module, which registers its spec
        try:
            fits = relabel_to(fits, RELABEL[family], reference)
        except Exception as e:  # noqa: BLE001 - a benchmark: note it, compare unrelabelled
            for r in done.values():
                r["message"] = f"relabel failed: {type(e).__name__}: {e}"[:300]
    for e, r in done.items():
        if e != reference:
            r.update(agreement(fits[e], fits[reference]))
    return rows


# ------------------------------------------------------------------------------- tables
def _num(x, fmt: str) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return ""
    return format(x, fmt)


def cell_text(row: Mapping[str, Any], reference: str = "nuts") -> str:
    """One cell of the family x engine table: status, wall time, z against NUTS, sd ratios,
    flags (bold where |z| > Z_BAD or sd ratios beyond 10%)."""
    status = row.get("status", "")
    if status == "timeout":
        return f"**timeout** ({row.get('message', '')})"
    if status == "error":
        return f"**error**: {row.get('message', '')}"
    parts = [f"ok {_num(row.get('wall_s'), '.0f')} s"]
    z = row.get("z_max")
    bad = False
    if row.get("engine") != reference and z is not None and math.isfinite(z):
        lo, hi = row.get("sd_ratio_min"), row.get("sd_ratio_max")
        bad = z > Z_BAD or (lo is not None and lo < 0.9) or (hi is not None and hi > 1.1)
        parts.append(f"z {z:.1f}, sd {lo:.2f}-{hi:.2f}")
    if row.get("log_evidence") is not None and math.isfinite(row["log_evidence"]):
        parts.append(f"log Z {row['log_evidence']:.2f} ± {_num(row.get('log_evidence_err'), '.2f')}")
    n = int(row.get("num_flags") or len(row.get("flags") or []))
    if n:
        parts.append(f"{n} flag{'s' if n > 1 else ''}")
    text = ", ".join(parts)
    return f"**{text}**" if bad else text


def markdown(rows: Sequence[Mapping[str, Any]], engines: Sequence[str] = ENGINES,
             note: str = "") -> str:
    """The family x engine table (cells by :func:`cell_text`, "not run" where a cell is
    missing), then a details table of every row."""
    families = list(dict.fromkeys(r["family"] for r in rows))
    engines = [e for e in engines if any(r["engine"] == e for r in rows)]
    by = {(r["family"], r["engine"]): r for r in rows}
    out = [f"# Family x engine matrix{f' ({note})' if note else ''}", "",
           "| family | " + " | ".join(engines) + " |",
           "|---|" + "---|" * len(engines)]
    for f in families:
        cells = [cell_text(by[f, e]) if (f, e) in by else "not run" for e in engines]
        out.append(f"| {f} | " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    out += ["", f"z: worst |mean - mean_nuts| / combined MCSE over the scalar parameters; sd: "
                f"sd / sd_nuts, min-max; bold: z > {Z_BAD:g} or an sd ratio outside 0.9-1.1, "
                "or a cell that did not finish.", "",
            "| family | engine | status | wall s | process s | CPU s | likelihood calls | z max "
            "(param) | sd ratio min | sd ratio max | log Z | flags |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        flags = "; ".join(r.get("flags") or []) or r.get("message", "")
        out.append("| " + " | ".join([
            r["family"], r["engine"], r.get("status", ""), _num(r.get("wall_s"), ".1f"),
            _num(r.get("process_s"), ".1f"), _num(r.get("cpu_s"), ".1f"),
            _num(r.get("num_loglik_evals"), ",d") if r.get("num_loglik_evals") is not None else "",
            (f"{_num(r.get('z_max'), '.2f')} ({r.get('z_param', '')})"
             if r.get("z_param") else ""),
            _num(r.get("sd_ratio_min"), ".3f"), _num(r.get("sd_ratio_max"), ".3f"),
            (f"{r['log_evidence']:.3f} ± {_num(r.get('log_evidence_err'), '.3f')}"
             if r.get("log_evidence") is not None else ""),
            flags.replace("|", "/")[:400]]) + " |")
    return "\n".join(out) + "\n"


def csv_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """The rows as :data:`COLUMNS` (flags joined by " | ")."""
    out = []
    for r in rows:
        d = {c: r.get(c, "") for c in COLUMNS}
        d["num_flags"] = len(r.get("flags") or [])
        d["flags"] = " | ".join(r.get("flags") or [])
        d["message"] = r.get("message", "")
        out.append(d)
    return out


def write(rows: Sequence[Mapping[str, Any]], out_dir: Path, note: str = "",
          engines: Sequence[str] = ENGINES) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / f"{STEM}.csv", out_dir / f"{STEM}.md"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(csv_rows(rows))
    md_path.write_text(markdown(rows, engines, note))
    return csv_path, md_path


# ------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    from bayeslik.cli import FAMILIES

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    p.add_argument("--time-limit", type=float, default=720.0, help="seconds per fit")
    p.add_argument("--quick", action="store_true", help="smaller settings (QUICK)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=OUT_DIR)
    p.add_argument("--work", type=Path, default=None, help="folder for the fits and logs")
    p.add_argument("--cell", nargs=2, metavar=("FAMILY", "ENGINE"), help=argparse.SUPPRESS)
    p.add_argument("--fit-path", help=argparse.SUPPRESS)
    p.add_argument("--info-path", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.cell:
        run_cell(*args.cell, quick=args.quick, seed=args.seed, fit_path=args.fit_path,
                 info_path=args.info_path)
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="family_matrix-"))
    work.mkdir(parents=True, exist_ok=True)
    # NUTS is the reference: it runs first, whatever --engines says
    engines = ["nuts"] + [e for e in args.engines if e != "nuts"]
    rows: list[dict] = []
    for family in args.families:
        cells = []
        for engine in engines:
            cell = launch(family, engine, quick=args.quick, seed=args.seed,
                          time_limit=args.time_limit, work=work)
            cells.append(cell)
            print(f"{family:11s} {engine:17s} {cell['status']:8s} "
                  f"{cell['process_s']:7.1f} s  {cell.get('message', '')}", flush=True)
        rows += compare_family(family, cells)
        note = f"seed {args.seed}, time limit {args.time_limit:g} s" + (", --quick" if args.quick else "")
        csv_path, md_path = write(rows, args.out_dir, note, engines)
    print(f"written: {csv_path}, {md_path} (fits and logs in {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
