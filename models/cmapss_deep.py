"""A small deep-learning reference for C-MAPSS RUL: a 1-D CNN on sensor windows (JAX/equinox).

The standard protocol of the deep-learning literature on FD001: the 14 informative sensors
(:data:`bayeslik.models.cmapss.INFORMATIVE`), min-max normalised with the training engines'
range; every window of ``window`` = 30 consecutive cycles of a training engine is an example
whose target is the RUL at its last cycle capped at ``cap`` = 125 (the piecewise-linear target);
a test engine is predicted from its last window (an engine shorter than the window is padded
with its first cycle). Training is Adam on the mean squared error with early stopping on a
validation split of the *training engines* (whole engines held out, never the test set); the
parameters of the best validation epoch are kept. The network gives point predictions only.

>>> import jax
>>> from bayeslik.models import cmapss, cmapss_deep
>>> d = cmapss.load()
>>> res = cmapss_deep.fit(jax.random.key(0), d["train"], num_epochs=1, max_steps=2)
>>> pred = cmapss_deep.predict(res, d["test"])       # DataFrame by unit: column "rul"
>>> pred.shape
(100, 1)
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd

from bayeslik.errors import DataError, OptionError
from bayeslik.models.cmapss import INFORMATIVE

__all__ = ["Scaler", "CNN", "windows", "last_windows", "fit", "predict", "DeepFit"]


@dataclass(frozen=True)
class Scaler:
    """Min-max normalisation to [-1, 1] with the training range of each sensor."""

    low: np.ndarray
    high: np.ndarray
    sensors: tuple[str, ...]

    @classmethod
    def fit(cls, train: pd.DataFrame, sensors=tuple(INFORMATIVE)) -> "Scaler":
        missing = [s for s in sensors if s not in train.columns]
        if missing:
            raise DataError(f"Scaler.fit: train has no column(s) {missing}")
        X = train[list(sensors)].to_numpy(float)
        low, high = X.min(0), X.max(0)
        flat = [s for s, lo, hi in zip(sensors, low, high) if not hi > lo]
        if flat:
            raise DataError(f"Scaler.fit: sensor(s) {flat} are constant in train; leave them out "
                            "with sensors=...")
        return cls(low, high, tuple(sensors))

    def __call__(self, df: pd.DataFrame) -> np.ndarray:
        X = df[list(self.sensors)].to_numpy(float)
        return (2 * (X - self.low) / (self.high - self.low) - 1).astype(np.float32)


def _check_int(where: str, name: str, v, low: int) -> None:
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < low:
        raise OptionError(f"{where}: {name} must be an integer >= {low}, got {v!r}")


def windows(df: pd.DataFrame, scaler: Scaler, window: int = 30, cap: int = 125):
    """Every window of ``window`` cycles of the run-to-failure units in ``df``: inputs
    ``(N, window, num_sensors)`` float32, targets ``(N,)`` = min(cap, cycles to failure after
    the window's last cycle), and the unit of each window ``(N,)``."""
    _check_int("windows", "window", window, 1)
    _check_int("windows", "cap", cap, 1)
    Z = scaler(df)
    xs, ys, us = [], [], []
    for unit, idx in df.groupby("unit").indices.items():
        idx = idx[np.argsort(df["cycle"].to_numpy()[idx])]
        z, n = Z[idx], len(idx)
        if n < window:
            continue
        view = np.lib.stride_tricks.sliding_window_view(z, window, axis=0)  # (n-w+1, S, w)
        xs.append(np.swapaxes(view, 1, 2))
        end = np.arange(window - 1, n)
        ys.append(np.minimum(cap, n - 1 - end).astype(np.float32))
        us.append(np.full(len(end), unit))
    if not xs:
        raise DataError(f"windows: no unit in df has {window} cycles; lower window")
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(us)


def last_windows(df: pd.DataFrame, scaler: Scaler, window: int = 30):
    """The last ``window`` cycles of every unit ``(B, window, num_sensors)`` (units shorter
    than the window are padded at the start with their first cycle) and the units ``(B,)``."""
    _check_int("last_windows", "window", window, 1)
    Z = scaler(df)
    xs, units = [], []
    for unit, idx in df.groupby("unit").indices.items():
        idx = idx[np.argsort(df["cycle"].to_numpy()[idx])]
        z = Z[idx][-window:]
        if len(z) < window:
            z = np.concatenate([np.repeat(z[:1], window - len(z), 0), z])
        xs.append(z)
        units.append(unit)
    if not xs:
        raise DataError("last_windows: df has no rows")
    return np.stack(xs), np.array(units)


class CNN(eqx.Module):
    """1-D CNN: ``num_conv`` convolutions along time (``width`` channels, kernel ``kernel``,
    same padding, tanh), then a dense layer of ``hidden`` units (tanh, dropout) and a linear
    output. Input ``(window, num_sensors)``, output a scalar (RUL / cap)."""

    convs: list
    dense: eqx.nn.Linear
    out: eqx.nn.Linear
    dropout: eqx.nn.Dropout

    def __init__(self, key, num_sensors: int = 14, window: int = 30, width: int = 10,
                 kernel: int = 10, num_conv: int = 4, hidden: int = 100, dropout: float = 0.2):
        keys = jax.random.split(key, num_conv + 2)
        chans = [num_sensors] + [width] * num_conv
        self.convs = [eqx.nn.Conv1d(chans[i], chans[i + 1], kernel, padding="SAME", key=keys[i])
                      for i in range(num_conv)]
        self.dense = eqx.nn.Linear(width * window, hidden, key=keys[-2])
        self.out = eqx.nn.Linear(hidden, 1, key=keys[-1])
        self.dropout = eqx.nn.Dropout(dropout)

    def __call__(self, x, *, key=None):
        h = x.T                                    # (channels, time)
        for conv in self.convs:
            h = jnp.tanh(conv(h))
        h = jnp.tanh(self.dense(h.reshape(-1)))
        h = self.dropout(h, key=key, inference=key is None)
        return self.out(h)[0]


@dataclass(frozen=True)
class DeepFit:
    """A trained network with its normalisation: ``model``, ``scaler``, ``window``, ``cap``;
    ``history`` (epoch, train and validation RMSE in cycles), ``best_epoch``, ``wall_s``."""

    model: CNN
    scaler: Scaler
    window: int
    cap: int
    history: pd.DataFrame
    best_epoch: int
    wall_s: float


def _batched_predict(model, X, batch: int = 4096):
    f = eqx.filter_jit(jax.vmap(lambda m, x: m(x), in_axes=(None, 0)))
    return np.concatenate([np.asarray(f(model, X[i:i + batch])) for i in range(0, len(X), batch)])


def fit(rng_key, train: pd.DataFrame, *, window: int = 30, cap: int = 125,
        val_fraction: float = 0.2, num_epochs: int = 60, batch_size: int = 512,
        learning_rate: float = 1e-3, patience: int = 10, max_steps: int | None = None,
        sensors=tuple(INFORMATIVE), **net) -> DeepFit:
    """Train the CNN on the run-to-failure units of ``train``, early-stopped on a random
    ``val_fraction`` of those units (whole units; at least one). ``max_steps`` caps the
    optimiser steps per epoch (for smoke tests); ``net`` goes to :class:`CNN`."""
    _check_int("cmapss_deep.fit", "num_epochs", num_epochs, 1)
    _check_int("cmapss_deep.fit", "batch_size", batch_size, 1)
    _check_int("cmapss_deep.fit", "patience", patience, 1)
    if max_steps is not None:
        _check_int("cmapss_deep.fit", "max_steps", max_steps, 1)
    if not 0 < val_fraction < 1:
        raise OptionError(f"cmapss_deep.fit: val_fraction must be in (0, 1), got {val_fraction!r}")
    t0 = time.perf_counter()
    scaler = Scaler.fit(train, sensors)
    X, y, u = windows(train, scaler, window, cap)
    k_split, k_init, k_train = jax.random.split(rng_key, 3)
    units = np.unique(u)
    if len(units) < 2:
        raise DataError("cmapss_deep.fit: train needs at least 2 units (one for validation)")
    num_val = max(1, int(round(val_fraction * len(units))))
    val_units = np.asarray(jax.random.permutation(k_split, units))[:num_val]
    is_val = np.isin(u, val_units)
    Xt, yt, Xv, yv = X[~is_val], y[~is_val] / cap, X[is_val], y[is_val]
    model = CNN(k_init, num_sensors=len(sensors), window=window, **net)
    opt = optax.adam(learning_rate)
    state = opt.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(model, state, xb, yb, key):
        def loss(m):
            keys = jax.random.split(key, xb.shape[0])
            pred = jax.vmap(lambda x, k: m(x, key=k))(xb, keys)
            return jnp.mean((pred - yb) ** 2)

        val, grads = eqx.filter_value_and_grad(loss)(model)
        updates, state = opt.update(grads, state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), state, val

    best, best_rmse, best_epoch, rows, waited = model, np.inf, 0, [], 0
    rng = np.random.default_rng(int(jax.random.randint(k_train, (), 0, 2**31 - 1)))
    for epoch in range(1, num_epochs + 1):
        order = rng.permutation(len(Xt))
        losses = []
        for i, s in enumerate(range(0, len(order), batch_size)):
            if max_steps is not None and i >= max_steps:
                break
            b = order[s:s + batch_size]
            k_train, k = jax.random.split(k_train)
            model, state, val = step(model, state, jnp.asarray(Xt[b]), jnp.asarray(yt[b]), k)
            losses.append(float(val))
        val_rmse = float(np.sqrt(np.mean((np.clip(_batched_predict(model, Xv), 0, 1) * cap - yv) ** 2)))
        rows.append({"epoch": epoch, "train_rmse": float(np.sqrt(np.mean(losses))) * cap,
                     "val_rmse": val_rmse})
        if val_rmse < best_rmse:
            best, best_rmse, best_epoch, waited = model, val_rmse, epoch, 0
        else:
            waited += 1
            if waited >= patience:
                break
    return DeepFit(best, scaler, window, cap, pd.DataFrame(rows), best_epoch,
                   time.perf_counter() - t0)


def predict(res: DeepFit, df: pd.DataFrame) -> pd.DataFrame:
    """Point RUL of every unit of ``df`` from its last window, clipped to [0, cap]: a DataFrame
    by unit with column ``rul``."""
    X, units = last_windows(df, res.scaler, res.window)
    pred = np.clip(_batched_predict(res.model, X), 0, 1) * res.cap
    return pd.DataFrame({"rul": pred}, index=units).sort_index()
