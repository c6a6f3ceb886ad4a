"""Plots of probe tables: AUROC by layer, layer x head heatmap, transfer heatmap.

Every plot reads a table produced by the sweep or the generalization step; none recomputes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..figures import CSS_PX_PER_INCH, FIGURE_WIDTH_PX, new_figure, save_figure, tick_step, wrap


def _figure(*args, **kwargs):
    return new_figure(*args, **kwargs)


def _save(fig, path: str | Path) -> Path:
    return save_figure(fig, path)


def plot_auroc_by_layer(table: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """AUROC by layer, one line per method (95% CI band), the shuffled-label control shaded,
    and the wording baseline dashed.

    Head rows are summarized by their best head per layer. One panel per site and position.
    """
    panels = list(table.groupby(["site", "position"], sort=False))
    ncols = min(2, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = _figure(nrows, ncols, height=4.5 * nrows + 0.8, squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, ((site, position), part) in zip(axes.flat, panels):
        if site == "head":
            idx = part.groupby(["method", "layer"])["auroc_mean"].idxmax()
            part = part.loc[idx.values]
        control_lo = part.groupby("layer")["control_auroc"].min()
        control_hi = part.groupby("layer")["control_auroc"].max()
        ax.fill_between(control_lo.index, np.minimum(control_lo, 0.5), np.maximum(control_hi, 0.5),
                        color="grey", alpha=0.3, label="shuffled-label control")
        rnd = part.groupby("layer")["random_auroc"].first()
        ax.plot(rnd.index, rnd.values, ":", color="grey", label="random direction")
        for method, rows in part.groupby("method", sort=False):
            rows = rows.sort_values("layer")
            line, = ax.plot(rows["layer"], rows["auroc_mean"], marker=".", label=method)
            ax.fill_between(rows["layer"], rows["auroc_ci_low"], rows["auroc_ci_high"],
                            color=line.get_color(), alpha=0.12)
        if "wording_auroc" in part:
            ax.axhline(float(part["wording_auroc"].max()), color="darkred", ls="--", lw=1,
                       label="wording baseline (words alone)")
        ax.axhline(0.5, color="black", lw=0.6)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("layer")
        ax.set_ylabel("cross-validated AUROC")
        label = f"{site} @ {position}" + (" (best head)" if site == "head" else "")
        ax.set_title(wrap(f"{title} {label}".strip(), 0.9 / ncols))
    legend = {}
    for ax in axes.flat[:len(panels)]:  # one legend for every panel, below them
        for handle, name in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(name, handle)
    fig.legend(list(legend.values()), list(legend), loc="outside lower center", ncol=3)
    return _save(fig, path)


def plot_head_heatmap(table: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Layer x head AUROC of head probes (the method with the best mean, first position)."""
    heads = table[table["site"] == "head"]
    position = heads["position"].iloc[0]
    heads = heads[heads["position"] == position]
    method = heads.groupby("method")["auroc_mean"].mean().idxmax()
    grid = heads[heads["method"] == method].pivot_table(index="layer", columns="head", values="auroc_mean")

    height = min(9.0, max(4.5, 2 + 0.22 * grid.shape[0]))
    fig, ax = _figure(height=height)
    im = ax.imshow(grid.values, aspect="auto", cmap="viridis", vmin=0.5, vmax=1.0, origin="lower")
    step = tick_step(grid.shape[1], 0.8 * FIGURE_WIDTH_PX)
    ax.set_xticks(range(0, grid.shape[1], step), list(grid.columns)[::step])
    step = tick_step(grid.shape[0], CSS_PX_PER_INCH * height - 150)
    ax.set_yticks(range(0, grid.shape[0], step), list(grid.index)[::step])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"{title} head AUROC ({method} @ {position})".strip())
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def plot_transfer(table: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Train family (rows) x test family (columns) AUROC, annotated; diagonal is CV."""
    names = list(dict.fromkeys(list(table["train"]) + list(table["test"])))
    grid = table.pivot_table(index="train", columns="test", values="auroc").reindex(index=names, columns=names)
    fig, ax = _figure(height=min(10.0, 3 + 0.6 * len(names)))
    im = ax.imshow(grid.values, cmap="coolwarm", vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(len(names)):
        for j in range(len(names)):
            v = grid.values[i, j]
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("test family")
    ax.set_ylabel("train family")
    row = table.iloc[0]
    where = f"{row['site']} L{row['layer']}" + ("" if pd.isna(row["head"]) else f" H{row['head']}")
    ax.set_title(f"{title} transfer AUROC\n{row['method']} probe, {where} @ {row['position']}".strip())
    fig.colorbar(im, ax=ax)
    return _save(fig, path)
