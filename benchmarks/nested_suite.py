"""Nested samplers on the exactness suite: dynesty (plain and batched), nss, and nautilus.

Run:  python benchmarks/nested_suite.py [--problems a,b] [--methods nss,nautilus] [--repeats 1]
          [--out benchmarks/results/nested_suite.csv]
      python benchmarks/nested_suite.py --batching [--out benchmarks/results/nested_batching.csv]

Per problem and method, in one run on one machine: true likelihood calls, wall time (compilation
included; ``compile_s`` says how much), logZ, the method's own logZ error, and |logZ - truth|
(the truth from bayeslik.models.nested_suite, by quadrature).

Methods (settings fixed per problem, see SETTINGS):
* ``dynesty``: bl.fit(post, "nested") with the plain path (one likelihood call per point);
* ``dynesty_batched``: the same with batch=True (16 threads feeding one vmapped call);
* ``nss``: bl.fit(post, "nss") (blackjax nested slice sampling; calls counted from the slice
  sampler's bracket, step-out and shrink evaluations);
* ``nautilus``: nautilus-sampler (the peer: importance nested sampling with neural-network
  bounds) with its defaults (n_live=2000, n_eff=10000, discard_exploration=True), given the same
  compiled, vmapped unit-cube likelihood as dynesty (``vectorized=True``). nautilus reports no
  logZ error; its column is left empty.

``--batching`` instead measures where batching pays: the same dynesty run (rwalk, 200 live
points, 3 parameters, seed 0) plain and batched (wall time less compile time) on a likelihood whose cost is set by the size of a
numerical distance integral (a cosmology-like model: each call integrates 1/E(z) on a grid of
``grid`` points for 200 supernovae), for grids from cheap to expensive.

A benchmark, not a test: it writes a table and never fails.
"""

from __future__ import annotations

import argparse
import csv
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

import bayeslik as bl
from bayeslik.engines import nested
from bayeslik.models import nested_suite

SETTINGS = {
    # problem: (dynesty options, nss options)
    "gaussian_shells_2d": (dict(num_live=500), dict(num_live=500)),
    "gaussian_shells_5d": (dict(num_live=500), dict(num_live=1000, num_inner_steps=40)),
    "eggbox": (dict(num_live=500), dict(num_live=1000)),
    "loggamma_2d": (dict(num_live=500), dict(num_live=500)),
    "loggamma_10d": (dict(num_live=300), dict(num_live=1000)),
    "correlated_gaussian_3d": (dict(num_live=500), dict(num_live=500)),
}

FIELDS = ["problem", "method", "seed", "num_loglik_evals", "wall_s", "compile_s", "logz",
          "logzerr", "logz_true", "abs_err", "within_4_err_or_0.2", "notes", "backend"]


def _row(problem, method, seed, calls, wall, compile_s, logz, logzerr, truth, notes=""):
    err = abs(logz - truth)
    ok = err < max(4 * logzerr, 0.2) if logzerr is not None else err < 0.2
    return {"problem": problem, "method": method, "seed": seed, "num_loglik_evals": int(calls),
            "wall_s": round(wall, 3), "compile_s": round(compile_s, 3), "logz": round(logz, 4),
            "logzerr": None if logzerr is None else round(logzerr, 4),
            "logz_true": round(truth, 4), "abs_err": round(err, 4),
            "within_4_err_or_0.2": bool(ok), "notes": notes, "backend": jax.default_backend()}


def run_nautilus(post, seed, timeout, n_live=2000, n_eff=10000):
    """nautilus on the compiled, vmapped unit-cube likelihood; its defaults are n_live=2000,
    n_eff=10000. Returns (true calls, wall s, compile s, logZ, note)."""
    import nautilus

    fn = nested.true_batch_fn(post)
    fn(np.full((1, post.ndim), 0.5))  # compile the first bucket outside the clock
    fn.num_calls = 0
    t0 = time.perf_counter()
    sampler = nautilus.Sampler(lambda u: u, fn, n_dim=post.ndim, n_live=n_live, vectorized=True,
                               seed=seed)
    sampler.run(discard_exploration=True, verbose=False, timeout=timeout, n_eff=n_eff)
    wall = time.perf_counter() - t0
    note = f"stopped by the {timeout:.0f} s timeout" if wall >= timeout else ""
    return fn.num_calls, wall, fn.compile_s, float(sampler.log_z), note


