"""Plain dynesty vs dynesty + the cost-aware surrogate on likelihoods slowed to a known cost.

Run:  python benchmarks/surrogate_cost.py [--problems a,b] [--costs-ms 1,10] [--full]
          [--num-live 100] [--seeds 0] [--out benchmarks/results/surrogate_cost.csv]

The slow likelihood. Each problem's model gets one more factor, ``slow_down``, of value 0 (the
log-likelihood is unchanged): a host callback (``jax.pure_callback``, vmapped as
``expand_dims`` so it receives a batch) that sleeps ``cost`` seconds for every point of the
batch it is handed, padding rows included (the nested engine pads a batch to a power of two; an
external code evaluated row by row would pay for them too). So a true call costs about
``cost`` plus the model's own (cheap, compiled) work, and the sleeping thread leaves the CPU
free, as a likelihood waiting on another process or machine would.

Per problem, cost and seed, in the same run on the same machine: plain dynesty ("nested") and
"nested+surrogate" at its defaults (cost-aware switch, background training, architecture search
on), with the same live points: wall time, true likelihood calls (sampling and guard), the
calls the network answered, |log Z - truth| (exact evidences; for the cosmology model, which
has none, the plain run's log Z), the surrogate's measured cost per true call, training seconds,
its own estimate of the time saved and why it switched or not. ``--full`` adds 100 ms a call
and the larger problems (each run then takes many minutes).

nautilus (the peer) runs on the same slowed likelihood when it is installed (``pip install
nautilus-sampler``); when it is not, the table says so in a row of its own.

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
from numpyro import handlers

import bayeslik as bl
from bayeslik.models import cosmology, nested_suite

SHORT = ("correlated_gaussian_3d", "gaussian_shells_2d", "loggamma_2d", "cosmo_lcdm")
FULL = SHORT + ("gaussian_shells_5d", "loggamma_10d", "eggbox")

FIELDS = ["problem", "cost_ms", "engine", "seed", "num_live", "wall_s", "true_calls",
          "surrogate_calls", "true_call_fraction", "wall_fraction", "abs_logz_error",
          "log_evidence", "log_evidence_err", "truth", "call_s_measured", "train_s",
          "time_saved_s", "first_switch_in_at", "decision", "history", "flags"]


def problem(name: str):
    """(model, args, data, exact log Z or None) of a suite problem or the cosmology model."""
    if name == "cosmo_lcdm":
        post = cosmology.posterior("lcdm", ("cc", "sn", "bao"))
        return post, None
    prob = nested_suite.get(name)
    return prob.posterior(), prob.log_evidence


def slowed(post, cost_s: float, counter: list):
    """The Posterior of ``post``'s model with the sleeping factor (see the module docstring)."""
    model = post.model

    def sleep(v):
        v = np.asarray(v)
        counter[0] += int(v.size)
        time.sleep(cost_s * v.size)
        return np.zeros(v.shape, v.dtype)

    def slow_model(*args, **kwargs):
        with handlers.trace() as tr:
            model(*args, **kwargs)
        latent = [s["value"] for s in tr.values()
                  if s["type"] == "sample" and not s["is_observed"]]
        v = jnp.sum(jnp.asarray(latent[0]))
        numpyro.factor("slow_down", jax.pure_callback(
            sleep, jax.ShapeDtypeStruct(v.shape, v.dtype), v, vmap_method="expand_dims"))

    slow_model.__name__ = f"slow_{getattr(model, '__name__', 'model')}"
    return bl.Posterior(slow_model, *post.args, **post.data)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", default=None, help=f"default {','.join(SHORT)}")
    ap.add_argument("--costs-ms", default=None, help="default 1,10 (1,10,100 with --full)")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--num-live", type=int, default=100)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "surrogate_cost.csv"))
    args = ap.parse_args()
    names = (args.problems.split(",") if args.problems else list(FULL if args.full else SHORT))
    costs = [float(c) for c in (args.costs_ms or ("1,10,100" if args.full else "1,10")).split(",")]
    try:
        import nautilus  # noqa: F401
        have_nautilus = True
    except ImportError:
        have_nautilus = False
    rows: list[dict] = []
    for name in names:
        base, truth = problem(name)
        for cost_ms in costs:
            counter = [0]
            post = slowed(base, cost_ms / 1e3, counter)
            # compile outside the timings: the first fit of a Posterior compiles its programs
            bl.fit(post, "nested", seed=0, num_live=args.num_live, max_iterations=20,
                   progress_bar=False)
            for seed in (int(s) for s in args.seeds.split(",")):
                plain = None
                for engine in ("nested", "nested+surrogate"):
                    t0 = time.perf_counter()
                    fit = bl.fit(post, engine, seed=seed, num_live=args.num_live,
                                 progress_bar=False)
                    wall = time.perf_counter() - t0
                    e = fit.cost.extra
                    if engine == "nested":
                        plain = (fit.cost.num_loglik_evals, wall, fit.log_evidence)
                    ref = truth if truth is not None else plain[2]
                    emit(rows, dict(
                        problem=name, cost_ms=cost_ms, engine=engine, seed=seed,
                        num_live=args.num_live, wall_s=round(wall, 1),
                        true_calls=fit.cost.num_loglik_evals,
                        surrogate_calls=e.get("num_surrogate_calls", 0),
                        true_call_fraction=round(fit.cost.num_loglik_evals / plain[0], 4),
                        wall_fraction=round(wall / plain[1], 3),
                        abs_logz_error=round(abs(fit.log_evidence - ref), 4),
                        log_evidence=round(fit.log_evidence, 4),
                        log_evidence_err=round(fit.log_evidence_err, 4),
                        truth="" if truth is None else round(truth, 4),
                        call_s_measured="" if e.get("call_s") is None else f"{e['call_s']:.4g}",
                        train_s=round(e.get("train_s", 0.0), 1),
                        time_saved_s="" if e.get("time_saved_s") is None
                        else round(e["time_saved_s"], 1),
                        first_switch_in_at=e.get("first_switch_in_at") or "",
                        decision=e.get("surrogate_decision", ""),
                        history=fit.idata["nested_samples"].attrs.get("surrogate_history", ""),
                        flags=" | ".join(fit.flags)), args.out)
                if not have_nautilus:
                    emit(rows, dict(problem=name, cost_ms=cost_ms, engine="nautilus", seed=seed,
                                    decision="not installed (pip install nautilus-sampler)"),
                         args.out)
                    continue
                emit(rows, run_nautilus(post, name, cost_ms, seed, truth, plain), args.out)


