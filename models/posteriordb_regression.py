r"""posteriordb linear regressions as NumPyro programs: earnings, kidiq, mesquite and diamonds.

Twenty posteriors from `posteriordb <https://github.com/stan-dev/posteriordb>`_ (BSD-3-Clause,
commit ``28f8d3d6``), bundled under ``data/posteriordb/<posterior>/`` and loaded with
:func:`bayeslik.models.posteriordb.load`, which merges :data:`MODELS` into its registry. Each Stan
model is translated line by line: the transformed data (logs, interactions, centring,
standardisation with Stan's ``sd``, the sample sd with ``N - 1``) are computed inside the program
from the raw data, the site names equal the Stan names, and the priors and likelihood are Stan's.

**The Gelman & Hill regressions** (the nineteen posteriors other than diamonds) all have the form

.. math::
    y_n \sim N\Big(\beta_1 + \sum_{k=2}^{K} \beta_k\, x_{n,k-1},\ \sigma\Big),
    \qquad n = 1, \dots, N,

where :math:`y` is a data vector or a transform of one and :math:`x_{\cdot,j}` are the predictors
of the Stan model statement, in its order. Sample sites ``beta`` (K,) and ``sigma`` (> 0). ``beta``
has Stan's implicit flat prior (``ImproperUniform`` on :math:`\mathbb R^K`); ``sigma`` is flat on
the half line (``ImproperUniform``), except in the three ``kidiq-*`` posteriors, where Stan's
``sigma ~ cauchy(0, 2.5)`` on ``real<lower=0>`` becomes the normalised ``HalfCauchy(2.5)``. The
observed site is named after the Stan vector on the left of ``~`` and sits in
``plate("data", N)``:

=======================================  ==============  ==  =====================================
posterior                                observed site   K   predictors after the intercept
=======================================  ==============  ==  =====================================
earnings-earn_height                     ``earn``        2   height
earnings-log10earn_height                ``log10_earn``  2   height
earnings-logearn_height_male             ``log_earn``    3   height, male
earnings-logearn_interaction             ``log_earn``    4   height, male, height * male
earnings-logearn_interaction_z           ``log_earn``    4   z_height, male, z_height * male
earnings-logearn_logheight_male          ``log_earn``    3   log height, male
kidiq-kidscore_interaction               ``kid_score``   4   mom_hs, mom_iq, mom_hs * mom_iq
kidiq-kidscore_momhs                     ``kid_score``   2   mom_hs
kidiq-kidscore_momhsiq                   ``kid_score``   3   mom_hs, mom_iq
kidiq_with_mom_work-                     ``kid_score``   4   mom_hs - mean, mom_iq - mean, product
kidscore_interaction_c
kidiq_with_mom_work-                     ``kid_score``   4   mom_hs - 0.5, mom_iq - 100, product
kidscore_interaction_c2
kidiq_with_mom_work-                     ``kid_score``   4   (x - mean(x)) / (2 sd(x)) for mom_hs
kidscore_interaction_z                                       and mom_iq, product
kidiq_with_mom_work-kidscore_mom_work    ``kid_score``   4   mom_work == 2, == 3, == 4
mesquite-logmesquite                     ``log_weight``  7   logs of diam1, diam2, canopy_height,
                                                             total_height, density; group
mesquite-logmesquite_logva               ``log_weight``  4   log volume, log area, group
mesquite-logmesquite_logvas              ``log_weight``  7   log volume, area, shape,
                                                             total_height, density; group
mesquite-logmesquite_logvash             ``log_weight``  6   log volume, area, shape,
                                                             total_height; group
mesquite-logmesquite_logvolume           ``log_weight``  2   log volume
mesquite-mesquite                        ``weight``      7   diam1, diam2, canopy_height,
                                                             total_height, density, group
=======================================  ==============  ==  =====================================

with ``z_height = (height - mean(height)) / sd(height)``, canopy volume
``diam1 .* diam2 .* canopy_height``, area ``diam1 .* diam2`` and shape ``diam1 ./ diam2``.

**diamonds-diamonds** (brms-generated, :func:`diamonds`): ``Xc`` is ``X`` without its first
(intercept) column, centred by column means, and

.. math::
    b_k \sim N(0, 1), \quad \mathrm{Intercept} \sim t_3(8, 10), \quad
    \sigma \sim t_3^+(0, 10), \quad
    Y_n \sim N(\mathrm{Intercept} + Xc_n^\top b,\ \sigma),

with sample sites ``b`` (K - 1,), ``Intercept``, ``sigma`` (> 0) and observed site ``Y``. The half
Student-t is normalised on the half line, as in the Stan code (``student_t_lpdf(sigma | 3, 0, 10)
- student_t_lccdf(0 | 3, 0, 10)``). Stan's generated quantity
``b_Intercept = Intercept - dot_product(means_X, b)`` is not in the reference draws and is not a
site of the program.

**How the log density compares with Stan's.** ``stan_lp_offset`` (NumPyro log joint minus Stan's
full log density, all constants kept, no Jacobian) is ``log 2`` for the three ``kidiq-*``
posteriors (the ``HalfCauchy``) and 0 for the other seventeen.

**Data.** The programs take the posteriordb data as keyword arguments
(``model(**load(name)["data"])``). A posteriordb data set is shared by several models, so each
program also accepts, and ignores, the other variables of its own data set (e.g. ``male`` for
``earn_height``, ``mom_hs_new`` for the kidiq models); an unknown name raises ``TypeError``. The
observed vector may be ``None`` (prior or posterior predictive sampling of the observed site).
``mom_work`` is a Stan ``int`` array; it arrives as floats and is compared with 2, 3, 4 exactly.

Example
-------
>>> from bayeslik.models import posteriordb
>>> post = posteriordb.load("kidiq-kidscore_momhs")
>>> post["reference"]["beta"].shape, post["info"]["stan_lp_offset"]     # doctest: +SKIP
((10, 1000, 2), 0.6931471805599453)
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

from bayeslik.errors import DataError

__all__ = [
    "HalfStudentT",
    "MODELS",
    "diamonds",
    "earn_height",
    "kidscore_interaction",
    "kidscore_interaction_c",
    "kidscore_interaction_c2",
    "kidscore_interaction_z",
    "kidscore_mom_work",
    "kidscore_momhs",
    "kidscore_momhsiq",
    "log10earn_height",
    "logearn_height_male",
    "logearn_interaction",
    "logearn_interaction_z",
    "logearn_logheight_male",
    "logmesquite",
    "logmesquite_logva",
    "logmesquite_logvas",
    "logmesquite_logvash",
    "logmesquite_logvolume",
    "mesquite",
]

_LOG2 = math.log(2.0)

# the variables of each posteriordb data set (a program accepts, and ignores, those it does not use)
_EARNINGS = ("N", "earn", "height", "male")
_KIDIQ = ("N", "kid_score", "mom_hs", "mom_iq", "mom_hs_new", "mom_iq_new")
_KIDIQ_WORK = ("N", "kid_score", "mom_hs", "mom_iq", "mom_work")
_MESQUITE = (
    "N", "weight", "diam1", "diam2", "canopy_height", "total_height", "density", "group",
)  # fmt: skip


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _check_unused(unused: dict, dataset: tuple, model: str) -> None:
    unknown = sorted(set(unused) - set(dataset))
    if unknown:
        raise DataError(
            f"{model}() got unexpected data {unknown}; its data set has {list(dataset)}"
        )


def _vector(value, N, what, *, required=True):
    """A data vector as a float array of the default dtype, checked to have length N."""
    if value is None:
        if required:
            raise DataError(f"{what} is required")
        return None
    value = jnp.asarray(value, dtype=jnp.result_type(float))
    if value.shape != (N,):
        raise DataError(f"{what} has shape {value.shape}, expected ({N},)")
    return value


def _linear_regression(N, obs_name, y, predictors, sigma_prior=None):
    r"""``y ~ normal(beta[1] + beta[2] * x_1 + ... + beta[K] * x_{K-1}, sigma)`` with flat ``beta``.

    ``predictors`` are the (N,) columns x_1, ..., x_{K-1} in the order of the Stan model statement.
    ``sigma`` is flat on the half line unless ``sigma_prior`` is given.
    """
    num_coef = len(predictors) + 1
    beta = numpyro.sample("beta", dist.ImproperUniform(constraints.real_vector, (), (num_coef,)))
    if sigma_prior is None:
        sigma_prior = dist.ImproperUniform(constraints.positive, (), ())
    sigma = numpyro.sample("sigma", sigma_prior)
    design = jnp.stack(predictors, axis=-1)  # (N, K - 1)
    mean = beta[0] + design @ beta[1:]
    with numpyro.plate("data", N):
        numpyro.sample(obs_name, dist.Normal(mean, sigma), obs=y)


def _maybe(fn, value):
    return None if value is None else fn(value)


def _sd(x):
    """Stan's ``sd``: the sample standard deviation, with N - 1."""
    return jnp.std(x, ddof=1)


