r"""Particle marginal Metropolis-Hastings ("pmmh"): Bayesian inference for state-space models
whose likelihood is intractable, with a particle filter's unbiased likelihood estimate in place
of the likelihood (Andrieu, Doucet & Holenstein, 2010).

The target is :math:`p(\theta \mid y) \propto p(\theta)\, p_\theta(y)` on the unconstrained
parameter vector ``z``. Each iteration proposes :math:`z' = z + \lambda L \varepsilon` (a Gaussian
random walk), runs a particle filter at :math:`\theta' = \mathrm{constrain}(z')` for
:math:`\hat p_{\theta'}(y)`, and accepts with probability

.. math::

    \min\Big(1, \frac{p(z')\, \hat p_{\theta'}(y)}{p(z)\, \hat p_{\theta}(y)}\Big),

where :math:`p(z)` includes the Jacobian of the constraining map (``Posterior.logprior``). The
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

How a model is given: :class:`StateSpacePosterior` (a :class:`~bayeslik.Posterior` of a NumPyro
program holding the *prior* of the parameters, plus the state-space model and the observations).

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
>>> post = pmmh.StateSpacePosterior(prior, particle.stochastic_volatility_ssm(), ys,
...                                 params_fn=params_fn)
>>> fit = bl.fit(post, "pmmh", num_samples=200, num_warmup=200, num_chains=2,
...              num_particles=50, progress_bar=False)                      # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bayeslik.convergence import convergence_flags
from bayeslik.engines._programs import ProgramCache, Programs
from bayeslik.errors import EngineError, InitializationError, ModelError
from bayeslik.filtering import particle as _pf
from bayeslik.fit import Cost, Fit, build_datatree
from bayeslik.posterior import Posterior

__all__ = ["PMMH", "PMMHConfig", "PMMHState", "PMMHInfo", "StateSpacePosterior", "build_kernel",
           "run"]


# =========================================================================== the posterior
class StateSpacePosterior(Posterior):
    r"""A Posterior whose likelihood is a state-space model's, known only through particle filters.

    ``prior_model`` is a NumPyro program with the parameters' prior as latent sample sites and no
    observed site; the usual ``constrain``/``unconstrain``/``logprior``/``sample_prior`` come from
    it. ``params_fn(values) -> params`` maps the constrained values (``{site: value}``, latent and
    deterministic sites) to the ``params`` pytree of ``ssm`` (default: the values dict itself).
    ``ys`` are the observations (array or pytree of arrays with a leading time axis).

    ``loglikelihood``/``logdensity``/``pointwise_loglikelihood``/``evaluate`` (also through
    ``at``) are intractable and raise :class:`~bayeslik.errors.ModelError`
    (so engines that need them fail with a message instead of sampling the prior); use the
    ``"pmmh"`` engine, or ``estimated_loglikelihood(rng_key, z, num_particles)``.

    >>> import numpy as np, numpyro, numpyro.distributions as dist
    >>> from bayeslik.filtering import particle
    >>> def prior():
    ...     numpyro.sample("phi", dist.Uniform(-1, 1))
    >>> post = StateSpacePosterior(prior, particle.stochastic_volatility_ssm(), np.zeros(20),
    ...                            params_fn=lambda v: {"mu": -1.0, "phi": v["phi"], "sigma": 0.3})
    >>> post.ndim, post.num_steps
    (1, 20)
    """

    def __init__(self, prior_model: Callable, ssm: _pf.StateSpaceModel, ys: Any, *,
                 params_fn: Callable | None = None, **prior_kwargs: Any) -> None:
        if not isinstance(ssm, _pf.StateSpaceModel):
            raise ModelError(f"ssm must be a bayeslik.filtering.particle.StateSpaceModel, got "
                             f"{type(ssm).__name__}")
        if params_fn is not None and not callable(params_fn):
            raise ModelError("params_fn must be a callable {site: value} -> the ssm's params")
        self.num_steps = _pf._num_steps(ys)
        leaves = jax.tree.leaves(ys)
        for leaf in leaves:
            arr = np.asarray(leaf)
            if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
                from bayeslik.errors import DataError
                raise DataError("ys contains NaN or infinite values; remove or impute them "
                                "(or give the state-space model a mask in ys)")
        super().__init__(prior_model, **prior_kwargs)
        observed = [n for n, s in self._sites.items() if s.kind in ("observed", "factor")]
        if observed:
            raise ModelError(
                f"prior_model of a StateSpacePosterior must hold only the prior, but it has "
                f"observed/factor site(s) {observed}; the observations go in `ys` and their "
                "likelihood in the state-space model.")
        self.ssm = ssm
        self.ys = jax.tree.map(jnp.asarray, ys)
        self.params_fn = params_fn if params_fn is not None else _identity
        self.name = getattr(prior_model, "__name__", "model")

        def intractable(*_a, **_k):
            raise ModelError(
                f"the likelihood of StateSpacePosterior '{self.name}' is a state-space model's "
                "and has no closed form; use the 'pmmh' engine (bl.fit(post, 'pmmh')) or "
                "estimated_loglikelihood(rng_key, z, num_particles).")

        self._intractable = intractable
        self.loglikelihood = intractable
        self.logdensity = intractable
        self.pointwise_loglikelihood = intractable
        self.evaluate = intractable

    def at(self, data):
        """As :meth:`Posterior.at`, with the intractable functions raising ModelError."""
        funcs = super().at(data)
        bad = self._intractable
        return funcs._replace(logdensity=bad, loglikelihood=bad, pointwise_loglikelihood=bad,
                              evaluate=bad)

    def params(self, z: jax.Array) -> Any:
        """The state-space model's params at the unconstrained point ``z``."""
        return self.params_fn(self.constrain(z))

    def estimated_loglikelihood(self, rng_key: jax.Array, z: jax.Array, num_particles: int,
                                **filter_options: Any) -> jax.Array:
        """log of a particle filter's unbiased estimate of the likelihood at ``z``."""
        return _pf.particle_filter(rng_key, self.ssm, self.params(z), self.ys, num_particles,
                                   quantiles=(), **filter_options).log_likelihood

    @property
    def observed_data(self) -> dict:
        if isinstance(self.ys, Mapping):
            return {f"y_{k}": np.asarray(v) for k, v in self.ys.items()}
        return {"y": np.asarray(self.ys)} if not isinstance(self.ys, (tuple, list)) else \
            {f"y_{i}": np.asarray(v) for i, v in enumerate(self.ys)}

    @property
    def cache_key(self) -> tuple:
        shapes = tuple((tuple(np.shape(a)), str(jnp.asarray(a).dtype)) for a in jax.tree.leaves(self.ys))
        return super().cache_key + (self.ssm, self.params_fn, jax.tree.structure(self.ys), shapes)

    def __repr__(self) -> str:
        return f"StateSpace{super().__repr__()[:-1]}; T={self.num_steps})"


