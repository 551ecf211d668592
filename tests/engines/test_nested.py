"""The "nested" engine (dynesty): exactness on problems with known evidence, the likelihood hook,
batching, checkpoint/resume after a SIGKILL, and input checks before any compile.

Statistical assertions use the run's own error (tests/harness.py): |logZ - truth| < max(K logzerr,
LOGZ_FLOOR) as the issue asks, and posterior moments from the weighted dead points within K Monte
Carlo standard errors computed from the Kish effective sample size of the weights. The checks every
engine shares (compile once, progress bar, Ctrl-C, save/load, schema) are in test_contract.py.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import bayeslik as bl
import bayeslik.icdf  # noqa: F401  (imported here: its decorators call jax.jit at import)
from bayeslik.engines import nested
from bayeslik.engines.nested import NestedConfig
from bayeslik.errors import EngineError, ImproperPriorError, PriorTransformError
from bayeslik.models import nested_suite, reference
from tests.harness import (LOGZ_FLOOR, K, check_evidence, check_moments, check_nested_fit,
                           check_shell_balance, folded_reference, weighted_moments)


@pytest.fixture(scope="module")
def shells():
    """The 2-D shells problem and ONE Posterior for the module: its compiled functions are
    cached per Posterior object, so the tests below compile once."""
    prob = nested_suite.get("gaussian_shells_2d")
    return prob, prob.posterior()


# ----------------------------------------------------------------------------- options and input
@pytest.mark.parametrize("options, name", [
    ({"num_live": 10.5}, "num_live"),
    ({"bound": "ellipse"}, "bound"),
    ({"sample": "hmc"}, "sample"),
    ({"dlogz": -1.0}, "dlogz"),
    ({"max_calls": 0}, "max_calls"),
    ({"batch": 1}, "batch"),
    ({"resume": True}, "resume"),
    ({"pfrac": 1.5}, "pfrac"),
    ({"checkpoint_every": 0}, "checkpoint_every"),
])
def test_bad_options_rejected(options, name):
    with pytest.raises(EngineError, match=name):
        NestedConfig(**options)


def _lkj_model():
    L = numpyro.sample("L", dist.LKJCholesky(3, 2.0))
    numpyro.factor("f", -(L**2).sum())


def _improper_model():
    x = numpyro.sample("x", dist.ImproperUniform(dist.constraints.real, (), ()))
    numpyro.factor("f", -x**2)


def test_prior_without_unit_cube_transform_rejected_before_compile(no_jit):
    post = bl.Posterior(_lkj_model)
    with pytest.raises(PriorTransformError, match="'L'.*|LKJ") as e:
        bl.fit(post, "nested", num_live=50, progress_bar=False)
    assert "nested" in str(e.value) and "nss" in str(e.value)


def test_improper_prior_rejected_before_compile(no_jit):
    post = bl.Posterior(_improper_model)
    with pytest.raises(ImproperPriorError, match="x"):
        bl.fit(post, "nested", num_live=50, progress_bar=False)


def test_too_few_live_points_rejected_before_compile(no_jit):
    post = nested_suite.get("loggamma_10d").posterior()
    with pytest.raises(EngineError, match="num_live=8"):
        bl.fit(post, "nested", num_live=8, progress_bar=False)


def test_unpicklable_model_rejected_for_checkpoints(tmp_path, no_jit):
    def closure_model():
        x = numpyro.sample("x", dist.Normal(0, 1))
        numpyro.factor("f", -x**2)

    post = bl.Posterior(closure_model)
    with pytest.raises(EngineError, match="module-level"):
        bl.fit(post, "nested", num_live=50, progress_bar=False,
               checkpoint_file=str(tmp_path / "c.pkl"))


# ----------------------------------------------------------------------------- exactness (default)
def test_shells_2d_plain(shells, seed):
    prob, post = shells
    fit = bl.fit(post, "nested", seed=seed, num_live=300, batch=False, progress_bar=False)
    check_nested_fit(fit, post, "nested")
    check_evidence(fit, prob.log_evidence, floor=LOGZ_FLOOR)
    check_moments(fit, **folded_reference("gaussian_shells_2d"), weighted=True)
    check_shell_balance(fit)
    assert not fit.flags
    # true calls: every point given to the likelihood, the initial live points included
    assert fit.cost.num_loglik_evals >= fit.cost.extra["num_init_calls"] == 300
    assert fit.cost.extra["queue_size"] == 1


def test_shells_2d_batched(shells, seed):
    """The batched path (thread pool + batcher): same exactness, batches of several points."""
    prob, post = shells
    fit = bl.fit(post, "nested", seed=seed, num_live=300, batch=4, sample="rwalk",
                 progress_bar=False)
    check_evidence(fit, prob.log_evidence, floor=LOGZ_FLOOR)
    check_moments(fit, **folded_reference("gaussian_shells_2d"), weighted=True)
    check_shell_balance(fit)
    extra = fit.cost.extra
    assert extra["queue_size"] == 4
    assert extra["mean_batch_size"] > 2  # points really were evaluated together
    # every call after the initial live points went through the batcher
    assert fit.cost.num_loglik_evals == extra["num_init_calls"] + extra["num_batched_points"]


def test_normal_mean_dynamic(seed):
    prob = reference.get("normal_mean")
    post = prob.posterior()
    fit = bl.fit(post, "nested", seed=seed, num_live=100, dynamic=True, maxbatch=1,
                 progress_bar=False)
    check_nested_fit(fit, post, "nested")
    check_evidence(fit, prob.log_evidence, floor=LOGZ_FLOOR)
    check_moments(fit, prob.posterior_mean["mu"], prob.posterior_sd["mu"], site="mu", weighted=True)


def test_max_calls_flagged(shells, seed):
    post = shells[1]
    fit = bl.fit(post, "nested", seed=seed, num_live=100, max_calls=600, progress_bar=False)
    assert any("max_calls" in f for f in fit.flags)


def test_same_seed_same_result(shells, seed):
    """Batched (the default): thread timing does not change the result."""
    post = shells[1]
    a = bl.fit(post, "nested", seed=seed, num_live=60, progress_bar=False, sample="rwalk")
    b = bl.fit(post, "nested", seed=seed, num_live=60, progress_bar=False, sample="rwalk")
    assert a.cost.extra["queue_size"] == 16
    assert a.log_evidence == b.log_evidence
    np.testing.assert_array_equal(a.draws("x"), b.draws("x"))


# ----------------------------------------------------------------------------- the hook
class CountingWrapper:
    """A trivial loglikelihood_wrapper: passes points to the true function, counts them, and asks the
    engine to replace the evidence and the call count in finalize."""

    def __init__(self):
        self.num_points = 0
        self.num_batches = 0
        self.sizes = []
        self.parts = None
        self.true_fn = None

    def __call__(self, true_batch_fn, posterior, rng_key):
        self.true_fn = true_batch_fn
        self.posterior = posterior

        def batch_fn(u):
            assert u.dtype == np.float64 and u.ndim == 2 and u.shape[1] == posterior.ndim
            self.num_points += len(u)
            self.num_batches += 1
            self.sizes.append(len(u))
            out = true_batch_fn(u)
            assert out.shape == (len(u),) and out.dtype == np.float64
            return out

        return batch_fn

    def finalize(self, fit_parts):
        self.parts = fit_parts
        return {"cost_extra": {"wrapper_points": self.num_points}, "num_true_calls": 12345,
                "log_evidence": 1.5, "log_evidence_err": 0.25, "flags": ["wrapped"],
                "attrs": {"wrapper": "counting"}}


def test_loglikelihood_wrapper_hook(shells, seed):
    prob, post = shells
    wrapper = CountingWrapper()
    config = NestedConfig(num_live=100, batch=False, progress_bar=False)
    fit = nested.run(post, jax.random.key(seed), config, loglikelihood_wrapper=wrapper)
    # every likelihood call went through the wrapper: the initial live points in one batch
    assert wrapper.true_fn.num_calls == wrapper.num_points > 1000
    assert wrapper.sizes[0] == 100 and set(wrapper.sizes[1:]) == {1}
    assert fit.cost.extra["wrapper_points"] == wrapper.num_points
    # finalize saw the dead points and its replacements arrived
    parts = wrapper.parts
    n = fit.idata["nested_samples"].sizes["point"]
    assert parts["u"].shape == (n, 2) and parts["logwt"].shape == parts["logl"].shape == (n,)
    assert np.all((parts["u"] > 0) & (parts["u"] < 1))
    np.testing.assert_allclose(parts["logl"], fit.idata["nested_samples"]["loglikelihood"].values[0])
    np.testing.assert_allclose(wrapper.true_fn(parts["u"][-5:]), parts["logl"][-5:], rtol=1e-5)
    assert fit.cost.num_loglik_evals == 12345
    assert (fit.log_evidence, fit.log_evidence_err) == (1.5, 0.25)
    assert "wrapped" in fit.flags
    attrs = fit.idata["nested_samples"].attrs
    assert attrs["wrapper"] == "counting"
    tol = max(K * attrs["dynesty_logzerr"], LOGZ_FLOOR)
    assert abs(attrs["dynesty_logz"] - prob.log_evidence) < tol


def test_loglikelihood_wrapper_hook_batched(shells, seed):
    """With batching the wrapper gets batches of several points (at most queue_size after the
    initial live points)."""
    post = shells[1]
    wrapper = CountingWrapper()
    config = NestedConfig(num_live=100, batch=4, progress_bar=False, sample="rwalk")
    fit = nested.run(post, jax.random.key(seed), config, loglikelihood_wrapper=wrapper)
    assert wrapper.num_points / wrapper.num_batches > 2
    assert max(wrapper.sizes[1:]) == 4
    assert fit.cost.num_loglik_evals == 12345
    assert fit.cost.extra["num_batched_points"] == wrapper.num_points - 100


def _edge_model():
    """A 2-D posterior against the unit cube's edge (x ~ U(0, 1), data near 0): random-walk
    proposals often fall outside the cube."""
    x = numpyro.sample("x", dist.Uniform(0.0, 1.0).expand([2]))
    numpyro.factor("f", -0.5 * jnp.sum((x / 0.02) ** 2))


@pytest.mark.parametrize("batch", [False, 4])
def test_every_true_likelihood_call_counted(seed, batch):
    """Issue 24: dynesty's count is not the number of likelihood calls. Cost.num_loglik_evals
    is: it equals an independent count of the points given to the likelihood, and the initial
    live points plus the calls counted in each proposal's thread; dynesty's count (plain path)
    is the proposals' own count (calls plus proposals outside the cube) plus one per final
    live point."""
    post = bl.Posterior(_edge_model)
    seen = []

    def wrapper(true_fn, posterior, key):
        def batch_fn(u):
            seen.append(len(u))
            return true_fn(u)
        return batch_fn

    config = NestedConfig(num_live=50, batch=batch, sample="rwalk", progress_bar=False)
    fit = nested.run(post, jax.random.key(seed), config, loglikelihood_wrapper=wrapper)
    ex = fit.cost.extra
    assert fit.cost.num_loglik_evals == sum(seen) == ex["num_init_calls"] + ex["num_proposal_calls"]
    assert ex["num_dynesty_overcount"] > 100  # proposals outside the cube, counted by dynesty
    if batch is False:
        assert ex["num_dynesty_calls"] == (ex["num_proposal_calls"] + ex["num_dynesty_overcount"]
                                           + config.num_live)


def test_auto_sample_keeps_walks(seed):
    """dynesty's own "auto" ignores walks; the engine's gives them to the method it picks
    (rwalk at 10-D): 40 walks cost at least 30 more calls per iteration than 3 (the same
    seed: the same unit-cube phase before the first bound update)."""
    post = reference.correlated_gaussian(dim=10).posterior()
    calls = {}
    for walks in (3, 40):
        fit = bl.fit(post, "nested", seed=seed, num_live=30, walks=walks, max_iterations=300,
                     progress_bar=False)
        assert fit.idata["nested_samples"].attrs["sample"] == "rwalk"
        calls[walks] = fit.cost.extra["num_dynesty_calls"]
    assert calls[40] - calls[3] > 30 * 200, calls


class Interrupter:
    """A wrapper that acts as Ctrl-C after ``after`` likelihood points."""

    def __init__(self, after):
        self.after, self.seen = after, 0

    def __call__(self, true_batch_fn, posterior, rng_key):
        def batch_fn(u):
            self.seen += len(u)
            if self.seen > self.after:
                raise KeyboardInterrupt
            return true_batch_fn(u)

        return batch_fn


@pytest.mark.parametrize("batch", [False, 4])
def test_interrupt_keeps_the_run(shells, seed, batch):
    """Ctrl-C during a static run returns a flagged Fit from the dead and live points so far."""
    post = shells[1]
    config = NestedConfig(num_live=100, batch=batch, progress_bar=False)
    fit = nested.run(post, jax.random.key(seed), config, loglikelihood_wrapper=Interrupter(1500))
    assert any("interrupted" in f for f in fit.flags)
    assert fit.idata["nested_samples"].sizes["point"] > 100
    assert np.isfinite(fit.log_evidence)


# ----------------------------------------------------------------------------- pickling, resume
def test_adapter_pickles_and_rebuilds(shells):
    post = shells[1]
    fn = nested.true_batch_fn(post)
    adapter = nested._Likelihood(post, lambda u: float(fn(np.asarray(u)[None])[0]),
                                 lambda: fn.num_calls)
    u = np.array([0.2, 0.5])
    v = adapter(u)
    clone = pickle.loads(pickle.dumps(adapter))
    assert clone.calls_before == 1
    assert clone(u) == pytest.approx(v, rel=1e-6)


_CHILD = textwrap.dedent("""
    import sys
    import jax
    from bayeslik.engines import nested
    from bayeslik.models import nested_suite
    post = nested_suite.get("gaussian_shells_2d").posterior()
    dynamic = len(sys.argv) > 3 and sys.argv[3] == "dynamic"
    cfg = nested.NestedConfig(num_live=400, checkpoint_file=sys.argv[1], checkpoint_every=0.3,
                              progress_bar=False, dynamic=dynamic,
                              **(dict(maxbatch=3, nlive_batch=200) if dynamic else {}))
    print("started", flush=True)
    nested.run(post, jax.random.key(int(sys.argv[2])), cfg)
    print("finished", flush=True)
