r"""Finite mixtures of Gaussians (or Student-t) in D dimensions, assignments marginalised exactly.

The model
---------
Observations :math:`y_1, \dots, y_N \in \mathbb{R}^D` come from ``K`` components with weights
:math:`w \in \Delta^{K-1}`:

.. math::

    p(y_n \mid \theta) = \sum_{k=1}^{K} w_k\, f(y_n \mid \mu_k, \Sigma_k), \qquad
    \log p(y \mid \theta) = \sum_{n=1}^{N} \operatorname{logsumexp}_k
    \big(\log w_k + \log f(y_n \mid \mu_k, \Sigma_k)\big),

with :math:`f` a multivariate normal, or (``likelihood="student_t"``) a multivariate Student-t
with ``df`` degrees of freedom and scale matrix :math:`\Sigma_k`. The assignments
:math:`z_n` never appear as sample sites: the observed site ``y`` has the distribution
:class:`MixtureLikelihood` whose ``log_prob`` returns the ``(N,)`` per-row log-sum-exp values, so
the pointwise log-likelihood (and PSIS-LOO) is per observation and every engine (NUTS, SMC,
nested sampling) runs the model.

Covariances (``covariance=``):

* ``"full"``: :math:`\Sigma_k = \mathrm{diag}(\sigma_k)\,\Omega_k\,\mathrm{diag}(\sigma_k)`,
  :math:`\Omega_k = L_k L_k^\top` with an ``LKJ(eta)`` prior on :math:`\Omega_k`;
* ``"diag"``: :math:`\Sigma_k = \mathrm{diag}(\sigma_k^2)`;
* ``"spherical"``: :math:`\Sigma_k = \sigma_k^2 I`;
* ``"shared"``: one full covariance :math:`\Sigma` for all components (LDA-like).

**The LKJ prior, built so nested sampling can run it.** The correlation Cholesky factor is not a
sample site: the sites are the ``D(D-1)/2`` partial correlations of the C-vine,
:math:`\rho_{ij} = 2 b_{ij} - 1` with :math:`b_{ij} \sim \mathrm{Beta}(\beta_i, \beta_i)`,
:math:`\beta_i = \eta + (D - 2)/2 - i/2` (row ``i`` of the vine, ``i = 0, ..., D-2``), and
``L_omega`` is the deterministic ``signed_stick_breaking_tril(rho)``. This is the exact C-vine
construction of the LKJ distribution (Lewandowski, Kurowicka & Joe 2009; numpyro's
``LKJCholesky(sample_method="cvine")`` samples it the same way), so the prior on
:math:`\Omega_k` *is* ``LKJ(eta)``; unlike an ``LKJCholesky`` site it has a unit-cube transform
(Beta quantiles) for nested sampling.

Priors (``loc``, ``scale`` are per-dimension vectors; by default the mean and standard deviation
of ``y`` per dimension, i.e. the priors sit on the data's scale, a mild use of the data that
every ``K`` shares, so evidences across ``K`` are comparable; pass them to fix the priors):

* ``weights ~ Dirichlet(concentration * 1_K)``;
* ``mu[k] ~ Normal(loc, mean_scale * scale)`` per dimension; in 1-D with ``ordered=True`` the
  means are ordered, ``mu[0] < ... < mu[K-1]``, with prior the order statistics of ``K`` iid
  ``Normal(loc, mean_scale * scale)`` draws (density ``K! prod_k N(mu_k)``, proper, with a
  unit-cube transform: :class:`bayeslik.distributions.OrderedNormal`): the labels are then
  identified and no relabelling is needed; in ``D > 1``, ``order_by=j`` orders coordinate ``j``
  the same way (sites ``mu_order`` (K,), the ordered coordinate, and ``mu_other`` (K, D-1), the
  rest, iid normal as before; ``mu`` (K, D) is then deterministic);
* ``sigma ~ HalfNormal(sigma_scale * scale)`` per component and dimension (``spherical``: per
  component, with the mean of ``scale``; ``shared``: the site is ``shared_sigma`` (D,));
* ``corr_partial ~ 2 Beta(beta, beta) - 1`` (full; ``shared_corr_partial`` for shared) as above,
  ``eta = lkj_concentration``; ``L_omega`` / ``shared_L_omega`` deterministic;
* Student-t: ONE degrees-of-freedom parameter ``df`` shared by the components (a per-component
  ``df`` is weakly identified with few points per cluster), ``df ~ Gamma(2, 0.1)`` (Juárez &
  Steel 2010) when ``df=None``, or fixed (a deterministic site) when ``df`` is a number.

Sites: ``weights`` (K,) (deterministic when ``K = 1``), ``mu`` (K, D) or (K,) for 1-D data ``y``
(N,), ``sigma`` (K, D) / (K,) / (K,) for 1-D data, ``corr_partial`` (K, D(D-1)/2) and ``L_omega``
(K, D, D) for full covariances with ``D > 1``, ``shared_sigma`` (D,) / () and
``shared_corr_partial``, ``shared_L_omega`` for ``shared``, ``df`` for Student-t; with
``order_by``, ``mu_order`` (K,) and ``mu_other`` (K, D-1) instead of ``mu`` (then deterministic);
the observed ``y``. Every component-indexed site has the component on axis 0 (see
:data:`RELABEL_SPEC`, registered as ``"mixture"`` for :func:`bayeslik.relabel.relabel` when this
module is imported).

**Label switching.** The likelihood is invariant under permuting the components, so a posterior
with ``K`` separated clusters has ``K!`` symmetric modes. Per-component summaries need
:func:`bayeslik.relabel.relabel` (``membership`` does it for you), or ``ordered=True`` in 1-D,
``order_by=j`` in ``D > 1`` (:func:`order_axis` picks the coordinate that separates the EM
clusters best).

**Identified labels for nested sampling, and the K! factor.** The ordered prior is the
exchangeable one restricted to one of the ``K!`` label regions and multiplied by ``K!`` (the
density of order statistics), so the ordered posterior is the exchangeable posterior with its
draws relabelled into that region, and the evidence is *the same*: the exchangeable
:math:`Z = \int L\,\pi` is ``K!`` equal integrals over the label regions (the likelihood and
prior are symmetric), and the ordered prior puts mass ``K! \cdot (1/K!) = 1`` on one of them.
No ``log K!`` correction is needed between engines, identified or not (SMC on the exchangeable
model usually ends in one label mode, but by the same symmetry its log Z is the full one). A
``log K!`` does appear when a prior is *truncated* to one ordering without the ``K!`` (that
prior is improper by a factor ``1/K!`` and its log Z lower by ``log K!``), or when a one-mode
approximation (Laplace, BIC from one EM optimum) is compared with an evidence engine.
Measured on :func:`example` (17-D, ``K = 3``; NUTS 4x1000 relabelled as the reference): nss
(``num_live=100``) on the exchangeable model gave posterior means up to 9.8 combined standard
errors off and sds 0.77-0.91 of NUTS's (component 0, the elongated one, too narrow), its
self-check p = 0.008 (not flagged); with ``order_by=1`` every mean within 1.9 and every sd ratio
within 0.93-1.07, self-check p = 0.69; log Z -1205.58 +- 0.69 vs -1204.60 +- 0.69 exchangeable.
Why: the live points of the exchangeable model sit in several label modes (two still at the
end), so the covariance that shapes nss's slice directions (and dynesty's bounds) spans the
distance between modes and the moves inside one mode are short; ordering leaves one mode.
:func:`choose_k` identifies the labels by default (``identify=True``).

Example
-------
>>> import jax, bayeslik as bl
>>> from bayeslik.models import mixture
>>> data = mixture.simulate(jax.random.key(0), num_points=200, num_components=2, dim=2)
>>> post = bl.Posterior(mixture.model, y=data["y"], num_components=2, covariance="full")
>>> sorted(post.latent_names)
['corr_partial', 'mu', 'sigma', 'weights']
>>> fit = bl.fit(post, "nuts", num_warmup=300, num_samples=300, num_chains=2,
...              init=mixture.init_params(data["y"], 2), progress_bar=False)  # doctest: +SKIP
>>> member = mixture.membership(fit)                                         # doctest: +SKIP
>>> member["labels"].shape                                                   # doctest: +SKIP
(200,)
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax.scipy.linalg import solve_triangular
from jax.scipy.special import gammaln, logsumexp
from numpyro.distributions import constraints
from numpyro.distributions.transforms import AffineTransform
from numpyro.distributions.util import signed_stick_breaking_tril

from bayeslik.distributions import OrderedNormal
from bayeslik.errors import DataError, ModelError, OptionError
from bayeslik.inits import set_default_init
from bayeslik.compare import model_choice_table
from bayeslik.relabel import register_components, relabel

__all__ = [
    "COVARIANCES",
    "LIKELIHOODS",
    "RELABEL_COST_SITES",
    "RELABEL_SPEC",
    "MixtureLikelihood",
    "choose_k",
    "classification_fn",
    "component_logdensity",
    "example",
    "init_params",
    "lkj_partial_concentration",
    "membership",
    "model",
    "order_axis",
    "simulate",
]

COVARIANCES = ("full", "diag", "spherical", "shared")
LIKELIHOODS = ("normal", "student_t")

#: Default prior settings (in units of the data's per-dimension scale).
MEAN_SCALE = 2.0
SIGMA_SCALE = 1.0
LKJ_CONCENTRATION = 2.0
DF_PRIOR = (2.0, 0.1)  # Gamma(shape, rate) on the Student-t degrees of freedom

#: Which sites carry the component axis (for :func:`bayeslik.relabel.relabel`, registered as
#: ``"mixture"``; sites a variant lacks are skipped).
RELABEL_SPEC = {"weights": 0, "mu": 0, "sigma": 0, "corr_partial": 0, "L_omega": 0,
                "mu_order": 0, "mu_other": 0}
#: The sites compared in the pivot method's cost: the means. Shape parameters (scales,
#: correlations, weights) are far noisier relative to their differences between components and,
#: weighted equally, mislead the matching (measured: on 3 overlapping 2-D clusters, membership
#: error 0.29 with every site in the cost vs 0.10 with the means alone, whatever the pivot draw).
RELABEL_COST_SITES = ("mu",)


# --------------------------------------------------------------------------------------------------
# component densities: one function for the model, membership and relabelling
# --------------------------------------------------------------------------------------------------
def _structure(params: dict) -> tuple[bool, str, bool]:
    """(univariate, covariance, student_t) read off the parameter names and shapes."""
    mu = params["mu"]
    univariate = jnp.ndim(mu) == 1
    if "shared_sigma" in params:
        cov = "shared"
    elif "L_omega" in params:
        cov = "full"
    elif univariate or jnp.ndim(params["sigma"]) == 2:
        cov = "diag"
    else:
        cov = "spherical"
    return bool(univariate), cov, "df" in params


def component_logdensity(params: dict, y) -> jax.Array:
    r"""``(N, K)`` array of :math:`\log w_k + \log f(y_n \mid \mu_k, \Sigma_k)`.

    ``params`` holds constrained values of one draw (``weights``, ``mu``, ``sigma`` or
    ``shared_sigma``, ``L_omega`` or ``shared_L_omega`` where ``D > 1``, ``df`` for Student-t); the
    covariance type and likelihood are read off which keys are present. ``y`` is ``(N,)`` or
    ``(N, D)``. ``logsumexp`` over the last axis is the per-observation log-likelihood; the
    softmax is the membership probability :math:`p(z_n = k \mid y_n, \theta)`.

    With the whitened residual :math:`r = L_k^{-1}(y_n - \mu_k)` (:math:`\Sigma_k = L_k L_k^\top`),
    the normal is :math:`-\tfrac12 |r|^2 - \log|L_k| - \tfrac D2 \log 2\pi` and the Student-t
    :math:`\log\Gamma(\tfrac{\nu + D}2) - \log\Gamma(\tfrac\nu2) - \tfrac D2\log(\nu\pi) -
    \log|L_k| - \tfrac{\nu + D}2 \log(1 + |r|^2/\nu)`.

    >>> import jax.numpy as jnp
    >>> p = {"weights": jnp.array([0.5, 0.5]), "mu": jnp.array([-1.0, 1.0]),
    ...      "sigma": jnp.array([1.0, 1.0])}
    >>> component_logdensity(p, jnp.zeros(3)).shape
    (3, 2)
    """
    univariate, cov, student = _structure(params)
    y = jnp.asarray(y)
    y2 = y[:, None] if univariate else y
    mu = jnp.asarray(params["mu"])
    mu2 = mu[:, None] if univariate else mu
    K, D = mu2.shape
    diff = y2[:, None, :] - mu2[None]  # (N, K, D)
    if cov == "shared":
        sd = jnp.broadcast_to(jnp.reshape(params["shared_sigma"], (-1,)), (D,))
        if "shared_L_omega" in params:
            L = sd[:, None] * jnp.asarray(params["shared_L_omega"])  # (D, D)
            L_inv = solve_triangular(L, jnp.eye(D, dtype=L.dtype), lower=True)
            r = jnp.einsum("ij,nkj->nki", L_inv, diff)
            logdet = jnp.sum(jnp.log(jnp.diagonal(L)))
        else:
            r = diff / sd
            logdet = jnp.sum(jnp.log(sd))
        logdet = jnp.broadcast_to(logdet, (K,))
    elif cov == "full":
        sd = jnp.asarray(params["sigma"])  # (K, D)
        L = sd[..., :, None] * jnp.asarray(params["L_omega"])  # (K, D, D)
        # r = L^-1 diff through the (K, D, D) inverses and one einsum: XLA's CPU triangular
        # solve with N right-hand sides was 20x slower per gradient at D = 5 (58 ms vs 2.6 ms)
        eye = jnp.broadcast_to(jnp.eye(D, dtype=L.dtype), L.shape)
        L_inv = solve_triangular(L, eye, lower=True)
        r = jnp.einsum("kij,nkj->nki", L_inv, diff)
        logdet = jnp.sum(jnp.log(jnp.diagonal(L, axis1=-2, axis2=-1)), -1)
    else:
        sd = jnp.asarray(params["sigma"])
        sd = sd[:, None] if sd.ndim == 1 else sd  # (K, 1) spherical / univariate, (K, D) diag
        sd = jnp.broadcast_to(sd, (K, D))
        r = diff / sd[None]
        logdet = jnp.sum(jnp.log(sd), -1)
    maha = jnp.sum(r**2, -1)  # (N, K)
    if student:
        nu = jnp.asarray(params["df"])
        comp = (gammaln((nu + D) / 2) - gammaln(nu / 2) - 0.5 * D * jnp.log(nu * jnp.pi)
                - logdet - 0.5 * (nu + D) * jnp.log1p(maha / nu))
    else:
        comp = -0.5 * maha - logdet - 0.5 * D * math.log(2 * math.pi)
    return jnp.log(jnp.asarray(params["weights"])) + comp


class MixtureLikelihood(dist.Distribution):
    r"""The mixture likelihood of the rows of ``y``, assignments summed out.

    Batch shape ``(N,)``, event shape ``()`` (1-D data) or ``(D,)``; ``log_prob(y)`` is the
    ``(N,)`` vector :math:`\operatorname{logsumexp}_k(\log w_k + \log f(y_n \mid \theta_k))`
    (:func:`component_logdensity`), so the pointwise log-likelihood is per observation.
    ``sample`` draws new data (assignment, then the component's normal or Student-t).
    """

    pytree_data_fields = ("params",)

    def __init__(self, params: dict, shape: tuple[int, ...], *, validate_args=None):
        self.params = params
        event = tuple(shape[1:])
        super().__init__(batch_shape=tuple(shape[:1]), event_shape=event,
                         validate_args=validate_args)

    @property
    def support(self):
        return constraints.independent(constraints.real, len(self.event_shape))

    def tree_flatten(self):  # the shape is static: keep it with the treedef
        return (self.params,), (self.batch_shape + self.event_shape,)

    @classmethod
    def tree_unflatten(cls, aux, params):
        return cls(params[0], aux[0])

    def log_prob(self, value):
        return _mixture_loglik(self.params, jnp.asarray(value))

    def sample(self, key, sample_shape=()):
        univariate, cov, student = _structure(self.params)
        N = self.batch_shape[0]
        n = math.prod(tuple(sample_shape)) * N
        kz, ke, kg = jax.random.split(key, 3)
        w = jnp.asarray(self.params["weights"])
        z = jax.random.categorical(kz, jnp.log(w), shape=(n,))
        mu = jnp.asarray(self.params["mu"])
        mu2 = mu[:, None] if univariate else mu
        K, D = mu2.shape
        chol = _cholesky(self.params, K, D, cov)
        eps = jax.random.normal(ke, (n, D))
        if student:
            nu = jnp.asarray(self.params["df"])
            g = jax.random.gamma(kg, nu / 2, (n,)) / (nu / 2)
            eps = eps / jnp.sqrt(g)[:, None]
        x = mu2[z] + jnp.einsum("nij,nj->ni", chol[z], eps)
        return x.reshape(tuple(sample_shape) + self.batch_shape + self.event_shape)


@jax.jit
def _mixture_loglik(params: dict, y: jax.Array) -> jax.Array:
    """(N,) per-row log-likelihood. Jitted as a whole, so the Posterior's eager checking traces
    compile one function instead of dispatching every small operation; inlined in an outer jit."""
    return logsumexp(component_logdensity(params, y), axis=-1)


def _cholesky(params: dict, K: int, D: int, cov: str) -> jax.Array:
    """(K, D, D) Cholesky factors of the component covariances."""
    if cov == "shared":
        sd = jnp.broadcast_to(jnp.reshape(params["shared_sigma"], (-1,)), (D,))
        Lo = params.get("shared_L_omega")
        L = jnp.diag(sd) if Lo is None else sd[:, None] * jnp.asarray(Lo)
        return jnp.broadcast_to(L, (K, D, D))
    if cov == "full":
        return jnp.asarray(params["sigma"])[..., :, None] * jnp.asarray(params["L_omega"])
    sd = jnp.asarray(params["sigma"])
    sd = jnp.broadcast_to(sd[:, None] if sd.ndim == 1 else sd, (K, D))
    return jax.vmap(jnp.diag)(sd)


# --------------------------------------------------------------------------------------------------
# the NumPyro program
# --------------------------------------------------------------------------------------------------
def lkj_partial_concentration(dim: int, eta: float) -> np.ndarray:
    r"""Beta concentrations ``(D(D-1)/2,)`` of the C-vine partial correlations of ``LKJ(eta)``.

    Row ``i`` of the vine (``i = 0..D-2``) has :math:`\beta_i = \eta + (D-2)/2 - i/2`; the entries
    are in the order ``signed_stick_breaking_tril`` reads them (numpyro's ``matrix_to_tril_vec``
    of the ``(D-1, D-1)`` matrix whose column ``i`` holds row ``i``'s offset).

    >>> lkj_partial_concentration(3, 1.0)
    array([1.5, 1.5, 1. ])
    """
    Dm1 = int(dim) - 1
    offset = np.broadcast_to(0.5 * np.arange(Dm1), (Dm1, Dm1))
    idx = np.tril_indices(Dm1)
    return float(eta) + 0.5 * (int(dim) - 2) - offset[idx]


def _partial_corr_prior(dim: int, eta: float, batch: tuple[int, ...] = ()):
    conc = jnp.asarray(lkj_partial_concentration(dim, eta))
    conc = jnp.broadcast_to(conc, batch + conc.shape)
    return dist.TransformedDistribution(dist.Beta(conc, conc), AffineTransform(-1.0, 2.0))


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_choices(covariance, likelihood) -> None:
    if covariance not in COVARIANCES:
        raise ModelError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
    if likelihood not in LIKELIHOODS:
        raise ModelError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")


def _check_args(y, num_components, covariance, likelihood, ordered, df, concentration,
                loc, scale, order_by=None) -> tuple[int, int, int, bool]:
    """(N, D, K, univariate); a DataError (for ``y``) or ModelError (for the model's settings)
    naming the argument, before anything is compiled."""
    _check_choices(covariance, likelihood)
    if (not isinstance(num_components, (int, np.integer)) or isinstance(num_components, bool)
            or num_components < 1):
        raise ModelError(f"num_components must be a positive int (K >= 1), got {num_components!r}")
    shape = tuple(np.shape(y))
    if len(shape) not in (1, 2) or shape[0] < 1 or (len(shape) == 2 and shape[1] < 1):
        raise DataError(f"y must have shape (N,) or (N, D) with N, D >= 1 (one row per "
                        f"observation), got {shape}")
    if _is_concrete(y):
        arr = np.asarray(y)
        if arr.dtype.kind not in "biuf":
            raise DataError(f"y must be numeric, got dtype {arr.dtype}")
        if not np.all(np.isfinite(arr)):
            bad = np.argwhere(~np.isfinite(arr))[0]
            raise DataError(f"y contains {int((~np.isfinite(arr)).sum())} non-finite value(s) "
                            f"(NaN/inf; first at index {tuple(int(i) for i in bad)}); remove "
                            "or impute those rows")
    N = shape[0]
    D = 1 if len(shape) == 1 else shape[1]
    univariate = len(shape) == 1
    if ordered and D != 1:
        raise ModelError(f"ordered=True orders the means of 1-D data; y has D = {D} dimensions. "
                         "Use order_by=<axis> (orders one coordinate of the means) or "
                         "relabelling (bayeslik.relabel) in D > 1")
    if order_by is not None:
        if (not isinstance(order_by, (int, np.integer)) or isinstance(order_by, bool)
                or not 0 <= order_by < D or D == 1):
            raise ModelError(f"order_by must be None or an axis 0..D-1 of D > 1 dimensional y "
                             f"(ordered=True orders 1-D data), got {order_by!r} with D = {D}")
    if df is not None and not (isinstance(df, (int, float)) and df > 0):
        raise ModelError(f"df must be None (learned) or a positive number, got {df!r}")
    if not (isinstance(concentration, (int, float)) and concentration > 0):
        raise ModelError(f"concentration must be a positive number, got {concentration!r}")
    for name, v in (("loc", loc), ("scale", scale)):
        if v is not None and np.ndim(v) not in (0, 1):
            raise ModelError(f"{name} must be a scalar or a (D,) vector, got shape {np.shape(v)}")
        if v is not None and np.ndim(v) == 1 and np.shape(v)[0] != D:
            raise ModelError(f"{name} must have D = {D} entries, got {np.shape(v)[0]}")
    if scale is not None and _is_concrete(scale) and np.any(np.asarray(scale) <= 0):
        raise ModelError(f"scale must be positive, got {scale!r}")
    return N, D, int(num_components), univariate


def model(y, num_components: int, covariance: str = "full", likelihood: str = "normal", *,
          ordered: bool = False, concentration: float = 1.0, loc=None, scale=None,
          mean_scale: float = MEAN_SCALE, sigma_scale: float = SIGMA_SCALE,
          lkj_concentration: float = LKJ_CONCENTRATION, df: float | None = None,
          order_by: int | None = None) -> None:
    r"""Finite mixture of ``num_components`` Gaussians (or Student-t) as a NumPyro program.

    See the module docstring for the maths, priors and sites.

    Args:
        y: ``(N, D)`` observations (one row each), or ``(N,)`` for 1-D data.
        num_components: ``K >= 1``.
        covariance: ``"full"``, ``"diag"``, ``"spherical"`` or ``"shared"``.
        likelihood: ``"normal"`` or ``"student_t"``.
        ordered: 1-D only: order the means (identifies the labels).
        order_by: ``D > 1`` only: order coordinate ``order_by`` of the means (identifies the
            labels, same evidence; see the module docs). Sites ``mu_order``, ``mu_other``.
        concentration: Dirichlet concentration of the weights (each entry).
        loc, scale: the data's location and scale per dimension for the priors (default: the
            mean and standard deviation of ``y``).
        mean_scale, sigma_scale: prior scales of the means and of the component scales, in
            units of ``scale``.
        lkj_concentration: ``eta`` of the LKJ prior on each correlation matrix.
        df: Student-t degrees of freedom: ``None`` learns one shared ``df``; a number fixes it.

    >>> import numpy as np, bayeslik as bl
    >>> y = np.random.default_rng(0).normal(size=(50, 2))
    >>> post = bl.Posterior(model, y=y, num_components=3, covariance="diag")
    >>> post.ndim   # weights 2, mu 6, sigma 6
    14
    """
    N, D, K, univariate = _check_args(y, num_components, covariance, likelihood, ordered, df,
                                      concentration, loc, scale, order_by)
    y = jnp.asarray(y)
    y2 = y[:, None] if univariate else y
    m = jnp.mean(y2, 0) if loc is None else jnp.broadcast_to(jnp.asarray(loc, y.dtype), (D,))
    if scale is None:
        s = jnp.std(y2, 0) if N > 1 else jnp.ones(D, y.dtype)
        s = jnp.where(s > 0, s, 1.0)
    else:
        s = jnp.broadcast_to(jnp.asarray(scale, y.dtype), (D,))
    if univariate:
        m, s = m[0], s[0]
    params: dict[str, Any] = {}
    if K == 1:
        params["weights"] = numpyro.deterministic("weights", jnp.ones(1, y.dtype))
    else:
        params["weights"] = numpyro.sample("weights",
                                           dist.Dirichlet(jnp.full(K, float(concentration))))
    if ordered:
        params["mu"] = numpyro.sample("mu", OrderedNormal(m, mean_scale * s, K))
    elif order_by is not None:
        j = int(order_by)
        rest = [i for i in range(D) if i != j]
        first = numpyro.sample("mu_order", OrderedNormal(m[j], mean_scale * s[j], K))
        with numpyro.plate("component", K):
            other = numpyro.sample("mu_other", dist.Normal(m[jnp.array(rest)],
                                                           mean_scale * s[jnp.array(rest)])
                                   .to_event(1))
        cols = [first[:, None] if i == j else other[:, [rest.index(i)]] for i in range(D)]
        params["mu"] = numpyro.deterministic("mu", jnp.concatenate(cols, axis=1))
    with numpyro.plate("component", K):
        if not ordered and order_by is None:
            prior_mu = dist.Normal(m, mean_scale * s)
            params["mu"] = numpyro.sample("mu", prior_mu if univariate else prior_mu.to_event(1))
        if covariance in ("full", "diag") and not univariate:
            params["sigma"] = numpyro.sample(
                "sigma", dist.HalfNormal(sigma_scale * s).expand([K, D]).to_event(1))
        elif covariance != "shared":
            params["sigma"] = numpyro.sample("sigma", dist.HalfNormal(sigma_scale * jnp.mean(s)))
        if covariance == "full" and D > 1:
            rho = numpyro.sample("corr_partial",
                                 _partial_corr_prior(D, lkj_concentration).to_event(1))
            params["L_omega"] = numpyro.deterministic("L_omega", signed_stick_breaking_tril(rho))
    if covariance == "shared":
        prior_sd = dist.HalfNormal(sigma_scale * s)
        params["shared_sigma"] = numpyro.sample(
            "shared_sigma", prior_sd if univariate else prior_sd.to_event(1))
        if D > 1:
            rho = numpyro.sample("shared_corr_partial",
                                 _partial_corr_prior(D, lkj_concentration).to_event(1))
            params["shared_L_omega"] = numpyro.deterministic(
                "shared_L_omega", signed_stick_breaking_tril(rho))
    if likelihood == "student_t":
        if df is None:
            params["df"] = numpyro.sample("df", dist.Gamma(*DF_PRIOR))
        else:
            params["df"] = numpyro.deterministic("df", jnp.asarray(float(df), y.dtype))
    numpyro.sample("y", MixtureLikelihood(params, tuple(y.shape)), obs=y)


# --------------------------------------------------------------------------------------------------
# simulation
# --------------------------------------------------------------------------------------------------
def _np_rng(rng_key) -> np.random.Generator:
    return np.random.default_rng(np.asarray(jax.random.key_data(rng_key)).ravel().tolist())


def simulate(rng_key, num_points: int, num_components: int = 3, dim: int = 2,
             separation: float = 4.0, covariance: str = "full", likelihood: str = "normal",
             df: float = 5.0, weights=None, anisotropy: float = 3.0,
             scale_range: tuple[float, float] = (0.5, 1.5)) -> dict:
    r"""Simulate mixture data with heterogeneous cluster shapes and a separation control.

    Component ``k`` has covariance :math:`\Sigma_k = R_k \mathrm{diag}(s_k^2) R_k^\top`: ``R_k`` a
    random rotation (``full``; the identity for ``diag``/``spherical``), scales ``s_k`` with a
    common size drawn from ``scale_range`` times per-axis factors spread log-uniformly over a
    ratio ``anisotropy`` (all equal for ``spherical``; one covariance for all with ``shared``).
    The means are iid normal directions rescaled so that the *closest* pair is ``separation``
    average cluster standard deviations apart, :math:`\min_{i<j} |m_i - m_j| = \mathrm{separation}
    \cdot \bar s` (:math:`\bar s^2` the mean of :math:`\operatorname{tr}\Sigma_k / D`): along the
    line between those two means each cluster has about unit-``\bar s`` spread, so the overlap is
    roughly :math:`\Phi(-\mathrm{separation}/2)` whatever ``D``.

    Returns ``{"y": (N, D), "labels": (N,) int, "params": {"weights": (K,), "mu": (K, D),
    "cov": (K, D, D)[, "df"]}}`` (NumPy). ``dim=1`` gives ``y`` of shape ``(N,)`` and ``mu``
    ``(K,)``, sorted increasingly (the order of ``ordered=True``).

    >>> import jax
    >>> out = simulate(jax.random.key(0), num_points=100, num_components=3, dim=2)
    >>> out["y"].shape, out["labels"].shape
    ((100, 2), (100,))
    """
    _check_choices(covariance, likelihood)
    for name, v in (("num_points", num_points), ("num_components", num_components), ("dim", dim)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise OptionError(f"simulate: {name} must be a positive integer, got {v!r}")
    if weights is not None:
        w = np.asarray(weights, float)
        if w.shape != (int(num_components),) or not np.all(np.isfinite(w)) or np.any(w < 0) \
                or not w.sum() > 0:
            raise OptionError(f"simulate: weights must be {int(num_components)} non-negative "
                              f"numbers with a positive sum, got {weights!r}")
    if not (separation >= 0 and anisotropy >= 1 and 0 < scale_range[0] <= scale_range[1]):
        raise OptionError(f"simulate: need separation >= 0, anisotropy >= 1 and 0 < "
                          f"scale_range[0] <= scale_range[1], got separation={separation!r}, "
                          f"anisotropy={anisotropy!r}, scale_range={scale_range!r}")
    rng = _np_rng(rng_key)
    K, D, N = int(num_components), int(dim), int(num_points)
    w = np.full(K, 1.0 / K) if weights is None else np.asarray(weights, float)
    w = w / w.sum()
    covs = np.zeros((K, D, D))
    for k in range(K):
        if covariance == "shared" and k > 0:
            covs[k] = covs[0]
            continue
        size = rng.uniform(*scale_range)
        if covariance == "spherical" or D == 1:
            s = np.full(D, size)
        else:
            s = size * np.exp(rng.uniform(-0.5, 0.5, D) * math.log(anisotropy))
        if covariance in ("full", "shared") and D > 1:
            q, r = np.linalg.qr(rng.normal(size=(D, D)))
            R = q * np.sign(np.diag(r))
        else:
            R = np.eye(D)
        covs[k] = (R * s**2) @ R.T
    sbar = math.sqrt(np.mean([np.trace(c) / D for c in covs]))
    mu = rng.normal(size=(K, D))
    if K > 1:
        dmin = min(np.linalg.norm(mu[i] - mu[j]) for i in range(K) for j in range(i + 1, K))
        mu = (mu - mu.mean(0)) * (separation * sbar / dmin)
    if D == 1:
        order = np.argsort(mu[:, 0])
        mu, covs, w = mu[order], covs[order], w[order]
    z = rng.choice(K, size=N, p=w)
    eps = rng.normal(size=(N, D))
    if likelihood == "student_t":
        eps = eps / np.sqrt(rng.gamma(df / 2, 2 / df, size=N))[:, None]
    chol = np.linalg.cholesky(covs)
    y = mu[z] + np.einsum("nij,nj->ni", chol[z], eps)
    params = {"weights": w, "mu": mu[:, 0] if D == 1 else mu, "cov": covs}
    if likelihood == "student_t":
        params["df"] = float(df)
    return {"y": y[:, 0] if D == 1 else y, "labels": z.astype(np.int32), "params": params}


def example() -> tuple:
    """A small bundled problem for the CLI zoo: ``(model, data)`` with 300 points in 2-D from
    three clusters of different shapes (full covariances), fitted with ``K = 3``, the means
    ordered along the coordinate that separates the clusters best (``order_by=order_axis(y,
    3)``, axis 1): one label mode, so every engine sees the same posterior (unordered, nss put
    posterior means 9.8 standard errors off NUTS's: its live points sat in several label
    modes) and the evidence is that of the exchangeable model.

    >>> fn, data = example()
    >>> data["y"].shape, data["num_components"], data["order_by"]
    ((300, 2), 3, 1)
    """
    out = simulate(jax.random.key(42), num_points=300, num_components=3, dim=2, separation=4.0)
    return model, {"y": out["y"], "num_components": 3, "covariance": "full",
                   "order_by": order_axis(out["y"], 3)}


# --------------------------------------------------------------------------------------------------
# starting values
# --------------------------------------------------------------------------------------------------
def _kmeans_pp(y: np.ndarray, K: int, rng: np.random.Generator, num_iters: int = 50) -> np.ndarray:
    """Centres by k-means++ seeding and Lloyd iterations."""
    N = len(y)
    centres = [y[rng.integers(N)]]
    for _ in range(1, K):
        d2 = np.min(((y[:, None] - np.array(centres)[None]) ** 2).sum(-1), axis=1)
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(N, 1.0 / N)
        centres.append(y[rng.choice(N, p=p)])
    c = np.array(centres)
    for _ in range(num_iters):
        z = ((y[:, None] - c[None]) ** 2).sum(-1).argmin(1)
        new = np.array([y[z == k].mean(0) if np.any(z == k) else c[k] for k in range(K)])
        if np.allclose(new, c):
            break
        c = new
    return c


def _em(y: np.ndarray, K: int, covariance: str, rng: np.random.Generator,
        num_iters: int = 100, reg: float = 1e-3) -> tuple:
    """(log-likelihood, weights, means, covariances) of EM from a k-means++ start."""
    N, D = y.shape
    c = _kmeans_pp(y, K, rng)
    z = ((y[:, None] - c[None]) ** 2).sum(-1).argmin(1)
    R = np.eye(K)[z] * 0.9 + 0.1 / K
    floor = reg * np.var(y, 0).mean() + 1e-9
    ll_old = -np.inf
    for _ in range(num_iters):
        nk = R.sum(0) + 1e-9
        w = nk / N
        mu = (R.T @ y) / nk[:, None]
        covs = np.zeros((K, D, D))
        for k in range(K):
            d = y - mu[k]
            covs[k] = (R[:, k, None] * d).T @ d / nk[k]
        if covariance == "diag":
            covs = covs * np.eye(D)
        elif covariance == "spherical":
            covs = np.trace(covs, axis1=1, axis2=2)[:, None, None] / D * np.eye(D)
        elif covariance == "shared":
            covs = np.broadcast_to((covs * w[:, None, None]).sum(0), (K, D, D)).copy()
        covs = covs + floor * np.eye(D)
        chol = np.linalg.cholesky(covs)
        logp = np.zeros((N, K))
        for k in range(K):
            r = np.linalg.solve(chol[k], (y - mu[k]).T).T
            logp[:, k] = (np.log(w[k]) - 0.5 * (r**2).sum(1)
                          - np.log(np.diag(chol[k])).sum() - 0.5 * D * math.log(2 * math.pi))
        mx = logp.max(1, keepdims=True)
        ll = float((mx[:, 0] + np.log(np.exp(logp - mx).sum(1))).sum())
        R = np.exp(logp - mx)
        R /= R.sum(1, keepdims=True)
        if ll - ll_old < 1e-6 * abs(ll):
            break
        ll_old = ll
    return ll, w, mu, covs


def _partial_from_corr_chol(L: np.ndarray) -> np.ndarray:
    """Partial correlations (..., D(D-1)/2) whose signed_stick_breaking_tril is ``L``."""
    from numpyro.distributions.transforms import CorrCholeskyTransform

    x = CorrCholeskyTransform().inv(jnp.asarray(L))
    return np.asarray(jnp.tanh(x))


def init_params(y, num_components: int, covariance: str = "full", likelihood: str = "normal", *,
                ordered: bool = False, num_restarts: int = 5, seed: int = 0,
                df: float | None = None, order_by: int | None = None) -> dict:
    r"""Constrained starting values for NUTS from EM (k-means++ starts, the best of
    ``num_restarts`` by log-likelihood): ``bl.fit(post, "nuts", init=init_params(y, K))``.

    Why: a mixture posterior has local modes (two clusters merged, one split); chains started
    uniformly in the unconstrained space often sit in one for the whole run. Starting near the
    EM optimum puts every chain in the main mode (and in the same labelling).

    Returns one entry per latent site of :func:`model` with the same arguments (``df`` starts at
    10 when learned). Correlations are shrunk by 5% towards the identity to stay inside the LKJ
    support's interior.

    >>> import numpy as np
    >>> y = np.concatenate([np.random.default_rng(0).normal(-3, 1, (50, 2)),
    ...                     np.random.default_rng(1).normal(3, 1, (50, 2))])
    >>> p = init_params(y, 2, "full")
    >>> sorted(p), p["mu"].shape
    (['corr_partial', 'mu', 'sigma', 'weights'], (2, 2))
    """
    _check_args(y, num_components, covariance, likelihood, ordered, df, 1.0, None, None,
                order_by)
    y = np.asarray(y, float)
    univariate = y.ndim == 1
    y2 = y[:, None] if univariate else y
    K = int(num_components)
    N, D = y2.shape
    rng = np.random.default_rng(seed)
    best = max((_em(y2, K, covariance, rng) for _ in range(max(1, num_restarts))),
               key=lambda r: r[0])
    _, w, mu, covs = best
    if ordered or univariate or order_by is not None:
        j = 0 if order_by is None else int(order_by)
        order = np.argsort(mu[:, j], kind="stable")
        w, mu, covs = w[order], mu[order], covs[order]
        if ordered or order_by is not None:
            for k in range(1, K):
                mu[k, j] = max(mu[k, j], mu[k - 1, j] + 1e-3 * np.std(y2[:, j]))
    w = np.clip(w, 1e-3, None)
    sd = np.sqrt(np.diagonal(covs, axis1=1, axis2=2))  # (K, D)
    out: dict[str, np.ndarray] = {}
    if K > 1:
        out["weights"] = w / w.sum()
    if order_by is not None:
        out["mu_order"] = mu[:, int(order_by)]
        out["mu_other"] = np.delete(mu, int(order_by), axis=1)
    else:
        out["mu"] = mu[:, 0] if univariate else mu

    def corr_partial(cov_stack):
        s = np.sqrt(np.diagonal(cov_stack, axis1=-2, axis2=-1))
        corr = cov_stack / (s[..., :, None] * s[..., None, :])
        corr = 0.95 * corr + 0.05 * np.eye(D)
        return _partial_from_corr_chol(np.linalg.cholesky(corr))

    if covariance == "shared":
        out["shared_sigma"] = sd[0, 0] if univariate else sd[0]
        if D > 1:
            out["shared_corr_partial"] = corr_partial(covs[0])
    elif covariance == "spherical" or univariate:
        out["sigma"] = sd.mean(1) if covariance == "spherical" else sd[:, 0]
    else:
        out["sigma"] = sd
        if covariance == "full" and D > 1:
            out["corr_partial"] = corr_partial(covs)
    if likelihood == "student_t" and df is None:
        out["df"] = np.asarray(10.0)
    return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}


# --------------------------------------------------------------------------------------------------
# membership, classification probabilities
# --------------------------------------------------------------------------------------------------
_PARAM_NAMES = ("weights", "mu", "sigma", "L_omega", "shared_sigma", "shared_L_omega", "df")


def _observed_y(fit) -> np.ndarray:
    if "observed_data" not in fit.idata.children or "y" not in fit.idata["observed_data"]:
        raise DataError("the Fit has no observed_data 'y'; pass y explicitly (membership(fit, "
                        "y)), or prob_fn=classification_fn(y) to bayeslik.relabel.relabel")
    return np.asarray(fit.idata["observed_data"]["y"].values)


def classification_fn(y):
    r"""``prob_fn(draws) -> (S, N, K)``: membership probabilities of each draw, for
    :func:`bayeslik.relabel.relabel` (Stephens' method).

    ``draws`` is ``{site: (S, ...)}`` constrained values; the result is
    :math:`p(z_n = k \mid y_n, \theta_s) = \mathrm{softmax}_k(\log w_k + \log f(y_n \mid
    \theta_k))` (:func:`component_logdensity`), computed in one jitted ``vmap``.

    >>> probs = classification_fn(y)({k: fit.draws(k).reshape(-1, ...)})   # doctest: +SKIP
    """
    y = jnp.asarray(y)

    @jax.jit
    def _probs(params):
        return jax.vmap(lambda p: jax.nn.softmax(component_logdensity(p, y), axis=-1))(params)

    def prob_fn(draws: dict) -> np.ndarray:
        params = {k: jnp.asarray(v) for k, v in draws.items() if k in _PARAM_NAMES}
        S = next(iter(params.values())).shape[0]
        chunk = max(1, int(2e7 // max(1, y.shape[0] * params["mu"].shape[1] * 8)))
        out = [np.asarray(_probs({k: v[i:i + chunk] for k, v in params.items()}))
               for i in range(0, S, chunk)]
        return np.concatenate(out, axis=0)

    return prob_fn


def membership(fit, y=None, *, relabel_method: str | None = "pivot", num_draws: int | None = 1000,
               ) -> dict:
    r"""Per-observation cluster probabilities averaged over the posterior, and the hard clustering.

    The Fit is first relabelled (:func:`bayeslik.relabel.relabel` with :data:`RELABEL_SPEC` and
    ``relabel_method``, unless it already is, or ``relabel_method=None``), then, over ``S``
    draws spread evenly over all chains,

    .. math:: \bar p_{nk} = \frac1S \sum_s p(z_n = k \mid y_n, \theta_s)

    Returns ``{"probs": (N, K), "probs_sd": (N, K) (spread over draws), "labels": (N,)
    argmax_k probs, "uncertainty": (N,) 1 - max_k probs, "fit": the relabelled Fit}``. ``y``
    defaults to the Fit's observed data; other points (new data) may be given.

    Examples:
        >>> out = membership(fit)                 # doctest: +SKIP
        >>> out["labels"][:10], out["uncertainty"].max()   # doctest: +SKIP
    """
    if relabel_method is not None and "relabel_method" not in fit.idata.attrs:
        fit = relabel(fit, "mixture", method=relabel_method)
    y = _observed_y(fit) if y is None else np.asarray(y)
    draws = {k: fit.draws(k) for k in _PARAM_NAMES if k in fit.idata["posterior"]}
    total = fit.num_chains * fit.num_draws
    flat = {k: v.reshape((total,) + v.shape[2:]) for k, v in draws.items()}
    S = total if num_draws is None else min(int(num_draws), total)
    idx = np.unique(np.linspace(0, total - 1, S).round().astype(int))
    probs = classification_fn(y)({k: v[idx] for k, v in flat.items()})
    mean = probs.mean(0)
    return {"probs": mean, "probs_sd": probs.std(0), "labels": mean.argmax(1).astype(np.int32),
            "uncertainty": 1.0 - mean.max(1), "fit": fit}


# --------------------------------------------------------------------------------------------------
# choosing K
# --------------------------------------------------------------------------------------------------
def order_axis(y, num_components: int, covariance: str = "full", *, seed: int = 0) -> int:
    r"""The coordinate along which to order the means (``model(..., order_by=order_axis(...))``):
    the one whose EM cluster means (:func:`init_params`' fit) are best separated relative to
    their standard errors, :math:`\max_d \min_{\text{adjacent } k} |\hat\mu_{k+1,d} -
    \hat\mu_{k,d}| / \sqrt{\hat\Sigma_{k,dd}/n_k + \hat\Sigma_{k+1,dd}/n_{k+1}}`.

    Any axis gives the same posterior up to labels and the same evidence; a well-separated one
    leaves the ordered posterior a single mode (a poorly separated one leaves a second, small
    mode where two clusters' order flips). 0 for 1-D data or ``num_components = 1``.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> y = np.concatenate([rng.normal([0, -4], 1, (50, 2)), rng.normal([0, 4], 1, (50, 2))])
    >>> order_axis(y, 2)
    1
    """
    y2 = np.asarray(y, float)
    if y2.ndim == 1 or int(num_components) < 2:
        return 0
    _check_args(y2, num_components, covariance, "normal", False, None, 1.0, None, None)
    K, N = int(num_components), len(y2)
    _, w, mu, covs = max((_em(y2, K, covariance, np.random.default_rng(seed + i))
                          for i in range(3)), key=lambda r: r[0])
    var = np.diagonal(covs, axis1=1, axis2=2) / np.maximum(w * N, 1.0)[:, None]  # (K, D)
    score = []
    for d in range(y2.shape[1]):
        o = np.argsort(mu[:, d])
        gap = np.diff(mu[o, d]) / np.sqrt(var[o[1:], d] + var[o[:-1], d])
        score.append(gap.min())
    return int(np.argmax(score))


def _identified(y, K: int, kw: dict, seed: int) -> dict:
    """``kw`` with the labels identified (``ordered=True`` in 1-D, ``order_by`` the
    :func:`order_axis` in D > 1) unless ``K = 1`` or the caller passed ``ordered`` or
    ``order_by`` (whatever its value)."""
    if K < 2 or "ordered" in kw or "order_by" in kw:
        return kw
    if np.ndim(y) == 1:
        return {**kw, "ordered": True}
    return {**kw, "order_by": order_axis(y, K, kw.get("covariance", "full"), seed=seed)}


def choose_k(y, ks, engine: str = "smc", criterion: str = "both", *, seed: int = 0,
             model_kwargs: dict | None = None, return_fits: bool = False,
             identify: bool = True, **engine_options):
    r"""Fit the mixture for each ``K`` in ``ks`` with one engine and tabulate the evidence and LOO.

    ``engine`` is any name (or config) ``bl.fit`` accepts; ``engine_options`` go to it. For
    ``"nuts"`` each ``K`` starts from :func:`init_params` unless ``init`` is given. Criteria:

    * ``"evidence"``: :math:`\log Z_K \pm` its standard error, from engines that estimate it
      (``"smc"``, ``"nested"``, ``"nss"``, ...); the posterior probability of ``K`` under a
      uniform prior over ``ks`` is :math:`\propto Z_K` (column ``p_k``);
    * ``"loo"``: PSIS-LOO ``elpd_loo`` :math:`\pm` its standard error (``arviz_stats.loo``), from
      any engine, plus the largest Pareto k (above 0.7 the estimate is unreliable), and
      ``elpd_diff``, ``se_diff``: the difference to the best ``K`` and its standard error from
      the pointwise differences (as ``arviz.compare``);
    * ``"both"``: whatever the engine gives.

    Returns a pandas DataFrame indexed by ``K`` (columns ``log_evidence``, ``log_evidence_err``,
    ``p_k``, ``elpd_loo``, ``elpd_loo_se``, ``elpd_diff``, ``se_diff``, ``p_loo``,
    ``pareto_k_max``, ``wall_s``). Its ``attrs`` hold ``best_evidence`` (largest
    :math:`\log Z`) and ``best_loo``: the *smallest* ``K`` whose ``elpd_loo`` is within
    ``2 se_diff`` of the best (an extra, empty component costs LOO almost nothing, so the raw
    argmax over-counts by noise; this is the usual "simplest model within two standard errors"
    rule). With ``return_fits=True``, ``(table, {K: Fit})``.

    ``identify=True`` (default) fits every ``K > 1`` with the labels identified: ``ordered=True``
    for 1-D ``y``, ``order_by=order_axis(y, K)`` otherwise (column ``order_by`` of the table),
    unless ``model_kwargs`` sets ``ordered`` or ``order_by``. The evidence and LOO are those of
    the exchangeable model (module docs: no ``K!`` correction), but nested sampling then sees
    one label mode instead of up to ``K!`` and its slice directions / bounds fit it: on the
    exchangeable 17-D example nss was biased, identified it agrees with NUTS. ``False`` fits
    the exchangeable model as given.

    >>> table = choose_k(y, [1, 2, 3], engine="smc", num_particles=500)   # doctest: +SKIP
    >>> table.attrs["best_evidence"]                                       # doctest: +SKIP
    """

    import bayeslik as bl

    if criterion not in ("evidence", "loo", "both"):
        raise OptionError(f"criterion must be 'evidence', 'loo' or 'both', got {criterion!r}")
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ModelError(f"ks must be a non-empty list of positive ints, got {ks!r}")
    kw = dict(model_kwargs or {})
    rows, fits, elpd_i = [], {}, {}
    for K in ks:
        kw_k = _identified(y, K, kw, seed) if identify else kw
        post = bl.Posterior(model, y=y, num_components=K, **kw_k)
        opts = dict(engine_options)
        if engine == "nuts" and "init" not in opts:
            opts["init"] = init_params(y, K, kw_k.get("covariance", "full"),
                                       kw_k.get("likelihood", "normal"),
                                       ordered=kw_k.get("ordered", False), df=kw_k.get("df"),
                                       order_by=kw_k.get("order_by"), seed=seed)
        t0 = time.perf_counter()
        fit = bl.fit(post, engine, seed=seed, **opts)
        row: dict[str, Any] = {"K": K, "wall_s": time.perf_counter() - t0,
                               "order_by": kw_k.get("order_by",
                                                    0 if kw_k.get("ordered") else None)}
        if criterion in ("evidence", "both"):
            row["log_evidence"] = fit.log_evidence
            row["log_evidence_err"] = fit.log_evidence_err
        if criterion in ("loo", "both"):
            loo, elpd_i[K] = _loo(fit)
            row.update(loo)
        rows.append(row)
        fits[K] = fit
    table = model_choice_table(rows, elpd_i, criterion, engine, "choose_k")
    return (table, fits) if return_fits else table


def _loo(fit) -> dict:
    import warnings

    import arviz_stats as azs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = azs.loo(fit.idata, pointwise=True, var_name="y")
    return ({"elpd_loo": float(res.elpd), "elpd_loo_se": float(res.se), "p_loo": float(res.p),
             "pareto_k_max": float(np.max(np.asarray(res.pareto_k)))},
            np.asarray(res.elpd_i, float).reshape(-1))


def _default_init(y, num_components: int, covariance: str = "full", likelihood: str = "normal", *,
                  ordered: bool = False, df: float | None = None, order_by: int | None = None,
                  **_priors) -> dict:
    """The model's default starting point (``init="auto"``): :func:`init_params` (EM) on its
    data, so every chain starts in the main mode and in one labelling."""
    return init_params(y, num_components, covariance, likelihood, ordered=ordered, df=df,
                       order_by=order_by)


def _relabel_classification_fn(fit):
    """The ``"mixture"`` spec's default ``prob_fn`` for Stephens' method: the membership
    probabilities (:func:`classification_fn`) on the Fit's observed ``y``."""
    return classification_fn(_observed_y(fit))


set_default_init(model, _default_init)
register_components("mixture", RELABEL_SPEC, cost_sites=RELABEL_COST_SITES,
                    classification_fn=_relabel_classification_fn)
