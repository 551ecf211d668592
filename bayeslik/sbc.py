"""Simulation-based calibration (Talts et al. 2018; Modrak et al. 2023, the SBC package).

For s = 1..S: draw parameters theta_s from the prior and data y_s from the program, fit the
program to y_s, and rank theta_s among L_s posterior draws thinned to about their effective
sample size (L_s = min(num_draws, ESS_s), the smallest ESS over the quantities of fit s). If the
engine computes the posterior correctly, every rank is uniform on {0, ..., L_s}, and the
fractional rank u = (rank + U(0,1)) / (L_s + 1) is Uniform(0, 1) whatever L_s is. Ranks of the log-likelihood
log p(y_s | theta) (a derived quantity) also catch wrong correlations that marginal ranks miss.

Judgement per quantity:

* the simultaneous ECDF test (Säilynoja, Bürkner and Vehtari 2022): the ECDF of the
  fractional ranks u = (rank + U(0,1)) / (L + 1) against the uniform CDF, its statistic
  gamma = 1 - 2 min_i min(P[Bin(S, z_i) <= S F(z_i)], P[Bin(S, z_i) >= S F(z_i)]), and a p-value
  by simulating gamma under uniformity;
* coverage of central posterior intervals at several levels, with a two-sided binomial p-value.

A quantity passes when all its p-values are at least ``alpha`` divided by the number of tests
in the run (Bonferroni), so a correct engine fails a run with probability at most ``alpha``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.primitives import Messenger

from bayeslik.engines import kit
from bayeslik.errors import DataError, EngineError
from bayeslik.posterior import Posterior

__all__ = ["sbc", "SBCResult", "simulate_prior_predictive", "ecdf_uniformity_test"]

LEVELS = (0.5, 0.8, 0.9, 0.95)


# ----------------------------------------------------------------------------- simulation
class _Unobserve(Messenger):
    """Sample the observed sites from the program instead of conditioning on their values.

    A site whose distribution is smaller than its data (broadcast in the likelihood) is expanded
    to the data's shape, so the simulated data has the shape of the real data. Factors stay.
    """

    def process_message(self, msg):
        if msg["type"] != "sample" or not msg["is_observed"] or type(msg["fn"]).__name__ == "Unit":
            return
        shape = tuple(jnp.shape(msg["value"]))
        fn = msg["fn"]
        if tuple(fn.shape()) != shape:
            fn = fn.expand(shape[: len(shape) - len(fn.event_shape)])
        msg["fn"] = fn
        msg["value"] = None
        msg["is_observed"] = False


class _Observed:
    """The program with its observed sites' values given as keyword arguments ``_obs_<site>``.

    Equal (and hashing equal) for the same program and sites, so Posteriors of simulated
    datasets share one compilation (their data arrays differ, their shapes do not).
    """

    def __init__(self, model: Callable, names: Sequence[str]):
        self.model, self.names = model, tuple(names)
        self.__name__ = getattr(model, "__name__", "model")

    def __call__(self, *args, **kwargs):
        obs = {n: kwargs.pop(f"_obs_{n}") for n in self.names}
        with handlers.condition(data=obs):
            return self.model(*args, **kwargs)

    def __eq__(self, other):
        return isinstance(other, _Observed) and (self.model, self.names) == (other.model, other.names)

    def __hash__(self):
        return hash((self.model, self.names))


def simulate_prior_predictive(posterior: Posterior, rng_key: jax.Array, num_simulations: int):
    """Prior draws and data simulated from the program: (latent values, observed values), each
    a dict of arrays with a leading axis of length num_simulations (one compiled, vmapped call)."""
    latent = posterior.latent_names
    observed = [n for n, s in posterior.sites.items() if s.kind == "observed"]
    model, args, kwargs = posterior.model, posterior.args, posterior.data

    def one(key):
        tr = handlers.trace(handlers.seed(_Unobserve()(model), rng_seed=key)).get_trace(*args, **kwargs)
        return {n: tr[n]["value"] for n in latent}, {n: tr[n]["value"] for n in observed}

    return jax.jit(jax.vmap(one))(jax.random.split(rng_key, num_simulations))


# ----------------------------------------------------------------------------- the test
def _gamma(u: np.ndarray, eval_points: np.ndarray) -> np.ndarray:
    """The simultaneous-ECDF statistic of each row of u (fractional ranks in (0, 1))."""
    from scipy.special import bdtr

    u = np.atleast_2d(u)
    n = u.shape[1]
    counts = (np.sort(u, axis=1)[:, :, None] <= eval_points[None, None, :]).sum(axis=1)
    lower = bdtr(counts, n, eval_points).min(axis=1)
    # P[Bin >= c] = 1 - P[Bin <= c - 1], which is 1 at c = 0 (scipy's bdtr(-1, ...) is NaN)
    upper = np.where(counts > 0, 1 - bdtr(np.maximum(counts - 1, 0), n, eval_points), 1.0).min(axis=1)
    return 1 - 2 * np.minimum(lower, upper)


def ecdf_uniformity_test(u: np.ndarray, num_null: int = 2000, seed: int = 0) -> tuple[float, float]:
    """(gamma, p-value) of the simultaneous ECDF test that ``u`` is Uniform(0, 1).

    The ECDF is evaluated at K = min(len(u), 100) evenly spaced points; the p-value is the share
    of ``num_null`` uniform samples of the same size whose gamma is at least as large.
    """
    u = np.asarray(u, dtype=float)
    k = min(len(u), 100)
    z = np.arange(1, k) / k
    g = float(_gamma(u[None], z)[0])
    rng = np.random.default_rng(seed)
    null = np.concatenate([_gamma(rng.uniform(size=(200, len(u))), z) for _ in range(num_null // 200)])
    return g, float((np.sum(null >= g - 1e-12) + 1) / (len(null) + 1))


def _binom_p(k: int, n: int, p: float) -> float:
    from scipy.stats import binomtest

    return float(binomtest(k, n, p).pvalue)


# ----------------------------------------------------------------------------- result
@dataclass(frozen=True, eq=False)
class SBCResult:
    """Ranks, truths and judgement of an SBC run.

    ``ranks[q]``: (num_simulations,) ints in 0..draws_kept[s]; ``truth[q]``: the simulated
    values; ``fractional[q]``: the randomised fractional ranks (uniform under calibration);
    ``table``: one row per quantity (p-values, coverage, verdict); ``passed``: all rows pass.
    """

    ranks: dict[str, np.ndarray]
    truth: dict[str, np.ndarray]
    fractional: dict[str, np.ndarray]
    coverage: dict[str, dict[float, float]]
    table: Any
    num_draws: int
    draws_kept: np.ndarray
    num_simulations: int
    engine: str
    model: str
    alpha: float
    num_failed: int
    min_ess: np.ndarray
    wall_s: float

    @property
    def passed(self) -> bool:
        return bool(self.table["passed"].all())

    @property
    def worst(self) -> str:
        """The quantity with the smallest p-value."""
        return str(self.table["min_p"].idxmin())

    def to_datatree(self):
        """The ranks as an ArviZ-style DataTree group ``sbc`` (dims: simulation)."""
        import xarray as xr

        ds = xr.Dataset(
            {f"rank_{q}": ("simulation", r) for q, r in self.ranks.items()}
            | {f"truth_{q}": ("simulation", t) for q, t in self.truth.items()}
            | {"draws_kept": ("simulation", self.draws_kept)},
            attrs={"num_draws": self.num_draws, "engine": self.engine, "model": self.model,
                   "passed": int(self.passed)},
        )
        return xr.DataTree.from_dict({"sbc": ds})

    def plot(self, quantities: Sequence[str] | None = None, **kwargs):
        """ECDF-difference plots with simultaneous bands and rank histograms (see bayeslik.plots)."""
        from bayeslik.plots import plot_sbc

        return plot_sbc(self, quantities=quantities, **kwargs)

    def __repr__(self) -> str:
        head = (f"SBC {self.model} x {self.engine}: {self.num_simulations} simulations, "
                f"L <= {self.num_draws} draws (median {int(np.median(self.draws_kept))}), "
                f"{'PASSED' if self.passed else 'FAILED'} "
                f"(alpha {self.alpha}, worst: {self.worst}); {self.wall_s:.1f} s")
        if self.num_failed:
            head += f"; {self.num_failed} simulated datasets could not be fitted"
        return head + "\n" + self.table.to_string()

    def _repr_html_(self) -> str:
        return f"<p><b>{repr(self).splitlines()[0]}</b></p>" + self.table.to_html()


# ----------------------------------------------------------------------------- driver
def _scalar_names(name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple]]:
    if shape == ():
        return [(name, ())]
    return [(f"{name}[{','.join(map(str, i))}]", i) for i in np.ndindex(*shape)]


def _thin_indices(n_total: int, num_draws: int) -> np.ndarray:
    return np.round(np.linspace(0, n_total - 1, num_draws)).astype(int)


def sbc(model: Callable, engine: Any = "nuts", *, num_simulations: int = 100, num_draws: int = 100,
        seed: int = 0, executor=None, engine_options: dict | None = None, alpha: float = 0.01,
        levels: Sequence[float] = LEVELS, progress_bar: bool = True, batch_size: int = 50,
        **model_args: Any) -> SBCResult:
    """Simulation-based calibration of ``engine`` on ``model``.

    ``model_args`` are the program's arguments, data included (the observed data fixes the
    shape of each simulated dataset; its values are not used). ``engine`` and ``engine_options``
    are as in ``bayeslik.fit`` (progress bars are switched off per fit). Engines that can fit
    many datasets at once (NUTS) are vectorised over ``batch_size`` simulations per call;
    otherwise the fits run one after the other, or through ``executor`` (a
    ``concurrent.futures.Executor``) when given. The datasets share shapes, so the compiled code
    is reused from the first fit on.

    At most ``num_draws`` posterior draws are kept per fit, evenly spaced over the pooled chains,
    and fewer where the fit's smallest ESS is lower (thinning to about the ESS, so the kept draws
    are nearly independent); ``draws_kept`` and ``min_ess`` record both per simulation.

    Example
    -------
    >>> from bayeslik.models import reference
    >>> p = reference.get("normal_mean")
    >>> res = bl.sbc(p.model, "nuts", num_simulations=100, num_draws=50,       # doctest: +SKIP
    ...              engine_options=dict(num_warmup=200, num_samples=200), **p.data)
    >>> res.passed, res.table                                                   # doctest: +SKIP
    """
    import pandas as pd

    from bayeslik import progress

    from bayeslik.api import fit as run_fit
    from bayeslik.api import resolve_engine

    from bayeslik.simulator import SimulatorPosterior

    if num_simulations < 10:
        raise EngineError(f"sbc: num_simulations={num_simulations} is too few to judge; use 50 or more.")
    simulator = isinstance(model, SimulatorPosterior)
    if simulator and model_args:
        raise EngineError(f"sbc: a SimulatorPosterior carries its prior's arguments; got "
                          f"model arguments {sorted(model_args)} as well.")
    if num_draws < 10:
        raise EngineError(f"sbc: num_draws={num_draws} is too few; use 50 to 200.")
    options = dict(engine_options or {})
    spec, _ = resolve_engine(engine, {})
    if "progress_bar" in {f.name for f in dataclasses.fields(spec.config_cls)}:
        options["progress_bar"] = False
    spec, config = resolve_engine(engine, options)  # bad options fail here, before simulating
    template = model if simulator else Posterior(model, **model_args)
    spec.check_accepts(template)  # an engine for another posterior kind fails here, before simulating
    template.require_proper_prior("simulation-based calibration (it draws from the prior)")
    observed = () if simulator else tuple(n for n, s in template.sites.items()
                                          if s.kind == "observed")
    if not observed and not simulator:
        raise DataError("sbc: the program has no observed site to simulate.")
    t0 = time.perf_counter()
    k_sim = jax.random.key(seed)
    if simulator:
        truth_values, data = _simulate_simulator(template, k_sim, num_simulations)
    else:
        truth_values, data = simulate_prior_predictive(template, k_sim, num_simulations)
    truth_values = jax.tree.map(np.asarray, truth_values)
    data = jax.tree.map(np.asarray, data)
    wrapped = _Observed(model, observed)
    fit_seeds = np.random.default_rng([seed, 1]).integers(0, 2**31 - 1, size=num_simulations)

    def posterior_of(s: int):
        if simulator:
            return None if not np.all(np.isfinite(data["x"][s])) else \
                template.with_observed(data["x"][s])
        obs = {f"_obs_{n}": data[n][s] for n in observed}
        try:
            return Posterior(wrapped, **model_args, **obs)
        except DataError:
            return None  # e.g. a simulated dataset with inf: counted, reported

    def summarise(s: int, post, f):
        truth = {n: truth_values[n][s] for n in template.latent_names}
        if simulator:  # no likelihood to rank: the parameters only
            return f, truth, None, None
        ll_true = float(post.loglikelihood(post.unconstrain(truth)))
        ll_draws = sum(
            np.asarray(v).reshape(v.shape[0], v.shape[1], -1).sum(-1)
            for v in f.idata["log_likelihood"].to_dataset().data_vars.values()
        )
        return f, truth, ll_true, ll_draws

    def one(s: int):
        post = posterior_of(s)
        if post is None:
            return None
        return summarise(s, post, run_fit(post, engine, seed=int(fit_seeds[s]),
                                          log_likelihood=not simulator, **options))

    bar = progress.bar(total=num_simulations, desc=f"SBC {template.name}",
                       disable=not progress_bar)
    results = []
    if spec.run_many is not None and executor is None:
        for start in range(0, num_simulations, batch_size):
            sims = range(start, min(start + batch_size, num_simulations))
            posts = {s: posterior_of(s) for s in sims}
            ok = [s for s in sims if posts[s] is not None]
            with kit.loglikelihood_option(True):  # the rank of the log-likelihood needs it
                fits = spec.run_many([posts[s] for s in ok],
                                     [jax.random.key(int(fit_seeds[s])) for s in ok], config)
            by_sim = {s: dataclasses.replace(f, seed=int(fit_seeds[s])) for s, f in zip(ok, fits)}
            results += [summarise(s, posts[s], by_sim[s]) if s in by_sim else None for s in sims]
            bar.update(len(sims))
    elif executor is None:
        for s in range(num_simulations):
            results.append(one(s))
            bar.update()
    else:
        futures = [executor.submit(one, s) for s in range(num_simulations)]
        for fut in futures:
            results.append(fut.result())
            bar.update()
    bar.close()

    quantities = [(q, n, idx) for n in template.latent_names
                  for q, idx in _scalar_names(n, template.sites[n].shape)]
    names = [q for q, _, _ in quantities] + ([] if simulator else ["log_likelihood"])
    ranks = {q: [] for q in names}
    truth_out = {q: [] for q in names}
    cover = {q: {lv: [] for lv in levels} for q in names}
    min_ess, kept, failed = [], [], 0
    rng = np.random.default_rng(seed)
    for res in results:
        if res is None:
            failed += 1
            continue
        f, truth, ll_true, ll_draws = res
        per_q = {}
        for q, n, idx in quantities:
            per_q[q] = (f.draws(n)[(slice(None), slice(None)) + idx], float(np.asarray(truth[n])[idx]))
        if not simulator:
            per_q["log_likelihood"] = (ll_draws, ll_true)
        ess = _min_ess({q: v[0] for q, v in per_q.items()})
        min_ess.append(ess)
        kept.append(int(np.clip(np.floor(ess), 1, num_draws)))
        for q, (draws, t) in per_q.items():
            flat = np.asarray(draws).reshape(-1)
            thin = flat[_thin_indices(flat.size, kept[-1])]
            ranks[q].append(int(np.sum(thin < t)))
            truth_out[q].append(t)
            for lv in levels:
                lo, hi = np.quantile(flat, [(1 - lv) / 2, (1 + lv) / 2])
                cover[q][lv].append(lo <= t <= hi)
    n_ok = len(ranks[names[0]])
    if n_ok < 10:
        raise DataError(f"sbc: only {n_ok} of {num_simulations} simulated datasets could be fitted.")
    num_tests = len(names) * (1 + len(levels))
    rows, frac, coverage = [], {}, {}
    for q in names:
        r = np.asarray(ranks[q])
        u = (r + rng.uniform(size=r.size)) / (np.asarray(kept) + 1)
        frac[q] = u
        g, p_ecdf = ecdf_uniformity_test(u, seed=seed)
        row = {"quantity": q, "ecdf_gamma": g, "p_ecdf": p_ecdf}
        coverage[q] = {}
        p_cov = []
        for lv in levels:
            c = np.asarray(cover[q][lv])
            coverage[q][lv] = float(c.mean())
            row[f"coverage_{int(lv * 100)}"] = float(c.mean())
            p_cov.append(_binom_p(int(c.sum()), c.size, lv))
        row["p_coverage"] = min(p_cov)
        row["min_p"] = min(p_ecdf, min(p_cov))
        row["passed"] = row["min_p"] >= alpha / num_tests
        rows.append(row)
    table = pd.DataFrame(rows).set_index("quantity")
    return SBCResult(
        ranks={q: np.asarray(v) for q, v in ranks.items()},
        truth={q: np.asarray(v) for q, v in truth_out.items()},
        fractional=frac, coverage=coverage, table=table, num_draws=num_draws,
        draws_kept=np.asarray(kept),
        num_simulations=num_simulations, engine=spec.name, model=template.name, alpha=alpha,
        num_failed=failed, min_ess=np.asarray(min_ess), wall_s=time.perf_counter() - t0,
    )


def _simulate_simulator(posterior, rng_key, num_simulations: int):
    """({site: (S, ...)} prior draws, {"x": (S, *observed_shape)} their simulations) of a
    SimulatorPosterior (a failed simulation's x is NaN: its dataset is counted as failed)."""
    k_prior, k_sim = jax.random.split(rng_key)
    z = posterior.sample_prior(k_prior, num_simulations)
    x, _ = posterior.simulate(k_sim, z)
    values = jax.vmap(posterior.constrain)(z)
    return {n: np.asarray(values[n]) for n in posterior.latent_names}, {"x": x}


def _min_ess(draws: dict[str, np.ndarray]) -> float:
    """Smallest (split-chain) ESS over the quantities' (chain, draw) arrays."""
    from numpyro.diagnostics import effective_sample_size

    return float(min(effective_sample_size(np.asarray(v, dtype=np.float64)) for v in draws.values()))
