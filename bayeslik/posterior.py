"""Posterior: a NumPyro program with its data bound, as pure functions on flat vectors.

Every engine talks to a model only through a :class:`Posterior`. At construction it runs the
program at fixed, deterministic parameter points (abstractly for the shapes, then eagerly for the
data checks; nothing is compiled) to learn its sites and to check the data, then exposes pure,
jittable functions of a flat *unconstrained* vector ``z`` of length ``ndim``:

* ``logdensity(z) = logprior(z) + loglikelihood(z)``
* ``logprior(z)   = sum_latent log p(x_s | x_<s) + log|det J(z)|``  with ``x = constrain(z)``
* ``loglikelihood(z) = sum_observed log p(y | x) + sum numpyro.factor terms``

The Jacobian of the constraining map lives here and nowhere else: an engine that works in the
unconstrained space never needs to know about supports.

:class:`PosteriorBase` is the prior half (``logprior``, ``constrain``, ``unconstrain``,
``sample_prior``, ``prior_transform``, the sites and the flat layout) that every posterior kind
shares; :class:`Posterior` adds the likelihood half from the same trace, and
:class:`bayeslik.statespace.StateSpacePosterior` a state-space model's likelihood known only
through particle filters.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from jax.flatten_util import ravel_pytree
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to
from numpyro.distributions.util import sum_rightmost

from bayeslik import icdf as _icdf  # at import: its module-level jits are no first-use surprise
from bayeslik.errors import BayeslikError, DataError, ImproperPriorError, ModelError
from bayeslik.external import is_external_site

__all__ = ["Posterior", "PosteriorBase", "SiteInfo", "Evaluation", "PosteriorFunctions",
           "nonfinite_sites", "NonfiniteSite"]


class PosteriorFunctions(NamedTuple):
    """A Posterior's density functions with given data arrays (see ``Posterior.at``)."""

    logdensity: Callable
    logprior: Callable
    loglikelihood: Callable
    pointwise_loglikelihood: Callable
    evaluate: Callable
    constrain: Callable


class Evaluation(NamedTuple):
    """Everything one trace of the program gives at a point z (see ``Posterior.evaluate``)."""

    values: dict
    pointwise_loglikelihood: dict
    logprior: jax.Array
    loglikelihood: jax.Array


@dataclass(frozen=True)
class SiteInfo:
    """What a Posterior knows about one site of the program.

    ``shape`` is the constrained value's shape, ``unconstrained_shape`` the shape of its slice of
    ``z`` (they differ e.g. for a simplex of K entries, which has K-1 free coordinates);
    ``dims`` names each axis (plate names where the program uses plates).
    """

    name: str
    kind: str  # "latent", "observed", "factor" or "deterministic"
    shape: tuple[int, ...]
    unconstrained_shape: tuple[int, ...]
    distribution: str
    dims: tuple[str, ...]
    improper: bool = False
    external: bool = False  # a factor site of bl.external_loglikelihood (a host callback)

    @property
    def size(self) -> int:
        return math.prod(self.unconstrained_shape)


def _is_numeric_array(x: Any) -> bool:
    if isinstance(x, (np.ndarray, jax.Array)):
        return True
    if isinstance(x, (list, tuple)) and len(x) > 0:
        try:
            arr = np.asarray(x)
        except Exception:  # ragged lists etc. are the model's business
            return False
        return arr.dtype.kind in "biuf"
    return False


def _is_array_like(x: Any) -> bool:
    return isinstance(x, (np.ndarray, jax.Array, np.generic)) and not isinstance(x, np.str_)


def _as_jax(x: Any) -> Any:
    if isinstance(x, np.ndarray) and x.dtype.kind in "biuf":
        return jnp.asarray(x)
    return x


def _float(x: Any) -> jax.Array:
    """A value as a JAX array, floating values in the default float type (float64 under
    ``jax_enable_x64``, so a float32 point estimate does not mix precisions)."""
    x = jnp.asarray(x)
    return x.astype(jnp.result_type(float)) if jnp.issubdtype(x.dtype, jnp.floating) else x


def flat_unconstrained(trace: dict, latent) -> jax.Array:
    """The flat unconstrained vector of the ``latent`` sites' values in a NumPyro ``trace``
    (each mapped by the inverse of its support's bijection, then raveled in the Posterior's
    order)."""
    return ravel_pytree({n: biject_to(trace[n]["fn"].support).inv(trace[n]["value"])
                         for n in latent})[0]


def _first_index(mask: np.ndarray) -> tuple:
    """The index of the first True entry of a boolean array with at least one (() for a 0-d one),
    for messages that point at the offending value."""
    mask = np.asarray(mask)
    return tuple(int(i) for i in np.argwhere(mask)[0]) if mask.ndim else ()


def _check_finite(name: str, value: Any, what: str) -> None:
    arr = np.asarray(value)
    if arr.dtype.kind not in "fc":
        return
    bad = ~np.isfinite(arr)
    if bad.any():
        num_nan = int(np.isnan(arr).sum())
        num_inf = int(bad.sum()) - num_nan
        first = _first_index(bad)
        raise DataError(
            f"{what} '{name}' contains {num_nan} NaN and {num_inf} infinite value(s) "
            f"(first at index {first} of shape {arr.shape}). Remove or impute them before binding "
            f"the data (drop those entries and the matching entries of the other arrays, or fill "
            f"in estimates). {_MISSING_ADVICE}"
        )


#: How to keep the shape of data with missing entries, in a way a Posterior accepts: every data
#: array must be finite, even where masked (a NaN under a mask still makes NaN gradients).
_MISSING_ADVICE = (
    "To keep the shape, replace them by a finite placeholder inside the distribution's support "
    "(e.g. np.where(ok, y, np.mean(y[ok]))), pass the mask `ok` (True = observed) as another "
    "argument of the model and observe under `with numpyro.handlers.mask(mask=ok):`; "
    "`obs_mask=` in numpyro.sample does not fit here (it adds a parameter for every entry, and "
    "those of the observed entries have no prior: flat, improper directions)."
)


def _check_argument(name: str, value: Any, what: str) -> Any:
    """Refuse data the engines would misread (a numpy masked array, whose mask would be ignored;
    complex values); return the value to bind (a masked array with nothing masked as its data)."""
    if isinstance(value, np.ma.MaskedArray):
        masked = np.ma.getmaskarray(value)
        if not masked.any():
            return np.ma.getdata(value)
        first = _first_index(masked)
        raise DataError(
            f"{what} '{name}' is a numpy masked array with {int(masked.sum())} masked entr"
            f"{'y' if masked.sum() == 1 else 'ies'} (first at index {first} of shape "
            f"{masked.shape}); bayeslik would ignore the mask and use the values under it. Drop "
            f"the masked entries ({name}.compressed(), and the matching entries of the other "
            f"arrays), or impute them. To keep the shape, pass {name}.filled(<a value inside "
            f"the support, e.g. np.mean({name})>) and the mask `ok = ~np.ma.getmaskarray({name})` "
            "(True = observed) as another argument of the model, and observe under "
            "`with numpyro.handlers.mask(mask=ok):`. Do not pass the filled array alone: its "
            "placeholders would be taken as data."
        )
    kind = None
    if isinstance(value, complex):
        kind = "c"
    elif isinstance(value, (np.ndarray, jax.Array, np.generic)):
        try:
            kind = np.dtype(value.dtype).kind
        except TypeError:  # e.g. a PRNG key array
            kind = None
    elif isinstance(value, (list, tuple)) and len(value) > 0:
        try:
            kind = np.asarray(value).dtype.kind
        except Exception:  # ragged lists etc. are the model's business
            kind = None
    if kind == "c":
        raise DataError(
            f"{what} '{name}' is complex-valued ({np.asarray(value).dtype}); bayeslik's "
            "densities are real. Pass the real quantity the model needs (np.real, np.abs, "
            "np.angle), or the real and imaginary parts as two real arguments."
        )
    return value


# ---------------------------------------------------------------------- pandas, xarray, lists
class _Labels(NamedTuple):
    """What an argument's container said about its axes (pandas, xarray): per axis a dim name
    and a list of labels, None where it had none."""

    dims: tuple
    coords: tuple


#: xarray's names for axes created without names (``dim_0``, ...): no name for bayeslik.
_AUTO_DIM = re.compile(r"dim_\d+")


def _axis_name(name: Any) -> str | None:
    return None if name is None or _AUTO_DIM.fullmatch(str(name)) else str(name)


def _index_labels(index: Any, pd: Any) -> list | None:
    """A pandas Index's labels as a list; None for pandas' default 0..n-1 (nothing to say) and a
    MultiIndex (no single label per entry)."""
    if isinstance(index, pd.MultiIndex):
        return None
    if isinstance(index, pd.RangeIndex) and index.start == 0 and index.step == 1:
        return None
    return index.tolist()


def _not_numeric(name: str, what: str, detail: str) -> DataError:
    return DataError(
        f"{what} '{name}' {detail}; bayeslik's data must be numbers (bool, int or float). "
        f"Pass only the numeric data (for a DataFrame, its numeric columns: df[[\"a\", \"b\"]]); "
        f"convert numbers stored as text with {name}.astype(float); for categories pass integer "
        f"codes ({name}.astype(\"category\").cat.codes) and, to keep their names as labels, "
        "bl.Posterior(...).with_coords(coords={<dim>: categories}, dims={<site>: [<dim>]})."
    )


def _pandas_array(name: str, obj: Any, what: str, pd: Any) -> np.ndarray:
    """A pandas Series, Index or DataFrame as a NumPy array; missing values become NaN (the
    NaN check then names them), non-numeric columns a DataError."""
    frame = isinstance(obj, pd.DataFrame)
    dtypes = list(obj.dtypes) if frame else [obj.dtype]
    cols = list(obj.columns) if frame else [None]
    bad = [(c, d) for c, d in zip(cols, dtypes)
           if isinstance(d, pd.CategoricalDtype) or not pd.api.types.is_numeric_dtype(d)]
    if bad:
        if frame:
            detail = ("is a DataFrame with non-numeric column(s) "
                      + ", ".join(f"{c!r} ({d})" for c, d in bad))
        elif isinstance(bad[0][1], pd.CategoricalDtype):
            detail = f"is categorical ({bad[0][1]}): pass {name}.cat.codes"
        else:
            detail = f"holds non-numeric values (dtype {bad[0][1]})"
        raise _not_numeric(name, what, detail)
    kinds = [np.dtype(getattr(d, "numpy_dtype", d)) for d in dtypes]  # nullable Int64, Float32
    dtype = np.result_type(*kinds) if kinds else np.dtype(float)
    missing = bool(np.asarray(obj.isna()).any())
    if missing and dtype.kind not in "fc":
        dtype = np.dtype(np.float64)  # pd.NA in an integer or boolean column: NaN, then refused
    if missing:
        return np.asarray(obj.to_numpy(dtype=dtype, na_value=np.nan))
    return np.asarray(obj.to_numpy(dtype=dtype))


