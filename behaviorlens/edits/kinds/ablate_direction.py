"""``ablate_direction``: one unit direction projected out of everything written into the
residual stream; bakes as weight orthogonalization."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from ...errors import BehaviorLensError
from ...interventions.kinds import AblateDirection as Ablate
from ..kind import EditKind, check_vectors, need, random_like


class AblateDirection(EditKind):
    name = "ablate_direction"
    random_control_label = "random directions"
    gateable = False

    def validate(self, edit: Any) -> None:
        need(edit, "vectors", "direction")
        if len(edit.vectors) != 1:
            raise BehaviorLensError("an ablate_direction edit holds exactly one direction")

    def layers(self, edit: Any) -> list[int]:
        return sorted(edit.vectors)

    def describe(self, edit: Any) -> str:
        return f"ablation of the {edit.method} direction from layer {self.layers(edit)[0]} ({edit.read_at})"

    def check(self, edit: Any, model: Any) -> None:
        check_vectors(edit, model, site=None)  # it acts everywhere; its layer only says where it was read

    def interventions(self, edit: Any, model: Any, strength: float, layers: Sequence[int] | None,
                      positions: str) -> list:
        return [Ablate(model.sites.residual_source_refs(), positions, edit.direction, strength)]

    def random_control(self, edit: Any, model: Any, g: torch.Generator) -> Any:
        return replace(edit, vectors={layer: random_like(v, g) for layer, v in edit.vectors.items()},
                       family="random", method="random", notes={})

    def bake(self, edit: Any, sites: Any, hf: torch.nn.Module, strength: float) -> None:
        """Weight orthogonalization: every weight writing into the residual stream (embeddings,
        attention and MLP output projections, their biases) loses the direction; tied
        embeddings are untied first (the unembedding reads the stream and stays)."""
        writers = sites.residual_writers(hf)  # raises for families where no weight edit is exact
        _untie(sites, hf)
        r = edit.direction
        for module in writers:
            w = sites.output_weight(module)  # [d_model, fan_in] view of the parameter
            d = r.to(w.device, torch.float32)
            w_f = w.float().clone()
            w.copy_((w_f - strength * torch.outer(d, d @ w_f)).to(w.dtype))
            bias = getattr(module, "bias", None)
            if bias is not None:
                b = bias.float()
                bias.copy_((b - strength * d * (d @ b)).to(bias.dtype))


def _untie(sites: Any, hf: torch.nn.Module) -> None:
    """Give the unembedding its own copy of tied input embeddings (and say so in the config)."""
    emb, out = sites.embedding(hf), sites.unembed(hf)
    if out.weight is emb.weight or out.weight.data_ptr() == emb.weight.data_ptr():
        out.weight = torch.nn.Parameter(emb.weight.detach().clone())
    configs = [hf.config, hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config]
    for cfg in configs:
        cfg.tie_word_embeddings = False