# --------------------------------------------------------------------------------------------------
# earnings (Gelman & Hill): flat priors on beta and sigma
# --------------------------------------------------------------------------------------------------
def earn_height(N, earn=None, height=None, **unused):
    r"""``earn_height.stan``: earn ~ normal(beta[1] + beta[2] * height, sigma).

    Observed site ``earn``.
    """
    _check_unused(unused, _EARNINGS, "earn_height")
    earn = _vector(earn, N, "earn", required=False)
    height = _vector(height, N, "height")
    _linear_regression(N, "earn", earn, [height])


def log10earn_height(N, earn=None, height=None, **unused):
    r"""``log10earn_height.stan``: log10(earn) ~ normal(beta[1] + beta[2] * height, sigma).

    Observed site ``log10_earn``.
    """
    _check_unused(unused, _EARNINGS, "log10earn_height")
    log10_earn = _maybe(jnp.log10, _vector(earn, N, "earn", required=False))
    height = _vector(height, N, "height")
    _linear_regression(N, "log10_earn", log10_earn, [height])


def logearn_height_male(N, earn=None, height=None, male=None, **unused):
    r"""``logearn_height_male.stan``: log(earn) on height and male.

    Observed site ``log_earn``.
    """
    _check_unused(unused, _EARNINGS, "logearn_height_male")
    log_earn = _maybe(jnp.log, _vector(earn, N, "earn", required=False))
    height, male = _vector(height, N, "height"), _vector(male, N, "male")
    _linear_regression(N, "log_earn", log_earn, [height, male])


