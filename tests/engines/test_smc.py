"""Tempered SMC against exact evidences and posteriors, within K x the estimate's own error;
the degeneracy guard; the Fit's contents; a move written by hand; engine mechanics (reuse,
interrupts). What every engine keeps (a second fit compiles nothing, bad options before
compiling, the progress bar, the interrupt contract, save/load, the schema) is checked in
tests/engines/test_contract.py."""

from __future__ import annotations

import itertools
import types

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import bayeslik as bl
from bayeslik.engines import smc
from bayeslik.models import reference
from tests.harness import K, check_evidence, check_moments

# the fits of the mechanics tests share the compiled programs of test_exact_evidence_and_moments
NORMAL_MEAN = dict(kernel="hmc", num_particles=1000, progress_bar=False)


# ---------------------------------------------------------------------------- helpers
def _stage_ess(fit) -> np.ndarray:
    """ESS of every stage's incremental weights, (runs, stages), NaN-padded."""
    return np.asarray(fit.idata["smc_stages"]["ess"].values)


# ---------------------------------------------------------------------------- exact problems
@pytest.mark.parametrize("name,kernel", [("normal_mean", "hmc"), ("normal_inverse_gamma", "hmc"),
                                         ("normal_inverse_gamma", "rwm")])
def test_exact_evidence_and_moments(name, kernel, seed):
    prob = reference.get(name)
    fit = bl.fit(prob.posterior(), "smc", seed=seed, kernel=kernel, num_particles=1000,
                 num_runs=4, progress_bar=False)
    assert not fit.flags, fit.flags
    check_evidence(fit, prob.log_evidence)
    for var, mean in prob.posterior_mean.items():
        check_moments(fit, mean, prob.posterior_sd[var], site=var)


@pytest.mark.parametrize("kernel", ["hmc", "rwm"])
def test_correlated_gaussian_10d(kernel, seed):
    """The 10-D Gaussian on which blackjax's adaptive tempered SMC with an untuned random walk
    reached lambda=1 in two stages with a far-off log evidence."""
    prob = reference.correlated_gaussian(dim=10)
    fit = bl.fit(prob.posterior(), "smc", seed=seed, kernel=kernel, num_particles=300,
                 progress_bar=False)
    assert not fit.flags, fit.flags
    check_evidence(fit, prob.log_evidence)
    stages = fit.idata["smc_stages"]
    assert int(stages.sizes["stage"]) > 5  # the likelihood is sharp: many small steps in lambda
    assert float(stages["unique_mutated"].min()) >= 0.9
    check_moments(fit, prob.posterior_mean["x"], prob.posterior_sd["x"], site="x")
    # the cross-correlations too: the draws' correlation matrix against the exact one
    draws = fit.draws("x").reshape(-1, 10)
    corr = np.corrcoef(draws.T)
    C = prob.posterior_cov["x"]
    exact = C / np.sqrt(np.outer(np.diag(C), np.diag(C)))
    n_eff = float(np.nanmin(stages["ess"].values))
    assert np.max(np.abs(corr - exact)) < K * 1.5 / np.sqrt(n_eff)  # se(r) <= (1 - r^2)/sqrt(n)


def test_logz_check_can_fail(seed):
    """The evidence check rejects an answer off by a few of its standard errors."""
    prob = reference.get("normal_mean")
    fit = bl.fit(prob.posterior(), "smc", seed=seed, num_runs=4, **NORMAL_MEAN)
    with pytest.raises(AssertionError):
        check_evidence(fit, prob.log_evidence + 6 * fit.log_evidence_err)


# ---------------------------------------------------------------------------- multimodal
MIX_PRIOR_SD, MIX_SD = 3.0, 0.5
MIX_MEANS = np.array([[-4.0, -2.0], [3.0, 3.0]])
MIX_WEIGHTS = np.array([0.4, 0.6])


def mixture_model():
    """x ~ N(0, 3^2 I_2); likelihood 0.4 N(x; m1, 0.5^2 I) + 0.6 N(x; m2, 0.5^2 I)."""
    x = numpyro.sample("x", dist.Normal(0.0, MIX_PRIOR_SD).expand([2]).to_event(1))
    comp = jnp.log(jnp.asarray(MIX_WEIGHTS)) + dist.Normal(
        jnp.asarray(MIX_MEANS), MIX_SD).to_event(1).log_prob(x)
    numpyro.factor("mixture", jax.nn.logsumexp(comp))


