r"""Exact inference for hidden Markov models: pure JAX functions on plain arrays.

A hidden Markov model with ``K`` states and ``T`` steps is given by three log-space arrays

* ``log_init``  ``(K,)``: :math:`\log p(z_0 = k)`;
* ``log_trans`` ``(K, K)`` (the same at every step) or ``(T-1, K, K)`` (one matrix per step):
  ``log_trans[t, i, j]`` :math:`= \log p(z_{t+1} = j \mid z_t = i)` (row = from-state,
  column = to-state);
* ``log_obs``   ``(T, K)``: :math:`\log p(y_t \mid z_t = k)`, the observation log-likelihoods.

None of them has to be normalised: every function works with the unnormalised path weights
:math:`w(z) = \exp(\text{log\_init}[z_0] + \sum_t \text{log\_trans}[t, z_t, z_{t+1}] + \sum_t
\text{log\_obs}[t, z_t])`, and "log-likelihood" means :math:`\log \sum_z w(z)` (which is
:math:`\log p(y)` when the model is normalised). ``-inf`` entries (structural zeros) are allowed
and give finite gradients.

Every function has two implementations with the same results:

* ``method="sequential"``: a ``lax.scan`` over time, normalised at every step in log space
  (depth :math:`O(T)`, work :math:`O(TK^2)`);
* ``method="parallel"``: ``lax.associative_scan`` over the log-space ``K x K`` step matrices
  composed with a log-sum-exp "matrix product" (max-plus for Viterbi) (depth :math:`O(\log T)`,
  work :math:`O(TK^3)`);
* ``method="auto"`` (the default) picks one from the backend and ``T``; see :func:`choose_method`.

Unequal lengths: ``mask`` ``(T,)`` bool, ``True`` on the valid steps, which must be a prefix.
A ``False`` step ``t >= 1`` is skipped (no observation, identity transition: the state is carried
over), so every output on the valid prefix equals the output for the prefix alone and padded
steps repeat the last valid step (marginals, Viterbi state, sampled state). For a batch, vmap::

    jax.vmap(lambda lo, m: hmm_loglik(log_init, log_trans, lo, mask=m))(log_obs_b, mask_b)

with ``log_obs_b`` ``(B, T, K)`` and ``mask_b`` ``(B, T)``.

Accuracy: the sequential log-likelihood sums the per-step log normalisers pairwise (error
:math:`O(\epsilon \log T)` instead of :math:`O(\epsilon T)` for one running float32 sum), and the
parallel scan keeps every composed matrix normalised with its log scale carried separately, so
float32 stays within 1e-5 relative of float64 up to at least ``T = 1e6``.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bayeslik.errors import DataError, EngineError

__all__ = [
    "FilterResult",
    "SmootherResult",
    "choose_method",
    "hmm_loglik",
    "hmm_filter",
    "hmm_smoother",
    "hmm_viterbi",
    "hmm_sample_paths",
    "CPU_PARALLEL_MIN_T",
    "ACCELERATOR_PARALLEL_MIN_T",
]

#: ``method="auto"`` on CPU uses the parallel scan from this length on; ``None``: never.
#: Measured (benchmarks/hmm_filter.py, 2-core x86 CPU, jax 0.12, K = 4, float32): the sequential
#: scan was 2-3x faster than the parallel one at every T from 1e3 to 1e6, for the
#: log-likelihood and for its value and gradient (the parallel scan does O(T K^3) work against
#: O(T K^2), and a CPU gains little from its O(log T) depth). See docs/filtering.md.
CPU_PARALLEL_MIN_T: int | None = None
#: ``method="auto"`` on GPU/TPU uses the parallel scan from this length on. Not measured here
#: (no accelerator was available): there a sequential scan costs at least one kernel launch per
#: step while the parallel one costs O(log T); run benchmarks/hmm_filter.py to calibrate.
ACCELERATOR_PARALLEL_MIN_T: int = 256

_METHODS = ("auto", "sequential", "parallel")


class FilterResult(NamedTuple):
    """Output of :func:`hmm_filter`.

    Attributes:
        log_filtered: ``(T, K)``, :math:`\\log p(z_t = k \\mid y_{0:t})`.
        loglik: ``()``, :math:`\\log p(y_{0:T-1})`.
    """

    log_filtered: jax.Array
    loglik: jax.Array


class SmootherResult(NamedTuple):
    """Output of :func:`hmm_smoother`.

    Attributes:
        log_smoothed: ``(T, K)``, :math:`\\log p(z_t = k \\mid y_{0:T-1})`.
        log_filtered: ``(T, K)``, :math:`\\log p(z_t = k \\mid y_{0:t})`.
        loglik: ``()``, :math:`\\log p(y_{0:T-1})`.
    """

    log_smoothed: jax.Array
    log_filtered: jax.Array
    loglik: jax.Array


# ----------------------------------------------------------------------------- method choice


def choose_method(num_steps: int, backend: str | None = None) -> str:
    """The implementation ``method="auto"`` uses for a sequence of ``num_steps`` steps.

    On CPU: ``"parallel"`` when ``CPU_PARALLEL_MIN_T`` is set and ``num_steps`` reaches it,
    else ``"sequential"`` (``CPU_PARALLEL_MIN_T`` is ``None``: on the CPU it was measured on,
    the sequential scan was faster at every length up to 1e6). On GPU/TPU: ``"parallel"`` when
    ``num_steps >= ACCELERATOR_PARALLEL_MIN_T``. ``backend`` defaults to
    ``jax.default_backend()``, read when the calling function is traced.

    >>> choose_method(1_000_000, backend="cpu")
    'sequential'
    >>> choose_method(100, backend="gpu"), choose_method(10_000, backend="gpu")
    ('sequential', 'parallel')
    """
    backend = jax.default_backend() if backend is None else backend
    threshold = CPU_PARALLEL_MIN_T if backend == "cpu" else ACCELERATOR_PARALLEL_MIN_T
    return "parallel" if threshold is not None and num_steps >= threshold else "sequential"


def _resolve(method: str, num_steps: int) -> str:
    if method not in _METHODS:
        raise EngineError(f"method must be one of {_METHODS}, got {method!r}")
    return choose_method(num_steps) if method == "auto" else method


# ----------------------------------------------------------------------------- input checks


class _Model(NamedTuple):
    init: jax.Array  # (K,)
    trans: jax.Array  # (K, K) or (T-1, K, K)
    obs: jax.Array  # (T, K)
    mask: jax.Array | None  # (T,) bool
    time_varying: bool


def _prepare(log_init, log_trans, log_obs, mask) -> _Model:
    log_init, log_trans, log_obs = (jnp.asarray(a) for a in (log_init, log_trans, log_obs))
    dtype = jnp.result_type(float, log_init, log_trans, log_obs)
    if log_obs.ndim != 2:
        raise DataError(
            f"log_obs must have shape (T, K), got {log_obs.shape}; for a batch of sequences "
            "use jax.vmap over the leading axis"
        )
    T, K = log_obs.shape
    if T < 1 or K < 1:
        raise DataError(f"log_obs must have T >= 1 steps and K >= 1 states, got {log_obs.shape}")
    if log_init.shape != (K,):
        raise DataError(f"log_init must have shape (K,) = ({K},), got {log_init.shape}")
    if log_trans.shape == (K, K):
        time_varying = False
    elif log_trans.shape == (T - 1, K, K):
        time_varying = True
    else:
        raise DataError(
            f"log_trans must have shape (K, K) = ({K}, {K}) or (T-1, K, K) = ({T - 1}, {K}, {K}),"
            f" got {log_trans.shape}"
        )
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.shape != (T,):
            raise DataError(f"mask must have shape (T,) = ({T},), got {mask.shape}")
        if mask.dtype != jnp.bool_:
            raise DataError(f"mask must be boolean (True = valid step), got dtype {mask.dtype}")
    return _Model(
        log_init.astype(dtype), log_trans.astype(dtype), log_obs.astype(dtype), mask, time_varying
    )


# ----------------------------------------------------------------------------- log-space helpers


def _safe_shift(m):
    """A finite, gradient-free stand-in for a max used only to shift before exp."""
    return lax.stop_gradient(jnp.where(jnp.isfinite(m), m, jnp.zeros_like(m)))


def _lse(x, axis=-1):
    """log-sum-exp whose value is -inf and gradient 0 (not nan) when all terms are -inf."""
    m = _safe_shift(jnp.max(x, axis=axis, keepdims=True))
    s = jnp.sum(jnp.exp(x - m), axis=axis, keepdims=True)
    pos = s > 0
    out = jnp.where(pos, jnp.log(jnp.where(pos, s, jnp.ones_like(s))), -jnp.inf) + m
    return jnp.squeeze(out, axis)


def _normalize(x, axis=-1):
    """(x - logsumexp(x), logsumexp(x)); x is left unchanged when its logsumexp is -inf."""
    c = _lse(x, axis)
    c_safe = jnp.where(jnp.isfinite(c), c, jnp.zeros_like(c))
    return x - jnp.expand_dims(c_safe, axis), c


def _log_eye(K, dtype):
    return jnp.where(jnp.eye(K, dtype=bool), jnp.zeros((), dtype), -jnp.inf).astype(dtype)


def _pairwise_sum(x):
    """Sum of a 1-D array by a balanced binary tree: rounding error O(eps log n), not O(eps n)."""
    n = x.shape[0]
    size = 1 << max(n - 1, 0).bit_length()
    x = jnp.pad(x, (0, size - n))
    while x.shape[0] > 1:
        x = x[0::2] + x[1::2]
    return x[0]


def _step_trans(model: _Model):
    """(T-1, K, K) transition log-weights t -> t+1 (identity where step t+1 is masked)."""
    T, K = model.obs.shape
    trans = model.trans if model.time_varying else jnp.broadcast_to(model.trans, (T - 1, K, K))
    if model.mask is not None:
        trans = jnp.where(model.mask[1:, None, None], trans, _log_eye(K, trans.dtype))
    return trans


def _step_matrices(model: _Model):
    """(T-1, K, K) log weights of step t -> t+1: log_trans[t] + log_obs[t+1] (masked: identity)."""
    obs = model.obs[1:]
    if model.mask is not None:
        obs = jnp.where(model.mask[1:, None], obs, jnp.zeros_like(obs))
    return _step_trans(model) + obs[:, None, :]


def _first_vector(model: _Model):
    """log_init + log_obs[0] (the observation dropped when step 0 is masked)."""
    obs0 = model.obs[0]
    if model.mask is not None:
        obs0 = jnp.where(model.mask[0], obs0, jnp.zeros_like(obs0))
    return model.init + obs0


def _empty_correction(model: _Model, loglik):
    """A fully masked sequence has log-likelihood 0: drop log Σ init when step 0 is masked."""
    if model.mask is None:
        return loglik
    return loglik - jnp.where(model.mask[0], jnp.zeros_like(loglik), _lse(model.init))


# ----------------------------------------------------------------------------- sequential


def _seq_inputs(model: _Model):
    """Per-step scan inputs for steps 1..T-1 and a function giving (trans_t, obs_t)."""
    T, K = model.obs.shape
    eye = _log_eye(K, model.obs.dtype)
    xs = {"obs": model.obs[1:]}
    if model.time_varying:
        xs["trans"] = model.trans
    if model.mask is not None:
        xs["mask"] = model.mask[1:]

    def get(x):
        trans = x["trans"] if model.time_varying else model.trans
        obs = x["obs"]
        if model.mask is not None:
            trans = jnp.where(x["mask"], trans, eye)
            obs = jnp.where(x["mask"], obs, jnp.zeros_like(obs))
        return trans, obs

    return xs, get


def _safe_log(x):
    """log(x) with value -inf and gradient 0 (not nan) where x == 0."""
    pos = x > 0
    return jnp.where(pos, jnp.log(jnp.where(pos, x, jnp.ones_like(x))), -jnp.inf)


def _seq_forward(model: _Model, keep_filtered: bool):
    """Forward pass; returns (log_filtered (T, K) or None, per-step log normalisers (T,)).

    The recursion runs in probability space, like the classical scaled forward algorithm:
    the normalised filter ``p`` is propagated by one matrix-vector product with the transition
    probabilities (exponentiated once, outside the loop) and multiplied by the observation
    likelihoods shifted by their per-step maximum, so each step costs ``K`` exponentials
    instead of the ``K^2`` of a log-space recursion (about 1.9x faster for value and gradient
    at K = 4 on CPU). The log-likelihood is the pairwise sum of the per-step log normalisers.
    A predicted probability that underflows (below ~1e-38 in float32) counts as zero: that
    only matters when a state the chain all but rules out explains an observation more than
    ~87 nats better than every state it allows.
    """
    f0, c0 = _normalize(_first_vector(model))
    xs, _ = _seq_inputs(model)
    probs = jnp.exp(model.trans)  # (K, K) or (T-1, K, K), once, outside the loop

    def step(p, x):
        P = x["trans"] if model.time_varying else probs
        obs = x["obs"]
        pred = p @ P
        if model.mask is not None:
            pred = jnp.where(x["mask"], pred, p)
            obs = jnp.where(x["mask"], obs, jnp.zeros_like(obs))
        m = _safe_shift(jnp.max(obs))
        w = pred * jnp.exp(obs - m)
        c = jnp.sum(w)
        ok = c > 0
        p_new = w / jnp.where(ok, c, jnp.ones_like(c))
        log_c = jnp.where(ok, jnp.log(jnp.where(ok, c, jnp.ones_like(c))), -jnp.inf) + m
        return p_new, ((_safe_log(p_new), log_c) if keep_filtered else log_c)

    if model.time_varying:
        xs = {**xs, "trans": probs}
    _, out = lax.scan(step, jnp.exp(f0), xs)
    if keep_filtered:
        fs, cs = out
        filtered = jnp.concatenate([f0[None], fs])
    else:
        cs, filtered = out, None
    cs = jnp.concatenate([c0[None], cs])
    if model.mask is not None:
        cs = jnp.where(model.mask, cs, jnp.zeros_like(cs))
    return filtered, cs


def _seq_backward(model: _Model):
    """Normalised backward messages log β_t (T, K), β_t(i) ∝ p(y_{t+1:} | z_t = i)."""
    T, K = model.obs.shape
    xs, get = _seq_inputs(model)
    b_last = jnp.zeros((K,), model.obs.dtype)

    def step(b, x):
        trans, obs = get(x)
        b_new, _ = _normalize(_lse(trans + (obs + b)[None, :], axis=1))
        return b_new, b_new

    _, bs = lax.scan(step, b_last, xs, reverse=True)
    return jnp.concatenate([bs, b_last[None]])


def _seq_viterbi(model: _Model):
    d0, _ = _normalize_max(_first_vector(model))
    xs, get = _seq_inputs(model)

    def step(d, x):
        trans, obs = get(x)
        scores = d[:, None] + trans
        back = jnp.argmax(scores, axis=0)
        d_new, _ = _normalize_max(jnp.max(scores, axis=0) + obs)
        return d_new, back

    d_last, backs = lax.scan(step, d0, xs)  # backs[t-1][j]: best z_{t-1} | z_t=j
    z_last = jnp.argmax(d_last)

    def back_step(z, back):
        z_prev = back[z]
        return z_prev, z_prev

    _, zs = lax.scan(back_step, z_last, backs, reverse=True)
    return jnp.concatenate([zs, z_last[None]]).astype(jnp.int32)


def _normalize_max(x, axis=-1):
    m = jnp.max(x, axis=axis, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, jnp.zeros_like(m))
    return x - m, jnp.squeeze(m, axis)


# ----------------------------------------------------------------------------- parallel


def _shift_mats(mats):
    """Split log matrices (..., K, K) into (matrices shifted to max 0, log shifts (...))."""
    m = _safe_shift(jnp.max(mats, axis=(-2, -1)))
    return mats - m[..., None, None], m


def _sum_product(a, b):
    """Compose scaled log matrices: (Ma, sa) then (Mb, sb) = log(exp(Ma) @ exp(Mb)), rescaled."""
    (ma, sa), (mb, sb) = a, b
    c = _lse(ma[..., :, :, None] + mb[..., None, :, :], axis=-2)
    c, m = _shift_mats(c)
    return c, sa + sb + m


def _max_product(a, b):
    """Max-plus composition of shifted log matrices (scales are not needed for Viterbi)."""
    c = jnp.max(a[..., :, :, None] + b[..., None, :, :], axis=-2)
    c, _ = _shift_mats(c)
    return c


def _forward_elements(model: _Model):
    T, K = model.obs.shape
    first = jnp.broadcast_to(_first_vector(model), (K, K))
    return jnp.concatenate([first[None], _step_matrices(model)])  # (T, K, K)


def _par_forward(model: _Model):
    """Prefix products; returns (log_filtered (T, K), cumulative logliks (T,))."""
    mats, scales = _shift_mats(_forward_elements(model))
    prefix, s = lax.associative_scan(_sum_product, (mats, scales))
    row = prefix[:, 0, :]  # all rows of a prefix are equal (the first element's rows are)
    filtered, c = _normalize(row)
    return filtered, s + c


def _tree_reduce(combine, elems, identity):
    """combine(e_0, ..., e_{n-1}) in order, as a balanced tree (log n levels of vector ops)."""
    while jax.tree.leaves(elems)[0].shape[0] > 1:
        n = jax.tree.leaves(elems)[0].shape[0]
        if n % 2:
            elems = jax.tree.map(lambda e, i: jnp.concatenate([e, i[None]]), elems, identity)
        elems = combine(
            jax.tree.map(lambda e: e[0::2], elems), jax.tree.map(lambda e: e[1::2], elems)
        )
    return jax.tree.map(lambda e: e[0], elems)


def _par_loglik(model: _Model):
    T, K = model.obs.shape
    mats, scales = _shift_mats(_forward_elements(model))
    dtype = mats.dtype
    identity = (_log_eye(K, dtype), jnp.zeros((), dtype))
    total, s = _tree_reduce(_sum_product, (mats, scales), identity)
    return s + _lse(total[0])


def _par_backward(model: _Model):
    """Normalised backward messages via a reverse associative scan of the step matrices."""
    T, K = model.obs.shape
    last = jnp.zeros((1, K, K), model.obs.dtype)  # all-ones matrix: columns of suffixes equal
    mats, _ = _shift_mats(jnp.concatenate([_step_matrices(model), last]))

    def combine(later, earlier):  # suffix_t = E_t @ suffix_{t+1}
        c = _lse(earlier[..., :, :, None] + later[..., None, :, :], axis=-2)
        return _shift_mats(c)[0]

    suffix = lax.associative_scan(combine, mats, reverse=True)
    b, _ = _normalize(suffix[:, :, 0])
    return b


def _par_viterbi(model: _Model):
    T, K = model.obs.shape
    mats, _ = _shift_mats(_forward_elements(model))
    prefix = lax.associative_scan(_max_product, mats)
    delta = prefix[:, 0, :]  # (T, K) max path scores ending in each state, up to a constant
    back = jnp.argmax(delta[:-1, :, None] + _step_trans(model), axis=1)  # (T-1, K)
    z_last = jnp.argmax(delta[-1])
    maps = jnp.concatenate([back, jnp.full((1, K), z_last, back.dtype)])
    return _compose_backward(maps)[:, 0].astype(jnp.int32)


def _compose_backward(maps):
    """maps[t]: z_{t+1} -> z_t (the last one constant); returns maps[t] ∘ ... ∘ maps[T-1]."""
    K = maps.shape[-1]
    states = jnp.arange(K, dtype=maps.dtype)

    def combine(later, earlier):  # (earlier ∘ later)[k] = earlier[later[k]]
        # One-hot selection rather than a gather: K is small, and XLA compiles a gather inside
        # an associative scan very slowly (about 90 s at T = 1e5).
        hit = later[..., :, None] == states
        return jnp.sum(jnp.where(hit, earlier[..., None, :], 0), axis=-1, dtype=maps.dtype)

    return lax.associative_scan(combine, maps, reverse=True)


# ----------------------------------------------------------------------------- sampling helpers


def _inverse_cdf(logits, u):
    """Index drawn from softmax(logits) over the last axis by inversion with uniform(s) u.

    Never returns a zero-probability state, whatever the rounding.
    """
    p = jnp.exp(_normalize(logits)[0])
    cdf = jnp.cumsum(p, axis=-1)
    v = u * cdf[..., -1]
    idx = jnp.sum(cdf <= v[..., None], axis=-1)
    return jnp.minimum(idx, jnp.argmax(cdf, axis=-1)).astype(jnp.int32)


def _seq_sample(model: _Model, filtered, u):
    """Backward sampling, one step at a time, all samples at once. u: (S, T)."""
    xs, get = _seq_inputs(model)
    xs = dict(xs, f=filtered[:-1], u=u[:, :-1].T)
    z_last = _inverse_cdf(jnp.broadcast_to(filtered[-1], (u.shape[0], filtered.shape[1])), u[:, -1])

    def step(z_next, x):
        trans, _ = get(x)
        logits = x["f"][None, :] + trans[:, z_next].T  # (S, K): p(z_t = i | z_{t+1}, y_{0:t})
        z = _inverse_cdf(logits, x["u"])
        return z, z

    _, zs = lax.scan(step, z_last, xs, reverse=True)
    return jnp.concatenate([zs, z_last[None]]).T  # (S, T)


def _par_sample(model: _Model, filtered, u):
    """Parallel backward sampling by composing random maps z_{t+1} -> z_t (see hmm_sample_paths)."""
    S, T = u.shape
    K = filtered.shape[1]
    logits = filtered[:-1, :, None] + _step_trans(model)  # (T-1, K_from, K_to)
    logits = jnp.swapaxes(logits, -1, -2)  # (T-1, K_to, K_from): one distribution per next state
    back = _inverse_cdf(logits[:, None, :, :], u[:, :-1].T[:, :, None])  # (T-1, S, K_to)
    z_last = _inverse_cdf(jnp.broadcast_to(filtered[-1], (S, K)), u[:, -1])  # (S,)
    maps = jnp.concatenate([back, jnp.broadcast_to(z_last[None, :, None], (1, S, K))])
    return _compose_backward(maps)[:, :, 0].T  # (S, T)


# ----------------------------------------------------------------------------- public API


@partial(jax.jit, static_argnames=("method",))
def hmm_loglik(log_init, log_trans, log_obs, *, mask=None, method: str = "auto") -> jax.Array:
    r"""Marginal log-likelihood of an HMM by the forward algorithm.

    .. math::
        \log p(y_{0:T-1}) = \log \sum_{z_0,\dots,z_{T-1}} p(z_0)\,p(y_0 \mid z_0)
        \prod_{t=1}^{T-1} p(z_t \mid z_{t-1})\,p(y_t \mid z_t)

    Sequential: :math:`\log p(y) = \sum_t c_t` with :math:`c_t = \log p(y_t \mid y_{0:t-1})`,
    the log normaliser of step ``t`` of the normalised forward recursion; the ``c_t`` are summed
    pairwise (a running float32 sum drifts by tens of nats at ``T = 1e5``). Parallel: the
    product of the step matrices :math:`A_t[i, j] = \text{log\_trans}[t-1, i, j] +
    \text{log\_obs}[t, j]` in the log-sum-exp semiring, reduced as a balanced tree, each partial
    product kept as (matrix shifted to max 0, log scale).

    Args:
        log_init: ``(K,)`` initial log-probabilities.
        log_trans: ``(K, K)`` or ``(T-1, K, K)`` transition log-probabilities, row = from-state.
        log_obs: ``(T, K)`` observation log-likelihoods.
        mask: optional ``(T,)`` bool, ``True`` on the valid steps (a prefix). The result is the
            log-likelihood of the valid prefix (0 for an empty one).
        method: ``"auto"``, ``"sequential"`` or ``"parallel"`` (static).

    Returns:
        ``()`` the log-likelihood, in the floating dtype of the inputs.

    Differentiable with ``jax.grad`` through either method;
    :math:`\partial \log p(y) / \partial\, \text{log\_obs}[t, k] = p(z_t = k \mid y)`.

    >>> import jax.numpy as jnp
    >>> log_init = jnp.log(jnp.array([0.5, 0.5]))
    >>> log_trans = jnp.log(jnp.array([[0.9, 0.1], [0.2, 0.8]]))
    >>> log_obs = jnp.log(jnp.array([[0.7, 0.1], [0.7, 0.1], [0.1, 0.6]]))
    >>> ll = hmm_loglik(log_init, log_trans, log_obs)
    >>> bool(jnp.allclose(ll, hmm_loglik(log_init, log_trans, log_obs, method="parallel")))
    True
    """
    model = _prepare(log_init, log_trans, log_obs, mask)
    if _resolve(method, model.obs.shape[0]) == "sequential":
        _, cs = _seq_forward(model, keep_filtered=False)
        return _pairwise_sum(cs)
    return _empty_correction(model, _par_loglik(model))


@partial(jax.jit, static_argnames=("method",))
def hmm_filter(log_init, log_trans, log_obs, *, mask=None, method: str = "auto") -> FilterResult:
    r"""Filtered marginals :math:`\log p(z_t = k \mid y_{0:t})` and the log-likelihood.

    The forward recursion :math:`\alpha_t(j) = \sum_i \alpha_{t-1}(i)\,p(z_t=j \mid z_{t-1}=i)\,
    p(y_t \mid z_t=j)`, normalised at every step (sequential), or every prefix product of the
    step matrices (parallel, ``lax.associative_scan``); the filtered marginal is the
    normalised :math:`\alpha_t`.

    Args and ``mask``/``method``: as :func:`hmm_loglik`. Padded (masked) steps repeat the last
    valid step's filtered marginals.

    Returns:
        :class:`FilterResult` ``(log_filtered (T, K), loglik ())``.

    >>> import jax.numpy as jnp
    >>> log_obs = jnp.log(jnp.array([[0.7, 0.1], [0.7, 0.1], [0.1, 0.6]]))
    >>> res = hmm_filter(jnp.log(jnp.array([0.5, 0.5])),
    ...                  jnp.log(jnp.array([[0.9, 0.1], [0.2, 0.8]])), log_obs)
    >>> res.log_filtered.shape
    (3, 2)
    >>> bool(jnp.allclose(jnp.exp(res.log_filtered).sum(-1), 1.0))
    True
    """
    model = _prepare(log_init, log_trans, log_obs, mask)
    if _resolve(method, model.obs.shape[0]) == "sequential":
        filtered, cs = _seq_forward(model, keep_filtered=True)
        return FilterResult(filtered, _pairwise_sum(cs))
    filtered, cum = _par_forward(model)
    return FilterResult(filtered, _empty_correction(model, cum[-1]))


@partial(jax.jit, static_argnames=("method",))
def hmm_smoother(
    log_init, log_trans, log_obs, *, mask=None, method: str = "auto"
) -> SmootherResult:
    r"""Smoothed marginals :math:`\log p(z_t = k \mid y_{0:T-1})` by forward-backward.

    :math:`p(z_t = k \mid y) \propto \alpha_t(k)\,\beta_t(k)` with the backward messages
    :math:`\beta_t(i) = \sum_j p(z_{t+1}=j \mid z_t=i)\,p(y_{t+1} \mid z_{t+1}=j)\,
    \beta_{t+1}(j)`, :math:`\beta_{T-1} = 1`: a reverse ``lax.scan`` normalised per step
    (sequential) or a reverse ``lax.associative_scan`` of the same step matrices as the filter
    (parallel).

    Args and ``mask``/``method``: as :func:`hmm_loglik`. Padded steps repeat the last valid
    step's marginals.

    Returns:
        :class:`SmootherResult` ``(log_smoothed (T, K), log_filtered (T, K), loglik ())``.

    >>> import jax.numpy as jnp
    >>> log_obs = jnp.log(jnp.array([[0.7, 0.1], [0.7, 0.1], [0.1, 0.6]]))
    >>> res = hmm_smoother(jnp.log(jnp.array([0.5, 0.5])),
    ...                    jnp.log(jnp.array([[0.9, 0.1], [0.2, 0.8]])), log_obs)
    >>> bool(jnp.allclose(res.log_smoothed[-1], res.log_filtered[-1]))
    True
    """
    model = _prepare(log_init, log_trans, log_obs, mask)
    if _resolve(method, model.obs.shape[0]) == "sequential":
        filtered, cs = _seq_forward(model, keep_filtered=True)
        loglik = _pairwise_sum(cs)
        backward = _seq_backward(model)
    else:
        filtered, cum = _par_forward(model)
        loglik = _empty_correction(model, cum[-1])
        backward = _par_backward(model)
    smoothed, _ = _normalize(filtered + backward)
    return SmootherResult(smoothed, filtered, loglik)


@partial(jax.jit, static_argnames=("method",))
def hmm_viterbi(log_init, log_trans, log_obs, *, mask=None, method: str = "auto") -> jax.Array:
    r"""The most likely state path :math:`\arg\max_z \log p(z \mid y)` (Viterbi).

    Forward max-product recursion :math:`\delta_t(j) = \max_i \delta_{t-1}(i) +
    \text{log\_trans}[t-1, i, j] + \text{log\_obs}[t, j]` with back-pointers
    :math:`\psi_t(j) = \arg\max_i \delta_{t-1}(i) + \text{log\_trans}[t-1, i, j]`, then
    :math:`z_{T-1} = \arg\max \delta_{T-1}`, :math:`z_{t-1} = \psi_t(z_t)`. Sequential: two
    ``lax.scan``. Parallel: the :math:`\delta_t` by an associative scan in the max-plus semiring
    and the backtracking by a reverse associative scan composing the back-pointer maps
    :math:`\psi_t` (functions on ``{0..K-1}``), so ties are broken the same way as sequentially
    (lowest state index) and the path is always consistent.

    Args and ``mask``/``method``: as :func:`hmm_loglik`. Padded steps repeat the last valid state.

    Returns:
        ``(T,)`` int32 path.

    >>> import jax.numpy as jnp
    >>> log_obs = jnp.log(jnp.array([[0.9, 0.1], [0.9, 0.1], [0.05, 0.9], [0.05, 0.9]]))
    >>> hmm_viterbi(jnp.log(jnp.array([0.5, 0.5])),
    ...             jnp.log(jnp.array([[0.9, 0.1], [0.2, 0.8]])), log_obs).tolist()
    [0, 0, 1, 1]
    """
    model = _prepare(log_init, log_trans, log_obs, mask)
    if _resolve(method, model.obs.shape[0]) == "sequential":
        return _seq_viterbi(model)
    return _par_viterbi(model)


@partial(jax.jit, static_argnames=("num_samples", "method"))
def hmm_sample_paths(
    rng_key, log_init, log_trans, log_obs, *, num_samples: int, mask=None, method: str = "auto"
) -> jax.Array:
    r"""Posterior samples of whole state paths, :math:`z \sim p(z_{0:T-1} \mid y_{0:T-1})` (FFBS).

    Forward filtering, then backward sampling: :math:`z_{T-1} \sim p(z_{T-1} \mid y)`, and
    :math:`z_t \sim p(z_t \mid z_{t+1}, y_{0:t}) \propto p(z_t \mid y_{0:t})\,
    p(z_{t+1} \mid z_t)`. Every draw is by inversion of the categorical CDF with one uniform
    ``u[s, t]`` per sample and step (from ``jax.random.uniform(rng_key, (num_samples, T))``).

    * Sequential: the filter by ``lax.scan``, then a reverse ``lax.scan`` drawing ``z_t`` for
      all samples at once.
    * Parallel (fully parallel, depth :math:`O(\log T)`): the filter by the associative scan;
      then for every step ``t`` and every possible next state ``j`` the draw
      :math:`\psi_t(j) \sim p(z_t \mid z_{t+1}=j, y_{0:t})` with the same ``u[s, t]``, and the
      path :math:`z_t = \psi_t \circ \psi_{t+1} \circ \dots \circ \psi_{T-1}` by a reverse
      associative scan composing these random maps. Only one ``j`` per step is ever used, so
      the path has the FFBS distribution; and because both methods use the same uniforms
      through the same inversion, they return the same paths for the same key (up to
      rounding of the filtered marginals).

    Args:
        rng_key: a ``jax.random`` key.
        log_init, log_trans, log_obs, mask, method: as :func:`hmm_loglik`.
        num_samples: number of paths ``S`` (static).

    Returns:
        ``(num_samples, T)`` int32 paths; padded steps repeat the last valid state.

    >>> import jax, jax.numpy as jnp
    >>> log_obs = jnp.log(jnp.array([[0.7, 0.1], [0.7, 0.1], [0.1, 0.6]]))
    >>> paths = hmm_sample_paths(jax.random.key(0), jnp.log(jnp.array([0.5, 0.5])),
    ...                          jnp.log(jnp.array([[0.9, 0.1], [0.2, 0.8]])), log_obs,
    ...                          num_samples=100)
    >>> paths.shape
    (100, 3)
    """
    model = _prepare(log_init, log_trans, log_obs, mask)
    T = model.obs.shape[0]
    u = jax.random.uniform(rng_key, (num_samples, T), dtype=model.obs.dtype)
    if _resolve(method, T) == "sequential":
        filtered, _ = _seq_forward(model, keep_filtered=True)
        return _seq_sample(model, filtered, u)
    filtered, _ = _par_forward(model)
    return _par_sample(model, filtered, u)