def logearn_interaction(N, earn=None, height=None, male=None, **unused):
    r"""``logearn_interaction.stan``: log(earn) on height, male and their product.

    :math:`\log e \sim N(\beta_1 + \beta_2 h + \beta_3 m + \beta_4 h m, \sigma)`.

    ``h`` = height, ``m`` = male, ``inter = h .* m``. Observed site ``log_earn``.
    """
    _check_unused(unused, _EARNINGS, "logearn_interaction")
    log_earn = _maybe(jnp.log, _vector(earn, N, "earn", required=False))
    height, male = _vector(height, N, "height"), _vector(male, N, "male")
    inter = height * male
    _linear_regression(N, "log_earn", log_earn, [height, male, inter])


def logearn_interaction_z(N, earn=None, height=None, male=None, **unused):
    r"""``logearn_interaction_z.stan``: log(earn) on standardised height, male, their product.

    :math:`\log e \sim N(\beta_1 + \beta_2 z + \beta_3 m + \beta_4 z m, \sigma)`.

    ``z = (height - mean(height)) / sd(height)`` (sample sd, N - 1), ``m`` = male. Observed site
    ``log_earn``.
    """
    _check_unused(unused, _EARNINGS, "logearn_interaction_z")
    log_earn = _maybe(jnp.log, _vector(earn, N, "earn", required=False))
    height, male = _vector(height, N, "height"), _vector(male, N, "male")
    z_height = (height - jnp.mean(height)) / _sd(height)
    inter = z_height * male
    _linear_regression(N, "log_earn", log_earn, [z_height, male, inter])


def logearn_logheight_male(N, earn=None, height=None, male=None, **unused):
    r"""``logearn_logheight_male.stan``: log(earn) on log(height) and male.

    Observed site ``log_earn``.
    """
    _check_unused(unused, _EARNINGS, "logearn_logheight_male")
    log_earn = _maybe(jnp.log, _vector(earn, N, "earn", required=False))
    log_height = jnp.log(_vector(height, N, "height"))
    male = _vector(male, N, "male")
    _linear_regression(N, "log_earn", log_earn, [log_height, male])


