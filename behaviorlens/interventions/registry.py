"""From an edit file's kind to its interventions: the one place that reads ``Edit.kind`` to
decide how an edit acts (the local hooks and every trace backend both run what this returns)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import BehaviorLensError
from .kinds import (
    AblateDirection,
    AddVector,
    AddWeights,
    ClampSubspace,
    EditHeads,
    Intervention,
    Knockout,
    ReadDetector,
    ReadGate,
)


def _vector(edit: Any, model: Any, strength: float, layers: Sequence[int] | None, positions: str) -> list:
    s = model.sites
    return [AddVector([s.ref("resid_post", layer)], positions, vec, strength)
            for layer, vec in _vector_layers(edit, layers).items()]


def _ablate_direction(edit: Any, model: Any, strength: float, layers: Any, positions: str) -> list:
    return [AblateDirection(model.sites.residual_source_refs(), positions, edit.direction, strength)]


def _subspace(edit: Any, model: Any, strength: float, layers: Any, positions: str) -> list:
    return [ClampSubspace([model.sites.ref("resid_post", layer)], positions, basis, edit.vectors[layer], strength)
            for layer, basis in edit.basis.items()]


def _heads(edit: Any, model: Any, strength: float, layers: Any, positions: str) -> list:
    return [EditHeads(model.sites.ref("head", layer), hs, edit.head_mode, edit.head_values.get(layer), edit.scale,
                      strength, positions) for layer, hs in edit.heads.items()]


def _knockout(edit: Any, model: Any, strength: float, layers: Any, positions: str) -> list:
    if strength == 0:
        return []
    return knockouts(model, edit.heads, positions)


def _weights(edit: Any, model: Any, strength: float, layers: Any, positions: str) -> list:
    s, hf = model.sites, model.hf
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for name, delta in edit.weights.items():
        path, leaf = name.rsplit(".", 1)
        by_module.setdefault(path, {})[leaf] = delta
    out = []
    for path, deltas in by_module.items():
        names = {f"{path}.{leaf}": d for leaf, d in deltas.items()}
        linear = isinstance(hf.get_submodule(path), torch.nn.Linear) and not set(deltas) - {"weight", "bias"}
        if model.traced and not linear:
            raise BehaviorLensError(f"a weights edit of {', '.join(names)} cannot act in a trace: only linear "
                                    "modules' weights and biases can (as a change of their output)")
        weight, bias = (deltas.get("weight"), deltas.get("bias")) if linear else (None, None)
        out.append(AddWeights(s.parameter_ref(hf, next(iter(names))), weight, bias, strength, names))
    return out


BUILDERS: dict[str, Callable[..., list[Intervention]]] = {
    "vector": _vector,
    "ablate_direction": _ablate_direction,
    "subspace": _subspace,
    "heads": _heads,
    "knockout": _knockout,
    "weights": _weights,
}


def interventions(edit: Any, model: Any, strength: float = 1.0, layers: Sequence[int] | None = None,
                  positions: str | None = None) -> list[Intervention]:
    """The interventions an :class:`~behaviorlens.steering.edit.Edit` applies at ``strength``:
    its gate and detector readouts first, then its kind's own."""
    positions = edit.positions if positions is None else positions
    s = model.sites
    out: list[Intervention] = []
    if edit.gate is not None:
        out.append(ReadGate(edit.gate, s.ref("resid_post", edit.gate.layer)))
    if edit.detector is not None:
        out.append(ReadDetector(edit.detector, s.ref("resid_post", edit.detector.layer)))
    return out + BUILDERS[edit.kind](edit, model, float(strength), layers, positions)


def knockouts(model: Any, heads: dict[int, Sequence[int]], positions: str,
              blocked: torch.Tensor | None = None) -> list[Intervention]:
    """Attention knockouts of ``heads`` ({layer: [head, ...]}) to flagged or ``blocked`` keys."""
    s = model.sites
    return [Knockout(s.attention_call_ref(layer), list(hs), s.n_heads, positions, blocked)
            for layer, hs in heads.items()]


def _vector_layers(edit: Any, layers: Sequence[int] | None) -> dict[int, torch.Tensor]:
    if layers is None:
        return dict(edit.vectors)
    out = {}
    for layer in layers:
        if layer in edit.vectors:
            out[layer] = edit.vectors[layer]
        elif len(edit.vectors) == 1:
            out[layer] = next(iter(edit.vectors.values()))
        else:
            raise BehaviorLensError(f"the edit has vectors for layers {edit.layers}, not for layer {layer}")
    return out
