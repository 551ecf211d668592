"""Faults, in the slow suite (``pytest -m slow tests/faults``): a process killed with SIGKILL in
the middle of writing a Fit leaves the previous file intact, every time; a full disk in the
middle of a save keeps the old file and the Fit in memory.

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


# the child saves a small Fit, then a big one under a file-size limit (a full disk, as the
# process sees it), then the big one again once the limit is lifted
_FULL_DISK = textwrap.dedent("""
    import dataclasses, os, resource, signal, sys
    import numpy as np
    import bayeslik as bl
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, like ENOSPC, instead of a signal
    fit = bl.load_fit(sys.argv[1])
    fit.save("fit.nc")
    before = open("fit.nc", "rb").read()
    post = fit.idata["posterior"].to_dataset()
    tree = fit.idata.copy()
    c, d = post.sizes["chain"], post.sizes["draw"]
    tree["posterior"] = post.assign(big=(("chain", "draw", "k"), np.ones((c, d, 2000))))
    big = dataclasses.replace(fit, idata=tree)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) * 3, hard))
    try:
        big.save("fit.nc")
        print("no error")
    except OSError as e:
        print("OSError", e)
    assert open("fit.nc", "rb").read() == before, "the previous file changed"
    assert sorted(os.listdir(".")) == ["fit.nc"], os.listdir(".")
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    big.save("elsewhere.nc")  # the Fit was still in memory, and h5py still works
    print("rescued", bl.load_fit("elsewhere.nc").idata["posterior"]["big"].shape)
""")


def test_full_disk_during_save_keeps_the_old_file_and_the_fit(tmp_path):
    """A full disk in the middle of a save: an OSError naming the path and saying the old file
    is unchanged; the old file byte for byte; no temporary file; the process goes on (it crashed
    with a segfault in HDF5 before) and the Fit can be saved elsewhere."""
    src = tmp_path / "src.nc"
    bl.fit(reference.get("normal_mean").posterior(), "nuts", seed=0, num_warmup=100,
           num_samples=200, progress_bar=False).save(str(src))
    work = tmp_path / "work"
    work.mkdir()
    res = subprocess.run([sys.executable, "-c", _FULL_DISK, str(src)], capture_output=True,
                         text=True, timeout=300, cwd=work)
    assert res.returncode == 0, (res.returncode, res.stderr[-3000:])
    lines = res.stdout.splitlines()
    assert lines[0].startswith("OSError") and "'fit.nc'" in lines[0], lines
    assert "previous file there (if any) is unchanged" in lines[0]
    assert lines[1].startswith("rescued (4, 200, 2000)"), lines
