r"""Marked temporal point processes: multivariate Hawkes and intensity-free log-normal mixtures.

Data
----
A dataset is ``S`` event sequences, sequence ``s`` observed on the window
:math:`[t^{s}_{0}, T^{s}]` with events :math:`t_1 < \dots < t_{n_s}` and marks
:math:`m_i \in \{0, \dots, M-1\}`. They are held as padded arrays (see :func:`pad_sequences`):
``times`` (S, N), ``marks`` (S, N), ``mask`` (S, N) (True on real events, a prefix of each row),
``t_start`` (S,), ``t_end`` (S,). Padded slots carry ``time = t_end``, ``mark = 0`` and contribute
nothing. Every log-likelihood below includes the survival term of the last interval up to
:math:`T^{s}` and has one term per *sequence* (the ``log_likelihood`` group of a Fit is (chain,
draw, S), so PSIS-LOO leaves out whole sequences).

Multivariate Hawkes process (:func:`hawkes`)
--------------------------------------------
Marks are the dimensions. With exponential kernels whose decay belongs to the *source* mark,

.. math::

    \lambda_m(t) = \mu_m + \sum_{t_i < t} \alpha_{m, m_i}\, \beta_{m_i} e^{-\beta_{m_i}(t - t_i)},

so :math:`\alpha_{mk}` is the expected number of direct offspring of mark ``m`` from one event of
mark ``k`` (the branching matrix) and the process is stationary iff its spectral radius
:math:`\rho(\alpha) < 1`; then the stationary rates are :math:`(I - \alpha)^{-1}\mu`. The exact
log-likelihood of one sequence is

.. math::

    \sum_i \log \lambda_{m_i}(t_i) - \sum_m \mu_m (T - t_0)
    - \sum_i \sum_m \alpha_{m, m_i} \big(1 - e^{-\beta_{m_i}(T - t_i)}\big),

the last two terms being the compensator :math:`\sum_m \int_{t_0}^{T} \lambda_m`. The excitation
state :math:`R_{jk} = \sum_{i<j,\, m_i = k} e^{-\beta_k (t_j - t_i)}` obeys the linear recursion
:math:`R_j = e^{-\beta \Delta_j} \odot (R_{j-1} + e_{m_{j-1}})`: O(N M) per sequence, computed by a
``lax.scan`` over events carrying the decayed state per mark (default, ``method="scan"``) or by
``lax.associative_scan`` on the affine maps :math:`x \mapsto a x + b` (``method="associative"``:
the same numbers at logarithmic depth, for long sequences on parallel hardware; it compiles
more slowly).

Priors (``r = 1 / time_scale``, ``time_scale`` about the mean time between events):
``mu ~ Gamma(2, 4 M / r)`` (mean ``r / (2M)``), ``alpha[m, k] ~ Gamma(2, 4 M)`` (mean
``1 / (2M)``: the expected column sums, the branching ratios of the sources, are 1/2) and
``beta[k] ~ LogNormal(log(3 r), 1.5)``. The prior probability that :math:`\rho(\alpha) \ge 1` is
about 9 % for M = 1 and below 5 % for M >= 3 ("stationary in bulk", not by construction, so that a
clearly explosive dataset is visible in the posterior); :func:`stability` reports the spectral
radius per draw and warns when any draw has :math:`\rho \ge 1`; :func:`flag_stability` puts that
into ``Fit.flags``.

Intensity-free marked TPP (:func:`lognormmix`)
----------------------------------------------
After event ``j - 1`` the history is summarised by exponentially decayed counts per mark,
:math:`c_{j} = e^{-\gamma (t_{j-1} - t_{j-2})} c_{j-1} + e_{m_{j-1}}` (``c_0 = 0``, learned decay
:math:`\gamma`), and :math:`h_j = \log(1 + c_j) \in \mathbb{R}^M`. The next event's mark and
inter-event time :math:`\tau_j = t_j - t_{j-1}` (:math:`t_{-1} = t_0`) are

.. math::

    p(m \mid h) = \mathrm{softmax}(b + W h)_m, \qquad
    p(\tau \mid m, h) = \sum_{k=1}^{K} w_k(m, h)\, \mathrm{LogNormal}(\tau;\, \ell_k(m, h), s_k(m, h)),

with ``w = softmax(mix_bias[m] + h @ mix_weight)``, ``l = loc_bias[m] + h @ loc_weight`` and
``log s = log_scale_bias[m] + h @ log_scale_weight`` (clipped to [-7, 3]): time and mark are *not*
factorised. With
``mark_dependent=False`` the biases have one row shared by all marks, so
:math:`p(\tau \mid m, h) = p(\tau \mid h)`: the conditionally independent comparison. The last
interval contributes :math:`\log \sum_m p(m \mid h)\, S(T - t_{n} \mid m, h)`, with the mixture
survival :math:`S(\tau \mid m, h) = \sum_k w_k \Phi\big(-(\log\tau - \ell_k)/s_k\big)`.
The components are exchangeable (label switching: R-hat of the component parameters can be large;
predictions are unaffected). Importing this module registers the relabel spec ``"lognormmix"``
(:data:`LOGNORMMIX_RELABEL_SPEC`: the component axis is the last axis of ``mix_bias``,
``mix_weight``, ``loc_bias``, ``loc_weight``, ``log_scale_bias`` and ``log_scale_weight``; the
pivot method compares components by ``loc_bias``), so ``bl.relabel(fit, "lognormmix")`` aligns
the components across draws and chains before per-component summaries. It undoes the exact
symmetry, one permutation shared by every mark; with ``mark_dependent=True`` chains can also
settle in modes whose component order differs between mark rows, which no relabelling joins.
Priors: ``decay ~ LogNormal(log r, 1)``, ``mark_bias ~ N(0, 2)``,
``mark_weight, mix_bias, mix_weight, loc_weight ~ N(0, 1)``, ``loc_bias ~ N(log time_scale, 2)``,
``log_scale_bias ~ N(0, 1)``, ``log_scale_weight ~ N(0, 0.5)``. Inter-event times are floored at
:data:`TAU_FLOOR` times ``time_scale`` (ties created by rounding to float32 would otherwise give
:math:`\log 0`).

Length buckets: :func:`bucket_by_length` splits a dataset into groups padded only to their own
longest sequence, and :func:`hawkes_buckets` / :func:`lognormmix_buckets` are the same posteriors
on them (one site ``events_<b>`` per bucket), for datasets of very unequal lengths.

Both programs observe one site ``events`` (S, N, 3) = (time, mark, mask) whose distribution can
also *sample* (Ogata thinning / sequential exact sampling in JAX), so prior predictive checks and
:func:`bayeslik.sbc` work. Simulated sequences that would overflow the ``N`` slots come back as
NaN (and are dropped by SBC, which is valid: ranks are uniform conditionally on any dataset).

Example
-------
>>> import jax, bayeslik as bl
>>> from bayeslik.models import tpp
>>> params = {"mu": [0.5, 0.3], "alpha": [[0.3, 0.1], [0.2, 0.2]], "beta": [2.0, 1.0]}
>>> data = tpp.simulate_hawkes(jax.random.key(0), params, t_end=50.0, num_sequences=4)
>>> post = bl.Posterior(tpp.hawkes, **data)
>>> fit = bl.fit(post, "nuts", num_warmup=200, num_samples=200, num_chains=2,
...              progress_bar=False)                                           # doctest: +SKIP
>>> tpp.stability(fit).frac_unstable                                           # doctest: +SKIP
"""

from __future__ import annotations

import gzip
import json
import math
import warnings
from importlib import resources
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax import lax
from jax.scipy.special import log_ndtr, logsumexp
from numpyro.distributions import constraints

from bayeslik.errors import DataError, ModelError, OptionError
from bayeslik.relabel import register_components

__all__ = [
    "TAU_FLOOR", "HawkesProcess", "LogNormMixProcess", "StabilityReport",
    "pad_sequences", "unpad", "validate_events", "split_sequences", "default_time_scale",
    "hawkes", "lognormmix", "bucket_by_length", "hawkes_buckets", "lognormmix_buckets", "hawkes_loglik", "lognormmix_loglik", "event_terms",
    "simulate_hawkes", "simulate_lognormmix", "stability", "flag_stability",
    "init_params", "param_draws", "next_event", "example", "example_hawkes", "example_lognormmix", "intensity", "evaluate", "load", "load_synthetic",
    "HAWKES_SITES", "LOGNORMMIX_SITES", "LOGNORMMIX_RELABEL_SPEC", "LOGNORMMIX_RELABEL_COST_SITES",
]

#: Inter-event times below TAU_FLOOR * time_scale are raised to it in the log-normal mixture.
TAU_FLOOR = 1e-6

HAWKES_SITES = ("mu", "alpha", "beta")
LOGNORMMIX_SITES = ("decay", "mark_bias", "mark_weight", "mix_bias", "mix_weight", "loc_bias",
                    "loc_weight", "log_scale_bias", "log_scale_weight")
