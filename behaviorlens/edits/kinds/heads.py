"""``heads``: a set of attention heads per layer (the output projection's input, split into
heads) moved toward stored values (``head_mode`` zero or mean: ablation), scaled, or given a
stored vector (``add``: per-head steering). Bakes into the output projection: the heads'
columns zeroed or scaled, a constant contribution ``W[:, head] @ value`` moved into its bias."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from ...errors import BehaviorLensError
from ...interventions.kinds import EditHeads
from ..kind import EditKind, check_heads, head_names, need


class Heads(EditKind):
    name = "heads"
    random_control_label = "random heads"

    def validate(self, edit: Any) -> None:
        need(edit, "heads", "head")
        if edit.head_mode in ("mean", "add"):
            missing = [layer for layer in edit.heads if layer not in edit.head_values]
            if missing:
                raise BehaviorLensError(f"{edit.head_mode} head edit needs head values for layers {missing}")

    def layers(self, edit: Any) -> list[int]:
        return sorted(edit.heads)

    def describe(self, edit: Any) -> str:
        names = head_names(edit)
        if edit.head_mode == "scale":
            return f"scaling heads {names} by {edit.scale:g}"
        if edit.head_mode == "add":
            return f"per-head steering of {names} ({edit.method})"
        return f"{edit.head_mode}-ablation of heads {names}"

    def check(self, edit: Any, model: Any) -> None:
        check_heads(edit, model)
        s = model.sites
        for layer, vals in edit.head_values.items():
            if vals.shape != (s.n_heads, s.head_dim):
                raise BehaviorLensError(f"edit head values at layer {layer} have shape {tuple(vals.shape)}, but the "
                                        f"model {model.name!r} has {s.n_heads} heads of width {s.head_dim}")

    def interventions(self, edit: Any, model: Any, strength: float, layers: Sequence[int] | None,
                      positions: str) -> list:
        return [EditHeads(model.sites.ref("head", layer), hs, edit.head_mode, edit.head_values.get(layer), edit.scale,
                          strength, positions) for layer, hs in edit.heads.items()]

    def random_control(self, edit: Any, model: Any, g: torch.Generator) -> Any:
        """As many heads, drawn among those the edit leaves alone in the layers after its gate
        and detector; an ``add`` edit gives each a random vector of the edit's mean size."""
        s = model.sites
        readouts = [r.layer for r in (edit.gate, edit.detector) if r is not None]
        heads = untouched_heads(edit.heads, s.n_layers, s.n_heads, g, max(readouts) + 1 if readouts else 0)
        values = edit.head_values
        if edit.head_mode == "add":
            size = torch.stack([edit.head_values[layer][h].norm() for layer, hs in edit.heads.items() for h in hs]).mean()
            values = {layer: torch.zeros(s.n_heads, s.head_dim) for layer in heads}
            for layer, hs in heads.items():
                for h in hs:
                    r = torch.randn(s.head_dim, generator=g)
                    values[layer][h] = r / r.norm() * size
        return replace(edit, heads=heads, head_values=values, family="random", method="random heads", notes={})

    def bake(self, edit: Any, sites: Any, hf: torch.nn.Module, strength: float) -> None:
        needs_bias = {}
        for layer, heads in edit.heads.items():
            w = sites.output_weight(sites.attn_out_proj(hf, layer))
            add = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device)
            for h in heads:
                cols = slice(h * sites.head_dim, (h + 1) * sites.head_dim)
                block = w[:, cols].float().clone()  # .float() of a float32 view is the view itself
                if edit.head_mode == "scale":
                    w[:, cols] = (block * (1 + strength * (edit.scale - 1))).to(w.dtype)
                    continue
                if edit.head_mode == "add":
                    add += strength * (block @ edit.head_values[layer][h].to(w.device))
                    continue
                w[:, cols] = (block * (1 - strength)).to(w.dtype)
                if edit.head_mode == "mean":
                    add += strength * (block @ edit.head_values[layer][h].to(w.device))
            if add.abs().max() > 0:
                needs_bias[layer] = add
        if needs_bias:
            _ensure_out_bias(sites, hf)
            for layer, add in needs_bias.items():
                bias = sites.attn_out_proj(hf, layer).bias
                bias.copy_((bias.float() + add).to(bias.dtype))


def untouched_heads(chosen: dict[int, list[int]], n_layers: int, n_heads: int,
                    g: torch.Generator, first_layer: int = 0) -> dict[int, list[int]]:
    """As many heads as ``chosen``, drawn uniformly from every head it leaves alone in layers
    ``first_layer`` on (a control that shared heads with the edit would measure the edit itself)."""
    taken = {(layer, h) for layer, hs in chosen.items() for h in hs}
    free = [(layer, h) for layer in range(first_layer, n_layers) for h in range(n_heads) if (layer, h) not in taken]
    count = len(taken)
    if count > len(free):
        raise BehaviorLensError(f"the edit uses {count} heads, leaving {len(free)} for a random control")
    drawn: dict[int, list[int]] = {}
    for i in torch.randperm(len(free), generator=g)[:count].tolist():
        layer, h = free[i]
        drawn.setdefault(layer, []).append(h)
    return {layer: sorted(hs) for layer, hs in sorted(drawn.items())}


def _ensure_out_bias(sites: Any, hf: torch.nn.Module) -> None:
    """Give every attention output projection a bias, through a config flag plain
    transformers understands (a saved model must reload without behaviorlens)."""
    if all(sites.attn_out_proj(hf, i).bias is not None for i in range(sites.n_layers)):
        return
    cfg = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
    if not hasattr(cfg, "attention_bias") or sites.arch.family not in ("llama", "gemma"):
        raise BehaviorLensError(
            f"{type(hf).__name__}: its attention output projection has no bias and the config "
            "has no flag to add one, so a mean-ablated head cannot be baked; use zero ablation "
            "or apply the edit at run time"
        )
    cfg.attention_bias = True
    for i in range(sites.n_layers):  # q/k/v/o all get biases under the flag: new ones are zero
        for lin in sites.attention_linears(hf, i):
            if lin.bias is None:
                lin.bias = torch.nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype,
                                                          device=lin.weight.device))
