r"""Inverse-CDF (unit-cube) prior transforms for NumPyro distributions.

Nested sampling explores the unit hypercube :math:`[0, 1]^n` and needs a map
:math:`T` such that :math:`T(u)` is distributed as the prior when :math:`u` is
uniform. :class:`bayeslik.Posterior` builds that map site by site: it runs the
model under :func:`numpyro.handlers.substitute`, and for each latent sample site
(in program order, so every distribution is already conditioned on the values of
earlier sites) it hands the site's distribution and its slice of ``u`` to
:func:`icdf`. This module therefore only ever deals with one distribution at a time.

Public functions
----------------
:func:`unit_cube_shape`
    how many unit-cube coordinates (and in which shape) a site consumes;
:func:`icdf`
    the transform itself, a pure and jittable JAX function;
:func:`check_icdf`
    cheap, Python-only inspection that raises :class:`~bayeslik.errors.PriorTransformError`
    with an actionable message when a distribution is not supported.

The maths
---------
*Univariate families.* For a continuous univariate distribution with CDF :math:`F`,
the quantile function :math:`F^{-1}(u)` maps :math:`U(0, 1)` onto the distribution.
Every quantile here is computed from the *pair* :math:`(p, q) = (u, 1 - u)` and uses
whichever of the two is smaller, so that both tails keep full relative precision
(``1 - u`` is exact in floating point for :math:`u \ge 1/2`). Closed forms are used
where they exist; Gamma and Beta (and hence Student-t, Chi2, InverseGamma, truncated
Gamma and Dirichlet) are inverted numerically (numpyro's own ``icdf`` for them needs
TensorFlow Probability): the *logarithm* of the smaller tail probability is solved for
:math:`\log x` (Gamma) or :math:`\operatorname{logit} x` (Beta). In those coordinates
the densities are log-concave, so the log tail probabilities are concave and monotone
and a Newton-type iteration cannot run away. The best of a few classical
approximations starts a fixed number of bracketed Halley steps (no data-dependent
loop, so it is jittable); this reaches the float64 rounding floor (relative error
~1e-13, checked against scipy for shape parameters 1e-3 .. 1e5 and tail probabilities
down to 1e-16). Student-t uses the Beta relation, and the Cornish-Fisher expansion
for large degrees of freedom.

*Precision.* float32 and float64 both work; ``u`` is clipped to
:math:`[\epsilon, 1 - \epsilon]` of its dtype. In float32, JAX's incomplete gamma and
beta functions lose accuracy for shape parameters above ~1e3 (relative quantile errors
up to ~1e-4 for Gamma(1e4), more for a Beta with one shape above 1e3 and the other
below 1); enable ``jax_enable_x64`` for such priors. Values that
underflow (a Gamma(0.01) quantile at 1e-6 is ~1e-600) are clipped to the smallest
positive normal number, and every value is kept strictly inside the support.

*Truncation.* For a base with CDF :math:`F` and survival :math:`S = 1 - F` truncated
to :math:`[l, h]` with mass :math:`M`, the quantile is the base quantile of the pair
:math:`(F(l) + pM,\ S(h) + qM)`.

*Monotone transforms.* If :math:`Y = g(X)` with :math:`g` elementwise and strictly
increasing, :math:`F_Y^{-1}(u) = g(F_X^{-1}(u))`; if :math:`g` is decreasing,
:math:`F_Y^{-1}(u) = g(F_X^{-1}(1 - u))`.

*Dirichlet* (:math:`K` components, :math:`K - 1` coordinates): exact stick-breaking,
:math:`v_i \sim \mathrm{Beta}(\alpha_i, \sum_{j > i} \alpha_j)`,
:math:`x_i = v_i \prod_{j < i} (1 - v_j)` and :math:`x_K = \prod_{j < K}(1 - v_j)`,
evaluated in log space.

*Multivariate normal*: :math:`x = \mu + L\,\Phi^{-1}(u)` with :math:`L` the lower
Cholesky factor of the covariance. *Multivariate Student-t*: the same with
:math:`z_i` drawn sequentially from the exact conditionals of a standard
multivariate t, :math:`z_i \mid z_{<i} \sim \sqrt{(\nu + \sum_{j<i} z_j^2)/(\nu + i - 1)}
\; t_{\nu + i - 1}`.

Example
-------
>>> import jax.numpy as jnp
>>> import numpyro.distributions as dist
>>> from bayeslik.icdf import icdf, unit_cube_shape
>>> fn = dist.Normal(1.0, 2.0)
>>> float(icdf(fn, jnp.asarray(0.5)))
1.0
>>> unit_cube_shape(dist.Dirichlet(jnp.ones(4)))
(3,)
"""


from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax import lax
from jax.scipy.special import betainc, erfinv, gammainc, gammaincc, gammaln, ndtr, ndtri
from numpyro.distributions import constraints
from numpyro.distributions import transforms as T


def _optional(*names: str) -> tuple[type, ...]:
    """The NumPyro distribution classes of these names that this NumPyro version has."""
    return tuple(getattr(dist, n) for n in names if hasattr(dist, n))

from bayeslik.errors import DataError, PriorTransformError

__all__ = ["icdf", "unit_cube_shape", "check_icdf", "SUPPORTED_PRIORS"]

# The Gamma, Beta and Student-t quantile functions below are jitted on their own: under an
# outer jit they are inlined as usual, and called eagerly they compile once per shape and
# dtype instead of once per distribution instance.
#
# Halley steps of the Gamma / Beta inversions after the best starting guess. Across shape
# parameters 1e-3 .. 1e5 and tail probabilities down to 1e-16, 4 steps already reach the
# rounding-noise floor in float64; 8 leave a margin (the tests check 1e-10 against scipy).
_HALLEY_STEPS = 8
# Bounds that keep the Newton iterates finite (log-x or logit-x scale).
_T_LIMIT = 1e20


# ----------------------------------------------------------------------------------
# small numerical helpers
# ----------------------------------------------------------------------------------


def _float_dtype(*xs):
    dtype = jnp.result_type(*xs)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.result_type(float)
    return dtype


def _as(x, dtype):
    return jnp.asarray(x, dtype=dtype)


def _log_tail(p, q):
    """``(log p, log q)`` where the larger of the pair is taken from the smaller."""
    log_p = jnp.where(p <= q, jnp.log(p), jnp.log1p(-q))
    log_q = jnp.where(q <= p, jnp.log(q), jnp.log1p(-p))
    return log_p, log_q


@jax.jit
def _std_normal_quantile(p, q):
    r""":math:`\Phi^{-1}(p)` from the pair :math:`(p, 1 - p)`."""
    return jnp.where(p <= q, ndtri(p), -ndtri(q))


def _above(bound, dtype):
    """The smallest value strictly above ``bound`` (the smallest normal number above 0)."""
    bound = _as(bound, dtype)
    tiny = jnp.finfo(dtype).tiny
    return jnp.where(bound == 0, tiny, jnp.nextafter(bound, _as(jnp.inf, dtype)))


