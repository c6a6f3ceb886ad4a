"""Local scoring forwards that recompute only what changes.

Two savings, both exact (the same numbers as one padded forward, to float tolerance):

- A prefix every sequence of a batch shares (a chat template's system turn) runs once; its
  keys and values serve every row. Edits see it as a prompt part
  (:func:`behaviorlens.batching.prompt_part`).
- Inside :func:`reusing_unedited`, each batch's unedited forward keeps its keys and values (up
  to a byte budget, the least recently used batch out first). A later forward of the same batch
  with interventions in force starts at the first column any of them changes
  (:meth:`~behaviorlens.interventions.kinds.Intervention.first_change`): the answer positions
  for edits that act there, the columns after the first flagged token for a knockout from every
  later position. A detector's flags are kept with the batch too, so they are computed once
  per sequence. Forwards started from the cache run as the prompt part ``"reused"``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from .batching import current_answer_tail, prompt_part, shared_prefix

PREFIX_MIN = 8  # a shared prefix shorter than this is not worth a cached run
BUDGET = 2 * 2**30  # bytes of keys and values kept by default


@dataclass
class Kept:
    """One batch's unedited forward: its layout, keys and values per layer, and its detectors'
    flags (per detector, see :func:`detector_key`)."""

    input_ids: torch.Tensor  # [batch, width]
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    keys_values: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, [batch, kv heads, width, head dim]
    flags: dict[tuple, tuple[Any, torch.Tensor]] = field(default_factory=dict)  # key -> (readout, [batch, width])

    @property
    def nbytes(self) -> int:
        return sum(2 * k.numel() * k.element_size() for k, _ in self.keys_values)


class UneditedCache:
    """The kept batches, keyed by their token sequences, within a byte budget."""

    def __init__(self, budget: int = BUDGET) -> None:
        self.budget = budget
        self.batches: OrderedDict[tuple, Kept] = OrderedDict()
        self.reused = 0  # forwards started from a kept cache
        self.full = 0  # edited forwards run in full

    def get(self, key: tuple) -> Kept | None:
        kept = self.batches.get(key)
        if kept is not None:
            self.batches.move_to_end(key)
        return kept

    def put(self, key: tuple, kept: Kept) -> None:
        self.batches[key] = kept
        total = sum(k.nbytes for k in self.batches.values())
        while total > self.budget and len(self.batches) > 1:
            _, old = self.batches.popitem(last=False)
            total -= old.nbytes


_STORE: ContextVar[UneditedCache | None] = ContextVar("unedited_cache", default=None)
_IN_FORCE: ContextVar[tuple] = ContextVar("interventions_in_force", default=())
_RUNNING: ContextVar[Kept | None] = ContextVar("kept_batch_running", default=None)


@contextmanager
def reusing_unedited(budget: int = BUDGET) -> Iterator[UneditedCache]:
    """Inside, local scoring forwards keep the unedited model's keys and values per batch and
    edited forwards of the same batch start from them (see the module doc)."""
    store = UneditedCache(budget)
    token = _STORE.set(store)
    try:
        yield store
    finally:
        _STORE.reset(token)


@contextmanager
def in_force(interventions: Sequence[Any]) -> Iterator[None]:
    """Declares the interventions the local hooks apply while the block runs."""
    token = _IN_FORCE.set(_IN_FORCE.get() + tuple(interventions))
    try:
        yield
    finally:
        _IN_FORCE.reset(token)


def detector_key(readout: Any, drawn: bool = True) -> tuple:
    """What makes two readouts flag the same tokens: layer, direction (its storage, kept alive
    by the flags that hold it), bias, gap and (``drawn``) a control's draw."""
    return readout.layer, readout.direction.data_ptr(), readout.bias, readout.gap, readout.decoy if drawn else None


def kept_flags(readout: Any) -> torch.Tensor | None:
    """The flags ``readout`` gave on the batch now running, if kept."""
    kept = _RUNNING.get()
    hit = None if kept is None else kept.flags.get(detector_key(readout))
    return None if hit is None else hit[1]