def _sequence_leaves(value: Any, depth: int = 0) -> list | None:
    """The leaves of nested lists/tuples, None if deeper than 32 levels (a cycle or nonsense)."""
    if depth > 32:
        return None
    out = []
    for x in value:
        if isinstance(x, (list, tuple)):
            sub = _sequence_leaves(x, depth + 1)
            if sub is None:
                return None
            out.extend(sub)
        else:
            out.append(x)
    return out


def _sequence_array(name: str, value: Any, what: str) -> Any:
    """A list or tuple of numbers (nested: rectangular) as a NumPy array. Lists of strings and
    ragged lists of numbers are refused; tuples of ints (layer sizes, shapes) and of other
    things (configuration) and lists of arrays of different shapes go to the model as they
    are."""
    leaves = _sequence_leaves(value)
    if leaves is None or (not leaves and isinstance(value, tuple)):
        return value
    if isinstance(value, tuple) and all(isinstance(x, (int, np.integer))
                                        and not isinstance(x, (bool, np.bool_)) for x in leaves):
        return value  # a tuple of ints is configuration (layer sizes, a shape): kept static
    number = (bool, int, float, complex, np.number, np.bool_)
    if all(isinstance(x, number) for x in leaves):
        try:
            arr = np.asarray(value)
        except ValueError:
            lengths = [len(x) if isinstance(x, (list, tuple)) else "a number" for x in value]
            raise DataError(
                f"{what} '{name}' is a ragged {type(value).__name__} (its entries have lengths "
                f"{lengths[:8]}{' ...' if len(lengths) > 8 else ''}); bayeslik's data are "
                "rectangular arrays. Pad it to one length and pass a mask as another argument "
                "of the model, or pass the pieces as separate arguments."
            ) from None
        if arr.dtype.kind not in "biufc":  # e.g. integers too large for int64
            raise _not_numeric(name, what, f"gives a NumPy array of dtype {arr.dtype}")
        return arr
    if isinstance(value, list):
        if any(isinstance(x, (str, bytes, np.str_, np.bytes_)) for x in leaves):
            raise _not_numeric(name, what, "is a list holding strings")
        try:
            arr = np.asarray(value)
        except Exception:  # arrays of different shapes: the model's business
            return value
        return arr if arr.dtype.kind in "biufc" else value
    return value


def _convert_argument(name: str, value: Any, what: str) -> tuple[Any, _Labels | None]:
    """A data argument as the engines need it, with the labels its container carried.

    pandas objects (Series, DataFrame, Index) and xarray DataArrays become NumPy arrays (their
    index, columns, dims and coords the labels), lists and tuples of numbers NumPy arrays, so
    every later check sees the numbers. Non-numeric data is refused. pandas and xarray are never
    imported here: an object can only be one of theirs if its library is already loaded."""
    pd, xr = sys.modules.get("pandas"), sys.modules.get("xarray")
    if xr is not None and isinstance(value, xr.Dataset):
        raise DataError(
            f"{what} '{name}' is an xarray Dataset; pass its variables as separate arguments "
            f"({name}[\"y\"]), each a DataArray or an array."
        )
    if xr is not None and isinstance(value, xr.DataArray):
        arr = np.asarray(value.to_numpy())
        if arr.dtype.kind not in "biufc":
            raise _not_numeric(name, what, f"is a DataArray of dtype {arr.dtype}")
        coords = tuple(value[d].values.tolist() if d in value.indexes else None
                       for d in value.dims)
        return arr, _Labels(tuple(_axis_name(d) for d in value.dims), coords)
    if pd is not None and isinstance(value, (pd.Series, pd.DataFrame, pd.Index)):
        arr = _pandas_array(name, value, what, pd)
        if isinstance(value, pd.Index):
            return arr, None
        if isinstance(value, pd.Series):
            return arr, _Labels((_axis_name(value.index.name),),
                                (_index_labels(value.index, pd),))
        return arr, _Labels(
            (_axis_name(value.index.name), _axis_name(value.columns.name)),
            (_index_labels(value.index, pd), _index_labels(value.columns, pd)),
        )
    if pd is not None and isinstance(value, pd.Categorical):
        raise _not_numeric(name, what, f"is a pandas Categorical: pass {name}.codes")
    if isinstance(value, (list, tuple)):
        return _sequence_array(name, value, what), None
    if isinstance(value, np.ndarray) and value.dtype.kind in "OUSVMm":
        raise _not_numeric(name, what, f"is a NumPy array of dtype {value.dtype}")
    return value, None


def _check_label_keywords(model: Callable, kwargs: Mapping[str, Any]) -> None:
    """Refuse ``coords=`` / ``dims=`` (ArviZ's keywords) given to a program that has no such
    parameter: every keyword of ``bl.Posterior`` goes to the program, labels go through
    :meth:`PosteriorBase.with_coords`."""
    given = [k for k in ("coords", "dims") if k in kwargs]
    if not given:
        return
    try:
        params = inspect.signature(model).parameters
    except (TypeError, ValueError):  # not inspectable: let the program decide
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    missing = [k for k in given if k not in params]
    if missing:
        name = getattr(model, "__name__", type(model).__name__)
        raise DataError(
            f"{' and '.join(f'{k}=' for k in missing)} given, but model '{name}' has no such "
            "parameter: every keyword of bl.Posterior is an argument of the model. To label "
            "dims and coords as in ArviZ, use bl.Posterior(model, ...).with_coords(coords="
            "{dim: labels}, dims={site: [dim, ...]})."
        )


def _as_labels(dim: str, labels: Any) -> list:
    """User coords for ``dim`` as a list (from a list, tuple, NumPy array or pandas Index)."""
    if isinstance(labels, (str, bytes)) or np.ndim(labels) != 1:
        raise DataError(
            f"coords['{dim}'] must be a one-dimensional sequence of labels (a list, a NumPy "
            f"array or a pandas Index), got {type(labels).__name__}"
            f"{'' if isinstance(labels, (str, bytes)) else f' of shape {np.shape(labels)}'}."
        )
    return labels.tolist() if hasattr(labels, "tolist") else list(labels)


def _resolve_labels(
    sites: Mapping[str, SiteInfo], program_dims: Mapping[str, tuple], links: Mapping[str, str],
    arg_labels: Mapping[str, _Labels], user_coords: Mapping[str, list],
    user_dims: Mapping[str, tuple],
) -> tuple[dict[str, tuple], dict[str, list]]:
    """The dims of every site and the coords: the program's dims (plate names,
    ``<site>_dim_<i>``), overridden by the user's dims; an observed site fed by a labelled
    argument (``links``: site -> argument) takes the argument's axis names where it has no plate
    and its labels for those dims; named axes of any argument label the dims of that name when
    the lengths agree; the user's coords override the data's. Returns (dims, coords)."""
    dims = {n: list(d) for n, d in program_dims.items()}
    for site, names in user_dims.items():
        dims[site] = list(names)
    proposed: dict[str, tuple[list, str]] = {}

    def sizes(dim: str) -> set[int]:
        return {sites[n].shape[i] for n, d in dims.items() for i, x in enumerate(d) if x == dim}

    def propose(dim: str, labels: list | None, arg: str) -> None:
        if labels is None or dim in user_coords:
            return
        if dim in proposed and proposed[dim][0] != labels:
            other, theirs = proposed[dim][1], proposed[dim][0]
            raise DataError(
                f"arguments '{other}' and '{arg}' label dim '{dim}' differently ({theirs[:4]}... "
                f"and {labels[:4]}...); give them the same index, or label the dim yourself: "
                f"bl.Posterior(...).with_coords(coords={{'{dim}': labels}})."
            )
        proposed.setdefault(dim, (labels, arg))

    for site, arg in links.items():
        labels = arg_labels.get(arg)
        if labels is None:
            continue
        for i, (name, coord) in enumerate(zip(labels.dims, labels.coords)):
            if i >= len(dims[site]):
                break
            if name is not None and dims[site][i] == f"{site}_dim_{i}":
                dims[site][i] = name
            if coord is not None and sizes(dims[site][i]) == {len(coord)}:
                propose(dims[site][i], coord, arg)
    for arg, labels in arg_labels.items():
        for name, coord in zip(labels.dims, labels.coords):
            if name is not None and coord is not None and sizes(name) == {len(coord)}:
                propose(name, coord, arg)

    lengths: dict[str, dict[int, str]] = {}
    for n, d in dims.items():
        for i, x in enumerate(d):
            lengths.setdefault(x, {}).setdefault(sites[n].shape[i], n)
    for dim, by_len in lengths.items():
        if len(by_len) > 1:
            raise DataError(
                f"dim '{dim}' has different lengths: " + ", ".join(
                    f"{size} in site '{n}'" for size, n in by_len.items())
                + "; one dim name must have one length. Check the dims given to with_coords."
            )
    for dim, coord in user_coords.items():
        if dim not in lengths:
            raise DataError(
                f"coords given for dim '{dim}', which no site has; the sites' dims are "
                f"{sorted(lengths)}. Name a site's axes with dims={{<site>: ['{dim}', ...]}} "
                "(a plate's name is the dim of its axis)."
            )
        (size, site), = lengths[dim].items()
        if len(coord) != size:
            raise DataError(
                f"coords for dim '{dim}' have {len(coord)} labels, but dim '{dim}' has length "
                f"{size} (site '{site}'); give one label per entry."
            )
    coords = {dim: labels for dim, (labels, _arg) in proposed.items()}
    coords.update(user_coords)
    return {n: tuple(d) for n, d in dims.items()}, coords


