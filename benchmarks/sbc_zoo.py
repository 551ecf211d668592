"""SBC of every applicable engine on every model of the zoo; writes a table and the figures.

Run:  python benchmarks/sbc_zoo.py [--simulations 200] [--draws 100] [--out benchmarks/results]

Models whose prior is improper (garch11) cannot be simulated; models whose program is not
generative for its data (arK conditions its mean on the observed lags) would be judged on the
wrong question; both are listed as skipped with the reason.
"""

from __future__ import annotations

import argparse
import os
import time

import pandas as pd

from bayeslik.models import posteriordb, reference
from bayeslik.sbc import sbc

SKIP = {
    "garch11": "improper prior (flat on mu, alpha0): nothing to simulate from",
    "arK": "the program conditions its mean on observed lags: not generative for y",
}
ENGINES = {"nuts": dict(num_warmup=500, num_samples=500, num_chains=2, target_accept=0.9)}


def zoo():
    for name in reference.names():
        p = reference.get(name)
        yield name, p.model, p.data
    for name in ("low_dim_gauss_mix-low_dim_gauss_mix", "hmm_example-hmm_example"):
        p = posteriordb.load(name)
        yield name.split("-")[0], p["model"], p["data"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--simulations", type=int, default=200)
    ap.add_argument("--draws", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--figures", default=None, help="folder for the PNG figures (default: --out)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    figs = args.figures or args.out
    os.makedirs(figs, exist_ok=True)
    rows = []
    for name, reason in SKIP.items():
        rows.append({"model": name, "engine": "-", "result": "skipped", "worst": reason})
    for name, model, data in zoo():
        for engine, opts in ENGINES.items():
            t = time.perf_counter()
            res = sbc(model, engine, num_simulations=args.simulations, num_draws=args.draws,
                      seed=args.seed, engine_options=opts, progress_bar=False, **data)
            worst = res.worst
            rows.append({
                "model": name, "engine": engine, "result": "pass" if res.passed else "FAIL",
                "worst": worst, "worst_p": float(res.table.loc[worst, "min_p"]),
                "num_quantities": len(res.table), "simulations": res.num_simulations,
                "failed_fits": res.num_failed, "median_draws_kept": float(pd.Series(res.draws_kept).median()),
                "wall_s": round(time.perf_counter() - t, 1),
            })
            print(res, flush=True)
            res.table.to_csv(os.path.join(args.out, f"sbc_{name}_{engine}.csv"))
            res.plot(max_cols=5).savefig(os.path.join(figs, f"sbc_{name}_{engine}.png"), dpi=90)
    table = pd.DataFrame(rows)
    table.to_csv(os.path.join(args.out, "sbc_zoo.csv"), index=False)
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
