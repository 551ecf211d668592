"""C-MAPSS FD001: the bundled files load whole, the health indicator tracks degradation."""

from __future__ import annotations

import numpy as np
import pytest

from bayeslik.models import cmapss


@pytest.fixture(scope="module")
def data():
    return cmapss.load()


def test_files_load_whole(data):
    train, test, rul = data["train"], data["test"], data["rul"]
    assert train.shape == (20631, 26) and test.shape == (13096, 26) and rul.shape == (100,)
    assert train["unit"].nunique() == 100 and test["unit"].nunique() == 100
    # cycles count up by one from 1 within every unit
    for df in (train, test):
        steps = df.groupby("unit")["cycle"].apply(lambda c: np.array_equal(c.to_numpy(), np.arange(1, len(c) + 1)))
        assert steps.all()
    assert np.allclose(train["T2"], 518.67)  # sea-level total temperature: the columns are right
    assert rul.min() > 0 and rul.max() < 200
    with pytest.raises(ValueError, match="FD001 only"):
        cmapss.load("FD002")


def test_health_indicator_tracks_life(data):
    train = data["train"]
    hi = cmapss.HealthIndicator.fit(train)
    life = train.groupby("unit")["cycle"].transform("max").to_numpy()
    target = np.clip(1 - (train["cycle"].to_numpy() - 30) / (life - 30), 0, 1)
    noise = np.std(hi(train) - target)
    seqs = hi.sequences(train)
    start = np.mean([s[:20].mean() for s in seqs.values()])
    end = np.mean([s[-10:].mean() for s in seqs.values()])
    # healthy and failing engines are separated by far more than the per-cycle noise
    assert start - end > 3 * noise, (start, end, noise)
    assert np.corrcoef(hi(train), target)[0, 1] > 0.8
    # on held-out engines (the test set), the HI at the last cycle falls with less RUL left
    last = np.array([s[-1] for _, s in sorted(hi.sequences(data["test"]).items())])
    r = np.corrcoef(last, np.minimum(data["rul"], 125))[0, 1]
    assert r > 0.7, r


def test_rul_score():
    s = cmapss.rul_score(np.array([10, 200]), np.array([20, 115]))
    # capped truth 125: errors +10 (late) and -10 (early)
    assert s["rmse"] == pytest.approx(10.0)
    assert s["phm08"] == pytest.approx(np.exp(1.0) - 1 + np.exp(10 / 13) - 1)


def test_baseline_rul_on_fd001(data):
    """The linear baseline, scored on the 100 test engines (deterministic: 22.0 cycles RMSE,
    87% coverage of the 90% interval when written)."""
    b = cmapss.baseline_rul(data["train"], data["test"])
    assert list(b.index) == list(range(1, 101))
    assert np.all((b["lower"] <= b["rul"]) & (b["rul"] <= b["upper"]))
    s = cmapss.rul_score(data["rul"], b["rul"].to_numpy())
    true = np.minimum(data["rul"], 125)
    coverage = np.mean((true >= b["lower"]) & (true <= b["upper"]))
    assert s["rmse"] < 25 and coverage >= 0.85, (s, coverage)


def test_degradation_labels(data):
    hi = cmapss.HealthIndicator.fit(data["train"])
    K = 4
    tr = cmapss.degradation_data(data["train"], hi, K, run_to_failure=True)
    te = cmapss.degradation_data(data["test"], hi, K, run_to_failure=False)
    assert tr["y"].shape == (100, tr["length"].max(), 1) and tr["labels"].shape[-1] == K
    n = tr["length"][0]
    lab = tr["labels"][0]
    assert np.all(lab[:30] == np.eye(K)[0])                   # new engines are healthy
    assert np.all(lab[n - 15 : n] == np.eye(K)[K - 1])        # the last 15 cycles: final state
    assert np.all(lab[30 : n - 15, K - 1] == 0) and np.all(lab[30 : n - 15, : K - 1] == 1)
    assert tr["mask"][0].sum() == n and not tr["mask"][0, n:].any()
    # test engines: only the healthy start is known
    m = te["length"][0]
    assert np.all(te["labels"][0, 30:m] == 1)


def test_rul_first_passage_is_exact():
    """The RUL distribution of a unit known to be in state 0 at its last cycle equals the
    first-passage time into the last state of the left-to-right chain (Monte Carlo check)."""
    K, T, final = 3, 40, 15
    trans = np.array([[0.9, 0.07, 0.03], [0.0, 0.8, 0.2], [0.0, 0.0, 1.0]])
    params = {"pi": np.array([[1.0, 0.0, 0.0]]), "trans": trans[None],
              "b": np.zeros((1, K, 1)), "A": np.zeros((1, K, 1, 1, 1)), "sigma": np.ones((1, K, 1))}
    labels = np.zeros((1, T, K), np.float32)
    labels[..., 0] = 1.0  # the unit is in state 0 throughout
    d = {"y": np.zeros((1, T, 1), np.float32), "mask": np.ones((1, T), bool), "labels": labels}
    pmf = cmapss.rul_distribution({k: v.astype(np.float32) for k, v in params.items()}, d, K,
                                  final_cycles=final, horizon=300)[0]
    rng = np.random.default_rng(0)
    n = 100_000
    state, s = np.zeros(n, int), np.zeros(n, int)
    alive = np.ones(n, bool)
    for step in range(1, 300):
        u = rng.uniform(size=n)
        nxt = (u[:, None] > np.cumsum(trans[state], axis=1)).sum(1)
        entered = alive & (nxt == K - 1)
        s[entered] = step
        alive &= ~entered
        state = np.where(alive, nxt, state)
        if not alive.any():  # every chain absorbed: the remaining steps change nothing
            break
    mc = np.bincount(s + final - 1, minlength=pmf.size)[: pmf.size] / n
    se = np.sqrt(pmf * (1 - pmf) / n) + 1e-12
    assert np.all(np.abs(mc - pmf) < 5 * se + 1e-4)
    assert pmf[: final - 1].sum() < 1e-6 and abs(pmf.sum() - 1) < 1e-5
