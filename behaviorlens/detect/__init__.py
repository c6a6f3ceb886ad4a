"""Lie detectors from the model's own behavior-labelled answers (see ``labels``, ``train``,
``evaluate``, ``transfer``; ``lens`` and ``override``: the override detector; ``readout``: the
belief-conditioned probe, the follow-up readout and mistakes as negatives)."""

from .detector import Detector
from .examples import Examples, family_examples, transcript_examples
from .labels import label_table, labels_from_metrics, labels_from_text
from .lens import fit_tuned_lens, lens_trace
from .override import late_arrival
from .readout import Readout, followup_examples, train_readout
from .run import label_set, run_detect_eval, run_detect_train, run_transfer
from .train import train_detector

__all__ = [
    "Detector",
    "Examples",
    "Readout",
    "family_examples",
    "fit_tuned_lens",
    "followup_examples",
    "label_set",
    "label_table",
    "labels_from_metrics",
    "labels_from_text",
    "late_arrival",
    "lens_trace",
    "run_detect_eval",
    "run_detect_train",
    "run_transfer",
    "train_detector",
    "train_readout",
    "transcript_examples",
]
