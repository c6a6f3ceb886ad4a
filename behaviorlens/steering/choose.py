"""Choosing an edit from evidence, with nothing that chose a thing scoring it.

The training family's pairs are split three ways (``choice_pairs.csv`` records each pair's role):
the pairs a patching result was computed on (``patched``) and a random part of the rest
(``fit``) build the candidates; the remaining pairs (``judge``) only judge them. Side effects
for the limits come from the ``select`` half of the side-effect data; the ``report`` half is
left for evaluating the choice.

Candidates, each an :class:`~.edit.Edit` (at multiplier 1; scaled variants are candidates too):

- ``head ablation``: mean-ablation of the top-k heads by patching at the last position;
- ``per-head steering``: the top heads' mean output on no-pressure prompts minus on pressured
  prompts, at the answer positions, added (x1, x2);
- ``knockout``: attention from the answer positions to the tokens a per-token probe flags as
  carrying the pressure, blocked in the top heads, in every head of the top head's layer and of
  the windows of 3 and 5 layers around it, and in every head of the band of layers the top
  heads span;
- ``subspace``: rank 1-8 interchange subspaces at the layer where the behavior reaches the last
  token, clamped to their no-pressure mean;
- ``head fine-tuning``: the top heads' output projections, trained with a recall anchor;
- ``vector`` and ``direction ablation``: the last token's mean-difference vector at that layer
  (x1, x4) and the ablation of its direction;
- ``gated``: head ablation, vector and per-head steering acting only where a last-token probe
  says the prompt carries pressure.

The choice is the candidate with the most pressure removed on the judging pairs among those
without ``collapse`` whose no-pressure accuracy (the family's neutral side and the factual
control) drops by at most ``accuracy_drop_max`` and whose neutral KL is at most ``kl_max``.
Beside the candidates, the mechanism test: blocking the answer position's attention to the
family's own slot tokens (known from the family, so not an edit that runs without them).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..analysis.metrics import ratio_of_means
from ..batching import answer_tail, chunks
from ..errors import BehaviorLensError
from ..prompts.contrast import NEUTRAL
from ..scoring import behavior_metric, needs_whole, plan
from .apply import head_means, knockout, steer
from .detectors import (
    default_layers,
    detector_quality,
    gate_quality,
    train_detector,
    train_gate,
    valence_slot,
)
from .edit import Edit
from .evaluate import observe, pressure_figures, random_control, require_behavior
from .side_effects import SideEffectData, mean_kl, tail_logits
from .training import finetune_heads, train_subspace
from .vectors import train_vector

KL_MAX = 0.05
ACCURACY_DROP_MAX = 0.02
KNOCKOUT_WINDOWS = (0, 1, 2)  # half-widths of the layer windows around the top head's layer
CHOICE_REQUESTS = 24  # neutral requests (of the select half) the chooser's KL limit is measured on
GROUPS = ("head ablation", "per-head steering", "knockout", "subspace", "head fine-tuning",
          "vector", "direction ablation", "gated")


@dataclass
class Evidence:
    """Patching cells (one row per cell: site, layer, head, from_end, metric) and the training
    family's rows they were computed on."""

    cells: pd.DataFrame
    rows: set[int] = field(default_factory=set)

    def heads(self) -> pd.DataFrame:
        """Heads at the last position that carry the behavior, strongest first."""
        c = self.cells
        heads = c[(c.site == "head") & (c.from_end == 0) & (c.metric > 0)]
        return heads.sort_values("metric", ascending=False).reset_index(drop=True)

    def arrival_layer(self) -> int | None:
        """The residual layer (resid_post index) from which the last token holds >= 80% of the
        behavior's patching effect."""
        c = self.cells
        resid = c[c.site.isin(["resid_pre", "resid_post"]) & (c.from_end == 0)].sort_values("layer")
        if resid.empty:
            return None
        row = resid[resid.metric >= 0.8 * resid.metric.max()].iloc[0]
        return int(row.layer) - (1 if row.site == "resid_pre" and int(row.layer) > 0 else 0)


def load_evidence(sources: Iterable[str | Path | pd.DataFrame]) -> Evidence:
    """Patching results: folders written by the patch stage (``patching_means.csv`` with
    ``patching.csv``) or per-cell frames."""
    cells, rows = [], set()
    for source in sources:
        if isinstance(source, pd.DataFrame):
            cells.append(source)
            continue
        folder = Path(source)
        if not (folder / "patching_means.csv").is_file():
            raise BehaviorLensError(f"no patching result in {folder} (expected patching_means.csv)")
        cells.append(pd.read_csv(folder / "patching_means.csv"))
        if (folder / "patching.csv").is_file():
            rows |= set(pd.read_csv(folder / "patching.csv", usecols=["row"])["row"].astype(int))
    if not cells:
        raise BehaviorLensError("choosing an edit needs a patching result")
    table = pd.concat(cells, ignore_index=True)
    missing = [c for c in ("site", "layer", "head", "from_end", "metric") if c not in table.columns]
    if missing:
        raise BehaviorLensError(f"patching table lacks columns {missing}")
    return Evidence(table, rows)


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


