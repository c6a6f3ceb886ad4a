"""Steering plots, read from the stage's tables: dose response, and the candidates' Pareto view."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def dose_response(frame: pd.DataFrame, path: str | Path) -> Path:
    """Pressure removed and neutral KL vs multiplier, one line per layer, random control dashed
    (without a neutral side: the shift removed)."""
    from ..analysis.plots import plt, save_figure

    removed = "pressure_removed_fraction" if frame["pressure_removed_fraction"].notna().any() else "shift_removed_fraction"
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, (layer, rows) in enumerate(frame.groupby("layer")):
        rows = rows.sort_values("multiplier")
        color = f"C{i % 10}"
        for ax, col in zip(axes, (removed, "neutral_kl")):
            ax.plot(rows.multiplier, rows[col], "o-", color=color, label=f"layer {layer}")
            if f"random_{col}" in rows:
                ax.plot(rows.multiplier, rows[f"random_{col}"], "o--", color=color, alpha=0.6,
                        label=f"layer {layer} random")
    axes[0].set_ylabel(removed.replace("_", " "))
    axes[1].set_ylabel("neutral KL (nats/token)")
    for ax in axes:
        ax.set_xlabel("multiplier")
        ax.axhline(0, color="grey", lw=0.5)
        ax.legend(fontsize=7)
    kind = frame["kind"].iloc[0] if len(frame) else ""
    fig.suptitle(f"dose response ({kind}); dashed: random control")
    return save_figure(fig, path)


def pareto(candidates: pd.DataFrame, path: str | Path, kl_max: float, accuracy_drop_max: float) -> Path:
    """Pressure removed against no-pressure accuracy change per candidate (marker size: neutral
    KL; hollow: outside the limits; star: chosen), each with its random control in grey (whose
    accuracy change is that of the family's neutral side)."""
    from ..analysis.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(8, 5.5))
    x = 100 * candidates[["accuracy_neutral_change", "factual_accuracy_change"]].min(axis=1)
    xr = 100 * candidates["random_accuracy_neutral_change"]
    size = 30 + 3000 * candidates["neutral_kl"].clip(upper=0.2)
    for i, group in enumerate(sorted(candidates["group"].unique())):
        rows = candidates["group"] == group
        color = f"C{i % 10}"
        inside = rows & candidates["within_limits"]
        ax.scatter(x[inside], candidates.loc[inside, "pressure_removed_fraction"], s=size[inside], color=color,
                   alpha=0.8, label=group)
        ax.scatter(x[rows & ~inside], candidates.loc[rows & ~inside, "pressure_removed_fraction"],
                   s=size[rows & ~inside], facecolors="none", edgecolors=color)
    ax.scatter(xr, candidates["random_pressure_removed_fraction"], s=15, color="grey", marker="x",
               label="random controls")
    if "chosen" in candidates and candidates["chosen"].any():
        chosen = candidates["chosen"]
        ax.scatter(x[chosen], candidates.loc[chosen, "pressure_removed_fraction"], s=250, marker="*",
                   color="black", label="chosen")
    ax.axvline(-100 * accuracy_drop_max, color="grey", ls="--", lw=0.8)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("no-pressure accuracy change, worse of neutral side and factual control (points)")
    ax.set_ylabel("pressure removed (judging pairs)")
    ax.set_title(f"candidate edits: size = neutral KL, hollow = outside the limits (KL <= {kl_max:g}, "
                 f"accuracy drop <= {100 * accuracy_drop_max:g} points, no collapse)", fontsize=8)
    ax.legend(fontsize=7, loc="best")
    return save_figure(fig, path)
