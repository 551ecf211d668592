"""SNL on five sbibm tasks, scored by C2ST against sbibm's reference posteriors (issue #21).

Run:  python benchmarks/sbi_tasks.py [--tasks two_moons slcp gaussian_linear lotka_volterra sir]
          [--budgets 1000 10000 100000] [--observations 1] [--seed 0] [--methods snl sbijax]
          [--out benchmarks/results/sbi_tasks.csv] [--md benchmarks/results/sbi_tasks.md]
          [--draws-dir DIR] [--notes FILE] [--table-only]

Per task, simulation budget and observation: ``bl.fit(task.posterior(obs), "snl",
num_simulations=budget, num_rounds=10, seed=seed)`` (10 rounds as sbibm's SNLE; the final
posterior by NUTS, 4 chains x 2,500 draws = 10,000 draws), its wall time (compilation included,
and how much of it was compiling, simulating, training and sampling), and the C2ST of its draws
against sbibm's 10,000 reference draws (:func:`c2st`, sbibm's definition; it runs in a worker
process while the next fit runs). 0.5 is a perfect posterior, 1.0 a completely wrong one.

Rows are merged into ``--out`` (a row of the same task, budget, observation, method and seed is
replaced), so runs of a few tasks at a time add up; the markdown table ``--md`` is rewritten from
all rows of the CSV, with the published SNLE C2ST of sbibm (Lueckmann et al. 2021, their Fig. 2
and the sbibm results, mean over 10 observations) beside ours.

``--methods sbijax`` adds sbijax's SNLE (:func:`run_sbijax`; ``pip install sbijax`` first: it is
not in the ``bench`` extra, as it brings tfp-nightly, dm-haiku, distrax and more, unpinned).

A benchmark, not a test: it writes tables and never fails.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import numpy as np

#: sbibm's published SNLE C2ST (mean over observations 1-10) at 1e3, 1e4, 1e5 simulations
PUBLISHED_SNLE = {
    "two_moons": {1000: 0.657, 10000: 0.571, 100000: 0.582},
    "slcp": {1000: 0.921, 10000: 0.713, 100000: 0.578},
    "gaussian_linear": {1000: 0.628, 10000: 0.548, 100000: 0.519},
    "lotka_volterra": {1000: 0.909, 10000: 0.738, 100000: 0.695},
    "sir": {1000: 0.745, 10000: 0.745, 100000: 0.650},
}
ORDER = ("two_moons", "slcp", "gaussian_linear", "lotka_volterra", "sir")

FIELDS = ["task", "method", "budget", "observation", "seed", "c2st", "num_draws", "wall_s",
          "compile_s", "simulate_s", "train_s", "sample_s", "c2st_s", "num_failed_simulations",
          "final_heldout_loss", "flags", "published_snle", "backend", "notes"]


# ---------------------------------------------------------------------------- C2ST
def c2st(X, Y, seed: int = 1, n_folds: int = 5, z_score: bool = True) -> float:
    """Classifier two-sample test accuracy of samples ``X`` (n, d) against ``Y`` (m, d), as
    sbibm computes it.

    Both samples are z-scored with ``X``'s mean and (n-1) standard deviation; a scikit-learn
    ``MLPClassifier`` (ReLU, two hidden layers of ``10 d`` units, Adam, ``max_iter=10000``,
    ``random_state=seed``) is trained to tell them apart, and the accuracy is its mean over a
    shuffled ``n_folds``-fold cross-validation (``KFold(random_state=seed)``). About 0.5 when
    the samples come from one distribution (with n = m), 1.0 when they do not overlap.

    >>> rng = np.random.default_rng(0)
    >>> round(c2st(rng.normal(size=(200, 1)), rng.normal(size=(200, 1)) + 10.0), 2)
    1.0
    """
    from sklearn.model_selection import KFold, cross_val_score
    from sklearn.neural_network import MLPClassifier

    X = np.asarray(X, np.float64)
    Y = np.asarray(Y, np.float64)
    if X.ndim != 2 or Y.ndim != 2 or X.shape[1] != Y.shape[1]:
        raise ValueError(f"c2st: X and Y must be (n, d) and (m, d) with one d, got {X.shape} and "
                         f"{Y.shape}")
    if z_score:
        mean, sd = X.mean(0), X.std(0, ddof=1)
        sd = np.where(sd > 0, sd, 1.0)
        X, Y = (X - mean) / sd, (Y - mean) / sd
    d = X.shape[1]
    clf = MLPClassifier(activation="relu", hidden_layer_sizes=(10 * d, 10 * d), max_iter=10000,
                        solver="adam", random_state=seed)
    data = np.concatenate([X, Y])
    target = np.concatenate([np.zeros(X.shape[0]), np.ones(Y.shape[0])])
    folds = KFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return float(np.mean(cross_val_score(clf, data, target, cv=folds, scoring="accuracy")))


def _thin(draws: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` of the draws, without replacement (all of them where there are no more)."""
    if draws.shape[0] <= n:
        return draws
    idx = np.random.default_rng(seed).choice(draws.shape[0], n, replace=False)
    return draws[np.sort(idx)]


