"""Left padding, offsets, position ids, columns and chunks."""

from __future__ import annotations

import pytest
import torch

from behaviorlens.batching import Batch, chunks, pad

PAD = 0


def test_pad_left_pads_and_masks():
    batch = pad([[5, 6, 7], [8], [9, 10]], PAD)
    assert isinstance(batch, Batch)
    assert len(batch) == 3
    assert batch.input_ids.tolist() == [[5, 6, 7], [PAD, PAD, 8], [PAD, 9, 10]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert batch.offsets.tolist() == [0, 2, 1]
    assert batch.input_ids.dtype == batch.attention_mask.dtype == torch.long
    assert batch.position_ids.dtype == batch.offsets.dtype == torch.long


def test_last_token_of_every_row_is_the_last_column():
    seqs = [[1, 2, 3, 4], [5], [6, 7]]
    batch = pad(seqs, PAD)
    assert batch.input_ids[:, -1].tolist() == [s[-1] for s in seqs]


def test_position_ids_count_real_tokens_only():
    batch = pad([[5, 6, 7, 8], [9, 10]], PAD)
    assert batch.position_ids.tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]
    # a real token's position id is its index in the unpadded sequence
    for i, off in enumerate(batch.offsets.tolist()):
        real = batch.position_ids[i, off:]
        assert real.tolist() == list(range(real.numel()))


def test_pad_id_is_used_and_real_tokens_equal_to_pad_id_stay_real():
    batch = pad([[3, 3], [7]], 3)
    assert batch.input_ids.tolist() == [[3, 3], [3, 7]]
    assert batch.attention_mask.tolist() == [[1, 1], [0, 1]]  # from lengths, not from ids


def test_columns_map_positions_to_padded_columns():
    seqs = [[10, 11, 12, 13], [20, 21], [30, 31, 32]]
    batch = pad(seqs, PAD)
    for pos in range(2):
        cols = batch.columns([pos] * 3)
        assert cols.dtype == torch.long
        got = batch.input_ids[torch.arange(3), cols].tolist()
        assert got == [s[pos] for s in seqs]
    # one position per row, as a list or a tensor
    cols = batch.columns(torch.tensor([3, 1, 2]))
    assert cols.tolist() == [3, 3, 3]
    assert batch.input_ids[torch.arange(3), cols].tolist() == [13, 21, 32]


def test_inputs_are_the_forward_keywords():
    batch = pad([[1, 2], [3]], PAD)
    inputs = batch.inputs()
    assert set(inputs) == {"input_ids", "attention_mask", "position_ids"}
    assert inputs["input_ids"] is batch.input_ids
    assert inputs["position_ids"] is batch.position_ids


def test_pad_moves_tensors_to_the_device_but_keeps_offsets_on_cpu():
    batch = pad([[1, 2], [3]], PAD, torch.device("meta"))
    assert batch.input_ids.device.type == "meta"
    assert batch.attention_mask.device.type == "meta"
    assert batch.position_ids.device.type == "meta"
    assert batch.offsets.device.type == "cpu"
    # positions on the model's device give columns there (offsets follow them)
    assert batch.columns(torch.zeros(2, dtype=torch.long, device="meta")).device.type == "meta"


def test_single_row_and_equal_lengths_have_no_padding():
    batch = pad([(4, 5, 6)], PAD)
    assert batch.offsets.tolist() == [0]
    assert batch.attention_mask.all()
    batch = pad([[1, 2], [3, 4]], PAD)
    assert batch.offsets.tolist() == [0, 0]
    assert batch.position_ids.tolist() == [[0, 1], [0, 1]]


def test_pad_rejects_an_empty_list():
    with pytest.raises(ValueError, match="empty"):
        pad([], PAD)


def test_chunks_cover_every_index_once_in_order():
    assert [list(r) for r in chunks(7, 3)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert [list(r) for r in chunks(6, 3)] == [[0, 1, 2], [3, 4, 5]]
    assert [list(r) for r in chunks(2, 5)] == [[0, 1]]
    assert list(chunks(0, 4)) == []
    assert [list(r) for r in chunks(3, 1)] == [[0], [1], [2]]
    for bad in (0, -1):
        with pytest.raises(ValueError, match="at least 1"):
            list(chunks(5, bad))


def test_model_batch_pads_with_the_tokenizer_pad_id(tiny_llama):
    batch = tiny_llama.batch([[5, 6, 7], [8]])
    assert batch.input_ids[1, :2].tolist() == [tiny_llama.pad_id] * 2
    assert batch.input_ids.device == tiny_llama.device


def test_map_batches_halves_the_batch_on_out_of_memory():
    from behaviorlens.batching import map_batches

    calls, logged = [], []

    def fn(idx):
        calls.append(list(idx))
        if len(idx) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return sum(idx)

    results = map_batches(7, 8, fn, log=logged.append)
    assert calls == [list(range(7)), [0, 1, 2, 3], [0, 1], [2, 3], [4, 5], [6]]
    assert results == [1, 5, 9, 6]
    assert len(logged) == 1 and "batch size" in logged[0]
    # without memory trouble it is chunks() mapped
    assert map_batches(5, 2, lambda idx: list(idx), log=logged.append) == [[0, 1], [2, 3], [4]]

    def never(idx):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        map_batches(3, 4, never, log=logged.append)


def test_memory_sizes_and_the_rows_a_budget_holds():
    from behaviorlens.batching import parse_bytes, rows_within
    from behaviorlens.errors import BehaviorLensError

    assert parse_bytes("40GiB") == 40 * 2**30 and parse_bytes("500 MB") == 500 * 10**6
    assert parse_bytes("2e9") == 2 * 10**9 and parse_bytes(1024) == 1024 and parse_bytes("1.5kib") == 1536
    for bad in ("lots", "40 GiBs", "-1GB", "0"):
        with pytest.raises(BehaviorLensError, match="not a memory size"):
            parse_bytes(bad)
    assert rows_within(8, 100, None) == 8  # no budget: as asked
    assert rows_within(8, 100, 350) == 3 and rows_within(8, 100, 10_000) == 8
    assert rows_within(8, 100, 50) == 1  # never fewer than one row
