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
from dataclasses import dataclass
from typing import Any

import torch

from ..batching import current_answer_tail, current_prompt_part
from ..chat import Scaffold
from ..errors import BehaviorLensError
from ..kv_cache import in_force, keep_flags, kept_detection, kept_flags
from ..sites import module_output
from .kinds import (
    ForwardState,
    Intervention,
    Readout,
)


@dataclass
class HookState(ForwardState):
    """The forward state of the local fast path: :class:`~.kinds.ForwardState`'s readouts
    (``gate``, ``flags``, ``real``), plus what hooks learn as forwards go by: the tokens so far
    (``ids``), how many columns a cache holds (``past``: a generation step when > 0) and the
    detector's own tokens before a control's draw (``detected``)."""

    scaffold: Scaffold | None = None  # a knockout control's decoys are drawn among content tokens only
    ids: torch.Tensor | None = None  # [batch, tokens so far]
    past: int = 0
    detected: torch.Tensor | None = None  # [batch, tokens so far] bool

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

    def fail(self, message: str) -> None:
        """An intervention's hook cannot act on this model: one line."""
        raise BehaviorLensError(message)

    def gated(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """``new`` in rows whose gate fired (all rows without a gate), ``old`` elsewhere."""
        if self.gate is None:
            return new
        keep = self.gate.to(new.device).view(-1, *([1] * (new.dim() - 1)))
        return torch.where(keep, new, old)


@contextmanager
def applied(model: Any, interventions: list[Intervention], scaffold: Scaffold | None = None,
            ) -> Iterator[HookState | None]:
    """Interventions in force while the block runs: on the trace path (a traced model) they
    join the model's active list, else they become hooks and weight changes, and the block gets
    their :class:`HookState` (what a :class:`~.kinds.ReadSite` read is in its ``reads``)."""
    if model.traced:
        before = len(model.interventions)
        model.interventions.extend(interventions)
        try:
            yield
        finally:
            del model.interventions[before:]
        return
    phase = HookState(scaffold=scaffold)
    handles = [model.hf.register_forward_pre_hook(phase.pre_hook, with_kwargs=True)]
    weights = {name: d for iv in interventions for name, d in iv.parameter_changes().items()}
    try:
        handles += [h for iv in interventions for h in iv.hooks(model.hf, phase)]
        with _weights_added(model.hf, weights, 1.0), in_force(interventions):
            yield phase
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


