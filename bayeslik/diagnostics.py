"""Diagnostics: a Fit's error against a reference posterior, in Monte Carlo standard errors."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from bayeslik.errors import OptionError

__all__ = ["error_vs_reference"]


def _mcse_mean(draws: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    import arviz_base as azb
    import arviz_stats as azs

    tree = azb.from_dict({"posterior": {k: np.asarray(v) for k, v in draws.items()}})
    out = azs.mcse(tree, group="posterior", method="mean")
    return {k: np.asarray(out[k]) for k in draws}


def error_vs_reference(fit, mean: Mapping[str, np.ndarray] | None = None,
                       sd: Mapping[str, np.ndarray] | None = None,
                       draws: Mapping[str, np.ndarray] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Standardised error of a Fit's posterior against exact moments or reference draws.

    Give either exact ``mean`` (and optionally ``sd``) per variable, or reference ``draws``
    (chain, draw, ...). Returns ``{var: {"z": (mean error) / MCSE, "sd_ratio": sd / sd_ref}}``,
    where the MCSE combines the Fit's own and, for draws, the reference's (ArviZ's estimate).
    |z| beyond about 4 means the engine is off by more than its Monte Carlo error explains.

    >>> err = error_vs_reference(fit, mean={"mu": 1.5}, sd={"mu": 0.2})  # doctest: +SKIP
    """
    if (mean is None) == (draws is None):
        raise OptionError("give exactly one of `mean` (exact moments) or `draws` (reference draws)")
    ours = {k: fit.draws(k) for k in (mean or draws)}
    our_mcse = _mcse_mean(ours)
    out = {}
    if draws is not None:
        ref_mcse = _mcse_mean(draws)
        for k, r in draws.items():
            r = np.asarray(r)
            flat_r = r.reshape((-1,) + r.shape[2:])
            flat_o = ours[k].reshape((-1,) + r.shape[2:])
            z = (flat_o.mean(0) - flat_r.mean(0)) / np.sqrt(our_mcse[k] ** 2 + ref_mcse[k] ** 2)
            out[k] = {"z": z, "sd_ratio": flat_o.std(0) / flat_r.std(0)}
        return out
    for k, m in mean.items():
        m = np.asarray(m)
        flat_o = ours[k].reshape((-1,) + m.shape)
        res = {"z": (flat_o.mean(0) - m) / our_mcse[k]}
        if sd is not None and k in sd:
            res["sd_ratio"] = flat_o.std(0) / np.asarray(sd[k])
        out[k] = res
    return out
