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
site's value (without chain and draw). Ready-made specs: ``"mixture"`` (for
:mod:`bayeslik.models.mixture`) and ``"arhmm"`` (for :mod:`bayeslik.models.arhmm`); sites of a
ready-made spec that a Fit does not have are skipped.

Methods
-------
``"pivot"`` (Marin, Mengersen & Robert 2005, with a refinement step). Each component of a draw is
described by a feature vector: the component's slice of the ``cost_sites`` (default: the
locations, :data:`COST_SITES`, for a ready-made spec; every spec site for a dict; for a site
with two component axes, its diagonal, e.g. the probability of staying in a state), each feature
standardised by its posterior spread. The pivot is the draw with the highest log density (the
``lp`` sample stat, else the highest log-likelihood, or ``pivot=(chain, draw)``). Every draw's
components are assigned to the pivot's by the Hungarian algorithm
(:func:`scipy.optimize.linear_sum_assignment`) on the squared distances between feature vectors;
then, ``num_iters`` times at most, the reference becomes the mean of the relabelled features
and the assignment is repeated with distances scaled by the relabelled per-component spreads
(a k-means in label space, Celeux 1998) until no permutation changes. One pivot for all chains,
so chains sitting in different label modes are aligned.

``"stephens"`` (Stephens 2000, the KL algorithm). Needs per-draw classification probabilities
:math:`P_s[n, k] = p(z_n = k \mid y, \theta_s)` from ``prob_fn(draws) -> (S, N, K)`` (given for
the mixture spec automatically by :func:`bayeslik.models.mixture.classification_fn`; for an
AR-HMM use :func:`arhmm_classification_fn`). Starting from the pivot solution it alternates

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
import json
from typing import Callable, Mapping

import numpy as np
import xarray as xr

__all__ = ["SPECS", "COST_SITES", "relabel", "permute_draws", "arhmm_classification_fn"]

#: Ready-made component specs: {name: {site: axis or axes}}.
SPECS: dict[str, dict[str, int | tuple[int, ...]]] = {
    "mixture": {"weights": 0, "mu": 0, "sigma": 0, "corr_partial": 0, "L_omega": 0},
    "arhmm": {"pi": 0, "trans": (0, 1), "b0": 0, "b_rest": 0, "b": 0, "A": 0, "sigma": 0,
              "L_omega": 0},
}

#: The sites whose values describe a component in the pivot method's cost, per ready-made spec:
#: the locations (cluster means, state intercepts). Shape parameters (scales, correlations,
#: weights) are far noisier relative to their differences between components and, weighted
#: equally, mislead the matching (measured: on 3 overlapping 2-D clusters, membership error 0.29
#: with every site in the cost vs 0.10 with the means alone, whatever the pivot draw).
COST_SITES: dict[str, tuple[str, ...]] = {"mixture": ("mu",), "arhmm": ("b0", "b_rest")}


def _resolve(fit, components) -> tuple[dict[str, tuple[int, ...]], str | None]:
    """({site: axes}, spec name) checked against the Fit."""
    posterior = fit.idata["posterior"]
    name = None
    if isinstance(components, str):
        if components not in SPECS:
            raise ValueError(f"components={components!r} is not a ready-made spec; give one of "
                             f"{sorted(SPECS)} or a dict {{site: axis}}")
        name = components
        spec = {k: v for k, v in SPECS[name].items() if k in posterior}
        if name == "arhmm" and "trans_0" in posterior:
            raise ValueError("a left-to-right AR-HMM's states are identified by its structure; "
                             "it has no label switching to undo")
        if not spec:
            raise ValueError(f"the Fit has none of the sites of spec {name!r} "
                             f"({sorted(SPECS[name])}); its sites are {sorted(posterior)}")
    elif isinstance(components, Mapping) and components:
        spec = dict(components)
        missing = [k for k in spec if k not in posterior]
        if missing:
            raise ValueError(f"components names site(s) {missing} that the Fit does not have; its "
                             f"sites are {sorted(posterior)}")
    else:
        raise ValueError("components must be a spec name or a non-empty dict {site: axis}, got "
                         f"{components!r}")
    out: dict[str, tuple[int, ...]] = {}
    K = None
    for site, axes in spec.items():
        axes = (axes,) if isinstance(axes, (int, np.integer)) else tuple(int(a) for a in axes)
        shape = tuple(posterior[site].shape[2:])
        for a in axes:
            if not 0 <= a < len(shape):
                raise ValueError(f"components: site {site!r} has value shape {shape}; axis {a} "
                                 "does not exist (axes are counted without chain and draw)")
            if K is None:
                K = shape[a]
            if shape[a] != K:
                raise ValueError(f"components: site {site!r} has {shape[a]} entries on axis {a}, "
                                 f"but the other component axes have K = {K}")
        out[site] = axes
    return out, name


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
            raise ValueError(f"pivot={pivot!r} is not a (chain, draw) of this Fit ({C} x {D})")
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


