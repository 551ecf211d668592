"""Tempered SMC evidence: bayeslik's "smc" against blackjax's plain adaptive tempered SMC.

Run:  python benchmarks/smc_evidence.py [--seeds 5] [--particles 1000]
                                        [--out benchmarks/results/smc_evidence.csv]

Problems with an exact log evidence: normal_mean, normal_inverse_gamma, the 10-D correlated
Gaussian of bayeslik.models.reference, and a 2-D two-component Gaussian-mixture likelihood
(separated modes; the one of tests/engines/test_smc.py).

Methods, all with the same number of particles, target ESS 0.5, systematic resampling, prior
draws from ``Posterior.sample_prior`` and the same log prior / log-likelihood functions:

* ``bayeslik_hmc``, ``bayeslik_rwm``: bayeslik's engine with its defaults (moves tuned from the
  particles at every stage, adaptive number of moves, degeneracy guard);
* ``blackjax_rwm_s{0.1,0.5,2}``: blackjax's ``adaptive_tempered_smc`` with an isotropic random
  walk of fixed scale 0.1, 0.5 or 2 and 10 moves per stage (untuned peers, as in issue 7);
* ``blackjax_hmc``: the same with HMC (step size 0.1 on an identity mass matrix, 10 leapfrog
  steps, 10 moves per stage), the setting of blackjax's tempered-SMC examples.

Per problem and method, over ``--seeds`` seeds: mean and sd of (log Z - truth), the mean error
the method reports (bayeslik only; blackjax reports none), the mean z-score, wall time of a warm
run (median, compilation excluded by a first run), likelihood evaluations (bayeslik counts them;
for blackjax: particles x (moves x leapfrog steps + 1) per stage) and stages. A bayeslik run
stopped by its guard counts as "stopped" (no log Z). This is a benchmark: it writes a table and
never fails.

Calibration of the one-run error:  python benchmarks/smc_evidence.py --calibration 40
runs bayeslik alone, 40 seeds per problem (normal_mean, normal_inverse_gamma) and kernel, and
compares the spread of log Z over seeds with the mean error the runs report
(benchmarks/results/smc_calibration.csv).

Z-scores of the one-run error at the engine's defaults (issue 19):
    python benchmarks/smc_evidence.py --zscores 20 [--zscore-particles 2000]
runs bayeslik's "smc" with its defaults (HMC, 2000 particles, one run) for seeds 100, 101, ...
on the 20-D correlated Gaussian (rho 0.95; its exact log Z), the 10-D one, normal_mean and
normal_inverse_gamma, and records z = (log Z - truth) / err for the reported error
(``ess_lagcorr``, :func:`bayeslik.engines.smc.single_run_variance`) and for the perfect-mixing
one (``iid``, sqrt(sum_t 1/ESS_t - 1/N), the same run's attrs ``log_evidence_err_runs_iid``).
Per problem: the mean and sd of z (a calibrated error gives 0 and 1; the sd of an sd over n
seeds is about 1/sqrt(2(n-1))), the mean and sd of log Z - truth, the mean errors, and the
runs' self-check (:func:`bayeslik.engines.smc.runs_consistency`) applied to the seeds as if
they were the runs of one fit: its p-value and factor. Writes
benchmarks/results/smc_zscores.csv (per problem) and smc_zscores_seeds.csv (per seed), after
every problem; ``--problems correlated_gaussian_20d ...`` runs only those (keeping the others'
rows).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

import bayeslik as bl
from bayeslik.models import reference

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "engines"))


def problems() -> dict:
    from test_smc import _mixture_exact, mixture_model  # the 2-D mixture with exact evidence

    out = {}
    for name in ("normal_mean", "normal_inverse_gamma"):
        prob = reference.get(name)
        out[name] = (prob.posterior(), prob.log_evidence)
    prob = reference.correlated_gaussian(dim=10)
    out["correlated_gaussian_10d"] = (prob.posterior(), prob.log_evidence)
    out["mixture_2d"] = (bl.Posterior(mixture_model), _mixture_exact()[0])
    return out


# ---------------------------------------------------------------------------- blackjax peer
_BJ_CACHE: dict = {}


def blackjax_smc(post, seed: int, num_particles: int, kernel: str, scale: float = 0.5,
                 max_stages: int = 500):
    """(log Z, stages, likelihood evaluations, wall) of blackjax's adaptive tempered SMC."""
    import blackjax
    from blackjax.mcmc import random_walk
    from blackjax.smc import extend_params, resampling

    D, num_mcmc = post.ndim, 10
    key = (id(post), num_particles, kernel, scale)
    if key not in _BJ_CACHE:
        if kernel == "rwm":
            def step_fn(rng_key, state, logdensity_fn, sigma):
                return random_walk.build_additive_step()(
                    rng_key, state, logdensity_fn, random_walk.normal(sigma))

            params = extend_params({"sigma": jnp.full((D,), scale)})
            algo = blackjax.adaptive_tempered_smc(
                post.logprior, post.loglikelihood, step_fn, random_walk.init, params,
                resampling.systematic, 0.5, num_mcmc_steps=num_mcmc)
            per_move = 1
        else:
            params = extend_params({"step_size": 0.1, "inverse_mass_matrix": jnp.ones(D),
                                    "num_integration_steps": 10})
            algo = blackjax.adaptive_tempered_smc(
                post.logprior, post.loglikelihood, blackjax.hmc.build_kernel(),
                blackjax.hmc.init, params, resampling.systematic, 0.5, num_mcmc_steps=num_mcmc)
            per_move = 10
        _BJ_CACHE[key] = (jax.jit(algo.init), jax.jit(algo.step), per_move)
    init, step, per_move = _BJ_CACHE[key]
    rng = jax.random.key(seed)
    k0, rng = jax.random.split(rng)
    t0 = time.perf_counter()
    state = init(post.sample_prior(k0, num_particles))
    log_z, stages = 0.0, 0
    while float(state.tempering_param) < 1.0 and stages < max_stages:
        rng, sub = jax.random.split(rng)
        state, info = step(sub, state)
        log_z += float(info.log_likelihood_increment)
        stages += 1
    wall = time.perf_counter() - t0
    evals = num_particles * (1 + stages * (num_mcmc * per_move + 1))
    return log_z, stages, evals, wall


