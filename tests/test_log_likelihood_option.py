"""``bl.fit(..., log_likelihood="auto" | True | False)``, one option for every engine, and
``bl.pointwise_loglikelihood(fit, posterior)``, which adds the group later.

"auto" keeps the group under the budget (1 GiB, or ``BAYESLIK_LOG_LIKELIHOOD_MAX_BYTES``) and
otherwise leaves it out with a flag and a FitWarning; True keeps it whatever its size; False
never computes it and flags nothing. The draws do not depend on the option. The group added
later holds the numbers the fit would have made. No big data here: the budget is set to a few
bytes instead (the peak-memory measurement is benchmarks/loglikelihood_memory.py).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import bayeslik as bl
from bayeslik.convergence import FitWarning
from bayeslik.engines import kit
from bayeslik.errors import EngineError, OptionError
from tests.harness import EXAMPLE_ENGINE, example_engine, linear_gaussian_problem, small

ENV = "BAYESLIK_LOG_LIKELIHOOD_MAX_BYTES"
#: NUTS (chains of draws) and SMC (a weighted engine: equal-weight draws)
ENGINES = ["nuts", "smc"]
OPTIONS = {"nuts": dict(num_warmup=150, num_samples=100, num_chains=2),
           "smc": dict(num_particles=200)}


def _model(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
    with numpyro.plate("obs", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, sigma), obs=y)


@pytest.fixture(scope="module")
def post():
    y = np.random.default_rng(1).normal(0.5, 1.3, size=24).astype(np.float32)
    return bl.Posterior(_model, y=y)


def _fit(post, engine, **kw):
    """A quiet fit: FitWarnings other than the left-out flag's are not this file's business."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = bl.fit(post, engine, seed=3, progress_bar=False, **OPTIONS[engine], **kw)
    left_out = [w for w in caught
                if issubclass(w.category, FitWarning) and kit.LEFT_OUT in str(w.message)]
    return fit, left_out


def _left_out_flags(fit):
    return [f for f in fit.flags if f.startswith(kit.LEFT_OUT)]


@pytest.fixture(scope="module", params=ENGINES)
def kept(request, post):
    """(engine, the fit with log_likelihood=True)."""
    fit, _ = _fit(post, request.param, log_likelihood=True)
    return request.param, fit


def _same_draws(a, b):
    for name in ("mu", "sigma"):
        np.testing.assert_array_equal(a.draws(name), b.draws(name))


def test_auto_keeps_the_group_of_a_small_model(post, kept):
    engine, with_group = kept
    fit, left_out = _fit(post, engine)  # "auto" is the default
    assert "log_likelihood" in fit.idata.children
    assert not _left_out_flags(fit) and not left_out
    C, S = fit.num_chains, fit.num_draws
    assert fit.idata["log_likelihood"]["y"].shape == (C, S, 24)
    np.testing.assert_array_equal(fit.idata["log_likelihood"]["y"].values,
                                  with_group.idata["log_likelihood"]["y"].values)
    _same_draws(fit, with_group)


def test_auto_leaves_it_out_over_the_budget_with_a_flag_and_a_warning(post, kept, monkeypatch):
    engine, with_group = kept
    monkeypatch.setenv(ENV, "16")
    fit, left_out = _fit(post, engine)
    assert "log_likelihood" not in fit.idata.children
    (flag,) = _left_out_flags(fit)
    assert len(left_out) == 1 and flag in str(left_out[0].message)
    C, S = fit.num_chains, fit.num_draws
    nbytes = C * S * 24 * 4
    assert f"{C} chain(s) x {S} draws x 24 terms x 4 bytes" in flag, flag
    assert f"{nbytes / 1024:.1f} KiB" in flag and "16 B budget" in flag and ENV in flag, flag
    assert "log_likelihood=True" in flag and "bl.pointwise_loglikelihood" in flag, flag
    _same_draws(fit, with_group)  # the draws do not depend on the option
    # the rest of the Fit is as it was
    assert set(fit.idata.children) == set(with_group.idata.children) - {"log_likelihood"}
    assert fit.log_evidence == with_group.log_evidence


def test_false_leaves_it_out_with_no_flag(post, kept):
    engine, with_group = kept
    fit, left_out = _fit(post, engine, log_likelihood=False)
    assert "log_likelihood" not in fit.idata.children
    assert not _left_out_flags(fit) and not left_out
    assert "log_likelihood" not in fit.config  # a bl.fit option, not an engine setting
    _same_draws(fit, with_group)


