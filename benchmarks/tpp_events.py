"""Marked temporal point processes on held-out sequences: Hawkes vs conditionally independent vs
time-mark dependent log-normal mixtures (models/tpp.py), fitted by NUTS.

Data sets (each split 60/20/20 by sequence with seed 0; models fitted on the 60 %, metrics on the
20 % test part; the validation part is not used, no model selection is done):

* ``japan``: the bundled Japan earthquake catalog (USGS ComCat), monthly sequences, events with
  M >= 4.5 only (3 magnitude classes), above the catalog's completeness magnitude: the classes
  below M4.5 have a detection rate that changes over time (sub-M4 events are largely left out
  after 2009), which would make their rates non-stationary artefacts of the catalog;
* ``hawkes1`` / ``hawkes2``: the synthetic unmarked sets of Omi et al. 2019 (M = 1; the two
  mixture variants coincide, only the conditionally independent one is fitted);
* ``synth_dependent``: simulated from a time-mark dependent log-normal mixture (each mark has its
  own inter-event time distribution), 100 sequences on [0, 30];
* ``synth_hawkes``: simulated from a 2-mark Hawkes process, 60 sequences on [0, 100].

Metrics (``tpp.evaluate``): NLL per event (time part with survival terms, mark part
log p(m | true time, history), total), micro-F1 of the mark given the true time, RMSE of the
predictive mean time to the next event; mean +- sd over 100 posterior draws. For the synthetic
sets a ``truth`` row evaluates the generating parameters.

Run: ``python benchmarks/tpp_events.py`` (``--quick`` for a smoke run; ``--datasets a,b --out
x.csv`` for part of it and ``--merge x.csv y.csv`` to combine parts). Writes
benchmarks/results/tpp_events.csv after every fit. NUTS 2 chains x (200 warmup + 200 draws),
max_tree_depth 7, 2 mixture components, length buckets at 48/128 events; the two chains run
side by side on JAX CPU devices (``bl.use_cpu_cores()``). ``--models`` fits only
some of the models (e.g. to complete a table). Wall times (docs/tpp.md) were measured next to
other jobs: 70-555 s per fit, 2000 s for a mixture on ``hawkes1`` at load average 10-17.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np
import pandas as pd

import bayeslik as bl
from bayeslik.models import tpp

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "tpp_events.csv")

SYNTH_DEPENDENT = {
    "decay": 1.0,
    "mark_bias": np.array([0.3, 0.0, -0.3]),
    "mark_weight": 0.8 * np.eye(3),
    "mix_bias": np.zeros((3, 2)),
    "mix_weight": np.zeros((3, 2)),
    "loc_bias": np.array([[-2.5, -1.5], [-0.5, 0.3], [0.8, 1.5]]),
    "loc_weight": np.full((3, 2), -0.3),
    "log_scale_bias": np.full((3, 2), -0.7),
    "log_scale_weight": np.zeros((3, 2)),
}
SYNTH_HAWKES = {"mu": np.array([0.3, 0.2]), "alpha": np.array([[0.5, 0.2], [0.3, 0.3]]),
                "beta": np.array([3.0, 0.7])}


def merge(paths, out):
    """Concatenate result CSVs of runs over different data sets (run in parallel) into one."""
    df = pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)
    df.to_csv(out, index=False, float_format="%.5g")
    return df


def datasets(names, quick: bool):
    out = {}
    for name in names:
        truth = None
        if name == "japan":
            d = tpp.load()
            seqs, M = d["sequences"], d["num_marks"]
        elif name in ("hawkes1", "hawkes2"):
            seqs, M = tpp.load_synthetic(name), 1
        elif name == "synth_dependent":
            sim = tpp.simulate_lognormmix(jax.random.key(1), SYNTH_DEPENDENT, t_end=30.0, num_sequences=100,
                                          max_events=600)
            seqs, M, truth = tpp.unpad(sim), 3, SYNTH_DEPENDENT
        elif name == "synth_hawkes":
            sim = tpp.simulate_hawkes(jax.random.key(2), SYNTH_HAWKES, t_end=100.0, num_sequences=60,
                                      max_events=1000)
            seqs, M, truth = tpp.unpad(sim), 2, SYNTH_HAWKES
        else:
            raise SystemExit(f"unknown data set {name!r}")
        train, val, test = tpp.split_sequences(seqs, (0.6, 0.2, 0.2), seed=0)
        if quick:
            train, test = train[:8], test[:4]
        out[name] = dict(train=tpp.pad_sequences(train, M), test=tpp.pad_sequences(test, M), M=M, truth=truth)
    return out


def fit_one(kind, data, M, opts, dependent=True, num_components=2, edges=(48, 128)):
    """NUTS on length buckets (each padded to its own longest sequence: the Japan training months
    have 8 to 433 events, and one padded array would be 10x larger than the data)."""
    ts = tpp.default_time_scale(data)
    buckets = tpp.bucket_by_length(data, edges)
    if kind == "hawkes":
        post = bl.Posterior(tpp.hawkes_buckets, **buckets, time_scale=ts)
        init = tpp.init_params("hawkes", M, time_scale=ts)
    else:
        post = bl.Posterior(tpp.lognormmix_buckets, **buckets, time_scale=ts, num_components=num_components,
                            mark_dependent=dependent)
        init = tpp.init_params("lognormmix", M, num_components=num_components, mark_dependent=dependent,
                               time_scale=ts)
    t0 = time.perf_counter()
    fit = bl.fit(post, "nuts", seed=0, init=init, progress_bar=False, **opts)
    return fit, ts, time.perf_counter() - t0


def _max_rhat(fit):
    from numpyro.diagnostics import split_gelman_rubin

    vals = []
    for v in fit.idata["posterior"].data_vars.values():
        x = np.asarray(v.values)
        if x.shape[0] > 1:
            vals.append(np.nanmax(split_gelman_rubin(x.reshape(x.shape[:2] + (-1,)))))
    return float(max(vals)) if vals else float("nan")


def row(dataset, model, ev, extra):
    r = {"dataset": dataset, "model": model}
    for k in ("nll_time", "nll_mark", "nll_total", "accuracy", "rmse"):
        r[f"{k}_mean"], r[f"{k}_sd"] = ev[k]
    for k in ("nll_total_pred", "accuracy_pred", "rmse_pred", "num_events"):
        r[k] = ev[k]
    r.update(extra)
    return r


def _write(rows, opts, args):
    """Write the rows so far (the CSV is complete after every fit)."""
    df = pd.DataFrame(rows)
    df["settings"] = (f"NUTS {opts['num_chains']} chains x ({opts['num_warmup']} warmup + {opts['num_samples']} "
                      f"draws), max_tree_depth {opts['max_tree_depth']}; metrics over {args.num_draws} draws")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    df.to_csv(args.out, index=False, float_format="%.5g")
    return df


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="japan,synth_dependent,synth_hawkes,hawkes1,hawkes2")
    ap.add_argument("--num-warmup", type=int, default=200)
    ap.add_argument("--num-samples", type=int, default=200)
    ap.add_argument("--num-chains", type=int, default=2)
    ap.add_argument("--max-tree-depth", type=int, default=7)
    ap.add_argument("--models", default="hawkes,lognormmix_indep,lognormmix_dep",
                    help="which models to fit (comma-separated; the truth rows always come)")
    ap.add_argument("--num-draws", type=int, default=100, help="posterior draws used for the metrics")
    ap.add_argument("--quick", action="store_true", help="tiny subsets and runs (smoke test)")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--merge", nargs="+", help="only merge these CSVs into --out")
    args = ap.parse_args(argv)
    # one CPU device per core, so NUTS runs its chains side by side (no chain waits for the
    # other's tree); before JAX computes anything
    bl.use_cpu_cores()
    if args.merge:
        return merge(args.merge, args.out)
    opts = dict(num_warmup=args.num_warmup, num_samples=args.num_samples, num_chains=args.num_chains,
                max_tree_depth=args.max_tree_depth)
    if args.quick:
        opts.update(num_warmup=50, num_samples=50)
    rows = []
    t_all = time.perf_counter()
    for name, ds in datasets(args.datasets.split(","), args.quick).items():
        M, train, test = ds["M"], ds["train"], ds["test"]
        print(f"== {name}: {len(train['t_end'])} train sequences ({int(train['mask'].sum())} events, "
              f"N_max {train['times'].shape[1]}), {len(test['t_end'])} test ({int(test['mask'].sum())} events), "
              f"M={M}", flush=True)
        variants = [("hawkes", "hawkes", True), ("lognormmix_indep", "lognormmix", False)]
        # M = 1: both mixture variants are the same program, so only one is fitted
        if M > 1:
            variants.append(("lognormmix_dep", "lognormmix", True))
        for label, kind, dep in [v for v in variants if v[0] in args.models.split(",")]:
            try:
                fit, ts, wall = fit_one(kind, train, M, opts, dependent=dep)
                ev = tpp.evaluate(fit, test, num_draws=args.num_draws, time_scale=ts)
            except Exception as e:  # one failed fit must not lose the others; it is reported
                print(f"  {label}: FAILED {type(e).__name__}: {e}", flush=True)
                rows.append({"dataset": name, "model": label, "error": f"{type(e).__name__}: {e}"})
                continue
            ndiv = int(np.asarray(fit.idata["sample_stats"]["diverging"]).sum())
            extra = {"wall_s": round(wall, 1), "divergences": ndiv, "max_rhat": round(_max_rhat(fit), 3),
                     "frac_unstable": tpp.stability(fit, warn=False).frac_unstable if kind == "hawkes" else np.nan,
                     "time_scale": ts}
            rows.append(row(name, label, ev, extra))
            r = rows[-1]
            print(f"  {label:17s} NLL {r['nll_total_mean']:.4f}+-{r['nll_total_sd']:.4f} (time "
                  f"{r['nll_time_mean']:.4f}, mark {r['nll_mark_mean']:.4f})  acc {r['accuracy_mean']:.3f}  "
                  f"rmse {r['rmse_mean']:.3f}  [{wall:.0f} s, {ndiv} div, rhat {r['max_rhat']}]", flush=True)
            _write(rows, opts, args)
        if ds["truth"] is not None:
            ev = tpp.evaluate(ds["truth"], test, time_scale=tpp.default_time_scale(train))
            rows.append(row(name, "truth", ev, {"wall_s": 0.0}))
            _write(rows, opts, args)
    df = _write(rows, opts, args)
    print(f"wrote {args.out} ({time.perf_counter() - t_all:.0f} s in all)")
    cols = ["dataset", "model", "nll_time_mean", "nll_mark_mean", "nll_total_mean", "nll_total_sd",
            "accuracy_mean", "rmse_mean", "wall_s"]
    print(df[cols].to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    return df


if __name__ == "__main__":
    sys.exit(main() is None)
