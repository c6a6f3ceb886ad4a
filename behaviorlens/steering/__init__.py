"""Editing a behavior: steering vectors, directional ablation, head edits, attention knockouts,
subspace clamps, weight edits, gates; choosing one from evidence, and scoring it honestly
against a no-pressure reference and random controls."""

from ..edits import Edit, Readout
from .apply import (
    ablate_direction,
    ablate_heads,
    direction_edit,
    head_edit,
    head_means,
    knockout,
    scale_heads,
    steer,
)
from .bake import bake, edited_module
from .choose import choose_edit
from .evaluate import evaluate_steering, random_control
from .gguf_export import export_gguf
from .run import generate_examples, run_steer_eval, run_steer_train
from .vectors import train_vector

__all__ = [
    "Edit", "Readout", "ablate_direction", "ablate_heads", "bake", "choose_edit",
    "direction_edit", "edited_module", "evaluate_steering", "export_gguf", "generate_examples",
    "head_edit", "head_means", "knockout", "random_control", "run_steer_eval",
    "run_steer_train", "scale_heads", "steer", "train_vector",
]