def test_true_keeps_it_despite_a_tiny_budget(post, kept, monkeypatch):
    engine, with_group = kept
    monkeypatch.setenv(ENV, "1")
    fit, left_out = _fit(post, engine, log_likelihood=True)
    assert "log_likelihood" in fit.idata.children and not _left_out_flags(fit) and not left_out
    np.testing.assert_array_equal(fit.idata["log_likelihood"]["y"].values,
                                  with_group.idata["log_likelihood"]["y"].values)


def test_the_group_added_later_is_the_one_the_fit_makes(post, kept, monkeypatch, tmp_path):
    engine, with_group = kept
    monkeypatch.setenv(ENV, "16")
    without, _ = _fit(post, engine)
    assert _left_out_flags(without)
    # through a file too: a Fit saved without the group gets it after loading
    without.save(tmp_path / "fit.nc")
    for fit in (without, bl.load_fit(tmp_path / "fit.nc")):
        later = bl.pointwise_loglikelihood(fit, post)
        assert "log_likelihood" not in fit.idata.children  # the Fit given is unchanged
        assert not _left_out_flags(later)  # its flag no longer holds
        assert [f for f in later.flags] == [f for f in fit.flags if not f.startswith(kit.LEFT_OUT)]
        got, want = later.idata["log_likelihood"]["y"], with_group.idata["log_likelihood"]["y"]
        assert got.dims == want.dims and got.dtype == want.dtype
        np.testing.assert_array_equal(got["chain"].values, want["chain"].values)
        np.testing.assert_array_equal(got["draw"].values, want["draw"].values)
        # the draws are mapped back to their unconstrained points (sigma = exp(z): log(exp(z))
        # is z to an ulp in float32), so the numbers agree to float32 rounding
        np.testing.assert_allclose(got.values, want.values, rtol=2e-6, atol=2e-6)
        _same_draws(later, with_group)


def test_chunks_do_not_change_the_numbers(post, kept, monkeypatch):
    """Chunks of 8 draws (a cap of 8 draws' log-likelihood bytes) instead of one: the same
    group and draws, in the fit and in the group added later."""
    engine, with_group = kept
    monkeypatch.setattr("bayeslik.engines._programs.CHUNK_BYTES", 8 * 24 * 4)
    fit, _ = _fit(post, engine, log_likelihood=True)
    want = with_group.idata["log_likelihood"]["y"].values
    np.testing.assert_array_equal(fit.idata["log_likelihood"]["y"].values, want)
    _same_draws(fit, with_group)
    default = bl.pointwise_loglikelihood(with_group, post).idata["log_likelihood"]["y"].values
    chunked = bl.pointwise_loglikelihood(with_group, post, chunk_bytes=8 * 24 * 4)
    np.testing.assert_array_equal(chunked.idata["log_likelihood"]["y"].values, default)


def test_bad_option_values_fail_before_anything_runs(post, no_jit, monkeypatch):
    with pytest.raises(EngineError, match=r"fit option log_likelihood='yes': must be 'auto', "
                                          r"True or False"):
        bl.fit(post, "nuts", log_likelihood="yes")
    with pytest.raises(EngineError, match="fit option log_likelihood=1"):
        bl.fit(post, "nuts", log_likelihood=1)
    monkeypatch.setenv(ENV, "a lot")
    with pytest.raises(EngineError, match=f"{ENV}='a lot': must be a whole number of bytes"):
        bl.fit(post, "nuts")
    monkeypatch.setenv(ENV, "-5")
    with pytest.raises(EngineError, match=ENV):
        bl.fit(post, "nuts")