""")


def _run_and_kill(ckpt: str, seed: int, *args: str) -> None:
    """Start _CHILD, SIGKILL it once it has written a checkpoint (and run a little past it)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, ckpt, str(seed), *args], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not os.path.exists(ckpt):
            assert child.poll() is None, f"child ended early: {child.communicate()}"
            assert time.time() - t0 < 120, "no checkpoint within 120 s"
            time.sleep(0.02)
        time.sleep(0.4)  # let it run past the first checkpoint (maybe write a second)
        assert child.poll() is None, "the run finished before it could be killed"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL


def test_checkpoint_resume_after_sigkill(shells, tmp_path, seed):
    """A run killed (SIGKILL) after writing a checkpoint resumes from it: the dead points written
    before the kill are kept, the iteration count continues, logZ is right."""
    import dynesty

    ckpt = str(tmp_path / "run.pkl")
    _run_and_kill(ckpt, seed)
    saved = dynesty.utils.restore_sampler(ckpt)
    it_saved = saved.it - 1
    logl_saved = np.asarray(saved.saved_run["logl"])
    assert it_saved > 0 and len(logl_saved) == it_saved
    assert not saved.added_live  # killed mid-run, not a finished run's final checkpoint

    prob, post = shells
    cfg = NestedConfig(num_live=400, checkpoint_file=ckpt, checkpoint_every=0.3, resume=True,
                       progress_bar=False)
    fit = nested.run(post, jax.random.key(seed), cfg)
    extra = fit.cost.extra
    assert extra["resumed_from_iteration"] == it_saved
    assert extra["niter"] > it_saved
    # the dead points from before the kill are the first ones of the result
    logl = fit.idata["nested_samples"]["loglikelihood"].values[0]
    np.testing.assert_array_equal(logl[:it_saved], logl_saved)
    # the call count continues from the checkpoint's
    assert fit.cost.num_loglik_evals > nested._find_adapter(saved).calls_before > 400
    check_evidence(fit, prob.log_evidence, floor=LOGZ_FLOOR)
    # the checkpoint belongs to this model: resuming another one from it is refused
    other = nested_suite.get("correlated_gaussian_3d").posterior()
    with pytest.raises(EngineError, match="resume"):
        bl.fit(other, "nested", seed=seed, num_live=50, progress_bar=False,
               checkpoint_file=ckpt, resume=True)


