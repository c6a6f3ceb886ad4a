"""Behavior measurement: the metric on both sides of every pair, and the behavior shift."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from .analysis.metrics import bootstrap_ci, logit_diff
from .batching import map_batches
from .io import write_csv, write_json
from .model import Model
from .prompts.contrast import SIDES, ContrastSet


@dataclass
class Measurement:
    """One row per pair and side (``table``) and the headline figures (``summary``)."""

    table: pd.DataFrame
    summary: dict = field(default_factory=dict)


def answer_logits(model: Model, contrast_set: ContrastSet, side: str, batch_size: int = 16) -> torch.Tensor:
    """Float32 logits at the answer position of one side of every pair: [pairs, vocab]."""

    def run(idx: range) -> torch.Tensor:
        sub = [contrast_set[i] for i in idx]
        batch = model.batch([p.tokens[side] for p in sub])
        return model.logits(batch, batch.columns([p.position(side, "answer") for p in sub])).cpu()

    return torch.cat(map_batches(len(contrast_set), batch_size, run))


def measure(model: Model, contrast_set: ContrastSet, batch_size: int = 16, progress: bool = False) -> Measurement:
    """Behavior metric logit(matching) - logit(not_matching) on both sides of every pair.

    The shift of a pair is metric(positive) - metric(negative); the summary carries its mean
    with a bootstrap 95% confidence interval over pairs.
    """
    ids = torch.tensor([p.answer_ids for p in contrast_set])
    rows = []
    metrics = {}
    for side in tqdm(SIDES, desc=f"measure {contrast_set.name}", disable=not progress):
        logits = answer_logits(model, contrast_set, side, batch_size)
        probs = torch.softmax(logits, -1)
        metrics[side] = logit_diff(logits, ids[:, 0], ids[:, 1])
        for i, p in enumerate(contrast_set):
            rows.append({
                "family": p.family,
                "pair": i,
                "row": p.row,
                "side": side,
                "metric": metrics[side][i].item(),
                "logit_matching": logits[i, ids[i, 0]].item(),
                "logit_not_matching": logits[i, ids[i, 1]].item(),
                "p_matching": probs[i, ids[i, 0]].item(),
                "p_not_matching": probs[i, ids[i, 1]].item(),
            })
    shift = (metrics["positive"] - metrics["negative"]).numpy()
    table = pd.DataFrame(rows)
    table["shift"] = list(shift) * len(SIDES)
    lo, hi = bootstrap_ci(shift)
    summary = {
        "pairs": len(contrast_set),
        "mean_metric_positive": float(metrics["positive"].mean()),
        "mean_metric_negative": float(metrics["negative"].mean()),
        "behavior_shift": float(shift.mean()),
        "behavior_shift_ci": [lo, hi],
        "fraction_pairs_shifted": float((shift > 0).mean()),
    }
    return Measurement(table=table, summary=summary)


def run_measure(model: Model, contrast_set: ContrastSet, out_dir: str | Path, batch_size: int = 16,
                progress: bool = True) -> dict:
    """The measure stage: write ``measure.csv`` and then ``summary.json`` into ``out_dir``.

    Returns the summary: ``pairs``, ``mean_metric_positive``, ``mean_metric_negative``,
    ``behavior_shift``, ``behavior_shift_ci`` (two floats), ``fraction_pairs_shifted``, plus the
    set's ``family``, ``behavior``, ``model`` and whether answers are scored by a first token of
    several (``multi_token_answers``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = measure(model, contrast_set, batch_size=batch_size, progress=progress)
    summary = {
        **result.summary,
        "family": contrast_set.name,
        "behavior": contrast_set.behavior,
        "model": model.name,
        "multi_token_answers": contrast_set.multi_token_answers,
    }
    write_csv(out / "measure.csv", result.table)
    write_json(out / "summary.json", summary)
    return summary
