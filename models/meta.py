r"""Hierarchical Bayesian few-shot regression (meta-learning), task weights integrated out.

The model
---------
Many small regression tasks share a feature map :math:`\phi(x) \in \mathbb{R}^p` (e.g.
``[1, x, sin x, cos x]``, polynomials, or random Fourier features, see :func:`features`). Task
``t`` has its own weights and the tasks share a Gaussian population of weights:

.. math::

    y_{ti} = \phi(x_{ti})^\top w_t + \varepsilon_{ti}, \qquad
    \varepsilon_{ti} \sim \mathcal{N}(0, \sigma^2), \qquad
    w_t \mid \mu_0, \Sigma_0 \sim \mathcal{N}(\mu_0, \Sigma_0),

with a Normal-Inverse-Wishart prior on the population parameters and an inverse-gamma prior on
the noise variance (or a known ``noise``):

.. math::

    \Sigma_0 \sim \mathcal{IW}(\nu_0, \Psi_0), \qquad
    \mu_0 \mid \Sigma_0 \sim \mathcal{N}(m_0, \Sigma_0 / \kappa_0), \qquad
    \sigma^2 \sim \mathcal{IG}(a_0, b_0).

**Task weights integrated out.** Given :math:`(\mu_0, \Sigma_0, \sigma)` each task's
observations are jointly Gaussian,
:math:`y_t \sim \mathcal{N}(\Phi_t \mu_0,\ \Phi_t \Sigma_0 \Phi_t^\top + \sigma^2 I)`, so the
program samples only the global parameters and every engine (NUTS, SMC, nested sampling) runs on
``p + p(p+1)/2 + 1`` coordinates whatever the number of tasks. With the precision
:math:`\Lambda_0 = \Sigma_0^{-1}`, the residual :math:`r = y_t - \Phi_t \mu_0` and
:math:`A_t = \Lambda_0 + \Phi_t^\top \Phi_t / \sigma^2` (the task's posterior precision of
:math:`w_t - \mu_0`), the matrix determinant lemma and Woodbury's identity give, in
:math:`O(n p^2 + p^3)` per task and without any :math:`n \times n` matrix,

.. math::

    \log p(y_t) = -\tfrac12\Big[n_t \log 2\pi + n_t \log\sigma^2 + \log|A_t| - \log|\Lambda_0|
    + \frac{\lVert r - \Phi_t \hat v\rVert^2}{\sigma^2} + \hat v^\top \Lambda_0 \hat v\Big],
    \qquad \hat v = A_t^{-1} \Phi_t^\top r / \sigma^2 .

The quadratic form is written as the sum of two non-negative terms
(:math:`r^\top C^{-1} r = \min_v \lVert r - \Phi v\rVert^2/\sigma^2 + v^\top \Lambda_0 v`), which
avoids the cancellation of the textbook ``r'r/s2 - u'A^-1 u``. Tasks have unequal sizes through a
``mask`` ``(T, n_max)``: a masked row is removed from :math:`\Phi_t`, :math:`r` and
:math:`n_t` (it contributes exactly nothing; padding values are never read). The observed site
``y`` has one pointwise log-likelihood term per **task** (the unit of exchangeability, what
PSIS-LOO should leave out).

**The NIW prior as sites every engine can run.** The Inverse-Wishart is written through the
Bartlett decomposition of its inverse: :math:`\Lambda_0 = \Sigma_0^{-1} \sim
\mathcal{W}(\nu_0, \Psi_0^{-1})` and :math:`\Lambda_0 = (L A)(L A)^\top` with
:math:`L = \mathrm{chol}(\Psi_0^{-1})`, :math:`A` lower triangular,
:math:`A_{ii}^2 \sim \chi^2_{\nu_0 - i}` (``i = 0..p-1``) and :math:`A_{ij} \sim \mathcal{N}(0, 1)`
below the diagonal. The latent sites are therefore ``Sigma0_chi2`` (``p`` chi-squares),
``Sigma0_tril`` (``p(p-1)/2`` standard normals, absent when ``p = 1``) and ``mu0``
(a multivariate normal with precision :math:`\kappa_0 \Lambda_0`); ``Sigma0`` is a deterministic
site. Why this and not LKJ x scales: it *is* the Inverse-Wishart (exactly the documented
conjugate prior, the one the streaming update needs), every site has an inverse CDF (nested
sampling's unit-cube transform works), and the likelihood needs the Cholesky factor of the
*precision* :math:`B = LA`, which the decomposition gives for free (``log|Lambda_0| =
2 sum log B_ii``). The tests check the sampled prior's moments against the analytic NIW ones.

Meta-test (few-shot prediction)
-------------------------------
For a new task with ``k`` support points, given one draw of :math:`(\mu_0, \Sigma_0, \sigma)`,
the posterior of its weights is conjugate, :math:`w \mid \text{support} \sim
\mathcal{N}(\hat w, A^{-1})` with :math:`A = \Lambda_0 + \Phi_s^\top\Phi_s/\sigma^2` and
:math:`\hat w = A^{-1}(\Lambda_0 \mu_0 + \Phi_s^\top y_s/\sigma^2)`, so the predictive at a query
point is :math:`\mathcal{N}(\phi_q^\top \hat w,\ \phi_q^\top A^{-1} \phi_q + \sigma^2)`.
:func:`predict` averages these over the posterior draws: an equal-weight Gaussian mixture, whose
mean, standard deviation and quantiles (by bisection on the mixture CDF) it returns.

Streaming (one pass, endless task streams)
------------------------------------------
:func:`stream_update` updates a Normal-Inverse-Wishart x inverse-gamma approximation
:math:`q(\mu_0, \Sigma_0)\, q(\sigma^2)` with one task and forgets it (streaming variational
Bayes: the previous approximation is the prior of the next task, and the task's weights get a
mean-field factor :math:`q(w_t) = \mathcal{N}(\hat w_t, V_t)`). The fixed point of the
mean-field equations for one task is, with :math:`E[\Lambda_0] = \nu \Psi^{-1}` and
:math:`E[1/\sigma^2] = a/b`:

.. math::

    V_t = (E[\Lambda_0] + E[\sigma^{-2}]\Phi_t^\top\Phi_t)^{-1}, \quad
    \hat w_t = V_t (E[\Lambda_0]\, m + E[\sigma^{-2}]\Phi_t^\top y_t),

    \kappa' = \kappa + 1, \quad m' = \frac{\kappa m + \hat w_t}{\kappa + 1}, \quad
    \nu' = \nu + 1, \quad
    \Psi' = \Psi + V_t + \frac{\kappa}{\kappa + 1} (\hat w_t - m)(\hat w_t - m)^\top,

    a' = a + n_t/2, \quad b' = b + \tfrac12\big(\lVert y_t - \Phi_t \hat w_t\rVert^2
    + \mathrm{tr}(\Phi_t V_t \Phi_t^\top)\big),

(the expectations on the first line are taken under the *updated* factors, iterated
``num_iters`` times). It is the exact conjugate NIW update with the unknown :math:`w_t` replaced
by its expected sufficient statistics (:math:`E[w w^\top] = \hat w \hat w^\top + V`). The state is
``(m, kappa, nu, Psi, a, b)``: memory O(1) in the number of tasks. The approximation: mean-field
(it ignores the posterior correlation between :math:`w_t` and the globals) and assumed-density
(each task is seen once, under the approximation of the tasks before it), so it depends mildly on
the order of the tasks and its uncertainty about :math:`\Sigma_0` is too small; the tests and the
benchmark compare it with the full NUTS fit.

Example
-------
>>> import jax, bayeslik as bl
>>> from bayeslik.models import meta
>>> tasks = meta.simulate_tasks(jax.random.key(0), num_tasks=20, kind="sinusoid", num_points=10)
>>> data = meta.make_data(tasks["x"], tasks["y"], kind="fourier")
>>> post = bl.Posterior(meta.model, **data)
>>> sorted(post.latent_names)
['Sigma0_chi2', 'Sigma0_tril', 'mu0', 'sigma2']
>>> fit = bl.fit(post, "nuts", num_warmup=300, num_samples=300, num_chains=2,
...              progress_bar=False)                                      # doctest: +SKIP
>>> pred = meta.predict(fit, [0.0, 1.0], [0.2, 0.9], jax.numpy.linspace(-5, 5, 50))  # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial, wraps
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax.scipy.linalg import cho_solve, solve_triangular
from numpyro.distributions import constraints

from bayeslik.errors import DataError, ModelError, OptionError

__all__ = [
    "FEATURE_KINDS",
    "FeatureMap",
    "Predictive",
    "StreamingState",
    "TaskMarginal",
    "example",
    "features",
    "make_data",
    "model",
    "pad_tasks",
    "pooled_params",
    "predict",
    "prior_moments",
    "ridge_params",
    "simulate",
    "simulate_tasks",
    "stream_draws",
    "stream_fit",
    "stream_init",
    "stream_update",
    "task_loglik",
    "task_posterior",
]

FEATURE_KINDS = ("fourier", "poly", "rff")
TASK_KINDS = ("sinusoid", "line", "gaussian")

#: Default prior hyperparameters (data on a scale of about one).
KAPPA0 = 1.0
PSI0 = 1.0
NOISE_SHAPE = 3.0
NOISE_RATE = 0.5


# --------------------------------------------------------------------------------------------------
# feature maps
# --------------------------------------------------------------------------------------------------
def _check_kind(kind: Any, allowed: tuple[str, ...], name: str) -> None:
    if not isinstance(kind, str) or kind not in allowed:
        raise OptionError(f"{name} must be one of {list(allowed)}, got {kind!r}")


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_finite(name: str, x) -> None:
    if not _concrete(x):
        return
    arr = np.asarray(x)
    if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
        raise DataError(
            f"{name} contains {int((~np.isfinite(arr)).sum())} non-finite value(s) (first at "
            f"index {bad} of shape {arr.shape}); remove them, or pad and set the mask to 0 there"
        )


def features(x, kind: str = "fourier", *, num_harmonics: int = 1, degree: int = 3,
             num_features: int = 20, lengthscale: float = 1.0, seed: int = 0) -> jax.Array:
    r"""The feature map :math:`\phi(x)`, appended as a last axis: ``(...,)`` -> ``(..., p)``.

    * ``"fourier"``: ``[1, x, sin(k x), cos(k x) for k = 1..num_harmonics]``, ``p = 2 + 2h``;
    * ``"poly"``: ``[1, x, x^2, ..., x^degree]``, ``p = degree + 1``;
    * ``"rff"``: random Fourier features of an RBF kernel with ``lengthscale``,
      :math:`\sqrt{2/D}\cos(\omega_j x + b_j)`, :math:`\omega_j \sim \mathcal{N}(0, \ell^{-2})`,
      :math:`b_j \sim U(0, 2\pi)`, ``p = num_features``; the frequencies are fixed by ``seed``
      (the same seed gives the same map, as training and prediction need).

    Example
    -------
    >>> features(jax.numpy.zeros(3), "fourier").shape
    (3, 4)
    >>> features(jax.numpy.zeros((2, 5)), "rff", num_features=8, seed=1).shape
    (2, 5, 8)
    """
    _check_kind(kind, FEATURE_KINDS, "kind")
    _check_finite("x", x)
    x = jnp.asarray(x, dtype=jnp.result_type(float))
    if kind == "fourier":
        h = int(num_harmonics)
        if h < 0:
            raise OptionError(f"num_harmonics must be >= 0, got {num_harmonics}")
        cols = [jnp.ones_like(x), x]
        for k in range(1, h + 1):
            cols += [jnp.sin(k * x), jnp.cos(k * x)]
        return jnp.stack(cols, axis=-1)
    if kind == "poly":
        d = int(degree)
        if d < 0:
            raise OptionError(f"degree must be >= 0, got {degree}")
        return jnp.stack([x**j for j in range(d + 1)], axis=-1)
    D = int(num_features)
    if D < 1:
        raise OptionError(f"num_features must be >= 1, got {num_features}")
    if not lengthscale > 0:
        raise OptionError(f"lengthscale must be > 0, got {lengthscale}")
    k1, k2 = jax.random.split(jax.random.key(int(seed)))
    omega = jax.random.normal(k1, (D,), x.dtype) / lengthscale
    phase = jax.random.uniform(k2, (D,), x.dtype, 0.0, 2 * math.pi)
    return math.sqrt(2.0 / D) * jnp.cos(x[..., None] * omega + phase)


@dataclass(frozen=True)
class FeatureMap:
    """A feature map with its options fixed: ``FeatureMap("rff", num_features=30)(x)``.

    Use the same FeatureMap for training (:func:`make_data`) and prediction (:func:`predict`).

    Example
    -------
    >>> FeatureMap("poly", degree=2)(jax.numpy.array([2.0])).tolist()
    [[1.0, 2.0, 4.0]]
    """

    kind: str = "fourier"
    options: dict = field(default_factory=dict)

    def __init__(self, kind: str = "fourier", **options: Any) -> None:
        _check_kind(kind, FEATURE_KINDS, "kind")
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "options", dict(options))
        features(jnp.zeros(1), kind, **options)  # validates the options now

    def __call__(self, x) -> jax.Array:
        return features(x, self.kind, **self.options)

    @property
    def num_features(self) -> int:
        return int(self(jnp.zeros(1)).shape[-1])


def _as_feature_map(fmap: Any) -> Callable:
    if isinstance(fmap, str):
        return FeatureMap(fmap)
    if callable(fmap):
        return fmap
    raise OptionError(f"features must be a kind {list(FEATURE_KINDS)}, a FeatureMap or a callable, "
                      f"got {fmap!r}")


# --------------------------------------------------------------------------------------------------
# data helpers
# --------------------------------------------------------------------------------------------------
def pad_tasks(xs: Iterable, ys: Iterable) -> dict[str, np.ndarray]:
    """Lists of per-task 1-D arrays -> padded ``x``, ``y`` ``(T, n_max)`` and ``mask``.

    Padding entries are 0 with ``mask`` 0; the model never reads them.

    Example
    -------
    >>> d = pad_tasks([[0.0, 1.0], [2.0]], [[1.0, 2.0], [3.0]])
    >>> d["mask"].tolist()
    [[1.0, 1.0], [1.0, 0.0]]
    """
    xs, ys = [np.asarray(a, float) for a in xs], [np.asarray(a, float) for a in ys]
    if len(xs) != len(ys):
        raise DataError(f"xs and ys must list the same number of tasks, got {len(xs)} and {len(ys)}")
    if not xs:
        raise DataError("xs: need at least one task")
    for t, (a, b) in enumerate(zip(xs, ys)):
        if a.ndim != 1 or a.shape != b.shape:
            raise DataError(f"task {t}: xs[{t}] and ys[{t}] must be 1-D of the same length, got "
                            f"shapes {a.shape} and {b.shape}")
        _check_finite(f"xs[{t}]", a)
        _check_finite(f"ys[{t}]", b)
    n_max = max(len(a) for a in xs)
    out = {k: np.zeros((len(xs), n_max)) for k in ("x", "y", "mask")}
    for t, (a, b) in enumerate(zip(xs, ys)):
        out["x"][t, : len(a)], out["y"][t, : len(a)], out["mask"][t, : len(a)] = a, b, 1.0
    return out


def _check_tasks(phi, y, mask) -> None:
    """Shapes and values of the model's data, before anything is compiled."""
    if np.ndim(phi) != 3:
        raise DataError(f"phi must be (num_tasks, n_max, num_features), got shape {np.shape(phi)}; "
                        "build it with make_data(x, y, mask, kind=...)")
    if np.ndim(y) != 2 or tuple(np.shape(y)) != tuple(np.shape(phi)[:2]):
        raise DataError(f"y must be (num_tasks, n_max) = {tuple(np.shape(phi)[:2])} to match phi, "
                        f"got shape {np.shape(y)}")
    if mask is not None and tuple(np.shape(mask)) != tuple(np.shape(y)):
        raise DataError(f"mask must have the shape of y {tuple(np.shape(y))}, got {np.shape(mask)}")
    if 0 in np.shape(phi):
        raise DataError(f"phi must hold at least one task, one point and one feature, got shape "
                        f"{np.shape(phi)} (num_tasks, n_max, num_features)")
    _check_finite("phi", phi)
    _check_finite("y", y)
    if mask is not None and _concrete(mask):
        m = np.asarray(mask, float)
        if not np.all((m == 0) | (m == 1)):
            raise DataError("mask must hold 0/1 (or booleans): 1 = observed, 0 = padding")


