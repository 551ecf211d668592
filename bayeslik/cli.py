"""The ``bayeslik`` command.

    bayeslik demo [--out DIR] [--quick] [--cmapss-engines nuts smc]
                                             every engine on a reference problem; C-MAPSS RUL
                                             (AR-HMM, degradation-path model)
    bayeslik models                          list the bundled models
    bayeslik fit MODEL [--engine nuts] [--data FILE ...] [--seed 0] [--out FILE.nc] [--quiet]
                       [--log-likelihood auto|yes|no] [--set key=value ...]
    bayeslik compare MODEL [--engines nuts smc ...] [--data FILE ...] [--seeds 1] [--out DIR]
                           [--set engine.key=value ...]
    bayeslik sbc MODEL [--engine nuts] [--data FILE ...] [--simulations 100] [--draws 100]
                       [--out DIR] [--set ...]
    bayeslik --version

MODEL is a bundled model's name (``bayeslik models``) or a user's program, ``path/file.py:name``
(``path/file.py`` alone: the callable ``model``). The file is imported as a Python module, so
its code runs (that is the user's choice: give only files you trust), and ``--data`` (.csv
columns, .npz arrays or a .json object) gives the model's keyword arguments by name.

Exit codes: 0 success, 1 a bayeslik error (bad model, data or engine option; the message says
which), 2 bad command-line usage or an unknown model, 3 an SBC run that failed calibration,
130 interrupted (a partial Fit an engine kept is still printed and saved; an engine that kept
nothing says why, e.g. SMC before its first run reached lambda = 1).

SIGTERM (what ``timeout``, a batch scheduler's time limit or ``kill`` send) is handled as Ctrl-C:
it raises KeyboardInterrupt in the command, so an engine that keeps a partial Fit on Ctrl-C
(NUTS: the draws made; SMC: the completed runs) keeps it, flagged ``interrupted: ...``, and
``bayeslik fit --out`` saves it before exiting with 130. The engine stops at its next Python
step (after the compiled chunk or stage it is in); a second SIGTERM interrupts what is running
then (e.g. the save), and SIGKILL cannot be caught at all, so give a time limit a grace period
(``timeout -k 60 ...``). ``bayeslik compare`` keeps its finished runs and writes them, as on
Ctrl-C; ``bayeslik demo`` finishes the part it was in with what its interrupted fit kept and
stops before the next part (exit 130).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import warnings
from typing import Any, Callable


#: The model families with a bundled default problem: CLI name -> (module in bayeslik.models,
#: description). Each module has ``example() -> (model, data)``; a module not (yet) present is
#: left out of the zoo.
FAMILIES = {
    "arhmm": ("arhmm", "AR-HMM (2 states, AR(1)) on a simulated series of 300 steps"),
    "cosmology": ("cosmology", "flat LCDM on cosmic chronometers + Pantheon + BAO"),
    "mixture": ("mixture", "heterogeneous Gaussian mixture on simulated clusters"),
    "meta": ("meta", "hierarchical few-shot meta-learner (NIW prior) on simulated tasks"),
    "hawkes": ("tpp", "multivariate Hawkes process on bundled earthquake months"),
    "lognormmix": ("tpp", "time-mark dependent log-normal mixture TPP on bundled earthquake months"),
}


def _family_loader(module: str, name: str):
    import importlib

    mod = importlib.import_module(f"bayeslik.models.{module}")
    fn = getattr(mod, f"example_{name}", None) if name != module else None
    model, data = (fn or mod.example)()
    return model, data, None


def _bundled() -> dict[str, tuple[str, Callable[[], tuple[Callable, dict, dict | None]]]]:
    """name -> (description, loader returning (model, data, exact-or-reference))."""
    import importlib.util

    from bayeslik.models import posteriordb, reference

    out: dict[str, Any] = {}
    for name, (module, desc) in FAMILIES.items():
        if importlib.util.find_spec(f"bayeslik.models.{module}") is not None:
            out[name] = (desc, lambda module=module, name=name: _family_loader(module, name))
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


def _user_model_spec(name: str) -> tuple[str, str] | None:
    """(file, callable) when MODEL names a Python file: ``path/file.py:name``, or
    ``path/file.py`` for its callable ``model``; None for a bundled model's name."""
    path, sep, attr = name.rpartition(":")
    if sep and path.endswith(".py"):
        return path, attr
    if name.endswith(".py"):
        return name, "model"
    return None