def _below(bound, dtype):
    bound = _as(bound, dtype)
    tiny = jnp.finfo(dtype).tiny
    return jnp.where(bound == 0, -tiny, jnp.nextafter(bound, _as(-jnp.inf, dtype)))


@jax.jit
def _clip_open(x, low, high):
    return jnp.clip(x, _above(low, x.dtype), _below(high, x.dtype))


@jax.jit
def _clip_open_below(x, low):
    return jnp.maximum(x, _above(low, x.dtype))


@jax.jit
def _clip_open_above(x, high):
    return jnp.minimum(x, _below(high, x.dtype))


def _clip_to_support(support, x):
    """Keep ``x`` strictly inside a univariate (or elementwise) support.

    Rounding and underflow (a Gamma(0.01) quantile at 1e-6 is 1e-600) can otherwise
    land exactly on a boundary where the log density is infinite.
    """
    x = jnp.asarray(x)
    while isinstance(support, constraints._IndependentConstraint):
        support = support.base_constraint
    if isinstance(support, constraints._Interval):
        return _clip_open(x, support.lower_bound, support.upper_bound)
    if isinstance(support, constraints._GreaterThan):
        return _clip_open_below(x, support.lower_bound)
    if isinstance(support, constraints._LessThan):
        return _clip_open_above(x, support.upper_bound)
    return x


def _solve(h_derivs: Callable, candidates):
    r"""Root of a concave, monotone function: best start, then bracketed Halley steps.

    ``h_derivs(t)`` returns :math:`(h, h', h''/h')` elementwise; ``candidates`` is a list
    of starting guesses (non-finite entries are skipped). A single loop first evaluates
    every candidate, keeping the one with the smallest :math:`|h|`, then takes
    ``_HALLEY_STEPS`` Halley steps from it: the Newton step :math:`h/h'` divided by
    :math:`1 - h h'' / (2 h'^2)`, that factor clipped to :math:`[1/4, 4]`. Every point
    evaluated narrows a bracket around the root (the sign of :math:`h h'` says on which
    side it lies); a step that would jump past the far end of a two-sided bracket is
    replaced by bisection, so a wild step can never throw the iteration far from the
    root. Evaluating the candidates inside the same loop keeps one copy of the (costly to
    compile) special functions in the program.
    """
    cands = jnp.stack(jnp.broadcast_arrays(*candidates))
    n_cand = len(candidates)
    shape = cands.shape[1:]
    limit = jnp.full(shape, _T_LIMIT, cands.dtype)
    inf = jnp.full(shape, jnp.inf, cands.dtype)
    zero = jnp.zeros(shape, cands.dtype)

    def body(i, carry):
        t, lo, hi, best_t, best_err, best_h, best_slope, best_curv = carry
        in_start = i < n_cand
        cand = lax.dynamic_index_in_dim(cands, jnp.minimum(i, n_cand - 1), 0, keepdims=False)
        t_eval = jnp.where(in_start, cand, t)
        h, slope, curv = h_derivs(t_eval)
        finite = jnp.isfinite(h) & jnp.isfinite(t_eval) & jnp.isfinite(slope) & (slope != 0)
        # bracket
        right = h * slope > 0  # t_eval is to the right of the root
        lo = jnp.where(finite & ~right, jnp.maximum(lo, t_eval), lo)
        hi = jnp.where(finite & right, jnp.minimum(hi, t_eval), hi)
        # best candidate
        err = jnp.where(finite, jnp.abs(h), jnp.inf)
        better = in_start & (err < best_err)
        best_t = jnp.where(better, t_eval, best_t)
        best_err = jnp.where(better, err, best_err)
        best_h = jnp.where(better, h, best_h)
        best_slope = jnp.where(better, slope, best_slope)
        best_curv = jnp.where(better, curv, best_curv)
        # Halley step from t_eval, or from the best candidate once all are evaluated
        last_start = i == n_cand - 1
        base = jnp.where(last_start, best_t, t_eval)
        h = jnp.where(last_start, best_h, h)
        slope = jnp.where(last_start, best_slope, slope)
        curv = jnp.where(last_start, best_curv, curv)
        newton = h / slope
        factor = jnp.clip(1.0 - 0.5 * newton * curv, 0.25, 4.0)
        step = newton / jnp.where(jnp.isfinite(factor), factor, 1.0)
        t_new = jnp.clip(base - step, -_T_LIMIT, _T_LIMIT)
        t_new = jnp.where(jnp.isnan(t_new), base, t_new)
        # a step past the far end of a two-sided bracket overshot the root (a step the
        # "wrong" way, possible only at rounding-noise level, is kept)
        bracketed = (lo > -_T_LIMIT) & (hi < _T_LIMIT)
        base_right = h * slope > 0
        overshot = jnp.where(base_right, t_new <= lo, t_new >= hi)
        t_new = jnp.where(bracketed & overshot, 0.5 * (lo + hi), t_new)
        t = jnp.where(in_start & ~last_start, t, t_new)
        return t, lo, hi, best_t, best_err, best_h, best_slope, best_curv

    init = (zero, -limit, limit, zero, inf, zero, zero, zero)
    t = lax.fori_loop(0, n_cand + _HALLEY_STEPS - 1, body, init)[0]
    return t


# ----------------------------------------------------------------------------------
# Gamma quantile
# ----------------------------------------------------------------------------------


def _gamma_quantile(a, p, q):
    r"""Quantile of :math:`\mathrm{Gamma}(a, 1)` from the pair :math:`(p, q = 1 - p)`.

    The arguments are broadcast and cast to one dtype first, so that the jitted solver
    (:func:`_gamma_quantile_jit`) is compiled once per shape and dtype.

    Example: ``_gamma_quantile(2.0, 0.5, 0.5)`` is the median of Gamma(2, 1), 1.6783...
    """
    return _gamma_quantile_jit(*_canonical(a, p, q))


def _canonical(*xs):
    """Broadcast to a common shape and cast to a common (strongly typed) float dtype."""
    dtype = _float_dtype(*xs)
    return tuple(jnp.broadcast_arrays(*(_as(x, dtype) for x in xs)))


