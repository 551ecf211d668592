"""Simulation-based calibration: passes a correct engine, flags wrong ones."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from numpyro.primitives import Messenger

import bayeslik as bl
from bayeslik.engines import nuts
from bayeslik.models import reference
from bayeslik.posterior import Posterior
from bayeslik.sbc import ecdf_uniformity_test, sbc

OPTS = dict(num_warmup=150, num_samples=100, num_chains=2)


class _ScaleLikelihood(Messenger):
    def __init__(self, fn=None, factor=1.0):
        self.factor = factor
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] == "sample" and msg["is_observed"]:
            msg["scale"] = self.factor * (msg["scale"] if msg["scale"] is not None else 1.0)


@dataclasses.dataclass(frozen=True)
class TemperedNUTS(nuts.NUTSConfig):
    """A deliberately wrong engine: NUTS on the posterior with the likelihood scaled."""

    likelihood_scale: float = 0.5


class _Scaled:
    def __init__(self, model, factor):
        self.model, self.factor = model, factor
        self.__name__ = getattr(model, "__name__", "model")

    def __call__(self, *a, **k):
        with _ScaleLikelihood(factor=self.factor):
            return self.model(*a, **k)

    def __eq__(self, o):
        return isinstance(o, _Scaled) and (self.model, self.factor) == (o.model, o.factor)

    def __hash__(self):
        return hash((self.model, self.factor))


def _run_tempered(posterior, rng_key, config):
    wrong = Posterior(_Scaled(posterior.model, config.likelihood_scale), *posterior.args, **posterior.data)
    base = {f.name: getattr(config, f.name) for f in dataclasses.fields(nuts.NUTSConfig)}
    return nuts.run(wrong, rng_key, nuts.NUTSConfig(**base))


@pytest.fixture(scope="module")
def tempered_engine():
    """Registered for this module's tests only (a global registration would reach every test
    that loops over the registry, e.g. the contract suite)."""
    from bayeslik.api import unregister_engine

    bl.register_engine("test_tempered_nuts", TemperedNUTS, _run_tempered,
                       "NUTS on a tempered posterior (wrong on purpose)")
    yield "test_tempered_nuts"
    unregister_engine("test_tempered_nuts")


def test_ecdf_test_uniform_and_not():
    rng = np.random.default_rng(0)
    _, p_ok = ecdf_uniformity_test(rng.uniform(size=200))
    _, p_bad = ecdf_uniformity_test(rng.beta(1.5, 1.5, size=200))  # ranks bunched in the middle
    assert p_ok > 0.05 and p_bad < 0.01


@pytest.fixture(scope="module")
def normal_mean():
    return reference.get("normal_mean")


def test_correct_engine_passes(normal_mean, seed):
    res = sbc(normal_mean.model, "nuts", num_simulations=200, num_draws=49, seed=seed,
              engine_options=OPTS, progress_bar=False, **normal_mean.data)
    assert res.passed, res
    assert set(res.table.index) == {"mu", "log_likelihood"}
    assert res.ranks["mu"].shape == (200,) and np.all(res.ranks["mu"] <= res.draws_kept)
    assert res.num_failed == 0 and np.all(res.draws_kept == np.minimum(49, np.floor(res.min_ess)))
    tree = res.to_datatree()
    assert tree["sbc"]["rank_mu"].shape == (200,)
    fig = res.plot()
    assert len(fig.axes) == 4


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_wrong_engine_is_flagged(normal_mean, seed, scale, tempered_engine):
    """The likelihood scaled by 0.5 (posteriors too wide: central intervals over-cover) or by 2
    (too narrow: they under-cover) is flagged."""
    res = sbc(normal_mean.model, tempered_engine, num_simulations=200, num_draws=49,
              seed=seed, engine_options=dict(OPTS, likelihood_scale=scale), progress_bar=False,
              **normal_mean.data)
    assert not res.passed, res
    if scale < 1:
        assert res.table.loc["mu", "coverage_50"] > 0.5
    else:
        assert res.table.loc["mu", "coverage_50"] < 0.5


def test_bad_inputs():
    p = reference.get("normal_mean")
    with pytest.raises(bl.EngineError, match="num_simulations=5"):
        sbc(p.model, "nuts", num_simulations=5, **p.data)
    with pytest.raises(bl.EngineError, match="unknown engine"):
        sbc(p.model, "nutz", **p.data)
    from tests.test_errors import improper_model

    with pytest.raises(bl.ImproperPriorError, match="simulation-based calibration"):
        sbc(improper_model, "nuts", y=np.ones(3))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["normal_mean", "normal_inverse_gamma", "correlated_gaussian", "eight_schools"])
def test_reference_problems_calibrated(name, seed):
    p = reference.get(name)
    res = sbc(p.model, "nuts", num_simulations=300, num_draws=99, seed=seed,
              engine_options=dict(num_warmup=300, num_samples=250, num_chains=2, target_accept=0.95),
              progress_bar=False, **p.data)
    print(res)
    assert res.passed, res
