r"""Particle filters (sequential Monte Carlo for state-space models): pure JAX functions.

A state-space model has hidden states :math:`x_0, \dots, x_{T-1}` and observations
:math:`y_0, \dots, y_{T-1}`:

.. math::

    x_0 \sim \mu_\theta(\cdot), \qquad x_t \mid x_{t-1} \sim f_\theta(\cdot \mid x_{t-1}),
    \qquad y_t \mid x_t \sim g_\theta(\cdot \mid x_t).

It is given as a :class:`StateSpaceModel`, a NamedTuple of pure functions with the parameters
``params`` (any pytree) passed explicitly. :func:`particle_filter` runs ``N`` weighted particles
through the sequence (``jax.vmap`` over particles, ``lax.scan`` over time, compiled once per
model and static configuration) and returns a :class:`PFResult`: the log of an unbiased estimate
of the likelihood :math:`p_\theta(y_{0:T-1})`, filtered means and quantiles, the effective
sample size (ESS) per step and, when asked, the whole particle history for ancestral paths.

The filters
-----------
One step ``t >= 1`` with normalised weights :math:`W_{t-1}^i` (Johansen & Doucet's formulation
of the auxiliary particle filter, of which the others are special cases):

1. first-stage weights :math:`V^i \propto W_{t-1}^i \exp \eta(x_{t-1}^i, y_t)`
   (:math:`\eta = 0` unless ``method="auxiliary"``), :math:`c_t = \log \sum_i W_{t-1}^i e^{\eta^i}`;
2. if :math:`\mathrm{ESS}(V) = 1 / \sum_i (V^i)^2 < \text{ess\_threshold} \cdot N`, resample
   ancestors :math:`a^j` with probabilities :math:`V` and set :math:`V = 1/N`; otherwise
   :math:`a^j = j`;
3. propagate :math:`x_t^j \sim q(\cdot \mid x_{t-1}^{a^j}, y_t)` (``f`` for the bootstrap filter,
   the model's proposal for ``"guided"``) and weight
   :math:`w^j = g(y_t \mid x_t^j) f(x_t^j \mid x_{t-1}^{a^j}) / q(x_t^j \mid x_{t-1}^{a^j}, y_t)
   / e^{\eta^{a^j}}`;
4. :math:`\log \hat p(y_t \mid y_{0:t-1}) = c_t + \log \sum_j V^{a^j} w^j` and
   :math:`W_t \propto V^{a^j} w^j`.

Step 0 draws :math:`x_0 \sim \mu` and weights by :math:`g(y_0 \mid x_0)`. The product of the step
estimates is unbiased for the likelihood whatever the resampling scheme and threshold (its log
is biased low by about half its variance). Resampling: ``"multinomial"``, ``"systematic"``
(the default; O(N)), ``"stratified"``, ``"residual"``; all give each particle ``N W^i``
offspring on average.

A particle whose log weight (or look-ahead) is NaN or +inf gets zero weight, as a ``-inf`` does,
but is counted: ``PFResult.num_nonfinite`` per step (a non-zero count means the estimate is for
the model truncated to where its densities are finite). A step where no particle has a finite
weight makes the estimate ``-inf`` (and nothing is counted after it).

Pre-drawn randomness (correlated filters)
-----------------------------------------
A model that also gives its samplers as functions of standard normals (``init_transform_fn``,
``transition_transform_fn``, ``noise_shape``; see :func:`reparametrised_ssm`) can be filtered
with all its randomness passed in as ``u`` (:func:`draw_noise`): the estimate is then a
deterministic function of ``(params, u)``. Particle MCMC (:mod:`bayeslik.engines.pmmh`) moves
``u`` by a Crank-Nicolson step so that the estimates at nearby parameters are correlated
(Deligiannidis, Doucet & Pitt, 2018). With ``u`` the resampling uniforms are
:math:`\Phi(u)` and the particles are sorted by their first coordinate before resampling (the
one-dimensional case of their Hilbert-curve sort), so that a small change of ``u`` moves few
ancestors.

Example
-------
>>> import jax, numpy as np
>>> from bayeslik.filtering import particle, kalman
>>> ssm = particle.linear_gaussian_ssm()
>>> params = {"m0": np.zeros(1), "P0": np.eye(1), "F": 0.9 * np.eye(1), "Q": 0.5 * np.eye(1),
...           "H": np.eye(1), "R": np.eye(1)}
>>> ys = np.random.default_rng(0).normal(size=(50, 1))
>>> res = particle.particle_filter(jax.random.key(0), ssm, params, ys, num_particles=1000)
>>> exact = kalman.kalman_loglik(params, ys)
>>> bool(abs(res.log_likelihood - exact) < 0.5)
True
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.special import logsumexp, ndtr

from bayeslik.errors import DataError, EngineError, ModelError

__all__ = [
    "StateSpaceModel",
    "PFResult",
    "PFState",
    "PFStepInfo",
    "RESAMPLING",
    "reparametrised_ssm",
    "resample",
    "multinomial",
    "systematic",
    "stratified",
    "residual",
    "offspring_counts",
    "ess",
    "draw_noise",
    "particle_filter",
    "filter_init",
    "filter_step",
    "ancestral_paths",
    "linear_gaussian_ssm",
    "stochastic_volatility_ssm",
    "simulate_ssm",
    "METHODS",
    "num_steps",
    "check_filter_options",
    "log_likelihood_fn",
    "chol_logpdf",
]

#: the filters :func:`particle_filter` runs (its ``method``)
METHODS = ("bootstrap", "guided", "auxiliary")


# =========================================================================== the model interface
class StateSpaceModel(NamedTuple):
    r"""A state-space model as pure functions; ``params`` is any pytree, passed explicitly.

    Per-particle functions (the filter vmaps them over particles); ``x`` is one particle's state
    (an array of any fixed shape and dtype), ``y_t`` one step of the observations (a pytree
    slice of ``ys`` along its leading time axis), ``t`` the step index (int32 scalar):

    * ``init_sample_fn(rng_key, params, n) -> (n, *state_shape)``: ``n`` draws of :math:`x_0`
      (the only batched function);
    * ``transition_sample_fn(rng_key, params, x_prev, t) -> x``: :math:`x_t \sim f(\cdot \mid x_{t-1})`;
    * ``observation_logdensity_fn(params, x, y_t, t) -> ()``: :math:`\log g(y_t \mid x_t)`.

    Optional, for other filters:

    * ``transition_logdensity_fn(params, x_prev, x, t)``: :math:`\log f(x \mid x_{t-1})`, and
      ``proposal_sample_fn(rng_key, params, x_prev, y_t, t)`` with
      ``proposal_logdensity_fn(params, x_prev, x, y_t, t)``: :math:`q(x \mid x_{t-1}, y_t)`, for
      ``method="guided"`` (and ``"auxiliary"``, which uses the proposal when there is one);
    * ``lookahead_logdensity_fn(params, x_prev, y_t, t)``: :math:`\eta`, an approximation of
      :math:`\log p(y_t \mid x_{t-1})`, for ``method="auxiliary"`` (exact: "fully adapted");
    * ``init_transform_fn(params, eps)``, ``transition_transform_fn(params, x_prev, eps, t)``
      (and ``proposal_transform_fn(params, x_prev, y_t, eps, t)``) with ``noise_shape``: the
      samplers as maps of ``eps ~ N(0, I)`` of shape ``noise_shape``, for pre-drawn noise ``u``
      (correlated particle MCMC). When present, the filter also uses them with its own key: one
      vectorised normal draw per step instead of a key per particle.
    """

    init_sample_fn: Callable
    transition_sample_fn: Callable
    observation_logdensity_fn: Callable
    transition_logdensity_fn: Callable | None = None
    proposal_sample_fn: Callable | None = None
    proposal_logdensity_fn: Callable | None = None
    lookahead_logdensity_fn: Callable | None = None
    init_transform_fn: Callable | None = None
    transition_transform_fn: Callable | None = None
    proposal_transform_fn: Callable | None = None
    noise_shape: tuple | None = None

    @property
    def reparametrised(self) -> bool:
        """Whether the samplers are also given as maps of standard normals (``u`` is possible)."""
        return (self.init_transform_fn is not None and self.transition_transform_fn is not None
                and self.noise_shape is not None)


def reparametrised_ssm(init_transform_fn: Callable, transition_transform_fn: Callable,
                       observation_logdensity_fn: Callable, noise_shape: tuple = (),
                       **optional: Any) -> StateSpaceModel:
    r"""A :class:`StateSpaceModel` from samplers written as maps of standard normal noise.

    ``init_transform_fn(params, eps) -> x_0`` and ``transition_transform_fn(params, x_prev, eps,
    t) -> x_t`` with ``eps ~ N(0, I)`` of shape ``noise_shape``; the key-based samplers are
    derived from them. ``optional``: the other fields of :class:`StateSpaceModel`.

    >>> ssm = reparametrised_ssm(lambda p, e: e, lambda p, x, e, t: 0.9 * x + e,
    ...                          lambda p, x, y, t: -0.5 * (y - x) ** 2)
    >>> ssm.reparametrised
    True
    """
    shape = tuple(int(s) for s in noise_shape)

    def init_sample_fn(rng_key, params, n):
        eps = jax.random.normal(rng_key, (n,) + shape)
        return jax.vmap(lambda e: init_transform_fn(params, e))(eps)

    def transition_sample_fn(rng_key, params, x_prev, t):
        return transition_transform_fn(params, x_prev, jax.random.normal(rng_key, shape), t)

    return StateSpaceModel(init_sample_fn, transition_sample_fn, observation_logdensity_fn,
                           init_transform_fn=init_transform_fn,
                           transition_transform_fn=transition_transform_fn,
                           noise_shape=shape, **optional)


# =========================================================================== resampling
# one implementation for every engine: bayeslik.weights (re-exported here by name)
from bayeslik.weights import (  # noqa: E402
    RESAMPLING, ess, multinomial, offspring_counts, residual, resample, stratified, systematic,
)
from bayeslik.weights import RESAMPLERS as _RESAMPLERS  # noqa: E402
from bayeslik.weights import check_resampling as _check_resampling  # noqa: E402


# =========================================================================== the filter
class PFState(NamedTuple):
    """The filter's state after a step: particles ``(N, *state_shape)``, normalised log weights
    ``(N,)``, the running log-likelihood estimate ``()``."""

    particles: jax.Array
    log_weights: jax.Array
    log_likelihood: jax.Array


class PFStepInfo(NamedTuple):
    """What one step reports: ``log_likelihood_increment`` (log p-hat(y_t | y_{0:t-1})), ``ess``
    of the new weights, ``resampled`` (bool), ``ancestors`` ``(N,)`` and ``num_nonfinite``
    (int32): how many of the step's per-particle log densities were NaN or +inf and so got
    zero weight (see :class:`PFResult`)."""

    log_likelihood_increment: jax.Array
    ess: jax.Array
    resampled: jax.Array
    ancestors: jax.Array
    num_nonfinite: jax.Array = None


class PFResult(NamedTuple):
    """Output of :func:`particle_filter`.

    Attributes:
        log_likelihood: ``()``, log of the unbiased likelihood estimate (``-inf`` when every
            particle had zero weight at some step).
        log_likelihood_increments: ``(T,)``, log p-hat(y_t | y_{0:t-1}).
        ess: ``(T,)``, effective sample size of the filtering weights at each step.
        resampled: ``(T,)`` bool, whether step ``t`` began by resampling (``resampled[0]`` is False).
        filtered_mean: ``(T, *state_shape)``, the weighted mean of the particles.
        filtered_quantiles: ``(Q, T, *state_shape)`` weighted quantiles at ``quantiles``
            (coordinate-wise), or None when ``quantiles=()``.
        particles, log_weights: the final ``(N, *state_shape)`` particles and normalised
            ``(N,)`` log weights.
        history_particles, history_log_weights, history_ancestors: ``(T, N, ...)``, ``(T, N)``,
            ``(T, N)`` (``ancestors[t, j]`` indexes step ``t-1``; ``ancestors[0] = arange``),
            only with ``keep_history=True`` (else None); see :func:`ancestral_paths`.
        num_nonfinite: ``(T,)`` int32, per step, the particles' log densities that were NaN or
            +inf: the incremental log weight of each particle (``log g(y_t | x_t)``; with a
            proposal ``log g + log f - log q``) and, with ``method="auxiliary"``, the
            look-ahead ``eta`` of each particle (so up to ``2 N`` per step). The filter
            gives them zero weight (as it does a ``-inf``, a legitimate zero density, which is
            not counted), so a non-zero count means the estimate is for the model truncated to
            where its densities are finite; when every particle is non-finite at a step, that
            step's estimate, and ``log_likelihood``, is ``-inf``. Counted only while the
            running estimate is finite: after a step whose estimate is ``-inf`` (it stays
            ``-inf``) the later steps count 0.
        num_nonfinite_total: ``()`` int32, their sum over the steps.
    """

    log_likelihood: jax.Array
    log_likelihood_increments: jax.Array
    ess: jax.Array
    resampled: jax.Array
    filtered_mean: jax.Array
    filtered_quantiles: jax.Array | None
    particles: jax.Array
    log_weights: jax.Array
    history_particles: jax.Array | None = None
    history_log_weights: jax.Array | None = None
    history_ancestors: jax.Array | None = None
    num_nonfinite: jax.Array | None = None
    num_nonfinite_total: jax.Array | None = None


class _Static(NamedTuple):
    model: StateSpaceModel
    num_particles: int
    method: str
    resampling: str
    use_noise: bool  # the transforms of standard normals are used (with u or with keys)
    sort: bool  # sort particles before resampling (pre-drawn u)


def _nonfinite(x):
    """Where a log density is NaN or +inf (a value no weight can be made of; -inf is a zero
    density): the mask kit.nonfinite_mask gives, here without importing the engines."""
    return jnp.isnan(x) | (x == jnp.inf)


def _count(x):
    return jnp.sum(_nonfinite(x), dtype=jnp.int32)


def _normalise(lw):
    """(normalised log weights, log normaliser); NaN and +inf weights are zero weights (as
    -inf); all zero -> uniform weights and a log normaliser of -inf."""
    lw = jnp.where(_nonfinite(lw), -jnp.inf, lw)
    c = logsumexp(lw)
    ok = jnp.isfinite(c)
    n = lw.shape[0]
    return jnp.where(ok, lw - jnp.where(ok, c, 0.0), -jnp.log(n)), jnp.where(ok, c, -jnp.inf)


def _sort_key(x):
    flat = jnp.reshape(x, (x.shape[0], -1))
    return flat[:, 0].astype(jnp.float32) if flat.shape[1] else jnp.zeros(x.shape[0])


def _init(st: _Static, params, y0, noise):
    """noise: a key (key mode) or eps (N, *noise_shape) (u mode)."""
    m, n = st.model, st.num_particles
    if st.use_noise:
        eps = noise if not _is_key(noise) else jax.random.normal(noise, (n,) + m.noise_shape)
        x = jax.vmap(lambda e: m.init_transform_fn(params, e))(eps)
    else:
        x = m.init_sample_fn(noise, params, n)
    t0 = jnp.zeros((), jnp.int32)
    inc = jax.vmap(lambda xi: m.observation_logdensity_fn(params, xi, y0, t0))(x)
    lw, c = _normalise(inc)
    ll = c - jnp.log(n)
    info = PFStepInfo(ll, jnp.exp(-logsumexp(2 * lw)), jnp.zeros((), bool),
                      jnp.arange(n, dtype=jnp.int32), _count(inc))
    return PFState(x, lw, ll), info


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _step(st: _Static, params, state: PFState, y_t, t, noise, ess_threshold):
    """noise: a key, or (eps (N, *noise_shape), z_resampling (N,)) standard normals."""
    m, n = st.model, st.num_particles
    x, lw_prev = state.particles, state.log_weights
    if _is_key(noise):
        k_res, k_prop = jax.random.split(noise)
        # systematic resampling needs one uniform, the other schemes one per particle
        num_u = 1 if st.resampling == "systematic" else n
        uniforms = jax.random.uniform(k_res, (num_u,), dtype=lw_prev.dtype)
        eps = jax.random.normal(k_prop, (n,) + m.noise_shape) if st.use_noise else None
        keys = None if st.use_noise else jax.random.split(k_prop, n)
    else:
        eps, z = noise
        uniforms = jnp.clip(ndtr(z), 0.0, 1.0 - 1e-7).astype(lw_prev.dtype)
        keys = None
    auxiliary = st.method == "auxiliary"
    # counted only while the estimate is finite: after a step whose estimate is -inf it stays
    # -inf whatever follows, and a guided or auxiliary proposal from particles that all had
    # zero weight can make NaN weights of its own (-inf - -inf) where the model is just zero
    live = jnp.isfinite(state.log_likelihood)
    if auxiliary:
        eta = jax.vmap(lambda xi: m.lookahead_logdensity_fn(params, xi, y_t, t))(x)
        num_bad = jnp.where(live, _count(eta), 0)
        eta = jnp.where(_nonfinite(eta), -jnp.inf, eta)
        lv, c = _normalise(lw_prev + eta)
    else:
        eta, lv, c = None, lw_prev, jnp.zeros((), lw_prev.dtype)
        num_bad = jnp.zeros((), jnp.int32)
    ess_v = jnp.exp(-logsumexp(2 * lv))
    do = (ess_v < ess_threshold * n) | (ess_threshold >= 1.0)
    resampler = _RESAMPLERS[st.resampling]
    if st.sort:
        order = jnp.argsort(_sort_key(x))
        idx = order[resampler(uniforms, jnp.exp(lv[order]), n)]
    else:
        idx = resampler(uniforms, jnp.exp(lv), n)
    anc = jnp.where(do, idx, jnp.arange(n, dtype=jnp.int32))
    lv = jnp.where(do, -jnp.log(n).astype(lv.dtype), lv)
    x_anc = x[anc]

    guided = st.method == "guided" or (auxiliary and m.proposal_sample_fn is not None)
    if guided:
        if eps is not None:
            x_new = jax.vmap(lambda xp, e: m.proposal_transform_fn(params, xp, y_t, e, t))(x_anc, eps)
        else:
            x_new = jax.vmap(lambda k, xp: m.proposal_sample_fn(k, params, xp, y_t, t))(keys, x_anc)

        def weight(xp, xn):
            return (m.observation_logdensity_fn(params, xn, y_t, t)
                    + m.transition_logdensity_fn(params, xp, xn, t)
                    - m.proposal_logdensity_fn(params, xp, xn, y_t, t))

        inc = jax.vmap(weight)(x_anc, x_new)
    else:
        if eps is not None:
            x_new = jax.vmap(lambda xp, e: m.transition_transform_fn(params, xp, e, t))(x_anc, eps)
        else:
            x_new = jax.vmap(lambda k, xp: m.transition_sample_fn(k, params, xp, t))(keys, x_anc)
        inc = jax.vmap(lambda xn: m.observation_logdensity_fn(params, xn, y_t, t))(x_new)
    # the model's densities, counted before the look-ahead is divided out: an ancestor with
    # eta = -inf is drawn only when every first-stage weight is zero (c = -inf: not counted)
    num_bad = num_bad + jnp.where(live & jnp.isfinite(c), _count(inc), 0)
    if auxiliary:
        inc = jnp.where(_nonfinite(inc), -jnp.inf, inc) - eta[anc]
    lw, c2 = _normalise(lv + inc)
    ll_t = c + c2
    info = PFStepInfo(ll_t, jnp.exp(-logsumexp(2 * lw)), do, anc, num_bad)
    return PFState(x_new, lw, state.log_likelihood + ll_t), info


def _weighted_summary(x, lw, quantiles):
    w = jnp.exp(lw)
    xf = jnp.reshape(x, (x.shape[0], -1)).astype(w.dtype)
    mean = (w @ xf).reshape(x.shape[1:])
    if not quantiles:
        return mean, None
    q = jnp.asarray(quantiles, w.dtype)

    def one(col):
        order = jnp.argsort(col)
        cw = jnp.cumsum(w[order])
        pos = jnp.clip(jnp.searchsorted(cw, q * cw[-1], side="left"), 0, col.shape[0] - 1)
        return col[order][pos]

    qs = jax.vmap(one, in_axes=1, out_axes=1)(xf)  # (Q, m)
    return mean, qs.reshape((len(quantiles),) + x.shape[1:])


def _tree_index(ys, t):
    return jax.tree.map(lambda a: a[t], ys)


@partial(jax.jit, static_argnames=("st", "quantiles", "keep_history"))
def _run(st: _Static, params, ys, noise, ess_threshold, *, quantiles, keep_history):
    """noise: a key, or {"init", "transition", "resampling"} normals."""
    T = jax.tree.leaves(ys)[0].shape[0]
    if _is_key(noise):
        keys = jax.random.split(noise, T)
        n0, steps = keys[0], keys[1:]
    else:
        n0, steps = noise["init"], (noise["transition"], noise["resampling"])
    state, info0 = _init(st, params, _tree_index(ys, 0), n0)
    rest = jax.tree.map(lambda a: a[1:], ys)

    def body(state, inp):
        y_t, t, nz = inp
        state, info = _step(st, params, state, y_t, t, nz, ess_threshold)
        mean, qs = _weighted_summary(state.particles, state.log_weights, quantiles)
        hist = (state.particles, state.log_weights) if keep_history else None
        return state, (info, mean, qs, hist)

    mean0, qs0 = _weighted_summary(state.particles, state.log_weights, quantiles)
    hist0 = (state.particles, state.log_weights) if keep_history else None
    final, (infos, means, qss, hists) = lax.scan(
        body, state, (rest, jnp.arange(1, T, dtype=jnp.int32), steps))

    def cat(first, others):
        return jnp.concatenate([first[None], others], axis=0)

    incs = cat(info0.log_likelihood_increment, infos.log_likelihood_increment)
    num_bad = cat(info0.num_nonfinite, infos.num_nonfinite)
    out = PFResult(
        log_likelihood=final.log_likelihood,
        log_likelihood_increments=incs,
        ess=cat(info0.ess, infos.ess),
        resampled=cat(info0.resampled, infos.resampled),
        filtered_mean=cat(mean0, means),
        filtered_quantiles=None if qs0 is None else jnp.moveaxis(cat(qs0, qss), 0, 1),
        particles=final.particles,
        log_weights=final.log_weights,
        num_nonfinite=num_bad,
        num_nonfinite_total=jnp.sum(num_bad, dtype=jnp.int32),
    )
    if keep_history:
        out = out._replace(
            history_particles=cat(hist0[0], hists[0]),
            history_log_weights=cat(hist0[1], hists[1]),
            history_ancestors=cat(info0.ancestors, infos.ancestors),
        )
    return out


def num_steps(ys: Any) -> int:
    """The number of time steps ``T`` of the observations ``ys`` (an array or a pytree of
    arrays sharing a leading time axis); raises :class:`~bayeslik.errors.DataError` when ``ys``
    is empty, has no time axis, leaves of different lengths, or ``T = 0``.

    >>> num_steps({"y": np.zeros((7, 2)), "mask": np.ones(7, bool)})
    7
    """
    leaves = jax.tree.leaves(ys)
    if not leaves:
        raise DataError("ys is empty: pass the observations as an array (or pytree of arrays) "
                        "with a leading time axis")
    lengths = {int(np.shape(a)[0]) if np.ndim(a) else -1 for a in leaves}
    if len(lengths) != 1 or -1 in lengths:
        raise DataError(f"every array in ys must have the same leading time axis, got leading "
                        f"lengths {sorted(lengths)}")
    T = lengths.pop()
    if T < 1:
        raise DataError("ys has no time steps (T = 0)")
    return T


def check_filter_options(model: StateSpaceModel, num_particles: int, method: str = "bootstrap",
                         resampling: str = "systematic", ess_threshold: float = 0.5,
                         quantiles: tuple = (), *, correlated: bool = False) -> None:
    """Check a filter's options against ``model`` before anything is compiled: raises
    :class:`~bayeslik.errors.EngineError` for a bad option (``num_particles``, ``method``,
    ``resampling``, ``ess_threshold``, ``quantiles``) and
    :class:`~bayeslik.errors.ModelError` when the model lacks what the method needs (a
    proposal, a look-ahead; with ``correlated=True``, its samplers as maps of standard
    normals for pre-drawn noise ``u``). :func:`particle_filter` calls it; so do the engines
    that run the filter (:mod:`bayeslik.engines.pmmh`).

    >>> check_filter_options(stochastic_volatility_ssm(), 100, "guided")
    Traceback (most recent call last):
    ...
    bayeslik.errors.ModelError: method='guided' needs the model's proposal_sample_fn, proposal_logdensity_fn and transition_logdensity_fn
    """
    if not isinstance(model, StateSpaceModel):
        raise ModelError(f"model must be a StateSpaceModel, got {type(model).__name__}")
    if not isinstance(num_particles, (int, np.integer)) or isinstance(num_particles, bool) \
            or num_particles < 1:
        raise EngineError(f"num_particles must be a positive int, got {num_particles!r}")
    if method not in METHODS:
        raise EngineError(f"method must be one of {METHODS}, got {method!r}")
    try:
        _check_resampling(resampling)
    except ValueError as e:
        raise EngineError(str(e)) from None
    if not 0.0 <= float(ess_threshold) <= 1.0:
        raise EngineError(f"ess_threshold must be in [0, 1] (0: never resample, 1: always), got "
                          f"{ess_threshold!r}")
    if method == "guided" and (model.proposal_sample_fn is None or model.proposal_logdensity_fn
                               is None or model.transition_logdensity_fn is None):
        raise ModelError("method='guided' needs the model's proposal_sample_fn, "
                         "proposal_logdensity_fn and transition_logdensity_fn")
    if method == "auxiliary":
        if model.lookahead_logdensity_fn is None:
            raise ModelError("method='auxiliary' needs the model's lookahead_logdensity_fn")
        if model.proposal_sample_fn is not None and (model.proposal_logdensity_fn is None or
                                                     model.transition_logdensity_fn is None):
            raise ModelError("method='auxiliary' with a proposal also needs "
                             "proposal_logdensity_fn and transition_logdensity_fn")
    for q in quantiles:
        if not 0.0 <= float(q) <= 1.0:
            raise EngineError(f"quantiles must lie in [0, 1], got {quantiles!r}")
    if correlated:
        _static(model, num_particles, method, resampling, True)


def _static(model, num_particles, method, resampling, with_u) -> _Static:
    guided = method == "guided" or (method == "auxiliary" and model.proposal_sample_fn is not None)
    can_noise = model.reparametrised and (not guided or model.proposal_transform_fn is not None)
    if with_u and not can_noise:
        raise ModelError(
            "u (pre-drawn noise) needs the model's samplers as maps of standard normals: "
            "init_transform_fn, transition_transform_fn and noise_shape"
            + (" and proposal_transform_fn" if guided else "") + " (see reparametrised_ssm)")
    return _Static(model, int(num_particles), method, resampling, bool(can_noise), bool(with_u))


def log_likelihood_fn(model: StateSpaceModel, num_particles: int, *, method: str = "bootstrap",
                      resampling: str = "systematic", ess_threshold: float = 0.5,
                      correlated: bool = False, count_nonfinite: bool = False) -> Callable:
    r"""The filter's log-likelihood estimate as a pure function ``fn(params, ys, noise) -> ()``,
    :math:`\log \hat p_\theta(y_{0:T-1})`, for code that jits, vmaps or scans it (particle
    MCMC). ``noise`` is a ``jax.random`` key or, with ``correlated=True``, the dict of standard
    normals :func:`draw_noise` returns (then the estimate is a deterministic function of
    ``(params, noise)``). NaN estimates become ``-inf``. With ``count_nonfinite=True`` it
    returns ``(estimate, num_nonfinite)``: also the number of the particles' log densities
    that were NaN or +inf (``PFResult.num_nonfinite_total``; they got zero weight). The options
    are checked here (:func:`check_filter_options`); nothing else is (no shape checks of ``ys``
    or ``noise``).

    >>> fn = log_likelihood_fn(stochastic_volatility_ssm(), 100, correlated=True)
    >>> u = draw_noise(jax.random.key(0), stochastic_volatility_ssm(), 20, 100)
    >>> p = {"mu": -1.0, "phi": 0.9, "sigma": 0.3}
    >>> bool(fn(p, jnp.zeros(20), u) == fn(p, jnp.zeros(20), u))
    True
    >>> counted = log_likelihood_fn(stochastic_volatility_ssm(), 100, correlated=True,
    ...                             count_nonfinite=True)
    >>> ll, num_nonfinite = counted(p, jnp.zeros(20), u)
    >>> bool(ll == fn(p, jnp.zeros(20), u)), int(num_nonfinite)
    (True, 0)
    """
    check_filter_options(model, num_particles, method, resampling, ess_threshold,
                         correlated=correlated)
    st = _static(model, num_particles, method, resampling, bool(correlated))
    threshold = jnp.float32(ess_threshold)

    def log_likelihood(params, ys, noise):
        res = _run(st, params, ys, noise, threshold, quantiles=(), keep_history=False)
        ll = jnp.where(jnp.isnan(res.log_likelihood), -jnp.inf, res.log_likelihood)
        return (ll, res.num_nonfinite_total) if count_nonfinite else ll

    return log_likelihood


def draw_noise(rng_key: jax.Array, model: StateSpaceModel, num_steps: int,
               num_particles: int) -> dict:
    """All the randomness of one filter run as standard normals, for ``particle_filter(u=...)``:
    ``{"init": (N, *noise_shape), "transition": (T-1, N, *noise_shape), "resampling": (T-1, N)}``.

    >>> ssm = stochastic_volatility_ssm()
    >>> u = draw_noise(jax.random.key(0), ssm, num_steps=10, num_particles=4)
    >>> {k: v.shape for k, v in u.items()}
    {'init': (4,), 'transition': (9, 4), 'resampling': (9, 4)}
    """
    if model.noise_shape is None:
        raise ModelError("the model has no noise_shape: it cannot take pre-drawn noise "
                         "(see reparametrised_ssm)")
    T, n, s = int(num_steps), int(num_particles), tuple(model.noise_shape)
    k1, k2, k3 = jax.random.split(rng_key, 3)
    return {"init": jax.random.normal(k1, (n,) + s),
            "transition": jax.random.normal(k2, (T - 1, n) + s),
            "resampling": jax.random.normal(k3, (T - 1, n))}


def _check_u(u, model, T, n):
    if not isinstance(u, dict) or set(u) != {"init", "transition", "resampling"}:
        raise EngineError("u must be the dict draw_noise returns, with keys 'init', 'transition', "
                         "'resampling'")
    s = tuple(model.noise_shape)
    expected = {"init": (n,) + s, "transition": (T - 1, n) + s, "resampling": (T - 1, n)}
    for k, shape in expected.items():
        if tuple(np.shape(u[k])) != shape:
            raise EngineError(f"u['{k}'] must have shape {shape} (T = {T}, num_particles = {n}), "
                             f"got {tuple(np.shape(u[k]))}; draw it with draw_noise")


def particle_filter(rng_key: jax.Array | None, model: StateSpaceModel, params: Any, ys: Any,
                    num_particles: int, *, method: str = "bootstrap",
                    resampling: str = "systematic", ess_threshold: float = 0.5,
                    quantiles: tuple = (0.05, 0.5, 0.95), keep_history: bool = False,
                    u: dict | None = None) -> PFResult:
    r"""Run a particle filter over ``ys`` and return a :class:`PFResult`.

    Args:
        rng_key: a ``jax.random`` key (ignored, may be None, when ``u`` is given).
        model: a :class:`StateSpaceModel`.
        params: the model's parameters (any pytree; traced, so new values compile nothing).
        ys: observations, an array or a pytree of arrays with a leading time axis ``T``.
        num_particles: ``N``.
        method: ``"bootstrap"`` (propose from the transition), ``"guided"`` (the model's
            proposal) or ``"auxiliary"`` (look-ahead first-stage weights; the model's proposal
            when it has one, e.g. the fully adapted filter).
        resampling: ``"systematic"``, ``"multinomial"``, ``"stratified"`` or ``"residual"``.
        ess_threshold: resample when ESS < ``ess_threshold * N`` (0: never, 1: every step).
        quantiles: levels of the filtered quantiles (``()``: none; saves a sort per step).
        keep_history: keep every step's particles, weights and ancestors (memory ``T x N``).
        u: pre-drawn standard normals from :func:`draw_noise` (reparametrised models only): the
            result is then a deterministic function of ``(params, u)``.

    Compiled once per (model, N, method, resampling, quantiles, keep_history, whether ``u``)
    and shapes; ``params``, ``ys`` values and ``ess_threshold`` are traced.

    Example: see the module docstring.
    """
    check_filter_options(model, num_particles, method, resampling, ess_threshold, quantiles)
    T = num_steps(ys)
    st = _static(model, num_particles, method, resampling, u is not None)
    if u is not None:
        _check_u(u, model, T, int(num_particles))
        noise = {k: jnp.asarray(v) for k, v in u.items()}
    else:
        if not _is_key(rng_key):
            raise EngineError("rng_key must be a jax.random.key (new-style typed key), got "
                              f"{type(rng_key).__name__}; use jax.random.key(seed)")
        noise = rng_key
    ys = jax.tree.map(jnp.asarray, ys)
    return _run(st, params, ys, noise, jnp.asarray(ess_threshold, jnp.float32),
                quantiles=tuple(float(q) for q in quantiles), keep_history=bool(keep_history))


# --------------------------------------------------------------------------- online (step by step)
@partial(jax.jit, static_argnames=("st",))
def _init_jit(st, params, y0, key):
    return _init(st, params, y0, key)


@partial(jax.jit, static_argnames=("st",))
def _step_jit(st, params, state, y_t, t, key, ess_threshold):
    return _step(st, params, state, y_t, t, key, ess_threshold)


def filter_init(rng_key: jax.Array, model: StateSpaceModel, params: Any, y0: Any,
                num_particles: int, *, method: str = "bootstrap",
                resampling: str = "systematic") -> tuple[PFState, PFStepInfo]:
    """The filter after the first observation ``y0`` (online use; see :func:`filter_step`).

    With ``keys = jax.random.split(key, T)``, ``filter_init(keys[0], ...)`` followed by
    ``filter_step(keys[t], ..., t=t)`` reproduces ``particle_filter(key, ...)`` exactly.

    >>> ssm = stochastic_volatility_ssm()
    >>> p = {"mu": -1.0, "phi": 0.9, "sigma": 0.3}
    >>> state, info = filter_init(jax.random.key(0), ssm, p, jnp.array(0.1), 100)
    >>> state, info = filter_step(jax.random.key(1), ssm, p, state, jnp.array(-0.4), 1)
    >>> state.particles.shape
    (100,)
    """
    check_filter_options(model, num_particles, method, resampling, 0.5)
    st = _static(model, num_particles, method, resampling, False)
    return _init_jit(st, params, jax.tree.map(jnp.asarray, y0), rng_key)


def filter_step(rng_key: jax.Array, model: StateSpaceModel, params: Any, state: PFState,
                y_t: Any, t: int, *, method: str = "bootstrap", resampling: str = "systematic",
                ess_threshold: float = 0.5) -> tuple[PFState, PFStepInfo]:
    """One step of the filter with the new observation ``y_t`` at step ``t >= 1``."""
    n = int(np.shape(state.log_weights)[0])
    check_filter_options(model, n, method, resampling, ess_threshold)
    st = _static(model, n, method, resampling, False)
    return _step_jit(st, params, state, jax.tree.map(jnp.asarray, y_t), jnp.int32(t), rng_key,
                     jnp.asarray(ess_threshold, jnp.float32))


def ancestral_paths(result: PFResult, indices: jax.Array | None = None) -> jax.Array:
    r"""The ancestral paths ``(M, T, *state_shape)`` of the final particles ``indices``
    (default: all ``N``), traced back through ``history_ancestors``. Drawing ``indices`` with
    probabilities ``exp(result.log_weights)`` samples the filter's (genealogy) approximation of
    :math:`p(x_{0:T-1} \mid y_{0:T-1})`.

    >>> res = particle_filter(jax.random.key(0), stochastic_volatility_ssm(),
    ...                       {"mu": -1.0, "phi": 0.9, "sigma": 0.3}, jnp.zeros(20), 50,
    ...                       keep_history=True)
    >>> ancestral_paths(res, jnp.array([0, 1])).shape
    (2, 20)
    """
    if result.history_ancestors is None:
        raise EngineError("ancestral_paths needs particle_filter(..., keep_history=True)")
    N = result.history_ancestors.shape[1]
    idx = jnp.arange(N) if indices is None else jnp.asarray(indices, jnp.int32)

    def back(i, inp):
        parts, anc = inp
        return anc[i], parts[i]

    _, path = lax.scan(back, idx, (result.history_particles, result.history_ancestors),
                       reverse=True)
    return jnp.moveaxis(path, 0, 1)


# =========================================================================== example models
def _mvn_logpdf(x, mean, cov):
    return chol_logpdf(x, mean, jnp.linalg.cholesky(cov))


def linear_gaussian_ssm(dim: int = 1) -> StateSpaceModel:
    r"""The linear Gaussian model of :mod:`bayeslik.filtering.kalman` (the same ``params`` dict
    ``{"m0", "P0", "F", "Q", "H", "R"}``), reparametrised, with the locally optimal proposal
    :math:`p(x_t \mid x_{t-1}, y_t)` (``method="guided"``) and the exact look-ahead
    :math:`\log p(y_t \mid x_{t-1}) = \log \mathcal{N}(y_t \mid HFx_{t-1}, HQH^\top + R)`
    (``method="auxiliary"``: the fully adapted filter). States are ``(dim,)`` vectors
    (``dim`` = the length of ``m0``; it fixes ``noise_shape``).

    >>> linear_gaussian_ssm(2).noise_shape
    (2,)
    """

    def init_transform(p, eps):
        return p["m0"] + jnp.linalg.cholesky(p["P0"]) @ eps

    def transition_transform(p, x, eps, t):
        return p["F"] @ x + jnp.linalg.cholesky(p["Q"]) @ eps

    def obs(p, x, y, t):
        return _mvn_logpdf(y, p["H"] @ x, p["R"])

    def trans_logpdf(p, x_prev, x, t):
        return _mvn_logpdf(x, p["F"] @ x_prev, p["Q"])

    def _opt(p, x_prev, y):
        Qi = jnp.linalg.inv(p["Q"])
        HRi = p["H"].T @ jnp.linalg.inv(p["R"])
        cov = jnp.linalg.inv(Qi + HRi @ p["H"])
        cov = 0.5 * (cov + cov.T)
        return cov @ (Qi @ (p["F"] @ x_prev) + HRi @ y), cov

    def prop_transform(p, x_prev, y, eps, t):
        mean, cov = _opt(p, x_prev, y)
        return mean + jnp.linalg.cholesky(cov) @ eps

    def prop_sample(key, p, x_prev, y, t):
        return prop_transform(p, x_prev, y, jax.random.normal(key, x_prev.shape), t)

    def prop_logpdf(p, x_prev, x, y, t):
        mean, cov = _opt(p, x_prev, y)
        return _mvn_logpdf(x, mean, cov)

    def lookahead(p, x_prev, y, t):
        H = p["H"]
        return _mvn_logpdf(y, H @ p["F"] @ x_prev, H @ p["Q"] @ H.T + p["R"])

    def init_sample(key, p, n):
        eps = jax.random.normal(key, (n,) + jnp.shape(p["m0"]))
        return jax.vmap(lambda e: init_transform(p, e))(eps)

    def trans_sample(key, p, x, t):
        return transition_transform(p, x, jax.random.normal(key, x.shape), t)

    return StateSpaceModel(init_sample, trans_sample, obs, trans_logpdf, prop_sample, prop_logpdf,
                           lookahead, init_transform, transition_transform, prop_transform,
                           (int(dim),))


def stochastic_volatility_ssm() -> StateSpaceModel:
    r"""The stochastic volatility model (scalar state), reparametrised:

    .. math::

        x_0 \sim \mathcal{N}\big(\mu, \sigma^2 / (1 - \phi^2)\big), \quad
        x_t = \mu + \phi (x_{t-1} - \mu) + \sigma \varepsilon_t, \quad
        y_t \sim \mathcal{N}(0, e^{x_t}).

    ``params = {"mu", "phi", "sigma"}`` (scalars, ``|phi| < 1``). No exact likelihood exists.

    >>> ssm = stochastic_volatility_ssm()
    >>> ssm.noise_shape
    ()
    """

    def init_transform(p, eps):
        return p["mu"] + p["sigma"] / jnp.sqrt(1 - p["phi"] ** 2) * eps

    def transition_transform(p, x, eps, t):
        return p["mu"] + p["phi"] * (x - p["mu"]) + p["sigma"] * eps

    def obs(p, x, y, t):
        return -0.5 * (jnp.log(2 * jnp.pi) + x + y ** 2 * jnp.exp(-x))

    return reparametrised_ssm(init_transform, transition_transform, obs, ())


def simulate_ssm(rng_key: jax.Array, model: StateSpaceModel, params: Any, num_steps: int,
                 observation_sample_fn: Callable) -> tuple[jax.Array, jax.Array]:
    """``(xs (T, ...), ys (T, ...))`` simulated from a model; ``observation_sample_fn(rng_key,
    params, x, t) -> y``.

    >>> ssm = stochastic_volatility_ssm()
    >>> obs = lambda k, p, x, t: jnp.exp(x / 2) * jax.random.normal(k)
    >>> xs, ys = simulate_ssm(jax.random.key(0), ssm, {"mu": -1.0, "phi": 0.9, "sigma": 0.3},
    ...                       100, obs)
    >>> xs.shape, ys.shape
    ((100,), (100,))
    """
    k0, kx, ky = jax.random.split(rng_key, 3)
    x0 = model.init_sample_fn(k0, params, 1)[0]

    def step(x, inp):
        t, k = inp
        x = model.transition_sample_fn(k, params, x, t)
        return x, x

    _, xs = lax.scan(step, x0, (jnp.arange(1, num_steps, dtype=jnp.int32),
                                jax.random.split(kx, num_steps - 1)))
    xs = jnp.concatenate([x0[None], xs])
    ys = jax.vmap(lambda k, x, t: observation_sample_fn(k, params, x, t))(
        jax.random.split(ky, num_steps), xs, jnp.arange(num_steps, dtype=jnp.int32))
    return xs, ys


def chol_logpdf(x, mean, chol):
    """log N(x | mean, chol chol^T) of a vector ``x``; ``chol`` lower triangular. The inverse factor is formed first (unbatched under the
    filter's vmap when chol does not depend on the particle), then applied by a matmul: a
    triangular solve vmapped over particles was 2000x slower on CPU at N = 1e4."""
    inv = jax.scipy.linalg.solve_triangular(chol, jnp.eye(chol.shape[-1], dtype=chol.dtype),
                                            lower=True)
    z = inv @ (x - mean)
    return -0.5 * z @ z - jnp.sum(jnp.log(jnp.diag(chol))) - 0.5 * x.shape[0] * jnp.log(2 * jnp.pi)
