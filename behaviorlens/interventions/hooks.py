"""The local fast path of the interventions: plain torch hooks on ``model.hf``.

:func:`applied` puts interventions in force while a block runs. On a traced model (remote, or
nnsight's simulation of it) they join the model's active list and act inside each trace
(:mod:`.trace`); otherwise they become hooks (and weight changes) that call the same tensor
math (:mod:`.kinds`), in plain forwards and during ``generate`` with a key-value cache.
``positions`` picks which tokens an edit touches:

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

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..batching import current_answer_tail, current_prompt_part
from ..chat import Scaffold
from ..errors import BehaviorLensError
from ..kv_cache import in_force, keep_flags, kept_detection, kept_flags
from ..sites import module_output
from .kinds import (
    AddWeights,
    EditHeads,
    Intervention,
    Knockout,
    ReadDetector,
    ReadGate,
    Readout,
    Residual,
    SetSite,
    knockout_mask,
)


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
        if length == 0 or current_prompt_part() == "reused":  # a new prompt, or its edited columns
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
            if current_prompt_part() == "reused":  # flags kept from this batch's earlier forward
                self.flags = kept_flags(readout)
                if self.flags is None:  # a control: its draws among the kept detection
                    ids, self.detected = kept_detection(readout)
                    content = None if self.real is None else self.real.to(self.detected.device)
                    if self.scaffold is not None:
                        content = self.scaffold.content(ids.to(self.detected.device), self.real)
                    self.flags = readout.decoys(self.detected, content)
                return
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
            keep_flags(readout, self.detected, self.flags)
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


def _head_hook(iv: EditHeads, phase: _Phase, n_heads: int, head_dim: int):
    heads = torch.tensor(iv.heads, dtype=torch.long)

    def hook(module: Any, args: Any) -> Any:
        x = args[0]
        cols = phase.columns(iv.positions, x.shape[0], x.shape[1], x.device)
        if cols is None:
            return None
        new = x.clone().view(*x.shape[:-1], n_heads, head_dim)
        idx = heads.to(x.device)
        cur = new[:, :, idx]
        new[:, :, idx] = torch.where(cols[..., None, None], iv.change(cur), cur)
        return (phase.gated(x, new.view(x.shape)), *args[1:])

    return hook


def _knockout_hook(iv: Knockout, phase: _Phase):
    """A pre-hook on an attention module: the heads may not attend from the edit's query
    columns to the flagged key columns (the given ``blocked`` ones, else the detector's)."""
    def hook(module: Any, args: Any, kwargs: dict) -> Any:
        if "attention_mask" not in kwargs:
            raise BehaviorLensError(f"{type(module).__name__} takes no attention_mask keyword; a knockout "
                                    "cannot reach its attention")
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        cols = phase.columns(iv.positions, hidden.shape[0], hidden.shape[1], hidden.device)
        keys = iv.blocked if iv.blocked is not None else phase.flags
        if cols is None or keys is None:
            return None
        mask = knockout_mask(kwargs["attention_mask"], keys, cols, phase.gate, iv.heads, iv.n_heads,
                             hidden.shape[1], phase.past, hidden.device)
        return args, kwargs | {"attention_mask": mask}

    return hook


def _hooks(model: Any, phase: _Phase, interventions: list[Intervention]) -> list[Any]:
    """The local fast path: each intervention as torch hooks (the handles to remove)."""
    s, hf = model.sites, model.hf
    handles = []
    for iv in interventions:
        if isinstance(iv, ReadGate):
            handles.append(iv.ref.module(hf).register_forward_hook(phase.read_gate(iv.readout)))
        elif isinstance(iv, ReadDetector):
            handles.append(iv.ref.module(hf).register_forward_hook(phase.read_detector(iv.readout)))
        elif isinstance(iv, Residual):
            handles += [ref.module(hf).register_forward_hook(_residual_hook(iv.change, phase, iv.positions))
                        for ref in iv.sites]
        elif isinstance(iv, EditHeads):
            handles.append(iv.site.module(hf).register_forward_pre_hook(_head_hook(iv, phase, s.n_heads, s.head_dim)))
        elif isinstance(iv, Knockout):
            handles.append(iv.call.module(hf).register_forward_pre_hook(_knockout_hook(iv, phase), with_kwargs=True))
        elif isinstance(iv, SetSite):
            handles.append(_set_hook(iv, hf))
        elif isinstance(iv, AddWeights) and iv.linear:
            handles.append(iv.module.module(hf).register_forward_hook(lambda mod, args, out, iv=iv: iv.change(args[0], out)))
    return handles


def _set_hook(iv: SetSite, hf: torch.nn.Module) -> Any:
    """A hook writing ``site[index] = value`` (on a copy of the module's input or output)."""
    module, ref = iv.site.module(hf), iv.site

    def place(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        view = x.view(*x.shape[:-1], ref.heads, x.shape[-1] // ref.heads) if ref.heads else x
        view[iv.index] = iv.value.to(x.device, x.dtype)
        return x

    if ref.part == "input":
        return module.register_forward_pre_hook(lambda mod, args: (place(args[0]), *args[1:]))

    def post(mod: Any, args: Any, out: Any) -> Any:
        new = place(module_output(out))
        return (new, *out[1:]) if isinstance(out, tuple) else new

    return module.register_forward_hook(post)


@contextmanager
def applied(model: Any, interventions: list[Intervention], scaffold: Scaffold | None = None) -> Iterator[None]:
    """Interventions in force while the block runs: on the trace path (a traced model) they
    join the model's active list, else they become hooks and weight changes."""
    if model.traced:
        before = len(model.interventions)
        model.interventions.extend(interventions)
        try:
            yield
        finally:
            del model.interventions[before:]
        return
    phase = _Phase(scaffold)
    handles = [model.hf.register_forward_pre_hook(phase.pre_hook, with_kwargs=True)]
    weights = {name: iv.strength * d for iv in interventions if isinstance(iv, AddWeights) and not iv.linear
               for name, d in iv.params.items()}
    try:
        handles += _hooks(model, phase, interventions)
        with _weights_added(model.hf, weights, 1.0), in_force(interventions):
            yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _weights_added(hf: torch.nn.Module, weights: dict[str, torch.Tensor], strength: float) -> Iterator[None]:
    params = dict(hf.named_parameters())
    offloaded = [name for name in weights if params[name].is_meta]
    if offloaded:
        raise BehaviorLensError(f"parameter {offloaded[0]} is offloaded (accelerate keeps it elsewhere), so a weights "
                                "edit cannot change it in place; only linear modules' weights and biases can be edited "
                                "on an offloaded model")
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