@jax.jit
def _gamma_quantile_jit(a, p, q):
    r"""Solver behind :func:`_gamma_quantile` (arguments of one shape and dtype).

    Solves :math:`\log P(a, x) = \log p` when :math:`p \le q`, otherwise
    :math:`\log Q(a, x) = \log q` (regularised incomplete gamma functions), in
    :math:`t = \log x` with :func:`_solve`. Both sides are concave and monotone in
    :math:`t` (the density of :math:`\log X`, :math:`\propto e^{a t - e^t}`, is log-concave).
    With :math:`\ell(t) = a t - e^t - \log\Gamma(a)`, the log of :math:`x f(x)`, the
    derivatives are :math:`\pm e^{\ell - \log P}` and :math:`\pm e^{\ell - \log Q}`.
    Where :math:`P` or :math:`Q` underflows, their leading asymptotes stand in. Starting
    guesses: :math:`\log a`, Wilson-Hilferty, the small-:math:`x` series
    :math:`P \approx x^a / \Gamma(a + 1)` and the large-:math:`x` asymptote
    :math:`Q \approx x^{a-1} e^{-x} / \Gamma(a)`.
    """
    dtype = _float_dtype(a, p, q)
    a, p, q = jnp.broadcast_arrays(_as(a, dtype), _as(p, dtype), _as(q, dtype))
    lower = p <= q
    log_p, log_q = _log_tail(p, q)
    target = jnp.where(lower, log_p, log_q)
    lga = gammaln(a)
    lga1 = lga + jnp.log(a)
    t_max = math.log(float(jnp.finfo(dtype).max)) - 1.0

    def log_tail(t):
        x = jnp.exp(jnp.minimum(t, t_max))
        big_p = gammainc(a, x)
        big_q = gammaincc(a, x)
        # P = x^a e^-x / Gamma(a+1) * (1 + x/(a+1) + ...), the series bounded geometrically
        ratio = jnp.minimum(x / (a + 1.0), 0.9)
        log_p_asym = a * t - x - lga1 - jnp.log1p(-ratio)
        log_big_p = jnp.where(big_p > 0, jnp.log(jnp.where(big_p > 0, big_p, 1)), log_p_asym)
        log_big_q = jnp.where(
            big_q > 0, jnp.log(jnp.where(big_q > 0, big_q, 1)), (a - 1) * t - x - lga
        )
        return jnp.where(lower, log_big_p, log_big_q), x

    def h_derivs(t):
        lt, x = log_tail(t)
        ell = a * t - x - lga
        rate = jnp.exp(ell - lt)
        slope = jnp.where(lower, rate, -rate)
        # h'' / h' = d/dt log|h'| = ell' - h' with ell' = a - x
        return lt - target, slope, (a - x) - slope

    # starting guesses (in t = log x)
    t_small = (log_p + lga1) / a  # P ~ x^a / Gamma(a+1) for small x
    z = jnp.where(lower, ndtri(p), -ndtri(q))
    c = 1.0 - 1.0 / (9.0 * a) + z / (3.0 * jnp.sqrt(a))  # Wilson-Hilferty
    t_wh = jnp.where(c > 0, jnp.log(a) + 3.0 * jnp.log(jnp.where(c > 0, c, 1)), jnp.nan)
    x0 = jnp.maximum(-log_q - lga, 1.0)  # Q ~ x^(a-1) e^-x / Gamma(a) for large x
    x1 = jnp.maximum(-log_q - lga + (a - 1) * jnp.log(x0), 1e-3)
    x2 = jnp.maximum(-log_q - lga + (a - 1) * jnp.log(x1), 1e-3)
    t_large = jnp.log(x2)
    t_mean = jnp.log(a)
    t = _solve(h_derivs, [t_mean, t_wh, t_small, t_large])
    return jnp.exp(jnp.minimum(t, t_max))


# ----------------------------------------------------------------------------------
# Beta quantile (returned as a logit)
# ----------------------------------------------------------------------------------


def _beta_logit_quantile_lower(a, b, log_p, log_q):
    r"""Logit :math:`s` of the :math:`\mathrm{Beta}(a, b)` quantile with
    :math:`\log I_x(a, b) = \log p`, for the lower tail (:math:`p \le 1/2`).

    Solved with :func:`_solve` in :math:`s = \operatorname{logit} x`, where the density
    :math:`\propto e^{a s} / (1 + e^s)^{a + b}` is log-concave, so :math:`\log I` is
    concave and increasing; its derivative is :math:`e^{\ell(s) - \log I}` with
    :math:`\ell = a \log x + b \log(1 - x) - \log B(a, b)`. Starting guesses:
    :math:`\log(a/b)`, Abramowitz & Stegun 26.5.22, and the two end series
    :math:`I \approx x^a / (a B)` and :math:`1 - I \approx (1 - x)^b / (b B)`.
    """
    lbeta = gammaln(a) + gammaln(b) - gammaln(a + b)

    def log_cdf(s):
        # log I_x(a, b), either directly or as log(1 - I_{1-x}(b, a)). Both arguments,
        # sigmoid(s) and sigmoid(-s), are accurate, but x itself rounds near 1: there the
        # direct form is used only if I is small and the density below 1 (so that the
        # rounding of x barely moves I); otherwise the complement, whose cancellation
        # costs at most an ulp of 1.
        x = jax.nn.sigmoid(s)
        log_x = jax.nn.log_sigmoid(s)
        log_1mx = jax.nn.log_sigmoid(-s)
        # one betainc call for both (one copy of it in the compiled program)
        both = betainc(jnp.stack([a, b]), jnp.stack([b, a]), jnp.stack([x, jax.nn.sigmoid(-s)]))
        i_direct, i_comp = both[0], both[1]
        # I = x^a (1-x)^b / (a B) * (1 + x (a+b)/(a+1) + ...), bounded geometrically
        ratio = jnp.minimum(x * (a + b) / (a + 1.0), 0.9)
        log_i_asym = a * log_x + b * log_1mx - jnp.log(a) - lbeta - jnp.log1p(-ratio)
        log_direct = jnp.where(
            i_direct > 0, jnp.log(jnp.where(i_direct > 0, i_direct, 1)), log_i_asym
        )
        log_density = (a - 1.0) * log_x + (b - 1.0) * log_1mx - lbeta
        use_direct = (s <= 0) | ((log_density <= 0) & (i_direct <= 0.5))
        return jnp.where(use_direct, log_direct, jnp.log1p(-i_comp))

    def h_derivs(s):
        li = log_cdf(s)
        ell = a * jax.nn.log_sigmoid(s) + b * jax.nn.log_sigmoid(-s) - lbeta
        slope = jnp.exp(ell - li)
        x = jax.nn.sigmoid(s)
        # h'' / h' = ell' - h' with ell' = a (1 - x) - b x
        return li - log_p, slope, a * jax.nn.sigmoid(-s) - b * x - slope

    def logit_from_log(log_x):
        # logit of x = exp(log_x) for log_x < 0
        negative = log_x < 0
        safe = jnp.where(negative, log_x, -1.0)
        return jnp.where(negative, safe - jnp.log(-jnp.expm1(safe)), jnp.nan)

    # starting guesses
    s_small = logit_from_log((log_p + jnp.log(a) + lbeta) / a)  # I ~ x^a / (a B)
    s_large = -logit_from_log((log_q + jnp.log(b) + lbeta) / b)  # 1 - I ~ (1-x)^b / (b B)
    # Abramowitz & Stegun 26.5.22 (normal approximation, for a, b > 1/2):
    # x = a / (a + b e^{2w}), i.e. logit x = log(a / b) - 2w
    y = -ndtri(jnp.exp(log_p))  # upper-tail normal deviate of p
    lam = (y * y - 3.0) / 6.0
    ia, ib = 1.0 / (2.0 * a - 1.0), 1.0 / (2.0 * b - 1.0)
    hh = 2.0 / (ia + ib)
    w = y * jnp.sqrt(hh + lam) / hh - (ib - ia) * (lam + 5.0 / 6.0 - 2.0 / (3.0 * hh))
    valid = (a > 0.5) & (b > 0.5) & (hh + lam > 0)
    s_as = jnp.where(valid, jnp.log(a) - jnp.log(b) - 2.0 * w, jnp.nan)
    s_mean = jnp.log(a) - jnp.log(b)
    return _solve(h_derivs, [s_mean, s_as, s_small, s_large])


