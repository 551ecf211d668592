"""Clustering heterogeneous Gaussian clusters: the Bayesian mixture vs k-means and EM.

Simulated data (``bayeslik.models.mixture.simulate``): K = 3 clusters with unequal, rotated,
anisotropic covariances (per-axis scale ratio up to 3, overall sizes 0.5-1.5), the closest pair
of means ``separation`` average standard deviations apart, in D dimensions. In one run, on the
same data sets:

* ``bayes``: ``models/mixture.py`` (full covariances, or ``diag`` where stated) fitted by NUTS
  from the EM start (``mixture.init_params``), relabelled (pivot), hard clustering = argmax of
  the posterior-mean membership probabilities (``mixture.membership``);
* ``kmeans``: ``sklearn.cluster.KMeans(n_clusters=K, n_init=10)``;
* ``em``: ``sklearn.mixture.GaussianMixture(K, covariance_type="full", n_init=5)``.

Error: the mis-clustering rate, minimised over the K! matchings of labels (Hungarian on the
confusion matrix). Also the wall time of each method (NUTS includes compiling).

Sizes: N = 100 points per cluster for D <= 10 and 200 per cluster for D = 50, 2 chains x
(300 warmup + 300 draws), tree depth at most 8; at D = 50 a full covariance per cluster has 1275
free parameters (3.9k in the model), so the Bayesian model there is the ``diag`` one
(``--full50`` runs full: one such fit was stopped unfinished after 11 minutes, before the
likelihood speed-up). Measured: the whole run took 410 s on the shared 2-core machine under a
load average of 10-16 (compiling once per D included). ``--quick`` (D = 2 and 10, one data
set, 150 + 150 draws) is shorter still.

Run:  /work/venv/bin/python benchmarks/mixture_clustering.py [--reps 2] [--quick]
Writes benchmarks/results/mixture_clustering.csv and prints the table.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
import warnings

import jax
import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

import bayeslik as bl
from bayeslik.models import mixture

K = 3
OUT = os.path.join(os.path.dirname(__file__), "results", "mixture_clustering.csv")


def misclustering(labels, truth, k=K) -> float:
    """Mis-clustering rate minimised over label matchings (Hungarian on the confusion matrix)."""
    conf = np.zeros((k, k))
    np.add.at(conf, (np.asarray(labels), np.asarray(truth)), 1)
    rows, cols = linear_sum_assignment(-conf)
    return 1.0 - conf[rows, cols].sum() / len(truth)


def run_bayes(y, covariance, seed, num_warmup, num_samples):
    t0 = time.perf_counter()
    post = bl.Posterior(mixture.model, y=y, num_components=K, covariance=covariance)
    init = mixture.init_params(y, K, covariance, seed=seed)
    fit = bl.fit(post, "nuts", seed=seed, num_warmup=num_warmup, num_samples=num_samples,
                 num_chains=2, init=init, max_tree_depth=8, progress_bar=False)
    member = mixture.membership(fit, num_draws=200)
    div = int(fit.idata["sample_stats"]["diverging"].sum())
    depth = float(fit.idata["sample_stats"]["tree_depth"].mean())
    return member["labels"], time.perf_counter() - t0, div, depth


def run_kmeans(y, seed):
    from sklearn.cluster import KMeans

    t0 = time.perf_counter()
    labels = KMeans(n_clusters=K, n_init=10, random_state=seed).fit_predict(y)
    return labels, time.perf_counter() - t0


def run_em(y, seed):
    from sklearn.mixture import GaussianMixture

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = GaussianMixture(K, covariance_type="full", n_init=5, random_state=seed).fit(y)
    return gm.predict(y), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=2, help="data sets per (D, separation) cell")
    ap.add_argument("--quick", action="store_true", help="D in (2, 10), one rep, short chains")
    ap.add_argument("--full50", action="store_true", help="full covariances at D = 50 too")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    dims = (2, 10) if args.quick else (2, 5, 10, 50)
    seps = (3.0, 5.0)
    reps = 1 if args.quick else args.reps
    warm, draws = (150, 150) if args.quick else (300, 300)
    rows = []
    t_start = time.perf_counter()
    for D, sep, rep in itertools.product(dims, seps, range(reps)):
        seed = 1000 * D + 10 * int(sep * 10) + rep
        n_per = 200 if D >= 50 else 100
        data = mixture.simulate(jax.random.key(seed), K * n_per, num_components=K, dim=D,
                                separation=sep, weights=np.ones(K))
        y, truth = data["y"], data["labels"]
        cov = "full" if (D < 50 or args.full50) else "diag"
        lab, wall, div, depth = run_bayes(y, cov, seed, warm, draws)
        rows.append(dict(D=D, separation=sep, rep=rep, N=len(y), method=f"bayes-nuts ({cov})",
                         error=misclustering(lab, truth), wall_s=wall, divergences=div,
                         tree_depth=depth))
        lab, wall = run_kmeans(y, seed)
        rows.append(dict(D=D, separation=sep, rep=rep, N=len(y), method="kmeans (n_init=10)",
                         error=misclustering(lab, truth), wall_s=wall, divergences=0))
        lab, wall = run_em(y, seed)
        rows.append(dict(D=D, separation=sep, rep=rep, N=len(y), method="em-full (n_init=5)",
                         error=misclustering(lab, truth), wall_s=wall, divergences=0))
        print(pd.DataFrame(rows[-3:]).to_string(index=False, header=len(rows) == 3), flush=True)
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        pd.DataFrame(rows).to_csv(args.out, index=False)  # after every cell: a partial run keeps
    df = pd.DataFrame(rows)
    table = (df.groupby(["D", "separation", "method"])
               .agg(error=("error", "mean"), error_max=("error", "max"), wall_s=("wall_s", "mean"))
               .reset_index())
    print("\nmean mis-clustering error over", reps, "data set(s) per cell")
    print(table.pivot_table(index=["D", "separation"], columns="method", values="error")
          .round(3).to_string())
    print("\nmean wall time [s]")
    print(table.pivot_table(index=["D"], columns="method", values="wall_s").round(2).to_string())
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
