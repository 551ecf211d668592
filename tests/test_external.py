"""External (non-JAX) log-likelihoods: ``bl.external_loglikelihood`` (issue 23, first part).

A Gaussian likelihood written in NumPy, put into a NumPyro program through the host callback,
must give exactly the log density of the same model written in JAX (float32 and float64), count
as likelihood (not prior), reach the host in one call per batch, run over an executor, and be
fitted by the engines that need no gradients (nested, nss, smc) to the analytic posterior and
log evidence of the conjugate problem, within each estimate's own error. Engines that
differentiate the log density are refused before anything compiles.
"""

from __future__ import annotations

import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import jax
import jax.numpy as jnp
import multiprocessing
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import bayeslik as bl
import bayeslik.engines  # noqa: F401 -- registered before no_jit forbids module-level jits
from bayeslik.errors import EngineError, ModelError
from bayeslik.external import CACHE_SIZE, ExternalLikelihoodError, HostCall
from tests.harness import LOGZ_FLOOR, check_evidence, check_moments, small

# ------------------------------------------------------------------------------ the problem
#: 2-D conjugate Gaussian: mu ~ N(0, I_2), y_i ~ N(mu, SIGMA^2 I_2), i = 1..N_OBS
SIGMA = 0.7
Y = np.array([[0.3, -0.4], [1.1, 0.2], [0.5, -1.0], [0.9, 0.1], [0.2, -0.6]])
N_OBS = len(Y)


def numpy_loglik(theta):
    """The Gaussian log-likelihood in NumPy, one point: theta = {"mu": (2,)}."""
    mu = np.asarray(theta["mu"], np.float64)
    r = (Y - mu) / SIGMA
    return float(-0.5 * np.sum(r**2) - Y.size * np.log(SIGMA * np.sqrt(2 * np.pi)))


def numpy_loglik_batch(mu):
    """The same, batched: mu (n, 2) -> (n,)."""
    mu = np.asarray(mu, np.float64)
    r = (Y[None] - mu[:, None]) / SIGMA
    return -0.5 * np.sum(r**2, axis=(1, 2)) - Y.size * np.log(SIGMA * np.sqrt(2 * np.pi))


def prior():
    return numpyro.sample("mu", dist.Normal(jnp.zeros(2), 1.0).to_event(1))


def external_model():
    mu = prior()
    bl.external_loglikelihood("loglik", numpy_loglik, {"mu": mu})


def batched_model():
    mu = prior()
    bl.external_loglikelihood("loglik", numpy_loglik_batch, mu, batched=True)


def jax_model(y):
    mu = prior()
    with numpyro.plate("obs", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, SIGMA).to_event(1), obs=y)


def exact():
    """(posterior mean (2,), posterior sd (2,), log Z) of the conjugate problem."""
    prec = 1.0 + N_OBS / SIGMA**2
    mean = Y.sum(0) / SIGMA**2 / prec
    cov = SIGMA**2 * np.eye(N_OBS) + np.ones((N_OBS, N_OBS))  # y[:, d] ~ N(0, cov) marginally
    _, logdet = np.linalg.slogdet(cov)
    log_z = sum(-0.5 * (y @ np.linalg.solve(cov, y) + logdet + N_OBS * np.log(2 * np.pi))
                for y in Y.T)
    return mean, np.full(2, 1.0 / np.sqrt(prec)), float(log_z)


POINTS = np.array([[0.0, 0.0], [0.5, -0.3], [-1.2, 2.0], [3.0, -2.5]])


