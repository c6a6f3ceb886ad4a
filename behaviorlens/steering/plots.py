"""Dose-response plot: behavior and side effects against the multiplier, read from the table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def dose_response(frame: pd.DataFrame, path: str | Path) -> Path:
    """Shift removed and neutral KL vs multiplier, one line per layer, random control dashed."""
    from ..analysis.plots import plt, save_figure

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, (layer, rows) in enumerate(frame.groupby("layer")):
        rows = rows.sort_values("multiplier")
        color = f"C{i % 10}"
        for ax, col in zip(axes, ("shift_removed_fraction", "neutral_kl")):
            ax.plot(rows.multiplier, rows[col], "o-", color=color, label=f"layer {layer}")
            if f"random_{col}" in rows:
                ax.plot(rows.multiplier, rows[f"random_{col}"], "o--", color=color, alpha=0.6,
                        label=f"layer {layer} random")
    axes[0].set_ylabel("fraction of behavior shift removed")
    axes[1].set_ylabel("neutral KL (nats/token)")
    for ax in axes:
        ax.set_xlabel("multiplier")
        ax.axhline(0, color="grey", lw=0.5)
        ax.legend(fontsize=7)
    kind = frame["kind"].iloc[0] if len(frame) else ""
    fig.suptitle(f"dose response ({kind}); dashed: random control")
    return save_figure(fig, path)
