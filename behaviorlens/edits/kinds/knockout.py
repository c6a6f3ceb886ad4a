"""``knockout``: in a set of heads, attention from the positions the edit acts on to the tokens
its ``detector`` flags (a per-token linear read of the residual stream) is blocked. It has no
strength: any strength but 0 blocks fully. Its matched null is a non-claim sentence of the
claim's length in the claim's place, blocked in the same heads. Its random control blocks as
many other words of the conversation in the same heads: a specificity figure, not a null (heads
that read the question lean the model on the claim when the question is hidden from them, so it
may well be negative), and no limit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from ...errors import BehaviorLensError
from ...interventions.kinds import Knockout as Block
from ..kind import EditKind, check_heads, head_names, need


class Knockout(EditKind):
    name = "knockout"
    has_strength = False
    matched_null = "filler"
    random_control_label = "as many other words blocked in these heads"
    cannot_bake = "blocking attention to the tokens a probe flags depends on the input, not on weights"

    def validate(self, edit: Any) -> None:
        need(edit, "heads", "head")
        if edit.detector is None:
            raise BehaviorLensError("a knockout edit needs a detector that finds the tokens to block")

    def layers(self, edit: Any) -> list[int]:
        return sorted(edit.heads)

    def describe(self, edit: Any) -> str:
        source = {"all": "every position", "generated": "the answer positions", "prompt": "the prompt"}[edit.positions]
        if edit.detector.decoy is not None:
            return (f"attention knockout in heads {head_names(edit)} from {source} to as many random tokens of "
                    f"the conversation (not the first token, the template or a flagged token; draw "
                    f"{edit.detector.decoy}) as the probe at layer {edit.detector.layer} flags")
        return (f"attention knockout in heads {head_names(edit)} from {source} to the tokens a per-token probe "
                f"at layer {edit.detector.layer} flags")

    def check(self, edit: Any, model: Any) -> None:
        check_heads(edit, model)

    def interventions(self, edit: Any, model: Any, strength: float, layers: Sequence[int] | None,
                      positions: str) -> list:
        return [] if strength == 0 else knockouts(model, edit.heads, positions)

    def at_tokens(self, edit: Any, model: Any, tokens: torch.Tensor) -> list:
        """The same heads blocking the given tokens from the answer positions."""
        return knockouts(model, edit.heads, "generated", tokens)

    def random_control(self, edit: Any, model: Any, g: torch.Generator) -> Any:
        """The same heads blocking as many tokens, drawn among the conversation's other words."""
        decoy = replace(edit.detector, decoy=int(torch.randint(2**31 - 1, (1,), generator=g)))
        return replace(edit, detector=decoy, family="random", method="random tokens", notes={})


def knockouts(model: Any, heads: dict[int, Sequence[int]], positions: str,
              blocked: torch.Tensor | None = None) -> list[Block]:
    """Attention knockouts of ``heads`` ({layer: [head, ...]}) to flagged or ``blocked`` keys."""
    s = model.sites
    for layer, hs in heads.items():
        for h in hs:
            s.check("head", layer, h)
    return [Block(s.attention_call_ref(layer), list(hs), s.n_heads, positions, blocked) for layer, hs in heads.items()]
