"""Tempered SMC against exact evidences and posteriors, within k x the estimate's own error;
the degeneracy guard; the Fit's contents; engine mechanics (reuse, interrupts)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import bayeslik as bl
from bayeslik.engines import smc
from bayeslik.models import reference

K = 4.0  # tolerance in standard errors


# ---------------------------------------------------------------------------- helpers
def _stage_ess(fit) -> np.ndarray:
    """ESS of every stage's incremental weights, (runs, stages), NaN-padded."""
    return np.asarray(fit.idata["smc_stages"]["ess"].values)


def _moment_errors(fit, var: str, mean, sd):
    """(mean error, sd error) in standard errors. The draws of a run are treated as worth the
    ESS of its last reweighting (the final move only decorrelates them further)."""
    stages = fit.idata["smc_stages"]
    last = [int(np.sum(np.isfinite(t))) - 1 for t in stages["temperature"].values]
    n_eff = sum(float(stages["ess"].values[r, t]) for r, t in enumerate(last))
    draws = fit.draws(var).reshape(-1, *np.shape(mean))
    se_mean = sd / np.sqrt(n_eff)
    kurt = np.mean((draws - draws.mean(0)) ** 4, 0) / draws.var(0) ** 2
    se_sd = sd * np.sqrt((kurt - 1) / (4 * n_eff))
    return np.abs(draws.mean(0) - mean) / se_mean, np.abs(draws.std(0) - sd) / se_sd


def _check_logz(fit, truth: float) -> float:
    z = (fit.log_evidence - truth) / fit.log_evidence_err
    assert abs(z) < K, (fit.log_evidence, fit.log_evidence_err, truth)
    return z


# ---------------------------------------------------------------------------- exact problems
@pytest.mark.parametrize("name,kernel", [("normal_mean", "hmc"), ("normal_inverse_gamma", "hmc"),
                                         ("normal_inverse_gamma", "rwm")])
def test_exact_evidence_and_moments(name, kernel, seed):
    prob = reference.get(name)
    fit = bl.fit(prob.posterior(), "smc", seed=seed, kernel=kernel, num_particles=1000,
                 num_runs=4, progress_bar=False)
    assert not fit.flags, fit.flags
    _check_logz(fit, prob.log_evidence)
    for var, mean in prob.posterior_mean.items():
        err_mean, err_sd = _moment_errors(fit, var, mean, prob.posterior_sd[var])
        assert np.all(err_mean < K), (var, err_mean)
        assert np.all(err_sd < K), (var, err_sd)


@pytest.mark.parametrize("kernel", ["hmc", "rwm"])
def test_correlated_gaussian_10d(kernel, seed):
    """The 10-D Gaussian on which blackjax's adaptive tempered SMC with an untuned random walk
    reached lambda=1 in two stages with a far-off log evidence."""
    prob = reference.correlated_gaussian(dim=10)
    fit = bl.fit(prob.posterior(), "smc", seed=seed, kernel=kernel, num_particles=300,
                 progress_bar=False)
    assert not fit.flags, fit.flags
    _check_logz(fit, prob.log_evidence)
    stages = fit.idata["smc_stages"]
    assert int(stages.sizes["stage"]) > 5  # the likelihood is sharp: many small steps in lambda
    assert float(stages["unique_mutated"].min()) >= 0.9
    err_mean, err_sd = _moment_errors(fit, "x", prob.posterior_mean["x"], prob.posterior_sd["x"])
    assert np.all(err_mean < K), err_mean
    assert np.all(err_sd < K), err_sd
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
    fit = bl.fit(prob.posterior(), "smc", seed=seed, kernel="hmc", num_particles=1000,
                 num_runs=4, progress_bar=False)
    with pytest.raises(AssertionError):
        _check_logz(fit, prob.log_evidence + 6 * fit.log_evidence_err)


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
    _check_logz(fit, logz)
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
        bl.fit(post, "smc", seed=seed, kernel="rwm", num_particles=200, max_stages=2,
               progress_bar=False)


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
def test_fit_contents_and_roundtrip(tmp_path, seed):
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

    path = str(tmp_path / "smc.nc")
    fit.save(path)
    back = bl.load_fit(path)
    assert back.engine == "smc" and back.log_evidence == fit.log_evidence
    assert back.log_evidence_err == fit.log_evidence_err
    np.testing.assert_array_equal(back.draws("mu"), fit.draws("mu"))
    np.testing.assert_array_equal(back.idata["smc_stages"]["ess"].values, st["ess"].values)
    np.testing.assert_array_equal(back.idata["particles"]["log_weight"].values, lw)
    assert back.config["kernel"] == "hmc"


def test_compiled_once_and_reproducible():
    post = reference.get("normal_mean").posterior()
    opts = dict(kernel="rwm", num_particles=200, progress_bar=False)
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
    opts = dict(kernel="rwm", num_particles=200, progress_bar=False)
    num_stages = bl.fit(post, "smc", seed=1, **opts).cost.extra["num_stages"][0]
    _interrupt_on(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt, match="before its first run reached lambda=1"):
        bl.fit(post, "smc", seed=1, **opts)
    _interrupt_on(monkeypatch, num_stages + 1)  # the first stage of the second run
    fit = bl.fit(post, "smc", seed=1, num_runs=3, **opts)
    assert fit.num_chains == 1
    assert any("interrupted: kept 1 of 3" in f for f in fit.flags)
    assert np.isfinite(fit.log_evidence)


def test_progress_bar_runs(capsys):
    post = reference.get("normal_mean").posterior()
    bl.fit(post, "smc", kernel="rwm", num_particles=200, progress_bar=True)
    assert "SMC normal_mean_model" in capsys.readouterr().err


def test_next_temperature_hits_the_target_ess():
    ll = jax.random.normal(jax.random.key(0), (1000,)) * 30.0
    lam = smc.next_temperature(ll, jnp.asarray(0.2), 0.5)
    lw = (lam - 0.2) * ll
    ess = float(jnp.exp(2 * jax.nn.logsumexp(lw) - jax.nn.logsumexp(2 * lw)))
    assert 0.2 < float(lam) < 1.0 and abs(ess - 500.0) < 1.0
    # a flat likelihood: straight to lambda = 1
    assert float(smc.next_temperature(jnp.zeros(100), jnp.asarray(0.5), 0.5)) == 1.0


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
