"""Peak memory of the pointwise log-likelihood: a normal model with N observations, NUTS with
2 chains x 100 draws (100 warmup; ``--num-samples`` for more), no progress bar, one fresh process
per case.

Run:  python benchmarks/loglikelihood_memory.py [--num-obs 1000000] [--num-samples 100]
          [--cases default,false,true,later] [--pythonpath DIR] [--label after]
          [--out benchmarks/results/loglikelihood_memory.csv]

Cases (each a ``bl.fit`` in a subprocess of its own):

* ``default``: ``bl.fit`` with no log_likelihood argument (the only case older bayeslik runs;
  ``--pythonpath DIR`` puts another checkout's ``bayeslik`` first, e.g. the code before the
  option, to measure "before");
* ``false`` / ``true``: ``log_likelihood=False`` (no log-likelihood computed) / ``True``;
* ``later``: ``log_likelihood=False``, then ``bl.pointwise_loglikelihood(fit, post)``.

Per case (MB from /proc/self/status: VmRSS the resident set, VmHWM its high-water mark):
``peak_rss_mb`` the whole run's peak; ``rss_before_fit_mb`` once JAX, the data and the
Posterior are loaded; ``sampling_peak_mb`` the peak up to the end of sampling (NUTS's start
search evaluates 100 candidates per chain at once, with gradients, which dominates at this data
size and is not the log-likelihood's); then the high-water mark is reset (``clear_refs``, hooked
on NUTS's private ``_collect``, which runs once the draws are collected, in the code before the
option too) and ``postprocess_peak_mb`` is the peak of what follows: constrained values, the
log_likelihood group, the Fit (and the later call); ``postprocess_above_mb`` that peak less the
resident set at the reset. ``group_mb``: the log_likelihood group's array (chains x draws x N x
4 bytes), where there is one. A benchmark, not a test: it writes a table and never fails.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, sys, time
import numpy as np
import numpyro, numpyro.distributions as dist
import jax
import bayeslik as bl

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB -> MB
    return float("nan")

case, n, num_samples = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def model(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(5.0))
    with numpyro.plate("obs", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, sigma), obs=y)

# the phase after sampling: the resident-set high-water mark is reset (Linux: clear_refs 5)
# when NUTS has collected its draws, so VmHWM at the end is the peak of the post-processing
# (constrained values, the log_likelihood group) and the Fit's construction alone
from bayeslik.engines import nuts as _nuts
_collect, mark = _nuts._collect, {}

def collect_then_reset(*a, **k):
    out = _collect(*a, **k)
    mark["sampling_peak"] = status("VmHWM")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    mark["rss_after_sampling"] = status("VmRSS")
    return out

_nuts._collect = collect_then_reset
y = np.random.default_rng(0).normal(1.0, 2.0, size=n).astype(np.float32)
post = bl.Posterior(model, y=y)
jax.block_until_ready(post.data_arrays)
start = status("VmRSS")
opts = dict(num_warmup=100, num_samples=num_samples, num_chains=2, progress_bar=False)
kw = {"default": {}, "false": {"log_likelihood": False}, "true": {"log_likelihood": True},
      "later": {"log_likelihood": False}}[case]
t0 = time.perf_counter()
fit = bl.fit(post, "nuts", seed=0, **opts, **kw)
if case == "later":
    fit = bl.pointwise_loglikelihood(fit, post)
wall = time.perf_counter() - t0
post_peak = status("VmHWM")  # since the reset: the post-processing phase (and the later call)
group = ("log_likelihood" in fit.idata.children
         and float(fit.idata["log_likelihood"]["y"].values.nbytes) / 2**20)
peak = max(mark["sampling_peak"], post_peak)
print(json.dumps({"case": case, "num_obs": n, "num_draws": 2 * num_samples, "peak_rss_mb": peak,
                  "rss_before_fit_mb": start, "sampling_peak_mb": mark["sampling_peak"],
                  "rss_after_sampling_mb": mark["rss_after_sampling"],
                  "postprocess_peak_mb": post_peak,
                  "postprocess_above_mb": post_peak - mark["rss_after_sampling"],
                  "group_mb": group or 0.0, "wall_s": wall,
                  "mu_mean": float(fit.draws("mu").mean()), "bayeslik": bl.__file__}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-obs", type=int, default=1_000_000)
    ap.add_argument("--num-samples", type=int, default=100, help="draws per chain (2 chains)")
    ap.add_argument("--cases", default="default,false,true,later")
    ap.add_argument("--pythonpath", default=None,
                    help="a directory whose bayeslik/ is imported instead (e.g. older code)")
    ap.add_argument("--label", default="", help="a label for the rows (e.g. before / after)")
    ap.add_argument("--out", default=None, help="append the rows to this CSV file")
    args = ap.parse_args()
    env = dict(os.environ)
    if args.pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.pythonpath,
                                                          env.get("PYTHONPATH")]))
    rows = []
    for case in args.cases.split(","):
        t0 = time.perf_counter()
        # run outside the checkout: "python -c" puts the working directory first on sys.path,
        # which would shadow --pythonpath
        out = subprocess.run([sys.executable, "-c", CHILD, case, str(args.num_obs),
                              str(args.num_samples)], env=env, cwd=tempfile.gettempdir(),
                             capture_output=True, text=True)
        if out.returncode:
            print(f"{case}: failed after {time.perf_counter() - t0:.0f} s\n{out.stderr[-3000:]}")
            continue
        row = {"label": args.label, **json.loads(out.stdout.strip().splitlines()[-1])}
        rows.append(row)
        print(f"{args.label:>8} {case:>8}: peak {row['peak_rss_mb']:7.1f} MB (before the fit "
              f"{row['rss_before_fit_mb']:6.1f}, sampling {row['sampling_peak_mb']:7.1f}); after "
              f"sampling {row['rss_after_sampling_mb']:7.1f} MB, post-processing peak "
              f"{row['postprocess_peak_mb']:7.1f} MB (+{row['postprocess_above_mb']:7.1f}); group "
              f"{row['group_mb']:6.1f} MB; {row['wall_s']:.1f} s", flush=True)
    if args.out and rows:
        new = not os.path.exists(args.out)
        with open(args.out, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
