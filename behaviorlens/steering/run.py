"""Stage entry points: train (or choose) an edit, evaluate it, generate side by side."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..chat import chat_ids
from ..edits import Edit
from ..errors import BehaviorLensError
from ..interventions.trace import planned
from ..io import write_csv, write_json
from ..patching.results import PatchEvidence, evidence_of, patch_runs
from .apply import steer
from .candidates import GROUPS
from .choose import choose_edit
from .evaluate import evaluate_steering
from .judge import ACCURACY_DROP_MAX, KL_MAX
from .plots import dose_response, pareto
from .vectors import train_vector


def run_steer_train(
    model: Any,
    train_set: Any,
    out_path: str | Path,
    layer: int | None = None,
    method: str = "mean_diff",
    position: str = "last",
    kind: str = "vector",
    from_patching: Sequence[str | Path] | PatchEvidence | None = None,
    kl_max: float = KL_MAX,
    max_accuracy_drop: float = ACCURACY_DROP_MAX,
    groups: Sequence[str] = GROUPS,
    choice_dir: str | Path | None = None,
    seed: int = 0,
    side_effects: Any = None,
    refits: int = 2,
    outside_limits: bool = False,
) -> dict:
    """Train an edit at ``layer``, or choose one from a patching result, and save it.

    Without ``layer``, :func:`~.choose.choose_edit` builds every candidate of ``groups`` from
    the evidence (patching results as the patching stage hands them on, or their folders: a
    ``run_patch`` folder or an experiment's patch step; or none: it patches the training family itself),
    judges them on pairs that built nothing, and picks within the limits. The choice's tables
    go to ``choice_dir`` (default: beside the edit file, ``<name>.choice/``): ``candidates.csv``
    (one row per candidate), ``choice_pairs.csv``, ``mechanism.csv``, ``probes.json``,
    ``refits.csv`` (the chosen candidate rebuilt on ``refits`` other splits), ``frame_gate.csv`` (the frame
    gate on prompts it did not learn, beside a wording-only baseline), ``head_search.csv`` (the head
    search's front on the fit split: a row per edit and λ), ``pareto.png`` and every
    candidate as an edit file (``candidates/NN.safetensors``, NN its row in ``candidates.csv``).
    ``outside_limits``: when no candidate keeps the limits, save the best trade-off (marked so in
    its notes) instead of stopping.
    """
    reason = ""
    if layer is None:
        evidence = _evidence(from_patching)
        choice = choose_edit(model, train_set, evidence, kl_max=kl_max, max_accuracy_drop=max_accuracy_drop,
                             groups=groups, seed=seed, side_effects=side_effects, progress=True,
                             refits=refits, outside_limits=outside_limits)
        edit, reason = choice.edit, choice.reason
        folder = Path(choice_dir) if choice_dir is not None else Path(out_path).with_suffix(".choice")
        write_csv(folder / "candidates.csv", choice.candidates)
        write_csv(folder / "choice_pairs.csv", choice.pairs)
        write_csv(folder / "mechanism.csv", choice.mechanism)
        write_json(folder / "probes.json", choice.probes)
        write_csv(folder / "refits.csv", choice.refits)
        if not choice.frame_gate.empty:
            write_csv(folder / "frame_gate.csv", choice.frame_gate)
        if not choice.head_search.empty:
            write_csv(folder / "head_search.csv", choice.head_search)
        for i, candidate in enumerate(choice.edits):  # each one usable by steer eval and steer generate
            candidate.save(folder / "candidates" / f"{i:02d}.safetensors")
        pareto(choice.candidates, folder / "pareto.png", kl_max, max_accuracy_drop)
    else:
        edit = train_vector(model, train_set, [layer], method, position)
        if kind == "ablate_direction":
            edit = Edit(kind="ablate_direction", vectors={layer: edit.direction}, model=edit.model,
                        family=edit.family, read_at=position, method=method, d_model=edit.d_model,
                        n_heads=edit.n_heads, head_dim=edit.head_dim, notes=edit.notes)
        elif kind != "vector":
            raise BehaviorLensError(f"steer train --kind is 'vector' or 'ablate_direction', not {kind!r}")
    edit.notes["model_type"] = getattr(model.config, "model_type", "")
    if reason:
        edit.notes["reason"] = reason
    edit.save(out_path)
    return {
        "path": str(out_path), "kind": edit.kind, "edit": edit.describe(), "layers": edit.layers,
        "method": edit.method, "reason": reason,
    }


def _evidence(from_patching: Sequence[str | Path] | PatchEvidence | None) -> PatchEvidence | None:
    """The chooser's evidence from what the patching stage hands on (read with its own loaders)."""
    if from_patching is None or isinstance(from_patching, PatchEvidence):
        return from_patching
    runs = patch_runs(from_patching)
    if not runs:
        raise BehaviorLensError("choosing an edit needs a patching result")
    return evidence_of(runs)


SUMMARY_KEYS = (
    "pressure_removed_fraction", "pressure_removed_fraction_ci", "counter_pressure_removed_fraction",
    "collapse", "neutral_metric_change", "pull_unedited",
    "accuracy_positive", "accuracy_negative", "accuracy_neutral",
    "accuracy_positive_unedited", "accuracy_negative_unedited", "accuracy_neutral_unedited",
    "accuracy_positive_change", "accuracy_negative_change", "accuracy_neutral_change",
    "metric_positive", "metric_negative", "metric_neutral",
    "metric_positive_unedited", "metric_negative_unedited", "metric_neutral_unedited",
    "factual_accuracy", "factual_accuracy_unedited", "factual_accuracy_change", "factual_accuracy_change_ci",
    "neutral_kl", "neutral_kl_plain", "perplexity", "perplexity_unedited", "perplexity_ci",
    "shift_removed_fraction", "shift_unedited", "anti_steerable_fraction", "p_matching", "p_matching_unedited",
    "context_use_accuracy", "context_use_accuracy_unedited", "context_use_accuracy_change",
    "context_use_accuracy_change_ci", "context_use_metric_change",
    "claim_recall_accuracy", "claim_recall_accuracy_unedited", "claim_recall_accuracy_change",
    "claim_recall_accuracy_change_ci", "claim_recall_metric_change",
    "null_control", "null_control_pressure_removed_fraction", "null_control_pressure_removed_fraction_ci",
    "null_broken", "random_null_broken", "random_control", "edit_minus_null_pressure_removed_fraction",
    "edit_minus_null_pressure_removed_fraction_ci", "deletion_baseline_pressure_removed_fraction",
    "deletion_baseline_counter_pressure_removed_fraction", "deletion_baseline_context_use_accuracy_change",
    "deletion_baseline_claim_recall_accuracy_change", "deletion_baseline_flagged_context_prompts", "redaction",
)


def summarize(frame: pd.DataFrame, strength: float = 1.0) -> dict:
    """Headline figures: the row of the given strength (the one chosen on the training
    family; never the best row of the evaluation family), with its random controls."""
    rows = frame[np.isclose(frame.strength, strength)]
    if rows.empty:
        raise BehaviorLensError(f"the evaluation has no row at strength {strength:g}; evaluate it there")
    best = rows.iloc[0]
    out = {"strength": float(best.strength), "layer": int(best.layer), "edit": str(best.edit)}
    for key in SUMMARY_KEYS:
        if key in best:
            value = best[key]
            if isinstance(value, (bool, np.bool_)):
                out[key] = bool(value)
            elif isinstance(value, (list, str)) or value is None:
                out[key] = value
            else:
                out[key] = float(value)
    for key in ("pressure_removed_fraction", "shift_removed_fraction", "accuracy_neutral_change", "collapse"):
        if f"random_{key}" in best:
            out[f"random_control_{key}"] = float(best[f"random_{key}"])
    for key in ("pressure_removed_fraction_sd", "shift_removed_fraction_sd"):
        if f"random_{key}" in best:
            out[f"random_control_{key}"] = float(best[f"random_{key}"])
    out["random_controls"] = int(best.get("random_controls", 0) or 0)
    return out


def run_steer_eval(
    model: Any,
    edit: Edit,
    eval_set: Any,
    strengths: Sequence[float] = (1.0,),
    layers: Sequence[int] | None = None,
    out_dir: str | Path = "steering",
    batch_size: int = 16,
    seed: int = 0,
    controls: int = 5,
    head_effects: dict | None = None,
    side_effects: Any = None,
) -> dict:
    """Evaluate an edit; writes steering.csv, steering_pairs.csv, steering_controls.csv,
    dose_response.png and summary.json (the row of the edit's chosen strength, or 1)."""
    out_dir = Path(out_dir)
    chosen = float(edit.notes.get("strength", 1.0))
    strengths = sorted(set(map(float, strengths)) | {chosen})
    frame = evaluate_steering(model, edit, eval_set, strengths, layers, batch_size, seed=seed,
                              controls=controls, head_effects=head_effects, side_effects=side_effects,
                              progress=True)
    write_csv(out_dir / "steering.csv", frame)
    write_csv(out_dir / "steering_pairs.csv", frame.attrs["pairs"])
    write_csv(out_dir / "steering_controls.csv", frame.attrs["controls"])
    dose_response(frame, out_dir / "dose_response.png")
    summary = summarize(frame, chosen) | {"eval_family": eval_set.name, "train_family": edit.family,
                                          "model": model.name, "has_neutral": eval_set.has_neutral,
                                          "chosen_within_limits": edit.notes.get("within_limits"),
                                          "refit_pressure_removed_fraction": edit.notes.get("refit_pressure_removed_fraction"),
                                          "refit_pressure_removed_fraction_sd": _sd(edit.notes.get("refit_pressure_removed_fraction")),
                                          "p_matching_by_strength": {f"{m:g}": float(v) for m, v in
                                                                       zip(frame.strength, frame.p_matching)}}
    write_json(out_dir / "summary.json", summary)
    return summary


def _sd(values: Sequence[float] | None) -> float | None:
    return float(np.std(values)) if values else None


def _prompt_ids(model: Any, prompts: Any) -> list[list[int]]:
    if hasattr(prompts, "pairs"):
        return [list(p.tokens["positive"]) for p in prompts]
    return [chat_ids(model.tokenizer, text) for text in prompts]


@torch.inference_mode()
def generate_examples(
    model: Any,
    edit: Edit,
    prompts: Any,
    strengths: Sequence[float] | None = None,
    max_new_tokens: int = 40,
    seed: int = 0,
    positions: str | None = None,
) -> pd.DataFrame:
    """Greedy continuations of each prompt (strings or a ContrastSet's behavior side) per strength
    (default -4, 0, 4; for a kind without strength, 0 and 1), each row labelled ``unedited``
    (strength 0), ``edited`` (a kind without strength) or by its strength (``x+4``)."""
    ids = _prompt_ids(model, prompts)
    texts = [model.tokenizer.decode(x) for x in ids]
    batch = model.batch(ids)
    has_strength = edit.spec.has_strength
    if strengths is None:
        strengths = (-4.0, 0.0, 4.0) if has_strength else (0.0, 1.0)
    if not has_strength:  # any strength but 0 is the same edit: generate it once
        strengths = sorted({0.0 if m == 0 else 1.0 for m in strengths})

    def generated() -> list[dict]:  # on a traced model, every strength in one session
        rows = []
        for m in strengths:
            torch.manual_seed(seed)
            label = "unedited" if m == 0 else (f"x{m:+g}" if has_strength else "edited")
            ctx = steer(model, edit, m, positions=positions) if m != 0 else nullcontext()
            with ctx:
                out = model.generate(batch, max_new_tokens)
            new = out[:, batch.input_ids.shape[1]:]
            for i, text in enumerate(texts):
                rows.append({"prompt": text, "strength": float(m), "label": label,
                             "completion": model.tokenizer.decode(new[i], skip_special_tokens=True)})
        return rows

    return pd.DataFrame(planned(model, generated, "generating examples"))