#: The log-normal mixture's sites that carry the component axis, ``{site: axis}`` (axes of the
#: site's value): every ``(Md, K)`` bias and ``(M, K)`` weight, component last. Registered for
#: :func:`bayeslik.relabel.relabel` as ``"lognormmix"`` when this module is imported.
LOGNORMMIX_RELABEL_SPEC = {"mix_bias": 1, "mix_weight": 1, "loc_bias": 1, "loc_weight": 1,
                           "log_scale_bias": 1, "log_scale_weight": 1}
#: The sites the pivot method compares components by: the log-time locations (one per mark row),
#: as the Gaussian mixture's spec uses its means.
LOGNORMMIX_RELABEL_COST_SITES = ("loc_bias",)

# Gauss-Legendre nodes on (0, 1), for integrals over the next inter-event time
_GL_X, _GL_W = np.polynomial.legendre.leggauss(64)
_GL_X, _GL_W = (_GL_X + 1) / 2, _GL_W / 2


# ------------------------------------------------------------------------------------ data
def _is_concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def validate_events(times, marks, mask, t_start, t_end, num_marks: int, *, strict: bool = True) -> None:
    """Check a padded dataset in NumPy; ``DataError`` naming the argument and sequence index.

    Rules: ``times``, ``marks``, ``mask`` have one shape (S, N); ``t_start``, ``t_end`` (S,);
    no NaN/inf; ``mask`` is a prefix (True then False) in each row; the real times are strictly
    increasing (non-decreasing with ``strict=False``: the models accept ties that rounding to
    float32 creates) and inside ``[t_start, t_end]``; marks are integers in ``0..num_marks-1``.

    >>> validate_events([[0.5, 2.0]], [[0, 1]], [[True, True]], [0.0], [1.0], 2)
    Traceback (most recent call last):
    ...
    bayeslik.errors.DataError: times: sequence 0 has an event at 2 after its t_end 1; the window must contain every event
    """
    if not isinstance(num_marks, (int, np.integer)) or num_marks < 1:
        raise ModelError(f"num_marks must be a positive int, got {num_marks!r}")
    times, marks, mask = np.asarray(times), np.asarray(marks), np.asarray(mask)
    t_start, t_end = np.asarray(t_start), np.asarray(t_end)
    if times.ndim != 2:
        raise DataError(f"times must have shape (num_sequences, max_events), got {times.shape}; "
                        "use tpp.pad_sequences to build the padded arrays from a list")
    S, N = times.shape
    for name, arr, shape in (("marks", marks, (S, N)), ("mask", mask, (S, N)),
                             ("t_start", t_start, (S,)), ("t_end", t_end, (S,))):
        if arr.shape != shape:
            raise DataError(f"{name} must have shape {shape} like times {times.shape}, got {arr.shape}")
    for name, arr in (("times", times), ("marks", marks), ("t_start", t_start), ("t_end", t_end)):
        if arr.dtype.kind not in "biuf":
            raise DataError(f"{name} must be numeric, got dtype {arr.dtype}")
        bad = ~np.isfinite(arr.astype(float))
        if bad.any():
            s = int(np.argwhere(bad)[0][0])
            raise DataError(f"{name}: sequence {s} has NaN or infinite values; remove them")
    if mask.dtype.kind not in "biu" or not np.all((mask == 0) | (mask == 1)):
        raise DataError("mask must be boolean (True on real events, False on padding)")
    mask = mask.astype(bool)
    not_prefix = np.any(~mask[:, :-1] & mask[:, 1:], axis=1)
    if not_prefix.any():
        raise DataError(f"mask: sequence {int(np.argmax(not_prefix))} has a real event after a padded "
                        "slot; the real events must come first in each row")
    bad = t_end <= t_start
    if bad.any():
        s = int(np.argmax(bad))
        raise DataError(f"t_end: sequence {s} has t_end {t_end[s]:g} <= t_start {t_start[s]:g}")
    marks_f = marks.astype(float)
    bad = mask & ((marks_f != np.round(marks_f)) | (marks_f < 0) | (marks_f >= num_marks))
    if bad.any():
        s, i = (int(v) for v in np.argwhere(bad)[0])
        raise DataError(f"marks: sequence {s} has mark {marks_f[s, i]:g} at event {i}; marks must be "
                        f"integers in 0..{num_marks - 1} (num_marks={num_marks})")
    t = times.astype(float)
    bad = mask & (t < t_start[:, None])
    if bad.any():
        s, i = (int(v) for v in np.argwhere(bad)[0])
        raise DataError(f"times: sequence {s} has an event at {t[s, i]:g} before its t_start "
                        f"{t_start[s]:g}; the window must contain every event")
    bad = mask & (t > t_end[:, None])
    if bad.any():
        s, i = (int(v) for v in np.argwhere(bad)[0])
        raise DataError(f"times: sequence {s} has an event at {t[s, i]:g} after its t_end "
                        f"{t_end[s]:g}; the window must contain every event")
    d = np.diff(t, axis=1)
    bad = mask[:, 1:] & ((d <= 0) if strict else (d < 0))
    if bad.any():
        s, i = (int(v) for v in np.argwhere(bad)[0])
        raise DataError(f"times: sequence {s} is not {'strictly ' if strict else ''}increasing at event {i + 1} "
                        f"({t[s, i]:g} then {t[s, i + 1]:g}); sort the events and drop duplicates")


def pad_sequences(sequences: Sequence, num_marks: int | None = None, *, max_len: int | None = None,
                  dtype=np.float64) -> dict:
    """Padded arrays from a list of sequences; validated (see :func:`validate_events`).

    Each sequence is a dict with ``times`` (or ``arrival_times``), optional ``marks`` (default all
    0), ``t_start`` (default 0) and ``t_end`` (default: the last event). Returns ``{"times",
    "marks", "mask", "t_start", "t_end", "num_marks"}`` ready for ``bl.Posterior(tpp.hawkes,
    **data)``. ``max_len`` pads to at least that many slots (to share a compiled program).

    >>> d = pad_sequences([{"times": [0.5, 1.0], "marks": [1, 0], "t_end": 2.0},
    ...                    {"times": [0.2], "marks": [1], "t_end": 3.0}])
    >>> d["times"].shape, d["mask"].sum(), d["num_marks"]
    ((2, 2), np.int64(3), 2)
    """
    if len(sequences) == 0:
        raise DataError("sequences is empty; pass at least one sequence")
    ts, ms, t0s, t1s = [], [], [], []
    for s, seq in enumerate(sequences):
        if not isinstance(seq, dict):
            raise DataError(f"sequences[{s}] must be a dict with 'times', 'marks', 't_start', 't_end'")
        t = np.asarray(seq.get("times", seq.get("arrival_times", [])), dtype=float).reshape(-1)
        m = np.asarray(seq.get("marks", np.zeros(len(t), int))).reshape(-1)
        if len(m) != len(t):
            raise DataError(f"sequences[{s}]: {len(t)} times but {len(m)} marks")
        t0 = float(seq.get("t_start", 0.0))
        t1 = float(seq["t_end"]) if seq.get("t_end") is not None else (float(t[-1]) if len(t) else np.nan)
        ts.append(t), ms.append(m), t0s.append(t0), t1s.append(t1)
    if num_marks is None:
        num_marks = int(max((int(np.max(m)) for m in ms if len(m)), default=0)) + 1
    N = max(max(len(t) for t in ts), 1, max_len or 0)
    S = len(ts)
    times = np.empty((S, N), dtype)
    marks = np.zeros((S, N), np.float64)
    mask = np.zeros((S, N), bool)
    for s, (t, m) in enumerate(zip(ts, ms)):
        n = len(t)
        times[s] = t1s[s]
        times[s, :n], marks[s, :n], mask[s, :n] = t, m, True
    t_start, t_end = np.asarray(t0s, dtype), np.asarray(t1s, dtype)
    validate_events(times, marks, mask, t_start, t_end, int(num_marks))
    marks = marks.astype(np.int32)
    return {"times": times, "marks": marks, "mask": mask, "t_start": t_start, "t_end": t_end,
            "num_marks": int(num_marks)}


def unpad(data: dict) -> list[dict]:
    """The list of sequences of a padded dataset (inverse of :func:`pad_sequences`)."""
    out = []
    for s in range(len(data["t_end"])):
        keep = np.asarray(data["mask"][s], bool)
        out.append({"times": np.asarray(data["times"][s])[keep], "marks": np.asarray(data["marks"][s])[keep],
                    "t_start": float(data["t_start"][s]), "t_end": float(data["t_end"][s])})
    return out


def split_sequences(sequences: Sequence, fractions=(0.6, 0.2, 0.2), seed: int = 0) -> tuple[list, ...]:
    """Random split of a list of sequences by sequence (e.g. 60/20/20 train/validation/test)."""
    if not np.isclose(sum(fractions), 1) or min(fractions) < 0:
        raise OptionError(f"fractions must be non-negative and sum to 1, got {fractions}")
    order = np.random.default_rng(seed).permutation(len(sequences))
    cuts = np.round(np.cumsum(fractions)[:-1] * len(sequences)).astype(int)
    return tuple([sequences[i] for i in part] for part in np.split(order, cuts))


