"""Plain dynesty vs dynesty + neural likelihood surrogate ("nested" vs "nested+surrogate").

Run:  python benchmarks/surrogate_nested.py [--problems a,b] [--num-live 300] [--seeds 0]
          [--out benchmarks/results/surrogate_nested.csv]

Per problem, engine and seed, in one run on one machine: true likelihood calls (for the surrogate
run: sampling + guard), surrogate calls, wall time (training included, ``train_s`` says how
much), logZ, its error, |logZ - truth| and the true calls as a fraction of plain dynesty's with
the same seed. The truth is exact for the suite problems (bayeslik.models.reference /
nested_suite); for the cosmology models, which have none, the plain dynesty logZ of the same
seed is the reference (so |logZ error| there is the difference of two estimates, each with its
own error). The surrogate runs use the engine's default settings (architecture search on).

nautilus (the peer: importance nested sampling with neural-network bounds; ``pip install
nautilus-sampler``, the ``bench`` extra) runs on the same compiled, vmapped unit-cube likelihood
with its defaults (n_live=2000, n_eff=10000; ``--nautilus-live``, ``--nautilus-neff`` change them:
500 and 2000 buy fewer calls for a larger logZ error); it reports no logZ error.
``--no-nautilus`` skips it, ``--engines`` picks the bayeslik engines run, ``--num-initial`` sets
the surrogate's true points before its first training.

A benchmark, not a test: it writes a table and never fails.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import bayeslik as bl
from bayeslik.models import cosmology, nested_suite, reference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nested_suite import run_nautilus  # noqa: E402  (benchmarks/nested_suite.py)

PROBLEMS = {
    "normal_mean": lambda: (reference.get("normal_mean").posterior(),
                            reference.get("normal_mean").log_evidence),
    "correlated_gaussian_3d": lambda: (nested_suite.get("correlated_gaussian_3d").posterior(),
                                       nested_suite.get("correlated_gaussian_3d").log_evidence),
    "gaussian_shells_2d": lambda: (nested_suite.get("gaussian_shells_2d").posterior(),
                                   nested_suite.get("gaussian_shells_2d").log_evidence),
    "loggamma_2d": lambda: (nested_suite.get("loggamma_2d").posterior(),
                            nested_suite.get("loggamma_2d").log_evidence),
    "gaussian_shells_5d": lambda: (nested_suite.get("gaussian_shells_5d").posterior(),
                                   nested_suite.get("gaussian_shells_5d").log_evidence),
    # the case: nautilus used 3x fewer calls than dynesty on LogGamma in 4-D
    "loggamma_4d": lambda: (nested_suite._loggamma(4).posterior(), 0.0),
    "loggamma_10d": lambda: (nested_suite.get("loggamma_10d").posterior(),
                             nested_suite.get("loggamma_10d").log_evidence),
    "eggbox": lambda: (nested_suite.get("eggbox").posterior(),
                       nested_suite.get("eggbox").log_evidence),
    "cosmo_lcdm": lambda: (cosmology.posterior("lcdm", ("cc", "sn", "bao")), None),
    "cosmo_wcdm": lambda: (cosmology.posterior("wcdm", ("cc", "sn", "bao")), None),
}

FIELDS = ["problem", "engine", "seed", "num_live", "true_calls", "surrogate_calls",
          "true_call_fraction", "wall_s", "train_s", "log_evidence", "log_evidence_err",
          "truth", "abs_logz_error", "guard_correction", "network", "flags"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", default=",".join(PROBLEMS))  # see PROBLEMS
    ap.add_argument("--num-live", type=int, default=300)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--no-nautilus", action="store_true")
    ap.add_argument("--nautilus-live", type=int, default=2000)
    ap.add_argument("--nautilus-neff", type=int, default=10000)
    ap.add_argument("--num-initial", type=int, default=None,
                    help="the surrogate's num_initial (default: the engine's, 2 x num_live)")
    ap.add_argument("--engines", default="nested,nested+surrogate",
                    help="bayeslik engines to run (plain 'nested' first: the fractions use it)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "surrogate_nested.csv"))
    args = ap.parse_args()
    rows = []
    for name in args.problems.split(","):
        post, truth = PROBLEMS[name]()
        for seed in (int(s) for s in args.seeds.split(",")):
            plain_calls, plain_logz = None, None
            for engine in args.engines.split(","):
                t0 = time.perf_counter()
                extra = ({"num_initial": args.num_initial}
                         if engine == "nested+surrogate" and args.num_initial else {})
                fit = bl.fit(post, engine, seed=seed, num_live=args.num_live, progress_bar=False,
                             **extra)
                wall = time.perf_counter() - t0
                e = fit.cost.extra
                ref = truth if truth is not None else plain_logz
                if engine == "nested":
                    plain_calls, plain_logz = fit.cost.num_loglik_evals, fit.log_evidence
                    ref = truth if truth is not None else plain_logz
                label = engine + "".join(f"({k}={v})" for k, v in extra.items())
                row = dict(
                    problem=name, engine=label, seed=seed, num_live=args.num_live,
                    true_calls=fit.cost.num_loglik_evals,
                    surrogate_calls=e.get("num_surrogate_calls", 0),
                    true_call_fraction=round(fit.cost.num_loglik_evals / plain_calls, 4)
                    if plain_calls else "",
                    wall_s=round(wall, 1), train_s=round(e.get("train_s", 0.0), 1),
                    log_evidence=round(fit.log_evidence, 4),
                    log_evidence_err=round(fit.log_evidence_err, 4),
                    truth="" if truth is None else round(truth, 4),
                    abs_logz_error="" if ref is None else round(abs(fit.log_evidence - ref), 4),
                    guard_correction=round(e["guard_correction"], 4) if "guard_correction" in e
                    else "",
                    network=_network(e.get("architecture")),
                    flags=" | ".join(fit.flags),
                )
                emit(rows, row, args.out)
            if args.no_nautilus:
                continue
            try:
                calls, wall, _, logz, note = run_nautilus(post, seed, float("inf"),
                                                          args.nautilus_live, args.nautilus_neff)
            except ImportError:
                continue
            except ValueError as e:  # e.g. nautilus needs at least 2 parameters
                print(f"nautilus skipped on {name}: {e}", flush=True)
                continue
            ref = truth if truth is not None else plain_logz
            emit(rows, dict(problem=name, engine=f"nautilus(n_eff={args.nautilus_neff})", seed=seed,
                            num_live=args.nautilus_live, true_calls=calls, surrogate_calls=0,
                            true_call_fraction=round(calls / plain_calls, 4) if plain_calls
                            else "", wall_s=round(wall, 1),
                            train_s="", log_evidence=round(logz, 4), log_evidence_err="",
                            truth="" if truth is None else round(truth, 4),
                            abs_logz_error="" if ref is None else round(abs(logz - ref), 4),
                            guard_correction="", network="",
                            flags=note), args.out)


def _network(arch) -> str:
    """The surrogate's chosen design, e.g. 'additive 32x3 lr 0.01' ('' for plain runs)."""
    if not arch:
        return ""
    return f"{arch['kind']} {arch['width']}x{arch['depth']} lr {arch['learning_rate']:g}"


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
