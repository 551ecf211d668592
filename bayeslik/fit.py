"""Fit: what every engine returns. An ArviZ DataTree, the evidence where estimated, the cost.

A Fit round-trips through netCDF with nothing lost: the DataTree is written as is and the
engine facts (engine, settings, seed, evidence, cost, flags) go into the root group's attributes
as JSON.

Saving is atomic: the file is written to a temporary file in the target's directory, flushed to
disk and renamed over the target, so a failed or killed save leaves the previous file as it was
(and a reader that has it open keeps reading the old bytes). The target is checked before
anything is written. Loading reads the whole file into memory and closes it; it refuses, before
reading any data, a file whose variables would take more than ``max_bytes``, and reports a
damaged or foreign file as a :class:`~bayeslik.errors.DataError` naming the file.
"""

from __future__ import annotations

import datetime as _dt
import html
import io
import json
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

import numpy as np
import xarray as xr

from bayeslik.errors import DataError, OptionError

__all__ = ["Cost", "Fit", "load_fit", "build_datatree", "check_save_path"]

_ATTR = "bayeslik_fit"
#: load_fit's default limit on the memory the variables of a file may take once read.
MAX_LOAD_BYTES = 8 * 2**30


@dataclass(frozen=True)
class Cost:
    """What a run cost.

    ``wall_s`` is the whole run (compilation included), ``compile_s`` the part spent compiling.
    ``num_loglik_evals`` counts evaluations of the true likelihood (for gradient-based engines
    each gradient evaluation includes one), ``num_grad_evals`` gradient evaluations of the log
    density. ``extra`` holds engine-specific counts (e.g. surrogate evaluations).
    ``compile_cached`` is True where the run reused compiled programs from the cache (an
    earlier run in this process paid for compiling them, so ``compile_s`` is less than a cold
    start's), False where it compiled its own, None where unknown (an engine that tracks no
    programs, or a file written before bayeslik recorded it).
    """

    wall_s: float
    compile_s: float = 0.0
    num_loglik_evals: int | None = None
    num_grad_evals: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    compile_cached: bool | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["extra"] = dict(self.extra)
        return d


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if hasattr(x, "__array__"):  # JAX arrays and the like
        return np.asarray(x).tolist()
    return repr(x)


