"""The cost-aware switch: the projection of the saving term by term on synthetic costs, the
projection of the points still to come, the timer that books true calls (compile excluded), and
the rule inside the surrogate: a cheap likelihood never trains, an expensive one trains and
switches in; a background training gives the very network an inline one gives."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from bayeslik.surrogate.cost import (SERVED_FRACTION_PRIOR, CallTimer, projected_points,
                                     projected_saving)
from bayeslik.surrogate.likelihood import SurrogateLikelihood, SurrogateOptions
from tests.surrogate.test_likelihood import FAST, Counting, smooth

COSTS = dict(recheck_every=100, retrain_every=300, guard_num_points=200)


def test_projected_saving_term_by_term():
    est = projected_saving(num_future=10_000, call_s=0.01, predict_s=1e-5, train_s=5.0,
                           served_fraction=0.9, **COSTS)
    assert est.served == pytest.approx(10_000 * 0.9 * 0.99)
    assert est.avoided_s == pytest.approx(8910 * 0.01)
    assert est.serving_s == pytest.approx(9000 * 1e-5)
    assert est.retrain_s == pytest.approx(1000 / 300 * 5.0)
    assert est.guard_s == pytest.approx(2.0)
    assert est.saving_s == pytest.approx(89.1 - 0.09 - 50 / 3 - 2.0)
    # nothing to come: the guard alone is a loss; a cheap likelihood loses at any length
    assert projected_saving(num_future=0, call_s=0.01, predict_s=0, train_s=5.0,
                            served_fraction=0.9, **COSTS).saving_s == pytest.approx(-2.0)
    for n in (1e3, 1e5, 1e7):
        cheap = projected_saving(num_future=n, call_s=2e-5, predict_s=2e-5, train_s=5.0,
                                 served_fraction=0.9, **COSTS)
        assert cheap.saving_s < 0


def test_projected_points_from_the_samplers_progress():
    # delta_logz whose expm1 is e^3 times the target's: 3 num_live iterations to go
    delta = math.log1p(math.e ** 3 * math.expm1(0.1))
    n = projected_points(num_points=2100, num_live=100, iterations=1000, delta_logz=delta,
                         dlogz=0.1)
    assert n == pytest.approx(300 * 2.0)  # (2100 - 100) / 1000 points per iteration
    assert projected_points(num_points=2100, num_live=100, iterations=1000, delta_logz=delta,
                            dlogz=0.1, points_per_iteration=5.0) == pytest.approx(1500)
    assert projected_points(num_points=2100, num_live=100, iterations=1000, delta_logz=0.05,
                            dlogz=0.1) == 0.0  # the run is about to stop
    # without progress (or before the first iteration): horizon x the points so far
    assert projected_points(num_points=600, num_live=300) == 600
    assert projected_points(num_points=600, num_live=300, iterations=0, delta_logz=1.0,
                            dlogz=0.1, horizon=2.0) == 1200
    assert projected_points(num_points=600, num_live=300, iterations=5, delta_logz=1e300,
                            dlogz=0.1) == 600


def test_call_timer_excludes_compile_time():
    clock = {"compile": 0.0}

    def fn(u):
        clock["compile"] += 0.25  # as if this call compiled for 0.25 s (it took far less)
        return np.zeros(len(u))

    timer = CallTimer(lambda: clock["compile"])
    timer.timed(fn, np.zeros((4, 2)))
    timer.timed(fn, np.zeros((6, 2)))
    assert timer.points == 10 and timer.compile_s == pytest.approx(0.5)
    assert timer.seconds == 0.0  # every second of the calls was compile time, clipped at 0
    timer.add(0.3, 5)
    assert timer.per_point == pytest.approx(0.3 / 15)
    assert CallTimer().per_point is None


def _drive_cost(call_cost_s, num=800, **opts):
    options = SurrogateOptions(**{**FAST, "switch": "cost", "background": False,
                                  "call_cost_s": call_cost_s, **opts})
    wrapper = SurrogateLikelihood(options, num_live=100)
    true_fn = Counting(smooth)
    batch_fn = wrapper(true_fn, None, jax.random.key(0))
    rng = np.random.default_rng(0)
    for _ in range(num // 10):
        batch_fn(rng.uniform(size=(10, 2)))
    return wrapper, true_fn


def test_a_cheap_likelihood_never_trains():
    wrapper, true_fn = _drive_cost(1e-4)
    c = wrapper.counters
    assert c["num_trainings"] == 0 and not wrapper.active
    assert true_fn.calls == 800 == c["num_true_calls"]
    # the last check, at 800 points (no sampler progress: 800 more projected, horizon 1):
    # avoided 800 * 0.9 * 0.99 * 1e-4, retrainings 800 * 0.1 / 10_000 * 10 s, guard 200 * 1e-4
    expected = 800 * SERVED_FRACTION_PRIOR * 0.99 * 1e-4 - 800 * 0.1 / 10_000 * 10.0 - 0.02
    assert c["projected_saving_s"] == pytest.approx(expected, rel=1e-12)
    assert "deferred" in c["surrogate_decision"]
    u = np.random.default_rng(1).uniform(size=(20, 2))
    out = wrapper.finalize({"u": u, "logwt": smooth(u) - np.log(20), "logl": smooth(u),
                            "logz": -1.0, "logzerr": 0.1})
    assert out["flags"] == []  # not a failure: the rule at work
    assert "log_evidence" not in out and out["cost_extra"]["time_saved_s"] == 0.0


def test_an_expensive_likelihood_trains_at_the_first_due_point_and_switches_in():
    wrapper, true_fn = _drive_cost(0.05, expected_train_s=1.0)
    c = wrapper.counters
    # due at num_initial = 400 points: saving 400 * 0.9 * 0.99 * 0.05 - 400 * 0.1 / 10_000 * 1
    # - 200 * 0.05 = 7.818 s > the expected 1 s: trained there, inline, and switched in
    assert c["first_train_at"] == 400 and c["num_trainings"] == 1
    assert wrapper.active and c["num_switch_ins"] == 1 and c["first_switch_in_at"] == 400
    assert c["num_surrogate_calls"] > 300 and true_fn.calls < 500
    assert c["train_blocking_s"] == pytest.approx(c["train_s"], abs=0.05)  # inline: it blocked
    out = wrapper.finalize({"u": np.full((4, 2), 0.5), "logwt": np.zeros(4), "logl": np.zeros(4),
                            "logz": 0.0, "logzerr": 0.1})
    e = out["cost_extra"]
    assert e["call_s"] == 0.05
    assert e["time_saved_s"] == pytest.approx(0.05 * e["num_surrogate_calls"] - e["train_s"]
                                              - e["serve_s"] - e["guard_s"])


def test_accurate_but_not_worth_it_is_not_switched_in():
    # trained (expected to cost nothing; saving 400 * 0.9 * 0.99 * 0.001 = 0.356 s > 0), but
    # then the training is measured (seconds), and a retraining every 10 true points would cost
    # 400 * 0.1 / 10 = 4 of them: the accurate network does not pay
    wrapper, _ = _drive_cost(0.001, num=400, expected_train_s=0.0, guard_num_points=0,
                             retrain_every=10)
    c = wrapper.counters
    assert c["num_trainings"] == 1 and c["num_cost_refusals"] == 1 and not wrapper.active
    assert wrapper.history[-1][1] == "not worth it"
    assert c["last_heldout_score"] <= wrapper.options.rmse_max  # it was accurate


def test_background_training_gives_the_inline_network(seed):
    """The thread trains on a snapshot taken when the training is due, with keys split then:
    the network (and its held-out score) is the inline one's; only the point where it swaps in
    depends on the thread's timing."""
    def run(background):
        opts = SurrogateOptions(**{**FAST, "background": background})
        wrapper = SurrogateLikelihood(opts, num_live=100)
        batch_fn = wrapper(Counting(smooth), None, jax.random.key(seed))
        rng = np.random.default_rng(seed)
        for _ in range(40):
            batch_fn(rng.uniform(size=(10, 2)))
        if background:
            assert wrapper._job is not None  # due at 400 points, running in the thread
            wrapper._job[1].result(timeout=120)
            batch_fn(rng.uniform(size=(10, 2)))  # the next batch takes the result in
        return wrapper

    inline, thread = run(False), run(True)
    assert thread.active and inline.active
    # taken in at the 41st batch, before its points (400 true calls so far); inline at the 40th
    assert thread.history[0][0] == 400 == inline.history[0][0]
    assert thread.counters["num_surrogate_calls"] > 0 and thread.counters["num_points"] == 410
    assert thread.counters["last_heldout_score"] == inline.counters["last_heldout_score"]
    assert thread.counters["train_blocking_s"] == 0.0
    u = np.random.default_rng(5).uniform(0.2, 0.8, size=(16, 2))
    from bayeslik.surrogate.network import predict
    np.testing.assert_array_equal(predict(thread._ensemble, u)[0], predict(inline._ensemble, u)[0])
    thread.close()
