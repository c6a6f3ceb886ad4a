"""Ablation scans: knock out each head (or each layer's attention or MLP output) in turn on the
positive side and measure how far the behavior metric drops.

Three conventions for what replaces the component's output, at every position:

- ``zero``: zeros;
- ``mean``: its mean over every token of the other (negative) side's prompts;
- ``resample``: its value on a random other pair's negative side, positions aligned from the
  end (where that prompt is shorter, its mean over that prompt).

The replacement covers every prompt position (not the teacher-forced answer tokens).

A component's value is the drop as a ratio of means over pairs,
``sum(metric_positive - metric_ablated) / sum(metric_positive - metric_negative)``: positive =
important (the same sign convention as patching); 1 = the ablation takes the positive side all
the way to the negative side's metric.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..batching import chunks
from ..errors import BehaviorLensError
from ..interventions.hooks import applied
from ..interventions.kinds import SetSite
from ..reads import site_values
from ..scoring import behavior_metric, needs_whole, plan
from ..stats import ratio_ci, ratio_of_means

ABLATIONS = ("zero", "mean", "resample")
SITES = ("head", "attn", "mlp")


def _component_values(model: Any, cset: Any, site: str, layers: Sequence[int],
                      batch_size: int = 16) -> dict[int, list[torch.Tensor]]:
    """The site's output at every layer for each pair's negative side (unpadded, per pair)."""
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for idx in chunks(len(cset), batch_size):
        pairs = [cset.pairs[i] for i in idx]
        batch = model.batch([p.tokens["negative"] for p in pairs])
        acts = site_values(model, batch, site, layers)
        for layer in layers:
            for j in range(len(pairs)):
                out[layer].append(acts[layer][j, int(batch.offsets[j]):].float().cpu())
    return out


def _replacement(convention: str, values: list[torch.Tensor], pair: int, length: int, rng: random.Random,
                 shape: tuple[int, ...]) -> torch.Tensor:
    """What replaces the component on one pair's positive side: [length, ...]."""
    if convention == "zero":
        return torch.zeros(length, *shape)
    if convention == "mean":
        return torch.cat(values).mean(0).expand(length, *shape)
    other = rng.choice([i for i in range(len(values)) if i != pair])
    source = values[other]
    filler = source.mean(0).expand(length, *shape).clone()
    n = min(length, len(source))
    filler[length - n:] = source[len(source) - n:]
    return filler


def ablation_scan(model: Any, contrast_set: Any, site: str = "head", convention: str = "mean",
                  layers: Sequence[int] | None = None, seed: int = 0, progress: bool = False) -> pd.DataFrame:
    """One row per component: ``value`` (the drop, see the module doc) with its bootstrap CI over
    pairs, and the mean metric with the component ablated."""
    if convention not in ABLATIONS:
        raise BehaviorLensError(f"unknown ablation {convention!r}; use one of {', '.join(ABLATIONS)}")
    if site not in SITES:
        raise BehaviorLensError(f"ablation scans knock out {', '.join(SITES)}, not {site!r}")
    if len(contrast_set) < 2:
        raise BehaviorLensError(f"set {contrast_set.name!r} has {len(contrast_set)} pairs; an ablation scan needs 2")
    s = model.sites
    layers = list(range(s.n_layers)) if layers is None else [int(x) for x in layers]
    for layer in layers:
        s.check(site, layer)
    whole = needs_whole(contrast_set.pairs)
    positive = behavior_metric(model, contrast_set.pairs, "positive", whole=whole).numpy()
    negative = behavior_metric(model, contrast_set.pairs, "negative", whole=whole).numpy()
    values = _component_values(model, contrast_set, site, layers)
    units = [(layer, h) for layer in layers for h in (range(s.n_heads) if site == "head" else [None])]
    scoring = plan(contrast_set.pairs, "positive", whole)
    rows = []
    for layer, head in tqdm(units, desc=f"ablate {site} ({convention})", disable=not progress):
        rng = random.Random(seed * 7919 + layer * 131 + (head or 0))
        shape = values[layer][0].shape[1:]
        fills = [_replacement(convention, values[layer], i, len(p.tokens["positive"]), rng, shape)
                 for i, p in enumerate(contrast_set)]
        if head is not None:
            fills = [f[:, head] for f in fills]
        ablated = _score_with(model, scoring, site, layer, head, fills).numpy().astype(np.float64)
        lo, hi = ratio_ci(positive - ablated, positive - negative)
        rows.append({"site": site, "layer": layer, "head": head, "convention": convention,
                     "value": ratio_of_means(positive - ablated, positive - negative), "ci_low": lo, "ci_high": hi,
                     "metric_ablated": float(ablated.mean()), "metric_positive": float(positive.mean()),
                     "metric_negative": float(negative.mean()), "pairs": len(contrast_set)})
    table = pd.DataFrame(rows)
    table["head"] = table["head"].astype("Int64")
    return table


@torch.inference_mode()
def _score_with(model: Any, scoring: Any, site: str, layer: int, head: int | None,
                fills: list[torch.Tensor]) -> torch.Tensor:
    """The metric of every prompt with the component's output replaced at its prompt positions
    (``fills[i]`` for prompt ``i``): one batched forward."""
    batch = model.batch(scoring.sequences)
    rows, cols, values = [], [], []
    for row, prompt in enumerate(scoring.prompt_of):
        fill = fills[prompt]
        rows += [row] * len(fill)
        cols += range(int(batch.offsets[row]), int(batch.offsets[row]) + len(fill))
        values.append(fill)
    index = (torch.tensor(rows), torch.tensor(cols)) + (() if head is None else (head,))
    with applied(model, [SetSite(model.sites.ref(site, layer), torch.cat(values), index)]):
        logits = model.logits_at(batch, scoring.sequence, scoring.position + batch.offsets[scoring.sequence])
    return scoring.metric(logits).cpu()
