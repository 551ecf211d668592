r"""The Kalman filter: exact filtering and log-likelihood of a linear Gaussian state-space model.

The model (state :math:`x_t \in \mathbb{R}^{d}`, observation :math:`y_t \in \mathbb{R}^{p}`):

.. math::

    x_0 \sim \mathcal{N}(m_0, P_0), \qquad
    x_t = F x_{t-1} + \varepsilon_t,\; \varepsilon_t \sim \mathcal{N}(0, Q), \qquad
    y_t = H x_t + \eta_t,\; \eta_t \sim \mathcal{N}(0, R), \qquad t = 0, \dots, T-1.

The parameters are a dict ``{"m0": (d,), "P0": (d, d), "F": (d, d), "Q": (d, d), "H": (p, d),
"R": (p, p)}``, the same dict :func:`bayeslik.filtering.particle.linear_gaussian_ssm` takes, so
a particle filter and this exact filter can be run on one model. The filter is the textbook
predict/update recursion in a ``lax.scan`` (Joseph-form covariance update, Cholesky solves); the
log-likelihood is :math:`\sum_t \log \mathcal{N}(y_t \mid H m_{t|t-1}, H P_{t|t-1} H^\top + R)`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.linalg import cho_solve

from bayeslik.errors import DataError, ModelError

__all__ = ["KalmanResult", "kalman_filter", "kalman_loglik"]

_KEYS = ("m0", "P0", "F", "Q", "H", "R")


class KalmanResult(NamedTuple):
    """Output of :func:`kalman_filter`.

    Attributes:
        log_likelihood: ``()``, :math:`\\log p(y_{0:T-1})`.
        log_likelihood_increments: ``(T,)``, :math:`\\log p(y_t \\mid y_{0:t-1})`.
        filtered_means: ``(T, d)``, :math:`E[x_t \\mid y_{0:t}]`.
        filtered_covs: ``(T, d, d)``, :math:`\\mathrm{Cov}[x_t \\mid y_{0:t}]`.
    """

    log_likelihood: jax.Array
    log_likelihood_increments: jax.Array
    filtered_means: jax.Array
    filtered_covs: jax.Array


def _check(params: dict, ys) -> tuple[dict, jax.Array]:
    missing = [k for k in _KEYS if k not in params]
    if missing:
        raise ModelError(f"params: missing {missing}; a linear Gaussian model needs {list(_KEYS)}")
    p = {k: jnp.asarray(params[k]) for k in _KEYS}
    d = p["m0"].shape[0] if p["m0"].ndim == 1 else -1
    expected = {"m0": (d,), "P0": (d, d), "F": (d, d), "Q": (d, d)}
    for k, shape in expected.items():
        if p[k].shape != shape:
            raise ModelError(f"params['{k}'] must have shape {shape} (d = len(m0) = {d}), "
                             f"got {p[k].shape}")
    if p["H"].ndim != 2 or p["H"].shape[1] != d:
        raise ModelError(f"params['H'] must have shape (p, {d}), got {p['H'].shape}")
    q = p["H"].shape[0]
    if p["R"].shape != (q, q):
        raise ModelError(f"params['R'] must have shape ({q}, {q}), got {p['R'].shape}")
    ys = jnp.asarray(ys)
    if ys.ndim != 2 or ys.shape[1] != q:
        raise DataError(f"ys must have shape (T, {q}) (one observation vector per step), "
                         f"got {ys.shape}")
    return p, ys


def _filter(p: dict, ys: jax.Array) -> KalmanResult:
    d = p["m0"].shape[0]
    eye = jnp.eye(d, dtype=p["P0"].dtype)
    H, R = p["H"], p["R"]

    def update(m, P, y):
        S = H @ P @ H.T + R
        S = 0.5 * (S + S.T)
        chol = jnp.linalg.cholesky(S)
        resid = y - H @ m
        sol = cho_solve((chol, True), resid)
        ll = -0.5 * (resid @ sol) - jnp.sum(jnp.log(jnp.diag(chol))) \
            - 0.5 * y.shape[0] * jnp.log(2 * jnp.pi)
        K = cho_solve((chol, True), H @ P).T  # P H^T S^{-1}
        m_new = m + K @ resid
        A = eye - K @ H
        P_new = A @ P @ A.T + K @ R @ K.T  # Joseph form: stays symmetric positive definite
        return m_new, 0.5 * (P_new + P_new.T), ll

    m0, P0, ll0 = update(p["m0"], p["P0"], ys[0])

    def step(carry, y):
        m, P = carry
        m_pred = p["F"] @ m
        P_pred = p["F"] @ P @ p["F"].T + p["Q"]
        m, P, ll = update(m_pred, P_pred, y)
        return (m, P), (m, P, ll)

    _, (ms, Ps, lls) = lax.scan(step, (m0, P0), ys[1:])
    ms = jnp.concatenate([m0[None], ms])
    Ps = jnp.concatenate([P0[None], Ps])
    lls = jnp.concatenate([ll0[None], lls])
    return KalmanResult(jnp.sum(lls), lls, ms, Ps)


_filter_jit = jax.jit(_filter)


def kalman_filter(params: dict, ys) -> KalmanResult:
    """Exact filtering of a linear Gaussian state-space model (see the module docstring).

    Args:
        params: ``{"m0", "P0", "F", "Q", "H", "R"}`` (shapes in the module docstring).
        ys: ``(T, p)`` observations.

    >>> import numpy as np
    >>> params = {"m0": np.zeros(1), "P0": np.eye(1), "F": 0.9 * np.eye(1), "Q": 0.1 * np.eye(1),
    ...           "H": np.eye(1), "R": np.eye(1)}
    >>> res = kalman_filter(params, np.zeros((5, 1)))
    >>> res.filtered_means.shape, res.filtered_covs.shape
    ((5, 1), (5, 1, 1))
    """
    p, ys = _check(params, ys)
    return _filter_jit(p, ys)


def kalman_loglik(params: dict, ys) -> jax.Array:
    r""":math:`\log p(y_{0:T-1})` of a linear Gaussian model (the ``log_likelihood`` of
    :func:`kalman_filter`); differentiable in ``params``.

    >>> import numpy as np
    >>> params = {"m0": np.zeros(1), "P0": np.eye(1), "F": np.eye(1), "Q": np.eye(1),
    ...           "H": np.eye(1), "R": np.eye(1)}
    >>> float(kalman_loglik(params, np.zeros((1, 1))))   # log N(0 | 0, 2)
    -1.2655...
    """
    return kalman_filter(params, ys).log_likelihood


def _dense_loglik(params: dict, ys) -> float:
    """log p(y) by the joint Gaussian of all observations (float64 NumPy; for tests, small T)."""
    p = {k: np.asarray(params[k], np.float64) for k in _KEYS}
    ys = np.asarray(ys, np.float64)
    T, q = ys.shape
    d = p["m0"].shape[0]
    # Cov(x_s, x_t) for s <= t is P_s F^{t-s}^T, with P_s the marginal covariance of x_s
    means, covs = [p["m0"]], [p["P0"]]
    for _ in range(1, T):
        means.append(p["F"] @ means[-1])
        covs.append(p["F"] @ covs[-1] @ p["F"].T + p["Q"])
    X = np.zeros((T * d, T * d))
    for s in range(T):
        Fp = np.eye(d)
        for t in range(s, T):
            block = covs[s] @ Fp.T
            X[s * d:(s + 1) * d, t * d:(t + 1) * d] = block
            X[t * d:(t + 1) * d, s * d:(s + 1) * d] = block.T
            Fp = p["F"] @ Fp
    Hb = np.kron(np.eye(T), p["H"])
    cov = Hb @ X @ Hb.T + np.kron(np.eye(T), p["R"])
    mean = Hb @ np.concatenate(means)
    resid = ys.reshape(-1) - mean
    sign, logdet = np.linalg.slogdet(cov)
    return float(-0.5 * (resid @ np.linalg.solve(cov, resid) + logdet + T * q * np.log(2 * np.pi)))