def _beta_logit_quantile(a, b, p, q):
    """Logit of the Beta(a, b) quantile from the pair (p, q); see :func:`_beta_logit_jit`."""
    return _beta_logit_jit(*_canonical(a, b, p, q))


@jax.jit
def _beta_logit_jit(a, b, p, q):
    r"""Logit of the :math:`\mathrm{Beta}(a, b)` quantile from the pair :math:`(p, q)`.

    Uses :math:`I_x(a, b) = 1 - I_{1 - x}(b, a)`: the upper tail of
    :math:`\mathrm{Beta}(a, b)` is the lower tail of :math:`\mathrm{Beta}(b, a)`
    reflected, :math:`\operatorname{logit}(1 - x) = -\operatorname{logit}(x)`.
    """
    dtype = _float_dtype(a, b, p, q)
    a, b, p, q = jnp.broadcast_arrays(_as(a, dtype), _as(b, dtype), _as(p, dtype), _as(q, dtype))
    lower = p <= q
    log_p, log_q = _log_tail(p, q)
    s = _beta_logit_quantile_lower(
        jnp.where(lower, a, b),
        jnp.where(lower, b, a),
        jnp.where(lower, log_p, log_q),
        jnp.where(lower, log_q, log_p),
    )
    return jnp.where(lower, s, -s)


def _beta_quantile(a, b, p, q):
    s = _beta_logit_quantile(a, b, p, q)
    return jax.nn.sigmoid(s)


# ----------------------------------------------------------------------------------
# Student-t quantile
# ----------------------------------------------------------------------------------


def _student_t_quantile(df, p, q):
    r"""Quantile of the standard Student-t with ``df`` degrees of freedom.

    With :math:`m = \min(p, q)`, :math:`x = I^{-1}_{2m}(\nu/2, 1/2)` and
    :math:`|t| = \sqrt{\nu (1 - x) / x} = \sqrt{\nu}\, e^{-\operatorname{logit}(x)/2}`,
    which keeps full precision at both ends; the sign is that of :math:`p - 1/2`. For
    large :math:`\nu` the Cornish-Fisher expansion takes over: the incomplete beta loses
    accuracy there (badly so in float32), while the expansion is accurate to < 1e-12
    (:math:`\nu \ge 3000`) and < 3e-7 (:math:`\nu \ge 100`) down to the tails reachable
    in float64 and float32 respectively.

    Example: ``_student_t_quantile(1.0, 0.75, 0.25)`` is 1 (the Cauchy quartile).
    """
    half_df, half, two_m, rest = _student_t_beta_arguments(df, p, q)
    s = _beta_logit_quantile(half_df, half, two_m, rest)
    return _student_t_from_beta_logit(df, p, q, s)


@jax.jit
def _student_t_beta_arguments(df, p, q):
    dtype = _float_dtype(df, p, q)
    df, p, q = jnp.broadcast_arrays(_as(df, dtype), _as(p, dtype), _as(q, dtype))
    two_m = 2.0 * jnp.minimum(p, q)
    rest = jnp.maximum(1.0 - two_m, jnp.finfo(dtype).tiny)  # exact for m >= 1/4
    return 0.5 * df, jnp.full_like(df, 0.5), two_m, rest


@jax.jit
def _student_t_from_beta_logit(df, p, q, s):
    dtype = s.dtype
    magnitude = jnp.sqrt(df) * jnp.exp(-0.5 * s)
    sign = jnp.where(p < q, -1.0, jnp.where(p > q, 1.0, 0.0))
    exact = jnp.where(p == q, 0.0, sign * magnitude)
    threshold = 3000.0 if jnp.finfo(dtype).bits >= 64 else 100.0
    return jnp.where(df >= threshold, _student_t_cornish_fisher(df, p, q), exact)


def _student_t_cornish_fisher(df, p, q):
    r"""Cornish-Fisher expansion of the Student-t quantile in powers of :math:`1/\nu`.

    :math:`t = z + g_1/\nu + g_2/\nu^2 + g_3/\nu^3 + g_4/\nu^4` with
    :math:`z = \Phi^{-1}(p)` and
    :math:`g_1 = (z^3 + z)/4`, :math:`g_2 = (5z^5 + 16z^3 + 3z)/96`,
    :math:`g_3 = (3z^7 + 19z^5 + 17z^3 - 15z)/384`,
    :math:`g_4 = (79z^9 + 776z^7 + 1482z^5 - 1920z^3 - 945z)/92160`
    (Abramowitz & Stegun 26.7.5).
    """
    z = _std_normal_quantile(p, q)
    z2 = z * z
    g1 = (z2 + 1.0) * z / 4.0
    g2 = ((5.0 * z2 + 16.0) * z2 + 3.0) * z / 96.0
    g3 = (((3.0 * z2 + 19.0) * z2 + 17.0) * z2 - 15.0) * z / 384.0
    g4 = ((((79.0 * z2 + 776.0) * z2 + 1482.0) * z2 - 1920.0) * z2 - 945.0) * z / 92160.0
    v = 1.0 / df
    return z + v * (g1 + v * (g2 + v * (g3 + v * g4)))


def _student_t_lower_cdf(df, z):
    r""":math:`F(z)` for :math:`z \le 0`: :math:`\tfrac12 I_{\nu/(\nu + z^2)}(\nu/2, 1/2)`."""
    return 0.5 * betainc(0.5 * df, 0.5, 1.0 / (1.0 + z * z / df))


# ----------------------------------------------------------------------------------
# univariate families: quantile from the pair (p, q)
# ----------------------------------------------------------------------------------


def _magnitude_sign(p, q):
    return jnp.minimum(p, q), jnp.where(p <= q, -1.0, 1.0)


@jax.jit
def _q_normal(fn, p, q):
    return fn.loc + fn.scale * _std_normal_quantile(p, q)


@jax.jit
def _q_half_normal(fn, p, q):
    # F^{-1}(u) = sigma * sqrt(2) * erfinv(u); for u > 1/2 the upper tail -Phi^{-1}(q/2)
    z = jnp.where(p <= q, math.sqrt(2.0) * erfinv(p), -ndtri(0.5 * q))
    return fn.scale * z


@jax.jit
def _cauchy_std_quantile(p, q):
    m, sign = _magnitude_sign(p, q)
    # |z| = cot(pi m), evaluated away from the poles of tan
    mag = jnp.where(m < 0.25, 1.0 / jnp.tan(jnp.pi * m), jnp.tan(jnp.pi * (0.5 - m)))
    return sign * mag


@jax.jit
def _q_cauchy(fn, p, q):
    return fn.loc + fn.scale * _cauchy_std_quantile(p, q)


@jax.jit
def _q_half_cauchy(fn, p, q):
    # F^{-1}(u) = sigma * tan(pi u / 2) = sigma * cot(pi (1 - u) / 2)
    z = jnp.where(p <= q, jnp.tan(0.5 * jnp.pi * p), 1.0 / jnp.tan(0.5 * jnp.pi * q))
    return fn.scale * z