def _load_user_model(path: str, attr: str) -> Callable:
    """The callable ``attr`` of the Python file ``path``, run as a module (its own folder first
    on ``sys.path`` meanwhile, so that it can import its neighbours)."""
    import importlib.util
    import re
    import traceback

    from bayeslik.errors import ModelError

    if not os.path.isfile(path):
        raise _UsageError(f"model file {path!r}: no such file")
    if not attr.isidentifier():
        raise _UsageError(f"model {path}:{attr}: give the name of a callable after the colon, "
                          f"e.g. {path}:model")
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    modname = f"bayeslik_user_model_{stem}"
    spec = importlib.util.spec_from_file_location(modname, path)
    if spec is None or spec.loader is None:
        raise _UsageError(f"model file {path!r} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[modname] = module  # dataclasses, pickling and relative lookups find it there
    folder = os.path.dirname(os.path.abspath(path))
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(modname, None)
        frames = [f for f in traceback.extract_tb(e.__traceback__)
                  if os.path.abspath(f.filename) == os.path.abspath(path)]
        where = f" (line {frames[-1].lineno})" if frames else ""
        raise ModelError(f"running the model file {path!r} raised {type(e).__name__}{where}: "
                         f"{e}") from e
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    fn = getattr(module, attr, None)
    if not callable(fn):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                       and getattr(v, "__module__", None) == modname)
        what = "has no" if fn is None else "has a non-callable"
        raise _UsageError(f"model file {path!r} {what} {attr!r}; the callables it defines are "
                          f"{found} (give one as {path}:NAME)")
    return fn


def _load_model(name: str, data_paths: list[str] | None = None):
    """(model, data, exact-or-reference) of a bundled model or a user's ``file.py:name``, with
    the data files of ``--data`` read in."""
    user = _user_model_spec(name)
    if user is not None:
        model = _load_user_model(*user)
        data = _read_data(data_paths)
        _check_arguments(name, model, data, data_paths)
        return model, data, None
    models = _bundled()
    if name not in models:
        raise _UsageError(f"unknown model {name!r}; `bayeslik models` lists them, or give your "
                          "own program as path/file.py:NAME.")
    model, data, truth = models[name][1]()
    new = _read_data(data_paths)
    unknown = sorted(set(new) - set(data))
    if unknown:
        raise _UsageError(f"--data {_shown(data_paths)} has {unknown}, which the model does not "
                          f"take; its data arguments are {sorted(data)}")
    return model, {**data, **new}, truth


def _shown(paths: list[str] | None) -> str:
    return " ".join(repr(p) for p in paths or [])


def _check_arguments(name: str, model: Callable, data: dict, paths: list[str] | None) -> None:
    """The data's names against the user model's signature: unknown names and required
    arguments left out are one message naming them."""
    import inspect

    try:
        sig = inspect.signature(model)
    except (TypeError, ValueError):  # a callable without a signature: the model call will tell
        return
    params = list(sig.parameters.values())
    by_name = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    takes = [p.name for p in params if p.kind in by_name]
    any_name = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    unknown = [] if any_name else sorted(set(data) - set(takes))
    missing = [p.name for p in params if p.default is inspect.Parameter.empty
               and p.kind in by_name and p.name not in data]
    positional = [p.name for p in params if p.default is inspect.Parameter.empty
                  and p.kind is inspect.Parameter.POSITIONAL_ONLY]
    problems = []
    source = f"--data {_shown(paths)}" if paths else "no --data"
    if positional:
        problems.append(f"its positional-only argument(s) {positional} cannot be given by name "
                        "(remove the '/' from its signature)")
    if unknown:
        problems.append(f"{source} gives {unknown}, which it does not take")
    if missing:
        problems.append(f"it needs {missing}, which {source} does not give"
                        if paths else f"it needs {missing} (give them with --data FILE)")
    if problems:
        raise _UsageError(f"model {name} takes {takes}" + ("" if not any_name else " and **kwargs")
                          + ": " + "; ".join(problems))