@pytest.mark.slow
def test_dynamic_checkpoint_resume_after_sigkill(shells, tmp_path, seed):
    """A dynamic run killed (SIGKILL) mid-run resumes from its checkpoint: the saved dead points
    stay the first ones of the result, the batches still run, logZ is right."""
    import dynesty

    ckpt = str(tmp_path / "dyn.pkl")
    _run_and_kill(ckpt, seed, "dynamic")
    saved = dynesty.utils.restore_sampler(ckpt)
    assert hasattr(saved, "batch_sampler")
    logl_saved = np.asarray(saved.saved_run["logl"])
    calls_saved = nested._find_adapter(saved).calls_before

    prob, post = shells
    cfg = NestedConfig(num_live=400, checkpoint_file=ckpt, checkpoint_every=0.3, resume=True,
                       progress_bar=False, dynamic=True, maxbatch=3, nlive_batch=200)
    fit = nested.run(post, jax.random.key(seed), cfg)
    extra = fit.cost.extra
    assert extra["resumed_from_iteration"] == len(logl_saved)
    # batches add points in between the saved ones: every saved likelihood is still in the run
    logl = np.sort(fit.idata["nested_samples"]["loglikelihood"].values[0])
    assert len(logl) > len(logl_saved)
    assert np.isin(logl_saved, logl).all()
    assert fit.cost.num_loglik_evals > calls_saved
    check_evidence(fit, prob.log_evidence, floor=LOGZ_FLOOR)
    # a static run cannot resume a dynamic checkpoint
    with pytest.raises(EngineError, match="dynamic"):
        bl.fit(post, "nested", seed=seed, num_live=400, progress_bar=False,
               checkpoint_file=ckpt, resume=True)