def _q_student_t(fn, p, q):
    return fn.loc + fn.scale * _student_t_quantile(fn.df, p, q)


@jax.jit
def _laplace_std_quantile(p, q):
    m, sign = _magnitude_sign(p, q)
    return -sign * jnp.log(2.0 * m)


@jax.jit
def _q_laplace(fn, p, q):
    return fn.loc + fn.scale * _laplace_std_quantile(p, q)


@jax.jit
def _logistic_std_quantile(p, q):
    log_p, log_q = _log_tail(p, q)
    return log_p - log_q


@jax.jit
def _q_logistic(fn, p, q):
    return fn.loc + fn.scale * _logistic_std_quantile(p, q)


@jax.jit
def _soft_laplace_std_quantile(p, q):
    m, sign = _magnitude_sign(p, q)
    # F(z) = (2/pi) arctan(e^z), symmetric about 0
    return -sign * jnp.log(jnp.tan(0.5 * jnp.pi * m))


@jax.jit
def _q_soft_laplace(fn, p, q):
    return fn.loc + fn.scale * _soft_laplace_std_quantile(p, q)


@jax.jit
def _q_gumbel(fn, p, q):
    log_p, _ = _log_tail(p, q)
    return fn.loc - fn.scale * jnp.log(-log_p)


def _neg_log_survival(p, q):
    """``-log(1 - F) = -log q``, accurate for both small p and small q."""
    return jnp.where(p <= q, -jnp.log1p(-p), -jnp.log(q))


@jax.jit
def _q_exponential(fn, p, q):
    return _neg_log_survival(p, q) / fn.rate


@jax.jit
def _q_uniform(fn, p, q):
    width = fn.high - fn.low
    return jnp.where(p <= q, fn.low + p * width, fn.high - q * width)


def _q_gamma(fn, p, q):
    return _gamma_quantile(fn.concentration, p, q) / fn.rate


def _q_beta(fn, p, q):
    return _beta_quantile(fn.concentration1, fn.concentration0, p, q)


@jax.jit
def _q_weibull(fn, p, q):
    # F(x) = 1 - exp(-(x / lambda)^k)
    return fn.scale * jnp.power(_neg_log_survival(p, q), 1.0 / fn.concentration)


@jax.jit
def _q_gompertz(fn, p, q):
    # F(x) = 1 - exp(-eta (e^{b x} - 1))
    return jnp.log1p(_neg_log_survival(p, q) / fn.concentration) / fn.rate


@jax.jit
def _q_levy(fn, p, q):
    # F(x) = 2 (1 - Phi(sqrt(c / (x - mu)))) => x = mu + c / Phi^{-1}(p/2)^2;
    # for p > 1/2, Phi^{-1}(p/2) = -sqrt(2) erfinv(q)
    z2 = jnp.where(p <= q, jnp.square(ndtri(0.5 * p)), 2.0 * jnp.square(erfinv(q)))
    return fn.loc + fn.scale / z2


@jax.jit
def _q_dagum(fn, p, q):
    # F(x) = (1 + (x / b)^{-a})^{-c}  =>  x = b (p^{-1/c} - 1)^{-1/a}
    log_p, _ = _log_tail(p, q)
    return fn.scale * jnp.power(jnp.expm1(-log_p / fn.concentration), -1.0 / fn.sharpness)


@jax.jit
def _q_kumaraswamy(fn, p, q):
    # F(x) = 1 - (1 - x^a)^b  =>  x = (1 - q^{1/b})^{1/a}
    _, log_q = _log_tail(p, q)
    return jnp.power(-jnp.expm1(log_q / fn.concentration0), 1.0 / fn.concentration1)


@jax.jit
def _q_asymmetric_laplace(fn, p, q):
    k = fn.asymmetry
    k2 = k * k
    cut = k2 / (1.0 + k2)  # F(loc)
    left = fn.loc + fn.left_scale * jnp.log(p / cut)
    right = fn.loc - fn.right_scale * jnp.log((1.0 + k2) * q)
    return jnp.where(p <= cut, left, right)


def _q_asymmetric_laplace_quantile(fn, p, q):
    return _q_asymmetric_laplace(fn._ald, p, q)


# symmetric location-scale bases of numpyro's truncated distributions:
# (lower-tail CDF of the standard form for z <= 0, standard quantile from the pair)
def _symmetric_base(base):
    if type(base) is dist.Normal:
        return (lambda z: ndtr(z)), _std_normal_quantile
    if type(base) is dist.Cauchy:
        return (lambda z: jnp.arctan2(1.0, -z) / jnp.pi), _cauchy_std_quantile
    if type(base) is dist.Laplace:
        return (lambda z: 0.5 * jnp.exp(z)), _laplace_std_quantile
    if type(base) is dist.Logistic:
        return (lambda z: jax.nn.sigmoid(z)), _logistic_std_quantile
    if type(base) is dist.SoftLaplace:
        return (lambda z: jnp.arctan(jnp.exp(z)) * (2.0 / jnp.pi)), _soft_laplace_std_quantile
    if type(base) is dist.StudentT:
        df = base.df
        return (lambda z: _student_t_lower_cdf(df, z)), (
            lambda p, q: _student_t_quantile(df, p, q)
        )
    raise PriorTransformError(f"unsupported truncated base {type(base).__name__}")


def _truncated_pair(cdf_pair, low, high, p, q):
    r"""Target probability pair :math:`(F(l) + pM, S(h) + qM)` of a truncation.

    ``cdf_pair(x)`` returns :math:`(F(x), S(x))`, each accurate where it is small;
    ``low``/``high`` of ``None`` mean no truncation on that side.
    """
    if low is None:
        f_low, s_low = 0.0, 1.0
    else:
        f_low, s_low = cdf_pair(low)
    if high is None:
        f_high, s_high = 1.0, 0.0
    else:
        f_high, s_high = cdf_pair(high)
    f_low, s_low, f_high, s_high = (jnp.asarray(v) for v in (f_low, s_low, f_high, s_high))
    mass = jnp.where(
        f_high <= 0.5, f_high - f_low, jnp.where(f_low >= 0.5, s_low - s_high, 1.0 - f_low - s_high)
    )
    return f_low + p * mass, s_high + q * mass


def _truncation_bounds(fn):
    """``(low, high)`` of a truncated distribution, ``None`` for an open side."""
    one_sided_right = isinstance(fn, (dist.RightTruncatedDistribution,
                                       *_optional("RightTruncatedGamma")))
    one_sided_left = isinstance(fn, (dist.LeftTruncatedDistribution, *_optional("LeftTruncatedGamma")))
    low = None if one_sided_right else fn.low
    high = None if one_sided_left else fn.high
    return low, high


@jax.jit
def _truncated_symmetric_target(fn, p, q):
    base = fn.base_dist
    lower_cdf, _ = _symmetric_base(base)
    loc, scale = base.loc, base.scale

    def cdf_pair(x):
        z = (x - loc) / scale
        small = lower_cdf(-jnp.abs(z))
        return jnp.where(z <= 0, small, 1.0 - small), jnp.where(z >= 0, small, 1.0 - small)

    low, high = _truncation_bounds(fn)
    return _truncated_pair(cdf_pair, low, high, p, q)


