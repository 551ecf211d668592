"""Which true points should the likelihood surrogate train on?  A study on LogGamma 4-D.

One plain dynesty run (300 live points, seed 0) records every point it evaluates. At several
moments of the run (after 1,214 / 2,419 / 4,829 / 9,631 calls, where the surrogate's trainings
fall) an ensemble is trained offline on two windows of the points seen so far:

* ``recent``: the most recent ``train_size`` points (the surrogate's window before
  ``top_fraction`` existed);
* ``top``: the ``top_fraction`` share with the highest log-likelihoods of the whole run plus the
  most recent others (``SurrogateLikelihood._window_rows``).

Each is scored twice: by the surrogate's own held-out check (RMS of error / s on held-out window
points above the window's median) and on the points the run evaluated *afterwards* (the next
1,500) that lie above the contour of the time (approximated by the 300th-highest value so
far): the points the surrogate must get right. Run: ``python benchmarks/surrogate_window_study.py
[--top-fraction 0.7] [--kind additive --width 32 --depth 2 --lr 0.003] [--windows top]``;
figures in docs/surrogates.md.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from bayeslik.engines import nested
from bayeslik.models import nested_suite
from bayeslik.surrogate import network as net
from bayeslik.surrogate.likelihood import SurrogateLikelihood, SurrogateOptions


def record_run(num_live: int = 300, seed: int = 0):
    post = nested_suite._loggamma(4).posterior()
    rec = []

    def wrapper(true_fn, posterior, key):
        def fn(u):
            v = np.asarray(true_fn(u))
            rec.append((np.array(u), v))
            return v
        return fn

    config = nested.NestedConfig(num_live=num_live, progress_bar=False)
    nested.run(post, jax.random.key(seed), config, loglikelihood_wrapper=wrapper)
    return np.concatenate([r[0] for r in rec]), np.concatenate([r[1] for r in rec])


def score(U, Y, n, mode, top_fraction, arch, num_live=300):
    opts = SurrogateOptions(inputs="cube", train_size=1000,
                            top_fraction=top_fraction if mode == "top" else 0.0)
    w = SurrogateLikelihood(opts, num_live=num_live)
    w(lambda u: None, None, jax.random.key(0))
    w._full_acc = opts.full_accuracy(U.shape[1])
    w._x, w._y, w._y_ref = list(U[:n]), list(Y[:n]), float(Y[:n].max())
    x, y, w_train, w_check, check, _, _ = w._window()
    ens, _ = net.train_ensemble(jax.random.key(1), x, y, w_train, w_check, arch, num_members=4,
                                max_steps=2000, chunk=200, patience=2)
    m, _ = net.predict(ens, x[check])
    held_out = float(np.sqrt(np.mean(((m - y[check]) / w._scale(y[check])) ** 2)))
    contour = np.sort(Y[:n])[-num_live]
    later = np.arange(n, min(n + 1500, len(Y)))
    later = later[Y[later] >= contour]
    m, _ = net.predict(ens, U[later])
    future = float(np.sqrt(np.mean(((m - Y[later]) / w._scale(Y[later])) ** 2)))
    return held_out, future, len(later)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--top-fraction", type=float, default=0.7)
    ap.add_argument("--kind", default="mlp", choices=net.KINDS)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--windows", default="recent,top")
    args = ap.parse_args()
    arch = net.Architecture(args.width, args.depth, args.lr, args.kind)
    U, Y = record_run()
    print(f"plain run: {len(Y)} true calls")
    print(f"network {arch}")
    print("calls  window  held-out check  error on later points above the contour (n)")
    for n in (1214, 2419, 4829, 9631):
        for mode in args.windows.split(","):
            h, f, k = score(U, Y, n, mode, args.top_fraction, arch)
            print(f"{n:5d}  {mode:6s}  {h:14.3f}  {f:8.3f} ({k})", flush=True)


if __name__ == "__main__":
    main()