def _site_dims(site: dict, shape: tuple[int, ...], event_ndim: int) -> tuple[str, ...]:
    """Axis names of a site's value: plate names for plate axes, ``<site>_dim_<i>`` otherwise."""
    ndim = len(shape)
    batch_ndim = ndim - event_ndim
    dims: list[str | None] = [None] * ndim
    for frame in site.get("cond_indep_stack", ()):
        if frame.dim is None:
            continue
        axis = batch_ndim + frame.dim
        if 0 <= axis < batch_ndim and shape[axis] == frame.size:
            dims[axis] = frame.name
    return tuple(d if d is not None else f"{site['name']}_dim_{i}" for i, d in enumerate(dims))


_WRAPPERS = ("ExpandedDistribution", "MaskedDistribution", "Independent")


def _dist_name(fn: Any) -> str:
    """The distribution's family name, seen through expand/mask/to_event wrappers."""
    while type(fn).__name__ in _WRAPPERS and hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return type(fn).__name__


def _is_factor(site: dict) -> bool:
    """Whether an observed site is a factor: ``numpyro.factor``'s Unit distribution, or an
    external log-likelihood (:func:`bayeslik.external.external_loglikelihood`)."""
    return _dist_name(site["fn"]) == "Unit" or is_external_site(site)


def _is_improper(fn: Any) -> bool:
    from numpyro.distributions import ImproperUniform

    base = fn
    for _ in range(8):  # unwrap Independent / Masked / Expanded wrappers
        if isinstance(base, ImproperUniform):
            return True
        if hasattr(base, "base_dist"):
            base = base.base_dist
        else:
            break
    return False


def _same_support(a: Any, b: Any) -> bool:
    """True when two traces' supports of a site agree, i.e. the support does not depend on
    latent parameters and the data can be checked against it once."""
    if b is None or type(a) is not type(b):
        return False
    va, vb = vars(a), vars(b)
    for k in va:
        x, y = va[k], vb.get(k)
        if isinstance(x, constraints.Constraint):
            if not _same_support(x, y):
                return False
        elif isinstance(x, (jax.Array, np.ndarray, float, int)):
            if np.shape(x) != np.shape(y) or not np.array_equal(np.asarray(x), np.asarray(y)):
                return False
    return True


# The inspection points. At point c every latent site takes the value
# ``biject_to(support)(c * ones)``: the image of a constant unconstrained vector, well inside the
# support whatever the prior's location and scale (a real site at c, a positive one at exp(c), a
# simplex near uniform, an interval near its middle). The first point that runs is the one the
# site facts and data checks come from, the next one tells parameter-dependent supports apart;
# the others are only retries for models that give invalid numbers at some parameter values.
_INSPECTION_POINTS = (0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -2.0)

# Errors that running the program at a concrete point can raise because of the numbers alone
# (numpyro's argument validation raises ValueError for a NaN loc, a non-positive scale, ...).
_RUN_ERRORS = (ValueError, TypeError, IndexError, ArithmeticError)

# Errors of abstract tracing that only say the program needs concrete parameter values (Python
# control flow on them): no verdict on the data, the eager runs decide.
_CONCRETIZATION_ERRORS = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerArrayConversionError,
    jax.errors.TracerIntegerConversionError,
    jax.errors.TracerBoolConversionError,
    jax.errors.UnexpectedTracerError,
)


def _point_value(site: dict, c: Any) -> Any:
    """The value of a latent sample site at inspection point ``c`` (None: leave the site alone)."""
    if site["type"] != "sample" or site["is_observed"]:
        return None
    fn = site["fn"]
    if fn.is_discrete or (site.get("infer") or {}).get("enumerate"):
        return None  # rejected by _inspect with a message of its own
    try:
        transform = biject_to(fn.support)
    except NotImplementedError:
        return None  # rejected by _inspect with a message of its own
    return transform(jnp.full(transform.inverse_shape(fn.shape()), c))


def _site_shape(site: dict) -> tuple[int, ...]:
    """A site's shape as SiteInfo records it (latent: the distribution's; else the value's)."""
    if site["type"] == "sample" and not site["is_observed"]:
        return tuple(site["fn"].shape())
    return tuple(jnp.shape(site["value"]))


def _brief(value: Any) -> str:
    """A short rendering of a parameter value for an error message."""
    try:
        a = np.asarray(value, dtype=float)
    except Exception:
        return "?"
    if a.size == 1:
        return f"{a.item():.3g}"
    if a.size <= 4:
        return "[" + ", ".join(f"{x:.3g}" for x in a.ravel()) + "]"
    return f"<shape {a.shape}, {a.min():.3g}..{a.max():.3g}>"


def _brief_point(c: float, values: dict) -> str:
    items = [f"{n}={_brief(v)}" for n, v in values.items()]
    if len(items) > 6:
        items = items[:6] + [f"... ({len(values) - 6} more)"]
    return f"z={c:g}: " + (", ".join(items) if items else "(failed before the first latent site)")


def _dist_args(fn: Any) -> list[tuple[int, Any, str, Any]]:
    """(depth, distribution, argument name, value) for the checkable arguments of ``fn`` and of
    the distributions it wraps (depth 0 is ``fn`` itself)."""
    out = []
    d = fn
    for depth in range(8):
        try:
            args = d.get_args()
        except Exception:
            args = {}
        for param, value in args.items():
            constraint = d.arg_constraints.get(param)
            if constraint is None or constraints.is_dependent(constraint):
                continue
            if isinstance(value, (jax.Array, np.ndarray, float, int)):
                out.append((depth, d, param, value))
        if not hasattr(d, "base_dist"):
            break
        d = d.base_dist
    return out


def _invalid_args(trace: dict) -> list[tuple[str, int, Any, str, Any]]:
    """(site, depth, distribution, argument, value) for every distribution argument in a
    concrete trace that violates its constraint, as numpyro's argument validation finds them."""
    bad = []
    for name, site in trace.items():
        if site["type"] != "sample":
            continue
        for depth, d, param, value in _dist_args(site["fn"]):
            try:
                with jax.ensure_compile_time_eval():
                    ok = bool(np.all(np.asarray(d.arg_constraints[param](value))))
            except Exception:
                continue
            if not ok:
                bad.append((name, depth, d, param, value))
    return bad


def _equal_values(a: Any, b: Any) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False
    try:
        return bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
    except TypeError:
        return bool(np.array_equal(a, b))


def _dependent_outputs(closed_jaxpr: Any) -> list[bool]:
    """For each output of a jaxpr, whether it may depend on the inputs (a forward reachability
    over the equations; an equation with any dependent input makes all its outputs dependent,
    so sub-jaxprs are handled conservatively). Constants (the data) are not inputs."""
    jaxpr = closed_jaxpr.jaxpr

    def is_var(v):
        return type(v).__name__ != "Literal"

    dep = set(jaxpr.invars)
    for eqn in jaxpr.eqns:
        if any(is_var(v) and v in dep for v in eqn.invars):
            dep.update(eqn.outvars)
    return [is_var(v) and v in dep for v in jaxpr.outvars]


def _log_density(site: dict | None) -> np.ndarray | None:
    """The observed site's log density of its value, eagerly at the traced point (None if it
    cannot be evaluated)."""
    if site is None:
        return None
    try:
        with _validation_off():
            return np.asarray(site["fn"].log_prob(site["value"]))
    except Exception:
        return None


def _bounds(support: Any) -> list:
    """The finite bounds a value of a continuous support can sit on (its closed ends)."""
    while hasattr(support, "base_constraint"):
        support = support.base_constraint
    if isinstance(support, type(constraints.simplex)):
        return [0.0, 1.0]
    out = []
    for attr in ("lower_bound", "upper_bound"):
        b = getattr(support, attr, None)
        if isinstance(b, (jax.Array, np.ndarray, float, int)):
            out.append(b)
    return out


def _check_boundary(site: dict, twin: dict | None) -> None:
    """Refuse observed values on a closed end of a continuous site's support where its density
    is 0 or infinite (y = 0 or 1 for a Beta, a zero in a Dirichlet observation): in the support,
    so the support check lets them through, but the log-likelihood is -inf or +inf there. A value
    counts where it sits on a bound and its log density is not finite at one of the two
    inspection points (the site's arguments at those points)."""
    name, fn, value = site["name"], site["fn"], np.asarray(site["value"])
    bounds = _bounds(fn.support)
    if not bounds:
        return
    lps = [lp for lp in (_log_density(site), _log_density(twin)) if lp is not None]
    event_ndim = len(fn.event_shape)
    batch = value.shape[: value.ndim - event_ndim]
    try:
        not_finite = np.zeros(batch, bool)
        for lp in lps:
            not_finite |= np.broadcast_to(~np.isfinite(lp), batch)
        on_bound = np.zeros(value.shape, bool)
        for b in bounds:
            on_bound |= np.asarray(value == np.asarray(b), bool)
    except ValueError:  # shapes that do not line up: the density will tell
        return
    if event_ndim:
        on_bound = on_bound.reshape(batch + (-1,)).any(-1)
    bad = not_finite & on_bound
    if not bad.any():
        return
    first = _first_index(bad)
    raise DataError(
        f"observed site '{name}' has {int(bad.sum())} value(s) on the boundary of the support "
        f"{fn.support} of {_dist_name(fn)}, where its density is 0 or infinite (first at index "
        f"{first}: {_brief(value[first] if value.ndim else value)}); the log-likelihood is -inf "
        "or +inf there, so no engine can start or the posterior is degenerate. Move such values "
        "strictly inside the support (e.g. np.clip(y, eps, 1 - eps) for a Beta, with eps below "
        "the data's resolution), or model them separately (a zero- or one-inflated likelihood)."
    )


class _validation_off:
    """numpyro's argument validation off for a block; both switches restored exactly after
    (``numpyro.validation_enabled`` restores only the module flag)."""

    def __enter__(self):
        from numpyro.distributions import distribution as _d

        self._saved = (_d._VALIDATION_ENABLED, _d.Distribution._validate_args)
        numpyro.enable_validation(False)

    def __exit__(self, *exc):
        from numpyro.distributions import distribution as _d

        _d._VALIDATION_ENABLED, _d.Distribution._validate_args = self._saved
        return False


