"""Ensembles of small MLPs that learn a log-likelihood from evaluated points (equinox + optax).

The building blocks of the likelihood surrogate, usable on their own:

* :class:`Architecture` — kind, width, depth and learning rate of one network. Two kinds:
  ``"mlp"``, a multilayer perceptron on all inputs, and ``"additive"``, a sum of one small MLP per
  input, ``f(x) = sum_j f_j(x_j) + b`` (a neural additive model, Agarwal et al. 2021): exact for
  likelihoods that factorise over the parameters (independent data blocks, products of
  marginals), where it needs far fewer points than an MLP to reach the same accuracy.
* :func:`fit_scaler` — standardisation of inputs and outputs from the training points.
* :func:`train_ensemble` — trains ``num_members`` networks of one architecture at once (they are
  stacked on a leading axis and trained in one vmapped, jitted loop), full-batch Adam(W) with
  early stopping on a held-out set; returns an :class:`Ensemble`.
* :func:`predict` — ensemble mean and spread (standard deviation over members) in the original
  units (nats).
* :func:`search_architecture` — successive halving over a grid of kinds, architectures and
  learning rates (Jamieson & Talwalkar 2016): every candidate is trained for a small budget, the
  best third (by held-out RMSE) get three times the budget, and so on until one remains.

All training arrays have a fixed capacity, rows not in use having weight 0, so one architecture
compiles once per run however many points have been evaluated.

Example
-------
>>> import jax, numpy as np
>>> from bayeslik.surrogate import network
>>> x = np.random.default_rng(0).uniform(size=(256, 2))
>>> y = -0.5 * ((x - 0.5) ** 2).sum(1) / 0.1**2
>>> w_train = np.arange(256) % 4 != 0
>>> ens, info = network.train_ensemble(jax.random.key(0), x, y, w_train, ~w_train,
...                                    network.Architecture(32, 2, 3e-3), num_members=3)
>>> mean, spread = network.predict(ens, x[:5])
>>> bool(info.val_rmse < 0.5)
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bayeslik.errors import OptionError
from bayeslik.weights import bucket, pad_rows

__all__ = [
    "Architecture", "AdditiveMLP", "KINDS", "Scaler", "Ensemble", "TrainInfo", "SearchResult",
    "fit_scaler", "train_ensemble", "predict", "search_architecture",
]


KINDS = ("mlp", "additive")


@dataclass(frozen=True)
class Architecture:
    """One network design: hidden ``width``, number of hidden layers ``depth``, Adam's step size,
    and the ``kind``: ``"mlp"`` (one MLP on all inputs) or ``"additive"`` (one MLP of this width
    and depth per input, summed)."""

    width: int
    depth: int
    learning_rate: float
    kind: str = "mlp"

    def __post_init__(self) -> None:
        if int(self.width) < 1 or int(self.depth) < 1 or not self.learning_rate > 0:
            raise OptionError(
                f"Architecture needs width >= 1, depth >= 1 and learning_rate > 0, got {self}."
            )
        if self.kind not in KINDS:
            raise OptionError(f"Architecture kind must be one of {KINDS}, got {self.kind!r}.")


class AdditiveMLP(eqx.Module):
    """``f(x) = sum_j f_j(x_j) + b``: one scalar-to-scalar MLP per input, stored as stacked
    weights so the ``d`` small networks run as batched matrix products.

    ``depth`` hidden layers of ``width`` units (SiLU), as :class:`equinox.nn.MLP` counts them;
    weights initialised like :class:`equinox.nn.Linear` (uniform, bound ``1 / sqrt(fan_in)``).
    """

    w_in: jax.Array  # (d, width)
    b_in: jax.Array  # (d, width)
    w_hidden: tuple  # (d, width, width) each
    b_hidden: tuple  # (d, width) each
    w_out: jax.Array  # (d, width)
    b_out: jax.Array  # ()

    def __init__(self, in_size: int, width: int, depth: int, *, key: jax.Array) -> None:
        d, h = int(in_size), int(width)
        keys = jax.random.split(key, 2 * depth + 2)
        u = lambda k, shape, fan_in: jax.random.uniform(  # noqa: E731
            k, shape, minval=-1.0, maxval=1.0) / math.sqrt(fan_in)
        self.w_in, self.b_in = u(keys[0], (d, h), 1), u(keys[1], (d, h), 1)
        self.w_hidden = tuple(u(keys[2 + 2 * i], (d, h, h), h) for i in range(depth - 1))
        self.b_hidden = tuple(u(keys[3 + 2 * i], (d, h), h) for i in range(depth - 1))
        self.w_out = u(keys[-2], (d, h), h)
        self.b_out = u(keys[-1], (), h)

    def __call__(self, x: jax.Array) -> jax.Array:
        z = jax.nn.silu(x[:, None] * self.w_in + self.b_in)
        for w, b in zip(self.w_hidden, self.b_hidden):
            z = jax.nn.silu(jnp.einsum("dh,dhk->dk", z, w) + b)
        return jnp.sum(z * self.w_out) + self.b_out


class Scaler(NamedTuple):
    """Affine standardisation: ``x_std = (x - x_loc) / x_scale``, same for y."""

    x_loc: jax.Array
    x_scale: jax.Array
    y_loc: jax.Array
    y_scale: jax.Array


class Ensemble(NamedTuple):
    """``num_members`` networks stacked on a leading axis, with the scaler they were trained
    under."""

    models: eqx.Module
    scaler: Scaler
    architecture: Architecture
    num_members: int


class TrainInfo(NamedTuple):
    """What a training run did: steps taken, held-out RMSE (nats, ensemble mean), per member."""

    num_steps: int
    val_rmse: float
    member_val_rmse: np.ndarray
    train_rmse: float


class SearchResult(NamedTuple):
    """The chosen architecture and every candidate's held-out RMSE at each rung."""

    best: Architecture
    table: list  # [(rung, Architecture, steps, val_rmse)]
    num_trainings: int


