"""``path_ablation``: heads' output removed from one downstream input only, the logits.

The edit's ``heads`` (the sources) are moved ``strength`` of the way to their stored
``head_values`` (a mean output) in the residual stream entering the final norm, and nowhere
else: the final residual gains ``sum_h W_O[:, h] (mean_h - z_h)`` at ``positions``, while
every layer after the heads reads their unchanged output (so a head that reads them, such as a
copy suppressor, still does). Only the direct path to the unembedding is cut. It needs a model
whose heads write into the residual stream through the output projection alone (the llama
family: Llama, Mistral, Qwen2, Gemma); a post-norm after attention (Gemma 2/3) makes a head's
contribution nonlinear and is refused. Its random control is as many other heads, of the
layers after its gate, removed from the logits the same way."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from ...errors import BehaviorLensError
from ...interventions.kinds import PathAblation as Cut
from ...interventions.kinds import Sources
from ..kind import EditKind, check_heads, head_names, need


class PathAblation(EditKind):
    name = "path_ablation"
    random_control_label = "random heads removed from the logits"
    cannot_bake = ("a head's output taken from the logits only, while later layers still read it, has no weight "
                   "form: every reader shares one residual stream")

    def validate(self, edit: Any) -> None:
        need(edit, "heads", "head")
        missing = [layer for layer in edit.heads if layer not in edit.head_values]
        if missing:
            raise BehaviorLensError(f"a path_ablation edit needs head values (mean outputs) for layers {missing}")

    def layers(self, edit: Any) -> list[int]:
        return sorted(edit.heads)

    def describe(self, edit: Any) -> str:
        return (f"path ablation of heads {head_names(edit)} from the logits (their output moved to its mean in the "
                "final residual stream only; later layers still read it)")

    def check(self, edit: Any, model: Any) -> None:
        check_heads(edit, model)
        check_values(edit, model)
        residual_heads(model, self.name)

    def interventions(self, edit: Any, model: Any, strength: float, layers: Sequence[int] | None,
                      positions: str) -> list:
        s = model.sites
        target = s.final_norm_ref()
        return [Cut(head_sources(model, edit.heads, edit.head_values, strength), target, positions)]

    def random_control(self, edit: Any, model: Any, g: torch.Generator) -> Any:
        """As many heads with stored values, drawn among those the edit leaves alone in the layers
        after its gate, cut the same way."""
        s = model.sites
        first = edit.gate.layer + 1 if edit.gate is not None else 0
        stored = [layer for layer in edit.head_values if layer >= first]
        chosen = edit.heads
        free = {layer: [h for h in range(s.n_heads) if h not in chosen.get(layer, [])] for layer in stored}
        heads = draw_heads(free, sum(len(hs) for hs in chosen.values()), g)
        return replace(edit, heads=heads, family="random", method="random heads", notes={})


def draw_heads(free: dict[int, list[int]], count: int, g: torch.Generator) -> dict[int, list[int]]:
    """``count`` heads drawn uniformly among ``free`` ({layer: [head, ...]})."""
    pool = [(layer, h) for layer in sorted(free) for h in free[layer]]
    if count > len(pool):
        raise BehaviorLensError(f"the edit uses {count} heads, leaving {len(pool)} for a random control")
    drawn: dict[int, list[int]] = {}
    for i in torch.randperm(len(pool), generator=g)[:count].tolist():
        layer, h = pool[i]
        drawn.setdefault(layer, []).append(h)
    return {layer: sorted(hs) for layer, hs in sorted(drawn.items())}


def check_values(edit: Any, model: Any) -> None:
    """Stored head values are [n_heads, head_dim] per layer."""
    s = model.sites
    for layer, vals in edit.head_values.items():
        if vals.shape != (s.n_heads, s.head_dim):
            raise BehaviorLensError(f"edit head values at layer {layer} have shape {tuple(vals.shape)}, but the model "
                                    f"{model.name!r} has {s.n_heads} heads of width {s.head_dim}")


def residual_heads(model: Any, kind: str) -> None:
    """Refuse a model whose heads do not write into the residual stream through the output
    projection alone (a post-attention norm, fused or transposed projections)."""
    family = model.sites.arch.family
    if family != "llama":
        raise BehaviorLensError(f"a {kind} edit needs a llama-family model (its heads write into the residual "
                                f"stream through the output projection alone); this model is {family}")


def head_sources(model: Any, heads: dict[int, list[int]], values: dict[int, torch.Tensor], strength: float,
                 mlps: dict[int, torch.Tensor] | None = None) -> Sources:
    """The sources of an edge edit, in execution order: each layer's heads at the output
    projection's input, then (``mlps``: {layer: mean output}) its MLP output."""
    s = model.sites
    items = [(s.ref("head", layer), sorted(hs), values[layer][sorted(hs)]) for layer, hs in heads.items()]
    items += [(s.ref("mlp", layer), [], v) for layer, v in (mlps or {}).items()]
    items.sort(key=lambda item: item[0].order)
    return Sources([i[0] for i in items], [i[1] for i in items], [i[2] for i in items], float(strength))
