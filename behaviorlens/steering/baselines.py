"""What an edit must beat: deleting the text it hides, and the same edit acting where no pressure is.

- :func:`deletion_baseline`: the tokens an edit's detector flags (for an edit without one, the
  family's claim slot) deleted from the prompt's text and scored as if that were an edit: the
  pressure figures on the evaluation set and the context-use figures on the side-effect set.
  An edit no better than deletion on any figure acts as *redaction* (:func:`is_redaction`).
- :func:`filler_null`: for a knockout, the claim replaced by a non-claim sentence of about the
  same length ("I am asking this for a quiz.") and that sentence's tokens blocked in the same
  heads: how far blocking a same-sized span that carries no pressure moves the answer, as a
  fraction of the pull (for an edge knockout, its cut at that sentence's tokens). A null that
  moves the model either way by more than ``NULL_MAX`` of the pull is broken
  (:func:`null_broken`), not passed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from ..batching import answer_tail, chunks
from ..edits import Readout
from ..errors import BehaviorLensError
from ..interventions.hooks import applied
from ..prompts.contrast import NEUTRAL, SIDES
from ..reads import token_states
from ..scoring import behavior_metric, needs_whole, plan
from ..stats import ratio_ci, ratio_of_means
from .apply import knockout
from .detectors import valence_slot
from .pressure import pressure_figures
from .side_effects import SideEffectData, context_figures

NULL_MAX = 0.15  # |null pressure removed| above this: the null moves the model, so it is broken
BETTER = {"pressure_removed_fraction": 0.05, "context_use_accuracy_change": 0.02,
          "claim_recall_accuracy_change": 0.02}  # how much better than deletion counts as better


def flagged(model: Any, readout: Readout, sequences: Sequence[Sequence[int]], batch_size: int = 16) -> list[np.ndarray]:
    """Per sequence, the tokens ``readout`` flags (closed over its gap), as an edit would."""
    states = token_states(model, sequences, [readout.layer], batch_size)[readout.layer]
    out = []
    for x in states:
        scores = torch.from_numpy(x) @ readout.direction + readout.bias
        out.append(readout.close((scores > 0)[None])[0].numpy())
    return out


def with_tokens(pair: Any, side: str, keep: np.ndarray) -> Any:
    """``pair`` with one side's tokens cut to ``keep``; named positions follow their tokens and
    emptied ones are dropped."""
    ids = list(pair.tokens[side])
    index = np.concatenate([[0], np.cumsum(keep)]).astype(int)  # old index -> new index
    spans = {name: (int(index[a]), int(index[b])) for name, (a, b) in pair.spans[side].items() if index[b] > index[a]}
    tokens = [t for t, k in zip(ids, keep) if k]
    for name in ("last", "answer"):  # a cut answer position moves to the new last token
        spans.setdefault(name, (len(tokens) - 1, len(tokens)))
    return replace(pair, tokens={**pair.tokens, side: tokens}, spans={**pair.spans, side: spans})


def replace_span(pair: Any, side: str, name: str, new: list[int]) -> Any:
    """``pair`` with the tokens of its position ``name`` on one side replaced by ``new``."""
    a, b = pair.span(side, name)
    shift = len(new) - (b - a)
    spans = {}
    for key, (x, y) in pair.spans[side].items():
        if key == name:
            spans[key] = (a, a + len(new))
        elif x >= b:
            spans[key] = (x + shift, y + shift)
        elif y <= a:
            spans[key] = (x, y)
    tokens = list(pair.tokens[side])
    tokens = tokens[:a] + list(new) + tokens[b:]
    for key in ("last", "answer"):
        spans.setdefault(key, (len(tokens) - 1, len(tokens)))
    return replace(pair, tokens={**pair.tokens, side: tokens}, spans={**pair.spans, side: spans})


def _delete(pair: Any, side: str, drop: np.ndarray) -> Any:
    """``pair`` without the flagged tokens of one side; the last token stays (an edit blocks
    attention to other tokens, never a token's own)."""
    drop = drop.copy()
    drop[-1] = False
    return with_tokens(pair, side, ~drop)


def deletion_baseline(model: Any, eval_set: Any, data: SideEffectData | None, readout: Readout | None,
                      base_metrics: dict[str, np.ndarray], base_context: np.ndarray | None,
                      batch_size: int = 16) -> dict[str, Any]:
    """The pressure and context-use figures of deleting what ``readout`` flags (without one: the
    family's claim slot; then the context-use figures are absent), keys prefixed
    ``deletion_baseline_``."""
    sides = [s for s in (*SIDES, NEUTRAL) if s in base_metrics]
    pairs = list(eval_set)
    ctx = list(data.context) if readout is not None and data is not None and base_context is not None else []
    if readout is not None:  # every prompt's flags in one read
        flags = flagged(model, readout, [p.tokens[side] for side in sides for p in pairs]
                        + [p.tokens["positive"] for p in ctx], batch_size)
    metrics, out = {}, {}
    for k, side in enumerate(sides):
        if readout is not None:
            kept = [_delete(p, side, f) for p, f in zip(pairs, flags[k * len(pairs):])]
        elif side in SIDES:
            slot = valence_slot(eval_set)
            kept = [with_tokens(p, side, ~_span_mask(p, side, slot)) for p in pairs]
        else:
            kept = pairs
        metrics[side] = behavior_metric(model, kept, side, batch_size).numpy()
    figures = pressure_figures(base_metrics, metrics)
    for key in ("pressure_removed_fraction", "counter_pressure_removed_fraction", "neutral_metric_change",
                "accuracy_neutral_change"):
        out[key] = figures.get(key, float("nan"))
    if ctx:
        flags = flags[len(sides) * len(pairs):]
        ctx = [_delete(p, "positive", f) for p, f in zip(ctx, flags)]
        edited = behavior_metric(model, ctx, "positive", batch_size).numpy()
        out |= {k: v for k, v in context_figures(base_context, edited, data.recall).items() if not k.endswith("_ci")}
        out["flagged_context_prompts"] = float(np.mean([f.any() for f in flags]))
    return {f"deletion_baseline_{k}": v for k, v in out.items()}


def _span_mask(pair: Any, side: str, slot: str) -> np.ndarray:
    a, b = pair.span(side, slot)
    mask = np.zeros(len(pair.tokens[side]), dtype=bool)
    mask[a:b] = True
    return mask


def is_redaction(row: dict[str, Any]) -> bool | None:
    """Whether an edit is no better than deleting the text on every figure (None when the
    deletion baseline has no context-use figures to compare)."""
    if not np.isfinite(row.get("deletion_baseline_context_use_accuracy_change", float("nan"))):
        return None
    better = [row[k] - row[f"deletion_baseline_{k}"] > margin for k, margin in BETTER.items()
              if np.isfinite(row.get(k, float("nan")))]
    return not any(better)


def null_broken(value: float) -> bool:
    """A null that moves the pressured answer either way by more than ``NULL_MAX`` of the pull."""
    return bool(np.isfinite(value) and abs(value) > NULL_MAX)


def blocked_metric(model: Any, pairs: Sequence[Any], side: str, spans: Sequence[tuple[int, int]],
                   heads: dict[int, list[int]], batch_size: int = 16, edit: Any = None) -> np.ndarray:
    """The metric of one side of each pair with attention of ``heads`` from the answer positions
    to the tokens of ``spans`` (one per pair) blocked; with ``edit``, that edit acting at those
    tokens instead (its kind's :meth:`~behaviorlens.edits.kind.EditKind.at_tokens`)."""
    whole = needs_whole(pairs)
    values = []
    for idx in chunks(len(pairs), batch_size):
        chunk = [pairs[i] for i in idx]
        scoring = plan(chunk, side, whole)
        batch = model.batch(scoring.sequences)
        blocked = torch.zeros_like(batch.input_ids, dtype=torch.bool)
        for s_idx, p_idx in enumerate(scoring.prompt_of):
            a, b = spans[idx[p_idx]]
            off = int(batch.offsets[s_idx])
            blocked[s_idx, a + off:b + off] = True
        cols = scoring.position + batch.offsets[scoring.sequence]
        acting = knockout(model, heads, blocked) if edit is None else \
            applied(model, edit.spec.at_tokens(edit, model, blocked))
        with acting, answer_tail(scoring.tails()):
            values.append(scoring.metric(model.logits_at(batch, scoring.sequence, cols)).cpu())
    return torch.cat(values).numpy() if values else np.zeros(0)


def filler_pairs(model: Any, eval_set: Any, sentences: Sequence[str]) -> tuple[list[Any], list[tuple[int, int]]]:
    """Each pair's pressured prompt with its claim replaced by the non-claim sentence of the
    closest token length, and where that sentence sits."""
    tok = model.tokenizer
    slot = valence_slot(eval_set)
    encoded = {lead: [tok(lead + s, add_special_tokens=False)["input_ids"] for s in sentences] for lead in ("", " ")}
    pairs, spans = [], []
    for p in eval_set:
        a, b = p.span("positive", slot)
        lead = " " if tok.decode(p.tokens["positive"][a:a + 1]).startswith(" ") else ""
        new = min(encoded[lead], key=lambda ids: (abs(len(ids) - (b - a)), len(ids)))
        pairs.append(replace_span(p, "positive", slot, new))
        spans.append((a, a + len(new)))
    return pairs, spans


def filler_null(model: Any, eval_set: Any, heads: dict[int, list[int]], base_metrics: dict[str, np.ndarray],
                sentences: Sequence[str], batch_size: int = 16, edit: Any = None) -> dict[str, Any]:
    """The knockout null (see the module doc): ``null_control_pressure_removed_fraction`` with
    its CI, and per pair the filler prompt's metric unblocked and blocked; with ``edit``, that
    edit acting at the sentence's tokens (an edge knockout's cut there)."""
    if NEUTRAL not in base_metrics:
        raise BehaviorLensError(f"set {eval_set.name!r} has no neutral side: a null is a fraction of the pull")
    pairs, spans = filler_pairs(model, eval_set, sentences)
    unblocked = behavior_metric(model, pairs, "positive", batch_size).numpy()
    blocked = blocked_metric(model, pairs, "positive", spans, heads, batch_size, edit)
    pull = base_metrics["positive"] - base_metrics[NEUTRAL]
    acting = "blocked in the same heads" if edit is None else "under the same edit (as if its detector flagged them)"
    return {"null_control_pressure_removed_fraction": ratio_of_means(unblocked - blocked, pull),
            "null_control_pressure_removed_fraction_ci": list(ratio_ci(unblocked - blocked, pull)),
            "null_control": f"the claim replaced by a non-claim sentence of the same length, its tokens {acting}",
            "per_pair": (unblocked, blocked)}


def edit_minus_null(unedited: dict[str, np.ndarray], edited: np.ndarray, null_moved: np.ndarray) -> dict[str, Any]:
    """(pressure removed by the edit) - (by the null), a ratio of means over pairs with its CI;
    ``null_moved`` is per pair how far the null moved the pressured metric down."""
    pull = unedited["positive"] - unedited[NEUTRAL]
    diff = (unedited["positive"] - edited) - null_moved
    return {"edit_minus_null_pressure_removed_fraction": ratio_of_means(diff, pull),
            "edit_minus_null_pressure_removed_fraction_ci": list(ratio_ci(diff, pull))}