def bayeslik_smc(post, seed: int, num_particles: int, kernel: str):
    try:
        fit = bl.fit(post, "smc", seed=seed, kernel=kernel, num_particles=num_particles,
                     progress_bar=False)
    except bl.EngineError as e:
        return None, None, None, None, None, str(e)[:80]
    return (fit.log_evidence, fit.log_evidence_err, sum(fit.cost.extra["num_stages"]),
            fit.cost.num_loglik_evals, fit.cost.wall_s - fit.cost.compile_s,
            "; ".join(f[:60] for f in fit.flags))


def zscores(num_seeds: int, num_particles: int, out: str, only: list | None = None) -> None:
    """The z-scores of single runs at the engine's defaults (see the module docstring); the
    CSVs are written after every problem (rows of problems run before are kept where ``only``
    names some)."""
    import numpy as np
    import pandas as pd

    from bayeslik.engines import smc

    probs = {"correlated_gaussian_20d": reference.correlated_gaussian(dim=20),
             "correlated_gaussian_10d": reference.correlated_gaussian(dim=10),
             "normal_mean": reference.get("normal_mean"),
             "normal_inverse_gamma": reference.get("normal_inverse_gamma")}
    per_seed = out.replace(".csv", "_seeds.csv")
    rows, seeds_rows = [], []
    if only and os.path.exists(out) and os.path.exists(per_seed):  # keep the others' rows
        rows = [r for r in pd.read_csv(out).to_dict("records") if r["problem"] not in only]
        seeds_rows = [r for r in pd.read_csv(per_seed).to_dict("records")
                      if r["problem"] not in only]
    for pname, prob in probs.items():
        if only and pname not in only:
            continue
        post = prob.posterior()
        lz, err, err_iid, walls = [], [], [], []
        for s in range(num_seeds):
            t0 = time.perf_counter()
            fit = bl.fit(post, "smc", seed=100 + s, num_particles=num_particles,
                         progress_bar=False)
            walls.append(time.perf_counter() - t0)
            attrs = fit.idata["particles"].attrs
            lz.append(fit.log_evidence)
            err.append(fit.log_evidence_err)
            err_iid.append(float(np.asarray(attrs["log_evidence_err_runs_iid"])[0]))
            st = fit.idata["smc_stages"]
            seeds_rows.append({
                "problem": pname, "seed": 100 + s, "num_particles": num_particles,
                "log_z_error": lz[-1] - prob.log_evidence, "err": err[-1],
                "err_iid": err_iid[-1], "z": (lz[-1] - prob.log_evidence) / err[-1],
                "z_iid": (lz[-1] - prob.log_evidence) / err_iid[-1],
                "stages": int(st.sizes["stage"]),
                "mean_steps": float(np.nanmean(np.where(st["num_mutation_steps"].values >= 0,
                                                        st["num_mutation_steps"].values,
                                                        np.nan))),
                "mean_ll_corr": float(np.nanmean(st["loglikelihood_correlation"].values)),
                "flags": len(fit.flags)})
            print(seeds_rows[-1], flush=True)
        d = np.array(lz) - prob.log_evidence
        z, z_iid = d / np.array(err), d / np.array(err_iid)
        p, factor = smc.runs_consistency(lz, err)
        rows.append({
            "problem": pname, "num_particles": num_particles, "seeds": num_seeds,
            "true_log_evidence": round(float(prob.log_evidence), 3),
            "mean_error": round(float(d.mean()), 4), "sd_error": round(float(d.std(ddof=1)), 4),
            "mean_err": round(float(np.mean(err)), 4),
            "mean_err_iid": round(float(np.mean(err_iid)), 4),
            "z_mean": round(float(z.mean()), 2), "z_sd": round(float(z.std(ddof=1)), 2),
            "z_iid_mean": round(float(z_iid.mean()), 2),
            "z_iid_sd": round(float(z_iid.std(ddof=1)), 2),
            "sd_of_sd": round(1 / (2 * (num_seeds - 1)) ** 0.5, 2),
            "seeds_as_runs_pvalue": float(f"{p:.3g}"), "seeds_as_runs_factor": round(factor, 2),
            "wall_s": round(statistics.median(walls), 2)})
        print(rows[-1], flush=True)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        pd.DataFrame(rows).to_csv(out, index=False)
        pd.DataFrame(seeds_rows).to_csv(per_seed, index=False)
    print(pd.DataFrame(rows).to_string(index=False))
    print(f"device: {jax.devices()[0].device_kind}; wrote {out} and {per_seed}")


