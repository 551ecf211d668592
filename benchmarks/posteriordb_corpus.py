"""The posteriordb corpus through NUTS (float32 and float64) and tempered SMC (proper priors).

Run:  python benchmarks/posteriordb_corpus.py [--engines nuts smc] [--dtypes 32 64]
                                              [--names NAME ...] [--seed 0]
                                              [--out benchmarks/results/posteriordb_corpus.csv]
                                              [--update]

Every posterior of ``bayeslik.models.posteriordb`` (31, each with 10 x 1,000 reference draws
made by the posteriordb maintainers with rstan) is fitted at the engine's defaults plus the
settings recorded in ``posteriordb.NUTS_OPTIONS`` (NUTS: 4 chains x 1,000 warmup + 1,000 draws,
target_accept 0.8, diagonal metric; SMC: its defaults), and compared with the reference by
``posteriordb.check_against_reference``: worst |z| of the means over all parameters (z in
combined Monte Carlo standard errors, ours and the reference's) and the worst ratio of standard
deviations. A fit passes when worst |z| < 4 and every sd ratio lies within 10% of 1 (or, for a
heavy-tailed parameter, the sds agree within 4 combined MCSEs of the sd), and, for NUTS, when it
raised no flag. SMC skips posteriors with an improper (flat) prior: it needs
to draw from the prior.

Each dtype runs in its own process (float64 is switched on before JAX starts). The CSV has a
row per (posterior, engine, dtype) with the time, the figures, the flags and pass/fail; the
markdown table printed at the end is the one in docs/engines/nuts.md. ``--update`` reruns only
the given posteriors/engines/dtypes and keeps the other rows of ``--out``. This is a benchmark: it
writes a table and never fails.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ["name", "engine", "dtype", "ndim", "status", "worst_z", "worst_z_param",
          "worst_sd_ratio", "worst_sd_param", "divergences", "wall_s", "options", "flags"]


def _one_dtype(args) -> list[dict]:
    """Run in this process (the dtype is set already); one row per (name, engine)."""
    import warnings

    import jax

    import bayeslik as bl
    from bayeslik.convergence import FitWarning
    from bayeslik.models import posteriordb

    dtype = "float64" if jax.config.read("jax_enable_x64") else "float32"
    rows = []
    for name in args.names or posteriordb.names():
        p = posteriordb.load(name)
        post = bl.Posterior(p["model"], **p["data"])
        for engine in args.engines:
            opts = dict(posteriordb.NUTS_OPTIONS.get(name, {})) if engine == "nuts" else {}
            row = {"name": name, "engine": engine, "dtype": dtype, "ndim": post.ndim,
                   "options": json.dumps(opts)}
            improper = any(s.improper for s in post.sites.values())
            if engine == "smc" and improper:
                rows.append({**row, "status": "skipped (improper prior)"})
                print(json.dumps(rows[-1]), flush=True)
                continue
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FitWarning)  # they are in fit.flags
                    fit = bl.fit(post, engine, seed=args.seed, progress_bar=False, **opts)
            except Exception as e:  # noqa: BLE001 - a benchmark row, whatever went wrong
                rows.append({**row, "status": f"error: {type(e).__name__}: {e}"[:300],
                             "wall_s": round(time.perf_counter() - t0, 1)})
                print(json.dumps(rows[-1]), flush=True)
                continue
            wall = time.perf_counter() - t0
            draws = {k: fit.draws(k) for k in p["reference"]}
            res = posteriordb.check_against_reference(name, draws, p["reference"])
            ok = res["passed"]
            div = int(fit.idata["sample_stats"]["diverging"].sum()) \
                if "diverging" in fit.idata["sample_stats"] else ""
            # NUTS must also be clean; SMC's flags (if any) are reported but its draws decide
            flagged = engine == "nuts" and bool(fit.flags)
            rows.append({**row, "status": "pass" if ok and not flagged else "FAIL",
                         "worst_z": round(res["worst_z"], 2), "worst_z_param": res["worst_z_param"],
                         "worst_sd_ratio": round(res["worst_sd_ratio"], 3),
                         "worst_sd_param": res["worst_sd_param"], "divergences": div,
                         "wall_s": round(wall, 1), "flags": " | ".join(fit.flags)[:400]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _names() -> list[str]:
    from bayeslik.models import posteriordb

    return posteriordb.names()


def _table(rows: list[dict]) -> str:
    by = {}
    for r in rows:
        by.setdefault(r["name"], {})[(r["engine"], r["dtype"])] = r
    cols = sorted({(r["engine"], r["dtype"]) for r in rows},
                  key=lambda c: (c[0] != "nuts", c[0], c[1]))

    def cell(r):
        if r is None:
            return ""
        if r["status"] in ("pass", "FAIL"):
            return (f"{'pass' if r['status'] == 'pass' else '**FAIL**'} z {r['worst_z']}, "
                    f"sd {r['worst_sd_ratio']}, {r['wall_s']} s")
        return r["status"].split(":")[0]

    head = "| posterior | d | " + " | ".join(f"{e} {d}" for e, d in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for name, cells in by.items():
        nd = next(iter(cells.values()))["ndim"]
        lines.append(f"| {name} | {nd} | " + " | ".join(cell(cells.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engines", nargs="+", default=["nuts", "smc"])
    ap.add_argument("--dtypes", nargs="+", default=["32", "64"])
    ap.add_argument("--names", nargs="*", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/posteriordb_corpus.csv"))
    ap.add_argument("--update", action="store_true",
                    help="keep the rows of --out for the (posterior, engine, dtype) not rerun")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker is not None:  # a child process for one dtype: rows as JSON lines
        if args.worker == "64":
            import jax

            jax.config.update("jax_enable_x64", True)
        _one_dtype(args)
        return

    rows = []
    for dt in args.dtypes:
        cmd = [sys.executable, __file__, "--worker", dt, "--seed", str(args.seed), "--engines",
               *args.engines] + (["--names", *args.names] if args.names else [])
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=dict(os.environ))
        for line in proc.stdout:
            if line.startswith("{"):
                rows.append(json.loads(line))
                r = rows[-1]
                print(f"{r['name']:48s} {r['engine']:5s} {r['dtype']}: {r['status']:6.6s} "
                      f"z {r.get('worst_z', '')} sd {r.get('worst_sd_ratio', '')} "
                      f"{r.get('wall_s', '')} s", flush=True)
        proc.wait()
    out = Path(args.out)
    if args.update and out.exists():
        done = {(r["name"], r["engine"], r["dtype"]) for r in rows}
        with out.open() as f:
            old = [r for r in csv.DictReader(f) if (r["name"], r["engine"], r["dtype"]) not in done]
        order = {n: i for i, n in enumerate(_names())}
        rows = sorted(old + rows, key=lambda r: (order.get(r["name"], 99), r["engine"], r["dtype"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in FIELDS})
    print(f"\nwrote {out}\n")
    print(_table(rows))


if __name__ == "__main__":
    main()