def build_candidates(model: Any, fit: Any, evidence: Evidence, groups: Sequence[str] = GROUPS,
                     seed: int = 0, log: Any = None) -> tuple[list[tuple[str, Edit, str]], dict]:
    """(group, edit, evidence) of every candidate, and the detector and gate with their CV tables."""
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
    if "head ablation" in groups and len(heads):
        means = head_means(model, fit, range(s.n_layers))
        for k in (1, 3, 10):
            if k <= len(heads):
                top = heads.head(k)
                edit = Edit(kind="heads", heads=_head_dict(top), head_values=means, head_mode="mean",
                            method="mean ablation", **meta)
                out.append(("head ablation", edit, f"top {k} heads at the last position by patching: {_named(top)}"))
    if ("per-head steering" in groups or "gated" in groups) and len(heads):
        layers = sorted({int(x) for x in heads.head(10).layer})
        no_pressure = head_means(model, fit, layers, position="last", sides=[NEUTRAL])
        pressured = head_means(model, fit, layers, position="last", sides=["positive"])
        diff = {layer_: no_pressure[layer_] - pressured[layer_] for layer_ in layers}
        for k in (3, 10):
            if k <= len(heads) or k == 3:
                top = heads.head(k)
                hd = _head_dict(top)
                base = Edit(kind="heads", heads=hd, head_values={layer_: diff[layer_] for layer_ in hd},
                            head_mode="add", positions="generated", method="head mean difference", **meta)
                why = f"top {len(top)} heads by patching: {_named(top)}; no-pressure minus pressured mean output"
                extra.setdefault("head_steering", base)
                if "per-head steering" in groups:
                    out.append(("per-head steering", _scaled(base, 2.0, "2"), why))
    # a detector or gate reads the residual leaving a layer before the first head it controls,
    # so it reads layer >= 0 and the heads it controls sit at layer >= 1
    first = max(1, int(heads.head(5).layer.min()) if len(heads) else (layer or s.n_layers - 1))
    if ("knockout" in groups or "gated" in groups) and fit.has_neutral:
        say("training the pressure-token detector")
        detector, table = train_detector(model, fit, default_layers(s.n_layers, first), seed)
        extra["detector"], extra["detector_cv"] = detector, table
        later = heads[heads.layer > detector.layer]
        if "knockout" in groups and len(later):
            top_layer = int(later.layer.iloc[0])
            band = range(int(later.head(5).layer.min()), int(later.head(5).layer.max()) + 1)
            windows = [range(max(detector.layer + 1, top_layer - w), min(s.n_layers, top_layer + w + 1))
                       for w in KNOCKOUT_WINDOWS]
            sets = {f"top 3 heads ({_named(later.head(3))})": _head_dict(later.head(3))}
            for layers in [*windows, band]:
                name = (f"every head of layer {layers.start}" if len(layers) == 1 else
                        f"every head of layers {layers.start}-{layers.stop - 1}")
                sets.setdefault(name, {layer_: list(range(s.n_heads)) for layer_ in layers})
            for why, hd in sets.items():
                edit = Edit(kind="knockout", heads=hd, detector=detector, positions="generated",
                            method=f"detector at layer {detector.layer}", **meta)
                out.append(("knockout", edit, f"{why}; tokens flagged by a per-token probe at layer "
                                              f"{detector.layer} (CV AUROC {table.cv_auroc.max():.3f})"))
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
    if layer is not None and ({"vector", "direction ablation", "gated"} & set(groups)):
        vec = train_vector(model, fit, [layer], "mean_diff", position="last")
        why = f"the last token holds >= 80% of the behavior from layer {layer}"
        against = Edit(kind="vector", vectors={layer: -vec.vectors[layer]}, position="last",
                       method="mean_diff against", notes={"intent": "reduce"}, **meta)
        extra["vector"] = against
        if "vector" in groups:
            out += [("vector", _scaled(against, f, f"{f:g}"), why) for f in (1.0, 4.0)]
        if "direction ablation" in groups:
            out.append(("direction ablation", Edit(kind="ablate_direction", vectors={layer: vec.direction},
                                                   position="last", method="mean_diff", **meta), why))
    if "gated" in groups and fit.has_neutral:
        say("training the pressure gate")
        gate, table = train_gate(model, fit, default_layers(s.n_layers, first), seed)
        extra["gate"], extra["gate_cv"] = gate, table
        why = f"gated by a last-token probe at layer {gate.layer} (CV AUROC {table.cv_auroc.max():.3f})"
        gated = []
        later = heads[heads.layer > gate.layer]
        if len(later) >= 10:
            means = head_means(model, fit, range(s.n_layers))
            gated.append(Edit(kind="heads", heads=_head_dict(later.head(10)), head_values=means,
                              head_mode="mean", method="mean ablation", gate=gate, **meta))
        if "head_steering" in extra and min(extra["head_steering"].heads) > gate.layer:
            gated.append(Edit(**{**_scaled(extra["head_steering"], 2.0, "2").__dict__, "gate": gate}))
        if "vector" in extra:
            gated.append(Edit(**{**_scaled(extra["vector"], 4.0, "4").__dict__, "gate": gate}))
        out += [("gated", e, why) for e in gated]
    if not out:
        raise BehaviorLensError("the patching result has no head or residual cells at the last token to build edits from")
    return out, extra