def make_data(x, y, mask=None, *, kind: str | Callable = "fourier", **feature_options) -> dict:
    """The model's data from padded tasks: ``{"phi": (T, n, p), "y": (T, n), "mask": (T, n)}``.

    ``kind`` is a feature kind (with ``feature_options`` for :func:`features`), a
    :class:`FeatureMap` or any callable ``x -> (..., p)``.

    Example
    -------
    >>> d = make_data(np.zeros((3, 5)), np.ones((3, 5)), kind="poly", degree=1)
    >>> d["phi"].shape, d["mask"].shape
    ((3, 5, 2), (3, 5))
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.ndim != 2:
        raise DataError(f"x must be (num_tasks, n_max), got shape {x.shape}; pad lists with pad_tasks")
    if 0 in x.shape:
        raise DataError(f"x must hold at least one task and one point, got shape {x.shape} "
                        "(num_tasks, n_max)")
    if y.shape != x.shape:
        raise DataError(f"y must have the shape of x {x.shape}, got {y.shape}")
    if mask is None:
        mask = np.ones_like(x)
    mask = np.asarray(mask, float)
    if mask.shape != x.shape:
        raise DataError(f"mask must have the shape of x {x.shape}, got {mask.shape}")
    # padding may hold anything (even NaN): it is zeroed so that nothing downstream trips on it
    observed = mask > 0
    _check_finite("x (observed entries)", np.where(observed, x, 0.0))
    _check_finite("y (observed entries)", np.where(observed, y, 0.0))
    x, y = np.where(observed, x, 0.0), np.where(observed, y, 0.0)
    fmap = FeatureMap(kind, **feature_options) if isinstance(kind, str) else _as_feature_map(kind)
    phi = np.asarray(fmap(x)) * observed[..., None]
    return {"phi": phi, "y": y, "mask": mask}


# --------------------------------------------------------------------------------------------------
# the closed-form pieces (one task; vmap them)
# --------------------------------------------------------------------------------------------------
def _full_precision_matmuls(fn):
    """Trace ``fn`` with full float32 matrix products. A GPU's default matmul precision (TF32-like)
    moved one task's log-likelihood by 2e-3 nats on an H100 (0.13 nats over 60 tasks), 4x the
    float32 tolerance of the tests; on a CPU this changes nothing."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        with jax.default_matmul_precision("highest"):
            return fn(*args, **kwargs)

    return wrapper