def _cmd_sbc(args) -> int:
    from bayeslik.sbc import sbc

    model, data, _ = _load_model(args.model, args.data)
    res = sbc(model, args.engine, num_simulations=args.simulations, num_draws=args.draws,
              seed=args.seed, engine_options=_options(args.set), **data)
    print(res)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        res.table.to_csv(os.path.join(args.out, f"sbc_{args.model}_{args.engine}.csv"))
        res.plot().savefig(os.path.join(args.out, f"sbc_{args.model}_{args.engine}.png"), dpi=110)
        print(f"written: {args.out}/sbc_{args.model}_{args.engine}.csv and .png")
    return 0 if res.passed else 3


def _read_data(paths: list[str] | None) -> dict:
    """The arguments in the ``--data`` files, by name (a later file wins): a .csv's columns, a
    .npz's arrays (read without pickle), a .json object's entries (lists become arrays)."""
    new: dict[str, Any] = {}
    for path in paths or []:
        new.update(_read_data_file(path))
    return new


def _read_data_file(path: str) -> dict:
    import numpy as np

    from bayeslik.errors import DataError

    if not os.path.exists(path):
        raise _UsageError(f"--data {path!r}: no such file")
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        if path.endswith(".json"):
            with open(path) as f:
                new = json.load(f)
            if not isinstance(new, dict):
                raise DataError("the JSON file must hold an object {argument: value}")
            return {k: np.asarray(v) if isinstance(v, list) else v for k, v in new.items()}
        if path.endswith(".csv"):
            import pandas as pd

            table = pd.read_csv(path, skipinitialspace=True)
            table.columns = [str(c).strip() for c in table.columns]
            if table.empty:
                raise DataError("the file has a header but no rows")
            text = [c for c in table.columns if not (pd.api.types.is_numeric_dtype(table[c])
                                                     or pd.api.types.is_bool_dtype(table[c]))]
            if text:
                raise DataError(f"column(s) {text} are not numbers (first value "
                                f"{table[text[0]].iloc[0]!r}); the columns become the model's "
                                "arguments and must hold numbers")
            return {c: table[c].to_numpy() for c in table.columns}
        raise DataError("use a .csv file (a header row of argument names), a .npz file "
                        "(numpy.savez) or a .json object")
    except (OSError, ValueError) as e:
        raise _UsageError(f"--data {path!r} cannot be read: {e}") from None


def _check_out(path: str | None, folder: bool) -> None:
    """--out is checked before the run: a bad target must not cost a finished run. A file
    needs a writable existing directory; a folder (made if missing) its nearest existing
    ancestor writable."""
    if not path:
        return
    path = os.path.abspath(path)
    if not folder:  # a file: the checks Fit.save makes before it writes
        from bayeslik.fit import save_path_problem

        why = save_path_problem(path)
        if why is not None:
            raise _UsageError(f"--out {path!r}: {why} (nothing was run)")
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise _UsageError(f"--out {path!r} is a file; give a folder (nothing was run)")
    where = path
    while not os.path.exists(where):
        where = os.path.dirname(where)
    if not os.access(where, os.W_OK | os.X_OK):
        raise _UsageError(f"--out {path!r}: {where!r} is not writable (nothing was run)")


#: --log-likelihood's choices -> bl.fit's ``log_likelihood``
LOG_LIKELIHOOD = {"auto": "auto", "yes": True, "no": False}


def _engine_takes(engine: str, option: str) -> bool:
    """Whether the registered engine ``engine`` has the setting ``option`` (False when unknown:
    bl.fit then names the engines)."""
    import dataclasses

    from bayeslik.api import engine_spec
    from bayeslik.errors import EngineError

    try:
        return option in {f.name for f in dataclasses.fields(engine_spec(engine).config_cls)}
    except EngineError:
        return False


def _save_or_rescue(fit, path: str) -> int:
    """Save ``fit`` at ``path``; if that fails (the run is done), save it in the temporary
    folder or the working folder instead and say where. Returns the exit code."""
    import tempfile

    try:
        fit.save(path)
    except Exception as e:  # noqa: BLE001 - whatever failed, the finished run must not be lost
        why = _one_line(e)
        for folder in (tempfile.gettempdir(), os.getcwd()):
            try:
                fd, rescue = tempfile.mkstemp(prefix="bayeslik-fit-", suffix=".nc", dir=folder)
                os.close(fd)
                fit.save(rescue)
            except Exception:  # noqa: BLE001 - try the next place
                continue
            print(f"bayeslik: could not save {path}: {why}; the fit is saved at {rescue} instead "
                  f"(move it where you want it)", file=sys.stderr)
            return 1
        print(f"bayeslik: could not save {path}: {why}; nor in {tempfile.gettempdir()!r} or the "
              "working folder: the fit is lost, its summary is above", file=sys.stderr)
        return 1
    print(f"saved {path}")
    return 0