@jax.jit
def _truncated_finish(fn, x):
    """Clip a truncated quantile into [low, high] (rounding can step just outside)."""
    low, high = _truncation_bounds(fn)
    if low is not None:
        x = jnp.maximum(x, low)
    if high is not None:
        x = jnp.minimum(x, high)
    return x


def _q_truncated_symmetric(fn, p, q):
    base = fn.base_dist
    _, std_quantile = _symmetric_base(base)
    tp, tq = _truncated_symmetric_target(fn, p, q)
    return _truncated_finish(fn, base.loc + base.scale * std_quantile(tp, tq))


@jax.jit
def _truncated_gamma_target(fn, p, q):
    base = fn.base_dist
    a, rate = base.concentration, base.rate

    def cdf_pair(x):
        return gammainc(a, rate * x), gammaincc(a, rate * x)

    low, high = _truncation_bounds(fn)
    return _truncated_pair(cdf_pair, low, high, p, q)


def _q_truncated_gamma(fn, p, q):
    base = fn.base_dist
    tp, tq = _truncated_gamma_target(fn, p, q)
    return _truncated_finish(fn, _gamma_quantile(base.concentration, tp, tq) / base.rate)


# exact type -> quantile(fn, p, q). Exact types, not isinstance: a user subclass may
# change the meaning of the parameters.
_UNIVARIATE: dict[type, Callable] = {
    dist.Normal: _q_normal,
    dist.HalfNormal: _q_half_normal,
    dist.Cauchy: _q_cauchy,
    dist.HalfCauchy: _q_half_cauchy,
    dist.StudentT: _q_student_t,
    dist.Laplace: _q_laplace,
    dist.Logistic: _q_logistic,
    dist.SoftLaplace: _q_soft_laplace,
    dist.Gumbel: _q_gumbel,
    dist.Exponential: _q_exponential,
    dist.Uniform: _q_uniform,
    dist.Gamma: _q_gamma,
    dist.Chi2: _q_gamma,
    dist.Beta: _q_beta,
    dist.BetaProportion: _q_beta,
    dist.Weibull: _q_weibull,
    dist.Gompertz: _q_gompertz,
    dist.Levy: _q_levy,
    dist.Dagum: _q_dagum,
    dist.Kumaraswamy: _q_kumaraswamy,
    dist.AsymmetricLaplace: _q_asymmetric_laplace,
    dist.AsymmetricLaplaceQuantile: _q_asymmetric_laplace_quantile,
    dist.LeftTruncatedDistribution: _q_truncated_symmetric,
    dist.RightTruncatedDistribution: _q_truncated_symmetric,
    dist.TwoSidedTruncatedDistribution: _q_truncated_symmetric,
}
# truncated Gammas are NumPyro >= 0.22 classes: registered where this NumPyro has them
_TRUNCATED_GAMMA = _optional("LeftTruncatedGamma", "RightTruncatedGamma", "TwoSidedTruncatedGamma")
_UNIVARIATE.update({cls: _q_truncated_gamma for cls in _TRUNCATED_GAMMA})

_TRUNCATED_SYMMETRIC = (
    dist.LeftTruncatedDistribution,
    dist.RightTruncatedDistribution,
    dist.TwoSidedTruncatedDistribution,
)
# wrappers that change shapes or the log density only: the value is the base's value
_SHAPE_WRAPPERS = (dist.Independent, dist.ExpandedDistribution, dist.MaskedDistribution)
_TRUNCATION_BASES = (
    dist.Normal,
    dist.Cauchy,
    dist.Laplace,
    dist.Logistic,
    dist.SoftLaplace,
    dist.StudentT,
)


# ----------------------------------------------------------------------------------
# multivariate families
# ----------------------------------------------------------------------------------


@jax.jit
def _stick_breaking_parameters(conc):
    """Beta(alpha_i, sum_{j > i} alpha_j) parameters of the stick-breaking fractions."""
    tail = jnp.flip(jnp.cumsum(jnp.flip(conc, -1), -1), -1)[..., 1:]
    return conc[..., :-1], tail


@jax.jit
def _stick_breaking_from_logits(s):
    """Simplex point from the logits of the stick-breaking fractions, in log space."""
    log_v = jax.nn.log_sigmoid(s)
    log_stick = jnp.cumsum(jax.nn.log_sigmoid(-s), -1)  # log prod_{j <= i} (1 - v_j)
    log_before = jnp.concatenate([jnp.zeros_like(log_stick[..., :1]), log_stick[..., :-1]], -1)
    log_x = jnp.concatenate([log_v + log_before, log_stick[..., -1:]], -1)
    return jnp.maximum(jnp.exp(log_x), jnp.finfo(log_x.dtype).tiny)


def _mv_dirichlet(fn, p, q):
    dtype = _float_dtype(fn.concentration, p)
    a, b = _stick_breaking_parameters(_as(fn.concentration, dtype))
    return _stick_breaking_from_logits(_beta_logit_quantile(a, b, p, q))


def _matvec(mat, vec):
    return jnp.squeeze(jnp.matmul(mat, vec[..., None]), -1)


@jax.jit
def _mv_normal(fn, p, q):
    return fn.loc + _matvec(fn.scale_tril, _std_normal_quantile(p, q))


def _mv_student_t(fn, p, q):
    nu_k = _mvt_degrees(fn, p)
    w = _student_t_quantile(nu_k, p, q)  # standard t_{nu + k} draws
    return _mvt_assemble(fn, nu_k, w)


@jax.jit
def _mvt_degrees(fn, p):
    """Degrees of freedom nu + k of the conditional of coordinate k given the ones before."""
    df = jnp.asarray(fn.df)[..., None]
    k = jnp.arange(fn.event_shape[-1], dtype=_float_dtype(df, p))
    return df + k


@jax.jit
def _mvt_assemble(fn, nu_k, w):
    # z_k = w_k sqrt((nu + sum_{j<k} z_j^2) / (nu + k)), where
    # nu + sum_{j<k} z_j^2 = nu * prod_{j<k} (1 + w_j^2 / (nu + j))
    df = jnp.asarray(fn.df)[..., None]
    log_growth = jnp.log1p(jnp.square(w) / nu_k)
    log_before = jnp.cumsum(log_growth, -1) - log_growth
    z = w * jnp.sqrt(df / nu_k) * jnp.exp(0.5 * log_before)
    return fn.loc + _matvec(fn.scale_tril, z)


@jax.jit
def _mv_random_walk(fn, p, q):
    scale = jnp.asarray(fn.scale)[..., None]
    return scale * jnp.cumsum(_std_normal_quantile(p, q), -1)


_MULTIVARIATE: dict[type, Callable] = {
    dist.Dirichlet: _mv_dirichlet,
    dist.MultivariateNormal: _mv_normal,
    dist.LowRankMultivariateNormal: _mv_normal,
    dist.MultivariateStudentT: _mv_student_t,
    dist.GaussianRandomWalk: _mv_random_walk,
}

