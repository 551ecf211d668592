"""HMM log-likelihood and its gradient: bayeslik's sequential and parallel scans, and dynamax's.

Run:  python benchmarks/hmm_filter.py [--T 1e3 1e4 1e5 1e6] [--repeats 7] [--out PATH]

Problem: K = 4 states, a sticky chain (0.95 on the diagonal) with unit-variance Gaussian
emissions, simulated once per T; float32 on the default JAX device. Timed per implementation:

* ``*_ll_s``: ``jit(loglik)`` alone;
* ``*_vg_s``: ``jit(value_and_grad(loglik, argnums=(log_obs, log_trans)))``, the cost of one
  gradient step of a model with an HMM likelihood;
* ``*_compile_s``: the first ``value_and_grad`` call (trace + compile + one run);
* ``*_rel_err``: |float32 loglik - float64 loglik| / |float64 loglik|, the float64 value from
  bayeslik's sequential scan under ``jax_enable_x64``.

Times are medians over at least ``--repeats`` runs after the compile (more for fast functions,
up to half a second of timing), each ended by ``block_until_ready``. ``ratio_*`` = bayeslik /
dynamax for the same kind of scan (below 1: bayeslik is faster). dynamax takes probabilities, so its functions get ``exp(log_init)`` and
``exp(log_trans)`` and the gradient wrt ``log_trans`` goes through that ``exp``.

dynamax is optional: without it only bayeslik is timed. To compare, use a separate
environment, e.g.::

    python3.12 -m venv /tmp/dynvenv && /tmp/dynvenv/bin/pip install jax dynamax
    PYTHONPATH=. /tmp/dynvenv/bin/python benchmarks/hmm_filter.py

bayeslik's HMM module needs only jax: when the ``bayeslik`` package cannot be imported there
(its other dependencies are missing), the module file is loaded directly. Device-agnostic: the
device is printed and written to the CSV; the default output name carries the backend
(``benchmarks/results/hmm_filter_cpu.csv``, ``..._gpu.csv``). This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def load_hmm():
    try:
        from bayeslik.filtering import hmm
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "bayeslik_hmm", ROOT / "bayeslik" / "filtering" / "hmm.py"
        )
        hmm = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = hmm
        spec.loader.exec_module(hmm)
    return hmm


def load_dynamax():
    try:
        from dynamax.hidden_markov_model import hmm_filter, parallel_hmm_filter
    except ImportError:
        return None
    return hmm_filter, parallel_hmm_filter


def problem(T: int, K: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    P = np.full((K, K), 0.05 / (K - 1))
    np.fill_diagonal(P, 0.95)
    z = np.empty(T, dtype=np.int64)
    t, state = 0, rng.integers(K)
    while t < T:  # blocks of constant state with geometric holding times
        hold = rng.geometric(0.05)
        z[t : t + hold] = state
        t += hold
        state = (state + rng.integers(1, K)) % K
    mu = np.arange(K, dtype=float)
    y = mu[z] + rng.normal(size=T)
    log_obs = -0.5 * (y[:, None] - mu[None, :]) ** 2 - 0.5 * np.log(2 * np.pi)
    f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)  # noqa: E731
    return f32(np.full(K, -np.log(K))), f32(np.log(P)), f32(log_obs)


def implementations(hmm, dyn, log_init):
    """name -> loglik(log_obs, log_trans)."""
    impls = {
        "bayeslik_sequential": lambda lo, lt: hmm.hmm_loglik(log_init, lt, lo, method="sequential"),
        "bayeslik_parallel": lambda lo, lt: hmm.hmm_loglik(log_init, lt, lo, method="parallel"),
    }
    if dyn is not None:
        seq, par = dyn
        init = jnp.exp(log_init)
        impls["dynamax_sequential"] = lambda lo, lt: seq(init, jnp.exp(lt), lo).marginal_loglik
        impls["dynamax_parallel"] = lambda lo, lt: par(init, jnp.exp(lt), lo).marginal_loglik
    return impls


def timed(fn, args, repeats, min_total_s=0.5, max_runs=200):
    """(output, first-call seconds, median seconds). At least ``repeats`` timed runs, more for
    fast functions (up to ``min_total_s`` of timing, at most ``max_runs``) to tame noise."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    probe = time.perf_counter() - t0
    runs = max(repeats, min(max_runs, int(min_total_s / max(probe, 1e-9))))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return out, first, statistics.median(times)


