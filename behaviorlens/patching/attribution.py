"""Attribution patching: a gradient estimate of every cell's patching effect, and its check.

The estimate of patching a cell is ``grad . (source - base activation)``, the first-order
change of the behavior metric. With ``steps=1`` the gradient is taken at the
base run (plain attribution patching). With ``steps=n > 1`` it is averaged over ``n`` runs whose layer-0
residual is interpolated from the base side to the source side at the midpoints
``(i + 1/2) / n`` (integrated-gradients style): every activation then moves along the path
from its base to its source value, and where a cell carries the whole difference (layer 0 at
the differing tokens) the estimate converges to the exact effect. Measured on the default
model and 8 pairs of capitals_opinion (bench/patching.py, ``resid_pre``, every cell) it raises
Pearson against exact patching from 0.957 to 0.996 at 2.3x the cost; on the 30 strongest
cells plain attribution is off by 0.38 on average (7 cells by more than a factor of two;
Pearson -0.38) and the 4-step estimate by 0.11 (none); so 4 steps is the default. Gradients run in eval mode
with the metric in float32, outside inference mode only for the gradient pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..batching import chunks
from ..interventions.trace import traced_gradients
from ..model import Model
from ..prompts.contrast import ContrastSet
from ..reads import reading
from ..scoring import Scoring
from ..stats import correlation
from .exact import run_cells, run_side
from .plan import Cell, check_site, default_positions, make_cells, resolve_sides
from .results import CELL_KEYS, PatchResult, build_frame

DEFAULT_STEPS = 4


def attribution_patch(
    model: Model,
    contrast_set: ContrastSet,
    site: str = "resid_pre",
    layers: Sequence[int] | None = None,
    positions: str | Sequence[str] | None = None,
    head_indices: Sequence[int] | None = None,
    clean: str = "positive",
    direction: str = "denoise",
    steps: int = DEFAULT_STEPS,
    pair_batch: int = 8,
    progress: bool = True,
) -> PatchResult:
    """Attribution-patching estimates for every layer x position (x head) of ``site``.

    Same table as :func:`patch`, with ``patched = base + estimate``. ``steps=1`` is plain
    attribution patching; more steps average the gradient along the base-to-source path.
    """
    contrast_set.require_aligned("attribution patching")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    sides = resolve_sides(clean, direction)
    layers, head_list = check_site(model, site, layers, head_indices)
    cells = make_cells(contrast_set, sides.base, layers, head_list, default_positions(site, positions))
    by_pair: dict[int, list[int]] = {}
    for k, c in enumerate(cells):
        by_pair.setdefault(c.pair, []).append(k)
    patched = [0.0] * len(cells)
    computed = [False] * len(cells)
    metrics = {sides.clean: [0.0] * len(contrast_set), sides.corrupt: [0.0] * len(contrast_set)}
    model.hf.eval()
    n = len(contrast_set)
    for chunk in tqdm(list(chunks(n, pair_batch)), desc=f"attribution {site}", disable=not progress):
        pairs = list(chunk)
        source = run_side(model, contrast_set, pairs, sides.source, site, layers, [0])
        base = run_side(model, contrast_set, pairs, sides.base, site, layers, [0])
        grads = _mean_gradients(model, base, site, layers, steps, base.resid[0], source.resid[0])
        for r, p in enumerate(pairs):
            metrics[sides.source][p] = float(source.metric[r])
            metrics[sides.base][p] = float(base.metric[r])
        # rows are scoring sequences; a pair's estimate sums those of its sequences
        estimates = {L: (grads[L] * (source.acts[L] - base.acts[L])).sum(-1) for L in layers}
        rows_of = {r: [s for s, q in enumerate(base.scoring.prompt_of) if q == r] for r in range(len(pairs))}
        for r, p in enumerate(pairs):
            first = contrast_set[p].first_difference()
            for k in by_pair.get(p, []):
                c = cells[k]
                est = sum(estimates[c.layer][s, [j + int(base.batch.offsets[s]) for j in c.positions]]
                          for s in rows_of[r])
                if c.head is not None:
                    est = est[:, c.head]
                if max(c.positions) < first:
                    patched[k] = metrics[sides.base][p]
                else:
                    patched[k] = metrics[sides.base][p] + float(est.sum())
                    computed[k] = True
    frame = build_frame(model, contrast_set, site, sides, cells, patched, metrics, computed)
    return PatchResult(frame, site, direction, clean, "attribution" if steps == 1 else f"attribution-ig{steps}")


def _mean_gradients(model: Model, base, site: str, layers: Sequence[int], steps: int,
                    base0: torch.Tensor, source0: torch.Tensor) -> dict[int, torch.Tensor]:
    """d metric / d site activation at every layer of the base run's sequences, averaged over
    the interpolation steps."""
    scoring: Scoring = base.scoring
    n = len(scoring.sequences)
    batch = model.batch(scoring.sequences * steps)
    repeated, _ = scoring.take(list(range(scoring.n_prompts)) * steps)
    cols = repeated.position + batch.offsets[repeated.sequence]
    alphas = torch.zeros(1) if steps == 1 else (torch.arange(steps) + 0.5) / steps
    alpha = alphas.repeat_interleave(n).to(base0.device, base0.dtype)[:, None, None]
    start = (base0.repeat(steps, 1, 1) + alpha * (source0 - base0).repeat(steps, 1, 1)).detach()

    if model.traced:
        grads = traced_gradients(model, batch, repeated.sequence, cols, repeated,
                                 [model.sites.ref(site, L) for L in layers], start)
        return _averaged(model, site, layers, grads, steps, n)

    def interpolate(module, args):
        return (start.clone().requires_grad_(True), *args[1:])

    block0 = model.sites.layers(model.hf)[0]
    handle = block0.register_forward_pre_hook(interpolate, prepend=True)
    try:
        with torch.enable_grad(), reading(model, site, layers, keep_grad=True) as live:
            metric = repeated.metric(model.logits_at(batch, repeated.sequence, cols, grad=True))
            tensors = [live[L] for L in layers]
            grads = torch.autograd.grad(metric.sum(), tensors, allow_unused=True)
    finally:
        handle.remove()
    return _averaged(model, site, layers, [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads)],
                     steps, n)


def _averaged(model: Model, site: str, layers: Sequence[int], grads: Sequence[torch.Tensor], steps: int, n: int,
              ) -> dict[int, torch.Tensor]:
    """Per layer, the gradients (heads split) averaged over the interpolation steps."""
    out = {}
    for L, g in zip(layers, grads):
        if site == "head":
            g = g.view(*g.shape[:-1], model.sites.n_heads, model.sites.head_dim)
        out[L] = g.detach().float().view(steps, n, *g.shape[1:]).mean(0)
    return out


# -- checking estimates against exact patching ----------------------------------------------


@dataclass
class Verification:
    """Exact patching of the top-k estimated cells: agreement and the cells it got wrong."""

    table: pd.DataFrame  # one row per verified cell: estimate, exact, ranks, wrong_sign, wrong
    pearson: float
    spearman: float
    pearson_pairs: float  # of the raw effects over every (cell, pair), not cell values
    mean_abs_error: float  # mean |estimate - exact| over the verified cells

    @property
    def wrong(self) -> pd.DataFrame:
        return self.table[self.table["wrong"]]


def verify_top_k(model: Model, contrast_set: ContrastSet, result: PatchResult, k: int = 20,
                 batch_size: int = 64, progress: bool = False) -> Verification:
    """Run exact patching on the ``k`` cells with the largest mean |estimate| and compare.

    A cell is *wrong* when the exact effect has the other sign or differs from the estimate
    by more than a factor of two (ranks among near-equal cells are noise, so they are reported
    but do not make a cell wrong).
    """
    sides = resolve_sides(result.clean, result.direction)
    means = result.means()
    top = means.reindex(means["metric"].abs().sort_values(ascending=False).index).head(k)
    cells = []
    for _, row in top.iterrows():
        head = None if pd.isna(row["head"]) else int(row["head"])
        for i, p in enumerate(contrast_set):
            j = len(p.tokens[sides.base]) - 1 + int(row["from_end"])
            if 0 <= j < len(p.tokens[sides.base]):
                cells.append(Cell(i, int(row["layer"]), (j,), head))
    patched, computed, metrics = run_cells(model, contrast_set, result.site, sides, cells,
                                           batch_size, progress=progress)
    exact = PatchResult(build_frame(model, contrast_set, result.site, sides, cells, patched,
                                    metrics, computed), result.site, result.direction, result.clean)
    table = top.merge(exact.means()[CELL_KEYS + ["metric"]], on=CELL_KEYS, suffixes=("_estimate", "_exact"))
    table = table.rename(columns={"metric_estimate": "estimate", "metric_exact": "exact"})
    table["rank_estimate"] = table["estimate"].abs().rank(ascending=False).astype(int)
    table["rank_exact"] = table["exact"].abs().rank(ascending=False, method="first").astype(int)
    table["wrong_sign"] = np.sign(table["estimate"]) != np.sign(table["exact"])
    ratio = table["exact"] / table["estimate"].where(table["estimate"] != 0)
    table["wrong"] = table["wrong_sign"] | ~ratio.between(0.5, 2.0)
    pairs = result.frame.merge(exact.frame[["site", "layer", "head", "position", "pair", "effect"]],
                               on=["site", "layer", "head", "position", "pair"], suffixes=("", "_exact"))
    return Verification(
        table=table,
        pearson=correlation(table["estimate"], table["exact"], "pearson"),
        spearman=correlation(table["estimate"], table["exact"], "spearman"),
        pearson_pairs=correlation(pairs["effect"], pairs["effect_exact"], "pearson"),
        mean_abs_error=float((table["estimate"] - table["exact"]).abs().mean()),
    )


def compare(estimate: PatchResult, exact: PatchResult) -> dict[str, float]:
    """Pearson and Spearman of estimate vs exact over cell values and over (cell, pair) effects."""
    keys = ["site", "layer", "head", "position", "pair"]
    rows = estimate.frame.merge(exact.frame[keys + ["effect"]], on=keys, suffixes=("", "_exact"))
    means = estimate.means().merge(exact.means()[CELL_KEYS + ["metric"]], on=CELL_KEYS,
                                   suffixes=("", "_exact"))
    return {
        "pearson": correlation(means["metric"], means["metric_exact"], "pearson"),
        "spearman": correlation(means["metric"], means["metric_exact"], "spearman"),
        "pearson_pairs": correlation(rows["effect"], rows["effect_exact"], "pearson"),
        "spearman_pairs": correlation(rows["effect"], rows["effect_exact"], "spearman"),
    }