def _identity(v):
    return v


# =========================================================================== the config
@dataclass(frozen=True)
class PMMHConfig:
    """Settings of the "pmmh" engine (see the module docstring and docs/engines/pmmh.md).

    >>> PMMHConfig(num_particles=200, rho=0.95).correlated
    True
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
        for name in ("num_samples", "num_chains", "num_particles", "num_init_tries", "chunk_size"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise EngineError(f"pmmh: {name} must be a positive int, got {v!r}")
        for name in ("num_warmup", "num_variance_checks"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
                raise EngineError(f"pmmh: {name} must be an int >= 0, got {v!r}")
        if self.method not in _pf._METHODS:
            raise EngineError(f"pmmh: method must be one of {_pf._METHODS}, got {self.method!r}")
        if self.resampling not in _pf.RESAMPLING:
            raise EngineError(f"pmmh: resampling must be one of {_pf.RESAMPLING}, got "
                              f"{self.resampling!r}")
        if not 0.0 <= float(self.ess_threshold) <= 1.0:
            raise EngineError(f"pmmh: ess_threshold must be in [0, 1], got {self.ess_threshold!r}")
        if not 0.0 <= float(self.rho) < 1.0:
            raise EngineError(f"pmmh: rho must be in [0, 1) (the Crank-Nicolson correlation of "
                              f"the filter's noise; 0.99 is typical), got {self.rho!r}")
        if not 0.0 < float(self.target_accept) < 1.0:
            raise EngineError(f"pmmh: target_accept must be in (0, 1) (0.07-0.25 is usual for "
                              f"pseudo-marginal chains), got {self.target_accept!r}")
        if not float(self.initial_scale) > 0:
            raise EngineError(f"pmmh: initial_scale must be > 0, got {self.initial_scale!r}")
        if not (isinstance(self.init, Mapping) or self.init == "prior"):
            raise EngineError(f"pmmh: init must be 'prior' or a dict {{site: constrained value}}, "
                              f"got {self.init!r}")


PMMH = PMMHConfig


# =========================================================================== the kernel
class PMMHState(NamedTuple):
    """One chain: position ``z``, its log prior and log-likelihood estimate, the filter's noise
    ``u`` (correlated) and the adaptation: running mean/scatter of the draws, their count, the
    log step scale and the proposal's Cholesky factor."""

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
    """One iteration: ``acceptance_rate`` = min(1, alpha), ``accepted``, the proposal's log
    prior and log-likelihood estimate."""

    acceptance_rate: jax.Array
    accepted: jax.Array
    proposal_loglik: jax.Array


