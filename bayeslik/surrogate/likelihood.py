r"""A neural surrogate that stands in for an expensive log-likelihood during nested sampling.

The idea is BAMBI's (Graff et al. 2012) and Gomez-Vargas et al.'s (2023): nested sampling
evaluates the likelihood at many points, most of them near the current likelihood contour; an
ensemble of small networks trained on those points can replace the true likelihood once it is
accurate where the run is going. :class:`SurrogateLikelihood` is a ``loglikelihood_wrapper`` for the
``"nested"`` engine: given the true batched likelihood it returns a batched function that
decides, point by point, whether the surrogate's value is good enough.

The rules (all thresholds in :class:`SurrogateOptions`):

1. **Learning.** Until the surrogate is switched in, every point goes to the true likelihood and
   is stored. Once ``num_initial`` points are stored, and again every ``retrain_every`` new true
   points (doubling the interval, up to 32x, while the network keeps failing), an ensemble is
   trained on ``train_size`` of them: the ``top_fraction`` share with the highest values of the
   whole run (the live points and all else above the contour) and the most recent others.
   Inputs are the physical (constrained) parameter values by default, outputs the
   log-likelihood, both standardised. Targets below
   the ``clip_quantile`` of the window are clipped up to it: nested sampling needs values only
   above its contour, and everything far below only has to stay below. The first training runs
   a successive-halving search over architectures (``kinds`` x ``widths`` x ``depths`` x
   ``learning_rates``; the kinds are one MLP on all inputs, or a sum of one MLP per input, which
   is exact for a likelihood that factorises over the parameters). After a refused training the
   search's best design of the other kind is trained too and the better one kept.
2. **Tolerance.** Accuracy matters where the posterior mass is. A point whose log-likelihood is
   ``g`` nats below the highest one seen is held to ``s(g) * rmse_max`` with
   ``s(g) = 1 + rel_tol / rmse_max * max(0, g - full_accuracy_nats)``: full accuracy in the
   posterior bulk, a relative accuracy far below it, where the dead points carry negligible
   weight. The training loss weights points by ``1 / s^2`` and the output scale is the weighted
   one, so the networks spend their capacity on the bulk.
3. **Switch-in.** A random ``val_fraction`` of the window is held out; the surrogate is switched
   in when, on the held-out points above the ``contour_quantile`` of the window's values (near and
   above the current contour), the RMS of ``error / s`` is at most ``rmse_max`` and the mean of
   ``spread / s`` at most ``spread_max``.
4. **Serving.** With the surrogate in, a point gets the ensemble mean ``m`` unless
   (a) ``m`` lies above the training range (``m > max`` of the trained values): such points always
   go to the true likelihood, since the network extrapolates there and nested sampling would
   otherwise chase its errors upward;
   (b) the ensemble spread exceeds ``s * spread_max`` (unless the point is predicted far below the
   clip level even at ``m + 3 spread``);
   (c) it is drawn for a re-check (probability ``1 / recheck_every``).
   Points of (a)-(c) get their true value, which is stored for training.
5. **Fallback.** The re-checks are a random sample of the points the surrogate would serve; the
   RMS of their errors (over ``s``) over the last ``recheck_window`` of them must stay below
   ``fallback_rmse``, otherwise the surrogate is switched out (every point goes to the true
   likelihood again) and retrained after ``retrain_every`` new points. While it serves, it is
   retrained (warm start) every ``retrain_every`` new true points; the new ensemble replaces the
   serving one only if it does better on the new window's held-out points.
6. **Cost** (``switch="cost"``, the default; :mod:`bayeslik.surrogate.cost`). The wall time of
   the true calls (per point, compile time excluded), of each training and of the network's
   answers is measured as the run goes. A due training (rules 1 and 5) starts only when the
   projected saving over the points still to come exceeds its expected cost; a network that
   passes the check of rule 3 is switched in only when the projected saving is positive.
   Otherwise the points keep going to the true likelihood. Trainings run in a background
   thread (``background=True``) on a snapshot of the window while the sampler goes on; the
   result is taken in at the next batch after it is done.
7. **Guard.** ``finalize`` re-weights a subsample of the final posterior with the true likelihood
   (:mod:`bayeslik.surrogate.guard`) and replaces the evidence by the corrected one; the fit is
   flagged when the correction exceeds ``guard_max_correction`` nats or its ESS fraction is below
   ``guard_min_ess_fraction``.

Example
-------
>>> import numpy as np
>>> from bayeslik.surrogate.likelihood import SurrogateLikelihood, SurrogateOptions
>>> opts = SurrogateOptions(num_initial=200, search=False, inputs="cube")
>>> wrapper = SurrogateLikelihood(opts, num_live=100)
>>> true_fn = lambda u: -0.5 * (((u - 0.5) / 0.1) ** 2).sum(1)
>>> batch_fn = wrapper(true_fn, None, __import__("jax").random.key(0))
>>> vals = batch_fn(np.random.default_rng(0).uniform(size=(8, 2)))   # learning: true values
>>> wrapper.counters["num_true_calls"]
8
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import jax
import numpy as np

from bayeslik.errors import EngineError
from bayeslik.surrogate import cost as _cost
from bayeslik.surrogate import guard as _guard
from bayeslik.surrogate import network as _net
from bayeslik.weights import bucket, pad_rows

__all__ = ["SurrogateOptions", "SurrogateLikelihood"]


@dataclass(frozen=True)
class SurrogateOptions:
    """Settings of the likelihood surrogate (all hashable). See the module docstring for the rules.

    num_initial : true points before the first training (None: ``2 * num_live``).
    inputs : what the networks see: "physical", the constrained parameter values (flattened; a
        likelihood is usually smoothest there, e.g. quadratic for a Gaussian), or "cube", the
        unit-cube coordinates the sampler works in.
    train_size : the true points trained on (the arrays' fixed capacity).
    top_fraction : the share of the window given to the highest log-likelihoods of the whole
        run; the rest are the most recent points.
    val_fraction : share of the window held out for the accuracy check.
    contour_quantile : the held-out check uses held-out points above this quantile of the window.
    clip_quantile : training targets below this quantile of the window are clipped up to it.
    rmse_max : switch-in threshold on the held-out RMSE near the contour (nats), for points
        within ``full_accuracy_nats`` of the highest log-likelihood seen.
    spread_max : switch-in threshold on the mean held-out spread, and the per-point spread above
        which a point goes to the true likelihood (nats), on the same scale.
    rel_tol, full_accuracy_nats : how the tolerance grows below the posterior bulk: a point whose
        log-likelihood is ``g`` nats below the highest seen is held to ``s(g) * rmse_max`` (and
        ``s(g) * spread_max``), ``s(g) = 1 + rel_tol / rmse_max * max(0, g -
        full_accuracy_nats)``. Such points carry negligible posterior weight, and nested sampling
        there only compares them with a contour that is equally far down. None: ``ndim / 2 + 3
        sqrt(ndim / 2) + 3``, the bulk of a Gaussian posterior's log-likelihood values.
    recheck_every : a served point is re-checked with probability ``1 / recheck_every``.
    recheck_window, fallback_rmse : the RMSE of the last ``recheck_window`` errors of true
        evaluations made with the surrogate in; above ``fallback_rmse`` it is switched out.
    retrain_every : new true points between (re)trainings.
    num_members : networks in the ensemble.
    train_steps : most AdamW steps per training (early stopping on the held-out points).
    search : run the successive-halving search at the first training (else ``kinds[0]``,
        ``widths[0]``, ``depths[0]``, ``learning_rates[0]``).
    kinds, widths, depths, learning_rates : the search grid; kinds are "mlp" (one network on all
        inputs) and "additive" (one network of that width and depth per input, summed:
        :class:`bayeslik.surrogate.network.AdditiveMLP`).
    search_min_steps : the budget of the search's first rung.
    guard_num_points : posterior points re-weighted by the guard (0: no guard).
    guard_max_correction, guard_min_ess_fraction : when the guard flags the fit.
    """

    num_initial: int | None = None
    inputs: str = "physical"
    train_size: int = 1000
    top_fraction: float = 0.5
    val_fraction: float = 0.2
    contour_quantile: float = 0.5
    clip_quantile: float = 0.1
    rmse_max: float = 0.1
    spread_max: float = 0.2
    rel_tol: float = 0.05
    full_accuracy_nats: float | None = None
    recheck_every: int = 100
    recheck_window: int = 30
    fallback_rmse: float = 0.3
    retrain_every: int = 300
    num_members: int = 4
    train_steps: int = 2000
    search: bool = True
    kinds: tuple[str, ...] = ("mlp", "additive")
    widths: tuple[int, ...] = (64, 32)
    depths: tuple[int, ...] = (3, 2)
    learning_rates: tuple[float, ...] = (1e-2, 3e-3)
    search_min_steps: int = 300
    guard_num_points: int = 200
    guard_max_correction: float = 0.1
    guard_min_ess_fraction: float = 0.5
    switch: str = "cost"
    background: bool = True
    expected_train_s: float = 10.0
    call_cost_s: float | None = None
    horizon: float = 1.0

    def __post_init__(self) -> None:
        from bayeslik.engines.kit import Check  # here: bayeslik.engines imports this module

        check = Check("Surrogate", self)
        check.integer("num_initial", minimum=20, optional=True, hint="None is 2 x num_live")
        check.choice("inputs", ("physical", "cube"))
        check.integer("train_size", minimum=50)
        check.number("top_fraction", low=0.0, high=1.0, low_open=False)
        check.number("val_fraction", low=0.05, high=0.5, low_open=False, high_open=False)
        check.number("contour_quantile", low=0.0, high=1.0, low_open=False)
        check.number("clip_quantile", low=0.0, high=self.contour_quantile, low_open=False,
                     hint="below contour_quantile")
        check.number("rel_tol", low=0.0, low_open=False)
        check.number("full_accuracy_nats", low=0.0, low_open=False, optional=True, hint="nats")
        for name in ("rmse_max", "spread_max", "fallback_rmse", "guard_max_correction"):
            check.number(name, low=0.0, hint="nats")
        check.require(self.fallback_rmse >= self.rmse_max, "fallback_rmse",
                      f"must be >= rmse_max ({self.rmse_max}).")
        check.integer("recheck_every", "recheck_window", "retrain_every", "num_members",
                      "train_steps", "search_min_steps")
        check.integer("guard_num_points", minimum=0)
        check.require(self.guard_num_points != 1, "guard_num_points",
                      "must be 0 (no guard) or an integer >= 2.")
        check.number("guard_min_ess_fraction", low=0.0, high=1.0, low_open=False,
                     high_open=False)
        check.choice("switch", ("cost", "accuracy")).boolean("background")
        check.number("expected_train_s", low=0.0, low_open=False, hint="seconds")
        check.number("call_cost_s", low=0.0, optional=True, hint="seconds per true call")
        check.number("horizon", low=0.0, hint="1 is the break-even rule")
        for name in ("kinds", "widths", "depths", "learning_rates"):
            v = getattr(self, name)
            check.require(isinstance(v, tuple) and bool(v), name,
                          "must be a non-empty tuple (tuples keep the config hashable).")
        check.require(all(k in _net.KINDS for k in self.kinds), "kinds",
                      f"must be a tuple of {_net.KINDS}.")
        check.require(all(_positive_int(w) for w in self.widths), "widths",
                      "must be positive integers.")
        check.require(all(_positive_int(d) for d in self.depths), "depths",
                      "must be positive integers.")
        check.require(all(isinstance(lr, (int, float)) and lr > 0 for lr in self.learning_rates),
                      "learning_rates", "must be positive numbers.")

    def full_accuracy(self, ndim: int) -> float:
        """``full_accuracy_nats``, or its default for ``ndim`` parameters: ``ndim / 2 + 3
        sqrt(ndim / 2) + 3``, the bulk of a Gaussian posterior's log-likelihood values."""
        if self.full_accuracy_nats is not None:
            return float(self.full_accuracy_nats)
        return float(ndim / 2 + 3 * np.sqrt(ndim / 2) + 3)

    def candidates(self) -> list[_net.Architecture]:
        return [_net.Architecture(int(w), int(d), float(lr), k) for k in self.kinds
                for w in self.widths for d in self.depths for lr in self.learning_rates]


def _positive_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1


def _features_fn(posterior) -> Callable[[np.ndarray], np.ndarray] | None:
    """Unit-cube points -> flattened constrained latent values, jitted (None without a Posterior).

    Only the latent values are outputs, so XLA drops the likelihood's work from the program."""
    if posterior is None:
        return None
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    pt, constrain, names = posterior.prior_transform, posterior.constrain, posterior.latent_names

    def one(u):
        vals = constrain(pt(u))
        return ravel_pytree({n: jnp.asarray(vals[n], jnp.float32) for n in names})[0]

    fn = jax.jit(jax.vmap(one))
    dtype = jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32

    def features(u: np.ndarray) -> np.ndarray:
        n = len(u)
        pad = pad_rows(np.asarray(u, dtype), bucket(n, smallest=16), fill=0.5)
        return np.asarray(fn(pad), np.float64)[:n]

    return features


def _best_per_kind(table, exclude) -> list:
    """From a search table [(rung, Architecture, steps, score)]: for each kind other than
    ``exclude``'s, the design that got furthest in the search (highest rung), best score first."""
    best: dict[str, tuple] = {}
    for rung, arch, _, score in table:
        if arch.kind == exclude.kind:
            continue
        key = (-rung, score)
        if arch.kind not in best or key < best[arch.kind][0]:
            best[arch.kind] = (key, arch)
    return [a for _, a in sorted(best.values(), key=lambda t: t[0])]


def _scores(ens, x, y, check, sc):
    """(RMS of error / s, mean spread / s, plain RMSE) of an ensemble on the check rows."""
    if ens is None or not check.any():
        return np.inf, np.inf, np.inf
    mean, spread = _net.predict(ens, x[check])
    return (float(np.sqrt(np.mean(np.square((mean - y[check]) / sc)))),
            float(np.mean(spread / sc)), float(np.sqrt(np.mean(np.square(mean - y[check])))))


def _fit_job(job: dict, should_stop: Callable[[], bool] | None) -> dict:
    """One (re)training on a snapshot of the window (``job``, made by the main thread): the
    search (first training only), the ensemble of each design tried, their scores, and the time
    one network answer costs. Pure: it reads only ``job``, so it can run in a thread."""
    t0 = time.perf_counter()
    x, y, check, sc = job["x"], job["y"], job["check"], job["sc"]
    out: dict[str, Any] = {"search_s": 0.0, "table": None, "arch": job["arch"],
                           "runner_ups": list(job["runner_ups"])}
    if job["search"]:
        ts = time.perf_counter()
        res = _net.search_architecture(job["k_search"], x, y, job["w_train"], job["w_check"],
                                       job["candidates"], min_steps=job["search_min_steps"],
                                       should_stop=should_stop)
        out.update(arch=res.best, runner_ups=_best_per_kind(res.table, exclude=res.best),
                   table=res.table, search_s=time.perf_counter() - ts)
    out["base_arch"] = out["arch"]
    # The search ran once, on the first window (mostly prior draws), so its choice of kind can
    # be wrong for the region the run reaches later. After a refusal, the best design of the
    # other kind is trained too and the better of the two on this window's check is kept.
    designs = [out["arch"]] + (out["runner_ups"] if job["extra_designs"] else [])
    warm = job["warm"]
    best = None
    for arch in designs:
        ens, _ = _net.train_ensemble(
            job["k_train"], x, y, job["w_train"], job["w_check"], arch,
            num_members=job["num_members"], max_steps=job["steps"], chunk=200, patience=2,
            init=warm, scaler=None if warm is None else warm.scaler, should_stop=should_stop)
        s = _scores(ens, x, y, check, sc)
        if best is None or s[0] < best[1][0]:
            best = (ens, s, arch)
    out["ens"], out["scores"], out["arch"] = best
    out["old_scores"] = _scores(job["old"], x, y, check, sc) if job["old"] is not None else None
    # what one network answer costs: a batch of 16 (compiled by now), timed twice, the second
    probe = x[:16]
    _net.predict(out["ens"], probe)
    tp = time.perf_counter()
    _net.predict(out["ens"], probe)
    out["predict_s"] = (time.perf_counter() - tp) / len(probe)
    out["stopped"] = bool(should_stop is not None and should_stop())
    out["seconds"] = time.perf_counter() - t0
    return out


class SurrogateLikelihood:
    """A single-use ``loglikelihood_wrapper`` for nested sampling (see the module docstring).

    ``wrapper(true_batch_fn, posterior, rng_key)`` returns the batched function the sampler
    calls; ``wrapper.finalize(fit_parts)`` runs the guard and returns what the engine merges into
    its Fit; ``wrapper.counters`` and ``wrapper.history`` tell what happened. The nested engine
    calls ``wrapper.watch(progress_fn, dlogz)`` once its sampler exists, where
    ``progress_fn() -> (iterations, delta_logz)`` or None: the sampler's progress, which the
    cost rule uses to project the points still to come.
    """

    def __init__(self, options: SurrogateOptions | None = None, *, num_live: int = 500,
                 progress: Callable[[str], None] | None = None) -> None:
        self.options = options or SurrogateOptions()
        self.num_live = int(num_live)
        self.num_initial = int(self.options.num_initial or 2 * self.num_live)
        self._started = False
        self._progress = progress
        self.counters: dict[str, Any] = dict(
            num_points=0, num_true_calls=0, num_surrogate_calls=0, num_rechecks=0,
            num_above_range=0, num_high_spread=0, num_trainings=0, num_retrains=0,
            num_fallbacks=0, num_switch_ins=0, num_guard_calls=0, train_s=0.0, search_s=0.0,
            first_switch_in_at=None, last_heldout_score=None, last_heldout_rmse=None,
            last_heldout_spread=None, architecture=None, num_design_changes=0,
            # the cost side (bayeslik.surrogate.cost)
            switch=self.options.switch, background=self.options.background,
            call_s=None, predict_s=None, true_call_s=0.0, serve_s=0.0, guard_s=0.0,
            train_blocking_s=0.0, num_cost_refusals=0, num_stopped_trainings=0,
            first_train_at=None, projected_saving_s=None, time_saved_s=None,
            surrogate_decision="",
        )
        self.history: list[tuple[int, str, float]] = []  # (true calls so far, event, score)

    # ------------------------------------------------------------------ the hook
    def __call__(self, true_batch_fn: Callable[[np.ndarray], np.ndarray], posterior: Any,
                 rng_key: jax.Array) -> Callable[[np.ndarray], np.ndarray]:
        if self._started:
            raise EngineError(
                "a SurrogateLikelihood wraps one run only; make a new one for each run."
            )
        self._started = True
        self._true_fn = true_batch_fn
        self._features = _features_fn(posterior) if self.options.inputs == "physical" else None
        k_np, self._key = jax.random.split(rng_key)
        self._rng = np.random.default_rng(np.asarray(jax.random.key_data(k_np)).ravel())
        self._u: list[np.ndarray] = []  # true evaluations (unit cube), in order
        self._y: list[float] = []
        self._known: dict[bytes, float] = {}
        self._ensemble: _net.Ensemble | None = None
        self._arch: _net.Architecture | None = None
        self._runner_ups: list[_net.Architecture] = []  # the search's best of each other kind
        self._active = False
        self._next_train = self.num_initial
        self._y_hi = np.inf
        self._floor = -np.inf
        self._errors: deque = deque(maxlen=int(self.options.recheck_window))
        self._y_ref = -np.inf
        self._full_acc: float | None = None
        self._refusals = 0
        compile_s = (lambda: float(getattr(true_batch_fn, "compile_s", 0.0)))
        self._timer = _cost.CallTimer(compile_s)   # the sampling's true calls
        self._guard_timer = _cost.CallTimer(compile_s)
        self._asked = 0    # points the switched-in network was asked (served or sent back)
        self._last_train_s: float | None = None
        self._predict_est: float | None = None
        self._watch: Callable[[], Any] | None = None
        self._dlogz: float | None = None
        self._marks: deque = deque()  # (iteration, points so far): the recent points per iteration
        self._job: tuple[dict, Future] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._stop = threading.Event()
        return self.batch_fn

    def watch(self, progress_fn: Callable[[], Any], dlogz: float | None) -> None:
        """Give the cost rule the sampler's progress: ``progress_fn() -> (iterations,
        delta_logz)`` (None while unknown) and the ``dlogz`` the sampler stops at."""
        self._watch, self._dlogz = progress_fn, dlogz

    @property
    def active(self) -> bool:
        """Whether the surrogate currently stands in for the true likelihood."""
        return self._active

    def _inputs(self, u: np.ndarray) -> np.ndarray:
        return u if self._features is None else self._features(u)

    def _true(self, u: np.ndarray) -> np.ndarray:
        vals = np.asarray(self._timer.timed(self._true_fn, u), np.float64).reshape(len(u))
        for row, v in zip(u, vals):
            self._known[row.tobytes()] = float(v)
        self._u.extend(np.array(u, np.float64))  # a copy: the caller may reuse its array
        self._y.extend(vals.tolist())
        self.counters["num_true_calls"] += len(u)
        return vals

    def _scale(self, y: np.ndarray) -> np.ndarray:
        """s(y) >= 1: how much looser than rmse_max the tolerance is at log-likelihood y."""
        o = self.options
        gap = np.maximum(0.0, self._y_ref - np.asarray(y, np.float64) - self._full_acc)
        s = 1.0 + (o.rel_tol / o.rmse_max) * gap
        return np.where(np.isfinite(s), s, np.inf)

    def batch_fn(self, u: np.ndarray) -> np.ndarray:
        """Log-likelihood values of unit-cube points ``u`` (n, ndim): surrogate or true."""
        u = np.ascontiguousarray(u, np.float64)
        if u.ndim == 1:
            u = u[None]
        self.counters["num_points"] += len(u)
        if self._full_acc is None:
            self._full_acc = self.options.full_accuracy(u.shape[1])
        self._poll()
        o = self.options
        if not self._active:
            vals = self._true(u)
        else:
            t0 = time.perf_counter()
            x = self._inputs(u)
            mean, spread = _net.predict(self._ensemble, x)
            self.counters["serve_s"] += time.perf_counter() - t0
            self._asked += len(u)
            scale = self._scale(mean)
            above = ~(mean <= self._y_hi)  # also catches NaN
            unsure = (spread > o.spread_max * scale) & (mean + 3 * spread > self._floor)
            recheck = self._rng.uniform(size=len(u)) < 1.0 / o.recheck_every
            need = above | unsure | recheck
            vals = mean.copy()
            if need.any():
                vals[need] = self._true(u[need])
                # the re-checks are a random sample of the points the surrogate would serve: their
                # errors (in units of the tolerance) decide the fallback
                rc = recheck & ~above & ~unsure
                if rc.any():
                    err = (mean[rc] - np.maximum(vals[rc], self._floor)) / np.minimum(
                        self._scale(vals[rc]), scale[rc])
                    self._errors.extend(np.where(np.isfinite(err), err, 1e3).tolist())
            c = self.counters
            c["num_above_range"] += int(above.sum())
            c["num_high_spread"] += int((unsure & ~above).sum())
            c["num_rechecks"] += int((recheck & ~above & ~unsure).sum())
            c["num_surrogate_calls"] += int((~need).sum())
            if len(self._errors) >= max(5, self._errors.maxlen // 2):  # enough re-checks to judge
                rmse = float(np.sqrt(np.mean(np.square(self._errors))))
                if rmse > o.fallback_rmse:
                    self._switch_out(rmse)
        if len(self._y) >= self._next_train and self._job is None:
            self._maybe_train()
        return vals

    # ------------------------------------------------------------------ the cost rule
    def call_s(self) -> float | None:
        """Seconds per true call: ``call_cost_s`` if given, else the mean measured so far."""
        if self.options.call_cost_s is not None:
            return float(self.options.call_cost_s)
        return self._timer.per_point

    def _served_fraction(self) -> float:
        if self._asked >= _cost.MIN_SERVED_TO_MEASURE:
            return self.counters["num_surrogate_calls"] / self._asked
        return _cost.SERVED_FRACTION_PRIOR

    def _predict_s(self) -> float:
        if self._asked >= _cost.MIN_SERVED_TO_MEASURE:
            return self.counters["serve_s"] / self._asked
        return self._predict_est or 0.0

    def _expected_train_s(self) -> float:
        """The next training's expected seconds: the last one's (search excluded), measured, or
        ``expected_train_s`` before any."""
        return self.options.expected_train_s if self._last_train_s is None else self._last_train_s

    def projected_points(self) -> float:
        """The points the sampler is projected still to ask for (:func:`cost.projected_points`)."""
        state = self._watch() if self._watch is not None else None
        it, delta = state if state is not None else (None, None)
        n = self.counters["num_points"]
        rate = None
        if it is not None:
            # points per iteration over the last num_live / 2 iterations or more: the sampler's
            # efficiency changes as its bounds tighten, so the mean since the start misleads
            marks = self._marks
            if not marks or it > marks[-1][0]:
                marks.append((it, n))
            while len(marks) > 2 and it - marks[1][0] >= max(self.num_live // 2, 1):
                marks.popleft()
            if it - marks[0][0] >= max(self.num_live // 4, 1):
                rate = (n - marks[0][1]) / (it - marks[0][0])
        return _cost.projected_points(num_points=n, num_live=self.num_live, iterations=it,
                                      delta_logz=delta, dlogz=self._dlogz,
                                      horizon=self.options.horizon, points_per_iteration=rate)

    def estimate(self) -> _cost.SavingEstimate:
        """The projected saving of a network serving from now on (:func:`cost.projected_saving`),
        with this run's measured costs."""
        o = self.options
        est = _cost.projected_saving(
            num_future=self.projected_points(), call_s=self.call_s() or 0.0,
            predict_s=self._predict_s(), train_s=self._expected_train_s(),
            served_fraction=self._served_fraction(), recheck_every=int(o.recheck_every),
            retrain_every=int(o.retrain_every), guard_num_points=int(o.guard_num_points))
        self.counters["projected_saving_s"] = est.saving_s
        return est

    # ------------------------------------------------------------------ training
    def _switch_out(self, rmse: float) -> None:
        self._active = False
        self.counters["num_fallbacks"] += 1
        self._errors.clear()
        self._next_train = len(self._y) + int(self.options.retrain_every)
        self.history.append((self.counters["num_true_calls"], "fallback", rmse))

    def _window_rows(self, y: np.ndarray) -> np.ndarray:
        """Indices of the stored true points in the training window: the ``top_fraction *
        train_size`` highest log-likelihoods of the whole run, then the most recent others.

        The highest points are where the surrogate must be accurate (the live points and
        everything above the current contour, however long ago they were evaluated); the
        most recent ones are mostly rejected proposals below the contour, which teach the
        networks where the likelihood falls away. A window of recent points only holds a small,
        shrinking share of points above the contour as the run goes on. ``y``: every stored
        true value, in order.
        """
        o = self.options
        total, cap = len(y), int(o.train_size)
        if total <= cap:
            return np.arange(total)
        y = np.where(np.isfinite(y), y, -np.inf)
        n_top = int(o.top_fraction * cap)
        top = np.argpartition(-y, n_top)[:n_top] if n_top else np.zeros(0, int)
        taken = np.zeros(total, bool)
        taken[top] = True
        recent = np.nonzero(~taken)[0][-(cap - n_top):]
        return np.sort(np.concatenate([top, recent]))

    def _window(self):
        """The training window: inputs, clipped targets, train/validation/contour-check weights.
        The network inputs of the window's points are computed here, in one call."""
        o = self.options
        y_all = np.asarray(self._y, np.float64)
        rows = self._window_rows(y_all)
        n = len(rows)
        cap = int(o.train_size)
        x_rows = np.asarray(self._inputs(np.asarray([self._u[i] for i in rows], np.float64)),
                            np.float32)
        x = np.full((cap, x_rows.shape[1]), 0.5, np.float32)
        y_raw = np.full(cap, -np.inf)
        x[:n] = x_rows
        y_raw[:n] = y_all[rows]
        finite = np.isfinite(y_raw[:n])
        vals = y_raw[:n][finite]
        floor = float(np.quantile(vals, o.clip_quantile)) if vals.size else 0.0
        contour = float(np.quantile(vals, o.contour_quantile)) if vals.size else 0.0
        y = np.maximum(np.where(np.isfinite(y_raw), y_raw, floor), floor)
        y[n:] = floor
        in_use = np.zeros(cap, bool)
        in_use[:n] = True
        val = in_use & (self._rng.uniform(size=cap) < o.val_fraction)
        train = in_use & ~val
        check = val & (y_raw >= contour)
        # weights 1/s(y)^2: the loss and the checks measure errors in units of the tolerance
        w = 1.0 / np.square(self._scale(y))
        return x, y, train * w, check * w, check, floor, n

    def _maybe_train(self) -> None:
        """A training is due: start it (inline or in the background thread) unless the cost rule
        says it cannot pay for itself yet (then it is asked again at the next batch)."""
        o = self.options
        if o.switch == "cost":
            est = self.estimate()
            need = self._expected_train_s()
            if not est.saving_s > need:
                before = (f"switched in at {self.counters['first_switch_in_at']} true calls; "
                          "then a retraining " if self.counters["num_switch_ins"] else "training ")
                self.counters["surrogate_decision"] = (
                    f"{before}deferred: projected saving {est.saving_s:.3g} s over "
                    f"{est.num_future:.0f} more points at {self.call_s() or 0.0:.3g} s per true "
                    f"call does not exceed the training's expected {need:.3g} s")
                return
        job = self._prepare()
        if self.counters["first_train_at"] is None:
            self.counters["first_train_at"] = self.counters["num_true_calls"]
        if o.background:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1,
                                                    thread_name_prefix="bayeslik-surrogate")
            self._job = (job, self._executor.submit(_fit_job, job, self._stop.is_set))
        else:
            t0 = time.perf_counter()
            result = _fit_job(job, None)
            self.counters["train_blocking_s"] += time.perf_counter() - t0
            self._apply(job, result)

    def _poll(self) -> None:
        """Apply a background training that has finished (the main thread's side)."""
        if self._job is not None and self._job[1].done():
            job, future = self._job
            self._job = None
            self._apply(job, future.result())  # a training's exception is raised here

    def _prepare(self) -> dict:
        """Snapshot what a training needs (main thread): the window, keys, designs."""
        o = self.options
        finite = np.isfinite(self._y)
        self._y_ref = max(self._y_ref, float(np.max(np.asarray(self._y)[finite]))) \
            if np.any(finite) else self._y_ref
        x, y, w_train, w_check, check, floor, n = self._window()
        self._key, k_search, k_train = jax.random.split(self._key, 3)
        search = self._arch is None and bool(o.search) and len(o.candidates()) > 1
        arch = self._arch if self._arch is not None else o.candidates()[0]
        warm = self._ensemble if self._active else None
        return dict(
            x=x, y=y, w_train=w_train, w_check=w_check, check=check, sc=self._scale(y[check]),
            floor=floor, n=n, k_search=k_search, k_train=k_train, search=search,
            candidates=o.candidates(), search_min_steps=int(o.search_min_steps), arch=arch,
            runner_ups=list(self._runner_ups),
            extra_designs=not self._active and self._refusals > 0, warm=warm, old=warm,
            steps=int(o.train_steps) if warm is None else max(1, int(o.train_steps) // 2),
            num_members=int(o.num_members), n_total=len(self._y), was_active=self._active,
            first=self._arch is None)

    def _apply(self, job: dict, r: dict) -> None:
        """Take a finished training's result into the surrogate's state (main thread)."""
        o = self.options
        c = self.counters
        c["train_s"] += r["seconds"]
        c["search_s"] += r["search_s"]
        self._last_train_s = max(r["seconds"] - r["search_s"], 0.0)
        self._predict_est = r["predict_s"]
        if job["first"]:
            self._arch, self._runner_ups = r["base_arch"], list(r["runner_ups"])
            if r["table"] is not None:
                c["search_table"] = [(k, a.kind, a.width, a.depth, a.learning_rate, s, e)
                                     for k, a, s, e in r["table"]]
            c["architecture"] = dataclasses.asdict(self._arch)
        arch = r["arch"]
        if arch != self._arch:
            self._runner_ups = [a for a in self._runner_ups if a != arch] + [self._arch]
            self._arch = arch
            c["architecture"] = dataclasses.asdict(arch)
            c["num_design_changes"] += 1
        ens, (score, spread_score, rmse_top) = r["ens"], r["scores"]
        kept = False
        cost_refused = False
        if job["was_active"] and self._active:
            # While serving, the window's recent true points are the ones the surrogate sent back
            # (above its range, unsure, re-checked): a biased sample of hard points, so it does
            # not decide the switch-out (the re-checks do). A retrain replaces the serving
            # ensemble only if it does better on them.
            old = r["old_scores"]
            if old is not None and old[0] <= score:
                (score, spread_score, rmse_top), kept = old, True
            ok = True
        else:
            ok = score <= o.rmse_max and spread_score <= o.spread_max
            if ok and o.switch == "cost" and not self._active:
                est = self.estimate()
                if not est.saving_s > 0.0:  # accurate, but serving would not pay (any more)
                    ok, cost_refused = False, True
                    c["num_cost_refusals"] += 1
                    c["surrogate_decision"] = (
                        f"an accurate network was not switched in: projected saving "
                        f"{est.saving_s:.3g} s over {est.num_future:.0f} more points")
        c["num_trainings"] += 1
        c["num_retrains"] += int(self._ensemble is not None)
        c["last_heldout_score"] = score
        c["last_heldout_rmse"] = rmse_top
        c["last_heldout_spread"] = spread_score
        if not kept:
            self._ensemble = ens
            self._floor = job["floor"]
            self._y_hi = float(np.max(job["y"][:job["n"]]))
        was = self._active
        self._active = bool(ok)
        if ok and not was:
            c["num_switch_ins"] += 1
            c["surrogate_decision"] = "switched in"
            if c["first_switch_in_at"] is None:
                c["first_switch_in_at"] = c["num_true_calls"]
            self._errors.clear()
        event = ("switch-in" if ok and not was else ("kept" if kept else "retrain") if ok
                 else "not worth it" if cost_refused else "refused")
        if ok:
            self._refusals = 0
        elif not cost_refused:  # an accurate network the cost rule declined leaves the backoff
            self._refusals += 1
        self.history.append((c["num_true_calls"], event, score))
        # back off geometrically while refused (the interval doubles, up to 32x): a likelihood
        # the networks cannot learn then costs O(log run length) trainings, not O(run length)
        self._next_train = job["n_total"] + int(o.retrain_every) * 2 ** min(self._refusals, 5)
        if self._progress is not None:
            self._progress(f"surrogate {event}: held-out score {score:.3f}")

    def close(self, *, quiet: bool = False) -> None:
        """Stop a background training (between two chunks) and wait for it; its seconds count in
        ``train_s``, its result is dropped. Called by ``finalize`` and, when the run fails or is
        interrupted, by the engine (``quiet``: a training's own exception is not raised then, the
        run's is); safe to call twice."""
        if self._job is not None:
            self._stop.set()
            job, future = self._job
            self._job = None
            try:
                r = future.result()  # a training's exception is raised here
            except Exception:
                if not quiet:
                    raise
                r = {"seconds": 0.0}
            self.counters["train_s"] += r["seconds"]
            self.counters["num_stopped_trainings"] += 1
            self.history.append((self.counters["num_true_calls"], "stopped", np.nan))
            if self.counters["num_switch_ins"] == 0:
                self.counters["surrogate_decision"] = ("the run ended before a background "
                                                       "training finished")
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # ------------------------------------------------------------------ after the run
    def finalize(self, fit_parts: dict) -> dict:
        """Run the guard on the dead points and report the counters (the hook's second half).

        ``fit_parts``: ``u`` (N, ndim) weighted dead points in the unit cube, ``logwt``,
        ``logl``, ``logz``, ``logzerr``. Returns ``cost_extra``, ``num_true_calls`` (the
        sampling's plus the guard's), ``log_evidence``/``log_evidence_err`` (corrected),
        ``flags`` and ``attrs``.
        """
        self.close()
        o = self.options
        c = self.counters
        logz, logzerr = float(fit_parts["logz"]), float(fit_parts["logzerr"])
        flags: list[str] = []
        attrs: dict[str, Any] = {"surrogate_log_evidence_uncorrected": logz,
                                 "surrogate_log_evidence_err_uncorrected": logzerr}
        out: dict[str, Any] = {}
        if c["num_switch_ins"] == 0:
            score = c["last_heldout_score"]
            if len(self._y) < self.num_initial:
                flags.append("surrogate never switched in: every likelihood value is true (the "
                             f"run ended before {self.num_initial} true points were collected).")
            elif c["num_trainings"] == c["num_cost_refusals"]:
                # every training was declined or its accurate network did not pay: the cost rule
                # working as meant (a cheap likelihood), not a failure; said in cost.extra
                pass
            else:
                flags.append(
                    "surrogate never switched in: every likelihood value is true (last held-out "
                    f"score {score:.3g} against rmse_max {o.rmse_max}; the likelihood may be too "
                    "rough for the networks, or raise train_size / loosen rmse_max).")
        if o.guard_num_points > 0 and len(fit_parts["logl"]) > 0 and c["num_switch_ins"] > 0:
            g = _guard.importance_correction(
                self._rng, fit_parts["u"], fit_parts["logwt"], fit_parts["logl"], logz=logz,
                logzerr=logzerr,
                true_batch_fn=lambda uu: self._guard_timer.timed(self._true_fn, uu),
                num_points=int(o.guard_num_points), known_true=self._known)
            c["num_guard_calls"] = g.num_true_calls
            out["log_evidence"] = g.log_evidence
            out["log_evidence_err"] = g.log_evidence_err
            gd = g._asdict()
            attrs.update({f"guard_{k}": v for k, v in gd.items()})
            c.update({f"guard_{k}": v for k, v in gd.items()
                      if k in ("correction", "correction_err", "ess_fraction", "surrogate_weight")})
            large = abs(g.correction) > o.guard_max_correction
            if large or g.ess_fraction < o.guard_min_ess_fraction:
                flags.append(
                    f"surrogate guard: the true likelihood moved log Z by {g.correction:+.3f} "
                    f"(ESS fraction {g.ess_fraction:.2f}); the evidence reported is the corrected "
                    "one, but the posterior draws use the surrogate's values: rerun with a "
                    "smaller rmse_max or plain 'nested' if this matters."
                )
        call_s = self.call_s()
        c["call_s"] = call_s
        c["predict_s"] = self._predict_s() if (self._asked or self._predict_est) else None
        c["true_call_s"] = self._timer.seconds
        c["guard_s"] = self._guard_timer.seconds
        # true-call seconds avoided (the served points at the measured cost per call) minus what
        # the surrogate cost: its trainings (all of them, background ones included), its answers
        # and the guard's true calls
        c["time_saved_s"] = ((call_s or 0.0) * c["num_surrogate_calls"] - c["train_s"]
                             - c["serve_s"] - c["guard_s"])
        if not c["surrogate_decision"]:
            c["surrogate_decision"] = ("no training was due" if c["num_trainings"] == 0
                                       else "never switched in")
        total = c["num_true_calls"] + c["num_guard_calls"]
        extra = {k: v for k, v in c.items() if k != "search_table"}
        extra["num_true_calls_total"] = total
        out.update(cost_extra=extra, num_true_calls=total, flags=flags, attrs=attrs)
        return out
