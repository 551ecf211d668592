"""NUTS on posteriordb posteriors agrees with their reference draws.

Means within K combined Monte Carlo standard errors (ours and the reference's, both from ArviZ),
standard deviations within 10%.
"""

from __future__ import annotations

import arviz_base as azb
import arviz_stats as azs
import numpy as np
import pytest

import bayeslik as bl
from bayeslik.models import posteriordb

K = 4.0


def _mcse(draws: dict[str, np.ndarray], kind: str) -> dict[str, np.ndarray]:
    tree = azb.from_dict({"posterior": draws})
    out = azs.mcse(tree, group="posterior", method=kind)
    return {k: np.asarray(out[k]) for k in draws}


@pytest.mark.parametrize(
    "name", ["eight_schools-eight_schools_noncentered", "arK-arK", "garch-garch11"]
)
def test_matches_reference_draws(name, seed):
    p = posteriordb.load(name)
    post = bl.Posterior(p["model"], **p["data"])
    fit = bl.fit(post, "nuts", seed=seed, num_warmup=500, num_samples=1000, num_chains=4,
                 target_accept=0.9, progress_bar=False)
    ref = p["reference"]
    ours = {k: fit.draws(k) for k in ref}
    ref_mcse, our_mcse = _mcse(ref, "mean"), _mcse(ours, "mean")
    for k, r in ref.items():
        r_flat = r.reshape((-1,) + r.shape[2:])
        o_flat = ours[k].reshape((-1,) + r.shape[2:])
        z = (o_flat.mean(0) - r_flat.mean(0)) / np.sqrt(our_mcse[k] ** 2 + ref_mcse[k] ** 2)
        assert np.all(np.abs(z) < K), (k, z)
        ratio = o_flat.std(0) / r_flat.std(0)
        assert np.all(np.abs(ratio - 1) < 0.10), (k, ratio)
    divergences = int(fit.idata["sample_stats"]["diverging"].sum())
    assert divergences < 10, divergences