class _Abstract(NamedTuple):
    """What the abstract run of a program tells (see ``Posterior._abstract_run``)."""

    shapes: dict  # site -> shape, as SiteInfo records it
    args: dict | None  # (site, wrapper depth, argument) -> may it depend on the parameters?
    computed_obs: frozenset  # observed sites whose value may depend on the parameters


def _all_finite(value: Any) -> bool:
    arr = np.asarray(value)
    return arr.dtype.kind not in "fc" or bool(np.isfinite(arr).all())


class PosteriorBase:
    """The prior half every posterior kind shares: a NumPyro program whose latent sample sites
    are the parameters, with its arguments ("data") bound, as pure functions of a flat
    *unconstrained* vector ``z`` of length ``ndim``.

    Construction inspects the program as :class:`Posterior` describes (fixed points, no random
    draws, every problem a DataError or ModelError naming the argument or site) and builds:

    * ``logprior(z) = sum_latent log p(x_s | x_<s) + log|det J(z)|`` with ``x = constrain(z)``;
    * ``constrain(z)`` ({latent and deterministic site: value}), ``unconstrain(values)``,
      ``sample_prior(rng_key, n)``, the lazily built ``prior_transform``;
    * the sites (``sites``, ``latent_names``, ``site_shapes``, ``offsets``), the flat layout
      (``flatten``/``unflatten``), ``name``, ``cache_key``, ``require_proper_prior``.

    The kinds differ in the likelihood half: :class:`Posterior` (a tractable likelihood from
    the program's observed sites), :class:`bayeslik.statespace.StateSpacePosterior` (a
    state-space model's likelihood, known only through particle filters). Engines say which
    kinds they run on (``bayeslik.api.register_engine(..., accepts=...)``).
    """

    def __init__(self, model: Callable, *args: Any, **kwargs: Any) -> None:
        if not callable(model):
            raise ModelError(f"`model` must be a NumPyro program (a callable), got {type(model).__name__}.")
        _check_label_keywords(model, kwargs)
        # pandas, xarray and lists become NumPy arrays first, so that every check sees numbers
        arg_labels: dict[str, _Labels] = {}
        converted = []
        for i, a in enumerate(args):
            a, labels = _convert_argument(f"args[{i}]", a, "positional argument")
            converted.append(a)
            if labels is not None:
                arg_labels[f"args[{i}]"] = labels
        args = tuple(converted)
        for k, v in list(kwargs.items()):
            kwargs[k], labels = _convert_argument(k, v, "argument")
            if labels is not None:
                arg_labels[k] = labels
        args = tuple(_check_argument(f"args[{i}]", a, "positional argument")
                     for i, a in enumerate(args))
        kwargs = {k: _check_argument(k, v, "argument") for k, v in kwargs.items()}
        for i, a in enumerate(args):
            if _is_numeric_array(a):
                _check_finite(f"args[{i}]", a, "positional argument")
        for k, v in kwargs.items():
            if _is_numeric_array(v):
                _check_finite(k, v, "argument")
        self._model = model
        # NumPy data becomes JAX arrays once: numpyro mixes np and jnp ops on tracers badly
        self._args = tuple(_as_jax(a) for a in args)
        self._kwargs = {k: _as_jax(v) for k, v in kwargs.items()}
        self.name = getattr(model, "__name__", type(model).__name__)
        # the array arguments are the "data": engines may pass other arrays of the same shapes
        # in their place (data = {"args[i]" or keyword: array}), so compiled code is reused
        self._data = {
            **{f"args[{i}]": a for i, a in enumerate(self._args) if isinstance(a, jax.Array)},
            **{k: v for k, v in self._kwargs.items() if isinstance(v, jax.Array)},
        }

        try:
            trace, twin, abstract = self._inspection_traces()
        except (AssertionError, AttributeError) as e:  # numpyro's plate assert; x.shape of a float
            err = self._early_failure(e)
            if err is None:
                raise
            raise err from e
        self._sites = self._inspect(trace, twin, abstract)
        latent = [s for s in self._sites.values() if s.kind == "latent"]
        if not latent:
            raise ModelError(
                f"model '{self.name}' has no latent sample site: there is nothing to infer. "
                "Check that the parameters are numpyro.sample sites without `obs=`."
            )
        self._latent_names = tuple(s.name for s in latent)
        # The flat layout: ravel_pytree orders a dict by key, which fixes z's layout once.
        template = {s.name: jnp.zeros(s.unconstrained_shape) for s in latent}
        flat, self._unravel = ravel_pytree(template)
        self.ndim = int(flat.shape[0])
        offsets, start = {}, 0
        for name in sorted(template):
            size = self._sites[name].size
            offsets[name] = (start, start + size)
            start += size
        self.offsets = offsets
        self._observed_data = {
            name: np.asarray(trace[name]["value"])
            for name, s in self._sites.items()
            if s.kind == "observed"
        }
        self._improper = tuple(s.name for s in latent if s.improper)
        self._prior_transform = None
        # labels (dims and coords, for ArviZ): from the data's containers, then the user's
        self._program_dims = {n: s.dims for n, s in self._sites.items()}
        self._links = self._observed_links(trace)
        self._relabel(arg_labels, {}, {})

        self.logprior = self._make_logdensity("prior")
        self.constrain = self._make_constrain()
        self.unconstrain = self._make_unconstrain()
        self.sample_prior = self._make_sample_prior()

    # ------------------------------------------------------------------ inspection
    def _trace_at(self, c: Any, values: dict | None = None) -> tuple[dict, dict]:
        """Trace the program with every latent site at inspection point ``c`` (a float or an
        abstract scalar); return (trace, {latent site: the value it was given}). ``values``, if
        given, is filled as the program runs (what it holds tells where a failing run got to)."""
        values = {} if values is None else values

        def substitute_fn(site):
            value = _point_value(site, c)
            if value is not None:
                values[site["name"]] = value
            return value

        model = handlers.substitute(self._model, substitute_fn=substitute_fn)
        seeded = handlers.seed(model, rng_seed=0)
        return handlers.trace(seeded).get_trace(*self._args, **self._kwargs), values

    def _named_arguments(self) -> dict[str, Any]:
        return {**{f"args[{i}]": a for i, a in enumerate(self._args)}, **self._kwargs}

    def _argument_hints(self) -> str:
        """Sentences naming empty and scalar array arguments, the usual causes of a failing run."""
        named = self._named_arguments()
        empty = {k: np.shape(v) for k, v in named.items()
                 if _is_array_like(v) and 0 in np.shape(v)}
        scalar = [k for k, v in named.items() if _is_array_like(v) and np.ndim(v) == 0]
        hints = []
        if empty:
            hints.append(
                f"argument(s) {list(empty)} are empty (shape(s) {list(empty.values())}): a "
                "plate or an observed site over them has nothing to hold; pass at least one "
                "observation, or leave the empty argument out if the model allows it.")
        if scalar:
            hints.append(
                f"argument(s) {scalar} are scalars (shape ()): if the model expects an array, "
                "pass np.atleast_1d(...) of them.")
        return (" " + " ".join(hints)) if hints else ""

    def _early_failure(self, e: Exception) -> DataError | None:
        """The DataError for numpyro's "size of plate should be positive" assertion or for an
        attribute a scalar argument lacks (``y.shape`` of a float); None for other errors."""
        named = self._named_arguments()
        duplicated = re.search(r"unique names but got `(.*)` duplicated", str(e))
        if isinstance(e, AssertionError) and duplicated:
            return ModelError(
                f"model '{self.name}': site '{duplicated.group(1)}' appears twice (numpyro: all "
                "sites must have unique names). Give every sample, deterministic and factor "
                "site its own name; a bl.external_loglikelihood called more than once (in a "
                "loop) needs a different name at each call (e.g. f'loglik_{i}').")
        if isinstance(e, AssertionError) and "size of plate should be positive" in str(e):
            sizes = [f"{k}={v!r}" for k, v in named.items()
                     if isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v <= 0]
            return DataError(
                f"model '{self.name}': a plate has size 0 or less (numpyro: size of plate should "
                "be positive), so there is nothing to observe."
                + (f" The size arguments {sizes} must be positive." if sizes else "")
                + (self._argument_hints() or " Check the arguments that set the plate sizes.")
            )
        if isinstance(e, AttributeError):
            msg = str(e)
            culprits = [k for k, v in named.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)
                        and msg.startswith(f"'{type(v).__name__}' object has no attribute")]
            if culprits:
                return DataError(
                    f"running model '{self.name}' on the given data failed with AttributeError: "
                    f"{msg}. Argument(s) {culprits} are Python scalars, and the model uses them "
                    "as arrays: pass an array (np.atleast_1d(...)) if that is what it expects.")
        return None

    def _shape_error(self, e: Exception) -> DataError:
        shapes = ", ".join(
            f"{k}: {np.shape(v)}" for k, v in self._kwargs.items() if _is_numeric_array(v)
        )
        return DataError(
            f"running model '{self.name}' on the given data failed with "
            f"{type(e).__name__}: {e}\nThe array arguments have shapes {{{shapes}}}; check that "
            "they agree with each other and with what the model expects." + self._argument_hints()
        )

    def _abstract_run(self) -> _Abstract | None:
        """Site shapes and parameter dependence from one abstract run of the program: the
        inspection point is a symbolic scalar (``jax.make_jaxpr``; nothing is evaluated or
        compiled), so no parameter value can give NaN or overflow here. None when the program
        needs concrete parameter values (Python control flow on them). A shape or type error
        here does not depend on parameter values: it is confirmed by one eager run and raised as
        a DataError naming the shapes."""
        shapes: dict[str, tuple[int, ...]] = {}

        def run(c):
            trace, _ = self._trace_at(c)
            args, obs = {}, {}
            for name, site in trace.items():
                if site["type"] in ("sample", "deterministic"):
                    shapes[name] = _site_shape(site)
                if site["type"] == "sample":
                    for depth, _d, param, value in _dist_args(site["fn"]):
                        args[f"{name}\0{depth}\0{param}"] = jnp.asarray(value)
                    if site["is_observed"]:
                        obs[name] = jnp.asarray(site["value"])
            return {"args": args, "obs": obs}

        try:
            with _validation_off():
                closed, out = jax.make_jaxpr(run, return_shape=True)(
                    jnp.zeros((), jnp.zeros(()).dtype)
                )
        except _CONCRETIZATION_ERRORS:
            return None
        except BayeslikError:  # raised on purpose by the program (bl.external_loglikelihood)
            raise
        except (ValueError, TypeError, IndexError) as e:
            try:  # a quirk of tracing rather than of the data if an eager run goes through
                self._trace_at(_INSPECTION_POINTS[0])
            except _RUN_ERRORS:
                raise self._shape_error(e) from e
            return None
        leaves = jax.tree_util.tree_leaves_with_path(out)
        paths = [tuple(k.key for k in path) for path, _ in leaves]
        flags = _dependent_outputs(closed)
        if len(paths) != len(flags):
            return _Abstract(shapes, None, frozenset())
        args, obs = {}, set()
        for (group, key), flag in zip(paths, flags):
            if group == "args":
                name, depth, param = key.split("\0")
                args[(name, int(depth), param)] = flag
            elif flag:
                obs.add(key)
        return _Abstract(shapes, args, frozenset(obs))

    def _inspection_traces(self) -> tuple[dict, dict | None, _Abstract | None]:
        """(trace, twin, abstract run): the program traced at the first inspection point where it
        runs, and at the next one (None if none), to tell parameter-dependent supports apart.

        A point fails if the program raises there, or if an observed value that is computed from
        the parameters (``obs=`` of a function of them) is not finite there: both are the numbers
        at that point, not the data."""
        abstract = self._abstract_run()
        computed = abstract.computed_obs if abstract is not None else frozenset()
        runs: list[tuple[float, dict]] = []
        failures: list[tuple[float, dict, Exception]] = []
        for c in _INSPECTION_POINTS:
            values: dict = {}
            try:
                trace, _ = self._trace_at(c, values)
            except BayeslikError:  # raised on purpose by the program: its message stands
                raise
            except _RUN_ERRORS as e:
                failures.append((c, values, e))
                continue
            bad = [n for n in computed if n in trace and not _all_finite(trace[n]["value"])]
            if bad:
                failures.append((c, values, FloatingPointError(
                    f"observed site(s) {sorted(bad)}, computed from the parameters, are not finite"
                )))
                continue
            runs.append((c, trace))
            if len(runs) == 2:
                break
        if not runs:
            raise self._every_point_failed(failures, abstract)
        self._inspection_point = runs[0][0]
        return runs[0][1], (runs[1][1] if len(runs) > 1 else None), abstract

    def _every_point_failed(self, failures: list, abstract: _Abstract | None) -> Exception:
        """The error for a program that raised at every inspection point.

        The program is run again at the first two points with numpyro's argument validation off,
        to find the distribution arguments that are invalid. One that does not depend on the
        parameters (by the abstract run's dependence; without it, by being equal at both points)
        comes from the data or the model's constants: a DataError naming the site. If the shapes
        could not be cleared (no abstract run, and the program does not run through even without
        validation) it is a DataError naming the shapes, as for a shape error. Otherwise the
        parameter values give invalid numbers: a ModelError listing the points tried."""
        first = failures[0][2]
        shapes_ok = abstract is not None
        dependence = abstract.args if abstract is not None else None
        plain = []
        for c in _INSPECTION_POINTS[:2]:
            try:
                with _validation_off():
                    plain.append(self._trace_at(c)[0])
            except _RUN_ERRORS:
                break
        how = "it runs through with symbolic parameters" if shapes_ok else ""
        if plain and not shapes_ok:
            how = "it runs through with numpyro's argument validation off"
            shapes_ok = True
        invalid = _invalid_args(plain[0]) if plain else []
        for name, depth, d, param, value in invalid:
            if dependence is not None:
                fixed = dependence.get((name, depth, param)) is False
            elif len(plain) == 2 and name in plain[1]:
                twin = [v for n, k, _d, p, v in _invalid_args(plain[1])
                        if (n, k, p) == (name, depth, param)]
                fixed = bool(twin) and _equal_values(value, twin[0])
            else:
                fixed = False
            if fixed:
                err = DataError(
                    f"site '{name}': the '{param}' argument of its {type(d).__name__} "
                    f"distribution is invalid (not {d.arg_constraints[param]}), and it does not "
                    "depend on the parameters, so it comes from the data or the model's "
                    "constants; check the arguments that feed it. The model raised "
                    f"{type(first).__name__}: {first}"
                )
                err.__cause__ = first
                return err
        if not shapes_ok:
            err = self._shape_error(first)
            err.__cause__ = first
            return err
        points = "\n".join(f"  {_brief_point(c, values)}" for c, values, _ in failures)
        where = ""
        if invalid:
            where = " (at z={:g}, invalid: {})".format(failures[0][0], ", ".join(
                f"{type(d).__name__} '{p}' of site '{n}'" for n, _k, d, p, _v in invalid[:4]
            ))
        err = ModelError(
            f"model '{self.name}' raised at every parameter value tried; each latent site was set "
            "to biject_to(support)(z) for a constant unconstrained z:\n"
            f"{points}\nThe error at z={failures[0][0]:g}: {type(first).__name__}: {first}"
            f"{where}\nThis is not a problem of the data or of their shapes ({how}): at these "
            "parameter values the model computes invalid numbers (NaN or inf, a non-positive "
            "scale, a matrix that is not positive definite). Make its numerics robust there "
            "(log-space computations, a larger jitter, clipping or a stable recursion) or "
            "reparametrise it."
        )
        err.__cause__ = first
        return err

    def _inspect(
        self, trace: dict, other: dict | None, abstract: _Abstract | None = None
    ) -> dict[str, SiteInfo]:
        """Site facts from one trace; ``other`` (the trace at another inspection point) tells
        static supports apart; ``abstract`` (the abstract run) gives the site shapes and the
        observed values that are computed from the parameters."""
        other = other or {}
        shapes = abstract.shapes if abstract is not None else {}
        computed = abstract.computed_obs if abstract is not None else frozenset()
        sites: dict[str, SiteInfo] = {}
        for name, site in trace.items():
            if site["type"] == "plate":
                if site["args"][1] is not None and site["args"][1] != site["args"][0]:
                    raise ModelError(
                        f"plate '{name}' subsamples ({site['args'][1]} of {site['args'][0]}); "
                        "bayeslik's engines need the full likelihood. Remove `subsample_size`."
                    )
                continue
            if site["type"] == "deterministic":
                shape = shapes.get(name, _site_shape(site))
                sites[name] = SiteInfo(
                    name, "deterministic", shape, shape, "Deterministic", _site_dims(site, shape, 0)
                )
                continue
            if site["type"] == "param":
                raise ModelError(
                    f"site '{name}' is a numpyro.param: bayeslik's engines infer sample sites "
                    "only, so it would be held at its initial value. Make it a sample site with "
                    f"a prior (numpyro.sample('{name}', <prior>)), or pass its value as data (an "
                    "argument of the model)."
                )
            if site["type"] != "sample":
                continue
            fn = site["fn"]
            if site["is_observed"]:
                external = is_external_site(site)
                if external and site.get("cond_indep_stack"):
                    plates = [f.name for f in site["cond_indep_stack"]]
                    raise ModelError(
                        f"external log-likelihood '{name}' is inside plate(s) {plates}: the plate "
                        "would count its one value once per plate entry. Call "
                        "bl.external_loglikelihood outside any plate, with the whole dataset's "
                        "log-likelihood.")
                self._check_observed(site, other.get(name), name in computed)
                kind = "factor" if _is_factor(site) else "observed"
                shape = shapes.get(name, _site_shape(site))
                sites[name] = SiteInfo(
                    name, kind, shape, shape, _dist_name(fn),
                    _site_dims(site, shape, len(fn.event_shape)), external=external,
                )
                continue
            if site["infer"].get("enumerate"):
                raise ModelError(
                    f"site '{name}' asks for enumeration; bayeslik's engines do not enumerate. "
                    "Marginalise the discrete variable in the program (log-sum-exp over its values, "
                    "the forward algorithm for hidden state sequences)."
                )
            if fn.is_discrete:
                raise ModelError(
                    f"site '{name}' is a discrete latent variable ({_dist_name(fn)}); no engine in "
                    "bayeslik samples discrete parameters. Marginalise it out in the program "
                    "(sum over its values with jax.nn.logsumexp and numpyro.factor; for hidden state "
                    "sequences, the forward algorithm), or observe it with `obs=`."
                )
            shape = shapes.get(name, _site_shape(site))
            try:
                transform = biject_to(fn.support)
            except NotImplementedError as e:
                raise ModelError(
                    f"site '{name}' has support {fn.support!r}, which has no bijection to "
                    "unconstrained space; reparametrise it (e.g. numpyro.handlers.reparam)."
                ) from e
            ushape = tuple(transform.inverse_shape(shape))
            sites[name] = SiteInfo(
                name, "latent", shape, ushape, _dist_name(fn),
                _site_dims(site, shape, len(fn.event_shape)), improper=_is_improper(fn),
            )
        return sites

    def _check_observed(self, site: dict, twin: dict | None, computed: bool = False) -> None:
        """Check an observed site's data: finite, of a shape that fits its distribution, inside
        its support (when that does not depend on the parameters). ``computed``: the observed
        value is a function of the parameters (a "data" check against a support then means
        nothing; its finiteness was a condition on the inspection point)."""
        name, fn, value = site["name"], site["fn"], site["value"]
        if _is_factor(site):  # numpyro.factor, bl.external_loglikelihood
            _check_finite(name, value, "factor")
            return
        _check_finite(name, value, "observed site")
        vshape, dshape = tuple(np.shape(value)), tuple(fn.shape())
        try:
            bshape = tuple(np.broadcast_shapes(vshape, dshape))
        except ValueError:
            raise DataError(
                f"observed site '{name}': the data has shape {vshape} but its distribution "
                f"{_dist_name(fn)} has shape {dshape} (batch {tuple(fn.batch_shape)}, event "
                f"{tuple(fn.event_shape)}); they do not broadcast. Make the data and the "
                "parameter/plate shapes agree."
            ) from None
        if bshape != vshape:
            raise DataError(
                f"observed site '{name}': the data has shape {vshape} but its distribution "
                f"{_dist_name(fn)} has the larger shape {dshape}, so each datum would be counted "
                f"{math.prod(bshape) // max(math.prod(vshape), 1)} times. Check the plate sizes "
                "and parameter shapes against the data."
            )
        if not fn.is_discrete and not np.issubdtype(np.asarray(value).dtype, np.number):
            raise DataError(f"observed site '{name}' holds non-numeric data ({np.asarray(value).dtype}).")
        if np.asarray(value).dtype.kind == "c":
            raise DataError(f"observed site '{name}' holds complex values ({np.asarray(value).dtype}); "
                            "bayeslik's densities are real: observe a real quantity.")
        if 0 in vshape:
            raise DataError(
                f"observed site '{name}' has no values (shape {vshape}): its likelihood would be "
                "empty and the posterior just the prior. Check the data arguments that feed it "
                "(an empty array, a filter that dropped every row).")
        if computed:
            return
        if not _same_support(fn.support, None if twin is None else twin["fn"].support):
            return  # the support depends on parameters (e.g. Uniform(0, theta)): no fixed check
        try:
            ok = np.asarray(fn.support(jnp.asarray(value)))
        except Exception:  # some supports cannot be checked elementwise; the density will tell
            return
        if not ok.all():
            first = _first_index(~ok)
            raise DataError(
                f"observed site '{name}' has {int((~ok).sum())} value(s) outside the support "
                f"{fn.support} of {_dist_name(fn)} (first at index {first}). "
                "Check the data's units, sign and type (e.g. counts must be non-negative integers)."
            )
        if not fn.is_discrete:
            _check_boundary(site, twin)

    # ------------------------------------------------------------------ core evaluation
    def _call_args(self, data: dict | None) -> tuple[tuple, dict]:
        """The program's (args, kwargs), with the data arrays taken from ``data`` if given."""
        if data is None:
            return self._args, self._kwargs
        args = tuple(data.get(f"args[{i}]", a) for i, a in enumerate(self._args))
        kwargs = {k: data.get(k, v) for k, v in self._kwargs.items()}
        return args, kwargs

    def _run(self, z: jax.Array, data: dict | None = None) -> tuple[dict, jax.Array]:
        """Trace the program with the latent sites set from ``z``; return (trace, log|J|)."""
        params = self._unravel(z)
        log_jac = []

        def substitute_fn(site):
            if site["type"] != "sample" or site["is_observed"] or site["name"] not in params:
                return None
            fn = site["fn"]
            transform = biject_to(fn.support)
            u = params[site["name"]]
            x = transform(u)
            ld = transform.log_abs_det_jacobian(u, x)
            ld = sum_rightmost(ld, jnp.ndim(ld) - jnp.ndim(x) + len(fn.event_shape))
            log_jac.append(jnp.sum(ld))
            return x

        seeded = handlers.seed(self._model, rng_seed=0)
        args, kwargs = self._call_args(data)
        tr = handlers.trace(handlers.substitute(seeded, substitute_fn=substitute_fn)).get_trace(
            *args, **kwargs
        )
        return tr, sum(log_jac) if log_jac else jnp.zeros(())

    @staticmethod
    def _site_logprob(site: dict) -> jax.Array:
        lp = site["fn"].log_prob(site["value"])
        if site.get("scale") is not None:
            lp = site["scale"] * lp
        return lp

    def _make_logdensity(self, which: str, data: dict | None = None) -> Callable[[jax.Array], jax.Array]:
        latent = set(self._latent_names)

        def fn(z):
            tr, log_jac = self._run(z, data)
            total = jnp.zeros(())
            for name, site in tr.items():
                if site["type"] != "sample":
                    continue
                is_latent = name in latent
                if (which == "prior" and not is_latent) or (which == "likelihood" and is_latent):
                    continue
                total = total + jnp.sum(self._site_logprob(site))
            if which != "likelihood":
                total = total + log_jac
            return total

        fn.__name__ = f"{which}_logdensity" if which != "joint" else "logdensity"
        fn.__doc__ = {
            "joint": "log p(x, y) + log|J| at the unconstrained point z (the engines' target).",
            "prior": "log p(x) + log|J| at the unconstrained point z.",
            "likelihood": "log p(y | x), observed sites and factors, at the unconstrained point z.",
        }[which]
        return fn

    def _make_constrain(self, data: dict | None = None) -> Callable:
        keep = tuple(n for n, s in self._sites.items() if s.kind in ("latent", "deterministic"))

        def constrain(z):
            """{site: constrained value} for the latent and deterministic sites at z."""
            tr, _ = self._run(z, data)
            return {n: tr[n]["value"] for n in keep}

        return constrain

    def _make_unconstrain(self) -> Callable:
        latent = self._latent_names

        def unconstrain(params: dict) -> jax.Array:
            """Flat unconstrained z from {latent site: constrained value} (all latent sites)."""
            missing = [n for n in latent if n not in params]
            if missing:
                raise ModelError(f"unconstrain: missing value(s) for latent site(s) {missing}.")
            seeded = handlers.seed(self._model, rng_seed=0)
            data = {n: _float(params[n]) for n in latent}
            tr = handlers.trace(handlers.substitute(seeded, data=data)).get_trace(
                *self._args, **self._kwargs
            )
            return flat_unconstrained(tr, latent)

        return unconstrain

    def _make_sample_prior(self) -> Callable:
        latent = self._latent_names

        def sample_prior(rng_key: jax.Array, num_samples: int) -> jax.Array:
            """``num_samples`` draws from the prior as flat unconstrained vectors, (n, ndim)."""
            self.require_proper_prior("sample_prior")

            def one(key):
                tr = handlers.trace(handlers.seed(self._model, rng_seed=key)).get_trace(
                    *self._args, **self._kwargs
                )
                return flat_unconstrained(tr, latent)

            return jax.vmap(one)(jax.random.split(rng_key, num_samples))

        return sample_prior

    # ------------------------------------------------------------------ public helpers
    @property
    def prior_transform(self) -> Callable[[jax.Array], jax.Array]:
        """Unit cube -> prior: maps ``u`` in (0,1)^ndim to a flat unconstrained ``z``.

        Site by site in program order, each latent value is the inverse CDF of its prior,
        conditioned on the values of the earlier sites, at that site's slice of ``u`` (Dirichlet
        by stick-breaking, multivariate normals through their Cholesky factor). If ``u`` is
        uniform, ``z`` is distributed as the prior. Accessing this property checks every site
        and raises :class:`~bayeslik.errors.PriorTransformError` naming the first site whose
        prior has no inverse CDF here.
        """
        if self._prior_transform is None:
            self._prior_transform = self._make_prior_transform()
        return self._prior_transform

    def _make_prior_transform(self) -> Callable:
        self.require_proper_prior("a unit-cube prior transform")
        trace, _ = self._trace_at(self._inspection_point)
        for name in self._latent_names:
            _icdf.check_icdf(trace[name]["fn"], name)
        latent = self._latent_names
        unravel = self._unravel

        def prior_transform(u: jax.Array) -> jax.Array:
            cube = unravel(u)
            values = {}

            def substitute_fn(site):
                name = site["name"]
                if site["type"] != "sample" or site["is_observed"] or name not in cube:
                    return None
                x = _icdf.icdf(site["fn"], cube[name])
                values[name] = biject_to(site["fn"].support).inv(x)
                return x

            seeded = handlers.seed(self._model, rng_seed=0)
            handlers.trace(handlers.substitute(seeded, substitute_fn=substitute_fn)).get_trace(
                *self._args, **self._kwargs
            )
            return ravel_pytree({n: values[n] for n in latent})[0]

        return prior_transform

    def require_proper_prior(self, purpose: str) -> None:
        """Raise ImproperPriorError naming the improper sites if ``purpose`` needs a proper prior."""
        if self._improper:
            raise ImproperPriorError(
                f"{purpose} needs a proper prior, but site(s) {list(self._improper)} of model "
                f"'{self.name}' have an improper prior (ImproperUniform, Stan's implicit flat "
                "prior). Give them a proper prior (e.g. Normal, HalfNormal, Uniform on a bounded "
                "range), or use an engine that does not need one, such as 'nuts'."
            )

    @property
    def sites(self) -> dict[str, SiteInfo]:
        """All sites of the program by name (latent, observed, factor, deterministic)."""
        return dict(self._sites)

    @property
    def latent_names(self) -> tuple[str, ...]:
        return self._latent_names

    @property
    def external_sites(self) -> tuple[str, ...]:
        """The program's external log-likelihood sites (``bl.external_loglikelihood``: host
        callbacks without gradients), in program order; engines that differentiate the log
        density refuse a posterior that has any."""
        return tuple(n for n, s in self._sites.items() if s.external)

    @property
    def site_shapes(self) -> dict[str, tuple[int, ...]]:
        """Constrained shapes of the latent sites."""
        return {n: self._sites[n].shape for n in self._latent_names}

    @property
    def observed_data(self) -> dict[str, np.ndarray]:
        return dict(self._observed_data)

    @property
    def has_proper_prior(self) -> bool:
        return not self._improper

    @property
    def model(self) -> Callable:
        return self._model

    @property
    def data(self) -> dict[str, Any]:
        """The keyword arguments bound to the program."""
        return dict(self._kwargs)

    @property
    def data_arrays(self) -> dict[str, jax.Array]:
        """The array arguments ("data"): {keyword or "args[i]": array}. See :meth:`at`."""
        return dict(self._data)

    # ------------------------------------------------------------------ labels (dims, coords)
    def _observed_links(self, trace: dict) -> dict[str, str]:
        """{observed site: the argument that is its value}: the very array the program observes,
        else the one array argument of the same shape and values."""
        named = {k: v for k, v in self._named_arguments().items() if isinstance(v, jax.Array)}
        links = {}
        for name, s in self._sites.items():
            if s.kind != "observed":
                continue
            value = trace[name]["value"]
            same = [k for k, v in named.items() if v is value]
            if not same:
                same = [k for k, v in named.items()
                        if np.shape(v) == np.shape(value) and _equal_values(v, value)]
            if len(same) == 1:
                links[name] = same[0]
        return links

    def _relabel(self, arg_labels: dict, user_coords: dict, user_dims: dict) -> None:
        """Set the sites' dims and the coords from the data's labels and the user's."""
        dims, coords = _resolve_labels(self._sites, self._program_dims, self._links, arg_labels,
                                       user_coords, user_dims)
        self._arg_labels, self._user_coords, self._user_dims = arg_labels, user_coords, user_dims
        self._sites = {n: s if s.dims == dims[n] else dataclasses.replace(s, dims=dims[n])
                       for n, s in self._sites.items()}
        self._coords = coords

    @property
    def coords(self) -> dict[str, list]:
        """Labels of the sites' dims, {dim: list of labels}, for ArviZ: from the data's
        containers (a pandas index or columns, an xarray DataArray's coords) and from
        :meth:`with_coords`. Empty when nothing was labelled; a dim without coords is
        numbered 0..n-1 by ArviZ. The dims themselves are in ``sites[name].dims``."""
        return {k: list(v) for k, v in self._coords.items()}

    def with_coords(self, coords: Mapping[str, Any] | None = None, *,
                    dims: Mapping[str, Any] | None = None) -> "PosteriorBase":
        """This Posterior with labelled dims, as ArviZ's ``coords=`` and ``dims=``.

        ``coords`` (``{dim: labels}``) labels the entries along a dim (a plate's name is the
        dim of its axis; ``<site>_dim_<i>`` otherwise); ``dims`` (``{site: [dim, ...]}``, one
        name per axis) names a site's axes, overriding its plate names. Both are merged into the labels already there (the
        data's, earlier calls'). Labels change only the Fit's DataTree, never a density: the
        result shares this Posterior's functions and :attr:`cache_key`, so compiled programs
        are reused. Raises DataError for an unknown site, a dims list of the wrong length,
        coords for a dim no site has, or coords whose length is not the dim's.

        >>> post = bl.Posterior(model, y=y, sigma=sigma).with_coords(   # doctest: +SKIP
        ...     coords={"school": names}, dims={"theta": ["school"]})
        """
        user_coords = dict(self._user_coords)
        for dim, labels in dict(coords or {}).items():
            user_coords[str(dim)] = _as_labels(dim, labels)
        user_dims = dict(self._user_dims)
        for site, names in dict(dims or {}).items():
            if site not in self._sites:
                raise DataError(f"dims given for '{site}', which is not a site of model "
                                f"'{self.name}'; its sites are {list(self._sites)}.")
            names = (names,) if isinstance(names, str) else tuple(str(d) for d in names)
            shape = self._sites[site].shape
            if len(names) != len(shape):
                raise DataError(
                    f"dims for site '{site}' name {len(names)} ax{'i' if len(names) == 1 else 'e'}s "
                    f"({list(names)}), but its values have shape {shape}: give one name per "
                    "axis.")
            user_dims[site] = names
        new = copy.copy(self)
        new._relabel(self._arg_labels, user_coords, user_dims)
        return new

    @property
    def cache_key(self) -> tuple:
        """Equal for Posteriors whose compiled functions can be shared: the same program, the
        same non-array arguments, data arrays of the same shapes and dtypes."""
        static = [(f"args[{i}]", a) for i, a in enumerate(self._args) if not isinstance(a, jax.Array)]
        static += [(k, v) for k, v in self._kwargs.items() if not isinstance(v, jax.Array)]
        try:
            hash(tuple(static))
        except TypeError:  # unhashable static arguments: share nothing
            static = [("posterior", id(self))]
        shapes = tuple((k, tuple(v.shape), str(v.dtype)) for k, v in sorted(self._data.items()))
        return (self._model, tuple(static), shapes)

    @property
    def args(self) -> tuple:
        return self._args

    def unflatten(self, z: jax.Array) -> dict[str, jax.Array]:
        """{latent site: unconstrained value} from a flat z (the inverse of ``flatten``)."""
        return self._unravel(z)

    def flatten(self, params_unconstrained: dict) -> jax.Array:
        """Flat z from {latent site: unconstrained value}."""
        return ravel_pytree({n: jnp.asarray(params_unconstrained[n]) for n in self._latent_names})[0]

    def __repr__(self) -> str:
        lat = ", ".join(f"{n}{list(self._sites[n].shape)}" for n in self._latent_names)
        return f"{type(self).__name__}({self.name}: ndim={self.ndim}; latent: {lat})"


