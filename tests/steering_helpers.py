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


def tiny_side_effects(model):
    from behaviorlens.steering.evaluate import SideEffectData

    factual = tiny_set(model, 4, "tiny_factual")
    return SideEffectData(model, neutral=["w3 w4 w5 w6", "w40 w41 w42", "w7 w8 w9 w33 w34"],
                          reference="w32 w33 w34 w35 w36 w37 w38 w39", factual=factual)
