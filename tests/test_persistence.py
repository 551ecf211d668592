"""Saving and loading Fits under faults and hostile files, and numpyro.param sites refused.

Fit.save is atomic (a temporary file beside the target, fsync, rename): a failed or interrupted
write leaves the previous file byte for byte, and a reader holding it open keeps its bytes. The
target is checked before writing (OptionError naming it; the Fit stays in memory). load_fit
closes the file, refuses files whose declared variables exceed a memory limit before reading
them, reports damaged and foreign files as DataError naming the file, and reads a newer
bayeslik's file with unknown Cost fields (kept in cost.extra) and facts (ignored), with a warning.
"""

from __future__ import annotations

import errno
import json
import os
import sys

import h5netcdf
import h5py
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
import xarray as xr
from numpyro.distributions import constraints

import bayeslik as bl
from bayeslik.errors import DataError, ModelError, OptionError
from bayeslik.fit import Cost, Fit, build_datatree

POSIX = pytest.mark.skipif(sys.platform == "win32", reason="POSIX rename and /proc semantics")


def _model(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    with numpyro.plate("obs", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, sigma), obs=y)


@pytest.fixture(scope="module")
def post():
    return bl.Posterior(_model, y=np.array([0.3, -1.2, 0.8]))


def _fit(post, shift: float = 0.0) -> Fit:
    """A Fit built by hand (no engine, nothing compiled); ``shift`` makes another one."""
    rng = np.random.default_rng(1)
    draws = {"mu": rng.normal(size=(2, 40)) + shift, "sigma": rng.gamma(2.0, size=(2, 40))}
    tree = build_datatree(post, draws, sample_stats={"lp": rng.normal(size=(2, 40))},
                          log_likelihood={"y": rng.normal(size=(2, 40, 3))},
                          attrs={"one": [7]})
    for node in tree.subtree:  # the same Fit on every call: no creation times
        node.attrs = {**node.attrs, "created_at": "2024-01-01T00:00:00+00:00"}
    return Fit(idata=tree, engine="nuts", config={"num_samples": 40, "pair": (1, 2)}, seed=5,
               cost=Cost(wall_s=1.5, compile_s=0.5, num_grad_evals=10, extra={"k": 1}),
               log_evidence=-3.25, log_evidence_err=0.5, model="_model", flags=("a flag",))


def _assert_same(a: Fit, b: Fit) -> None:
    for group in a.idata.children:
        xr.testing.assert_identical(a.idata[group].to_dataset(), b.idata[group].to_dataset())
    assert dict(a.idata.attrs) == dict(b.idata.attrs)
    assert (a.engine, a.config, a.seed, a.cost, a.log_evidence, a.log_evidence_err, a.model,
            a.flags) == (b.engine, b.config, b.seed, b.cost, b.log_evidence, b.log_evidence_err,
                         b.model, b.flags)


def _failing_to_netcdf(exc):
    """A DataTree.to_netcdf that writes part of a file at the path (or into the buffer) it is
    given, then fails."""
    def to_netcdf(self, filepath=None, *args, **kwargs):
        start = b"\x89HDF\r\n\x1a\n" + b"\0" * 100  # the start of an HDF5 file, no more
        if hasattr(filepath, "write"):
            filepath.write(start)
        else:
            with open(filepath, "wb") as f:
                f.write(start)
        raise exc
    return to_netcdf


# ----------------------------------------------------------------------------- atomic saves
@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"),
                                 KeyboardInterrupt()], ids=["disk-full", "interrupt"])
def test_a_failed_save_leaves_the_old_file_and_no_temporary_file(post, tmp_path, monkeypatch,
                                                                 exc):
    path = tmp_path / "fit.nc"
    _fit(post).save(str(path))
    before = path.read_bytes()
    new = _fit(post, shift=10.0)
    monkeypatch.setattr(xr.DataTree, "to_netcdf", _failing_to_netcdf(exc))
    with pytest.raises(type(exc)) as info:
        new.save(str(path))
    if isinstance(exc, OSError):
        msg = str(info.value)
        assert "fit.nc" in msg and "unchanged" in msg and "elsewhere" in msg
        assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["fit.nc"]
    monkeypatch.undo()
    _assert_same(bl.load_fit(str(path)), _fit(post))
    new.save(str(tmp_path / "other.nc"))  # the Fit is still whole in memory
    _assert_same(bl.load_fit(str(tmp_path / "other.nc")), new)


@POSIX
def test_saving_over_a_file_open_for_reading_keeps_the_readers_bytes(post, tmp_path):
    path = tmp_path / "fit.nc"
    _fit(post).save(str(path))
    before = path.read_bytes()
    with open(path, "rb") as reader:
        _fit(post, shift=10.0).save(str(path))
        assert reader.read() == before  # the old inode, untouched
    assert path.read_bytes() != before
    _assert_same(bl.load_fit(str(path)), _fit(post, shift=10.0))