# a single optimiser object; the learning rate lives in each member's state (inject_hyperparams)
_OPT = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3, weight_decay=1e-5)


def fit_scaler(x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> Scaler:
    """Standardisation from the rows with non-zero weight: inputs by their mean and sd, outputs
    by their *weighted* mean and sd (sd floored at 1e-8), so that when the loss weights favour a
    region (e.g. high log-likelihoods) the outputs there are of order one."""
    w = np.asarray(weights, np.float64)
    sel = w > 0
    xs, ys, ws = np.asarray(x, np.float64)[sel], np.asarray(y, np.float64)[sel], w[sel]
    x_scale = np.maximum(xs.std(0), 1e-8)
    y_loc = float(np.average(ys, weights=ws))
    y_scale = max(float(np.sqrt(np.average((ys - y_loc) ** 2, weights=ws))), 1e-8)
    return Scaler(
        jnp.asarray(xs.mean(0), jnp.float32), jnp.asarray(x_scale, jnp.float32),
        jnp.asarray(y_loc, jnp.float32), jnp.asarray(y_scale, jnp.float32),
    )


def _make_stack(rng_key: jax.Array, in_size: int, arch: Architecture, num: int) -> eqx.Module:
    keys = jax.random.split(rng_key, num)
    w, d = int(arch.width), int(arch.depth)

    def make(k):
        if arch.kind == "additive":
            return AdditiveMLP(in_size, w, d, key=k)
        return eqx.nn.MLP(in_size, "scalar", w, d, activation=jax.nn.silu, key=k)

    return eqx.filter_vmap(make)(keys)


def _init_opt(params, learning_rates: jax.Array):
    def one(p, lr):
        state = _OPT.init(p)
        return state._replace(hyperparams={**state.hyperparams, "learning_rate": lr})

    return jax.vmap(one)(params, learning_rates)


def _member_rmse(models, x, y, w):
    """Per-member weighted RMSE in standardised units."""
    pred = eqx.filter_vmap(lambda m: jax.vmap(m)(x))(models)
    return jnp.sqrt(jnp.sum(w * (pred - y) ** 2, axis=-1) / jnp.maximum(jnp.sum(w, -1), 1.0))


@eqx.filter_jit
def _train_chunk(models, opt_states, x, y, w_train, num_steps):
    """``num_steps`` full-batch AdamW steps of every member (members on the leading axis)."""
    params, static = eqx.partition(models, eqx.is_array)

    def loss(p, w):
        pred = jax.vmap(eqx.combine(p, static))(x)
        return jnp.sum(w * (pred - y) ** 2) / jnp.maximum(jnp.sum(w), 1.0)

    def step_one(p, s, w):
        g = jax.grad(loss)(p, w)
        updates, s = _OPT.update(g, s, p)
        return optax.apply_updates(p, updates), s

    def body(_, carry):
        p, s = carry
        return jax.vmap(step_one)(p, s, w_train)

    params, opt_states = jax.lax.fori_loop(0, num_steps, body, (params, opt_states))
    return eqx.combine(params, static), opt_states


@eqx.filter_jit
def _rmse_jit(models, x, y, w):
    return _member_rmse(models, x, y, w)


@eqx.filter_jit
def _predict_std(models, x):
    return eqx.filter_vmap(lambda m: jax.vmap(m)(x))(models)


def _select(mask, new, old):
    """Per-member choice between two stacked pytrees (mask over the leading axis)."""

    def pick(a, b):
        if not eqx.is_array(a):
            return a
        return jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)

    return jax.tree_util.tree_map(pick, new, old)


