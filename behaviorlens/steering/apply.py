"""Applying edits at run time with plain torch hooks on ``model.hf``.

The hooks sit on the modules :class:`~behaviorlens.sites.SiteMap` names, so they act in plain
forward passes, inside nnsight traces and during ``generate``; every context manager removes
its hooks (and restores edited weights) in ``finally``. ``positions`` picks which tokens an
edit touches (for a knockout: from which query tokens attention is blocked):

- ``"all"``: every token, prompt and generated;
- ``"prompt"``: the tokens of the prompt only (a forward without a filled KV cache);
- ``"generated"``: the answer positions: the last prompt token (it predicts the first
  generated token) and every token generated after it; in a teacher-forced forward of a prompt
  and its answer (:func:`behaviorlens.batching.answer_tail`), the answer's tokens.

A gate (a linear read of the last prompt token's residual stream) is read in the prompt's
forward, before the layers the edit acts on, and holds for the generated tokens after it; rows
whose gate does not fire are left alone. A knockout's detector flags tokens the same way, at
every token, and the flags of the prompt stay with the generated tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ..batching import current_answer_tail, current_prompt_part
from ..chat import Scaffold
from ..errors import BehaviorLensError
from ..sites import module_output
from .edit import POSITIONS, Edit, Readout


class _Phase:
    """Tracks whether the current forward is a prompt or a cached continuation step, and what
    the edit's gate and detector read in it."""

    def __init__(self, scaffold: Scaffold | None = None) -> None:
        self.scaffold = scaffold  # a knockout control's decoys are drawn among content tokens only
        self.ids: torch.Tensor | None = None  # [batch, tokens so far]
        self.past = 0
        self.gate: torch.Tensor | None = None  # [batch] bool: rows whose gate fired
        self.detected: torch.Tensor | None = None  # [batch, tokens so far] bool: detected tokens
        self.flags: torch.Tensor | None = None  # the tokens to block: detected, or a control's decoys
        self.real: torch.Tensor | None = None  # [batch, tokens so far] bool: not padding

    def pre_hook(self, module: Any, args: Any, kwargs: dict) -> None:
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        length = 0
        if cache is not None and hasattr(cache, "get_seq_length"):
            length = int(cache.get_seq_length())
        self.past = length
        mask = kwargs.get("attention_mask")
        self.real = mask.bool() if mask is not None and mask.dim() == 2 else None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if length == 0:
            self.gate, self.detected, self.flags, self.ids = None, None, None, None
        if ids is not None and self.scaffold is not None:
            self.ids = ids if self.ids is None or length == 0 else torch.cat([self.ids.expand(ids.shape[0], -1), ids], 1)

    @property
    def prompt(self) -> bool:
        """Whether the current forward is (part of) a prompt rather than a generation step."""
        return self.past == 0 or current_prompt_part() is not None

    def columns(self, positions: str, batch: int, width: int, device: Any) -> torch.Tensor | None:
        """Which columns of each row of the current forward the edit touches: a bool mask
        [batch, width], or None for none."""
        prompt = self.prompt
        if positions == "prompt" and not prompt:
            return None
        if positions == "generated" and current_prompt_part() == "prefix":
            return None  # a shared prefix holds no answer position
        if positions != "generated" or not prompt:
            return torch.ones(batch, width, dtype=torch.bool, device=device)
        tail = torch.as_tensor(current_answer_tail(), device=device).expand(batch)
        return torch.arange(width, device=device)[None, :] >= (width - tail)[:, None]

    def read_gate(self, readout: Readout):
        def hook(module: Any, args: Any, output: Any) -> None:
            if self.prompt and current_prompt_part() != "prefix":
                self.gate = readout.scores(module_output(output)[:, -1]) > 0
        return hook

    def read_detector(self, readout: Readout):
        def hook(module: Any, args: Any, output: Any) -> None:
            found = readout.scores(module_output(output)) > 0
            if self.past > 0 and self.detected is not None:
                found = torch.cat([self.detected.expand(found.shape[0], -1), found], 1)
            real = None if self.real is None else self.real[:, -found.shape[1]:].to(found.device)
            self.detected = readout.close(found, real)
            if readout.decoy is None:
                self.flags = self.detected
            else:
                content = real
                if self.scaffold is not None and self.ids is not None:
                    content = self.scaffold.content(self.ids[:, -found.shape[1]:].to(found.device), real)
                self.flags = readout.decoys(self.detected, content)
        return hook

    def gated(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """``new`` in rows whose gate fired (all rows without a gate), ``old`` elsewhere."""
        if self.gate is None:
            return new
        keep = self.gate.to(new.device).view(-1, *([1] * (new.dim() - 1)))
        return torch.where(keep, new, old)


def _replace(output: Any, new: torch.Tensor) -> Any:
    return (new, *output[1:]) if isinstance(output, tuple) else new


def _residual_hook(change, phase: _Phase, positions: str):
    """A forward hook replacing the residual ``h`` at the edit's columns by ``change(h)``."""
    def hook(module: Any, args: Any, output: Any) -> Any:
        hs = module_output(output)
        cols = phase.columns(positions, hs.shape[0], hs.shape[1], hs.device)
        if cols is None:
            return None
        new = torch.where(cols[..., None], change(hs), hs)
        return _replace(output, phase.gated(hs, new))

    return hook


def _head_hook(edit: Edit, layer: int, strength: float, phase: _Phase, positions: str, n_heads: int, head_dim: int):
    heads = torch.tensor(edit.heads[layer], dtype=torch.long)
    values = edit.head_values.get(layer)

    def hook(module: Any, args: Any) -> Any:
        x = args[0]
        cols = phase.columns(positions, x.shape[0], x.shape[1], x.device)
        if cols is None:
            return None
        new = x.clone().view(*x.shape[:-1], n_heads, head_dim)
        idx = heads.to(x.device)
        cur = new[:, :, idx]
        if edit.head_mode == "scale":
            target = cur * (1 + strength * (edit.scale - 1))
        elif edit.head_mode == "add":
            target = cur + strength * values[heads].to(x.device, x.dtype)
        else:
            v = torch.zeros(len(idx), head_dim) if values is None else values[heads]
            target = cur + strength * (v.to(x.device, x.dtype) - cur)
        new[:, :, idx] = torch.where(cols[..., None, None], target, cur)
        return (phase.gated(x, new.view(x.shape)), *args[1:])

    return hook


def _knockout_hook(heads: list[int], n_heads: int, phase: _Phase, positions: str,
                   blocked: torch.Tensor | None = None):
    """A pre-hook on an attention module: ``heads`` may not attend from the edit's query
    columns to the flagged key columns (``blocked`` [batch, keys] if given, else the detector's)."""
    head_idx = torch.tensor(heads, dtype=torch.long)

    def hook(module: Any, args: Any, kwargs: dict) -> Any:
        if "attention_mask" not in kwargs:
            raise BehaviorLensError(f"{type(module).__name__} takes no attention_mask keyword; a knockout "
                                    "cannot reach its attention")
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        b, q = hidden.shape[0], hidden.shape[1]
        cols = phase.columns(positions, b, q, hidden.device)
        keys = blocked if blocked is not None else phase.flags
        if cols is None or keys is None:
            return None
        mask = kwargs["attention_mask"]
        k = phase.past + q
        if mask is None:
            allowed = torch.ones(q, k, dtype=torch.bool, device=hidden.device).tril(phase.past)[None, None]
        elif mask.dtype == torch.bool:
            allowed = mask[..., :k]
        else:
            allowed = mask[..., :k] == 0
        allowed = allowed.expand(b, n_heads, q, k).clone()
        block = keys[:, :k].to(hidden.device)[:, None, None, :] & cols[:, None, :, None]
        diagonal = torch.arange(k, device=hidden.device)[None, :] == (phase.past + torch.arange(q, device=hidden.device))[:, None]
        block = block & ~diagonal  # a token always sees itself
        if phase.gate is not None:
            block = block & phase.gate.to(hidden.device)[:, None, None, None]
        h = head_idx.to(hidden.device)
        allowed[:, h] &= ~block.expand(b, len(heads), q, k)
        if mask is None or mask.dtype == torch.bool:
            new_mask = allowed
        else:
            new_mask = torch.zeros_like(allowed, dtype=mask.dtype).masked_fill(~allowed, torch.finfo(mask.dtype).min)
        return args, kwargs | {"attention_mask": new_mask}

    return hook


@contextmanager
def _weights_added(hf: torch.nn.Module, weights: dict[str, torch.Tensor], strength: float) -> Iterator[None]:
    params = dict(hf.named_parameters())
    saved = {name: params[name].detach().clone() for name in weights}
    try:
        with torch.no_grad():
            for name, delta in weights.items():
                params[name].add_(strength * delta.to(params[name].device, params[name].dtype))
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


def _check_gate(edit: Edit) -> None:
    """A gate (and a detector) must be read before the first layer the edit acts on."""
    if edit.gate is None and edit.detector is None:
        return
    if edit.kind in ("ablate_direction", "weights") and edit.gate is not None:
        raise BehaviorLensError(f"a {edit.kind} edit acts from the first layer on, so it cannot be gated")
    first = min(edit.layers)
    late = edit.kind in ("vector", "subspace")  # these act on the residual leaving their layer
    for what, readout in (("gate", edit.gate), ("detector", edit.detector)):
        if readout is not None and (readout.layer > first or (readout.layer == first and not late)):
            raise BehaviorLensError(f"the edit's {what} reads layer {readout.layer}, after the edit acts "
                                    f"at layer {first}; read an earlier layer")


def _check_positions(positions: str) -> None:
    if positions not in POSITIONS:
        raise BehaviorLensError(f"unknown positions {positions!r}; use one of {', '.join(POSITIONS)}")


@contextmanager
def steer(
    model: Any,
    edit: Edit,
    multiplier: float = 1.0,
    layers: Sequence[int] | None = None,
    positions: str | None = None,
) -> Iterator[Edit]:
    """Apply an edit while the block runs; removes every hook (and restores weights) on exit.

    - ``vector``: ``multiplier * vector`` is added to the residual stream leaving each layer
      (``layers`` picks a subset of the edit's layers, or moves a one-layer vector elsewhere);
    - ``ablate_direction``: ``multiplier`` times the component along the direction is removed
      from everything written into the residual stream (1 = ablation, 2 = reflection);
    - ``heads``: each head moves ``multiplier`` of the way to its stored value (or scale), or
      gets ``multiplier`` times its stored vector added (``add``);
    - ``knockout``: attention of the heads to the detected tokens is blocked (any multiplier
      other than 0 blocks it fully);
    - ``subspace``: the subspace coordinates move ``multiplier`` of the way to its point's;
    - ``weights``: ``multiplier`` times the stored differences are added to the parameters.

    ``positions`` defaults to the edit's own.
    """
    positions = edit.positions if positions is None else positions
    _check_positions(positions)
    edit.check(model)
    _check_gate(edit)
    s, hf = model.sites, model.hf
    decoys = edit.detector is not None and edit.detector.decoy is not None
    phase = _Phase(Scaffold(model.tokenizer) if decoys else None)
    handles = [hf.register_forward_pre_hook(phase.pre_hook, with_kwargs=True)]
    m = float(multiplier)
    try:
        for readout, make in ((edit.gate, phase.read_gate), (edit.detector, phase.read_detector)):
            if readout is not None:
                handles.append(s.module(hf, "resid_post", readout.layer).register_forward_hook(make(readout)))
        if edit.kind == "vector":
            for layer, vec in _vector_layers(edit, layers).items():
                s.check("resid_post", layer)
                module = s.module(hf, "resid_post", layer)
                handles.append(module.register_forward_hook(
                    _residual_hook(lambda h, v=m * vec: h + v.to(h.device, h.dtype), phase, positions)))
        elif edit.kind == "ablate_direction":
            r = edit.direction

            def project(h: torch.Tensor) -> torch.Tensor:
                d = r.to(h.device, h.dtype)
                return h - m * (h @ d).unsqueeze(-1) * d

            handles += [mod.register_forward_hook(_residual_hook(project, phase, positions))
                        for mod in s.residual_sources(hf)]
        elif edit.kind == "subspace":
            for layer, basis in edit.basis.items():
                def clamp(h: torch.Tensor, b=basis, point=edit.vectors[layer]) -> torch.Tensor:
                    b, point = b.to(h.device, h.dtype), point.to(h.device, h.dtype)
                    return h + m * ((point - h) @ b) @ b.T

                handles.append(s.module(hf, "resid_post", layer).register_forward_hook(
                    _residual_hook(clamp, phase, positions)))
        elif edit.kind == "heads":
            for layer in edit.heads:
                module = s.module(hf, "head", layer)
                hook = _head_hook(edit, layer, m, phase, positions, s.n_heads, s.head_dim)
                handles.append(module.register_forward_pre_hook(hook))
        elif edit.kind == "knockout":
            if m != 0:
                for layer, heads in edit.heads.items():
                    hook = _knockout_hook(heads, s.n_heads, phase, positions)
                    handles.append(s.attention_module(hf, layer).register_forward_pre_hook(hook, with_kwargs=True))
        if edit.kind == "weights":
            with _weights_added(hf, edit.weights, m):
                yield edit
        else:
            yield edit
    finally:
        for h in handles:
            h.remove()


@contextmanager
def knockout(model: Any, heads: dict[int, Sequence[int]], blocked: torch.Tensor,
             positions: str = "generated") -> Iterator[None]:
    """Block attention of ``heads`` ({layer: [head, ...]}) from the ``positions`` query tokens to
    the key columns where ``blocked`` ([batch, padded columns] bool, for the next batch run) is
    true: the mechanism test of a path, with key tokens given (e.g. a family's slot tokens)."""
    _check_positions(positions)
    s, hf = model.sites, model.hf
    phase = _Phase()
    handles = [hf.register_forward_pre_hook(phase.pre_hook, with_kwargs=True)]
    try:
        for layer, hs in heads.items():
            for h in hs:
                s.check("head", layer, h)
            hook = _knockout_hook(list(hs), s.n_heads, phase, positions, blocked)
            handles.append(s.attention_module(hf, layer).register_forward_pre_hook(hook, with_kwargs=True))
        yield
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
    model: Any, reference: Any, layers: Sequence[int], position: str = "all", batch_size: int = 16,
    sides: Sequence[str] = ("positive", "negative"),
) -> dict[int, torch.Tensor]:
    """Mean output of every head of the given layers over a ContrastSet's ``sides``.

    ``position="all"`` averages over every real token; a position name (e.g. ``"last"``)
    averages over that token of each prompt.
    """
    from ..batching import chunks

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
        for side in sides:
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
    """A heads edit: zero-, mean-ablate (means from ``reference`` or given) or scale heads.

    A mean ablation keeps the means of every layer it was given (all layers when computed
    from ``reference``): its random control draws heads from any layer.
    """
    s = model.sites
    heads = {int(k): list(v) for k, v in heads.items() if len(v)}
    for layer, hs in heads.items():
        for h in hs:
            s.check("head", layer, h)
    values: dict[int, torch.Tensor] = {}
    if mode == "mean":  # every layer's means are kept, so a random control can draw any head
        if means is None:
            if reference is None:
                raise BehaviorLensError("mean head ablation needs a reference ContrastSet or means")
            means = head_means(model, reference, range(s.n_layers), position=position)
        missing = sorted(set(heads) - set(means))
        if missing:
            raise BehaviorLensError(f"mean head ablation has no mean values for layers {missing}")
        values = dict(means)
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
