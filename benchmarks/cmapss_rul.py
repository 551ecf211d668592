"""RUL on C-MAPSS FD001: linear baseline, a 1-D CNN reference, the AR-HMM and the degradation-path model.

Run:  python benchmarks/cmapss_rul.py [--arhmm-units 20] [--states 5] [--warmup 250] [--samples 250]
      python benchmarks/cmapss_rul.py --validate --deg-max-tree-depth 8   # model choice (training engines only)

Every method predicts the RUL of the 100 FD001 test engines in one run:

* linear baseline: ``cmapss.baseline_rul`` (intervals from the training residuals' quantiles);
* deep reference: ``cmapss_deep``, a 1-D CNN on windows of 30 cycles of the 14 informative
  sensors (min-max normalised, RUL cap 125), early-stopped on 20% of the training engines;
  point predictions only;
* AR-HMM: the partially-hidden left-to-right AR-HMM of the health indicator (NUTS on the first
  --arhmm-units training engines, K = --states stages), as before;
* degradation path: ``cmapss_degradation``, the hierarchical exponential path model of the health
  indicator with engine random effects, fitted with NUTS on all 100 training engines and the
  100 test engines' sensor paths (never their RUL) in one program; RUL = its posterior.

The predictions per test engine (unit, method, true RUL, median and the 2.5/5/10/25/75/90/95/97.5%
quantiles) go to benchmarks/results/cmapss_rul_predictions.csv; every metric of the table
(benchmarks/results/cmapss_rul.csv) is recomputed from that file with ``cmapss.rul_metrics``: RMSE
and PHM08 score of the median (truth capped at 125), coverage of the central 50/80/90/95%
intervals, mean width of the 90% interval.

--validate: five folds of the 100 training engines (fold f: the units with unit % 5 == f, each cut
at a random cycle so that 7..145 cycles of life remain, as in the test set); the degradation model
(with and without the life link of its engine effects) is fitted on each fold's data and scored on
the cut units; the AR-HMM is fitted on 20 units
outside fold 0 and scored on fold 0. Writes benchmarks/results/cmapss_rul_validation.csv and
..._validation_predictions.csv. The test set is not read.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import jax
import numpy as np
import pandas as pd

import bayeslik as bl
from bayeslik.models import arhmm, cmapss, cmapss_deep
from bayeslik.models import cmapss_degradation as cdeg

RESULTS = os.path.join(os.path.dirname(__file__), "results")
COLUMNS = ["unit", "method", "true_rul"] + list(cmapss.QUANTILE_COLUMNS)


def rows(method: str, units, true_rul, table: pd.DataFrame) -> pd.DataFrame:
    """Prediction rows in the file's column order (absent quantiles are NaN)."""
    out = pd.DataFrame({"unit": np.asarray(units, int), "method": method,
                        "true_rul": np.asarray(true_rul, int)})
    for c in cmapss.QUANTILE_COLUMNS:
        out[c] = table[c].to_numpy(float) if c in table.columns else np.nan
    return out[COLUMNS]


def baseline_table(train, test) -> pd.DataFrame:
    """The linear baseline with every benchmark quantile (its interval at each level); its
    median is its point prediction."""
    out = pd.DataFrame(index=sorted(test["unit"].unique()))
    for level, (lo, hi) in cmapss.INTERVALS.items():
        b = cmapss.baseline_rul(train, test, interval=level)
        out[lo], out[hi], out["median"] = b["lower"], b["upper"], b["rul"]
    return out


def fit_arhmm(train, hi, K, args):
    tr = cmapss.degradation_data(train, hi, K, run_to_failure=True)
    post = bl.Posterior(arhmm.model, y=tr["y"], num_states=K, left_to_right=True,
                        labels=tr["labels"], mask=tr["mask"])
    init = arhmm.init_params(tr["y"], K, left_to_right=True, mask=tr["mask"])
    t = time.perf_counter()
    fit = bl.fit(post, "nuts", seed=0, num_warmup=args.warmup, num_samples=args.samples,
                 num_chains=args.chains, init=init, max_tree_depth=args.max_tree_depth,
                 progress_bar=args.progress, log_likelihood=False)
    return fit, time.perf_counter() - t


