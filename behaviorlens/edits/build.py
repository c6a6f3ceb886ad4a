"""From an edit to its interventions: its gate and detector readouts, then what its kind makes
(the local hooks and every trace backend both run what this returns)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..interventions.kinds import Intervention, ReadDetector, ReadGate


def interventions(edit: Any, model: Any, strength: float = 1.0, layers: Sequence[int] | None = None,
                  positions: str | None = None) -> list[Intervention]:
    """The interventions an :class:`~behaviorlens.edits.Edit` applies at ``strength``: its gate
    and detector readouts first, then its kind's own."""
    positions = edit.positions if positions is None else positions
    s = model.sites
    out: list[Intervention] = []
    if edit.gate is not None:
        out.append(ReadGate(edit.gate, s.ref("resid_post", edit.gate.layer)))
    if edit.detector is not None:
        out.append(ReadDetector(edit.detector, s.ref("resid_post", edit.detector.layer)))
    return out + edit.spec.interventions(edit, model, float(strength), layers, positions)
