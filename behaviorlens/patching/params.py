"""The patching stage's parameters (:mod:`behaviorlens.params`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..params import param
from .ablation import CONVENTIONS
from .attribution import DEFAULT_STEPS

SITE_CHOICES = ("resid_pre", "resid_post", "attn", "mlp", "head")
METHOD_CHOICES = ("exact", "attribution", "ablation")


@dataclass
class PatchParams:
    """What ``behaviorlens patch`` and an experiment's ``patch`` step take (:func:`~.run.run_patch`)."""

    site: str = param("resid_pre", "the site patched at every layer", choices=SITE_CHOICES)
    method: str = param("exact", "exact or attribution patching; ablation: knock out each head (--site head) "
                        "or layer component (attn, mlp) in turn", choices=METHOD_CHOICES, step=False)
    ablation: str = param("mean", "with --method ablation: what replaces the component (default: mean over the "
                          "negative side; resample: a random other pair's)", choices=CONVENTIONS, step=False,
                          arg=None)
    direction: str = param("denoise", "denoise: patch the clean run into the corrupt one; noise: the reverse",
                           choices=("denoise", "noise"))
    clean: str = param("positive", "which side of the pairs is clean (default: positive)",
                       choices=("positive", "negative"))
    positions: list[str] | str | None = param(
        None, "'all' or position names (default: all; 'last' for heads)", nargs="+",
        step_default="all")
    steps: int = param(DEFAULT_STEPS, "attribution: gradient averaged over N interpolation steps (1 = plain)",
                       step=False)
    pairs: int | None = param(None, "use the first N pairs", step_default=8, arg="n_pairs")
    batch_size: int = param(64, "patched copies per forward", step=False)
    heads: bool = param(True, "also patch every head at the last position (experiment: heads/)", cli=False,
                        arg=None)
    attribution: bool = param(True, "also run attribution patching of the site (experiment: attribution/)",
                              cli=False, arg=None)

    def __post_init__(self) -> None:
        if self.positions == ["all"]:
            self.positions = "all"