def build_kernel(posterior: StateSpacePosterior, config: PMMHConfig) -> tuple[Callable, Callable]:
    r"""The pure building blocks of PMMH for ``posterior`` with ``config``'s static settings:
    ``(init_fn, step_fn)``, blackjax style.

    * ``init_fn(rng_key, z, ys) -> PMMHState``: the chain at the unconstrained point ``z`` (one
      particle filter; fresh noise ``u`` when correlated);
    * ``step_fn(rng_key, state, ys, adapt, n_switch, n_burn) -> (PMMHState, PMMHInfo)``: one
      iteration; with ``adapt`` (a bool, traced) the step scale and the proposal covariance
      are adapted: draws from the ``n_burn``-th adapted iteration on are collected, and from
      the ``n_switch``-th on the proposal follows their covariance.

    Both are jittable and vmappable (``ys`` is the posterior's ``ys`` or other observations of
    the same shapes). ``run`` vmaps them over chains and scans ``step_fn`` in chunks.

    >>> init_fn, step_fn = build_kernel(post, PMMHConfig())                   # doctest: +SKIP
    >>> state = init_fn(jax.random.key(0), z0, post.ys)                       # doctest: +SKIP
    >>> state, info = step_fn(jax.random.key(1), state, post.ys, False, 0, 0)  # doctest: +SKIP
    """
    ssm, N, T = posterior.ssm, config.num_particles, posterior.num_steps
    st = _pf._static(ssm, N, config.method, config.resampling, config.correlated)
    d = posterior.ndim
    rho = float(config.rho)
    target = float(config.target_accept)

    def loglik(z, noise, ys):
        params = posterior.params_fn(posterior.constrain(z))
        ll = _pf._run(st, params, ys, noise, jnp.float32(config.ess_threshold),
                      quantiles=(), keep_history=False).log_likelihood
        return jnp.where(jnp.isnan(ll), -jnp.inf, ll)

    def init_fn(rng_key, z, ys) -> PMMHState:
        noise = _pf.draw_noise(rng_key, ssm, T, N) if config.correlated else rng_key
        ll = loglik(z, noise, ys)
        return PMMHState(
            z, posterior.logprior(z), ll, noise if config.correlated else jnp.zeros(()),
            jnp.zeros(d), jnp.zeros((d, d)), jnp.zeros((), jnp.int32), jnp.zeros(()),
            float(config.initial_scale) * jnp.eye(d))

    def step_fn(rng_key, state: PMMHState, ys, adapt, n_switch, n_burn):
        k_prop, k_noise, k_acc = jax.random.split(rng_key, 3)
        z_new = state.z + jnp.exp(state.log_scale) * (state.chol @ jax.random.normal(k_prop, (d,)))
        if config.correlated:
            xi = _pf.draw_noise(k_noise, ssm, T, N)
            noise = jax.tree.map(lambda a, b: rho * a + math.sqrt(1 - rho ** 2) * b, state.u, xi)
        else:
            noise = k_noise
        lp_new = posterior.logprior(z_new)
        ll_new = jnp.where(jnp.isfinite(lp_new), loglik(z_new, noise, ys), -jnp.inf)
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
        collect = adapt & (state.count >= n_burn)
        k = (state.count - n_burn + 1).astype(jnp.float32)
        delta = z - state.mean
        mean = jnp.where(collect, state.mean + delta / jnp.maximum(k, 1.0), state.mean)
        scatter = jnp.where(collect, state.scatter + jnp.outer(delta, z - mean), state.scatter)
        cov = scatter / jnp.maximum(k - 1.0, 1.0)
        cov = 0.5 * (cov + cov.T) + 1e-6 * jnp.eye(d)
        chol_emp = jnp.linalg.cholesky(cov)
        ok = jnp.all(jnp.isfinite(chol_emp))
        switch = adapt & (state.count + 1 == n_switch) & ok
        # at the switch the scale restarts at the random-walk optimum for a Gaussian target,
        # and from then on (in warmup) the proposal follows the running covariance
        log_scale = jnp.where(switch, jnp.log(2.38 / math.sqrt(d)), log_scale)
        follow = adapt & (state.count + 1 >= n_switch) & ok
        chol = jnp.where(follow, chol_emp, state.chol)
        new = new._replace(mean=mean, scatter=scatter,
                           count=state.count + jnp.asarray(adapt, jnp.int32),
                           log_scale=log_scale, chol=chol)
        return new, PMMHInfo(alpha, accept, ll_new)

    return init_fn, step_fn