def relabel(fit, components: str | Mapping = "mixture", method: str = "pivot", *,
            prob_fn: Callable | None = None, pivot: tuple[int, int] | None = None,
            cost_sites: tuple[str, ...] | None = None, num_iters: int = 100):
    r"""A new Fit whose component-indexed sites are permuted per draw so the labels agree.

    Args:
        fit: a :class:`~bayeslik.Fit` of a mixture, an HMM, or any model with exchangeable
            components.
        components: ``"mixture"``, ``"arhmm"``, or ``{site: axis}`` / ``{site: (axis, ...)}``
            naming every site that carries the component axis (axes of the site's value).
        method: ``"pivot"`` or ``"stephens"`` (see the module docstring).
        prob_fn: for Stephens: ``prob_fn({site: (S, ...)}) -> (S, N, K)`` classification
            probabilities of each draw. With ``components="mixture"`` the default is
            :func:`bayeslik.models.mixture.classification_fn` on the Fit's observed ``y``.
        pivot: ``(chain, draw)`` of the pivot draw; default the draw of highest log density.
        cost_sites: the spec sites compared in the pivot method's cost (default
            :data:`COST_SITES` of a ready-made spec where the Fit has them, else every spec
            site).
        num_iters: at most this many refinement / Stephens iterations.

    Returns:
        The relabelled Fit (the input is unchanged), with the permutations in group
        ``relabel`` and ``relabel_method`` / ``relabel_components`` in the DataTree's attributes.

    >>> import bayeslik as bl                                   # doctest: +SKIP
    >>> fit2 = relabel(fit, "mixture")                          # doctest: +SKIP
    >>> fit2 = relabel(fit, {"pi": 0, "trans": (0, 1), "mu": 0}, method="pivot")  # doctest: +SKIP
    """
    if method not in ("pivot", "stephens"):
        raise ValueError(f"method must be 'pivot' or 'stephens', got {method!r}")
    if not isinstance(num_iters, (int, np.integer)) or num_iters < 0:
        raise ValueError(f"num_iters must be a non-negative int, got {num_iters!r}")
    spec, name = _resolve(fit, components)
    C, D = fit.num_chains, fit.num_draws
    S = C * D
    post_ds = fit.idata["posterior"].to_dataset()
    draws = {k: np.asarray(post_ds[k].values).reshape((S,) + post_ds[k].shape[2:])
             for k in post_ds.data_vars}
    if cost_sites is None:
        cost_sites = [c for c in COST_SITES.get(name, ()) if c in spec] or list(spec)
    bad = [c for c in cost_sites if c not in spec]
    if bad:
        raise ValueError(f"cost_sites {bad} are not among the component sites {sorted(spec)}")
    F = _features(draws, {c: spec[c] for c in cost_sites})
    K = F.shape[1]
    p = _pivot_index(fit, pivot)
    perms = _pivot_perms(F, p, num_iters)
    info: dict = {"pivot_draw": p, "cost_sites": list(cost_sites)}
    if method == "stephens":
        if prob_fn is None:
            if name != "mixture":
                raise ValueError("method='stephens' needs prob_fn(draws) -> (S, N, K) "
                                 "classification probabilities for this spec (for an AR-HMM: "
                                 "bayeslik.relabel.arhmm_classification_fn(posterior))")
            from bayeslik.models.mixture import _observed_y, classification_fn

            prob_fn = classification_fn(_observed_y(fit))
        P = np.asarray(prob_fn(draws))
        if P.ndim != 3 or P.shape[0] != S or P.shape[2] != K:
            raise ValueError(f"prob_fn returned shape {P.shape}; expected (S, N, K) = "
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


def permute_fit(fit, perms, components: str | Mapping = "mixture"):
    """A copy of ``fit`` whose component sites are permuted draw by draw, as :func:`permute_draws`
    does for one array: ``perms`` is ``(chain * draw, K)`` (or ``(chain, draw, K)``), and
    ``components`` names the sites and axes as in :func:`relabel` (in a dict, sites the Fit does
    not have are skipped). :func:`relabel` applies its
    permutations with it; it also scrambles a Fit's labels on purpose (tests, demonstrations).

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


def arhmm_classification_fn(posterior, num_draws_per_batch: int = 64) -> Callable:
    r"""``prob_fn(draws) -> (S, T, K)`` for Stephens' method on an AR-HMM Fit: each draw's
    smoothed state marginals :math:`p(z_t = k \mid y, \theta_s)` (forward-backward, through
    :func:`bayeslik.models.arhmm.hmm_inputs`, the same inputs as the model). Single sequences
    only (``y`` ``(T, D)``).

    >>> fit2 = relabel(fit, "arhmm", method="stephens",
    ...                prob_fn=arhmm_classification_fn(post))    # doctest: +SKIP
    """
    import jax
    import jax.numpy as jnp

    from bayeslik.filtering import hmm_smoother
    from bayeslik.models.arhmm import hmm_inputs

    data = posterior.data
    y = jnp.asarray(data["y"])
    if y.ndim != 2:
        raise ValueError("arhmm_classification_fn handles one sequence y (T, D); got a batch")
    num_lags = int(data.get("num_lags", 1))
    labels, mask = data.get("labels"), data.get("mask")
    names = ("pi", "trans", "b", "A", "sigma", "L_omega")

    @jax.jit
    def probs(params):
        def one(p):
            li, lt, lo = hmm_inputs(p, y, num_lags=num_lags, labels=labels)
            return jnp.exp(hmm_smoother(li, lt, lo, mask=mask).log_smoothed)
        return jax.vmap(one)(params)

    def prob_fn(draws):
        params = {k: jnp.asarray(v) for k, v in draws.items() if k in names}
        S = params["pi"].shape[0]
        B = int(num_draws_per_batch)
        return np.concatenate([np.asarray(probs({k: v[i:i + B] for k, v in params.items()}))
                               for i in range(0, S, B)], axis=0)

    return prob_fn