# ---------------------------------------------------------------------------- methods
def run_snl(post, budget: int, seed: int, sampler: str = "nuts") -> tuple[np.ndarray, dict]:
    import bayeslik as bl

    options = ({"num_chains": 4, "num_samples": 2500} if sampler == "nuts"
               else {"num_particles": 10_000})
    t0 = time.perf_counter()
    fit = bl.fit(post, "snl", num_simulations=budget, num_rounds=10, seed=seed,
                 progress_bar=False, sampler=sampler, sampler_options=options)
    wall = time.perf_counter() - t0
    draws = fit.draws("theta")
    draws = np.asarray(draws).reshape(-1, draws.shape[-1])
    extra = fit.cost.extra
    rounds = fit.idata["snl_rounds"].to_dataset()
    return draws, {
        "wall_s": wall, "compile_s": fit.cost.compile_s, "simulate_s": extra["simulate_s"],
        "train_s": extra["train_s"], "sample_s": extra["sample_s"],
        "num_failed_simulations": extra["num_failed_simulations"],
        "final_heldout_loss": float(rounds["heldout_loss"].values[-1]),
        "flags": " | ".join(fit.flags)}


def _tfp_prior(name: str):
    """The task's prior as the tfp distribution sbijax takes (the same parametrisation as
    bayeslik.models.sbi_tasks)."""
    import jax.numpy as jnp
    from tensorflow_probability.substrates.jax import distributions as tfd

    from bayeslik.models import sbi_tasks as st

    one = {
        "two_moons": lambda: tfd.Uniform(-jnp.ones(2), jnp.ones(2)),
        "slcp": lambda: tfd.Uniform(-3.0 * jnp.ones(5), 3.0 * jnp.ones(5)),
        "gaussian_linear": lambda: tfd.Normal(jnp.zeros(st.GL_DIM),
                                              jnp.sqrt(st.GL_PRIOR_VAR) * jnp.ones(st.GL_DIM)),
        "lotka_volterra": lambda: tfd.LogNormal(jnp.asarray(st.LV_LOC), st.LV_SCALE),
        "sir": lambda: tfd.LogNormal(jnp.log(jnp.array([0.4, 0.125])), jnp.array([0.5, 0.2])),
    }[name]()
    return tfd.JointDistributionNamed({"theta": tfd.Independent(one, 1)}, batch_ndims=0)