class Posterior(PosteriorBase):
    """A NumPyro program with its data bound, as pure functions on flat unconstrained vectors.

    Construction runs the program at fixed parameter points, never at random prior draws: once
    abstractly (``jax.make_jaxpr``: shapes, and which arguments depend on the parameters),
    then eagerly with every latent site at
    ``biject_to(support)(c)`` for a constant unconstrained ``c`` (0, then 0.5, ...), and checks it:
    non-finite, complex or masked (``numpy.ma``) data, empty observed sites and plates, observed
    values whose shape or support does not fit their distribution (or that sit on a closed end
    of the support where the density is 0 or infinite, as y = 0 for a Beta), discrete latent
    sites, subsampled plates. Every problem raises a
    :class:`~bayeslik.errors.DataError` or :class:`~bayeslik.errors.ModelError` that names the
    argument or site, before anything is compiled. A model whose numbers are invalid at some
    parameter values (an overflowing recursion, a NaN Cholesky) is run at the next point; one
    that raises at every point gets a ModelError listing the points, not a DataError.

    All function attributes (``logdensity``, ``logprior``, ``loglikelihood``,
    ``pointwise_loglikelihood``, ``constrain``, ``unconstrain``, ``prior_transform``,
    ``sample_prior``) are plain closures: pass them to ``jax.jit``, ``jax.grad`` or ``jax.vmap``.

    Example
    -------
    >>> import jax, numpyro, numpyro.distributions as dist, bayeslik as bl
    >>> def model(y):
    ...     mu = numpyro.sample("mu", dist.Normal(0, 10))
    ...     sigma = numpyro.sample("sigma", dist.HalfNormal(1))
    ...     numpyro.sample("y", dist.Normal(mu, sigma), obs=y)
    >>> post = bl.Posterior(model, y=jax.numpy.array([0.3, -1.2, 0.8]))
    >>> post.ndim
    2
    >>> z = post.unconstrain({"mu": 0.0, "sigma": 1.0})
    >>> bool(abs(post.logprior(z) + post.loglikelihood(z) - post.logdensity(z)) < 1e-5)
    True
    """

    def __init__(self, model: Callable, *args: Any, **kwargs: Any) -> None:
        super().__init__(model, *args, **kwargs)
        self.logdensity = self._make_logdensity("joint")
        self.loglikelihood = self._make_logdensity("likelihood")
        self.pointwise_loglikelihood = self._make_pointwise()
        self.evaluate = self._make_evaluate()

    def _make_pointwise(self, data: dict | None = None) -> Callable[[jax.Array], dict]:
        names = tuple(n for n, s in self._sites.items() if s.kind in ("observed", "factor"))

        def pointwise_loglikelihood(z):
            """Per-observation log-likelihood: {observed site: array of the data's batch shape}."""
            tr, _ = self._run(z, data)
            return {n: self._site_logprob(tr[n]) for n in names}

        return pointwise_loglikelihood

    def _make_evaluate(self, data: dict | None = None) -> Callable:
        latent = set(self._latent_names)
        keep = tuple(n for n, s in self._sites.items() if s.kind in ("latent", "deterministic"))
        obs = tuple(n for n, s in self._sites.items() if s.kind in ("observed", "factor"))

        def evaluate(z) -> Evaluation:
            """One trace at z: constrained values (latent and deterministic sites), pointwise
            log-likelihood per observed site, log prior (with the Jacobian) and log-likelihood."""
            tr, log_jac = self._run(z, data)
            lp = {n: self._site_logprob(s) for n, s in tr.items() if s["type"] == "sample"}
            logprior = sum((jnp.sum(v) for n, v in lp.items() if n in latent), log_jac)
            loglik = sum((jnp.sum(v) for n, v in lp.items() if n not in latent), jnp.zeros(()))
            return Evaluation(
                {n: tr[n]["value"] for n in keep}, {n: lp[n] for n in obs}, logprior, loglik
            )

        return evaluate

    def at(self, data: dict[str, jax.Array]) -> "PosteriorFunctions":
        """The density functions with other data arrays of the same shapes in place of the bound
        ones (``data`` as in :attr:`data_arrays`; the arrays may be JAX tracers). Engines compile
        ``lambda z, data: post.at(data).logdensity(z)`` once and reuse it for every dataset
        that shares this Posterior's :attr:`cache_key`."""
        return PosteriorFunctions(
            self._make_logdensity("joint", data), self._make_logdensity("prior", data),
            self._make_logdensity("likelihood", data), self._make_pointwise(data),
            self._make_evaluate(data), self._make_constrain(data),
        )

    def replace_data(self, **data: Any) -> "Posterior":
        """A new Posterior of the same program with some arguments replaced (checked again).
        The labels of the arguments kept and those of :meth:`with_coords` carry over."""
        unknown = [k for k in data if k not in self._kwargs]
        if unknown:
            raise DataError(f"replace_data: {unknown} are not arguments bound to this Posterior; "
                            f"they are {sorted(self._kwargs)}.")
        new = Posterior(self._model, *self._args, **{**self._kwargs, **data})
        kept = {k: v for k, v in self._arg_labels.items() if k not in data}
        if kept:
            new._relabel({**kept, **new._arg_labels}, {}, {})
        if self._user_coords or self._user_dims:
            new = new.with_coords(self._user_coords, dims=self._user_dims)
        return new

    def __repr__(self) -> str:
        lat = ", ".join(f"{n}{list(self._sites[n].shape)}" for n in self._latent_names)
        obs = ", ".join(
            f"{n}{list(s.shape)}" for n, s in self._sites.items() if s.kind == "observed"
        )
        ext = ", ".join(self.external_sites)
        return (f"Posterior({self.name}: ndim={self.ndim}; latent: {lat}; observed: {obs}"
                + (f"; external likelihood: {ext}" if ext else "") + ")")


