"""Checkpoint files that are signed, fingerprinted and locked (any engine that checkpoints).

A checkpoint holds a pickle (dynesty's samplers cannot be stored otherwise), and unpickling runs
whatever code the file names. So a checkpoint is trusted only if this user's bayeslik wrote it:

Signature
    A per-user secret key, 32 random bytes in ``$BAYESLIK_CONFIG_DIR/checkpoint.key`` (default
    ``~/.config/bayeslik/checkpoint.key``), created on first use with mode 0o600 (its directory
    0o700). Every checkpoint ``<file>`` gets a sidecar ``<file>.sig`` (JSON: the format version,
    the run's fingerprint and an HMAC-SHA256 under that key over the fingerprint and the file's
    bytes). On resume the file is read once, its HMAC checked against the sidecar, and only those
    verified bytes are unpickled; a missing sidecar, a bad HMAC, a missing or unsafe key all
    refuse the resume (:class:`~bayeslik.errors.EngineError`) before anything is unpickled.
    Anyone who can read the key can forge checkpoints: it must stay private (a key readable or
    writable by others, or owned by another user, is refused).

Fingerprint
    What the run depends on: the program (module, qualname, latent sites and their shapes), a
    SHA-256 of every data array bound to the Posterior and of the other arguments' repr, the
    engine settings that change the run, and the versions of the packages that compute it. A
    verified checkpoint whose fingerprint differs from the run's is refused, naming the part
    (data: which arguments; settings: which fields; versions: which packages; program).

Lock
    ``<file>.lock`` (created with O_CREAT | O_EXCL, holding the pid and host) keeps a second run
    off a checkpoint a live run writes; a lock whose process is gone (same host) is taken over
    with a warning. A lock held on another host cannot be checked and is respected.

Writes
    To ``<file>.tmp-<pid>`` (mode 0o600), flushed, then renamed over ``<file>``; the sidecar is
    rewritten before and after the rename (before it, it accepts both the old and the new
    bytes), so a kill at any point leaves a file that verifies.

>>> import tempfile, os
>>> d = tempfile.mkdtemp()
>>> os.environ["BAYESLIK_CONFIG_DIR"] = d
>>> ck = CheckpointFile(os.path.join(d, "run.pkl"), {"settings": {"n": 1}}, owner="Demo")
>>> with ck:
...     ck.write(b"state")
>>> ck.read_verified()
b'state'
>>> CheckpointFile(ck.path, {"settings": {"n": 2}}, owner="Demo").read_verified()
Traceback (most recent call last):
...
bayeslik.errors.EngineError: Demo resume: the checkpoint ... was written for another run: settings differ: n (1 in the checkpoint, 2 now). Resume with the checkpoint's data and settings, or start afresh with resume=False (or another checkpoint_file).
>>> del os.environ["BAYESLIK_CONFIG_DIR"]
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import os
import re
import secrets
import socket
import time
import warnings
from importlib import metadata
from typing import Any, Iterable, Mapping

import numpy as np

from bayeslik.errors import EngineError

__all__ = ["CheckpointFile", "FORMAT_VERSION", "config_dir", "fingerprint", "key_path",
           "load_key", "mismatches", "package_versions"]

FORMAT_VERSION = 1
_KEY_BYTES = 32
_DOMAIN = b"bayeslik checkpoint v1\n"


# ---------------------------------------------------------------------------- the key
def config_dir() -> str:
    """``$BAYESLIK_CONFIG_DIR``, else ``~/.config/bayeslik``."""
    return os.environ.get("BAYESLIK_CONFIG_DIR") or os.path.join(
        os.path.expanduser("~"), ".config", "bayeslik")


def key_path() -> str:
    """The per-user checkpoint key: ``config_dir()/checkpoint.key``."""
    return os.path.join(config_dir(), "checkpoint.key")


def load_key(*, create: bool) -> bytes | None:
    """The per-user secret key; created (32 random bytes, mode 0o600) when ``create`` and absent,
    else None when absent. A key that is not 32 bytes, is readable or writable by others, or
    belongs to another user is refused (EngineError naming the file)."""
    path = key_path()
    for attempt in range(50):
        try:
            return _read_key(path)
        except FileNotFoundError:
            if not create:
                return None
        except _ShortKey:
            if attempt < 49:  # another process is writing it right now
                time.sleep(0.02)
                continue
            raise EngineError(f"the checkpoint key {path!r} is damaged (not {_KEY_BYTES} bytes). "
                              "Delete it: a new key is made on the next run, but checkpoints "
                              "signed with the old one can no longer be resumed.") from None
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue  # made meanwhile by another process: read it
        except OSError as e:
            raise EngineError(f"cannot create the checkpoint key {path!r} ({e.strerror}); set "
                              "BAYESLIK_CONFIG_DIR to a writable directory of your own.") from e
        try:
            _write_all(fd, secrets.token_bytes(_KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
    raise EngineError(f"cannot read the checkpoint key {path!r}.")  # pragma: no cover


class _ShortKey(Exception):
    pass


def _read_key(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        st = os.fstat(fd)
        if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
            raise EngineError(f"the checkpoint key {path!r} belongs to another user (uid "
                              f"{st.st_uid}); only your own key can vouch for your checkpoints. "
                              "Delete it or set BAYESLIK_CONFIG_DIR to a directory of your own.")
        if st.st_mode & 0o077:
            raise EngineError(f"the checkpoint key {path!r} has mode {st.st_mode & 0o777:o}: "
                              "others could read or change it and forge checkpoints. Make it "
                              f"private (chmod 600 {path}), or delete it (checkpoints signed with "
                              "it can then no longer be resumed).")
        data = os.read(fd, _KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) != _KEY_BYTES:
        raise _ShortKey()
    return data


# ---------------------------------------------------------------------------- the fingerprint
def package_versions(packages: Iterable[str]) -> dict[str, str]:
    """{package: installed version} ("unknown" where it cannot be found)."""
    out = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            try:
                out[name] = str(getattr(__import__(name), "__version__", "unknown"))
            except ImportError:
                out[name] = "unknown"
    return out


def _digest_value(value: Any) -> dict:
    """A data argument's digest: shape, dtype and SHA-256 of an array; SHA-256 of the repr
    (memory addresses removed) of anything else."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        arr = np.ascontiguousarray(np.asarray(value))
        return {"shape": list(arr.shape), "dtype": str(arr.dtype),
                "sha256": hashlib.sha256(arr.tobytes()).hexdigest()}
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))
    return {"repr_sha256": hashlib.sha256(text.encode()).hexdigest()}


