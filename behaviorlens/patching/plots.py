"""Heatmaps of patching results, read from the result table (never recomputed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..figures import CSS_PX_PER_INCH, FIGURE_WIDTH_PX, new_figure, save_figure, tick_step, wrap


def _diverging(ax, grid: np.ndarray, xlabels: list[str], ylabels: list[str], title: str, fig,
               unsure: np.ndarray | None = None) -> None:
    """A diverging heatmap; cells where ``unsure`` (their CI includes 0) get a small grey dot.
    Tick labels at the body text size, thinned to what fits."""
    limit = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
    limit = limit or 1.0
    image = ax.imshow(grid, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto",
                      interpolation="nearest", origin="lower")
    if unsure is not None:
        ys, xs = np.nonzero(unsure & (np.abs(np.nan_to_num(grid)) > 0))
        ax.scatter(xs, ys, s=12, c="grey", marker=".", linewidths=0)
        title += " (dot: 95% CI over pairs includes 0)"
    step = tick_step(len(xlabels), 0.75 * FIGURE_WIDTH_PX)
    ax.set_xticks(range(0, len(xlabels), step), xlabels[::step], rotation=90)
    step = tick_step(len(ylabels), CSS_PX_PER_INCH * fig.get_figheight() - 200)
    ax.set_yticks(range(0, len(ylabels), step), ylabels[::step])
    ax.set_title(wrap(title, 0.85))
    fig.colorbar(image, ax=ax, label="patching metric\n(0 = no effect, 1 = source)")


def position_heatmap(means: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Layer x position heatmap of the cell values, token strings on the x axis.

    Positions are keyed by distance from the end (``from_end``), so pairs of different
    lengths line up at the answer; columns that are zero for every layer (before the first
    difference) are dropped to keep the plot readable.
    """
    grid = means.pivot_table(index="layer", columns="from_end", values="metric", aggfunc="mean")
    keep = [c for c in grid.columns if (grid[c].abs() > 0).any()] or list(grid.columns)
    grid = grid[keep]
    unsure = ~means.pivot_table(index="layer", columns="from_end", values="significant", aggfunc="all")[keep]
    labels = means.drop_duplicates("from_end").set_index("from_end")["token"]
    xlabels = [repr(str(labels.get(c, "")))[1:-1] for c in grid.columns]
    fig, ax = new_figure(height=_height(len(grid)))
    _diverging(ax, grid.to_numpy(float), xlabels, [str(i) for i in grid.index], title, fig,
               unsure.to_numpy(bool))
    ax.set_xlabel("position (token)")
    ax.set_ylabel("layer")
    return save_figure(fig, path)


def head_heatmap(means: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Layer x head heatmap of the cell values, summed over the patched positions."""
    grid = means.pivot_table(index="layer", columns="head", values="metric", aggfunc="sum")
    unsure = ~means.pivot_table(index="layer", columns="head", values="significant", aggfunc="all")
    fig, ax = new_figure(height=_height(len(grid)))
    _diverging(ax, grid.to_numpy(float), [str(h) for h in grid.columns], [str(i) for i in grid.index],
               title, fig, unsure.to_numpy(bool))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    return save_figure(fig, path)


def _height(layers: int) -> float:
    """A heatmap's height (inches): room for the layer rows, the rotated token labels and the title."""
    return min(9.0, max(5.0, 0.22 * layers + 2.5))