def fit_degradation(data, args, seed=0, life_link=True):
    post = bl.Posterior(cdeg.model, **data, life_link=life_link)
    t = time.perf_counter()
    fit = bl.fit(post, "nuts", seed=seed, num_warmup=args.deg_warmup, num_samples=args.deg_samples,
                 num_chains=args.chains, init=cdeg.init_values(data, life_link), max_tree_depth=args.deg_max_tree_depth,
                 progress_bar=args.progress, log_likelihood=False)
    return fit, time.perf_counter() - t


def rhat_max(fit) -> float:
    s = fit.summary()
    return float(pd.to_numeric(s["r_hat"], errors="coerce").max())


def benchmark(args) -> None:
    d = cmapss.load()
    train, test = d["train"], d["test"]
    hi = cmapss.HealthIndicator.fit(train)
    units = np.arange(1, 101)
    preds, facts = [], {}

    t = time.perf_counter()
    preds.append(rows("linear baseline", units, d["rul"], baseline_table(train, test)))
    facts["linear baseline"] = (time.perf_counter() - t, 100, np.nan)

    deep = cmapss_deep.fit(jax.random.key(args.seed), train, num_epochs=args.epochs)
    print(f"deep reference: best epoch {deep.best_epoch}, validation RMSE "
          f"{deep.history['val_rmse'].min():.2f}, {deep.wall_s:.0f} s")
    p = cmapss_deep.predict(deep, test)
    preds.append(rows("1-D CNN (deep reference)", units, d["rul"], p.rename(columns={"rul": "median"})))
    facts["1-D CNN (deep reference)"] = (deep.wall_s, 100, np.nan)

    if args.arhmm_units > 0:
        K = args.states
        fit, wall = fit_arhmm(train[train["unit"] <= args.arhmm_units], hi, K, args)
        te = cmapss.degradation_data(test, hi, K, run_to_failure=False)
        name = f"AR-HMM K={K} ({args.arhmm_units} engines)"
        preds.append(rows(name, units, d["rul"], cmapss.predict_rul_quantiles(fit, te, K)))
        facts[name] = (wall, args.arhmm_units, rhat_max(fit))
        print(f"{name}: {wall:.0f} s, max R-hat {facts[name][2]:.3f}, flags {list(fit.flags)}")

    data = cdeg.joint_data(cdeg.paths(train, hi, run_to_failure=True),
                           cdeg.paths(test, hi, run_to_failure=False))
    fit, wall = fit_degradation(data, args, seed=args.seed)
    name = "degradation path (NUTS, 100 engines)"
    preds.append(rows(name, units, d["rul"], cdeg.predict_rul(fit, data)))
    facts[name] = (wall, 100, rhat_max(fit))
    print(f"{name}: {wall:.0f} s, max R-hat {facts[name][2]:.3f}, flags {list(fit.flags)}")
    if args.save:
        fit.save(args.save)

    write_and_score(pd.concat(preds, ignore_index=True), facts,
                    os.path.join(args.results, "cmapss_rul_predictions.csv"),
                    os.path.join(args.results, "cmapss_rul.csv"))


def write_and_score(pred: pd.DataFrame, facts: dict, pred_path: str, table_path: str) -> pd.DataFrame:
    """Write the predictions, read them back and compute every metric from the file."""
    os.makedirs(os.path.dirname(pred_path), exist_ok=True)
    pred.to_csv(pred_path, index=False, float_format="%.2f")
    table = cmapss.rul_metrics(pd.read_csv(pred_path))
    table.index.name = "method"
    table["fit_wall_s"] = [round(facts[m][0], 1) for m in table.index]
    table["train_units"] = [facts[m][1] for m in table.index]
    table["max_rhat"] = [facts[m][2] for m in table.index]
    table = table.round({"rmse": 2, "phm08": 1, "width_90": 1, "max_rhat": 3})
    table.to_csv(table_path)
    with pd.option_context("display.width", 200):
        print(table.to_string())
    return table