def default_time_scale(data: dict) -> float:
    """Mean time between events of a padded dataset (total window length / number of events)."""
    n = max(float(np.sum(data["mask"])), 1.0)
    return float(np.sum(np.asarray(data["t_end"]) - np.asarray(data["t_start"])) / n)


def _unpack(value):
    times = value[..., 0]
    marks = value[..., 1].astype(jnp.int32)
    mask = value[..., 2] > 0.5
    return times, marks, mask


def _pack(times, marks, mask):
    times = jnp.asarray(times)
    return jnp.stack([times, jnp.asarray(marks, times.dtype), jnp.asarray(mask, times.dtype)], -1)


# ------------------------------------------------------------------------------------ recursions
def _decayed_state(dt, inc, decay, method: str = "scan"):
    """x_j = exp(-decay * dt_j) * (x_{j-1} + inc_{j-1}), x_0 = 0 (the state just before event j).

    dt (..., N), inc (..., N, M), decay (M,) or broadcastable -> (..., N, M).
    """
    a = jnp.exp(-decay * dt[..., None])
    prev_inc = jnp.concatenate([jnp.zeros_like(inc[..., :1, :]), inc[..., :-1, :]], axis=-2)
    a, b = jnp.broadcast_arrays(a, a * prev_inc)
    if method == "associative":
        def combine(e1, e2):
            return e1[0] * e2[0], e2[0] * e1[1] + e2[1]

        return lax.associative_scan(combine, (a, b), axis=a.ndim - 2)[1]
    if method != "scan":
        raise OptionError(f"method must be 'associative' or 'scan', got {method!r}")
    lead = a.shape[:-2]
    a_t = jnp.moveaxis(a, -2, 0)
    b_t = jnp.moveaxis(b, -2, 0)

    def step(x, ab):
        x = ab[0] * x + ab[1]
        return x, x

    _, xs = lax.scan(step, jnp.zeros(lead + a.shape[-1:], a.dtype), (a_t, b_t))
    return jnp.moveaxis(xs, 0, -2)


def _intervals(times, mask, t_start):
    """dt_j = t_j - t_{j-1} with t_{-1} = t_start; 0 on padded slots."""
    prev = jnp.concatenate([t_start[..., None], times[..., :-1]], axis=-1)
    return jnp.where(mask, times - prev, 0.0)


def _is_last(mask):
    """(S, N) one at the last real event of each sequence (all zero without events)."""
    nxt = jnp.concatenate([mask[..., 1:], jnp.zeros_like(mask[..., :1])], axis=-1)
    return (mask & ~nxt).astype(jnp.result_type(float))


def _last_index(mask):
    """(index of the last real event, number of events) per sequence."""
    n = jnp.sum(mask, axis=-1)
    return jnp.maximum(n - 1, 0), n


# ------------------------------------------------------------------------------------ Hawkes
def _hawkes_parts(params, times, marks, mask, t_start, t_end, method="scan"):
    """Per-event pieces of the Hawkes likelihood for one or more sequences."""
    mu, alpha, beta = (jnp.asarray(params[k]) for k in HAWKES_SITES)
    M = mu.shape[-1]
    onehot = jax.nn.one_hot(marks, M, dtype=mu.dtype) * mask[..., None]
    dt = _intervals(times, mask, t_start)
    R = _decayed_state(dt, onehot, beta, method)                      # (S, N, M) before event j
    lam = mu + (R * beta) @ alpha.T                                   # (S, N, M)
    lam_tot = lam.sum(-1)
    lam_m = (lam * onehot).sum(-1) + (~mask)     # dense gathers: a scatter in the gradient is slow on CPU
    return dict(R=R, onehot=onehot, lam=lam, lam_tot=lam_tot, lam_m=lam_m, dt=dt)


def hawkes_loglik(params, times, marks, mask, t_start, t_end, *, method="scan",
                  split: bool = False):
    """Exact log-likelihood of each sequence (S,) under the Hawkes process (see module doc).

    ``split=True`` returns ``(time part, mark part)``: ``log p(times)`` (with the compensator) and
    ``sum_i log p(m_i | t_i, history) = log lambda_{m_i} / lambda_total``.
    """
    mu, alpha, beta = (jnp.asarray(params[k]) for k in HAWKES_SITES)
    p = _hawkes_parts(params, times, marks, mask, t_start, t_end, method)
    safe = lambda x: jnp.where(mask, x, 1.0)
    log_tot = jnp.where(mask, jnp.log(safe(p["lam_tot"])), 0.0).sum(-1)
    log_mark = jnp.where(mask, jnp.log(safe(p["lam_m"])) - jnp.log(safe(p["lam_tot"])), 0.0).sum(-1)
    offspring = alpha.sum(0)                                          # (M,) by source mark
    rest = jnp.where(mask, t_end[..., None] - times, 0.0)
    comp_events = (p["onehot"] * offspring * (1 - jnp.exp(-beta * rest[..., None]))).sum((-1, -2))
    compensator = mu.sum() * (t_end - t_start) + comp_events
    if split:
        return log_tot - compensator, log_mark
    return log_tot + log_mark - compensator


class HawkesProcess(dist.Distribution):
    """The multivariate exponential-kernel Hawkes process on ``[t_start, t_end]`` per sequence.

    ``value`` (S, N, 3): (time, mark, mask) per slot (see :func:`pad_sequences`). ``log_prob``
    gives one exact log-likelihood per sequence (batch shape (S,)); ``sample`` runs Ogata
    thinning in JAX with ``N`` slots (NaN times if a sequence would need more).
    """

    arg_constraints = {"mu": constraints.positive, "beta": constraints.positive}
    support = constraints.independent(constraints.real, 2)
    pytree_data_fields = ("mu", "alpha", "beta", "t_start", "t_end")
    pytree_aux_fields = ("num_slots", "method")

    def __init__(self, mu, alpha, beta, t_start, t_end, num_slots: int, *, method="scan",
                 validate_args=None):
        self.mu, self.alpha, self.beta = jnp.asarray(mu), jnp.asarray(alpha), jnp.asarray(beta)
        self.t_start, self.t_end = jnp.asarray(t_start), jnp.asarray(t_end)
        self.num_slots, self.method = int(num_slots), method
        super().__init__(batch_shape=jnp.shape(self.t_end), event_shape=(self.num_slots, 3),
                         validate_args=validate_args)

    def log_prob(self, value):
        times, marks, mask = _unpack(value)
        return hawkes_loglik({"mu": self.mu, "alpha": self.alpha, "beta": self.beta}, times, marks,
                             mask, self.t_start, self.t_end, method=self.method)

    def sample(self, key, sample_shape=()):
        params = {"mu": self.mu, "alpha": self.alpha, "beta": self.beta}
        n = math.prod(sample_shape) * math.prod(self.batch_shape)
        t0 = jnp.broadcast_to(self.t_start, tuple(sample_shape) + self.batch_shape).reshape(-1)
        t1 = jnp.broadcast_to(self.t_end, tuple(sample_shape) + self.batch_shape).reshape(-1)
        out = jax.vmap(lambda k, a, b: _ogata_one(k, params, a, b, self.num_slots))(
            jax.random.split(key, n), t0, t1)
        return _pack(*out).reshape(tuple(sample_shape) + self.batch_shape + (self.num_slots, 3))


def _ogata_one(key, params, t_start, t_end, num_slots: int, max_steps: int | None = None):
    """Ogata thinning for one sequence: (times, marks, mask) with NaN times on overflow."""
    mu, alpha, beta = (jnp.asarray(params[k]) for k in HAWKES_SITES)
    M = mu.shape[-1]
    dtype = jnp.result_type(float)
    max_steps = max_steps or 20 * num_slots + 1000

    def cond(c):
        t, R, n, it, key, tb, mb = c
        return (t < t_end) & (n <= num_slots) & (it < max_steps)

    def body(c):
        t, R, n, it, key, tb, mb = c
        key, k1, k2, k3 = jax.random.split(key, 4)
        lam_bar = mu.sum() + (alpha @ (beta * R)).sum()       # intensities only decay until the next event
        t_new = t + jax.random.exponential(k1, dtype=dtype) / lam_bar
        R_new = R * jnp.exp(-beta * (t_new - t))
        lam = mu + alpha @ (beta * R_new)
        accept = (jax.random.uniform(k2, dtype=dtype) * lam_bar <= lam.sum()) & (t_new <= t_end)
        m = jax.random.categorical(k3, jnp.log(lam)).astype(jnp.int32)
        idx = jnp.minimum(n, num_slots - 1)
        tb = jnp.where(accept & (n < num_slots), tb.at[idx].set(t_new), tb)
        mb = jnp.where(accept & (n < num_slots), mb.at[idx].set(m), mb)
        R_new = R_new + accept * jax.nn.one_hot(m, M, dtype=dtype)
        return (t_new, R_new, n + accept, it + 1, key, tb, mb)

    init = (jnp.asarray(t_start, dtype), jnp.zeros(M, dtype), jnp.asarray(0), jnp.asarray(0), key,
            jnp.full(num_slots, t_end, dtype), jnp.zeros(num_slots, jnp.int32))
    t, R, n, it, _, tb, mb = lax.while_loop(cond, body, init)
    bad = (n > num_slots) | (it >= max_steps)
    mask = jnp.arange(num_slots) < n
    return jnp.where(bad, jnp.nan, tb), mb, mask


