"""Shared fixtures: tiny random models of every supported family, and the embedded default."""

from __future__ import annotations

import os

import pytest
import torch
import transformers as T

from behaviorlens.prompts import PromptFamily

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 128

TINY_CONFIGS = {
    "llama": lambda: T.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB,
    ),
    "mistral": lambda: T.MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB,
    ),
    "qwen2": lambda: T.Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB,
    ),
    "gemma": lambda: T.GemmaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=VOCAB,
    ),
    "gemma2": lambda: T.Gemma2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=VOCAB,
    ),
    "gpt2": lambda: T.GPT2Config(
        n_embd=64, n_layer=3, n_head=4, vocab_size=VOCAB, n_positions=128,
        bos_token_id=1, eos_token_id=1,
    ),
    "gpt_neox": lambda: T.GPTNeoXConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        vocab_size=VOCAB, bos_token_id=1, eos_token_id=1,
    ),
}


def tiny_tokenizer() -> T.PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over the words w0..w127 (w0 pads, w1 ends)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = T.PreTrainedTokenizerFast(tokenizer_object=tok)
    # special tokens as whole words only, so that "w20" stays one token (not "w2" + "0")
    specials = {"pad_token": "w0", "eos_token": "w1", "bos_token": "w2", "unk_token": "w0"}
    tokenizer.add_special_tokens(
        {k: AddedToken(v, single_word=True, special=True) for k, v in specials.items()}
    )
    return tokenizer


def tiny_model(family: str = "llama", seed: int = 0):
    """A randomly initialized float32 behaviorlens Model of the given family, on the CPU."""
    from behaviorlens.model import Model, _wrap
    from behaviorlens.sites import SiteMap

    torch.manual_seed(seed)
    config = TINY_CONFIGS[family]()
    config._attn_implementation = "eager"
    hf = T.AutoModelForCausalLM.from_config(config).eval()
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"
    return Model(
        name=f"tiny-{family}",
        lm=_wrap(hf, tokenizer),
        tokenizer=tokenizer,
        sites=SiteMap.from_config(config),
    )


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny(request):
    """A tiny random model of each supported family in turn."""
    return tiny_model(request.param)


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def default_model():
    """The embedded default model (SmolLM2-135M-Instruct), loaded once per test session."""
    from behaviorlens import load_model

    return load_model()


def tiny_family(**extra) -> PromptFamily:
    """Three rows of different lengths (so batches are left-padded), a two-token valence slot."""
    data = {
        "name": "tiny",
        "chat": False,
        "user": "w5 w6 {{ a }} w7 {{ s }} w8 w9",
        "valence": {"s": {"positive": "w40 w42", "negative": "w41 w43"}},
        "answers": {"matching": " w50", "not_matching": " w51"},
        "rows": [{"a": "w60"}, {"a": "w61 w62"}, {"a": "w63 w64 w65"}],
    }
    data.update(extra)
    return PromptFamily.from_dict(data)


@pytest.fixture
def one_thread():
    """Tiny models run far faster on one thread on a shared machine; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def probe_family(name: str = "tiny", pos: str = "w50 w52", neg: str = "w51 w53", n: int = 6,
                filler: str = "w6") -> PromptFamily:
    """A named plain-text family for probes; rows differ in length (``pre`` has 1..3 words) so batches pad."""
    pre = ["w30", "w31 w32", "w33 w34 w35", "w36 w37", "w38", "w39 w40 w41 w42"]
    return PromptFamily.from_dict({
        "name": name,
        "chat": False,
        "user": "w5 {{ pre }} " + filler + " {{ s }} w7 w8",
        "valence": {"s": {"positive": pos, "negative": neg}},
        "answers": {"matching": " w60", "not_matching": " w61"},
        "rows": [{"pre": pre[i % len(pre)] + f" w{70 + i}"} for i in range(n)],
    })


def blank_llama(d: int, noise: float = 0.6, seed: int = 0) -> tuple[T.PreTrainedModel, torch.Tensor]:
    """The canvas planted circuits are drawn on: a 3-layer llama (eager attention, 4 heads, 2
    key/value heads) whose attention and MLP write nothing, and whose embedding is e0 plus noise
    in dimensions 32 and up; returns the model and the identity (``e[i]``: dimension i)."""
    torch.manual_seed(seed)
    config = T.LlamaConfig(hidden_size=d, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=VOCAB)
    config._attn_implementation = "eager"
    hf = T.AutoModelForCausalLM.from_config(config).eval()
    e = torch.eye(d)
    with torch.no_grad():
        emb = hf.model.embed_tokens.weight
        emb.zero_()
        emb[:, 32:] = noise * torch.randn(VOCAB, 32)  # noise no head reads
        emb += e[0]
        for layer in hf.model.layers:
            layer.mlp.down_proj.weight.zero_()
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(layer.self_attn, name).weight.zero_()
    return hf, e


def wrapped(hf: T.PreTrainedModel, name: str):
    """A planted model as behaviorlens holds one, with the tiny tokenizer."""
    from behaviorlens.model import Model, _wrap
    from behaviorlens.sites import SiteMap

    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"
    return Model(name=name, lm=_wrap(hf, tokenizer), tokenizer=tokenizer, sites=SiteMap.from_config(hf.config))
