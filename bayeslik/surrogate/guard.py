"""The guard on a surrogate-assisted run: an importance correction of the evidence.

Nested sampling returns dead points ``i`` with log weights ``logwt_i = log(w_i L_i)`` where
``L_i`` is the likelihood value the sampler *used* (the surrogate's where it stood in). The
evidence it reports is ``Z_used = sum_i w_i L_used_i``; the evidence under the true likelihood is

    Z_true = sum_i w_i L_true_i = Z_used * sum_i p_i exp(L_true_i - L_used_i),
    p_i = w_i L_used_i / Z_used                      (the run's posterior weights).

The sum is an expectation under the run's posterior, so a subsample of ``m`` points drawn with
probabilities ``p_i`` (systematic resampling,
:func:`bayeslik.weights.systematic_indices`) and the true likelihood at each gives

    log Z_corr = log Z_used + log( (1/m) sum_j exp(d_j) ),   d_j = L_true_j - L_used_j,

with the delta-method standard error ``sd(exp d) / (sqrt(m) mean(exp d))`` added in quadrature to
the run's own ``logzerr``, and the importance ESS ``(sum e^d)^2 / sum e^{2d}`` telling how even the
correction is. Points the sampler evaluated with the true likelihood have ``d = 0`` and cost
nothing. The correction cannot see probability mass the surrogate wrongly cut away (points it
rejected that were inside the contour); the periodic re-checks during the run guard that side.

Example
-------
>>> import numpy as np
>>> from bayeslik.surrogate.guard import importance_correction
>>> logl = np.linspace(-10, 0, 200); logwt = logl + np.log(1 / 200)
>>> true_fn = lambda u: np.asarray(u)[:, 0] - 0.5        # the surrogate was 0.5 nats too high
>>> res = importance_correction(np.random.default_rng(0), logl[:, None], logwt, logl,
...                             logz=0.0, logzerr=0.0, true_batch_fn=true_fn, num_points=50)
>>> round(res.correction, 3)
-0.5
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

import numpy as np
from scipy.special import logsumexp

from bayeslik.weights import systematic_indices

__all__ = ["GuardResult", "importance_correction"]


class GuardResult(NamedTuple):
    """The corrected evidence and what the correction looked like.

    ``correction`` = log Z_corr - log Z_used; ``correction_err`` its standard error;
    ``ess`` the importance effective sample size of the m subsampled points, ``ess_fraction``
    = ess / m; ``num_true_calls`` the true likelihood evaluations the guard made;
    ``max_abs_diff`` the largest |L_true - L_used| seen; ``surrogate_weight`` the posterior
    weight carried by points whose value came from the surrogate.
    """

    log_evidence: float
    log_evidence_err: float
    correction: float
    correction_err: float
    ess: float
    ess_fraction: float
    num_points: int
    num_true_calls: int
    max_abs_diff: float
    surrogate_weight: float


def importance_correction(
    rng: np.random.Generator,
    u: np.ndarray,
    logwt: np.ndarray,
    logl: np.ndarray,
    *,
    logz: float,
    logzerr: float,
    true_batch_fn: Callable[[np.ndarray], np.ndarray],
    num_points: int = 200,
    known_true: Mapping[bytes, float] | None = None,
) -> GuardResult:
    """Correct a nested-sampling evidence computed with surrogate likelihood values.

    ``u`` (N, d), ``logwt`` (N,) and ``logl`` (N,) are the run's dead points, their log weights
    and the likelihood values it used; ``true_batch_fn(u_subset) -> values`` the true
    log-likelihood; ``known_true`` maps ``u_row.tobytes()`` to a true value already computed
    (those rows cost nothing). See the module docstring for the estimator.
    """
    u = np.asarray(u, np.float64)
    logwt = np.asarray(logwt, np.float64)
    logl = np.asarray(logl, np.float64)
    known_true = known_true or {}
    p = np.exp(logwt - logsumexp(logwt))
    m = int(num_points)
    idx = systematic_indices(rng, p, m)
    uniq, inverse = np.unique(idx, return_inverse=True)
    true_vals = np.empty(len(uniq))
    is_true = np.zeros(len(uniq), bool)
    for k, i in enumerate(uniq):
        v = known_true.get(u[i].tobytes())
        if v is not None:
            true_vals[k], is_true[k] = v, True
    need = ~is_true
    if need.any():
        true_vals[need] = np.asarray(true_batch_fn(u[uniq[need]]), np.float64)
    d_uniq = true_vals - logl[uniq]
    d = d_uniq[inverse]
    finite = np.isfinite(d)
    if not finite.all():  # a point the true likelihood rules out contributes exp(-inf) = 0
        d = np.where(np.isnan(d), -np.inf, d)
    correction = float(logsumexp(d) - np.log(m))
    r = np.exp(d - np.max(d)) if np.isfinite(np.max(d)) else np.zeros(m)
    mean_r = r.mean()
    if mean_r > 0 and m > 1:
        corr_err = float(r.std(ddof=1) / (np.sqrt(m) * mean_r))
        ess = float(r.sum() ** 2 / np.sum(r * r))
    else:
        corr_err, ess = float("inf"), 0.0
    # posterior weight on surrogate-valued points, over all dead points
    served = np.array([u[i].tobytes() not in known_true for i in range(len(u))]) if known_true \
        else np.ones(len(u), bool)
    return GuardResult(
        log_evidence=float(logz + correction),
        log_evidence_err=float(np.hypot(logzerr, corr_err)),
        correction=correction,
        correction_err=corr_err,
        ess=ess,
        ess_fraction=ess / m,
        num_points=m,
        num_true_calls=int(need.sum()),
        max_abs_diff=float(np.max(np.abs(d_uniq[np.isfinite(d_uniq)]), initial=0.0)),
        surrogate_weight=float(p[served].sum()),
    )
