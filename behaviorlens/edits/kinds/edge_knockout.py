"""``edge_knockout``: the edges from source components to destination heads' keys and values
cut at the claim tokens, with mean values.

Definition. Sources S (heads and MLPs of layers before the destination layer d; the array
``sources`` holds (layer, head) rows, head -1 for a layer's MLP), destinations D (``heads``, all
in layer d) and the tokens T the ``detector`` flags. At every token t in T, the key and value
projections of D's key/value heads read ``norm_d(r_d(t) + strength * sum_{u in S} (mean_u -
a_u(t)))`` instead of ``norm_d(r_d(t))``: the residual stream entering d with each source's
output at t (a head's through its output projection) moved to its stored mean (``head_values``
for heads, ``vectors`` for MLPs), normed by d's own input norm. Nothing else changes: the
residual stream, every query, and the keys and values of other heads and other tokens read the
real stream, so only D's outputs change, at the first flagged token and after (every later
query reads those keys). It acts at every position (``positions`` must be ``all``): keys and
values are shared by all later queries. The source outputs are this forward's own.

Grouped-query attention: the query heads of one key/value group read the same keys and values,
so the cut reaches the whole group; the destinations must list whole groups (one line says which
heads are missing). In a 9-head, 3-group model, cutting the edges into L23H1 cuts them into
L23H0 and L23H2 too.

Its matched null is a knockout's: the claim replaced by a non-claim sentence of its length and
the same cut made at that sentence's tokens (a limit either way). Its random control is as many
other source heads and MLPs (drawn among the layers before d whose means it stores, never its
own sources) cut into the same heads at the same tokens: a specificity figure, no limit (an MLP
such as layer 0's moves everything it feeds). It cannot bake: which tokens are cut depends on
the input. It needs a llama-family model (separate key and value projections, heads that write
through the output projection alone)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from ...errors import BehaviorLensError
from ...interventions.kinds import EdgeKnockout as Cut
from ..kind import EditKind, check_heads, head_names, need
from .path_ablation import check_values, draw_heads, head_sources, residual_heads

MLP = -1  # the head index of a source that is a layer's MLP


class EdgeKnockout(EditKind):
    name = "edge_knockout"
    matched_null = "filler"
    random_control_label = "random source heads and MLPs cut into these heads"
    cannot_bake = "the tokens whose keys and values it recomputes depend on the input, not on weights"

    def validate(self, edit: Any) -> None:
        need(edit, "heads", "destination head")
        if edit.detector is None:
            raise BehaviorLensError("an edge_knockout edit needs a detector that finds the tokens to cut at")
        if len(edit.heads) != 1:
            raise BehaviorLensError(f"an edge_knockout edit's destination heads sit in one layer, not {sorted(edit.heads)}")
        if edit.positions != "all":
            raise BehaviorLensError("an edge_knockout edit changes keys and values, which every later position reads: "
                                    "its positions are 'all'")
        rows = edit.arrays.get("sources")
        if rows is None or rows.dim() != 2 or rows.shape[1] != 2 or not len(rows):
            raise BehaviorLensError("an edge_knockout edit needs a 'sources' array of (layer, head) rows (head -1: MLP)")
        heads, mlps = sources(edit)
        dest = self.layers(edit)[0]
        late = sorted({layer for layer in [*heads, *mlps] if layer >= dest})
        if late:
            raise BehaviorLensError(f"edge_knockout sources at layers {late} do not come before the destination layer {dest}")
        missing = sorted({*[x for x in heads if x not in edit.head_values], *[x for x in mlps if x not in edit.vectors]})
        if missing:
            raise BehaviorLensError(f"an edge_knockout edit needs mean values for its sources at layers {missing}")

    def layers(self, edit: Any) -> list[int]:
        return sorted(edit.heads)

    def describe(self, edit: Any) -> str:
        return (f"edge knockout into heads {head_names(edit)} (keys and values, whole key/value groups) at the tokens a "
                f"per-token probe at layer {edit.detector.layer} flags, from {source_names(edit)} (moved to their mean)")

    def check(self, edit: Any, model: Any) -> None:
        check_heads(edit, model)
        check_values(edit, model)
        residual_heads(model, self.name)
        for layer, v in edit.vectors.items():
            if v.shape != (model.sites.d_model,):
                raise BehaviorLensError(f"edge_knockout MLP mean at layer {layer} has width {tuple(v.shape)}; d_model "
                                        f"is {model.sites.d_model}")
        size = group_size(model)
        for layer, hs in edit.heads.items():
            for h in hs:
                group = [x for x in range(model.sites.n_heads) if x // size == h // size]
                lacking = [x for x in group if x not in hs]
                if lacking:
                    raise BehaviorLensError(f"L{layer}H{h} shares its keys and values with "
                                            f"{', '.join(f'L{layer}H{x}' for x in lacking)} (grouped-query attention): "
                                            "an edge knockout cuts the whole group; list them all")

    def interventions(self, edit: Any, model: Any, strength: float, layers: Sequence[int] | None,
                      positions: str) -> list:
        if positions != "all":
            raise BehaviorLensError(f"an edge_knockout edit acts at all positions, not {positions!r}: every later "
                                    "position reads the keys and values it changes")
        return [] if strength == 0 else [cut(edit, model, strength)]

    def at_tokens(self, edit: Any, model: Any, tokens: torch.Tensor) -> list:
        """The same cut at the given tokens."""
        return [cut(edit, model, 1.0, tokens)]

    def random_control(self, edit: Any, model: Any, g: torch.Generator) -> Any:
        """As many other source heads and MLPs of the layers before the destination whose means
        the edit stores, cut into the same heads at the same tokens."""
        dest = self.layers(edit)[0]
        heads, mlps = sources(edit)
        free = {layer: [h for h in range(model.sites.n_heads) if h not in heads.get(layer, [])]
                for layer in edit.head_values if layer < dest}
        drawn = draw_heads(free, sum(len(hs) for hs in heads.values()), g)
        others = [layer for layer in sorted(edit.vectors) if layer < dest and layer not in mlps]
        if len(mlps) > len(others):
            raise BehaviorLensError(f"the edit cuts {len(mlps)} MLPs, leaving {len(others)} for a random control")
        picked = [others[i] for i in torch.randperm(len(others), generator=g)[:len(mlps)].tolist()]
        return replace(edit, arrays={**edit.arrays, "sources": source_rows(drawn, picked)}, family="random",
                       method="random sources", notes={})


def cut(edit: Any, model: Any, strength: float, tokens: torch.Tensor | None = None) -> Cut:
    """The edit's intervention at the detector's tokens, or at ``tokens`` [batch, columns]."""
    s = model.sites
    dest = edit.layers[0]
    heads, mlps = sources(edit)
    src = head_sources(model, heads, edit.head_values, strength, {layer: edit.vectors[layer] for layer in mlps})
    norm, projections = s.split_refs(dest)
    size = group_size(model)
    return Cut(src, s.ref("resid_pre", dest), norm, projections,
               sorted({h // size for h in edit.heads[dest]}), s.head_dim, tokens)


def sources(edit: Any) -> tuple[dict[int, list[int]], list[int]]:
    """The edit's source heads ({layer: [head, ...]}) and source MLP layers."""
    heads: dict[int, list[int]] = {}
    mlps = []
    for layer, head in edit.arrays["sources"].long().tolist():
        if head == MLP:
            mlps.append(layer)
        else:
            heads.setdefault(layer, []).append(head)
    return {layer: sorted(hs) for layer, hs in sorted(heads.items())}, sorted(mlps)


