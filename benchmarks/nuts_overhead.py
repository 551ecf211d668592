"""bayeslik's NUTS against numpyro's own MCMC/NUTS: same models, same settings, one run.

Run:  python benchmarks/nuts_overhead.py [--repeats 3] [--out benchmarks/results/nuts_overhead.csv]

For each model both are run cold (compilation included) and warm (the second run, compiled
functions reused: bayeslik caches per Posterior, numpyro's MCMC object is re-run). Reported per
side: wall seconds (median over repeats), gradient evaluations (leapfrog steps), wall per 1000
gradient evaluations, and minimum bulk ESS per second. The ratios are bayeslik / numpyro;
"end_to_end" also counts building the ArviZ DataTree with the pointwise log-likelihood
(``arviz_base.from_numpyro`` on the numpyro side), which bayeslik.fit always does.

This is a benchmark, not a test: it writes a table and never fails.
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
from numpyro.infer import MCMC, NUTS

import bayeslik as bl
from bayeslik.models import posteriordb


def logistic(X, y=None):
    D = X.shape[1]
    alpha = numpyro.sample("alpha", dist.Normal(0, 2.5))
    beta = numpyro.sample("beta", dist.Normal(jnp.zeros(D), 1.0).to_event(1))
    with numpyro.plate("obs", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=alpha + X @ beta), obs=y)


def problems():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(2000, 10)).astype(np.float32)
    beta = rng.normal(size=10)
    y = (rng.uniform(size=2000) < 1 / (1 + np.exp(-(0.3 + X @ beta)))).astype(np.int32)
    out = {"logistic_N2000_D10": (logistic, {"X": X, "y": y})}
    for name in ("eight_schools-eight_schools_noncentered", "garch-garch11"):
        p = posteriordb.load(name)
        out[name.split("-")[1]] = (p["model"], p["data"])
    return out


def min_ess_bulk(idata) -> float:
    import arviz_stats as azs

    ess = azs.ess(idata, group="posterior", method="bulk")
    return float(min(float(v.min()) for v in ess.data_vars.values()))


def run_numpyro(model, data, settings, seed, mcmc=None):
    if mcmc is None:
        mcmc = MCMC(
            NUTS(model, target_accept_prob=settings["target_accept"]),
            num_warmup=settings["num_warmup"], num_samples=settings["num_samples"],
            num_chains=settings["num_chains"], chain_method="vectorized", progress_bar=False,
        )
    t = time.perf_counter()
    mcmc.run(jax.random.key(seed), **data, extra_fields=("num_steps",))
    jax.block_until_ready(mcmc.get_samples())
    sampling = time.perf_counter() - t
    import arviz_base as azb

    idata = azb.from_numpyro(mcmc)
    total = time.perf_counter() - t
    grads = int(np.sum(mcmc.get_extra_fields()["num_steps"]))
    return mcmc, sampling, total, grads, idata


def run_bayeslik(post, settings, seed):
    t = time.perf_counter()
    fit = bl.fit(post, "nuts", seed=seed, progress_bar=False, **settings)
    total = time.perf_counter() - t
    samp_grads = int(fit.idata["sample_stats"]["n_steps"].sum())
    return fit, total, samp_grads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-warmup", type=int, default=1000)
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--num-chains", type=int, default=4)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "nuts_overhead.csv"))
    args = ap.parse_args()
    settings = dict(num_warmup=args.num_warmup, num_samples=args.num_samples,
                    num_chains=args.num_chains, target_accept=0.8)
    import pandas as pd

    rows = []
    for name, (model, data) in problems().items():
        post = bl.Posterior(model, **data)
        # cold runs (compilation included)
        t = time.perf_counter()
        mcmc, _, _, _, _ = run_numpyro(model, data, settings, 0)
        np_cold = time.perf_counter() - t
        t = time.perf_counter()
        run_bayeslik(post, settings, 0)
        bl_cold = time.perf_counter() - t
        np_s, np_tot, np_g, np_ess, bl_tot, bl_g, bl_ess, bl_samp = [], [], [], [], [], [], [], []
        for r in range(1, args.repeats + 1):
            _, s, tot, g, idata = run_numpyro(model, data, settings, r, mcmc)
            np_s.append(s); np_tot.append(tot); np_g.append(g); np_ess.append(min_ess_bulk(idata))
            fit, tot_b, g_b = run_bayeslik(post, settings, r)
            bl_tot.append(tot_b); bl_g.append(g_b); bl_ess.append(min_ess_bulk(fit.idata))
            bl_samp.append(fit.cost.num_grad_evals)
        med = statistics.median
        row = {
            "model": name,
            "numpyro_cold_s": np_cold, "bayeslik_cold_s": bl_cold,
            "numpyro_sampling_s": med(np_s), "numpyro_end_to_end_s": med(np_tot),
            "bayeslik_end_to_end_s": med(bl_tot),
            "numpyro_grads_sampling": med(np_g), "bayeslik_grads_sampling": med(bl_g),
            "numpyro_ms_per_1k_grads": 1e3 * med(np_tot) / (med(np_g) * 2) if False else None,
            "bayeslik_grads_total": med(bl_samp),
            "numpyro_ess_per_s": med(e / t for e, t in zip(np_ess, np_tot)),
            "bayeslik_ess_per_s": med(e / t for e, t in zip(bl_ess, bl_tot)),
        }
        row["ratio_end_to_end"] = row["bayeslik_end_to_end_s"] / row["numpyro_end_to_end_s"]
        row["ratio_vs_numpyro_sampling_only"] = row["bayeslik_end_to_end_s"] / row["numpyro_sampling_s"]
        row["ratio_cold"] = bl_cold / np_cold
        row["ratio_ess_per_s"] = row["bayeslik_ess_per_s"] / row["numpyro_ess_per_s"]
        del row["numpyro_ms_per_1k_grads"]
        rows.append(row)
        print(pd.DataFrame([row]).T.to_string(header=False), flush=True)
    table = pd.DataFrame(rows)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    table.to_csv(args.out, index=False)
    print(table.to_string(index=False))
    print(f"device: {jax.devices()[0].device_kind}; written {args.out}")


if __name__ == "__main__":
    main()