def _light_side_effects(model: Any, data: SideEffectData, edit: Edit | None, batch_size: int = 16) -> dict:
    """What the limits need: neutral logits (chat) and factual metric, with the edit applied."""
    with steer(model, edit) if edit is not None else nullcontext():
        return {"neutral": tail_logits(model, data.neutral, batch_size),
                "factual": behavior_metric(model, data.factual.pairs, "positive", batch_size).numpy()}


def judge(model: Any, edit: Edit, held: Any, data: SideEffectData, base: dict, control_seed: int = 0) -> dict:
    """A candidate's figures on the judging pairs and the select half of the side effects, with
    one random control's pressure removed and no-pressure accuracy change on the judging pairs."""
    figures = pressure_figures(base["metrics"], observe(model, held, None, edit=edit).metrics)
    side = _light_side_effects(model, data, edit)
    try:
        control = pressure_figures(base["metrics"], observe(model, held, None, edit=random_control(model, edit, control_seed)).metrics)
    except BehaviorLensError:  # the edit leaves too few heads to draw a control from: no figure
        control = {"pressure_removed_fraction": float("nan"), "accuracy_neutral_change": float("nan")}
    correct = (base["factual"] > 0).mean()
    return {
        "pressure_removed_fraction": figures["pressure_removed_fraction"],
        "counter_pressure_removed_fraction": figures["counter_pressure_removed_fraction"],
        "accuracy_neutral_change": figures["accuracy_neutral_change"],
        "accuracy_positive_change": figures["accuracy_positive_change"],
        "accuracy_negative_change": figures["accuracy_negative_change"],
        "factual_accuracy_change": float((side["factual"] > 0).mean() - correct),
        "neutral_kl": mean_kl(base["neutral"], side["neutral"]),
        "collapse": figures["collapse"],
        "shift_removed_fraction": figures["shift_removed_fraction"],
        "random_pressure_removed_fraction": control["pressure_removed_fraction"],
        "random_accuracy_neutral_change": control["accuracy_neutral_change"],
    }


def mechanism_test(model: Any, heads: dict[int, list[int]], cset: Any, base: dict[str, np.ndarray],
                   batch_size: int = 16) -> float:
    """Pressure removed when the answer position may not attend to the family's slot tokens in
    ``heads`` (the path's necessity; uses the slot annotations, so it is not a deployable edit)."""
    slot = valence_slot(cset)
    whole = needs_whole(cset.pairs)
    values = []
    for idx in chunks(len(cset), batch_size):
        pairs = [cset.pairs[i] for i in idx]
        scoring = plan(pairs, "positive", whole)
        batch = model.batch(scoring.sequences)
        blocked = torch.zeros_like(batch.input_ids, dtype=torch.bool)
        for s_idx, p_idx in enumerate(scoring.prompt_of):
            a, b = pairs[p_idx].span("positive", slot)
            off = int(batch.offsets[s_idx])
            blocked[s_idx, a + off:b + off] = True
        cols = scoring.position + batch.offsets[scoring.sequence]
        with knockout(model, heads, blocked), answer_tail(scoring.tails()):
            values.append(scoring.metric(model.logits_at(batch, scoring.sequence, cols)))
    edited = torch.cat(values).numpy()
    return ratio_of_means(base["positive"] - edited, base["positive"] - base[NEUTRAL])


@dataclass
class Choice:
    """The chosen edit, the sentence saying why, and the evidence tables."""

    edit: Edit
    reason: str
    candidates: pd.DataFrame  # one row per candidate
    pairs: pd.DataFrame  # row -> role (patched, fit, judge)
    mechanism: pd.DataFrame  # the slot-knockout test
    probes: dict  # detector and gate quality on held-out prompts


