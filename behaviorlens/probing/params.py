"""The probing stage's parameters (:mod:`behaviorlens.params`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..params import param
from .sweep import PROBE_METHODS


@dataclass
class ProbeParams:
    """What ``behaviorlens probe`` and an experiment's ``probe`` step take (:func:`~.run.run_probe`)."""

    sites: tuple[str, ...] = param(("resid_post",), "resid_pre resid_post attn mlp head")
    positions: tuple[str, ...] = param(("last",), "last, answer, SLOT or SLOT:mean")
    methods: tuple[str, ...] = param(tuple(PROBE_METHODS), " ".join(PROBE_METHODS), choices=PROBE_METHODS)
    folds: int = param(5, "cross-validation folds over pairs")
    seed: int = param(0, "seed of the folds and controls", step=False)
    batch_size: int = param(16, "pairs per forward (an experiment uses its own batch_size)", step=False)