def _mixture_exact():
    """Z = sum_k w_k N(m_k; 0, (s0^2 + s^2) I); the posterior is a mixture of Gaussians with
    weights proportional to those terms, means s0^2/(s0^2+s^2) m_k and variances
    s0^2 s^2/(s0^2+s^2)."""
    v = MIX_PRIOR_SD**2 + MIX_SD**2
    log_terms = (np.log(MIX_WEIGHTS) - np.sum(MIX_MEANS**2, 1) / (2 * v) - np.log(2 * np.pi * v))
    logz = float(np.logaddexp.reduce(log_terms))
    return logz, np.exp(log_terms - logz), MIX_PRIOR_SD**2 / v * MIX_MEANS


def test_multimodal_mixture_evidence_and_mode_weights(seed):
    logz, weights, means = _mixture_exact()
    post = bl.Posterior(mixture_model)
    fit = bl.fit(post, "smc", seed=seed, kernel="rwm", num_particles=1000, num_runs=2,
                 progress_bar=False)
    # the moves cannot cross between the modes, so the stage-wise decorrelation target is not
    # reached; that is flagged, and nothing else is. The correlation levels off: the moves stop
    # well before max_mutation_steps
    assert np.nanmax(fit.idata["smc_stages"]["num_mutation_steps"].values) < 60
    assert all("still correlated with their starting points" in f for f in fit.flags), fit.flags
    check_evidence(fit, logz)
    x = fit.draws("x")  # (runs, particles, 2)
    in_first = x[..., 0] < 0
    p = float(in_first.mean())
    # the mode fraction's variance accumulates over the stages like the evidence's
    se = np.sqrt(weights[0] * weights[1] * np.nansum(1.0 / _stage_ess(fit)) / x.shape[0] ** 2)
    assert abs(p - weights[0]) < K * se, (p, weights[0], se)
    assert 0.2 < p < 0.6  # both modes are populated
    sd = MIX_PRIOR_SD * MIX_SD / np.sqrt(MIX_PRIOR_SD**2 + MIX_SD**2)
    for k, sel in enumerate([in_first, ~in_first]):
        m = x[sel].mean(0)
        assert np.all(np.abs(m - means[k]) < K * sd / np.sqrt(sel.sum() / 4)), (k, m, means[k])


# ---------------------------------------------------------------------------- the guard
def test_guard_stops_an_untuned_random_walk(seed):
    """blackjax's failure mode: a fixed-scale random walk with few steps lets the population
    collapse onto copies. The engine stops and says so, instead of returning a number."""
    post = reference.correlated_gaussian(dim=10).posterior()
    opts = dict(kernel="rwm", adapt=False, step_size=0.5, num_particles=300,
                max_mutation_steps=10, progress_bar=False)
    with pytest.raises(bl.EngineError, match=r"degenerated at stage \d+ of run 1 .*distinct"):
        bl.fit(post, "smc", seed=seed, **opts)
    fit = bl.fit(post, "smc", seed=seed, on_degenerate="flag", **opts)
    assert any("degenerated at stage" in f for f in fit.flags), fit.flags
    assert any("still correlated with their starting points" in f for f in fit.flags), fit.flags
    assert bool(fit.idata["smc_stages"]["degenerate"].any())


def test_guard_max_stages(seed):
    post = reference.get("normal_mean").posterior()
    with pytest.raises(bl.EngineError, match="did not reach lambda=1 within max_stages=2"):
        bl.fit(post, "smc", seed=seed, max_stages=2, **NORMAL_MEAN)


