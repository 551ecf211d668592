"""NASA C-MAPSS turbofan degradation data (FD001, bundled): loader and a health indicator.

FD001: 100 training engines run to failure and 100 test engines stopped some time before
failure, one operating condition, one fault mode (HPC degradation). Each row is one cycle:
unit, cycle, three operational settings and 21 sensors. The true remaining useful life (RUL) of
each test engine after its last cycle is in ``rul``. Source and terms: ``data/cmapss/README.md``.

The health indicator (HI) is the usual linear one: a least-squares map from the standardised
informative sensors to a target that is 1 in the first cycles of a training engine and falls
linearly to 0 at its failure, fitted on the training engines and applied unchanged to the test
engines. Sensors that are constant in FD001 (T2, P2, P15, epr, farB, Nf_dmd, PCNfR_dmd) carry
no information and are left out.

>>> from bayeslik.models import cmapss
>>> d = cmapss.load()
>>> d["train"].shape, d["test"].shape, d["rul"].shape
((20631, 26), (13096, 26), (100,))
>>> hi = cmapss.HealthIndicator.fit(d["train"])
>>> seqs = hi.sequences(d["test"])          # {unit: HI per cycle}
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import numpy as np
import pandas as pd

from bayeslik.errors import DataError, OptionError

__all__ = ["load", "COLUMNS", "SENSORS", "INFORMATIVE", "HealthIndicator", "rul_score", "baseline_rul",
           "degradation_data", "rul_distribution", "rul_from_state_probs", "predict_rul",
           "QUANTILES", "QUANTILE_COLUMNS", "INTERVALS", "quantiles_from_pmf", "predict_rul_quantiles",
           "rul_metrics"]

SENSORS = ["T2", "T24", "T30", "T50", "P2", "P15", "P30", "Nf", "Nc", "epr", "Ps30", "phi",
           "NRf", "NRc", "BPR", "farB", "htBleed", "Nf_dmd", "PCNfR_dmd", "W31", "W32"]
COLUMNS = ["unit", "cycle", "op1", "op2", "op3"] + SENSORS
INFORMATIVE = ["T24", "T30", "T50", "P30", "Nf", "Nc", "Ps30", "phi", "NRf", "NRc", "BPR",
               "htBleed", "W31", "W32"]


def _path(name: str):
    return resources.files("bayeslik.models") / "data" / "cmapss" / name


def load(subset: str = "FD001") -> dict:
    """{"train", "test"}: DataFrames with :data:`COLUMNS`; "rul": true RUL of each test unit
    (in unit order) after its last cycle; "name"."""
    if subset != "FD001":
        raise DataError(f"subset {subset!r} is not bundled; bayeslik ships FD001 only.")
    with _path("train_FD001.txt.gz").open("rb") as f:
        train = pd.read_csv(f, sep=r"\s+", header=None, names=COLUMNS, compression="gzip")
    with _path("test_FD001.txt.gz").open("rb") as f:
        test = pd.read_csv(f, sep=r"\s+", header=None, names=COLUMNS, compression="gzip")
    with _path("RUL_FD001.txt.gz").open("rb") as f:
        rul = pd.read_csv(f, header=None, compression="gzip")[0].to_numpy()
    for name, df in (("train", train), ("test", test)):
        if df.isna().any().any():
            raise DataError(f"C-MAPSS {name} file has missing values: the bundled file is damaged.")
    return {"train": train, "test": test, "rul": rul.astype(int), "name": subset}


@dataclass(frozen=True)
class HealthIndicator:
    """Linear health indicator from the informative sensors (fitted on run-to-failure units).

    ``healthy_cycles``: the first cycles of each training unit whose target is 1; after them the
    target falls linearly to 0 at the unit's last cycle.
    """

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    sensors: tuple[str, ...] = tuple(INFORMATIVE)

    @classmethod
    def fit(cls, train: pd.DataFrame, healthy_cycles: int = 30,
            sensors: tuple[str, ...] = tuple(INFORMATIVE)) -> "HealthIndicator":
        if not isinstance(healthy_cycles, (int, np.integer)) or isinstance(healthy_cycles, bool) \
                or healthy_cycles < 0:
            raise OptionError(f"HealthIndicator.fit: healthy_cycles must be an integer >= 0, got "
                              f"{healthy_cycles!r}")
        missing = [s for s in list(sensors) + ["unit", "cycle"] if s not in train.columns]
        if missing:
            raise DataError(f"HealthIndicator.fit: train has no column(s) {missing}")
        if len(train) < 2:
            raise DataError(f"HealthIndicator.fit: train has {len(train)} row(s); the indicator "
                            "needs run-to-failure units (many cycles) to fit")
        X = train[list(sensors)].to_numpy(float)
        mean, scale = X.mean(0), X.std(0)
        if not np.all(np.isfinite(X)):
            raise DataError("HealthIndicator.fit: the sensor columns hold NaN or infinite values; "
                            "drop or impute those rows")
        constant = [s for s, v in zip(sensors, scale) if not v > 0]
        if constant:
            raise DataError(f"HealthIndicator.fit: sensor(s) {constant} are constant in train, so "
                            "they cannot be standardised (the indicator would be all NaN); leave "
                            "them out with sensors=... or fit on more cycles")
        Z = (X - mean) / scale
        life = train.groupby("unit")["cycle"].transform("max").to_numpy()
        cyc = train["cycle"].to_numpy()
        target = np.clip(1 - (cyc - healthy_cycles) / np.maximum(life - healthy_cycles, 1), 0, 1)
        A = np.column_stack([np.ones(len(Z)), Z])
        sol, *_ = np.linalg.lstsq(A, target, rcond=None)
        return cls(mean, scale, sol[1:], float(sol[0]), tuple(sensors))

    def __call__(self, df: pd.DataFrame) -> np.ndarray:
        """The HI of every row of ``df`` (about 1 healthy, 0 at failure)."""
        Z = (df[list(self.sensors)].to_numpy(float) - self.mean) / self.scale
        return self.intercept + Z @ self.coef

    def sequences(self, df: pd.DataFrame) -> dict[int, np.ndarray]:
        """{unit: HI per cycle, in cycle order}."""
        hi = self(df)
        out = {}
        for unit, idx in df.groupby("unit").indices.items():
            order = np.argsort(df["cycle"].to_numpy()[idx])
            out[int(unit)] = hi[idx][order]
        return out


def rul_score(true_rul: np.ndarray, pred_rul: np.ndarray, cap: int = 125) -> dict[str, float]:
    """RMSE (true RUL capped at ``cap`` cycles, the usual convention) and the PHM08 score
    sum(exp(-d/13) - 1 for early predictions, exp(d/10) - 1 for late ones), d = pred - true."""
    true = np.minimum(np.asarray(true_rul, float), cap)
    d = np.asarray(pred_rul, float) - true
    score = np.where(d < 0, np.exp(-d / 13) - 1, np.exp(d / 10) - 1).sum()
    return {"rmse": float(np.sqrt(np.mean(d**2))), "phm08": float(score)}


def _smoothed_features(df: pd.DataFrame, sensors, window: int) -> np.ndarray:
    """Per-unit trailing means of the sensors over ``window`` cycles (rows in file order)."""
    return df.groupby("unit")[list(sensors)].transform(
        lambda c: c.rolling(window, min_periods=1).mean()).to_numpy(float)


def baseline_rul(train: pd.DataFrame, test: pd.DataFrame, cap: int = 125, window: int = 10,
                 interval: float = 0.9, sensors: tuple[str, ...] = tuple(INFORMATIVE)) -> pd.DataFrame:
    """A simple baseline: linear regression of the capped RUL, min(cap, failure - cycle), on the
    standardised trailing means (``window`` cycles) of the informative sensors, fitted on the
    run-to-failure units and applied at each test unit's last cycle. The interval adds the
    training residuals' quantiles. Returns a DataFrame by unit with columns rul, lower, upper.
    """
    X = _smoothed_features(train, sensors, window)
    mean, scale = X.mean(0), X.std(0)
    life = train.groupby("unit")["cycle"].transform("max").to_numpy()
    y = np.minimum(cap, life - train["cycle"].to_numpy())
    A = np.column_stack([np.ones(len(X)), (X - mean) / scale])
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    lo_r, hi_r = np.quantile(y - A @ coef, [(1 - interval) / 2, (1 + interval) / 2])
    Xt = _smoothed_features(test, sensors, window)
    last = test.groupby("unit")["cycle"].idxmax().to_numpy()
    At = np.column_stack([np.ones(len(last)), (Xt[last] - mean) / scale])
    pred = At @ coef
    units = test.loc[last, "unit"].to_numpy()
    out = pd.DataFrame({"rul": np.clip(pred, 0, cap), "lower": np.clip(pred + lo_r, 0, cap),
                        "upper": np.clip(pred + hi_r, 0, cap)}, index=units)
    return out.sort_index()


# ----------------------------------------------------------------------------- AR-HMM prognostics
def degradation_data(df: pd.DataFrame, hi: HealthIndicator, num_states: int, *,
                     run_to_failure: bool, healthy_cycles: int = 30, final_cycles: int = 15) -> dict:
    """Padded HI sequences with soft labels for the partially-hidden left-to-right AR-HMM.

    Returns {"y": (B, T, 1), "mask": (B, T), "labels": (B, T, K), "units": (B,), "length": (B,)}.
    Labels encode what is known: the first ``healthy_cycles`` cycles of every unit are in state 0
    (a new engine is healthy); for run-to-failure (training) units the last ``final_cycles``
    cycles are in the last state and no earlier cycle is, so entering the last state means
    "``final_cycles`` cycles to failure". Everything else is vacuous (all states plausible).
    """
    for name, v, low in (("num_states", num_states, 2), ("healthy_cycles", healthy_cycles, 0),
                         ("final_cycles", final_cycles, 1)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < low:
            raise OptionError(f"degradation_data: {name} must be an integer >= {low}, got {v!r}")
    seqs = hi.sequences(df)
    if not seqs:
        raise DataError("degradation_data: df has no rows (no unit to label)")
    units = np.array(sorted(seqs))
    lengths = np.array([len(seqs[u]) for u in units])
    B, T, K = len(units), int(lengths.max()), int(num_states)
    if run_to_failure:
        # healthy labels on [0, h), the last state on [n - final_cycles, n), and the K - 2 middle
        # states need a cycle each in between (left-to-right: one state forward per cycle)
        need = healthy_cycles + (K - 2) + final_cycles
        short = [(int(u), int(n)) for u, n in zip(units, lengths) if n < need]
        if short:
            raise DataError(
                f"degradation_data: {len(short)} run-to-failure unit(s) are too short for the "
                f"labels, e.g. unit {short[0][0]} with {short[0][1]} cycles: healthy_cycles="
                f"{healthy_cycles} cycles in state 0, then {K - 2} middle state(s), then "
                f"final_cycles={final_cycles} in the last state need {need} cycles, or the soft "
                "labels would jump from the first to the last state (impossible for a "
                "left-to-right model). Drop those units (df[~df['unit'].isin(["
                f"{', '.join(str(u) for u, _ in short[:5])}{', ...' if len(short) > 5 else ''}])]) "
                "or lower healthy_cycles / final_cycles.")
    y = np.zeros((B, T, 1), np.float32)
    mask = np.zeros((B, T), bool)
    labels = np.ones((B, T, K), np.float32)
    for i, u in enumerate(units):
        n = lengths[i]
        y[i, :n, 0] = seqs[u]
        y[i, n:, 0] = seqs[u][-1]
        mask[i, :n] = True
        h = min(healthy_cycles, n)
        labels[i, :h] = 0.0
        labels[i, :h, 0] = 1.0
        if run_to_failure:
            labels[i, : n - final_cycles, K - 1] = 0.0
            labels[i, n - final_cycles : n] = 0.0
            labels[i, n - final_cycles : n, K - 1] = 1.0
    return {"y": y, "mask": mask, "labels": labels, "units": units, "length": lengths}


def rul_distribution(params: dict, data: dict, num_states: int, *, final_cycles: int = 15,
                     horizon: int = 400):
    """RUL probabilities (B, horizon + final_cycles) of each unit in ``data`` under each set of
    AR-HMM parameters in ``params`` (a leading draw axis), averaged over the draws.

    For one draw and unit: the filtered state distribution p at the unit's last cycle (forward
    algorithm); the probability of first entering the last state s = 1, 2, ... cycles later,
    exactly, by propagating p's transient part through the transition matrix with the
    absorbing column removed; RUL = s + final_cycles - 1, because the last state is entered
    ``final_cycles`` cycles before failure. A unit already in the last state (probability
    p[K-1]) gets RUL final_cycles // 2 (its time spent there is not tracked).
    """
    import jax
    import jax.numpy as jnp

    from bayeslik.filtering import hmm_filter
    from bayeslik.models import arhmm

    def one(p, yy, m, lab):
        li, lt, lo = arhmm.hmm_inputs(p, yy, num_lags=1, labels=lab, left_to_right=True)
        last = jnp.exp(hmm_filter(li, lt, lo, mask=m).log_filtered[-1])  # padding repeats it
        return rul_from_state_probs(last, p["trans"], final_cycles=final_cycles, horizon=horizon)

    per_unit = jax.vmap(one, in_axes=(None, 0, 0, 0))
    per_draw = jax.jit(jax.vmap(per_unit, in_axes=(0, None, None, None)))
    arrays = [jnp.asarray(data[k]) for k in ("y", "mask", "labels")]
    return np.asarray(per_draw({k: jnp.asarray(v) for k, v in params.items()}, *arrays)).mean(0)


def rul_from_state_probs(state_probs, trans, *, final_cycles: int = 15,
                         horizon: int = 400):
    r"""RUL probabilities ``(..., horizon + final_cycles)`` from filtered state probabilities
    ``(..., K)`` of the left-to-right AR-HMM with transition matrix ``trans`` ``(K, K)``: the
    rule of :func:`rul_distribution` (the probability of first entering
    the last state ``s`` cycles later, RUL = ``s + final_cycles - 1``; a unit already in the last
    state gets RUL ``final_cycles // 2``).

    Examples:
        >>> import jax.numpy as jnp
        >>> trans = jnp.array([[0.9, 0.1], [0.0, 1.0]])
        >>> pmf = rul_from_state_probs(jnp.array([1.0, 0.0]), trans, final_cycles=2, horizon=3)
        >>> [round(float(v), 4) for v in pmf]
        [0.0, 0.0, 0.369, 0.3321, 0.2989]
    """
    import jax
    import jax.numpy as jnp

    trans = jnp.asarray(trans)
    K = trans.shape[0]
    absorb = trans[:, K - 1]
    keep = trans.at[:, K - 1].set(0.0)

    def one(p):
        def step(q, _):
            return q @ keep, q @ absorb

        _, enter = jax.lax.scan(step, p.at[K - 1].set(0.0), None, length=horizon)
        pmf = jnp.zeros(horizon + final_cycles, p.dtype)
        pmf = pmf.at[final_cycles + jnp.arange(horizon)].add(enter)
        pmf = pmf.at[final_cycles // 2].add(p[K - 1])
        return pmf / jnp.sum(pmf)

    p = jnp.asarray(state_probs)
    flat = p.reshape(-1, K)
    return jax.vmap(one)(flat).reshape(p.shape[:-1] + (horizon + final_cycles,))


def predict_rul(fit, data: dict, num_states: int, *, final_cycles: int = 15, horizon: int = 400,
                num_draws: int = 200, interval: float = 0.9, cap: int = 125) -> pd.DataFrame:
    """Posterior predictive RUL of each unit in ``data`` (from :func:`degradation_data`) from a
    Fit of the left-to-right AR-HMM: :func:`rul_distribution` over ``num_draws`` posterior
    draws; the point prediction is the median (and the mean), capped at ``cap`` like the truth
    it is scored against, with the central ``interval``.
    """
    total = fit.num_chains * fit.num_draws
    pick = np.round(np.linspace(0, total - 1, min(num_draws, total))).astype(int)
    params = {}
    for k in ("pi", "trans", "b", "A", "sigma"):
        a = fit.draws(k)
        params[k] = a.reshape((-1,) + a.shape[2:])[pick]
    pmf = rul_distribution(params, data, num_states, final_cycles=final_cycles, horizon=horizon)
    cdf = np.cumsum(pmf, axis=1)

    def quant(q):
        return np.minimum(np.argmax(cdf >= q, axis=1), cap)

    return pd.DataFrame({"rul": quant(0.5), "lower": quant((1 - interval) / 2),
                         "upper": quant((1 + interval) / 2),
                         "mean": np.minimum((pmf * np.arange(pmf.shape[1])).sum(1), cap)},
                        index=data["units"])


# ----------------------------------------------------------------------------- benchmark metrics
#: the predictive quantiles a benchmark row stores: the median and the ends of the central 50, 80,
#: 90 and 95% intervals
QUANTILES = (0.025, 0.05, 0.10, 0.25, 0.5, 0.75, 0.90, 0.95, 0.975)
QUANTILE_COLUMNS = ("q025", "q05", "q10", "q25", "median", "q75", "q90", "q95", "q975")
#: central interval -> (lower column, upper column)
INTERVALS = {0.5: ("q25", "q75"), 0.8: ("q10", "q90"), 0.9: ("q05", "q95"), 0.95: ("q025", "q975")}


def quantiles_from_pmf(pmf, probs=QUANTILES, cap: int | None = 125) -> np.ndarray:
    """Quantiles ``(B, len(probs))`` of discrete RUL distributions ``pmf`` ``(B, N)`` on 0..N-1:
    the smallest RUL whose CDF reaches each level, capped at ``cap`` like the truth.

    >>> quantiles_from_pmf(np.array([[0.2, 0.3, 0.5]]), probs=(0.1, 0.5, 0.9), cap=None).tolist()
    [[0, 1, 2]]
    """
    pmf = np.asarray(pmf, float)
    if pmf.ndim != 2:
        raise DataError(f"quantiles_from_pmf: pmf must be (units, RUL values), got shape {pmf.shape}")
    cdf = np.cumsum(pmf / pmf.sum(1, keepdims=True), axis=1)
    q = np.stack([np.argmax(cdf >= p - 1e-12, axis=1) for p in probs], axis=1)
    return q if cap is None else np.minimum(q, cap)


def predict_rul_quantiles(fit, data: dict, num_states: int, *, final_cycles: int = 15,
                          horizon: int = 400, num_draws: int = 200, cap: int = 125) -> pd.DataFrame:
    """Like :func:`predict_rul` for the AR-HMM, but with every benchmark quantile: a DataFrame by
    unit with :data:`QUANTILE_COLUMNS` (capped at ``cap``) and the mean."""
    total = fit.num_chains * fit.num_draws
    pick = np.round(np.linspace(0, total - 1, min(num_draws, total))).astype(int)
    params = {}
    for k in ("pi", "trans", "b", "A", "sigma"):
        a = fit.draws(k)
        params[k] = a.reshape((-1,) + a.shape[2:])[pick]
    pmf = rul_distribution(params, data, num_states, final_cycles=final_cycles, horizon=horizon)
    out = pd.DataFrame(quantiles_from_pmf(pmf, QUANTILES, cap), columns=list(QUANTILE_COLUMNS),
                       index=data["units"])
    out["mean"] = np.minimum((pmf * np.arange(pmf.shape[1])).sum(1), cap)
    return out


def rul_metrics(predictions: pd.DataFrame, cap: int = 125) -> pd.DataFrame:
    """Every benchmark metric, by method, from a table of predictions per test unit.

    ``predictions`` has one row per (method, unit) with columns ``method``, ``true_rul`` and
    ``median``, and optionally the quantile columns of :data:`QUANTILE_COLUMNS` (NaN or absent
    for a point predictor). The truth and every prediction are capped at ``cap`` (the usual
    convention; a predicted quantile above the cap covers a capped truth exactly when the capped
    quantile does). Returns, per method: ``num_units``; ``rmse`` and ``phm08`` of the median
    (:func:`rul_score`); ``coverage_50/80/90/95``, the fraction of units whose capped truth lies
    in the central interval (:data:`INTERVALS`, ends included); ``width_90``, the mean width of
    the capped 90% interval. Coverage and width are NaN for a method without those quantiles.

    >>> t = pd.DataFrame({"method": ["m", "m"], "true_rul": [10, 200], "median": [20, 115],
    ...                   "q05": [5, 100], "q95": [15, 130]})
    >>> r = rul_metrics(t).loc["m"]
    >>> float(r["rmse"]), float(r["coverage_90"]), float(r["width_90"])
    (10.0, 1.0, 17.5)
    """
    missing = [c for c in ("method", "true_rul", "median") if c not in predictions.columns]
    if missing:
        raise DataError(f"rul_metrics: predictions has no column(s) {missing}; it needs one row per "
                        "(method, unit) with method, true_rul, median and optionally the quantiles "
                        f"{list(QUANTILE_COLUMNS)}")
    if not isinstance(cap, (int, np.integer)) or isinstance(cap, bool) or cap < 1:
        raise OptionError(f"rul_metrics: cap must be an integer >= 1, got {cap!r}")
    rows = {}
    for method, g in predictions.groupby("method", sort=False):
        true = np.minimum(g["true_rul"].to_numpy(float), cap)
        med = np.minimum(g["median"].to_numpy(float), cap)
        if not np.all(np.isfinite(med)) or not np.all(np.isfinite(true)):
            raise DataError(f"rul_metrics: method {method!r} has NaN or infinite true_rul/median; "
                            "every unit needs a point prediction and its truth")
        s = rul_score(true, med, cap=cap)
        row = {"num_units": len(g), "rmse": s["rmse"], "phm08": s["phm08"]}
        for level, (lo, hi) in INTERVALS.items():
            name = f"coverage_{round(level * 100)}"
            if lo in g.columns and hi in g.columns and g[[lo, hi]].notna().all().all():
                low = np.minimum(g[lo].to_numpy(float), cap)
                up = np.minimum(g[hi].to_numpy(float), cap)
                row[name] = float(np.mean((low <= true) & (true <= up)))
                if level == 0.9:
                    row["width_90"] = float(np.mean(up - low))
            else:
                row[name] = np.nan
        row.setdefault("width_90", np.nan)
        rows[method] = row
    return pd.DataFrame.from_dict(rows, orient="index")