def test_save_syncs_before_it_renames_and_gives_ordinary_permissions(post, tmp_path,
                                                                     monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace",
                        lambda a, b: (events.append(("replace", os.path.dirname(a))),
                                      real_replace(a, b))[1])
    old_mask = os.umask(0o022)
    try:
        _fit(post).save(str(tmp_path / "fit.nc"))
    finally:
        os.umask(old_mask)
    assert events[0] == "fsync" and events[1] == ("replace", str(tmp_path))
    if sys.platform != "win32":  # not mkstemp's 0o600: what open(path, "w") would have given
        assert (tmp_path / "fit.nc").stat().st_mode & 0o777 == 0o644


# ----------------------------------------------------------------------------- the target
def test_a_missing_directory_is_refused_before_writing(post, tmp_path):
    fit = _fit(post)
    bad = tmp_path / "no" / "such" / "fit.nc"
    with pytest.raises(OptionError, match="does not exist") as info:
        fit.save(str(bad))
    assert str(bad) in str(info.value) and "saved elsewhere" in str(info.value)
    fit.save(str(tmp_path / "fit.nc"))
    _assert_same(bl.load_fit(str(tmp_path / "fit.nc")), fit)


def test_an_unwritable_directory_is_refused_before_writing(post, tmp_path, monkeypatch):
    fit = _fit(post)
    ro = tmp_path / "ro"
    ro.mkdir()
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # root writes anywhere: make the directory look read-only to the check instead
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, m, **kw: False if os.fspath(p) == str(ro)
                            else real(p, m, **kw))
    else:
        ro.chmod(0o500)
    try:
        with pytest.raises(OptionError, match="not writable") as info:
            fit.save(str(ro / "fit.nc"))
        assert str(ro / "fit.nc") in str(info.value) and "saved elsewhere" in str(info.value)
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o700)
    monkeypatch.undo()
    fit.save(str(ro / "fit.nc"))  # still usable in memory
    _assert_same(bl.load_fit(str(ro / "fit.nc")), fit)


def test_a_temporary_file_that_cannot_be_made_is_an_option_error(post, tmp_path, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(OptionError, match="Permission denied") as info:
        _fit(post).save(str(tmp_path / "fit.nc"))
    assert "fit.nc" in str(info.value) and "elsewhere" in str(info.value)
    assert os.listdir(tmp_path) == []


def test_a_directory_target_and_a_full_disk_are_refused_up_front(post, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    fit = _fit(post)
    with pytest.raises(OptionError, match="is a directory"):
        fit.save(str(tmp_path))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 100, 100))
    with pytest.raises(OptionError, match="100 B free") as info:
        fit.save(str(tmp_path / "fit.nc"))
    assert "fit.nc" in str(info.value)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- loading
def test_load_closes_the_file_so_it_can_be_saved_back_in_place(post, tmp_path):
    path = tmp_path / "fit.nc"
    fit = _fit(post)
    fit.save(str(path))
    back = bl.load_fit(str(path))
    back.save(str(path))  # in place, right after loading
    _assert_same(bl.load_fit(str(path)), fit)
    back = bl.load_fit(str(path))
    if os.path.isdir("/proc/self/fd"):
        held = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                held.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                pass
        assert str(path) not in held
    with h5py.File(path, "w"):  # HDF5 refuses to truncate a file this process still has open
        pass
    _assert_same(back, fit)  # the loaded Fit is in memory, not read from the file


def test_load_refuses_more_than_max_bytes_before_reading(post, tmp_path):
    path = tmp_path / "fit.nc"
    fit = _fit(post)
    fit.save(str(path))
    with pytest.raises(DataError, match="max_bytes") as info:
        bl.load_fit(str(path), max_bytes=100)
    assert "fit.nc" in str(info.value) and "/log_likelihood/y" in str(info.value)
    _assert_same(bl.load_fit(str(path), max_bytes=10**6), fit)


def test_a_small_file_declaring_a_huge_variable_is_refused_unread(post, tmp_path, monkeypatch):
    """A few kB on disk (unwritten chunks) declaring 320 GB: refused by the default limit
    before anything is read (DataTree.load must not even be called)."""
    path = tmp_path / "fit.nc"
    _fit(post).save(str(path))
    with h5netcdf.File(path, "a") as f:
        g = f["posterior"]
        g.dimensions["big_0"] = 10**6
        g.dimensions["big_1"] = 10**4
        g.create_variable("huge", ("chain", "big_0", "big_1"), "f8", chunks=(1, 1000, 100))
    assert path.stat().st_size < 10**6

    def no_load(self, **kwargs):
        raise AssertionError("the file's data was read before its size was checked")

    monkeypatch.setattr(xr.DataTree, "load", no_load)
    with pytest.raises(DataError, match="/posterior/huge") as info:
        bl.load_fit(str(path))
    assert "fit.nc" in str(info.value) and "GiB" in str(info.value)