# ---------------------------------------------------------------------------- non-finite densities
#: how a non-finite term of the log density is shown
_JACOBIAN = "<Jacobian>"


class NonfiniteSite(NamedTuple):
    """A term of the log density that is NaN or +inf at a point (see :func:`nonfinite_sites`).

    ``site`` the site's name (``"<Jacobian>"`` for the constraining map's log-Jacobian), ``kind``
    its kind ("latent": its prior term, "observed", "factor", "jacobian"), ``value`` "NaN" or
    "+inf", ``invalid`` the distribution arguments outside their constraint there, as
    (distribution, argument, value, constraint) strings, ``point`` {latent site: constrained
    value, shortened} at the point, ``index`` the point's row in the batch given, ``extreme``
    whether the point lies far out (see :func:`nonfinite_sites`).
    """

    site: str
    kind: str
    value: str
    invalid: tuple
    point: dict
    index: int
    extreme: bool = False

    def describe(self) -> str:
        """One line, e.g. ``observed site 'y' is NaN where Normal scale=-0.31 is not positive,
        at sigma=-0.31``."""
        why = " and ".join(f"{d} {a}={v} is not {c}" for d, a, v, c in self.invalid)
        items = [f"{n}={v}" for n, v in self.point.items()]
        if len(items) > 6:
            items = items[:6] + [f"... ({len(items) - 6} more)"]
        name = {"jacobian": "the log-Jacobian of the constraining map",
                "latent": f"the prior term of latent site '{self.site}'"}.get(
                    self.kind, f"{self.kind} site '{self.site}'")
        return (f"{name} is {self.value}" + (f" where {why}" if why else "")
                + (f", at {', '.join(items)}" if items else ""))