@dataclass(frozen=True, eq=False)
class Fit:
    """The result of running an engine on a Posterior.

    Attributes
    ----------
    idata : xarray.DataTree
        ArviZ 1.x groups: ``posterior`` (equal-weight draws, dims chain x draw x ...),
        ``sample_stats`` (ArviZ's reserved names: ``diverging``, ``lp``, ``tree_depth``,
        ``acceptance_rate``, ``energy``, ``step_size``, ...), ``log_likelihood`` (pointwise, for
        LOO), ``observed_data``; weighted engines add their weighted points in an extra group.
    engine : str
        The engine's registry name.
    config : dict
        The engine's settings, as given to it.
    seed : int or None
        The seed the run was started from.
    log_evidence, log_evidence_err : float or None
        log Z and its standard error, None where the engine does not estimate it.
    cost : Cost
    model : str
        The program's name.
    flags : tuple of str
        Warnings about the run a user must see (divergences, an interrupted run, ...).
    """

    idata: xr.DataTree
    engine: str
    config: Mapping[str, Any]
    seed: int | None
    cost: Cost
    log_evidence: float | None = None
    log_evidence_err: float | None = None
    model: str = ""
    flags: tuple[str, ...] = ()

    # ------------------------------------------------------------------ views
    @property
    def posterior(self) -> xr.Dataset:
        """The equal-weight posterior draws (``idata["posterior"]`` as a Dataset)."""
        return self.idata["posterior"].to_dataset()

    @property
    def sample_stats(self) -> xr.Dataset:
        return self.idata["sample_stats"].to_dataset()

    @property
    def num_chains(self) -> int:
        return int(self.idata["posterior"].sizes["chain"])

    @property
    def num_draws(self) -> int:
        return int(self.idata["posterior"].sizes["draw"])

    def draws(self, var: str) -> np.ndarray:
        """The draws of one variable as a NumPy array (chain, draw, *shape)."""
        return np.asarray(self.idata["posterior"][var].values)

    # ------------------------------------------------------------------ persistence
    def _facts(self) -> dict:
        return {
            "engine": self.engine,
            "config": _jsonable(dict(self.config)),
            "seed": self.seed,
            "cost": _jsonable(self.cost.to_dict()),
            "log_evidence": self.log_evidence,
            "log_evidence_err": self.log_evidence_err,
            "model": self.model,
            "flags": list(self.flags),
            "bayeslik_version": _version(),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the Fit to one netCDF file; ``bayeslik.load_fit(path)`` reads it back whole.

        The write is atomic: a temporary file in the same directory, flushed to disk, then
        renamed onto ``path``. If it fails (a full disk, an interrupt) the previous file at
        ``path`` is unchanged, the temporary file is removed, and the Fit is still in memory.
        A missing or unwritable directory raises OptionError before anything is written.

        >>> fit.save("eight_schools.nc")            # doctest: +SKIP
        >>> same = bl.load_fit("eight_schools.nc")  # doctest: +SKIP
        """
        target = check_save_path(path, nbytes=_tree_nbytes(self.idata))
        tree = self.idata.copy()
        facts = self._facts()
        # netCDF reads a one-element array attribute back as a scalar: record which were arrays
        facts["one_element_attrs"] = {
            node.path: sorted(k for k, v in node.attrs.items()
                              if isinstance(v, (list, tuple, np.ndarray)) and np.size(v) == 1)
            for node in tree.subtree
        }
        tree.attrs = {**tree.attrs, _ATTR: json.dumps(facts)}
        _atomic_write(tree, target, shown=os.fspath(path))

    # ------------------------------------------------------------------ summaries
    def summary(self, var_names: list[str] | None = None, **kwargs: Any):
        """ArviZ's summary table of the posterior (a pandas DataFrame)."""
        import arviz_stats as azs

        return azs.summary(self.idata, var_names=var_names, **kwargs)

    def _header(self) -> list[tuple[str, str]]:
        rows = [
            ("model", self.model or "?"),
            ("engine", self.engine),
            ("draws", f"{self.num_chains} chains x {self.num_draws}"),
            ("seed", str(self.seed)),
            ("wall", f"{self.cost.wall_s:.2f} s (compile {self.cost.compile_s:.2f} s)"),
        ]
        if self.cost.num_grad_evals is not None:
            rows.append(("gradient evals", f"{self.cost.num_grad_evals:,}"))
        if self.cost.num_loglik_evals is not None:
            rows.append(("likelihood evals", f"{self.cost.num_loglik_evals:,}"))
        if self.log_evidence is not None:
            err = "" if self.log_evidence_err is None else f" ± {self.log_evidence_err:.3f}"
            rows.append(("log evidence", f"{self.log_evidence:.3f}{err}"))
        if "sample_stats" in self.idata.children and "diverging" in self.idata["sample_stats"]:
            rows.append(("divergences", str(int(self.idata["sample_stats"]["diverging"].sum()))))
        for flag in self.flags:
            rows.append(("warning", flag))
        return rows

    #: the most summary rows ``repr(fit)`` and the notebook view show
    _REPR_ROWS = 20

    def _repr_table(self, max_rows: int):
        """The first ``max_rows`` entries of the posterior, summarised for ``repr``: (ArviZ's
        summary of those that vary, or None; ``(label, value)`` of those constant over every
        draw; the number of entries in all).

        Only the entries shown are computed (ArviZ's summary of every entry takes seconds for
        hundreds of parameters). A constant entry (a structural zero, a fixed element) is named
        with its value instead of a row: ESS, R-hat and the MCSE of the sd are not defined for
        it (ArviZ would divide 0 by 0 computing them).
        """
        import arviz_stats as azs

        post = self.idata["posterior"].to_dataset()
        arrays = {k: v.transpose("chain", "draw", ...) for k, v in post.data_vars.items()}
        total = sum(math.prod(a.shape[2:]) for a in arrays.values())
        varying, constant, seen = {}, [], 0
        for name, a in arrays.items():
            take = min(math.prod(a.shape[2:]), max_rows - seen)
            if take <= 0:
                break
            seen += take
            values = np.asarray(a.values)
            block = values.reshape(values.shape[:2] + (-1,))[:, :, :take]
            keys = [", ".join(str(post[d].values[i]) if d in post.coords else str(i)
                              for d, i in zip(a.dims[2:], np.unravel_index(j, a.shape[2:])))
                    for j in range(take)]
            fixed = np.all(block == block[:1, :1], axis=(0, 1))
            constant += [(f"{name}[{k}]" if a.ndim > 2 else name, block[0, 0, j])
                         for j, k in enumerate(keys) if fixed[j]]
            if not fixed.all():
                if a.ndim == 2:
                    varying[name] = a
                else:  # one axis of the entries shown; ArviZ labels them name[coord]
                    dim = f"{name} entry"
                    varying[name] = xr.DataArray(
                        block[:, :, ~fixed], dims=("chain", "draw", dim),
                        coords={dim: [k for k, f in zip(keys, fixed) if not f]})
        table = azs.summary(xr.Dataset(varying)) if varying else None
        return table, constant, total

    def _repr_parts(self) -> tuple[Any, list[str]]:
        """(the bounded summary table or None, the lines below it)."""
        try:
            table, constant, total = self._repr_table(self._REPR_ROWS)
        except Exception as e:  # a summary must never hide the Fit
            return None, [f"(no summary: {e})"]
        lines = []
        if constant:
            named = ", ".join(f"{k} = {float(v):.4g}" for k, v in constant[:5])
            lines.append(f"constant over every draw (no diagnostics): {named}"
                         + (f" and {len(constant) - 5} more" if len(constant) > 5 else ""))
        more = total - min(total, self._REPR_ROWS)
        if more:
            lines.append(f"... {more:,} more rows ({total:,} in all); fit.summary() for all")
        return table, lines

    def __repr__(self) -> str:
        head = "\n".join(f"  {k:<17}{v}" for k, v in self._header())
        table, lines = self._repr_parts()
        body = "\n".join(([] if table is None else [table.to_string()]) + lines)
        return f"Fit\n{head}\n{body}"

    def _repr_html_(self) -> str:
        head = "".join(
            f"<tr><th style='text-align:left'>{html.escape(k)}</th><td style='text-align:left'>"
            f"{html.escape(v)}</td></tr>"
            for k, v in self._header()
        )
        table, lines = self._repr_parts()
        body = ("" if table is None else table.to_html()) + "".join(
            f"<p>{html.escape(line)}</p>" for line in lines)
        return f"<div><b>bayeslik Fit</b><table>{head}</table>{body}</div>"


def _tuples(x: Any) -> Any:
    """JSON's lists back as the tuples an engine config holds (configs are frozen dataclasses)."""
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    return x


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("bayeslik")
    except Exception:
        return "unknown"


def load_fit(path: str | os.PathLike, *, max_bytes: int = MAX_LOAD_BYTES) -> Fit:
    """Read a Fit written by :meth:`Fit.save`.

    The file is read whole into memory and closed (it can be saved over at once). Before any
    data is read, the sizes its variables declare are added up: a file that would take more
    than ``max_bytes`` (default 8 GiB) is refused; raise the limit to read a larger one. A file
    that is not a readable netCDF/HDF5 file, is truncated, or lacks or garbles bayeslik's
    attribute raises DataError naming the file and the fault. A file from a newer bayeslik
    loads: Cost fields unknown here are kept in ``cost.extra``, other unknown facts are
    ignored, each with a warning naming them.

    >>> fit = bl.load_fit("eight_schools.nc")  # doctest: +SKIP
    """
    shown = os.fspath(path)
    try:
        tree = xr.open_datatree(path, engine="h5netcdf")
    except (FileNotFoundError, IsADirectoryError):
        raise
    except Exception as e:
        raise DataError(
            f"{shown!r} cannot be read as a netCDF (HDF5) file ({type(e).__name__}: {e}); it is "
            "damaged (e.g. truncated) or not a file written by Fit.save."
        ) from None
    try:
        _check_load_size(tree, shown, max_bytes)
        try:
            tree.load()
        except Exception as e:
            raise DataError(
                f"{shown!r}: reading its data failed ({type(e).__name__}: {e}); the file is "
                "damaged (e.g. truncated)."
            ) from None
    finally:
        tree.close()
    attrs = dict(tree.attrs)
    if _ATTR not in attrs:
        raise DataError(f"{shown!r} is not a bayeslik Fit (no '{_ATTR}' attribute in its root group).")
    facts = _read_facts(attrs.pop(_ATTR), shown)
    tree.attrs = attrs
    for node_path, names in facts.get("one_element_attrs", {}).items():
        try:
            node = tree[node_path]
        except KeyError:
            raise DataError(f"{shown!r}: its '{_ATTR}' attribute names a group {node_path!r} "
                            "that the file does not have; the file is damaged.") from None
        node.attrs = {k: (np.atleast_1d(v) if k in names else v) for k, v in node.attrs.items()}
    from bayeslik.weights import upgrade_weighted_groups

    tree = upgrade_weighted_groups(tree)  # weighted points saved as (chain, draw) before 0.2
    return Fit(
        idata=tree,
        engine=facts["engine"],
        config=_tuples(facts["config"]),
        seed=facts["seed"],
        cost=_read_cost(facts["cost"], shown, facts.get("bayeslik_version")),
        log_evidence=facts["log_evidence"],
        log_evidence_err=facts["log_evidence_err"],
        model=facts.get("model", ""),
        flags=tuple(facts.get("flags", ())),
    )


# ---------------------------------------------------------------------------- saving
def _tree_nbytes(tree: xr.DataTree) -> int:
    """The bytes the variables of every group declare (shape x item size; nothing is read)."""
    total = 0
    for node in tree.subtree:
        for var in node.to_dataset(inherit=False).variables.values():
            total += math.prod(var.shape) * var.dtype.itemsize
    return total


def save_path_problem(path: str | os.PathLike, nbytes: int = 0) -> str | None:
    """What would stop a Fit of ``nbytes`` from being saved at ``path``, in words (its
    directory missing or not writable, ``path`` a directory or a read-only file, a disk
    without room), or None where nothing would. Writes nothing."""
    target = os.path.realpath(os.fspath(path))
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        return f"its directory {folder!r} does not exist (create it first)"
    if os.path.isdir(target):
        return "it is a directory; give a file name (e.g. 'run.nc')"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"its directory {folder!r} is not writable"
    if os.path.exists(target) and not os.access(target, os.W_OK):
        return "the file exists and is read-only (remove it or change its permissions)"
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if free is not None and nbytes > free:
        return (f"the Fit takes about {format_bytes(nbytes)} and the disk holding {folder!r} "
                f"has only {format_bytes(free)} free")
    return None


def check_save_path(path: str | os.PathLike, nbytes: int = 0) -> str:
    """Check that a Fit can be saved at ``path`` before anything is written (a run can call it
    before it starts): :func:`save_path_problem`. Return the path the file is written to
    (symbolic links resolved). A bad path raises OptionError naming it."""
    shown = os.fspath(path)
    why = save_path_problem(shown, nbytes)
    if why is not None:
        raise OptionError(f"cannot save the Fit to {shown!r}: {why}. Nothing was written; the "
                          "Fit is still in memory and can be saved elsewhere "
                          "(fit.save(other_path)).")
    return os.path.realpath(shown)


def format_bytes(n: float) -> str:
    """A byte count for a message: '812 B', '3.4 MiB', '320.0 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""  # pragma: no cover


def _default_mode() -> int:
    """The permissions a plain ``open(path, "w")`` would give a new file (0o666 less umask)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


#: Fits up to this size are serialised in memory before they are written (see _atomic_write)
IN_MEMORY_SAVE_BYTES = 1 << 30


def _write_all(path: str, data: memoryview) -> None:
    """Write ``data`` to ``path`` (truncating it) and fsync it; OSError on a full disk."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(tree: xr.DataTree, target: str, shown: str) -> None:
    """Write ``tree`` to a temporary file beside ``target``, fsync it, rename it onto target."""
    folder, name = os.path.split(target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise OptionError(
            f"cannot save the Fit to {shown!r}: no file can be created in {folder!r} "
            f"({e.strerror or e}). Nothing was written; the Fit is still in memory and can be "
            "saved elsewhere (fit.save(other_path))."
        ) from None
    os.close(fd)
    try:
        mode = os.stat(target).st_mode & 0o7777 if os.path.exists(target) else _default_mode()
        os.chmod(tmp, mode)
        if _tree_nbytes(tree) <= IN_MEMORY_SAVE_BYTES:
            # serialised in memory, then written with plain writes: a full disk is an OSError
            # here, never a failure inside HDF5 (which leaves h5py's state broken: the process
            # crashed later with a segfault, and the Fit in memory was lost with it)
            buf = io.BytesIO()
            tree.to_netcdf(buf, engine="h5netcdf")
            _write_all(tmp, buf.getbuffer())
        else:
            tree.to_netcdf(tmp, engine="h5netcdf")
            _fsync(tmp)
        os.replace(tmp, target)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            msg = (f"saving the Fit to {shown!r} failed ({e.strerror or e}); the previous file "
                   "there (if any) is unchanged, and the Fit is still in memory: save it elsewhere "
                   "(fit.save(other_path)).")
            raise (OSError(e.errno, msg, shown) if e.errno else OSError(msg)) from e
        raise
    try:  # make the rename itself durable (POSIX; a no-op where directories cannot be opened)
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


# ---------------------------------------------------------------------------- loading
_REQUIRED = ("engine", "config", "seed", "cost", "log_evidence", "log_evidence_err")
_KNOWN = frozenset(_REQUIRED) | {"model", "flags", "bayeslik_version", "one_element_attrs"}


def _check_load_size(tree: xr.DataTree, shown: str, max_bytes: int) -> None:
    """Refuse, before reading them, variables that would take more than ``max_bytes``."""
    sizes = [(math.prod(var.shape) * var.dtype.itemsize, f"{node.path.rstrip('/')}/{vname}",
              tuple(var.shape))
             for node in tree.subtree
             for vname, var in node.to_dataset(inherit=False).variables.items()]
    total = sum(n for n, _, _ in sizes)
    if total > max_bytes:
        n, biggest, shape = max(sizes)
        raise DataError(
            f"{shown!r} declares variables that would take {format_bytes(total)} in memory (the "
            f"largest, {biggest!r}, {format_bytes(n)} with shape {shape}), more than the limit of "
            f"{format_bytes(max_bytes)}; "
            "nothing was read. If the file is trusted and the memory is there, pass a larger "
            "max_bytes= to load_fit."
        )


def _read_facts(raw: Any, shown: str) -> dict:
    """The engine facts in a file's root attribute, checked (DataError naming what is wrong)."""
    bad = f"{shown!r}: its '{_ATTR}' attribute"
    try:
        facts = json.loads(raw)
    except (TypeError, ValueError) as e:
        raise DataError(f"{bad} is not valid JSON ({e}); the file is damaged.") from None
    if not isinstance(facts, dict):
        raise DataError(f"{bad} holds a JSON {type(facts).__name__}, not an object; the file is "
                        "damaged or not written by Fit.save.")
    missing = [k for k in _REQUIRED if k not in facts]
    if missing:
        raise DataError(f"{bad} lacks {missing}; the file is damaged or not written by Fit.save.")
    types = {"engine": str, "config": dict, "cost": dict, "model": str, "flags": list,
             "one_element_attrs": dict}
    wrong = [k for k, t in types.items() if k in facts and not isinstance(facts[k], t)]
    for k in ("seed", "log_evidence", "log_evidence_err"):
        v = facts[k]
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            wrong.append(k)
    if wrong:
        raise DataError(f"{bad} has values of the wrong type for {wrong}; the file is damaged.")
    unknown = sorted(set(facts) - _KNOWN)
    if unknown:
        warnings.warn(
            f"{shown!r} was written by bayeslik {facts.get('bayeslik_version', '?')} (this is "
            f"{_version()}); its facts {unknown} are unknown here and were ignored.", stacklevel=3)
    return facts


def _read_cost(raw: dict, shown: str, written_by: Any) -> Cost:
    """The Cost of a file; fields unknown here (a newer bayeslik's) are kept in ``extra``; fields
    an older bayeslik did not write (``compile_cached``) take their defaults."""
    known = {f.name for f in fields(Cost)}
    if "wall_s" not in raw:
        raise DataError(f"{shown!r}: the cost in its '{_ATTR}' attribute lacks 'wall_s'; the "
                        "file is damaged.")
    if not any(raw.get("compile_cached") is v for v in (True, False, None)):
        raise DataError(f"{shown!r}: cost.compile_cached in its '{_ATTR}' attribute is "
                        f"{raw['compile_cached']!r}, not true, false or null; the file is damaged.")
    extra = raw.get("extra", {})
    if not isinstance(extra, dict):
        raise DataError(f"{shown!r}: cost.extra in its '{_ATTR}' attribute is not an object; "
                        "the file is damaged.")
    unknown = sorted(set(raw) - known)
    if unknown:
        extra = {**{k: raw[k] for k in unknown}, **extra}
        warnings.warn(
            f"{shown!r} was written by bayeslik {written_by or '?'} (this is {_version()}): its "
            f"Cost fields {unknown} are unknown here; they are kept in cost.extra.", stacklevel=3)
    try:
        return Cost(**{k: v for k, v in raw.items() if k in known and k != "extra"}, extra=extra)
    except TypeError as e:  # pragma: no cover - every field has a name and a default but wall_s
        raise DataError(f"{shown!r}: the cost in its '{_ATTR}' attribute is unusable ({e}).") from None


def site_dataset(posterior, data: Mapping[str, np.ndarray], sample_dims: list[str], *,
                 coords: Mapping[str, Any] | None = None,
                 attrs: Mapping[str, Any] | None = None) -> xr.Dataset:
    """One ArviZ group of ``data`` {name: array with leading ``sample_dims`` axes}: a site's
    other axes take its dims (``posterior.sites[name].dims``: plate names, the data's or the
    user's names, ``<site>_dim_<i>``; a pointwise log-likelihood, whose event axes are summed,
    takes the leading ones), labelled by the Posterior's ``coords`` where their lengths agree;
    ``coords`` adds labels (e.g. of the sample dims)."""
    import arviz_base as azb

    sites = posterior.sites
    known = dict(getattr(posterior, "coords", None) or {})
    lead = len(sample_dims)
    data = {k: np.asarray(v) for k, v in data.items()}
    dims = {k: list(sites[k].dims[: v.ndim - lead]) for k, v in data.items() if k in sites}
    labels = {dim: known[dim] for k, names in dims.items() for axis, dim in enumerate(names)
              if dim in known and len(known[dim]) == data[k].shape[lead + axis]}
    labels.update(coords or {})
    return azb.dict_to_dataset(data, dims=dims, coords=labels or None, sample_dims=sample_dims,
                               attrs=None if attrs is None else dict(attrs),
                               inference_library=None, check_conventions=False)


def build_datatree(
    posterior,
    draws: Mapping[str, np.ndarray],
    sample_stats: Mapping[str, np.ndarray] | None = None,
    log_likelihood: Mapping[str, np.ndarray] | None = None,
    extra_groups: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> xr.DataTree:
    """Build the ArviZ DataTree of a Fit from arrays with leading (chain, draw) axes.

    Dimension names come from the program: plate names where the site sits in a plate,
    ``<site>_dim_<i>`` otherwise, or the names the data or the user gave (``sites[name].dims``);
    the Posterior's ``coords`` label them in every group; observed data is taken from the
    Posterior.
    """
    groups: dict[str, xr.Dataset] = {}

    def add(name: str, data: Mapping[str, np.ndarray] | None, lead: int = 2) -> None:
        if data:
            groups[name] = site_dataset(posterior, data, ["chain", "draw"][:lead])

    add("posterior", draws)
    add("sample_stats", sample_stats)
    add("log_likelihood", log_likelihood)
    add("observed_data", posterior.observed_data, lead=0)
    for name, group in (extra_groups or {}).items():
        add(name, group)
    tree = xr.DataTree.from_dict(groups)
    tree.attrs.update(dict(attrs or {}))
    created = _dt.datetime.now(_dt.timezone.utc).isoformat()
    tree.attrs.setdefault("created_at", created)
    return tree
