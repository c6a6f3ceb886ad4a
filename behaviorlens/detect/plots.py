"""The detector's plots; each reads a table the stage wrote and recomputes nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..figures import new_figure, save_figure

COLORS = {"lie": "#c0392b", "honest": "#2e86c1", "mistake": "#f39c12", "unsure": "#95a5a6", "unlabelled": "#7f8c8d"}


def plot_sweep(sweep: pd.DataFrame, path: str | Path) -> Path:
    """Cross-validated lie-vs-honest AUROC per layer, one line per position and method, with the
    shuffled-label control dotted."""
    fig, ax = new_figure(height=5.0)
    for (pos, method), part in sweep.groupby(["position", "method"]):
        part = part.sort_values("layer")
        line, = ax.plot(part["layer"], part["auroc_mean"], label=f"{pos} / {method}")
        ax.plot(part["layer"], part["control_auroc"], ls=":", color=line.get_color(), lw=0.8)
    ax.axhline(0.5, color="black", lw=0.6)
    ax.set_xlabel("layer (resid_post)")
    ax.set_ylabel("AUROC lie vs honest")
    ax.set_title("cross-validated by pair blocks; dotted: shuffled labels")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
    return save_figure(fig, path)


def plot_scores(scores: pd.DataFrame, threshold: float, path: str | Path) -> Path:
    """Each example's detector score by family and label; the chat threshold as a line."""
    families = list(dict.fromkeys(scores["family"]))
    fig, ax = new_figure(height=4.8)
    rng, seen = np.random.default_rng(0), set()
    for i, family in enumerate(families):
        part = scores[scores["family"] == family]
        for j, label in enumerate(["honest", "lie", "mistake", "unlabelled"]):
            s = part.loc[part["label"] == label, "score"]
            if len(s):
                x = i + (j - 1.5) * 0.18 + rng.uniform(-0.05, 0.05, len(s))
                ax.scatter(x, s, s=12, color=COLORS[label], label=None if label in seen else label)
                seen.add(label)
    if np.isfinite(threshold):
        ax.axhline(threshold, color="black", ls="--", lw=0.8, label="threshold (1% of ordinary chat)")
    ax.set_xticks(range(len(families)), families, rotation=20 if len(families) > 5 else 0,
                  ha="right" if len(families) > 5 else "center")
    ax.set_ylabel("detector score")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
    return save_figure(fig, path)


def plot_transfer(matrix: pd.DataFrame, path: str | Path) -> Path:
    """Heatmaps, rows = family trained on, columns = family tested on: lie-vs-honest AUROC, and
    below it lie-vs-mistake AUROC where the matrix has any."""
    panels = [("auroc", "lie vs honest")]
    if "lie_vs_mistake_auroc" in matrix and matrix["lie_vs_mistake_auroc"].notna().any():
        panels.append(("lie_vs_mistake_auroc", "lie vs mistake"))
    trained = matrix.groupby("train")["auroc"].transform(lambda a: a.notna().any())
    if trained.any():
        matrix = matrix[trained]  # the rows of families that had enough examples to train on
    rows = matrix["train"].nunique()
    fig, axes = new_figure(len(panels), 1, height=min(10.0, 0.5 * rows + 3.6) * len(panels), squeeze=False)
    kinds = [k for k in ("n_lie", "n_honest", "n_mistake") if k in matrix]
    counts = matrix.dropna(subset=kinds).drop_duplicates("test").set_index("test") if kinds else None
    for ax, (column, title) in zip(axes[:, 0], panels):
        table = matrix.pivot(index="train", columns="test", values=column)
        im = ax.imshow(table.to_numpy(dtype=float), vmin=0, vmax=1, cmap="RdBu_r", aspect="auto")
        names = [f"{c} ({'/'.join(str(int(counts.at[c, k])) for k in kinds)})"
                 if counts is not None and c in counts.index else str(c) for c in table.columns]
        ax.set_xticks(range(table.shape[1]), names, rotation=35, ha="right")
        ax.set_yticks(range(table.shape[0]), table.index)
        for i in range(table.shape[0]):
            for j in range(table.shape[1]):
                v = table.iat[i, j]
                ax.text(j, i, "–" if pd.isna(v) else f"{v:.2f}", ha="center", va="center")
        ax.set_xlabel("tested on" + (f" ({' / '.join(k[2:] for k in kinds)})" if kinds else ""))
        ax.set_ylabel("trained on")
        diagonal = [table.at[t, t] for t in table.index if t in table.columns]
        scored = column == "auroc" and any(pd.notna(v) for v in diagonal)
        ax.set_title(f"{title} AUROC" + (" (diagonal: nested CV)" if scored else " (diagonal: the training family, not scored)"))
        fig.colorbar(im, ax=ax, fraction=0.04)
    return save_figure(fig, path)


def plot_lens_trace(trace: pd.DataFrame, path: str | Path) -> Path:
    """One panel per label (one example each): the given answer's log-probability under the lens
    at every layer beside the best alternative's (the last layer's top tokens after it)."""
    labels = list(dict.fromkeys(trace["label"]))
    fig, axes = new_figure(1, len(labels), height=4.2, sharey=True, squeeze=False)
    for ax, label in zip(axes[0], labels):
        part = trace[trace["label"] == label].sort_values("layer")
        first = part.iloc[0]
        ax.plot(part["layer"], part["logp_given"], color=COLORS[label], label=f"given:{first['given']!r}")
        ax.plot(part["layer"], part["logp_alternative"], color="black", ls="--", lw=0.9,
                label=f"best alternative (last layer: {first['alternative']!r})")
        ax.set_title(f"{label}: {first['family']} row {first['row']}")
        ax.set_xlabel(f"layer ({first['lens']} lens, resid_post)")
        ax.legend(loc="lower right")
    axes[0][0].set_ylabel("log-probability at the answer's position")
    return save_figure(fig, path)


def plot_confidence(mistakes: pd.DataFrame, path: str | Path) -> Path:
    """The model's unpressured confidence in each mistake's wrong answer (p between the two answers)."""
    fig, ax = new_figure(height=3.6)
    ax.hist(mistakes["confidence_unpressured"], bins=np.linspace(0.5, 1.0, 11), color=COLORS["mistake"],
            edgecolor="white")
    ax.set_xlabel("p(wrong answer) without pressure")
    ax.set_ylabel("mistakes")
    ax.set_title(f"{len(mistakes)} mistakes: uncertain (near 0.6) or confident (near 1)")
    return save_figure(fig, path)