def _cmd_fit(args) -> int:
    import bayeslik as bl

    options = _options(args.set)
    _check_out(args.out, folder=False)
    if args.quiet and "progress_bar" not in options and _engine_takes(args.engine, "progress_bar"):
        options["progress_bar"] = False
    model, data, _ = _load_model(args.model, args.data)
    post = bl.Posterior(model, **data)
    fit = bl.fit(post, args.engine, seed=args.seed,
                 log_likelihood=LOG_LIKELIHOOD[args.log_likelihood], **options)
    print(fit)
    code = _save_or_rescue(fit, args.out) if args.out else 0
    if any(flag.startswith("interrupted") for flag in fit.flags):
        print("bayeslik: interrupted; the engine kept a partial fit (see its flags above)",
              file=sys.stderr)
        return 130
    return code


def _cmd_compare(args) -> int:
    import bayeslik as bl

    model, data, truth = _load_model(args.model, args.data)
    post = bl.Posterior(model, **data)
    per_engine: dict[str, dict] = {}
    for key, value in _options(args.set).items():
        engine, dot, option = key.partition(".")
        if not dot or engine not in args.engines:
            raise _UsageError(f"--set {key}=...: compare options are ENGINE.OPTION=VALUE with "
                              f"ENGINE among {args.engines}")
        per_engine.setdefault(engine, {})[option] = value
    _check_out(args.out, folder=True)
    ref = truth if truth is not None and args.data is None else None
    cmp = bl.compare(post, args.engines, reference=ref, seeds=args.seeds,
                     engine_options=per_engine, progress_bar=not args.quiet)
    print(cmp)
    if args.out:
        paths = cmp.save(args.out)
        print(f"written: {len(paths)} files in {args.out}/ (table.csv, figures, one netCDF per fit)")
    return 0 if (cmp.table["status"] == "ok").all() else 1


#: The demo's engines for a generic posterior, in this order, where registered.
DEMO_ENGINES = ("nuts", "smc", "nested", "nss", "nested+surrogate")


def _demo_engine_options(quick: bool) -> dict[str, dict]:
    if quick:
        return {"nuts": dict(num_warmup=200, num_samples=200, num_chains=2),
                "smc": dict(num_particles=300), "nested": dict(num_live=75),
                "nss": dict(num_live=75), "nested+surrogate": dict(num_live=75)}
    return {"nuts": dict(num_warmup=1000, num_samples=1000, num_chains=4),
            "smc": dict(num_particles=2000), "nested": dict(num_live=300),
            "nss": dict(num_live=500), "nested+surrogate": dict(num_live=300)}


