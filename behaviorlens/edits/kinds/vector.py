"""``vector``: a steering vector per layer, added to the residual stream leaving that layer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from ...errors import BehaviorLensError
from ...interventions.kinds import AddVector
from ..kind import EditKind, check_vectors, need, random_like


class Vector(EditKind):
    name = "vector"
    random_control_label = "random directions"
    acts_after_its_layer = True
    moves_to_layers = True
    cannot_bake = ("a steering vector is added at run time and has no exact weight form (bake its direction "
                   "instead: steer train --kind ablate_direction)")

    def validate(self, edit: Any) -> None:
        need(edit, "vectors", "vector")

    def layers(self, edit: Any) -> list[int]:
        return sorted(edit.vectors)

    def describe(self, edit: Any) -> str:
        return f"{edit.method} steering vector at layer {','.join(map(str, self.layers(edit)))} ({edit.read_at})"

    def check(self, edit: Any, model: Any) -> None:
        check_vectors(edit, model)

    def interventions(self, edit: Any, model: Any, strength: float, layers: Sequence[int] | None,
                      positions: str) -> list:
        return [AddVector([model.sites.ref("resid_post", layer)], positions, vec, strength)
                for layer, vec in self._at(edit, layers).items()]

    def random_control(self, edit: Any, model: Any, g: torch.Generator) -> Any:
        return replace(edit, vectors={layer: random_like(v, g) for layer, v in edit.vectors.items()},
                       family="random", method="random", notes={})

    def intended_sign(self, edit: Any, strength: float) -> float:
        """A vector read as pressured minus unpressured raises the behavior at positive strength,
        unless its notes say it was built to reduce it."""
        sign = float(torch.sign(torch.tensor(strength)))
        return -sign if edit.notes.get("intent") == "reduce" else sign

    @staticmethod
    def _at(edit: Any, layers: Sequence[int] | None) -> dict[int, torch.Tensor]:
        """The vectors to add per layer: its own, or a one-layer vector moved to ``layers``."""
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