# ------------------------------------------------------------------------------ the density
@pytest.mark.parametrize("precision", ["float32", "float64"])
@pytest.mark.parametrize("model", [external_model, batched_model], ids=["one_point", "batched"])
def test_numpy_likelihood_gives_the_jax_log_density(precision, model, x64_toggle):
    x64_toggle(precision == "float64")
    post, ref = bl.Posterior(model), bl.Posterior(jax_model, y=jnp.asarray(Y))
    dtype = jnp.result_type(float)
    assert dtype == np.dtype(precision)
    z = jnp.asarray(POINTS, dtype)
    rtol = 1e-6 if precision == "float32" else 1e-13
    for fn in ("logdensity", "loglikelihood", "logprior"):
        got = jax.jit(jax.vmap(getattr(post, fn)))(z)
        want = jax.vmap(getattr(ref, fn))(z)
        assert got.dtype == dtype, (fn, got.dtype)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=rtol, err_msg=fn)
        one = getattr(post, fn)(z[1])  # eager, not vmapped
        assert one.shape == () and one.dtype == dtype
        np.testing.assert_allclose(float(one), float(want[1]), rtol=rtol, err_msg=fn)
    # the pointwise term of the external site is the whole likelihood, one value per point
    pw = jax.vmap(post.pointwise_loglikelihood)(z)
    ref_pw = jax.vmap(ref.pointwise_loglikelihood)(z)["y"].sum(axis=1)
    assert set(pw) == {"loglik"} and pw["loglik"].shape == (len(POINTS),)
    np.testing.assert_allclose(np.asarray(pw["loglik"]), np.asarray(ref_pw), rtol=rtol)


def test_the_site_is_likelihood_not_prior():
    post = bl.Posterior(external_model)
    site = post.sites["loglik"]
    assert (site.kind, site.external) == ("factor", True)
    assert post.external_sites == ("loglik",)
    assert bl.Posterior(jax_model, y=jnp.asarray(Y)).external_sites == ()
    assert "external likelihood: loglik" in repr(post)
    z = jnp.asarray(POINTS[2])
    ev = post.evaluate(z)
    # the prior is the Normal's log density alone; the likelihood is numpy_loglik
    want_prior = float(jnp.sum(dist.Normal(0.0, 1.0).log_prob(z)))
    assert float(ev.logprior) == pytest.approx(want_prior, rel=1e-6)
    assert float(ev.loglikelihood) == pytest.approx(numpy_loglik({"mu": POINTS[2]}), rel=1e-6)
    assert float(post.logprior(z)) == pytest.approx(want_prior, rel=1e-6)


def test_tracing_the_program_never_calls_fn():
    """Building the Posterior, constrain, unconstrain and sample_prior trace the program but
    evaluate no log density: the (expensive) function is not called."""
    calls = []

    def fn(mu):
        calls.append(1)
        return 0.0

    def model():
        bl.external_loglikelihood("loglik", fn, prior())

    post = bl.Posterior(model)
    z = post.unconstrain({"mu": jnp.array([0.1, 0.2])})
    post.constrain(z)
    jax.jit(lambda k: post.sample_prior(k, 50))(jax.random.key(0))
    assert calls == []
    post.loglikelihood(z)
    assert len(calls) == 1


# ------------------------------------------------------------------------------ batches
@pytest.fixture
def host_calls(monkeypatch):
    """The batch shapes of every host call of an external site (HostCall.__call__)."""
    seen = []
    original = HostCall.__call__

    def spy(self, *leaves):
        seen.append(tuple(np.shape(leaves[0])))
        return original(self, *leaves)

    monkeypatch.setattr(HostCall, "__call__", spy)
    return seen


def test_a_batch_reaches_a_batched_fn_in_one_call(host_calls):
    calls = []

    def fn(mu):
        calls.append(np.shape(mu))
        return numpy_loglik_batch(mu)

    def model():
        bl.external_loglikelihood("loglik", fn, prior(), batched=True)

    post = bl.Posterior(model)
    z = jnp.asarray(np.random.default_rng(0).normal(size=(37, 2)))
    out = jax.jit(jax.vmap(post.loglikelihood))(z)
    assert calls == [(37, 2)] and host_calls == [(37, 2)]
    np.testing.assert_allclose(np.asarray(out), numpy_loglik_batch(np.asarray(z)), rtol=1e-5)
    # nested vmaps (chains x points): still one call, with the rows flattened
    calls.clear()
    out2 = jax.vmap(jax.vmap(post.loglikelihood))(z[:36].reshape(4, 9, 2))
    assert calls == [(36, 2)] and out2.shape == (4, 9)
    np.testing.assert_allclose(np.asarray(out2).ravel(), np.asarray(out)[:36], rtol=1e-6)