# --------------------------------------------------------------------------------------------------
# kidiq: flat beta, sigma ~ cauchy(0, 2.5) on the half line -> HalfCauchy(2.5) (offset log 2)
# --------------------------------------------------------------------------------------------------
def kidscore_interaction(N, kid_score=None, mom_iq=None, mom_hs=None, **unused):
    r"""``kidscore_interaction.stan``: kid_score on mom_hs, mom_iq and mom_hs .* mom_iq.

    :math:`\sigma \sim \mathrm{Cauchy}^+(0, 2.5)` (``HalfCauchy``). Observed site ``kid_score``.
    """
    _check_unused(unused, _KIDIQ, "kidscore_interaction")
    kid_score = _vector(kid_score, N, "kid_score", required=False)
    mom_iq, mom_hs = _vector(mom_iq, N, "mom_iq"), _vector(mom_hs, N, "mom_hs")
    inter = mom_hs * mom_iq
    _linear_regression(
        N, "kid_score", kid_score, [mom_hs, mom_iq, inter], sigma_prior=dist.HalfCauchy(2.5)
    )


def kidscore_momhs(N, kid_score=None, mom_hs=None, **unused):
    r"""``kidscore_momhs.stan``: kid_score on mom_hs.

    :math:`\sigma \sim \mathrm{Cauchy}^+(0, 2.5)` (``HalfCauchy``). Observed site ``kid_score``.
    """
    _check_unused(unused, _KIDIQ, "kidscore_momhs")
    kid_score = _vector(kid_score, N, "kid_score", required=False)
    mom_hs = _vector(mom_hs, N, "mom_hs")
    _linear_regression(N, "kid_score", kid_score, [mom_hs], sigma_prior=dist.HalfCauchy(2.5))


def kidscore_momhsiq(N, kid_score=None, mom_iq=None, mom_hs=None, **unused):
    r"""``kidscore_momhsiq.stan``: kid_score on mom_hs and mom_iq.

    :math:`\sigma \sim \mathrm{Cauchy}^+(0, 2.5)` (``HalfCauchy``). Observed site ``kid_score``.
    """
    _check_unused(unused, _KIDIQ, "kidscore_momhsiq")
    kid_score = _vector(kid_score, N, "kid_score", required=False)
    mom_iq, mom_hs = _vector(mom_iq, N, "mom_iq"), _vector(mom_hs, N, "mom_hs")
    _linear_regression(
        N, "kid_score", kid_score, [mom_hs, mom_iq], sigma_prior=dist.HalfCauchy(2.5)
    )


# --------------------------------------------------------------------------------------------------
# kidiq_with_mom_work: flat priors on beta and sigma
# --------------------------------------------------------------------------------------------------
def _interaction_model(N, kid_score, hs, iq):
    _linear_regression(N, "kid_score", kid_score, [hs, iq, hs * iq])


def kidscore_interaction_c(N, kid_score=None, mom_hs=None, mom_iq=None, **unused):
    r"""``kidscore_interaction_c.stan``: centred predictors, :math:`c_x = x - \bar x`.

    :math:`y \sim N(\beta_1 + \beta_2 c_{hs} + \beta_3 c_{iq} + \beta_4 c_{hs} c_{iq}, \sigma)`.
    Observed site ``kid_score``.
    """
    _check_unused(unused, _KIDIQ_WORK, "kidscore_interaction_c")
    kid_score = _vector(kid_score, N, "kid_score", required=False)
    mom_hs, mom_iq = _vector(mom_hs, N, "mom_hs"), _vector(mom_iq, N, "mom_iq")
    _interaction_model(N, kid_score, mom_hs - jnp.mean(mom_hs), mom_iq - jnp.mean(mom_iq))


def kidscore_interaction_c2(N, kid_score=None, mom_hs=None, mom_iq=None, **unused):
    r"""``kidscore_interaction_c2.stan``: predictors centred at hs = 0.5, iq = 100.

    Same form as :func:`kidscore_interaction_c`. Observed site ``kid_score``.
    """
    _check_unused(unused, _KIDIQ_WORK, "kidscore_interaction_c2")
    kid_score = _vector(kid_score, N, "kid_score", required=False)
    mom_hs, mom_iq = _vector(mom_hs, N, "mom_hs"), _vector(mom_iq, N, "mom_iq")
    _interaction_model(N, kid_score, mom_hs - 0.5, mom_iq - 100.0)


