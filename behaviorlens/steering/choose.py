"""Choosing an edit from evidence, with nothing that chose a thing scoring it.

The training family's pairs are split three ways (``choice_pairs.csv`` records each pair's role):
the pairs a patching result was computed on (``patched``) and a random part of the rest
(``fit``) build the candidates; the remaining pairs (``judge``) only judge them. Gates and invariance
losses learn the ``fit`` part of the side-effect data, the limits come from its ``select``
part, and the ``report`` part is left for evaluating the choice.

The candidates are built in :mod:`.candidates` and judged in :mod:`.judge`. The choice is the candidate with
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..edits import Edit
from ..errors import BehaviorLensError
from ..interventions.trace import planned, recording
from ..kv_cache import reusing_unedited
from ..patching import patch
from ..patching.results import PatchEvidence
from ..prompts.contrast import NEUTRAL, SIDES
from ..reads import remembered_states, token_states
from .baselines import NULL_MAX
from .candidates import (
    FRAME_FAMILIES,
    FRAMED,
    GATES_BUILT_FROM,
    GROUPS,
    build_candidates,
    head_dict,
    named_heads,
)
from .detectors import detector_quality, gate_quality
from .evaluate import observe, require_behavior
from .frame_gate import (
    FramePrompts,
    context_prompts,
    family_prompts,
    frame_gate_quality,
    frame_prompts,
    request_prompts,
)
from .judge import (
    ACCURACY_DROP_MAX,
    CHOICE_REQUESTS,
    KL_MAX,
    judge,
    judging_nulls,
    knocked,
    light_side_effects,
    mechanism_test,
    within_limits,
)
from .pressure import pressure_figures
from .side_effects import SideEffectData


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
    head_search: pd.DataFrame = field(default_factory=pd.DataFrame)  # the head search's front on the fit split


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
        patched = train_set.subset(range(min(8, len(train_set) // 3)))
        evidence = PatchEvidence(pd.concat([patch(model, patched, "head", progress=False).means(),
                                       patch(model, patched, "resid_pre", positions=["last"], progress=False).means()]),
                            {p.row for p in patched})
    with remembered_states(), reusing_unedited():  # prompts read once; edits recompute only what they change
        frame = fit_data = None
        if FRAMED & set(groups):
            fit_data = fit_side_effects or SideEffectData(model, "fit", requests=CHOICE_REQUESTS)
            frame = frame_prompts(model, fit_data, [f for f in frame_families if f != train_set.name])
        return _choose(model, train_set, evidence, kl_max, max_accuracy_drop, groups, seed, side_effects,
                       progress, refits, outside_limits, frame, fit_data)


def _choose(model: Any, train_set: Any, evidence: PatchEvidence, kl_max: float, max_accuracy_drop: float,
            groups: Sequence[str], seed: int, side_effects: SideEffectData | None, progress: bool, refits: int,
            outside_limits: bool, frame: FramePrompts | None, fit_data: SideEffectData | None) -> Choice:
    fit, held, roles = split_for_choice(train_set, evidence.rows, seed)
    data = side_effects or SideEffectData(model, "select", requests=CHOICE_REQUESTS)
    unedited_obs = observe(model, held, None)
    require_behavior(unedited_obs.metrics, f"{train_set.name} (judging pairs)")
    bar = tqdm(total=1, desc="choose: building", disable=not progress,  # building, then each candidate
               bar_format="{desc} {n_fmt}/{total_fmt} [{elapsed}{postfix}]")  # no rate: the steps differ in cost
    built, extra = build_candidates(model, fit, evidence, groups, seed, lambda msg: bar.set_postfix_str(msg),
                                    frame, fit_data)
    bar.total = 1 + len(built)
    bar.update(1)
    if "detector" in extra:  # what it flags while judging (the deletion baseline) and for its quality, in one read
        token_states(model, [*(p.tokens[s] for s in (*SIDES, NEUTRAL) for p in held),
                             *(p.tokens["positive"] for p in data.context), *(s for s, _ in data.neutral)],
                     [extra["detector"].layer])

    def judge_all() -> tuple[list[dict], pd.DataFrame]:  # on a traced model, every forward in as few sessions as it can
        unedited = {"metrics": unedited_obs.metrics, **light_side_effects(model, data, None)}
        bar.set_postfix_str("the deletion baseline and the filler nulls")
        nulls = judging_nulls(model, held, data, unedited, extra.get("detector"), built)
        rows = []
        for i, (group, edit, why) in enumerate(built):
            bar.set_description(f"choose: judging {group}")
            bar.set_postfix_str(f"candidate {i + 1} of {len(built)}")
            r = judge(model, edit, held, data, unedited, seed + i, nulls.get(knocked(edit), nulls.get(None)))
            bar.update(0 if recording() else 1)
            rows.append({"candidate": i, "group": group, "edit": edit.describe(), **r, "evidence": why})
        return rows, _mechanism(model, evidence, held, unedited_obs.metrics)

    rows, mech = planned(model, judge_all, "judging the candidates")
    edits = [edit for _, edit, _ in built]
    bar.close()
    table = pd.DataFrame(rows)
    table["within_limits"] = within_limits(table, kl_max, max_accuracy_drop)
    limits = (f"no collapse; no-pressure, factual, context-use and claim-recall accuracy each down by at "
              f"most {100 * max_accuracy_drop:g} points; neutral KL <= {kl_max:g}; the matched null (a "
              f"knockout's filler sentence, random heads or directions otherwise) moves the pressured answer by "
              f"at most {100 * NULL_MAX:g}% of the pull either way")
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
    spread = refit_spread(model, train_set, evidence, best.group, index, seed, refits, frame, groups, fit_data)
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
    return Choice(edit, reason, table, roles, mech, probes, spread, inside, frame_quality, edits,
                  extra.get("head_search", pd.DataFrame()))


def refit_spread(model: Any, train_set: Any, evidence: PatchEvidence, group: str, index: int, seed: int,
                 refits: int, frame: FramePrompts | None = None, groups: Sequence[str] = (),
                 fit_data: SideEffectData | None = None) -> pd.DataFrame:
    """The ``index``-th candidate of ``group`` rebuilt on the fit split of seeds ``seed + 1``, ...
    and judged (pressure removed) on that split's judging pairs. The groups a gated group gates
    (those of ``groups`` in :data:`GATES_BUILT_FROM`) are built too, so its candidates line up; a
    split whose build has no such candidate (a gate read later than the heads it would gate)
    gets a row saying so, with no figure."""
    needs = [g for g in GATES_BUILT_FROM.get(group, ()) if g in groups]
    rebuilt = []  # (seed, judging pairs, the rebuilt candidate or why there is none)
    for k in range(1, refits + 1):
        fit, held, _ = split_for_choice(train_set, evidence.rows, seed + k)
        built, _ = build_candidates(model, fit, evidence, [group, *needs], seed + k, frame=frame, fit_data=fit_data)
        mine = [e for g, e, _ in built if g == group]
        rebuilt.append((seed + k, held, mine[index] if index < len(mine) else
                        f"no {group} candidate number {index + 1} on this split ({len(mine)} built)"))

    def judge_refits() -> list[dict]:
        rows = []
        for k, held, edit in rebuilt:
            if isinstance(edit, str):
                rows.append({"seed": k, "pressure_removed_fraction": float("nan"), "judging_pairs": len(held),
                             "edit": edit})
                continue
            unedited = observe(model, held, None).metrics
            figures = pressure_figures(unedited, observe(model, held, None, edit=edit).metrics)
            rows.append({"seed": k, "pressure_removed_fraction": figures["pressure_removed_fraction"],
                         "judging_pairs": len(held), "edit": edit.describe()})
        return rows

    return pd.DataFrame(planned(model, judge_refits, "judging the refits"))


def _mechanism(model: Any, evidence: PatchEvidence, held: Any, unedited: dict[str, np.ndarray]) -> pd.DataFrame:
    table = evidence.head_table()
    if table.empty:
        return pd.DataFrame()
    s = model.sites
    top = head_dict(table.head(3))
    layers = sorted(top)
    tests = {f"top 3 heads ({named_heads(table.head(3))})": top,
             f"every head of layers {', '.join(map(str, layers))}": {layer: list(range(s.n_heads)) for layer in layers}}
    return pd.DataFrame([{"blocked": name, "pressure_removed_fraction": mechanism_test(model, hd, held, unedited)}
                         for name, hd in tests.items()])
