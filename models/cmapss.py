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

__all__ = ["load", "COLUMNS", "SENSORS", "INFORMATIVE", "HealthIndicator", "rul_score", "baseline_rul"]

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
        raise ValueError(f"subset {subset!r} is not bundled; bayeslik ships FD001 only.")
    with _path("train_FD001.txt.gz").open("rb") as f:
        train = pd.read_csv(f, sep=r"\s+", header=None, names=COLUMNS, compression="gzip")
    with _path("test_FD001.txt.gz").open("rb") as f:
        test = pd.read_csv(f, sep=r"\s+", header=None, names=COLUMNS, compression="gzip")
    with _path("RUL_FD001.txt.gz").open("rb") as f:
        rul = pd.read_csv(f, header=None, compression="gzip")[0].to_numpy()
    for name, df in (("train", train), ("test", test)):
        if df.isna().any().any():
            raise ValueError(f"C-MAPSS {name} file has missing values: the bundled file is damaged.")
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
        X = train[list(sensors)].to_numpy(float)
        mean, scale = X.mean(0), X.std(0)
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
