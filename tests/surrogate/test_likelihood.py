"""The surrogate's rules: switch-in accepts an accurate network and refuses an inaccurate one,
points above the training range go to the true likelihood, re-checks trigger the fallback, and
finalize runs the guard and flags a large correction."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from bayeslik.errors import EngineError
from bayeslik.surrogate.likelihood import SurrogateLikelihood, SurrogateOptions

FAST = dict(inputs="cube", search=False, widths=(32,), depths=(2,), learning_rates=(1e-2,),
            num_members=3, train_steps=1500, num_initial=400, train_size=400,
            retrain_every=10_000, full_accuracy_nats=50.0, switch="accuracy", background=False)


class Counting:
    """A true likelihood that counts its calls; ``offset`` shifts it (a changed truth)."""

    def __init__(self, fn):
        self.fn, self.calls, self.offset = fn, 0, 0.0

    def __call__(self, u):
        self.calls += len(u)
        return self.fn(np.asarray(u)) + self.offset


def smooth(u):
    return -0.5 * (((u - 0.5) / 0.2) ** 2).sum(1)


def rough(u):
    # a smooth bowl plus 1-nat ripples on a scale the networks cannot resolve from 400 points
    return smooth(u) + np.sin(400 * u[:, 0]) * np.cos(300 * u[:, 1])


def _drive(fn, seed, num=400, **opts):
    wrapper = SurrogateLikelihood(SurrogateOptions(**{**FAST, **opts}), num_live=100)
    true_fn = Counting(fn)
    batch_fn = wrapper(true_fn, None, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    for _ in range(num // 10):
        batch_fn(rng.uniform(size=(10, 2)))
    return wrapper, true_fn, batch_fn, rng


def test_switch_in_accepts_an_accurate_network(seed):
    wrapper, true_fn, batch_fn, rng = _drive(smooth, seed)
    assert wrapper.active
    assert wrapper.counters["last_heldout_score"] <= wrapper.options.rmse_max
    assert wrapper.history[0][1] == "switch-in"
    # now most points are served by the network, accurately
    before = true_fn.calls
    u = rng.uniform(0.1, 0.9, size=(200, 2))
    vals = batch_fn(u)
    assert true_fn.calls - before < 100
    assert wrapper.counters["num_surrogate_calls"] > 100
    assert np.sqrt(np.mean((vals - smooth(u)) ** 2)) < 0.3


def test_switch_in_refuses_an_inaccurate_network(seed):
    wrapper, true_fn, batch_fn, rng = _drive(rough, seed)
    assert not wrapper.active
    assert wrapper.history[0][1] == "refused"
    assert wrapper.counters["last_heldout_score"] > wrapper.options.rmse_max
    u = rng.uniform(size=(50, 2))
    np.testing.assert_array_equal(batch_fn(u), rough(u))  # still the true likelihood
    assert wrapper.counters["num_surrogate_calls"] == 0


def test_points_above_the_training_range_go_to_the_true_likelihood(seed):
    # trained only where the bowl is below -2 nats, then asked at its peak (0 nats)
    def ring(u):
        return smooth(u)

    wrapper = SurrogateLikelihood(SurrogateOptions(**FAST), num_live=100)
    true_fn = Counting(ring)
    batch_fn = wrapper(true_fn, None, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    while len(wrapper._y) < 400:
        u = rng.uniform(size=(50, 2))
        u = u[smooth(u) < -2.0][:10]
        batch_fn(u)
    assert wrapper.active and wrapper._y_hi < -2.0
    peak = 0.5 + rng.uniform(-0.05, 0.05, size=(20, 2))
    before = true_fn.calls
    vals = batch_fn(peak)
    served_true = np.isclose(vals, smooth(peak), rtol=0, atol=1e-12)
    above = wrapper.counters["num_above_range"]
    assert above > 0 and served_true.sum() >= above
    assert true_fn.calls - before >= above
    # and the rule is exact: every point predicted above the range got its true value
    mean, _ = __import__("bayeslik.surrogate.network", fromlist=["predict"]).predict(
        wrapper._ensemble, peak)
    assert np.all(served_true[mean > wrapper._y_hi])


def test_rechecks_trigger_the_fallback(seed):
    wrapper, true_fn, batch_fn, rng = _drive(smooth, seed, recheck_every=1, recheck_window=10)
    assert wrapper.active
    true_fn.offset = 3.0  # the truth moves away from what the network learned
    for _ in range(3):
        batch_fn(rng.uniform(0.2, 0.8, size=(10, 2)))
    assert not wrapper.active
    assert wrapper.counters["num_fallbacks"] == 1
    u = rng.uniform(size=(5, 2))
    np.testing.assert_allclose(batch_fn(u), smooth(u) + 3.0)


def test_finalize_guard_corrects_a_biased_surrogate_and_flags(seed):
    wrapper, true_fn, batch_fn, rng = _drive(smooth, seed)
    # dead points of a fake run whose values are all 0.5 nats too high
    u = rng.uniform(0.2, 0.8, size=(300, 2))
    logl = smooth(u) + 0.5
    logwt = logl + np.log(1 / 300)
    out = wrapper.finalize({"u": u, "logwt": logwt, "logl": logl, "logz": 1.0, "logzerr": 0.1})
    assert out["log_evidence"] == pytest.approx(0.5, abs=1e-9)
    assert out["log_evidence_err"] == pytest.approx(0.1, abs=1e-9)
    assert any("guard" in f for f in out["flags"])
    extra = out["cost_extra"]
    assert extra["num_guard_calls"] > 0
    assert out["num_true_calls"] == extra["num_true_calls"] + extra["num_guard_calls"]
    assert extra["guard_correction"] == pytest.approx(-0.5, abs=1e-9)


def test_window_keeps_the_highest_points_of_the_whole_run(no_jit):
    # a run whose contour rises: the best points came early, the recent ones are rejected
    # proposals far below; a window of recent points only would have lost every high point
    wrapper = SurrogateLikelihood(SurrogateOptions(**{**FAST, "train_size": 100}), num_live=50)
    wrapper(smooth, None, jax.random.key(0))
    y = np.concatenate([np.linspace(-1.0, 0.0, 60), np.full(500, -50.0), [np.nan, -np.inf]])
    wrapper._u = list(np.arange(len(y), dtype=float)[:, None])
    wrapper._y = list(y)
    rows = wrapper._window_rows(y)
    assert len(rows) == 100 and len(set(rows)) == 100
    top = int(wrapper.options.top_fraction * 100)
    # the top_fraction share: the highest values anywhere in the run ...
    np.testing.assert_array_equal(np.sort(rows[rows < 60])[-top:], np.arange(60 - top, 60))
    # ... and the rest the most recent points (the non-finite ones included: they teach "low")
    np.testing.assert_array_equal(rows[-(100 - top):], np.arange(len(y) - (100 - top), len(y)))
    wrapper._y_ref, wrapper._full_acc = 0.0, 5.0
    x, yw, *_ , n = wrapper._window()
    assert n == 100 and yw.max() == 0.0
    # a short run: every point is in the window
    wrapper._u, wrapper._y = wrapper._u[:30], wrapper._y[:30]
    np.testing.assert_array_equal(wrapper._window_rows(y[:30]), np.arange(30))
    with pytest.raises(EngineError, match="top_fraction"):
        SurrogateOptions(top_fraction=1.0)


def test_options_are_validated_before_anything_runs(no_jit):
    with pytest.raises(EngineError, match="rmse_max"):
        SurrogateOptions(rmse_max=-0.1)
    with pytest.raises(EngineError, match="fallback_rmse"):
        SurrogateOptions(rmse_max=0.5, fallback_rmse=0.2)
    with pytest.raises(EngineError, match="widths"):
        SurrogateOptions(widths=[32, 64])
    with pytest.raises(EngineError, match="inputs"):
        SurrogateOptions(inputs="latent")
    with pytest.raises(EngineError, match="kinds"):
        SurrogateOptions(kinds=("mlp", "transformer"))
    assert {a.kind for a in SurrogateOptions().candidates()} == {"mlp", "additive"}
    hash(SurrogateOptions())  # hashable
    assert SurrogateOptions().full_accuracy(2) == pytest.approx(7.0)  # 1 + 3 * 1 + 3
    assert SurrogateOptions(full_accuracy_nats=4.0).full_accuracy(10) == 4.0
    w = SurrogateLikelihood(SurrogateOptions(**FAST))
    w(lambda u: smooth(u), None, jax.random.key(0))
    with pytest.raises(EngineError, match="one run"):
        w(lambda u: smooth(u), None, jax.random.key(0))


def test_finalize_without_switch_in_keeps_the_run_and_flags(seed):
    wrapper = SurrogateLikelihood(SurrogateOptions(**FAST), num_live=100)
    true_fn = Counting(smooth)
    batch_fn = wrapper(true_fn, None, jax.random.key(seed))
    u = np.random.default_rng(seed).uniform(size=(50, 2))
    batch_fn(u)  # fewer than num_initial: never trained
    out = wrapper.finalize({"u": u, "logwt": smooth(u) - np.log(50), "logl": smooth(u),
                            "logz": -1.0, "logzerr": 0.1})
    assert "log_evidence" not in out  # nothing to correct: every value was true
    assert out["num_true_calls"] == 50 == true_fn.calls
    assert any("never switched in" in f and "ended before" in f for f in out["flags"])


def test_physical_inputs_are_the_constrained_parameters():
    from scipy import stats

    from bayeslik.models import reference
    from bayeslik.surrogate.likelihood import _features_fn

    post = reference.get("normal_mean").posterior()  # mu ~ Normal(0, 10)
    u = np.array([[0.1], [0.5], [0.975]])
    x = _features_fn(post)(u)
    np.testing.assert_allclose(x[:, 0], stats.norm(0, 10).ppf(u[:, 0]), rtol=1e-5, atol=1e-5)
    assert _features_fn(None) is None


def test_the_other_kinds_best_design_is_kept_as_a_runner_up(no_jit):
    """After a refusal the surrogate also trains the search's best design of the other kind
    (the search saw only the first window): the runner-up is the one that got furthest."""
    from bayeslik.surrogate import network as nw
    from bayeslik.surrogate.likelihood import _best_per_kind

    add = nw.Architecture(32, 3, 1e-2, "additive")
    m1, m2, m3 = (nw.Architecture(64, 2, 1e-2), nw.Architecture(32, 2, 1e-2),
                  nw.Architecture(64, 3, 3e-3))
    table = [(0, m1, 300, 5.0), (0, m2, 300, 1.0), (0, m3, 300, 9.0), (0, add, 300, 2.0),
             (1, m1, 900, 3.0), (1, add, 900, 2.5), (2, add, 2700, 2.4)]
    # m2 scored best at rung 0 but m1 got further: m1 is the MLP runner-up
    assert _best_per_kind(table, exclude=add) == [m1]
    assert _best_per_kind(table, exclude=m1) == [add]
    assert _best_per_kind([(0, m1, 300, 1.0)], exclude=m1) == []
