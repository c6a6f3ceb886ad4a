"""Steering plots, read from the stage's tables: dose response, and the candidates' Pareto view."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..figures import new_figure, save_figure, wrap


def dose_response(frame: pd.DataFrame, path: str | Path) -> Path:
    """Pressure removed and neutral KL vs strength, one line per layer, random control dashed
    (without a neutral side: the shift removed)."""
    removed = "pressure_removed_fraction" if frame["pressure_removed_fraction"].notna().any() else "shift_removed_fraction"
    fig, axes = new_figure(1, 2, height=5.0)
    for i, (layer, rows) in enumerate(frame.groupby("layer")):
        rows = rows.sort_values("strength")
        color = f"C{i % 10}"
        for ax, col in zip(axes, (removed, "neutral_kl")):
            ax.plot(rows.strength, rows[col], "o-", color=color, label=f"layer {layer}")
            if f"random_{col}" in rows:
                ax.plot(rows.strength, rows[f"random_{col}"], "o--", color=color, alpha=0.6,
                        label=f"layer {layer} random")
    axes[0].set_ylabel(removed.replace("_", " "))
    axes[1].set_ylabel("neutral KL (nats/token)")
    for ax in axes:
        ax.set_xlabel("strength")
        ax.axhline(0, color="grey", lw=0.5)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(handles)))
    kind = frame["kind"].iloc[0] if len(frame) else ""
    fig.suptitle(f"dose response ({kind}); dashed: random control")
    return save_figure(fig, path)


def pareto(candidates: pd.DataFrame, path: str | Path, kl_max: float, max_accuracy_drop: float) -> Path:
    """Pressure removed per candidate against what it costs: left, the worse of the no-pressure
    and factual accuracy changes; right, the worse of the context-use and claim-recall accuracy
    changes (marker size: neutral KL; hollow: outside the limits; star: chosen; grey crosses: each
    candidate's random control, at its no-pressure accuracy change)."""
    axes_columns = [(("accuracy_neutral_change", "factual_accuracy_change"),
                     "no-pressure accuracy change, worse of neutral side and factual control (points)"),
                    (("context_use_accuracy_change", "claim_recall_accuracy_change"),
                     "context-use accuracy change, worse of context use and claim recall (points)")]
    axes_columns = [(cols, label) for cols, label in axes_columns if set(cols) <= set(candidates)]
    fig, axes = new_figure(1, len(axes_columns), height=6.5, squeeze=False)
    size = 30 + 3000 * candidates["neutral_kl"].clip(upper=0.2)
    y = candidates["pressure_removed_fraction"]
    for ax, (cols, label) in zip(axes[0], axes_columns):
        x = 100 * candidates[list(cols)].min(axis=1)
        for i, group in enumerate(sorted(candidates["group"].unique())):
            rows = candidates["group"] == group
            inside = rows & candidates["within_limits"]
            ax.scatter(x[inside], y[inside], s=size[inside], color=f"C{i % 10}", alpha=0.8, label=group)
            ax.scatter(x[rows & ~inside], y[rows & ~inside], s=size[rows & ~inside], facecolors="none",
                       edgecolors=f"C{i % 10}")
        if cols[0] == "accuracy_neutral_change":
            ax.scatter(100 * candidates["random_accuracy_neutral_change"], candidates["random_pressure_removed_fraction"],
                       s=15, color="grey", marker="x", label="random controls")
        if "chosen" in candidates and candidates["chosen"].any():
            chosen = candidates["chosen"]
            ax.scatter(x[chosen], y[chosen], s=250, marker="*", color="black", label="chosen")
        ax.axvline(-100 * max_accuracy_drop, color="grey", ls="--", lw=0.8)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel(wrap(label, 0.9 / len(axes_columns)))
        ax.set_ylabel("pressure removed (judging pairs)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        legend = fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(handles)),
                            scatterpoints=1)
        for handle in legend.legend_handles:  # one marker size in the legend, whatever each one's KL
            if hasattr(handle, "set_sizes"):
                handle.set_sizes([60])
    fig.suptitle(wrap(f"candidate edits: size = neutral KL, hollow = outside the limits (KL <= {kl_max:g}, each "
                      f"accuracy drop <= {100 * max_accuracy_drop:g} points, no collapse, |null| <= 15%)"))
    return save_figure(fig, path)
