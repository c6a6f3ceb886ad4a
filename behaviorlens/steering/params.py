"""The steering stage's parameters (:mod:`behaviorlens.params`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from ..params import Schema, Step, param
from .candidates import GROUPS
from .judge import ACCURACY_DROP_MAX, KL_MAX


@dataclass
class SteerTrainParams:
    """What ``behaviorlens steer train`` takes (:func:`~.run.run_steer_train`)."""

    layer: int | Literal["probe"] | None = param(
        None, "train a vector at this layer (experiment: or 'probe', the probe step's best layer); "
        "without it, choose an edit from the patching evidence", type=int)
    method: str = param("mean_diff", "how a vector is read from the pairs", choices=("mean_diff", "pca", "probe"))
    position: str = param("last", "where a vector is read", step=False)
    kind: str = param("vector", "a vector to add, or a direction to ablate", choices=("vector", "ablate_direction"),
                      step=False)
    max_accuracy_drop: float = param(
        ACCURACY_DROP_MAX, "the most accuracy a chosen edit may cost on each of the no-pressure side, the "
        "factual control, context use and claim recall (default 0.02: 2 points)")
    kl_max: float = param(KL_MAX, "the most neutral KL a chosen edit may cost (default 0.05 nats/token)")
    groups: tuple[str, ...] = param(
        GROUPS, "candidate groups to build: " + ", ".join(f"'{g}'" for g in GROUPS), name="candidates",
        metavar="GROUP")
    refits: int = param(2, "rebuild the chosen candidate on this many other splits: its spread (default 2)")
    outside_limits: bool = param(
        False, "when no candidate keeps the limits, save the best trade-off (marked so) instead of stopping",
        step_default=True)


@dataclass
class SteerEvalParams:
    """What ``behaviorlens steer eval`` takes (:func:`~.run.run_steer_eval`)."""

    strengths: list[float] = param([1.0], "strengths to evaluate the edit at")
    layers: list[int] | None = param(None, "evaluate at these layers (default: the edit's own)")
    batch_size: int = param(16, "pairs per forward (an experiment uses its own batch_size)", step=False)
    controls: int = param(5, "random controls to average (default 5)")


class Generate(Schema):
    """The steer step's ``generate``: continuations of these prompts with and without the edit."""

    prompts: list[str] = Field(default_factory=list)
    max_new_tokens: int = 24


class SideEffects(Schema):
    """The steer step's own side-effect data files (the built-in sets where one is not named)."""

    factual: str | dict[str, Any] | None = None
    context: str | dict[str, Any] | None = None
    neutral: str | None = None
    reference: str | None = None
    fillers: str | None = None


@dataclass
class SteerParams(Step, SteerTrainParams, SteerEvalParams):
    """What an experiment's ``steer`` step takes (:func:`~.step.steer_step`): training (or choosing)
    the edit, evaluating it, and these of its own."""

    eval_family: Any = param(None, "the family the edit is evaluated on (default: the first test family)")
    strength: float | None = param(None, "the headline strength, stated before the run")
    generate: Generate | None = param(None, "{prompts: [...], max_new_tokens: N}: continuations with and "
                                      "without the edit")
    side_effects: SideEffects | None = param(None, "the step's own side-effect data files (factual, context, "
                                             "neutral, reference, fillers)")
