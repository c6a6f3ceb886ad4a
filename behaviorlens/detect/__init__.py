"""Lie detectors from the model's own behavior-labelled answers (see ``labels``, ``train``,
``evaluate``, ``transfer``)."""

from .detector import Detector
from .examples import Examples, family_examples, transcript_examples
from .labels import label_table, labels_from_metrics, labels_from_text
from .run import label_set, run_detect_eval, run_detect_train, run_transfer
from .train import train_detector

__all__ = [
    "Detector",
    "Examples",
    "family_examples",
    "label_set",
    "label_table",
    "labels_from_metrics",
    "labels_from_text",
    "run_detect_eval",
    "run_detect_train",
    "run_transfer",
    "train_detector",
    "transcript_examples",
]
