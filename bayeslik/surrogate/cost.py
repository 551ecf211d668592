r"""When a likelihood surrogate pays for itself: the cost model of the cost-aware switch.

A surrogate saves the true likelihood's cost at every point it answers, and costs its training,
its own evaluation, the re-checks of its answers and the guard's true calls after the run. On a
likelihood that costs a fraction of a millisecond the training (seconds) never pays; on one that
costs seconds it pays after a few hundred answers. :class:`SurrogateLikelihood
<bayeslik.surrogate.likelihood.SurrogateLikelihood>` measures both sides as the run goes and
asks this module.

The projection (:func:`projected_saving`), for ``N`` points the sampler is projected still to
ask for, of which a share ``f`` the network would answer (each answer re-checked with
probability ``1 / recheck_every``), a true call costing ``c`` seconds, a network answer ``p``
seconds, a training ``T`` seconds:

.. math::

    S = \underbrace{N f (1 - 1/r) c}_{\text{true calls avoided}}
        - \underbrace{N f p}_{\text{network answers}}
        - \underbrace{\frac{N (1 - f)}{R} T}_{\text{retrainings}}
        - \underbrace{G c}_{\text{the guard}},

with ``r`` = ``recheck_every``, ``R`` = ``retrain_every`` (the surrogate retrains every ``R``
new true points while it serves) and ``G`` = ``guard_num_points``. The rules:

* **start a training** only when ``S > T_next`` (the training about to be paid: its expected
  seconds, measured from the previous training, or ``expected_train_s`` before the first);
* **switch a validated network in** only when ``S > 0`` (its training is spent by then; ``S``
  still charges the validation that follows: re-checks and the guard).

``N`` (:func:`projected_points`) comes from the sampler's progress where it is known: dynesty's
``delta_logz`` (the log of the ratio of the evidence with the live points' bound to the evidence
so far) falls by about ``1 / num_live`` per iteration once the likelihood's peak is found, so the
run has about ``num_live * log(expm1(delta_logz) / expm1(dlogz))`` iterations left, at the calls
per iteration seen so far. Without the sampler's progress, ``N = horizon * (points so far)``:
with ``horizon = 1`` this is the break-even rule of the ski-rental problem (buy once the rent
paid equals the price), which never costs more than twice the better choice made in hindsight.

Example
-------
>>> from bayeslik.surrogate.cost import projected_saving
>>> est = projected_saving(num_future=10_000, call_s=0.01, predict_s=1e-5, train_s=5.0,
...                        served_fraction=0.9, recheck_every=100, retrain_every=300,
...                        guard_num_points=200)
>>> round(est.avoided_s, 2), round(est.saving_s, 2)
(89.1, 70.34)
"""

from __future__ import annotations

import math
import time
from typing import Callable, NamedTuple

__all__ = ["SavingEstimate", "projected_saving", "projected_points", "CallTimer",
           "SERVED_FRACTION_PRIOR", "MIN_SERVED_TO_MEASURE"]

#: the share of points a switched-in network answers, until this run has measured its own
#: (88-94% on the nested suite's problems where it switched in, docs/surrogates.md)
SERVED_FRACTION_PRIOR = 0.9

#: points the network must have been asked before its measured served share replaces the prior
MIN_SERVED_TO_MEASURE = 200


class SavingEstimate(NamedTuple):
    """What the surrogate is projected to save (seconds) over ``num_future`` more points.

    ``served`` points answered by the network; ``avoided_s`` the true-call seconds they save
    (re-checks excluded); ``serving_s`` the network's seconds; ``retrain_s`` the retrainings';
    ``guard_s`` the guard's true calls'; ``saving_s`` = avoided - serving - retrain - guard.
    """

    num_future: float
    served: float
    avoided_s: float
    serving_s: float
    retrain_s: float
    guard_s: float
    saving_s: float


def projected_saving(*, num_future: float, call_s: float, predict_s: float, train_s: float,
                     served_fraction: float, recheck_every: int, retrain_every: int,
                     guard_num_points: int) -> SavingEstimate:
    """The projected net saving ``S`` of the module docstring, term by term.

    >>> projected_saving(num_future=1000, call_s=1e-4, predict_s=1e-5, train_s=5.0,
    ...                  served_fraction=0.9, recheck_every=100, retrain_every=300,
    ...                  guard_num_points=200).saving_s < 0     # a cheap likelihood: never
    True
    """
    n, f = max(float(num_future), 0.0), min(max(float(served_fraction), 0.0), 1.0)
    asked = n * f
    served = asked * (1.0 - 1.0 / float(recheck_every))
    avoided = served * float(call_s)
    serving = asked * float(predict_s)
    retrain = n * (1.0 - f) / float(retrain_every) * float(train_s)
    guard = float(guard_num_points) * float(call_s)
    return SavingEstimate(n, served, avoided, serving, retrain, guard,
                          avoided - serving - retrain - guard)


def projected_points(*, num_points: int, num_live: int, iterations: int | None = None,
                     delta_logz: float | None = None, dlogz: float | None = None,
                     horizon: float = 1.0, points_per_iteration: float | None = None) -> float:
    """How many more points the sampler is projected to ask for.

    With the sampler's progress (``iterations`` so far, dynesty's current ``delta_logz`` and its
    stopping ``dlogz``): ``num_live * log(expm1(delta_logz) / expm1(dlogz))`` iterations left
    (0 once ``delta_logz <= dlogz``) times ``points_per_iteration`` (the recent rate, which the
    caller measures; None: the mean so far, the initial ``num_live`` points excluded). Otherwise,
    or before the first iteration: ``horizon * num_points``.

    >>> round(projected_points(num_points=2100, num_live=100, iterations=1000,
    ...                        delta_logz=math.log1p(math.e ** 2 * math.expm1(0.1)), dlogz=0.1))
    400
    >>> projected_points(num_points=600, num_live=300)
    600.0
    """
    ok = (iterations is not None and iterations > 0 and delta_logz is not None
          and dlogz is not None and dlogz > 0 and math.isfinite(delta_logz)
          and delta_logz < 700.0)
    if not ok:
        return float(horizon) * float(num_points)
    if delta_logz <= dlogz:
        return 0.0
    left = num_live * math.log(math.expm1(delta_logz) / math.expm1(dlogz))
    per_iteration = (float(points_per_iteration) if points_per_iteration is not None
                     else max(num_points - num_live, 1) / float(iterations))
    return left * per_iteration


class CallTimer:
    """Seconds per point of a batched function, measured call by call.

    ``timed(fn, u)`` calls ``fn(u)`` and books its wall time against ``len(u)`` points, less
    any compile time the call spent (``compile_s_fn()`` before and after: the first call of
    each padded batch size compiles). ``per_point`` is the mean so far (None before a call).
    """

    def __init__(self, compile_s_fn: Callable[[], float] | None = None) -> None:
        self.seconds = 0.0
        self.points = 0
        self.compile_s = 0.0
        self._compile_s_fn = compile_s_fn

    def timed(self, fn: Callable, u):
        c0 = self._compile_s_fn() if self._compile_s_fn is not None else 0.0
        t0 = time.perf_counter()
        out = fn(u)
        dt = time.perf_counter() - t0
        dc = (self._compile_s_fn() - c0) if self._compile_s_fn is not None else 0.0
        self.compile_s += dc
        self.seconds += max(dt - dc, 0.0)
        self.points += len(u)
        return out

    def add(self, seconds: float, points: int) -> None:
        self.seconds += float(seconds)
        self.points += int(points)

    @property
    def per_point(self) -> float | None:
        return self.seconds / self.points if self.points else None
