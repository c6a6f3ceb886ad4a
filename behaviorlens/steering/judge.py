"""Judging a candidate: its figures on pairs that built nothing and on the ``select`` part of
the side effects, and the limits a choice keeps.

Each candidate is scored beside one random control of its kind, its matched null (for a
knockout, the same heads blocking a non-claim sentence in the claim's place; otherwise the
random control) and the deletion of the text the knockout detector flags (:mod:`.baselines`).
:func:`within_limits` holds the limits :mod:`.choose` states.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import pandas as pd

from ..edits import Edit
from ..errors import BehaviorLensError
from ..prompts.contrast import NEUTRAL
from ..scoring import behavior_metric
from ..stats import ratio_of_means
from .apply import steer
from .baselines import blocked_metric, deletion_baseline, filler_null, is_redaction, null_broken
from .detectors import valence_slot
from .evaluate import null_figures, observe, random_control
from .pressure import pressure_figures
from .side_effects import SideEffectData, answer_figures, context_figures, tail_kl, tail_logits

KL_MAX = 0.05
ACCURACY_DROP_MAX = 0.02
CHOICE_REQUESTS = 24  # neutral requests (of the select half) the chooser's KL limit is measured on


def light_side_effects(model: Any, data: SideEffectData, edit: Edit | None, batch_size: int = 16,
                       unedited: dict | None = None) -> dict:
    """What the limits need, with the edit applied: factual and context-use metrics, and the
    neutral (chat) KL from ``unedited`` (this function's result without an edit), or, without
    ``unedited``, the reference logits that KL compares with."""
    with steer(model, edit) if edit is not None else nullcontext():
        neutral = ({"reference": tail_logits(model, data.neutral, batch_size)} if unedited is None
                   else {"neutral_kl": tail_kl(model, data.neutral, unedited["reference"], batch_size)})
        return {**neutral,
                "factual": behavior_metric(model, data.factual.pairs, "positive", batch_size).numpy(),
                "context": behavior_metric(model, data.context.pairs, "positive", batch_size).numpy()}


ACCURACY_LIMITS = ("accuracy_neutral_change", "factual_accuracy_change", "context_use_accuracy_change",
                   "claim_recall_accuracy_change")  # each may drop by at most max_accuracy_drop


def judge(model: Any, edit: Edit, held: Any, data: SideEffectData, unedited: dict, control_seed: int = 0,
          nulls: dict | None = None) -> dict:
    """A candidate's figures on the judging pairs and the select half of the side effects, with
    one random control and the matched null (:func:`.evaluate.null_figures`; ``nulls`` holds the
    deletion baseline and, for knockouts, the filler null of the judging pairs)."""
    edited = observe(model, held, None, edit=edit).metrics
    figures = pressure_figures(unedited["metrics"], edited)
    side = light_side_effects(model, data, edit, unedited=unedited)
    moved = []
    try:
        control_metrics = observe(model, held, None, edit=random_control(model, edit, control_seed)).metrics
        control = pressure_figures(unedited["metrics"], control_metrics)
        moved.append(unedited["metrics"]["positive"] - control_metrics["positive"])
    except BehaviorLensError:  # the edit leaves too few heads to draw a control from: no figure
        control = {"pressure_removed_fraction": float("nan"), "accuracy_neutral_change": float("nan")}
    row = {
        "pressure_removed_fraction": figures["pressure_removed_fraction"],
        "counter_pressure_removed_fraction": figures["counter_pressure_removed_fraction"],
        "accuracy_neutral_change": figures["accuracy_neutral_change"],
        "accuracy_positive_change": figures["accuracy_positive_change"],
        "accuracy_negative_change": figures["accuracy_negative_change"],
        "factual_accuracy_change": answer_figures(unedited["factual"], side["factual"], "factual")["factual_accuracy_change"],
        **{k: v for k, v in context_figures(unedited["context"], side["context"], data.recall).items()
           if not k.endswith("_ci") and k.endswith(("_change",))},
        "neutral_kl": side["neutral_kl"],
        "collapse": figures["collapse"],
        "shift_removed_fraction": figures["shift_removed_fraction"],
        "random_pressure_removed_fraction": control["pressure_removed_fraction"],
        "random_accuracy_neutral_change": control["accuracy_neutral_change"],
        "random_control": edit.spec.random_control_label,
    }
    nulls = dict(nulls or {})
    if edit.spec.matched_null != "filler":
        nulls.pop("filler", None)
    row |= {k: v for k, v in null_figures(edit, unedited["metrics"], edited["positive"], nulls, moved).items()
            if not isinstance(v, list)}
    row["redaction"] = is_redaction(row)
    return row


def within_limits(table: pd.DataFrame, kl_max: float, max_accuracy_drop: float) -> pd.Series:
    """Which candidates keep every limit (see :func:`choose_edit`)."""
    present = [c for c in ACCURACY_LIMITS if c in table]
    drop = -table[present].min(axis=1)
    null = "null_control_pressure_removed_fraction"  # a knockout's random-token control is no null: no limit
    broken = table[null].map(null_broken) if null in table else False
    return (~table["collapse"].astype(bool)) & (drop <= max_accuracy_drop + 1e-9) & \
        (table["neutral_kl"] <= kl_max) & ~broken


def knocked(edit: Edit) -> tuple | None:
    """The key of a filler null (the kind, its heads and arrays), None for edits scored against random draws."""
    if edit.spec.matched_null != "filler":
        return None
    arrays = tuple((k, tuple(v.flatten().tolist())) for k, v in sorted(edit.arrays.items()))
    return edit.kind, tuple((layer, tuple(hs)) for layer, hs in sorted(edit.heads.items())), arrays


def judging_nulls(model: Any, held: Any, data: SideEffectData, unedited: dict, detector: Any,
                  built: Sequence[tuple[str, Edit, str]]) -> dict:
    """The deletion baseline of the judging pairs (the knockout detector's flags deleted) and the
    filler null of each knockout's heads, computed once per judging set."""
    deletion = deletion_baseline(model, held, data, detector, unedited["metrics"], unedited["context"])
    out: dict = {None: {"deletion": deletion}}
    for _, edit, _ in built:
        key = knocked(edit)
        if key is not None and key not in out:
            out[key] = {"deletion": deletion,
                        "filler": filler_null(model, held, edit.heads, unedited["metrics"], data.fillers, edit=edit)}
    return out


def mechanism_test(model: Any, heads: dict[int, list[int]], cset: Any, unedited: dict[str, np.ndarray],
                   batch_size: int = 16) -> float:
    """Pressure removed when the answer position may not attend to the family's slot tokens in
    ``heads`` (the path's necessity; uses the slot annotations, so it is not a deployable edit)."""
    slot = valence_slot(cset)
    spans = [p.span("positive", slot) for p in cset]
    edited = blocked_metric(model, list(cset), "positive", spans, heads, batch_size)
    return ratio_of_means(unedited["positive"] - edited, unedited["positive"] - unedited[NEUTRAL])