@_full_precision_matmuls
def task_loglik(phi, y, mask, mu0, prec_chol, sigma) -> jax.Array:
    r"""log N(y | Phi mu0, Phi Sigma0 Phi' + sigma^2 I) of one task over its observed rows.

    ``prec_chol`` is the lower Cholesky factor ``B`` of the precision ``Sigma0^{-1} = B B'``;
    ``phi`` ``(n, p)``, ``y`` and ``mask`` ``(n,)``. Masked rows contribute exactly nothing
    (see the module docstring for the Woodbury form).

    Example
    -------
    >>> import jax.numpy as jnp
    >>> float(task_loglik(jnp.ones((1, 1)), jnp.zeros(1), jnp.ones(1), jnp.zeros(1),
    ...                   jnp.eye(1), 1.0))  # N(0 | 0, 2)
    -1.2655...
    """
    phi, y, mask = jnp.asarray(phi), jnp.asarray(y), jnp.asarray(mask, phi.dtype)
    s2 = jnp.square(sigma)
    pm = phi * mask[:, None]
    r = mask * (y - phi @ mu0)
    n = jnp.sum(mask)
    A = prec_chol @ prec_chol.T + pm.T @ pm / s2
    LA = jnp.linalg.cholesky(A)
    v = cho_solve((LA, True), pm.T @ r / s2)
    resid = r - pm @ v
    quad = jnp.sum(resid**2) / s2 + jnp.sum(jnp.square(prec_chol.T @ v))
    logdet = n * jnp.log(s2) + 2 * jnp.sum(jnp.log(jnp.diag(LA))) - 2 * jnp.sum(
        jnp.log(jnp.diag(prec_chol)))
    return -0.5 * (n * math.log(2 * math.pi) + logdet + quad)


@_full_precision_matmuls
def task_posterior(phi, y, mask, mu0, Sigma0, sigma) -> tuple[jax.Array, jax.Array]:
    r"""The conjugate posterior of one task's weights given ``(mu0, Sigma0, sigma)``.

    Returns ``(mean (p,), L_A (p, p))``: ``L_A`` is the lower Cholesky factor of the posterior
    *precision* ``A = Sigma0^{-1} + Phi' M Phi / sigma^2`` (M the mask), and
    ``mean = mu0 + A^{-1} Phi' M (y - Phi mu0) / sigma^2``.

    Example
    -------
    >>> import jax.numpy as jnp
    >>> m, L = task_posterior(jnp.ones((1, 1)), jnp.ones(1), jnp.ones(1), jnp.zeros(1),
    ...                       jnp.eye(1), 1.0)
    >>> round(float(m[0]), 4), round(float(L[0, 0] ** 2), 4)   # mean 1/2, precision 2
    (0.5, 2.0)
    """
    phi, y, mask = jnp.asarray(phi), jnp.asarray(y), jnp.asarray(mask, jnp.asarray(phi).dtype)
    s2 = jnp.square(sigma)
    pm = phi * mask[:, None]
    p = phi.shape[-1]
    Ls = jnp.linalg.cholesky(Sigma0)
    prec = cho_solve((Ls, True), jnp.eye(p, dtype=phi.dtype))
    A = prec + pm.T @ pm / s2
    LA = jnp.linalg.cholesky(0.5 * (A + A.T))
    mean = mu0 + cho_solve((LA, True), pm.T @ (mask * (y - phi @ mu0)) / s2)
    return mean, LA


