"""The contract every registered engine keeps, parametrised over ``bl.engines()`` so a newly
registered engine is covered automatically (it must add its settings to tests/harness.py SMALL):
a second fit compiles nothing, bad options and wrong posterior kinds fail before compiling,
the progress bar obeys ``progress_bar``, Ctrl-C gives an interrupted Fit or a KeyboardInterrupt
with a message, save/load round trips, and the Fit has the common schema."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import xarray as xr

import bayeslik as bl
from bayeslik.api import engine_spec
from bayeslik.errors import EngineError
from bayeslik.models import reference
from tests.harness import (EXAMPLE_ENGINE, example_engine, linear_gaussian_problem,
                           simulator_problem, small)


@pytest.fixture(scope="module", autouse=True)
def _example_engine_registered():
    if EXAMPLE_ENGINE in bl.engines.available():
        yield
        return
    with example_engine():
        yield

# every registered engine, and the one docs/engines/writing.md builds from scratch
ENGINES = sorted(set(bl.engines.available()) | {EXAMPLE_ENGINE})

# one bad option value per engine: (option, value)
BAD = {"nuts": ("num_samples", 0), "smc": ("num_particles", 0), "nested": ("num_live", 1),
       "nss": ("num_live", 1), "nested+surrogate": ("num_live", 1), "pmmh": ("num_particles", 0),
       "snl": ("num_simulations", 10),
       EXAMPLE_ENGINE: ("num_chains", 0)}

# a warm second fit still spends a little time in compiled-function dispatch/tracing caches
# (dynesty's host loop calls compiled functions for every batch): seconds allowed. The
# surrogate engine trains a fresh network ensemble each fit (measured: 0.6 s of a 5.7 s run on
# 2 shared cores); its bound is wider, and that partial recompile is worth a look by its owner.
COMPILE_AGAIN_S = {"nested+surrogate": 1.5}
COMPILE_AGAIN_DEFAULT_S = 0.5

# sample_stats every fit of an engine carries (engines not listed: only the common dims checked)
STATS = {"nuts": ("diverging", "lp", "tree_depth", "acceptance_rate", "energy", "step_size")}


def _is_statespace(engine: str) -> bool:
    """Whether the engine runs on StateSpacePosteriors (its registered ``accepts``)."""
    return any(issubclass(c, bl.StateSpacePosterior) for c in engine_spec(engine).accepts)


def _is_simulator(engine: str) -> bool:
    """Whether the engine runs on SimulatorPosteriors."""
    return any(issubclass(c, bl.SimulatorPosterior) for c in engine_spec(engine).accepts)


def _posterior(engine: str):
    if _is_statespace(engine):
        return linear_gaussian_problem(T=20)[0]
    if _is_simulator(engine):
        return simulator_problem()
    return reference.get("normal_mean").posterior()


def _wrong_posterior(engine: str):
    if _is_statespace(engine) or _is_simulator(engine):
        return reference.get("normal_mean").posterior()
    return linear_gaussian_problem(T=5)[0]


@pytest.fixture(scope="module", params=ENGINES)
def engine_fits(request):
    """(engine, posterior, first fit, second fit) with the engine's SMALL settings."""
    engine = request.param
    opts = small(engine)
    opts["progress_bar"] = False
    post = _posterior(engine)
    first = bl.fit(post, engine, seed=1, **opts)
    second = bl.fit(post, engine, seed=2, **opts)
    return engine, post, first, second


def test_second_fit_compiles_nothing(engine_fits):
    engine, _, first, second = engine_fits
    assert second.cost.compile_s <= COMPILE_AGAIN_S.get(engine, COMPILE_AGAIN_DEFAULT_S), (engine, first.cost.compile_s,
                                                      second.cost.compile_s)


@pytest.mark.parametrize("engine", ENGINES)
def test_bad_option_rejected_before_compile(engine, no_jit):
    if engine not in BAD:
        pytest.fail(f"engine {engine!r} has no bad option in tests/engines/test_contract.py BAD: add one")
    name, value = BAD[engine]
    with pytest.raises(EngineError, match=name):
        bl.fit(_posterior(engine), engine, **{**small(engine), name: value})


