r"""Autoregressive hidden Markov models (AR-HMMs), with the hidden states marginalised exactly.

The model
---------
A hidden chain :math:`z_0, \dots, z_{T-1} \in \{0, \dots, K-1\}` switches between ``K`` vector
autoregressions of order ``L`` for an observed series :math:`y_t \in \mathbb{R}^D`:

.. math::

    z_0 \sim \mathrm{Categorical}(\pi), \qquad z_t \mid z_{t-1} = i \sim \mathrm{Categorical}(P_{i,:}),

    y_t \mid z_t = k,\, y_{<t} \sim \mathcal{N}\Big(b_k + \sum_{l=1}^{L} A_{k,l}\, y_{t-l},\;
    \Sigma_k\Big), \qquad t = L, \dots, T-1.

The first ``L`` observations :math:`y_0, \dots, y_{L-1}` only *condition* the autoregression:
they have no density in the likelihood (``log_obs[t] = 0`` for ``t < L``), but the chain does have
states there (so every array is aligned with ``y``: ``T`` states for ``T`` observations).

Priors (``D`` = dimension, ``K`` = states, ``L`` = lags; the data are assumed to be on a scale of
order one, e.g. standardised):

* ``pi ~ Dirichlet(1_K)``: initial-state probabilities;
* ``trans[i] ~ Dirichlet(1 + sticky * e_i)``: transition rows (row = from-state), a *sticky*
  prior with concentration ``1 + sticky`` on the diagonal and ``1`` elsewhere;
* ``b0 ~ Normal(0, 5)^K`` (the intercepts of the first dimension) and, for ``D > 1``,
  ``b_rest ~ Normal(0, 5)`` (``(K, D-1)``); ``b = [b0, b_rest]`` is a deterministic site;
* ``A ~ Normal(0, 0.5)`` elementwise, ``(K, L, D, D)``: shrinkage towards no autoregression;
  ``A[k, l]`` multiplies :math:`y_{t-1-l}` (``l = 0`` is lag one). Stationarity is not imposed;
* ``sigma ~ HalfNormal(2)``, ``(K, D)``: noise scales; for ``D > 1`` also
  ``L_omega ~ LKJCholesky(D, 2)``, ``(K, D, D)``, and
  :math:`\Sigma_k = \mathrm{diag}(\sigma_k) \Omega_k \mathrm{diag}(\sigma_k)` with
  :math:`\Omega_k = L_{\omega,k} L_{\omega,k}^\top`.

**Label switching.** The likelihood is invariant under permuting the states. Unless
``left_to_right``, the states are identified by ordering the intercepts of the first dimension:
``b0`` has support ``b0[0] < b0[1] < ... < b0[K-1]`` and the prior is the distribution of the
order statistics of ``K`` iid ``Normal(0, 5)`` draws (density ``K! * prod Normal(b0_k | 0, 5)`` on
the ordered set, a proper prior: :class:`bayeslik.distributions.OrderedNormal`). State ``k`` is
the state with the ``k``-th smallest intercept. Where intercepts overlap, the ordering alone may
not keep the labels apart; :func:`bayeslik.relabel.relabel` with ``"arhmm"`` (the spec
:data:`RELABEL_SPEC`, registered when this module is imported) aligns them after the fit, and
:func:`classification_fn` gives Stephens' method its state probabilities.

**Left-to-right (degradation) models.** With ``left_to_right=True`` state ``k`` can only stay or
move forward (``P[k, j] = 0`` for ``j < k``) and the last state is absorbing. The structural zeros
are ``-inf`` entries of ``log_trans``; row ``k < K-1`` has its own site ``trans_{k}``,
``Dirichlet`` over the ``K - k`` allowed entries ``(k, k+1, ..., K-1)`` with concentration
``1 + sticky`` on "stay" and ``1`` elsewhere; ``trans`` ``(K, K)`` is a deterministic site. The
structure already fixes the labels, so ``b0`` is then unordered (iid ``Normal(0, 5)``).

**Soft labels (partially hidden AR-HMM).** ``labels`` ``(T, K)`` holds the *plausibility* of each
state at each step, in ``[0, 1]``: 1 = fully plausible, 0 = impossible. They multiply the
observation likelihoods, ``log_obs[t, k] += log(labels[t, k])``: a row of ones is vacuous (no
knowledge; all-ones labels give exactly the plain AR-HMM), a one-hot row says the state is known,
a zero forbids a state. No row may be all zero.

**Exact marginalisation.** The states never appear as sample sites. The observed site ``y`` has
the distribution :class:`ARHMMLikelihood`, whose ``log_prob(y)`` is the forward-algorithm
log-likelihood :math:`\log p(y_{L:T} \mid y_{0:L}, \theta) = \log \sum_z p(z, y_{L:T} \mid
y_{0:L}, \theta)` computed by :func:`bayeslik.filtering.hmm_loglik`. Its inputs come from
:func:`hmm_inputs`, which :func:`state_posterior` also uses, so the model and the state posterior
cannot disagree.

**Batches.** ``y`` may be ``(B, T, D)``: ``B`` independent sequences sharing the parameters, with
an optional prefix ``mask`` ``(B, T)`` for unequal lengths (``labels`` then ``(B, T, K)``). The
log-likelihood is a ``jax.vmap`` of the single-sequence one; the pointwise log-likelihood is one
value per sequence. A single sequence may have a ``(T,)`` mask.

**How many states.** :func:`choose_states` fits ``K = 1, 2, 3, ...`` with one engine and
tabulates the log evidence (SMC, nested sampling) and PSIS-LOO over the one-step-ahead terms
:math:`\log p(y_t \mid y_{<t}, \theta)` (:func:`step_loglik`, :func:`pointwise_steps`; the
model's own pointwise log-likelihood is one value per sequence, too few for LOO).

Example
-------
>>> import jax, bayeslik as bl
>>> from bayeslik.models import arhmm
>>> data = arhmm.simulate(jax.random.key(0), num_steps=200, num_states=2)
>>> post = bl.Posterior(arhmm.model, y=data["y"], num_states=2)
>>> sorted(post.latent_names)
['A', 'b0', 'pi', 'sigma', 'trans']
>>> fit = bl.fit(post, "nuts", num_warmup=300, num_samples=300, num_chains=2,
...              init=arhmm.init_params(data["y"], 2), progress_bar=False)   # doctest: +SKIP
>>> states = arhmm.state_posterior(fit, post)                               # doctest: +SKIP
>>> (states["viterbi"] == data["states"]).mean()                            # doctest: +SKIP
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax import lax
from jax.scipy.special import gammaln, xlogy
from numpyro.distributions import constraints
from numpyro.distributions.util import validate_sample

from bayeslik import icdf as _icdf
from bayeslik.distributions import OrderedNormal
from bayeslik.errors import DataError, ModelError, OptionError
from bayeslik.compare import model_choice_table
from bayeslik.filtering import hmm_loglik, hmm_smoother, hmm_viterbi
from bayeslik.inits import set_default_init
from bayeslik.relabel import register_components

__all__ = [
    "ARHMMLikelihood",
    "RELABEL_COST_SITES",
    "RELABEL_SPEC",
    "choose_states",
    "classification_fn",
    "default_params",
    "hmm_inputs",
    "init_params",
    "mode_init",
    "model",
    "pointwise_steps",
    "prior",
    "simulate",
    "state_posterior",
    "step_loglik",
]

#: Prior scales (the data are assumed to be of order one).
INTERCEPT_SCALE = 5.0
AR_SCALE = 0.5
NOISE_SCALE = 2.0
LKJ_CONCENTRATION = 2.0

#: Which sites carry the state axis (for :func:`bayeslik.relabel.relabel`, registered as
#: ``"arhmm"``): ``trans`` on both axes (``trans[nu(i), nu(j)]``).
RELABEL_SPEC = {"pi": 0, "trans": (0, 1), "b0": 0, "b_rest": 0, "b": 0, "A": 0, "sigma": 0,
                "L_omega": 0}
#: The sites compared in the pivot method's cost: the state intercepts (the locations; the
#: scales, AR matrices and transition rows are noisier relative to their differences).
RELABEL_COST_SITES = ("b0", "b_rest")


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _check_sizes(where: str, **sizes) -> None:
    """OptionError naming the first size that is not a positive integer."""
    for name, v in sizes.items():
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise OptionError(f"{where}: {name} must be a positive integer, got {v!r}")


def _allowed(num_states: int, left_to_right: bool) -> np.ndarray:
    """(K, K) bool: the transitions the structure allows (row = from-state)."""
    if left_to_right:
        return np.triu(np.ones((num_states, num_states), dtype=bool))
    return np.ones((num_states, num_states), dtype=bool)


def _scale_tril(params: dict) -> jax.Array:
    """(K, D, D) Cholesky factors of the noise covariances, diag(sigma) @ L_omega."""
    sigma = jnp.asarray(params["sigma"])
    L_omega = params.get("L_omega")
    if L_omega is None:
        if sigma.shape[-1] != 1:
            raise ModelError("params: 'L_omega' is required when the dimension D > 1")
        return sigma[..., None]
    return sigma[..., :, None] * jnp.asarray(L_omega)


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_labels(labels, expected_shape: tuple[int, ...]) -> None:
    """Shape and, when concrete, values of the soft labels; DataError naming ``labels``."""
    shape = tuple(np.shape(labels))
    if shape != expected_shape:
        raise DataError(
            f"labels must have shape {expected_shape} (one plausibility per step and state, "
            f"{'(B, T, K)' if len(expected_shape) == 3 else '(T, K)'}), got {shape}"
        )
    if not _is_concrete(labels):
        return
    lab = np.asarray(labels, dtype=float)
    if not np.all(np.isfinite(lab)) or lab.min() < 0 or lab.max() > 1:
        raise DataError(
            "labels must hold plausibilities in [0, 1] (1 = plausible, 0 = impossible); got values "
            f"in [{np.nanmin(lab):g}, {np.nanmax(lab):g}]"
            + ("" if np.all(np.isfinite(lab)) else " and non-finite entries")
        )
    dead = np.argwhere(np.all(lab == 0, axis=-1))
    if dead.size:
        raise DataError(
            f"labels: {len(dead)} row(s) are all zero (first at index {tuple(dead[0].tolist())}), "
            "which makes every state impossible there; use a row of ones for 'no knowledge'"
        )


# --------------------------------------------------------------------------------------------------
# the HMM inputs: one function for the model and for state_posterior
# --------------------------------------------------------------------------------------------------
def hmm_inputs(params: dict, y, *, num_lags: int = 1, labels=None, left_to_right: bool = False):
    r"""``(log_init (K,), log_trans (K, K), log_obs (T, K))`` of the AR-HMM for one sequence.

    * ``log_init = log pi``;
    * ``log_trans = log trans`` on the allowed transitions, ``-inf`` on the structural zeros of a
      left-to-right model (the value of ``trans`` there is never read, so no ``log 0``);
    * ``log_obs[t, k] = log N(y_t | b_k + sum_l A[k, l] y_{t-1-l}, Sigma_k)`` for ``t >= L``,
      ``0`` for ``t < L`` (the first ``L`` observations only condition the recursion), plus
      ``log labels[t, k]`` when ``labels`` is given.

    Args:
        params: constrained values ``{"pi": (K,), "trans": (K, K), "b": (K, D), "A": (K, L, D, D),
            "sigma": (K, D)}`` and, for ``D > 1``, ``"L_omega": (K, D, D)``.
        y: ``(T, D)`` one sequence.
        num_lags: ``L``.
        labels: optional ``(T, K)`` soft labels in ``[0, 1]``.
        left_to_right: whether ``trans`` has the left-to-right structure.

    Examples:
        >>> import jax
        >>> data = simulate(jax.random.key(0), num_steps=50, num_states=2)
        >>> [a.shape for a in hmm_inputs(data["params"], data["y"])]
        [(2,), (2, 2), (50, 2)]
    """
    y = jnp.asarray(y)
    b, A = jnp.asarray(params["b"]), jnp.asarray(params["A"])
    pi, trans = jnp.asarray(params["pi"]), jnp.asarray(params["trans"])
    K, D = b.shape
    L = int(num_lags)
    T = y.shape[0]
    log_init = jnp.log(pi)
    allowed = _allowed(K, left_to_right)
    if left_to_right:
        log_trans = jnp.where(allowed, jnp.log(jnp.where(allowed, trans, 1.0)), -jnp.inf)
    else:
        log_trans = jnp.log(trans)
    # lagged regressors: lagged[t, l] = y[L + t - 1 - l], t = 0..T-L-1
    lagged = jnp.stack([y[L - 1 - l : T - 1 - l] for l in range(L)], axis=1)  # (T-L, L, D)
    mean = b[None] + jnp.einsum("klij,tlj->tki", A, lagged)  # (T-L, K, D)
    target = y[L:, None, :]
    if D == 1:
        scale = jnp.asarray(params["sigma"])[:, 0]
        tail = dist.Normal(mean[..., 0], scale).log_prob(target[..., 0])
    else:
        tail = dist.MultivariateNormal(mean, scale_tril=_scale_tril(params)).log_prob(target)
    log_obs = jnp.concatenate([jnp.zeros((L, K), tail.dtype), tail], axis=0)
    if labels is not None:
        log_obs = log_obs + jnp.log(jnp.asarray(labels, log_obs.dtype))
    return log_init, log_trans, log_obs


@partial(jax.jit, static_argnames=("num_lags", "left_to_right"))
def _sequence_loglik(params, y, labels, mask, *, num_lags, left_to_right):
    """hmm_loglik of hmm_inputs for y (T, D), or its (B,) vmap for y (B, T, D).

    Jitted as a whole, so that an eager call (the Posterior's checking traces) compiles one
    function instead of dispatching every small operation; inside an outer jit it is inlined."""

    def one(yy, lab, m):
        li, lt, lo = hmm_inputs(params, yy, num_lags=num_lags, labels=lab,
                                left_to_right=left_to_right)
        return hmm_loglik(li, lt, lo, mask=m)

    if y.ndim == 2:
        return one(y, labels, mask)
    return jax.vmap(one, in_axes=(0, None if labels is None else 0,
                                  None if mask is None else 0))(y, labels, mask)


class ARHMMLikelihood(dist.Distribution):
    r"""The AR-HMM likelihood of whole sequences, with the states summed out (forward algorithm).

    ``log_prob(y)`` for ``y`` ``(T, D)`` is ``hmm_loglik(*hmm_inputs(params, y, ...), mask=mask)``,
    i.e. :math:`\log p(y_{L:T} \mid y_{0:L}, \theta)`; for ``y`` ``(B, T, D)`` it is the ``(B,)``
    vector of per-sequence log-likelihoods (batch shape ``(B,)``, event shape ``(T, D)``).
    ``sample`` simulates new sequences (pre-sample values zero; ``mask`` is ignored there).
    """

    support = constraints.independent(constraints.real, 2)
    pytree_data_fields = ("params", "labels", "mask")
    pytree_aux_fields = ("num_lags", "left_to_right")

    def __init__(self, params: dict, shape: tuple[int, ...], *, num_lags: int = 1, labels=None,
                 left_to_right: bool = False, mask=None, validate_args=None):
        self.params, self.labels, self.mask = params, labels, mask
        self.num_lags, self.left_to_right = int(num_lags), bool(left_to_right)
        super().__init__(batch_shape=tuple(shape[:-2]), event_shape=tuple(shape[-2:]),
                         validate_args=validate_args)

    def log_prob(self, value):
        return _sequence_loglik(self.params, jnp.asarray(value), self.labels, self.mask,
                                num_lags=self.num_lags, left_to_right=self.left_to_right)

    def sample(self, key, sample_shape=()):
        T = self.event_shape[0]
        n = math.prod(tuple(sample_shape) + self.batch_shape)
        keys = jax.random.split(key, max(n, 1))
        ys = jax.vmap(lambda k: _simulate_core(k, self.params, T, self.num_lags)[0])(keys)
        return ys[:n].reshape(tuple(sample_shape) + self.batch_shape + self.event_shape)


class _Dirichlet(dist.Dirichlet):
    r"""NumPyro's Dirichlet with the kernel :math:`\sum_i (c_i - 1) \log x_i` written with
    ``xlogy``, so that ``0 * log 0 = 0``.

    Far out in unconstrained space (a wild trajectory of NUTS's early warmup) the stick-breaking
    map underflows and a coordinate is exactly 0 in float32; ``dist.Dirichlet`` then gives
    ``0 * (-inf) = NaN`` for a concentration of 1 (every "move" entry of a transition row and
    every entry of ``pi``), and the engines flag a non-finite evaluation. The limit is finite
    (``x^0 = 1``); where ``c_i > 1`` (the sticky "stay" entry) it stays ``-inf``, a zero density.
    Same values as ``dist.Dirichlet`` everywhere else.

    >>> import jax.numpy as jnp
    >>> c, x = jnp.array([11.0, 1.0, 1.0]), jnp.array([1.0, 0.0, 0.0])
    >>> bool(jnp.isnan(dist.Dirichlet(c).log_prob(x))), round(float(_Dirichlet(c).log_prob(x)), 4)
    (True, 4.8828)
    """

    @validate_sample
    def log_prob(self, value):
        c = self.concentration
        normalize = jnp.sum(gammaln(c), axis=-1) - gammaln(jnp.sum(c, axis=-1))
        return jnp.sum(xlogy(c - 1.0, value), axis=-1) - normalize


# nested sampling's unit-cube map handles a Dirichlet by its exact type: the guarded one is a
# Dirichlet with the same parameters, so it takes the same (exact stick-breaking) map
_icdf.register_like(_Dirichlet, dist.Dirichlet)


# --------------------------------------------------------------------------------------------------
# the NumPyro program
# --------------------------------------------------------------------------------------------------
def _sample_params(K: int, D: int, L: int, left_to_right: bool, sticky: float) -> dict:
    pi = numpyro.sample("pi", _Dirichlet(jnp.ones(K)))
    if left_to_right:
        rows = []
        for k in range(K - 1):
            conc = jnp.ones(K - k).at[0].add(sticky)
            row = numpyro.sample(f"trans_{k}", _Dirichlet(conc))
            rows.append(jnp.concatenate([jnp.zeros(k, row.dtype), row]))
        rows.append(jax.nn.one_hot(K - 1, K, dtype=pi.dtype))  # the last state is absorbing
        trans = numpyro.deterministic("trans", jnp.stack(rows))
        b0 = numpyro.sample("b0", dist.Normal(0.0, INTERCEPT_SCALE).expand([K]).to_event(1))
    else:
        conc = jnp.ones((K, K)) + sticky * jnp.eye(K)
        trans = numpyro.sample("trans", _Dirichlet(conc).to_event(1))
        b0 = numpyro.sample("b0", OrderedNormal(0.0, INTERCEPT_SCALE, K))
    if D > 1:
        b_rest = numpyro.sample(
            "b_rest", dist.Normal(0.0, INTERCEPT_SCALE).expand([K, D - 1]).to_event(2)
        )
        b = jnp.concatenate([b0[:, None], b_rest], axis=1)
    else:
        b = b0[:, None]
    b = numpyro.deterministic("b", b)
    A = numpyro.sample("A", dist.Normal(0.0, AR_SCALE).expand([K, L, D, D]).to_event(4))
    sigma = numpyro.sample("sigma", dist.HalfNormal(NOISE_SCALE).expand([K, D]).to_event(2))
    params = {"pi": pi, "trans": trans, "b": b, "A": A, "sigma": sigma}
    if D > 1:
        params["L_omega"] = numpyro.sample(
            "L_omega", dist.LKJCholesky(D, LKJ_CONCENTRATION).expand([K]).to_event(1)
        )
    return params


def prior(num_states: int, dim: int = 1, num_lags: int = 1, left_to_right: bool = False,
          sticky: float = 10.0) -> dict:
    """The AR-HMM's prior alone, as a NumPyro program: samples the same sites as :func:`model`
    (without ``y``) and returns the constrained parameters ``{"pi", "trans", "b", "A", "sigma"}``
    (and ``"L_omega"`` for ``dim > 1``), the inputs of :func:`hmm_inputs`. For engines that
    take the prior and the likelihood apart, e.g. particle MCMC's ``StateSpacePosterior``.

    Examples:
        >>> from numpyro import handlers
        >>> tr = handlers.trace(handlers.seed(prior, 0)).get_trace(2)
        >>> sorted(k for k, v in tr.items() if v["type"] == "sample")
        ['A', 'b0', 'pi', 'sigma', 'trans']
    """
    return _sample_params(int(num_states), int(dim), int(num_lags), bool(left_to_right),
                          float(sticky))


def _check_args(y, num_states, num_lags, labels, mask, sticky) -> tuple[int, int, int]:
    shape = tuple(np.shape(y))
    if len(shape) not in (2, 3):
        raise DataError(
            f"y must have shape (T, D) (one sequence) or (B, T, D) (a batch), got {shape}; "
            "for a univariate series use y[:, None]"
        )
    if not isinstance(num_states, (int, np.integer)) or num_states < 1:
        raise ModelError(f"num_states must be a positive int, got {num_states!r}")
    if not isinstance(num_lags, (int, np.integer)) or num_lags < 1:
        raise ModelError(f"num_lags must be a positive int, got {num_lags!r}")
    T, D = shape[-2:]
    if T <= num_lags:
        raise DataError(f"y has T = {T} steps, but num_lags = {num_lags} needs T > num_lags")
    if not float(sticky) >= 0:
        raise ModelError(f"sticky must be >= 0, got {sticky!r}")
    if labels is not None:
        _check_labels(labels, shape[:-1] + (int(num_states),))
    if mask is not None:
        mshape = tuple(np.shape(mask))
        if mshape != shape[:-1]:
            raise DataError(f"mask must have shape {shape[:-1]} (y's shape without D), got {mshape}")
        if jnp.asarray(mask).dtype != jnp.bool_:
            raise DataError(f"mask must be boolean (True = valid step), got {jnp.asarray(mask).dtype}")
    return int(num_states), int(num_lags), int(D)


def model(y, num_states: int, num_lags: int = 1, labels=None, left_to_right: bool = False,
          sticky: float = 10.0, mask=None) -> None:
    r"""The AR-HMM as a NumPyro program (see the module docstring for the maths and priors).

    Args:
        y: ``(T, D)`` observations, or ``(B, T, D)`` for a batch of sequences.
        num_states: ``K``.
        num_lags: ``L``; ``y[:L]`` conditions the autoregression and has no density.
        labels: optional soft labels ``(T, K)`` (``(B, T, K)`` for a batch) in ``[0, 1]``.
        left_to_right: the degradation structure (stay or move forward; the last state absorbs).
        sticky: extra Dirichlet concentration on "stay" in every transition row.
        mask: optional prefix mask ``(T,)`` / ``(B, T)``, ``True`` on valid steps.

    Sites: ``pi``, ``trans`` (latent; deterministic when ``left_to_right``, then rows
    ``trans_0 .. trans_{K-2}`` are latent), ``b0``, ``b_rest`` (``D > 1``), ``b`` (deterministic),
    ``A``, ``sigma``, ``L_omega`` (``D > 1``), and the observed ``y``.

    >>> import jax, bayeslik as bl
    >>> data = simulate(jax.random.key(0), num_steps=100, num_states=2)
    >>> post = bl.Posterior(model, y=data["y"], num_states=2)
    >>> post.ndim   # pi: 1, trans: 2, b0: 2, A: 2, sigma: 2
    9
    """
    K, L, D = _check_args(y, num_states, num_lags, labels, mask, sticky)
    y = jnp.asarray(y)
    params = _sample_params(K, D, L, bool(left_to_right), float(sticky))
    numpyro.sample(
        "y",
        ARHMMLikelihood(params, y.shape, num_lags=L, labels=labels,
                        left_to_right=bool(left_to_right), mask=mask),
        obs=y,
    )


# --------------------------------------------------------------------------------------------------
# simulation
# --------------------------------------------------------------------------------------------------
def default_params(num_states: int = 3, dim: int = 1, num_lags: int = 1,
                   left_to_right: bool = False, num_steps: int = 1000) -> dict:
    r"""Well-separated parameters for :func:`simulate` (NumPy arrays, the :func:`hmm_inputs` names).

    Intercepts ``b[k, 0] = 2 (k - (K-1)/2)`` (increasing, so the state order is that of the
    model), ``b[k, d] = (-1)^d b[k, 0]``; lag-one AR matrices ``a_k I`` with
    ``a_k = 0.4 + 0.2 k/(K-1)`` and off-diagonal ``0.1 (-1)^k``, higher lags zero; noise sd 0.5
    with correlation 0.3 between dimensions. Transitions: 0.95 on the diagonal (the rest spread
    evenly) and ``pi`` uniform; left-to-right: "stay" ``1 - K/num_steps`` (clipped to
    ``[0.5, 0.999]``; about ``num_steps/K`` steps per state), "move to the next state" the rest,
    and ``pi`` puts all mass on state 0.
    """
    _check_sizes("default_params", num_states=num_states, dim=dim, num_lags=num_lags,
                 num_steps=num_steps)
    K, D, L = int(num_states), int(dim), int(num_lags)
    k = np.arange(K, dtype=float)
    b0 = 2.0 * (k - (K - 1) / 2)
    b = b0[:, None] * (-1.0) ** np.arange(D)[None, :]
    a = 0.4 + 0.2 * k / max(K - 1, 1)
    A = np.zeros((K, L, D, D))
    for s in range(K):
        A[s, 0] = a[s] * np.eye(D) + 0.1 * (-1.0) ** s * (1 - np.eye(D))
    sigma = np.full((K, D), 0.5)
    corr = 0.7 * np.eye(D) + 0.3 * np.ones((D, D))
    if left_to_right:
        stay = float(np.clip(1.0 - K / max(num_steps, 1), 0.5, 0.999))
        trans = np.eye(K) * stay + np.eye(K, k=1) * (1 - stay)
        trans[-1, -1] = 1.0
        pi = np.eye(K)[0]
    else:
        trans = np.full((K, K), 0.05 / max(K - 1, 1)) if K > 1 else np.ones((1, 1))
        np.fill_diagonal(trans, 0.95 if K > 1 else 1.0)
        pi = np.full(K, 1.0 / K)
    params = {"pi": pi, "trans": trans, "b": b, "A": A, "sigma": sigma}
    if D > 1:
        params["L_omega"] = np.broadcast_to(np.linalg.cholesky(corr), (K, D, D)).copy()
    return params


def _simulate_core(rng_key, params: dict, num_steps: int, num_lags: int):
    """(y (T, D), states (T,)) by a lax.scan; pre-sample values y_{-1}, ..., y_{-L} are zero."""
    b, A = jnp.asarray(params["b"]), jnp.asarray(params["A"])
    K, D = b.shape
    L = int(num_lags)
    chol = _scale_tril(params)
    log_pi = jnp.log(jnp.asarray(params["pi"]))
    log_trans = jnp.log(jnp.asarray(params["trans"]))
    k0, kz, ke = jax.random.split(rng_key, 3)
    z0 = jax.random.categorical(k0, log_pi)
    zkeys = jax.random.split(kz, num_steps)
    eps = jax.random.normal(ke, (num_steps, D))

    def step(carry, inp):
        z_prev, hist = carry  # hist[l] = y_{t-1-l}
        t, key, e = inp
        z = jnp.where(t == 0, z0, jax.random.categorical(key, log_trans[z_prev]))
        yt = b[z] + jnp.einsum("lij,lj->i", A[z], hist) + chol[z] @ e
        hist = jnp.concatenate([yt[None], hist[:-1]], axis=0)
        return (z, hist), (yt, z)

    init = (z0, jnp.zeros((L, D), b.dtype))
    _, (y, z) = lax.scan(step, init, (jnp.arange(num_steps), zkeys, eps))
    return y, z.astype(jnp.int32)


def simulate(rng_key, num_steps: int, num_states: int = 3, dim: int = 1, num_lags: int = 1,
             left_to_right: bool = False, params: dict | None = None) -> dict:
    r"""Simulate one AR-HMM sequence.

    Args:
        rng_key: a ``jax.random`` key.
        num_steps: ``T``.
        num_states, dim, num_lags, left_to_right: the shape of the model; ignored where
            ``params`` fixes them.
        params: ``{"pi", "trans", "b", "A", "sigma", ["L_omega"]}`` as in :func:`hmm_inputs`;
            default :func:`default_params`.

    Returns:
        ``{"y": (T, D), "states": (T,) int, "params": dict}`` (NumPy arrays). Bind the data with
        ``bl.Posterior(model, y=out["y"], num_states=K)``.

    >>> import jax
    >>> out = simulate(jax.random.key(0), num_steps=100, num_states=2, dim=2)
    >>> out["y"].shape, out["states"].shape
    ((100, 2), (100,))
    """
    _check_sizes("simulate", num_steps=num_steps, **({} if params is not None else dict(
        num_states=num_states, dim=dim, num_lags=num_lags)))
    if params is None:
        params = default_params(num_states, dim, num_lags, left_to_right, num_steps)
    params = {k: np.asarray(v) for k, v in params.items()}
    num_lags = params["A"].shape[1]
    y, z = _simulate_core(rng_key, params, int(num_steps), num_lags)
    return {"y": np.asarray(y), "states": np.asarray(z), "params": params}


def example() -> tuple:
    """A small default problem for the command line's model zoo: ``(model, data)``, a simulated
    2-state AR(1)-HMM of 300 steps (``bayeslik fit arhmm``).

    >>> m, data = example()
    >>> data["y"].shape, data["num_states"]
    ((300, 1), 2)
    """
    import jax

    sim = simulate(jax.random.key(0), num_steps=300, num_states=2)
    return model, {"y": sim["y"], "num_states": 2}


# --------------------------------------------------------------------------------------------------
# state posterior
# --------------------------------------------------------------------------------------------------
_PARAM_NAMES = ("pi", "trans", "b", "A", "sigma", "L_omega")


def _fit_inputs(fit, posterior):
    """What :func:`state_posterior` and :func:`pointwise_steps` read from an AR-HMM Fit and its
    Posterior: ``(y, num_lags, left_to_right, labels, mask)``, the draws of the HMM's parameter
    sites flattened over chains and draws ``{site: (C * S, ...)}``, and ``(C, S)``."""
    data = posterior.data
    settings = (jnp.asarray(data["y"]), int(data.get("num_lags", 1)),
                bool(data.get("left_to_right", False)), data.get("labels"), data.get("mask"))
    draws = {n: np.asarray(fit.draws(n)) for n in _PARAM_NAMES if n in fit.idata["posterior"]}
    C, S = draws["pi"].shape[:2]
    return settings, {n: v.reshape((C * S,) + v.shape[2:]) for n, v in draws.items()}, (C, S)


def _over_draws(one, y, labels, mask):
    """``one(params, y, labels, mask)`` (one sequence) mapped over a batch of parameter draws,
    and over the sequences of a batched ``y`` ``(B, T, D)`` (with their labels and masks)."""
    if y.ndim == 2:
        return jax.vmap(lambda p: one(p, y, labels, mask))
    seq = jax.vmap(one, in_axes=(None, 0, None if labels is None else 0,
                                 None if mask is None else 0))
    return jax.vmap(lambda p: seq(p, y, labels, mask))


def state_posterior(fit, posterior, num_draws: int = 200) -> dict:
    r"""Posterior of the hidden states from a fit: smoothed marginals and Viterbi paths.

    For ``S = min(num_draws, total draws)`` draws evenly spaced over all chains, the HMM inputs
    are rebuilt by :func:`hmm_inputs` (the same function the model uses) and
    :func:`~bayeslik.filtering.hmm_smoother` / :func:`~bayeslik.filtering.hmm_viterbi` run under
    ``jax.vmap``. Then

    * ``"smoothed"``: :math:`\frac1S \sum_s p(z_t = k \mid y, \theta_s)` ``(T, K)``, the
      posterior marginal state probabilities (integrating over the parameters);
    * ``"viterbi_paths"``: ``(S, T)`` each draw's most likely path;
    * ``"viterbi"``: ``(T,)`` the most frequent state per step among those paths;
    * ``"map_marginal"``: ``(T,)`` ``argmax_k smoothed[t, k]``.

    For a batch (``y`` ``(B, T, D)``) every array gets a ``B`` axis after the draw axis
    (``smoothed`` ``(B, T, K)``, ``viterbi`` ``(B, T)``, ``viterbi_paths`` ``(S, B, T)``).

    >>> out = state_posterior(fit, post)          # doctest: +SKIP
    >>> out["smoothed"].shape, out["viterbi"].shape   # doctest: +SKIP
    """
    (y, num_lags, left_to_right, labels, mask), flat, (C, S) = _fit_inputs(fit, posterior)
    total = C * S
    S = min(int(num_draws), total)
    idx = np.unique(np.linspace(0, total - 1, S).round().astype(int))
    params = {n: jnp.asarray(v[idx]) for n, v in flat.items()}

    def one(p, yy, lab, m):
        li, lt, lo = hmm_inputs(p, yy, num_lags=num_lags, labels=lab, left_to_right=left_to_right)
        return jnp.exp(hmm_smoother(li, lt, lo, mask=m).log_smoothed), hmm_viterbi(li, lt, lo, mask=m)

    smoothed, paths = jax.jit(_over_draws(one, y, labels, mask))(params)
    smoothed, paths = np.asarray(smoothed), np.asarray(paths)
    K = smoothed.shape[-1]
    counts = (paths[..., None] == np.arange(K)).sum(axis=0)  # (..., T, K)
    mean = smoothed.mean(axis=0)
    return {
        "smoothed": mean,
        "viterbi": counts.argmax(axis=-1).astype(np.int32),
        "viterbi_paths": paths,
        "map_marginal": mean.argmax(axis=-1).astype(np.int32),
    }


# --------------------------------------------------------------------------------------------------
# starting values
# --------------------------------------------------------------------------------------------------
def _kmeans_1d(x: np.ndarray, K: int, num_iters: int = 50) -> np.ndarray:
    """Assignments 0..K-1 (in increasing order of the cluster centres) by 1-D k-means."""
    centres = np.quantile(x, (np.arange(K) + 0.5) / K)
    z = np.zeros(len(x), dtype=int)
    for _ in range(num_iters):
        z = np.abs(x[:, None] - centres[None, :]).argmin(axis=1)
        new = np.array([x[z == k].mean() if np.any(z == k) else centres[k] for k in range(K)])
        if np.allclose(new, centres):
            break
        centres = new
    order = np.argsort(centres)
    return np.argsort(order)[z]


def _segment(y: np.ndarray, K: int, max_len: int = 4000) -> np.ndarray:
    """Monotone assignments: the best split of y into K contiguous segments (least squares, DP).

    For long series the DP runs on block means of at most ``max_len`` blocks."""
    T = len(y)
    block = max(1, math.ceil(T / max_len))
    n = math.ceil(T / block)
    x = np.array([y[i * block:(i + 1) * block].mean(axis=0) for i in range(n)])
    c1 = np.concatenate([np.zeros((1, x.shape[1])), np.cumsum(x, axis=0)])
    c2 = np.concatenate([np.zeros(1), np.cumsum((x**2).sum(1))])
    i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")  # segment x[i:j]
    length = np.maximum(j - i, 1)
    seg = c2[j] - c2[i] - ((c1[j] - c1[i]) ** 2).sum(-1) / length
    seg = np.where(j > i, seg, np.inf)
    best = np.full((K + 1, n + 1), np.inf)
    arg = np.zeros((K + 1, n + 1), dtype=int)
    best[0, 0] = 0.0
    for k in range(1, K + 1):
        tot = best[k - 1][:, None] + seg  # (i, j)
        arg[k] = tot.argmin(axis=0)
        best[k] = tot.min(axis=0)
    bounds, j = [], n
    for k in range(K, 0, -1):
        i = arg[k, j]
        bounds.append((i, j))
        j = i
    z = np.zeros(n, dtype=int)
    for k, (i, j) in enumerate(reversed(bounds)):
        z[i:j] = k
    return np.repeat(z, block)[:T]


def init_params(y, num_states: int, num_lags: int = 1, left_to_right: bool = False,
                sticky: float = 10.0, mask=None) -> dict:
    r"""Constrained starting values for NUTS, ``bl.fit(post, "nuts", init=init_params(y, K))``.

    A cheap point estimate: states assigned by 1-D k-means on ``y[:, 0]`` (``left_to_right``: the
    least-squares split of ``y`` into ``K`` contiguous segments, so the assignment is monotone);
    then per state, least squares of ``y_t`` on ``(1, y_{t-1}, ..., y_{t-L})`` for ``b`` and ``A``
    (slightly ridge-regularised; pooled over all steps for a state with too few steps) and the
    residual covariance for ``sigma`` / ``L_omega``; transition rows from the assignment's counts
    plus the prior's concentrations. Unless ``left_to_right`` the states are then sorted by
    ``b[:, 0]`` and ``b0`` made strictly increasing, as the ordering constraint requires.

    Returns a dict with one entry per latent site of :func:`model` (for a batch ``(B, T, D)``,
    the sequences are pooled for the estimate; with a prefix ``mask`` ``(B, T)``, only each
    sequence's valid steps, so padding does not distort it).

    Examples:
        >>> import jax
        >>> data = simulate(jax.random.key(0), num_steps=300, num_states=2)
        >>> p = init_params(data["y"], 2)
        >>> bool(p["b0"][0] < p["b0"][1])
        True
    """
    _check_sizes("init_params", num_states=num_states, num_lags=num_lags)
    y = np.asarray(y, dtype=float)
    if y.ndim not in (2, 3) or 0 in y.shape:
        raise DataError(f"init_params: y must be a non-empty (T, D) or (B, T, D) array, got "
                        f"shape {y.shape}")
    seqs = [y] if y.ndim == 2 else list(y)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool).reshape(len(seqs), -1)
        seqs = [s[: int(m.sum())] for s, m in zip(seqs, mask)]
        if any(len(s) <= num_lags for s in seqs):
            raise DataError(f"init_params: every sequence needs more than num_lags = {num_lags} "
                            "valid steps")
    K, L = int(num_states), int(num_lags)
    D = seqs[0].shape[1]
    zs = []
    for s in seqs:
        zs.append(_segment(s, K) if left_to_right else _kmeans_1d(s[:, 0], K))
    # regression design over all sequences
    X_all, Y_all, Z_all = [], [], []
    for s, z in zip(seqs, zs):
        T = len(s)
        lagged = np.concatenate([s[L - 1 - l : T - 1 - l] for l in range(L)], axis=1)
        X_all.append(np.concatenate([np.ones((T - L, 1)), lagged], axis=1))
        Y_all.append(s[L:])
        Z_all.append(z[L:])
    X, Y, Z = (np.concatenate(a) for a in (X_all, Y_all, Z_all))
    P = X.shape[1]

    def lstsq(Xk, Yk):
        coef = np.linalg.solve(Xk.T @ Xk + 1e-3 * np.eye(P), Xk.T @ Yk)  # (P, D)
        resid = Yk - Xk @ coef
        cov = resid.T @ resid / max(len(Yk) - P, 1) + 1e-6 * np.eye(D)
        return coef, cov

    pooled = lstsq(X, Y)
    b, A = np.zeros((K, D)), np.zeros((K, L, D, D))
    covs = np.zeros((K, D, D))
    for k in range(K):
        sel = Z == k
        coef, cov = lstsq(X[sel], Y[sel]) if sel.sum() >= P + 2 else pooled
        if sel.sum() < P + 2 and sel.any():  # keep the state's level where its steps are few
            coef = coef.copy()
            coef[0] = Y[sel].mean(0) - X[sel].mean(0)[1:] @ coef[1:]
        b[k] = coef[0]
        A[k] = coef[1:].reshape(L, D, D).transpose(0, 2, 1)  # A[k, l] @ y_{t-1-l}
        covs[k] = cov
    A = np.clip(A, -3 * AR_SCALE * 2, 3 * AR_SCALE * 2)
    # transition counts
    counts = np.zeros((K, K))
    first = np.zeros(K)
    for z in zs:
        np.add.at(counts, (z[:-1], z[1:]), 1.0)
        first[z[0]] += 1
    allowed = _allowed(K, left_to_right)
    prior = np.ones((K, K)) + sticky * np.eye(K)
    trans = np.where(allowed, counts + prior, 0.0)
    freq = np.bincount(np.concatenate(zs), minlength=K) + 1.0
    pi = freq / freq.sum()
    if not left_to_right:
        order = np.argsort(b[:, 0], kind="stable")
        b, A, covs = b[order], A[order], covs[order]
        trans, pi = trans[np.ix_(order, order)], pi[order]
        for k in range(1, K):  # strictly increasing
            b[k, 0] = max(b[k, 0], b[k - 1, 0] + 1e-3)
    trans = trans / trans.sum(axis=1, keepdims=True)
    sd = np.sqrt(np.diagonal(covs, axis1=1, axis2=2))  # (K, D)
    out = {"pi": pi, "b0": b[:, 0], "A": A, "sigma": sd}
    if left_to_right:
        for k in range(K - 1):
            out[f"trans_{k}"] = trans[k, k:]
    else:
        out["trans"] = trans
    if D > 1:
        out["b_rest"] = b[:, 1:]
        corr = covs / (sd[:, :, None] * sd[:, None, :])
        out["L_omega"] = np.linalg.cholesky(corr)
    return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}


# --------------------------------------------------------------------------------------------------
# relabelling
# --------------------------------------------------------------------------------------------------
def classification_fn(posterior, num_draws_per_batch: int = 64):
    r"""``prob_fn(draws) -> (S, T, K)`` for Stephens' method of :func:`bayeslik.relabel.relabel`
    on an AR-HMM Fit: each draw's smoothed state marginals :math:`p(z_t = k \mid y, \theta_s)`
    (forward-backward, :func:`~bayeslik.filtering.hmm_smoother`, on the inputs of
    :func:`hmm_inputs`, the same as the model's), for ``posterior``'s data (``y``, ``num_lags``,
    ``labels``, ``mask``), ``num_draws_per_batch`` draws per jitted ``vmap``. Single sequences
    only (``y`` ``(T, D)``).

    ``draws`` is ``{site: (S, ...)}`` constrained values holding ``pi``, ``trans``, ``b``, ``A``,
    ``sigma`` (and ``L_omega`` for ``D > 1``).

    >>> fit2 = bl.relabel(fit, "arhmm", method="stephens",
    ...                   prob_fn=classification_fn(post))    # doctest: +SKIP
    """
    data = posterior.data
    y = jnp.asarray(data["y"])
    if y.ndim != 2:
        raise DataError(f"classification_fn handles one sequence y (T, D); got y of shape "
                        f"{tuple(y.shape)} (a batch): relabel with method='pivot' instead")
    num_lags = int(data.get("num_lags", 1))
    labels, mask = data.get("labels"), data.get("mask")

    @jax.jit
    def probs(params):
        def one(p):
            li, lt, lo = hmm_inputs(p, y, num_lags=num_lags, labels=labels)
            return jnp.exp(hmm_smoother(li, lt, lo, mask=mask).log_smoothed)
        return jax.vmap(one)(params)

    def prob_fn(draws):
        params = {k: jnp.asarray(v) for k, v in draws.items() if k in _PARAM_NAMES}
        S = params["pi"].shape[0]
        B = int(num_draws_per_batch)
        return np.concatenate([np.asarray(probs({k: v[i:i + B] for k, v in params.items()}))
                               for i in range(0, S, B)], axis=0)

    return prob_fn


def _check_relabel(fit) -> None:
    """The ``"arhmm"`` spec's check: a left-to-right model has no label switching."""
    if "trans_0" in fit.idata["posterior"]:
        raise ModelError("a left-to-right AR-HMM's states are identified by its structure; "
                         "it has no label switching to undo")


register_components("arhmm", RELABEL_SPEC, cost_sites=RELABEL_COST_SITES,
                    check_fn=_check_relabel)


#: L-BFGS iterations of :func:`mode_init`. On the C-MAPSS posteriors of the demo (4 stages, 5
#: engines, 25 parameters) and of the notebook (5 stages, 20 engines, 34 parameters) the log
#: density rises from :func:`init_params` by 47.0 and 157.0 nats; iterations 201-300 add 0.13
#: and 1.3 of them (a start need not be the exact mode: NUTS jitters it)
MODE_INIT_STEPS = 300


@partial(jax.jit, static_argnames=("logdensity_fn", "num_steps"))
def _climb(z0, *, logdensity_fn, num_steps: int):
    """``(z_best, logdensity(z_best), logdensity(z0))``: ``num_steps`` L-BFGS iterations (optax,
    zoom line search) on ``-logdensity_fn`` from ``z0``, keeping the best finite point visited
    (a non-finite value counts as ``-inf``, so the line search backs off from it)."""
    import optax

    def loss(z):
        v = -logdensity_fn(z)
        return jnp.where(jnp.isfinite(v), v, jnp.inf)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(carry, _):
        z, state, best_z, best_v = carry
        v, g = value_and_grad(z, state=state)
        ok = jnp.isfinite(v) & jnp.all(jnp.isfinite(g))
        better = ok & (v < best_v)
        best_z, best_v = jnp.where(better, z, best_z), jnp.where(better, v, best_v)
        updates, state = opt.update(jnp.where(ok, g, 0.0), state, z, value=v, grad=g,
                                    value_fn=loss)
        return (optax.apply_updates(z, updates), state, best_z, best_v), None

    v0 = loss(z0)
    (z, state, best_z, best_v), _ = lax.scan(step, (z0, opt.init(z0), z0, v0), None,
                                             length=num_steps)
    v = loss(z)  # the last iterate, not yet compared
    better = v < best_v
    return jnp.where(better, z, best_z), -jnp.where(better, v, best_v), -v0


def mode_init(y, num_states: int, num_lags: int = 1, labels=None, left_to_right: bool = False,
              sticky: float = 10.0, mask=None, num_steps: int = MODE_INIT_STEPS) -> dict:
    r"""The model's default starting point (NUTS's ``init="auto"``): :func:`init_params` refined
    to the posterior mode.

    From the cheap point estimate of :func:`init_params`, ``num_steps`` L-BFGS iterations
    maximise the log density that NUTS samples, ``log p(theta, y) + log|J|`` on the
    unconstrained scale, with the model's own ``labels`` and ``mask``; the best finite point
    reached is returned (the estimate itself if none is better). The posterior of an AR-HMM has
    poorer local modes, e.g. ones where a stage is never used (C-MAPSS FD001 with 5 training
    engines and 4 stages: log densities about 1415 and 1455 against 1501.5 at the main mode),
    and :func:`init_params` alone starts 47 nats below the main mode there: a chain started
    there may settle in a poorer mode, or adapt its step size and mass matrix on the way and mix
    slowly. From the mode every chain starts in the main one (with the engine's jitter). The
    cost is one compile of the optimiser and a few hundred gradient evaluations (L-BFGS, not
    Adam: from the same start on the notebook's 5-stage posterior, 1000 Adam steps stopped 80
    nats lower).

    Arguments are those of :func:`model` (``num_steps``: the L-BFGS iterations). Returns
    ``{latent site: constrained value}``.

    Examples:
        >>> import jax, bayeslik as bl
        >>> data = simulate(jax.random.key(0), num_steps=200, num_states=2)
        >>> post = bl.Posterior(model, y=data["y"], num_states=2)
        >>> lp = lambda p: float(post.logdensity(post.unconstrain(p)))
        >>> bool(lp(mode_init(data["y"], 2)) > lp(init_params(data["y"], 2)))
        True
    """
    import bayeslik as bl

    _check_sizes("mode_init", num_steps=num_steps)
    point = init_params(y, num_states, num_lags=num_lags, left_to_right=left_to_right,
                        sticky=sticky, mask=mask)
    post = bl.Posterior(model, y=y, num_states=num_states, num_lags=num_lags, labels=labels,
                        left_to_right=left_to_right, sticky=sticky, mask=mask)
    z0 = post.unconstrain(point)
    z, lp, lp0 = _climb(z0, logdensity_fn=post.logdensity, num_steps=int(num_steps))
    if not bool(jnp.isfinite(lp)) or not float(lp) > float(lp0):
        return point
    values = post.constrain(z)
    return {n: np.asarray(values[n]) for n in post.latent_names}


def _default_init(y, num_states: int, num_lags: int = 1, labels=None, left_to_right: bool = False,
                  sticky: float = 10.0, mask=None) -> dict:
    """The model's default starting point (``init="auto"``): :func:`mode_init` on its data.
    Without a model-provided start, chains started uniformly in [-2, 2] land in different modes
    (arhmm.example(): R-hat 1.73); from :func:`init_params` alone a C-MAPSS chain could still
    settle in a poorer mode (see :func:`mode_init`)."""
    return mode_init(y, num_states, num_lags=num_lags, labels=labels,
                     left_to_right=left_to_right, sticky=sticky, mask=mask)


set_default_init(model, _default_init)


# --------------------------------------------------------------------------------------------------
# one-step-ahead terms and the choice of the number of states
# --------------------------------------------------------------------------------------------------
def step_loglik(params: dict, y, *, num_lags: int = 1, labels=None, left_to_right: bool = False,
                mask=None) -> jax.Array:
    r"""``(T,)`` the one-step-ahead log predictive densities :math:`c_t = \log p(y_t \mid y_{<t},
    \theta)` of one sequence, from the forward filter on :func:`hmm_inputs`:
    :math:`c_t = \log \sum_j p(z_t = j \mid y_{<t}) \exp \text{log\_obs}[t, j]` with the predicted
    state probabilities :math:`p(z_t \mid y_{<t}) = \sum_i p(z_{t-1} = i \mid y_{<t})
    P_{ij}` (``pi`` at ``t = 0``). ``c_t = 0`` on masked steps and for ``t < L`` (no density
    there; with ``labels``, ``c_t`` is there the log of the predicted probability of the labels),
    so ``step_loglik(...).sum()`` is the model's log-likelihood (the same as ``hmm_loglik``).

    These terms are the pointwise log-likelihood that :func:`choose_states` gives PSIS-LOO.

    >>> import jax
    >>> data = simulate(jax.random.key(0), num_steps=50, num_states=2)
    >>> c = step_loglik(data["params"], data["y"])
    >>> c.shape, float(c[0])
    ((50,), 0.0)
    """
    from bayeslik.filtering import hmm_filter

    li, lt, lo = hmm_inputs(params, y, num_lags=num_lags, labels=labels,
                            left_to_right=left_to_right)
    filt = hmm_filter(li, lt, lo, mask=mask).log_filtered  # (T, K)
    pred_rest = jax.nn.logsumexp(filt[:-1, :, None] + lt[None], axis=1)  # (T-1, K)
    pred = jnp.concatenate([li[None], pred_rest], axis=0)
    c = jax.nn.logsumexp(pred + lo, axis=1)  # 0 for t < L without labels (log_obs = 0 there)
    if mask is not None:
        c = jnp.where(jnp.asarray(mask, bool), c, 0.0)
    return c


def pointwise_steps(fit, posterior, num_draws_per_batch: int = 256) -> np.ndarray:
    r"""``(chains, draws, N)``: every draw's one-step-ahead log predictive density
    :math:`\log p(y_t \mid y_{<t}, \theta)` (:func:`step_loglik`) at each of the ``N`` steps that
    have a density (``t >= num_lags``, the valid steps under ``mask``; for a batch the sequences'
    steps one after the other), for ``posterior``'s data. Their sum over the steps is each
    draw's log-likelihood (with ``labels``, less the label terms of the first ``num_lags``
    steps, which concern no observation)."""
    (y, num_lags, ltr, labels, mask), flat, (C, S) = _fit_inputs(fit, posterior)

    def one(p, yy, lab, m):
        return step_loglik(p, yy, num_lags=num_lags, labels=lab, left_to_right=ltr, mask=m)

    fn = jax.jit(_over_draws(one, y, labels, mask))
    B = int(num_draws_per_batch)
    out = np.concatenate([np.asarray(fn({n: jnp.asarray(v[i:i + B]) for n, v in flat.items()}))
                          for i in range(0, C * S, B)], axis=0)  # (C*S, [B,] T)
    T = y.shape[-2]
    valid = np.broadcast_to(np.arange(T) >= num_lags, y.shape[:-1]).copy()
    if mask is not None:
        valid &= np.asarray(mask, bool).reshape(y.shape[:-1])
    out = out.reshape(C * S, -1)[:, valid.reshape(-1)]
    return out.reshape(C, S, -1)


def _loo_steps(fit, posterior) -> tuple[dict, np.ndarray]:
    """PSIS-LOO over the one-step-ahead terms: ({elpd_loo, elpd_loo_se, p_loo, pareto_k_max},
    elpd_i (N,))."""
    import warnings

    import arviz_stats as azs
    import xarray as xr

    ll = pointwise_steps(fit, posterior)
    C, S, N = ll.shape
    coords = {"chain": np.arange(C), "draw": np.arange(S)}
    tree = xr.DataTree.from_dict({
        "posterior": xr.Dataset({"loglik": (("chain", "draw"), ll.sum(-1))}, coords=coords),
        "log_likelihood": xr.Dataset({"y_step": (("chain", "draw", "step"), ll)},
                                     coords={**coords, "step": np.arange(N)}),
    })
    with warnings.catch_warnings():  # a large Pareto k is reported in the table, not hidden
        warnings.simplefilter("ignore")
        res = azs.loo(tree, pointwise=True, var_name="y_step")
    return ({"elpd_loo": float(res.elpd), "elpd_loo_se": float(res.se), "p_loo": float(res.p),
             "pareto_k_max": float(np.max(np.asarray(res.pareto_k)))},
            np.asarray(res.elpd_i, float).reshape(-1))


def choose_states(y, ks=(1, 2, 3), engine: str = "smc", criterion: str = "both", *,
                  seed: int = 0, model_kwargs: dict | None = None, return_fits: bool = False,
                  **engine_options):
    r"""Fit the AR-HMM for each number of states ``K`` in ``ks`` with one engine and tabulate the
    evidence and LOO (as :func:`bayeslik.models.mixture.choose_k` does for mixtures).

    ``engine`` is any name (or config) ``bl.fit`` accepts, ``engine_options`` go to it, and
    ``model_kwargs`` to :func:`model` (``num_lags``, ``left_to_right``, ``sticky``, ``mask``;
    not ``labels``, whose width is the number of states). NUTS starts from the model's default
    init (:func:`mode_init`). Criteria:

    * ``"evidence"``: :math:`\log Z_K \pm` its standard error, from engines that estimate it
      (``"smc"``, ``"nss"``, ``"nested"``); the posterior probability of ``K`` under a uniform
      prior over ``ks`` is :math:`\propto Z_K` (column ``p_k``);
    * ``"loo"``: PSIS-LOO over the one-step-ahead terms :math:`\log p(y_t \mid y_{<t}, \theta)`
      (:func:`pointwise_steps`; the model's own pointwise log-likelihood is one value per
      sequence, too few for LOO). Leaving out the term of step ``t`` is an approximation of
      leaving out ``y_t`` (whose value also conditions the later terms); ``elpd_loo`` estimates
      the sum over steps of the log predictive density of :math:`y_t` given the past;
      ``elpd_diff``, ``se_diff`` against the best ``K`` from the pointwise differences, and the
      largest Pareto k (above 0.7 the estimate is unreliable);
    * ``"both"``: whatever the engine gives.

    Returns a pandas DataFrame indexed by ``K`` (columns ``log_evidence``,
    ``log_evidence_err``, ``p_k``, ``elpd_loo``, ``elpd_loo_se``, ``elpd_diff``, ``se_diff``,
    ``p_loo``, ``pareto_k_max``, ``wall_s``, ``flags``: the number of flags the Fit carries). Its
    ``attrs`` hold ``best_evidence`` (largest :math:`\log Z`) and ``best_loo``, the *smallest*
    ``K`` whose ``elpd_loo`` is within ``2 se_diff`` of the best (an extra state that is
    barely used costs LOO almost nothing). With ``return_fits=True``, ``(table, {K: Fit})``.
    On :func:`example` (2 states) SMC and LOO both choose 2 (the numbers are in
    ``docs/arhmm.md``).

    >>> table = choose_states(y, [1, 2, 3], engine="smc", num_particles=500)   # doctest: +SKIP
    >>> table.attrs["best_evidence"], table.attrs["best_loo"]                  # doctest: +SKIP
    (2, 2)
    """
    import time


    import bayeslik as bl

    if criterion not in ("evidence", "loo", "both"):
        raise OptionError(f"choose_states: criterion must be 'evidence', 'loo' or 'both', got "
                          f"{criterion!r}")
    try:
        ks = [int(k) for k in ks]
    except (TypeError, ValueError):
        raise OptionError(f"choose_states: ks must be a list of positive ints, got {ks!r}") from None
    if not ks or min(ks) < 1 or len(set(ks)) != len(ks):
        raise OptionError(f"choose_states: ks must be a non-empty list of distinct positive ints, "
                          f"got {ks!r}")
    kw = dict(model_kwargs or {})
    if "num_states" in kw or "labels" in kw:
        raise OptionError("choose_states: model_kwargs may not hold 'num_states' (ks gives it) or "
                          "'labels' (their width is the number of states)")
    rows, fits, elpd_i = [], {}, {}
    for K in ks:
        post = bl.Posterior(model, y=y, num_states=K, **kw)
        t0 = time.perf_counter()
        fit = bl.fit(post, engine, seed=seed, **engine_options)
        row = {"K": K, "wall_s": time.perf_counter() - t0, "flags": len(fit.flags)}
        if criterion in ("evidence", "both"):
            row["log_evidence"] = fit.log_evidence
            row["log_evidence_err"] = fit.log_evidence_err
        if criterion in ("loo", "both"):
            loo, elpd_i[K] = _loo_steps(fit, post)
            row.update(loo)
        rows.append(row)
        fits[K] = fit
    table = model_choice_table(rows, elpd_i, criterion, engine, "choose_states")
    return (table, fits) if return_fits else table
