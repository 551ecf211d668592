"""Matplotlib figures."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from bayeslik.errors import DataError

__all__ = ["plot_sbc", "plot_marginals", "plot_cost", "plot_evidence", "plot_snl_rounds"]


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


def _scalar_marginals(fit, var_names, max_params):
    """[(label, draws (n,))] of the first ``max_params`` scalar components of ``var_names``."""
    out = []
    for v in var_names:
        if v not in fit.idata["posterior"]:
            continue
        a = fit.draws(v)
        flat = a.reshape(a.shape[0] * a.shape[1], -1)
        for j in range(flat.shape[1]):
            out.append((v if flat.shape[1] == 1 else f"{v}[{j}]", flat[:, j]))
    return out[:max_params]


def plot_marginals(comparison, var_names: Sequence[str] | None = None, max_params: int = 12,
                   max_cols: int = 4):
    """Every engine's marginal posterior of each scalar parameter, overlaid (kernel density
    estimates of the first seed's draws), with the reference in black, labelled by what it is:
    "exact" (the Reference's exact marginal density, e.g. the Student-t and inverse gamma of a
    conjugate normal-inverse-gamma posterior), "reference draws" (a kernel density estimate of
    its draws), or "normal approx." (dashed: a normal with the exact mean and sd, where nothing
    more is known). Returns the Figure."""
    import matplotlib.pyplot as plt

    labels = [lab for lab, fits in comparison.fits.items() if any(f is not None for f in fits)]
    if not labels:
        raise DataError("no engine produced a fit; nothing to plot")
    first = comparison[labels[0]]
    names = list(var_names or first.idata["posterior"].data_vars)
    names = [n for n in names if n in comparison.posterior.sites]
    params = [p for p, _ in _scalar_marginals(first, names, max_params)]
    ncol = min(max(len(params), 1), max_cols)
    nrow = int(np.ceil(max(len(params), 1) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.5 * nrow), squeeze=False)
    ref = comparison.reference
    ref_draws = dict(_scalar_marginals(_DrawsFit(ref.draws), names, max_params)) \
        if ref is not None and ref.draws else {}
    drawn: dict[str, list] = {}
    for i, lab in enumerate(labels):
        for ax, (p, x) in zip(axes.flat, _scalar_marginals(comparison[lab], names, max_params)):
            drawn.setdefault(p, []).append(x)
            if np.ptp(x) > 0:
                ax.plot(*_kde(x), color=f"C{i}", lw=1.3, label=lab)
            ax.set_title(p, fontsize=9)
            ax.set_yticks([])
    kinds = []
    for ax, p in zip(axes.flat, params):
        line = _reference_curve(ref, p, ref_draws.get(p), drawn.get(p, []))
        if line is not None:
            grid, y, style, kind = line
            ax.plot(grid, y, style, lw=1, alpha=0.8 if kind == "reference draws" else 1.0,
                    label=kind)
        kinds.append(None if line is None else line[3])
    for ax in list(axes.flat)[len(params):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    for ax, kind in zip(list(axes.flat)[1:], kinds[1:]):  # a panel whose reference differs
        if kind is not None and kind != kinds[0]:
            ax.legend(handles=[h for h in ax.get_lines() if h.get_label() == kind], fontsize=7)
    fig.tight_layout()
    return fig


def _reference_curve(ref, p: str, draws, engine_draws: list):
    """(grid, density, line style, label) of the reference's marginal of parameter ``p``, or
    None where the reference says nothing about it: its exact density ("exact"), a kernel
    density estimate of its draws ("reference draws"), or a normal with its exact mean and sd
    ("normal approx.")."""
    from scipy.stats import norm

    if ref is None:
        return None
    var, _, idx = p.partition("[")
    j = int(idx[:-1]) if idx else 0
    m = s = None
    if ref.mean is not None and var in ref.mean and ref.sd is not None and var in ref.sd:
        m, s = float(np.ravel(ref.mean[var])[j]), float(np.ravel(ref.sd[var])[j])
    density = (getattr(ref, "density", None) or {}).get(p)
    if density is not None:
        xs = [np.asarray(x, float) for x in engine_draws] + ([] if draws is None else [draws])
        if xs:
            grid = _grid(np.concatenate(xs))
        elif m is not None:
            grid = np.linspace(m - 4 * s, m + 4 * s, 200)
        else:
            return None
        return grid, np.asarray(density(grid), float), "k-", "exact"
    if draws is not None and np.ptp(draws) > 0:
        return (*_kde(draws), "k-", "reference draws")
    if m is not None:
        grid = np.linspace(m - 4 * s, m + 4 * s, 200)
        return grid, norm.pdf(grid, m, s), "k--", "normal approx."
    return None


class _DrawsFit:
    """The bits of a Fit that _scalar_marginals reads, over a dict of draws."""

    def __init__(self, draws):
        self._d = draws
        self.idata = {"posterior": draws}

    def draws(self, v):
        return np.asarray(self._d[v])


def _kde(x) -> tuple[np.ndarray, np.ndarray]:
    """(grid, density): ArviZ's kernel density estimate (the one its plots draw), on the draws'
    range with boundary correction, so the density of a positive parameter whose draws crowd 0
    does not spill below 0 nor dip at the edge (scipy's Gaussian KDE did both)."""
    from arviz_stats.base import array_stats

    grid, density, _ = array_stats.kde(np.asarray(x, float), grid_len=256)
    return grid, density


def _grid(x):
    lo, hi = np.quantile(x, [0.001, 0.999])
    pad = 0.1 * (hi - lo + 1e-12)
    return np.linspace(lo - pad, hi + pad, 200)


def plot_cost(comparison):
    """Bars per engine (mean over seeds): wall time (compile time hatched) and the smallest
    bulk ESS per second of sampling (compilation left out). An engine with a run whose
    compiled programs came from the cache (``compile_cached``) is marked ``*`` : its compile
    bar is not a cold start's. Returns the Figure."""
    import matplotlib.pyplot as plt

    t = comparison.table[comparison.table["status"] == "ok"]
    g = t.groupby("engine", sort=False)[["wall_s", "compile_s", "ess_bulk_per_s"]].mean()
    cached = t["compile_cached"].map(lambda v: isinstance(v, (bool, np.bool_)) and bool(v)) \
        .groupby(t["engine"], sort=False).any() if "compile_cached" in t else None
    names = [f"{e}*" if cached is not None and cached.get(e, False) else e for e in g.index]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3))
    x = np.arange(len(g))
    ax[0].bar(x, g["wall_s"], color=[f"C{i}" for i in x])
    ax[0].bar(x, g["compile_s"].fillna(0), color="none", edgecolor="k", hatch="//",
              label="compile")
    ax[0].set(ylabel="wall time (s)", xticks=x, xticklabels=names)
    ax[0].legend(fontsize=8)
    ax[1].bar(x, g["ess_bulk_per_s"], color=[f"C{i}" for i in x])
    ax[1].set(ylabel="min bulk ESS / sampling s", xticks=x, xticklabels=names)
    for a in ax:
        a.tick_params(axis="x", rotation=30)
    if any(n.endswith("*") for n in names):
        fig.text(0.01, 0.01, "* compiled programs reused from an earlier run (compile not a "
                 "cold start's)", fontsize=7)
        fig.tight_layout(rect=(0, 0.06, 1, 1))
    else:
        fig.tight_layout()
    return fig