class _Programs(Programs):
    """The compiled functions of one (posterior, static settings)."""

    def __init__(self, posterior: StateSpacePosterior, config: PMMHConfig):
        super().__init__()
        init_fn, step_fn = build_kernel(posterior, config)

        def evaluate(z, key, ys):
            state = init_fn(key, z, ys)
            return state.logprior, state.loglik, state.u

        def kernel(state, inp, ys):
            key, adapt, n_switch, n_burn = inp
            new, info = step_fn(key, state, ys, adapt, n_switch, n_burn)
            return new, (info, new.z, new.logprior, new.loglik)

        def evaluate_many(zs, keys, ys):
            """(log prior, log-likelihood estimate, noise) at each row of zs (M, d)."""
            return jax.vmap(evaluate, in_axes=(0, 0, None))(zs, keys, ys)

        def chunk(states, key_data, offset, length_active, adapt, n_switch, n_burn, ys):
            def one(state, kd):
                key = jax.random.wrap_key_data(kd)
                steps = offset + jnp.arange(length_active.shape[0])
                keys = jax.vmap(lambda s: jax.random.fold_in(key, s))(steps)

                def body(s, inp):
                    k, active = inp
                    s2, out = kernel(s, (k, adapt & active, n_switch, n_burn), ys)
                    s2 = jax.tree.map(lambda a, b: jnp.where(active, a, b), s2, s)
                    return s2, out

                return jax.lax.scan(body, state, (keys, length_active))

            return jax.vmap(one)(states, key_data)

        self._fns = {
            "evaluate": jax.jit(evaluate_many),
            "chunk": jax.jit(chunk),
            "constrain": jax.jit(jax.vmap(posterior.constrain)),
        }



_CACHE = ProgramCache(16)


def _programs(posterior: StateSpacePosterior, config: PMMHConfig) -> _Programs:
    static = (config.num_particles, config.method, config.resampling, config.correlated,
              float(config.rho), float(config.target_accept), float(config.ess_threshold),
              config.num_variance_checks)
    key = (posterior.cache_key, static)
    return _CACHE.get(key, lambda: _Programs(posterior, config))