def kept_detection(readout: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The batch now running (its token ids) and the tokens ``readout`` detects in it, before a
    control's draw, if kept."""
    kept = _RUNNING.get()
    hit = None if kept is None else kept.flags.get(detector_key(readout, drawn=False))
    return None if hit is None else (kept.input_ids, hit[1])


def keep_flags(readout: Any, detected: torch.Tensor, flags: torch.Tensor) -> None:
    """Keeps a detector's detection and flags of the whole batch now running (a full forward of
    a kept batch)."""
    kept = _RUNNING.get()
    if kept is not None and flags.shape[1] == kept.input_ids.shape[1]:
        kept.flags[detector_key(readout)] = (readout, flags)
        kept.flags[detector_key(readout, drawn=False)] = (readout, detected)


@contextmanager
def _running(kept: Kept | None) -> Iterator[None]:
    token = _RUNNING.set(kept)
    try:
        yield
    finally:
        _RUNNING.reset(token)


@dataclass
class _Layout:
    """A batch as one forward sees it: a shared prefix (run once) and the left-padded rest."""

    prefix: int
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    offsets: torch.Tensor  # [batch]: column of position p (>= prefix) is p + offset


def _layout(model: Any, sequences: Sequence[Sequence[int]]) -> _Layout:
    prefix = shared_prefix(sequences) if len(sequences) > 1 else 0
    if prefix < PREFIX_MIN:
        prefix = 0
    rest = model.batch([list(s[prefix:]) for s in sequences])
    n, dev = len(sequences), rest.input_ids.device
    head = torch.tensor([list(sequences[0][:prefix])], dtype=torch.long, device=dev).expand(n, prefix)
    return _Layout(prefix, torch.cat([head, rest.input_ids], 1),
                   torch.cat([torch.ones(n, prefix, dtype=rest.attention_mask.dtype, device=dev), rest.attention_mask], 1),
                   torch.cat([torch.arange(prefix, device=dev).expand(n, prefix), rest.position_ids + prefix], 1),
                   rest.offsets)


@torch.inference_mode()
def score_logits(model: Any, sequences: Sequence[Sequence[int]], rows: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
    """Float32 logits at (sequence, token position) reads: [reads, vocab] (the local path of
    :meth:`behaviorlens.model.Model.score_logits`)."""
    lay = _layout(model, sequences)
    cols = positions + lay.offsets[rows].to(positions.device)
    store = _STORE.get()
    edits = _IN_FORCE.get()
    key = tuple(tuple(int(t) for t in s) for s in sequences) if store is not None else None
    kept = store.get(key) if store is not None else None
    if kept is not None and edits:
        start = _first_change(edits, kept, int(cols.min()))
        if start > 0:
            store.reused += 1
            return _forward(model, kept.input_ids, kept.attention_mask, kept.position_ids, start, rows, cols,
                            kept.keys_values, kept, "reused")[0]
        store.full += 1
    keep = store is not None and not edits
    logits, cache = _forward(model, lay.input_ids, lay.attention_mask, lay.position_ids, lay.prefix, rows, cols,
                             None, kept, "suffix" if lay.prefix else None, keep)
    if keep:
        store.put(key, Kept(lay.input_ids, lay.attention_mask, lay.position_ids,
                            [(layer.keys, layer.values) for layer in cache.layers]))
    return logits


def _first_change(edits: Sequence[Any], kept: Kept, first_read: int) -> int:
    """The first column the edits in force may change (at most the first one read)."""
    width = kept.input_ids.shape[1]
    tail = current_answer_tail()
    tail = int(tail.max()) if isinstance(tail, torch.Tensor) else int(tail)
    detectors = [r for r in (iv.detector() for iv in edits) if r is not None]
    only = kept.flags.get(detector_key(detectors[0])) if len(detectors) == 1 else None

    def flags(readout: Any) -> torch.Tensor | None:  # a control's draws are made from the kept detection
        hit = only if readout is None else (kept.flags.get(detector_key(readout))
                                            or kept.flags.get(detector_key(readout, drawn=False)))
        return None if hit is None else hit[1]

    return min([first_read, *(iv.first_change(width, tail, flags) for iv in edits)])


def _forward(model: Any, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, start: int,
             rows: torch.Tensor, cols: torch.Tensor, past: list | None, kept: Kept | None, part: str | None,
             keep: bool = False) -> tuple[torch.Tensor, Any]:
    """Logits at (row, column) reads of a forward of columns ``start:``, the earlier ones taken
    from ``past`` (kept keys and values) or, without it, from a run of row 0's first ``start``
    columns (a shared prefix)."""
    hf = model.hf
    cache = None
    if start:
        if past is not None:
            cache = DynamicCache(ddp_cache_data=[(k[..., :start, :], v[..., :start, :]) for k, v in past],
                                 config=hf.config)
        else:
            with prompt_part("prefix"):
                out = hf(input_ids=ids[:1, :start], position_ids=pos[:1, :start], use_cache=True)
            cache = getattr(out, "cache", None) or out.past_key_values
            cache.batch_repeat_interleave(ids.shape[0])
    kwargs, local = model.unembedded(ids.shape[1] - start, cols - start)
    if cache is not None:
        kwargs[model.cache_argument] = cache
    with prompt_part(part) if part else nullcontext(), _running(kept):
        out = hf(input_ids=ids[:, start:], attention_mask=mask, position_ids=pos[:, start:],
                 use_cache=bool(cache is not None or keep), **kwargs)
    logits = out.logits
    result = logits[rows.to(logits.device), local.to(logits.device)].float()
    return result, (getattr(out, "cache", None) or out.past_key_values) if keep else None
