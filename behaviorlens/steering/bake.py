"""Baking edits into weights: a new model that plain transformers loads.

- ``ablate_direction``: weight orthogonalization. Every weight writing into the residual
  stream (embeddings, attention output projections, MLP output projections, and their biases)
  gets the direction projected out, so the direction never enters the residual stream: the
  same as runtime ablation at every layer and position. Tied input/output embeddings are
  untied first (the unembedding reads the residual stream and stays as it was).
- ``heads``: each edited head's columns of its attention output projection are zeroed
  (or scaled), and a mean ablation's constant contribution ``W[:, head] @ mean`` (or a per-head
  steering vector's ``W[:, head] @ vector``) moves into the projection's bias. Llama and Gemma
  get that bias through their ``attention_bias`` config flag (the new q/k/v biases are zero).
- ``weights``: the stored differences are added to the parameters.

Vectors, knockouts, subspace clamps, gated edits and edits of some positions only depend on the
input and are refused with one line saying so.
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

from ..errors import BehaviorLensError
from .edit import Edit

EDIT_FILE = "behaviorlens_edit.json"
NOT_WEIGHTS = {
    "vector": "a steering vector is added at run time and has no exact weight form (bake its direction "
              "instead: steer train --kind ablate_direction)",
    "knockout": "blocking attention to the tokens a probe flags depends on the input, not on weights",
    "subspace": "clamping a subspace to a point depends on the input, not on weights",
}


@torch.no_grad()
def edited_module(model: Any, edit: Edit, strength: float = 1.0) -> torch.nn.Module:
    """A copy of ``model.hf`` with the edit baked into its weights (``model`` is untouched)."""
    edit.check(model)
    if edit.gate is not None or edit.positions != "all":
        where = "a gate decides per prompt" if edit.gate is not None else f"it acts on {edit.positions} positions only"
        raise BehaviorLensError(f"{edit.describe()}: {where}, which fixed weights cannot express; apply it "
                                "at run time (steer eval / steer generate)")
    if edit.kind in NOT_WEIGHTS:
        raise BehaviorLensError(f"{edit.describe()}: {NOT_WEIGHTS[edit.kind]}; apply it at run time "
                                "(steer eval / steer generate)")
    hf = copy.deepcopy(model.hf)
    if edit.kind == "ablate_direction":
        _orthogonalize(model.sites, hf, edit.direction, strength)
    elif edit.kind == "heads":
        _bake_heads(model.sites, hf, edit, strength)
    else:
        params = dict(hf.named_parameters())
        for name, delta in edit.weights.items():
            params[name].add_(strength * delta.to(params[name].device, params[name].dtype))
    return hf


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _untie(sites: Any, hf: torch.nn.Module) -> None:
    emb, out = sites.embedding(hf), sites.unembed(hf)
    if out.weight is emb.weight or out.weight.data_ptr() == emb.weight.data_ptr():
        out.weight = torch.nn.Parameter(emb.weight.detach().clone())
    for cfg in {id(hf.config): hf.config, id(_text_config(hf.config)): _text_config(hf.config)}.values():
        cfg.tie_word_embeddings = False


def _orthogonalize(sites: Any, hf: torch.nn.Module, direction: torch.Tensor, strength: float) -> None:
    writers = sites.residual_writers(hf)  # raises for families where no weight edit is exact
    _untie(sites, hf)
    for module in writers:
        w = sites.output_weight(module)  # [d_model, fan_in] view of the parameter
        r = direction.to(w.device, torch.float32)
        w_f = w.float().clone()
        w.copy_((w_f - strength * torch.outer(r, r @ w_f)).to(w.dtype))
        bias = getattr(module, "bias", None)
        if bias is not None:
            b = bias.float()
            bias.copy_((b - strength * r * (r @ b)).to(bias.dtype))


def _bake_heads(sites: Any, hf: torch.nn.Module, edit: Edit, strength: float) -> None:
    needs_bias = {}
    for layer, heads in edit.heads.items():
        proj = sites.attn_out_proj(hf, layer)
        w = sites.output_weight(proj)
        add = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device)
        for h in heads:
            cols = slice(h * sites.head_dim, (h + 1) * sites.head_dim)
            block = w[:, cols].float().clone()  # .float() of a float32 view is the view itself
            if edit.head_mode == "scale":
                w[:, cols] = (block * (1 + strength * (edit.scale - 1))).to(w.dtype)
                continue
            if edit.head_mode == "add":
                add += strength * (block @ edit.head_values[layer][h].to(w.device))
                continue
            w[:, cols] = (block * (1 - strength)).to(w.dtype)
            if edit.head_mode == "mean":
                add += strength * (block @ edit.head_values[layer][h].to(w.device))
        if add.abs().max() > 0:
            needs_bias[layer] = add
    if needs_bias:
        _ensure_out_bias(sites, hf)
        for layer, add in needs_bias.items():
            bias = sites.attn_out_proj(hf, layer).bias
            bias.copy_((bias.float() + add).to(bias.dtype))


def _ensure_out_bias(sites: Any, hf: torch.nn.Module) -> None:
    """Give every attention output projection a bias, through a config flag plain
    transformers understands (a saved model must reload without behaviorlens)."""
    if all(sites.attn_out_proj(hf, i).bias is not None for i in range(sites.n_layers)):
        return
    cfg = _text_config(hf.config)
    if not hasattr(cfg, "attention_bias") or sites.arch.family not in ("llama", "gemma"):
        raise BehaviorLensError(
            f"{type(hf).__name__}: its attention output projection has no bias and the config "
            "has no flag to add one, so a mean-ablated head cannot be baked; use zero ablation "
            "or apply the edit at run time"
        )
    cfg.attention_bias = True
    for i in range(sites.n_layers):  # q/k/v/o all get biases under the flag: new ones are zero
        for lin in sites.attention_linears(hf, i):
            if lin.bias is None:
                lin.bias = torch.nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype,
                                                          device=lin.weight.device))


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
