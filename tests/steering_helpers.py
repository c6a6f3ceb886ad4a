"""Shared builders for the steering tests: tiny contrast sets over the w0..w127 vocabulary.

(Words starting with w0, w1 or w2 are avoided: the tokenizer matches its special tokens w0/w1/w2
inside longer words.)
"""

from __future__ import annotations

from behaviorlens.prompts import PromptFamily


def tiny_set(model, n: int = 8, name: str = "tiny_opinion"):
    """A token-aligned tiny family: the valence word sits mid-prompt, answers w20 / w21."""
    rows = [{"a": f"w{60 + i}", "b": f"w{90 + i}"} for i in range(n)]
    fam = PromptFamily.from_dict({
        "name": name,
        "behavior": "test",
        "chat": False,
        "user": "w5 {{ a }} w6 {{ s }} w7 {{ b }} w8",
        "valence": {"s": {"positive": "w44", "negative": "w45"}},
        "answers": {"matching": " w50", "not_matching": " w51"},
        "rows": rows,
    })
    return fam.render(model.tokenizer)


def tiny_context_set(model, n: int = 8):
    """A tiny context-use set: the answer word w52 stated in the prompt, every other row a claim
    recall (``style``), scored like the factual control."""
    rows = [{"a": f"w{60 + i}", "style": "claim_recall" if i % 2 else "passage"} for i in range(n)]
    return PromptFamily.from_dict({
        "name": "tiny_context", "behavior": "context_use", "chat": False,
        "user": "w5 {{ a }} w52 w6 {{ s }} w7",
        "valence": {"s": {"positive": "w46", "negative": "w46"}},
        "answers": {"matching": " w52", "not_matching": " w53"}, "rows": rows,
    }).render(model.tokenizer)


def tiny_side_effects(model, half: str = "all"):
    from behaviorlens.steering.side_effects import SideEffectData

    factual = tiny_set(model, 4, "tiny_factual")
    return SideEffectData(model, half, neutral=["w3 w4 w5 w6", "w40 w41 w42", "w7 w8 w9 w33 w34", "w36 w37"],
                          reference=" ".join(f"w{30 + i % 60}" for i in range(600)), factual=factual,
                          context=tiny_context_set(model), fillers=["w70 w71", "w72", "w73 w74 w75"])


def planted_model(family: str = "llama"):
    """A tiny random model with a planted 'pressure': the last token w44 (positive side) pulls
    the answer toward w50, w45 (negative side) toward w51; without it (neutral) neither."""
    import torch
    from conftest import tiny_model

    model = tiny_model(family)
    with torch.no_grad():
        emb, out = model.sites.embedding(model.hf).weight, model.sites.unembed(model.hf).weight
        for t in (44, 45):
            emb[t] = emb[t] / emb[t].norm() * 3
        out[50] += 0.06 * emb[44] - 0.015 * emb[45]
        out[51] += 0.06 * emb[45] - 0.015 * emb[44]
    return model


def planted_set(model, n: int = 12, name: str = "planted"):
    """A family with a neutral side whose pressure the planted model follows (pull about 2 logits)."""
    rows = [{"a": f"w{60 + i}", "b": f"w{90 + i % 30}"} for i in range(n)]
    return PromptFamily.from_dict({
        "name": name, "behavior": "test", "chat": False, "user": "w5 {{ a }} w6 {{ b }} w7{{ s }}",
        "valence": {"s": {"positive": " w44", "negative": " w45", "neutral": ""}},
        "answers": {"matching": " w50", "not_matching": " w51"}, "rows": rows,
    }).render(model.tokenizer)


# a shared 9-token prefix (run once), rows of different lengths (left padding after it)
CACHE_SEQS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 33, 34, 35, 40, 41], [5, 6, 7, 8, 9, 10, 11, 12, 13, 36, 37, 46],
              [5, 6, 7, 8, 9, 10, 11, 12, 13, 38, 39, 47, 48, 49, 50]]


def edited_from_the_kept_cache(model, edit, tail: int):
    """Score :data:`CACHE_SEQS`' last ``tail`` positions unedited, edited in full, then unedited
    and twice edited inside :func:`behaviorlens.kv_cache.reusing_unedited`; assert that the kept
    run equals the unedited one, both edited runs equal the full forward and the edit acted.
    Returns the cache store (how often the edit started late)."""
    import torch

    from behaviorlens import kv_cache
    from behaviorlens.batching import answer_tail
    from behaviorlens.steering import steer

    rows = torch.arange(len(CACHE_SEQS)).repeat_interleave(tail)
    positions = torch.cat([torch.arange(len(x) - tail, len(x)) for x in CACHE_SEQS])
    with answer_tail(tail):
        unedited = model.score_logits(CACHE_SEQS, rows, positions)
        with steer(model, edit):
            full = model.score_logits(CACHE_SEQS, rows, positions)
        with kv_cache.reusing_unedited() as store:
            torch.testing.assert_close(model.score_logits(CACHE_SEQS, rows, positions), unedited)
            with steer(model, edit):
                first = model.score_logits(CACHE_SEQS, rows, positions)  # a detector's flags are kept here
                second = model.score_logits(CACHE_SEQS, rows, positions)
    torch.testing.assert_close(first, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second, full, atol=1e-5, rtol=1e-5)
    assert (full - unedited).abs().max() > 1e-3  # the edit acted
    return store