@pytest.mark.parametrize("engine", ENGINES)
def test_wrong_posterior_kind_rejected(engine, no_jit):
    with pytest.raises(EngineError, match="StateSpacePosterior|Posterior"):
        bl.fit(_wrong_posterior(engine), engine, **small(engine))


class _Stderr(io.StringIO):
    """A stderr that records what is written, raising KeyboardInterrupt once at the n-th write."""

    def __init__(self, interrupt_at: int | None = None):
        super().__init__()
        self.n, self.at = 0, interrupt_at

    def write(self, s):
        self.n += 1
        if self.at is not None and self.n == self.at:
            self.at = None
            raise KeyboardInterrupt
        return super().write(s)

    def isatty(self):
        return False


@pytest.mark.parametrize("bar", [True, False])
def test_progress_bar(engine_fits, bar, monkeypatch):
    engine, post, _, _ = engine_fits
    err = _Stderr()
    monkeypatch.setattr(sys, "stderr", err)
    bl.fit(post, engine, seed=3, **{**small(engine), "progress_bar": bar})
    assert (len(err.getvalue()) > 0) == bar, (engine, err.getvalue()[:200])


def test_interrupt(engine_fits, monkeypatch):
    """Ctrl-C is injected generically: the progress bar's second write to stderr raises it."""
    engine, post, _, _ = engine_fits
    monkeypatch.setattr(sys, "stderr", _Stderr(interrupt_at=2))
    try:
        fit = bl.fit(post, engine, seed=4, **{**small(engine), "progress_bar": True})
    except KeyboardInterrupt as e:
        assert str(e), f"{engine}: a bare KeyboardInterrupt; it must say what was lost"
    else:
        assert any("interrupted" in f for f in fit.flags), (engine, fit.flags)


def test_round_trip(engine_fits, tmp_path):
    engine, _, fit, _ = engine_fits
    fit.save(str(tmp_path / "f.nc"))
    back = bl.load_fit(str(tmp_path / "f.nc"))
    for group in fit.idata.children:
        xr.testing.assert_identical(fit.idata[group].to_dataset(), back.idata[group].to_dataset())
    assert back.engine == engine and back.cost == fit.cost and back.flags == fit.flags
    assert back.config == fit.config and back.seed == fit.seed
    assert (back.log_evidence, back.log_evidence_err) == (fit.log_evidence, fit.log_evidence_err)


def test_schema(engine_fits):
    engine, post, fit, _ = engine_fits
    tree = fit.idata
    assert fit.engine == engine and fit.seed == 1
    assert fit.cost.wall_s >= fit.cost.compile_s >= 0 and np.isfinite(fit.cost.wall_s)
    # a state-space posterior's likelihood is estimated, not pointwise: pmmh has no
    # log_likelihood group (and may have no observed_data)
    groups = ("posterior", "sample_stats") if _is_statespace(engine) else (
        "posterior", "sample_stats", "log_likelihood", "observed_data")
    for group in groups:
        assert group in tree.children, (engine, group)
    for site in post.latent_names:
        v = tree["posterior"][site]
        assert v.dims[:2] == ("chain", "draw"), (engine, site, v.dims)
        assert v.shape[:2] == (fit.num_chains, fit.num_draws)
    for name, v in tree["sample_stats"].data_vars.items():
        assert v.dims[:2] == ("chain", "draw"), (engine, name, v.dims)
    for name in STATS.get(engine, ()):
        assert tree["sample_stats"][name].shape == (fit.num_chains, fit.num_draws), (engine, name)
    if "diverging" in tree["sample_stats"]:
        assert tree["sample_stats"]["diverging"].dtype == bool
    if "log_likelihood" not in tree.children:
        return
    assert set(tree["log_likelihood"].data_vars) == set(tree["observed_data"].data_vars), engine
    for name, v in tree["log_likelihood"].data_vars.items():
        assert v.dims[:2] == ("chain", "draw")
        assert v.dims[2:] == tree["observed_data"][name].dims[:v.ndim - 2], (engine, name)