# ---------------------------------------------------------------------------- input checks
@pytest.mark.parametrize("option,value,match", [
    ("num_particles", 5, "at least 10"),
    ("num_particles", 2.5, "positive integer"),
    ("num_runs", 0, "positive integer"),
    ("target_ess", 1.0, "strictly between 0 and 1"),
    ("kernel", "nuts", r"\['hmc', 'rwm'\]"),
    ("resampling", "magic", "systematic"),
    ("target_accept", 0.0, "strictly between 0 and 1"),
    ("max_mutation_steps", 1, "at least num_mutation_steps=2"),
    ("corr_threshold", 1.5, "strictly between 0 and 1"),
    ("min_unique_fraction", -0.1, r"in \[0, 1\]"),
    ("min_moved_fraction", 2.0, r"in \[0, 1\]"),
    ("step_size", -1.0, "positive"),
    ("on_degenerate", "ignore", "'raise' or 'flag'"),
    ("dense_mass", "yes", "True, False or None"),
])
def test_config_errors_before_compiling(no_jit, option, value, match):
    post = reference.get("normal_mean").posterior()
    with pytest.raises(bl.EngineError, match=f"SMC option {option}=.*{match}"):
        bl.fit(post, "smc", **{option: value})


def test_run_errors_before_compiling(no_jit):
    def improper():
        numpyro.sample("a", dist.ImproperUniform(dist.constraints.real, (), ()))
        numpyro.sample("y", dist.Normal(0.0, 1.0), obs=1.0)

    with pytest.raises(bl.ImproperPriorError, match=r"tempered SMC .* \['a'\]"):
        bl.fit(bl.Posterior(improper), "smc")
    post = reference.correlated_gaussian(dim=12).posterior()
    with pytest.raises(bl.EngineError, match=r"num_particles=12: .* ndim\+1=13"):
        bl.fit(post, "smc", kernel="rwm", num_particles=12)


# ---------------------------------------------------------------------------- the Fit
def test_fit_contents(seed):
    prob = reference.get("normal_inverse_gamma")
    post = prob.posterior()
    N, R = 1000, 2  # as in test_exact_evidence_and_moments: nothing new to compile
    fit = bl.fit(post, "smc", seed=seed, kernel="hmc", num_particles=N, num_runs=R,
                 progress_bar=False)
    tree = fit.idata
    assert {"posterior", "sample_stats", "log_likelihood", "observed_data", "particles",
            "smc_stages"} <= set(tree.children)
    assert fit.num_chains == R and fit.num_draws == N
    assert tree["log_likelihood"]["y"].shape == (R, N, 25)
    assert set(tree["sample_stats"].data_vars) == {"lp", "acceptance_rate"}
    # the final weighted particles: normalised log weights per run
    lw = tree["particles"]["log_weight"].values
    np.testing.assert_allclose(np.logaddexp.reduce(lw, axis=1), 0.0, atol=1e-4)
    assert tree["particles"]["sigma2"].shape == (R, N)
    assert tree["particles"].attrs["log_evidence"] == fit.log_evidence
    assert len(tree["particles"].attrs["log_evidence_runs"]) == R
    assert tree.attrs["log_evidence_err"] == fit.log_evidence_err
    # the stage history ends at lambda = 1 and the increments add up to each run's log Z
    st = tree["smc_stages"]
    assert st["temperature"].dims == ("chain", "stage")
    for r in range(R):
        t = st["temperature"].values[r]
        t = t[np.isfinite(t)]
        assert np.all(np.diff(t) > 0) and t[-1] == 1.0
        np.testing.assert_allclose(np.nansum(st["log_evidence_increment"].values[r]),
                                   tree["particles"].attrs["log_evidence_runs"][r], rtol=1e-5)
    # costs: N initial evaluations, N more per stage (the gradients at the new temperature) and
    # N x leapfrog steps per mutation step
    steps = st["num_mutation_steps"].values
    num_stages = int((steps >= 0).sum())
    expected = R * N + N * num_stages + N * 10 * int(steps[steps >= 0].sum())
    assert fit.cost.num_loglik_evals == expected
    assert fit.cost.num_grad_evals == expected - R * N
    # sample_stats lp is the log density of the draws
    z = post.unconstrain({"mu": fit.draws("mu")[0, 0], "sigma2": fit.draws("sigma2")[0, 0]})
    np.testing.assert_allclose(tree["sample_stats"]["lp"].values[0, 0], post.logdensity(z),
                               rtol=1e-4)