_CONSTRAINT_WORDS = {"_Positive": "positive", "_Nonnegative": "non-negative", "_Real": "real",
                     "_RealVector": "real", "_UnitInterval": "in [0, 1]",
                     "_PositiveDefinite": "positive definite", "_Simplex": "on the simplex",
                     "_LowerCholesky": "a lower Cholesky factor",
                     "_CorrCholesky": "a correlation Cholesky factor",
                     "_CorrMatrix": "a correlation matrix", "_OrderedVector": "ordered"}


def _constraint_words(c: Any) -> str:
    """A constraint in words ("positive", "> 1", "in [0, 2]"), else as numpyro prints it."""
    name = type(c).__name__
    if name in _CONSTRAINT_WORDS:
        return _CONSTRAINT_WORDS[name]
    low, high = getattr(c, "lower_bound", None), getattr(c, "upper_bound", None)
    if name == "_GreaterThan" and low is not None:
        return f"> {_brief(low)}"
    if name == "_LessThan" and high is not None:
        return f"< {_brief(high)}"
    if name == "_Interval" and low is not None and high is not None:
        return f"in [{_brief(low)}, {_brief(high)}]"
    return str(c)


def _bad_value(a: Any) -> str | None:
    """"NaN" or "+inf" if some entry of the log density ``a`` is (NaN first), else None
    (-inf, a zero density, is legitimate)."""
    a = np.asarray(a)
    if np.isnan(a).any():
        return "NaN"
    if np.isposinf(a).any():
        return "+inf"
    return None