def _edit_facts(path, edit) -> None:
    with h5py.File(path, "a") as f:
        raw = f.attrs["bayeslik_fit"]
        f.attrs["bayeslik_fit"] = edit(raw.decode() if isinstance(raw, bytes) else raw)


def _without(key):
    def edit(raw):
        facts = json.loads(raw)
        del facts[key]
        return json.dumps(facts)
    return edit


@pytest.mark.parametrize("damage, why", [
    ("random", "cannot be read as a netCDF"),
    ("truncated", "cannot be read as a netCDF"),
    ("foreign", "not a bayeslik Fit"),
    ("bad-json", "not valid JSON"),
    ("json-list", "not an object"),
    ("no-engine", "lacks \\['engine'\\]"),
    ("no-cost", "lacks \\['cost'\\]"),
    ("no-wall", "lacks 'wall_s'"),
    ("wrong-type", "wrong type for \\['config'\\]"),
    ("missing-group", "'/nowhere'"),
])
def test_damaged_and_foreign_files_are_data_errors_naming_the_file(post, tmp_path, damage, why):
    path = tmp_path / "fit.nc"
    _fit(post).save(str(path))
    if damage == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "foreign":
        path.unlink()
        xr.Dataset({"a": ("x", np.arange(3))}).to_netcdf(path, engine="h5netcdf")
    elif damage == "bad-json":
        _edit_facts(path, lambda raw: raw[:-7])
    elif damage == "json-list":
        _edit_facts(path, lambda raw: "[1, 2]")
    elif damage == "no-engine":
        _edit_facts(path, _without("engine"))
    elif damage == "no-cost":
        _edit_facts(path, _without("cost"))
    elif damage == "no-wall":
        _edit_facts(path, lambda raw: json.dumps({**json.loads(raw), "cost": {"compile_s": 1}}))
    elif damage == "wrong-type":
        _edit_facts(path, lambda raw: json.dumps({**json.loads(raw), "config": "oops"}))
    elif damage == "missing-group":
        _edit_facts(path, lambda raw: json.dumps(
            {**json.loads(raw), "one_element_attrs": {"/nowhere": ["x"]}}))
    with pytest.raises(DataError, match=why) as info:
        bl.load_fit(str(path))
    assert str(path) in str(info.value)
    assert info.value.__cause__ is None  # no raw h5py / JSON / KeyError chained below it
    assert info.value.__context__ is None or info.value.__suppress_context__


def test_a_newer_files_unknown_cost_fields_are_kept_and_unknown_facts_ignored(post, tmp_path):
    path = tmp_path / "fit.nc"
    fit = _fit(post)
    fit.save(str(path))

    def newer(raw):
        facts = json.loads(raw)
        facts["cost"]["num_surrogate_evals"] = 12
        facts["bayeslik_version"] = "99.0"
        facts["provenance"] = {"host": "x"}
        return json.dumps(facts)

    _edit_facts(path, newer)
    with pytest.warns(UserWarning) as record:
        back = bl.load_fit(str(path))
    text = " ".join(str(w.message) for w in record)
    assert "num_surrogate_evals" in text and "cost.extra" in text and "99.0" in text
    assert "provenance" in text and "ignored" in text
    assert back.cost.extra == {"k": 1, "num_surrogate_evals": 12}
    assert (back.cost.wall_s, back.cost.compile_s, back.cost.num_grad_evals) == (1.5, 0.5, 10)
    for group in fit.idata.children:
        xr.testing.assert_identical(fit.idata[group].to_dataset(), back.idata[group].to_dataset())


# ----------------------------------------------------------------------------- numpyro.param
def test_a_param_site_is_refused_before_any_compile(no_jit):
    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
        sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
        numpyro.sample("y", dist.Normal(mu, sigma), obs=y)

    with pytest.raises(ModelError, match="site 'sigma' is a numpyro.param") as info:
        bl.Posterior(model, y=np.array([0.1, 0.2]))
    msg = str(info.value)
    assert "sample site with a prior" in msg and "pass its value as data" in msg


def test_a_program_of_param_sites_only_names_the_param(no_jit):
    def model(y):
        mu = numpyro.param("mu", 0.0)
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    with pytest.raises(ModelError, match="'mu' is a numpyro.param"):
        bl.Posterior(model, y=np.array([0.1, 0.2]))
