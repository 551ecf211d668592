"""NUTS's warmup is Stan's, step for step; NUTS runs in float64; convergence trouble is flagged.

The reference here is a NumPy port of Stan's own adaptation classes (``stan::mcmc::
stepsize_adaptation``, ``windowed_adaptation`` + ``var_adaptation`` / ``covar_adaptation``, and
``base_hmc::init_stepsize``, stan-dev/stan 2.36), written from the C++ and independent of the
engine's code. The engine's adaptation update and the port are driven by the same inputs, and
every step size and metric must agree.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import bayeslik as bl
from bayeslik.convergence import FitWarning, convergence_flags
from bayeslik.engines import nuts
from bayeslik.models import posteriordb
from tests.harness import check_moments


# ------------------------------------------------------------------ a port of Stan's classes
class StanStepsize:
    """stan::mcmc::stepsize_adaptation."""

    def __init__(self, delta, gamma=0.05, kappa=0.75, t0=10.0):
        self.delta, self.gamma, self.kappa, self.t0 = delta, gamma, kappa, t0
        self.mu = 0.5
        self.restart()

    def restart(self):
        self.counter, self.s_bar, self.x_bar = 0.0, 0.0, 0.0

    def learn_stepsize(self, epsilon, adapt_stat):
        self.counter += 1
        adapt_stat = min(adapt_stat, 1.0)
        eta = 1.0 / (self.counter + self.t0)
        self.s_bar = (1.0 - eta) * self.s_bar + eta * (self.delta - adapt_stat)
        x = self.mu - self.s_bar * math.sqrt(self.counter) / self.gamma
        x_eta = self.counter ** (-self.kappa)
        self.x_bar = (1.0 - x_eta) * self.x_bar + x_eta * x
        return math.exp(x)

    def complete_adaptation(self):
        return math.exp(self.x_bar)


class StanWindowed:
    """stan::mcmc::windowed_adaptation with var_adaptation / covar_adaptation (Welford).

    One deliberate difference, as in the engine: when the buffers do not fit, Stan sets the
    15%/75%/10% partition but never calls restart(), so its first window end stays at the
    constructor's UINT_MAX and the metric is never adapted for 20 <= num_warmup < 150; here
    (and in bayeslik) restart() is called, as the partition intends.
    """

    def __init__(self, num_warmup, dense, init_buffer=75, term_buffer=50, base_window=25):
        self.dense = dense
        self.num_warmup, self.init_buffer, self.term_buffer, self.base_window = 0, 0, 0, 0
        self.never = num_warmup < 20
        if not self.never:
            if init_buffer + base_window + term_buffer > num_warmup:
                self.num_warmup = num_warmup
                self.init_buffer = int(0.15 * num_warmup)
                self.term_buffer = int(0.10 * num_warmup)
                self.base_window = num_warmup - (self.init_buffer + self.term_buffer)
            else:
                self.num_warmup, self.init_buffer = num_warmup, init_buffer
                self.term_buffer, self.base_window = term_buffer, base_window
        self.restart()
        self.samples = []

    def restart(self):
        self.counter = 0
        self.window_size = self.base_window
        self.next_window = self.init_buffer + self.window_size - 1 if not self.never else -1

    def adaptation_window(self):
        return (self.counter >= self.init_buffer
                and self.counter < self.num_warmup - self.term_buffer
                and self.counter != self.num_warmup)

    def end_adaptation_window(self):
        return self.counter == self.next_window and self.counter != self.num_warmup

    def compute_next_window(self):
        last = self.num_warmup - self.term_buffer - 1
        if self.next_window == last:
            return
        self.window_size *= 2
        self.next_window = self.counter + self.window_size
        if self.next_window == last:
            return
        if self.next_window + 2 * self.window_size >= self.num_warmup - self.term_buffer:
            self.next_window = last

    def learn(self, metric, q):
        if self.adaptation_window():
            self.samples.append(np.array(q, float))
        if self.end_adaptation_window():
            self.compute_next_window()
            x = np.array(self.samples)
            n = float(len(x))
            est = metric  # welford sample_variance leaves it as it was for n <= 1
            if n > 1:
                est = np.cov(x, rowvar=False, ddof=1) if self.dense else x.var(axis=0, ddof=1)
            ident = np.eye(len(metric)) if self.dense else 1.0
            metric = (n / (n + 5.0)) * est + 1e-3 * (5.0 / (n + 5.0)) * ident
            self.samples = []
            self.counter += 1
            return True, metric
        self.counter += 1
        return False, metric


def stand_in_finder(eps, metric):
    """A deterministic stand-in for init_stepsize that depends on the metric and the step."""
    return 0.5 * eps + 0.01 * float(np.sum(metric))


def stan_warmup(num_warmup, dense, delta, accept, positions, first_step):
    """Stan's adapt_*_e_nuts::transition loop over given accept stats and positions."""
    d = positions.shape[1]
    ss = StanStepsize(delta)
    ss.mu = math.log(10 * 1.0)  # services: set_mu(log(10 * stepsize)), stepsize = 1
    win = StanWindowed(num_warmup, dense)
    metric = np.eye(d) if dense else np.ones(d)
    eps = first_step
    steps, metrics = [], []
    for t in range(num_warmup):
        eps = ss.learn_stepsize(eps, accept[t])
        update, metric = win.learn(metric, positions[t])
        if update:
            eps = stand_in_finder(eps, metric)
            ss.mu = math.log(10 * eps)
            ss.restart()
        steps.append(eps)
        metrics.append(np.array(metric))
    return np.array(steps), metrics, ss.complete_adaptation()


