"""Plots of a circuit run, read from its tables (never recomputed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..figures import (
    CSS_PX_PER_INCH,
    FIGURE_WIDTH_PX,
    new_figure,
    save_figure,
    tick_step,
    wrap,
)
from .graph import Graph

PORT_COLORS = {"q": "tab:blue", "k": "tab:green", "v": "tab:orange", "mlp": "tab:gray", "logits": "black"}


def faithfulness_curve(curve: pd.DataFrame, controls: pd.DataFrame, path: str | Path, keep: float,
                       chosen: int, title: str = "") -> Path:
    """Faithfulness over circuit size (selection and held-out pairs, CI bands), with the random
    circuits and the complement at the chosen size."""
    fig, ax = new_figure(height=5.5)
    for (label, family), c in curve.groupby(["pairs", "family"], sort=False):
        c = c.sort_values("edges_fraction")
        line, = ax.plot(c["edges_fraction"], c["faithfulness"], marker="o", ms=3, label=f"{family}: {label}")
        ax.fill_between(c["edges_fraction"], c["ci_low"], c["ci_high"], color=line.get_color(), alpha=0.15)
    total = curve["edges"].max() / curve["edges_fraction"].max()
    at = chosen / total
    for name, marker in (("random", "x"), ("complement", "s")):
        rows = controls[controls["circuit"].str.startswith(name)]
        for family, r in rows.groupby("family", sort=False):
            x = (r["edges"] / total) if name == "complement" else np.full(len(r), at)
            ax.scatter(x, r["faithfulness"], marker=marker, color="black", s=25, zorder=3,
                       label=f"{name} ({family})" if family == rows["family"].iloc[0] else None)
    ax.axhline(keep, ls=":", color="grey", lw=1)
    ax.axvline(at, ls="--", color="grey", lw=1)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("circuit size (fraction of edges, top by |attribution|)")
    ax.set_ylabel("faithfulness (share of the behavior kept)")
    ax.set_title(wrap(title, 0.7))
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
    return save_figure(fig, path)


def _node_xy(g: Graph, name: str) -> tuple[float, float]:
    """Where a node or port's node sits: x = head (MLP right of the heads), y = layer."""
    if name == "input":
        return (g.n_heads - 1) / 2, -1.0
    if name == "logits":
        return (g.n_heads - 1) / 2, float(g.n_layers)
    if name.endswith(".mlp"):
        return g.n_heads + 0.5, float(name[1:].split(".")[0])
    if "KV" in name:  # a key/value head: between the query heads that read it
        L, kv = name[1:].split("KV")
        per = g.n_heads // g.n_kv
        return int(kv) * per + (per - 1) / 2, float(L)
    L, h = name[1:].split("H")
    return float(h), float(L)


def circuit_graph(edges: pd.DataFrame, g: Graph, path: str | Path, title: str = "") -> Path:
    """Layers as rows, heads and MLPs as nodes; one line per circuit edge, width = |attribution|,
    colour = the port it enters (query, key, value, MLP, logits)."""
    height = min(14.0, max(5.0, 0.3 * (g.n_layers + 2) + 1.5))
    fig, ax = new_figure(height=height)
    xs, ys = np.meshgrid(np.arange(g.n_heads), np.arange(g.n_layers))
    ax.scatter(xs.ravel(), ys.ravel(), s=6, color="lightgrey", zorder=1)
    ax.scatter(np.full(g.n_layers, g.n_heads + 0.5), np.arange(g.n_layers), s=12, marker="s",
               color="lightgrey", zorder=1)
    top = float(edges["attribution"].abs().max() or 1.0)
    used = set()
    for _, e in edges.iterrows():
        port_node = e["port"].rsplit(".", 1)[0] if e["port"] != "logits" else "logits"
        if e["port"].endswith(".mlp"):
            port_node = e["port"]
        (x0, y0), (x1, y1) = _node_xy(g, e["upstream"]), _node_xy(g, port_node)
        kind = e["port_kind"]
        ax.plot([x0, x1], [y0, y1], color=PORT_COLORS.get(kind, "black"), alpha=0.7, zorder=2,
                lw=0.3 + 4 * abs(e["attribution"]) / top, ls="-" if e["attribution"] >= 0 else "--")
        used |= {e["upstream"], port_node}
    for name in used:
        x, y = _node_xy(g, name)
        ax.scatter([x], [y], s=30, color="black", zorder=3, marker="s" if "mlp" in name else "o")
        ax.annotate(name, (x, y), xytext=(3, 3), textcoords="offset points", zorder=4,
                    bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8})
    for kind, color in PORT_COLORS.items():
        ax.plot([], [], color=color, label=f"into {kind}")
    step = tick_step(g.n_heads + 1, 0.75 * FIGURE_WIDTH_PX)
    ax.set_xticks(list(range(0, g.n_heads, step)) + [g.n_heads + 0.5],
                  [f"H{h}" for h in range(0, g.n_heads, step)] + ["MLP"])
    layers = list(range(0, g.n_layers, tick_step(g.n_layers + 2, CSS_PX_PER_INCH * height - 150)))
    ax.set_yticks([-1] + layers + [g.n_layers], ["input"] + [f"L{L}" for L in layers] + ["logits"])
    drawn = f"{len(edges)} edge" + ("" if len(edges) == 1 else "s")
    ax.set_title(wrap(title + f" ({drawn}; dashed: negative attribution)", 0.75))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, path)


