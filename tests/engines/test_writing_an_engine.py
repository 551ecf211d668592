"""The example engine of docs/engines/writing.md, run as the page shows it: its code block is
executed as a module, registered, and checked on analytic posteriors (moments within 4 MCSE of
the exact ones), for input errors before compiling, and for compiling once."""

from __future__ import annotations


import arviz_stats as azs
import numpy as np
import pytest

import bayeslik as bl
from bayeslik.convergence import FitWarning
from bayeslik.errors import EngineError
from bayeslik.models import reference
from tests.harness import K, example_engine, example_engine_source



def _engine_source() -> str:
    return example_engine_source()


@pytest.fixture(scope="module")
def rwm():
    with example_engine() as mod:
        yield mod


def test_the_example_is_under_150_lines():
    assert len(_engine_source().strip().splitlines()) < 150


@pytest.mark.parametrize("name", ["normal_mean", "normal_inverse_gamma"])
def test_example_engine_matches_analytic_posteriors(rwm, name):
    prob = reference.get(name)
    fit = bl.fit(prob.posterior(), "rwm", seed=3, num_warmup=1000, num_samples=3000,
                 progress_bar=False)
    assert fit.engine == "rwm" and fit.num_chains == 4 and fit.num_draws == 3000
    assert "log_likelihood" in fit.idata.children
    for site, mean in prob.posterior_mean.items():
        draws = fit.draws(site)
        mcse = float(np.asarray(azs.mcse(fit.idata, var_names=[site])[site]))
        assert abs(draws.mean() - float(mean)) < K * mcse, (site, draws.mean(), mean, mcse)
        sd = float(prob.posterior_sd[site])
        assert abs(draws.std() / sd - 1) < 0.1, (site, draws.std(), sd)
    rate = float(fit.sample_stats["acceptance_rate"].mean())
    assert 0.15 < rate < 0.4, rate  # tuned to 0.234


def test_example_engine_rejects_bad_options_before_compiling(rwm):
    with pytest.raises(EngineError, match="RWM option num_chains=0: must be a positive integer"):
        bl.fit(reference.get("normal_mean").posterior(), "rwm", num_chains=0)
    with pytest.raises(EngineError, match="RWM option target_accept=1.5"):
        rwm.RWMConfig(target_accept=1.5)


def test_example_engine_compiles_once(rwm):
    post = reference.get("normal_mean").posterior()
    with pytest.warns(FitWarning):  # 100 draws of a random walk: flagged as too few, rightly
        bl.fit(post, "rwm", num_warmup=100, num_samples=100, progress_bar=False)
        again = bl.fit(post, "rwm", seed=1, num_warmup=100, num_samples=100, progress_bar=False)
    assert again.cost.compile_s == 0.0
