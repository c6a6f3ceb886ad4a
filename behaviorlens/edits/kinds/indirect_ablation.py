"""``indirect_ablation``: heads' output removed from every later layer, kept for the logits.

The complement of ``path_ablation``: the edit's ``heads`` are moved ``strength`` of the way to
their stored ``head_values`` (a mean output) at ``positions``, as a head ablation does, so every
later layer reads the moved output there; the residual stream entering the final norm gets their
real output's direct contribution back, ``sum_h W_O[:, h] (z_h - mean_h)``, at the same
positions. Only the indirect paths (through later heads and MLPs) are cut. Built from the
shipped interventions: the path ablation's sources, read before the head ablation at the same
site, with the opposite strength. Llama-family models only, as for ``path_ablation``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ...interventions.kinds import EditHeads
from ...interventions.kinds import PathAblation as Cut
from ..kind import head_names
from .path_ablation import PathAblation, head_sources


class IndirectAblation(PathAblation):
    name = "indirect_ablation"
    random_control_label = "random heads removed from every later layer"
    cannot_bake = ("a head's output taken from later layers while the logits still read it has no weight form: "
                   "every reader shares one residual stream")

    def describe(self, edit: Any) -> str:
        return (f"indirect-path ablation of heads {head_names(edit)} (their output moved to its mean for every later "
                "layer; the logits still read it)")

    def interventions(self, edit: Any, model: Any, strength: float, layers: Sequence[int] | None,
                      positions: str) -> list:
        s = model.sites
        restore = Cut(head_sources(model, edit.heads, edit.head_values, -strength), s.final_norm_ref(), positions)
        moved = [EditHeads(s.ref("head", layer), sorted(hs), "mean", edit.head_values[layer], 0.0, strength, positions)
                 for layer, hs in sorted(edit.heads.items())]
        return [restore, *moved]  # at each head site the restore reads the real output before it is moved
