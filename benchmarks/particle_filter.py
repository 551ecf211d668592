"""Particle filter throughput and log-likelihood error: bayeslik against `particles` (Chopin).

Both run a bootstrap filter with systematic resampling when ESS < N/2 on the same univariate
linear Gaussian model (x_0 ~ N(0, sigma0^2), x_t = rho x_{t-1} + N(0, sigmaX^2),
y_t = x_t + N(0, sigmaY^2)) and the same simulated data, whose exact log-likelihood the Kalman
filter gives. For each N: throughput = N x T / (seconds per filter run, compilation excluded,
best of --timing-reps), and the error of the log-likelihood estimate over --error-reps
independent runs (mean error and RMSE against the Kalman value).

`particles` pulls numba and pins older numpy/jax, so it lives in a separate virtual environment
(--particles-python, default /tmp/pfvenv/bin/python; create it with
`python3.12 -m venv /tmp/pfvenv && /tmp/pfvenv/bin/pip install particles`); its side runs as a
subprocess that writes JSON. Without that environment only bayeslik's rows are written.

On a GPU, `--gpu-case` adds the 1e6 particles x 1000 steps run (float32, quantiles off):

    python benchmarks/particle_filter.py                       # CPU table, vs particles
    python benchmarks/particle_filter.py --gpu-case --no-particles --particles-list 1000000

Writes benchmarks/results/particle_filter_<backend>.csv.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from bayeslik.filtering import kalman
from bayeslik.filtering import particle as pf

PARAMS = {"rho": 0.9, "sigmaX": 1.0, "sigmaY": 0.5, "sigma0": 1.0}

_PARTICLES_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    import particles
    from particles import state_space_models as ssms
    from particles.kalman import LinearGauss
    args = json.loads(sys.argv[1])
    y = list(np.asarray(args["y"], dtype=float))
    model = LinearGauss(**args["params"])
    out = []
    for N in args["particles"]:
        def run(seed):
            np.random.seed(seed)
            fk = ssms.Bootstrap(ssm=model, data=y)
            alg = particles.SMC(fk=fk, N=N, resampling="systematic", ESSrmin=0.5,
                                store_history=False, collect=None)
            t = time.perf_counter()
            alg.run()
            return time.perf_counter() - t, float(alg.logLt)
        times, lls = [], []
        for r in range(args["timing_reps"]):
            dt, ll = run(1000 + r)
            times.append(dt)
        for r in range(min(args["error_reps"], max(5, int(2e8 // (N * len(y)))))):
            lls.append(run(r)[1])
        out.append({"N": N, "seconds": min(times), "lls": lls})
    import numba, numpy
    print(json.dumps({"rows": out, "versions": {"particles": getattr(particles, "__version__", "?"),
                      "numpy": numpy.__version__, "numba": numba.__version__}}))
""")


def lg_params(p: dict) -> dict:
    return {"m0": jnp.zeros(1), "P0": jnp.eye(1) * p["sigma0"] ** 2, "F": jnp.eye(1) * p["rho"],
            "Q": jnp.eye(1) * p["sigmaX"] ** 2, "H": jnp.eye(1), "R": jnp.eye(1) * p["sigmaY"] ** 2}


