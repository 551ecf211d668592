"""Checkpoints of the "nested" engine are signed, fingerprinted and locked
(:mod:`bayeslik.checkpoints`): a crafted or modified checkpoint runs no code and is refused, a
resume with other data, settings or versions is refused naming what differs, two runs on one
path are refused up front, a stale lock is taken over, an unusable directory is refused before
the run, the files are private, and a checkpoint + resume round trip gives the uninterrupted
run's answer. The tests' key lives in a temporary BAYESLIK_CONFIG_DIR, never in the home.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys

import jax
import numpy as np
import pytest

import bayeslik as bl
from bayeslik import checkpoints
from bayeslik.engines import nested
from bayeslik.engines.nested import NestedConfig
from bayeslik.errors import EngineError
from bayeslik.models import nested_suite, reference


@pytest.fixture(scope="module", autouse=True)
def key_dir(tmp_path_factory):
    """One key for the module, in a temporary config directory."""
    folder = tmp_path_factory.mktemp("config") / "bayeslik"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BAYESLIK_CONFIG_DIR", str(folder))
        yield folder


@pytest.fixture(scope="module")
def shells():
    """ONE Posterior for the module: its compiled functions are cached per Posterior object."""
    return nested_suite.get("gaussian_shells_2d").posterior()


def small(**kw) -> NestedConfig:
    return NestedConfig(**{"num_live": 50, "progress_bar": False, "checkpoint_every": 0.05, **kw})


@pytest.fixture(scope="module")
def finished(shells, tmp_path_factory):
    """A finished run's signed checkpoint."""
    path = str(tmp_path_factory.mktemp("finished") / "run.pkl")
    nested.run(shells, jax.random.key(0), small(checkpoint_file=path))
    return path


def copied(src: str, folder) -> str:
    """The checkpoint ``src`` and its sidecar copied into ``folder``; the copy's path."""
    dst = str(folder / os.path.basename(src))
    shutil.copyfile(src, dst)
    shutil.copyfile(src + ".sig", dst + ".sig")
    return dst


