"""The steering stage's parameters (:mod:`behaviorlens.params`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..params import kwargs, param
from .choose import ACCURACY_DROP_MAX, GROUPS, KL_MAX


@dataclass
class SteerParams:
    """What ``behaviorlens steer train`` / ``steer eval`` and an experiment's ``steer`` step take
    (:func:`~.run.run_steer_train`, :func:`~.run.run_steer_eval`)."""

    # training (or choosing) the edit
    layer: int | str | None = param(
        None, "train a vector at this layer (experiment: or 'probe', the probe step's best layer); "
        "without it, choose an edit from the patching evidence", type=int, command="train")
    method: str = param("mean_diff", "how a vector is read from the pairs", choices=("mean_diff", "pca", "probe"),
                        command="train")
    position: str = param("last", "where a vector is read", step=False, command="train")
    kind: str = param("vector", "a vector to add, or a direction to ablate", choices=("vector", "ablate_direction"),
                      step=False, command="train")
    max_accuracy_drop: float = param(
        ACCURACY_DROP_MAX, "the most accuracy a chosen edit may cost on each of the no-pressure side, the "
        "factual control, context use and claim recall (default 0.02: 2 points)", command="train")
    kl_max: float = param(KL_MAX, "the most neutral KL a chosen edit may cost (default 0.05 nats/token)",
                          command="train")
    candidates: tuple[str, ...] = param(
        GROUPS, "candidate groups to build: " + ", ".join(f"'{g}'" for g in GROUPS), metavar="GROUP",
        arg="groups", command="train")
    refits: int = param(2, "rebuild the chosen candidate on this many other splits: its spread (default 2)",
                        command="train")
    outside_limits: bool = param(
        False, "when no candidate keeps the limits, save the best trade-off (marked so) instead of stopping",
        step_default=True, command="train")
    # evaluating it
    strengths: list[float] = param([1.0], "strengths to evaluate the edit at", command="eval")
    layers: list[int] | None = param(None, "evaluate at these layers (default: the edit's own)", command="eval")
    batch_size: int = param(16, "pairs per forward (an experiment uses its own batch_size)", step=False,
                            command="eval")
    controls: int = param(5, "random controls to average (default 5)", command="eval")
    # the experiment step's own
    eval_family: Any = param(None, "the family the edit is evaluated on (default: the first test family)",
                             cli=False, arg=None)
    strength: float | None = param(None, "the headline strength, stated before the run", cli=False, arg=None)
    generate: dict | None = param(None, "{prompts: [...], max_new_tokens: N}: continuations with and without the "
                                  "edit", cli=False, arg=None)
    side_effects: dict | None = param(None, "the step's own side-effect data files (factual, context, neutral, "
                                      "reference, fillers)", cli=False, arg=None)

    def train_kwargs(self) -> dict[str, Any]:
        """:func:`~.run.run_steer_train`'s keyword arguments."""
        return kwargs(self, command="train")

    def eval_kwargs(self) -> dict[str, Any]:
        """:func:`~.run.run_steer_eval`'s keyword arguments."""
        return kwargs(self, command="eval")