def run_sbijax(post, budget: int, seed: int, name: str, *, n_iter: int = 1000,
               num_warmup: int = 1000, num_samples: int = 2500) -> tuple[np.ndarray, dict]:
    """sbijax's SNLE (its affine MAF, 5 layers of (64, 64) MADE networks; Adam 3e-4, batches of
    100, early stopping; blackjax NUTS for the posterior), 10 rounds of budget/10 simulations,
    the last round's posterior by 4 chains x ``num_samples`` draws after ``num_warmup``
    (``n_iter``: sbijax's largest number of training epochs per round). The rounds are
    sbijax's ``run_sequential`` written out (its simulate / stack / train / sample), with one
    change: simulations holding NaN (failed ODE solves) are dropped before training, as
    bayeslik's SNL does (sbijax would train on them and get a NaN loss)."""
    import jax
    import jax.numpy as jnp
    from sbijax import nle, sample, simulate, stack, train
    from sbijax.mcmc import make_sampler, nuts
    from sbijax.nn import make_maf

    from bayeslik.models import sbi_tasks as st

    t = st.task(name)
    prior = _tfp_prior(name)
    sim_one = jax.vmap(lambda k, th: t.simulator(k, {"theta": th}))

    def simulator(key, theta):
        th = theta["theta"]
        return sim_one(jax.random.split(key, th.shape[0]), th)

    objective = nle(make_maf(t.dim_data))
    sampler = make_sampler(nuts, prior=prior)
    y_obs = jnp.asarray(post.observed)
    per_round = budget // 10
    key = jax.random.key(seed)
    data = params = info = None
    failed = 0
    times = {"simulate_s": 0.0, "train_s": 0.0, "sample_s": 0.0}
    t_all = time.perf_counter()

    def posterior_proposal(params):
        """Draws of the current posterior (one NUTS chain, as sbijax's run_sequential)."""
        def proposal(rng, n):
            draws, _ = sample(rng, objective, params, y_obs, sampler=sampler, prior=prior,
                              n_samples=n, n_warmup=n, n_chains=1)
            return jax.tree.map(lambda v: v.reshape((-1,) + v.shape[2:])[:n], draws)

        return proposal

    for _ in range(10):
        k_sim, k_train, key = jax.random.split(key, 3)
        proposal = None if params is None else posterior_proposal(params)
        t0 = time.perf_counter()
        new = simulate(k_sim, prior, simulator, proposal=proposal, n=per_round)
        ok = np.all(np.isfinite(np.asarray(new["y"])), axis=1)
        failed += int((~ok).sum())
        new = jax.tree.map(lambda v: v[np.flatnonzero(ok)], new)
        times["simulate_s"] += time.perf_counter() - t0
        data = new if data is None else stack(data, new)
        t0 = time.perf_counter()
        params, info = train(k_train, objective, data, info=info, n_iter=n_iter)
        times["train_s"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    draws, _ = sample(key, objective, params, y_obs, sampler=sampler, prior=prior,
                      n_samples=num_samples, n_warmup=num_warmup, n_chains=4)
    times["sample_s"] += time.perf_counter() - t0
    theta = np.asarray(draws["theta"]).reshape(-1, t.dim_parameters)
    return theta, {"wall_s": time.perf_counter() - t_all, "num_failed_simulations": failed,
                   **times}


def run_snl_smc(post, budget: int, seed: int) -> tuple[np.ndarray, dict]:
    """SNL whose rounds sample the learned posterior by tempered SMC (default particles in
    the rounds, 10,000 in the last): SMC weighs separated modes, where 4 NUTS chains stay in
    the modes they start in."""
    return run_snl(post, budget, seed, sampler="smc")


METHODS = {"snl": run_snl, "snl_smc": run_snl_smc, "sbijax": run_sbijax}


# ---------------------------------------------------------------------------- tables
def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    key = lambda r: (r["task"], r["method"], str(r["budget"]), str(r["observation"]),  # noqa
                     str(r["seed"]))
    keep = {key(r): r for r in old}
    for r in new:
        keep[key(r)] = {k: r.get(k, "") for k in FIELDS}
    order = {t: i for i, t in enumerate(ORDER)}
    return sorted(keep.values(), key=lambda r: (order.get(r["task"], 99), r["method"],
                                                int(r["budget"]), int(r["observation"]),
                                                int(r["seed"])))


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in FIELDS})


