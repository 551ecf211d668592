r"""The AR-HMM of :mod:`bayeslik.models.arhmm` as a state-space model, for the particle filters
of :mod:`bayeslik.filtering.particle` and particle MCMC (:mod:`bayeslik.engines.pmmh`), and the
online remaining-useful-life (RUL) filter of a C-MAPSS unit built on it.

* :func:`arhmm_ssm` -- the model, with a discrete state ``z_t`` (int32 scalar): the exact
  look-ahead and the optimal proposal, so ``method="auxiliary"`` is the fully adapted filter;
* :func:`arhmm_observations` -- one sequence ``y`` ``(T, D)`` as the filter's ``ys`` (the lags,
  the steps that only condition the autoregression, optional soft labels);
* :func:`online_rul` -- a unit's degradation state filtered cycle by cycle, with its RUL
  distribution at every cycle (:func:`bayeslik.models.cmapss.rul_from_state_probs`).

Example: the posterior of an AR-HMM's parameters by particle MCMC, the states filtered by
particles (against NUTS with the states summed out, see ``tests/engines/test_pmmh.py``):

>>> import bayeslik as bl
>>> from bayeslik.models import arhmm
>>> data = arhmm.simulate(jax.random.key(0), num_steps=80, num_states=2)
>>> post = bl.StateSpacePosterior(lambda: arhmm.prior(2), arhmm_ssm(),
...                               arhmm_observations(data["y"]))
>>> post.num_steps
80
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp, ndtr

from bayeslik.errors import DataError
from bayeslik.filtering.particle import StateSpaceModel, chol_logpdf, particle_filter
from bayeslik.models.cmapss import rul_from_state_probs

__all__ = ["arhmm_ssm", "arhmm_observations", "online_rul"]


# --------------------------------------------------------------------------- the AR-HMM as an SSM
def arhmm_observations(y, num_lags: int = 1, labels=None) -> dict:
    r"""The observations of :func:`arhmm_ssm` for one AR-HMM sequence ``y`` ``(T, D)``:
    ``{"y": (T, D), "lags": (T, L, D), "active": (T,) bool, ["labels": (T, K)]}`` with
    ``lags[t, l] = y[t-1-l]`` (zero before the start) and ``active[t] = t >= L`` (the first ``L``
    observations only condition the autoregression, as in :mod:`bayeslik.models.arhmm`).

    Examples:
        >>> obs = arhmm_observations(np.arange(4.0)[:, None])
        >>> obs["lags"][:, 0, 0].tolist(), obs["active"].tolist()
        ([0.0, 0.0, 1.0, 2.0], [False, True, True, True])
    """
    y = np.asarray(y, np.float32)
    if y.ndim != 2:
        raise DataError(f"y must have shape (T, D), got {y.shape}; for a univariate series use "
                         "y[:, None]")
    T, D = y.shape
    L = int(num_lags)
    lags = np.zeros((T, L, D), np.float32)
    for l in range(L):
        lags[l + 1:, l] = y[: T - 1 - l]
    out = {"y": y, "lags": lags, "active": np.arange(T) >= L}
    if labels is not None:
        labels = np.asarray(labels, np.float32)
        if labels.shape[0] != T:
            raise DataError(f"labels must have shape (T, K) with T = {T}, got {labels.shape}")
        out["labels"] = labels
    return out


def _categorical_icdf(log_p, u):
    p = jnp.exp(log_p - jnp.max(log_p))
    c = jnp.cumsum(p)
    c = c / c[-1]  # exactly 1 from the last positive entry on
    return jnp.minimum(jnp.sum(c <= u), log_p.shape[0] - 1).astype(jnp.int32)


def arhmm_ssm() -> StateSpaceModel:
    r"""The AR-HMM of :mod:`bayeslik.models.arhmm` as a state-space model with a discrete state
    ``z_t`` (int32 scalar), for :func:`arhmm_observations`'s ``ys`` and the ``params`` of
    :func:`bayeslik.models.arhmm.hmm_inputs` (``{"pi", "trans", "b", "A", "sigma"[, "L_omega"]}``).
    Reparametrised (a categorical draw is the inverse CDF at :math:`\Phi(\varepsilon)`), with the
    exact look-ahead :math:`\log \sum_k P_{z,k}\, g_k(y_t)` and the optimal proposal
    :math:`\propto P_{z,k}\, g_k(y_t)`, so ``method="auxiliary"`` is the fully adapted filter.

    >>> from bayeslik.models import arhmm
    >>> data = arhmm.simulate(jax.random.key(0), num_steps=50, num_states=2)
    >>> res = particle_filter(jax.random.key(1), arhmm_ssm(), data["params"],
    ...                       arhmm_observations(data["y"]), 500)
    >>> res.filtered_mean.shape
    (50,)
    """

    def log_g(p, y_t):
        """(K,) log g_k(y_t) for every state."""
        b, A = jnp.asarray(p["b"]), jnp.asarray(p["A"])
        mean = b + jnp.einsum("klij,lj->ki", A, y_t["lags"])  # (K, D)
        if "L_omega" in p:
            chol = jnp.asarray(p["sigma"])[..., :, None] * jnp.asarray(p["L_omega"])
            lg = jax.vmap(lambda m, c: chol_logpdf(y_t["y"], m, c))(mean, chol)
        else:
            s = jnp.asarray(p["sigma"])[:, 0]
            r = (y_t["y"][0] - mean[:, 0]) / s
            lg = -0.5 * r ** 2 - jnp.log(s) - 0.5 * jnp.log(2 * jnp.pi)
        lg = jnp.where(y_t["active"], lg, 0.0)
        if "labels" in y_t:
            lg = lg + jnp.log(y_t["labels"])
        return lg

    def log_trans(p, z):
        return jnp.log(jnp.asarray(p["trans"])[z])

    def init_transform(p, eps):
        return _categorical_icdf(jnp.log(jnp.asarray(p["pi"])), ndtr(eps))

    def transition_transform(p, z, eps, t):
        return _categorical_icdf(log_trans(p, z), ndtr(eps))

    def obs(p, z, y_t, t):
        return log_g(p, y_t)[z]

    def trans_logpdf(p, z_prev, z, t):
        return log_trans(p, z_prev)[z]

    def prop_logits(p, z_prev, y_t):
        return log_trans(p, z_prev) + log_g(p, y_t)

    def prop_transform(p, z_prev, y_t, eps, t):
        return _categorical_icdf(prop_logits(p, z_prev, y_t), ndtr(eps))

    def prop_sample(key, p, z_prev, y_t, t):
        return jax.random.categorical(key, prop_logits(p, z_prev, y_t)).astype(jnp.int32)

    def prop_logpdf(p, z_prev, z, y_t, t):
        return jax.nn.log_softmax(prop_logits(p, z_prev, y_t))[z]

    def lookahead(p, z_prev, y_t, t):
        return logsumexp(prop_logits(p, z_prev, y_t))

    def init_sample(key, p, n):
        return jax.random.categorical(key, jnp.log(jnp.asarray(p["pi"])), shape=(n,)).astype(jnp.int32)

    def trans_sample(key, p, z, t):
        return jax.random.categorical(key, log_trans(p, z)).astype(jnp.int32)

    return StateSpaceModel(init_sample, trans_sample, obs, trans_logpdf, prop_sample, prop_logpdf,
                           lookahead, init_transform, transition_transform, prop_transform, ())


# --------------------------------------------------------------------------- online C-MAPSS RUL
def online_rul(rng_key: jax.Array, params: dict, y, *, num_particles: int = 1000, labels=None,
               final_cycles: int = 15, horizon: int = 400, interval: float = 0.9,
               method: str = "bootstrap") -> dict:
    r"""Filter the degradation state of one C-MAPSS unit cycle by cycle and update its RUL.

    ``params``: left-to-right AR-HMM parameters (``{"pi", "trans", "b", "A", "sigma"}`` as in
    :func:`bayeslik.models.arhmm.hmm_inputs`, e.g. one posterior draw or a point estimate);
    ``y``: ``(T, 1)`` the unit's health indicator for the cycles seen so far; ``labels``: optional
    ``(T, K)`` soft labels (e.g. the "healthy at first" labels of
    :func:`bayeslik.models.cmapss.degradation_data`).

    At every cycle ``t`` the particle filter's state probabilities
    :math:`\hat p(z_t = k \mid y_{0:t})` give the RUL distribution by :func:`bayeslik.models.cmapss.rul_from_state_probs`;
    each cycle costs one filter step (:func:`bayeslik.filtering.particle.filter_step` does the same one cycle at a time).

    Returns ``{"state_probs": (T, K), "rul_pmf": (T, horizon + final_cycles), "rul_median",
    "rul_lower", "rul_upper": (T,) int (central ``interval``), "rul_mean": (T,),
    "log_likelihood": ()}`` (NumPy).

    >>> from bayeslik.models import arhmm
    >>> p = arhmm.default_params(3, left_to_right=True, num_steps=200)
    >>> sim = arhmm.simulate(jax.random.key(0), 150, params=p)
    >>> out = online_rul(jax.random.key(1), p, sim["y"], num_particles=200)
    >>> out["rul_pmf"].shape, out["rul_median"].shape
    ((150, 415), (150,))
    """
    K = int(np.shape(params["trans"])[0])
    ys = arhmm_observations(y, int(np.shape(params["A"])[1]), labels)
    params = {k: jnp.asarray(v) for k, v in params.items()}
    res = particle_filter(rng_key, arhmm_ssm(), params, ys, num_particles, method=method,
                          quantiles=(), keep_history=True)
    w = jnp.exp(res.history_log_weights)  # (T, N)
    probs = jnp.einsum("tn,tnk->tk", w, jax.nn.one_hot(res.history_particles, K, dtype=w.dtype))
    pmf = np.asarray(_rul_jit(probs, params["trans"], final_cycles, horizon))
    cdf = np.cumsum(pmf, axis=1)

    def quant(q):
        return np.argmax(cdf >= q - 1e-9, axis=1)

    return {"state_probs": np.asarray(probs), "rul_pmf": pmf, "rul_median": quant(0.5),
            "rul_lower": quant((1 - interval) / 2), "rul_upper": quant((1 + interval) / 2),
            "rul_mean": (pmf * np.arange(pmf.shape[1])).sum(1),
            "log_likelihood": float(res.log_likelihood)}


@partial(jax.jit, static_argnums=(2, 3))
def _rul_jit(probs, trans, final_cycles, horizon):
    return rul_from_state_probs(probs, trans, final_cycles=final_cycles, horizon=horizon)