def _hawkes_priors(num_marks: int, time_scale: float):
    M, r = num_marks, 1.0 / time_scale
    mu = numpyro.sample("mu", dist.Gamma(2.0, 4.0 * M / r).expand([M]).to_event(1))
    alpha = numpyro.sample("alpha", dist.Gamma(2.0, 4.0 * M).expand([M, M]).to_event(2))
    beta = numpyro.sample("beta", dist.LogNormal(math.log(3 * r), 1.5).expand([M]).to_event(1))
    return {"mu": mu, "alpha": alpha, "beta": beta}


def _check_args(times, marks, mask, t_start, t_end, num_marks, time_scale):
    if not isinstance(num_marks, (int, np.integer)) or num_marks < 1:
        raise ModelError(f"num_marks must be a positive int, got {num_marks!r}")
    if not (isinstance(time_scale, (int, float)) and time_scale > 0):
        raise ModelError(f"time_scale must be a positive number (about the mean time between events), "
                         f"got {time_scale!r}")
    if _is_concrete(times, marks, mask, t_start, t_end):
        validate_events(times, marks, mask, t_start, t_end, int(num_marks), strict=False)


def hawkes(times, marks, mask, t_start, t_end, *, num_marks: int, time_scale: float = 1.0,
           method: str = "scan"):
    """NumPyro program: multivariate exponential Hawkes process (module doc for maths and priors).

    Latent sites ``mu`` (M,), ``alpha`` (M, M) (``alpha[m, k]``: offspring of mark m per event of
    mark k), ``beta`` (M,) (decay of each source mark); observed ``events`` (S, N, 3), one
    log-likelihood per sequence. Data from :func:`pad_sequences`.

    >>> import bayeslik as bl
    >>> d = pad_sequences([{"times": [0.5, 1.0, 1.1], "marks": [1, 0, 1], "t_end": 2.0}])
    >>> bl.Posterior(hawkes, **d).ndim
    8
    """
    _check_args(times, marks, mask, t_start, t_end, num_marks, time_scale)
    params = _hawkes_priors(int(num_marks), float(time_scale))
    _hawkes_observe("events", params, times, marks, mask, t_start, t_end, method)


def _hawkes_observe(name, params, times, marks, mask, t_start, t_end, method):
    times = jnp.asarray(times, jnp.result_type(float))
    numpyro.sample(name, HawkesProcess(params["mu"], params["alpha"], params["beta"],
                                       jnp.asarray(t_start, times.dtype), jnp.asarray(t_end, times.dtype),
                                       times.shape[-1], method=method),
                   obs=_pack(times, marks, mask))


# ------------------------------------------------------------------------------------ log-normal mixture
def _after_states(params, times, marks, mask, t_start, method="scan"):
    """Decayed counts per mark right after each event (S, N, M), at the event's time."""
    decay = jnp.asarray(params["decay"])
    M = params["mark_bias"].shape[-1]
    onehot = jax.nn.one_hot(marks, M, dtype=decay.dtype) * mask[..., None]
    dt = _intervals(times, mask, t_start)
    return _decayed_state(dt, onehot, decay, method) + onehot


def _history(params, times, marks, mask, t_start, method="scan"):
    """h_j = log(1 + c_j) (S, N, M), the history summary before event j, and the one after the
    last event (S, M)."""
    post = _after_states(params, times, marks, mask, t_start, method)
    c = jnp.concatenate([jnp.zeros_like(post[..., :1, :]), post[..., :-1, :]], axis=-2)
    last, n = _last_index(mask)
    c_end = (post * _is_last(mask)[..., None]).sum(-2)                  # 0 without events
    return jnp.log1p(c), jnp.log1p(c_end)


def _mixture(params, h):
    """(log p(m | h) (..., M), log w, loc, scale (..., Md, K)) for history summaries h (..., M)."""
    lin = lambda w: jnp.einsum("...m,mk->...k", h, w)              # plain contractions (fast on CPU)
    log_pm = jax.nn.log_softmax(params["mark_bias"] + lin(params["mark_weight"].T), axis=-1)
    log_w = jax.nn.log_softmax(params["mix_bias"] + lin(params["mix_weight"])[..., None, :], axis=-1)
    loc = params["loc_bias"] + lin(params["loc_weight"])[..., None, :]
    log_scale = params["log_scale_bias"] + lin(params["log_scale_weight"])[..., None, :]
    scale = jnp.exp(jnp.clip(log_scale, -7.0, 3.0))
    return log_pm, log_w, loc, scale


def _log_density_tau(log_w, loc, scale, tau):
    """log f(tau | m, h) (..., Md) of the log-normal mixture, tau (...,)."""
    lt = jnp.log(tau)[..., None, None]
    z = (lt - loc) / scale
    comp = -0.5 * z**2 - jnp.log(scale) - lt - 0.5 * math.log(2 * math.pi)
    return logsumexp(log_w + comp, axis=-1)


def _log_survival_tau(log_w, loc, scale, tau):
    """log S(tau | m, h) (..., Md)."""
    z = (jnp.log(tau)[..., None, None] - loc) / scale
    return logsumexp(log_w + log_ndtr(-z), axis=-1)


def _lnm_parts(params, times, marks, mask, t_start, t_end, time_scale=1.0, method="scan"):
    h, h_end = _history(params, times, marks, mask, t_start, method)
    dt = _intervals(times, mask, t_start)
    tau = jnp.where(mask, jnp.maximum(dt, TAU_FLOOR * time_scale), 1.0)
    log_pm, log_w, loc, scale = _mixture(params, h)
    log_f = _log_density_tau(log_w, loc, scale, tau)                     # (S, N, Md)
    joint = log_pm + log_f                                                # (S, N, M) log p(m, tau)
    log_ptau = logsumexp(joint, -1)
    log_pm_given_tau = joint - log_ptau[..., None]
    last, n = _last_index(mask)
    t_last = jnp.where(n > 0, (times * _is_last(mask)).sum(-1), t_start)
    tau_end = jnp.maximum(t_end - t_last, 0.0)
    lpm_e, lw_e, loc_e, sc_e = _mixture(params, h_end)
    log_surv = logsumexp(lpm_e + _log_survival_tau(lw_e, loc_e, sc_e, jnp.maximum(tau_end, 1e-30)), -1)
    log_surv = jnp.where(tau_end > 0, log_surv, 0.0)
    return dict(h=h, log_pm=log_pm, log_w=log_w, loc=loc, scale=scale, log_ptau=log_ptau,
                log_pm_given_tau=log_pm_given_tau, log_surv=log_surv, tau=tau)


def lognormmix_loglik(params, times, marks, mask, t_start, t_end, *, time_scale=1.0,
                      method="scan", split: bool = False):
    """Exact log-likelihood of each sequence (S,) under the log-normal mixture TPP.

    ``split=True``: ``(sum log p(tau_i | h_i) + log survival, sum log p(m_i | tau_i, h_i))``.
    """
    p = _lnm_parts(params, times, marks, mask, t_start, t_end, time_scale, method)
    lt = jnp.where(mask, p["log_ptau"], 0.0).sum(-1) + p["log_surv"]
    onehot = jax.nn.one_hot(marks, p["log_pm_given_tau"].shape[-1], dtype=lt.dtype)
    lm = jnp.where(mask, (p["log_pm_given_tau"] * onehot).sum(-1), 0.0).sum(-1)
    return (lt, lm) if split else lt + lm


