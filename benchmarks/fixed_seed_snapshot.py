"""Fixed-seed NUTS fits to an .npz, and a comparison of two such files: the check that a
refactor of the engine changed no number (this round's kit port: max abs diff 0.0).

    python benchmarks/fixed_seed_snapshot.py snap before.npz          # float32 cases
    python benchmarks/fixed_seed_snapshot.py snap before64.npz --x64  # float64 cases
    ... change the code ...
    python benchmarks/fixed_seed_snapshot.py snap after.npz
    python benchmarks/fixed_seed_snapshot.py compare before.npz after.npz

The cases cover dense and diagonal metrics, thinning over several chunks, sequential chains,
an init from a point and from the prior, num_warmup=0 and run_many over three datasets.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import numpy as np


def snapshot(path: str, x64: bool) -> None:
    import jax

    if x64:
        jax.config.update("jax_enable_x64", True)
    warnings.simplefilter("ignore")  # the small fits are flagged; the numbers are what matters
    import bayeslik as bl
    from bayeslik.engines import nuts
    from bayeslik.models import reference

    out: dict[str, np.ndarray] = {}

    def put(tag, fit):
        for group in ("posterior", "sample_stats", "log_likelihood"):
            for k, v in fit.idata[group].data_vars.items():
                out[f"{tag}/{group}/{k}"] = np.asarray(v.values)
        out[f"{tag}/grads"] = np.asarray(fit.cost.num_grad_evals)
        out[f"{tag}/flags"] = np.asarray(str(fit.flags))

    pb = dict(progress_bar=False)
    get = lambda name: reference.get(name).posterior()  # noqa: E731
    if x64:
        put("nig", bl.fit(get("normal_inverse_gamma"), "nuts", seed=0, num_warmup=300,
                          num_samples=200, **pb))
        put("cg_dense", bl.fit(get("correlated_gaussian"), "nuts", seed=1, num_warmup=200,
                               num_samples=100, dense_mass=True, **pb))
    else:
        put("nm", bl.fit(get("normal_mean"), "nuts", seed=0, num_warmup=300, num_samples=200, **pb))
        put("es_dense", bl.fit(get("eight_schools"), "nuts", seed=1, num_warmup=300,
                               num_samples=200, dense_mass=True, **pb))
        put("cg_thin", bl.fit(get("correlated_gaussian"), "nuts", seed=2, num_warmup=150,
                              num_samples=100, thinning=3, num_chunks=3, **pb))
        put("nig_seq", bl.fit(get("normal_inverse_gamma"), "nuts", seed=3, num_warmup=100,
                              num_samples=50, chain_method="sequential", num_chains=3, **pb))
        put("nig_point", bl.fit(get("normal_inverse_gamma"), "nuts", seed=4, num_warmup=30,
                                num_samples=20, init={"mu": -0.7, "sigma2": 1.3}, **pb))
        put("nig_prior", bl.fit(get("normal_inverse_gamma"), "nuts", seed=5, num_warmup=19,
                                num_samples=20, init="prior", max_tree_depth=3, **pb))
        base = get("normal_mean")
        rng = np.random.default_rng(0)
        posts = [base.replace_data(y=rng.normal(m, 1.0, size=20).astype(np.float32))
                 for m in (-2, 0, 3)]
        cfg = nuts.NUTSConfig(num_warmup=100, num_samples=40, num_chains=2, progress_bar=False)
        for i, f in enumerate(nuts.run_many(posts, [jax.random.key(i) for i in range(3)], cfg)):
            put(f"many{i}", f)
        put("nw0", bl.fit(base, "nuts", seed=7, num_warmup=0, num_samples=10, **pb))
    np.savez(path, **out)
    print(f"saved {len(out)} arrays to {path}")


def compare(a_path: str, b_path: str) -> int:
    a, b = np.load(a_path), np.load(b_path)
    only = sorted(set(a.files) ^ set(b.files))
    worst = 0.0
    for k in sorted(set(a.files) & set(b.files)):
        x, y = a[k], b[k]
        if x.dtype.kind in "fiub":
            if x.shape != y.shape:
                print("shape differs:", k, x.shape, y.shape)
                worst = np.inf
                continue
            d = float(np.max(np.abs(x.astype(float) - y.astype(float)))) if x.size else 0.0
            if d > 0:
                print("differs:", k, d)
            worst = max(worst, d)
        elif str(x) != str(y):
            print("text differs:", k, "\n  ", x, "\n  ", y)
            worst = np.inf
    if only:
        print("in one file only:", only)
    print("max abs diff", worst)
    return 0 if worst == 0 and not only else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("snap")
    s.add_argument("out")
    s.add_argument("--x64", action="store_true")
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    args = p.parse_args()
    if args.cmd == "snap":
        snapshot(args.out, args.x64)
        return 0
    return compare(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())