def composition_plot(table: pd.DataFrame, null: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Q-, K-, V-composition of the circuit's head pairs beside the random-pair null."""
    fig, axes = new_figure(1, 3, height=4.8, sharey=True)
    for ax, kind in zip(axes, ("q_comp", "k_comp", "v_comp")):
        ax.hist(null[kind], bins=30, color="lightgrey", density=True, label="random head pairs")
        for _, r in table.nlargest(5, kind).iterrows():
            ax.axvline(r[kind], color="tab:red", lw=1)
            ax.annotate(f"{r['upstream']}>{r['downstream']}", (r[kind], 0), rotation=90,
                        xytext=(1, 2), textcoords="offset points")
        if len(table):
            ax.plot(table[kind], np.zeros(len(table)), "|", color="tab:red", ms=10, label="circuit pairs")
        ax.set_title(kind.replace("_comp", "-composition"))
    axes[0].legend()
    fig.suptitle(wrap(title))
    return save_figure(fig, path)


def head_figures_plot(figures: pd.DataFrame, heads: list[str], path: str | Path, title: str = "") -> Path:
    """OV copy score and attention to the claim of every head (grey) and the circuit's (red)."""
    fig, axes = new_figure(1, 2, height=5.2)
    mine = figures["head"].isin(heads)
    for ax, col, label in ((axes[0], "ov_copy", "OV copy score of the claimed answer (z over vocab)"),
                           (axes[1], "attn_to_claim", "attention from the answer to the claim")):
        ax.scatter(figures.loc[~mine, "layer"], figures.loc[~mine, col], s=6, color="lightgrey",
                   label="every other head (null)")
        ax.scatter(figures.loc[mine, "layer"], figures.loc[mine, col], s=14, color="tab:red", label="circuit heads")
        for _, r in figures[mine].nlargest(4, col).iterrows():
            ax.annotate(r["head"], (r["layer"], r[col]), xytext=(2, 2), textcoords="offset points")
        ax.set_xlabel("layer")
        ax.set_title(wrap(label, 0.45))
    axes[0].legend()
    fig.suptitle(wrap(title))
    return save_figure(fig, path)


def transfer_plot(matrix: pd.DataFrame, overlap: pd.DataFrame, circuits: list[str], families: list[str],
                  path: str | Path, title: str = "") -> Path:
    """Left: each circuit (rows) on each family (columns), faithfulness with its CI and the random
    circuits of the row's size in each cell. Right: weighted Jaccard overlap of the family circuits."""
    named = sorted(set(overlap["circuit"])) if len(overlap) else []
    named = [c for c in circuits if c in named]
    fig, axes = new_figure(1, 2, height=1.2 + 0.9 * len(circuits), width_ratios=[len(families) + 1, len(named) + 1])
    ax = axes[0]
    grid = np.full((len(circuits), len(families)), np.nan)
    for i, c in enumerate(circuits):
        for j, f in enumerate(families):
            cell = matrix[(matrix["circuit"] == c) & (matrix["family"] == f)]
            if len(cell):
                r = cell.iloc[0]
                grid[i, j] = r["faithfulness"]
                text = f"{r['faithfulness']:.2f}\n[{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
                if "random_faithfulness" in r and np.isfinite(r["random_faithfulness"]):
                    text += f"\nrandom {r['random_faithfulness']:.2f}"
                ax.text(j, i, text, ha="center", va="center", color="black")
    image = ax.imshow(np.clip(grid, -0.2, 1.2), cmap="RdYlGn", vmin=-0.2, vmax=1.2, aspect="auto", alpha=0.7)
    ax.set_xticks(range(len(families)), [wrap(f, 0.6 / max(1, len(families))) for f in families])
    ax.set_yticks(range(len(circuits)), [f"{c} ({int(_edges(matrix, c))})" for c in circuits])
    ax.set_xlabel("family scored (held-out pairs)")
    ax.set_ylabel("circuit (edges)")
    fig.colorbar(image, ax=ax, label="faithfulness", shrink=0.8)
    ax2 = axes[1]
    if named:
        w = np.eye(len(named))
        for _, r in overlap.iterrows():
            if r["circuit"] in named and r["other"] in named:
                w[named.index(r["circuit"]), named.index(r["other"])] = r["weighted_jaccard"]
        ax2.imshow(w, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(named)):
            for j in range(len(named)):
                ax2.text(j, i, f"{w[i, j]:.2f}", ha="center", va="center",
                         color="white" if w[i, j] > 0.6 else "black")
        ax2.set_xticks(range(len(named)), [wrap(n, 0.3 / len(named)) for n in named])
        ax2.set_yticks(range(len(named)), named)
    ax2.set_title(wrap("edge overlap (Jaccard weighted by attribution)", 0.3))
    fig.suptitle(wrap(title))
    return save_figure(fig, path)


def _edges(matrix: pd.DataFrame, circuit: str) -> int:
    return int(matrix.loc[matrix["circuit"] == circuit, "edges"].iloc[0])
