"""Convergence checks of multi-chain runs, as Fit flags and Python warnings.

A run whose chains disagree, or whose draws carry too little information, gives an answer that
looks as confident as a good one. Every multi-chain engine passes its draws through
:func:`convergence_flags`; ``bl.fit`` turns every flag of a Fit into a :class:`FitWarning`.

The thresholds are those of Vehtari, Gelman, Simpson, Carpenter and Bürkner (2021), "Rank-
normalization, folding, and localization: an improved R-hat", which ArviZ and Stan follow:
rank-normalised split R-hat at most 1.01, bulk and tail effective sample sizes at least 100 per
chain. They are computed by ArviZ (``arviz_stats``) on every element of every latent site.
"""

from __future__ import annotations

import warnings
from typing import Mapping

import numpy as np

__all__ = ["FitWarning", "convergence_flags", "warn_flags", "scalar_elements",
           "element_diagnostics", "RHAT_MAX", "ESS_PER_CHAIN_MIN"]

#: split R-hat above this is flagged
RHAT_MAX = 1.01
#: bulk or tail ESS below this many per chain is flagged
ESS_PER_CHAIN_MIN = 100


class FitWarning(UserWarning):
    """A run finished but its result may be wrong: divergences, chains that disagree, too few
    effective draws, a surrogate that never switched in... The same text is in ``fit.flags``."""


def scalar_elements(draws: Mapping[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
    """``(names, x)``: the name of every scalar element of the sites (``"A[0,1]"``) and their
    draws side by side, ``x`` of shape ``(chain, draw, elements)``; ``draws`` maps each site to
    ``(chain, draw, ...)``.

    >>> names, x = scalar_elements({"mu": np.zeros((2, 5)), "b": np.zeros((2, 5, 2))})
    >>> names, x.shape
    (['mu', 'b[0]', 'b[1]'], (2, 5, 3))
    """
    names, columns = [], []
    for site, a in draws.items():
        a = np.asarray(a, dtype=float)
        flat = a.reshape(a.shape[0], a.shape[1], -1)
        for j in range(flat.shape[2]):
            idx = np.unravel_index(j, a.shape[2:]) if a.ndim > 2 else ()
            names.append(site + (f"[{','.join(map(str, idx))}]" if idx else ""))
        columns.append(flat)
    return names, np.concatenate(columns, axis=2) if columns else np.zeros((1, 1, 0))


def _worst(names, values, bad, fmt, highest: bool) -> str:
    idx = np.flatnonzero(bad)
    order = idx[np.argsort(values[idx])]
    order = order[::-1] if highest else order
    shown = ", ".join(f"{names[i]} {fmt(values[i])}" for i in order[:3])
    more = f" and {len(idx) - 3} more" if len(idx) > 3 else ""
    return shown + more


def convergence_flags(draws: Mapping[str, np.ndarray], *, rhat_max: float = RHAT_MAX,
                      ess_per_chain_min: float = ESS_PER_CHAIN_MIN) -> list[str]:
    """Flags for draws ``{site: (chain, draw, *shape)}`` of a multi-chain run.

    One flag when any element's rank-normalised split R-hat exceeds ``rhat_max`` (needs two or
    more chains), one when any bulk ESS, one when any tail ESS falls below
    ``ess_per_chain_min * num_chains``; each names the worst elements. Elements that are constant
    over all draws (R-hat undefined) are left out.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> ok = {"x": rng.normal(size=(4, 1000))}
    >>> convergence_flags(ok)
    []
    >>> apart = {"x": rng.normal(size=(4, 1000)) + np.array([[0.0], [0.0], [5.0], [5.0]])}
    >>> convergence_flags(apart)[0].startswith("chains disagree: split R-hat above 1.01")
    True
    """
    diag = element_diagnostics(draws)
    if diag is None:
        return []
    names, rhat, num_chains = diag["names"], diag["rhat"], diag["num_chains"]
    flags = []
    if rhat is not None:
        bad = np.isfinite(rhat) & (rhat > rhat_max)
        if bad.any():
            flags.append(
                f"chains disagree: split R-hat above {rhat_max} for {int(bad.sum())} of "
                f"{len(names)} parameters (worst: "
                f"{_worst(names, rhat, bad, lambda v: f'{v:.3g}', True)}); the chains may sit "
                "in different modes or have not mixed: do not trust the summaries; run "
                "longer, start the chains elsewhere, or reparametrise")
    need = ess_per_chain_min * num_chains
    for method in ("bulk", "tail"):
        ess = diag[f"ess_{method}"]
        bad = np.isfinite(ess) & (ess < need)
        if bad.any():
            flags.append(
                f"low {method} ESS: below {ess_per_chain_min:g} per chain ({need:g}) for "
                f"{int(bad.sum())} of {len(names)} parameters (worst: "
                f"{_worst(names, ess, bad, lambda v: f'{v:.0f}', False)}); the "
                f"{'means' if method == 'bulk' else 'tail quantiles'} are poorly estimated: "
                "draw more, or improve the mixing")
    return flags


def element_diagnostics(draws: Mapping[str, np.ndarray]) -> dict | None:
    """Rank-normalised split R-hat and bulk / tail ESS of every scalar element of ``draws``
    ``{site: (chain, draw, *shape)}`` that varies over the draws (a constant element has none:
    ArviZ would divide 0 by 0). A dict with ``names``, ``rhat`` (None for one chain),
    ``ess_bulk``, ``ess_tail`` (arrays over the varying elements) and ``num_chains``; None when
    no element varies or there are fewer than 4 draws.

    >>> d = element_diagnostics({"x": np.random.default_rng(0).normal(size=(2, 100)),
    ...                          "c": np.ones((2, 100))})
    >>> d["names"], d["rhat"].shape
    (['x'], (1,))
    """
    from arviz_stats.base import array_stats

    names, x = scalar_elements(draws)
    num_chains, num_draws = x.shape[0], x.shape[1]
    if x.shape[2] == 0 or num_draws < 4:
        return None
    varying = np.ptp(x.reshape(-1, x.shape[2]), axis=0) > 0
    if not varying.any():
        return None
    ary = np.moveaxis(x[:, :, varying], 2, 0)  # (elements, chain, draw)
    out = {"names": [n for n, v in zip(names, varying) if v], "num_chains": num_chains,
           "rhat": None}
    with warnings.catch_warnings():  # NaN where an element is constant within every chain
        warnings.simplefilter("ignore", RuntimeWarning)
        if num_chains > 1:
            out["rhat"] = np.asarray(array_stats.rhat(ary, chain_axis=-2, draw_axis=-1,
                                                      method="rank"))
        for method in ("bulk", "tail"):  # ArviZ's tail quantiles 5% / 95%
            out[f"ess_{method}"] = np.asarray(array_stats.ess(
                ary, chain_axis=-2, draw_axis=-1, method=method,
                **({"prob": (0.05, 0.95)} if method == "tail" else {})))
    return out


def warn_flags(fit, stacklevel: int = 3) -> None:
    """One :class:`FitWarning` per flag of ``fit`` (called by ``bl.fit``)."""
    for flag in fit.flags:
        warnings.warn(f"{fit.engine} on '{fit.model}': {flag}", FitWarning, stacklevel=stacklevel)
