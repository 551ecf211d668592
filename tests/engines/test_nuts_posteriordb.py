"""NUTS at its defaults agrees with the posteriordb reference draws, on the whole corpus.

31 posteriors written by others (posteriordb, reference draws by rstan), each in float32 and
float64: every parameter's mean within 4 combined Monte Carlo standard errors (ours and the
reference's, both from ArviZ), every standard deviation within 10% (or, for a heavy-tailed
parameter whose sd the reference itself pins down no better, within 4 combined MCSEs of the
sd: see ``posteriordb.check_against_reference``), no flag on the Fit
(divergences, tree-depth hits, split R-hat above 1.01, ESS below 100 per chain). The settings
are the defaults (4 chains x 1,000 warmup + 1,000 draws) plus what ``posteriordb.NUTS_OPTIONS``
records for a posterior. A fast subset runs in the default suite; the rest is ``slow``
(``pytest -m slow tests/engines/test_nuts_posteriordb.py``, about an hour on 2 cores).
"""

from __future__ import annotations

import warnings

import pytest

import bayeslik as bl
from bayeslik.convergence import FitWarning
from bayeslik.models import posteriordb
from tests.harness import K

SD_TOL = 0.10

#: quick posteriors that run in the default suite, one dtype each (the slow run does the rest)
FAST = {
    ("eight_schools-eight_schools_noncentered", "float32"),
    ("kidiq-kidscore_momhs", "float64"),
    ("earnings-logearn_interaction_z", "float32"),
    ("gp_pois_regr-gp_regr", "float64"),
}

#: known failures, with the reason (strict: an entry fails once fixed)
KNOWN_FAILING: dict[tuple[str, str], str] = {}

CASES = [
    pytest.param(name, dtype, marks=(() if (name, dtype) in FAST else (pytest.mark.slow,)) + (
        (pytest.mark.xfail(reason=KNOWN_FAILING[(name, dtype)], strict=True),)
        if (name, dtype) in KNOWN_FAILING else ()), id=f"{name}-{dtype}")
    for name in posteriordb.names() for dtype in ("float32", "float64")
]


def _check(name: str, seed: int) -> None:
    p = posteriordb.load(name)
    post = bl.Posterior(p["model"], **p["data"])
    opts = posteriordb.NUTS_OPTIONS.get(name, {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitWarning)  # asserted through fit.flags below
        fit = bl.fit(post, "nuts", seed=seed, progress_bar=False, **opts)
    assert not fit.flags, fit.flags
    res = posteriordb.check_against_reference(name, {k: fit.draws(k) for k in p["reference"]},
                                              p["reference"], k=K, sd_tol=SD_TOL)
    assert res["passed"], {key: (res["z"][key], res["sd_ratio"][key], res["sd_z"][key])
                           for key in res["z"]}


@pytest.mark.parametrize("name, dtype", CASES)
def test_matches_reference_draws(name, dtype, seed, request):
    if dtype == "float64":
        request.getfixturevalue("x64")
    _check(name, seed)


def test_check_can_fail():
    """The comparison rejects draws shifted by half a posterior sd and draws 20% too narrow."""
    p = posteriordb.load("kidiq-kidscore_momhs")
    ref = p["reference"]
    shifted = {k: v + 0.5 * v.std() for k, v in ref.items()}
    narrow = {k: v.mean() + 0.8 * (v - v.mean()) for k, v in ref.items()}
    res = posteriordb.check_against_reference("kidiq-kidscore_momhs", shifted)
    assert res["worst_z"] > K and not res["passed"]
    res = posteriordb.check_against_reference("kidiq-kidscore_momhs", narrow)
    assert abs(res["worst_sd_ratio"] - 0.8) < 1e-9 and not res["passed"]
    assert posteriordb.check_against_reference("kidiq-kidscore_momhs", ref)["passed"]


def test_every_posterior_is_bundled_with_its_source():
    """31 posteriors, each with Stan code, data, reference draws and their info, under the
    package (nothing read from outside the project)."""
    names = posteriordb.names()
    assert len(names) == 31
    for name in names:
        folder = posteriordb.DATA_DIR / name
        assert (folder / f"{name}.draws.json.zip").exists()
        assert (folder / f"{name}.draws_info.json").exists()
        assert posteriordb.stan_code(name).strip()
    readme = (posteriordb.DATA_DIR / "README.md").read_text()
    for name in names:
        assert name in readme, name