def test_compiled_once_and_reproducible():
    post = reference.get("normal_mean").posterior()
    opts = NORMAL_MEAN
    a = bl.fit(post, "smc", seed=5, **opts)
    b = bl.fit(post, "smc", seed=5, **opts)
    c = bl.fit(post, "smc", seed=6, **opts)
    assert b.cost.compile_s == 0.0
    assert a.log_evidence == b.log_evidence
    np.testing.assert_array_equal(a.draws("mu"), b.draws("mu"))
    assert a.log_evidence != c.log_evidence
    # other data of the same shapes reuse the compiled code too
    other = post.replace_data(y=np.asarray(post.data["y"]) + 1.0)
    d = bl.fit(other, "smc", seed=5, **opts)
    assert d.cost.compile_s == 0.0 and d.draws("mu").mean() > a.draws("mu").mean() + 0.5


def _interrupt_on(monkeypatch, call: int) -> None:
    calls = {"n": 0}
    real = smc._Programs.__call__

    def interrupting(self, name, *args):
        if name == "stage":
            calls["n"] += 1
            if calls["n"] == call:
                raise KeyboardInterrupt
        return real(self, name, *args)

    monkeypatch.setattr(smc._Programs, "__call__", interrupting)


def test_interrupt(monkeypatch):
    """An interrupt keeps the runs that reached lambda = 1; with none, nothing can be kept."""
    post = reference.get("normal_mean").posterior()
    opts = NORMAL_MEAN
    num_stages = bl.fit(post, "smc", seed=1, **opts).cost.extra["num_stages"][0]
    _interrupt_on(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt, match="before its first run reached lambda=1"):
        bl.fit(post, "smc", seed=1, **opts)
    _interrupt_on(monkeypatch, num_stages + 1)  # the first stage of the second run
    fit = bl.fit(post, "smc", seed=1, num_runs=3, **opts)
    assert fit.num_chains == 1
    assert any("interrupted: kept 1 of 3" in f for f in fit.flags)
    assert np.isfinite(fit.log_evidence)


def test_next_temperature_hits_the_target_ess():
    ll = jax.random.normal(jax.random.key(0), (1000,)) * 30.0
    lam = smc.next_temperature(ll, jnp.asarray(0.2), 0.5)
    lw = (lam - 0.2) * ll
    ess = float(jnp.exp(2 * jax.nn.logsumexp(lw) - jax.nn.logsumexp(2 * lw)))
    assert 0.2 < float(lam) < 1.0 and abs(ess - 500.0) < 1.0
    # a flat likelihood: straight to lambda = 1
    assert float(smc.next_temperature(jnp.zeros(100), jnp.asarray(0.5), 0.5)) == 1.0


def _independent_walk() -> smc.Move:
    """A move written by hand against the documented Move signatures: each coordinate steps on
    its own, ``scale`` times the particles' standard deviation along it."""

    def precondition(cov, adapt):
        return jnp.sqrt(jnp.diag(cov))

    def init(position, eval_fn, temperature):
        return jnp.zeros((0,), position.dtype)

    def step(rng_key, particle, eval_fn, temperature, scale, sd):
        k_prop, k_acc = jax.random.split(rng_key)
        z = particle.position
        prop = z + scale * sd * jax.random.normal(k_prop, z.shape, z.dtype)
        lp, ll = eval_fn(prop)
        log_acc = (lp + temperature * ll) - (particle.logprior + temperature * particle.loglikelihood)
        log_acc = jnp.nan_to_num(log_acc, nan=-jnp.inf)
        accept = jnp.log(jax.random.uniform(k_acc, (), z.dtype)) < log_acc
        new = smc.Particle(prop, lp, ll, particle.aux)
        return (jax.tree.map(lambda a, b: jnp.where(accept, a, b), new, particle), accept,
                jnp.minimum(1.0, jnp.exp(log_acc)))

    return smc.Move(precondition, init, step)


