"""Weights and batches, once for every engine: the effective sample size, resampling,
equal-weight draws from weighted points, and padding batches to a few sizes so that compiled
code is reused.

Log weights are natural logs, unnormalised unless said otherwise. The JAX functions
(:func:`log_ess`, :func:`ess`, :func:`resample` and the schemes) run inside ``jit``; the NumPy
ones (:func:`kish_ess`, :func:`equal_weight_indices`, :func:`bucket`, :func:`pad_rows`) work on
host arrays after a run. :func:`weighted_points`, :func:`point_weights` and
:func:`weighted_summary` read a nested-sampling or SMC Fit's weighted points (its
``nested_samples`` or ``particles`` group, dims ``run`` x ``point`` / ``particle``).

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
           "kish_ess", "equal_weight_indices", "systematic_indices", "bucket", "pad_rows",
           "WEIGHTED_GROUPS", "weighted_points", "point_weights", "weighted_summary",
           "upgrade_weighted_groups"]

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


# ------------------------------------------------------------------------ a Fit's weighted points
#: the groups of weighted points (nested sampling, SMC) and the name of their point dimension
WEIGHTED_GROUPS = {"nested_samples": "point", "particles": "particle"}


def _tree(fit):
    return getattr(fit, "idata", fit)


def _group_name(tree, group: str | None) -> str:
    if group is not None:
        if group not in tree.children or "log_weight" not in tree[group]:
            raise OptionError(f"group={group!r}: the Fit has no such group of weighted points "
                              f"(one with a 'log_weight'); its groups: {sorted(tree.children)}.")
        return group
    found = [g for g in WEIGHTED_GROUPS if g in tree.children and "log_weight" in tree[g]]
    if not found:
        raise OptionError("the Fit has no weighted points (no 'nested_samples' or 'particles' "
                          "group): only nested sampling and SMC make them; for chains of draws "
                          "use arviz's summary.")
    return found[0]


def weighted_points(fit, group: str | None = None):
    """The weighted points of a Fit of a weighted engine, an ``xarray.Dataset`` with dims
    ``("run", point, ...)`` (``point`` for ``nested_samples``, ``particle`` for SMC's
    ``particles``): a file saved before these dims (``chain`` / ``draw``) is read as if saved
    now. ``group`` picks the group (default: the one the Fit has).

    >>> g = weighted_points(fit)                       # doctest: +SKIP
    >>> g["log_weight"].dims                           # doctest: +SKIP
    ('run', 'point')
    """
    tree = _tree(fit)
    name = _group_name(tree, group)
    ds = tree[name].to_dataset(inherit=False)
    old = {"chain": "run", "draw": WEIGHTED_GROUPS.get(name, "point")}
    if "chain" in ds.dims and "draw" in ds.dims:
        ds = ds.rename(old)
        ds.attrs = {k: v for k, v in ds.attrs.items() if k != "sample_dims"}
        ds.attrs["weighted_dims"] = list(old.values())
    return ds


def upgrade_weighted_groups(tree):
    """``tree`` (a DataTree) with the weighted groups of a file written before they had their
    own dims renamed from ``(chain, draw)`` to ``(run, point)`` / ``(run, particle)`` and
    their ``sample_dims`` attribute dropped; a tree already in the new layout is returned
    unchanged. For ``load_fit``."""
    import xarray as xr

    for name in WEIGHTED_GROUPS:
        if name in tree.children and "log_weight" in tree[name] and "chain" in tree[name].dims:
            tree[name] = xr.DataTree(weighted_points(tree, name))
    return tree


def point_weights(fit, group: str | None = None):
    """The normalised weights of the weighted points, an ``xarray.DataArray`` with dims
    ``("run", point)`` summing to one over all of them: each run's ``log_weight`` normalised,
    and every run counting equally (the runs are independent estimates).

    >>> w = point_weights(fit)                                           # doctest: +SKIP
    >>> g = weighted_points(fit)                                         # doctest: +SKIP
    >>> float((w * g["sigma2"]).sum())   # the weighted posterior mean     # doctest: +SKIP
    1.247
    """
    lw = weighted_points(fit, group)["log_weight"]
    point = lw.dims[1]
    a = np.asarray(lw.values, np.float64)
    a = np.where(np.isnan(a), -np.inf, a)
    top = np.max(a, axis=1, keepdims=True)
    w = np.exp(a - np.where(np.isfinite(top), top, 0.0))
    total = w.sum(axis=1, keepdims=True)
    w = np.where(total > 0, w / np.where(total > 0, total, 1.0), 0.0)
    w /= max(int((total[:, 0] > 0).sum()), 1)
    return lw.copy(data=w).rename("weight").assign_attrs(
        {"description": f"normalised weights over ('run', {point!r})"})


def _weighted_quantile(x: np.ndarray, w: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Quantiles ``q`` of the values ``x`` (n,) with weights ``w`` (n,, summing to one): the
    weighted empirical distribution, each point's mass centred on it."""
    keep = w > 0
    x, w = x[keep], w[keep]
    order = np.argsort(x)
    x, w = x[order], w[order]
    cdf = np.cumsum(w) - w / 2
    return np.interp(q, cdf, x)


