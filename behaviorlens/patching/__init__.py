"""Activation patching (exact, batched) and attribution patching, with exact verification."""

from .attribution import Verification, attribution_patch, compare, verify_top_k
from .exact import patch, patch_one_at_a_time, patch_whole
from .results import PatchResult
from .run import run_patch

__all__ = [
    "PatchResult", "Verification", "attribution_patch", "compare", "patch", "patch_one_at_a_time",
    "patch_whole", "run_patch", "verify_top_k",
]
