"""Fit: what every engine returns. An ArviZ DataTree, the evidence where estimated, the cost.

A Fit round-trips through netCDF with nothing lost: the DataTree is written as is and the
engine facts (engine, settings, seed, evidence, cost, flags) go into the root group's attributes
as JSON.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import numpy as np
import xarray as xr

from bayeslik.errors import DataError

__all__ = ["Cost", "Fit", "load_fit", "build_datatree"]

_ATTR = "bayeslik_fit"


@dataclass(frozen=True)
class Cost:
    """What a run cost.

    ``wall_s`` is the whole run (compilation included), ``compile_s`` the part spent compiling.
    ``num_loglik_evals`` counts evaluations of the true likelihood (for gradient-based engines
    each gradient evaluation includes one), ``num_grad_evals`` gradient evaluations of the log
    density. ``extra`` holds engine-specific counts (e.g. surrogate evaluations).
    """

    wall_s: float
    compile_s: float = 0.0
    num_loglik_evals: int | None = None
    num_grad_evals: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

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

    def save(self, path: str) -> None:
        """Write the Fit to one netCDF file; ``bayeslik.load_fit(path)`` reads it back whole.

        >>> fit.save("eight_schools.nc")            # doctest: +SKIP
        >>> same = bl.load_fit("eight_schools.nc")  # doctest: +SKIP
        """
        tree = self.idata.copy()
        facts = self._facts()
        # netCDF reads a one-element array attribute back as a scalar: record which were arrays
        facts["one_element_attrs"] = {
            node.path: sorted(k for k, v in node.attrs.items()
                              if isinstance(v, (list, tuple, np.ndarray)) and np.size(v) == 1)
            for node in tree.subtree
        }
        tree.attrs = {**tree.attrs, _ATTR: json.dumps(facts)}
        tree.to_netcdf(path, engine="h5netcdf")

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

    def __repr__(self) -> str:
        head = "\n".join(f"  {k:<17}{v}" for k, v in self._header())
        try:
            table = self.summary().to_string()
        except Exception as e:  # a summary must never hide the Fit
            table = f"(no summary: {e})"
        return f"Fit\n{head}\n{table}"

    def _repr_html_(self) -> str:
        head = "".join(
            f"<tr><th style='text-align:left'>{html.escape(k)}</th><td style='text-align:left'>"
            f"{html.escape(v)}</td></tr>"
            for k, v in self._header()
        )
        try:
            table = self.summary().to_html()
        except Exception as e:
            table = f"<p>(no summary: {html.escape(str(e))})</p>"
        return f"<div><b>bayeslik Fit</b><table>{head}</table>{table}</div>"


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


def load_fit(path: str) -> Fit:
    """Read a Fit written by :meth:`Fit.save`.

    >>> fit = bl.load_fit("eight_schools.nc")  # doctest: +SKIP
    """
    tree = xr.open_datatree(path, engine="h5netcdf")
    tree = tree.load()
    attrs = dict(tree.attrs)
    if _ATTR not in attrs:
        raise DataError(f"{path!r} is not a bayeslik Fit (no '{_ATTR}' attribute in its root group).")
    facts = json.loads(attrs.pop(_ATTR))
    tree.attrs = attrs
    for node_path, names in facts.get("one_element_attrs", {}).items():
        node = tree[node_path]
        node.attrs = {k: (np.atleast_1d(v) if k in names else v) for k, v in node.attrs.items()}
    cost = Cost(**facts["cost"])
    return Fit(
        idata=tree,
        engine=facts["engine"],
        config=_tuples(facts["config"]),
        seed=facts["seed"],
        cost=cost,
        log_evidence=facts["log_evidence"],
        log_evidence_err=facts["log_evidence_err"],
        model=facts.get("model", ""),
        flags=tuple(facts.get("flags", ())),
    )


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
    ``<site>_dim_<i>`` otherwise; observed data is taken from the Posterior.
    """
    import arviz_base as azb

    sites = posterior.sites

    def dims_of(group: Mapping[str, np.ndarray], lead: int) -> dict[str, list[str]]:
        # a site's axis names; a pointwise log-likelihood has only the data's batch axes (its
        # event axes are summed), so it takes the leading ones
        return {k: list(sites[k].dims[: np.ndim(v) - lead]) for k, v in group.items() if k in sites}

    groups: dict[str, xr.Dataset] = {}

    def add(name: str, data: Mapping[str, np.ndarray] | None, lead: int = 2) -> None:
        if data:
            data = {k: np.asarray(v) for k, v in data.items()}
            groups[name] = azb.dict_to_dataset(
                data, dims=dims_of(data, lead), sample_dims=["chain", "draw"] if lead else [],
                inference_library=None, check_conventions=False,
            )

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