# =========================================================================== the run
def _check(posterior, config: PMMHConfig) -> None:
    if not isinstance(posterior, StateSpacePosterior):
        raise EngineError(
            "the 'pmmh' engine needs a StateSpacePosterior (a prior program, a state-space model "
            "and its observations): bayeslik.engines.pmmh.StateSpacePosterior(prior_model, ssm, "
            f"ys, params_fn=...); got {type(posterior).__name__}. For a Posterior with a "
            "tractable likelihood use 'nuts'.")
    ssm = posterior.ssm
    try:
        _pf._validate(ssm, config.num_particles, config.method, config.resampling,
                      config.ess_threshold)
        if config.correlated:
            _pf._static(ssm, config.num_particles, config.method, config.resampling, True)
    except ValueError as e:
        hint = (" With correlated=True the state-space model must be reparametrised "
                "(init_transform_fn, transition_transform_fn, noise_shape); pass "
                "correlated=False otherwise." if config.correlated else "")
        raise EngineError(f"pmmh: {e}.{hint}") from e
    if config.init == "prior":
        posterior.require_proper_prior("pmmh with init='prior' (its starting points)")


def _chunks(total: int, chunk_size: int) -> tuple[int, int]:
    """(chunk length, number of chunks): a fixed length, so that runs of other lengths reuse the
    compiled chunk (the last chunk of a phase is padded with inactive iterations)."""
    return chunk_size, math.ceil(total / chunk_size)


