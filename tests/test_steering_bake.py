"""Baked edits reload with plain transformers and match the runtime edit (float32, 1e-3)."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from conftest import tiny_model
from steering_helpers import tiny_set

from behaviorlens.errors import BehaviorLensError
from behaviorlens.steering import bake, direction_edit, head_edit, steer, train_vector

IDS = [[3, 4, 5, 6, 7, 8], [9, 33, 34]]


def _reload_logits(folder, model):
    hf = T.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    batch = model.batch(IDS)
    with torch.inference_mode():
        return _real(hf(**batch.inputs()).logits.float(), model)


def _real(logits, model):
    """Logits at real (non-padding) tokens only."""
    return logits[model.batch(IDS).attention_mask.bool()]


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_orthogonalized_model_matches_runtime_ablation(family, tmp_path):
    model = tiny_model(family)
    if family == "llama":  # exercise untying of input and output embeddings
        model.hf.config.tie_word_embeddings = True
        model.hf.lm_head.weight = model.hf.model.embed_tokens.weight
    vec = train_vector(model, tiny_set(model), [1])
    edit = direction_edit(model, vec.vectors[1], layer=1)
    batch = model.batch(IDS)
    with steer(model, edit):
        runtime = _real(model.logits(batch), model)
    plain = _real(model.logits(batch), model)
    folder = bake(model, edit, tmp_path / "ortho")
    baked = _reload_logits(folder, model)
    assert (runtime - plain).abs().max() > 1e-3  # the ablation changes something
    torch.testing.assert_close(baked, runtime, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(_real(model.logits(batch), model), plain)  # the source model is untouched


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_baked_head_mean_ablation_matches_runtime(family, tmp_path):
    model = tiny_model(family)
    edit = head_edit(model, {0: [1], 2: [0, 3]}, "mean", reference=tiny_set(model))
    batch = model.batch(IDS)
    with steer(model, edit):
        runtime = _real(model.logits(batch), model)
    folder = bake(model, edit, tmp_path / "heads")
    baked = _reload_logits(folder, model)
    assert (runtime - _real(model.logits(batch), model)).abs().max() > 1e-3
    torch.testing.assert_close(baked, runtime, atol=1e-3, rtol=1e-3)


def test_bake_refuses_what_it_cannot_do(tmp_path):
    model = tiny_model("qwen2")  # o_proj has no bias and no config flag for one
    edit = head_edit(model, {1: [0]}, "mean", reference=tiny_set(model))
    with pytest.raises(BehaviorLensError, match="no bias"):
        bake(model, edit, tmp_path / "q")
    zero = head_edit(model, {1: [0]}, "zero")
    bake(model, zero, tmp_path / "z")  # zero ablation needs no bias
    vec = train_vector(model, tiny_set(model), [1])
    with pytest.raises(BehaviorLensError, match="steering vector"):
        bake(model, vec, tmp_path / "v")
    with pytest.raises(BehaviorLensError, match="Gemma"):
        bake(tiny_model("gemma2"), direction_edit(tiny_model("gemma2"), torch.ones(64)), tmp_path / "g")
