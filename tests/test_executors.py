"""Many fits through an executor: Ray (a local instance started here) gives the same table."""

from __future__ import annotations

import numpy as np
import pytest

import bayeslik as bl
from bayeslik.models import reference

OPTS = {"nuts": {"num_warmup": 100, "num_samples": 100, "num_chains": 1}}


def test_ray_executor_runs_a_comparison_like_in_process():
    pytest.importorskip("ray")
    from bayeslik.executors import RayExecutor

    prob = reference.get("normal_mean")
    post = prob.posterior()
    here = bl.compare(post, ["nuts"], reference=prob, seeds=[0], engine_options=OPTS,
                      progress_bar=False)
    with RayExecutor(num_cpus=2) as ex:
        there = bl.compare(post, ["nuts"], reference=prob, seeds=[0], engine_options=OPTS,
                           executor=ex, progress_bar=False)
        with pytest.raises(ValueError):
            RayExecutor(cpus_per_task=0)
    assert (there.table["status"] == "ok").all()
    # same seeds, same engine: the same draws, computed in another process
    for seed_idx in range(1):
        np.testing.assert_allclose(there.fits["nuts"][seed_idx].draws("mu"),
                                   here.fits["nuts"][seed_idx].draws("mu"), rtol=1e-5)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(print, 1)
