"""The MLP ensemble: it learns a known function, reports its spread, and the successive-halving
search ranks candidates by held-out error."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from bayeslik.surrogate import network as nw


def _quadratic(x):
    # a 2-D Gaussian log-likelihood with correlation: range about 0 to -40 nats on the box
    d = x - np.array([0.4, 0.6])
    return -0.5 * (d[:, 0] ** 2 / 0.04 + d[:, 1] ** 2 / 0.02 - 2 * 0.5 * d[:, 0] * d[:, 1] / 0.03)


def test_ensemble_learns_a_known_function(seed):
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(400, 2))  # 400 rows, 3 members: as in the other tests (one compile)
    y = _quadratic(x)
    w_train = rng.uniform(size=400) > 0.2
    ens, info = nw.train_ensemble(jax.random.key(seed), x, y, w_train, ~w_train,
                                  nw.Architecture(32, 2, 1e-2), num_members=3, max_steps=1500)
    # fresh points from the same box: error small against the function's ~40-nat range
    xt = rng.uniform(0.05, 0.95, size=(400, 2))
    mean, spread = nw.predict(ens, xt)
    err = mean - _quadratic(xt)
    assert np.sqrt(np.mean(err**2)) < 0.15
    assert info.val_rmse < 0.15
    assert mean.shape == spread.shape == (400,) and np.all(spread >= 0)
    # the spread is an uncertainty: far outside the training box the members disagree more
    _, far = nw.predict(ens, xt + 3.0)
    assert np.median(far) > 5 * np.median(spread)
    # an untrained network is far off: the test can fail
    raw, _ = nw.train_ensemble(jax.random.key(seed), x, y, w_train, ~w_train,
                               nw.Architecture(32, 2, 1e-2), num_members=3, max_steps=1)
    assert np.sqrt(np.mean((nw.predict(raw, xt)[0] - _quadratic(xt)) ** 2)) > 1.0


def test_search_prefers_the_trainable_candidate(seed):
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(400, 2))
    y = _quadratic(x)
    w_train = rng.uniform(size=400) > 0.25
    good = nw.Architecture(32, 2, 1e-2)
    slow = nw.Architecture(32, 2, 1e-5)  # a learning rate far too small to learn in budget
    # one (width, depth) with three learning rates: trained as one stack of three (one compile)
    res = nw.search_architecture(jax.random.key(seed), x, y, w_train, ~w_train,
                                 [slow, good, nw.Architecture(32, 2, 3e-5)], min_steps=200,
                                 eta=3)
    assert res.best == good
    # rung 0 trains all three, rung 1 the single survivor of ceil(3 / 3)
    assert [r for r, *_ in res.table] == [0, 0, 0, 1]
    assert res.num_trainings == 4
    with pytest.raises(ValueError, match="learning_rate"):
        nw.Architecture(32, 2, 0.0)