#: an unconstrained coordinate of a constrained site beyond this is "far out" (exp(20) = 5e8)
EXTREME_Z = 20.0
#: a latent site's prior log density below this (nats) makes a point extreme as well: a scale
#: 3.5e7 prior standard deviations out (the GP regression's alpha=6.9e7 under HalfNormal(2), log
#: density -6e14) has a finite unconstrained coordinate but no prior mass to speak of
EXTREME_LOGP = -1.0e4


def _is_real(support: Any) -> bool:
    """Whether a support is the real line (vectors of it): its unconstrained value is the value."""
    while hasattr(support, "base_constraint"):
        support = support.base_constraint
    return isinstance(support, type(constraints.real))


#: the rows of one block of :func:`nonfinite_sites` (one compiled shape)
_PROBE_ROWS = 256


def _nonfinite_program(posterior: PosteriorBase) -> tuple:
    """(the compiled, vmapped terms of the log density at a block of rows; each checked
    argument's (site, distribution, argument, constraint); each latent site's support: real or
    not) for :func:`nonfinite_sites`. The lists are filled while the program is traced."""
    sites = posterior.sites
    arg_info: list[tuple[str, str, str, str]] = []
    real: dict[str, bool] = {}

    def terms(zr):
        arg_info.clear()  # a new trace (another dtype) fills them again
        tr, log_jac = posterior._run(zr)
        lps = {n: posterior._site_logprob(s) for n, s in tr.items()
               if s["type"] == "sample" and n in sites}
        lps[_JACOBIAN] = log_jac
        oks, vals = [], []
        for name, site in tr.items():
            if site["type"] != "sample" or name not in sites:
                continue
            if name in posterior.latent_names:
                real[name] = _is_real(site["fn"].support)
            for _depth, d, param, value in _dist_args(site["fn"]):
                try:
                    ok = jnp.all(d.arg_constraints[param](value))
                except Exception:
                    continue
                oks.append(ok)
                vals.append(jnp.asarray(value))
                arg_info.append((name, type(d).__name__, param,
                                 _constraint_words(d.arg_constraints[param])))
        values = {n: tr[n]["value"] for n in posterior.latent_names if n in tr}
        return lps, oks, vals, values

    return jax.jit(jax.vmap(terms)), arg_info, real


def nonfinite_sites(posterior: PosteriorBase, z: Any) -> list[NonfiniteSite]:
    """The terms of the log density that are NaN or +inf at the unconstrained point ``z``
    (ndim,), or at a row of a batch ``z`` (n, ndim) where one is: each latent site's prior term,
    each observed site and factor, the log-Jacobian of the constraining map. A site whose
    distribution has arguments outside their constraint there (a negative Normal scale) lists
    them with their values. ``[]`` where every term is finite or -inf (a zero density is
    legitimate) at every row, or where the program cannot be run there.

    The row is the first bad one that is not *extreme*, else the first bad one. A point is
    extreme where an unconstrained coordinate of a site with a constrained support lies beyond
    ``EXTREME_Z`` = 20 (a scale below 2e-9 or above 5e8, a probability within 2e-9 of 0 or 1):
    there the constraining map is at the limits of floating point and a density that should be
    a huge negative number comes out NaN or +inf (an InverseGamma at 1e-29 in float32), which
    says nothing about the model where it has mass. A point where a latent site's own prior
    term is below ``EXTREME_LOGP`` = -1e4 nats is extreme for the same reason (a GP's amplitude
    6.9e7 under HalfNormal(2) makes its covariance singular in float64 long before its
    coordinate reaches 20), and so is a point with a non-finite coordinate (an integrator that
    overflowed).

    The batch is run in blocks of 256 rows by one compiled, vmapped program, compiled once per
    Posterior (it runs after a run, when an engine counted non-finite values and says which
    site made them, see :meth:`bayeslik.engines.kit.Run.nonfinite`).

    >>> import jax.numpy as jnp, numpyro, numpyro.distributions as dist, bayeslik as bl
    >>> def model(y):
    ...     sigma = numpyro.sample("sigma", dist.Normal(1.0, 1.0))
    ...     numpyro.sample("y", dist.Normal(0.0, sigma), obs=y)
    >>> post = bl.Posterior(model, y=jnp.array([0.5, -0.2]))
    >>> [s.describe() for s in nonfinite_sites(post, jnp.array([-0.5]))]
    ["observed site 'y' is NaN where Normal scale=-0.5 is not positive, at sigma=-0.5"]
    >>> nonfinite_sites(post, jnp.array([0.5]))
    []
    """
    rows = np.asarray(z)
    rows = rows.reshape(-1, rows.shape[-1]) if rows.ndim else rows.reshape(1, 1)
    if rows.shape[0] == 0 or rows.shape[1] != posterior.ndim:
        return []
    sites = posterior.sites
    program = posterior.__dict__.get("_nonfinite_program")
    if program is None:
        program = posterior.__dict__["_nonfinite_program"] = _nonfinite_program(posterior)
    fn, arg_info, real = program
    n = rows.shape[0]
    size = _PROBE_ROWS * math.ceil(n / _PROBE_ROWS)  # whole blocks: one shape, one compile
    padded = np.concatenate([rows, np.zeros((size - n, rows.shape[1]), rows.dtype)])
    try:
        with _validation_off():
            parts = [fn(jnp.asarray(padded[i:i + _PROBE_ROWS]))
                     for i in range(0, size, _PROBE_ROWS)]
    except Exception:  # a program that cannot be run at these points: no answer here
        return []
    lps, oks, vals, values = jax.tree.map(lambda *a: np.concatenate(a)[:n], *parts)
    lps = {k: np.asarray(v).reshape(rows.shape[0], -1) for k, v in lps.items()}
    bad = np.zeros(rows.shape[0], bool)
    for v in lps.values():
        bad |= (np.isnan(v) | np.isposinf(v)).any(axis=1)
    hit = np.flatnonzero(bad)
    if hit.size == 0:
        return []
    constrained = np.zeros(posterior.ndim, bool)  # the coordinates of non-real supports
    for n, (a, b) in posterior.offsets.items():
        constrained[a:b] = not real.get(n, True)
    far = ((np.abs(rows[hit]) > EXTREME_Z)[:, constrained].any(axis=1)
           | ~np.isfinite(rows[hit]).all(axis=1))  # an integrator that blew up: not the model
    for name in posterior.latent_names:  # a latent's prior gives the point no mass at all
        if name in lps:
            far |= (lps[name][hit] < EXTREME_LOGP).any(axis=1)
    j = int(np.argmin(far))  # the first bad row that is not far out, if any
    i, extreme = int(hit[j]), bool(far[j])
    point = {n: _brief(np.asarray(v)[i]) for n, v in values.items()}
    out = []
    for name, lp in lps.items():
        value = _bad_value(lp[i])
        if value is None:
            continue
        kind = "jacobian" if name == _JACOBIAN else sites[name].kind
        why = tuple((dist_name, param, _brief(np.asarray(v)[i]), words)
                    for (n, dist_name, param, words), ok, v in zip(arg_info, oks, vals)
                    if n == name and not bool(np.asarray(ok)[i]))
        out.append(NonfiniteSite(name, kind, value, why, point, i, extreme))
    return out
