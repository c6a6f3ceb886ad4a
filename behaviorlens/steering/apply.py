"""Applying edits at run time with plain torch hooks on ``model.hf``.

The hooks sit on the modules :class:`~behaviorlens.sites.SiteMap` names, so they act in plain
forward passes, inside nnsight traces and during ``generate``; every context manager removes
its hooks in ``finally``. ``positions`` picks which tokens an edit touches:

- ``"all"``: every token, prompt and generated;
- ``"prompt"``: the tokens of the prompt only (a forward without a filled KV cache);
- ``"generated"``: the last prompt token (it predicts the first generated token) and every
  token generated after it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ..errors import BehaviorLensError
from ..sites import module_output
from .edit import Edit

POSITIONS = ("all", "prompt", "generated")


class _Phase:
    """Tracks whether the current forward is a prompt or a cached continuation step."""

    def __init__(self) -> None:
        self.past = 0

    def pre_hook(self, module: Any, args: Any, kwargs: dict) -> None:
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        length = 0
        if cache is not None and hasattr(cache, "get_seq_length"):
            length = int(cache.get_seq_length())
        self.past = length

    def columns(self, positions: str) -> slice | None:
        """Which sequence columns of the current forward the edit touches (None: none)."""
        prompt = self.past == 0
        if positions == "all":
            return slice(None)
        if positions == "prompt":
            return slice(None) if prompt else None
        return slice(-1, None) if prompt else slice(None)


def _replace(output: Any, new: torch.Tensor) -> Any:
    return (new, *output[1:]) if isinstance(output, tuple) else new


def _add_hook(vec: torch.Tensor, phase: _Phase, positions: str):
    def hook(module: Any, args: Any, output: Any) -> Any:
        cols = phase.columns(positions)
        if cols is None:
            return None
        hs = module_output(output)
        v = vec.to(hs.device, hs.dtype)
        if cols == slice(None):
            return _replace(output, hs + v)
        new = hs.clone()
        new[:, cols] += v
        return _replace(output, new)

    return hook


def _project_hook(direction: torch.Tensor, strength: float, phase: _Phase, positions: str):
    def hook(module: Any, args: Any, output: Any) -> Any:
        cols = phase.columns(positions)
        if cols is None:
            return None
        hs = module_output(output)
        r = direction.to(hs.device, hs.dtype)
        new = hs.clone()
        part = new[:, cols]
        new[:, cols] = part - strength * (part @ r).unsqueeze(-1) * r
        return _replace(output, new)

    return hook


def _head_hook(edit: Edit, layer: int, strength: float, phase: _Phase, positions: str, n_heads: int, head_dim: int):
    heads = torch.tensor(edit.heads[layer], dtype=torch.long)
    values = edit.head_values.get(layer)

    def hook(module: Any, args: Any) -> Any:
        cols = phase.columns(positions)
        if cols is None:
            return None
        x = args[0]
        new = x.clone().view(*x.shape[:-1], n_heads, head_dim)
        idx = heads.to(x.device)
        cur = new[:, cols][:, :, idx]
        if edit.head_mode == "scale":
            target = cur * (1 + strength * (edit.scale - 1))
        else:
            v = torch.zeros(len(idx), head_dim) if values is None else values[heads]
            v = v.to(x.device, x.dtype)
            target = cur + strength * (v - cur)
        sub = new[:, cols]
        sub[:, :, idx] = target
        new[:, cols] = sub
        return (new.view(x.shape), *args[1:])

    return hook


def _check_positions(positions: str) -> None:
    if positions not in POSITIONS:
        raise BehaviorLensError(f"unknown positions {positions!r}; use one of {', '.join(POSITIONS)}")


@contextmanager
def steer(
    model: Any,
    edit: Edit,
    multiplier: float = 1.0,
    layers: Sequence[int] | None = None,
    positions: str = "all",
) -> Iterator[Edit]:
    """Apply an edit while the block runs; removes every hook on exit.

    - ``vector``: ``multiplier * vector`` is added to the residual stream leaving each layer
      (``layers`` picks a subset of the edit's layers, or moves a one-layer vector elsewhere);
    - ``ablate_direction``: ``multiplier`` times the component along the direction is removed
      from everything written into the residual stream (1 = ablation, 2 = reflection);
    - ``heads``: each head moves ``multiplier`` of the way to its stored value (or scale).
    """
    _check_positions(positions)
    edit.check(model)
    s, hf = model.sites, model.hf
    phase = _Phase()
    handles = [hf.register_forward_pre_hook(phase.pre_hook, with_kwargs=True)]
    try:
        if edit.kind == "vector":
            for layer, vec in _vector_layers(edit, layers).items():
                s.check("resid_post", layer)
                module = s.module(hf, "resid_post", layer)
                handles.append(module.register_forward_hook(_add_hook(multiplier * vec, phase, positions)))
        elif edit.kind == "ablate_direction":
            hook = _project_hook(edit.direction, float(multiplier), phase, positions)
            handles += [m.register_forward_hook(hook) for m in s.residual_sources(hf)]
        else:
            for layer in edit.heads:
                module = s.module(hf, "head", layer)
                hook = _head_hook(edit, layer, float(multiplier), phase, positions, s.n_heads, s.head_dim)
                handles.append(module.register_forward_pre_hook(hook))
        yield edit
    finally:
        for h in handles:
            h.remove()


def _vector_layers(edit: Edit, layers: Sequence[int] | None) -> dict[int, torch.Tensor]:
    if layers is None:
        return dict(edit.vectors)
    out = {}
    for layer in layers:
        if layer in edit.vectors:
            out[layer] = edit.vectors[layer]
        elif len(edit.vectors) == 1:
            out[layer] = next(iter(edit.vectors.values()))
        else:
            raise BehaviorLensError(
                f"the edit has vectors for layers {edit.layers}, not for layer {layer}"
            )
    return out


def direction_edit(model: Any, direction: torch.Tensor, layer: int = -1, **meta: Any) -> Edit:
    """An ablate_direction edit for a raw direction (normalized to unit length)."""
    direction = torch.as_tensor(direction).detach().float().cpu().flatten()
    norm = direction.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise BehaviorLensError("cannot ablate a zero or non-finite direction")
    s = model.sites
    meta.setdefault("method", "direction")
    return Edit(kind="ablate_direction", vectors={layer: direction / norm}, model=model.name,
                d_model=s.d_model, n_heads=s.n_heads, head_dim=s.head_dim, **meta)


@contextmanager
def ablate_direction(model: Any, direction: torch.Tensor | Edit, positions: str = "all") -> Iterator[Edit]:
    """Project a direction out of the residual stream at every layer and position."""
    edit = direction if isinstance(direction, Edit) else direction_edit(model, direction)
    with steer(model, edit, 1.0, positions=positions) as e:
        yield e


@torch.inference_mode()
def head_means(
    model: Any, reference: Any, layers: Sequence[int], position: str = "all", batch_size: int = 16
) -> dict[int, torch.Tensor]:
    """Mean output of every head of the given layers over a ContrastSet (both sides).

    ``position="all"`` averages over every real token; a position name (e.g. ``"last"``)
    averages over that token of each prompt.
    """
    from ..batching import chunks
    from ..prompts.contrast import SIDES

    s, hf = model.sites, model.hf
    sums = {layer: torch.zeros(s.n_heads, s.head_dim, dtype=torch.float64) for layer in layers}
    count = 0
    current: dict[str, Any] = {}

    def make(layer: int):
        def hook(module: Any, args: Any) -> None:
            x = args[0].float().view(*args[0].shape[:-1], s.n_heads, s.head_dim)
            sel = x[current["rows"], current["cols"]] if position != "all" else x[current["mask"]]
            sums[layer] += sel.sum(0).double().cpu()
        return hook

    handles = [s.module(hf, "head", layer).register_forward_pre_hook(make(layer)) for layer in layers]
    try:
        for side in SIDES:
            for idx in chunks(len(reference), batch_size):
                pairs = [reference[i] for i in idx]
                batch = model.batch([p.tokens[side] for p in pairs])
                if position == "all":
                    current["mask"] = batch.attention_mask.bool()
                    count += int(batch.attention_mask.sum())
                else:
                    current["rows"] = torch.arange(len(pairs))
                    current["cols"] = batch.columns([p.position(side, position) for p in pairs])
                    count += len(pairs)
                hf(**batch.inputs(), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {layer: (v / max(count, 1)).float() for layer, v in sums.items()}


def head_edit(
    model: Any,
    heads: dict[int, Sequence[int]],
    mode: str = "zero",
    reference: Any = None,
    means: dict[int, torch.Tensor] | None = None,
    scale: float = 0.0,
    position: str = "all",
    **meta: Any,
) -> Edit:
    """A heads edit: zero-, mean-ablate (means from ``reference`` or given) or scale heads."""
    s = model.sites
    heads = {int(k): list(v) for k, v in heads.items() if len(v)}
    for layer, hs in heads.items():
        for h in hs:
            s.check("head", layer, h)
    values: dict[int, torch.Tensor] = {}
    if mode == "mean":
        if means is None:
            if reference is None:
                raise BehaviorLensError("mean head ablation needs a reference ContrastSet or means")
            means = head_means(model, reference, sorted(heads), position=position)
        values = {layer: means[layer] for layer in heads}
    meta.setdefault("method", f"{mode}_heads")
    if reference is not None:
        meta.setdefault("family", reference.name)
    return Edit(kind="heads", heads=heads, head_values=values, head_mode=mode, scale=scale,
                model=model.name, position=position, d_model=s.d_model, n_heads=s.n_heads,
                head_dim=s.head_dim, **meta)


@contextmanager
def ablate_heads(
    model: Any,
    heads: dict[int, Sequence[int]],
    mode: str = "zero",
    reference: Any = None,
    means: dict[int, torch.Tensor] | None = None,
    positions: str = "all",
) -> Iterator[Edit]:
    """Zero- or mean-ablate attention heads (``{layer: [head, ...]}``) while the block runs."""
    if mode not in ("zero", "mean"):
        raise BehaviorLensError(f"unknown head ablation mode {mode!r}; use 'zero' or 'mean'")
    edit = head_edit(model, heads, mode, reference=reference, means=means)
    with steer(model, edit, 1.0, positions=positions) as e:
        yield e


@contextmanager
def scale_heads(model: Any, heads: dict[int, Sequence[int]], factor: float, positions: str = "all") -> Iterator[Edit]:
    """Multiply the outputs of attention heads by ``factor`` while the block runs."""
    edit = head_edit(model, heads, "scale", scale=factor)
    with steer(model, edit, 1.0, positions=positions) as e:
        yield e