def validate(args) -> None:
    d = cmapss.load()
    train = d["train"]
    hi = cmapss.HealthIndicator.fit(train)
    p = cdeg.paths(train, hi, run_to_failure=True)
    cut, truth = cdeg.validation_cuts(p, seed=args.seed + 22)
    preds, facts = [], {}
    for life_link in (True, False):
        name = "degradation path (5 folds)" if life_link else "degradation path, no life link (5 folds)"
        wall = 0.0
        for f in range(5):
            fold = {u: n for u, n in cut.items() if u % 5 == f}
            pv = cdeg.truncate(p, fold)
            data = cdeg.joint_data(pv)
            fit, w = fit_degradation(data, args, seed=args.seed + f, life_link=life_link)
            wall += w
            q = cdeg.predict_rul(fit, data)
            u = [int(pv["units"][i]) for i in data["censored_rows"]]
            preds.append(rows(name, u, [truth[x] for x in u], q))
            print(f"{name} fold {f}: {w:.0f} s, max R-hat {rhat_max(fit):.3f}", flush=True)
        facts[name] = (wall, 100, np.nan)
    fold0 = sorted(u for u in cut if u % 5 == 0)
    if args.arhmm_units > 0:
        K = args.states
        others = [u for u in p["units"] if u % 5 != 0][: args.arhmm_units]
        fit, w = fit_arhmm(train[train["unit"].isin(others)], hi, K, args)
        held = train[train["unit"].isin(fold0)]
        held = held[held["cycle"] <= held["unit"].map(cut)]
        te = cmapss.degradation_data(held, hi, K, run_to_failure=False)
        name = f"AR-HMM K={K} ({args.arhmm_units} engines, fold 0 only)"
        preds.append(rows(name, te["units"], [truth[int(x)] for x in te["units"]],
                          cmapss.predict_rul_quantiles(fit, te, K)))
        facts[name] = (w, args.arhmm_units, rhat_max(fit))
        # the degradation model on the same units, for a like-for-like row
        sub = preds[0][preds[0]["unit"].isin(fold0)].copy()
        sub["method"] = "degradation path (fold 0 only)"
        preds.append(sub)
        facts[sub["method"].iloc[0]] = (np.nan, 100, np.nan)
    write_and_score(pd.concat(preds, ignore_index=True), facts,
                    os.path.join(args.results, "cmapss_rul_validation_predictions.csv"),
                    os.path.join(args.results, "cmapss_rul_validation.csv"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--validate", action="store_true", help="5-fold validation on the training engines")
    ap.add_argument("--arhmm-units", type=int, default=20, help="training engines for the AR-HMM (0: skip it)")
    ap.add_argument("--states", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=250, help="AR-HMM NUTS warmup")
    ap.add_argument("--samples", type=int, default=250, help="AR-HMM NUTS draws")
    ap.add_argument("--deg-warmup", type=int, default=300, help="degradation model NUTS warmup")
    ap.add_argument("--deg-samples", type=int, default=300, help="degradation model NUTS draws")
    ap.add_argument("--deg-max-tree-depth", type=int, default=10, help="degradation model NUTS")
    ap.add_argument("--chains", type=int, default=2)
    ap.add_argument("--max-tree-depth", type=int, default=8, help="AR-HMM")
    ap.add_argument("--epochs", type=int, default=150, help="deep reference: most epochs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--save", default=None, help="also save the degradation model's Fit (netCDF)")
    ap.add_argument("--results", default=RESULTS)
    args = ap.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        (validate if args.validate else benchmark)(args)


if __name__ == "__main__":
    main()
