"""The ``bayeslik`` command.

    bayeslik demo [--out DIR] [--quick]     fit the bundled reference problems, print and save a table
    bayeslik models                          list the bundled models
    bayeslik fit MODEL [--engine nuts] [--data FILE] [--seed 0] [--out FILE.nc] [--set key=value ...]
    bayeslik compare MODEL [--engines nuts smc ...] [--data FILE] [--seeds 1] [--out DIR]
                           [--set engine.key=value ...]
    bayeslik sbc MODEL [--engine nuts] [--simulations 100] [--draws 100] [--out DIR] [--set ...]

Exit codes: 0 success, 1 a bayeslik error (bad model, data or engine option; the message says
which), 2 bad command-line usage or an unknown model, 3 an SBC run that failed calibration,
130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable


def _bundled() -> dict[str, tuple[str, Callable[[], tuple[Callable, dict, dict | None]]]]:
    """name -> (description, loader returning (model, data, exact-or-reference))."""
    from bayeslik.models import posteriordb, reference

    out: dict[str, Any] = {}
    for name in reference.names():
        def load(name=name):
            p = reference.get(name)
            return p.model, p.data, p
        out[name] = ("reference problem: " + reference.get(name).description, load)
    for name in posteriordb.names():
        def load_pdb(name=name):
            p = posteriordb.load(name)
            return p["model"], p["data"], None
        out[name] = ("posteriordb posterior with reference draws", load_pdb)
    return out


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _cmd_models(args) -> int:
    for name, (desc, _) in _bundled().items():
        print(f"{name:45s} {desc}")
    return 0


class _UsageError(Exception):
    pass


def _options(items: list[str] | None) -> dict[str, Any]:
    options = {}
    for item in items or []:
        if "=" not in item:
            raise _UsageError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        options[k] = _parse_value(v)
    return options


def _load_model(name: str):
    models = _bundled()
    if name not in models:
        raise _UsageError(f"unknown model {name!r}; `bayeslik models` lists them.")
    return models[name][1]()


def _cmd_sbc(args) -> int:
    from bayeslik.sbc import sbc

    model, data, _ = _load_model(args.model)
    res = sbc(model, args.engine, num_simulations=args.simulations, num_draws=args.draws,
              seed=args.seed, engine_options=_options(args.set), **data)
    print(res)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        res.table.to_csv(os.path.join(args.out, f"sbc_{args.model}_{args.engine}.csv"))
        res.plot().savefig(os.path.join(args.out, f"sbc_{args.model}_{args.engine}.png"), dpi=110)
        print(f"written: {args.out}/sbc_{args.model}_{args.engine}.csv and .png")
    return 0 if res.passed else 3


def _read_data(path: str | None, data: dict) -> dict:
    """The bundled data with the arguments in ``path`` (.npz, or .json of lists/numbers) replaced."""
    if path is None:
        return data
    import numpy as np

    if not os.path.exists(path):
        raise _UsageError(f"--data {path!r}: no such file")
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as f:
                new = {k: f[k] for k in f.files}
        elif path.endswith(".json"):
            with open(path) as f:
                new = json.load(f)
            if not isinstance(new, dict):
                raise ValueError("the JSON file must hold an object {argument: value}")
            new = {k: np.asarray(v) if isinstance(v, list) else v for k, v in new.items()}
        else:
            raise ValueError("use a .npz file (numpy.savez) or a .json object")
    except (OSError, ValueError) as e:
        raise _UsageError(f"--data {path!r} cannot be read: {e}") from None
    unknown = sorted(set(new) - set(data))
    if unknown:
        raise _UsageError(f"--data {path!r} has {unknown}, which the model does not take; its "
                          f"data arguments are {sorted(data)}")
    return {**data, **new}


def _cmd_fit(args) -> int:
    import bayeslik as bl

    options = _options(args.set)
    model, data, _ = _load_model(args.model)
    post = bl.Posterior(model, **_read_data(args.data, data))
    fit = bl.fit(post, args.engine, seed=args.seed, **options)
    print(fit)
    if args.out:
        fit.save(args.out)
        print(f"saved {args.out}")
    return 0


def _cmd_compare(args) -> int:
    import bayeslik as bl

    model, data, truth = _load_model(args.model)
    post = bl.Posterior(model, **_read_data(args.data, data))
    per_engine: dict[str, dict] = {}
    for key, value in _options(args.set).items():
        engine, dot, option = key.partition(".")
        if not dot or engine not in args.engines:
            raise _UsageError(f"--set {key}=...: compare options are ENGINE.OPTION=VALUE with "
                              f"ENGINE among {args.engines}")
        per_engine.setdefault(engine, {})[option] = value
    ref = truth if truth is not None and args.data is None else None
    cmp = bl.compare(post, args.engines, reference=ref, seeds=args.seeds,
                     engine_options=per_engine, progress_bar=not args.quiet)
    print(cmp)
    if args.out:
        paths = cmp.save(args.out)
        print(f"written: {len(paths)} files in {args.out}/ (table.csv, figures, one netCDF per fit)")
    return 0 if (cmp.table["status"] == "ok").all() else 1


def _cmd_demo(args) -> int:
    """The README's main job: NUTS on every bundled reference problem, checked against its
    exact answer (or posteriordb reference draws), a table printed and written to --out."""
    import numpy as np
    import pandas as pd

    import bayeslik as bl
    from bayeslik.diagnostics import error_vs_reference
    from bayeslik.models import reference

    os.makedirs(args.out, exist_ok=True)
    size = dict(num_warmup=300, num_samples=300) if args.quick else dict(num_warmup=1000, num_samples=1000)
    rows = []
    for name in reference.names():
        prob = reference.get(name)
        post = prob.posterior()
        t = time.perf_counter()
        fit = bl.fit(post, "nuts", seed=args.seed, num_chains=4, progress_bar=not args.quiet, **size)
        wall = time.perf_counter() - t
        fit.save(os.path.join(args.out, f"{name}.nc"))
        print(f"\n== {name}: {prob.description}")
        print(fit)
        summ = fit.summary(round_to="none")
        if prob.posterior_mean:
            err = error_vs_reference(fit, mean=prob.posterior_mean, sd=prob.posterior_sd)
        else:
            err = error_vs_reference(fit, draws=prob.reference_draws)
        worst_z = max(float(np.max(np.abs(e["z"]))) for e in err.values())
        worst_sd = max(float(np.max(np.abs(e["sd_ratio"] - 1))) for e in err.values())
        rows.append({
            "problem": name,
            "wall_s": round(wall, 2),
            "compile_s": round(fit.cost.compile_s, 2),
            "grad_evals": fit.cost.num_grad_evals,
            "min_ess_bulk": int(summ["ess_bulk"].min()),
            "max_rhat": round(float(summ["r_hat"].max()), 3),
            "divergences": int(fit.idata["sample_stats"]["diverging"].sum()),
            "max_|mean err|/mcse": round(worst_z, 2),
            "max_|sd/sd_ref-1|": round(worst_sd, 3),
            "truth": "exact" if prob.posterior_mean else "posteriordb draws",
        })
    table = pd.DataFrame(rows)
    path = os.path.join(args.out, "demo_nuts.csv")
    table.to_csv(path, index=False)
    print("\n" + table.to_string(index=False))
    print(f"\nwritten: {path} and one netCDF Fit per problem in {args.out}/")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bayeslik", description="bayeslik: models, engines, fits.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="fit the bundled reference problems with NUTS; print and save a table")
    p.add_argument("--out", default="bayeslik-output", help="folder for the table and fits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="fewer draws (a smoke run)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser("models", help="list the bundled models")
    p.set_defaults(func=_cmd_models)
    p = sub.add_parser("fit", help="fit one bundled model")
    p.add_argument("model")
    p.add_argument("--engine", default="nuts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, help=".npz or .json file replacing some of the model's data")
    p.add_argument("--out", default=None, help="save the Fit to this netCDF file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="engine option, e.g. num_samples=500")
    p.set_defaults(func=_cmd_fit)
    p = sub.add_parser("compare", help="run several engines on one bundled model and compare them")
    p.add_argument("model")
    p.add_argument("--engines", nargs="+", default=["nuts"])
    p.add_argument("--data", default=None, help=".npz or .json file replacing some of the model's data")
    p.add_argument("--seeds", type=int, default=1, help="runs per engine (seeds 0..n-1)")
    p.add_argument("--out", default=None, help="folder for table.csv, figures and fits")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--set", action="append", metavar="ENGINE.KEY=VALUE",
                   help="an engine's option, e.g. nuts.num_samples=500")
    p.set_defaults(func=_cmd_compare)
    p = sub.add_parser("sbc", help="simulation-based calibration of an engine on a bundled model")
    p.add_argument("model")
    p.add_argument("--engine", default="nuts")
    p.add_argument("--simulations", type=int, default=100)
    p.add_argument("--draws", type=int, default=100, help="at most this many posterior draws per fit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for the table (CSV) and the figure (PNG)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="engine option")
    p.set_defaults(func=_cmd_sbc)
    args = parser.parse_args(argv)
    from bayeslik.errors import BayeslikError

    try:
        return args.func(args)
    except _UsageError as e:
        print(f"bayeslik: {e}", file=sys.stderr)
        return 2
    except BayeslikError as e:
        print(f"bayeslik: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bayeslik: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