def kidscore_interaction_z(N, kid_score=None, mom_hs=None, mom_iq=None, **unused):
    r"""``kidscore_interaction_z.stan``: predictors scaled as (x - mean(x)) / (2 sd(x)).

    ``sd`` is the sample sd (N - 1). Same form as :func:`kidscore_interaction_c`. Observed site
    ``kid_score``.
    """
    _check_unused(unused, _KIDIQ_WORK, "kidscore_interaction_z")
    kid_score = _vector(kid_score, N, "kid_score", required=False)
    mom_hs, mom_iq = _vector(mom_hs, N, "mom_hs"), _vector(mom_iq, N, "mom_iq")
    z_mom_hs = (mom_hs - jnp.mean(mom_hs)) / (2.0 * _sd(mom_hs))
    z_mom_iq = (mom_iq - jnp.mean(mom_iq)) / (2.0 * _sd(mom_iq))
    _interaction_model(N, kid_score, z_mom_hs, z_mom_iq)


def kidscore_mom_work(N, kid_score=None, mom_work=None, **unused):
    r"""``kidscore_mom_work.stan``: kid_score on indicators of mom_work = 2, 3, 4.

    :math:`y \sim N(\beta_1 + \sum_{j=2}^{4} \beta_j [w = j], \sigma)`, ``w`` = mom_work.

    ``mom_work`` takes the values 1..4 (a Stan ``int`` array; floats holding integers are fine).
    Observed site ``kid_score``.
    """
    _check_unused(unused, _KIDIQ_WORK, "kidscore_mom_work")
    kid_score = _vector(kid_score, N, "kid_score", required=False)
    mom_work = _vector(mom_work, N, "mom_work")
    dtype = mom_work.dtype
    work2, work3, work4 = ((mom_work == j).astype(dtype) for j in (2, 3, 4))
    _linear_regression(N, "kid_score", kid_score, [work2, work3, work4])


# --------------------------------------------------------------------------------------------------
# mesquite: flat priors on beta and sigma
# --------------------------------------------------------------------------------------------------
def logmesquite(
    N, weight=None, diam1=None, diam2=None, canopy_height=None, total_height=None, density=None,
    group=None, **unused,
):  # fmt: skip
    r"""``logmesquite.stan``: log weight on the logs of diam1, diam2, canopy_height, total_height,
    density, and on group.

    Observed site ``log_weight``.
    """
    _check_unused(unused, _MESQUITE, "logmesquite")
    log_weight = _maybe(jnp.log, _vector(weight, N, "weight", required=False))
    predictors = [
        jnp.log(_vector(diam1, N, "diam1")),
        jnp.log(_vector(diam2, N, "diam2")),
        jnp.log(_vector(canopy_height, N, "canopy_height")),
        jnp.log(_vector(total_height, N, "total_height")),
        jnp.log(_vector(density, N, "density")),
        _vector(group, N, "group"),
    ]
    _linear_regression(N, "log_weight", log_weight, predictors)


def _canopy(N, diam1, diam2, canopy_height):
    """log canopy volume, area and shape: log(d1 .* d2 .* h), log(d1 .* d2), log(d1 ./ d2)."""
    diam1, diam2 = _vector(diam1, N, "diam1"), _vector(diam2, N, "diam2")
    canopy_height = _vector(canopy_height, N, "canopy_height")
    return jnp.log(diam1 * diam2 * canopy_height), jnp.log(diam1 * diam2), jnp.log(diam1 / diam2)


def logmesquite_logva(
    N, weight=None, diam1=None, diam2=None, canopy_height=None, group=None, **unused
):
    r"""``logmesquite_logva.stan``: log weight on log canopy volume, log canopy area and group.

    Volume ``diam1 * diam2 * canopy_height``, area ``diam1 * diam2``. Observed site ``log_weight``.
    """
    _check_unused(unused, _MESQUITE, "logmesquite_logva")
    log_weight = _maybe(jnp.log, _vector(weight, N, "weight", required=False))
    log_volume, log_area, _ = _canopy(N, diam1, diam2, canopy_height)
    group = _vector(group, N, "group")
    _linear_regression(N, "log_weight", log_weight, [log_volume, log_area, group])


