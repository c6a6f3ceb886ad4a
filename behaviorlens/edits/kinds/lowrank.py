"""``lowrank``: a learned low-rank edit of the residual stream leaving one layer: the coordinates
in an orthonormal ``basis`` [d_model, rank] replaced by a learned affine function of the residual
(``arrays``: ``weight.L`` [rank, d_model], ``bias.L`` [rank]), LoReFT's form. Trained with an
invariance loss (:func:`behaviorlens.steering.training.train_lowrank`); it acts through the
residual stream, so it runs on every backend."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from ...errors import BehaviorLensError
from ...interventions.kinds import LowRank as Act
from ..kind import EditKind, need


class LowRank(EditKind):
    name = "lowrank"
    random_control_label = "random subspaces"
    acts_after_its_layer = True
    cannot_bake = "a learned function of the residual stream at chosen positions depends on the input, not on weights"

    def validate(self, edit: Any) -> None:
        need(edit, "basis", "basis")
        for layer, b in edit.basis.items():
            w, bias = edit.arrays.get(f"weight.{layer}"), edit.arrays.get(f"bias.{layer}")
            if w is None or bias is None:
                raise BehaviorLensError(f"a lowrank edit needs arrays weight.{layer} and bias.{layer}")
            if b.dim() != 2 or w.shape != (b.shape[1], b.shape[0]) or bias.shape != (b.shape[1],):
                raise BehaviorLensError(f"lowrank edit at layer {layer}: basis {tuple(b.shape)}, weight "
                                        f"{tuple(w.shape)} and bias {tuple(bias.shape)} do not fit together")

    def layers(self, edit: Any) -> list[int]:
        return sorted(edit.basis)

    def describe(self, edit: Any) -> str:
        rank = next(iter(edit.basis.values())).shape[1]
        layers = ",".join(map(str, self.layers(edit)))
        return f"learned rank-{rank} edit at layer {layers} ({edit.positions}, {edit.method})"

    def check(self, edit: Any, model: Any) -> None:
        for layer, b in edit.basis.items():
            model.sites.check("resid_post", layer)
            if b.shape[0] != model.sites.d_model:
                raise BehaviorLensError(f"lowrank edit at layer {layer} has basis {tuple(b.shape)}; "
                                        f"d_model is {model.sites.d_model}")

    def interventions(self, edit: Any, model: Any, strength: float, layers: Sequence[int] | None,
                      positions: str) -> list:
        return [Act([model.sites.ref("resid_post", layer)], positions, basis, edit.arrays[f"weight.{layer}"],
                    edit.arrays[f"bias.{layer}"], strength) for layer, basis in edit.basis.items()]

    def random_control(self, edit: Any, model: Any, g: torch.Generator) -> Any:
        """A random basis of the same rank with the same learned map of the residual."""
        basis = {layer: torch.linalg.qr(torch.randn(b.shape, generator=g))[0] for layer, b in edit.basis.items()}
        return replace(edit, basis=basis, family="random", method="random basis", notes={})
