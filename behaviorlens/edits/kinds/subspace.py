"""``subspace``: a low-rank subspace of the residual stream leaving a layer (an orthonormal
``basis`` [d_model, rank]) moved toward a stored point's coordinates (``vectors``: the mean
residual over no-pressure prompts)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from ...errors import BehaviorLensError
from ...interventions.kinds import ClampSubspace
from ..kind import EditKind, check_vectors, need


class Subspace(EditKind):
    name = "subspace"
    random_control_label = "random subspaces"
    acts_after_its_layer = True
    cannot_bake = "clamping a subspace to a point depends on the input, not on weights"

    def validate(self, edit: Any) -> None:
        need(edit, "basis", "basis")
        if set(edit.basis) != set(edit.vectors):
            raise BehaviorLensError("a subspace edit needs a point (vector) for every basis")

    def layers(self, edit: Any) -> list[int]:
        return sorted(edit.basis)

    def describe(self, edit: Any) -> str:
        rank = next(iter(edit.basis.values())).shape[1]
        layers = ",".join(map(str, self.layers(edit)))
        return f"rank-{rank} subspace clamp at layer {layers} ({edit.positions}, {edit.method})"

    def check(self, edit: Any, model: Any) -> None:
        check_vectors(edit, model)
        for layer, b in edit.basis.items():
            if b.dim() != 2 or b.shape[0] != model.sites.d_model:
                raise BehaviorLensError(f"subspace at layer {layer} has basis {tuple(b.shape)}; "
                                        f"d_model is {model.sites.d_model}")

    def interventions(self, edit: Any, model: Any, strength: float, layers: Sequence[int] | None,
                      positions: str) -> list:
        return [ClampSubspace([model.sites.ref("resid_post", layer)], positions, basis, edit.vectors[layer], strength)
                for layer, basis in edit.basis.items()]

    def random_control(self, edit: Any, model: Any, g: torch.Generator) -> Any:
        basis = {layer: torch.linalg.qr(torch.randn(b.shape, generator=g))[0] for layer, b in edit.basis.items()}
        return replace(edit, basis=basis, family="random", method="random subspace", notes={})
