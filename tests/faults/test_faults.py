"""Faults, in the slow suite (``pytest -m slow tests/faults``): a process killed with SIGKILL in
the middle of writing a Fit leaves the previous file intact, every time.

The other faults issue #19 lists are tested in the default suite beside the code they exercise:
a nested run SIGKILLed mid-way resumes from its last checkpoint
(tests/engines/test_nested.py::test_checkpoint_resume_after_sigkill); crafted, forged or
modified checkpoints run no code and are refused, a resume with other data, settings or
versions is refused, two writers on one checkpoint are refused, unusable targets are refused up
front (tests/engines/test_checkpoints.py); a failed save keeps the old file and a damaged file
is named on load (tests/test_persistence.py); a bad ``--out`` is refused before the run
(tests/test_cli.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import bayeslik as bl
from bayeslik.models import reference

pytestmark = pytest.mark.slow

# the child saves a ~16 MB Fit to the target over and over, printing after each save
_CHILD = textwrap.dedent("""
    import dataclasses, sys
    import numpy as np
    import bayeslik as bl
    src, target = sys.argv[1], sys.argv[2]
    fit = bl.load_fit(src)
    post = fit.idata["posterior"].to_dataset()
    c, d = post.sizes["chain"], post.sizes["draw"]
    big = np.random.default_rng(0).random((c, d, 4000 // c))
    tree = fit.idata.copy()
    tree["posterior"] = post.assign(big=(("chain", "draw", "k"), big))
    fit = dataclasses.replace(fit, idata=tree)
    while True:
        fit.save(target)
        print("saved", flush=True)
""")


def test_sigkill_during_save_leaves_the_previous_file_intact(tmp_path):
    src = tmp_path / "small.nc"
    fit = bl.fit(reference.get("normal_mean").posterior(), "nuts", seed=0, num_warmup=200,
                 num_samples=1000, progress_bar=False)
    fit.save(str(src))
    target = tmp_path / "fit.nc"
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    rng = np.random.default_rng(1)
    for trial in range(8):
        child = subprocess.Popen([sys.executable, str(script), str(src), str(target)],
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "saved"  # one complete file exists
        t0 = time.perf_counter()
        child.stdout.readline()  # a second save: its duration sets the kill window
        duration = time.perf_counter() - t0
        time.sleep(float(rng.uniform(0.0, duration)))  # somewhere inside a later save
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        back = bl.load_fit(str(target))  # the last complete save, whole
        np.testing.assert_array_equal(back.draws("mu"), fit.draws("mu"))
        assert back.idata["posterior"]["big"].shape[:2] == (fit.num_chains, fit.num_draws)
        stray = [p.name for p in tmp_path.iterdir() if p.name.startswith(".fit.nc")]
        for name in stray:  # a killed save may leave its temporary file, never a broken target
            os.remove(tmp_path / name)