def test_budget_from_the_environment(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert kit.loglikelihood_budget() == 2**30
    monkeypatch.setenv(ENV, "5e8")
    assert kit.loglikelihood_budget() == 500_000_000
    monkeypatch.setenv(ENV, "123_456")
    assert kit.loglikelihood_budget() == 123456


@pytest.fixture(scope="module")
def ssm_post():
    return linear_gaussian_problem(T=10)[0]


def test_true_is_refused_where_there_is_no_pointwise_loglikelihood(ssm_post, no_jit):
    with pytest.raises(EngineError, match="log_likelihood=True: a StateSpacePosterior has no "
                                          "pointwise log-likelihood"):
        bl.fit(ssm_post, "pmmh", log_likelihood=True)


def test_an_engine_that_does_not_ask_still_follows_the_option(post, monkeypatch):
    """The docs' example engine always passes its log_likelihood to kit.chains_fit; the kit
    applies the option there."""
    with example_engine():
        opts = dict(small(EXAMPLE_ENGINE), num_warmup=100, num_samples=100, progress_bar=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FitWarning)
            kept_ = bl.fit(post, EXAMPLE_ENGINE, seed=1, **opts)
            off = bl.fit(post, EXAMPLE_ENGINE, seed=1, log_likelihood=False, **opts)
            monkeypatch.setenv(ENV, "16")
            auto = bl.fit(post, EXAMPLE_ENGINE, seed=1, **opts)
    assert "log_likelihood" in kept_.idata.children
    assert "log_likelihood" not in off.idata.children and not _left_out_flags(off)
    assert "log_likelihood" not in auto.idata.children
    (flag,) = _left_out_flags(auto)
    assert "2 chain(s) x 100 draws x 24 terms x 4 bytes" in flag, flag


def test_pointwise_loglikelihood_refuses_another_posterior(post, kept, ssm_post):
    _, fit = kept
    other = bl.Posterior(_model, y=np.zeros(5, np.float32))
    with pytest.raises(OptionError, match="observed site 'y' has shape"):
        bl.pointwise_loglikelihood(fit, other)

    def one_site(y):
        numpyro.sample("y", dist.Normal(numpyro.sample("m", dist.Normal(0, 1)), 1.0), obs=y)

    with pytest.raises(OptionError, match=r"lacks the latent site\(s\) \['m'\]"):
        bl.pointwise_loglikelihood(fit, bl.Posterior(one_site, y=np.zeros(24, np.float32)))
    with pytest.raises(OptionError, match="no pointwise log-likelihood"):
        bl.pointwise_loglikelihood(fit, ssm_post)


# ---------------------------------------------------------------------------- bounded chunks
class _Square(kit.Programs):
    def __init__(self):
        super().__init__()
        self.calls = []

        def square(rows, scale):
            return {"sq": rows ** 2 * scale, "sum": jnp.sum(rows, axis=-1)}

        self._fns = {"square": jax.jit(square)}

    def __call__(self, name, *args):
        self.calls.append(jax.tree.leaves(args)[0].shape)
        return super().__call__(name, *args)


def test_map_into_gives_map_padded_numbers_in_chunks_of_bounded_bytes():
    rows = np.arange(37 * 3, dtype=np.float32).reshape(37, 3)
    progs = _Square()
    want = progs.map_padded("square", rows, np.float32(2.0), smallest=4)
    progs.calls.clear()
    # a row's results take 4 x (3 + 1) = 16 bytes: 100 bytes hold 6 rows, so chunks of 4
    got = progs.map_into("square", rows, np.float32(2.0), smallest=4, chunk_bytes=100)
    assert progs.calls == [(4, 3)] * 10, progs.calls  # 9 whole chunks and 1 padded to 4
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
        assert got[k].dtype == want[k].dtype and got[k].flags.owndata
    # without a byte cap in reach, the shapes map_padded compiles (one chunk, bucket >= 64)
    progs.calls.clear()
    again = progs.map_into("square", rows, np.float32(2.0), smallest=64)
    assert progs.calls == [(64, 3)]
    np.testing.assert_array_equal(again["sq"], want["sq"])


def test_map_into_along_the_second_axis_and_on_a_pytree():
    progs = _Square()
    rows = np.random.default_rng(0).normal(size=(2, 11, 3)).astype(np.float32)
    got = progs.map_into("square", rows, np.float32(1.0), axis=1, chunk_bytes=2 * 16 * 4)
    assert all(s == (2, 4, 3) for s in progs.calls), progs.calls
    np.testing.assert_allclose(got["sq"], rows ** 2)
    np.testing.assert_allclose(got["sum"], rows.sum(-1), rtol=1e-6)

    class Tree(kit.Programs):
        def __init__(self):
            super().__init__()
            self._fns = {"f": jax.jit(lambda t: {"out": t["a"] + t["b"][:, :1]})}

    tree = {"a": np.ones((5, 2), np.float32), "b": np.arange(10, dtype=np.float32).reshape(5, 2)}
    np.testing.assert_array_equal(Tree().map_into("f", tree, chunk_bytes=8)["out"],
                                  tree["a"] + tree["b"][:, :1])
