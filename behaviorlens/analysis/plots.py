"""Plots shared across stages. Every plot reads a stage's table; none recomputes numbers."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from ..io import atomic_write


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    """Lay out a figure, write it as PNG atomically and close it (every stage's plots end here)."""
    fig.tight_layout()
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return out


def plot_shifts(table: pd.DataFrame, path: str | Path) -> Path:
    """Behavior shift per family with its 95% bootstrap interval (reads measure's shifts table)."""
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(table)), 3.2))
    y = table["behavior_shift"]
    err = [y - table["ci_low"], table["ci_high"] - y]
    colors = ["#c0392b" if v > 0 else "#7f8c8d" for v in y]
    ax.bar(table["family"], y, yerr=err, color=colors, capsize=4)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel("behavior shift (logits)")
    ax.set_title("metric(positive) - metric(negative), 95% CI over pairs")
    ax.tick_params(axis="x", rotation=30)
    return save_figure(fig, path)