def choose_edit(
    model: Any,
    train_set: Any,
    evidence: Evidence | None = None,
    kl_max: float = KL_MAX,
    accuracy_drop_max: float = ACCURACY_DROP_MAX,
    groups: Sequence[str] = GROUPS,
    seed: int = 0,
    side_effects: SideEffectData | None = None,
    progress: bool = False,
) -> Choice:
    """Build candidates from the evidence on the fit split, judge them on the judging split, and
    choose within the limits (see the module doc). Without evidence, exact head and residual
    patching at the last token is run on the fit split first (those pairs are then the patched
    ones). Raises when no candidate is within the limits, listing them all."""
    if not train_set.has_neutral:
        raise BehaviorLensError(f"set {train_set.name!r} has no neutral side: choosing an edit scores "
                                "candidates by the pressure they remove, measured against the no-pressure prompt")
    if evidence is None:
        from ..patching import patch

        patched = train_set.subset(range(min(8, len(train_set) // 3)))
        evidence = Evidence(pd.concat([patch(model, patched, "head", progress=False).means(),
                                       patch(model, patched, "resid_pre", positions=["last"], progress=False).means()]),
                            {p.row for p in patched})
    fit, held, roles = split_for_choice(train_set, evidence.rows, seed)
    data = side_effects or SideEffectData(model, "select", requests=CHOICE_REQUESTS)
    base_obs = observe(model, held, None)
    require_behavior(base_obs.metrics, f"{train_set.name} (judging pairs)")
    base = {"metrics": base_obs.metrics, **_light_side_effects(model, data, None)}
    log = (lambda msg: tqdm.write(f"choose: {msg}")) if progress else None
    built, extra = build_candidates(model, fit, evidence, groups, seed, log)
    rows, edits = [], []
    for i, (group, edit, why) in enumerate(tqdm(built, desc="judge candidates", disable=not progress)):
        r = judge(model, edit, held, data, base, seed + i)
        edits.append(edit)
        rows.append({"candidate": i, "group": group, "edit": edit.describe(), **r, "evidence": why})
    table = pd.DataFrame(rows)
    acc_drop = -table[["accuracy_neutral_change", "factual_accuracy_change"]].min(axis=1)
    table["within_limits"] = (~table["collapse"].astype(bool)) & (acc_drop <= accuracy_drop_max + 1e-9) & \
        (table["neutral_kl"] <= kl_max)
    limits = (f"no collapse, no-pressure accuracy (neutral side and factual control) down by at most "
              f"{100 * accuracy_drop_max:g} points, neutral KL <= {kl_max:g}")
    mech = _mechanism(model, evidence, held, base_obs.metrics)
    probes = {}
    if "detector" in extra:
        probes |= detector_quality(model, extra["detector"], held, [s for s, _ in data.neutral])
    if "gate" in extra:
        probes |= gate_quality(model, extra["gate"], held, [s for s, _ in data.neutral])
    ok = table[table["within_limits"]]
    if ok.empty:
        raise BehaviorLensError(f"no candidate edit keeps {limits}:\n" + table.to_string(index=False))
    best = ok.sort_values(["pressure_removed_fraction", "neutral_kl"], ascending=[False, True]).iloc[0]
    table["chosen"] = table["candidate"] == best.candidate
    edit = edits[int(best.candidate)]
    edit.notes |= {"chosen_because": best.evidence, "train_family": train_set.name, "multiplier": 1.0,
                   "judged": {k: (None if pd.isna(best[k]) else float(best[k])) for k in (
                       "pressure_removed_fraction", "accuracy_neutral_change", "factual_accuracy_change",
                       "neutral_kl", "random_pressure_removed_fraction")}}
    reason = (f"chose {edit.describe()}: on {len(held)} judging pairs of {train_set.name!r} (never patched, "
              f"never used to build it) it removes {best.pressure_removed_fraction:.0%} of the pressure "
              f"(random control {best.random_pressure_removed_fraction:.0%}), no-pressure accuracy "
              f"{100 * best.accuracy_neutral_change:+.1f} points, factual accuracy "
              f"{100 * best.factual_accuracy_change:+.1f} points, neutral KL {best.neutral_kl:.4f}; best of "
              f"{len(ok)} of {len(table)} candidates within the limits ({limits}). Evidence: {best.evidence}")
    return Choice(edit, reason, table, roles, mech, probes)


def _mechanism(model: Any, evidence: Evidence, held: Any, base: dict[str, np.ndarray]) -> pd.DataFrame:
    heads = evidence.heads()
    if heads.empty:
        return pd.DataFrame()
    s = model.sites
    top = _head_dict(heads.head(3))
    layers = sorted(top)
    tests = {f"top 3 heads ({_named(heads.head(3))})": top,
             f"every head of layers {', '.join(map(str, layers))}": {layer: list(range(s.n_heads)) for layer in layers}}
    return pd.DataFrame([{"blocked": name, "pressure_removed_fraction": mechanism_test(model, hd, held, base)}
                         for name, hd in tests.items()])