def logmesquite_logvas(
    N, weight=None, diam1=None, diam2=None, canopy_height=None, total_height=None, density=None,
    group=None, **unused,
):  # fmt: skip
    r"""``logmesquite_logvas.stan``: log weight on log volume, area, shape (diam1 / diam2),
    total_height, density, and on group.

    Observed site ``log_weight``.
    """
    _check_unused(unused, _MESQUITE, "logmesquite_logvas")
    log_weight = _maybe(jnp.log, _vector(weight, N, "weight", required=False))
    log_volume, log_area, log_shape = _canopy(N, diam1, diam2, canopy_height)
    predictors = [
        log_volume,
        log_area,
        log_shape,
        jnp.log(_vector(total_height, N, "total_height")),
        jnp.log(_vector(density, N, "density")),
        _vector(group, N, "group"),
    ]
    _linear_regression(N, "log_weight", log_weight, predictors)


def logmesquite_logvash(
    N, weight=None, diam1=None, diam2=None, canopy_height=None, total_height=None, group=None,
    **unused,
):  # fmt: skip
    r"""``logmesquite_logvash.stan``: log weight on log volume, area, shape, total_height; group.

    Observed site ``log_weight``.
    """
    _check_unused(unused, _MESQUITE, "logmesquite_logvash")
    log_weight = _maybe(jnp.log, _vector(weight, N, "weight", required=False))
    log_volume, log_area, log_shape = _canopy(N, diam1, diam2, canopy_height)
    predictors = [
        log_volume,
        log_area,
        log_shape,
        jnp.log(_vector(total_height, N, "total_height")),
        _vector(group, N, "group"),
    ]
    _linear_regression(N, "log_weight", log_weight, predictors)


def logmesquite_logvolume(N, weight=None, diam1=None, diam2=None, canopy_height=None, **unused):
    r"""``logmesquite_logvolume.stan``: log weight on log(diam1 .* diam2 .* canopy_height).

    Observed site ``log_weight``.
    """
    _check_unused(unused, _MESQUITE, "logmesquite_logvolume")
    log_weight = _maybe(jnp.log, _vector(weight, N, "weight", required=False))
    log_volume, _, _ = _canopy(N, diam1, diam2, canopy_height)
    _linear_regression(N, "log_weight", log_weight, [log_volume])


def mesquite(
    N, weight=None, diam1=None, diam2=None, canopy_height=None, total_height=None, density=None,
    group=None, **unused,
):  # fmt: skip
    r"""``mesquite.stan``: weight on diam1, diam2, canopy_height, total_height, density, group.

    Observed site ``weight``.
    """
    _check_unused(unused, _MESQUITE, "mesquite")
    weight = _vector(weight, N, "weight", required=False)
    predictors = [
        _vector(diam1, N, "diam1"),
        _vector(diam2, N, "diam2"),
        _vector(canopy_height, N, "canopy_height"),
        _vector(total_height, N, "total_height"),
        _vector(density, N, "density"),
        _vector(group, N, "group"),
    ]
    _linear_regression(N, "weight", weight, predictors)


# --------------------------------------------------------------------------------------------------
# diamonds (brms)
# --------------------------------------------------------------------------------------------------
class HalfStudentT(dist.Distribution):
    r"""Student-t with ``df`` degrees of freedom and scale ``scale``, folded onto :math:`(0, \infty)`:
    ``log_prob = log 2 + StudentT(df, 0, scale).log_prob``, brms's ``student_t_lpdf(x | df, 0, s) -
    student_t_lccdf(0 | df, 0, s)``. The same density as ``TruncatedDistribution(StudentT(df, 0,
    scale), low=0)``, but sampled as ``|t|``: the truncated one draws through the Student-t
    quantile function, which numpyro computes only with tensorflow_probability installed, so prior
    draws (SMC, nested sampling, prior predictive) failed without it.
    """

    arg_constraints = {"df": constraints.positive, "scale": constraints.positive}
    support = constraints.positive
    reparametrized_params = ["scale"]

    def __init__(self, df, scale=1.0, *, validate_args=None):
        batch_shape = jnp.broadcast_shapes(jnp.shape(df), jnp.shape(scale))
        self.df, self.scale = jnp.broadcast_to(df, batch_shape), jnp.broadcast_to(scale, batch_shape)
        super().__init__(batch_shape=batch_shape, validate_args=validate_args)

    def log_prob(self, value):
        return math.log(2.0) + dist.StudentT(self.df, 0.0, self.scale).log_prob(value)

    def sample(self, key, sample_shape=()):
        return jnp.abs(dist.StudentT(self.df, 0.0, self.scale).sample(key, sample_shape))


