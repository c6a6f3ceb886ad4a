"""``weights``: stored differences added to named parameters (a weight edit, e.g. head-localized
fine-tuning). A linear module's weight and bias act as a change of its output, so they also act
in a trace; any other parameter is changed in place, locally only."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from ...errors import BehaviorLensError
from ...interventions.kinds import AddWeights
from ..kind import EditKind, need, random_like


class Weights(EditKind):
    name = "weights"
    random_control_label = "random weight changes"
    gateable = False

    def validate(self, edit: Any) -> None:
        need(edit, "weights", "tensor")

    def layers(self, edit: Any) -> list[int]:
        return sorted({int(p) for name in edit.weights for p in name.split(".") if p.isdigit()})

    def describe(self, edit: Any) -> str:
        layers = ",".join(map(str, self.layers(edit)))
        return f"{edit.method or 'weight'} edit of {len(edit.weights)} tensors (layers {layers})"

    def check(self, edit: Any, model: Any) -> None:
        params = dict(model.hf.named_parameters())
        for name, delta in edit.weights.items():
            if name not in params or params[name].shape != delta.shape:
                raise BehaviorLensError(f"the model {model.name!r} has no parameter {name!r} of shape "
                                        f"{tuple(delta.shape)}")

    def interventions(self, edit: Any, model: Any, strength: float, layers: Sequence[int] | None,
                      positions: str) -> list:
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

    def random_control(self, edit: Any, model: Any, g: torch.Generator) -> Any:
        return replace(edit, weights={k: random_like(v, g) for k, v in edit.weights.items()},
                       family="random", method="random weights", notes={})

    def bake(self, edit: Any, sites: Any, hf: torch.nn.Module, strength: float) -> None:
        params = dict(hf.named_parameters())
        for name, delta in edit.weights.items():
            params[name].add_(strength * delta.to(params[name].device, params[name].dtype))