class LogNormMixProcess(dist.Distribution):
    """The intensity-free marked TPP (log-normal mixture) on ``[t_start, t_end]`` per sequence.

    ``params`` is a dict of the sites in :data:`LOGNORMMIX_SITES`; ``value`` as in
    :class:`HawkesProcess`; ``sample`` draws exactly (mark, then time given mark and history).
    """

    support = constraints.independent(constraints.real, 2)
    pytree_data_fields = ("params", "t_start", "t_end")
    pytree_aux_fields = ("num_slots", "time_scale", "method")

    def __init__(self, params, t_start, t_end, num_slots: int, *, time_scale=1.0, method="scan",
                 validate_args=None):
        self.params = {k: jnp.asarray(v) for k, v in params.items()}
        self.t_start, self.t_end = jnp.asarray(t_start), jnp.asarray(t_end)
        self.num_slots, self.time_scale, self.method = int(num_slots), float(time_scale), method
        super().__init__(batch_shape=jnp.shape(self.t_end), event_shape=(self.num_slots, 3),
                         validate_args=validate_args)

    def log_prob(self, value):
        times, marks, mask = _unpack(value)
        return lognormmix_loglik(self.params, times, marks, mask, self.t_start, self.t_end,
                                 time_scale=self.time_scale, method=self.method)

    def sample(self, key, sample_shape=()):
        n = math.prod(sample_shape) * math.prod(self.batch_shape)
        t0 = jnp.broadcast_to(self.t_start, tuple(sample_shape) + self.batch_shape).reshape(-1)
        t1 = jnp.broadcast_to(self.t_end, tuple(sample_shape) + self.batch_shape).reshape(-1)
        out = jax.vmap(lambda k, a, b: _lnm_sample_one(k, self.params, a, b, self.num_slots))(
            jax.random.split(key, n), t0, t1)
        return _pack(*out).reshape(tuple(sample_shape) + self.batch_shape + (self.num_slots, 3))


def _lnm_sample_one(key, params, t_start, t_end, num_slots: int):
    M = params["mark_bias"].shape[-1]
    dtype = jnp.result_type(float)

    def cond(c):
        t, P, n, key, tb, mb, done = c
        return (~done) & (n <= num_slots)

    def body(c):
        t, P, n, key, tb, mb, done = c
        key, k1, k2, k3 = jax.random.split(key, 4)
        log_pm, log_w, loc, scale = _mixture(params, jnp.log1p(P))
        m = jax.random.categorical(k1, log_pm).astype(jnp.int32)
        row = jnp.minimum(m, log_w.shape[-2] - 1)                    # Md = 1 without mark dependence
        k = jax.random.categorical(k2, log_w[row])
        tau = jnp.exp(loc[row, k] + scale[row, k] * jax.random.normal(k3, dtype=dtype))
        t_new = t + tau
        done = t_new > t_end
        ok = (~done) & (n < num_slots)
        idx = jnp.minimum(n, num_slots - 1)
        tb = jnp.where(ok, tb.at[idx].set(t_new), tb)
        mb = jnp.where(ok, mb.at[idx].set(m), mb)
        P_new = jnp.exp(-params["decay"] * tau) * P + jax.nn.one_hot(m, M, dtype=dtype)
        P = jnp.where(done, P, P_new)
        return (jnp.where(done, t, t_new), P, n + (~done), key, tb, mb, done)

    init = (jnp.asarray(t_start, dtype), jnp.zeros(M, dtype), jnp.asarray(0), key,
            jnp.full(num_slots, t_end, dtype), jnp.zeros(num_slots, jnp.int32), jnp.asarray(False))
    t, P, n, _, tb, mb, done = lax.while_loop(cond, body, init)
    mask = jnp.arange(num_slots) < n
    return jnp.where(n > num_slots, jnp.nan, tb), mb, mask


def _lnm_priors(num_marks: int, num_components, mark_dependent: bool, time_scale: float):
    if not isinstance(num_components, (int, np.integer)) or num_components < 1:
        raise ModelError(f"num_components must be a positive int, got {num_components!r}")
    M, K = int(num_marks), int(num_components)
    Md = M if mark_dependent else 1
    r = 1.0 / time_scale

    def normal(name, loc, scale, shape):
        return numpyro.sample(name, dist.Normal(loc, scale).expand(list(shape)).to_event(len(shape)))

    return {
        "decay": numpyro.sample("decay", dist.LogNormal(math.log(r), 1.0)),
        "mark_bias": normal("mark_bias", 0.0, 2.0, (M,)),
        "mark_weight": normal("mark_weight", 0.0, 1.0, (M, M)),
        "mix_bias": normal("mix_bias", 0.0, 1.0, (Md, K)),
        "mix_weight": normal("mix_weight", 0.0, 1.0, (M, K)),
        "loc_bias": normal("loc_bias", math.log(time_scale), 2.0, (Md, K)),
        "loc_weight": normal("loc_weight", 0.0, 1.0, (M, K)),
        "log_scale_bias": normal("log_scale_bias", 0.0, 1.0, (Md, K)),
        "log_scale_weight": normal("log_scale_weight", 0.0, 0.5, (M, K)),
    }


def lognormmix(times, marks, mask, t_start, t_end, *, num_marks: int, num_components: int = 3,
               mark_dependent: bool = True, time_scale: float = 1.0, method: str = "scan"):
    """NumPyro program: intensity-free marked TPP with a log-normal mixture (module doc).

    ``mark_dependent=False`` gives the conditionally independent variant (``mix_bias``,
    ``loc_bias``, ``log_scale_bias`` with one shared row). Observed ``events`` (S, N, 3), one
    log-likelihood per sequence.

    >>> import bayeslik as bl
    >>> d = pad_sequences([{"times": [0.5, 1.0, 1.1], "marks": [1, 0, 1], "t_end": 2.0}])
    >>> bl.Posterior(lognormmix, **d, num_components=2).ndim
    31
    """
    _check_args(times, marks, mask, t_start, t_end, num_marks, time_scale)
    params = _lnm_priors(int(num_marks), num_components, bool(mark_dependent), float(time_scale))
    _lnm_observe("events", params, times, marks, mask, t_start, t_end, time_scale, method)


def _lnm_observe(name, params, times, marks, mask, t_start, t_end, time_scale, method):
    times = jnp.asarray(times, jnp.result_type(float))
    numpyro.sample(name, LogNormMixProcess(params, jnp.asarray(t_start, times.dtype),
                                           jnp.asarray(t_end, times.dtype), times.shape[-1],
                                           time_scale=float(time_scale), method=method),
                   obs=_pack(times, marks, mask))


# ------------------------------------------------------------------------------------ length buckets
_FIELDS = ("times", "marks", "mask", "t_start", "t_end")


def bucket_by_length(data: dict, edges: Sequence[int] = (32, 64, 128, 256)) -> dict:
    """Split a padded dataset into buckets of similar length, each padded only to its own longest
    sequence: ``{"times_0", "marks_0", "mask_0", "t_start_0", "t_end_0", ..., "num_buckets",
    "num_marks"}`` for :func:`hawkes_buckets` / :func:`lognormmix_buckets`.

    The work of the likelihood is proportional to the padded size, sum over buckets of
    (sequences x slots), instead of S x N_max; with months of 8 to 433 events this is about 5x
    less. Bucket ``b`` holds the sequences with ``edges[b-1] < n <= edges[b]`` (empty buckets are
    left out); the sequence order inside the buckets is the data's order.

    >>> d = pad_sequences([{"times": [1.0], "t_end": 2.0}, {"times": np.arange(1.0, 50), "t_end": 60.0}])
    >>> b = bucket_by_length(d); b["num_buckets"], b["times_0"].shape, b["times_1"].shape
    (2, (1, 1), (1, 49))
    """
    n = np.asarray(data["mask"]).sum(1)
    bounds = [-1] + sorted(int(e) for e in edges) + [max(int(n.max()), 1)]
    out, b = {}, 0
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        idx = np.nonzero((n > lo) & (n <= hi))[0]
        if idx.size == 0:
            continue
        width = max(int(n[idx].max()), 1)
        for k in _FIELDS:
            arr = np.asarray(data[k])[idx]
            out[f"{k}_{b}"] = arr[:, :width] if arr.ndim == 2 else arr
        b += 1
    out["num_buckets"], out["num_marks"] = b, int(data["num_marks"])
    return out


def _buckets(kw: dict, num_buckets: int) -> list[tuple]:
    missing = [f"{k}_{b}" for b in range(num_buckets) for k in _FIELDS if f"{k}_{b}" not in kw]
    if missing:
        raise DataError(f"missing bucket arrays {missing[:5]}; build them with tpp.bucket_by_length(data)")
    extra = sorted(set(kw) - {f"{k}_{b}" for b in range(num_buckets) for k in _FIELDS})
    if extra:
        raise DataError(f"unexpected arguments {extra}; the bucket arrays are {list(_FIELDS)} with "
                        f"suffixes _0.._{num_buckets - 1}, from tpp.bucket_by_length(data)")
    return [tuple(kw[f"{k}_{b}"] for k in _FIELDS) for b in range(num_buckets)]


def hawkes_buckets(*, num_marks: int, num_buckets: int, time_scale: float = 1.0, method: str = "scan", **arrays):
    """:func:`hawkes` on length buckets from :func:`bucket_by_length`: the same posterior, one
    observed site ``events_<b>`` per bucket (one log-likelihood per sequence in each).

    >>> import bayeslik as bl
    >>> d = pad_sequences([{"times": [1.0], "t_end": 2.0}, {"times": np.arange(1.0, 50), "t_end": 60.0}])
    >>> bl.Posterior(hawkes_buckets, **bucket_by_length(d)).ndim
    3
    """
    groups = _buckets(arrays, num_buckets)
    for g in groups:
        _check_args(*g, num_marks, time_scale)
    params = _hawkes_priors(int(num_marks), float(time_scale))
    for b, g in enumerate(groups):
        _hawkes_observe(f"events_{b}", params, *g, method)