def plot_evidence(comparison):
    """log Z of every run that estimated it, with +-1 error bars, and the exact value where the
    reference knows it. Returns the Figure."""
    import matplotlib.pyplot as plt

    t = comparison.table[(comparison.table["status"] == "ok")
                         & comparison.table["log_evidence"].notna()]
    fig, ax = plt.subplots(figsize=(6, 3))
    labels = list(dict.fromkeys(t["engine"]))
    for i, lab in enumerate(labels):
        r = t[t["engine"] == lab]
        xs = i + np.linspace(-0.15, 0.15, len(r)) if len(r) > 1 else np.array([i])
        ax.errorbar(xs, r["log_evidence"], yerr=r["log_evidence_err"].fillna(0), fmt="o",
                    color=f"C{i}", capsize=3)
    ref = comparison.reference
    if ref is not None and ref.log_evidence is not None:
        ax.axhline(ref.log_evidence, color="k", ls="--", lw=1, label="exact")
        ax.legend(fontsize=8)
    ax.set(xticks=range(len(labels)), xticklabels=labels, ylabel="log Z")
    if not labels:
        ax.text(0.5, 0.5, "no engine estimated the evidence", ha="center", va="center",
                transform=ax.transAxes)
    fig.tight_layout()
    return fig


def plot_snl_rounds(fit, reference=None, var_names: Sequence[str] | None = None,
                    max_params: int = 8, max_cols: int = 4):
    """The rounds of an SNL Fit converging: per scalar parameter, each round's posterior draws
    as a density (light to dark: first to last round), with ``reference`` draws where given (a
    Fit, e.g. NUTS on an exact likelihood, or {name: array}; black, dashed); the last panel is
    the flow's held-out loss against the simulations used.

    Returns the matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    if "snl_rounds" not in getattr(fit, "idata", {}).children:
        raise DataError("plot_snl_rounds: the Fit has no snl_rounds group; it was not made by "
                        "the 'snl' engine.")
    rounds = fit.idata["snl_rounds"].to_dataset()
    names = [n.removeprefix("draws_") for n in rounds.data_vars if n.startswith("draws_")]
    if var_names is not None:
        unknown = sorted(set(var_names) - set(names))
        if unknown:
            raise DataError(f"plot_snl_rounds: no parameter(s) {unknown}; the Fit has {names}")
        names = list(var_names)
    panels = []
    for n in names:
        v = np.asarray(rounds[f"draws_{n}"].values)
        flat = v.reshape(v.shape[0], v.shape[1], -1)
        for j in range(flat.shape[2]):
            label = n if flat.shape[2] == 1 else f"{n}[{j}]"
            panels.append((label, n, j, flat.shape[2], flat[:, :, j]))
    panels = panels[:max_params]
    total = len(panels) + 1
    ncol = min(total, max_cols)
    nrow = int(np.ceil(total / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.5 * nrow), squeeze=False)
    R = int(rounds.sizes["round"])
    cmap = plt.get_cmap("viridis")
    for i, (label, n, j, k, draws) in enumerate(panels):
        ax = axes[i // ncol, i % ncol]
        for r in range(R):
            grid, dens = _kde(draws[r])
            ax.plot(grid, dens, color=cmap(0.15 + 0.7 * r / max(R - 1, 1)), lw=1.0,
                    label=f"round {r + 1}" if r in (0, R - 1) else None)
        if reference is not None:
            ref = reference.draws(n) if hasattr(reference, "draws") else reference[n]
            ref = np.asarray(ref).reshape(-1, k)[:, j]  # (draws..., *site) -> this entry
            grid, dens = _kde(ref)
            ax.plot(grid, dens, color="k", ls="--", lw=1.2, label="reference")
        ax.set_title(label, fontsize=9)
        ax.set_yticks([])
        if i == 0:
            ax.legend(fontsize=7)
    ax = axes[(total - 1) // ncol, (total - 1) % ncol]
    ax.plot(rounds["simulations_total"].values, rounds["heldout_loss"].values, "o-", color="C3")
    ax.set_xlabel("simulations", fontsize=8)
    ax.set_ylabel("held-out loss", fontsize=8)
    ax.set_title("flow training", fontsize=9)
    for k in range(total, nrow * ncol):
        axes[k // ncol, k % ncol].axis("off")
    fig.suptitle(f"SNL rounds: {fit.model} ({int(rounds['simulations_total'].values[-1])} "
                 "simulations)", fontsize=10)
    fig.tight_layout()
    return fig

