"""C-MAPSS benchmark pieces: the metrics from a predictions table (exact), the deep reference
(windows exact, a few training steps), the degradation-path model (binds; log density checked
by hand and finite with its gradient in float32 and float64)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import bayeslik as bl
from bayeslik.errors import DataError, OptionError
from bayeslik.models import cmapss, cmapss_deep
from bayeslik.models import cmapss_degradation as cdeg


@pytest.fixture(scope="module")
def data():
    return cmapss.load()


# ------------------------------------------------------------------------------ metrics
def test_rul_metrics_exact_on_a_hand_made_table():
    # method "b": 4 units with every quantile; method "p": a point predictor (no quantiles)
    t = pd.DataFrame({
        "unit": [1, 2, 3, 4, 1, 2, 3, 4],
        "method": ["b"] * 4 + ["p"] * 4,
        "true_rul": [10, 50, 200, 30, 10, 50, 200, 30],
        "median": [12, 40, 130, 30, 10, 60, 125, 20],
        "q025": [0, 30, 100, 31, np.nan, np.nan, np.nan, np.nan],
        "q05": [2, 32, 110, 31] + [np.nan] * 4,
        "q10": [4, 34, 115, 31] + [np.nan] * 4,
        "q25": [11, 36, 120, 31] + [np.nan] * 4,
        "q75": [13, 45, 140, 40] + [np.nan] * 4,
        "q90": [15, 48, 150, 45] + [np.nan] * 4,
        "q95": [20, 49, 160, 50] + [np.nan] * 4,
        "q975": [25, 60, 170, 55] + [np.nan] * 4,
    })
    m = cmapss.rul_metrics(t)
    assert list(m.index) == ["b", "p"]
    b, p = m.loc["b"], m.loc["p"]
    # truth capped at 125: [10, 50, 125, 30]; medians capped: b [12, 40, 125, 30], p [10, 60, 125, 20]
    assert b["rmse"] == pytest.approx(np.sqrt((4 + 100 + 0 + 0) / 4))
    assert b["phm08"] == pytest.approx(np.exp(2 / 10) - 1 + np.exp(10 / 13) - 1)
    assert p["rmse"] == pytest.approx(np.sqrt((0 + 100 + 0 + 100) / 4))
    assert p["phm08"] == pytest.approx(np.exp(1.0) - 1 + np.exp(10 / 13) - 1)
    # 50%: [11,13] no (10), [36,45] no (50), [120,125] yes, [31,40] no (30) -> 1/4
    assert b["coverage_50"] == 0.25
    # 80%: [4,15] yes, [34,48] no, [115,125] yes, [31,45] no -> 2/4
    assert b["coverage_80"] == 0.5
    # 90%: [2,20] yes, [32,49] no, [110,125] yes, [31,50] no -> 2/4; widths 18, 17, 15, 19
    assert b["coverage_90"] == 0.5
    assert b["width_90"] == pytest.approx((18 + 17 + 15 + 19) / 4)
    # 95%: [0,25] yes, [30,60] yes, [100,125] yes, [31,55] no -> 3/4
    assert b["coverage_95"] == 0.75
    assert b["num_units"] == 4
    for c in ("coverage_50", "coverage_80", "coverage_90", "coverage_95", "width_90"):
        assert np.isnan(p[c])


def test_rul_metrics_rejects_bad_tables():
    with pytest.raises(DataError, match="median"):
        cmapss.rul_metrics(pd.DataFrame({"method": ["a"], "true_rul": [3]}))
    with pytest.raises(DataError, match="NaN"):
        cmapss.rul_metrics(pd.DataFrame({"method": ["a"], "true_rul": [3], "median": [np.nan]}))
    with pytest.raises(OptionError, match="cap"):
        cmapss.rul_metrics(pd.DataFrame({"method": ["a"], "true_rul": [3], "median": [3]}), cap=0)


def test_quantiles_from_pmf_exact():
    pmf = np.array([[0.1, 0.1, 0.3, 0.5], [0.0, 0.0, 0.0, 1.0]])
    got = cmapss.quantiles_from_pmf(pmf, probs=(0.05, 0.2, 0.5, 0.95), cap=None)
    assert got.tolist() == [[0, 1, 2, 3], [3, 3, 3, 3]]
    assert cmapss.quantiles_from_pmf(pmf, probs=(0.95,), cap=2).tolist() == [[2], [2]]


def test_benchmark_quantile_columns_match_levels():
    assert len(cmapss.QUANTILES) == len(cmapss.QUANTILE_COLUMNS)
    q = dict(zip(cmapss.QUANTILE_COLUMNS, cmapss.QUANTILES))
    for level, (lo, hi) in cmapss.INTERVALS.items():
        assert q[lo] == pytest.approx((1 - level) / 2) and q[hi] == pytest.approx((1 + level) / 2)


# ------------------------------------------------------------------------------ deep reference
def _toy_units():
    rows = []
    for unit, n in ((1, 6), (2, 4)):
        for c in range(1, n + 1):
            rows.append({"unit": unit, "cycle": c, "s1": float(c), "s2": float(10 * unit + c)})
    return pd.DataFrame(rows).sample(frac=1.0, random_state=0)  # rows out of order on purpose


def test_windows_and_targets_exact():
    df = _toy_units()
    sc = cmapss_deep.Scaler.fit(df, sensors=("s1", "s2"))
    X, y, u = cmapss_deep.windows(df, sc, window=3, cap=3)
    # unit 1 (6 cycles): windows end at cycles 3..6 -> RUL 3, 2, 1, 0 (cap 3); unit 2: 1, 0
    assert X.shape == (6, 3, 2) and X.dtype == np.float32
    assert y.tolist() == [3, 2, 1, 0, 1, 0] and u.tolist() == [1, 1, 1, 1, 2, 2]
    # s1 spans 1..6 -> [-1, 1]; the first window of unit 1 holds cycles 1, 2, 3
    np.testing.assert_allclose(X[0, :, 0], 2 * (np.array([1, 2, 3]) - 1) / 5 - 1, rtol=1e-6)
    L, units = cmapss_deep.last_windows(df, sc, window=5)
    assert L.shape == (2, 5, 2) and units.tolist() == [1, 2]
    # unit 2 has 4 cycles: padded at the start with its first cycle
    np.testing.assert_allclose(L[1, :, 0], 2 * (np.array([1, 1, 2, 3, 4]) - 1) / 5 - 1, rtol=1e-6)
    with pytest.raises(DataError, match="constant"):
        cmapss_deep.Scaler.fit(df.assign(s3=1.0), sensors=("s1", "s3"))


def test_deep_reference_trains_and_predicts(data):
    train = data["train"][data["train"]["unit"] <= 10]
    res = cmapss_deep.fit(jax.random.key(0), train, num_epochs=2, max_steps=3, batch_size=64,
                          width=4, hidden=8)
    assert len(res.history) == 2 and np.all(np.isfinite(res.history[["train_rmse", "val_rmse"]]))
    assert res.best_epoch in (1, 2)
    test = data["test"][data["test"]["unit"] <= 7]
    pred = cmapss_deep.predict(res, test)
    assert list(pred.index) == list(range(1, 8)) and list(pred.columns) == ["rul"]
    assert np.all((pred["rul"] >= 0) & (pred["rul"] <= 125))
    with pytest.raises(OptionError, match="val_fraction"):
        cmapss_deep.fit(jax.random.key(0), train, val_fraction=1.5)


# ------------------------------------------------------------------------------ degradation model
def _small_joint(data):
    hi = cmapss.HealthIndicator.fit(data["train"])
    tr = cdeg.paths(data["train"][data["train"]["unit"] <= 4], hi, run_to_failure=True)
    te = cdeg.paths(data["test"][data["test"]["unit"] <= 2], hi, run_to_failure=False)
    return cdeg.joint_data(tr, te), tr, te


def _hand_loglik(d, v):
    """log p(y | params) + life term, written out with NumPy in float64."""
    y, mask, n = d["y"].astype(float), d["mask"], d["length"].astype(float)
    T = y.shape[1]
    life = n.copy()
    rows = list(d["censored_rows"])
    life[rows] += np.exp(v["log_rul"])
    t = np.minimum(np.arange(1, T + 1)[None, :], n[:, None])
    mean = v["a"][:, None] - (v["a"] - v["e"])[:, None] * np.exp(-(life[:, None] - t) / np.exp(v["log_tau"])[:, None])
    s = v["sigma"]
    ll = (-0.5 * ((y - mean) / s) ** 2 - np.log(s) - 0.5 * np.log(2 * np.pi))[mask].sum()
    lg = np.log(life)
    ll += np.sum(-0.5 * ((lg - v["mu_life"]) / v["sd_life"]) ** 2 - np.log(v["sd_life"])
                 - 0.5 * np.log(2 * np.pi) - lg)
    return ll + np.sum(v["log_rul"])


@pytest.mark.parametrize("use_x64", [False, True])
def test_degradation_model_density_by_hand_and_finite_gradient(data, x64_toggle, use_x64):
    x64_toggle(use_x64)
    d, tr, te = _small_joint(data)
    assert d["censored_rows"] == (4, 5) and d["y"].shape == (6, int(tr["length"].max()))
    post = bl.Posterior(cdeg.model, **d)
    v = {k: np.asarray(x, float) for k, x in cdeg.init_values(d).items()}
    v["a"] = v["a"] + np.linspace(-0.1, 0.1, 6)
    v["log_rul"] = np.log([30.0, 80.0])
    z = post.unconstrain(v)
    expected_dtype = jnp.float64 if use_x64 else jnp.float32
    assert z.dtype == expected_dtype
    got = float(jax.jit(post.loglikelihood)(z))
    want = _hand_loglik(d, v)
    assert got == pytest.approx(want, rel=1e-10 if use_x64 else 1e-5)
    val, grad = jax.jit(jax.value_and_grad(post.logdensity))(z)
    assert np.isfinite(float(val)) and np.all(np.isfinite(np.asarray(grad)))
    assert float(jnp.linalg.norm(grad)) > 0
    # the RUL is a deterministic of the draws
    assert np.allclose(np.asarray(post.constrain(z)["rul"]), [30.0, 80.0], rtol=1e-5)


def test_degradation_model_rejects_bad_input(data):
    d, _, _ = _small_joint(data)
    with pytest.raises(DataError, match="censored_rows"):
        bl.Posterior(cdeg.model, **{**d, "censored_rows": (4, 99)})
    with pytest.raises(DataError, match="every unit is censored"):
        bl.Posterior(cdeg.model, **{**d, "censored_rows": tuple(range(6))})
    with pytest.raises(DataError, match="length"):
        bl.Posterior(cdeg.model, **{**d, "length": d["length"] + 1})
    with pytest.raises(OptionError, match="run_to_failure"):
        cdeg.paths(data["train"], cmapss.HealthIndicator.fit(data["train"]))


def test_truncate_and_validation_cuts(data):
    hi = cmapss.HealthIndicator.fit(data["train"])
    p = cdeg.paths(data["train"][data["train"]["unit"] <= 5], hi, run_to_failure=True)
    cut, truth = cdeg.validation_cuts(p, seed=1)
    for u, n in zip(p["units"], p["length"]):
        assert cut[u] + truth[u] == n and 7 <= truth[u] <= 145 and cut[u] >= 31
    q = cdeg.truncate(p, {1: 40})
    assert q["length"][0] == 40 and q["mask"][0].sum() == 40 and q["censored"][0]
    assert not q["censored"][1:].any() and np.all(q["y"][0, 40:] == p["y"][0, 39])
    assert p["length"][0] != 40  # the input is not changed
    with pytest.raises(OptionError, match="keep between"):
        cdeg.truncate(p, {1: int(p["length"][0])})


def test_life_link_prior_terms_by_hand(data, x64):
    """With the life link, moving a test engine's RUL changes the engine-effect priors exactly as
    the regressions on log life say (the joint log density's change, written out by hand)."""
    d, _, _ = _small_joint(data)
    post = bl.Posterior(cdeg.model, **d)
    v = {k: np.asarray(x, float) for k, x in cdeg.init_values(d).items()}
    v.update(b_a=0.3, b_e=-0.2, b_tau=1.1, b_tau_a=0.4, b_tau_e=-0.5)
    v["a"] = v["a"] + np.linspace(-0.1, 0.1, 6)
    v["e"] = v["e"] + np.linspace(0.05, -0.05, 6)

    def effects_lp(v):
        life = d["length"].astype(float)
        life[list(d["censored_rows"])] += np.exp(v["log_rul"])
        s = np.log(life) - v["mu_life"]

        def norm(x, m, sd):
            return np.sum(-0.5 * ((x - m) / sd) ** 2 - np.log(sd) - 0.5 * np.log(2 * np.pi))

        a, e, lt = v["a"], v["e"], v["log_tau"]
        return (norm(a, v["mu_a"] + v["b_a"] * s, v["sd_a"])
                + norm(e, v["mu_e"] + v["beta_e"] * (a - v["mu_a"]) + v["b_e"] * s, v["sd_e"])
                + norm(lt, v["mu_tau"] + v["b_tau"] * s + v["b_tau_a"] * (a - v["mu_a"])
                       + v["b_tau_e"] * (e - v["mu_e"]), v["sd_tau"]))

    lp = jax.jit(post.logdensity)
    w = {**v, "log_rul": np.log([30.0, 80.0])}
    w2 = {**v, "log_rul": np.log([60.0, 20.0])}
    got = float(lp(post.unconstrain(w2)) - lp(post.unconstrain(w)))
    want = (_hand_loglik(d, w2) + effects_lp(w2)) - (_hand_loglik(d, w) + effects_lp(w))
    assert got == pytest.approx(want, rel=1e-9, abs=1e-8)
    assert abs(effects_lp(w2) - effects_lp(w)) > 0.1  # the link matters at these values
