"""Baking edits into weights: a new model that plain transformers loads.

Each kind bakes itself or says why it cannot (:meth:`behaviorlens.edits.EditKind.bake`):
``ablate_direction`` as weight orthogonalization, ``heads`` into the attention output
projection (and its bias), ``weights`` by adding its differences. Vectors, knockouts, subspace
clamps, gated edits and edits of some positions only depend on the input and are refused with
one line saying so.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..edits import Edit
from ..errors import BehaviorLensError

EDIT_FILE = "behaviorlens_edit.json"


@torch.no_grad()
def edited_module(model: Any, edit: Edit, strength: float = 1.0) -> torch.nn.Module:
    """A copy of ``model.hf`` with the edit baked into its weights (``model`` is untouched)."""
    edit.check(model)
    if edit.gate is not None or edit.positions != "all":
        where = "a gate decides per prompt" if edit.gate is not None else f"it acts on {edit.positions} positions only"
        raise BehaviorLensError(f"{edit.describe()}: {where}, which fixed weights cannot express; apply it "
                                "at run time (steer eval / steer generate)")
    hf = copy.deepcopy(model.hf)
    edit.spec.bake(edit, model.sites, hf, strength)
    return hf


def bake(model: Any, edit: Edit, out_dir: str | Path, strength: float = 1.0) -> Path:
    """Save the model with the edit in its weights (``save_pretrained``) plus the tokenizer
    and the edit's metadata (``behaviorlens_edit.json``); written to a temporary folder and
    renamed into place."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / EDIT_FILE).is_file():
        raise BehaviorLensError(f"{out_dir} exists and is not a baked-model folder; choose an empty one")
    hf = edited_module(model, edit, strength)
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        hf.save_pretrained(tmp)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(tmp)
        meta = edit.metadata() | {"baked_strength": strength, "source_model": model.name}
        (tmp / EDIT_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
