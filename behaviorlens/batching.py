"""Batching and padding, handled here and nowhere else.

Sequences are left-padded so that the last real token of every row sits at the same column.
A token at position ``p`` of row ``i`` (counted in the unpadded sequence) lives at column
``p + offsets[i]``; position ids are derived from the attention mask, so a left-padded row
gives the same activations as the same row alone.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TypeVar

import torch

from .errors import BehaviorLensError

T = TypeVar("T")


@dataclass
class Batch:
    """A left-padded batch of token sequences and where each row starts."""

    input_ids: torch.Tensor  # [batch, seq]
    attention_mask: torch.Tensor  # [batch, seq]
    position_ids: torch.Tensor  # [batch, seq]
    offsets: torch.Tensor  # [batch]: padding columns before each row

    def inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for a forward pass or an nnsight trace."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
        }

    def columns(self, positions: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Padded column of each row's token position (one position per row)."""
        positions = torch.as_tensor(positions, dtype=torch.long)
        return positions + self.offsets.to(positions.device)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def pad(sequences: Sequence[Sequence[int]], pad_id: int, device: str | torch.device = "cpu") -> Batch:
    """Left-pad token id sequences into one batch."""
    if not sequences:
        raise ValueError("cannot pad an empty list of sequences")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    offsets = torch.empty(len(sequences), dtype=torch.long)
    for i, seq in enumerate(sequences):
        start = width - len(seq)
        ids[i, start:] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[i, start:] = 1
        offsets[i] = start
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(ids.to(device), mask.to(device), positions.to(device), offsets)


def chunks(n: int, size: int) -> Iterator[range]:
    """Index ranges of consecutive batches of at most ``size`` items."""
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    for start in range(0, n, size):
        yield range(start, min(start + size, n))


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int, where: str = "--max-memory") -> int:
    """A memory size such as ``40GiB``, ``500MB`` or a number of bytes, or a one-line error."""
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not found or found.group(2).lower() not in _UNITS or float(found.group(1)) <= 0:
        raise BehaviorLensError(f"{where}: {text!r} is not a memory size such as 40GiB, 500MB or 2e9")
    return int(float(found.group(1)) * _UNITS[found.group(2).lower()])


def rows_within(requested: int, row_bytes: int, budget: int | None) -> int:
    """``requested`` rows, or as many (at least 1) as ``budget`` bytes hold at ``row_bytes`` each."""
    if budget is None or row_bytes <= 0:
        return requested
    return max(1, min(requested, budget // row_bytes))


def map_batches(
    n: int,
    size: int,
    fn: Callable[[range], T],
    log: Callable[[str], None] = lambda msg: warnings.warn(msg, stacklevel=3),
) -> list[T]:
    """``[fn(batch) for batch in chunks(n, size)]``, halving the batch size on CUDA out-of-memory.

    A batch that runs out of GPU memory is retried at half the size, down to 1; the run says
    so once. Results of finished batches are kept.
    """
    results: list[T] = []
    start, said = 0, False
    while start < n:
        idx = range(start, min(start + size, n))
        try:
            results.append(fn(idx))
        except torch.cuda.OutOfMemoryError:
            if size == 1:
                raise
            size = max(1, size // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if not said:
                log(f"out of GPU memory: retrying with batch size {size}")
                said = True
            continue
        start = idx.stop
    return results


_ANSWER_TAIL: ContextVar[torch.Tensor | int | None] = ContextVar("answer_tail", default=None)


@contextmanager
def answer_tail(tail: torch.Tensor | int) -> Iterator[None]:
    """Forwards run inside are teacher-forced answers: the last ``tail`` columns of each row
    (an int, or one per row) are answer positions, where edits that act on generated tokens act.
    Outside, a forward's answer position is its last column."""
    token = _ANSWER_TAIL.set(tail)
    try:
        yield
    finally:
        _ANSWER_TAIL.reset(token)


def current_answer_tail() -> torch.Tensor | int:
    """The answer tail set by :func:`answer_tail` (1 outside it)."""
    tail = _ANSWER_TAIL.get()
    return 1 if tail is None else tail


_PROMPT_PART: ContextVar[str | None] = ContextVar("prompt_part", default=None)


@contextmanager
def prompt_part(part: str) -> Iterator[None]:
    """Forwards run inside are one part of a prompt: ``"prefix"`` (a shared prefix, run once and
    cached), ``"suffix"`` (the rest of each prompt, after the cached prefix) or ``"reused"``
    (the columns an edit changes, after the unedited model's kept keys and values:
    :mod:`behaviorlens.kv_cache`). Edits that act on answer positions act after the prefix only."""
    token = _PROMPT_PART.set(part)
    try:
        yield
    finally:
        _PROMPT_PART.reset(token)


def current_prompt_part() -> str | None:
    return _PROMPT_PART.get()


def shared_prefix(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the prefix every sequence shares, leaving at least one token of each."""
    if not sequences:
        return 0
    first, n = sequences[0], min(len(s) for s in sequences) - 1
    for i in range(max(n, 0)):
        if any(s[i] != first[i] for s in sequences):
            return i
    return max(n, 0)
