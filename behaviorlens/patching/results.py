"""Patching results: one tidy row per (site, layer, head, position, pair), and per-cell figures.

A cell's value is a ratio of means over pairs: the summed change of the behavior metric divided
by the summed gap between the two sides, ``sum(patched - base) / sum(source - base)``. Pairs
are never normalized one by one (a pair whose two sides barely differ would divide by nearly
zero and dominate). Each cell carries a bootstrap CI over pairs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import BehaviorLensError
from ..prompts.contrast import ContrastSet
from .plan import Cell, Sides, position_names

COLUMNS = [
    "site", "layer", "head", "position", "from_end", "position_name", "token", "pair", "row",
    "patched", "clean", "corrupt", "effect", "gap", "computed",
]
CELL_KEYS = ["site", "layer", "head", "from_end"]
N_BOOT = 1000


@dataclass
class PatchResult:
    """A patching sweep: ``frame`` has one row per cell and pair.

    ``patched``, ``clean`` and ``corrupt`` are raw behavior metrics; ``effect`` is
    ``patched - base`` and ``gap`` is ``source - base``, where the base is the side that ran
    (corrupt when denoising, clean when noising). ``computed`` is False for cells skipped as
    provable no-ops (positions before the first token where the sides differ: their activations
    are identical), whose effect is exactly 0. :meth:`means` gives each cell's value: 0 = no
    effect, 1 = fully the source side.
    """

    frame: pd.DataFrame
    site: str
    direction: str
    clean: str
    method: str = "exact"

    def _matrices(self) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
        """Cells (one row each) and their effect and gap per pair ([cells, pairs], 0 where absent)."""
        f = self.frame
        cells = f.groupby(CELL_KEYS, dropna=False, sort=True).ngroup()
        pairs = f["pair"].to_numpy()
        n_cells, n_pairs = int(cells.max()) + 1, int(pairs.max()) + 1
        effect, gap = np.zeros((n_cells, n_pairs)), np.zeros((n_cells, n_pairs))
        effect[cells, pairs] = f["effect"].to_numpy()
        gap[cells, pairs] = f["gap"].to_numpy()
        return f.assign(cell=cells.to_numpy()), effect, gap

    def bootstrap(self, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
        """Cell values over bootstrap resamples of the pairs: [n_boot, cells] (cells as in :meth:`means`)."""
        _, effect, gap = self._matrices()
        draws = np.random.default_rng(seed).integers(0, effect.shape[1], size=(n_boot, effect.shape[1]))
        weights = np.stack([np.bincount(d, minlength=effect.shape[1]) for d in draws]).T  # [pairs, n_boot]
        with np.errstate(divide="ignore", invalid="ignore"):
            return ((effect @ weights) / (gap @ weights)).T

    def means(self, n_boot: int = N_BOOT, seed: int = 0) -> pd.DataFrame:
        """One row per cell (positions keyed by distance from the end, ``from_end``).

        ``metric`` is the ratio of means over pairs; ``metric_ci_low``/``_high`` its bootstrap
        95% CI over pairs; ``significant`` whether that CI excludes 0; ``patched``, ``base`` and
        ``source`` the mean raw metrics.
        """
        f, effect, gap = self._matrices()
        g = f.groupby("cell", sort=True)
        out = g.agg(
            site=("site", "first"), layer=("layer", "first"), head=("head", "first"),
            from_end=("from_end", "first"), patched=("patched", "mean"), pairs=("pair", "nunique"),
            position=("position", "max"), position_name=("position_name", _mode), token=("token", _mode),
        ).reset_index(drop=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            out.insert(4, "metric", effect.sum(1) / gap.sum(1))
        boot = self.bootstrap(n_boot, seed)
        out["metric_ci_low"] = np.nanquantile(boot, 0.025, axis=0)
        out["metric_ci_high"] = np.nanquantile(boot, 0.975, axis=0)
        out["significant"] = (out["metric_ci_low"] > 0) | (out["metric_ci_high"] < 0)
        out["head"] = out["head"].astype("Int64")
        return out

    def carriers(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` cells that carry the behavior most: largest positive value."""
        m = self.means()
        return m[m["metric"] > 0].sort_values("metric", ascending=False).head(k)

    def opposers(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` cells that oppose it most: most negative value."""
        m = self.means()
        return m[m["metric"] < 0].sort_values("metric").head(k)

    def top_k_stability(self, k: int = 5, n_boot: int = N_BOOT, seed: int = 0) -> float:
        """Mean share of the top-``k`` carrying cells that stay in the top ``k`` when the pairs are
        resampled (1 = the same cells every time)."""
        values = self.means()["metric"].to_numpy()
        k = min(k, int(np.isfinite(values).sum()))
        if k == 0:
            return float("nan")
        top = set(np.argsort(-np.nan_to_num(values, nan=-np.inf))[:k])
        boot = np.nan_to_num(self.bootstrap(n_boot, seed), nan=-np.inf)
        overlap = [len(top & set(np.argsort(-b)[:k])) / k for b in boot]
        return float(np.mean(overlap))


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
            "effect": value - base if done else 0.0,
            "gap": source - base,
            "computed": done,
        })
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame["head"] = frame["head"].astype("Int64")
    return frame


# -- what the patching stage hands on ----------------------------------------------------------

CELLS_CSV = "patching.csv"  # one row per cell and pair (PatchResult.frame)
MEANS_CSV = "patching_means.csv"  # one row per cell (PatchResult.means())
SUMMARY_JSON = "summary.json"
STEP_RESID, STEP_HEADS = "resid", "heads"  # the experiment step's exact runs: the site, every head
STEP_EXACT = (STEP_HEADS, STEP_RESID)  # in the order they are handed on
STEP_ATTRIBUTION = "attribution"  # the step's attribution run: checked against exact, not handed on


@dataclass
class PatchEvidence:
    """What a later stage learns from patching: every cell's value (one row per cell: site,
    layer, head, from_end, metric, ...) and the training family's rows they were computed on."""

    cells: pd.DataFrame
    rows: set[int]

    def head_effects(self) -> dict[tuple[int, int], float]:
        """Each head's value at the last position: {(layer, head): metric}."""
        heads = self.cells[(self.cells.site == "head")]
        return {(int(r.layer), int(r["head"])): float(r.metric) for _, r in heads.iterrows() if int(r.from_end) == 0}

    def head_table(self) -> pd.DataFrame:
        """Heads at the last position that carry the behavior, strongest first."""
        c = self.cells
        heads = c[(c.site == "head") & (c.from_end == 0) & (c.metric > 0)]
        return heads.sort_values("metric", ascending=False).reset_index(drop=True)

    def arrival_layer(self) -> int | None:
        """The residual layer (resid_post index) from which the last token holds >= 80% of the
        behavior's patching effect; None where no last-token residual cell carries any."""
        c = self.cells
        resid = c[c.site.isin(["resid_pre", "resid_post"]) & (c.from_end == 0)].sort_values("layer")
        if resid.empty or not resid.metric.max() > 0:
            return None
        row = resid[resid.metric >= 0.8 * resid.metric.max()].iloc[0]
        return int(row.layer) - (1 if row.site == "resid_pre" and int(row.layer) > 0 else 0)


@dataclass
class PatchRun:
    """A finished :func:`~.run.run_patch` folder: its cell means, the rows it patched, its summary."""

    path: Path

    @staticmethod
    def holds(folder: str | Path) -> bool:
        return (Path(folder) / MEANS_CSV).is_file()

    @classmethod
    def load(cls, folder: str | Path) -> PatchRun:
        if not cls.holds(folder):
            raise BehaviorLensError(f"no patching result in {folder} (expected {MEANS_CSV})")
        return cls(Path(folder))

    def means(self) -> pd.DataFrame:
        return pd.read_csv(self.path / MEANS_CSV)

    def rows(self) -> set[int]:
        """The training family's rows that were patched (none known without ``patching.csv``)."""
        if not (self.path / CELLS_CSV).is_file():
            return set()
        return set(pd.read_csv(self.path / CELLS_CSV, usecols=["row"])["row"].astype(int))

    def summary(self) -> dict:
        return json.loads((self.path / SUMMARY_JSON).read_text())


@dataclass
class PatchStepResult:
    """The experiment's patch step folder: exact runs (``resid/``, ``heads/``) and ``attribution/``."""

    path: Path

    @classmethod
    def load(cls, folder: str | Path) -> PatchStepResult:
        return cls(Path(folder))

    def exact_runs(self) -> list[PatchRun]:
        """The finished exact runs, in hand-over order (none when the step did not run)."""
        return [PatchRun(self.path / name) for name in STEP_EXACT if PatchRun.holds(self.path / name)]

    def evidence(self) -> PatchEvidence | None:
        """The exact runs' cells for a later stage, or None when there are none."""
        runs = self.exact_runs()
        return evidence_of(runs) if runs else None


def patch_runs(folders: Iterable[str | Path]) -> list[PatchRun]:
    """Patching runs named by folder: a :func:`~.run.run_patch` folder, or an experiment's patch
    step folder (its exact runs)."""
    runs: list[PatchRun] = []
    for folder in folders:
        step = PatchStepResult.load(folder).exact_runs()
        runs.extend(step if step and not PatchRun.holds(folder) else [PatchRun.load(folder)])
    return runs


def evidence_of(runs: Iterable[PatchRun]) -> PatchEvidence:
    """The cells of several patching runs (e.g. heads and the residual stream) in one table."""
    cells, rows = [], set()
    for run in runs:
        cells.append(run.means())
        rows |= run.rows()
    if not cells:
        raise BehaviorLensError("no patching result to hand on")
    table = pd.concat(cells, ignore_index=True)
    missing = [c for c in ("site", "layer", "head", "from_end", "metric") if c not in table.columns]
    if missing:
        raise BehaviorLensError(f"patching table lacks columns {missing}")
    return PatchEvidence(table, rows)
