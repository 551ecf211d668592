"""The nss self-check (issue 19): new points' insertion ranks among the live points, and their
independence of the ranks of the points their slice chains started from.

* at the exact null (a perfect nested sampling run simulated in prior volume, also deleting
  several points per step) the four p-values are uniform, so the flag's false-alarm rate is
  at most its level;
* a run with one slice move per new point on a 12-D correlated Gaussian (logZ tens of its
  errors off) is flagged, with the p-values in the Fit; the default is not (the 2-D default
  is covered by test_nss.py::test_shells_2d, which asserts no flags at all);
* slow: the false-alarm rate of default runs and the detection rate of undermixed ones over
  seeds.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import stats

import bayeslik as bl
from bayeslik.convergence import FitWarning
from bayeslik.engines import nss
from bayeslik.models import reference

P_KEYS = ("insertion_pvalue_run", "insertion_pvalue_windows", "start_pvalue_run",
          "start_pvalue_windows")


def _perfect_counts(rng, n, k, steps, stick=0.0, runs=1):
    """The rank counts (as the compiled chunk records them) of ``runs`` perfect nested sampling
    runs in prior volume X (likelihood decreasing in X), simulated side by side: n live points,
    the k of largest X die, the new ones are uniform below the contour and their starts uniform
    among the survivors. With ``stick`` > 0 that fraction of new points is put just inside
    their start instead (a slice chain that did not move far). A list over runs of the five
    count arrays (steps, k) / (steps,)."""
    x = rng.random((runs, n))
    rows = np.arange(runs)[:, None]
    out = [[] for _ in range(4)]
    for _ in range(steps):
        order = np.argsort(-x, axis=1)
        dead, surv = order[:, :k], order[:, k:]
        contour = x[rows, dead].min(axis=1, keepdims=True)
        start = np.take_along_axis(surv, rng.integers(0, n - k, (runs, k)), axis=1)
        fresh = contour * rng.random((runs, k))
        near = x[rows, start] * (1.0 - 1e-3 * rng.random((runs, k)))
        fresh = np.where(rng.random((runs, k)) < stick, near, fresh)
        xs = x[rows, surv][:, None, :]
        out[0].append((xs > fresh[:, :, None]).sum(2))  # lower likelihood: larger volume
        out[2].append((xs > x[rows, start][:, :, None]).sum(2))
        x[rows, dead] = fresh
    below, start_below = np.stack(out[0], axis=1), np.stack(out[2], axis=1)
    zeros, usable = np.zeros((steps, k), int), np.ones(steps, bool)
    return [[below[r], zeros, start_below[r], zeros, usable] for r in range(runs)]


@pytest.mark.parametrize("k", [1, 8])
def test_pvalues_uniform_at_the_exact_null(seed, k):
    """120 perfect runs of 64 live points, the start test with no floor (rho_min=0): each
    p-value's KS test against U(0, 1) passes at 1e-3 (the inflation for shared reference points
    at k = 8 is 1 + 7/56), and the Bonferroni combination rejects at 0.05 in at most 12 runs
    (6 expected at most; binomial(120, 0.05) exceeds 12 with probability 0.008)."""
    rng = np.random.default_rng(seed)
    counts = _perfect_counts(rng, 64, k, 1600 // k, runs=120)
    runs = [nss.self_check(rng, c, 64, k, rho_min=0.0) for c in counts]
    for key in P_KEYS:
        p = np.array([r[key] for r in runs])
        assert stats.kstest(p, "uniform").pvalue > 1e-3, (key, np.sort(p)[:10])
    combined = np.array([r["selfcheck_pvalue"] for r in runs])
    assert np.sum(combined < 0.05) <= 12
    # with the engine's floor on the start-rank correlation the start tests are conservative
    # (the floor is 3.2 standard errors of the run-wide correlation of 1600 points)
    floor = [nss.self_check(rng, c, 64, k) for c in counts[:20]]
    assert min(r["start_pvalue_run"] for r in floor) > 0.05
    assert all(r["selfcheck_num_points"] == 1600 // k * k for r in runs)
    assert all(r["selfcheck_num_windows"] == 1600 // 64 for r in runs)


def test_sticky_chains_detected_in_the_synthetic_run(seed):
    """A quarter of the new points left next to their start: the start-rank test rejects, the
    insertion ranks (still uniform: they inherit their start's) need not."""
    rng = np.random.default_rng(seed)
    out = nss.self_check(rng, _perfect_counts(rng, 64, 8, 200, stick=0.25)[0], 64, 8)
    assert out["start_pvalue_run"] < 1e-6 < out["insertion_pvalue_run"] * 1e3
    assert out["selfcheck_pvalue"] < nss.SELFCHECK_ALPHA
    assert out["start_rank_correlation"] > 0.15


def test_unusable_steps_and_short_runs_are_not_tested():
    """Steps whose survivors are not all above the contour are left out; under 50 ranked
    points there is no test (NaN p-values), so nothing can be flagged."""
    rng = np.random.default_rng(0)
    counts = _perfect_counts(rng, 20, 2, 40)[0]
    counts[4] = np.zeros(40, bool)
    counts[4][:20] = True
    out = nss.self_check(rng, counts, 20, 2)
    assert out["selfcheck_num_points"] == 40 and np.isnan(out["selfcheck_pvalue"])
    assert nss._selfcheck_flag(out, 1, 2) is None
    empty = nss.self_check(rng, [np.zeros((0, 2))] * 5, 20, 2)
    assert empty["selfcheck_num_points"] == 0 and np.isnan(empty["selfcheck_pvalue"])


@pytest.fixture(scope="module")
def gauss12():
    prob = reference.correlated_gaussian(dim=12)
    return prob, prob.posterior()


def test_one_slice_move_flagged(gauss12, seed):
    """One slice move per new point in 12-D (rank correlation with the start about 0.6; logZ
    tens of its errors off): flagged and warned, naming the fix; the p-values in the Fit."""
    prob, post = gauss12
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = bl.fit(post, "nss", seed=seed, num_live=200, num_inner_steps=1, progress_bar=False)
    attrs = fit.idata["nested_samples"].attrs
    assert attrs["selfcheck_pvalue"] < 1e-12, attrs
    assert attrs["start_rank_correlation"] > 0.4
    assert attrs["selfcheck_num_points"] > 5000 and attrs["selfcheck_num_windows"] > 10
    flag = [f for f in fit.flags if f.startswith("self-check failed")]
    assert len(flag) == 1 and "num_inner_steps=60" in flag[0] and "(now 1)" in flag[0]
    assert any(issubclass(w.category, FitWarning) and "self-check" in str(w.message)
               for w in caught)
    # the bias the check is there for: logZ far outside its own error
    assert abs(fit.log_evidence - prob.log_evidence) > 10 * fit.log_evidence_err


@pytest.mark.slow
def test_default_not_flagged_12d(gauss12, seed):
    prob, post = gauss12
    fit = bl.fit(post, "nss", seed=seed, num_live=200, progress_bar=False)
    attrs = fit.idata["nested_samples"].attrs
    assert not any(f.startswith("self-check") for f in fit.flags), attrs
    assert attrs["selfcheck_pvalue"] >= nss.SELFCHECK_ALPHA


# ----------------------------------------------------------------------------- calibration (slow)
@pytest.mark.slow
def test_false_alarm_and_detection_rates(seed):
    """Over 40 seeds on the 6-D correlated Gaussian (500 live points): the default (30 slice
    moves) is flagged in at most 1 run (1e-3 per run nominal: one in 40 has probability
    < 0.04); 2 slice moves per new point are flagged in every run (rank correlation about
    0.4 over ~11000 new points: z ~ 40)."""
    post = reference.correlated_gaussian(dim=6).posterior()

    def flagged(inner):
        fits = [bl.fit(post, "nss", seed=seed + 7000 + i, num_live=500, num_inner_steps=inner,
                       progress_bar=False) for i in range(40)]
        return sum(any(f.startswith("self-check") for f in fit.flags) for fit in fits)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitWarning)
        assert flagged(None) <= 1
        assert flagged(2) == 40
