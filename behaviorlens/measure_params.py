"""The measure stage's parameters (:mod:`behaviorlens.params`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .params import Step, param


@dataclass
class MeasureParams:
    """What ``behaviorlens measure`` takes (:func:`~behaviorlens.measure.run_measure`)."""

    batch_size: int = param(16, "pairs per forward", step=False)


@dataclass
class MeasureStepParams(Step, MeasureParams):
    """What an experiment's ``measure`` step takes (:func:`~behaviorlens.measure.measure_step`)."""

    families: list[Any] | None = param(None, "families to measure (default: the experiment's train and test families)")