def source_rows(heads: dict[int, list[int]], mlps: Sequence[int]) -> torch.Tensor:
    """The ``sources`` array of source heads and MLP layers: (layer, head) rows, head -1 for an MLP."""
    rows = [(layer, h) for layer, hs in sorted(heads.items()) for h in hs] + [(layer, MLP) for layer in sorted(mlps)]
    return torch.tensor(rows, dtype=torch.float32)


def source_names(edit: Any) -> str:
    """``every head and the MLP of layers 20-22``, or the sources layer by layer."""
    heads, mlps = sources(edit)
    layers = sorted({*heads, *mlps})
    full = edit.n_heads and all(len(heads.get(x, [])) == edit.n_heads and x in mlps for x in layers)
    if full and layers == list(range(layers[0], layers[-1] + 1)):
        span = f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}-{layers[-1]}"
        return f"every head and the MLP of {span}"
    names = []
    for layer in layers:
        hs = heads.get(layer, [])
        if edit.n_heads and len(hs) == edit.n_heads:
            names.append(f"L{layer} (all heads)")
        else:
            names += [f"L{layer}H{h}" for h in hs]
        if layer in mlps:
            names.append(f"L{layer} MLP")
    return ", ".join(names)


def group_size(model: Any) -> int:
    """How many query heads share one key/value head."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    kv = getattr(cfg, "num_key_value_heads", None) or model.sites.n_heads
    return model.sites.n_heads // kv
