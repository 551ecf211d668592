"""Non-finite log densities (issue 19): every engine counts the evaluations of its log density
that were NaN or +inf (-inf is a legitimate zero density), records them in ``cost.extra`` and
flags the Fit with the site that made them (``bl.fit`` turns the flag into a FitWarning); a
model that is finite, or finite and -inf, gets no flag. Also: Ctrl-C during SMC.

One program serves the three cases through its data (same shapes: each engine compiles it once
for all of them): ``s ~ Normal(1, 1)``, ``y ~ Normal(0, scale)`` with ``scale = s`` (``raw=1``:
NaN where s < 0, a prior mass of 0.16) or ``|s| + 1`` (``raw=0``: finite everywhere),
``z ~ Uniform(s - width, s + width)`` observed at 0.2 (-inf where |s - 0.2| > width).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import bayeslik as bl
from bayeslik.convergence import FitWarning
from bayeslik.engines import kit, nss, pmmh, smc
from bayeslik.filtering import particle as pf
from bayeslik.posterior import nonfinite_sites

SEED = int(os.environ.get("BAYESLIK_TEST_SEED", "0"))
PB = dict(progress_bar=False)
#: tiny settings, one compile per engine for every case (no log_likelihood group: one fewer)
ENGINES = {
    "nuts": dict(num_warmup=40, num_samples=40, num_chains=2, num_chunks=1, **PB),  # 1 chunk size
    "smc": dict(kernel="rwm", num_particles=100, max_mutation_steps=10, on_degenerate="flag", **PB),
    "nested": dict(num_live=30, batch=False, **PB),
    "nss": dict(num_live=30, **PB),
}
#: the cases each engine runs: "nested" compiles per Posterior object, so it skips "finite"
#: (test_nested.py's fits of finite models assert that they have no flag at all)
CASES = {"nuts": ("nan", "finite", "neginf"), "smc": ("nan", "finite", "neginf"),
         "nested": ("nan", "neginf"), "nss": ("nan", "finite", "neginf")}


def model(y, z, raw, width):
    s = numpyro.sample("s", dist.Normal(1.0, 1.0))
    numpyro.sample("y", dist.Normal(0.0, raw * s + (1 - raw) * (jnp.abs(s) + 1.0)), obs=y)
    numpyro.sample("z", dist.Uniform(s - width, s + width), obs=z)


def _posterior(raw: float, width: float):
    f32 = lambda v: np.array(v, np.float32)  # noqa: E731
    y = np.random.default_rng(SEED).normal(size=20)
    return bl.Posterior(model, y=f32(y), z=f32([0.2]), raw=f32(raw), width=f32([width]))


@pytest.fixture(scope="module")
def posteriors():
    """NaN for s < 0; finite everywhere; finite or -inf (zero outside -0.3 < s < 0.7)."""
    return {"nan": _posterior(1.0, 1e3), "finite": _posterior(0.0, 1e3),
            "neginf": _posterior(0.0, 0.5)}


def _nonfinite_flags(fit) -> list[str]:
    return [f for f in fit.flags if "NaN or +inf" in f]


# ---------------------------------------------------------------------------- the building blocks
def test_nonfinite_sites_names_the_site_and_the_argument(posteriors):
    post = posteriors["nan"]
    (site,) = nonfinite_sites(post, jnp.array([-0.5]))
    assert (site.site, site.kind, site.value, site.extreme) == ("y", "observed", "NaN", False)
    assert site.invalid == (("Normal", "scale", "-0.5", "positive"),)
    assert site.describe() == ("observed site 'y' is NaN where Normal scale=-0.5 is not "
                               "positive, at s=-0.5")
    # a batch: the first bad row; none where every row is finite or -inf
    assert nonfinite_sites(post, jnp.array([[0.5], [2.0], [-1.0]]))[0].index == 2
    assert nonfinite_sites(post, jnp.array([[0.5], [2.0]])) == []
    assert nonfinite_sites(posteriors["neginf"], jnp.array([[-2.0], [3.0]])) == []


def test_run_nonfinite_flags_counts_and_stays_quiet_at_zero(posteriors):
    run = kit.Run("demo", posteriors["nan"], None)
    assert run.nonfinite(0, 50, what="log prior") == {
        "num_nonfinite": 0, "num_nonfinite_logprior": 0, "num_logprior_checked": 50}
    assert run.flags == []
    out = run.nonfinite(12, 4000, point=np.array([[0.3], [-0.31]]))
    assert out["num_nonfinite"] == 12 and out["num_loglikelihood_checked"] == 4000
    (flag,) = run.flags
    assert flag.startswith("12 of 4000 log-likelihood evaluations were NaN or +inf (observed "
                           "site 'y' is NaN where Normal scale=-0.31 is not positive, at s=-0.31)")
    assert "truncated" in flag
    # no point: 256 prior draws are probed (16% of them have s < 0)
    probe = kit.Run("demo", posteriors["nan"], None)
    probe.nonfinite(1, 10)
    assert "observed site 'y' is NaN" in probe.flags[0]


def test_far_out_points_are_recorded_not_flagged():
    """A scale that underflowed to 0 far out (early warmup) is floating point, not the model:
    counted and described in cost.extra, no flag, when the prior draws show nothing."""
    def scale_model(y):
        v = numpyro.sample("v", dist.InverseGamma(3.0, 2.0))
        numpyro.sample("y", dist.Normal(0.0, jnp.sqrt(v)), obs=y)

    post = bl.Posterior(scale_model, y=np.zeros(3, np.float32))
    far = np.array([[-120.0]])  # v = exp(-120) = 0 in float32
    assert nonfinite_sites(post, far)[0].extreme
    run = kit.Run("demo", post, None)
    out = run.nonfinite(2, 100, what="log density", point=far)
    assert run.flags == [] and out["num_nonfinite"] == 2 and "far out" in out["nonfinite_where"]


def test_points_without_prior_mass_are_far_out_too():
    """A GP covariance alpha^2 K + sigma I is singular in floating point when alpha is 7e7 and
    sigma 3e-6 (gp_regr of posteriordb; NUTS's early warmup got there in float64), though alpha's
    coordinate is only 18: the prior term (-6e14 nats) says the point has no mass, so it is
    counted, not flagged (a NaN where the prior has mass is flagged: the test above)."""
    x = np.linspace(-1.0, 1.0, 6)

    def gp(y):
        alpha = numpyro.sample("alpha", dist.HalfNormal(2.0))
        sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
        cov = alpha**2 * jnp.exp(-0.5 * (x[:, None] - x[None, :]) ** 2 / 4.0) + sigma * jnp.eye(6)
        numpyro.sample("y", dist.MultivariateNormal(jnp.zeros(6), scale_tril=jnp.linalg.cholesky(cov)),
                       obs=y)

    post = bl.Posterior(gp, y=np.sin(x).astype(np.float32))
    bad = np.array([[np.log(6.9e7), np.log(3.2e-6)]])
    (site,) = nonfinite_sites(post, bad)
    assert (site.site, site.value, site.extreme) == ("y", "NaN", True)
    assert np.abs(bad).max() < 20  # not far out by the coordinate rule
    run = kit.Run("demo", post, None)
    out = run.nonfinite(4, 36673, what="log density", point=bad)
    assert run.flags == [] and "far out" in out["nonfinite_where"]
    # the same sigma with an amplitude the prior supports: a finite density, nothing found
    assert not nonfinite_sites(post, np.array([[0.0, np.log(3.2e-6)]]))


# ---------------------------------------------------------------------------- every engine
@pytest.fixture(scope="module")
def fits(posteriors):
    """{(engine, case): Fit} (the case "nan" fitted under pytest.warns)."""
    out = {}
    for engine, options in ENGINES.items():
        for case in CASES[engine]:
            fit = lambda: bl.fit(posteriors[case], engine, seed=SEED,  # noqa: E731
                                 log_likelihood=False, **options)
            if case == "nan":
                with pytest.warns(FitWarning, match=r"NaN or \+inf"):
                    out[engine, case] = fit()
            else:
                out[engine, case] = fit()
    return out


@pytest.mark.parametrize("engine", list(ENGINES))
def test_nan_region_is_counted_and_flagged_with_its_site(fits, engine):
    fit = fits[engine, "nan"]
    (flag,) = [f for f in _nonfinite_flags(fit) if "log-likelihood" in f or "log density" in f]
    assert "observed site 'y' is NaN where Normal scale=" in flag and "is not positive" in flag
    extra = fit.cost.extra
    kinds = [k for k in extra if k.startswith("num_nonfinite_")]
    assert extra["num_nonfinite"] == sum(extra[k] for k in kinds) > 0
    for k in kinds:
        assert 0 <= extra[k] <= extra[k.replace("num_nonfinite_", "num_") + "_checked"]
    assert extra.get("num_nonfinite_logprior", 0) == 0  # the prior N(1, 1) is finite
    assert flag.startswith(f"{extra['num_nonfinite']} of ")


@pytest.mark.parametrize("engine, case", [(e, c) for e, cs in CASES.items() for c in cs
                                           if c != "nan"])
def test_finite_and_zero_densities_get_no_flag(fits, engine, case):
    fit = fits[engine, case]
    assert _nonfinite_flags(fit) == [] and fit.cost.extra["num_nonfinite"] == 0, fit.flags
    if case == "neginf" and engine in ("nested", "nss"):
        # the zero-density region was visited (the prior puts 0.6 there): -inf (dynesty
        # stores it as -1e300) is not counted
        assert (fit.idata["nested_samples"]["loglikelihood"].values < -1e299).any()


def test_nss_counts_exactly_the_initial_live_points_with_s_below_zero(posteriors):
    """nss checks its initial live points (prior draws): the count is theirs with s < 0."""
    post, key = posteriors["nan"], jax.random.key(SEED + 1)
    with kit.loglikelihood_option(False):  # as the fixture's fits: the same programs
        fit = nss.run(post, key, nss.NSSConfig(**ENGINES["nss"]))
    draws = np.asarray(post.sample_prior(jax.random.split(key, 5)[0], 30))
    assert fit.cost.extra["num_nonfinite_loglikelihood"] == int((draws[:, 0] < 0).sum()) > 0
    assert fit.cost.extra["num_loglikelihood_checked"] == 30


# ---------------------------------------------------------------------------- pmmh
def _ssm_prior():
    s = numpyro.sample("s", dist.Normal(1.0, 1.0))
    numpyro.sample("t", dist.Normal(0.0, s))  # its prior term is NaN for s < 0


def _ssm_posterior():
    ssm = pf.reparametrised_ssm(lambda p, e: e, lambda p, x, e, t: 0.5 * x + e,
                                lambda p, x, y, t: -0.5 * (y - x) ** 2)
    ys = np.random.default_rng(SEED).normal(size=10).astype(np.float32)
    return pmmh.StateSpacePosterior(_ssm_prior, ssm, ys)


def test_pmmh_counts_and_names_the_filter_or_the_prior_site():
    """PMMH's host-side counting: NaN / +inf estimates where the log prior is finite (elsewhere
    no filter runs), NaN log priors; the filter named at a candidate, the prior site found."""
    post = _ssm_posterior()
    counts: dict = {}
    z = np.array([[0.5, 0.0], [0.4, 0.1], [-0.5, 0.2]], np.float32)  # (s, t)
    pmmh._count_nonfinite(counts, np.array([np.nan, -3.0, -np.inf]),
                          np.array([-1.0, -1.0, np.nan]), z)
    pmmh._count_nonfinite(counts, np.array([np.inf, -np.inf]), np.array([-2.0, np.nan]))
    assert (counts["loglikelihood"], counts["logprior"], counts["checked"]) == (2, 2, 5)
    run = kit.Run("pmmh", post, None)
    extra = pmmh._nonfinite_extra(run, counts)
    assert extra["num_nonfinite"] == 4 and extra["num_logprior_checked"] == 5
    ll_flag, lp_flag = run.flags
    assert ll_flag.startswith("2 of 5 log-likelihood evaluations were NaN or +inf (the particle "
                              "filter's log-likelihood estimate at s=0.5, t=0.0)")
    assert lp_flag.startswith("2 of 5 log prior evaluations were NaN or +inf (the prior term of "
                              "latent site 't' is NaN where Normal scale=")


@pytest.mark.slow
def test_pmmh_counts_nan_log_priors():
    """A prior that is NaN for s < 0 (prior mass 0.16): the starting candidates and proposals
    there are counted and the prior site named, in a whole run (slow: the particle filter's
    compile, 10-30 s). NaN observation densities inside the particle filter are counted too:
    see tests/engines/test_pmmh.py and tests/filtering/test_particle_nonfinite.py."""
    post = _ssm_posterior()
    with pytest.warns(FitWarning, match=r"NaN or \+inf"):
        fit = bl.fit(post, "pmmh", seed=SEED, num_warmup=20, num_samples=20, num_chains=2,
                     num_particles=10, num_variance_checks=0, chunk_size=20, **PB)
    (flag,) = _nonfinite_flags(fit)
    assert flag.startswith(f"{fit.cost.extra['num_nonfinite']} of 120 log prior evaluations "
                           "were NaN or +inf (the prior term of latent site 't' is NaN where "
                           "Normal scale=")
    extra = fit.cost.extra
    assert 0 < extra["num_nonfinite_logprior"] == extra["num_nonfinite"]
    # 2 chains x (20 candidates + 40 proposals)
    assert extra["num_logprior_checked"] == extra["num_loglikelihood_checked"] == 2 * (20 + 40)


# ---------------------------------------------------------------------------- Ctrl-C in SMC
class _Interrupting:
    """SMC's compiled programs, raising KeyboardInterrupt at the first stage of run ``run``."""

    def __init__(self, progs, run: int):
        self._progs, self._run, self._starts = progs, run, 0

    def __call__(self, name, *args):
        if name == "stage" and int(args[1]) == 0:
            self._starts += 1
            if self._starts == self._run + 1:
                raise KeyboardInterrupt
        return self._progs(name, *args)

    def __getattr__(self, name):
        return getattr(self._progs, name)


def _interrupt_at_run(monkeypatch, run: int) -> None:
    programs = smc._programs
    monkeypatch.setattr(smc, "_programs", lambda p, c: _Interrupting(programs(p, c), run))


def test_smc_interrupted_in_its_only_run_says_what_was_lost(posteriors, monkeypatch):
    _interrupt_at_run(monkeypatch, 0)
    with pytest.raises(KeyboardInterrupt, match=r"run 1 of 1 at stage 0 .*nothing was kept.*"
                                                r"num_runs=4, num_particles=25"):
        bl.fit(posteriors["finite"], "smc", seed=SEED, **ENGINES["smc"])


def test_smc_interrupted_in_a_later_run_keeps_the_finished_ones(posteriors, monkeypatch):
    _interrupt_at_run(monkeypatch, 1)
    fit = bl.fit(posteriors["finite"], "smc", seed=SEED, num_runs=3, **ENGINES["smc"])
    assert fit.idata["posterior"].sizes["chain"] == 1
    assert any(f.startswith("interrupted: kept 1 of 3 completed runs") for f in fit.flags)
    assert np.isfinite(fit.log_evidence)