def diamonds(N, K, X, Y=None, prior_only=0):
    r"""``diamonds.stan`` (brms 2.10): Gaussian linear model with centred predictors.

    .. math::
        Xc = X_{\cdot, 2:K} - \bar X_{\cdot, 2:K}, \quad b_k \sim N(0, 1), \quad
        \mathrm{Intercept} \sim t_3(8, 10), \quad \sigma \sim t_3^+(0, 10), \quad
        Y_n \sim N(\mathrm{Intercept} + Xc_n^\top b, \sigma).

    Sample sites ``b`` (K - 1,), ``Intercept``, ``sigma`` (> 0); observed site ``Y`` (N,), absent
    when ``prior_only`` is nonzero (as in the Stan code). The sigma prior is
    :class:`HalfStudentT` ``(3, 10)``, i.e. ``student_t_lpdf - student_t_lccdf(0)`` exactly as in
    Stan. The first column of ``X`` (the intercept) is dropped,
    whatever it holds, as in Stan.

    Args:
        N: number of observations.
        K: number of columns of ``X`` (population-level effects, intercept included).
        X: design matrix (N, K).
        Y: responses (N,), or ``None`` to sample them.
        prior_only: if nonzero, leave out the likelihood.
    """
    X = jnp.asarray(X, dtype=jnp.result_type(float))
    if X.shape != (N, K):
        raise DataError(f"X has shape {X.shape}, expected ({N}, {K})")
    Y = _vector(Y, N, "Y", required=False)
    means_X = jnp.mean(X[:, 1:], axis=0)
    Xc = X[:, 1:] - means_X
    b = numpyro.sample("b", dist.Normal(0.0, 1.0).expand((K - 1,)).to_event(1))
    intercept = numpyro.sample("Intercept", dist.StudentT(3.0, 8.0, 10.0))
    sigma = numpyro.sample("sigma", HalfStudentT(3.0, 10.0))
    if not prior_only:
        with numpyro.plate("data", N):
            numpyro.sample("Y", dist.Normal(intercept + Xc @ b, sigma), obs=Y)


#: posteriordb name -> (NumPyro program, stan_lp_offset = NumPyro log joint - Stan's log density)
MODELS = {
    "earnings-earn_height": (earn_height, 0.0),
    "earnings-log10earn_height": (log10earn_height, 0.0),
    "earnings-logearn_height_male": (logearn_height_male, 0.0),
    "earnings-logearn_interaction": (logearn_interaction, 0.0),
    "earnings-logearn_interaction_z": (logearn_interaction_z, 0.0),
    "earnings-logearn_logheight_male": (logearn_logheight_male, 0.0),
    "kidiq-kidscore_interaction": (kidscore_interaction, _LOG2),
    "kidiq-kidscore_momhs": (kidscore_momhs, _LOG2),
    "kidiq-kidscore_momhsiq": (kidscore_momhsiq, _LOG2),
    "kidiq_with_mom_work-kidscore_interaction_c": (kidscore_interaction_c, 0.0),
    "kidiq_with_mom_work-kidscore_interaction_c2": (kidscore_interaction_c2, 0.0),
    "kidiq_with_mom_work-kidscore_interaction_z": (kidscore_interaction_z, 0.0),
    "kidiq_with_mom_work-kidscore_mom_work": (kidscore_mom_work, 0.0),
    "mesquite-logmesquite": (logmesquite, 0.0),
    "mesquite-logmesquite_logva": (logmesquite_logva, 0.0),
    "mesquite-logmesquite_logvas": (logmesquite_logvas, 0.0),
    "mesquite-logmesquite_logvash": (logmesquite_logvash, 0.0),
    "mesquite-logmesquite_logvolume": (logmesquite_logvolume, 0.0),
    "mesquite-mesquite": (mesquite, 0.0),
    "diamonds-diamonds": (diamonds, 0.0),
}
