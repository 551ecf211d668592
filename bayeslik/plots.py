"""Matplotlib figures."""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["plot_sbc"]


def plot_sbc(result, quantities: Sequence[str] | None = None, ci_prob: float = 0.95,
             max_cols: int = 4):
    """SBC figure: per quantity, the ECDF difference of the fractional ranks with a simultaneous
    ``ci_prob`` band (top row) and their histogram (20 bins) with the binomial 99% range of a
    bin's count under uniformity (bottom row).

    Returns the matplotlib Figure.
    """
    import matplotlib.pyplot as plt
    from arviz_stats.ecdf_utils import ecdf_pit
    from scipy.stats import binom

    names = list(quantities or result.table.index)
    ncol = min(len(names), max_cols)
    nrow = 2 * int(np.ceil(len(names) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.4 * nrow), squeeze=False)
    S, L = result.num_simulations - result.num_failed, result.num_draws
    bins = 20
    for i, q in enumerate(names):
        ax_e = axes[2 * (i // ncol), i % ncol]
        ax_h = axes[2 * (i // ncol) + 1, i % ncol]
        z, ecdf, lo, hi = ecdf_pit(result.fractional[q], ci_prob, 1000)
        ax_e.fill_between(z, lo - z, hi - z, color="0.85", step="post", label=f"{ci_prob:.0%} band")
        ax_e.step(z, ecdf - z, where="post", color="C3" if not result.table.loc[q, "passed"] else "C0")
        ax_e.axhline(0, color="0.4", lw=0.7)
        ax_e.set_title(f"{q}  (p={result.table.loc[q, 'min_p']:.3g})", fontsize=9)
        ax_e.set_xlabel("fractional rank", fontsize=8)
        ax_e.set_ylabel("ECDF - uniform", fontsize=8)
        counts, edges = np.histogram(result.fractional[q], bins=bins, range=(0, 1))
        ax_h.axhspan(binom.ppf(0.005, S, 1 / bins), binom.ppf(0.995, S, 1 / bins), color="0.88",
                     zorder=0, label="99% range")
        ax_h.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="C0", alpha=0.8,
                 zorder=1)
        ax_h.set_xlabel("fractional rank", fontsize=8)
    for j in range(len(names), (nrow // 2) * ncol):
        axes[2 * (j // ncol), j % ncol].axis("off")
        axes[2 * (j // ncol) + 1, j % ncol].axis("off")
    fig.suptitle(f"SBC: {result.model} x {result.engine} ({S} simulations, L <= {L})", fontsize=10)
    fig.tight_layout()
    return fig
