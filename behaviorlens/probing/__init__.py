"""Probing: where is a behavior linearly readable? Collection, probes, sweeps, transfer."""

from .activations import Activations, collect
from .generalization import generalization, transfer_matrix
from .probes import LogisticProbe, MeanDiffProbe, PCAProbe, Probe, make_probe
from .run import run_probe
from .sweep import best_row, fit_probe, pair_folds, probe_sweep, shuffled_labels

__all__ = [
    "Activations",
    "LogisticProbe",
    "MeanDiffProbe",
    "PCAProbe",
    "Probe",
    "best_row",
    "collect",
    "fit_probe",
    "generalization",
    "make_probe",
    "pair_folds",
    "probe_sweep",
    "run_probe",
    "shuffled_labels",
    "transfer_matrix",
]