class TaskMarginal(dist.Distribution):
    """The marginal distribution of the tasks' observations, weights integrated out.

    Batch shape ``(T,)``, event shape ``(n_max,)``; ``log_prob(y)`` is :func:`task_loglik` per
    task (masked rows contribute nothing), ``sample`` draws ``w_t ~ N(mu0, Sigma0)`` and then
    ``y = Phi w + sigma eps`` (0 at masked rows).
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    pytree_data_fields = ("phi", "mask", "mu0", "prec_chol", "sigma")

    def __init__(self, phi, mask, mu0, prec_chol, sigma, *, validate_args=None):
        self.phi, self.mask = jnp.asarray(phi), jnp.asarray(mask)
        self.mu0, self.prec_chol, self.sigma = jnp.asarray(mu0), jnp.asarray(prec_chol), sigma
        T, n, _ = self.phi.shape
        super().__init__(batch_shape=(T,), event_shape=(n,), validate_args=validate_args)

    def log_prob(self, value):
        one = partial(task_loglik, mu0=self.mu0, prec_chol=self.prec_chol, sigma=self.sigma)
        return jax.vmap(one)(self.phi, value, self.mask.astype(self.phi.dtype))

    def sample(self, key, sample_shape=()):
        T, n, p = self.phi.shape
        k1, k2 = jax.random.split(key)
        shape = tuple(sample_shape) + (T,)
        eps = jax.random.normal(k1, shape + (p,), self.phi.dtype)
        # w = mu0 + B^{-T} eps has covariance B^{-T} B^{-1} = Sigma0
        w = self.mu0 + solve_triangular(self.prec_chol.T, eps[..., None], lower=False)[..., 0]
        noise = self.sigma * jax.random.normal(k2, shape + (n,), self.phi.dtype)
        return self.mask * (jnp.einsum("tnp,...tp->...tn", self.phi, w) + noise)


# --------------------------------------------------------------------------------------------------
# the NumPyro program
# --------------------------------------------------------------------------------------------------
def _prior_arrays(p: int, m0, kappa0, nu0, psi0, dtype) -> tuple:
    m0 = jnp.broadcast_to(jnp.asarray(m0, dtype), (p,))
    nu0 = float(p + 2 if nu0 is None else nu0)
    psi0 = jnp.asarray(psi0, dtype)
    psi0 = psi0 * jnp.eye(p, dtype=dtype) if psi0.ndim == 0 else psi0
    return m0, float(kappa0), nu0, psi0


def _check_prior(p: int, m0, kappa0, nu0, psi0, noise, noise_shape, noise_rate) -> None:
    if np.ndim(m0) not in (0, 1) or (np.ndim(m0) == 1 and np.shape(m0)[0] != p):
        raise ModelError(f"m0 must be a scalar or ({p},) (one entry per feature), got shape "
                         f"{np.shape(m0)}")
    if not _concrete(kappa0) or not float(kappa0) > 0:
        raise ModelError(f"kappa0 must be a positive number, got {kappa0!r}")
    if nu0 is not None and not float(nu0) > p - 1:
        raise ModelError(f"nu0 must be > num_features - 1 = {p - 1} for a proper Inverse-Wishart, "
                         f"got {nu0!r} (default num_features + 2)")
    if np.ndim(psi0) == 0:
        if _concrete(psi0) and not float(psi0) > 0:
            raise ModelError(f"psi0 must be > 0 (a scalar times the identity) or a ({p}, {p}) "
                             f"positive-definite matrix, got {psi0!r}")
    elif np.shape(psi0) != (p, p):
        raise ModelError(f"psi0 must be a scalar or ({p}, {p}), got shape {np.shape(psi0)}")
    elif _concrete(psi0):
        P = np.asarray(psi0, float)
        if not np.allclose(P, P.T) or np.any(np.linalg.eigvalsh(0.5 * (P + P.T)) <= 0):
            raise ModelError("psi0 must be a symmetric positive-definite matrix")
    if noise is not None and _concrete(noise) and not (np.ndim(noise) == 0 and float(noise) > 0):
        raise ModelError(f"noise must be None (inferred) or a positive scalar (the known noise sd), "
                         f"got {noise!r}")
    for name, v in (("noise_shape", noise_shape), ("noise_rate", noise_rate)):
        if _concrete(v) and not float(v) > 0:
            raise ModelError(f"{name} must be > 0, got {v!r}")


def _precision_chol(chi2, tril, psi0_inv_chol, p: int) -> jax.Array:
    """Bartlett: B = L A with A_ii = sqrt(chi2_i), A_ij = tril (i > j), L = chol(Psi0^{-1})."""
    A = jnp.diag(jnp.sqrt(chi2))
    if p > 1:
        rows, cols = np.tril_indices(p, -1)
        A = A.at[rows, cols].set(tril)
    return psi0_inv_chol @ A


def model(phi, y, mask=None, *, noise=None, m0=0.0, kappa0: float = KAPPA0, nu0=None,
          psi0=PSI0, noise_shape: float = NOISE_SHAPE, noise_rate: float = NOISE_RATE):
    r"""The hierarchical few-shot regression model, task weights integrated out.

    Args:
        phi: ``(T, n_max, p)`` features of every task's inputs (see :func:`make_data`).
        y: ``(T, n_max)`` targets (padding entries are never read).
        mask: ``(T, n_max)`` 1 = observed, 0 = padding; ``None`` = all observed.
        noise: the known noise sd, or ``None`` to infer ``sigma2 ~ InverseGamma(noise_shape,
            noise_rate)``.
        m0, kappa0, nu0, psi0: the Normal-Inverse-Wishart prior, ``Sigma0 ~ IW(nu0, psi0)``,
            ``mu0 | Sigma0 ~ N(m0, Sigma0 / kappa0)``; ``nu0`` defaults to ``p + 2`` (then
            ``E[Sigma0] = psi0``), a scalar ``psi0`` means ``psi0 * I``.

    Sites: latent ``Sigma0_chi2`` ``(p,)``, ``Sigma0_tril`` ``(p(p-1)/2,)`` (if ``p > 1``),
    ``mu0`` ``(p,)``, ``sigma2`` (if ``noise`` is None); deterministic ``Sigma0`` ``(p, p)``,
    ``sigma``; observed ``y`` with one log-likelihood term per task (plate ``task``).

    Example
    -------
    >>> import bayeslik as bl
    >>> d = simulate(jax.random.key(0), num_tasks=5, num_points=4)
    >>> post = bl.Posterior(model, phi=d["phi"], y=d["y"], mask=d["mask"])
    >>> post.ndim   # 4 chi2 + 6 tril + 4 mu0 + sigma2
    15
    """
    _check_tasks(phi, y, mask)
    T, n, p = np.shape(phi)
    _check_prior(p, m0, kappa0, nu0, psi0, noise, noise_shape, noise_rate)
    phi = jnp.asarray(phi)
    dtype = phi.dtype
    mask = jnp.ones((T, n), dtype) if mask is None else jnp.asarray(mask, dtype)
    m0, kappa0, nu0, psi0 = _prior_arrays(p, m0, kappa0, nu0, psi0, dtype)
    psi0_inv_chol = jnp.linalg.cholesky(jnp.linalg.inv(psi0))

    chi2 = numpyro.sample("Sigma0_chi2", dist.Chi2(nu0 - jnp.arange(p, dtype=dtype)))
    tril = None
    if p > 1:
        tril = numpyro.sample("Sigma0_tril", dist.Normal(jnp.zeros(p * (p - 1) // 2, dtype), 1.0))
    B = _precision_chol(chi2, tril, psi0_inv_chol, p)
    Binv = solve_triangular(B, jnp.eye(p, dtype=dtype), lower=True)
    numpyro.deterministic("Sigma0", Binv.T @ Binv)
    mu0 = numpyro.sample("mu0", dist.MultivariateNormal(m0, precision_matrix=kappa0 * (B @ B.T)))
    if noise is None:
        sigma2 = numpyro.sample("sigma2", dist.InverseGamma(noise_shape, noise_rate))
        sigma = numpyro.deterministic("sigma", jnp.sqrt(sigma2))
    else:
        sigma = numpyro.deterministic("sigma", jnp.asarray(noise, dtype))
    with numpyro.plate("task", T):
        numpyro.sample("y", TaskMarginal(phi, mask, mu0, B, sigma), obs=jnp.asarray(y) * mask)


def prior_moments(p: int, *, m0=0.0, kappa0: float = KAPPA0, nu0=None, psi0=PSI0) -> dict:
    r"""Analytic moments of the NIW prior: ``E[mu0]``, ``Cov[mu0]``, ``E[Sigma0]``, ``Var[Sigma0]``.

    For :math:`\Sigma \sim \mathcal{IW}(\nu, \Psi)` in dimension ``p`` (:math:`\nu > p + 3`):
    :math:`E\Sigma = \Psi/(\nu-p-1)`,
    :math:`\mathrm{Var}\,\Sigma_{ij} = \frac{(\nu-p+1)\psi_{ij}^2 + (\nu-p-1)\psi_{ii}\psi_{jj}}
    {(\nu-p)(\nu-p-1)^2(\nu-p-3)}`, and :math:`\mathrm{Cov}\,\mu_0 = E\Sigma/\kappa_0`.

    Example
    -------
    >>> prior_moments(2, nu0=10.0, psi0=7.0)["Sigma0_mean"].tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """
    _check_prior(p, m0, kappa0, nu0, psi0, None, 1.0, 1.0)
    nu = float(p + 2 if nu0 is None else nu0)
    P = np.asarray(psi0, float)
    P = P * np.eye(p) if P.ndim == 0 else P
    m0, kappa0 = np.broadcast_to(np.asarray(m0, float), (p,)), float(kappa0)
    if not nu > p + 1:
        raise ModelError(f"nu0 must be > p + 1 = {p + 1} for E[Sigma0] to exist, got {nu}")
    mean = P / (nu - p - 1)
    var = None
    if nu > p + 3:
        d = np.diag(P)
        var = ((nu - p + 1) * P**2 + (nu - p - 1) * np.outer(d, d)) / (
            (nu - p) * (nu - p - 1) ** 2 * (nu - p - 3))
    return {"mu0_mean": np.asarray(m0, float), "mu0_cov": mean / kappa0, "Sigma0_mean": mean,
            "Sigma0_var": var}


# --------------------------------------------------------------------------------------------------
# simulation
# --------------------------------------------------------------------------------------------------
def simulate_tasks(rng_key, num_tasks: int, kind: str = "sinusoid", num_points: int = 10,
                   noise: float = 0.3, *, x_range: tuple[float, float] = (-5.0, 5.0),
                   amplitude: tuple[float, float] = (0.1, 5.0),
                   phase: tuple[float, float] = (0.0, math.pi),
                   slope: tuple[float, float] = (-2.0, 2.0),
                   intercept: tuple[float, float] = (-3.0, 3.0),
                   mu0=None, Sigma0=None, features: Any = "fourier") -> dict:
    r"""A few-shot regression family: ``num_tasks`` tasks of ``num_points`` noisy points each.

    * ``"sinusoid"``: :math:`f(x) = A \sin(x + \varphi)`, ``A ~ U(amplitude)``, ``phi ~ U(phase)``
      (the family of Finn et al., 2017);
    * ``"line"``: :math:`f(x) = a x + b`, ``a ~ U(slope)``, ``b ~ U(intercept)``;
    * ``"gaussian"``: the model's own assumption, :math:`f(x) = \phi(x)^\top w`,
      ``w ~ N(mu0, Sigma0)`` with the given ``features`` (for recovery tests).

    Inputs ``x ~ U(x_range)``, targets ``y = f(x) + noise * N(0, 1)``. Returns ``x``, ``y``,
    ``f`` (noiseless) ``(T, n)`` and the task parameters (``amplitude``/``phase``,
    ``slope``/``intercept``, or ``w``).

    Example
    -------
    >>> t = simulate_tasks(jax.random.key(0), 3, "line", num_points=4)
    >>> t["y"].shape, t["slope"].shape
    ((3, 4), (3,))
    """
    _check_kind(kind, TASK_KINDS, "kind")
    if not isinstance(num_tasks, (int, np.integer)) or num_tasks < 1:
        raise OptionError(f"num_tasks must be a positive integer, got {num_tasks!r}")
    if not isinstance(num_points, (int, np.integer)) or num_points < 1:
        raise OptionError(f"num_points must be a positive integer, got {num_points!r}")
    if not noise >= 0:
        raise OptionError(f"noise must be >= 0, got {noise!r}")
    kx, kp1, kp2, ke = jax.random.split(rng_key, 4)
    T, n = int(num_tasks), int(num_points)
    x = jax.random.uniform(kx, (T, n), minval=x_range[0], maxval=x_range[1])
    out: dict[str, Any] = {}
    if kind == "sinusoid":
        A = jax.random.uniform(kp1, (T,), minval=amplitude[0], maxval=amplitude[1])
        ph = jax.random.uniform(kp2, (T,), minval=phase[0], maxval=phase[1])
        f = A[:, None] * jnp.sin(x + ph[:, None])
        out.update(amplitude=np.asarray(A), phase=np.asarray(ph))
    elif kind == "line":
        a = jax.random.uniform(kp1, (T,), minval=slope[0], maxval=slope[1])
        b = jax.random.uniform(kp2, (T,), minval=intercept[0], maxval=intercept[1])
        f = a[:, None] * x + b[:, None]
        out.update(slope=np.asarray(a), intercept=np.asarray(b))
    else:
        if mu0 is None or Sigma0 is None:
            raise ModelError("kind='gaussian' needs mu0 (p,) and Sigma0 (p, p)")
        fmap = _as_feature_map(features)
        mu0, Sigma0 = jnp.asarray(mu0, float), jnp.asarray(Sigma0, float)
        ph_ = fmap(x)
        if mu0.shape != (ph_.shape[-1],) or Sigma0.shape != (ph_.shape[-1],) * 2:
            raise ModelError(f"mu0 and Sigma0 must be ({ph_.shape[-1]},) and {(ph_.shape[-1],) * 2} "
                             f"for these features, got {mu0.shape} and {Sigma0.shape}")
        w = jax.random.multivariate_normal(kp1, mu0, Sigma0, (T,))
        f = jnp.einsum("tnp,tp->tn", ph_, w)
        out.update(w=np.asarray(w))
    y = f + noise * jax.random.normal(ke, (T, n))
    out.update(x=np.asarray(x), y=np.asarray(y), f=np.asarray(f))
    return out


def simulate(rng_key, num_tasks: int = 20, num_points: int = 10, kind: str = "sinusoid",
             noise: float = 0.3, features: Any = "fourier", **options) -> dict:
    """:func:`simulate_tasks` plus the model's data (``phi``, ``y``, ``mask``) for ``features``.

    Example
    -------
    >>> d = simulate(jax.random.key(0), num_tasks=4, num_points=6)
    >>> d["phi"].shape
    (4, 6, 4)
    """
    tasks = simulate_tasks(rng_key, num_tasks, kind, num_points, noise, features=features, **options)
    fmap = _as_feature_map(features)
    return {**tasks, **make_data(tasks["x"], tasks["y"], kind=fmap)}


def example() -> tuple[Callable, dict]:
    """A small default for the CLI zoo: 20 sinusoid tasks of 10 points, Fourier features.

    Example
    -------
    >>> fn, data = example()
    >>> sorted(data)
    ['mask', 'phi', 'y']
    """
    d = simulate(jax.random.key(0), num_tasks=20, num_points=10, kind="sinusoid")
    return model, {k: d[k] for k in ("phi", "y", "mask")}


# --------------------------------------------------------------------------------------------------
# meta-test prediction
# --------------------------------------------------------------------------------------------------
class Predictive(NamedTuple):
    """The few-shot predictive at the query points (a Gaussian mixture over posterior draws).

    ``mean``, ``sd``, ``lower``, ``upper``: ``(..., m)`` (``lower``/``upper`` at the requested
    quantiles); ``draw_mean``, ``draw_sd``: ``(S, ..., m)`` the per-draw Gaussian moments
    (``draw_sd`` includes the noise); ``quantiles``: the two probabilities.
    """

    mean: np.ndarray
    sd: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    draw_mean: np.ndarray
    draw_sd: np.ndarray
    quantiles: tuple[float, float]


def _draws_of(source: Any, max_draws: int | None) -> dict[str, jax.Array]:
    if isinstance(source, dict):
        missing = [k for k in ("mu0", "Sigma0", "sigma") if k not in source]
        if missing:
            raise ModelError(f"fit_or_params is missing {missing}; pass a Fit of meta.model or "
                             "{'mu0': (S, p), 'Sigma0': (S, p, p), 'sigma': (S,)}")
        d = {k: np.asarray(source[k], float) for k in ("mu0", "Sigma0", "sigma")}
        if d["mu0"].ndim == 1:  # one point
            d = {"mu0": d["mu0"][None], "Sigma0": d["Sigma0"][None],
                 "sigma": np.reshape(d["sigma"], (1,))}
    elif hasattr(source, "draws") and hasattr(source, "idata"):
        try:
            raw = {k: source.draws(k) for k in ("mu0", "Sigma0", "sigma")}
        except KeyError as e:
            raise ModelError(f"fit_or_params: the Fit has no site {e}; is it a fit of meta.model?") from None
        p = raw["mu0"].shape[-1]
        d = {"mu0": raw["mu0"].reshape(-1, p), "Sigma0": raw["Sigma0"].reshape(-1, p, p),
             "sigma": raw["sigma"].reshape(-1)}
    else:
        raise ModelError(f"fit_or_params must be a Fit of meta.model or a dict of draws, got "
                         f"{type(source).__name__}")
    S, p = d["mu0"].shape
    if d["Sigma0"].shape != (S, p, p) or d["sigma"].shape != (S,):
        raise ModelError(f"fit_or_params: shapes mu0 {d['mu0'].shape}, Sigma0 {d['Sigma0'].shape}, "
                         f"sigma {d['sigma'].shape} do not agree ((S, p), (S, p, p), (S,))")
    for k, v in d.items():
        _check_finite(f"fit_or_params['{k}']", v)
    if max_draws is not None and S > max_draws:
        idx = np.linspace(0, S - 1, int(max_draws)).round().astype(int)
        d = {k: v[idx] for k, v in d.items()}
    return {k: jnp.asarray(v) for k, v in d.items()}


@_full_precision_matmuls
def _moments_one(mu0, Sigma0, sigma, phis, ys, ms, phiq):
    """Predictive mean and sd at phiq (m, p) for one draw and one task."""
    mean_w, LA = task_posterior(phis, ys, ms, mu0, Sigma0, sigma)
    z = solve_triangular(LA, phiq.T, lower=True)  # (p, m): phi' A^{-1} phi = |z|^2
    var = jnp.sum(z**2, axis=0) + jnp.square(sigma)
    return phiq @ mean_w, jnp.sqrt(var)


@jax.jit
def _moments(mu0, Sigma0, sigma, phis, ys, ms, phiq):
    """(S, B, m) per-draw means and sds for B tasks."""
    per_task = jax.vmap(_moments_one, in_axes=(None, None, None, 0, 0, 0, 0))
    return jax.vmap(per_task, in_axes=(0, 0, 0, None, None, None, None))(
        mu0, Sigma0, sigma, phis, ys, ms, phiq)


@partial(jax.jit, static_argnames=("num_iters",))
def _mixture_quantile(means, sds, prob, num_iters: int = 48):
    """Quantile ``prob`` of the equal-weight mixture of N(means[s], sds[s]) along axis 0."""
    lo = jnp.min(means - 10 * sds, axis=0)
    hi = jnp.max(means + 10 * sds, axis=0)

    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        cdf = jnp.mean(jax.scipy.stats.norm.cdf((mid - means) / sds), axis=0)
        below = cdf < prob
        return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

    lo, hi = jax.lax.fori_loop(0, num_iters, body, (lo, hi))
    return 0.5 * (lo + hi)


def predict(fit_or_params, support_x, support_y, query_x, *, features: Any = "fourier",
            quantiles: tuple[float, float] = (0.05, 0.95), max_draws: int | None = 1000,
            support_mask=None) -> Predictive:
    r"""The meta-test predictive of a new task from ``k`` support points.

    Per posterior draw of :math:`(\mu_0, \Sigma_0, \sigma)` the task's weights have the
    conjugate posterior given the support, and the query predictive is Gaussian (module
    docstring); the result is their equal-weight mixture over the draws.

    Args:
        fit_or_params: a :class:`~bayeslik.Fit` of :func:`model`, or ``{"mu0": (S, p),
            "Sigma0": (S, p, p), "sigma": (S,)}`` (e.g. :func:`stream_draws`, or one point).
        support_x, support_y: ``(k,)`` for one task, or ``(B, k)`` for ``B`` tasks at once.
        query_x: ``(m,)`` or ``(B, m)``.
        features: the feature map used for training (a kind, a :class:`FeatureMap`, a callable).
        quantiles: the probabilities of ``lower`` and ``upper`` (default a 90% interval).
        max_draws: thin the posterior to at most this many (evenly spaced) draws.
        support_mask: optional ``(B, k)`` 0/1 mask for tasks with fewer support points.

    Example
    -------
    >>> params = {"mu0": jnp.zeros(4), "Sigma0": jnp.eye(4), "sigma": 0.3}
    >>> pred = predict(params, [0.0, 1.0], [0.1, 0.8], jnp.linspace(-1, 1, 5))
    >>> pred.mean.shape, pred.lower.shape
    ((5,), (5,))
    """
    fmap = _as_feature_map(features)
    q = tuple(float(v) for v in quantiles)
    if len(q) != 2 or not 0 < q[0] < q[1] < 1:
        raise OptionError(f"quantiles must be two probabilities 0 < lo < hi < 1, got {quantiles!r}")
    sx, sy, qx = (np.asarray(a, float) for a in (support_x, support_y, query_x))
    if sx.ndim not in (1, 2):
        raise DataError(f"support_x must be (k,) or (num_tasks, k), got shape {sx.shape}")
    if sy.shape != sx.shape:
        raise DataError(f"support_y must have the shape of support_x {sx.shape}, got {sy.shape}")
    if sx.shape[-1] < 1:
        raise DataError("support_x: need k >= 1 support points (got 0); for no support, the "
                        "prior predictive, pass one point with support_mask 0")
    single = sx.ndim == 1
    if qx.ndim != sx.ndim or (not single and qx.shape[0] != sx.shape[0]):
        raise DataError(f"query_x must be (m,) for one task or (num_tasks, m) matching support_x "
                        f"{sx.shape}, got {qx.shape}")
    for name, a in (("support_x", sx), ("support_y", sy), ("query_x", qx)):
        _check_finite(name, a)
    sm = np.ones_like(sx) if support_mask is None else np.asarray(support_mask, float)
    if sm.shape != sx.shape:
        raise DataError(f"support_mask must have the shape of support_x {sx.shape}, got {sm.shape}")
    draws = _draws_of(fit_or_params, max_draws)
    if single:
        sx, sy, qx, sm = sx[None], sy[None], qx[None], sm[None]
    phis, phiq = jnp.asarray(fmap(sx)), jnp.asarray(fmap(qx))
    if phis.shape[-1] != draws["mu0"].shape[-1]:
        raise OptionError(f"features: the feature map gives p = {phis.shape[-1]} features but the "
                          f"posterior has p = {draws['mu0'].shape[-1]}; use the training feature map")
    dm, ds = _moments(draws["mu0"], draws["Sigma0"], draws["sigma"], phis,
                      jnp.asarray(sy * sm), jnp.asarray(sm), phiq)
    mean = jnp.mean(dm, axis=0)
    sd = jnp.sqrt(jnp.maximum(jnp.mean(ds**2 + dm**2, axis=0) - mean**2, 0.0))
    lower, upper = (_mixture_quantile(dm, ds, jnp.asarray(v, dm.dtype)) for v in q)
    out = [np.asarray(a) for a in (mean, sd, lower, upper)]
    dm, ds = np.asarray(dm), np.asarray(ds)
    if single:
        out = [a[0] for a in out]
        dm, ds = dm[:, 0], ds[:, 0]
    return Predictive(*out, dm, ds, q)


# --------------------------------------------------------------------------------------------------
# baselines (for benchmarks and notebooks), in predict's parameter format
# --------------------------------------------------------------------------------------------------
def _baseline_data(phi, y, mask):
    _check_tasks(phi, y, mask)
    phi, y = np.asarray(phi, float), np.asarray(y, float)
    mask = np.ones(y.shape) if mask is None else np.asarray(mask, float)
    return phi, y, mask


def ridge_params(phi, y, mask=None) -> dict:
    r"""Per-task Bayesian ridge as :func:`predict` parameters: ``w ~ N(0, tau^2 I)``, noise ``s``.

    ``(tau, s)`` maximise the training tasks' marginal likelihood
    :math:`\sum_t \log N(y_t \mid 0, \tau^2 \Phi_t\Phi_t^\top + s^2 I)` (type-II maximum
    likelihood on a log grid, refined twice): the best zero-mean isotropic prior, i.e. ridge
    regression per task with the penalty ``s^2 / tau^2`` and Bayesian intervals.

    Example
    -------
    >>> d = simulate(jax.random.key(0), num_tasks=10, num_points=8, kind="line")
    >>> sorted(ridge_params(d["phi"], d["y"], d["mask"]))
    ['Sigma0', 'mu0', 'sigma']
    """
    phi, y, mask = _baseline_data(phi, y, mask)
    p = phi.shape[-1]
    f, yy, mm = jnp.asarray(phi), jnp.asarray(y), jnp.asarray(mask)

    @jax.jit
    def loglik(lt, ls):
        def one(a, b):
            per = jax.vmap(lambda f_, y_, m_: task_loglik(f_, y_, m_, jnp.zeros(p, f.dtype),
                                                           jnp.eye(p, dtype=f.dtype) / jnp.exp(a),
                                                           jnp.exp(b)))
            return jnp.sum(per(f, yy, mm))
        return jax.vmap(one)(lt, ls)

    center, width = (-0.5, -1.0), (3.5, 3.0)
    for _ in range(3):  # a 41 x 41 log grid, then twice around the best point
        lt, ls = np.meshgrid(center[0] + np.linspace(-width[0], width[0], 41),
                             center[1] + np.linspace(-width[1], width[1], 41), indexing="ij")
        vals = np.asarray(loglik(jnp.asarray(lt.ravel(), f.dtype), jnp.asarray(ls.ravel(), f.dtype)))
        i = int(np.nanargmax(vals))
        center = (float(lt.ravel()[i]), float(ls.ravel()[i]))
        width = (width[0] / 10, width[1] / 10)
    tau, s = math.exp(center[0]), math.exp(center[1])
    return {"mu0": np.zeros(p), "Sigma0": tau**2 * np.eye(p), "sigma": s}


def pooled_params(phi, y, mask=None) -> dict:
    """One least-squares weight vector for all training tasks, as :func:`predict` parameters.

    ``mu0`` is the pooled least-squares fit, ``sigma`` its residual sd, and ``Sigma0 = 1e-8 I``
    (the limit of no task-to-task variation: the support points then barely move the
    prediction, which is ``N(phi' w, sigma^2)``).

    Example
    -------
    >>> d = simulate(jax.random.key(0), num_tasks=10, num_points=8, kind="line")
    >>> pooled_params(d["phi"], d["y"])["mu0"].shape
    (4,)
    """
    phi, y, mask = _baseline_data(phi, y, mask)
    keep = mask.ravel() > 0
    X, Y = phi.reshape(-1, phi.shape[-1])[keep], y.ravel()[keep]
    w = np.linalg.lstsq(X, Y, rcond=None)[0]
    s = float(np.sqrt(np.mean((Y - X @ w) ** 2)))
    return {"mu0": w, "Sigma0": 1e-8 * np.eye(len(w)), "sigma": s}


# --------------------------------------------------------------------------------------------------
# streaming (one pass, constant memory)
# --------------------------------------------------------------------------------------------------
class StreamingState(NamedTuple):
    """The streaming posterior ``NIW(m, kappa, nu, Psi) x IG(a, b)`` after ``num_tasks`` tasks.

    ``m`` ``(p,)``, ``Psi`` ``(p, p)``; ``kappa``, ``nu``, ``a``, ``b``, ``num_tasks`` scalars.
    ``E[mu0] = m``, ``E[Sigma0] = Psi / (nu - p - 1)``, ``E[sigma^2] = b / (a - 1)``.
    """

    m: jax.Array
    kappa: jax.Array
    nu: jax.Array
    Psi: jax.Array
    a: jax.Array
    b: jax.Array
    num_tasks: jax.Array

    @property
    def mu0_mean(self) -> np.ndarray:
        return np.asarray(self.m)

    @property
    def Sigma0_mean(self) -> np.ndarray:
        p = self.m.shape[-1]
        return np.asarray(self.Psi) / (float(self.nu) - p - 1)

    @property
    def mu0_sd(self) -> np.ndarray:
        """Marginal sd of mu0: a multivariate t with nu - p + 1 dof and scale Psi/(kappa(nu-p+1))."""
        p = self.m.shape[-1]
        dof = float(self.nu) - p + 1
        scale = np.diag(np.asarray(self.Psi)) / (float(self.kappa) * dof)
        return np.sqrt(scale * dof / (dof - 2))


def stream_init(num_features: int, *, m0=0.0, kappa0: float = KAPPA0, nu0=None, psi0=PSI0,
                noise_shape: float = NOISE_SHAPE, noise_rate: float = NOISE_RATE) -> StreamingState:
    """The streaming state at the prior (the same prior as :func:`model`).

    Example
    -------
    >>> s = stream_init(4)
    >>> float(s.nu), int(s.num_tasks)
    (6.0, 0)
    """
    p = int(num_features)
    if p < 1:
        raise ModelError(f"num_features must be >= 1, got {num_features}")
    _check_prior(p, m0, kappa0, nu0, psi0, None, noise_shape, noise_rate)
    dtype = jnp.result_type(float)
    m0, kappa0, nu0, psi0 = _prior_arrays(p, m0, kappa0, nu0, psi0, dtype)
    return StreamingState(m0, jnp.asarray(kappa0, dtype), jnp.asarray(nu0, dtype), psi0,
                          jnp.asarray(noise_shape, dtype), jnp.asarray(noise_rate, dtype),
                          jnp.asarray(0, jnp.int32))


def _update_one(state: StreamingState, phi, y, mask, noise, num_iters: int) -> StreamingState:
    m, kappa, nu, Psi, a, b, count = state
    mask = mask.astype(phi.dtype)
    pm = phi * mask[:, None]
    ym = y * mask
    n = jnp.sum(mask)
    G, h = pm.T @ pm, pm.T @ ym
    p = m.shape[0]
    eye = jnp.eye(p, dtype=phi.dtype)
    known = noise is not None

    def local(glob):
        m_, nu_, Psi_, a_, b_ = glob
        E_prec = nu_ * cho_solve((jnp.linalg.cholesky(Psi_), True), eye)
        tau = (1.0 / jnp.square(noise)) if known else a_ / b_
        P = E_prec + tau * G
        LP = jnp.linalg.cholesky(0.5 * (P + P.T))
        V = cho_solve((LP, True), eye)
        w = cho_solve((LP, True), E_prec @ m_ + tau * h)
        return w, V

    def globals_from(w, V):
        d = w - m
        m_new = (kappa * m + w) / (kappa + 1)
        Psi_new = Psi + V + (kappa / (kappa + 1)) * jnp.outer(d, d)
        Psi_new = 0.5 * (Psi_new + Psi_new.T)
        if known:
            return m_new, nu + 1, Psi_new, a, b
        resid = ym - pm @ w
        a_new = a + 0.5 * n
        b_new = b + 0.5 * (jnp.sum(resid**2) + jnp.sum(G * V))
        return m_new, nu + 1, Psi_new, a_new, b_new

    def body(_, glob):
        return globals_from(*local(glob))

    glob = jax.lax.fori_loop(0, num_iters, body, globals_from(*local((m, nu, Psi, a, b))))
    m_new, nu_new, Psi_new, a_new, b_new = glob
    return StreamingState(m_new, kappa + 1, nu_new, Psi_new, a_new, b_new, count + 1)


@partial(jax.jit, static_argnames=("known", "num_iters"))
def _scan_update(state, phi, y, mask, noise, known, num_iters):
    def step(s, task):
        return _update_one(s, *task, noise if known else None, num_iters), None

    return jax.lax.scan(step, state, (phi, y, mask))[0]


def _check_stream_args(state, phi, y, mask, noise, num_iters, batched: bool):
    if not isinstance(state, StreamingState):
        raise ModelError(f"state must be a StreamingState (from stream_init), got {type(state).__name__}")
    want = 3 if batched else 2
    if np.ndim(phi) != want:
        raise DataError(f"phi must be {'(num_tasks, n, p)' if batched else '(n, p)'}, got shape "
                        f"{np.shape(phi)}")
    if np.shape(phi)[-1] != np.shape(state.m)[-1]:
        raise DataError(f"phi has {np.shape(phi)[-1]} features but the state has "
                        f"{np.shape(state.m)[-1]}")
    if tuple(np.shape(y)) != tuple(np.shape(phi)[:-1]):
        raise DataError(f"y must have shape {tuple(np.shape(phi)[:-1])} to match phi, got {np.shape(y)}")
    if mask is not None and tuple(np.shape(mask)) != tuple(np.shape(y)):
        raise DataError(f"mask must have the shape of y {tuple(np.shape(y))}, got {np.shape(mask)}")
    _check_finite("phi", phi)
    _check_finite("y", y)
    if noise is not None and not (np.ndim(noise) == 0 and float(noise) > 0):
        raise ModelError(f"noise must be None (inferred) or a positive scalar, got {noise!r}")
    if not isinstance(num_iters, int) or num_iters < 0:
        raise OptionError(f"num_iters must be a non-negative integer, got {num_iters!r}")


def stream_update(state: StreamingState, phi, y, mask=None, *, noise=None,
                  num_iters: int = 10) -> StreamingState:
    """Update the streaming posterior with one task (``phi`` ``(n, p)``, ``y`` ``(n,)``) and
    forget it. ``noise``: the known noise sd (must match the model's), or None to learn it.

    Example
    -------
    >>> s = stream_update(stream_init(2), jnp.ones((3, 2)), jnp.ones(3))
    >>> int(s.num_tasks)
    1
    """
    _check_stream_args(state, phi, y, mask, noise, num_iters, batched=False)
    phi = jnp.asarray(phi, state.m.dtype)
    mask = jnp.ones(phi.shape[:1], phi.dtype) if mask is None else jnp.asarray(mask, phi.dtype)
    return _scan_update(state, phi[None], jnp.asarray(y, phi.dtype)[None], mask[None],
                        jnp.asarray(1.0 if noise is None else noise, phi.dtype),
                        noise is not None, num_iters)


def stream_fit(state: StreamingState, phi, y, mask=None, *, noise=None,
               num_iters: int = 10) -> StreamingState:
    """Update with a batch of tasks ``(T, n, p)`` one after the other (a ``lax.scan``: equal to
    ``T`` calls of :func:`stream_update`). Call it again with the next batch of an endless
    stream; nothing but the state is kept.

    Example
    -------
    >>> d = simulate(jax.random.key(1), num_tasks=30, num_points=8)
    >>> s = stream_fit(stream_init(4), d["phi"], d["y"], d["mask"])
    >>> int(s.num_tasks)
    30
    """
    _check_stream_args(state, phi, y, mask, noise, num_iters, batched=True)
    phi = jnp.asarray(phi, state.m.dtype)
    mask = jnp.ones(phi.shape[:2], phi.dtype) if mask is None else jnp.asarray(mask, phi.dtype)
    return _scan_update(state, phi, jnp.asarray(y, phi.dtype), mask,
                        jnp.asarray(1.0 if noise is None else noise, phi.dtype),
                        noise is not None, num_iters)


def stream_draws(rng_key, state: StreamingState, num_draws: int = 1000, *, noise=None) -> dict:
    """Draws ``{"mu0", "Sigma0", "sigma"}`` from the streaming posterior, for :func:`predict`.

    ``Sigma0 ~ IW(nu, Psi)`` (Bartlett), ``mu0 ~ N(m, Sigma0/kappa)``, ``sigma^2 ~ IG(a, b)``
    (or ``sigma = noise`` if the noise sd is known). The draws are made on the host with NumPy,
    seeded from ``rng_key`` (the same key gives the same draws).

    Example
    -------
    >>> d = stream_draws(jax.random.key(0), stream_init(3), 10)
    >>> d["Sigma0"].shape
    (10, 3, 3)
    """
    if not isinstance(state, StreamingState):
        raise ModelError(f"state must be a StreamingState, got {type(state).__name__}")
    if not isinstance(num_draws, (int, np.integer)) or num_draws < 1:
        raise OptionError(f"num_draws must be a positive integer, got {num_draws!r}")
    # host-side NumPy draws seeded from rng_key: cheap, and no compile of JAX's gamma sampler
    seed = np.asarray(jax.random.randint(rng_key, (4,), 0, np.iinfo(np.int32).max))
    gen = np.random.default_rng(seed)
    m, Psi = np.asarray(state.m, float), np.asarray(state.Psi, float)
    p, S = m.shape[-1], int(num_draws)
    nu, kappa = float(state.nu), float(state.kappa)
    chi2 = gen.chisquare(nu - np.arange(p), (S, p))
    A = np.zeros((S, p, p))
    A[:, np.arange(p), np.arange(p)] = np.sqrt(chi2)
    rows, cols = np.tril_indices(p, -1)
    A[:, rows, cols] = gen.standard_normal((S, len(rows)))
    B = np.linalg.cholesky(np.linalg.inv(Psi)) @ A          # Lambda0 = B B' ~ W(nu, Psi^-1)
    Binv = np.linalg.inv(B)
    Sigma0 = np.einsum("sji,sjk->sik", Binv, Binv)           # B^-T B^-1
    mu0 = m + np.einsum("sji,sj->si", Binv, gen.standard_normal((S, p))) / math.sqrt(kappa)
    if noise is None:
        sigma = np.sqrt(float(state.b) / gen.gamma(float(state.a), 1.0, S))
    else:
        sigma = np.full(S, float(noise))
    return {"mu0": mu0, "Sigma0": Sigma0, "sigma": sigma}