def _cmd_demo(args) -> int:
    """The README's main job, on bundled data: (1) every engine on a reference problem with an
    exact posterior and evidence, compared in one table; (2) the partially-hidden AR-HMM of
    C-MAPSS FD001 fitted with NUTS (and SMC with ``--cmapss-engines nuts smc``), with the
    remaining useful life of the 100 test engines scored against the truth beside a regression
    baseline. Tables, figures and fits are written under --out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd

    import bayeslik as bl
    from bayeslik.models import arhmm, cmapss, reference
    from bayeslik.errors import BayeslikError
    from bayeslik.models import cmapss_degradation as cdeg

    out = args.out
    os.makedirs(out, exist_ok=True)
    show = not args.quiet
    available = set(bl.engines.available())
    engines = [e for e in DEMO_ENGINES if e in available]
    # each engine's own bar too (compare turns them off by default): some runs take minutes
    options = {e: dict(o, progress_bar=show) for e, o in _demo_engine_options(args.quick).items()
               if e in engines}

    # 1. every engine on a problem whose answer is known exactly
    # 4-D: big enough for the engines to differ, small enough that the dynesty-based ones (pure
    # Python per point) take a minute or two rather than ten on two cores
    prob = reference.get("normal_mean") if args.quick else reference.correlated_gaussian(dim=4)
    print(f"== 1. {len(engines)} engines on '{prob.name}': {prob.description}")
    cmp = bl.compare(prob.posterior(), engines, reference=prob, seeds=[args.seed],
                     engine_options=options, progress_bar=show)
    cmp.save(os.path.join(out, "reference"))
    print(cmp)
    _stop_if_terminated()

    # 2. the partially-hidden AR-HMM of C-MAPSS (NUTS; --cmapss-engines adds SMC), and the RUL
    # of the test engines
    K, units = (3, 3) if args.quick else (4, 5)
    print(f"\n== 2. C-MAPSS FD001: partially-hidden AR-HMM, K={K} stages, {units} training "
          "engines; RUL of the 100 test engines")
    d = cmapss.load()
    hi = cmapss.HealthIndicator.fit(d["train"])
    tr = cmapss.degradation_data(d["train"][d["train"]["unit"] <= units], hi, K,
                                 run_to_failure=True)
    te = cmapss.degradation_data(d["test"], hi, K, run_to_failure=False)
    num_train = int(d["train"]["unit"].nunique())
    post = bl.Posterior(arhmm.model, y=tr["y"], num_states=K, left_to_right=True,
                        labels=tr["labels"], mask=tr["mask"])
    # NUTS starts at the model's default init (arhmm.mode_init: the cheap estimate refined to the
    # posterior mode). From the cheap estimate alone (arhmm.init_params, 47 nats below the mode)
    # seed 0 had one chain in a poorer mode (R-hat 1.52), later one that adapted a step size 36x
    # smaller than the others' and mixed slowly (R-hat 1.16, all its iterations at depth 8);
    # from the mode: R-hat 1.005, bulk ESS >= 1700, no flag
    nuts_hmm = dict(options.get("nuts", {}), max_tree_depth=8)
    if not args.quick:
        # 4 chains x 500 draws: the RUL summaries need no more. target_accept 0.9: at 0.8 (seed
        # 0, the old warmup and start) there were divergences
        nuts_hmm.update(num_warmup=500, num_samples=500, target_accept=0.9)
    hmm_engines = list(dict.fromkeys(args.cmapss_engines))
    # SMC on this posterior is slow: about a minute per tempering stage with 300 particles on two
    # CPU cores, and the temperature still at 0.001 after two stages; so NUTS only by default
    hmm_opts = {"nuts": nuts_hmm, "smc": dict(num_particles=300, progress_bar=show)}
    hmm_opts = {e: o for e, o in hmm_opts.items() if e in hmm_engines}
    cmp2 = bl.compare(post, hmm_engines, seeds=[args.seed], engine_options=hmm_opts,
                      progress_bar=show)
    cmp2.save(os.path.join(out, "cmapss"))
    print(cmp2)
    # 3. the hierarchical degradation-path model (benchmarks/cmapss_rul.py's best on FD001):
    # NUTS on the run-to-failure engines and the 100 test engines' sensor paths (never their
    # RUL) in one program; each test engine's RUL is a parameter, its posterior the prediction
    _stop_if_terminated()
    deg_units = 10 if args.quick else num_train
    print(f"\n== 3. C-MAPSS FD001: hierarchical degradation-path model, {deg_units} training "
          "engines and the 100 test engines' paths; RUL of the 100 test engines")
    train_p = cdeg.paths(d["train"][d["train"]["unit"] <= deg_units], hi, run_to_failure=True)
    test_p = cdeg.paths(d["test"], hi, run_to_failure=False)
    deg_data = cdeg.joint_data(train_p, test_p)
    deg_post = bl.Posterior(cdeg.model, **deg_data)
    # 2 chains (one per core of a 2-core machine). 2 x 500 after 500 warmup: 54 s on 2 cores
    # (12 s of it compiling), max R-hat 1.017 at seed 0; at 2 x 200 (42 s) it was 1.07. bl.fit
    # rather than bl.compare: the pointwise log-likelihood (200 engines x 362 cycles a draw) is
    # not kept. Its flags are FitWarnings (one stderr line each), like the comparisons' above
    deg_nuts = dict(num_warmup=50 if args.quick else 500, num_samples=50 if args.quick else 500,
                    num_chains=2, init=cdeg.init_values(deg_data), progress_bar=show)
    deg_fit, deg_row = None, {"model": "degradation path", "engine": "nuts", "seed": args.seed,
                              "train_units": deg_units}
    try:
        deg_fit = bl.fit(deg_post, "nuts", seed=args.seed, log_likelihood=False, **deg_nuts)
    except BayeslikError as e:
        deg_row["status"] = f"{type(e).__name__}: {_one_line(e)}"
    if deg_fit is not None:
        rhat = pd.to_numeric(deg_fit.summary()["r_hat"], errors="coerce")
        diverging = deg_fit.idata["sample_stats"]["diverging"]
        deg_row.update(status="ok", wall_s=round(deg_fit.cost.wall_s, 1),
                       compile_s=round(deg_fit.cost.compile_s, 1), rhat_max=float(rhat.max()),
                       divergences=int(np.asarray(diverging).sum()),
                       num_flags=len(deg_fit.flags), flags=" | ".join(deg_fit.flags))
    deg_dir = os.path.join(out, "cmapss_degradation")
    os.makedirs(deg_dir, exist_ok=True)
    deg_table = pd.DataFrame([deg_row])
    deg_table.to_csv(os.path.join(deg_dir, "table.csv"), index=False)
    with pd.option_context("display.width", 200):
        print(deg_table.drop(columns=["flags"], errors="ignore").to_string(index=False))

    truth = np.minimum(d["rul"], 125)
    test_units = np.sort(d["test"]["unit"].unique())
    preds = {}  # method -> (training engines, DataFrame by test unit with quantile columns)
    base = pd.DataFrame(index=test_units)
    for level, (lo, up) in cmapss.INTERVALS.items():
        b = cmapss.baseline_rul(d["train"], d["test"], interval=level)
        base[lo], base[up], base["median"] = b["lower"], b["upper"], b["rul"]
    preds["linear baseline"] = (num_train, base)
    for e in hmm_engines:
        if cmp2.fits[e][0] is not None:
            preds[f"AR-HMM ({e})"] = (units, cmapss.predict_rul_quantiles(
                cmp2[e], te, K, num_draws=50 if args.quick else 200))
    if deg_fit is not None:
        deg_fit.save(os.path.join(deg_dir, f"nuts_seed{args.seed}.nc"))
        q = cdeg.predict_rul(deg_fit, deg_data)
        q.index = [int(test_p["units"][i - len(train_p["units"])]) for i in q.index]
        preds["degradation path (nuts)"] = (deg_units, q)
    long = pd.concat([pd.DataFrame({"method": name, "unit": p.index.to_numpy(int),
                                    "true_rul": d["rul"][np.searchsorted(test_units, p.index)],
                                    **{c: p[c].to_numpy(float) for c in cmapss.QUANTILE_COLUMNS
                                       if c in p.columns}})
                      for name, (_, p) in preds.items()], ignore_index=True)
    long.to_csv(os.path.join(out, "cmapss", "rul_predictions.csv"), index=False)
    table = cmapss.rul_metrics(long).rename_axis("method").reset_index()
    table.insert(1, "train_units", [preds[m][0] for m in table["method"]])
    table = table.round({"rmse": 2, "phm08": 1, "width_90": 1})
    table.to_csv(os.path.join(out, "cmapss", "rul.csv"), index=False)
    # each method's 90% intervals against the truth, test engines sorted by true RUL
    order = np.argsort(truth, kind="stable")
    x = np.arange(len(order))
    fig, axes = plt.subplots(len(preds), 1, figsize=(11, 2.6 * len(preds)), sharex=True,
                             squeeze=False)
    for i, (ax, (name, (_, p))) in enumerate(zip(axes[:, 0], preds.items())):
        p = p.loc[test_units]
        ax.fill_between(x, p["q05"].to_numpy()[order], p["q95"].to_numpy()[order], alpha=0.25,
                        step="mid", color=f"C{i}", label="90% interval")
        ax.plot(x, p["median"].to_numpy()[order], ".", color=f"C{i}", label=f"{name}: median")
        ax.plot(x, truth[order], "k-", lw=1, label="true RUL (capped at 125)")
        ax.set(ylabel="RUL (cycles)")
        ax.legend(fontsize=8, loc="upper left")
    axes[-1, 0].set(xlabel="test engines, sorted by true RUL")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "cmapss", "rul.png"), dpi=110)
    plt.close(fig)
    with pd.option_context("display.width", 200):
        print("\n" + table.to_string(index=False))
    print(f"(RMSE and PHM08 of the median, coverage of the central 50/80/90/95% intervals and the "
          f"90% interval's mean width on the 100 test engines; train_units: the run-to-failure "
          f"engines each learns from; benchmarks/cmapss_rul.py fits the AR-HMM on 20)")
    for r_table, what in ((cmp2.table, "AR-HMM"), (deg_table, "degradation-path")):
        for _, r in r_table.iterrows():
            if r["status"] != "ok" or not r["rhat_max"] > 1.05:
                continue
            hint = ("a chain can get stuck in a poorer mode (seen: one where a stage is never "
                    "used); try another --seed, see cmapss/marginals.png" if what == "AR-HMM" else
                    "its RUL intervals are not yet trustworthy; try another --seed")
            print(f"bayeslik demo: note: the C-MAPSS {what} {r['engine']} chains disagree (max "
                  f"R-hat {r['rhat_max']:.2f}): {hint}", file=sys.stderr)
    print(f"\nwritten: {out}/reference/ (table.csv, figures, fits), {out}/cmapss/ "
          "(table.csv, rul.csv, rul_predictions.csv, rul.png, figures, fits) and "
          f"{out}/cmapss_degradation/ (table.csv, fit)")
    failed = pd.concat([cmp.table, cmp2.table, deg_table])
    failed = failed[failed["status"] != "ok"]
    for _, r in failed.iterrows():
        print(f"bayeslik demo: {r['engine']} failed: {r['status']}", file=sys.stderr)
    return 0 if failed.empty else 1


_MODEL_HELP = ("a bundled model (`bayeslik models` lists them) or your own NumPyro program as "
               "path/file.py:NAME (path/file.py alone: its callable `model`). The file is imported "
               "as a Python module, so its code runs (an `if __name__ == '__main__'` block does "
               "not): give only files you trust")
_DATA_HELP = ("data file: .csv (a header row; each column is the model argument of that name), "
              ".npz or .json object {argument: value}; repeat it for several files (a later one "
              "wins). For a bundled model it replaces some of the model's data")
_EPILOG = ("Exit codes: 0 success, 1 a bayeslik error (bad model, data or engine option; the "
           "message says which), 2 bad command-line usage or an unknown model, 3 an SBC run that "
           "failed calibration, 130 interrupted.")


def _version() -> str:
    """bayeslik's version from the installed distribution (no import of the package)."""
    from importlib import metadata

    try:
        return metadata.version("bayeslik")
    except metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
        import bayeslik

        return bayeslik.__version__