@pytest.mark.parametrize("num_warmup", [1000, 160, 151, 100, 19])
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_adaptation_follows_stan_step_for_step(num_warmup, dense, dtype, request):
    """float64 agrees with the port to 1e-9; float32 to what its rounding allows (1e-4 relative
    after 1,000 updates of the running averages)."""
    if dtype == "float64":
        request.getfixturevalue("x64")
    rtol = 1e-9 if dtype == "float64" else 1e-4
    rng = np.random.default_rng(0)
    d, delta = 3, 0.8
    accept = rng.uniform(0.3, 1.2, num_warmup)  # > 1 is capped, as Stan does
    positions = rng.normal(size=(num_warmup, d)) * np.array([0.5, 2.0, 1.0]) + 0.3
    first = 0.37
    ref_steps, ref_metrics, ref_final = stan_warmup(num_warmup, dense, delta, accept, positions,
                                                    first)

    cfg = nuts.NUTSConfig(target_accept=delta, dense_mass=dense, mass_adaptation="stan")

    def finder(key, fn, position, logdensity, grad, inv_mass, eps):
        return 0.5 * eps + 0.01 * jnp.sum(inv_mass)

    adapt = nuts.build_adapt(lambda z: -0.5 * z @ z, cfg, find_step_size=finder)
    warmup_init = nuts.build_warmup(lambda z: -0.5 * z @ z, cfg, find_step_size=finder)[0]
    metric = jnp.eye(d) if dense else jnp.ones(d)
    state = warmup_init(nuts.ChainState(jnp.zeros(d), jnp.zeros(()), jnp.zeros(d),
                                        jnp.asarray(first), metric))
    stage, end = nuts.warmup_schedule(num_warmup)
    key = jax.random.key(0)

    def step(state, x):  # the transition's new position, then the update
        position, stage, window_end, accept_stat = x
        state = state._replace(chain=state.chain._replace(position=position))
        state = adapt(key, state, stage, window_end, accept_stat)
        return state, (state.chain.step_size, state.chain.inverse_mass_matrix)

    state, (steps, metrics) = jax.jit(lambda s, xs: jax.lax.scan(step, s, xs))(
        state, (jnp.asarray(positions), jnp.asarray(stage), jnp.asarray(end), jnp.asarray(accept)))
    for t in range(num_warmup):
        np.testing.assert_allclose(float(steps[t]), ref_steps[t], rtol=rtol, err_msg=f"t={t}")
        np.testing.assert_allclose(np.asarray(metrics[t]), ref_metrics[t], rtol=rtol,
                                   atol=1e-7 if dtype == "float32" else 0, err_msg=f"t={t}")
    final = nuts.end_warmup(state).chain.step_size
    np.testing.assert_allclose(float(final), ref_final, rtol=rtol)