def calibration(num_seeds: int, num_particles: int, out: str) -> None:
    import pandas as pd

    rows = []
    for pname in ("normal_mean", "normal_inverse_gamma"):
        post, truth = problems()[pname]
        for kernel in ("hmc", "rwm"):
            errs, reported = [], []
            for s in range(num_seeds):
                lz, err, *_ = bayeslik_smc(post, s + 1, num_particles, kernel)
                errs.append(lz - truth)
                reported.append(err)
            sd = statistics.stdev(errs)
            row = {"problem": pname, "kernel": kernel, "num_particles": num_particles,
                   "seeds": num_seeds, "mean_error": round(statistics.fmean(errs), 4),
                   "sd_error": round(sd, 4),
                   "mean_reported_err": round(statistics.fmean(reported), 4),
                   "ratio_sd_to_reported": round(sd / statistics.fmean(reported), 3),
                   "ratio_se": round(1 / (2 * (num_seeds - 1)) ** 0.5, 3)}
            rows.append(row)
            print(row, flush=True)
    pd.DataFrame(rows).to_csv(out, index=False)
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--particles", type=int, default=1000)
    ap.add_argument("--calibration", type=int, default=0,
                    help="run only the calibration of the one-run error with this many seeds")
    ap.add_argument("--zscores", type=int, default=0,
                    help="run only the z-scores of single runs at the defaults, this many seeds")
    ap.add_argument("--zscore-particles", type=int, default=2000,
                    help="particles for --zscores (2000, the engine's default)")
    ap.add_argument("--problems", nargs="*", default=None,
                    help="--zscores: only these problems (the CSV keeps the others' rows)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results = os.path.join(os.path.dirname(__file__), "results")
    if args.zscores:
        zscores(args.zscores, args.zscore_particles,
                args.out or os.path.join(results, "smc_zscores.csv"), args.problems)
        return
    if args.calibration:
        calibration(args.calibration, args.particles,
                    args.out or os.path.join(results, "smc_calibration.csv"))
        return
    args.out = args.out or os.path.join(results, "smc_evidence.csv")
    import pandas as pd

    rows = []
    for pname, (post, truth) in problems().items():
        for method in ("bayeslik_hmc", "bayeslik_rwm", "blackjax_rwm_s0.1", "blackjax_rwm_s0.5",
                       "blackjax_rwm_s2", "blackjax_hmc"):
            errs, reported, zs, walls, evals, stages, notes, stopped = [], [], [], [], [], [], [], 0
            for s in range(-1, args.seeds):  # seed -1: the warm-up (compilation) run, not kept
                if method.startswith("bayeslik"):
                    lz, err, st, ev, wall, note = bayeslik_smc(post, s + 1, args.particles,
                                                               method.split("_")[1])
                else:
                    scale = float(method.split("_s")[1]) if "rwm" in method else 0.0
                    lz, st, ev, wall = blackjax_smc(post, s + 1, args.particles,
                                                    "rwm" if "rwm" in method else "hmc", scale)
                    err, note = None, ""
                if s < 0:
                    continue
                if lz is None:
                    stopped += 1
                    notes.append(note)
                    continue
                errs.append(lz - truth)
                walls.append(wall)
                evals.append(ev)
                stages.append(st)
                if err is not None:
                    reported.append(err)
                    zs.append((lz - truth) / err)
                if note:
                    notes.append(note)
            row = {
                "problem": pname, "method": method, "num_particles": args.particles,
                "seeds": args.seeds, "true_log_evidence": round(float(truth), 3),
                "mean_error": round(statistics.fmean(errs), 3) if errs else None,
                "sd_error": round(statistics.stdev(errs), 3) if len(errs) > 1 else None,
                "mean_reported_err": round(statistics.fmean(reported), 3) if reported else None,
                "mean_abs_z": round(statistics.fmean(abs(z) for z in zs), 2) if zs else None,
                "stopped_by_guard": stopped,
                "wall_s": round(statistics.median(walls), 3) if walls else None,
                "loglik_evals": int(statistics.fmean(evals)) if evals else None,
                "stages": round(statistics.fmean(stages), 1) if stages else None,
                "notes": notes[0] if notes else "",
            }
            rows.append(row)
            print(row, flush=True)
    df = pd.DataFrame(rows)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    df.to_csv(args.out, index=False)
    print(df.drop(columns=["notes"]).to_string(index=False))
    print(f"device: {jax.devices()[0].device_kind}; wrote {args.out}")


if __name__ == "__main__":
    main()
