"""Edit files: round trip, corrupt files and width mismatches fail with BehaviorLensError."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from steering_helpers import tiny_set

from behaviorlens.errors import BehaviorLensError
from behaviorlens.steering import Edit, export_gguf, head_edit, train_vector
from behaviorlens.steering.gguf_export import gguf_arch, read_gguf


def test_a_vector_edit_survives_saving_and_loading(tiny_llama, tmp_path):
    cset = tiny_set(tiny_llama)
    edit = train_vector(tiny_llama, cset, [0, 2], method="mean_diff")
    edit.save(tmp_path / "v.safetensors")
    back = Edit.load(tmp_path / "v.safetensors", tiny_llama)
    assert back.kind == "vector" and back.layers == [0, 2] and back.family == cset.name
    assert back.method == "mean_diff" and back.read_at == "last"
    for layer in (0, 2):
        assert torch.equal(back.vectors[layer], edit.vectors[layer])
    assert back.norm == pytest.approx(edit.norm)


def test_a_heads_edit_survives_saving_and_loading(tiny_llama, tmp_path):
    cset = tiny_set(tiny_llama)
    edit = head_edit(tiny_llama, {1: [0, 3]}, "mean", reference=cset)
    edit.save(tmp_path / "h.safetensors")
    back = Edit.load(tmp_path / "h.safetensors", tiny_llama)
    assert back.kind == "heads" and back.heads == {1: [0, 3]} and back.head_mode == "mean"
    assert torch.equal(back.head_values[1], edit.head_values[1])


def test_truncated_and_foreign_files_fail(tiny_llama, tmp_path):
    edit = train_vector(tiny_llama, tiny_set(tiny_llama), [1])
    path = edit.save(tmp_path / "v.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BehaviorLensError, match="truncated or corrupt"):
        Edit.load(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(BehaviorLensError):
        Edit.load(tmp_path / "junk.safetensors")
    with pytest.raises(BehaviorLensError, match="does not exist"):
        Edit.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(3)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(BehaviorLensError, match="without behaviorlens edit metadata"):
        Edit.load(tmp_path / "plain.safetensors")


def test_width_mismatch_fails(tiny_llama, tmp_path):
    edit = Edit(kind="vector", vectors={1: torch.ones(32)}, d_model=32)
    edit.save(tmp_path / "w.safetensors")
    with pytest.raises(BehaviorLensError, match="width"):
        Edit.load(tmp_path / "w.safetensors", tiny_llama)


def test_a_vector_edit_exports_as_a_gguf_control_vector(tiny_llama, tmp_path):
    edit = train_vector(tiny_llama, tiny_set(tiny_llama), [1, 2])
    export_gguf(edit, tmp_path / "cv.gguf", strength=2.0)
    assert gguf_arch(tmp_path / "cv.gguf") == "controlvector"
    tensors = read_gguf(tmp_path / "cv.gguf")
    assert sorted(tensors) == [1, 2]
    np.testing.assert_allclose(tensors[2], 2.0 * edit.vectors[2].numpy(), rtol=1e-6)
    with pytest.raises(BehaviorLensError, match="layer 0"):
        export_gguf(train_vector(tiny_llama, tiny_set(tiny_llama), [0]), tmp_path / "x.gguf")


def test_vectors_match_hidden_states(tiny_llama):
    """mean_diff equals the mean difference of transformers' own hidden states; pca and probe
    point the same way."""
    cset = tiny_set(tiny_llama)
    edit = train_vector(tiny_llama, cset, [1])
    diffs = []
    for p in cset:
        hs = {}
        for side in ("positive", "negative"):
            out = tiny_llama.hf(torch.tensor([p.tokens[side]]), output_hidden_states=True)
            hs[side] = out.hidden_states[2][0, p.position(side, "last")]
        diffs.append(hs["positive"] - hs["negative"])
    ref = torch.stack(diffs).mean(0)
    torch.testing.assert_close(edit.vectors[1], ref.detach(), atol=1e-5, rtol=1e-4)
    for method in ("pca", "probe"):
        other = train_vector(tiny_llama, cset, [1], method=method).vectors[1]
        assert float(torch.cosine_similarity(other, ref.detach(), 0)) > 0.3
