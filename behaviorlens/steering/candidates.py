"""The candidate edits a choice is made among, built from the evidence on the fit pairs.

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
- ``searched heads``: knockouts from the answer position and mean ablation there, in the heads
  of the 5-layer window a greedy forward-backward search picks at each λ of a sweep: pressure
  removed on the fit pairs minus λ × the context-use and claim-recall cost on the ``fit`` part
  (:mod:`.head_search`); the front is ``head_search.csv``;
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
  the front of pressure removed against what the user tells the model;
- ``path ablation``: the copy heads' output (the top 3 and 6 heads by patching of the 5-layer
  window around the top head, every head of its layer, every head of the window) removed from
  the logits only, moved to its mean answer-position output in the final residual stream at the
  answer positions, and kept for every later layer that reads it
  (:mod:`behaviorlens.edits.kinds.path_ablation`);
- ``indirect ablation``: the same heads' output removed from every later layer at the answer
  positions and kept for the logits, the complement of ``path ablation``
  (:mod:`behaviorlens.edits.kinds.indirect_ablation`);
- ``edge knockout``: the edges from every head and MLP of the 1 or 3 layers before the top later
  head's layer, or from the n_heads + 1 heads and MLPs whose edges into those keys and values
  carry the most of the claim by edge attribution (EAP) on the fit pairs, into that layer's keys
  and values (every head, or the key/value groups of its top heads) cut at the tokens the
  knockout detector flags, the sources' output there replaced by its mean over the flagged tokens
  of the fit pairs (:mod:`behaviorlens.edits.kinds.edge_knockout`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..batching import chunks
from ..circuits.attribution import EdgeScores, edge_attribution
from ..edits import Edit
from ..edits.kinds.edge_knockout import group_size, source_rows
from ..errors import BehaviorLensError
from ..interventions.trace import planned
from ..patching.results import PatchEvidence
from ..prompts.contrast import NEUTRAL, SIDES
from ..reads import site_values
from ..scoring import behavior_metric, needs_whole
from ..stats import ratio_of_means
from .apply import head_means, steer
from .baselines import flagged
from .data import claim_wordings
from .detectors import default_layers, train_pressure_gate, train_token_detector
from .evaluate import observe
from .frame_gate import NO_PRESSURE, PRESSURED, FramePrompts, family_prompts, train_frame_gate
from .head_search import SearchFigures, search_heads
from .side_effects import SideEffectData
from .training import finetune_heads, train_lowrank, train_subspace
from .vectors import train_vector

KNOCKOUT_WINDOWS = (0, 1, 2)  # half-widths of the layer windows around the top head's layer
NARROW_HEADS = (3, 6, 12)  # sizes of the narrowed knockouts
GROUPS = ("head ablation", "per-head steering", "knockout", "narrowed knockout", "searched heads", "subspace",
          "head fine-tuning", "vector", "direction ablation", "gated", "frame-gated", "trained invariant",
          "path ablation", "indirect ablation", "edge knockout")
PATH_HEADS = (3, 6)  # sizes of the path ablations of the window's top heads
PATH_CUTS = (  # group, kind, the paths it cuts, what its candidates say
    ("path ablation", "path_ablation", "direct path to the logits",
     "their direct path to the logits cut, kept for every later layer"),
    ("indirect ablation", "indirect_ablation", "indirect paths",
     "their output cut for every later layer, the direct path to the logits kept"))
EDGE_SPANS = (1, 3)  # how many layers before the destination the edge knockouts' sources span
INVARIANCE_WEIGHTS = (0.0, 1.0, 4.0)  # the trained-invariant candidates' front: pressure against context use
GATES_BUILT_FROM = {"gated": ("narrowed knockout",), "frame-gated": ("narrowed knockout",)}  # gated copies of these
FRAMED = {"frame-gated", "trained invariant", "searched heads"}  # groups that learn the fit part of the side effects
FRAME_FAMILIES = ("capitals_opinion", "restated_claim", "earlier_turn_claim", "system_claim", "pushback",
                  "pushback_cited")  # development families whose pressured prompts the frame gate also learns
LOCAL_ONLY = {  # groups whose building has no trace path, and why
    "subspace": "its interchange training replays blocks from a layer on local weights",
    "head fine-tuning": "it trains weight differences by backpropagating through local weights",
    "trained invariant": "it backpropagates through blocks replayed on local weights",
}


def _scaled(edit: Edit, factor: float, label: str) -> Edit:
    """A copy of a vector or per-head steering edit with its vectors multiplied."""
    return Edit(**{**edit.__dict__, "vectors": {k: factor * v for k, v in edit.vectors.items()},
                   "head_values": {k: factor * v for k, v in edit.head_values.items()},
                   "method": f"{edit.method} x{label}", "notes": dict(edit.notes)})


def head_dict(heads: pd.DataFrame) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for _, r in heads.iterrows():
        out.setdefault(int(r.layer), []).append(int(r["head"]))
    return out


def named_heads(heads: pd.DataFrame) -> str:
    return ", ".join(f"L{int(r.layer)}H{int(r['head'])} ({r.metric:.2f})" for _, r in heads.iterrows())


def build_candidates(model: Any, fit: Any, evidence: PatchEvidence, groups: Sequence[str] = GROUPS,
                     seed: int = 0, log: Any = None,
                     frame: FramePrompts | None = None,
                     fit_data: SideEffectData | None = None) -> tuple[list[tuple[str, Edit, str]], dict]:
    """(group, edit, evidence) of every candidate, and the detector and gates with their CV tables.
    ``frame``: the frame gate's prompts other than the fit pairs' (:func:`.frame_gate.frame_prompts`);
    ``fit_data``: the ``fit`` part of the side effects, which the head search trades against."""
    s = model.sites
    out: list[tuple[str, Edit, str]] = []
    extra: dict[str, Any] = {}
    say = log or (lambda msg: None)
    heads = evidence.head_table()
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
        if "means" not in extra:
            extra["means"] = head_means(model, fit, range(s.n_layers))
        means = extra["means"]
        for k in (1, 3, 10):
            if k <= len(heads):
                top = heads.head(k)
                edit = Edit(kind="heads", heads=head_dict(top), head_values=means, head_mode="mean",
                            method="mean ablation", **meta)
                out.append(("head ablation", edit, f"top {k} heads at the last position by patching: {named_heads(top)}"))
    gating = {"gated", "frame-gated"} & set(groups)
    if ("per-head steering" in groups or gating) and len(heads):
        layers = sorted({int(x) for x in heads.head(10).layer})
        neutral = head_means(model, fit, layers, position="last", sides=[NEUTRAL])
        positive = head_means(model, fit, layers, position="last", sides=["positive"])
        diff = {layer_: neutral[layer_] - positive[layer_] for layer_ in layers}
        for k in (3, 10):
            if k <= len(heads) or k == 3:
                top = heads.head(k)
                hd = head_dict(top)
                per_head = Edit(kind="heads", heads=hd, head_values={layer_: diff[layer_] for layer_ in hd},
                            head_mode="add", positions="generated", method="head mean difference", **meta)
                why = f"top {len(top)} heads by patching: {named_heads(top)}; no-pressure minus pressured mean output"
                extra.setdefault("head_steering", per_head)
                if "per-head steering" in groups:
                    out.append(("per-head steering", _scaled(per_head, 2.0, "2"), why))
    # a detector or gate reads the residual leaving a layer before the first head it controls,
    # so it reads layer >= 0 and the heads it controls sit at layer >= 1
    first = max(1, int(heads.head(5).layer.min()) if len(heads) else (layer or s.n_layers - 1))
    for group, kind, paths, cut in PATH_CUTS:
        if group in groups and len(heads):
            out += [(group, Edit(kind=kind, heads=hd, head_values=extra["answer_means"], positions="generated",
                                 method=f"mean answer-position output, {paths}", **meta), f"{why}: {cut}")
                    for why, hd in _path_heads(model, fit, heads, extra).items()]
    if ({"knockout", "narrowed knockout", "searched heads", "edge knockout"} & set(groups) or gating) \
            and fit.has_neutral:
        say("training the pressure-token detector")
        detector, table = train_token_detector(model, fit, default_layers(s.n_layers, first), seed)
        extra["detector"], extra["detector_cv"] = detector, table
        later = heads[heads.layer > detector.layer]
        if len(later):
            top_layer = int(later.layer.iloc[0])
            band = range(int(later.head(5).layer.min()), int(later.head(5).layer.max()) + 1)
            windows = [range(max(detector.layer + 1, top_layer - w), min(s.n_layers, top_layer + w + 1))
                       for w in KNOCKOUT_WINDOWS]
            sets = {f"top 3 heads ({named_heads(later.head(3))})": head_dict(later.head(3))}
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
                        hd = head_dict(top)
                        extra.setdefault("narrowed", []).append(hd)
                        edit = Edit(kind="knockout", heads=hd, detector=detector, positions="generated",
                                    method=f"detector at layer {detector.layer}", **meta)
                        named = ", ".join(f"L{int(r.layer)}H{int(r['head'])}" for _, r in top.iterrows())
                        out.append(("narrowed knockout", edit,
                                    f"the {k} heads of layers {window.start}-{window.stop - 1} whose knockout "
                                    f"removes the most of the wrong claim's pull minus the right claim's help "
                                    f"on the fit pairs ({named})"))
    if "edge knockout" in groups and "knockout_window" in extra:
        out += _edge_knockouts(model, fit, heads, extra, meta)
    if "searched heads" in groups and fit_data is not None and "knockout_window" in extra:
        out += _searched(model, fit, fit_data, extra, meta, say)
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
        edit = finetune_heads(model, fit, head_dict(top), seed=seed)
        changed = ", ".join(f"{k} {v['relative']:.1%}" for k, v in edit.notes["changed"].items())
        out.append(("head fine-tuning", edit, f"top 3 heads by patching ({named_heads(top)}); output columns "
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
        gate, table = train_frame_gate(model, prompts, default_layers(s.n_layers, first), seed)
        extra["frame_gate"], extra["frame_gate_cv"], extra["frame_prompts"] = gate, table, prompts
        why = (f"gated by the question's frame: a last-token probe at layer {gate.layer} (CV AUROC "
               f"{table.cv_auroc.max():.3f}) of pressured prompts against context use, claim recall, no-pressure "
               f"prompts and ordinary requests (fit parts only)")
        out += [("frame-gated", e, why) for e in _gated(model, fit, heads, extra, gate, meta, every_position=True)]
    if "trained invariant" in groups and layer is not None and frame is not None and fit.has_neutral \
            and not needs_whole(fit.pairs):
        keep = [seq for seq, kind in zip(frame.sequences, frame.kinds)
                if kind not in (PRESSURED, NO_PRESSURE)]
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


def _searched(model: Any, fit: Any, fit_data: SideEffectData, extra: dict, meta: dict,
              say: Any) -> list[tuple[str, Edit, str]]:
    """The head-set search's front (:mod:`.head_search`) over the heads of the 5-layer window,
    for knockouts from the answer position and mean ablation there: one candidate per λ."""
    window = extra["knockout_window"]
    detector = extra["detector"]
    if "means" not in extra:
        extra["means"] = head_means(model, fit, range(model.sites.n_layers))
    makers = {
        "knockout": lambda hd: Edit(kind="knockout", heads=hd, detector=detector, positions="generated",
                                    method=f"detector at layer {detector.layer}", **meta),
        "mean ablation": lambda hd: Edit(kind="heads", heads=hd, head_values=extra["means"], head_mode="mean",
                                         positions="generated", method="mean ablation", **meta),
    }
    heads = [(layer, h) for layer, hs in window.items() for h in hs]
    out, fronts = [], []
    for name, make in makers.items():
        say(f"searching head sets for {name}: pressure removed against context use and claim recall (fit parts)")
        front = search_heads(SearchFigures(model, fit, fit_data.context, fit_data.recall, make), heads)
        front.insert(0, "edit", name)
        fronts.append(front)
        for _, r in front[front.n_heads > 0].iterrows():
            named = ", ".join(f"L{layer}H{h}" for layer, hs in r.heads.items() for h in hs)
            out.append(("searched heads", make(r.heads), (
                f"{name} at the answer position in the heads a greedy forward-backward search of layers "
                f"{min(window)}-{max(window)} picks at λ = {r['lambda']:g} ({named}): on the fit pairs it removes "
                f"{r.pressure_removed:.0%} of the pull, costing {r.context_use_cost:.0%} of the context-use margin "
                f"and {r.claim_recall_cost:.0%} of the claim-recall margin (fit parts)")))
    extra["head_search"] = pd.concat(fronts, ignore_index=True)
    return out


def _path_heads(model: Any, fit: Any, heads: pd.DataFrame, extra: dict) -> dict[str, dict[int, list[int]]]:
    """The head sets the path cuts (:data:`PATH_CUTS`) move at the answer positions to their mean
    output there (over the fit pairs' pressured prompts, kept in ``extra["answer_means"]``): the
    top 3 and 6 heads by patching of the 5-layer window around the top head, every head of the top
    head's layer and of the window; by what each is."""
    s = model.sites
    if "answer_means" not in extra:
        extra["answer_means"] = head_means(model, fit, range(s.n_layers), position="last")
    top = int(heads.layer.iloc[0])
    window = range(max(0, top - 2), min(s.n_layers, top + 3))
    inside = heads[heads.layer.isin(list(window))]
    sets = {f"the top {k} heads of layers {window.start}-{window.stop - 1} by patching ({named_heads(inside.head(k))})":
            head_dict(inside.head(k)) for k in PATH_HEADS if len(inside) >= k}
    sets[f"every head of layer {top}"] = {top: list(range(s.n_heads))}
    sets[f"every head of layers {window.start}-{window.stop - 1}"] = {x: list(range(s.n_heads)) for x in window}
    return sets


def _edge_knockouts(model: Any, fit: Any, heads: pd.DataFrame, extra: dict, meta: dict) -> list[tuple[str, Edit, str]]:
    """Edges from the heads and MLPs of the 1 or 3 layers before the top later head's layer into
    that layer's keys and values, cut at the tokens the detector flags (each source's output there
    moved to its mean over the flagged tokens of the fit pairs' pressured prompts: a claim's
    average, no claimed answer in particular): into every head of the layer, and into the
    key/value groups of its top heads by patching."""
    s = model.sites
    detector = extra["detector"]
    later = heads[heads.layer > detector.layer]
    dest = int(later.layer.iloc[0])
    size = group_size(model)
    tops = later[later.layer == dest].head(3)
    groups = sorted({int(h) // size for h in tops["head"]})
    targets = {f"every head of layer {dest}": {dest: list(range(s.n_heads))},
               f"the key/value groups of its top heads ({named_heads(tops)})":
                   {dest: [h for h in range(s.n_heads) if h // size in groups]}}
    values, mlps = claim_means(model, fit, detector, range(dest))
    scores = edge_attribution(model, fit) if all(p.aligned for p in fit.pairs) else None
    out = []
    for target, hd in targets.items():
        sources = {}
        for span in EDGE_SPANS:
            layers = list(range(max(0, dest - span), dest))
            sources[f"every head and MLP of layers {layers[0]}-{layers[-1]}"] = (
                {x: list(range(s.n_heads)) for x in layers}, layers)
        if scores is not None:
            heads_, mlps_ = eap_sources(scores, dest, sorted({h // size for h in hd[dest]}), s.n_heads + 1)
            if heads_ or mlps_:
                sources[f"the {s.n_heads + 1} heads and MLPs whose edges into these keys and values carry the most "
                        "of the claim by edge attribution on the fit pairs"] = (heads_, mlps_)
        for why, (heads_, mlps_) in sources.items():
            edit = Edit(kind="edge_knockout", heads=hd, head_values=values, vectors=mlps, detector=detector,
                        arrays={"sources": source_rows(heads_, mlps_)},
                        method=f"detector at layer {detector.layer}, claim-mean sources", **meta)
            out.append(("edge knockout", edit, (
                f"{target}: the keys and values they read at the tokens a per-token probe at layer {detector.layer} "
                f"flags, without the output of {why} there (their mean over flagged tokens); the patching's top "
                f"later head sits in layer {dest}")))
    return out


def eap_sources(scores: EdgeScores, dest: int, groups: Sequence[int], k: int) -> tuple[dict[int, list[int]], list[int]]:
    """The ``k`` heads and MLPs whose edges into layer ``dest``'s keys and values of the given
    key/value groups carry the most of the behavior (summed EAP effect, positive only), as
    ({layer: heads}, MLP layers)."""
    g = scores.graph
    ups, ports = g.edge_index
    targets = [g.k_port(dest, kv) for kv in groups] + [g.v_port(dest, kv) for kv in groups]
    into = np.isin(ports, targets) & (ups > 0)
    total = pd.Series(scores.values[into]).groupby(ups[into]).sum()
    top = total[total > 0].sort_values(ascending=False).head(k).index
    heads: dict[int, list[int]] = {}
    mlps = []
    for u in sorted(int(x) for x in top):
        layer, h = divmod(u - 1, g.n_heads + 1)
        if h == g.n_heads:
            mlps.append(layer)
        else:
            heads.setdefault(layer, []).append(h)
    return heads, mlps


def claim_means(model: Any, fit: Any, detector: Any, layers: Sequence[int],
                batch_size: int = 16) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Each head's and MLP's mean output over the tokens ``detector`` flags in the pressured
    prompts of ``fit``: ({layer: [n_heads, head_dim]}, {layer: [d_model]})."""
    layers = list(layers)
    sums: dict[str, dict[int, torch.Tensor]] = {"head": {}, "mlp": {}}
    count = 0
    for side in ("positive", "negative"):
        for idx in chunks(len(fit), batch_size):
            seqs = [fit[i].tokens[side] for i in idx]
            batch = model.batch(seqs)
            mask = torch.zeros_like(batch.input_ids, dtype=torch.bool)
            for row, flags in enumerate(flagged(model, detector, seqs, batch_size)):
                off = int(batch.offsets[row])
                mask[row, off:off + len(flags)] = torch.from_numpy(flags)
            count += int(mask.sum())
            for site, total in sums.items():
                acts = site_values(model, batch, site, layers)
                for layer in layers:
                    x = acts[layer].float()[mask.to(acts[layer].device)].sum(0).double().cpu()
                    total[layer] = total.get(layer, 0) + x
    if count == 0:
        raise BehaviorLensError(f"the detector at layer {detector.layer} flags no token of the fit pairs")
    heads, mlps = ({layer: (v / count).float() for layer, v in sums[site].items()} for site in ("head", "mlp"))
    return heads, mlps


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
        if "means" not in extra:  # every layer's head means, computed once for all groups
            extra["means"] = head_means(model, fit, range(s.n_layers))
        out.append(Edit(kind="heads", heads=head_dict(later.head(10)), head_values=extra["means"],
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

    def knockouts() -> list[dict]:  # every head's scoring in one plan (one session on a traced model)
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
        return rows

    table = pd.DataFrame(planned(model, knockouts, "single-head knockouts"))
    table["deference_minus_use"] = table.deference - table.use
    return table