def markdown(rows: list[dict], budgets=(1000, 10000, 100000), notes: str = "") -> str:
    """The C2ST table: per task and budget ours (mean over the observations and seeds run, with
    their number and the wall time) beside the published SNLE value."""
    methods = sorted({r["method"] for r in rows}) or ["snl"]
    head = ["task"]
    for b in budgets:
        head += [f"{m} {b:.0e}" for m in methods] + [f"sbibm SNLE {b:.0e}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in ORDER:
        cells = [t]
        for b in budgets:
            for m in methods:
                ran = [r for r in rows if r["task"] == t and r["method"] == m
                       and int(r["budget"]) == b]
                sel = [r for r in ran if r.get("c2st") not in ("", None)]
                if sel:
                    c = np.mean([float(r["c2st"]) for r in sel])
                    wall = np.mean([float(r["wall_s"]) for r in sel])
                    cells.append(f"{c:.3f} (n={len(sel)}, {wall:.0f} s)")
                elif any(str(r.get("notes", "")).startswith("failed") for r in ran):
                    cells.append("failed (notes)")
                elif ran:
                    cells.append("no C2ST (notes)")
                else:
                    cells.append("not run")
            cells.append(f"{PUBLISHED_SNLE[t][b]:.3f}" if b in PUBLISHED_SNLE.get(t, {}) else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" + notes


MD_HEAD = """# SNL on the sbibm tasks: C2ST against the reference posteriors

Written by `benchmarks/sbi_tasks.py` from `benchmarks/results/sbi_tasks.csv` (the command and the
machine are in the notes below). C2ST: sbibm's classifier two-sample test of 10,000 posterior
draws against sbibm's 10,000 reference draws (0.5 is perfect, 1.0 is a posterior that does not
overlap the reference). Ours: bayeslik's `snl` engine, 10 rounds, default flow (5-layer affine
MAF), with NUTS (`snl`, 4 chains) or tempered SMC (`snl_smc`, 10,000 particles in the last round)
sampling each round's posterior; `snl_earlier` rows are runs of an earlier version (stop 29: no
count dequantisation, and the first of them with the spline flow that was the default then) kept
where today's code has not been run at that budget. Each cell is the mean
over the observations and seeds run (n), with the mean wall time of one fit (compilation included;
the C2ST itself not). sbibm SNLE: the published numbers (Lueckmann et al. 2021), the mean over
sbibm's 10 observations; ours are over fewer (see n), so single-observation cells compare only
roughly (C2ST varies from one observation to another).

"""


def _update(out: Path, md: Path, notes: str | None, row: dict) -> None:
    """Merge ``row`` into the CSV and rewrite the md, under a lock (several runs may share them)."""
    import fcntl
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(Path(tempfile.gettempdir()) / f"bayeslik-{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = merge_rows(read_rows(out), [row])
        write_csv(out, rows)
        note_text = Path(notes).read_text() if notes else ""
        md.write_text(MD_HEAD + markdown(rows, notes=note_text))


def _c2st_job(ref: np.ndarray, draws: np.ndarray) -> tuple[float, float]:
    t0 = time.perf_counter()
    return c2st(ref, draws), time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=list(ORDER), choices=list(ORDER))
    ap.add_argument("--budgets", nargs="+", type=int, default=[1000, 10000, 100000])
    ap.add_argument("--observations", nargs="+", type=int, default=[1])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="+", default=["snl"], choices=list(METHODS))
    ap.add_argument("--num-draws", type=int, default=10_000)
    ap.add_argument("--out", default="benchmarks/results/sbi_tasks.csv")
    ap.add_argument("--md", default="benchmarks/results/sbi_tasks.md")
    ap.add_argument("--notes", default=None, help="a file whose text ends the md (the notes)")
    ap.add_argument("--draws-dir", default=None,
                    help="save each fit's posterior draws there (npz), for a later C2ST")
    ap.add_argument("--table-only", action="store_true",
                    help="only rewrite the md from the CSV (with --notes)")
    args = ap.parse_args(argv)
    if args.table_only:
        note_text = Path(args.notes).read_text() if args.notes else ""
        Path(args.md).write_text(MD_HEAD + markdown(read_rows(Path(args.out)), notes=note_text))
        return

    import concurrent.futures
    import multiprocessing

    import jax

    from bayeslik.models import sbi_tasks

    out, md = Path(args.out), Path(args.md)
    # the C2ST of one fit runs in a worker process while the next fit runs (it takes minutes)
    pool = concurrent.futures.ProcessPoolExecutor(
        1, mp_context=multiprocessing.get_context("spawn"))
    pending = []

    def finish(future, row):
        acc, secs = future.result()
        row = {**row, "c2st": round(acc, 4), "c2st_s": round(secs, 1)}
        print(f"C2ST {row['task']} {row['method']} {row['budget']}: {acc:.4f} ({secs:.0f} s)",
              flush=True)
        _update(out, md, args.notes, row)

    for name in args.tasks:
        t = sbi_tasks.task(name)
        for obs in args.observations:
            post = t.posterior(obs)
            ref = t.reference_samples(obs)
            for budget in args.budgets:
                for method in args.methods:
                    print(f"{name} obs {obs} budget {budget} {method} ...", flush=True)
                    notes = ""
                    try:
                        draws, info = (run_sbijax(post, budget, args.seed, name)
                                       if method == "sbijax" else
                                       METHODS[method](post, budget, args.seed))
                    except Exception as e:  # a benchmark never fails: the row says why
                        draws, info = None, {}
                        notes = f"failed: {type(e).__name__}: {str(e)[:300]}"
                    row = {"task": name, "method": method, "budget": budget, "observation": obs,
                           "seed": args.seed, "published_snle": PUBLISHED_SNLE[name].get(budget),
                           "backend": jax.default_backend(), "notes": notes}
                    row.update({k: (round(v, 3) if isinstance(v, float) else v)
                                for k, v in info.items()})
                    print({k: row.get(k) for k in ("wall_s", "compile_s", "train_s",
                                                   "sample_s", "flags", "notes")}, flush=True)
                    _update(out, md, args.notes, row)  # the fit's row now, its C2ST later
                    if draws is not None:
                        y = _thin(draws, args.num_draws, args.seed)
                        row["num_draws"] = int(y.shape[0])
                        if args.draws_dir:
                            Path(args.draws_dir).mkdir(parents=True, exist_ok=True)
                            np.savez(Path(args.draws_dir) / f"{name}_{method}_{budget}_obs{obs}"
                                     f"_seed{args.seed}.npz", draws=y)
                        pending.append((pool.submit(_c2st_job, ref, y), row))
                    for item in [p for p in pending if p[0].done()]:
                        finish(*item)
                        pending.remove(item)
    for item in pending:
        finish(*item)
    pool.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