# ----------------------------------------------------------------------------- the full suite (slow)
SUITE_SETTINGS = {
    "gaussian_shells_2d": dict(num_live=400),
    "gaussian_shells_5d": dict(num_live=400),
    "eggbox": dict(num_live=300),
    "loggamma_2d": dict(num_live=400),
    "loggamma_10d": dict(num_live=300),
    "correlated_gaussian_3d": dict(num_live=400),
}


SUITE_CASES = [(name, "plain") for name in nested_suite.names()] + [
    ("gaussian_shells_5d", "batched"), ("correlated_gaussian_3d", "batched"),
    ("gaussian_shells_2d", "dynamic"), ("loggamma_2d", "dynamic"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, mode", SUITE_CASES)
def test_suite(name, mode, seed):
    prob = nested_suite.get(name)
    post = prob.posterior()
    opts = dict(SUITE_SETTINGS[name])
    opts["batch"] = mode == "batched"
    if mode == "dynamic":
        opts.update(dynamic=True, maxbatch=1)
    fit = bl.fit(post, "nested", seed=seed, progress_bar=False, **opts)
    check_evidence(fit, prob.log_evidence, floor=LOGZ_FLOOR)
    if name.startswith("gaussian_shells"):
        check_shell_balance(fit)
    if name == "loggamma_10d":
        # dynesty's random-walk/slice proposals leave the 10-D live points correlated, so the
        # ESS-based standard error of a moment is 1.5-3.9x too small (measured over 8 seeds);
        # test_loggamma_10d_means_over_runs checks the moments with the between-run error
        return
    check_moments(fit, **folded_reference(name), weighted=True)


@pytest.mark.slow
def test_loggamma_10d_means_over_runs(seed):
    """LogGamma 10-D: the folded posterior means of R independent dynesty runs agree with the
    exact ones within the error measured by the runs' own spread (Student t with R - 1 degrees
    of freedom, family-wise level 1% over the 10 coordinates). Measured over 8 seeds, the means
    are unbiased (|z| <= 1.8) while the posterior sds come out 1-2.5% too small (z down to -4.1,
    rwalk; rslice likewise at twice the calls): the sds are reported, not asserted."""
    from scipy import stats

    name, runs = "loggamma_10d", 6
    fold, mean_true, sd_true = nested_suite.folded_moments(name)
    post = nested_suite.get(name).posterior()
    means, sds = [], []
    for r in range(runs):
        fit = bl.fit(post, "nested", seed=seed + r, progress_bar=False, **SUITE_SETTINGS[name])
        m, sd, _, _ = weighted_moments(fit, "x", fold)
        means.append(m)
        sds.append(sd)
    means = np.array(means)
    z = (means.mean(0) - np.ravel(mean_true)) / (means.std(0, ddof=1) / np.sqrt(runs))
    crit = stats.t.ppf(1 - 0.01 / (2 * z.size), runs - 1)
    assert np.all(np.abs(z) < crit), (z, crit)
    print("sd ratio run/true:", np.round(np.mean(sds, 0) / np.ravel(sd_true), 4))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["normal_mean", "normal_inverse_gamma"])
def test_reference(name, seed):
    prob = reference.get(name)
    post = prob.posterior()
    fit = bl.fit(post, "nested", seed=seed, num_live=400, progress_bar=False)
    check_evidence(fit, prob.log_evidence, floor=LOGZ_FLOOR)
    for site, mean in prob.posterior_mean.items():
        check_moments(fit, mean, prob.posterior_sd[site], site=site, weighted=True)


def test_dynesty_warnings_become_one_flag_each():
    """Repeated dynesty warnings collapse into one flag with a count; others pass through."""
    dyn_file = os.path.join(os.path.dirname(dynesty_module_file()), "bounding.py")
    caught = [warnings.WarningMessage(UserWarning("enlargement factor very large"), UserWarning,
                                      dyn_file, 1) for _ in range(3)]
    caught.append(warnings.WarningMessage(UserWarning("other"), UserWarning, "/x/other.py", 1))
    with warnings.catch_warnings(record=True) as passed:
        warnings.simplefilter("always")
        flags = nested._dynesty_warning_flags(caught)
    assert flags == ["dynesty warned 3 times: enlargement factor very large"]
    assert [str(w.message) for w in passed] == ["other"]


def dynesty_module_file() -> str:
    import dynesty

    return dynesty.__file__