def simulate(num_steps: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal() * PARAMS["sigma0"]
    ys = np.empty(num_steps)
    for t in range(num_steps):
        if t:
            x = PARAMS["rho"] * x + PARAMS["sigmaX"] * rng.normal()
        ys[t] = x + PARAMS["sigmaY"] * rng.normal()
    return ys


def _reps(error_reps: int, N: int, T: int) -> int:
    """Error repetitions at N: all of them up to 2e8 particle-steps, at least 5."""
    return min(error_reps, max(5, int(2e8 // (N * T))))


def bench_bayeslik(ys: np.ndarray, particles: list[int], timing_reps: int, error_reps: int,
                   exact: float) -> list[dict]:
    ssm = pf.linear_gaussian_ssm(1)
    params = lg_params(PARAMS)
    y = jnp.asarray(ys[:, None], jnp.float32)
    T = len(ys)
    rows = []
    for N in particles:
        def run(key):
            return pf.particle_filter(key, ssm, params, y, N, quantiles=(), resampling="systematic",
                                      ess_threshold=0.5).log_likelihood

        t0 = time.perf_counter()
        jax.block_until_ready(run(jax.random.key(0)))
        compile_s = time.perf_counter() - t0
        times = []
        for r in range(timing_reps):
            t0 = time.perf_counter()
            jax.block_until_ready(run(jax.random.key(1000 + r)))
            times.append(time.perf_counter() - t0)
        lls = np.array([float(run(jax.random.key(r))) for r in range(_reps(error_reps, N, T))])
        sec = min(times)
        rows.append({"library": "bayeslik", "backend": jax.default_backend(), "N": N, "T": T,
                     "seconds": sec, "throughput": N * T / sec, "first_call_s": compile_s,
                     "ll_mean_error": float(lls.mean() - exact),
                     "ll_rmse": float(np.sqrt(np.mean((lls - exact) ** 2))),
                     "ll_sd": float(lls.std(ddof=1)) if len(lls) > 1 else float("nan"),
                     "error_reps": len(lls)})
        print(rows[-1], flush=True)
    return rows


def bench_particles(python: str, ys: np.ndarray, particles: list[int], timing_reps: int,
                    error_reps: int, exact: float) -> tuple[list[dict], dict]:
    arg = json.dumps({"y": ys.tolist(), "params": PARAMS, "particles": particles,
                      "timing_reps": timing_reps, "error_reps": error_reps})
    proc = subprocess.run([python, "-c", _PARTICLES_SCRIPT, arg], capture_output=True, text=True,
                          check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = []
    T = len(ys)
    for r in out["rows"]:
        lls = np.asarray(r["lls"])
        rows.append({"library": "particles", "backend": "numpy", "N": r["N"], "T": T,
                     "seconds": r["seconds"], "throughput": r["N"] * T / r["seconds"],
                     "first_call_s": float("nan"),
                     "ll_mean_error": float(lls.mean() - exact),
                     "ll_rmse": float(np.sqrt(np.mean((lls - exact) ** 2))),
                     "ll_sd": float(lls.std(ddof=1)) if len(lls) > 1 else float("nan"),
                     "error_reps": len(lls)})
        print(rows[-1], flush=True)
    return rows, out["versions"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-steps", type=int, default=1000)
    ap.add_argument("--particles-list", default="1000,10000,100000")
    ap.add_argument("--timing-reps", type=int, default=3)
    ap.add_argument("--error-reps", type=int, default=20)
    ap.add_argument("--particles-python", default="/tmp/pfvenv/bin/python")
    ap.add_argument("--no-particles", action="store_true")
    ap.add_argument("--gpu-case", action="store_true",
                    help="add N = 1e6, T = 1000 (meant for an accelerator)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    Ns = [int(float(s)) for s in args.particles_list.split(",")]
    ys = simulate(args.num_steps)
    exact = float(kalman.kalman_filter(lg_params(PARAMS), ys[:, None].astype(np.float32)).log_likelihood)
    exact64 = kalman._dense_loglik({k: np.asarray(v) for k, v in lg_params(PARAMS).items()},
                                   ys[:200, None]) if args.num_steps <= 200 else None
    print(f"T = {args.num_steps}, exact log-likelihood (Kalman) {exact:.4f}"
          + (f", dense float64 {exact64:.4f}" if exact64 is not None else ""), flush=True)
    rows = bench_bayeslik(ys, Ns, args.timing_reps, args.error_reps, exact)
    if args.gpu_case:
        rows += bench_bayeslik(simulate(1000), [1_000_000], max(args.timing_reps, 3),
                               min(args.error_reps, 5),
                               float(kalman.kalman_filter(lg_params(PARAMS),
                                                          simulate(1000)[:, None]).log_likelihood))
    versions = {"jax": jax.__version__, "device": str(jax.devices()[0])}
    if not args.no_particles:
        if os.path.exists(args.particles_python):
            prow, v = bench_particles(args.particles_python, ys, Ns, args.timing_reps,
                                      args.error_reps, exact)
            rows += prow
            versions.update({f"particles_env_{k}": val for k, val in v.items()})
        else:
            print(f"`particles` environment {args.particles_python} not found: its rows are "
                  "skipped (see the module docstring)", file=sys.stderr)
    table = pd.DataFrame(rows)
    for k, v in versions.items():
        table[k] = v
    out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                   f"particle_filter_{jax.default_backend()}.csv")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    table.to_csv(out, index=False)
    cols = ["library", "N", "T", "seconds", "throughput", "ll_mean_error", "ll_rmse", "ll_sd"]
    print(table[cols].to_string(index=False))


if __name__ == "__main__":
    main()