def test_user_written_move_gets_the_evidence(seed):
    """build_kernel takes the move as an argument (blackjax's layering): a hand-written move,
    the kernel driven by hand from the prior to lambda = 1, gets normal_mean's log evidence
    within K of the one-run error sqrt(sum_t 1/ESS_t - 1/N)."""
    prob = reference.get("normal_mean")
    post = prob.posterior()

    def eval_fn(z):
        ev = post.evaluate(z)
        return ev.logprior, ev.loglikelihood

    N = 500
    config = smc.SMCConfig(kernel="rwm", num_particles=N)
    kernel = jax.jit(smc.build_kernel(eval_fn, _independent_walk(), resampling="systematic"))
    params = smc.stage_params(config)
    k_prior, k_run = jax.random.split(jax.random.key(seed))
    state = smc.init(post.sample_prior(k_prior, N), eval_fn,
                     smc.default_log_scale(config, post.ndim))
    variance = 0.0
    for t in itertools.count():
        assert t < 50, "no lambda = 1 in 50 stages"
        state, info = kernel(jax.random.fold_in(k_run, t), state, params)
        assert isinstance(state, smc.SMCState) and isinstance(info, smc.StageInfo)
        assert not bool(info.degenerate) and float(info.acceptance_rate) > 0.1
        variance += 1.0 / float(info.ess) - 1.0 / N
        if float(state.temperature) >= 1.0:
            break
    assert t >= 2 and info.log_weight.shape == (N,)
    check_evidence(types.SimpleNamespace(log_evidence=float(state.log_evidence),
                                         log_evidence_err=float(np.sqrt(variance))),
                   prob.log_evidence)


# ---------------------------------------------------------------------------- slow calibration
@pytest.mark.slow
@pytest.mark.parametrize("name,kernel,num_particles,num_seeds", [
    ("normal_mean", "rwm", 500, 40), ("correlated_gaussian", "hmc", 300, 10)])
def test_logz_error_is_calibrated(name, kernel, num_particles, num_seeds, seed):
    """Over independent seeds, (log Z - truth) / err of single runs has mean ~0 and sd ~1:
    the one-run error estimate (perfect-mixing ESS formula) is neither too small nor too large.
    Bounds: mean within 4/sqrt(n); the sample variance within its chi-square 99.9% range."""
    from scipy import stats

    prob = reference.correlated_gaussian(dim=10) if name == "correlated_gaussian" else \
        reference.get(name)
    post = prob.posterior()
    zs = []
    for i in range(num_seeds):
        fit = bl.fit(post, "smc", seed=1000 * seed + i, kernel=kernel,
                     num_particles=num_particles, progress_bar=False)
        zs.append((fit.log_evidence - prob.log_evidence) / fit.log_evidence_err)
    zs = np.array(zs)
    print(f"{name} {kernel} N={num_particles}: z-scores {np.round(zs, 2).tolist()}, mean "
          f"{zs.mean():.3f}, sd {zs.std(ddof=1):.3f}")
    n = len(zs)
    assert abs(zs.mean()) < K / np.sqrt(n), zs
    lo, hi = stats.chi2.ppf([0.0005, 0.9995], n - 1) / (n - 1)
    assert lo < zs.var(ddof=1) < hi, (zs.var(ddof=1), lo, hi, zs)


# ------------------------------------------------------------------------ the nested-sampling suite
@pytest.mark.slow
@pytest.mark.parametrize("name", ["gaussian_shells_2d", "gaussian_shells_5d", "eggbox",
                                  "loggamma_2d", "loggamma_10d", "correlated_gaussian_3d"])
def test_nested_sampling_suite(name, seed):
    """SMC on nested sampling's exactness suite (multimodal shells and eggbox, LogGamma): log Z
    within max(4 x its error, 0.2) of the truth, as asked of the nested engines, and the folded
    posterior moments (modes laid onto one another) within 4 standard errors, the ESS taken as a
    quarter of the particles. Well-separated modes are flagged as slow-mixing, and nothing else."""
    from bayeslik.models import nested_suite

    prob = nested_suite.get(name)
    fit = bl.fit(prob.posterior(), "smc", seed=seed, num_particles=2000, progress_bar=False,
                 on_degenerate="flag")
    err = abs(fit.log_evidence - prob.log_evidence)
    assert err < max(4 * fit.log_evidence_err, 0.2), (fit.log_evidence, prob.log_evidence)
    assert all("still correlated with their starting points" in f for f in fit.flags), fit.flags
    fold, mean, sd = nested_suite.folded_moments(name)
    x = fold(fit.draws("x").reshape(-1, mean.shape[0]))
    se = sd / np.sqrt(x.shape[0] / 4)
    assert np.all(np.abs(x.mean(0) - mean) < 4 * se), (x.mean(0), mean, se)
