"""Patching results: one tidy row per (site, layer, head, position, pair), and per-cell means."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from ..prompts.contrast import ContrastSet
from .plan import Cell, Sides, position_names

COLUMNS = [
    "site", "layer", "head", "position", "from_end", "position_name", "token", "pair", "row",
    "patched", "clean", "corrupt", "metric", "computed",
]
CELL_KEYS = ["site", "layer", "head", "from_end"]


@dataclass
class PatchResult:
    """A patching sweep: ``frame`` has one row per cell and pair.

    ``patched``, ``clean`` and ``corrupt`` are raw behavior metrics (logit differences);
    ``metric`` is ``(patched - base) / (source - base)`` where the base is the side that ran
    (corrupt when denoising, clean when noising): 0 = no effect, 1 = fully the source side.
    ``computed`` is False for cells skipped as provable no-ops (positions before the first
    token where the sides differ: their activations are identical), whose metric is exactly 0.
    """

    frame: pd.DataFrame
    site: str
    direction: str
    clean: str
    method: str = "exact"

    def means(self) -> pd.DataFrame:
        """Mean over pairs per cell (positions keyed by distance from the end, ``from_end``).

        ``metric`` is the mean of per-pair normalized metrics; ``metric_pooled`` normalizes
        the mean raw change by the mean clean-corrupt gap (steadier when a gap is small).
        """
        f = self.frame
        base, source = ("corrupt", "clean") if self.direction == "denoise" else ("clean", "corrupt")
        g = f.groupby(CELL_KEYS, dropna=False, sort=True)
        out = g.agg(
            metric=("metric", "mean"),
            patched=("patched", "mean"),
            base=(base, "mean"),
            source=(source, "mean"),
            pairs=("pair", "nunique"),
            position=("position", "max"),
            position_name=("position_name", _mode),
            token=("token", _mode),
        ).reset_index()
        out["metric_pooled"] = (out["patched"] - out["base"]) / (out["source"] - out["base"])
        return out.drop(columns=["base", "source"])

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` cells with the largest mean |metric|."""
        m = self.means()
        return m.reindex(m["metric"].abs().sort_values(ascending=False).index).head(k)


def _mode(values: pd.Series) -> str:
    values = values.fillna("")
    counts = values.value_counts()
    if counts.empty:
        return ""
    return str(counts.index[0]) + ("*" if len(counts) > 1 else "")


def build_frame(
    model,
    cset: ContrastSet,
    site: str,
    sides: Sides,
    cells: list[Cell],
    patched: list[float],
    metrics: dict[str, list[float]],
    computed: list[bool],
) -> pd.DataFrame:
    """The tidy table of a sweep from its cells and their patched metrics."""
    tok = model.tokenizer
    names = {}
    rows = []
    for cell, value, done in zip(cells, patched, computed):
        p = cset[cell.pair]
        if cell.pair not in names:
            names[cell.pair] = position_names(cset, cell.pair, sides.base)
        base_ids, source_ids = p.tokens[sides.base], p.tokens[sides.source]
        if len(cell.positions) == 1:
            j = cell.positions[0]
            a, b = tok.decode([base_ids[j]]), tok.decode([source_ids[j]])
            token = a if a == b else f"{a}|{b}"
            name = cell.name or names[cell.pair].get(j, "")
            from_end = j - (len(base_ids) - 1)
        else:
            token, name, from_end = "", cell.name or "all", 0
        clean, corrupt = metrics[sides.clean][cell.pair], metrics[sides.corrupt][cell.pair]
        base, source = metrics[sides.base][cell.pair], metrics[sides.source][cell.pair]
        rows.append({
            "site": site,
            "layer": cell.layer,
            "head": cell.head,
            "position": cell.position,
            "from_end": from_end,
            "position_name": name,
            "token": token,
            "pair": cell.pair,
            "row": p.row,
            "patched": value,
            "clean": clean,
            "corrupt": corrupt,
            "metric": 0.0 if not done else (value - base) / (source - base),
            "computed": done,
        })
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame["head"] = frame["head"].astype("Int64")
    return frame
