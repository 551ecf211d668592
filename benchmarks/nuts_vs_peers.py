"""bayeslik NUTS (Stan's, the Fisher and the low-rank Fisher mass-matrix adaptations) against NumPyro and nutpie.

Run:  python benchmarks/nuts_vs_peers.py [--samplers stan fisher fisher_lowrank numpyro nutpie]
                                        [--names NAME ...] [--seed 0] [--repeats 1]
                                        [--dtype 32|64] [--nutpie-cores 1]
                                        [--out benchmarks/results/nuts_vs_peers.csv] [--update]
      python benchmarks/nuts_vs_peers.py --corpus [--adaptations stan fisher fisher_lowrank]
                                    [--dtype 32] [--out CSV]   # every posteriordb posterior,
                                    # each adaptation, the reference check; a table

Posteriors: eight posteriordb posteriors (``POSTERIORS``: linear regressions, poorly scaled
regressions, a hierarchical model, an autoregression and a Gaussian process), each through

* ``stan``: bayeslik NUTS, ``mass_adaptation="stan"`` (Stan's windowed variance adaptation);
* ``fisher``: bayeslik NUTS, ``mass_adaptation="fisher"`` (the Fisher-divergence diagonal on
  nutpie's schedule);
* ``fisher_lowrank``: bayeslik NUTS, ``mass_adaptation="fisher_lowrank"`` (nutpie's
  low-rank-plus-diagonal version; compared with nutpie's diagonal default, as nutpie's low-rank
  mode is opt-in);
* ``numpyro``: NumPyro's NUTS on the same NumPyro program (chains one after the other, NumPyro's
  behaviour on one device); run twice, the second run (compiled already) times the sampling;
* ``nutpie``: nutpie (numba backend, float64) on a PyMC version of the model written here
  (``PYMC``), with the same priors, likelihood and parameter names.

Same settings for all: 4 chains x 1,000 warmup + 1,000 draws, target acceptance 0.8, maximum
tree depth 10, a diagonal mass matrix; the samplers' order rotates from posterior to posterior
(and repeat to repeat). Figures per run: min bulk ESS over every scalar of the reference's
parameters; ESS/s over the whole wall time of a first run (compilation included) and over the
sampling alone (bayeslik and NumPyro: a second run with another seed, compiled already, its
own ESS over its wall time; nutpie: its sampling call, the PyMC model's compilation timed
apart); ESS per gradient evaluation (warmup and sampling, first run);
leapfrog steps per kept draw; divergences; and ``posteriordb.check_against_reference`` (pass
when worst |z| < 4 and sd ratios within 10%). nutpie and NumPyro use the cores they use (nutpie:
``--nutpie-cores``, 1 by default, as JAX's vectorised chains use one core for models this size).

The machine the committed CSV was made on is shared and loaded: wall times are provisional;
ESS per gradient and steps per draw do not depend on the machine. This is a benchmark: it
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
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "nuts_vs_peers.csv"
ADAPTATIONS = ("stan", "fisher", "fisher_lowrank")
SAMPLERS = ADAPTATIONS + ("numpyro", "nutpie")
POSTERIORS = (
    "kidiq-kidscore_momhsiq",                       # regression, uncentred mom_iq
    "kidiq_with_mom_work-kidscore_interaction_c",   # regression with an interaction, centred
    "earnings-earn_height",                         # scales 1e-1 .. 2e4 apart
    "earnings-logearn_interaction",                 # correlated, uncentred interaction
    "mesquite-logmesquite_logvash",                 # 7-D regression, 46 rows
    "arK-arK",                                      # autoregression of order 5
    "eight_schools-eight_schools_noncentered",      # hierarchical
    "gp_pois_regr-gp_regr",                         # Gaussian process
)
SETTINGS = dict(num_warmup=1000, num_samples=1000, num_chains=4, target_accept=0.8,
                max_tree_depth=10)
FIELDS = ["name", "sampler", "dtype", "seed", "ndim", "min_ess_bulk", "wall_s", "compile_s",
          "sample_s", "ess_per_s", "ess_per_s_sampling", "num_grads", "ess_per_grad",
          "steps_per_draw", "warmup_grads_per_iter", "divergences", "passed", "worst_z",
          "worst_sd_ratio", "flags"]


# ---------------------------------------------------------------------------- the PyMC models
def _pymc_model(name: str, data: dict):
    """A PyMC version of the posteriordb posterior ``name`` (the NumPyro program's priors and
    likelihood, its parameter names)."""
    import pymc as pm
    import pytensor.tensor as pt

    d = {k: np.asarray(v, np.float64) for k, v in data.items()}

    def regression(y, columns, half_cauchy=None):
        X = np.column_stack(columns)
        with pm.Model() as m:
            beta = pm.Flat("beta", shape=X.shape[1] + 1)
            sigma = (pm.HalfCauchy("sigma", half_cauchy) if half_cauchy else pm.HalfFlat("sigma"))
            pm.Normal("y", beta[0] + pt.dot(X, beta[1:]), sigma, observed=y)
        return m

    if name == "kidiq-kidscore_momhsiq":
        return regression(d["kid_score"], [d["mom_hs"], d["mom_iq"]], half_cauchy=2.5)
    if name == "kidiq_with_mom_work-kidscore_interaction_c":
        hs, iq = d["mom_hs"] - d["mom_hs"].mean(), d["mom_iq"] - d["mom_iq"].mean()
        return regression(d["kid_score"], [hs, iq, hs * iq])
    if name == "earnings-earn_height":
        return regression(d["earn"], [d["height"]])
    if name == "earnings-logearn_interaction":
        h, male = d["height"], d["male"]
        return regression(np.log(d["earn"]), [h, male, h * male])
    if name == "mesquite-logmesquite_logvash":
        d1, d2, ch = d["diam1"], d["diam2"], d["canopy_height"]
        return regression(np.log(d["weight"]), [np.log(d1 * d2 * ch), np.log(d1 * d2),
                                                np.log(d1 / d2), np.log(d["total_height"]),
                                                d["group"]])
    if name == "arK-arK":
        K, T, y = int(data["K"]), int(data["T"]), d["y"]
        lags = y[np.arange(K, T)[:, None] - np.arange(1, K + 1)[None, :]]
        with pm.Model() as m:
            alpha = pm.Normal("alpha", 0.0, 10.0)
            beta = pm.Normal("beta", 0.0, 10.0, shape=K)
            sigma = pm.HalfCauchy("sigma", 2.5)
            pm.Normal("y", alpha + pt.dot(lags, beta), sigma, observed=y[K:])
        return m
    if name == "eight_schools-eight_schools_noncentered":
        with pm.Model() as m:
            mu = pm.Normal("mu", 0.0, 5.0)
            tau = pm.HalfCauchy("tau", 5.0)
            theta_trans = pm.Normal("theta_trans", 0.0, 1.0, shape=int(data["J"]))
            theta = pm.Deterministic("theta", mu + tau * theta_trans)
            pm.Normal("y", theta, d["sigma"], observed=d["y"])
        return m
    if name == "gp_pois_regr-gp_regr":
        x, n = d["x"], int(data["N"])
        with pm.Model() as m:
            rho = pm.Gamma("rho", alpha=25.0, beta=4.0)
            alpha = pm.HalfNormal("alpha", 2.0)
            sigma = pm.HalfNormal("sigma", 1.0)
            diff2 = (x[:, None] - x[None, :]) ** 2
            cov = alpha**2 * pt.exp(-0.5 * diff2 / rho**2) + sigma * np.eye(n)
            pm.MvNormal("y", mu=np.zeros(n), cov=cov, observed=d["y"])
        return m
    raise KeyError(f"no PyMC version of {name}; add one to _pymc_model")


# ---------------------------------------------------------------------------- the runs
def _min_bulk_ess(draws: dict) -> float:
    import arviz_base as azb
    import arviz_stats as azs

    ess = azs.ess(azb.from_dict({"posterior": draws}), group="posterior", method="bulk")
    return float(min(np.nanmin(np.asarray(ess[k])) for k in draws))


def _row(name, sampler, dtype, seed, ndim, draws, ref, wall, compile_s, sample_s, num_grads,
         steps_per_draw, warmup_grads, divergences, flags=()):
    from bayeslik.models import posteriordb

    ess = _min_bulk_ess(draws)
    res = posteriordb.check_against_reference(name, draws, ref)
    if not flags and divergences:  # the peers' runs: their divergences fail them, as bayeslik's
        flags = (f"{int(divergences)} divergent transitions after warmup",)
    return {"name": name, "sampler": sampler, "dtype": dtype, "seed": seed, "ndim": ndim,
            "min_ess_bulk": round(ess, 1), "wall_s": round(wall, 2),
            "compile_s": round(compile_s, 2), "sample_s": round(sample_s, 2),
            "ess_per_s": round(ess / wall, 2), "ess_per_s_sampling": round(ess / sample_s, 2),
            "num_grads": int(num_grads), "ess_per_grad": f"{ess / num_grads:.5f}",
            "steps_per_draw": round(float(steps_per_draw), 2),
            "warmup_grads_per_iter": round(warmup_grads / SETTINGS["num_warmup"]
                                           / SETTINGS["num_chains"], 2),
            "divergences": int(divergences), "passed": bool(res["passed"]) and not flags,
            "worst_z": round(res["worst_z"], 2), "worst_sd_ratio": round(res["worst_sd_ratio"], 3),
            "flags": " | ".join(flags)[:300]}


def _bayeslik(name, p, adaptation, seed, dtype):
    import bayeslik as bl
    from bayeslik.convergence import FitWarning

    post = bl.Posterior(p["model"], **p["data"])

    def once(s):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FitWarning)  # they are in fit.flags
            return bl.fit(post, "nuts", seed=s, progress_bar=False, dense_mass=False,
                          mass_adaptation=adaptation, **SETTINGS)

    fit = once(seed)
    st = fit.idata["sample_stats"]
    steps = np.asarray(st["n_steps"])
    draws = {k: fit.draws(k) for k in p["reference"]}
    grads = fit.cost.num_grad_evals
    # the sampling alone: a second run, compiled already (Cost.compile_s of the first is the
    # compiler's time, but on a loaded machine wall - compile_s of one run is too noisy)
    again = once(seed + 10_000)
    ess_again = _min_bulk_ess({k: again.draws(k) for k in p["reference"]})
    row = _row(name, adaptation, dtype, seed, post.ndim, draws, p["reference"],
               fit.cost.wall_s, fit.cost.compile_s, again.cost.wall_s, grads, steps.mean(),
               grads - steps.sum(), np.asarray(st["diverging"]).sum(), tuple(fit.flags))
    row["ess_per_s_sampling"] = round(ess_again / again.cost.wall_s, 2)
    return row


def _numpyro(name, p, seed, dtype):
    import jax
    from numpyro.infer import MCMC, NUTS

    kernel = NUTS(p["model"], target_accept_prob=SETTINGS["target_accept"],
                  max_tree_depth=SETTINGS["max_tree_depth"], dense_mass=False)
    mcmc = MCMC(kernel, num_warmup=SETTINGS["num_warmup"], num_samples=SETTINGS["num_samples"],
                num_chains=SETTINGS["num_chains"], chain_method="sequential", progress_bar=False)

    def once(key):
        t0 = time.perf_counter()
        k_warm, k_run = jax.random.split(key)
        mcmc.warmup(k_warm, collect_warmup=True, extra_fields=("num_steps",), **p["data"])
        warm_steps = int(np.asarray(mcmc.get_extra_fields()["num_steps"]).sum())
        mcmc.run(mcmc.post_warmup_state.rng_key, extra_fields=("num_steps",), **p["data"])
        samples = mcmc.get_samples(group_by_chain=True)
        jax.block_until_ready(samples)
        extra = mcmc.get_extra_fields(group_by_chain=True)
        return time.perf_counter() - t0, samples, warm_steps, extra

    cold, samples, warm_steps, extra = once(jax.random.key(seed))
    warm, samples2, warm_steps2, extra2 = once(jax.random.key(seed + 10_000))
    import bayeslik as bl

    post = bl.Posterior(p["model"], **p["data"])
    # the deterministic sites (theta of eight schools) are in the samples already
    draws = {k: np.asarray(samples[k]) for k in p["reference"]}
    steps = np.asarray(extra["num_steps"])
    div = np.asarray(extra.get("diverging", np.zeros(1))).sum()
    # the ESS/s without compilation: the second (compiled) run's own ESS over its time
    ess_warm = _min_bulk_ess({k: np.asarray(samples2[k]) for k in p["reference"]})
    row = _row(name, "numpyro", dtype, seed, post.ndim, draws, p["reference"], cold,
               max(cold - warm, 0.0), warm, warm_steps + steps.sum(), steps.mean(), warm_steps,
               div)
    row["ess_per_s_sampling"] = round(ess_warm / warm, 2)
    return row


def _nutpie(name, p, seed, cores):
    import nutpie

    t0 = time.perf_counter()
    model = _pymc_model(name, p["data"])
    compiled = nutpie.compile_pymc_model(model)
    comp = time.perf_counter() - t0
    t1 = time.perf_counter()
    trace = nutpie.sample(compiled, draws=SETTINGS["num_samples"], tune=SETTINGS["num_warmup"],
                          chains=SETTINGS["num_chains"], cores=cores, seed=seed,
                          target_accept=SETTINGS["target_accept"],
                          maxdepth=SETTINGS["max_tree_depth"], progress_bar=False)
    sample_s = time.perf_counter() - t1
    post = trace["posterior"]
    draws = {k: np.asarray(post[k].values) for k in p["reference"]}
    st = trace["sample_stats"]
    steps = np.asarray(st["n_steps"].values)
    warm = np.asarray(trace["warmup_sample_stats"]["n_steps"].values).sum()
    ndim = sum(int(np.prod(post[v].shape[2:])) for v in post.data_vars if v in
               [rv.name for rv in model.free_RVs])
    return _row(name, "nutpie", "float64", seed, ndim, draws, p["reference"], comp + sample_s,
                comp, sample_s, warm + steps.sum(), steps.mean(), warm,
                np.asarray(st["diverging"].values).sum())


def _run_rows(args) -> list[dict]:
    import jax

    from bayeslik.models import posteriordb

    dtype = "float64" if jax.config.read("jax_enable_x64") else "float32"
    rows = []
    names = args.names or list(POSTERIORS)
    for rep in range(args.repeats):
        for i, name in enumerate(names):
            p = posteriordb.load(name)
            k = (i + rep) % len(args.samplers)
            order = list(args.samplers[k:]) + list(args.samplers[:k])  # rotates
            for sampler in order:
                seed = args.seed + rep
                try:
                    if sampler in ADAPTATIONS:
                        row = _bayeslik(name, p, sampler, seed, dtype)
                    elif sampler == "numpyro":
                        row = _numpyro(name, p, seed, dtype)
                    else:
                        row = _nutpie(name, p, seed, args.nutpie_cores)
                except Exception as e:  # noqa: BLE001 - a benchmark row, whatever went wrong
                    row = {"name": name, "sampler": sampler, "dtype": dtype, "seed": seed,
                           "flags": f"error: {type(e).__name__}: {e}"[:300]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def _corpus_rows(args) -> list[dict]:
    """Every posteriordb posterior through each adaptation (``--adaptations``) at the corpus settings
    (posteriordb.NUTS_OPTIONS, except that the Fisher adaptation is diagonal only, so where
    the corpus asks for a dense metric both run diagonal)."""
    import jax

    import bayeslik as bl
    from bayeslik.convergence import FitWarning
    from bayeslik.models import posteriordb

    dtype = "float64" if jax.config.read("jax_enable_x64") else "float32"
    rows = []
    for i, name in enumerate(args.names or posteriordb.names()):
        p = posteriordb.load(name)
        post = bl.Posterior(p["model"], **p["data"])
        opts = {k: v for k, v in posteriordb.NUTS_OPTIONS.get(name, {}).items()
                if k != "dense_mass"}
        k = i % len(args.adaptations)
        order = list(args.adaptations[k:]) + list(args.adaptations[:k])  # rotates
        for adaptation in order:
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FitWarning)
                    fit = bl.fit(post, "nuts", seed=args.seed, progress_bar=False,
                                 mass_adaptation=adaptation, **opts)
            except Exception as e:  # noqa: BLE001
                rows.append({"name": name, "sampler": adaptation, "dtype": dtype,
                             "flags": f"error: {type(e).__name__}: {e}"[:300]})
                print(json.dumps(rows[-1]), flush=True)
                continue
            wall = time.perf_counter() - t0
            draws = {k: fit.draws(k) for k in p["reference"]}
            res = posteriordb.check_against_reference(name, draws, p["reference"])
            st = fit.idata["sample_stats"]
            rows.append({"name": name, "sampler": adaptation, "dtype": dtype, "seed": args.seed,
                         "ndim": post.ndim, "min_ess_bulk": round(_min_bulk_ess(draws), 1),
                         "wall_s": round(wall, 1), "compile_s": round(fit.cost.compile_s, 1),
                         "num_grads": fit.cost.num_grad_evals,
                         "steps_per_draw": round(float(np.asarray(st["n_steps"]).mean()), 2),
                         "divergences": int(np.asarray(st["diverging"]).sum()),
                         "passed": bool(res["passed"]) and not fit.flags,
                         "worst_z": round(res["worst_z"], 2),
                         "worst_sd_ratio": round(res["worst_sd_ratio"], 3),
                         "flags": " | ".join(fit.flags)[:300] + (f" [options {opts}]" if opts else "")})
            print(json.dumps(rows[-1]), flush=True)
    return rows


# ---------------------------------------------------------------------------- the tables
def _f(r, key):
    try:
        return float(r[key])
    except (KeyError, TypeError, ValueError):
        return float("nan")


def table(rows: list[dict]) -> str:
    """Markdown: per posterior and sampler, steps per draw, ESS/s (sampling; with compile),
    ESS per 1,000 gradients, pass; then the ratios fisher / stan and fisher / nutpie (medians
    over repeats)."""
    by: dict = {}
    for r in rows:
        if "min_ess_bulk" in r and r["min_ess_bulk"] not in ("", None):
            by.setdefault(r["name"], {}).setdefault(r["sampler"], []).append(r)
    samplers = [s for s in SAMPLERS if any(s in v for v in by.values())]

    def med(rs, key):
        return float(np.median([_f(r, key) for r in rs]))

    head = ("| posterior | " + " | ".join(f"{s}: steps/draw, ESS/s (w/ compile), ESS/1k grad"
                                          for s in samplers) + " |")
    lines = [head, "|" + "---|" * (len(samplers) + 1)]
    for name, cells in by.items():
        out = []
        for s in samplers:
            rs = cells.get(s)
            if not rs:
                out.append("")
                continue
            ok = all(str(r["passed"]) == "True" for r in rs)
            out.append(f"{med(rs, 'steps_per_draw'):.1f}, {med(rs, 'ess_per_s_sampling'):.0f} "
                       f"({med(rs, 'ess_per_s'):.0f}), {1000 * med(rs, 'ess_per_grad'):.1f}"
                       + ("" if ok else " **FAIL**"))
        lines.append(f"| {name} | " + " | ".join(out) + " |")
    lines += ["", "| posterior | steps/draw fisher/stan | ESS/s fisher/stan (w/ compile) | "
              "ESS/grad fisher/stan | ESS/s fisher/nutpie (w/ compile) | ESS/grad fisher/nutpie "
              "| ESS/s stan/nutpie |", "|---|---|---|---|---|---|---|"]
    for name, cells in by.items():
        f, s, n = cells.get("fisher"), cells.get("stan"), cells.get("nutpie")

        def ratio(a, b, key):
            return f"{med(a, key) / med(b, key):.2f}" if a and b else ""

        lines.append(f"| {name} | {ratio(f, s, 'steps_per_draw')} | "
                     f"{ratio(f, s, 'ess_per_s_sampling')} ({ratio(f, s, 'ess_per_s')}) | "
                     f"{ratio(f, s, 'ess_per_grad')} | "
                     f"{ratio(f, n, 'ess_per_s_sampling')} ({ratio(f, n, 'ess_per_s')}) | "
                     f"{ratio(f, n, 'ess_per_grad')} | {ratio(s, n, 'ess_per_s_sampling')} |")
    return "\n".join(lines)


def corpus_table(rows: list[dict]) -> str:
    by: dict = {}
    for r in rows:
        by.setdefault(r["name"], {})[r["sampler"]] = r
    present = [a for a in ADAPTATIONS if any(a in c for c in by.values())]
    lines = ["| posterior | d | " + " | ".join(f"{a}: pass, z, steps/draw, s" for a in present)
             + " |", "|---|---|" + "---|" * len(present)]
    for name, c in by.items():
        def cell(r):
            if r is None or "worst_z" not in r:
                return (r or {}).get("flags", "")[:60]
            return (f"{'pass' if str(r['passed']) == 'True' else '**FAIL**'} {r['worst_z']}, "
                    f"{r['steps_per_draw']}, {r['wall_s']}")
        nd = next(iter(c.values())).get("ndim", "")
        lines.append(f"| {name} | {nd} | " + " | ".join(cell(c.get(a)) for a in present) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    ap.add_argument("--names", nargs="+")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--dtype", choices=["32", "64"], default="32")
    ap.add_argument("--nutpie-cores", type=int, default=1)
    ap.add_argument("--corpus", action="store_true")
    ap.add_argument("--adaptations", nargs="+", default=list(ADAPTATIONS), choices=ADAPTATIONS,
                    help="--corpus: the adaptations to run")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--update", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not args.child:  # the dtype is set before JAX starts, in a process of its own
        env = {**os.environ, "JAX_ENABLE_X64": "1" if args.dtype == "64" else "0"}
        cmd = [sys.executable, __file__, "--child"] + (argv if argv is not None else sys.argv[1:])
        rows = []
        with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) as proc:
            for line in proc.stdout:  # each row as it comes (the child's stderr passes through)
                sys.stderr.write(line)
                if line.startswith("{"):
                    rows.append(json.loads(line))
        out = args.out or (None if args.corpus else OUT)  # the corpus: a table, a CSV if asked
        if out is None:
            print(corpus_table(rows))
            return
        if args.update and out.exists():
            new = {(r["name"], r["sampler"], r["dtype"], str(r.get("seed"))) for r in rows}
            with open(out) as fh:
                old = [r for r in csv.DictReader(fh)
                       if (r["name"], r["sampler"], r["dtype"], r["seed"]) not in new]
            rows = old + rows
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        print(corpus_table(rows) if args.corpus else table(rows))
        print(f"\nwrote {out}")
        return
    (_corpus_rows if args.corpus else _run_rows)(args)


if __name__ == "__main__":
    main()
