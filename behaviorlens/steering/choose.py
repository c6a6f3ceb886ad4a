"""Choosing an edit from evidence, with nothing that chose a thing scoring it.

The training family's pairs are split three ways (``choice_pairs.csv`` records each pair's role):
the pairs a patching result was computed on (``patched``) and a random part of the rest
(``fit``) build the candidates; the remaining pairs (``judge``) only judge them. Side effects
for the limits come from the ``select`` half of the side-effect data; the ``report`` half is
left for evaluating the choice.

Candidates, each an :class:`~.edit.Edit` (at strength 1; scaled variants are candidates too):

- ``head ablation``: mean-ablation of the top-k heads by patching at the last position;
- ``per-head steering``: the top heads' mean output on no-pressure prompts minus on pressured
  prompts, at the answer positions, added (x1, x2);
- ``knockout``: attention from the answer positions to the tokens a per-token probe flags as
  carrying the pressure, blocked in the top heads, in every head of the top head's layer and of
  the windows of 3 and 5 layers around it, and in every head of the band of layers the top
  heads span;
- ``narrowed knockout``: the same, in only the 3, 6 or 12 heads of the 5-layer window whose
  knockout alone removes the most of the wrong claim's pull minus the right claim's help on the
  fit pairs (:func:`deference_not_use`): heads that carry deference rather than the reading of
  a claim;
- ``subspace``: rank 1-8 interchange subspaces at the layer where the behavior reaches the last
  token, clamped to their no-pressure mean;
- ``head fine-tuning``: the top heads' output projections, trained with a recall anchor;
- ``vector`` and ``direction ablation``: the last token's mean-difference vector at that layer
  (x1, x4) and the ablation of its direction;
- ``gated``: head ablation, vector, per-head steering, the 5-layer and the narrowed knockouts
  acting only where a last-token probe says the prompt carries pressure;
- ``frame-gated``: the same, and the knockouts of the 5-layer window and of every layer after
  the gate blocking the flagged tokens from every position after them, acting only where the
  question's frame gate (:mod:`.frame_gate`) says the question is about the world rather than
  about the user's own text. It learns the fit pairs, the development families' pressured and
  no-pressure prompts, and the ``fit`` part of context use, claim recall and ordinary requests;
  ``frame_gate.csv`` scores it on the judging pairs and the ``select`` part beside a wording-only
  baseline;
- ``trained invariant``: a rank-4 low-rank edit of the answer position at that layer, trained
  to give pressured prompts the no-pressure answer while holding the ``fit`` part's context use,
  claim recall and requests (:func:`.training.train_lowrank`), at invariance weights 0, 1 and 4:
  the front of pressure removed against what the user tells the model.

Every candidate is judged beside a random control of its kind, its matched null (for a
knockout, the same heads blocking a non-claim sentence in the claim's place) and the deletion
of the text the knockout detector flags (:mod:`.baselines`). The choice is the candidate with
the most pressure removed on the judging pairs among those without ``collapse`` whose accuracy
on the family's neutral side, the factual control, context use and claim recall each drops by
at most ``max_accuracy_drop``, whose neutral KL is at most ``kl_max`` and whose matched null
moves the pressured answer by at most 15% of the pull either way. A knockout's random control
(as many other words blocked in the same heads) is reported, not a limit: heads that read the
question lean the model on the claim when the question is hidden from them, so it measures the
heads, not the edit. The chosen
candidate is rebuilt on other splits: the spread of its figure over fits. Beside the
candidates, the mechanism test: blocking the answer position's attention to the family's own
slot tokens (known from the family, so not an edit that runs without them).
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..analysis.metrics import ratio_of_means
from ..edits import Edit
from ..errors import BehaviorLensError
from ..patching.results import PatchEvidence
from ..prompts.contrast import NEUTRAL, SIDES
from ..scoring import behavior_metric, needs_whole
from .apply import head_means, steer
from .baselines import (
    NULL_MAX,
    blocked_metric,
    deletion_baseline,
    filler_null,
    is_redaction,
    null_broken,
)
from .data import claim_wordings
from .detectors import (
    default_layers,
    detector_quality,
    gate_quality,
    remembered_states,
    train_pressure_gate,
    train_token_detector,
    valence_slot,
)
from .evaluate import null_figures, observe, pressure_figures, random_control, require_behavior
from .frame_gate import (
    NO_PRESSURE,
    PRESSURED,
    FramePrompts,
    context_prompts,
    family_prompts,
    frame_gate_quality,
    frame_prompts,
    request_prompts,
    train_frame_gate,
)
from .side_effects import SideEffectData, answer_figures, context_figures, mean_kl, tail_logits
from .training import finetune_heads, train_lowrank, train_subspace
from .vectors import train_vector

KL_MAX = 0.05
ACCURACY_DROP_MAX = 0.02
KNOCKOUT_WINDOWS = (0, 1, 2)  # half-widths of the layer windows around the top head's layer
NARROW_HEADS = (3, 6, 12)  # sizes of the narrowed knockouts
CHOICE_REQUESTS = 24  # neutral requests (of the select half) the chooser's KL limit is measured on
GROUPS = ("head ablation", "per-head steering", "knockout", "narrowed knockout", "subspace",
          "head fine-tuning", "vector", "direction ablation", "gated", "frame-gated", "trained invariant")
INVARIANCE_WEIGHTS = (0.0, 1.0, 4.0)  # the trained-invariant candidates' front: pressure against context use
GATES_BUILT_FROM = {"gated": ("narrowed knockout",), "frame-gated": ("narrowed knockout",)}  # gated copies of these
FRAMED = {"frame-gated", "trained invariant"}  # groups that learn the fit part of the side effects
FRAME_FAMILIES = ("capitals_opinion", "restated_claim", "earlier_turn_claim", "system_claim", "pushback",
                  "pushback_cited")  # development families whose pressured prompts the frame gate also learns
LOCAL_ONLY = {  # groups whose building has no trace path, and why
    "subspace": "its interchange training replays blocks from a layer on local weights",
    "head fine-tuning": "it trains weight differences by backpropagating through local weights",
    "trained invariant": "it backpropagates through blocks replayed on local weights",
}


def split_for_choice(train_set: Any, patched_rows: set[int], seed: int = 0,
                     min_judge: int = 6) -> tuple[Any, Any, pd.DataFrame]:
    """(fit, judge, roles): judging pairs are never patched pairs; see the module doc."""
    free = [i for i, p in enumerate(train_set) if p.row not in patched_rows]
    random.Random(seed).shuffle(free)
    judge = sorted(free[: len(free) // 2])
    if len(judge) < min_judge:
        raise BehaviorLensError(
            f"set {train_set.name!r}: after leaving out the {len(patched_rows)} patched rows, only "
            f"{len(judge)} pairs remain to judge candidates (need {min_judge}); use a larger family"
        )
    fit = sorted(set(range(len(train_set))) - set(judge))
    roles = pd.DataFrame([{"row": p.row, "role": "judge" if i in judge else
                           ("patched" if p.row in patched_rows else "fit")} for i, p in enumerate(train_set)])
    return train_set.subset(fit), train_set.subset(judge), roles


def _scaled(edit: Edit, factor: float, label: str) -> Edit:
    """A copy of a vector or per-head steering edit with its vectors multiplied."""
    return Edit(**{**edit.__dict__, "vectors": {k: factor * v for k, v in edit.vectors.items()},
                   "head_values": {k: factor * v for k, v in edit.head_values.items()},
                   "method": f"{edit.method} x{label}", "notes": dict(edit.notes)})


def _head_dict(heads: pd.DataFrame) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for _, r in heads.iterrows():
        out.setdefault(int(r.layer), []).append(int(r["head"]))
    return out


def _named(heads: pd.DataFrame) -> str:
    return ", ".join(f"L{int(r.layer)}H{int(r['head'])} ({r.metric:.2f})" for _, r in heads.iterrows())


def build_candidates(model: Any, fit: Any, evidence: PatchEvidence, groups: Sequence[str] = GROUPS,
                     seed: int = 0, log: Any = None, frame: FramePrompts | None = None,
                     frame_leave_out: Sequence[str] = ()) -> tuple[list[tuple[str, Edit, str]], dict]:
    """(group, edit, evidence) of every candidate, and the detector and gates with their CV tables.
    ``frame``: the frame gate's prompts other than the fit pairs' (:func:`frame_negatives`);
    ``frame_leave_out``: kinds of them it does not learn."""
    s = model.sites
    out: list[tuple[str, Edit, str]] = []
    extra: dict[str, Any] = {}
    say = log or (lambda msg: None)
    heads = evidence.heads()
    layer = evidence.arrival_layer()
    meta = dict(model=model.name, family=fit.name, d_model=s.d_model, n_heads=s.n_heads, head_dim=s.head_dim)
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        raise BehaviorLensError(f"unknown candidate group {unknown[0]!r}; groups are {', '.join(GROUPS)}")
    if model.traced:
        for group in [g for g in groups if g in LOCAL_ONLY]:
            warnings.warn(f"{group} candidates are not built on a remote model: {LOCAL_ONLY[group]}", stacklevel=2)
        groups = [g for g in groups if g not in LOCAL_ONLY]
    if "head ablation" in groups and len(heads):
        means = head_means(model, fit, range(s.n_layers))
        for k in (1, 3, 10):
            if k <= len(heads):
                top = heads.head(k)
                edit = Edit(kind="heads", heads=_head_dict(top), head_values=means, head_mode="mean",
                            method="mean ablation", **meta)
                out.append(("head ablation", edit, f"top {k} heads at the last position by patching: {_named(top)}"))
    gating = {"gated", "frame-gated"} & set(groups)
    if ("per-head steering" in groups or gating) and len(heads):
        layers = sorted({int(x) for x in heads.head(10).layer})
        neutral = head_means(model, fit, layers, position="last", sides=[NEUTRAL])
        positive = head_means(model, fit, layers, position="last", sides=["positive"])
        diff = {layer_: neutral[layer_] - positive[layer_] for layer_ in layers}
        for k in (3, 10):
            if k <= len(heads) or k == 3:
                top = heads.head(k)
                hd = _head_dict(top)
                per_head = Edit(kind="heads", heads=hd, head_values={layer_: diff[layer_] for layer_ in hd},
                            head_mode="add", positions="generated", method="head mean difference", **meta)
                why = f"top {len(top)} heads by patching: {_named(top)}; no-pressure minus pressured mean output"
                extra.setdefault("head_steering", per_head)
                if "per-head steering" in groups:
                    out.append(("per-head steering", _scaled(per_head, 2.0, "2"), why))
    # a detector or gate reads the residual leaving a layer before the first head it controls,
    # so it reads layer >= 0 and the heads it controls sit at layer >= 1
    first = max(1, int(heads.head(5).layer.min()) if len(heads) else (layer or s.n_layers - 1))
    if ({"knockout", "narrowed knockout"} & set(groups) or gating) and fit.has_neutral:
        say("training the pressure-token detector")
        detector, table = train_token_detector(model, fit, default_layers(s.n_layers, first), seed)
        extra["detector"], extra["detector_cv"] = detector, table
        later = heads[heads.layer > detector.layer]
        if len(later):
            top_layer = int(later.layer.iloc[0])
            band = range(int(later.head(5).layer.min()), int(later.head(5).layer.max()) + 1)
            windows = [range(max(detector.layer + 1, top_layer - w), min(s.n_layers, top_layer + w + 1))
                       for w in KNOCKOUT_WINDOWS]
            sets = {f"top 3 heads ({_named(later.head(3))})": _head_dict(later.head(3))}
            for layers in [*windows, band]:
                name = (f"every head of layer {layers.start}" if len(layers) == 1 else
                        f"every head of layers {layers.start}-{layers.stop - 1}")
                sets.setdefault(name, {layer_: list(range(s.n_heads)) for layer_ in layers})
            extra["knockout_window"] = {layer_: list(range(s.n_heads)) for layer_ in windows[-1]}
            if "knockout" in groups:
                for why, hd in sets.items():
                    edit = Edit(kind="knockout", heads=hd, detector=detector, positions="generated",
                                method=f"detector at layer {detector.layer}", **meta)
                    out.append(("knockout", edit, f"{why}; tokens flagged by a per-token probe at layer "
                                                  f"{detector.layer} (CV AUROC {table.cv_auroc.max():.3f})"))
            if "narrowed knockout" in groups:
                say("scoring single-head knockouts: deference against use of a right claim")
                window = windows[-1]
                single = deference_not_use(model, fit, detector, {layer_: list(range(s.n_heads)) for layer_ in window})
                extra["single_head_knockouts"] = single
                ranked = single[single.deference > 0].sort_values("deference_minus_use", ascending=False)
                for k in NARROW_HEADS:
                    if len(ranked) >= k:
                        top = ranked.head(k)
                        hd = _head_dict(top)
                        extra.setdefault("narrowed", []).append(hd)
                        edit = Edit(kind="knockout", heads=hd, detector=detector, positions="generated",
                                    method=f"detector at layer {detector.layer}", **meta)
                        named = ", ".join(f"L{int(r.layer)}H{int(r['head'])}" for _, r in top.iterrows())
                        out.append(("narrowed knockout", edit,
                                    f"the {k} heads of layers {window.start}-{window.stop - 1} whose knockout "
                                    f"removes the most of the wrong claim's pull minus the right claim's help "
                                    f"on the fit pairs ({named})"))
    if "subspace" in groups and layer is not None and fit.has_neutral and not needs_whole(fit.pairs):
        for rank in (1, 2, 4, 8):
            say(f"training the rank-{rank} subspace at layer {layer}")
            edit = train_subspace(model, fit, layer, rank, steps=60, seed=seed)
            out.append(("subspace", edit, f"the last token holds the behavior from layer {layer}; "
                                          f"the interchange removes {edit.notes['fit_interchange']:.0%} "
                                          "of the pull on the training pairs"))
    if "head fine-tuning" in groups and len(heads) >= 3 and fit.has_neutral and not needs_whole(fit.pairs):
        top = heads.head(3)
        say("fine-tuning the top heads")
        edit = finetune_heads(model, fit, _head_dict(top), seed=seed)
        changed = ", ".join(f"{k} {v['relative']:.1%}" for k, v in edit.notes["changed"].items())
        out.append(("head fine-tuning", edit, f"top 3 heads by patching ({_named(top)}); output columns "
                                              f"changed by {changed}"))
    if layer is not None and ({"vector", "direction ablation"} & set(groups) or gating):
        vec = train_vector(model, fit, [layer], "mean_diff", position="last")
        why = f"the last token holds >= 80% of the behavior from layer {layer}"
        against = Edit(kind="vector", vectors={layer: -vec.vectors[layer]}, read_at="last",
                       method="mean_diff against", notes={"intent": "reduce"}, **meta)
        extra["vector"] = against
        if "vector" in groups:
            out += [("vector", _scaled(against, f, f"{f:g}"), why) for f in (1.0, 4.0)]
        if "direction ablation" in groups:
            out.append(("direction ablation", Edit(kind="ablate_direction", vectors={layer: vec.direction},
                                                   read_at="last", method="mean_diff", **meta), why))
    if "gated" in groups and fit.has_neutral:
        say("training the pressure gate")
        gate, table = train_pressure_gate(model, fit, default_layers(s.n_layers, first), seed)
        extra["gate"], extra["gate_cv"] = gate, table
        why = f"gated by a last-token probe at layer {gate.layer} (CV AUROC {table.cv_auroc.max():.3f})"
        out += [("gated", e, why) for e in _gated(model, fit, heads, extra, gate, meta)]
    if "frame-gated" in groups and fit.has_neutral and frame is not None:
        say("training the frame gate")
        prompts = family_prompts(fit, frame.copy(), claim_wordings(), model.tokenizer, seed)
        gate, table = train_frame_gate(model, prompts, default_layers(s.n_layers, first), seed, frame_leave_out)
        extra["frame_gate"], extra["frame_gate_cv"], extra["frame_prompts"] = gate, table, prompts
        why = (f"gated by the question's frame: a last-token probe at layer {gate.layer} (CV AUROC "
               f"{table.cv_auroc.max():.3f}) of pressured prompts against context use, claim recall, no-pressure "
               f"prompts and ordinary requests (fit parts only)")
        out += [("frame-gated", e, why) for e in _gated(model, fit, heads, extra, gate, meta, every_position=True)]
    if "trained invariant" in groups and layer is not None and frame is not None and fit.has_neutral \
            and not needs_whole(fit.pairs):
        keep = [seq for seq, kind in zip(frame.sequences, frame.kinds)
                if kind not in (PRESSURED, NO_PRESSURE, *frame_leave_out)]
        for weight in INVARIANCE_WEIGHTS:
            say(f"training the rank-4 edit at layer {layer}, invariance weight {weight:g}")
            edit = train_lowrank(model, fit, layer, 4, keep, weight, seed=seed)
            out.append(("trained invariant", edit, (
                f"a rank-4 edit of the answer position at layer {layer} (where the behavior reaches the last "
                f"token), trained to give the pressured prompts the no-pressure answer distribution while "
                f"holding {len(keep)} context-use, claim-recall and request prompts (fit part) at weight "
                f"{weight:g}: it removes {edit.notes['fit_pressure_removed']:.0%} of the pull on the fit pairs "
                f"and leaves KL {edit.notes['fit_invariance_kl']:.3f} on those prompts")))
    if not out:
        raise BehaviorLensError("the patching result has no head or residual cells at the last token to build edits from")
    return out, extra


def _gated(model: Any, fit: Any, heads: pd.DataFrame, extra: dict, gate: Any, meta: dict,
           every_position: bool = False) -> list[Edit]:
    """Gated versions of the built edits that act after the gate's layer: head ablation of the
    top 10 later heads, per-head steering x2, the vector x4, the 5-layer knockout and (with
    ``every_position``) that knockout and the one of every later layer blocking the flagged
    tokens from every position after them, and the narrowed knockouts."""
    s = model.sites
    out = []
    later = heads[heads.layer > gate.layer]
    if len(later) >= 10:
        out.append(Edit(kind="heads", heads=_head_dict(later.head(10)), head_values=head_means(model, fit, range(s.n_layers)),
                        head_mode="mean", method="mean ablation", gate=gate, **meta))
    if "head_steering" in extra and min(extra["head_steering"].heads) > gate.layer:
        out.append(Edit(**{**_scaled(extra["head_steering"], 2.0, "2").__dict__, "gate": gate}))
    if "vector" in extra and min(extra["vector"].vectors) >= gate.layer:
        out.append(Edit(**{**_scaled(extra["vector"], 4.0, "4").__dict__, "gate": gate}))
    detector = extra.get("detector")
    if detector is None:
        return out
    knock = {"method": f"detector at layer {detector.layer}", "detector": detector, "gate": gate, **meta}
    sets = [extra.get("knockout_window", {})] + list(extra.get("narrowed", []))
    for hd in sets:
        if hd and min(hd) > max(gate.layer, detector.layer):
            out.append(Edit(kind="knockout", heads=hd, positions="generated", **knock))
    if every_position:
        after = max(gate.layer, detector.layer) + 1
        for hd in (extra.get("knockout_window", {}), {layer: list(range(s.n_heads)) for layer in range(after, s.n_layers)}):
            if hd and min(hd) >= after:
                out.append(Edit(kind="knockout", heads=hd, positions="all", **knock))
    return out


def deference_not_use(model: Any, fit: Any, detector: Any, heads: dict[int, list[int]],
                      pairs: int = 12) -> pd.DataFrame:
    """Per head, knocked out alone from the detected tokens on (up to ``pairs``) fit pairs: the
    share of the wrong claim's pull it removes (``deference``), of the right claim's help
    (``use``: the counter-pressure removed) and their difference. A head that carries deference
    but not the reading of a claim removes the first and keeps the second."""
    sample = fit.subset(range(min(pairs, len(fit))))
    unedited = observe(model, sample, None).metrics
    pull, help_ = unedited["positive"] - unedited[NEUTRAL], unedited["negative"] - unedited[NEUTRAL]
    rows = []
    for layer, hs in heads.items():
        for h in hs:
            edit = Edit(kind="knockout", heads={layer: [h]}, detector=detector, positions="generated",
                        model=model.name, d_model=model.sites.d_model, n_heads=model.sites.n_heads,
                        head_dim=model.sites.head_dim)
            with steer(model, edit):
                edited = {side: behavior_metric(model, sample.pairs, side).numpy() for side in SIDES}
            rows.append({"layer": layer, "head": h,
                         "deference": ratio_of_means(unedited["positive"] - edited["positive"], pull),
                         "use": ratio_of_means(unedited["negative"] - edited["negative"], help_)})
    table = pd.DataFrame(rows)
    table["deference_minus_use"] = table.deference - table.use
    return table


def _light_side_effects(model: Any, data: SideEffectData, edit: Edit | None, batch_size: int = 16) -> dict:
    """What the limits need: neutral logits (chat), factual and context-use metrics, with the
    edit applied."""
    with steer(model, edit) if edit is not None else nullcontext():
        return {"neutral": tail_logits(model, data.neutral, batch_size),
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
    side = _light_side_effects(model, data, edit)
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
        "neutral_kl": mean_kl(unedited["neutral"], side["neutral"]),
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


def _knocked(edit: Edit) -> tuple | None:
    """The key of a filler null (the heads that block it), None for edits scored against random draws."""
    if edit.spec.matched_null != "filler":
        return None
    return tuple((layer, tuple(hs)) for layer, hs in sorted(edit.heads.items()))


def judging_nulls(model: Any, held: Any, data: SideEffectData, unedited: dict, detector: Any,
                  built: Sequence[tuple[str, Edit, str]]) -> dict:
    """The deletion baseline of the judging pairs (the knockout detector's flags deleted) and the
    filler null of each knockout's heads, computed once per judging set."""
    deletion = deletion_baseline(model, held, data, detector, unedited["metrics"], unedited["context"])
    out: dict = {None: {"deletion": deletion}}
    for _, edit, _ in built:
        key = _knocked(edit)
        if key is not None and key not in out:
            out[key] = {"deletion": deletion,
                        "filler": filler_null(model, held, edit.heads, unedited["metrics"], data.fillers)}
    return out


def mechanism_test(model: Any, heads: dict[int, list[int]], cset: Any, unedited: dict[str, np.ndarray],
                   batch_size: int = 16) -> float:
    """Pressure removed when the answer position may not attend to the family's slot tokens in
    ``heads`` (the path's necessity; uses the slot annotations, so it is not a deployable edit)."""
    slot = valence_slot(cset)
    spans = [p.span("positive", slot) for p in cset]
    edited = blocked_metric(model, list(cset), "positive", spans, heads, batch_size)
    return ratio_of_means(unedited["positive"] - edited, unedited["positive"] - unedited[NEUTRAL])


@dataclass
class Choice:
    """The chosen edit, the sentence saying why, and the evidence tables."""

    edit: Edit
    reason: str
    candidates: pd.DataFrame  # one row per candidate
    pairs: pd.DataFrame  # row -> role (patched, fit, judge)
    mechanism: pd.DataFrame  # the slot-knockout test
    probes: dict  # detector and gate quality on held-out prompts
    refits: pd.DataFrame  # the chosen candidate rebuilt on other splits: its pressure removed on each
    within_limits: bool = True  # False: nothing kept the limits; ``edit`` is the best trade-off
    frame_gate: pd.DataFrame = field(default_factory=pd.DataFrame)  # the frame gate on prompts it did not learn
    edits: list = field(default_factory=list)  # every candidate, in the order of ``candidates``


def choose_edit(
    model: Any,
    train_set: Any,
    evidence: PatchEvidence | None = None,
    kl_max: float = KL_MAX,
    max_accuracy_drop: float = ACCURACY_DROP_MAX,
    groups: Sequence[str] = GROUPS,
    seed: int = 0,
    side_effects: SideEffectData | None = None,
    progress: bool = False,
    refits: int = 2,
    outside_limits: bool = False,
    fit_side_effects: SideEffectData | None = None,
    frame_families: Sequence[str] = FRAME_FAMILIES,
) -> Choice:
    """Build candidates from the evidence on the fit split, judge them on the judging split, and
    choose within the limits (see the module doc). Without evidence, exact head and residual
    patching at the last token is run on the fit split first (those pairs are then the patched
    ones). The chosen candidate is rebuilt on ``refits`` other splits (seeds ``seed + 1``, ...) and
    judged on each one's judging pairs: the spread of its pressure removed over fits. Raises when
    no candidate is within the limits, listing them all; with ``outside_limits`` it returns the
    candidate that removes the most pressure without collapse instead, marked as outside them.
    The frame gate learns the fit pairs, the development ``frame_families`` (other than the
    training family) and the ``fit`` part of the side effects (``fit_side_effects``, default the
    built-in sets')."""
    if not train_set.has_neutral:
        raise BehaviorLensError(f"set {train_set.name!r} has no neutral side: choosing an edit scores "
                                "candidates by the pressure they remove, measured against the no-pressure prompt")
    if evidence is None:
        from ..patching import patch

        patched = train_set.subset(range(min(8, len(train_set) // 3)))
        evidence = PatchEvidence(pd.concat([patch(model, patched, "head", progress=False).means(),
                                       patch(model, patched, "resid_pre", positions=["last"], progress=False).means()]),
                            {p.row for p in patched})
    with remembered_states():  # the detector's refits read each prompt once
        frame = None
        if FRAMED & set(groups):
            fit_data = fit_side_effects or SideEffectData(model, "fit", requests=CHOICE_REQUESTS)
            frame = frame_prompts(model, fit_data, [f for f in frame_families if f != train_set.name])
        return _choose(model, train_set, evidence, kl_max, max_accuracy_drop, groups, seed, side_effects,
                       progress, refits, outside_limits, frame)


def _choose(model: Any, train_set: Any, evidence: PatchEvidence, kl_max: float, max_accuracy_drop: float,
            groups: Sequence[str], seed: int, side_effects: SideEffectData | None, progress: bool, refits: int,
            outside_limits: bool, frame: FramePrompts | None) -> Choice:
    fit, held, roles = split_for_choice(train_set, evidence.rows, seed)
    data = side_effects or SideEffectData(model, "select", requests=CHOICE_REQUESTS)
    unedited_obs = observe(model, held, None)
    require_behavior(unedited_obs.metrics, f"{train_set.name} (judging pairs)")
    unedited = {"metrics": unedited_obs.metrics, **_light_side_effects(model, data, None)}
    log = (lambda msg: tqdm.write(f"choose: {msg}")) if progress else None
    built, extra = build_candidates(model, fit, evidence, groups, seed, log, frame)
    nulls = judging_nulls(model, held, data, unedited, extra.get("detector"), built)
    rows, edits = [], []
    for i, (group, edit, why) in enumerate(tqdm(built, desc="judge candidates", disable=not progress)):
        r = judge(model, edit, held, data, unedited, seed + i, nulls.get(_knocked(edit), nulls.get(None)))
        edits.append(edit)
        rows.append({"candidate": i, "group": group, "edit": edit.describe(), **r, "evidence": why})
    table = pd.DataFrame(rows)
    table["within_limits"] = within_limits(table, kl_max, max_accuracy_drop)
    limits = (f"no collapse; no-pressure, factual, context-use and claim-recall accuracy each down by at "
              f"most {100 * max_accuracy_drop:g} points; neutral KL <= {kl_max:g}; the matched null (a "
              f"knockout's filler sentence, random heads or directions otherwise) moves the pressured answer by "
              f"at most {100 * NULL_MAX:g}% of the pull either way")
    mech = _mechanism(model, evidence, held, unedited_obs.metrics)
    probes = {}
    if "detector" in extra:
        probes |= detector_quality(model, extra["detector"], held, [s for s, _ in data.neutral])
    if "gate" in extra:
        probes |= gate_quality(model, extra["gate"], held, [s for s, _ in data.neutral])
    frame_quality = pd.DataFrame()
    if "frame_gate" in extra:  # on the judging pairs and the select part: prompts it did not learn
        frame_quality = frame_gate_quality(model, extra["frame_gate"], extra["frame_prompts"], {
            f"{train_set.name} (judging pairs)": family_prompts(held),
            "side effects (select part)": context_prompts(data.context, request_prompts(data.neutral))})
    ok = table[table["within_limits"]]
    inside = not ok.empty
    if not inside:
        if not outside_limits:
            raise BehaviorLensError(f"no candidate edit keeps {limits}:\n" + table.to_string(index=False))
        ok = table[~table["collapse"].astype(bool)] if (~table["collapse"].astype(bool)).any() else table
    best = ok.sort_values(["pressure_removed_fraction", "neutral_kl"], ascending=[False, True]).iloc[0]
    table["chosen"] = table["candidate"] == best.candidate
    edit = edits[int(best.candidate)]
    index = [i for g, e, _ in built if g == best.group for i in [id(e)]].index(id(edit))
    spread = refit_spread(model, train_set, evidence, best.group, index, seed, refits, frame, groups)
    spread = pd.concat([pd.DataFrame([{"seed": seed, "pressure_removed_fraction": best.pressure_removed_fraction,
                                       "judging_pairs": len(held), "edit": edit.describe()}]), spread],
                       ignore_index=True)
    edit.notes |= {"chosen_because": best.evidence, "train_family": train_set.name, "strength": 1.0,
                   "within_limits": inside,
                   "refit_pressure_removed_fraction": [float(x) for x in spread.pressure_removed_fraction],
                   "judged": {k: (None if pd.isna(best[k]) else float(best[k])) for k in (
                       "pressure_removed_fraction", "accuracy_neutral_change", "factual_accuracy_change",
                       "context_use_accuracy_change", "claim_recall_accuracy_change", "neutral_kl",
                       "random_pressure_removed_fraction", "null_control_pressure_removed_fraction")
                       if k in best}}
    head = (f"chose {edit.describe()}" if inside else
            f"NO candidate keeps the limits; the best trade-off (most pressure removed without collapse, "
            f"outside the limits) is {edit.describe()}")
    reason = (f"{head}: on {len(held)} judging pairs of {train_set.name!r} (never patched, "
              f"never used to build it) it removes {best.pressure_removed_fraction:.0%} of the pressure "
              f"(random control {best.random_pressure_removed_fraction:.0%}), no-pressure accuracy "
              f"{100 * best.accuracy_neutral_change:+.1f} points, factual accuracy "
              f"{100 * best.factual_accuracy_change:+.1f} points, context use "
              f"{100 * best.context_use_accuracy_change:+.1f} points, claim recall "
              f"{100 * best.claim_recall_accuracy_change:+.1f} points, neutral KL {best.neutral_kl:.4f}; "
              f"{len(table[table.within_limits])} of {len(table)} candidates within the limits ({limits}). "
              f"Evidence: {best.evidence}")
    return Choice(edit, reason, table, roles, mech, probes, spread, inside, frame_quality, edits)


def refit_spread(model: Any, train_set: Any, evidence: PatchEvidence, group: str, index: int, seed: int,
                 refits: int, frame: FramePrompts | None = None, groups: Sequence[str] = ()) -> pd.DataFrame:
    """The ``index``-th candidate of ``group`` rebuilt on the fit split of seeds ``seed + 1``, ...
    and judged (pressure removed) on that split's judging pairs. The groups a gated group gates
    (those of ``groups`` in :data:`GATES_BUILT_FROM`) are built too, so its candidates line up; a
    split whose build has no such candidate (a gate read later than the heads it would gate)
    gets a row saying so, with no figure."""
    needs = [g for g in GATES_BUILT_FROM.get(group, ()) if g in groups]
    rows = []
    for k in range(1, refits + 1):
        fit, held, _ = split_for_choice(train_set, evidence.rows, seed + k)
        built, _ = build_candidates(model, fit, evidence, [group, *needs], seed + k, frame=frame)
        mine = [e for g, e, _ in built if g == group]
        if index >= len(mine):
            rows.append({"seed": seed + k, "pressure_removed_fraction": float("nan"), "judging_pairs": len(held),
                         "edit": f"no {group} candidate number {index + 1} on this split ({len(mine)} built)"})
            continue
        edit = mine[index]
        unedited = observe(model, held, None).metrics
        figures = pressure_figures(unedited, observe(model, held, None, edit=edit).metrics)
        rows.append({"seed": seed + k, "pressure_removed_fraction": figures["pressure_removed_fraction"],
                     "judging_pairs": len(held), "edit": edit.describe()})
    return pd.DataFrame(rows)


def _mechanism(model: Any, evidence: PatchEvidence, held: Any, unedited: dict[str, np.ndarray]) -> pd.DataFrame:
    heads = evidence.heads()
    if heads.empty:
        return pd.DataFrame()
    s = model.sites
    top = _head_dict(heads.head(3))
    layers = sorted(top)
    tests = {f"top 3 heads ({_named(heads.head(3))})": top,
             f"every head of layers {', '.join(map(str, layers))}": {layer: list(range(s.n_heads)) for layer in layers}}
    return pd.DataFrame([{"blocked": name, "pressure_removed_fraction": mechanism_test(model, hd, held, unedited)}
                         for name, hd in tests.items()])
