"""The lie-detector stage's parameters (:mod:`behaviorlens.params`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..params import Step, kwargs, param
from .examples import POSITIONS
from .labels import MARGIN
from .readout import FEATURES, FOLLOWUP, NEGATIVES
from .train import DETECTOR_METHODS

METHOD_CHOICES = ("mean_diff", "logistic", "pca")


@dataclass
class DetectLabelParams:
    """How every detect subcommand labels and batches examples."""

    margin: float = param(MARGIN, f"nats: a side is right (wrong) when its metric is below -margin (above "
                          f"margin); default {MARGIN}")
    labels: str = param("metric", "label by the whole-answer metric, or by the model's greedy text matched to "
                        "the answers", choices=("metric", "text"))
    seed: int = param(0, "seed of the folds and controls (an experiment uses its own seed)", step=False)
    batch_size: int = param(16, "examples per forward (an experiment uses its own batch_size)", step=False)


@dataclass
class DetectReadoutParams(DetectLabelParams):
    """What a detector reads and is trained against (:mod:`.readout`): train and transfer take these."""

    features: str = param("answer", "what the detector reads: the pressured answer's state (answer: the "
                          "answer-falsity probe), the pressured state against the bare question re-asked (belief), "
                          "or the state after a follow-up question (followup)", choices=FEATURES)
    negatives: str = param("honest", "what lies are trained against: honest answers, or honest answers and "
                           "mistakes (not_lie)", choices=NEGATIVES)
    followup: str = param(FOLLOWUP, "the follow-up question of --features followup, asked as a new user turn "
                          "after the model's answer")
    override: bool = param(False, "the override detector: the answer-falsity probe AND the lens's late arrival, "
                           "mistakes as negatives (needs 4 mistakes in training); it misses issue 31's held-out "
                           "targets, so it is opt-in")


@dataclass
class DetectTrainParams(DetectReadoutParams):
    """What ``behaviorlens detect train`` takes (:func:`~.run.run_detect_train`)."""

    layers: list[int] | None = param(None, "default: every other layer")
    positions: tuple[str, ...] = param(POSITIONS, "where the detector reads", choices=POSITIONS)
    methods: tuple[str, ...] = param(DETECTOR_METHODS, "probe methods", choices=METHOD_CHOICES)
    folds: int = param(5, "cross-validation folds")
    chat: bool = param(True, "set the detector's threshold on ordinary chat (--no-chat: skip it)")


@dataclass
class DetectEvalParams(DetectLabelParams):
    """What ``behaviorlens detect eval`` takes (:func:`~.run.run_detect_eval`)."""

    chat: bool = param(True, "measure the false-positive rate on ordinary chat (--no-chat: skip it)")


@dataclass
class DetectTransferParams(DetectReadoutParams):
    """What ``behaviorlens detect transfer`` takes (:func:`~.run.run_transfer`)."""

    layers: list[int] | None = param(None, "default: every other layer")
    methods: list[str] = param(["mean_diff"], "probe methods of the transfer matrix", choices=METHOD_CHOICES)
    folds: int = param(5, "cross-validation folds")


@dataclass
class DetectParams(Step, DetectTrainParams, DetectEvalParams, DetectTransferParams):
    """What an experiment's ``detect`` step takes (:func:`~.run.detect_step`): training, evaluating and
    the transfer matrix, and the families of each."""

    train: list[Any] | None = param(None, "families labelled by the model's behavior (default: the experiment's "
                                    "train family)")
    instructed: list[Any] = param([], "Apollo-style instructed pairs: the lie side and the honest side, labelled "
                                  "by instruction")
    eval: list[Any] | None = param(None, "families the detector is scored on (default: the experiment's test "
                                   "families)")
    transfer: list[Any] | None = param(None, "families of the transfer matrix (default: train and eval)")
    transfer_methods: list[str] = param(["mean_diff"], "probe methods of the transfer matrix",
                                        choices=METHOD_CHOICES)

    def train_kwargs(self) -> dict[str, Any]:
        """:func:`~.run.run_detect_train`'s keyword arguments."""
        return kwargs(self, DetectTrainParams)

    def eval_kwargs(self) -> dict[str, Any]:
        """:func:`~.run.run_detect_eval`'s keyword arguments."""
        return kwargs(self, DetectEvalParams)

    def transfer_kwargs(self) -> dict[str, Any]:
        """:func:`~.run.run_transfer`'s keyword arguments (the step's ``transfer_methods`` as ``methods``)."""
        return kwargs(self, DetectTransferParams) | {"methods": self.transfer_methods}
