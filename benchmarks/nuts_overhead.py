"""bayeslik's NUTS against numpyro's own MCMC/NUTS: same models, same settings, one run.

Run:  python benchmarks/nuts_overhead.py [--repeats 3] [--out benchmarks/results/nuts_overhead.csv]

Settings on both sides: 4 chains, 1000 warmup + 1000 kept iterations, target acceptance 0.8,
maximum tree depth 10, diagonal mass matrix, no progress bar. Two chain layouts are compared:
"vectorized" (both vmap the chains) and "sequential" (one chain after the other; numpyro's
default on a single device).

Per model and layout:
* ``*_cold_s``: the first run, compilation included;
* ``*_warm_s``: median over repeats of later runs (bayeslik caches compiled functions per
  Posterior; numpyro's MCMC object is re-run), end to end: sampling plus the ArviZ DataTree with
  the pointwise log-likelihood (``arviz_base.from_numpyro(..., log_likelihood=True)``), which
  bayeslik.fit always builds;
* ``*_exec_s``: the warm wall time less the time JAX spent tracing, lowering and compiling
  during the run (JAX's own compile events, the same listener for both sides). numpyro's MCMC
  re-traces and recompiles on every ``run`` even with ``jit_model_args=True``, so its warm wall
  time includes a compile; ``ratio_exec`` compares execution alone and is the overhead figure;
* ``*_ess_per_s``: minimum bulk ESS over parameters per warm second;
* ``ratio_*`` = bayeslik / numpyro (below 1: bayeslik is faster).

Wall-clock ratios mix two things: the wrapper's overhead and the sampler (blackjax's NUTS and
Stan's warmup as bayeslik drives them vs numpyro's own). ``*_grads`` (leapfrog steps of the kept
iterations) shows whether both did the same work. This is a benchmark, not a test: it writes a
table and never fails.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

import bayeslik as bl
from bayeslik.models import posteriordb


def logistic(X, y=None):
    D = X.shape[1]
    alpha = numpyro.sample("alpha", dist.Normal(0, 2.5))
    beta = numpyro.sample("beta", dist.Normal(jnp.zeros(D), 1.0).to_event(1))
    with numpyro.plate("obs", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=alpha + X @ beta), obs=y)


def problems() -> dict:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(2000, 10)).astype(np.float32)
    beta = rng.normal(size=10)
    y = (rng.uniform(size=2000) < 1 / (1 + np.exp(-(0.3 + X @ beta)))).astype(np.int32)
    out = {"logistic_N2000_D10": (logistic, {"X": X, "y": y})}
    for name in ("eight_schools-eight_schools_noncentered", "arK-arK", "garch-garch11"):
        p = posteriordb.load(name)
        out[name.split("-", 1)[1]] = (p["model"], p["data"])
    return out


def min_ess_bulk(idata) -> float:
    import arviz_stats as azs

    ess = azs.ess(idata, group="posterior", method="bulk")
    return float(min(float(v.min()) for v in ess.data_vars.values()))


_COMPILE_S = [0.0]


def _on_event(name: str, duration: float, **kwargs) -> None:
    if name.startswith("/jax/core/compile/"):
        _COMPILE_S[0] += duration


def compile_seconds(fn, *args, **kwargs):
    """(fn's result, seconds JAX spent tracing/lowering/compiling while fn ran)."""
    before = _COMPILE_S[0]
    out = fn(*args, **kwargs)
    return out, _COMPILE_S[0] - before


def numpyro_run(model, data, settings, layout, seed, mcmc=None):
    import arviz_base as azb
    from numpyro.infer import MCMC, NUTS

    if mcmc is None:
        mcmc = MCMC(
            NUTS(model, target_accept_prob=settings["target_accept"]),
            num_warmup=settings["num_warmup"], num_samples=settings["num_samples"],
            num_chains=settings["num_chains"], chain_method=layout, progress_bar=False,
        )
    t = time.perf_counter()
    mcmc.run(jax.random.key(seed), extra_fields=("num_steps",), **data)
    idata = azb.from_numpyro(mcmc, log_likelihood=True)
    wall = time.perf_counter() - t
    grads = int(np.sum(mcmc.get_extra_fields()["num_steps"]))
    return mcmc, wall, grads, idata


def bayeslik_run(post, settings, layout, seed):
    t = time.perf_counter()
    fit = bl.fit(post, "nuts", seed=seed, progress_bar=False, chain_method=layout, **settings)
    wall = time.perf_counter() - t
    return wall, int(fit.idata["sample_stats"]["n_steps"].sum()), fit.idata


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-warmup", type=int, default=1000)
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--num-chains", type=int, default=4)
    ap.add_argument("--layouts", default="vectorized,sequential")
    ap.add_argument("--models", default=None, help="comma-separated subset of the models")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "nuts_overhead.csv"))
    args = ap.parse_args()
    import pandas as pd

    jax.monitoring.register_event_duration_secs_listener(_on_event)
    settings = dict(num_warmup=args.num_warmup, num_samples=args.num_samples,
                    num_chains=args.num_chains, target_accept=0.8)
    rows = []
    for name, (model, data) in problems().items():
        if args.models and name not in args.models.split(","):
            continue
        for layout in args.layouts.split(","):
            post = bl.Posterior(model, **data)
            mcmc, np_cold, _, _ = numpyro_run(model, data, settings, layout, 0)
            bl_cold, _, _ = bayeslik_run(post, settings, layout, 0)
            res = {k: [] for k in ("np_w", "np_x", "np_g", "np_e", "bl_w", "bl_x", "bl_g", "bl_e")}
            for r in range(1, args.repeats + 1):  # interleaved, so drifts hit both sides alike
                (_, w, g, idata), c = compile_seconds(numpyro_run, model, data, settings, layout, r, mcmc)
                res["np_w"].append(w); res["np_x"].append(w - c); res["np_g"].append(g)
                res["np_e"].append(min_ess_bulk(idata) / w)
                (w, g, idata), c = compile_seconds(bayeslik_run, post, settings, layout, r)
                res["bl_w"].append(w); res["bl_x"].append(w - c); res["bl_g"].append(g)
                res["bl_e"].append(min_ess_bulk(idata) / w)
            med = {k: statistics.median(v) for k, v in res.items()}
            row = {
                "model": name, "layout": layout,
                "numpyro_cold_s": round(np_cold, 3), "bayeslik_cold_s": round(bl_cold, 3),
                "numpyro_warm_s": round(med["np_w"], 3), "bayeslik_warm_s": round(med["bl_w"], 3),
                "numpyro_exec_s": round(med["np_x"], 3), "bayeslik_exec_s": round(med["bl_x"], 3),
                "numpyro_grads": int(med["np_g"]), "bayeslik_grads": int(med["bl_g"]),
                "numpyro_ess_per_s": round(med["np_e"], 1), "bayeslik_ess_per_s": round(med["bl_e"], 1),
                "ratio_cold": round(bl_cold / np_cold, 3),
                "ratio_warm": round(med["bl_w"] / med["np_w"], 3),
                "ratio_exec": round(med["bl_x"] / med["np_x"], 3),
                "ratio_ess_per_s": round(med["bl_e"] / med["np_e"], 3),
            }
            rows.append(row)
            print(", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    table = pd.DataFrame(rows)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    table.to_csv(args.out, index=False)
    print(table.to_string(index=False))
    print(f"device: {jax.devices()[0].device_kind} x{len(jax.devices())}; written {args.out}")


if __name__ == "__main__":
    main()