def weighted_summary(fit, var_names: list[str] | None = None, *, group: str | None = None,
                     ci_prob: float = 0.89):
    r"""Summary of the weighted points of a nested-sampling or SMC Fit, a pandas DataFrame with
    one row per variable element: the weighted ``mean``, ``sd``, the equal-tailed interval
    ``eti<p>_lb`` / ``eti<p>_ub`` (``ci_prob``, ArviZ's default 0.89), ``ess_kish`` (Kish's
    effective sample size of the weights, :math:`1/\sum w_i^2`, the same for every row) and
    ``mcse_mean`` (``sd / sqrt(ess_kish)``: an approximation that treats the points as
    independent; it leaves out nested sampling's volume noise and the correlation of SMC's
    particles).

    ``var_names``: default the Posterior's sites (the variables also in the ``posterior``
    group). Rows are named as ArviZ names them (``theta[Choate]``).

    >>> weighted_summary(fit).round(3)     # nss, 100 live points          # doctest: +SKIP
             mean     sd  eti89_lb  eti89_ub  ess_kish  mcse_mean
    mu     -0.680  0.222    -1.046    -0.326   365.580      0.012
    sigma2  1.264  0.365     0.800     1.946   365.580      0.019
    """
    import pandas as pd

    if not 0 < ci_prob < 1:
        raise OptionError(f"ci_prob must be in (0, 1), got {ci_prob!r}")
    tree = _tree(fit)
    ds = weighted_points(tree, group)
    if var_names is None:
        post = tree["posterior"].data_vars if "posterior" in tree.children else ds.data_vars
        var_names = [v for v in ds.data_vars if v in post and v != "log_weight"]
    else:
        var_names = [var_names] if isinstance(var_names, str) else list(var_names)
        missing = [v for v in var_names if v not in ds.data_vars]
        if missing:
            raise OptionError(f"var_names: {missing} not in the weighted points; they hold "
                              f"{sorted(ds.data_vars)}.")
    w = np.asarray(point_weights(tree, group).values, np.float64).reshape(-1)
    ess_kish = float(1.0 / np.sum(w ** 2)) if w.sum() > 0 else 0.0
    lo, hi = (1 - ci_prob) / 2, 1 - (1 - ci_prob) / 2
    pct = f"{100 * ci_prob:g}".replace(".", "_")
    rows, index = [], []
    for name in var_names:
        da = ds[name]
        x = np.asarray(da.values, np.float64).reshape(w.size, -1)
        extra_dims = da.dims[2:]
        labels = [()] if not extra_dims else [
            tuple(np.asarray(da[dim].values)[i] if dim in da.coords else i
                  for dim, i in zip(extra_dims, idx))
            for idx in np.ndindex(*da.shape[2:])]
        for j, label in enumerate(labels):
            xj = x[:, j]
            mean = float(np.sum(w * xj))
            var = float(np.sum(w * (xj - mean) ** 2)) / max(1.0 - float(np.sum(w ** 2)), 1e-300)
            sd = math.sqrt(max(var, 0.0))
            q = _weighted_quantile(xj, w, np.array([lo, hi]))
            index.append(name if not label else f"{name}[{', '.join(str(v) for v in label)}]")
            rows.append([mean, sd, q[0], q[1], ess_kish, sd / math.sqrt(ess_kish) if ess_kish
                         else math.nan])
    return pd.DataFrame(rows, index=index, columns=["mean", "sd", f"eti{pct}_lb", f"eti{pct}_ub",
                                                    "ess_kish", "mcse_mean"])