def float64_loglik(hmm, log_init, log_trans, log_obs, method="sequential"):
    """Reference log-likelihood in float64 (bayeslik's sequential scan, or the parallel one where
    the sequential is skipped; both checked against brute-force enumeration in tests/filtering);
    restores the x64 flag afterwards."""
    old = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    try:
        a = [jnp.asarray(np.asarray(x), dtype=jnp.float64) for x in (log_init, log_trans, log_obs)]
        return float(hmm.hmm_loglik(*a, method=method))
    finally:
        jax.config.update("jax_enable_x64", old)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", nargs="+", type=float, default=[1e3, 1e4, 1e5, 1e6])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sequential-max-T", type=float, default=float("inf"),
                        help="skip the sequential scans above this T (on a GPU a sequential scan "
                        "of 1e6 steps takes seconds per call)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    hmm, dyn = load_hmm(), load_dynamax()
    backend = jax.default_backend()
    device = jax.devices()[0]
    device_desc = f"{backend}: {getattr(device, 'device_kind', str(device))}"
    print(f"device {device_desc}; jax {jax.__version__}; {os.cpu_count()} CPUs; "
          f"{platform.processor() or platform.machine()}; dynamax: "
          f"{'yes' if dyn is not None else 'not installed'}")
    default_out = ROOT / "benchmarks" / "results" / f"hmm_filter_{backend}.csv"
    out_path = Path(args.out) if args.out else default_out

    rows = []
    for T in (int(t) for t in args.T):
        log_init, log_trans, log_obs = problem(T)
        with_seq = T <= args.sequential_max_T
        reference = float64_loglik(hmm, log_init, log_trans, log_obs,
                                   "sequential" if with_seq else "parallel")
        row = {"T": T, "K": 4, "device": device_desc, "loglik_float64": reference}
        for name, f in implementations(hmm, dyn, log_init).items():
            if not with_seq and name.endswith("sequential"):
                for k in ("compile_s", "ll_s", "vg_s", "loglik", "rel_err"):
                    row[f"{name}_{k}"] = float("nan")
                continue
            vg = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
            ll = jax.jit(f)
            (value, _), compile_s, vg_s = timed(vg, (log_obs, log_trans), args.repeats)
            ll_value, _, ll_s = timed(ll, (log_obs, log_trans), args.repeats)
            rel_err = abs(float(ll_value) - reference) / abs(reference)
            row[f"{name}_compile_s"] = round(compile_s, 3)
            row[f"{name}_ll_s"] = ll_s
            row[f"{name}_vg_s"] = vg_s
            row[f"{name}_loglik"] = float(ll_value)
            row[f"{name}_rel_err"] = rel_err
            print(f"  T={T:>8} {name:<20} float32 loglik {float(ll_value):.7e}, vs float64 "
                  f"{float(ll_value) - reference:+9.3g} ({rel_err:.1e} rel.)  "
                  f"ll {ll_s * 1e3:9.3f} ms  vg {vg_s * 1e3:9.3f} ms  compile {compile_s:6.2f} s",
                  flush=True)
        for kind in ("sequential", "parallel"):
            for metric in ("ll", "vg"):
                b, d = row[f"bayeslik_{kind}_{metric}_s"], row.get(f"dynamax_{kind}_{metric}_s")
                row[f"ratio_{kind}_{metric}"] = round(b / d, 3) if d else ""
        rows.append(row)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(out_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.10g}" if isinstance(v, float) else v) for k, v in r.items()})

    names = [n for n in ("bayeslik_sequential", "bayeslik_parallel", "dynamax_sequential",
                         "dynamax_parallel") if f"{n}_vg_s" in rows[0]]
    short = {"bayeslik_sequential": "bl seq", "bayeslik_parallel": "bl par",
             "dynamax_sequential": "dyn seq", "dynamax_parallel": "dyn par"}
    print(f"\nmedian ms over >= {args.repeats} runs after compile; device {device_desc}")
    for metric, label in (("vg", "value_and_grad wrt (log_obs, log_trans)"), ("ll", "loglik only")):
        print(f"\n{label}")
        head = f"{'T':>9} " + " ".join(f"{short[n]:>10}" for n in names)
        if dyn is not None:
            head += f" {'seq ratio':>10} {'par ratio':>10}"
        head += f" {'bl par/seq':>11}"
        print(head)
        for r in rows:
            line = f"{r['T']:>9} " + " ".join(f"{r[f'{n}_{metric}_s'] * 1e3:10.3f}" for n in names)
            if dyn is not None:
                ratios = (r[f"ratio_sequential_{metric}"], r[f"ratio_parallel_{metric}"])
                line += f" {ratios[0]:>10} {ratios[1]:>10}"
            par_seq = r[f"bayeslik_parallel_{metric}_s"] / r[f"bayeslik_sequential_{metric}_s"]
            print(line + f" {par_seq:11.2f}")
    print("\nfloat32 loglik relative error vs float64")
    print(f"{'T':>9} " + " ".join(f"{short[n]:>10}" for n in names))
    for r in rows:
        print(f"{r['T']:>9} " + " ".join(f"{r[f'{n}_rel_err']:10.1e}" for n in names))
    faster = [r["T"] for r in rows if r["bayeslik_parallel_vg_s"] < r["bayeslik_sequential_vg_s"]]
    print(f"\nbayeslik parallel faster than sequential (value_and_grad) at T in {faster or 'none'} "
          f"on {backend}; current auto rule: {backend} -> parallel from T >= "
          f"{hmm.CPU_PARALLEL_MIN_T if backend == 'cpu' else hmm.ACCELERATOR_PARALLEL_MIN_T}")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
