"""The ensembles (MLP and additive networks): they learn a known function, report their spread,
and the successive-halving search ranks candidates (and kinds) by held-out error."""

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
    # rung 0 trains all three; the single survivor of ceil(3 / 3) is not trained again (the
    # caller trains its ensemble)
    assert [r for r, *_ in res.table] == [0, 0, 0]
    assert res.num_trainings == 3
    with pytest.raises(ValueError, match="learning_rate"):
        nw.Architecture(32, 2, 0.0)


def _additive(x):
    # a sum of three LogGamma log-densities (scale 0.15): sharp on one side, about -3 to -70 nats
    z = (x - np.array([0.4, 0.5, 0.6])) / 0.15
    return np.sum(z - np.exp(z), axis=1)


def _coupled(x):
    # a Gaussian log-likelihood whose parameters are tied in pairs: no sum of 1-D functions fits it
    d = x - 0.5
    return (-0.5 * (d[:, 0] - d[:, 1]) ** 2 / 0.01 - 0.5 * (d[:, 1] + d[:, 2]) ** 2 / 0.01
            - 0.5 * d[:, 0] ** 2 / 0.1)


def test_additive_network_is_a_sum_of_one_input_functions(seed):
    net = nw.AdditiveMLP(3, 8, 3, key=jax.random.key(seed))
    a, b = np.array([0.1, 0.7, -0.3]), np.array([0.9, -0.2, 0.4])
    f = lambda v: float(net(jax.numpy.asarray(v, jax.numpy.float32)))  # noqa: E731
    # changing x_0 moves f by the same amount whatever x_1, x_2 are
    mixed_a, mixed_b = np.array([b[0], a[1], a[2]]), np.array([a[0], b[1], b[2]])
    assert f(a) - f(mixed_a) == pytest.approx(f(mixed_b) - f(b), abs=1e-5)
    assert abs(f(a) - f(mixed_a)) > 1e-3  # and it does depend on x_0


def test_search_chooses_the_kind_that_fits(seed):
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(400, 3))
    xt = rng.uniform(0.05, 0.95, size=(400, 3))
    w = rng.uniform(size=400) > 0.25
    kinds = [nw.Architecture(32, 2, 1e-2, "mlp"), nw.Architecture(32, 2, 1e-2, "additive")]
    # an additive log-likelihood: the additive network learns it with under half the MLP's error
    y = _additive(x)
    errs = {}
    for arch in kinds:
        ens, _ = nw.train_ensemble(jax.random.key(seed), x, y, w, ~w, arch, num_members=3,
                                   max_steps=1500)
        errs[arch.kind] = np.sqrt(np.mean((nw.predict(ens, xt)[0] - _additive(xt)) ** 2))
    assert errs["additive"] < 0.5 * errs["mlp"] and errs["additive"] < 0.06
    res = nw.search_architecture(jax.random.key(seed), x, y, w, ~w, kinds, min_steps=200)
    assert res.best.kind == "additive"
    # coupled parameters: the additive network cannot fit it, the search takes the MLP
    res = nw.search_architecture(jax.random.key(seed), x, _coupled(x), w, ~w, kinds, min_steps=200)
    assert res.best.kind == "mlp"
    assert [e for *_, e in res.table][1] > 10 * [e for *_, e in res.table][0]
    with pytest.raises(ValueError, match="kind"):
        nw.Architecture(32, 2, 1e-2, "conv")
