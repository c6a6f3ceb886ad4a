"""The measure stage's parameters (:mod:`behaviorlens.params`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .params import param


@dataclass
class MeasureParams:
    """What ``behaviorlens measure`` and an experiment's ``measure`` step take."""

    families: list[Any] | None = param(
        None, "families to measure (default: the experiment's train and test families)", cli=False, arg=None)
    batch_size: int = param(16, "pairs per forward", step=False)