@pytest.fixture
def no_jit(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("jax.jit was called: the refusal must come before any compile")

    monkeypatch.setattr(jax, "jit", forbidden)


class _Payload:
    """Unpickling it creates the file ``marker`` (what a hostile checkpoint could do)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crafted(path: str, marker: str) -> None:
    with open(path, "wb") as f:
        f.write(__import__("pickle").dumps(
            {"sampler": _Payload(marker), "version": "3.1.0", "format_version": 1}))


# ----------------------------------------------------------------------------- no code from files
def test_crafted_checkpoint_without_signature_runs_no_code(shells, tmp_path, no_jit):
    ckpt, marker = str(tmp_path / "run.pkl"), str(tmp_path / "marker")
    crafted(ckpt, marker)
    with pytest.raises(EngineError, match="no valid signature") as err:
        bl.fit(shells, "nested", num_live=50, progress_bar=False, checkpoint_file=ckpt,
               resume=True)
    assert ckpt in str(err.value) and "resume=False" in str(err.value)
    assert not os.path.exists(marker)
    assert not os.path.exists(ckpt + ".lock")  # released on the refusal


def test_crafted_checkpoint_with_forged_signature_runs_no_code(shells, finished, tmp_path):
    ckpt, marker = copied(finished, tmp_path), str(tmp_path / "marker")
    genuine = json.loads(open(ckpt + ".sig").read())
    crafted(ckpt, marker)
    for forged in (genuine, {**genuine, "hmac": "ab" * 32}):  # another file's, a made-up one
        with open(ckpt + ".sig", "w") as f:
            json.dump(forged, f)
        with pytest.raises(EngineError, match="does not match its contents") as err:
            nested.run(shells, jax.random.key(0), small(checkpoint_file=ckpt, resume=True))
        assert ckpt in str(err.value) and "not written by this user's bayeslik" in str(err.value)
        assert not os.path.exists(marker)


def test_modified_checkpoint_refused(shells, finished, tmp_path):
    ckpt = copied(finished, tmp_path)
    data = bytearray(open(ckpt, "rb").read())
    data[len(data) // 2] ^= 1
    open(ckpt, "wb").write(bytes(data))
    with pytest.raises(EngineError, match="modified"):
        nested.run(shells, jax.random.key(0), small(checkpoint_file=ckpt, resume=True))


def test_unsafe_key_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("BAYESLIK_CONFIG_DIR", str(tmp_path / "cfg"))
    key = checkpoints.load_key(create=True)
    assert len(key) == 32 and checkpoints.load_key(create=False) == key
    os.chmod(checkpoints.key_path(), 0o644)
    with pytest.raises(EngineError, match="chmod 600"):
        checkpoints.load_key(create=False)


# ----------------------------------------------------------------------------- the fingerprint
def test_resume_with_other_data_refused(tmp_path, monkeypatch):
    prob = reference.normal_mean()
    ckpt = str(tmp_path / "run.pkl")
    nested.run(prob.posterior(), jax.random.key(0), small(checkpoint_file=ckpt))
    other = bl.Posterior(prob.model, **{**prob.data, "y": prob.data["y"] + 1.0})
    monkeypatch.setattr(jax, "jit", lambda *a, **k: pytest.fail("compiled before refusing"))
    with pytest.raises(EngineError, match="data differs: y") as err:
        nested.run(other, jax.random.key(0), small(checkpoint_file=ckpt, resume=True))
    assert "settings differ" not in str(err.value) and "program differs" not in str(err.value)


def test_resume_with_other_settings_refused(shells, finished, tmp_path, no_jit):
    ckpt = copied(finished, tmp_path)
    with pytest.raises(EngineError, match=r"num_live \(50 in the checkpoint, 60 now\)"):
        nested.run(shells, jax.random.key(0), small(num_live=60, checkpoint_file=ckpt,
                                                    resume=True))


def test_resume_with_other_versions_refused(shells, finished, tmp_path, monkeypatch):
    ckpt = copied(finished, tmp_path)
    real = checkpoints.package_versions
    monkeypatch.setattr(checkpoints, "package_versions",
                        lambda names: {**real(names), "jax": "0.0.1"})
    with pytest.raises(EngineError, match=r"versions differ: jax \("):
        nested.run(shells, jax.random.key(0), small(checkpoint_file=ckpt, resume=True))


# ----------------------------------------------------------------------------- the lock
def _lock(ckpt: str, pid: int) -> None:
    with open(ckpt + ".lock", "w") as f:
        json.dump({"pid": pid, "host": socket.gethostname()}, f)


def test_second_run_on_a_locked_path_refused(shells, tmp_path, no_jit):
    ckpt = str(tmp_path / "run.pkl")
    first = checkpoints.CheckpointFile(ckpt, {}, owner="Test")
    with first:  # a live run of this process holds it
        with pytest.raises(EngineError, match=f"in use by another run \\(pid {os.getpid()}") as e:
            nested.run(shells, jax.random.key(0), small(checkpoint_file=ckpt))
        assert ckpt in str(e.value)
        assert os.path.exists(ckpt + ".lock")  # the refused run left the holder's lock alone
    assert not os.path.exists(ckpt + ".lock")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # ... and a live child process
        _lock(ckpt, child.pid)
        with pytest.raises(EngineError, match=f"pid {child.pid}"):
            nested.run(shells, jax.random.key(0), small(checkpoint_file=ckpt))
    finally:
        child.kill()
        child.wait()


def test_stale_lock_taken_over(shells, tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # its pid no longer exists
    ckpt = str(tmp_path / "run.pkl")
    _lock(ckpt, child.pid)
    with pytest.warns(RuntimeWarning, match=f"stale lock .*pid {child.pid}"):
        fit = nested.run(shells, jax.random.key(0), small(checkpoint_file=ckpt))
    assert np.isfinite(fit.log_evidence)
    assert not os.path.exists(ckpt + ".lock")


class CallLimit:
    """A pass-through likelihood wrapper that raises ``error`` after ``limit`` points, and
    records whether the lock was there (and private) while the run went."""

    def __init__(self, ckpt: str, limit: int | None = None, error=RuntimeError):
        self.ckpt, self.limit, self.error, self.lock_modes = ckpt, limit, error, set()

    def __call__(self, true_fn, posterior, rng_key):
        seen = [0]

        def fn(u):
            seen[0] += len(u)
            lock = self.ckpt + ".lock"
            self.lock_modes.add(stat.S_IMODE(os.stat(lock).st_mode) if os.path.exists(lock)
                                else None)
            if self.limit is not None and seen[0] > self.limit and os.path.exists(self.ckpt):
                raise self.error("stop here")
            return true_fn(u)

        return fn


def test_lock_removed_on_error_and_on_ctrl_c(shells, tmp_path):
    ckpt = str(tmp_path / "run.pkl")
    failing = CallLimit(ckpt, 1000)
    with pytest.raises(RuntimeError, match="stop here"):
        nested.run(shells, jax.random.key(0), small(checkpoint_file=ckpt),
                   loglikelihood_wrapper=failing)
    assert failing.lock_modes == {0o600}
    assert not os.path.exists(ckpt + ".lock")
    interrupted = CallLimit(ckpt, 1000, KeyboardInterrupt)
    fit = nested.run(shells, jax.random.key(0), small(checkpoint_file=ckpt),
                     loglikelihood_wrapper=interrupted)
    assert any("interrupted" in f for f in fit.flags)
    assert not os.path.exists(ckpt + ".lock")


# ----------------------------------------------------------------------------- targets, files
def test_unusable_directory_refused_before_the_run(shells, tmp_path, no_jit):
    missing = str(tmp_path / "nowhere" / "run.pkl")
    with pytest.raises(EngineError, match="does not exist"):
        nested.run(shells, jax.random.key(0), small(checkpoint_file=missing))
    with pytest.raises(EngineError, match="is a directory"):
        nested.run(shells, jax.random.key(0), small(checkpoint_file=str(tmp_path)))
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(EngineError, match="not writable"):
            nested.run(shells, jax.random.key(0), small(checkpoint_file=str(folder / "r.pkl")))
    finally:
        folder.chmod(0o700)


def test_files_are_private(finished, key_dir):
    for path in (finished, finished + ".sig", key_dir / "checkpoint.key"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    assert stat.S_IMODE(os.stat(key_dir).st_mode) == 0o700
    leftovers = [n for n in os.listdir(os.path.dirname(finished)) if ".tmp" in n]
    assert not leftovers and not os.path.exists(finished + ".lock")


def test_kill_between_writes_leaves_a_file_that_verifies(tmp_path, monkeypatch):
    """The sidecar accepts the old bytes until the new ones are renamed into place."""
    ckpt = checkpoints.CheckpointFile(tmp_path / "c.pkl", {"settings": {}})
    with ckpt:
        ckpt.write(b"first")

        def killed(src, dst):
            raise KeyboardInterrupt  # as if the process died just before the rename

        monkeypatch.setattr(os, "replace", lambda src, dst: killed(src, dst)
                            if dst == ckpt.path else shutil.move(src, dst))
        with pytest.raises(KeyboardInterrupt):
            ckpt.write(b"second")
        monkeypatch.undo()
        reader = checkpoints.CheckpointFile(ckpt.path, {"settings": {}})
        assert reader.read_verified() == b"first"
        ckpt.write(b"third")
    assert checkpoints.CheckpointFile(ckpt.path, {"settings": {}}).read_verified() == b"third"


# ----------------------------------------------------------------------------- the round trip
@pytest.mark.parametrize("batch", [True, False])
def test_interrupted_run_resumes_to_the_same_answer(shells, tmp_path, batch):
    """A run stopped mid-way (an error after its checkpoint) and resumed gives exactly the
    uninterrupted run's answer; its mid-run checkpoint verifies."""
    ckpt = str(tmp_path / "run.pkl")
    cfg = small(checkpoint_file=ckpt, batch=batch)
    whole = nested.run(shells, jax.random.key(0), small(batch=batch),
                       loglikelihood_wrapper=CallLimit(ckpt))
    with pytest.raises(RuntimeError, match="stop here"):
        nested.run(shells, jax.random.key(0), cfg, loglikelihood_wrapper=CallLimit(ckpt, 1500))
    fp = json.loads(open(ckpt + ".sig").read())["fingerprint"]
    assert checkpoints.CheckpointFile(ckpt, fp).read_verified() == open(ckpt, "rb").read()
    resumed = nested.run(shells, jax.random.key(0), NestedConfig(**{
        **cfg.__dict__, "resume": True}), loglikelihood_wrapper=CallLimit(ckpt))
    extra = resumed.cost.extra
    assert 0 < extra["resumed_from_iteration"] < extra["niter"] == whole.cost.extra["niter"]
    assert resumed.log_evidence == whole.log_evidence
    assert resumed.log_evidence_err == whole.log_evidence_err
    np.testing.assert_array_equal(resumed.idata["nested_samples"]["loglikelihood"].values,
                                  whole.idata["nested_samples"]["loglikelihood"].values)
