"""Weights and batches, once for every engine: the effective sample size, resampling,
equal-weight draws from weighted points, and padding batches to a few sizes so that compiled
code is reused.

Log weights are natural logs, unnormalised unless said otherwise. The JAX functions
(:func:`log_ess`, :func:`ess`, :func:`resample` and the schemes) run inside ``jit``; the NumPy
ones (:func:`kish_ess`, :func:`equal_weight_indices`, :func:`bucket`, :func:`pad_rows`) work on
host arrays after a run.

Resampling draws ancestor indices with probabilities proportional to the weights. Every scheme
is unbiased (particle ``i`` gets ``N w_i`` offspring on average); each is also available as a
function of pre-drawn uniforms (:data:`RESAMPLERS`), which the correlated particle filter needs.

>>> import numpy as np
>>> round(kish_ess(np.log([1.0, 1.0, 1.0, 1.0])), 6)
4.0
>>> bucket(5), bucket(5, smallest=16)
(8, 16)
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from bayeslik.errors import OptionError

__all__ = ["RESAMPLING", "RESAMPLERS", "check_resampling", "resample", "multinomial",
           "systematic", "stratified", "residual", "offspring_counts", "log_ess", "ess",
           "kish_ess", "equal_weight_indices", "systematic_indices", "bucket", "pad_rows"]

#: the resampling schemes, by name
RESAMPLING = ("systematic", "multinomial", "stratified", "residual")


# ---------------------------------------------------------------------------- resampling (JAX)
def _cumulative(weights: jax.Array) -> jax.Array:
    """Normalised cumulative weights whose last entry is exactly 1."""
    c = jnp.cumsum(weights)
    return c / c[-1]


def _indices_from_counts(counts: jax.Array, n: int) -> jax.Array:
    """``jnp.repeat(arange, counts)`` of total length ``n`` in O(n): index j is the number of
    particles i whose inclusive cumulative count is <= j."""
    cum = jnp.clip(jnp.cumsum(counts), 0, n)
    marks = jnp.zeros(n + 1, jnp.int32).at[cum].add(1)
    return jnp.clip(jnp.cumsum(marks)[:n], 0, counts.shape[0] - 1).astype(jnp.int32)


def _systematic(uniforms, weights, n):
    # position j = (j + U) / n lies in particle i iff C_{i-1} <= (j+U)/n < C_i, so the cumulative
    # offspring count of particle i is #{j : j + U < n C_i} = ceil(n C_i - U) (clipped to [0, n])
    c = _cumulative(weights)
    cum = jnp.clip(jnp.ceil(n * c - uniforms[0]), 0, n).astype(jnp.int32)
    counts = jnp.diff(cum, prepend=0)
    return _indices_from_counts(counts, n)


def _searchsorted(c, positions):
    return jnp.clip(jnp.searchsorted(c, positions, side="right"), 0, c.shape[0] - 1).astype(jnp.int32)


def _multinomial(uniforms, weights, n):
    return _searchsorted(_cumulative(weights), uniforms[:n])


def _stratified(uniforms, weights, n):
    return _searchsorted(_cumulative(weights), (jnp.arange(n) + uniforms[:n]) / n)


def _residual(uniforms, weights, n):
    w = weights / jnp.sum(weights)
    det = jnp.floor(n * w)
    num_det = jnp.sum(det).astype(jnp.int32)
    det_idx = _indices_from_counts(det.astype(jnp.int32), n)
    rest = n * w - det
    # when n * w is all integers there is no residual: any index is fine (never used)
    rest = jnp.where(jnp.sum(rest) > 0, rest, w)
    rand_idx = _searchsorted(_cumulative(rest), uniforms[:n])
    return jnp.where(jnp.arange(n) < num_det, det_idx, rand_idx)


RESAMPLERS = {"systematic": _systematic, "multinomial": _multinomial,
               "stratified": _stratified, "residual": _residual}


def check_resampling(name: str) -> None:
    """Raise an OptionError naming the schemes unless ``name`` is one of :data:`RESAMPLING`."""
    if name not in RESAMPLERS:
        raise OptionError(f"resampling must be one of {RESAMPLING}, got {name!r}")


def resample(rng_key: jax.Array, weights: jax.Array, num_samples: int | None = None, *,
             method: str = "systematic") -> jax.Array:
    r"""Ancestor indices ``(num_samples,)`` drawn with probabilities ``weights`` (need not sum
    to one). Every scheme is unbiased: particle ``i`` gets ``num_samples * w_i`` offspring on
    average (:func:`offspring_counts`).

    * ``"multinomial"``: iid draws;
    * ``"systematic"``: positions :math:`(j + U)/N`, one uniform; O(N), the lowest variance
      in practice; each particle gets :math:`\lfloor N w_i \rfloor` or :math:`\lceil N w_i \rceil`;
    * ``"stratified"``: positions :math:`(j + U_j)/N`;
    * ``"residual"``: :math:`\lfloor N w_i \rfloor` copies, the rest multinomial on the residuals.

    >>> import jax, jax.numpy as jnp
    >>> resample(jax.random.key(0), jnp.array([0.0, 1.0, 0.0]), 4).tolist()
    [1, 1, 1, 1]
    """
    check_resampling(method)
    weights = jnp.asarray(weights)
    n = weights.shape[0] if num_samples is None else int(num_samples)
    u = jax.random.uniform(rng_key, (max(n, 1),), dtype=weights.dtype)
    return RESAMPLERS[method](u, weights, n)


multinomial = partial(resample, method="multinomial")
systematic = partial(resample, method="systematic")
stratified = partial(resample, method="stratified")
residual = partial(resample, method="residual")


def offspring_counts(indices: jax.Array, num_particles: int) -> jax.Array:
    """``(num_particles,)`` how many times each particle was chosen as an ancestor."""
    return jnp.zeros(num_particles, jnp.int32).at[indices].add(1)


# ---------------------------------------------------------------------------- effective sample size
def log_ess(log_weights: jax.Array) -> jax.Array:
    r"""The log of Kish's effective sample size of unnormalised log weights,
    :math:`2\,\mathrm{lse}(w) - \mathrm{lse}(2w)` (JAX)."""
    return 2.0 * logsumexp(log_weights) - logsumexp(2.0 * log_weights)


def ess(log_weights: jax.Array) -> jax.Array:
    r"""Kish's effective sample size :math:`(\sum w)^2 / \sum w^2` of (unnormalised) log
    weights (JAX)."""
    lw = log_weights - logsumexp(log_weights)
    return jnp.exp(-logsumexp(2 * lw))


def kish_ess(log_weights: np.ndarray) -> float:
    """Kish's effective sample size ``(sum w)^2 / sum w^2`` of log weights (NumPy, a float)."""
    log_weights = np.asarray(log_weights, np.float64)
    w = np.exp(log_weights - np.max(log_weights))
    return float(w.sum() ** 2 / np.sum(w ** 2))


