"""Batching and padding, handled here and nowhere else.

Sequences are left-padded so that the last real token of every row sits at the same column.
A token at position ``p`` of row ``i`` (counted in the unpadded sequence) lives at column
``p + offsets[i]``; position ids are derived from the attention mask, so a left-padded row
gives the same activations as the same row alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

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