# elementwise, strictly monotone transforms: value = g(base quantile)
_MONOTONE_TRANSFORMS = (
    T.AffineTransform,
    T.ExpTransform,
    T.PowerTransform,
    T.SigmoidTransform,
    T.SoftplusTransform,
    T.IdentityTransform,
)

SUPPORTED_PRIORS = (
    "Normal, HalfNormal, Cauchy, HalfCauchy, StudentT, Laplace, Logistic, SoftLaplace, "
    "Gumbel, Exponential, Uniform, Gamma, Chi2, InverseGamma, Beta, BetaProportion, "
    "LogNormal, LogUniform, Pareto, Weibull, Gompertz, Levy, Dagum, Kumaraswamy, "
    "AsymmetricLaplace(Quantile), TruncatedNormal / TruncatedCauchy / TruncatedDistribution "
    "(of Normal, Cauchy, Laplace, Logistic, SoftLaplace, StudentT), TruncatedGamma, "
    "Dirichlet, MultivariateNormal, LowRankMultivariateNormal, MultivariateStudentT, "
    "GaussianRandomWalk; and these under .expand(), .to_event(), masking, and "
    "TransformedDistribution with elementwise monotone transforms (Affine, Exp, Power, "
    "Sigmoid, Softplus, Identity, their inverses and compositions)"
)


# ----------------------------------------------------------------------------------
# structure: unwrapping, support checks
# ----------------------------------------------------------------------------------


def _flat_transforms(transforms):
    out = []
    for t in transforms:
        if isinstance(t, T.ComposeTransform):
            out.extend(_flat_transforms(t.parts))
        else:
            out.append(t)
    return out


def _unwrap_transform(t):
    """The elementwise transform inside IndependentTransform / inverse wrappers."""
    while True:
        if isinstance(t, T.IndependentTransform):
            t = t.base_transform
        elif isinstance(t, T._InverseTransform):
            t = t._inv
        else:
            return t


def _transform_sign(t):
    """+1 / -1 (possibly an array): whether an elementwise transform increases or decreases."""
    if isinstance(t, T.ComposeTransform):
        sign = 1.0
        for part in t.parts:
            sign = sign * _transform_sign(part)
        return sign
    if isinstance(t, T.IndependentTransform):
        return _transform_sign(t.base_transform)
    if isinstance(t, T._InverseTransform):
        return _transform_sign(t._inv)  # the inverse of a monotone map has the same direction
    if isinstance(t, T.AffineTransform):
        return jnp.sign(t.scale)
    if isinstance(t, T.PowerTransform):
        return jnp.sign(t.exponent)
    return 1.0


def _transform_ok(t) -> bool:
    if isinstance(t, T.ComposeTransform):
        return all(_transform_ok(s) for s in t.parts)
    inner = _unwrap_transform(t)
    if isinstance(inner, T.ComposeTransform):
        return all(_transform_ok(s) for s in inner.parts)
    return type(inner) in _MONOTONE_TRANSFORMS


def _core(fn):
    """The innermost distribution under the shape / mask / transform wrappers."""
    while isinstance(fn, _SHAPE_WRAPPERS + (dist.TransformedDistribution,)):
        fn = fn.base_dist
    return fn


_MATRIX_FAMILIES = (
    "LKJ",
    "LKJCholesky",
    "Wishart",
    "WishartCholesky",
    "InverseWishart",
    "InverseWishartCholesky",
    "MatrixNormal",
)


def _unsupported_reason(fn, site_name: str) -> str | None:
    """``None`` if :func:`icdf` handles ``fn``, else an actionable explanation."""
    if callable(getattr(fn, "unit_cube_transform", None)):
        return None  # the distribution brings its own map (see icdf's docstring)
    top = type(fn).__name__
    engines = "or use an engine that does not need a unit cube, such as 'nuts' or 'smc'"
    node = fn
    while True:
        name = type(node).__name__
        inner = "" if node is fn else f" (inside {top})"
        if name in _MATRIX_FAMILIES:
            return (
                f"site '{site_name}' has prior {name}{inner}, a matrix-valued distribution with "
                f"no inverse CDF here. Reparametrise site '{site_name}': build the matrix (e.g. "
                "a Cholesky factor of a covariance or correlation matrix) from scalar or vector "
                "sites with supported priors (HalfNormal/HalfCauchy scales, Beta or Uniform "
                f"correlations, ...) combined with numpyro.deterministic, {engines}. Supported "
                f"priors: {SUPPORTED_PRIORS}"
            )
        if isinstance(node, dist.ImproperUniform):
            return (
                f"site '{site_name}' has an improper prior ({name}{inner}): a unit-cube "
                f"(nested-sampling) prior transform needs a proper prior. Give '{site_name}' "
                "a proper prior, e.g. dist.Uniform(low, high) or dist.Normal(0, 10) (with "
                ".to_event/.expand as needed), or use an engine that does not need a unit cube "
                "or a proper prior, such as 'nuts'"
            )
        if isinstance(node, _SHAPE_WRAPPERS):
            node = node.base_dist
            continue
        if isinstance(node, dist.TransformedDistribution):
            bad = [t for t in _flat_transforms(node.transforms) if not _transform_ok(t)]
            if bad:
                names = ", ".join(type(_unwrap_transform(t)).__name__ for t in bad)
                return (
                    f"site '{site_name}' has prior {name}{inner} built with {names}, which is not "
                    "an elementwise strictly monotone transform, so its inverse CDF is not "
                    f"available. Reparametrise '{site_name}': sample the base distribution at its "
                    "own site and apply the transform with numpyro.deterministic, "
                    f"{engines}. Supported priors: {SUPPORTED_PRIORS}"
                )
            node = node.base_dist
            continue
        break
    name = type(node).__name__
    inner = "" if node is fn else f" (inside {top})"
    if type(node) in _UNIVARIATE or type(node) in _MULTIVARIATE:
        if isinstance(node, _TRUNCATED_SYMMETRIC) and type(node.base_dist) not in _TRUNCATION_BASES:
            return (
                f"site '{site_name}' has prior {name}{inner} of "
                f"{type(node.base_dist).__name__}, a truncated base without an inverse CDF here. "
                f"Use a supported prior, {engines}. Supported priors: {SUPPORTED_PRIORS}"
            )
        if isinstance(node, _TRUNCATED_GAMMA) and type(node.base_dist) is not dist.Gamma:
            return (
                f"site '{site_name}' has prior {name}{inner} of "
                f"{type(node.base_dist).__name__}; only a Gamma base is supported here. Use a "
                f"supported prior, {engines}"
            )
        return None
    support = getattr(type(node), "support", None)
    try:
        support = node.support
    except Exception:  # noqa: BLE001 - a broken support property is still "unsupported"
        pass
    if isinstance(node, dist.Delta) or isinstance(node, dist.Unit):
        return (
            f"site '{site_name}' has prior {name}{inner}, a point mass with no randomness to map "
            f"from the unit cube. Use numpyro.deterministic for a fixed or derived value, or "
            f"make '{site_name}' observed"
        )
    if getattr(support, "is_discrete", False):
        return (
            f"site '{site_name}' has a discrete prior, {name}{inner}: the unit-cube prior "
            "transform covers continuous latent sites only. Marginalise the discrete variable "
            f"out of the model (sum over its values), make '{site_name}' observed, or give it a "
            f"continuous prior. Supported priors: {SUPPORTED_PRIORS}"
        )
    return (
        f"site '{site_name}' has prior {name}{inner}, for which no inverse CDF (unit-cube prior "
        f"transform) is implemented. Use a supported prior, {engines}. Supported priors: "
        f"{SUPPORTED_PRIORS}"
    )


