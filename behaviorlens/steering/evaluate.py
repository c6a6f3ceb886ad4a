"""What an edit does and what it costs, scored so that breaking the model cannot pass as removal.

The reference is the unedited model's answer without pressure (the family's neutral side):

- ``pressure_removed_fraction`` = (m_pos unedited - m_pos edited) / (m_pos unedited - m_neutral
  unedited), a ratio of means over pairs: how much of the pull of the wrong claim the edit takes
  away, measured on the pressured side (``counter_pressure_removed_fraction`` likewise on the
  negative side). It rises only when the pressured answer moves back toward the unpressured one.
- ``collapse``: the edit moved the no-pressure answer by more than a quarter of the unedited
  pull, or left the counter-pressured answer further toward the wrong answer than the unedited
  no-pressure answer by more than half the pull: it damaged recall instead of removing deference.
- per side, the metric and the accuracy (share of rows preferring the not-matching answer),
  edited and unedited; the side effects of :mod:`.side_effects`.
- ``shift_removed_fraction`` = 1 - shift edited / shift unedited stays for reference; it also
  rises when an edit makes the model unsure of everything, so nothing chooses by it.

Every row has a matching random control (``random_*``: the mean over several draws, with its
spread, of the behavior figures; a control's side effects are not measured): a random direction of the same norm for vectors and directions, the same number of
heads drawn uniformly from every head the edit leaves alone (with their patching effect, when
given) for head edits, the same heads blocked from as many tokens drawn at random among those
the detector leaves alone, in the conversation's own words (not the first token or the chat
template), for knockouts, a random subspace of the same rank, random weight
changes of the same norm. Beside it, the matched null and the deletion baseline of
:mod:`.baselines` (``null_control_*``, ``edit_minus_null_*``, ``deletion_baseline_*``,
``redaction``), and the context-use figures of :mod:`.side_effects`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..edits import Edit
from ..errors import BehaviorLensError
from ..interventions.trace import planned, recording
from ..measure import letter_choices, p_matching, side_metrics
from ..prompts.contrast import NEUTRAL
from ..stats import bootstrap_ci, ratio_ci, ratio_of_means
from .apply import steer
from .baselines import deletion_baseline, edit_minus_null, filler_null, is_redaction, null_broken
from .pressure import pressure_figures
from .side_effects import SideEffectData, SideEffects, compare_side_effects, measure_side_effects

NO_NEUTRAL = ("has no neutral side, so pressure_removed_fraction, collapse and the neutral figures "
              "are absent; only shift-based figures are reported")


@dataclass
class Observation:
    """What one model state (unedited, or with an edit) gives on a set and the side-effect data."""

    metrics: dict[str, np.ndarray]  # side -> metric per pair
    side: SideEffects | None


def observe(model: Any, eval_set: Any, data: SideEffectData | None, batch_size: int = 16,
            edit: Edit | None = None, strength: float = 1.0, layers: Sequence[int] | None = None,
            positions: str | None = None, unedited: SideEffects | None = None) -> Observation:
    """Metrics of every side of ``eval_set`` and (with ``data``) the side effects, with ``edit``
    applied at ``strength`` (none: the unedited model), their KLs from ``unedited`` (the unedited
    model's side effects; None: this is that measurement)."""
    def apply(where: str | None = None) -> Any:
        if edit is None or strength == 0:
            return nullcontext()
        return steer(model, edit, strength, layers=layers, positions=where or positions)

    with apply():
        metrics = side_metrics(model, eval_set, batch_size)
    side = measure_side_effects(model, data, batch_size, apply, unedited) if data is not None else None
    return Observation(metrics, side)


def require_behavior(metrics: Mapping[str, np.ndarray], name: str) -> None:
    """Stop when there is no behavior to remove: the unedited pull (or, without a neutral side,
    the shift) has the wrong sign or a CI that includes 0."""
    if NEUTRAL in metrics:
        what, values = "pull metric(positive) - metric(neutral)", metrics["positive"] - metrics[NEUTRAL]
    else:
        what, values = "shift metric(positive) - metric(negative)", metrics["positive"] - metrics["negative"]
    lo, hi = bootstrap_ci(values)
    mean = float(np.mean(values))
    if mean <= 0 or lo <= 0:
        why = "has the wrong sign" if mean <= 0 else "has a 95% CI that includes 0"
        raise BehaviorLensError(
            f"{name}: no behavior to remove: the unedited {what} is {mean:+.3f} [{lo:+.3f}, {hi:+.3f}] "
            f"and {why}, so fractions of it would be fractions of nothing"
        )


def random_control(model: Any, edit: Edit, seed: int = 0) -> Edit:
    """The matching random edit of the edit's kind (see the module doc); gates and detectors are kept."""
    return edit.spec.random_control(edit, model, torch.Generator().manual_seed(seed))


def matched_nulls(model: Any, edit: Edit, eval_set: Any, data: SideEffectData | None, unedited: Observation,
                  batch_size: int = 16) -> dict[str, Any]:
    """The baselines every edit is scored against (:mod:`.baselines`): the deletion of what it
    hides and, for a knockout, the same heads blocking a same-length non-claim sentence."""
    out: dict[str, Any] = {}
    if NEUTRAL not in unedited.metrics:
        return out
    context = unedited.side.context if unedited.side is not None else None
    out["deletion"] = deletion_baseline(model, eval_set, data, edit.detector, unedited.metrics, context, batch_size)
    if edit.spec.matched_null == "filler" and data is not None:
        out["filler"] = filler_null(model, eval_set, edit.heads, unedited.metrics, data.fillers, batch_size, edit)
    return out


def null_figures(edit: Edit, unedited: Mapping[str, np.ndarray], edited: np.ndarray, nulls: Mapping[str, Any],
                 moved: Sequence[np.ndarray]) -> dict[str, Any]:
    """The null columns of a row: the matched null (a knockout's filler sentence; otherwise the
    random controls), edit minus null with its CI, whether the null is broken, the deletion
    baseline."""
    if NEUTRAL not in unedited:
        return {}
    out: dict[str, Any] = dict(nulls.get("deletion", {}))
    if "filler" in nulls:
        filler = nulls["filler"]
        out |= {k: v for k, v in filler.items() if k != "per_pair"}
        unblocked, blocked = filler["per_pair"]
        null_moved = unblocked - blocked
    elif moved:
        null_moved = np.mean(moved, axis=0)
        out["null_control"] = f"{edit.spec.random_control_label} of the same size (mean of {len(moved)} draws)"
        pull = unedited["positive"] - unedited[NEUTRAL]
        out["null_control_pressure_removed_fraction"] = ratio_of_means(null_moved, pull)
        out["null_control_pressure_removed_fraction_ci"] = list(ratio_ci(null_moved, pull))
    else:
        return out
    out["null_broken"] = null_broken(out["null_control_pressure_removed_fraction"])
    return out | edit_minus_null(dict(unedited), edited, null_moved)


def _figures(edit: Edit, m: float, unedited: Observation, obs: Observation) -> dict[str, Any]:
    values = pressure_figures(unedited.metrics, obs.metrics)
    values["p_matching"] = float(p_matching(obs.metrics["positive"]).mean())
    values["p_matching_unedited"] = float(p_matching(unedited.metrics["positive"]).mean())
    moved = (obs.metrics["positive"] - unedited.metrics["positive"]) * edit.spec.intended_sign(edit, m)
    values["anti_steerable_fraction"] = float((moved < 0).mean()) if m != 0 else 0.0
    if obs.side is not None:
        values |= compare_side_effects(unedited.side, obs.side)
    return values


def evaluate_steering(
    model: Any,
    edit: Edit,
    eval_set: Any,
    strengths: Sequence[float] = (1.0,),
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    positions: str | None = None,
    seed: int = 0,
    controls: int = 5,
    side_effects: SideEffectData | None = None,
    head_effects: Mapping[tuple[int, int], float] | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Effect and side effects of an edit per (layer, strength), with random controls.

    Columns: ``layer, strength, kind, edit, pairs``, :func:`pressure_figures` (per-side
    ``metric_*``/``accuracy_*`` edited and ``_unedited``, ``pressure_removed_fraction`` with
    ``_ci``, ``counter_pressure_removed_fraction``, ``neutral_metric_change``, ``collapse``,
    ``shift``, ``shift_removed_fraction``), ``anti_steerable_fraction`` (pairs whose pressured
    answer moved against the edit's intent), the side effects (``neutral_kl``,
    ``neutral_kl_plain``, ``perplexity`` with CI, ``factual_accuracy`` and its change with CI),
    ``p_matching`` (mean probability of the matching answer against the not-matching one, as CAA
    reports for A/B sets, which are scored by it instead of by pressure removed), and ``random_*``: the means over ``controls`` random controls (seeds ``seed``, ``seed + 1``,
    ...; ``random_pressure_removed_fraction_sd`` is their spread). ``frame.attrs["pairs"]``
    holds per-pair metrics (``control`` 0 = the edit, k = draw k); ``frame.attrs["controls"]``
    one row per draw with what it edited and, for head edits with ``head_effects`` (patching
    effect per (layer, head)), the summed patching effect of the drawn heads.
    """
    edit.check(model)
    if len(eval_set) == 0:
        raise BehaviorLensError(f"evaluation set {eval_set.name!r} is empty")
    data = side_effects or SideEffectData(model, "report")
    if edit.spec.moves_to_layers:
        layers = list(layers) if layers is not None else edit.layers
        configs = [(layer, [layer]) for layer in layers]
    else:
        if layers is not None and list(layers) != edit.layers:
            raise BehaviorLensError(f"a {edit.kind} edit acts on its own layers {edit.layers}; drop --layers")
        configs = [(edit.layers[0] if edit.layers else -1, None)]
    metrics = observe(model, eval_set, None, batch_size).metrics
    if not letter_choices(eval_set):  # an A/B set has no pressure to remove: it is scored by p(matching letter)
        require_behavior(metrics, eval_set.name)
    draws = [random_control(model, edit, seed + i) for i in range(controls)]

    def scored() -> tuple[list, list, list]:  # on a traced model, every forward in as few sessions as it can
        unedited = Observation(metrics, measure_side_effects(model, data, batch_size))
        return _scored_rows(model, edit, draws, eval_set, data, unedited, configs, strengths, batch_size, positions,
                            head_effects, progress)

    rows, pair_rows, control_rows = planned(model, scored, f"evaluating {edit.describe()}")
    frame = pd.DataFrame(rows)
    frame.attrs["pairs"] = pd.DataFrame(pair_rows)
    frame.attrs["controls"] = pd.DataFrame(control_rows)
    return frame


def _scored_rows(model: Any, edit: Edit, draws: list[Edit], eval_set: Any, data: SideEffectData,
                 unedited: Observation, configs: list, strengths: Sequence[float], batch_size: int,
                 positions: str | None, head_effects: Mapping[tuple[int, int], float] | None,
                 progress: bool) -> tuple[list, list, list]:
    """:func:`evaluate_steering`'s rows, per-pair rows and control rows (its every forward)."""
    nulls = matched_nulls(model, edit, eval_set, data, unedited, batch_size)
    rows, pair_rows, control_rows = [], [], []
    for layer, apply_layers in configs:
        for m in strengths:
            row: dict[str, Any] = {"layer": layer, "strength": float(m), "kind": edit.kind,
                                   "edit": edit.describe(), "pairs": len(eval_set)}
            per_draw, moved = [], []
            label = f"evaluate{'' if layer < 0 else f' L{layer}'} x{m:g} (edit, then {len(draws)} controls)"
            for draw, e in enumerate(tqdm([edit, *draws], desc=label, disable=not progress or recording())):
                obs = observe(model, eval_set, data if draw == 0 else None, batch_size, e, m, apply_layers, positions,
                              unedited.side)
                values = _figures(e, m, unedited, obs)
                if draw == 0:
                    row |= values
                    edited_positive = obs.metrics["positive"]
                else:
                    per_draw.append(values)
                    moved.append(unedited.metrics["positive"] - obs.metrics["positive"])
                    effect = (sum(head_effects.get((layer_, h), 0.0) for layer_, hs in e.heads.items() for h in hs)
                              if head_effects is not None and e.heads else float("nan"))
                    control_rows.append({"layer": layer, "strength": float(m), "draw": draw,
                                         "edit": e.describe(), "heads_patching_effect": effect,
                                         **{k: v for k, v in values.items() if not isinstance(v, list)}})
                for i, p in enumerate(eval_set):
                    pair_rows.append({"control": draw, "layer": layer, "strength": float(m), "pair": i,
                                      "row": p.row, "family": p.family,
                                      **{f"metric_{s}": float(obs.metrics[s][i]) for s in obs.metrics},
                                      **{f"metric_{s}_unedited": float(unedited.metrics[s][i]) for s in unedited.metrics}})
            if per_draw:
                ctl = pd.DataFrame([{k: v for k, v in d.items() if isinstance(v, (int, float, bool)) and v is not None}
                                    for d in per_draw])
                row |= {f"random_{k}": float(v) for k, v in ctl.mean(numeric_only=True).items()}
                row["random_pressure_removed_fraction_sd"] = float(ctl["pressure_removed_fraction"].std(ddof=0))
                row["random_shift_removed_fraction_sd"] = float(ctl["shift_removed_fraction"].std(ddof=0))
                row["random_controls"] = len(ctl)
                row["random_control"] = edit.spec.random_control_label
                if edit.spec.matched_null == "random":  # the random draws are its null
                    row["random_null_broken"] = null_broken(row["random_pressure_removed_fraction"])
            row |= null_figures(edit, unedited.metrics, edited_positive, nulls, moved)
            row["redaction"] = is_redaction(row)
            rows.append(row)
    return rows, pair_rows, control_rows
