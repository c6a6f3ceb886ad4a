"""The patching stage's parameters (:mod:`behaviorlens.params`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..params import Step, param
from .ablation import ABLATIONS
from .attribution import DEFAULT_STEPS

SITE_CHOICES = ("resid_pre", "resid_post", "attn", "mlp", "head")
METHOD_CHOICES = ("exact", "attribution", "ablation")


@dataclass
class PatchParams:
    """What ``behaviorlens patch`` takes (:func:`~.run.run_patch`; with ``--method ablation``,
    :func:`~.run.run_ablation`)."""

    site: str = param("resid_pre", "the site patched at every layer", choices=SITE_CHOICES)
    method: str = param("exact", "exact or attribution patching; ablation: knock out each head (--site head) "
                        "or layer component (attn, mlp) in turn", choices=METHOD_CHOICES, step=False)
    convention: str = param("mean", "with --method ablation: what replaces the component (default: mean over "
                            "the negative side; resample: a random other pair's)", name="ablation",
                            choices=ABLATIONS, step=False)
    direction: str = param("denoise", "denoise: patch the clean run into the corrupt one; noise: the reverse",
                           choices=("denoise", "noise"))
    clean: str = param("positive", "which side of the pairs is clean (default: positive)",
                       choices=("positive", "negative"))
    positions: list[str] | str | None = param(
        None, "'all' or position names (default: all; 'last' for heads)", nargs="+", step_default="all")
    steps: int = param(DEFAULT_STEPS, "attribution: gradient averaged over N interpolation steps (1 = plain)",
                       step=False)
    n_pairs: int | None = param(None, "use the first N pairs", name="pairs", step_default=8)
    batch_size: int = param(64, "patched copies per forward", step=False)

    def __post_init__(self) -> None:
        if self.positions == ["all"]:
            self.positions = "all"


@dataclass
class PatchStepParams(Step, PatchParams):
    """What an experiment's ``patch`` step takes (:func:`~.run.patch_step`)."""

    head_sweep: bool = param(True, "also patch every head at the last position (heads/)")
    attribution: bool = param(True, "also run attribution patching of the site (attribution/)")