def check_icdf(fn, site_name: str) -> None:
    """Raise :class:`~bayeslik.errors.PriorTransformError` if :func:`icdf` cannot handle ``fn``.

    Pure Python inspection of the distribution's type, wrappers and transforms: nothing
    is compiled or evaluated. The message names the site, the distribution class and a fix
    (reparametrisation, another engine, or the list of supported priors).

    Example
    -------
    >>> import numpyro.distributions as dist
    >>> check_icdf(dist.Normal(0.0, 1.0), "mu")          # supported: returns None
    >>> check_icdf(dist.Poisson(3.0), "k")                # doctest: +SKIP
    Traceback (most recent call last):
    PriorTransformError: site 'k' has a discrete prior, Poisson: ...
    """
    reason = _unsupported_reason(fn, site_name)
    if reason is not None:
        raise PriorTransformError(reason)


def unit_cube_shape(fn) -> tuple[int, ...]:
    """The shape of the unit-cube slice that :func:`icdf` consumes for ``fn``.

    It equals the shape of the site's unconstrained value,
    ``biject_to(fn.support).inverse_shape(fn.shape())``: ``fn.shape()`` for everything
    except simplex-valued priors (Dirichlet), whose last axis shrinks from ``K`` to
    ``K - 1``. Raises :class:`~bayeslik.errors.PriorTransformError` for a distribution
    that :func:`icdf` does not support (see :func:`check_icdf`).

    Example
    -------
    >>> import jax.numpy as jnp
    >>> import numpyro.distributions as dist
    >>> unit_cube_shape(dist.Normal(jnp.zeros(3), 1.0).expand((4, 3)))
    (4, 3)
    >>> unit_cube_shape(dist.Dirichlet(jnp.ones((2, 5))))
    (2, 4)
    """
    check_icdf(fn, "<unnamed>")
    shape = tuple(fn.shape())
    if callable(getattr(fn, "unit_cube_transform", None)):
        return shape
    if isinstance(_core(fn), dist.Dirichlet):
        shape = shape[:-1] + (shape[-1] - 1,)
    return shape


# ----------------------------------------------------------------------------------
# the transform
# ----------------------------------------------------------------------------------


def _is_univariate(fn) -> bool:
    return type(_core(fn)) in _UNIVARIATE


def _quantile(fn, p, q):
    """Value of ``fn`` at unit-cube pair ``(p, q = 1 - p)`` (broadcasting over batch)."""
    hook = getattr(fn, "unit_cube_transform", None)
    if callable(hook):
        return hook(p)
    if isinstance(fn, _SHAPE_WRAPPERS):
        return _quantile(fn.base_dist, p, q)
    if isinstance(fn, dist.TransformedDistribution):
        transforms = _flat_transforms(fn.transforms)
        if _is_univariate(fn.base_dist):
            sign = 1.0
            for t in transforms:
                sign = sign * _transform_sign(t)
            decreasing = jnp.asarray(sign) < 0
            p, q = jnp.where(decreasing, q, p), jnp.where(decreasing, p, q)
        x = _quantile(fn.base_dist, p, q)
        for t in transforms:
            x = t(x)
        try:
            support = fn.support
        except Exception:  # noqa: BLE001 - no usable support: leave x as is
            return x
        return _clip_to_support(support, x)
    kind = type(fn)
    if kind in _MULTIVARIATE:
        return _MULTIVARIATE[kind](fn, p, q)
    if kind in _UNIVARIATE:
        x = _UNIVARIATE[kind](fn, p, q)
        return _clip_to_support(fn.support, x)
    raise PriorTransformError(_unsupported_reason(fn, "<unnamed>"))


@jax.jit
def _unit_pair(u):
    """``(p, 1 - p)`` with ``p`` = ``u`` clipped to ``[eps, 1 - eps]``."""
    eps = jnp.finfo(u.dtype).eps
    p = jnp.clip(u, eps, 1.0 - eps)
    return p, 1.0 - p


def icdf(fn, u):
    r"""Map unit-cube coordinates ``u`` to a value distributed as ``fn``.

    ``u`` has shape :func:`unit_cube_shape(fn) <unit_cube_shape>` (optionally with extra
    leading sample dimensions) and entries in :math:`(0, 1)`; it is clipped to
    :math:`[\epsilon, 1 - \epsilon]` with :math:`\epsilon` the machine epsilon of its
    dtype, so 0 and 1 never give infinities. The result has shape ``fn.shape()`` (after
    those leading dimensions), lies in ``fn.support``, and is distributed as ``fn`` when
    ``u`` is uniform. For univariate priors it is the quantile function
    :math:`F^{-1}(u)`, increasing in ``u``; see the module docstring for the
    multivariate constructions. Pure and jittable; float32 and float64 both work.

    A distribution of the user's own can take part: if it has a method
    ``unit_cube_transform(u)`` mapping ``u`` of shape ``fn.shape()`` (entries in
    :math:`(0, 1)`) to a value distributed as ``fn`` when ``u`` is uniform, that map is
    used (it need not be a bijection: sorting iid draws gives order statistics).

    Example
    -------
    >>> import jax, jax.numpy as jnp
    >>> import numpyro.distributions as dist
    >>> fn = dist.Gamma(2.0, 3.0).expand((3,))
    >>> x = jax.jit(lambda u: icdf(fn, u))(jnp.array([0.1, 0.5, 0.9]))
    >>> x.shape
    (3,)
    """
    cube = unit_cube_shape(fn)
    u = jnp.asarray(u)
    if not jnp.issubdtype(u.dtype, jnp.floating):
        u = u.astype(jnp.result_type(float))
    n = len(cube)
    if u.ndim < n or tuple(u.shape[u.ndim - n :]) != cube:
        raise DataError(
            f"icdf: u has shape {u.shape}, but {type(fn).__name__} with shape {fn.shape()} "
            f"consumes a unit-cube slice of shape {cube} (see unit_cube_shape)"
        )
    p, q = _unit_pair(u)
    x = _quantile(fn, p, q)
    sample_shape = tuple(u.shape[: u.ndim - n])
    return jnp.broadcast_to(x, sample_shape + tuple(fn.shape()))


def register_like(cls: type, like: type) -> None:
    """Give the distribution class ``cls`` (e.g. a subclass with a guarded log density) the
    unit-cube map of ``like``, a multivariate class the map already knows."""
    _MULTIVARIATE.setdefault(cls, _MULTIVARIATE[like])
