"""Multi-process runs with jax.distributed: two CPU processes on this machine split NUTS's chains
and both return the same Fit, equal chain by chain to a one-process run with the same seed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import bayeslik as bl
from bayeslik.models import reference

_WORKER = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    import json
    port, pid, out, seed = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    settings = json.loads(sys.argv[5])
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                               process_id=pid, initialization_timeout=120)
    import numpy as np
    import bayeslik as bl
    from bayeslik.models import reference
    post = reference.get("normal_mean").posterior()
    fit = bl.fit(post, "nuts", seed=seed, **settings)
    np.savez(out, mu=fit.draws("mu"), grads=fit.cost.num_grad_evals,
             step=fit.idata["sample_stats"]["step_size"].values)
    jax.distributed.shutdown()
""")

SETTINGS = dict(num_warmup=150, num_samples=100, num_chains=4, progress_bar=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_split_the_chains(tmp_path, seed):
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    outs = [str(tmp_path / f"p{i}.npz") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(port), str(i), outs[i], str(seed),
                               json.dumps(SETTINGS)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the two jax.distributed processes did not finish in 240 s")
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    r0, r1 = (np.load(o) for o in outs)
    # both processes return the same Fit, with all four chains
    assert r0["mu"].shape[:2] == (4, 100)
    np.testing.assert_array_equal(r0["mu"], r1["mu"])
    assert int(r0["grads"]) == int(r1["grads"])
    # and it is the one-process run, chain by chain (each chain has the same keys either way)
    post = reference.get("normal_mean").posterior()
    one = bl.fit(post, "nuts", seed=seed, **SETTINGS)
    np.testing.assert_allclose(r0["mu"], one.draws("mu"), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(r0["step"], one.idata["sample_stats"]["step_size"].values,
                               rtol=1e-5)
    assert int(r0["grads"]) == one.cost.num_grad_evals