# ---------------------------------------------------------------------------- on the host (NumPy)
def systematic_indices(rng: np.random.Generator, p: np.ndarray, num: int) -> np.ndarray:
    """``num`` indices drawn with probabilities ``p`` (summing to one) by systematic
    resampling, in increasing order: each index appears floor or ceil of ``num * p_i`` times."""
    cdf = np.cumsum(p)
    cdf[-1] = 1.0
    positions = (rng.random() + np.arange(num)) / num
    return np.minimum(np.searchsorted(cdf, positions, side="right"), len(p) - 1)


def equal_weight_indices(rng: np.random.Generator, log_weights: np.ndarray, num: int) -> np.ndarray:
    """Equal-weight draws from weighted points: ``num`` indices with probabilities
    ``softmax(log_weights)`` by systematic resampling, in random order."""
    log_weights = np.asarray(log_weights, np.float64)
    w = np.exp(log_weights - np.max(log_weights))
    return rng.permutation(systematic_indices(rng, w / w.sum(), num))


def bucket(n: int, smallest: int = 1) -> int:
    """The padded size of a batch of ``n`` rows: the next power of two, at least ``smallest``
    (a handful of shapes, so a handful of compilations)."""
    return max(int(smallest), 1 << max(0, math.ceil(math.log2(max(int(n), 1)))))


def pad_rows(rows: np.ndarray, size: int, fill=None) -> np.ndarray:
    """``rows`` padded to ``size`` rows with ``fill`` (default: a copy of the first row, zeros
    when there is none), so the padding evaluates at a valid point; the caller drops the padded
    rows' results."""
    rows = np.asarray(rows)
    n = rows.shape[0]
    if n > size:
        raise OptionError(f"pad_rows: {n} rows do not fit in {size}; pass a size >= {n} "
                          f"(bucket({n}) gives one).")
    out = np.empty((size,) + rows.shape[1:], rows.dtype)
    out[:n] = rows
    out[n:] = (rows[0] if n else 0) if fill is None else fill
    return out