@pytest.mark.parametrize("num_warmup", list(range(15, 400, 7)) + [1000, 2000, 150, 149, 151])
def test_schedule_is_stans_windowed_adaptation(num_warmup):
    win = StanWindowed(num_warmup, dense=False)
    stage, end = nuts.warmup_schedule(num_warmup)
    for t in range(num_warmup):
        assert (stage[t] == 1) == win.adaptation_window(), t
        assert bool(end[t]) == win.end_adaptation_window(), t
        win.learn(np.ones(1), np.zeros(1))


def stan_init_stepsize(q, logp_fn, grad_fn, inv_metric, eps, momenta):
    """base_hmc::init_stepsize with the momenta given in order (the first sets the direction)."""
    dense = inv_metric.ndim == 2

    def kinetic(p):
        return 0.5 * p @ (inv_metric @ p if dense else inv_metric * p)

    def delta_h(p):
        h0 = -logp_fn(q) + kinetic(p)
        p_half = p + 0.5 * eps_box[0] * grad_fn(q)
        q1 = q + eps_box[0] * (inv_metric @ p_half if dense else inv_metric * p_half)
        p1 = p_half + 0.5 * eps_box[0] * grad_fn(q1)
        h = -logp_fn(q1) + kinetic(p1)
        return h0 - (np.inf if np.isnan(h) else h)

    eps_box = [eps]
    it = iter(momenta)
    direction = 1 if delta_h(next(it)) > math.log(0.8) else -1
    while True:
        d = delta_h(next(it))
        if direction == 1 and not d > math.log(0.8):
            break
        if direction == -1 and not d < math.log(0.8):
            break
        eps_box[0] = eps_box[0] * 2 if direction == 1 else eps_box[0] * 0.5
    return eps_box[0]


@pytest.mark.parametrize("start", [1.0, 1e-4, 30.0])
@pytest.mark.parametrize("dense", [False, True])
def test_step_size_search_is_stans_init_stepsize(start, dense, x64):
    from blackjax.mcmc.metrics import default_metric

    scales = np.array([0.05, 1.0, 3.0])
    prec = 1.0 / scales**2

    def logp(z):
        return -0.5 * jnp.sum(prec * z**2)

    q = jnp.array([0.02, -0.5, 1.0])
    inv_metric = (np.diag(scales**2) * 0.7 + 0.01) if dense else scales**2 * 0.7
    key = jax.random.key(3)
    found = nuts.find_reasonable_step_size(key, logp, q, logp(q), jax.grad(logp)(q),
                                           jnp.asarray(inv_metric), start)
    metric = default_metric(jnp.asarray(inv_metric))
    k_first, k_loop = jax.random.split(key)
    momenta = [np.asarray(metric.sample_momentum(k_first, q))] + [
        np.asarray(metric.sample_momentum(jax.random.fold_in(k_loop, i), q)) for i in range(100)]
    ref = stan_init_stepsize(np.asarray(q), lambda z: float(logp(jnp.asarray(z))),
                             lambda z: np.asarray(jax.grad(logp)(jnp.asarray(z))),
                             np.asarray(inv_metric), start, momenta)
    assert float(found) == pytest.approx(ref, rel=1e-12)