def lognormmix_buckets(*, num_marks: int, num_buckets: int, num_components: int = 3, mark_dependent: bool = True,
                       time_scale: float = 1.0, method: str = "scan", **arrays):
    """:func:`lognormmix` on length buckets from :func:`bucket_by_length` (see :func:`hawkes_buckets`)."""
    groups = _buckets(arrays, num_buckets)
    for g in groups:
        _check_args(*g, num_marks, time_scale)
    params = _lnm_priors(int(num_marks), num_components, bool(mark_dependent), float(time_scale))
    for b, g in enumerate(groups):
        _lnm_observe(f"events_{b}", params, *g, time_scale, method)


def init_params(kind: str, num_marks: int, *, num_components: int = 3, mark_dependent: bool = True,
                time_scale: float = 1.0) -> dict:
    """A neutral starting point for NUTS (``init=`` of the engine): ``kind`` "hawkes" or
    "lognormmix". Hawkes: half the events background, branching ratio 0.2 per source, decay
    3 / time_scale. Mixture: no history effect, components spread over log(time_scale) +- 1.

    >>> sorted(init_params("hawkes", 2))
    ['alpha', 'beta', 'mu']
    """
    M, r = int(num_marks), 1.0 / time_scale
    if kind == "hawkes":
        return {"mu": np.full(M, 0.5 * r / M), "alpha": np.full((M, M), 0.2 / M), "beta": np.full(M, 3 * r)}
    if kind != "lognormmix":
        raise OptionError(f"kind must be 'hawkes' or 'lognormmix', got {kind!r}")
    K, Md = int(num_components), (M if mark_dependent else 1)
    spread = np.linspace(-1.0, 1.0, K) if K > 1 else np.zeros(1)
    return {"decay": np.asarray(r), "mark_bias": np.zeros(M), "mark_weight": np.zeros((M, M)),
            "mix_bias": np.zeros((Md, K)), "mix_weight": np.zeros((M, K)),
            "loc_bias": np.tile(math.log(time_scale) + spread, (Md, 1)), "loc_weight": np.zeros((M, K)),
            "log_scale_bias": np.zeros((Md, K)), "log_scale_weight": np.zeros((M, K))}


# ------------------------------------------------------------------------------------ simulation
def _as_params(params: dict) -> dict:
    return {k: jnp.asarray(v, jnp.result_type(float)) for k, v in params.items()}