def suite(problems, repeats, out, nautilus_timeout=float("inf"),
          methods=("dynesty", "dynesty_batched", "nss", "nautilus")):
    rows = []

    def emit(row):  # the table is rewritten after every run: a long run can be cut short
        rows.append(row)
        print(row, flush=True)
        _write(out, rows, FIELDS)

    for name in problems:
        prob = nested_suite.get(name)
        post = prob.posterior()
        dyn, nss_opts = SETTINGS[name]
        for rep in range(repeats):
            for method, engine, opts in (
                ("dynesty", "nested", dict(dyn, batch=False)),
                ("dynesty_batched", "nested", dict(dyn, batch=True)),
                ("nss", "nss", dict(nss_opts)),
            ):
                if method not in methods:
                    continue
                fit = bl.fit(post, engine, seed=rep, progress_bar=False, **opts)
                emit(_row(name, method, rep, fit.cost.num_loglik_evals, fit.cost.wall_s,
                          fit.cost.compile_s, fit.log_evidence, fit.log_evidence_err,
                          prob.log_evidence, "; ".join(fit.flags)))
            if "nautilus" not in methods:
                continue
            try:
                calls, wall, comp, logz, note = run_nautilus(post, rep, nautilus_timeout)
                emit(_row(name, "nautilus", rep, calls, wall, comp, logz, None,
                          prob.log_evidence, note))
            except ImportError:
                emit(_row(name, "nautilus", rep, 0, 0, 0, float("nan"), None,
                          prob.log_evidence, "nautilus-sampler not installed"))


# ----------------------------------------------------------------------------- batching
def distance_model(z, mu, grid: int = 1000):
    """Flat LCDM-like supernova fit: each call integrates 1/E(z) on a grid (the cost knob)."""
    h0 = numpyro.sample("h0", dist.Uniform(50.0, 90.0))
    om = numpyro.sample("om", dist.Uniform(0.05, 0.6))
    m = numpyro.sample("m", dist.Uniform(-1.0, 1.0))
    zg = jnp.linspace(0.0, 2.0, grid)
    inv_e = 1.0 / jnp.sqrt(om * (1 + zg) ** 3 + 1 - om)
    cum = jnp.concatenate([jnp.zeros(1), jnp.cumsum(0.5 * (inv_e[1:] + inv_e[:-1]) * jnp.diff(zg))])
    dc = 299792.458 / h0 * jnp.interp(z, zg, cum)
    mu_model = 5 * jnp.log10((1 + z) * dc) + 25 + m
    with numpyro.plate("sn", z.shape[0]):
        numpyro.sample("mu", dist.Normal(mu_model, 0.15), obs=mu)


def batching(out, grids=(100, 10000), num_live=200):
    rng = np.random.default_rng(0)
    z = np.sort(rng.uniform(0.02, 1.9, 200)).astype(np.float32)
    rows = []
    for grid in grids:
        # data from the model itself at h0=70, om=0.3, m=0
        zg = np.linspace(0, 2, 20000)
        inv_e = 1 / np.sqrt(0.3 * (1 + zg) ** 3 + 0.7)
        cum = np.concatenate([[0], np.cumsum(0.5 * (inv_e[1:] + inv_e[:-1]) * np.diff(zg))])
        mu = 5 * np.log10((1 + z) * 299792.458 / 70 * np.interp(z, zg, cum)) + 25
        mu = (mu + rng.normal(0, 0.15, z.size)).astype(np.float32)
        post = bl.Posterior(distance_model, z=z, mu=mu, grid=grid)
        fn = nested.true_batch_fn(post)
        u = np.random.default_rng(1).random((64, 3))
        per_call = {}
        for n in (1, 16):
            fn(u[:n])
            t0 = time.perf_counter()
            for _ in range(20):
                fn(u[:n])
            per_call[n] = (time.perf_counter() - t0) / 20
        res = {}
        for label, batch in (("plain", False), ("batched", True)):
            res[label] = bl.fit(post, "nested", seed=0, num_live=num_live, sample="rwalk",
                                batch=batch, progress_bar=False)
        p, b = res["plain"], res["batched"]
        # run time without compilation (the buckets compile on first use)
        p_run, b_run = p.cost.wall_s - p.cost.compile_s, b.cost.wall_s - b.cost.compile_s
        rows.append({
            "grid": grid, "call_1_point_ms": round(1e3 * per_call[1], 3),
            "call_16_points_ms": round(1e3 * per_call[16], 3),
            "plain_run_s": round(p_run, 2), "batched_run_s": round(b_run, 2),
            "speedup": round(p_run / b_run, 2),
            "plain_calls": p.cost.num_loglik_evals, "batched_calls": b.cost.num_loglik_evals,
            "mean_batch_size": round(b.cost.extra["mean_batch_size"], 2),
            "plain_logz": round(p.log_evidence, 3), "batched_logz": round(b.log_evidence, 3),
            "logzerr": round(p.log_evidence_err, 3),
        })
        print(rows[-1], flush=True)
    _write(out, rows, list(rows[0]))


def _write(out, rows, fields):
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", default="gaussian_shells_2d,correlated_gaussian_3d,loggamma_2d,"
                    "eggbox,gaussian_shells_5d,loggamma_10d")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--batching", action="store_true")
    ap.add_argument("--nautilus-timeout", type=float, default=float("inf"),
                    help="seconds; a nautilus run stopped by it is noted in the table")
    ap.add_argument("--methods", default="dynesty,dynesty_batched,nss,nautilus",
                    help="comma-separated subset of the methods")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    if args.batching:
        batching(args.out or os.path.join(here, "results", "nested_batching.csv"))
    else:
        suite(args.problems.split(","), args.repeats,
              args.out or os.path.join(here, "results", "nested_suite.csv"),
              args.nautilus_timeout, tuple(args.methods.split(",")))


if __name__ == "__main__":
    main()