def fingerprint(posterior, settings: Mapping[str, Any], packages: Iterable[str]) -> dict:
    """What a run on ``posterior`` depends on, as JSON-ready data: ``program`` (module,
    qualname, latent sites and shapes), ``data`` (a digest per bound argument: positional ones
    as ``args[i]``), ``settings`` (as given) and ``versions`` of ``packages``."""
    model = posterior.model
    shapes = posterior.site_shapes
    arguments = {f"args[{i}]": a for i, a in enumerate(posterior.args)}
    arguments.update(posterior.data)
    fp = {
        "program": {"module": getattr(model, "__module__", "?"),
                    "qualname": getattr(model, "__qualname__", posterior.name),
                    "latent": [[n, list(shapes[n])] for n in posterior.latent_names]},
        "data": {k: _digest_value(v) for k, v in sorted(arguments.items())},
        "settings": dict(settings),
        "versions": package_versions(packages),
    }
    return _normalised(fp)


def _normalised(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, unknown objects their repr)."""
    return json.loads(json.dumps(value, sort_keys=True, default=repr))


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def mismatches(saved: Mapping, current: Mapping) -> list[str]:
    """What differs between two fingerprints, one phrase per part, e.g. ``"data differs: y"``,
    ``"settings differ: num_live (100 in the checkpoint, 50 now)"``."""
    out = []
    for part in ("program", "data", "settings", "versions"):
        a, b = saved.get(part), current.get(part)
        if a == b:
            continue
        if part == "program":
            a, b = a or {}, b or {}
            what = [f"{a.get('module')}.{a.get('qualname')} in the checkpoint, "
                    f"{b.get('module')}.{b.get('qualname')} now"]
            if a.get("latent") != b.get("latent"):
                what.append(f"latent sites {_sites(a.get('latent'))} in the checkpoint, "
                            f"{_sites(b.get('latent'))} now")
            out.append(f"the program differs ({'; '.join(what)})")
            continue
        a, b = a if isinstance(a, dict) else {}, b if isinstance(b, dict) else {}
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if part == "data":
            out.append(f"data differs: {', '.join(keys)}")
        else:
            fields = ", ".join(f"{k} ({_show(a, k)} in the checkpoint, {_show(b, k)} now)"
                               for k in keys)
            out.append(f"{part} differ: {fields}")
    return out


def _sites(latent) -> str:
    return "[" + ", ".join(f"{n}{tuple(s)}" for n, s in (latent or [])) + "]"


def _show(d: Mapping, key: str) -> str:
    return json.dumps(d[key]) if key in d else "absent"


# ---------------------------------------------------------------------------- the file
class CheckpointFile:
    """One checkpoint path of one run: its lock, its signed writes and its verified read.

    ``fingerprint`` is the run's (see :func:`fingerprint`); ``owner`` starts the messages (the
    engine's name, e.g. "Nested"). Use as a context manager (or :meth:`acquire` /
    :meth:`release`) around everything that writes the file.
    """

    def __init__(self, path: str | os.PathLike, fingerprint: Mapping, *, owner: str = "checkpoint"):
        self.path = os.path.abspath(os.fspath(path))
        self.sidecar = self.path + ".sig"
        self.lock_path = self.path + ".lock"
        self.fingerprint = _normalised(dict(fingerprint))
        self.owner = owner
        self._token: str | None = None
        self._previous: str | None = None  # the HMAC of the bytes now at self.path, if ours

    # ------------------------------------------------------------------ checks and the lock
    def check_writable(self) -> None:
        """EngineError unless the file's directory exists and can be written (before a run)."""
        where = f"{self.owner} option checkpoint_file={self.path!r}"
        folder = os.path.dirname(self.path)
        if not os.path.isdir(folder):
            raise EngineError(f"{where}: the directory {folder!r} does not exist; create it or "
                              "choose another path.")
        if os.path.isdir(self.path):
            raise EngineError(f"{where}: is a directory; name a file in it.")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise EngineError(f"{where}: the directory {folder!r} is not writable, so the run "
                              "could not write its checkpoints; choose a writable directory.")

    def acquire(self) -> None:
        """Take ``<file>.lock``; EngineError if a live run holds it (a stale one is taken over
        with a warning). Checks the directory first."""
        self.check_writable()
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": datetime.datetime.now().isoformat(timespec="seconds"),
              "token": secrets.token_hex(8)}
        for _ in range(5):
            try:
                fd = os.open(self.lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            except OSError as e:
                raise EngineError(
                    f"{self.owner} option checkpoint_file={self.path!r}: cannot create the lock "
                    f"file {self.lock_path!r} ({e.strerror}); choose a writable directory.") from e
            try:
                _write_all(fd, json.dumps(me).encode())
            finally:
                os.close(fd)
            self._token = me["token"]
            self._remove_leftovers()
            return
        raise EngineError(f"{self.owner}: could not take the lock {self.lock_path!r}; another "
                          "run keeps taking it. Use another checkpoint_file.")

    def _take_over_if_stale(self) -> None:
        holder = _read_json(self.lock_path)
        if holder is None:  # just removed, or being written by its creator right now
            try:
                age = time.time() - os.stat(self.lock_path).st_mtime
            except FileNotFoundError:
                return
            if age < 10:
                time.sleep(0.05)
                return
            holder = {}
        pid, host = holder.get("pid"), holder.get("host")
        this_host = socket.gethostname()
        fix = (f"Wait for it to finish or use another checkpoint_file; if no such run is alive, "
               f"delete {self.lock_path}.")
        if isinstance(pid, int) and host == this_host and _alive(pid):
            raise EngineError(
                f"{self.owner}: the checkpoint {self.path!r} is in use by another run (pid {pid} "
                f"on this host{', since ' + str(holder['since']) if 'since' in holder else ''}): "
                f"two runs on one checkpoint would overwrite each other. {fix}")
        if isinstance(pid, int) and host != this_host:
            raise EngineError(
                f"{self.owner}: the checkpoint {self.path!r} is locked by a run on host "
                f"{host!r} (pid {pid}), which cannot be checked from here. {fix}")
        warnings.warn(f"{self.owner}: taking over the stale lock {self.lock_path!r} (pid {pid}, "
                      "no longer running): its run ended without removing it.", RuntimeWarning,
                      stacklevel=3)
        try:
            os.unlink(self.lock_path)
        except FileNotFoundError:
            pass

    def release(self) -> None:
        """Remove the lock if this object holds it (idempotent)."""
        if self._token is None:
            return
        holder = _read_json(self.lock_path)
        if holder is not None and holder.get("token") == self._token:
            try:
                os.unlink(self.lock_path)
            except FileNotFoundError:
                pass
        self._token = None

    def __enter__(self) -> "CheckpointFile":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _remove_leftovers(self) -> None:
        """Temporary files of earlier writers that died mid-write (we hold the lock now)."""
        folder, base = os.path.split(self.path)
        for name in os.listdir(folder):
            if name.startswith(base + ".tmp-") or name.startswith(base + ".sig.tmp-"):
                try:
                    os.unlink(os.path.join(folder, name))
                except OSError:
                    pass

    # ------------------------------------------------------------------ writing and reading
    def _mac(self, key: bytes, fp: Any, data: bytes) -> str:
        mac = hmac.new(key, _DOMAIN, hashlib.sha256)
        mac.update(_canonical(fp))
        mac.update(b"\n")
        mac.update(data)
        return mac.hexdigest()

    def write(self, data: bytes) -> None:
        """Write ``data`` as the checkpoint (mode 0o600), signed; a kill at any point leaves a
        file that verifies (the old one or the new one)."""
        key = load_key(create=True)
        mac = self._mac(key, self.fingerprint, data)
        tmp = f"{self.path}.tmp-{os.getpid()}"
        _unlink_quiet(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            if self._previous is not None:  # both the bytes there now and the new ones verify
                self._write_sidecar(mac, self._previous)
            os.replace(tmp, self.path)
        except BaseException:
            _unlink_quiet(tmp)
            raise
        self._write_sidecar(mac, None)
        self._previous = mac

    def _write_sidecar(self, mac: str, previous: str | None) -> None:
        doc = {"format": "bayeslik checkpoint signature", "format_version": FORMAT_VERSION,
               "algorithm": "HMAC-SHA256", "hmac": mac, "fingerprint": self.fingerprint}
        if previous is not None:
            doc["previous_hmac"] = previous
        tmp = f"{self.sidecar}.tmp-{os.getpid()}"
        _unlink_quiet(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, json.dumps(doc, sort_keys=True, indent=1).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.sidecar)

    def read_verified(self) -> bytes:
        """The checkpoint's bytes, read once, after its signature and fingerprint are checked:
        EngineError (naming the file, why, and what to do) if the sidecar is missing or invalid,
        the bytes were changed, or the run's fingerprint differs."""
        with open(self.path, "rb") as f:
            data = f.read()
        also = (f" (and {os.path.basename(self.sidecar)})" if os.path.exists(self.sidecar)
                else "")
        fix = (f"Start afresh with resume=False (the run then overwrites it), or delete "
               f"{self.path}{also}.")
        head = f"{self.owner} resume: refusing to load the checkpoint {self.path!r}"
        doc = _read_json(self.sidecar)
        if doc is None:
            raise EngineError(
                f"{head}: it has no valid signature file {self.sidecar!r}, so it was not written "
                "by this user's bayeslik (or was written before checkpoints were signed); loading "
                f"it could run any code it contains. {fix}")
        key = load_key(create=False)
        if key is None:
            raise EngineError(
                f"{head}: there is no checkpoint key {key_path()!r}, so it cannot have been "
                f"written by this user's bayeslik (with this BAYESLIK_CONFIG_DIR). {fix}")
        fp = doc.get("fingerprint")
        macs = [m for m in (doc.get("hmac"), doc.get("previous_hmac")) if isinstance(m, str)]
        good = (doc.get("format_version") == FORMAT_VERSION and isinstance(fp, dict) and macs)
        if good:
            mine = self._mac(key, fp, data)
            good = any(hmac.compare_digest(mine, m) for m in macs)
        if not good:
            raise EngineError(
                f"{head}: its signature {self.sidecar!r} does not match its contents: it was "
                "modified, or was not written by this user's bayeslik; loading it could run any "
                f"code it contains. {fix}")
        differ = mismatches(fp, self.fingerprint)
        if differ:
            raise EngineError(
                f"{self.owner} resume: the checkpoint {self.path!r} was written for another run: "
                f"{'; '.join(differ)}. Resume with the checkpoint's data and settings, or start "
                "afresh with resume=False (or another checkpoint_file).")
        self._previous = mine
        return data


# ---------------------------------------------------------------------------- helpers
def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _read_json(path: str) -> dict | None:
    """The JSON object in ``path`` (None if absent, unreadable or not a JSON object)."""
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read(1 << 20))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a process of another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    try:  # a zombie (killed, not yet reaped by its parent) runs no more
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