# ------------------------------------------------------------------ whole runs
def _normal_model(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    with numpyro.plate("obs", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


@pytest.mark.parametrize("dense", [False, True])
def test_float64_runs_and_is_exact(dense, x64, seed):
    """NUTS in float64 (every run crashed before: an int32 in the padding branch) on a conjugate
    normal: the posterior mean and sd within K MCSE of the exact ones, the draws in float64."""
    y = jnp.asarray(np.random.default_rng(1).normal(2.0, 1.0, 30))
    post = bl.Posterior(_normal_model, y=y)
    fit = bl.fit(post, "nuts", seed=seed, num_warmup=300, num_samples=500, num_chains=2,
                 dense_mass=dense, progress_bar=False, num_chunks=3)
    assert fit.draws("mu").dtype == np.float64
    prec = 1 / 100 + 30.0
    check_moments(fit, float(y.sum()) / prec, prec ** -0.5, site="mu")
    st = fit.idata["sample_stats"]
    assert st["tree_depth"].dtype.kind == "i" and "reached_max_tree_depth" in st


def test_arma_chains_started_far_out_are_not_stuck(x64, seed):
    """posteriordb arma11 (theta unbounded): chains started with |theta| >= 1.3 sat at step size
    ~0 with ~250 divergences each when the warmup restarted from the averaged step size after a
    metric update (7 of 12 chains, seeds 0-2). Stan re-finds the step size there: none stuck,
    every chain at the reference."""
    p = posteriordb.load("arma-arma11")
    post = bl.Posterior(p["model"], **p["data"])
    ref = p["reference"]
    for s in (seed, seed + 1, seed + 2):
        fit = bl.fit(post, "nuts", seed=s, progress_bar=False)
        st = fit.idata["sample_stats"]
        assert int(st["diverging"].sum()) == 0, s
        assert not fit.flags, (s, fit.flags)
        for k in ("mu", "phi", "theta", "sigma"):
            per_chain = fit.draws(k).mean(axis=1)
            r = ref[k]
            # every chain's mean within 5 sd / sqrt(ESS of a chain, >= 100) of the reference
            assert np.all(np.abs(per_chain - r.mean()) < 5 * r.std() / 10), (s, k, per_chain)


def _two_modes(w=0.3):
    def model():
        x = numpyro.sample("x", dist.Normal(0.0, 20.0))
        numpyro.factor("modes", jnp.logaddexp(jnp.log(w) + dist.Normal(-4.0, 0.5).log_prob(x),
                                              jnp.log1p(-w) + dist.Normal(6.3, 0.5).log_prob(x)))
    return model


def test_chains_in_different_modes_are_flagged_and_warned(seed):
    """A 0.3/0.7 mixture of far-apart modes: the chains split between the modes and no run
    can be right; the Fit says so (R-hat) and bl.fit warns."""
    post = bl.Posterior(_two_modes())
    with pytest.warns(FitWarning, match="chains disagree"):
        fit = bl.fit(post, "nuts", seed=seed, num_warmup=200, num_samples=300, num_chains=4,
                     progress_bar=False, num_chunks=2)
    assert any(f.startswith("chains disagree") for f in fit.flags)


def test_convergence_flags_thresholds():
    rng = np.random.default_rng(0)
    good = {"a": rng.normal(size=(4, 500, 2))}
    assert convergence_flags(good) == []
    sticky = {"a": np.cumsum(rng.normal(size=(4, 500)), axis=1) * 0.01 + rng.normal(size=(4, 500))
              * 0.001}
    flags = convergence_flags(sticky)
    assert any("bulk ESS" in f for f in flags) and any("tail ESS" in f for f in flags)
    const = {"c": np.ones((4, 100))}  # a constant element has no R-hat: not flagged
    assert convergence_flags(const) == []


def test_default_init_hook_is_used_and_user_init_wins():
    from bayeslik.inits import set_default_init

    calls = []

    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 100.0))
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    def hook(y):
        calls.append(1)
        return {"mu": 40.0}

    set_default_init(model, hook)
    post = bl.Posterior(model, y=jnp.array([40.0, 41.0]))
    cfg = nuts.NUTSConfig(num_warmup=0, num_samples=1, num_chains=2, progress_bar=False)
    fit = nuts.run(post, jax.random.key(0), cfg)
    assert calls and np.all(np.abs(fit.draws("mu") - 40.5) < 5)
    calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitWarning)
        nuts.run(post, jax.random.key(0), nuts.NUTSConfig(num_warmup=0, num_samples=1,
                                                          num_chains=2, progress_bar=False,
                                                          init="uniform"))
    assert not calls


@pytest.mark.parametrize("family", ["arhmm", "mixture"])
def test_zoo_families_provide_a_default_init(family):
    """The AR-HMM and mixture programs carry their point estimate as the default init; it
    covers every latent site and has a finite log density."""
    import importlib

    from bayeslik.inits import default_init

    mod = importlib.import_module(f"bayeslik.models.{family}")
    m, data = mod.example()
    post = bl.Posterior(m, **data)
    point = default_init(post)
    assert set(point) == set(post.latent_names)
    assert np.isfinite(float(post.logdensity(post.unconstrain(point))))


@pytest.mark.slow
def test_arhmm_example_converges_at_defaults(seed):
    """arhmm.example() with default NUTS: R-hat 1.73 (chains in different modes) when the
    chains started uniformly; with the model's default init no flag (R-hat 1.001 at seed 0)."""
    from bayeslik.models import arhmm

    m, data = arhmm.example()
    fit = bl.fit(bl.Posterior(m, **data), "nuts", seed=seed, progress_bar=False)
    assert not fit.flags, fit.flags