def run(posterior: StateSpacePosterior, rng_key: jax.Array, config: PMMHConfig) -> Fit:
    """Run particle marginal Metropolis-Hastings on a :class:`StateSpacePosterior`.

    >>> fit = run(post, jax.random.key(0), PMMHConfig(num_particles=200))   # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    _check(posterior, config)
    t_start = time.perf_counter()
    progs = _programs(posterior, config)
    compile_before = progs.compile_s
    C, W, S, d = config.num_chains, config.num_warmup, config.num_samples, posterior.ndim
    N, T = config.num_particles, posterior.num_steps
    ys = posterior.ys
    k_cand, k_init, k_warm, k_samp, k_var = jax.random.split(rng_key, 5)
    R = config.num_init_tries
    if isinstance(config.init, Mapping):
        z0 = np.asarray(posterior.unconstrain(config.init))
        jitter = 0.01 * np.asarray(jax.random.normal(k_cand, (C, R, d)))
        cands = (z0 + jitter).astype(np.float32)
    else:
        cands = np.asarray(posterior.sample_prior(k_cand, C * R)).reshape(C, R, d)
    # every particle filter outside the chains runs in batches of M = C x R (one compile)
    M = C * R
    lp, ll, noise = progs("evaluate", jnp.asarray(cands.reshape(M, d)),
                          jax.random.split(k_init, M), ys)
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
    states = PMMHState(
        jnp.asarray(cands.reshape(M, d)[best]), lp[best], ll[best],
        jax.tree.map(lambda a: a[best], noise) if config.correlated else jnp.zeros(C),
        jnp.zeros((C, d)), jnp.zeros((C, d, d)), jnp.zeros(C, jnp.int32), jnp.zeros(C),
        jnp.broadcast_to(float(config.initial_scale) * jnp.eye(d), (C, d, d)))
    n_burn, n_switch = W // 4, W // 2
    if n_switch - n_burn < max(2 * d, 10):  # too short to estimate a covariance
        n_switch = W + 1
    wkeys = np.asarray(jax.random.key_data(jax.random.split(k_warm, C)))
    skeys = np.asarray(jax.random.key_data(jax.random.split(k_samp, C)))
    bar = tqdm(total=(W + S) * C, desc=f"PMMH {posterior.name}", disable=not config.progress_bar,
               unit="it")
    kept, interrupted, warm_acc = [], False, []
    try:
        for total, keys, adapt, sink in ((W, wkeys, True, warm_acc), (S, skeys, False, kept)):
            length, n = _chunks(total, config.chunk_size)
            for i in range(n):
                k = min(length, total - i * length)
                active = np.arange(length) < k
                states, out = progs("chunk", states, keys, np.int32(i * length), active,
                                    np.bool_(adapt), np.int32(n_switch), np.int32(n_burn), ys)
                out = jax.tree.map(lambda a: np.asarray(a)[:, :k], out)
                sink.append(out)
                bar.update(k * C)
                acc = np.mean(np.concatenate([o[0].accepted for o in sink], axis=1))
                bar.set_postfix(accept=f"{acc:.2f}")
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    if not kept:
        raise KeyboardInterrupt("PMMH was interrupted before any draw was kept")
    info, zs, lps, lls = jax.tree.map(lambda *a: np.concatenate(a, axis=1), *kept)
    n_kept = zs.shape[1]
    # constrained values in fixed blocks of rows (one compile whatever the number of draws)
    flat = zs.reshape(-1, d)
    B = 1024
    blocks = []
    for i in range(0, len(flat), B):
        block = np.zeros((B, d), flat.dtype)
        block[: len(flat[i:i + B])] = flat[i:i + B]
        blocks.append(jax.tree.map(np.asarray, progs("constrain", jnp.asarray(block))))
    values = {k: np.concatenate([b[k] for b in blocks])[: len(flat)] for k in blocks[0]}
    values = {k: v.reshape((C, n_kept) + v.shape[1:]) for k, v in values.items()}
    # the spread of the log-likelihood estimate at the posterior mean: the number to tune N by
    z_mean = jnp.asarray(zs.reshape(-1, d).mean(0))
    ll_sd = None
    if config.num_variance_checks > 1:
        lls_check = []
        for i in range(math.ceil(config.num_variance_checks / M)):
            keys = jax.random.split(jax.random.fold_in(k_var, i), M)
            lls_check.append(np.asarray(progs("evaluate", jnp.broadcast_to(z_mean, (M, d)), keys, ys)[1]))
        lls_check = np.concatenate(lls_check)[:config.num_variance_checks]
        ll_sd = float(np.std(lls_check, ddof=1)) if np.all(np.isfinite(lls_check)) else float("inf")
    wall = time.perf_counter() - t_start
    compile_s = progs.compile_s - compile_before

    accepted = info.accepted
    sample_stats = {
        "acceptance_rate": info.acceptance_rate, "accepted": accepted,
        "lp": lps + lls, "log_likelihood_estimate": lls,
        "proposal_log_likelihood_estimate": info.proposal_loglik,
    }
    flags = []
    rate = float(accepted.mean())
    if rate < 0.05:
        flags.append(f"low acceptance: {rate:.3f} of proposals accepted after warmup (aim for "
                     "0.07-0.25); raise num_particles (or rho with correlated=True) or num_warmup")
    stuck = np.flatnonzero(accepted.mean(axis=1) < 0.01)
    if stuck.size:
        flags.append(f"chain(s) {stuck.tolist()} accepted under 1% of proposals: they may be "
                     "stuck where the likelihood was overestimated; raise num_particles")
    if ll_sd is not None and ll_sd > (3.0 if config.correlated else 2.0):
        flags.append(f"the log-likelihood estimate has sd {ll_sd:.2f} at the posterior mean (aim "
                     f"for about {'1-3 with correlated filters' if config.correlated else '1-1.7'});"
                     " raise num_particles")
    if interrupted:
        flags.append(f"interrupted: kept {n_kept} of {S} draws per chain")
    flags.extend(convergence_flags({k: v for k, v in values.items()
                                    if k in posterior.sites and posterior.sites[k].kind == "latent"}))
    warm_rate = float(np.concatenate([o[0].accepted for o in warm_acc], axis=1).mean()) \
        if warm_acc else None
    done_iters = C * (sum(o[1].shape[1] for o in warm_acc) + n_kept)
    runs = done_iters + M + (M * math.ceil(config.num_variance_checks / M) if ll_sd is not None else 0)
    extra = {"num_particle_filters": runs, "num_particle_steps": runs * N * T,
             "num_particles": N, "num_steps": T, "loglik_sd_at_posterior_mean": ll_sd,
             "acceptance_rate": rate, "warmup_acceptance_rate": warm_rate,
             "step_scale": np.exp(np.asarray(states.log_scale)).tolist()}
    idata = build_datatree(
        posterior, values, sample_stats=sample_stats,
        attrs={"inference_library": "bayeslik", "engine": "pmmh", "sampling_time": wall,
               "num_particles": N, "correlated": int(config.correlated)},
    )
    cost = Cost(wall_s=wall, compile_s=compile_s, num_loglik_evals=runs, num_grad_evals=0,
                extra=extra)
    return Fit(idata=idata, engine="pmmh", config=dataclasses.asdict(config), seed=None,
               cost=cost, model=posterior.name, flags=tuple(flags))
