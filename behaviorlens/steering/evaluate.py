"""What an edit does and what it costs: behavior shift removed, side effects, random control.

Every row of :func:`evaluate_steering` is one (layer, multiplier) of the edit, with the same
numbers for a matching random control (``random_*``, the mean over several draws): a random
direction of the same norm for vectors and directions, the same number of heads the edit does
not touch (same layers) for head edits.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..analysis.metrics import kl_divergence, logit_diff
from ..batching import chunks
from ..errors import BehaviorLensError
from ..measure import answer_logits
from .apply import steer
from .edit import Edit


class SideEffectData:
    """The prompts side effects are measured on, tokenized once for a model."""

    def __init__(self, model: Any, neutral: Sequence[str] | None = None,
                 reference: str | None = None, factual: Any = None) -> None:
        from . import data

        tok = model.tokenizer
        texts = list(neutral) if neutral is not None else data.neutral_prompts()
        self.neutral = [tok(t)["input_ids"] for t in texts]
        text = reference if reference is not None else data.reference_text()
        self.reference = tok(text)["input_ids"]
        if len(self.reference) < 2:
            raise BehaviorLensError("the reference text needs at least two tokens")
        if factual is None:
            from ..prompts import load_family

            family = load_family(str(data.factual_family_path()))
            family.chat = getattr(tok, "chat_template", None) is not None  # base models: plain text
            factual = family.render(tok)
        self.factual = factual


@torch.inference_mode()
def behavior_metrics(model: Any, cset: Any, batch_size: int = 16) -> torch.Tensor:
    """Behavior metric per pair and side: [pairs, 2] (positive, negative)."""
    ids = torch.tensor([p.answer_ids for p in cset])
    cols = [logit_diff(answer_logits(model, cset, side, batch_size), ids[:, 0], ids[:, 1])
            for side in ("positive", "negative")]
    return torch.stack(cols, 1)


@torch.inference_mode()
def _neutral_logits(model: Any, seqs: list[list[int]], batch_size: int) -> list[torch.Tensor]:
    out = []
    for idx in chunks(len(seqs), batch_size):
        batch = model.batch([seqs[i] for i in idx])
        logits = model.logits(batch).cpu()
        for j, i in enumerate(idx):
            out.append(logits[j, int(batch.offsets[j]):])
    return out


@torch.inference_mode()
def _perplexity(model: Any, ids: list[int]) -> float:
    batch = model.batch([ids])
    logits = model.logits(batch)[0].cpu()
    target = torch.tensor(ids[1:])
    nll = torch.nn.functional.cross_entropy(logits[:-1], target)
    return float(nll.exp())


def _factual_accuracy(model: Any, cset: Any, batch_size: int) -> float:
    ids = torch.tensor([p.answer_ids for p in cset])
    logits = answer_logits(model, cset, "positive", batch_size)
    return float((logit_diff(logits, ids[:, 0], ids[:, 1]) > 0).float().mean())


def _measure(model: Any, cset: Any, data: SideEffectData, base_neutral: list[torch.Tensor] | None,
             batch_size: int) -> dict[str, Any]:
    metrics = behavior_metrics(model, cset, batch_size)
    neutral = _neutral_logits(model, data.neutral, batch_size)
    kl = None
    if base_neutral is not None:
        per_token = torch.cat([kl_divergence(b, s) for b, s in zip(base_neutral, neutral)])
        kl = float(per_token.mean())
    return {
        "metrics": metrics,
        "neutral": neutral,
        "neutral_kl": kl,
        "perplexity": _perplexity(model, data.reference),
        "factual_accuracy": _factual_accuracy(model, data.factual, batch_size),
    }


def random_control(model: Any, edit: Edit, seed: int = 0) -> Edit:
    """The matching random edit: same kind, norm per layer, or number of heads per layer."""
    g = torch.Generator().manual_seed(seed)
    s = model.sites
    if edit.kind in ("vector", "ablate_direction"):
        vectors = {}
        for layer, v in edit.vectors.items():
            r = torch.randn(v.shape[0], generator=g)
            vectors[layer] = r / r.norm() * v.norm()
        return Edit(kind=edit.kind, vectors=vectors, model=edit.model, family="random",
                    position=edit.position, method="random", d_model=edit.d_model,
                    n_heads=edit.n_heads, head_dim=edit.head_dim)
    heads = _untouched_heads(edit.heads, s.n_heads, g)
    return Edit(kind="heads", heads=heads, head_values=edit.head_values, head_mode=edit.head_mode,
                scale=edit.scale, model=edit.model, family="random", position=edit.position,
                method="random_heads", d_model=edit.d_model, n_heads=edit.n_heads, head_dim=edit.head_dim)


def _untouched_heads(chosen: dict[int, list[int]], n_heads: int, g: torch.Generator) -> dict[int, list[int]]:
    """As many heads as ``chosen``, none of them chosen, drawn within the same layers.

    Each layer gets its own count where it has enough untouched heads; the shortfall is drawn
    from the untouched heads left in the other layers (a control that shares heads with the
    edit would measure the edit itself).
    """
    def shuffled(items: list) -> list:
        return [items[int(i)] for i in torch.randperm(len(items), generator=g)]

    free = {layer: shuffled([h for h in range(n_heads) if h not in hs]) for layer, hs in chosen.items()}
    heads = {layer: free[layer][: len(hs)] for layer, hs in chosen.items()}
    short = sum(len(hs) for hs in chosen.values()) - sum(len(hs) for hs in heads.values())
    rest = shuffled([(layer, h) for layer in chosen for h in free[layer][len(heads[layer]):]])
    for layer, h in rest[:short]:
        heads[layer].append(h)
    return {layer: sorted(hs) for layer, hs in heads.items() if hs}


def _intended(edit: Edit, multiplier: float) -> float:
    """+1 if the edit is meant to raise the behavior shift, -1 to lower it."""
    if edit.kind == "vector" and edit.notes.get("intent") != "reduce":
        return float(np.sign(multiplier))
    if edit.kind == "vector":
        return -float(np.sign(multiplier))
    return -1.0 if multiplier > 0 else 1.0


def evaluate_steering(
    model: Any,
    edit: Edit,
    eval_set: Any,
    multipliers: Sequence[float] = (1.0,),
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    positions: str = "all",
    seed: int = 0,
    controls: int = 3,
    side_effects: SideEffectData | None = None,
) -> pd.DataFrame:
    """Effect and side effects of an edit per (layer, multiplier), with a random control.

    Columns: ``layer, multiplier, kind, metric_positive, metric_negative, shift,
    shift_unsteered, shift_removed_fraction`` (1 - shift/shift_unsteered, both sides edited),
    ``anti_steerable_fraction`` (pairs whose shift moved against the edit's intent: up for a
    removal, down for a positive-multiplier vector), ``neutral_kl`` (mean per-token KL from the
    unedited model on the neutral prompts, nats), ``perplexity`` on the reference text,
    ``factual_accuracy`` on the factual-control family, their ``*_unsteered`` baselines, and
    ``random_*``: the same numbers averaged over ``controls`` random controls (seeds ``seed``,
    ``seed + 1``, ...; ``random_shift_removed_fraction_sd`` is their spread).
    ``frame.attrs["pairs"]`` holds the per-pair shifts (``control`` 0 = the edit, k = draw k).
    """
    edit.check(model)
    if len(eval_set) == 0:
        raise BehaviorLensError(f"evaluation set {eval_set.name!r} is empty")
    data = side_effects or SideEffectData(model)
    if edit.kind == "vector":
        layers = list(layers) if layers is not None else edit.layers
        configs = [(layer, [layer]) for layer in layers]
    else:
        if layers is not None and list(layers) != edit.layers:
            raise BehaviorLensError(f"a {edit.kind} edit acts on its own layers {edit.layers}; drop --layers")
        configs = [(edit.layers[0], None)]
    base = _measure(model, eval_set, data, None, batch_size)
    base_shift = base["metrics"][:, 0] - base["metrics"][:, 1]
    shift_unsteered = float(base_shift.mean())
    rows, pair_rows = [], []
    draws = [random_control(model, edit, seed + i) for i in range(controls)]
    for layer, apply_layers in configs:
        for m in multipliers:
            row: dict[str, Any] = {
                "layer": layer, "multiplier": float(m), "kind": edit.kind, "edit": edit.describe(),
                "pairs": len(eval_set), "shift_unsteered": shift_unsteered,
                "metric_positive_unsteered": float(base["metrics"][:, 0].mean()),
                "metric_negative_unsteered": float(base["metrics"][:, 1].mean()),
                "perplexity_unsteered": base["perplexity"],
                "factual_accuracy_unsteered": base["factual_accuracy"],
            }
            controls_rows = []
            for draw, e in enumerate([edit, *draws]):
                ctx = steer(model, e, m, layers=apply_layers, positions=positions) if m != 0 else nullcontext()
                with ctx:
                    res = _measure(model, eval_set, data, base["neutral"], batch_size)
                shift = res["metrics"][:, 0] - res["metrics"][:, 1]
                moved = (shift - base_shift) * _intended(edit, m)
                values = {
                    "metric_positive": float(res["metrics"][:, 0].mean()),
                    "metric_negative": float(res["metrics"][:, 1].mean()),
                    "shift": float(shift.mean()),
                    "shift_removed_fraction": 1 - float(shift.mean()) / shift_unsteered,
                    "anti_steerable_fraction": float((moved < 0).float().mean()) if m != 0 else 0.0,
                    "neutral_kl": res["neutral_kl"],
                    "perplexity": res["perplexity"],
                    "factual_accuracy": res["factual_accuracy"],
                }
                if draw == 0:
                    row |= values
                else:
                    controls_rows.append(values)
                for i, p in enumerate(eval_set):
                    pair_rows.append({
                        "control": draw, "layer": layer, "multiplier": float(m), "pair": i,
                        "row": p.row, "family": p.family, "shift_unsteered": float(base_shift[i]),
                        "shift": float(shift[i]), "moved_intended_way": bool(moved[i] > 0),
                    })
            if controls_rows:
                ctl = pd.DataFrame(controls_rows)
                row |= {f"random_{k}": float(v) for k, v in ctl.mean().items()}
                row["random_shift_removed_fraction_sd"] = float(ctl["shift_removed_fraction"].std(ddof=0))
                row["random_controls"] = len(ctl)
            rows.append(row)
    frame = pd.DataFrame(rows)
    frame.attrs["pairs"] = pd.DataFrame(pair_rows)
    return frame
