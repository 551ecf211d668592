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