def run_nautilus(post, name, cost_ms, seed, truth, plain) -> dict:
    """nautilus at small settings (n_live 200, n_eff 500) on the slowed, compiled likelihood."""
    import nautilus

    from bayeslik.engines.nested import true_batch_fn

    fn = true_batch_fn(post)
    sampler = nautilus.Sampler(lambda u: u, lambda u: fn(np.atleast_2d(u)), n_dim=post.ndim,
                               n_live=200, vectorized=True, seed=seed)
    t0 = time.perf_counter()
    sampler.run(n_eff=500, verbose=False)
    wall = time.perf_counter() - t0
    logz = float(sampler.log_z)
    ref = truth if truth is not None else plain[2]
    return dict(problem=name, cost_ms=cost_ms, engine="nautilus(200,500)", seed=seed,
                wall_s=round(wall, 1), true_calls=fn.num_calls, surrogate_calls=0,
                true_call_fraction=round(fn.num_calls / plain[0], 4),
                wall_fraction=round(wall / plain[1], 3), abs_logz_error=round(abs(logz - ref), 4),
                log_evidence=round(logz, 4), truth="" if truth is None else round(truth, 4))


def emit(rows, row, out) -> None:
    """Print the row and rewrite the table (a long run can be cut short)."""
    rows.append(row)
    print(row, flush=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
