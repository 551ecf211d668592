r"""Relabelling: undo label switching in a Fit of a mixture or a hidden Markov model.

The likelihood of a mixture or an HMM with ``K`` components/states is invariant under the ``K!``
permutations of the labels, so a sampler that moves between the symmetric modes (or chains that
start in different ones) mixes the labels: per-component means, intervals and R-hat are then
meaningless. :func:`relabel` finds, for every draw :math:`s`, a permutation :math:`\nu_s` and
returns a new Fit whose component-indexed sites are permuted, :math:`\theta^{new}_{s,k} =
\theta_{s,\nu_s(k)}`, so that component ``k`` means the same cluster in every draw and chain.

Which sites carry the component axis is said by ``components``: ``{site: axis}`` or
``{site: (axis, axis)}`` for a site indexed by the component on several axes (an HMM's
transition matrix ``trans[i, j]`` is permuted as ``trans[nu(i), nu(j)]``), axes counted in the
site's value (without chain and draw); or the name of a registered spec.

Registered specs
----------------
This module knows no model. A model family hands its spec over with :func:`register_components`
when its module is imported, as it hands over its default starting point with
:func:`bayeslik.inits.set_default_init`: the component sites and axes, the sites that describe a
component in the pivot method's cost (``cost_sites``), optionally a ``classification_fn(fit)``
giving Stephens' method its classification probabilities from the Fit alone, and a
``check_fn(fit)`` that rejects Fits the spec does not apply to. The zoo registers ``"mixture"``
(:mod:`bayeslik.models.mixture`), ``"arhmm"`` (:mod:`bayeslik.models.arhmm`) and
``"lognormmix"`` (:mod:`bayeslik.models.tpp`); a registered
spec's sites that a Fit does not have are skipped.

>>> from bayeslik.models import mixture          # registers "mixture"
>>> spec = registered_components()["mixture"]
>>> spec.cost_sites, spec.module
(('mu',), 'bayeslik.models.mixture')

Methods
-------
``"pivot"`` (Marin, Mengersen & Robert 2005, with a refinement step). Each component of a draw is
described by a feature vector: the component's slice of the ``cost_sites`` (default: the
registered spec's ``cost_sites``, the locations for the zoo's; every spec site for a dict; for a
site with two component axes, its diagonal, e.g. the probability of staying in a state), each feature
standardised by its posterior spread. The pivot is the draw with the highest log density (the
``lp`` sample stat, else the highest log-likelihood, or ``pivot=(chain, draw)``). Every draw's
components are assigned to the pivot's by the Hungarian algorithm
(:func:`scipy.optimize.linear_sum_assignment`) on the squared distances between feature vectors;
then, ``num_iters`` times at most, the reference becomes the mean of the relabelled features
and the assignment is repeated with distances scaled by the relabelled per-component spreads
(a k-means in label space, Celeux 1998) until no permutation changes. One pivot for all chains,
so chains sitting in different label modes are aligned.

``"stephens"`` (Stephens 2000, the KL algorithm). Needs per-draw classification probabilities
:math:`P_s[n, k] = p(z_n = k \mid y, \theta_s)` from ``prob_fn(draws) -> (S, N, K)`` (by
default from the registered spec's ``classification_fn``: the mixture's membership
probabilities on the Fit's observed ``y``; an AR-HMM's need its Posterior, pass
``prob_fn=bayeslik.models.arhmm.classification_fn(post)``). Starting from the pivot solution it
alternates

.. math::

    Q = \frac1S \sum_s P_s^{\nu_s}, \qquad
    \nu_s = \arg\min_\nu \sum_{n,k} P_s[n, \nu(k)] \log\frac{P_s[n, \nu(k)]}{Q[n, k]},

each :math:`\nu_s` a linear assignment with cost :math:`C_s[j, k] = -\sum_n P_s[n, j] \log
Q[n, k]`, until no permutation changes (the total KL never increases).

The permutations are kept in the Fit: group ``relabel`` with variable ``permutation``
``(chain, draw, component)`` (new component ``k`` is old component ``permutation[..., k]``);
the DataTree's attributes ``relabel_method`` and ``relabel_components`` (JSON) say how.

Example
-------
>>> from bayeslik.relabel import relabel                       # doctest: +SKIP
>>> fit2 = relabel(fit, "mixture", method="stephens")          # doctest: +SKIP
>>> fit2.idata["relabel"]["permutation"].shape                 # doctest: +SKIP
(4, 1000, 3)
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from typing import Callable, Mapping

import numpy as np
import xarray as xr

from bayeslik.errors import ModelError, OptionError

__all__ = ["ComponentSpec", "register_components", "unregister_components",
           "registered_components", "relabel", "permute_fit", "permute_draws"]


@dataclasses.dataclass(frozen=True)
class ComponentSpec:
    """A relabel spec: which sites of a model carry the component axis, and how to compare and
    classify components. Made by :func:`register_components`; fields as its arguments.

    Attributes:
        name: the name :func:`relabel` is called with.
        components: ``{site: axes}``, the component axes of each site's value (a tuple each).
        cost_sites: the sites compared in the pivot method's cost, or None for all.
        classification_fn: ``classification_fn(fit) -> prob_fn`` for Stephens' method, or None.
        check_fn: ``check_fn(fit)``, raising when the spec does not apply to the Fit, or None.
        module: the module that registered the spec (for messages).
    """

    name: str
    components: Mapping[str, tuple[int, ...]]
    cost_sites: tuple[str, ...] | None = None
    classification_fn: Callable | None = None
    check_fn: Callable | None = None
    module: str | None = None


_REGISTRY: dict[str, ComponentSpec] = {}


def _axes(site: str, axes) -> tuple[int, ...]:
    """``axes`` (an int or a sequence of ints) as a tuple, or a ModelError naming ``site``."""
    if isinstance(axes, (int, np.integer)) and not isinstance(axes, bool):
        return (int(axes),)
    try:
        out = tuple(axes)
    except TypeError:
        out = None
    if (not out or not all(isinstance(a, (int, np.integer)) and not isinstance(a, bool)
                           for a in out)):
        raise ModelError(f"components: site {site!r} must map to an axis (int) or a tuple of "
                         f"axes, got {axes!r}")
    return tuple(int(a) for a in out)


def register_components(name: str, components: Mapping[str, int | tuple[int, ...]], *,
                        cost_sites: tuple[str, ...] | None = None,
                        classification_fn: Callable | None = None,
                        check_fn: Callable | None = None) -> ComponentSpec:
    r"""Register a model's relabel spec under ``name``, so that ``relabel(fit, name)`` knows it.

    A model module calls it once at import (the zoo's mixture and AR-HMM modules do), next to
    its :func:`bayeslik.inits.set_default_init`. Registering a name again replaces the spec
    (re-imports, reloads).

    Args:
        name: the spec's name.
        components: ``{site: axis}`` or ``{site: (axis, ...)}``: every site carrying the
            component axis, with the axes of the site's value (without chain and draw) that are
            indexed by the component. Sites a Fit lacks are skipped when relabelling it, so one
            spec may cover the model's variants (covariance types, dimensions).
        cost_sites: the sites whose values describe a component in the pivot method's cost;
            default every site. Locations are the usual choice: shape parameters (scales,
            correlations, weights) are noisy relative to their differences between components.
        classification_fn: ``classification_fn(fit) -> prob_fn``, where ``prob_fn({site: (S,
            ...)}) -> (S, N, K)`` gives each draw's classification probabilities
            :math:`p(z_n = k \mid y, \theta_s)`: Stephens' method's default when the Fit alone
            (e.g. its observed data) determines them. Without it, Stephens' method needs
            ``prob_fn=``.
        check_fn: ``check_fn(fit)``, called before relabelling; it raises (a
            :class:`~bayeslik.errors.BayeslikError`) saying why the spec does not apply to a
            Fit (e.g. a model variant whose labels are already identified).

    Returns:
        The registered :class:`ComponentSpec`.

    Raises:
        ModelError: for a spec that is not a non-empty ``{site: axes}``, ``cost_sites`` outside
            it, or hooks that are not callable.
    """
    if not isinstance(name, str) or not name:
        raise ModelError(f"register_components: name must be a non-empty str, got {name!r}")
    if not isinstance(components, Mapping) or not components:
        raise ModelError(f"register_components({name!r}): components must be a non-empty dict "
                         f"{{site: axis}}, got {components!r}")
    spec = {str(site): _axes(site, axes) for site, axes in components.items()}
    if cost_sites is not None:
        cost_sites = (cost_sites,) if isinstance(cost_sites, str) else tuple(cost_sites)
        bad = [c for c in cost_sites if c not in spec]
        if bad or not cost_sites:
            raise ModelError(f"register_components({name!r}): cost_sites {list(cost_sites)} must "
                             f"be a non-empty subset of the component sites {sorted(spec)}")
    for arg, fn in (("classification_fn", classification_fn), ("check_fn", check_fn)):
        if fn is not None and not callable(fn):
            raise ModelError(f"register_components({name!r}): {arg} must be callable, got "
                             f"{type(fn).__name__}")
    caller = inspect.currentframe().f_back
    out = ComponentSpec(name, spec, cost_sites, classification_fn, check_fn,
                        caller.f_globals.get("__name__") if caller is not None else None)
    _REGISTRY[name] = out
    return out


def unregister_components(name: str) -> None:
    """Remove the spec ``name`` from the registry (a test's or a session's own spec)."""
    _lookup(name)
    del _REGISTRY[name]


def registered_components() -> dict[str, ComponentSpec]:
    """The registered specs, ``{name: ComponentSpec}`` (a copy: register with
    :func:`register_components`)."""
    return dict(_REGISTRY)


def _lookup(name: str) -> ComponentSpec:
    if name not in _REGISTRY:
        known = ", ".join(f"{n!r} (by {s.module})" for n, s in sorted(_REGISTRY.items()))
        # names the zoo's modules as a hint only: this module imports no model
        raise ModelError(
            f"components={name!r} is not a registered relabel spec (registered: "
            f"{known or 'none'}). A model module registers its spec when imported: 'mixture' "
            "by bayeslik.models.mixture, 'arhmm' by bayeslik.models.arhmm; import it first, "
            "give a dict {site: axis}, or register your own with "
            "bayeslik.relabel.register_components.")
    return _REGISTRY[name]


def _resolve(fit, components) -> tuple[dict[str, tuple[int, ...]], ComponentSpec | None]:
    """({site: axes}, the registered spec or None for a dict) checked against the Fit."""
    posterior = fit.idata["posterior"]
    registered = None
    if isinstance(components, str):
        components = _lookup(components)
    if isinstance(components, ComponentSpec):
        registered = components
        if registered.check_fn is not None:
            registered.check_fn(fit)
        spec = {k: v for k, v in registered.components.items() if k in posterior}
        if not spec:
            raise ModelError(f"the Fit has none of the sites of spec {registered.name!r} "
                             f"({sorted(registered.components)}); its sites are "
                             f"{sorted(posterior)}")
    elif isinstance(components, Mapping) and components:
        spec = {site: _axes(site, axes) for site, axes in components.items()}
        missing = [k for k in spec if k not in posterior]
        if missing:
            raise ModelError(f"components names site(s) {missing} that the Fit does not have; "
                             f"its sites are {sorted(posterior)}")
    else:
        raise ModelError("components must be the name of a registered spec or a non-empty dict "
                         f"{{site: axis}}, got {components!r}")
    K = None
    for site, axes in spec.items():
        shape = tuple(posterior[site].shape[2:])
        for a in axes:
            if not 0 <= a < len(shape):
                raise ModelError(f"components: site {site!r} has value shape {shape}; axis {a} "
                                 "does not exist (axes are counted without chain and draw)")
            if K is None:
                K = shape[a]
            if shape[a] != K:
                raise ModelError(f"components: site {site!r} has {shape[a]} entries on axis "
                                 f"{a}, but the other component axes have K = {K}")
    return spec, registered


def permute_draws(values: np.ndarray, perms: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Permute the component axes of ``values`` (S, *shape) by ``perms`` (S, K):
    ``out[s, ..., k, ...] = values[s, ..., perms[s, k], ...]`` on each axis in ``axes``.

    >>> v = np.arange(6.0).reshape(2, 3)
    >>> permute_draws(v, np.array([[2, 0, 1], [0, 1, 2]]), (0,))
    array([[2., 0., 1.],
           [3., 4., 5.]])
    """
    out = np.asarray(values)
    S = out.shape[0]
    for a in axes:
        ax = a + 1
        shape = [1] * out.ndim
        shape[0], shape[ax] = S, perms.shape[1]
        idx = np.broadcast_to(perms.reshape(shape), out.shape[:ax] + (perms.shape[1],)
                              + out.shape[ax + 1:])
        out = np.take_along_axis(out, idx, axis=ax)
    return out


def _features(draws: dict[str, np.ndarray], spec: dict[str, tuple[int, ...]]) -> np.ndarray:
    """(S, K, P) standardised per-component features."""
    feats = []
    for site, axes in spec.items():
        x = draws[site]
        if len(axes) == 1:
            f = np.moveaxis(x, axes[0] + 1, 1)
        else:  # several component axes: the "diagonal" (e.g. trans[k, k])
            a, b = axes[0] + 1, axes[1] + 1
            f = np.moveaxis(np.diagonal(x, axis1=a, axis2=b), -1, 1)
        f = f.reshape(f.shape[0], f.shape[1], -1)
        sd = f.std(axis=(0, 1))
        keep = sd > 1e-12  # constant features (e.g. the unit diagonal of L_omega) carry nothing
        feats.append(f[..., keep] / sd[keep])
    return np.concatenate(feats, axis=-1).astype(np.float64)


def _assign(cost: np.ndarray) -> np.ndarray:
    """(S, K) permutations minimising sum_k cost[s, perm[s, k], k] (rows old, columns new)."""
    from scipy.optimize import linear_sum_assignment

    S, K, _ = cost.shape
    perms = np.empty((S, K), dtype=np.int64)
    for s in range(S):
        rows, cols = linear_sum_assignment(cost[s])
        perms[s, cols] = rows
    return perms


def _sq_dist(F: np.ndarray, ref: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    """cost[s, j, k] = sum_p ((F[s, j, p] - ref[k, p]) / scale[k, p])^2."""
    d = F[:, :, None, :] - ref[None, None, :, :]
    if scale is not None:
        d = d / scale[None, None]
    return np.einsum("sjkp,sjkp->sjk", d, d)


def _pivot_index(fit, pivot) -> int:
    C, D = fit.num_chains, fit.num_draws
    if pivot is not None:
        c, d = (int(p) for p in pivot)
        if not (0 <= c < C and 0 <= d < D):
            raise OptionError(f"pivot={pivot!r} is not a (chain, draw) of this Fit "
                              f"({C} chains x {D} draws)")
        return c * D + d
    tree = fit.idata
    if "sample_stats" in tree.children and "lp" in tree["sample_stats"]:
        score = np.asarray(tree["sample_stats"]["lp"].values, float).reshape(-1)
    elif "log_likelihood" in tree.children:
        ds = tree["log_likelihood"].to_dataset()
        score = sum(np.asarray(v.values, float).reshape(C * D, -1).sum(1)
                    for v in ds.data_vars.values())
    else:
        return 0
    score = np.where(np.isfinite(score), score, -np.inf)
    return int(np.argmax(score))


def _pivot_perms(F: np.ndarray, p: int, num_iters: int) -> np.ndarray:
    perms = _assign(_sq_dist(F, F[p]))
    for _ in range(num_iters):
        G = np.take_along_axis(F, perms[:, :, None], axis=1)  # relabelled features
        ref, scale = G.mean(0), G.std(0) + 1e-6
        new = _assign(_sq_dist(F, ref, scale))
        if np.array_equal(new, perms):
            break
        perms = new
    return perms


def _stephens(P: np.ndarray, perms: np.ndarray, num_iters: int) -> tuple[np.ndarray, int]:
    P = np.asarray(P, np.float64)
    for it in range(num_iters):
        Pp = np.take_along_axis(P, perms[:, None, :], axis=2)
        logQ = np.log(np.clip(Pp.mean(0), 1e-300, None))  # (N, K)
        cost = -np.einsum("snj,nk->sjk", P, logQ)
        new = _assign(cost)
        if np.array_equal(new, perms):
            return perms, it
        perms = new
    return perms, num_iters


def relabel(fit, components: str | Mapping | ComponentSpec = "mixture", method: str = "pivot", *,
            prob_fn: Callable | None = None, pivot: tuple[int, int] | None = None,
            cost_sites: tuple[str, ...] | None = None, num_iters: int = 100):
    r"""A new Fit whose component-indexed sites are permuted per draw so the labels agree.

    Args:
        fit: a :class:`~bayeslik.Fit` of a mixture, an HMM, or any model with exchangeable
            components.
        components: the name of a registered spec (:func:`register_components`; the zoo
            registers ``"mixture"``, ``"arhmm"`` and ``"lognormmix"`` when
            :mod:`bayeslik.models.mixture` / :mod:`bayeslik.models.arhmm` /
            :mod:`bayeslik.models.tpp` is imported), a :class:`ComponentSpec`, or
            ``{site: axis}`` / ``{site: (axis, ...)}`` naming every site that carries the
            component axis (axes of the site's value).
        method: ``"pivot"`` or ``"stephens"`` (see the module docstring).
        prob_fn: for Stephens: ``prob_fn({site: (S, ...)}) -> (S, N, K)`` classification
            probabilities of each draw. The default is the registered spec's
            ``classification_fn(fit)`` (for ``"mixture"``:
            :func:`bayeslik.models.mixture.classification_fn` on the Fit's observed ``y``).
        pivot: ``(chain, draw)`` of the pivot draw; default the draw of highest log density.
        cost_sites: the spec sites compared in the pivot method's cost (default the registered
            spec's ``cost_sites`` where the Fit has them, else every spec site).
        num_iters: at most this many refinement / Stephens iterations.

    Returns:
        The relabelled Fit (the input is unchanged), with the permutations in group
        ``relabel`` and ``relabel_method`` / ``relabel_components`` in the DataTree's attributes.

    Raises:
        ModelError: an unknown spec name (the message lists the registered ones), sites or
            axes the Fit does not have, ``cost_sites`` outside the spec, Stephens' method
            without ``prob_fn`` for a spec with no ``classification_fn``, or a ``prob_fn`` of
            the wrong shape.
        OptionError: an unknown ``method``, a negative ``num_iters``, a ``pivot`` outside the
            Fit.

    >>> import bayeslik as bl                                   # doctest: +SKIP
    >>> fit2 = relabel(fit, "mixture")                          # doctest: +SKIP
    >>> fit2 = relabel(fit, {"pi": 0, "trans": (0, 1), "mu": 0}, method="pivot")  # doctest: +SKIP
    """
    if method not in ("pivot", "stephens"):
        raise OptionError(f"method must be 'pivot' or 'stephens', got {method!r}")
    if (not isinstance(num_iters, (int, np.integer)) or isinstance(num_iters, bool)
            or num_iters < 0):
        raise OptionError(f"num_iters must be a non-negative int, got {num_iters!r}")
    spec, registered = _resolve(fit, components)
    C, D = fit.num_chains, fit.num_draws
    S = C * D
    post_ds = fit.idata["posterior"].to_dataset()
    draws = {k: np.asarray(post_ds[k].values).reshape((S,) + post_ds[k].shape[2:])
             for k in post_ds.data_vars}
    if cost_sites is None:
        default = registered.cost_sites if registered is not None and registered.cost_sites else ()
        cost_sites = [c for c in default if c in spec] or list(spec)
    bad = [c for c in cost_sites if c not in spec]
    if bad:
        raise ModelError(f"cost_sites {bad} are not among the component sites {sorted(spec)}")
    F = _features(draws, {c: spec[c] for c in cost_sites})
    K = F.shape[1]
    p = _pivot_index(fit, pivot)
    perms = _pivot_perms(F, p, num_iters)
    info: dict = {"pivot_draw": p, "cost_sites": list(cost_sites)}
    if method == "stephens":
        if prob_fn is None:
            if registered is None or registered.classification_fn is None:
                where = ("a dict of components" if registered is None else
                         f"spec {registered.name!r} (registered by {registered.module})")
                raise ModelError(
                    "method='stephens' needs prob_fn(draws) -> (S, N, K) classification "
                    f"probabilities: {where} gives no default from the Fit alone"
                    + ("" if registered is None else
                       f"; see {registered.module}.classification_fn") + ".")
            prob_fn = registered.classification_fn(fit)
        P = np.asarray(prob_fn(draws))
        if P.ndim != 3 or P.shape[0] != S or P.shape[2] != K:
            raise ModelError(f"prob_fn returned shape {P.shape}; expected (S, N, K) = "
                             f"({S}, N, {K})")
        perms, iters = _stephens(P, perms, num_iters)
        info["stephens_iterations"] = iters
    perm_da = xr.Dataset(
        {"permutation": (("chain", "draw", "component"), perms.reshape(C, D, K))},
        coords={"chain": post_ds["chain"].values, "draw": post_ds["draw"].values,
                "component": np.arange(K)},
    )
    tree = permute_fit(fit, perms, spec).idata
    tree["relabel"] = xr.DataTree(perm_da)
    tree.attrs = {**tree.attrs, "relabel_method": method,
                  "relabel_components": json.dumps({k: list(v) for k, v in spec.items()}),
                  "relabel_info": json.dumps(info)}
    num_changed = int((perms != np.arange(K)).any(1).sum())
    tree.attrs["relabel_num_permuted_draws"] = num_changed
    return dataclasses.replace(fit, idata=tree)


def permute_fit(fit, perms, components: str | Mapping | ComponentSpec = "mixture"):
    """A copy of ``fit`` whose component sites are permuted draw by draw, as :func:`permute_draws`
    does for one array: ``perms`` is ``(chain * draw, K)`` (or ``(chain, draw, K)``), and
    ``components`` names the sites and axes as in :func:`relabel` (in a dict, sites the Fit does
    not have are skipped). :func:`relabel` applies its permutations with it; it also scrambles
    a Fit's labels on purpose (tests, demonstrations).

    >>> scrambled = permute_fit(fit, perms, {"mu": 0, "weights": 0})   # doctest: +SKIP
    """
    if isinstance(components, Mapping):  # a spec written for a larger model: skip absent sites
        components = {k: v for k, v in components.items() if k in fit.idata["posterior"]}
    spec, _ = _resolve(fit, components)
    post_ds = fit.idata["posterior"].to_dataset()
    S = fit.num_chains * fit.num_draws
    perms = np.asarray(perms).reshape(S, -1)
    new_vars = {}
    for site, da in post_ds.data_vars.items():
        if site in spec:
            v = permute_draws(np.asarray(da.values).reshape((S,) + da.shape[2:]), perms, spec[site])
            new_vars[site] = da.copy(data=v.reshape(da.shape))
        else:
            new_vars[site] = da
    tree = fit.idata.copy()
    tree["posterior"] = xr.DataTree(xr.Dataset(new_vars, attrs=post_ds.attrs))
    return dataclasses.replace(fit, idata=tree)