def _train_stack(models, opt_states, x, y, w_train, w_val, *, max_steps, chunk, patience,
                 should_stop=None):
    """Train stacked members with per-member early stopping; return best models and RMSEs.
    ``should_stop()`` (if given) is asked between chunks: True ends the training there."""
    best = models
    best_rmse = np.full(w_train.shape[0], np.inf)
    stale = np.zeros(w_train.shape[0], int)
    steps = 0
    while steps < max_steps and not (should_stop is not None and steps and should_stop()):
        n = int(min(chunk, max_steps - steps))
        models, opt_states = _train_chunk(models, opt_states, x, y, w_train, jnp.asarray(n))
        steps += n
        rmse = np.asarray(_rmse_jit(models, x, y, w_val))
        rmse = np.where(np.isfinite(rmse), rmse, np.inf)
        better = rmse < best_rmse * (1 - 1e-3)
        best = _select(jnp.asarray(better), models, best)
        best_rmse = np.where(better, rmse, best_rmse)
        stale = np.where(better, 0, stale + 1)
        if np.all(stale >= patience):
            break
    return best, best_rmse, models, opt_states, steps


def _standardise(x, y, scaler: Scaler):
    xs = (jnp.asarray(x, jnp.float32) - scaler.x_loc) / scaler.x_scale
    ys = (jnp.asarray(y, jnp.float32) - scaler.y_loc) / scaler.y_scale
    return xs, ys


def train_ensemble(rng_key: jax.Array, x: np.ndarray, y: np.ndarray, w_train: np.ndarray,
                   w_val: np.ndarray, architecture: Architecture, *, num_members: int = 4,
                   max_steps: int = 3000, chunk: int = 250, patience: int = 3,
                   scaler: Scaler | None = None, init: Ensemble | None = None,
                   should_stop: Callable[[], bool] | None = None,
                   ) -> tuple[Ensemble, TrainInfo]:
    """Train an ensemble of MLPs on (x, y) and return it with its held-out accuracy.

    Each member minimises the weighted mean squared error of the standardised outputs on the rows
    where ``w_train`` is non-zero (full batch, AdamW); members differ in their initialisation.
    Every ``chunk`` steps the held-out RMSE (rows where ``w_val`` is non-zero) is computed and each
    member keeps its best parameters; training stops when no member improved for ``patience``
    chunks or after ``max_steps``. ``init`` warm-starts from a previous ensemble of the same
    architecture (a retrain); ``scaler`` defaults to :func:`fit_scaler` on the training rows.
    ``should_stop()``, if given, is asked between chunks (after the first): True ends the training
    early with the best parameters so far (the surrogate's background thread uses it to stop when
    the run ends).

    Returns the ensemble and a :class:`TrainInfo` whose ``val_rmse`` is the RMSE of the ensemble
    mean on the held-out rows, in the units of ``y``.
    """
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.float32)
    w_train = np.asarray(w_train, np.float32)
    w_val = np.asarray(w_val, np.float32)
    if scaler is None:
        scaler = fit_scaler(x, y, w_train)
    xs, ys = _standardise(x, y, scaler)
    if init is not None and init.architecture == architecture and init.num_members == num_members:
        models = init.models
    else:
        models = _make_stack(rng_key, x.shape[1], architecture, num_members)
    params = eqx.filter(models, eqx.is_array)
    lrs = jnp.full((num_members,), architecture.learning_rate, jnp.float32)
    opt_states = _init_opt(params, lrs)
    wt = jnp.broadcast_to(jnp.asarray(w_train), (num_members, x.shape[0]))
    wv = jnp.broadcast_to(jnp.asarray(w_val), (num_members, x.shape[0]))
    best, member_rmse, _, _, steps = _train_stack(
        models, opt_states, xs, ys, wt, wv, max_steps=max_steps, chunk=chunk, patience=patience,
        should_stop=should_stop)
    ens = Ensemble(best, scaler, architecture, num_members)
    mean, _ = predict(ens, x)
    val_rmse = _weighted_rmse(mean, y, w_val)
    train_rmse = _weighted_rmse(mean, y, w_train)
    return ens, TrainInfo(steps, val_rmse, member_rmse * float(scaler.y_scale), train_rmse)