def _check_simulate(t_end, t_start, num_sequences, max_events) -> None:
    """OptionError naming the first bad window or size of a simulation, before anything runs."""
    for name, v in (("num_sequences", num_sequences), ("max_events", max_events)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise OptionError(f"{name} must be a positive integer, got {v!r}")
    try:
        t0, t1 = float(t_start), float(t_end)
    except (TypeError, ValueError):
        raise OptionError(f"t_start and t_end must be numbers, got {t_start!r} and {t_end!r}") from None
    if not (math.isfinite(t0) and math.isfinite(t1) and t1 > t0):
        raise OptionError(f"the window needs finite t_start < t_end, got t_start={t_start!r}, "
                          f"t_end={t_end!r}")


def _simulate(sample_one, rng_key, params, t_end, t_start, num_sequences, max_events, num_marks):
    _check_simulate(t_end, t_start, num_sequences, max_events)
    t0 = jnp.full(num_sequences, t_start, jnp.result_type(float))
    t1 = jnp.full(num_sequences, t_end, jnp.result_type(float))
    keys = jax.random.split(rng_key, num_sequences)
    times, marks, mask = jax.jit(jax.vmap(lambda k, a, b: sample_one(k, params, a, b, max_events)))(keys, t0, t1)
    times = np.asarray(times, np.float64)
    if np.isnan(times).any():
        bad = int(np.argmax(np.isnan(times).any(1)))
        raise OptionError(f"max_events={max_events} is too small: sequence {bad} has more events "
                          "(or the process is explosive); raise max_events or shorten t_end")
    mask = np.asarray(mask)
    n = max(int(mask.sum(1).max()), 1)
    return {"times": times[:, :n], "marks": np.asarray(marks, np.int32)[:, :n], "mask": mask[:, :n],
            "t_start": np.asarray(t0, np.float64), "t_end": np.asarray(t1, np.float64),
            "num_marks": int(num_marks)}


def simulate_hawkes(rng_key, params: dict, t_end: float, *, t_start: float = 0.0,
                    num_sequences: int = 1, max_events: int = 2000) -> dict:
    """Exact simulation of the Hawkes process by Ogata thinning (JAX, vmapped over sequences).

    ``params``: ``mu`` (M,), ``alpha`` (M, M), ``beta`` (M,). Returns padded data as
    :func:`pad_sequences` (NumPy, float64 times; run under ``jax_enable_x64`` for float64
    arithmetic). Raises ``OptionError`` if a sequence needs more than ``max_events`` slots.

    >>> import jax
    >>> d = simulate_hawkes(jax.random.key(0), {"mu": [1.0], "alpha": [[0.5]], "beta": [2.0]}, 10.0)
    >>> d["times"].shape[0], d["num_marks"]
    (1, 1)
    """
    params = _as_params(params)
    M = params["mu"].shape[-1]
    if params["alpha"].shape != (M, M) or params["beta"].shape != (M,):
        raise ModelError(f"params: mu (M,), alpha (M, M), beta (M,) with M={M}; got alpha "
                         f"{params['alpha'].shape}, beta {params['beta'].shape}")
    return _simulate(_ogata_one, rng_key, params, t_end, t_start, num_sequences, max_events, M)


def simulate_lognormmix(rng_key, params: dict, t_end: float, *, t_start: float = 0.0,
                        num_sequences: int = 1, max_events: int = 2000) -> dict:
    """Exact simulation of the log-normal mixture TPP (mark, then time given mark and history).

    ``params``: the sites in :data:`LOGNORMMIX_SITES` (biases with M rows for the mark-dependent
    model, one row for the conditionally independent one). Returns padded data.
    """
    params = _as_params(params)
    return _simulate(_lnm_sample_one, rng_key, params, t_end, t_start, num_sequences, max_events,
                     params["mark_bias"].shape[-1])


# ------------------------------------------------------------------------------------ stability
class StabilityReport(NamedTuple):
    """Spectral radius of the branching matrix per draw (flattened over chains)."""

    spectral_radius: np.ndarray
    frac_unstable: float
    max_radius: float

    def __repr__(self) -> str:
        return (f"StabilityReport({self.spectral_radius.size} draws: rho median "
                f"{np.median(self.spectral_radius):.3f}, max {self.max_radius:.3f}, "
                f"{100 * self.frac_unstable:.1f}% of draws with rho >= 1)")


def stability(fit_or_params, *, warn: bool = True) -> StabilityReport:
    """Spectral radius rho(alpha) of the Hawkes branching matrix, per posterior draw.

    ``fit_or_params``: a Fit of :func:`hawkes`, or params with ``alpha`` (M, M) or (draws, M, M).
    Warns (``RuntimeWarning``) when any draw has rho >= 1 (a non-stationary, possibly explosive
    process) unless ``warn=False``.

    >>> stability({"alpha": [[0.5, 0.2], [0.1, 0.4]]}).frac_unstable
    0.0
    """
    alpha = param_draws(fit_or_params, ("alpha",))["alpha"]
    rho = np.abs(np.linalg.eigvals(np.asarray(alpha, np.float64))).max(-1)
    frac = float(np.mean(rho >= 1))
    report = StabilityReport(rho, frac, float(rho.max()))
    if warn and frac > 0:
        warnings.warn(f"Hawkes branching matrix: {100 * frac:.1f}% of draws have spectral radius >= 1 "
                      f"(max {rho.max():.3f}); the process is not stationary there", RuntimeWarning,
                      stacklevel=2)
    return report


def flag_stability(fit):
    """The Fit with a flag added when any draw has spectral radius >= 1 (else unchanged)."""
    import dataclasses

    rep = stability(fit, warn=False)
    if rep.frac_unstable == 0:
        return fit
    flag = (f"hawkes non-stationary: {100 * rep.frac_unstable:.1f}% of draws have rho(alpha) >= 1 "
            f"(max {rep.max_radius:.3f})")
    return dataclasses.replace(fit, flags=tuple(fit.flags) + (flag,))


# ------------------------------------------------------------------------------------ prediction
def param_draws(fit_or_params, names: Sequence[str] | None = None, num_draws: int | None = None) -> dict:
    """{site: (D, ...)} draws from a Fit (chains pooled, evenly thinned to ``num_draws``) or
    from a params dict (a single point gets a leading axis of length 1)."""
    if hasattr(fit_or_params, "idata"):
        post = fit_or_params.idata["posterior"]
        names = names or [n for n in post.data_vars]
        out = {}
        for n in names:
            v = np.asarray(post[n].values)
            out[n] = v.reshape((-1,) + v.shape[2:])
        D = len(next(iter(out.values())))
        if num_draws is not None and num_draws < D:
            idx = np.round(np.linspace(0, D - 1, num_draws)).astype(int)
            out = {k: v[idx] for k, v in out.items()}
        return out
    params = {k: np.asarray(v, np.float64) for k, v in fit_or_params.items()}
    names = names or list(params)
    if "alpha" in params and params["alpha"].ndim == 2 or "mark_bias" in params and params["mark_bias"].ndim == 1:
        return {n: params[n][None] for n in names}
    return {n: params[n] for n in names}


def _which(params: dict) -> str:
    if "alpha" in params:
        return "hawkes"
    if "mark_bias" in params:
        return "lognormmix"
    raise ModelError(f"params have neither Hawkes sites {HAWKES_SITES} nor log-normal mixture sites "
                     f"({sorted(params)})")


def _hawkes_next(params, times, marks, mask, t_start, t_end):
    """Per event j: mean of tau_j and p(m_j = . | history) (integrals by Gauss-Legendre), given
    the history up to event j-1; p(m | tau_j, history) = lambda_m / lambda_total."""
    mu, alpha, beta = (jnp.asarray(params[k]) for k in HAWKES_SITES)
    p = _hawkes_parts(params, times, marks, mask, t_start, t_end)
    post = p["R"] + p["onehot"]                                         # right after event j, at t_j
    R_after_prev = jnp.concatenate([jnp.zeros_like(post[..., :1, :]), post[..., :-1, :]], -2)
    mu_tot = mu.sum()
    A = alpha.sum(0)                                                    # (M,)
    u = jnp.asarray(_GL_X) ** 2                                         # nodes concentrated near 0
    w = jnp.asarray(_GL_W) * 2 * jnp.asarray(_GL_X)
    tau = -jnp.log1p(-u) / mu_tot                                       # (Q,)
    decay = jnp.exp(-beta * tau[:, None])                               # (Q, M)
    Rq = R_after_prev[..., None, :] * decay                             # (S, N, Q, M)
    excess = ((R_after_prev * A)[..., None, :] * (1 - decay)).sum(-1)   # (S, N, Q)
    surv_extra = jnp.exp(-excess)
    log_mean_tau = jnp.log((w * surv_extra).sum(-1)) - jnp.log(mu_tot)
    lam_q = mu + (Rq * beta) @ alpha.T                                  # (S, N, Q, M)
    pm = (w[:, None] * lam_q * surv_extra[..., None]).sum(-2) / mu_tot
    log_pm_given_tau = jnp.log(p["lam"]) - jnp.log(p["lam_tot"])[..., None]
    return log_mean_tau, pm, log_pm_given_tau


def _lnm_next(params, times, marks, mask, t_start, t_end, time_scale=1.0):
    p = _lnm_parts(params, times, marks, mask, t_start, t_end, time_scale)
    log_mean_m = logsumexp(p["log_w"] + p["loc"] + 0.5 * p["scale"] ** 2, -1)   # (S, N, Md)
    pm = jnp.exp(p["log_pm"])
    log_mean_tau = logsumexp(p["log_pm"] + log_mean_m, -1)   # a mixture over the next mark
    return log_mean_tau, pm, p["log_pm_given_tau"]


def next_event(fit_or_params, data: dict, *, num_draws: int | None = 200, time_scale: float = 1.0,
               bands=(0.05, 0.95)) -> dict:
    """One-step-ahead predictions for every event of ``data`` given its history, averaged over
    posterior draws, with bands.

    Returns ``mean_tau`` (S, N) (the predictive mean of the time from the previous event, a
    mixture over marks), ``mark_probs`` (S, N, M) = p(next mark | history) (marginal over the
    time), ``mark_probs_given_time`` (S, N, M) = p(mark | the true time, history), each averaged
    over draws, and ``mean_tau_lower/upper`` (quantiles over draws). Padded slots are NaN.

    >>> d = pad_sequences([{"times": [0.5, 1.0], "marks": [0, 0], "t_end": 2.0}])
    >>> out = next_event({"mu": [1.0], "alpha": [[0.5]], "beta": [2.0]}, d)
    >>> out["mean_tau"].shape, out["mark_probs"].shape
    ((1, 2), (1, 2, 1))
    """
    draws = param_draws(fit_or_params, num_draws=num_draws)
    fn = _hawkes_next if _which(draws) == "hawkes" else (
        lambda *a: _lnm_next(*a, time_scale=time_scale))
    args = _data_args(data)
    lmt, pm, lpm = jax.jit(jax.vmap(lambda prm: fn(prm, *args)))(_as_params(draws))
    mt = np.exp(np.asarray(lmt, np.float64))        # in float64: a wide log-normal's mean is large
    pm, pmt = np.asarray(pm), np.exp(np.asarray(lpm))
    if pm.shape[-1] != pmt.shape[-1]:
        pm = np.broadcast_to(pm, pmt.shape)
    mask = np.asarray(data["mask"], bool)
    nan = lambda x: np.where(mask if x.ndim == 2 else mask[..., None], x, np.nan)
    return {"mean_tau": nan(mt.mean(0)), "mean_tau_lower": nan(np.quantile(mt, bands[0], 0)),
            "mean_tau_upper": nan(np.quantile(mt, bands[1], 0)), "mark_probs": nan(pm.mean(0)),
            "mark_probs_given_time": nan(pmt.mean(0))}


def _data_args(data):
    dtype = jnp.result_type(float)
    return (jnp.asarray(data["times"], dtype), jnp.asarray(data["marks"], jnp.int32),
            jnp.asarray(data["mask"], bool), jnp.asarray(data["t_start"], dtype),
            jnp.asarray(data["t_end"], dtype))


def intensity(fit_or_params, sequence: dict, grid, *, num_draws: int | None = 200,
              time_scale: float = 1.0, bands=(0.05, 0.95)) -> dict:
    """Conditional intensities lambda_m(t) (G, M) of one sequence on a time grid, over draws.

    Hawkes: the closed form. Log-normal mixture: lambda_m(t) = p(m | h) f(t - t_last | m, h) /
    S(t - t_last | h), with h and t_last from the events strictly before t. ``sequence`` is a
    dict with ``times``, ``marks``, ``t_start``. Returns ``{"grid", "mean", "lower", "upper",
    "draws"}`` (draws: (D, G, M)).

    Examples:
        >>> lam = intensity({"mu": [1.0], "alpha": [[0.5]], "beta": [2.0]}, {"times": [0.5], "marks": [0]},
        ...                 [0.0, 0.5, 1.0])
        >>> [round(float(x), 3) for x in lam["mean"][:, 0]]
        [1.0, 1.0, 1.368]
    """
    draws = _as_params(param_draws(fit_or_params, num_draws=num_draws))
    which = _which(draws)
    t = jnp.asarray(np.asarray(sequence["times"], float), jnp.result_type(float))
    m = jnp.asarray(np.asarray(sequence["marks"]), jnp.int32)
    t0 = float(sequence.get("t_start", 0.0))
    g = jnp.asarray(np.asarray(grid, float), jnp.result_type(float))
    idx = jnp.searchsorted(t, g, side="left")                      # events strictly before g: 0..idx-1

    def hawkes_one(prm):
        M = prm["mu"].shape[-1]
        past = (t[None, :] < g[:, None])                            # (G, n)
        lag = jnp.where(past, g[:, None] - t[None, :], 0.0)
        kern = jnp.where(past[..., None], prm["beta"] * jnp.exp(-prm["beta"] * lag[..., None]), 0.0)
        kern = kern * jax.nn.one_hot(m, M)[None]                    # (G, n, M) by source mark
        return prm["mu"] + kern.sum(1) @ prm["alpha"].T

    def lnm_one(prm):
        after = jnp.log1p(_after_states(prm, t[None], m[None], jnp.ones((1, t.shape[0]), bool),
                                        jnp.asarray([t0], t.dtype))[0])      # (n, M) right after event i
        hg = jnp.where((idx > 0)[:, None], after[jnp.maximum(idx - 1, 0)], 0.0)
        t_last = jnp.where(idx > 0, t[jnp.maximum(idx - 1, 0)], t0)
        tau = jnp.maximum(g - t_last, 1e-12)
        log_pm, log_w, loc, scale = _mixture(prm, hg)
        log_f = _log_density_tau(log_w, loc, scale, tau)
        log_s = _log_survival_tau(log_w, loc, scale, tau)
        log_S = logsumexp(log_pm + log_s, -1)
        return jnp.exp(log_pm + log_f - log_S[:, None])

    one = hawkes_one if which == "hawkes" else lnm_one
    lam = np.asarray(jax.jit(jax.vmap(one))(draws))
    return {"grid": np.asarray(grid), "mean": lam.mean(0), "lower": np.quantile(lam, bands[0], 0),
            "upper": np.quantile(lam, bands[1], 0), "draws": lam}


def event_terms(params: dict, data: dict, *, time_scale: float = 1.0) -> dict:
    """Per-sequence log-likelihood parts for one parameter point: ``time`` (S,) (with the survival
    term), ``mark`` (S,) and ``total`` (S,)."""
    args = _data_args(data)
    if _which(params) == "hawkes":
        lt, lm = hawkes_loglik(_as_params(params), *args, split=True)
    else:
        lt, lm = lognormmix_loglik(_as_params(params), *args, time_scale=time_scale, split=True)
    return {"time": lt, "mark": lm, "total": lt + lm}


def evaluate(fit_or_params, data: dict, *, num_draws: int | None = 200, time_scale: float = 1.0) -> dict:
    """Held-out metrics over posterior draws: {metric: (mean over draws, sd over draws)}.

    * ``nll_time``, ``nll_mark``, ``nll_total``: negative log-likelihood per event (time part
      log p(tau | history) plus the survival terms; mark part log p(m | tau, history));
    * ``accuracy``: micro-F1 (= accuracy, one label per event) of argmax_m p(m | true time, history);
    * ``rmse``: RMSE of the predicted mean time to the next event against the true one.

    Also ``*_pred`` entries: the same metrics of the posterior-predictive (draw-averaged)
    predictions (NLL: -log of the draw-averaged likelihood of each sequence, per event).

    Examples:
        >>> d = pad_sequences([{"times": [0.5, 1.0, 1.2], "marks": [0, 1, 1], "t_end": 2.0}])
        >>> ev = evaluate(init_params("hawkes", 2), d)
        >>> sorted(k for k in ev if not k.endswith("_pred"))[:3]
        ['accuracy', 'nll_mark', 'nll_time']
    """
    draws = _as_params(param_draws(fit_or_params, num_draws=num_draws))
    which = _which(draws)
    args = _data_args(data)

    def one(prm):
        if which == "hawkes":
            lt, lm = hawkes_loglik(prm, *args, split=True)
            mt, _, lpm = _hawkes_next(prm, *args)
        else:
            lt, lm = lognormmix_loglik(prm, *args, time_scale=time_scale, split=True)
            mt, _, lpm = _lnm_next(prm, *args, time_scale=time_scale)
        return lt, lm, mt, lpm

    lt, lm, lmt, lpm = (np.asarray(x, np.float64) for x in jax.jit(jax.vmap(one))(draws))
    mt = np.exp(lmt)
    mask = np.asarray(data["mask"], bool)
    n_ev = mask.sum()
    marks = np.asarray(data["marks"])
    dt = np.asarray(_intervals(args[0], args[2], args[3]), np.float64)
    pred = lpm.argmax(-1)
    acc = ((pred == marks) & mask).sum((1, 2)) / n_ev
    err = np.where(mask, mt - dt, 0.0)
    rmse = np.sqrt((err**2).sum((1, 2)) / n_ev)
    out = {
        "nll_time": -lt.sum(1) / n_ev, "nll_mark": -lm.sum(1) / n_ev,
        "nll_total": -(lt + lm).sum(1) / n_ev, "accuracy": acc, "rmse": rmse,
    }
    res = {k: (float(v.mean()), float(v.std())) for k, v in out.items()}
    from scipy.special import logsumexp as lse

    D = lt.shape[0]
    res["nll_total_pred"] = float(-(lse(lt + lm, axis=0) - np.log(D)).sum() / n_ev)
    pmt = np.exp(lpm).mean(0)
    res["accuracy_pred"] = float(((pmt.argmax(-1) == marks) & mask).sum() / n_ev)
    res["rmse_pred"] = float(np.sqrt((np.where(mask, mt.mean(0) - dt, 0.0) ** 2).sum() / n_ev))
    res["num_events"] = int(n_ev)
    res["num_draws"] = int(D)
    return res


# ------------------------------------------------------------------------------------ zoo examples
def _example_data(num_months: int = 12) -> dict:
    if not isinstance(num_months, (int, np.integer)) or isinstance(num_months, bool) \
            or not 1 <= num_months <= 360:
        raise OptionError(f"num_months must be an integer in 1..360, got {num_months!r}")
    seqs = load()["sequences"][:num_months]              # 1990, M >= 4.5 (3 classes)
    data = pad_sequences(seqs, 3)
    data["time_scale"] = round(default_time_scale(data), 3)
    return data


def example() -> tuple:
    """The zoo's default problem (CLI name ``hawkes``): the multivariate Hawkes process on the 12
    months of 1990 of the bundled Japan catalog (M >= 4.5, 3 marks). Returns ``(model, data)``.

    >>> model, data = example()
    >>> data["times"].shape[0], data["num_marks"]
    (12, 3)
    """
    return hawkes, _example_data()


example_hawkes = example


def example_lognormmix() -> tuple:
    """The time-mark dependent log-normal mixture (2 components) on the same 12 months
    (CLI name ``lognormmix``). Returns ``(model, data)``."""
    return lognormmix, {**_example_data(), "num_components": 2}


# ------------------------------------------------------------------------------------ data sets
def _path(name: str):
    return resources.files("bayeslik.models") / "data" / "events" / name


#: Magnitude classes of the Japan catalog marks (bin edges 3.95/4.45/4.95/5.45).
JAPAN_CLASSES = ("M<4.0", "4.0<=M<4.5", "4.5<=M<5.0", "5.0<=M<5.5", "M>=5.5")


def load(marks: str = "complete") -> dict:
    """The Japan earthquake catalog (USGS ComCat, 1990-2019), one sequence per calendar month.

    ``marks="complete"`` (default) keeps only events with M >= 4.5, above the catalog's
    completeness magnitude, with 3 marks (4.5-5.0, 5.0-5.5, >= 5.5): the detection rate of the
    smaller classes changes over time (most sub-M4 events are left out after 2009), so their
    counts are not comparable across years. ``marks="all"`` keeps the 5 original classes.
    Times are in days from the start of the month; windows are the whole month.

    Returns ``{"sequences": [{"seq_id", "times", "marks", "magnitudes", "t_start", "t_end"}],
    "num_marks", "mark_names", "credit"}``. Source and terms: ``data/events/README.md``.

    >>> d = load()
    >>> len(d["sequences"]), d["num_marks"], sum(len(s["times"]) for s in d["sequences"])
    (360, 3, 18197)
    """
    if marks not in ("complete", "all"):
        raise OptionError(f"marks must be 'complete' (M>=4.5, 3 classes) or 'all' (5 classes), got {marks!r}")
    with _path("japan_marked_monthly.jsonl.gz").open("rb") as f:
        rows = [json.loads(line) for line in gzip.decompress(f.read()).decode().splitlines() if line]
    lo = 2 if marks == "complete" else 0
    seqs = []
    for r in rows:
        t, m, mag = (np.asarray(r[k]) for k in ("arrival_times", "marks", "magnitudes"))
        keep = m >= lo
        seqs.append({"seq_id": r["seq_id"], "times": t[keep].astype(float), "marks": (m[keep] - lo).astype(np.int32),
                     "magnitudes": mag[keep].astype(float), "t_start": float(r["t_start"]),
                     "t_end": float(r["t_end"])})
    return {"sequences": seqs, "num_marks": 5 - lo, "mark_names": JAPAN_CLASSES[lo:],
            "credit": "U.S. Geological Survey, Department of the Interior/USGS"}


def load_synthetic(name: str) -> list[dict]:
    """The synthetic Hawkes sets of Omi et al. (2019) / Shchur et al. (2020): ``"hawkes1"`` or
    ``"hawkes2"``, 64 unmarked sequences of 1024 events, windows [0, last event].

    Their generating processes have two exponential kernels (see ``data/events/README.md``), so a
    one-kernel Hawkes model is misspecified for ``hawkes2``.
    """
    if name not in ("hawkes1", "hawkes2"):
        raise OptionError(f"name must be 'hawkes1' or 'hawkes2', got {name!r}")
    with _path(f"{name}.npz").open("rb") as f:
        t = np.load(f)["arrival_times"]
    return [{"times": row.astype(float), "marks": np.zeros(len(row), np.int32), "t_start": 0.0,
             "t_end": float(row[-1])} for row in t]


def _check_relabel(fit) -> None:
    """The "lognormmix" relabel spec applies to Fits of :func:`lognormmix` (or its buckets):
    every component site present (their K is checked by bayeslik.relabel)."""
    post = fit.idata["posterior"]
    missing = [k for k in LOGNORMMIX_RELABEL_SPEC if k not in post]
    if missing:
        raise ModelError(f"relabel spec 'lognormmix': the Fit lacks the log-normal mixture's "
                         f"component site(s) {missing}; is it a Fit of tpp.lognormmix?")


register_components("lognormmix", LOGNORMMIX_RELABEL_SPEC,
                    cost_sites=LOGNORMMIX_RELABEL_COST_SITES, check_fn=_check_relabel)
