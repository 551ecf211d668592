"""Few-shot regression benchmark of the hierarchical Bayesian meta-learner (models/meta.py).

Two task families (sinusoids ``A sin(x + phase)``, ``A ~ U(0.1, 5)``, ``phase ~ U(0, pi)``;
lines ``a x + b``, ``a ~ U(-2, 2)``, ``b ~ U(-3, 3)``), ``x ~ U(-5, 5)``, noise sd 0.3 (noise
floor of the query MSE: 0.09). Meta-training: ``--num-train`` tasks of ``--train-points`` points.
Meta-test: ``--num-test`` new tasks, each with k = 2, 5, 10 support points and 50 query points.
Features ``[1, x, sin x, cos x]`` for every method. In one run, for each family and k:

(a) ``hierarchical``: NUTS on the training tasks (task weights integrated out), then the
    closed-form predictive per posterior draw, mixed over the draws;
(b) ``streaming``: one pass of the streaming NIW update over the training tasks, then the same
    predictive with draws from the streaming posterior;
(c) ``ridge``: per-task Bayesian ridge, prior ``w ~ N(0, tau^2 I)``, noise ``s``; ``(tau, s)``
    set by type-II maximum likelihood on the training tasks (the best isotropic zero-mean prior);
(d) ``pooled``: one least-squares ``w`` for all training tasks, the residual sd as noise; it
    ignores the support points.

Query MSE (with its standard error over test tasks), coverage of the central 90% predictive
intervals and their mean width. Also the global parameters of (a) vs (b) and the streaming
throughput on a long stream. Writes benchmarks/results/meta_fewshot.csv and
benchmarks/results/meta_fewshot_globals.csv and prints markdown tables.

    /work/venv/bin/python benchmarks/meta_fewshot.py   # 12.8 min wall on 2 shared cores, 3 min CPU
"""

from __future__ import annotations

import argparse
import math
import os
import time

import jax
import numpy as np
import pandas as pd

import bayeslik as bl
from bayeslik.models import meta

HERE = os.path.dirname(os.path.abspath(__file__))
SHOTS = (2, 5, 10)
NUM_QUERY = 50
NOISE = 0.3


def metrics(mean, lower, upper, qy):
    err = ((mean - qy) ** 2).mean(1)  # per task
    return {"mse": err.mean(), "mse_se": err.std(ddof=1) / math.sqrt(len(err)),
            "coverage90": float(np.mean((qy >= lower) & (qy <= upper))),
            "width90": float(np.mean(upper - lower))}


def run_family(kind, args, key):
    k_train, k_test, k_nuts, k_stream = jax.random.split(key, 4)
    tr = meta.simulate(k_train, num_tasks=args.num_train, num_points=args.train_points, kind=kind,
                       noise=NOISE)
    te = meta.simulate_tasks(k_test, args.num_test, kind, num_points=max(SHOTS) + NUM_QUERY,
                             noise=NOISE)
    phi, y, mask = tr["phi"], tr["y"], tr["mask"]
    fmap = meta.FeatureMap("fourier")
    p = phi.shape[-1]
    out, glob = [], []

    t = time.perf_counter()
    post = bl.Posterior(meta.model, phi=phi, y=y, mask=mask)
    fit = bl.fit(post, "nuts", seed=int(jax.random.randint(k_nuts, (), 0, 2**30)),
                 num_warmup=args.num_warmup, num_samples=args.num_samples, num_chains=args.num_chains,
                 progress_bar=False)
    t_nuts = time.perf_counter() - t
    t = time.perf_counter()
    state = meta.stream_fit(meta.stream_init(p), phi, y, mask)
    jax.block_until_ready(state)
    t_stream = time.perf_counter() - t  # includes compiling the scan on the first family
    sdraws = meta.stream_draws(k_stream, state, args.num_samples * args.num_chains)
    ridge = meta.ridge_params(phi, y, mask)
    tau, s = math.sqrt(ridge["Sigma0"][0, 0]), ridge["sigma"]
    pooled = meta.pooled_params(phi, y, mask)

    mu_n = fit.draws("mu0").reshape(-1, p)
    S_n = fit.draws("Sigma0").reshape(-1, p, p)
    sig_n = fit.draws("sigma").reshape(-1)
    names = ["1", "x", "sin", "cos"]
    for j in range(p):
        glob.append({"kind": kind, "param": f"mu0[{names[j]}]", "nuts_mean": mu_n[:, j].mean(),
                     "nuts_sd": mu_n[:, j].std(), "stream_mean": float(state.m[j]),
                     "stream_sd": float(state.mu0_sd[j])})
    for j in range(p):
        glob.append({"kind": kind, "param": f"Sigma0[{names[j]},{names[j]}]",
                     "nuts_mean": S_n[:, j, j].mean(), "nuts_sd": S_n[:, j, j].std(),
                     "stream_mean": float(sdraws["Sigma0"][:, j, j].mean()),
                     "stream_sd": float(sdraws["Sigma0"][:, j, j].std())})
    glob.append({"kind": kind, "param": "sigma", "nuts_mean": sig_n.mean(), "nuts_sd": sig_n.std(),
                 "stream_mean": float(sdraws["sigma"].mean()), "stream_sd": float(sdraws["sigma"].std())})
    glob.append({"kind": kind, "param": "fit_seconds", "nuts_mean": t_nuts, "nuts_sd": np.nan,
                 "stream_mean": t_stream, "stream_sd": np.nan})

    qx, qy = te["x"][:, max(SHOTS):], te["y"][:, max(SHOTS):]
    for k in SHOTS:
        sx, sy = te["x"][:, :k], te["y"][:, :k]
        row = {"kind": kind, "shots": k}
        preds = {
            "hierarchical": meta.predict(fit, sx, sy, qx, features=fmap, max_draws=1000),
            "streaming": meta.predict(sdraws, sx, sy, qx, features=fmap, max_draws=1000),
            "ridge": meta.predict(ridge, sx, sy, qx, features=fmap),
            "pooled": meta.predict(pooled, sx, sy, qx, features=fmap),
        }
        for name, pr in preds.items():
            out.append({**row, "method": name, **metrics(pr.mean, pr.lower, pr.upper, qy)})
        for r in out[-4:]:
            print(f"  {kind:8s} k={k:2d} {r['method']:12s} mse={r['mse']:.3f}±{r['mse_se']:.3f} "
                  f"cov90={r['coverage90']:.3f}", flush=True)
    print(f"  {kind}: NUTS {t_nuts:.1f}s (flags {fit.flags}), streaming {t_stream:.2f}s, "
          f"ridge tau={tau:.3f} s={s:.3f}", flush=True)
    return out, glob


