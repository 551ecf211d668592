"""The Kalman filter against the joint Gaussian of all observations (float64, exact)."""

from __future__ import annotations

import numpy as np
import pytest

from bayeslik.filtering import kalman


def _params(rng, d=2, p=2):
    A = rng.normal(size=(d, d))
    F = 0.8 * A / np.max(np.abs(np.linalg.eigvals(A)))
    B = rng.normal(size=(d, d))
    Q = B @ B.T / d + 0.1 * np.eye(d)
    C = rng.normal(size=(p, p))
    return {"m0": rng.normal(size=d), "P0": np.eye(d) * 1.5, "F": F, "Q": Q,
            "H": rng.normal(size=(p, d)), "R": C @ C.T / p + 0.2 * np.eye(p)}


def _dense_filtered_means(params, ys):
    """E[x_t | y_0:t] for every t from the joint Gaussian of (x_0:T-1, y_0:T-1)."""
    p = {k: np.asarray(v, float) for k, v in params.items()}
    T, d = len(ys), len(p["m0"])
    means, covs = [p["m0"]], [p["P0"]]
    for _ in range(1, T):
        means.append(p["F"] @ means[-1])
        covs.append(p["F"] @ covs[-1] @ p["F"].T + p["Q"])
    X = np.zeros((T * d, T * d))
    for s in range(T):
        Fp = np.eye(d)
        for t in range(s, T):
            X[s * d:(s + 1) * d, t * d:(t + 1) * d] = covs[s] @ Fp.T
            X[t * d:(t + 1) * d, s * d:(s + 1) * d] = (covs[s] @ Fp.T).T
            Fp = p["F"] @ Fp
    mx = np.concatenate(means)
    out = []
    for t in range(T):
        Hb = np.kron(np.eye(t + 1), p["H"])
        Sxx = X[: (t + 1) * d, : (t + 1) * d]
        Syy = Hb @ Sxx @ Hb.T + np.kron(np.eye(t + 1), p["R"])
        Sty = X[t * d:(t + 1) * d, : (t + 1) * d] @ Hb.T
        resid = ys[: t + 1].reshape(-1) - Hb @ mx[: (t + 1) * d]
        out.append(mx[t * d:(t + 1) * d] + Sty @ np.linalg.solve(Syy, resid))
    return np.array(out)


def test_kalman_is_exact(x64, rng):
    params = _params(rng)
    ys = rng.normal(size=(7, 2))
    res = kalman.kalman_filter(params, ys)
    assert float(res.log_likelihood) == pytest.approx(kalman._dense_loglik(params, ys), abs=1e-9)
    assert np.allclose(res.filtered_means, _dense_filtered_means(params, ys), atol=1e-9)
    assert res.log_likelihood_increments.shape == (7,)
    assert np.all(np.linalg.eigvalsh(np.asarray(res.filtered_covs)) > 0)


def test_kalman_scalar_observation_of_2d_state(x64, rng):
    params = _params(rng, d=2, p=1)
    ys = rng.normal(size=(5, 1))
    assert float(kalman.kalman_loglik(params, ys)) == pytest.approx(
        kalman._dense_loglik(params, ys), abs=1e-9)


def test_kalman_rejects_bad_shapes(no_jit, rng):
    params = _params(rng)
    with pytest.raises(ValueError, match=r"params\['F'\] must have shape \(2, 2\)"):
        kalman.kalman_filter({**params, "F": np.eye(3)}, np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"ys must have shape \(T, 2\)"):
        kalman.kalman_filter(params, np.zeros(4))
    with pytest.raises(ValueError, match="missing"):
        kalman.kalman_filter({"m0": np.zeros(2)}, np.zeros((4, 2)))