class _VersionAction(argparse.Action):
    """``--version``: the version is looked up only when asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help="print bayeslik's version and exit"):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"bayeslik {_version()}")
        parser.exit()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """The command's warnings: ``bayeslik: FitWarning: ...`` on one stderr line."""
    print(f"bayeslik: {category.__name__}: {_one_line(message)}", file=file or sys.stderr)


def _one_line(e: BaseException) -> str:
    """An exception's message on one line (a script reads the error from one stderr line)."""
    return " ".join(part.strip() for part in str(e).splitlines() if part.strip()) or repr(e)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bayeslik", description="bayeslik: models, engines, fits.",
                                     epilog=_EPILOG)
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="every engine on a reference problem, and the C-MAPSS AR-HMM "
                                    "with RUL predictions; tables and figures saved")
    p.add_argument("--out", default="bayeslik-output", help="folder for the table and fits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="fewer draws (a smoke run)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--cmapss-engines", nargs="+", default=["nuts"], choices=["nuts", "smc"],
                   help="engines for the C-MAPSS AR-HMM (default nuts; smc is slow there: about "
                        "a minute per tempering stage on two CPU cores)")
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser("models", help="list the bundled models")
    p.set_defaults(func=_cmd_models)
    p = sub.add_parser("fit", help="fit a bundled model or your own program (file.py:NAME)",
                       description="Fit a bundled model or your own NumPyro program, e.g. "
                                   "`bayeslik fit my_model.py:model --data d.csv --out fit.nc`.",
                       epilog=_EPILOG)
    p.add_argument("model", help=_MODEL_HELP)
    p.add_argument("--engine", default="nuts", help="engine name (default nuts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", action="append", metavar="FILE", help=_DATA_HELP)
    p.add_argument("--out", default=None,
                   help="save the Fit to this netCDF file (checked before the run; if saving "
                        "fails after it, the fit is saved in the temporary folder and the "
                        "message says where)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars: only the result (warnings still go to stderr)")
    p.add_argument("--log-likelihood", choices=sorted(LOG_LIKELIHOOD), default="auto",
                   help="keep the pointwise log-likelihood group (for LOO): auto (when it takes "
                        "at most 1 GiB), yes or no (default auto)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="engine option, e.g. num_samples=500")
    p.set_defaults(func=_cmd_fit)
    p = sub.add_parser("compare", help="run several engines on one model and compare them")
    p.add_argument("model", help=_MODEL_HELP)
    p.add_argument("--engines", nargs="+", default=["nuts"])
    p.add_argument("--data", action="append", metavar="FILE", help=_DATA_HELP)
    p.add_argument("--seeds", type=int, default=1, help="runs per engine (seeds 0..n-1)")
    p.add_argument("--out", default=None, help="folder for table.csv, figures and fits")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--set", action="append", metavar="ENGINE.KEY=VALUE",
                   help="an engine's option, e.g. nuts.num_samples=500")
    p.set_defaults(func=_cmd_compare)
    p = sub.add_parser("sbc", help="simulation-based calibration of an engine on a model")
    p.add_argument("model", help=_MODEL_HELP)
    p.add_argument("--engine", default="nuts")
    p.add_argument("--data", action="append", metavar="FILE", help=_DATA_HELP)
    p.add_argument("--simulations", type=int, default=100)
    p.add_argument("--draws", type=int, default=100, help="at most this many posterior draws per fit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for the table (CSV) and the figure (PNG)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="engine option")
    p.set_defaults(func=_cmd_sbc)
    return parser


#: set by SIGTERM's handler: a command of several parts (the demo) stops before its next part
_terminated_by: str | None = None


def _terminated(signum, frame) -> None:
    """SIGTERM's handler while a command runs: the Ctrl-C path (see the module's text)."""
    global _terminated_by
    _terminated_by = signal.Signals(signum).name
    raise KeyboardInterrupt(f"terminated by signal {_terminated_by}")


def _stop_if_terminated() -> None:
    """Between the parts of a long command: after a SIGTERM that the part in progress absorbed
    (``bl.compare`` keeps its finished runs on an interrupt), end here, not in the next part."""
    if _terminated_by is not None:
        raise KeyboardInterrupt(f"terminated by signal {_terminated_by}")


def main(argv: list[str] | None = None) -> int:
    """Run the ``bayeslik`` command on ``argv`` (default ``sys.argv[1:]``); returns the exit
    code. Nothing heavy (JAX, NumPyro, ArviZ, the models) is imported before a command runs,
    so ``--help`` and ``--version`` are quick. While it runs, SIGTERM raises KeyboardInterrupt
    (in the main thread; the previous handler comes back afterwards)."""
    global _terminated_by
    _terminated_by = None
    try:
        previous = signal.signal(signal.SIGTERM, _terminated)
    except ValueError:  # not the main thread: signals cannot be handled here
        previous = None
    try:
        return _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    try:
        args = _parser().parse_args(argv)
        from bayeslik.devices import use_cpu_cores

        use_cpu_cores()  # NUTS chains side by side on the cores (before JAX starts)
        from bayeslik.errors import BayeslikError

        try:
            with warnings.catch_warnings():  # a warning is one line, not the source line of cli.py
                warnings.showwarning = _show_warning
                return args.func(args)
        except _UsageError as e:
            print(f"bayeslik: {_one_line(e)}", file=sys.stderr)
            return 2
        except BayeslikError as e:
            print(f"bayeslik: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
            return 1
    except KeyboardInterrupt as e:
        # an engine that kept nothing says why and how to keep part of a long run
        why = str(e)
        why = " (SIGTERM)" if why.startswith("terminated by signal") else f": {why}" if why else ""
        print(f"bayeslik: interrupted{why}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
