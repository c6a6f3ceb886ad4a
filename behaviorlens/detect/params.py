"""The lie-detector stage's parameters (:mod:`behaviorlens.params`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..params import kwargs, param
from .examples import POSITIONS
from .labels import MARGIN
from .train import METHODS

METHOD_CHOICES = ("mean_diff", "logistic", "pca")


@dataclass
class DetectParams:
    """What ``behaviorlens detect train|eval|transfer`` and an experiment's ``detect`` step take."""

    # the experiment step's families (the commands name them as arguments)
    train: list[Any] | None = param(None, "families labelled by the model's behavior (default: the experiment's "
                                    "train family)", cli=False, arg=None)
    instructed: list[Any] = param([], "Apollo-style instructed pairs: the lie side and the honest side, labelled "
                                  "by instruction", metavar="FAMILY", command="train", arg=None)
    eval: list[Any] | None = param(None, "families the detector is scored on (default: the experiment's test "
                                   "families)", cli=False, arg=None)
    transfer: list[Any] | None = param(None, "families of the transfer matrix (default: train and eval)",
                                       cli=False, arg=None)
    # labelling, training, scoring
    margin: float = param(MARGIN, f"nats: a side is right (wrong) when its metric is below -margin (above "
                          f"margin); default {MARGIN}")
    labels: str = param("metric", "label by the whole-answer metric, or by the model's greedy text matched to "
                        "the answers", choices=("metric", "text"))
    layers: list[int] | None = param(None, "default: every other layer", command=("train", "transfer"))
    positions: tuple[str, ...] = param(POSITIONS, "where the detector reads", choices=POSITIONS, command="train")
    methods: tuple[str, ...] = param(METHODS, "probe methods", choices=METHOD_CHOICES, command="train")
    transfer_methods: list[str] = param(["mean_diff"], "probe methods of the transfer matrix", flag="--methods",
                                        choices=METHOD_CHOICES, command="transfer", arg="methods")
    folds: int = param(5, "cross-validation folds", command=("train", "transfer"))
    chat: bool = param(True, "measure the detector on ordinary chat (train: its threshold; eval: its false-"
                       "positive rate)", flag="--no-chat", command=("train", "eval"))
    seed: int = param(0, "seed of the folds and controls (an experiment uses its own seed)", step=False)
    batch_size: int = param(16, "examples per forward (an experiment uses its own batch_size)", step=False)

    def train_kwargs(self) -> dict[str, Any]:
        """:func:`~.run.run_detect_train`'s keyword arguments."""
        return kwargs(self, command="train")

    def eval_kwargs(self) -> dict[str, Any]:
        """:func:`~.run.run_detect_eval`'s keyword arguments."""
        return kwargs(self, command="eval")

    def transfer_kwargs(self) -> dict[str, Any]:
        """:func:`~.run.run_transfer`'s keyword arguments."""
        return kwargs(self, command="transfer")
