r"""Particle marginal Metropolis-Hastings ("pmmh"): Bayesian inference for state-space models
whose likelihood is intractable, with a particle filter's unbiased likelihood estimate in place
of the likelihood (Andrieu, Doucet & Holenstein, 2010).

The target is :math:`p(\theta \mid y) \propto p(\theta)\, p_\theta(y)` on the unconstrained
parameter vector ``z``. Each iteration proposes :math:`z' = z + \lambda L \varepsilon` (a Gaussian
random walk), runs a particle filter at :math:`\theta' = \mathrm{constrain}(z')` for
:math:`\hat p_{\theta'}(y)`, and accepts with probability

.. math::

    \min\Big(1, \frac{p(z')\, \hat p_{\theta'}(y)}{p(z)\, \hat p_{\theta}(y)}\Big),

where :math:`p(z)` includes the Jacobian of the constraining map (``logprior`` of the prior
program). The
chain's invariant distribution is exactly the posterior, whatever the number of particles; the
number of particles only changes how well the chain mixes.

**Correlated pseudo-marginal** (``correlated=True``, Deligiannidis, Doucet & Pitt, 2018): all
the filter's randomness is a vector ``u`` of standard normals (see
:func:`bayeslik.filtering.particle.draw_noise`), carried in the chain's state and moved with the
parameters by the Crank-Nicolson step :math:`u' = \rho u + \sqrt{1-\rho^2}\,\xi`, which leaves
:math:`N(0, I)` invariant. The estimates at :math:`\theta` and :math:`\theta'` are then strongly
correlated, the variance of the log ratio falls, and far fewer particles are needed.

**Adaptation** (warmup only; the kept draws use a fixed kernel): a Robbins-Monro update of
:math:`\log\lambda` toward ``target_accept`` at every warmup iteration and, from the middle of
warmup on, :math:`L L^\top` = the empirical covariance of the chain's warmup draws since its first
quarter (Haario et al.'s adaptive Metropolis), per chain.

How a model is given: :class:`~bayeslik.statespace.StateSpacePosterior` (a NumPyro program
holding the *prior* of the parameters, plus the state-space model and the observations; the
engine is registered with ``accepts=StateSpacePosterior``).

The algorithm, blackjax style: :func:`init` ``(rng_key, z, ys, posterior, config) ->
PMMHState`` and :func:`build_kernel` ``(posterior, config) -> kernel(rng_key, state, ys, adapt,
num_switch, num_burn) -> (PMMHState, PMMHInfo)``; :func:`run` vmaps them over chains, scans the
kernel in chunks and builds the Fit on :mod:`bayeslik.engines.kit`.

Example
-------
>>> import jax, numpy as np, numpyro, numpyro.distributions as dist, bayeslik as bl
>>> from bayeslik.filtering import particle
>>> from bayeslik.engines import pmmh
>>> def prior():
...     numpyro.sample("phi", dist.Uniform(-1, 1))
>>> def params_fn(v):   # constrained values -> the state-space model's params
...     return {"mu": -1.0, "phi": v["phi"], "sigma": 0.3}
>>> ys = np.random.default_rng(0).normal(size=50) * 0.6
>>> post = bl.StateSpacePosterior(prior, particle.stochastic_volatility_ssm(), ys,
...                               params_fn=params_fn)
>>> fit = bl.fit(post, "pmmh", num_samples=200, num_warmup=200, num_chains=2,
...              num_particles=50, progress_bar=False)                      # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bayeslik.engines import kit
from bayeslik.errors import EngineError, InitializationError, ModelError
from bayeslik.filtering import particle as _pf
from bayeslik.fit import Fit
from bayeslik.statespace import StateSpacePosterior

__all__ = ["PMMH", "PMMHConfig", "PMMHState", "PMMHInfo", "StateSpacePosterior", "init",
           "build_kernel", "run"]


# =========================================================================== the config
@dataclass(frozen=True)
class PMMHConfig:
    """Settings of the "pmmh" engine (see the module docstring and docs/engines/pmmh.md).

    >>> PMMHConfig(num_particles=200, rho=0.95).correlated
    True
    >>> PMMHConfig(rho=1.0)
    Traceback (most recent call last):
    ...
    bayeslik.errors.EngineError: PMMH option rho=1.0: must lie in [0, 1) (the Crank-Nicolson correlation of the filter's noise; 0.99 is typical).
    """

    num_samples: int = 1000
    num_warmup: int = 1000
    num_chains: int = 4
    num_particles: int = 100
    method: str = "bootstrap"
    resampling: str = "systematic"
    ess_threshold: float = 0.5
    correlated: bool = True
    rho: float = 0.99
    target_accept: float = 0.2
    initial_scale: float = 0.1
    init: Any = "prior"
    num_init_tries: int = 20
    num_variance_checks: int = 20
    progress_bar: bool = True
    chunk_size: int = 50

    def __post_init__(self) -> None:
        (kit.Check("PMMH", self)
         .integer("num_samples", "num_chains", "num_particles", "num_init_tries", "chunk_size")
         .integer("num_warmup", "num_variance_checks", minimum=0)
         .choice("method", _pf.METHODS)
         .choice("resampling", _pf.RESAMPLING)
         .number("ess_threshold", low=0.0, high=1.0, low_open=False, high_open=False,
                 hint="0: never resample, 1: at every step")
         .number("rho", low=0.0, high=1.0, low_open=False,
                 hint="the Crank-Nicolson correlation of the filter's noise; 0.99 is typical")
         .number("target_accept", low=0.0, high=1.0,
                 hint="0.07-0.25 is usual for pseudo-marginal chains")
         .number("initial_scale", low=0.0)
         .require(isinstance(self.init, Mapping) or (isinstance(self.init, str)
                                                     and self.init == "prior"),
                  "init", "must be 'prior' or a dict {site: constrained value}."))


PMMH = PMMHConfig


# =========================================================================== the kernel
class PMMHState(NamedTuple):
    """One chain: position ``z``, its log prior and log-likelihood estimate, the filter's noise
    ``u`` (correlated; a 0-d placeholder otherwise) and the adaptation: running mean/scatter of
    the draws, their count, the log step scale and the proposal's Cholesky factor."""

    z: jax.Array
    logprior: jax.Array
    loglik: jax.Array
    u: Any
    mean: jax.Array
    scatter: jax.Array
    count: jax.Array
    log_scale: jax.Array
    chol: jax.Array


class PMMHInfo(NamedTuple):
    """One iteration: ``acceptance_rate`` = min(1, alpha), ``accepted``, the proposal's
    log-likelihood estimate (-inf where its log prior is not finite: no filter counts there),
    its log prior, ``proposal_num_nonfinite`` (int32: how many of its filter's particle log
    densities were NaN or +inf and got zero weight, ``PFResult.num_nonfinite_total``; 0 where
    its log prior is not finite) and ``proposal_position`` (``z'``, unconstrained)."""

    acceptance_rate: jax.Array
    accepted: jax.Array
    proposal_loglikelihood: jax.Array
    proposal_logprior: jax.Array = None
    proposal_num_nonfinite: jax.Array = None
    proposal_position: jax.Array = None


def _loglik_fn(posterior: StateSpacePosterior, config: PMMHConfig) -> Callable:
    """``(z, noise, ys) -> (log p-hat(ys | params(z)), num_nonfinite)`` (NaN -> -inf;
    num_nonfinite: the filter's NaN / +inf particle log densities)."""
    fn = _pf.log_likelihood_fn(posterior.ssm, config.num_particles, method=config.method,
                               resampling=config.resampling, ess_threshold=config.ess_threshold,
                               correlated=config.correlated, count_nonfinite=True)
    return lambda z, noise, ys: fn(posterior.params(z), ys, noise)


def _init(rng_key, z, ys, posterior, config) -> tuple[PMMHState, jax.Array]:
    """:func:`init` and its filter's count of NaN / +inf particle log densities (0 where the
    log prior is not finite)."""
    ssm, N, T, d = posterior.ssm, config.num_particles, posterior.num_steps, posterior.ndim
    noise = _pf.draw_noise(rng_key, ssm, T, N) if config.correlated else rng_key
    ll, num_bad = _loglik_fn(posterior, config)(z, noise, ys)
    lp = posterior.logprior(z)
    state = PMMHState(
        z, lp, ll, noise if config.correlated else jnp.zeros(()),
        jnp.zeros(d), jnp.zeros((d, d)), jnp.zeros((), jnp.int32), jnp.zeros(()),
        float(config.initial_scale) * jnp.eye(d))
    return state, jnp.where(jnp.isfinite(lp), num_bad, 0)


def init(rng_key: jax.Array, z: jax.Array, ys: Any, posterior: StateSpacePosterior,
         config: PMMHConfig) -> PMMHState:
    """The chain at the unconstrained point ``z``: one particle filter on ``ys`` (the
    posterior's or others of the same shapes) with fresh noise ``u`` drawn from ``rng_key``
    when correlated (else ``rng_key`` is the filter's key). Jittable and vmappable.

    >>> state = init(jax.random.key(0), z0, post.ys, post, PMMHConfig())  # doctest: +SKIP
    """
    return _init(rng_key, z, ys, posterior, config)[0]


def build_kernel(posterior: StateSpacePosterior, config: PMMHConfig) -> Callable:
    r"""PMMH's transition for ``posterior`` with ``config``'s static settings:
    ``kernel(rng_key, state, ys, adapt, num_switch, num_burn) -> (PMMHState, PMMHInfo)``, one
    iteration. With ``adapt`` (a bool, traced) the step scale and the proposal covariance are
    adapted: draws from the ``num_burn``-th adapted iteration on are collected, and from the
    ``num_switch``-th on the proposal follows their covariance. Jittable and vmappable.

    >>> kernel = build_kernel(post, PMMHConfig())                             # doctest: +SKIP
    >>> state, info = kernel(jax.random.key(1), state, post.ys, False, 0, 0)  # doctest: +SKIP
    """
    ssm, N, T = posterior.ssm, config.num_particles, posterior.num_steps
    d = posterior.ndim
    rho = float(config.rho)
    target = float(config.target_accept)
    loglik = _loglik_fn(posterior, config)

    def kernel(rng_key, state: PMMHState, ys, adapt, num_switch, num_burn):
        k_prop, k_noise, k_acc = jax.random.split(rng_key, 3)
        z_new = state.z + jnp.exp(state.log_scale) * (state.chol @ jax.random.normal(k_prop, (d,)))
        if config.correlated:
            xi = _pf.draw_noise(k_noise, ssm, T, N)
            noise = jax.tree.map(lambda a, b: rho * a + math.sqrt(1 - rho ** 2) * b, state.u, xi)
        else:
            noise = k_noise
        lp_new = posterior.logprior(z_new)
        ll_filter, num_bad = loglik(z_new, noise, ys)
        ll_new = jnp.where(jnp.isfinite(lp_new), ll_filter, -jnp.inf)
        num_bad = jnp.where(jnp.isfinite(lp_new), num_bad, 0)
        log_alpha = lp_new + ll_new - state.logprior - state.loglik
        log_alpha = jnp.where(jnp.isnan(log_alpha), -jnp.inf, log_alpha)
        alpha = jnp.exp(jnp.minimum(log_alpha, 0.0))
        accept = jnp.log(jax.random.uniform(k_acc)) < log_alpha
        z = jnp.where(accept, z_new, state.z)
        new = state._replace(
            z=z, logprior=jnp.where(accept, lp_new, state.logprior),
            loglik=jnp.where(accept, ll_new, state.loglik),
            u=(jax.tree.map(lambda a, b: jnp.where(accept, a, b), noise, state.u)
               if config.correlated else state.u))
        # adaptation (warmup only): Robbins-Monro on the log scale, Welford on the draws
        it = state.count.astype(jnp.float32)
        gamma = jnp.minimum(1.0, 5.0 * (it + 1.0) ** -0.6)
        log_scale = jnp.where(adapt, state.log_scale + gamma * (alpha - target), state.log_scale)
        collect = adapt & (state.count >= num_burn)
        k = (state.count - num_burn + 1).astype(jnp.float32)
        delta = z - state.mean
        mean = jnp.where(collect, state.mean + delta / jnp.maximum(k, 1.0), state.mean)
        scatter = jnp.where(collect, state.scatter + jnp.outer(delta, z - mean), state.scatter)
        cov = scatter / jnp.maximum(k - 1.0, 1.0)
        cov = 0.5 * (cov + cov.T) + 1e-6 * jnp.eye(d)
        chol_emp = jnp.linalg.cholesky(cov)
        ok = jnp.all(jnp.isfinite(chol_emp))
        switch = adapt & (state.count + 1 == num_switch) & ok
        # at the switch the scale restarts at the random-walk optimum for a Gaussian target,
        # and from then on (in warmup) the proposal follows the running covariance
        log_scale = jnp.where(switch, jnp.log(2.38 / math.sqrt(d)), log_scale)
        follow = adapt & (state.count + 1 >= num_switch) & ok
        chol = jnp.where(follow, chol_emp, state.chol)
        new = new._replace(mean=mean, scatter=scatter,
                           count=state.count + jnp.asarray(adapt, jnp.int32),
                           log_scale=log_scale, chol=chol)
        return new, PMMHInfo(alpha, accept, ll_new, lp_new, num_bad, z_new)

    return kernel


class _Programs(kit.Programs):
    """The compiled functions of one (posterior, static settings)."""

    def __init__(self, posterior: StateSpacePosterior, config: PMMHConfig):
        super().__init__()
        kernel = build_kernel(posterior, config)

        def evaluate(z, key, ys):
            state, num_bad = _init(key, z, ys, posterior, config)
            return state.logprior, state.loglik, state.u, num_bad

        def evaluate_many(zs, keys, ys):
            """(log prior, log-likelihood estimate, noise, the filter's NaN / +inf particle
            log densities) at each row of zs (M, d)."""
            return jax.vmap(evaluate, in_axes=(0, 0, None))(zs, keys, ys)

        def chunk(states, key_data, offset, length_active, adapt, num_switch, num_burn, ys):
            def one(state, kd):
                key = jax.random.wrap_key_data(kd)
                steps = offset + jnp.arange(length_active.shape[0])
                keys = jax.vmap(lambda s: jax.random.fold_in(key, s))(steps)

                def body(s, inp):
                    k, active = inp
                    s2, info = kernel(k, s, ys, adapt & active, num_switch, num_burn)
                    s2 = jax.tree.map(lambda a, b: jnp.where(active, a, b), s2, s)
                    return s2, (info, s2.z, s2.logprior, s2.loglik)

                return jax.lax.scan(body, state, (keys, length_active))

            return jax.vmap(one)(states, key_data)

        self._fns = {
            "evaluate": jax.jit(evaluate_many),
            "chunk": jax.jit(chunk),
            "constrain": jax.jit(jax.vmap(posterior.constrain)),
        }


_CACHE = kit.ProgramCache(16)


def _programs(posterior: StateSpacePosterior, config: PMMHConfig) -> _Programs:
    static = (config.num_particles, config.method, config.resampling, config.correlated,
              float(config.rho), float(config.target_accept), float(config.ess_threshold),
              config.num_variance_checks)
    key = (posterior.cache_key, static)
    return _CACHE.get(key, lambda: _Programs(posterior, config))


# =========================================================================== the run
def _check(posterior: StateSpacePosterior, config: PMMHConfig) -> None:
    """The filter's options against the posterior's ssm, before anything is compiled (the
    posterior's kind is checked by ``bl.fit``, from the registry)."""
    check = kit.Check("PMMH", config)
    try:
        _pf.check_filter_options(posterior.ssm, config.num_particles, config.method,
                                 config.resampling, config.ess_threshold)
    except (EngineError, ModelError) as e:
        raise check.error("method", f"{e}.") from e
    try:
        _pf.check_filter_options(posterior.ssm, config.num_particles, config.method,
                                 config.resampling, config.ess_threshold, correlated=config.correlated)
    except ModelError as e:
        raise check.error("correlated", f"{e}. With correlated=True the state-space model must "
                          "be reparametrised (init_transform_fn, transition_transform_fn, "
                          "noise_shape); pass correlated=False otherwise.") from e
    if config.init == "prior":
        posterior.require_proper_prior("pmmh with init='prior' (its starting points)")


def _start(progs: _Programs, posterior: StateSpacePosterior, config: PMMHConfig,
           k_cand: jax.Array, k_init: jax.Array, counts: dict | None = None) -> PMMHState:
    """Each chain's state at the best of ``num_init_tries`` candidates (from the prior or about
    ``init``), by log prior + log-likelihood estimate; one batch of C x R filters."""
    C, R, d = config.num_chains, config.num_init_tries, posterior.ndim
    if isinstance(config.init, Mapping):
        z0 = np.asarray(posterior.unconstrain(config.init))
        cands = (z0 + 0.01 * np.asarray(jax.random.normal(k_cand, (C, R, d)))).astype(np.float32)
    else:
        cands = np.asarray(posterior.sample_prior(k_cand, C * R)).reshape(C, R, d)
    M = C * R
    lp, ll, noise, num_bad = progs("evaluate", jnp.asarray(cands.reshape(M, d)),
                                   jax.random.split(k_init, M), posterior.ys)
    score = np.asarray(lp + ll).reshape(C, R)
    score = np.where(np.isfinite(score), score, -np.inf)
    num_ok = np.isfinite(score).sum(axis=1)
    if np.any(num_ok == 0):
        bad = int(np.argmin(num_ok))
        where = "<given point>" if isinstance(config.init, Mapping) else repr(config.init)
        raise InitializationError(
            f"pmmh: chain {bad} found no starting point with a finite log prior and "
            f"log-likelihood estimate in {R} tries (init={where}). "
            "Give init={site: value} near the posterior, raise num_init_tries or num_particles, "
            "or check that the state-space model's observation log-density is finite.")
    best = np.arange(C) * R + score.argmax(axis=1)
    if counts is not None:  # the candidates' NaN / +inf log-likelihood estimates and log priors
        _count_nonfinite(counts, np.asarray(ll), np.asarray(lp), cands.reshape(M, d),
                         np.asarray(num_bad))
    return PMMHState(
        jnp.asarray(cands.reshape(M, d)[best]), lp[best], ll[best],
        jax.tree.map(lambda a: a[best], noise) if config.correlated else jnp.zeros(C),
        jnp.zeros((C, d)), jnp.zeros((C, d, d)), jnp.zeros(C, jnp.int32), jnp.zeros(C),
        jnp.broadcast_to(float(config.initial_scale) * jnp.eye(d), (C, d, d)))


def _count_nonfinite(counts: dict, ll: np.ndarray, lp: np.ndarray, zs=None,
                     num_bad: np.ndarray | None = None) -> None:
    """Add a batch of evaluations (rows of ``ll``) to ``counts``: the log-likelihood
    evaluations that were not clean (where the log prior is finite: elsewhere no filter runs),
    i.e. an estimate that was NaN or +inf or a filter that met ``num_bad`` > 0 NaN / +inf
    particle log densities (it gave them zero weight); the sum of ``num_bad``; the NaN / +inf
    log priors. Keep the first point ``zs`` (rows as ``ll``) of an unclean evaluation,
    preferring one whose filter met non-finite particle densities."""
    ok_lp = np.isfinite(lp)
    bad_est = kit.nonfinite_mask(ll) & ok_lp
    bad_dens = (np.zeros(np.shape(ll), bool) if num_bad is None
                else (np.asarray(num_bad) > 0) & ok_lp)
    bad_ll = bad_est | bad_dens
    counts["loglikelihood"] = counts.get("loglikelihood", 0) + int(bad_ll.sum())
    counts["logprior"] = counts.get("logprior", 0) + int(kit.nonfinite_mask(lp).sum())
    counts["checked"] = counts.get("checked", 0) + int(np.size(ll))
    if num_bad is not None:
        counts["particle_densities"] = (counts.get("particle_densities", 0)
                                        + int(np.where(ok_lp, num_bad, 0).sum()))
    if zs is None:
        return
    zs = np.asarray(zs).reshape(np.shape(ll) + (-1,))
    if bad_dens.any() and counts.get("density_point") is None:
        counts["density_point"] = zs[np.unravel_index(np.argmax(bad_dens), bad_dens.shape)]
    if bad_est.any() and counts.get("point") is None:
        counts["point"] = zs[np.unravel_index(np.argmax(bad_est), bad_est.shape)]


def _densities(config: Any) -> str:
    """The functions of the state-space model that make the filter's particle log weights."""
    method = getattr(config, "method", None)
    if method == "bootstrap":
        return "observation log density (observation_logdensity_fn)"
    if method == "guided":
        return "observation, transition or proposal log density"
    return "observation, transition, proposal or look-ahead log density"


def _at(run: kit.Run, z: np.ndarray) -> str:
    values = jax.jit(run.posterior.constrain)(jnp.asarray(z))
    return ", ".join(f"{n}={np.asarray(values[n], np.float64).round(3).tolist()}"
                     for n in run.posterior.latent_names[:6])


def _nonfinite_extra(run: kit.Run, counts: dict) -> dict:
    """Cost.extra's counts of NaN / +inf log-likelihood evaluations (estimates, and filters that
    met NaN / +inf particle log densities) and log priors (starting candidates and proposals),
    flagged: a prior site where the prior made them, else the state-space model's densities in
    the particle filter or its estimate, at the first point where one was."""
    num_dens = int(counts.get("particle_densities", 0))
    if num_dens:
        where = (f"the state-space model's {_densities(run.config)} in the particle filter: "
                 f"{num_dens} particle log weights were NaN or +inf in all, each given zero "
                 "weight"
                 + (f"; one filter with them ran at {_at(run, counts['density_point'])}"
                    if counts.get("density_point") is not None else ""))
    else:
        where = "the particle filter's log-likelihood estimate"
        if counts.get("point") is not None:
            where += " at " + _at(run, counts["point"])
    return {**run.nonfinite(counts.get("loglikelihood", 0), counts.get("checked", 0),
                            what="log-likelihood", where=where),
            **run.nonfinite(counts.get("logprior", 0), counts.get("checked", 0),
                            what="log prior"),
            "num_nonfinite_particle_densities": num_dens}


def _adaptation_schedule(num_warmup: int, d: int) -> tuple[int, int]:
    """(num_burn, num_switch): collect the draws from a quarter of warmup on, follow their
    covariance from half of it on (never, when that leaves too few draws to estimate it)."""
    num_burn, num_switch = num_warmup // 4, num_warmup // 2
    if num_switch - num_burn < max(2 * d, 10):
        num_switch = num_warmup + 1
    return num_burn, num_switch


def _phase(progs, box, keys, total, adapt, schedule, config, ys, sink, bar):
    """Run ``total`` iterations of every chain from ``box["states"]`` in chunks of
    ``config.chunk_size`` (a fixed length: runs of other lengths reuse the compiled chunk; the
    last is padded with inactive iterations), appending each chunk's (info, z, logprior,
    loglik) to ``sink`` and keeping the chains' states in ``box`` (so an interrupt keeps both)."""
    num_burn, num_switch = schedule
    length = config.chunk_size
    for i in range(math.ceil(total / length)):
        k = min(length, total - i * length)
        box["states"], out = progs("chunk", box["states"], keys, np.int32(i * length), np.arange(length) < k,
                            np.bool_(adapt), np.int32(num_switch), np.int32(num_burn), ys)
        sink.append(jax.tree.map(lambda a: np.asarray(a)[:, :k], out))
        bar.update(k * config.num_chains)
        bar.set_postfix(accept=f"{np.mean(np.concatenate([o[0].accepted for o in sink], 1)):.2f}")


def _constrained(progs: _Programs, zs: np.ndarray, block: int = 1024) -> dict:
    """{site: (C, S, ...)} constrained values of the draws zs (C, S, d), in fixed blocks of
    rows (one compile whatever the number of draws) written into arrays allocated once. (A
    particle filter gives no pointwise log-likelihood: the Fit has no log_likelihood group.)"""
    C, S, d = zs.shape
    values = progs.map_into("constrain", zs.reshape(-1, d), smallest=block, largest=block,
                            fill=0.0)
    return {k: v.reshape((C, S) + v.shape[1:]) for k, v in values.items()}


def _loglik_sd(progs, posterior, config, z_mean, k_var) -> tuple[float | None, int]:
    """(sd of the log-likelihood estimate at ``z_mean`` over ``num_variance_checks`` filters,
    or None, and the number of filters run, in batches of C x R): the number to tune N by."""
    M = config.num_chains * config.num_init_tries
    if config.num_variance_checks <= 1:
        return None, 0
    lls, n = [], math.ceil(config.num_variance_checks / M)
    for i in range(n):
        keys = jax.random.split(jax.random.fold_in(k_var, i), M)
        lls.append(np.asarray(progs("evaluate", jnp.broadcast_to(z_mean, (M, z_mean.shape[0])),
                                    keys, posterior.ys)[1]))
    lls = np.concatenate(lls)[:config.num_variance_checks]
    return (float(np.std(lls, ddof=1)) if np.all(np.isfinite(lls)) else float("inf")), n * M


def _flag(run: kit.Run, accepted: np.ndarray, ll_sd: float | None, config: PMMHConfig) -> None:
    rate = float(accepted.mean())
    if rate < 0.05:
        run.flag(f"low acceptance: {rate:.3f} of proposals accepted after warmup (aim for "
                 "0.07-0.25); raise num_particles (or rho with correlated=True) or num_warmup")
    stuck = np.flatnonzero(accepted.mean(axis=1) < 0.01)
    if stuck.size:
        run.flag(f"chain(s) {stuck.tolist()} accepted under 1% of proposals: they may be "
                 "stuck where the likelihood was overestimated; raise num_particles")
    if ll_sd is not None and ll_sd > (3.0 if config.correlated else 2.0):
        run.flag(f"the log-likelihood estimate has sd {ll_sd:.2f} at the posterior mean (aim "
                 f"for about {'1-3 with correlated filters' if config.correlated else '1-1.7'});"
                 " raise num_particles")


def run(posterior: StateSpacePosterior, rng_key: jax.Array, config: PMMHConfig) -> Fit:
    """Run particle marginal Metropolis-Hastings on a :class:`StateSpacePosterior`.

    >>> fit = run(post, jax.random.key(0), PMMHConfig(num_particles=200))   # doctest: +SKIP
    """
    _check(posterior, config)
    run = kit.Run("pmmh", posterior, config)
    progs = run.track(_programs(posterior, config))
    C, W, S, d = config.num_chains, config.num_warmup, config.num_samples, posterior.ndim
    N, T = config.num_particles, posterior.num_steps
    k_cand, k_init, k_warm, k_samp, k_var = jax.random.split(rng_key, 5)
    counts: dict = {}
    box = {"states": _start(progs, posterior, config, k_cand, k_init, counts)}
    schedule = _adaptation_schedule(W, d)
    keys = [np.asarray(jax.random.key_data(jax.random.split(k, C))) for k in (k_warm, k_samp)]
    bar = run.progress(total=(W + S) * C, desc=f"PMMH {posterior.name}", unit="it")
    warm, kept = [], []
    with run.interruptible(bar):
        _phase(progs, box, keys[0], W, True, schedule, config, posterior.ys, warm, bar)
        _phase(progs, box, keys[1], S, False, schedule, config, posterior.ys, kept, bar)
    run.require(bool(kept), "PMMH was interrupted before any draw was kept")
    info, zs, lps, lls = jax.tree.map(lambda *a: np.concatenate(a, axis=1), *kept)
    for o in warm + kept:  # every proposal (warmup and kept iterations)
        _count_nonfinite(counts, o[0].proposal_loglikelihood, o[0].proposal_logprior,
                         o[0].proposal_position, o[0].proposal_num_nonfinite)
    ll_sd, num_checks = _loglik_sd(progs, posterior, config, jnp.asarray(zs.reshape(-1, d).mean(0)),
                                   k_var)
    _flag(run, info.accepted, ll_sd, config)
    if run.interrupted:
        run.flag(f"interrupted: kept {zs.shape[1]} of {S} draws per chain")
    warm_rate = float(np.concatenate([o[0].accepted for o in warm], 1).mean()) if warm else None
    runs = C * (sum(o[1].shape[1] for o in warm) + zs.shape[1]) + C * config.num_init_tries \
        + num_checks
    extra = {"num_particle_filters": runs, "num_particle_steps": runs * N * T,
             "num_particles": N, "num_steps": T, "loglikelihood_sd_at_posterior_mean": ll_sd,
             "acceptance_rate": float(info.accepted.mean()), "warmup_acceptance_rate": warm_rate,
             "step_scale": np.exp(np.asarray(box["states"].log_scale)).tolist(),
             **_nonfinite_extra(run, counts)}
    sample_stats = {"acceptance_rate": info.acceptance_rate, "accepted": info.accepted,
                    "lp": lps + lls, "loglikelihood_estimate": lls,
                    "proposal_loglikelihood_estimate": info.proposal_loglikelihood}
    return kit.chains_fit(run, _constrained(progs, zs), sample_stats=sample_stats,
                          num_loglik_evals=runs, num_grad_evals=0, extra=extra,
                          attrs={"num_particles": N, "correlated": int(config.correlated)})