def stream_throughput(num_tasks, chunk, key):
    """Tasks per second of the streaming update over a long stream, in chunks (constant memory)."""
    s = meta.stream_init(4)
    nbytes0 = sum(np.asarray(a).nbytes for a in s)
    t = time.perf_counter()
    for i in range(num_tasks // chunk):
        d = meta.simulate(jax.random.fold_in(key, i), num_tasks=chunk, num_points=10)
        s = meta.stream_fit(s, d["phi"], d["y"], d["mask"])
    jax.block_until_ready(s)
    dt = time.perf_counter() - t
    assert sum(np.asarray(a).nbytes for a in s) == nbytes0
    return int(s.num_tasks), dt, nbytes0, s


def markdown(df: pd.DataFrame, index: bool = True) -> str:
    """A markdown table (no tabulate dependency)."""
    d = df.reset_index() if index else df
    cols = [str(c) for c in d.columns]
    fmt = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in d.values.tolist()]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in fmt])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-train", type=int, default=100)
    ap.add_argument("--train-points", type=int, default=10)
    ap.add_argument("--num-test", type=int, default=500)
    ap.add_argument("--num-warmup", type=int, default=500)
    ap.add_argument("--num-samples", type=int, default=500)
    ap.add_argument("--num-chains", type=int, default=4)
    ap.add_argument("--stream-tasks", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "meta_fewshot.csv"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows, globs = [], []
    for i, kind in enumerate(("sinusoid", "line")):
        print(f"{kind}: {args.num_train} training tasks x {args.train_points} points, "
              f"{args.num_test} test tasks", flush=True)
        r, g = run_family(kind, args, jax.random.fold_in(jax.random.key(args.seed), i))
        rows += r
        globs += g
    n, dt, nb, _ = stream_throughput(args.stream_tasks, 1000, jax.random.key(args.seed + 99))
    df = pd.DataFrame(rows)
    gl = pd.DataFrame(globs)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    df.to_csv(args.out, index=False)
    gl.to_csv(args.out.replace(".csv", "_globals.csv"), index=False)
    table = df.pivot_table(index=["kind", "shots"], columns="method", values="mse")
    cov = df.pivot_table(index=["kind", "shots"], columns="method", values="coverage90")
    order = ["hierarchical", "streaming", "ridge", "pooled"]
    print("\nquery MSE (noise floor 0.09)\n")
    print(markdown(table[order]))
    print("\ncoverage of the 90% predictive intervals\n")
    print(markdown(cov[order]))
    print("\nglobal parameters, NUTS vs streaming\n")
    print(markdown(gl, index=False))
    print(f"\nstreaming: {n} tasks in {dt:.2f} s ({n / dt:.0f} tasks/s), state {nb} bytes throughout")
    print(f"total {time.perf_counter() - t0:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
