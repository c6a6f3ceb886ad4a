"""Activation patching (exact, batched), attribution patching with exact verification, and
ablation scans."""

from .ablation import ablation_scan
from .attribution import Verification, attribution_patch, compare, verify_top_k
from .exact import patch, patch_one_at_a_time, patch_whole
from .results import PatchResult
from .run import run_ablation, run_patch

__all__ = [
    "PatchResult", "Verification", "ablation_scan", "attribution_patch", "compare", "patch",
    "patch_one_at_a_time", "patch_whole", "run_ablation", "run_patch", "verify_top_k",
]