def _weighted_rmse(pred, y, w) -> float:
    w = np.asarray(w, np.float64)
    if w.sum() <= 0:
        return float("nan")
    d = np.asarray(pred, np.float64) - np.asarray(y, np.float64)
    return float(np.sqrt((w * d * d).sum() / w.sum()))


def predict(ensemble: Ensemble, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ensemble mean and spread (sd over members) at ``x`` (n, d), in the original units.

    Batches are padded to a power of two so a run compiles a handful of shapes only.
    """
    x = np.asarray(x, np.float32)
    n = x.shape[0]
    xp = pad_rows(x, bucket(n, smallest=16), fill=0.0)
    sc = ensemble.scaler
    xs = (jnp.asarray(xp) - sc.x_loc) / sc.x_scale
    out = np.asarray(_predict_std(ensemble.models, xs), np.float64)[:, :n]
    out = out * float(sc.y_scale) + float(sc.y_loc)
    if not np.all(np.isfinite(out)):
        out = np.where(np.isfinite(out), out, -np.inf)
    mean = out.mean(0)
    spread = out.std(0) if out.shape[0] > 1 else np.zeros(n)
    return mean, spread


def search_architecture(rng_key: jax.Array, x: np.ndarray, y: np.ndarray, w_train: np.ndarray,
                        w_val: np.ndarray, candidates: list[Architecture], *,
                        min_steps: int = 300, eta: int = 3, chunk: int = 100,
                        scaler: Scaler | None = None,
                        should_stop: Callable[[], bool] | None = None) -> SearchResult:
    """Successive halving over ``candidates``, ranked by held-out RMSE of one network each.

    Rung r trains the surviving candidates for ``min_steps * eta**r`` steps (with early
    stopping inside the budget), keeps the best ``ceil(n / eta)`` and repeats until one is left
    (which is not trained further: the caller trains its ensemble). Candidates of one (kind,
    width, depth) are trained together (stacked, each with its own learning rate), so the search
    compiles once per (kind, width, depth). Survivors continue from the parameters they reached
    (no restart), as in Hyperband's successive halving. ``should_stop`` as in
    :func:`train_ensemble` (a stopped search returns the best candidate of the rung reached).
    """
    if not candidates:
        raise OptionError("search_architecture needs at least one candidate architecture.")
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.float32)
    if scaler is None:
        scaler = fit_scaler(x, y, w_train)
    xs, ys = _standardise(x, y, scaler)
    groups: dict[tuple[str, int, int], list[Architecture]] = {}
    for c in candidates:
        groups.setdefault((c.kind, int(c.width), int(c.depth)), []).append(c)
    # state per group: models, opt states, candidates in stack order
    state = {}
    keys = jax.random.split(rng_key, len(groups))
    for k, (wd, archs) in zip(keys, groups.items()):
        models = _make_stack(k, x.shape[1], archs[0], len(archs))
        lrs = jnp.asarray([a.learning_rate for a in archs], jnp.float32)
        state[wd] = [models, _init_opt(eqx.filter(models, eqx.is_array), lrs), archs]
    alive = list(candidates)
    table, rung, trainings = [], 0, 0
    score: dict[Architecture, float] = {}
    while True:
        steps = int(min_steps * eta**rung)
        for wd, (models, opt, archs) in state.items():
            live = [a in alive for a in archs]
            if not any(live):
                continue
            n = len(archs)
            wt = jnp.broadcast_to(jnp.asarray(w_train, jnp.float32), (n, x.shape[0]))
            wv = jnp.broadcast_to(jnp.asarray(w_val, jnp.float32), (n, x.shape[0]))
            # dead candidates ride along with zero weight (no gradient), keeping one shape
            wt = wt * jnp.asarray(live, jnp.float32)[:, None]
            best, rmse, models, opt, _ = _train_stack(
                models, opt, xs, ys, wt, wv, max_steps=steps, chunk=chunk, patience=2,
                should_stop=should_stop)
            state[wd] = [best, opt, archs]
            trainings += sum(live)
            for a, r, ok in zip(archs, rmse, live):
                if ok:
                    score[a] = float(r) * float(scaler.y_scale)
                    table.append((rung, a, steps, score[a]))
        if len(alive) == 1 or (should_stop is not None and should_stop()):
            alive.sort(key=lambda a: score[a])
            break
        alive.sort(key=lambda a: score[a])
        alive = alive[: max(1, math.ceil(len(alive) / eta))]
        if len(alive) == 1:  # the caller trains the chosen design's ensemble from scratch
            break
        rung += 1
    return SearchResult(alive[0], table, trainings)
