"""The guard's importance correction recovers the true evidence from biased likelihood values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import logsumexp

from bayeslik.surrogate.guard import importance_correction
from bayeslik.weights import systematic_indices


def _dead_points(num=4000):
    """An exact 'nested run' on [0, 1]: midpoint quadrature of a Gaussian likelihood."""
    u = (np.arange(num) + 0.5) / num
    true = -0.5 * ((u - 0.5) / 0.05) ** 2 - math.log(0.05 * math.sqrt(2 * math.pi))
    return u[:, None], true, np.log(1.0 / num)


def test_constant_offset_is_removed_exactly(seed):
    u, true, logdx = _dead_points()
    used = true + 0.7                                  # a surrogate 0.7 nats too high
    logwt = used + logdx
    logz_used = float(logsumexp(logwt))
    res = importance_correction(
        np.random.default_rng(seed), u, logwt, used, logz=logz_used, logzerr=0.0,
        true_batch_fn=lambda x: -0.5 * ((x[:, 0] - 0.5) / 0.05) ** 2
        - math.log(0.05 * math.sqrt(2 * math.pi)), num_points=100)
    assert logz_used == pytest.approx(0.7, abs=1e-6)  # the truth is log 1 = 0
    assert res.log_evidence == pytest.approx(0.0, abs=1e-6)
    assert res.correction == pytest.approx(-0.7, abs=1e-9)
    assert res.ess_fraction == pytest.approx(1.0)
    assert res.correction_err == pytest.approx(0.0, abs=1e-9)


def test_region_bias_recovered_within_error(seed):
    # the surrogate is 0.4 nats too high on the left half of the posterior only
    u, true, logdx = _dead_points()
    used = true + np.where(u[:, 0] < 0.5, 0.4, 0.0)
    logwt = used + logdx
    logz_used = float(logsumexp(logwt))
    true_fn = lambda x: -0.5 * ((x[:, 0] - 0.5) / 0.05) ** 2 - math.log(  # noqa: E731
        0.05 * math.sqrt(2 * math.pi))
    # points already evaluated with the true likelihood cost nothing
    known = {u[i].tobytes(): float(true[i]) for i in range(len(u)) if u[i, 0] >= 0.5}
    errs = []
    for k in range(20):
        res = importance_correction(np.random.default_rng(seed + k), u, logwt, used,
                                    logz=logz_used, logzerr=0.0, true_batch_fn=true_fn,
                                    num_points=200, known_true=known)
        errs.append(res.log_evidence / res.log_evidence_err)
        assert res.num_true_calls <= 200
        assert res.surrogate_weight == pytest.approx(np.exp(0.4) / (1 + np.exp(0.4)), abs=0.01)
    # uncorrected it is off by log((1 + e^0.4) / 2) = 0.22; corrected, z-scores are O(1)
    assert logz_used == pytest.approx(math.log((1 + math.exp(0.4)) / 2), abs=1e-3)
    errs = np.array(errs)
    assert np.all(np.abs(errs) < 4)
    assert np.mean(errs**2) < 3


def test_systematic_indices_counts(seed):
    p = np.array([0.5, 0.25, 0.125, 0.125])
    idx = systematic_indices(np.random.default_rng(seed), p, 8)
    assert np.bincount(idx, minlength=4).tolist() == [4, 2, 1, 1]