def test_a_one_point_fn_is_mapped_over_the_batch_on_the_host(host_calls):
    seen = []

    def fn(theta):
        seen.append(np.shape(theta["mu"]))
        return numpy_loglik(theta)

    def model():
        bl.external_loglikelihood("loglik", fn, {"mu": prior()})

    post = bl.Posterior(model)
    z = jnp.asarray(np.random.default_rng(1).normal(size=(13, 2)))
    out = jax.jit(jax.vmap(post.loglikelihood))(z)
    assert host_calls == [(13, 2)]  # one host call ...
    assert seen == [(2,)] * 13  # ... mapping fn over the 13 rows
    np.testing.assert_allclose(np.asarray(out), numpy_loglik_batch(np.asarray(z)), rtol=1e-5)


def test_equal_rows_of_a_batch_are_evaluated_once():
    """Padding and resampled copies: fn sees each distinct row once, every row gets its value."""
    calls = []

    def fn(mu):
        calls.append(np.asarray(mu).copy())
        return numpy_loglik_batch(mu)

    def model():
        bl.external_loglikelihood("loglik", fn, prior(), batched=True)

    post = bl.Posterior(model)
    rows = np.array([[0.5, 0.5], [0.1, -0.2], [0.5, 0.5], [2.0, 1.0], [0.1, -0.2], [0.5, 0.5]],
                    np.float32)
    run = jax.jit(jax.vmap(post.loglikelihood))
    out = run(jnp.asarray(rows))
    assert len(calls) == 1
    np.testing.assert_array_equal(calls[0], rows[[0, 1, 3]])  # first occurrences, in order
    np.testing.assert_allclose(np.asarray(out), numpy_loglik_batch(rows), rtol=1e-6)
    # the next batch: the points seen lately come from the site's cache, only the new one is
    # evaluated (the padding row an engine repeats in every batch costs one call in all)
    again = np.concatenate([rows[:3], [[-1.0, 0.25]], rows[3:]]).astype(np.float32)[:6]
    out = run(jnp.asarray(again))
    assert len(calls) == 2
    np.testing.assert_array_equal(calls[1], [[-1.0, 0.25]])
    np.testing.assert_allclose(np.asarray(out), numpy_loglik_batch(again), rtol=1e-6)
    # beyond CACHE_SIZE distinct points the oldest are forgotten
    fresh = np.random.default_rng(4).normal(size=(6, 2)).astype(np.float32)
    for i in range(CACHE_SIZE // 6 + 1):
        run(jnp.asarray(fresh + i + 10.0))
    n = len(calls)
    run(jnp.asarray(rows))
    assert len(calls) == n + 1 and len(calls[-1]) == 3


@pytest.mark.parametrize("batched", [False, True], ids=["one_point", "batched"])
def test_executor_spreads_one_batch(batched):
    threads = set()
    lock = threading.Lock()

    def fn(theta):
        with lock:
            threads.add(threading.get_ident())
        return numpy_loglik_batch(theta) if batched else numpy_loglik(theta)

    z = jnp.asarray(np.random.default_rng(2).normal(size=(24, 2)))
    with ThreadPoolExecutor(4) as ex:
        def model():
            mu = prior()
            if batched:
                bl.external_loglikelihood("loglik", fn, mu, batched=True, batch_size=5,
                                          executor=ex)
            else:
                bl.external_loglikelihood("loglik", fn, {"mu": mu}, executor=ex)

        out = jax.jit(jax.vmap(bl.Posterior(model).loglikelihood))(z)
    assert threading.get_ident() not in threads and threads
    np.testing.assert_allclose(np.asarray(out), numpy_loglik_batch(np.asarray(z)), rtol=1e-5)


def test_process_executor():
    """A process pool: fn and the rows are pickled to the workers. fn is NumPy's own function
    (pickled by reference), so the spawned workers import NumPy only, not this module."""
    ctx = multiprocessing.get_context("spawn")  # no fork of a process running JAX's threads
    z = jnp.asarray(np.random.default_rng(3).normal(size=(6, 2)))
    with ProcessPoolExecutor(2, mp_context=ctx) as ex:
        def model():
            bl.external_loglikelihood("norm", np.linalg.norm, prior(), executor=ex)

        out = jax.vmap(bl.Posterior(model).loglikelihood)(z)
    np.testing.assert_allclose(np.asarray(out), np.linalg.norm(np.asarray(z), axis=1),
                               rtol=1e-6)


# ------------------------------------------------------------------------------ the engines
@pytest.mark.parametrize("engine", ["nested", "nss", "smc"])
def test_engines_fit_the_conjugate_problem(engine, seed):
    mean, sd, log_z = exact()
    post = bl.Posterior(batched_model)
    fit = bl.fit(post, engine, seed=seed, progress_bar=False, **small(engine))
    assert not fit.flags, fit.flags
    weighted = engine in ("nested", "nss")
    check_evidence(fit, log_z, floor=LOGZ_FLOOR if weighted else 0.0)
    check_moments(fit, mean, sd, site="mu", weighted=weighted)
    # the log_likelihood group holds the external term, the whole likelihood of each draw
    ll = fit.idata["log_likelihood"]["loglik"].values
    draws = fit.draws("mu").reshape(-1, 2)
    np.testing.assert_allclose(ll.reshape(-1), numpy_loglik_batch(draws), rtol=1e-4)
    if engine == "smc":
        assert fit.config["kernel"] == "rwm"  # the default move for an external likelihood


def test_nested_in_float64_hands_fn_float64(seed, x64):
    mean, sd, log_z = exact()
    dtypes = set()

    def fn(mu):
        dtypes.add(mu.dtype)
        return numpy_loglik_batch(mu)

    def model():
        bl.external_loglikelihood("loglik", fn, prior(), batched=True)

    fit = bl.fit(bl.Posterior(model), "nested", seed=seed, progress_bar=False,
                 **small("nested"))
    assert dtypes == {np.dtype(np.float64)}
    assert fit.idata["log_likelihood"]["loglik"].dtype == np.float64
    check_evidence(fit, log_z, floor=LOGZ_FLOOR)
    check_moments(fit, mean, sd, site="mu", weighted=True)


def test_nested_surrogate_runs_on_it(seed):
    """The surrogate engine takes the external likelihood as its true likelihood."""
    mean, sd, log_z = exact()
    fit = bl.fit(bl.Posterior(batched_model), "nested+surrogate", seed=seed,
                 progress_bar=False, **small("nested+surrogate"))
    check_evidence(fit, log_z, floor=LOGZ_FLOOR)
    assert fit.cost.num_loglik_evals > 0


def test_nonfinite_values_are_counted_and_flagged(seed):
    """NaN from fn (here for mu[0] > 1, or where fn raises with on_error='nan') is a zero
    density the engine counts, and the Fit says so, naming the site."""

    def fn(mu):
        if mu[0] > 1.5:
            raise ArithmeticError("solver did not converge")
        return numpy_loglik({"mu": mu}) if mu[0] <= 1.0 else float("nan")

    def model():
        bl.external_loglikelihood("loglik", fn, prior(), on_error="nan")

    with pytest.warns(bl.FitWarning, match=r"NaN or \+inf.*'loglik'"):
        fit = bl.fit(bl.Posterior(model), "smc", seed=seed, progress_bar=False,
                     **small("smc"))
    assert fit.cost.extra["num_nonfinite_loglikelihood"] > 0
    assert any("NaN or +inf" in f and "loglik" in f for f in fit.flags), fit.flags


# ------------------------------------------------------------------------------ refusals
def test_gradient_engines_are_refused_before_compiling(no_jit):
    post = bl.Posterior(external_model)
    with pytest.raises(EngineError, match=r"engine 'nuts' differentiates the log density.*"
                                          r"'loglik'.*\['nested', 'nested\+surrogate', 'nss', "
                                          r"'smc'\]"):
        bl.fit(post, "nuts")
    with pytest.raises(EngineError, match=r"'smc' with these settings.*'loglik'.*kernel='rwm'"):
        bl.fit(post, "smc", kernel="hmc")
    with pytest.raises(EngineError, match="engine 'nuts' differentiates"):
        bl.compare(post, ["smc", "nuts"], progress_bar=False)
    with pytest.raises(EngineError, match="kernel='hmc'.*'loglik'"):  # smc.run called directly
        bl.engines.smc.run(post, jax.random.key(0), bl.engines.SMC(kernel="hmc"))


def test_smc_chooses_its_move_by_the_posterior():
    """kernel=None: HMC on a JAX likelihood (as before), the random walk on an external one;
    the registry's gradient flag follows the kernel."""
    from bayeslik.api import engine_spec, gradient_free_engines
    from bayeslik.engines import smc

    ext, ref = bl.Posterior(external_model), bl.Posterior(jax_model, y=jnp.asarray(Y))
    assert smc.resolve_kernel(smc.SMC(), ref).kernel == "hmc"
    assert smc.resolve_kernel(smc.SMC(), ext).kernel == "rwm"
    assert smc.resolve_kernel(smc.SMC(kernel="rwm"), ref).kernel == "rwm"
    spec = engine_spec("smc")
    assert spec.needs_gradients(smc.SMC(kernel="hmc")) and not spec.needs_gradients()
    assert engine_spec("nuts").needs_gradients() and not engine_spec("nss").needs_gradients()
    assert gradient_free_engines(ext) == ["nested", "nested+surrogate", "nss", "smc"]


def test_the_gradient_itself_names_the_site():
    post = bl.Posterior(external_model)
    with pytest.raises(ExternalLikelihoodError, match="'loglik'.*no derivative"):
        jax.grad(post.logdensity)(jnp.zeros(2))


def test_fn_that_raises_names_the_site():
    def fn(theta):
        raise RuntimeError("the Boltzmann code crashed")

    def model():
        bl.external_loglikelihood("cmb", fn, {"mu": prior()})

    post = bl.Posterior(model)  # fn is not called here
    with pytest.raises(Exception, match=r"external log-likelihood 'cmb': .*fn raised "
                                        r"RuntimeError: the Boltzmann code crashed"):
        jax.block_until_ready(jax.jit(post.loglikelihood)(jnp.zeros(2)))


@pytest.mark.parametrize("batched,returns,match", [
    (False, lambda mu: np.zeros(3), r"returned an array of shape \(3,\).*one real number.*"
                                    r"batched=True"),
    (False, lambda mu: None, "returned None"),
    (True, lambda mu: np.zeros((len(mu), 1)), r"was given 4 point\(s\) and returned an array "
                                              r"of shape \(4, 1\).*shape \(4,\)"),
])
def test_a_result_of_the_wrong_shape_names_the_site(batched, returns, match):
    def model():
        bl.external_loglikelihood("loglik", returns, prior(), batched=batched)

    post = bl.Posterior(model)
    with pytest.raises(Exception, match=match):
        points = jnp.arange(8.0).reshape(4, 2)  # distinct rows (equal ones are evaluated once)
        jax.block_until_ready(jax.vmap(post.loglikelihood)(points))


def _clash_model():
    mu = prior()
    bl.external_loglikelihood("loglik", numpy_loglik_batch, mu, batched=True)
    bl.external_loglikelihood("loglik", numpy_loglik_batch, mu, batched=True)


def _latent_clash_model():
    bl.external_loglikelihood("mu", numpy_loglik_batch, prior(), batched=True)


def _plate_model():
    mu = prior()
    with numpyro.plate("obs", 3):
        bl.external_loglikelihood("loglik", numpy_loglik_batch, mu, batched=True)


def _options_model(**kwargs):
    def model():
        mu = prior()
        args = {"name": "loglik", "fn": numpy_loglik, "theta": {"mu": mu}, **kwargs}
        bl.external_loglikelihood(args.pop("name"), args.pop("fn"), args.pop("theta"), **args)

    return model


@pytest.mark.parametrize("model,match", [
    (_options_model(fn=3.0), r"external_loglikelihood\('loglik', \.\.\.\): fn must be a callable"),
    (_options_model(name=""), "name must be a non-empty string"),
    (_options_model(batched="yes"), "batched must be True"),
    (_options_model(batched=True, batch_size=0), "batch_size must be a positive integer"),
    (_options_model(batch_size=8), "batch_size=8 is for a batched fn"),
    (_options_model(executor=object()), "executor must be a concurrent.futures.Executor"),
    (_options_model(on_error="ignore"), r"on_error must be one of \['raise', 'nan'\]"),
    (_options_model(theta="mu"), r"theta holds an array of dtype|theta holds a str"),
    (_options_model(theta={}), "non-empty dict of arrays"),
    (_clash_model, "site 'loglik' appears twice.*its own name"),
    (_latent_clash_model, "site 'mu' appears twice"),
    (_plate_model, r"'loglik' is inside plate\(s\) \['obs'\]"),
])
def test_bad_input_is_refused_when_the_posterior_is_built(model, match, no_jit):
    with pytest.raises(ModelError, match=match):
        bl.Posterior(model)
