"""measure / run_measure: batched equals one-at-a-time, per-side figures, balance, A/B checks."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from behaviorlens.measure import choice_figures, measure, run_measure
from behaviorlens.prompts import PromptFamily, load_family
from behaviorlens.scoring import behavior_metric


def varied_set(tokenizer, n=6, neutral=False, answers=(" w50", " w51")):
    # rows of different lengths, so a batch needs left padding
    rows = [{"x": " ".join(f"w{30 + j}" for j in range(i + 1))} for i in range(n)]
    slot = {"positive": "w40", "negative": "w41"} | ({"neutral": "w42 w43"} if neutral else {})
    return PromptFamily.from_dict({
        "name": "varied", "chat": False, "user": "w5 {{ s }} {{ x }} w6",
        "valence": {"s": slot},
        "answers": {"matching": answers[0], "not_matching": answers[1]}, "rows": rows,
    }).render(tokenizer)


def reference_metric(model, pair, side):
    """Unpadded single forward, plain transformers, logits at the pair's answer position."""
    ids = torch.tensor([pair.tokens[side]])
    with torch.inference_mode():
        logits = model.hf(input_ids=ids).logits[0, pair.position(side, "answer")].float()
    m, n = pair.answers["matching"][0], pair.answers["not_matching"][0]
    return (logits[m] - logits[n]).item()


def test_batched_equals_one_at_a_time_tiny(tiny_llama):
    cset = varied_set(tiny_llama.tokenizer, neutral=True)
    result = measure(tiny_llama, cset, batch_size=4)
    table = result.table
    assert len(table) == 3 * len(cset)
    for i, pair in enumerate(cset):
        for side in ("positive", "negative", "neutral"):
            got = table[(table.pair == i) & (table.side == side)].metric.item()
            assert got == pytest.approx(reference_metric(tiny_llama, pair, side), abs=1e-4)
    by_side = {s: table[table.side == s].metric.to_numpy() for s in ("positive", "negative", "neutral")}
    shift = by_side["positive"] - by_side["negative"]
    s = result.summary
    assert s["behavior_shift"] == pytest.approx(shift.mean(), abs=1e-6)
    assert s["fraction_pairs_shifted"] == pytest.approx((shift > 0).mean())
    assert s["behavior_shift_ci"][0] <= shift.mean() <= s["behavior_shift_ci"][1]
    assert s["pull"] == pytest.approx((by_side["positive"] - by_side["neutral"]).mean(), abs=1e-6)
    for side, m in by_side.items():
        assert s[f"accuracy_{side}"] == pytest.approx((m < 0).mean())
        lo, hi = s[f"accuracy_{side}_ci"]
        assert lo <= (m < 0).mean() <= hi


def test_batched_equals_one_at_a_time_default(default_model):
    cset = load_family("facts_opinion").render(default_model.tokenizer).subset(range(0, 45, 9))
    batched = behavior_metric(default_model, cset.pairs, "positive", batch_size=5)
    single = torch.cat([behavior_metric(default_model, [p], "positive", batch_size=1) for p in cset])
    assert torch.allclose(batched, single, atol=1e-4)
    m = measure(default_model, cset).table
    for i, pair in enumerate(cset):
        got = m[(m.pair == i) & (m.side == "negative")].metric.item()
        assert got == pytest.approx(reference_metric(default_model, pair, "negative"), abs=1e-3)


def test_neutral_figures_absent_without_a_neutral_side(tiny_llama, tmp_path, capsys):
    summary = run_measure(tiny_llama, varied_set(tiny_llama.tokenizer), tmp_path, progress=False)
    assert not summary["has_neutral"] and "pull" not in summary and "accuracy_neutral" not in summary
    assert "no neutral side" in capsys.readouterr().err


def test_run_measure_writes_csv_then_summary(tiny_llama, tmp_path):
    cset = varied_set(tiny_llama.tokenizer, n=5, neutral=True)
    summary = run_measure(tiny_llama, cset, tmp_path / "out", progress=False)
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    for key in ("pairs", "mean_metric_positive", "mean_metric_negative", "mean_metric_neutral",
                "behavior_shift", "behavior_shift_ci", "fraction_pairs_shifted", "accuracy_positive",
                "accuracy_negative", "accuracy_neutral", "accuracy_neutral_ci", "pull", "answer_balance"):
        assert key in on_disk
    assert on_disk["pairs"] == 5 and len(on_disk["behavior_shift_ci"]) == 2
    assert on_disk["behavior_shift"] == pytest.approx(summary["behavior_shift"])
    table = pd.read_csv(tmp_path / "out" / "measure.csv")
    assert len(table) == 15 and set(table.side) == {"positive", "negative", "neutral"}
    assert np.isclose(table[table.side == "positive"].metric.mean(), on_disk["mean_metric_positive"], atol=1e-5)


def test_one_answer_everywhere_is_unbalanced(tiny_llama, tmp_path, capsys):
    summary = run_measure(tiny_llama, varied_set(tiny_llama.tokenizer), tmp_path, progress=False)
    assert summary["unbalanced"] and summary["answer_balance"] == {"w50": 1.0}
    assert "unbalanced" in capsys.readouterr().err


def test_balanced_family_is_not_warned(tiny_llama, tmp_path, capsys):
    rows = [{"x": f"w{30 + i}", "m": f"w{50 + i % 3}", "n": f"w{60 + i % 3}"} for i in range(6)]
    cset = PromptFamily.from_dict({
        "name": "bal", "chat": False, "user": "w5 {{ s }} {{ x }}",
        "valence": {"s": {"positive": "w40", "negative": "w41"}},
        "answers": {"matching": " {{ m }}", "not_matching": " {{ n }}"}, "rows": rows,
    }).render(tiny_llama.tokenizer)
    summary = run_measure(tiny_llama, cset, tmp_path, progress=False)
    assert not summary["unbalanced"] and max(summary["answer_balance"].values()) == pytest.approx(1 / 3)
    assert "unbalanced" not in capsys.readouterr().err


def test_choice_figures_tell_letter_bias_from_content():
    letters = ["A", "B"] * 20
    pairs = [type("P", (), {"answer_text": {"matching": m, "not_matching": "B" if m == "A" else "A"}})()
             for m in letters]
    cset = type("S", (), {"__iter__": lambda self: iter(pairs)})()
    # a model that always says A: it picks the matching letter exactly when that is A
    always_a = np.array([1.0 if m == "A" else -1.0 for m in letters])
    f = choice_figures(cset, always_a)
    assert f["at_chance"] and f["letter_bias"] == 1.0 and f["answer_balance_first_letter"] == 0.5
    # a model that follows the content: it picks the matching letter in 36 of 40 rows
    content = np.ones(40)
    content[:4] = -1
    f = choice_figures(cset, content)
    assert not f["at_chance"] and f["matching_rate"] == pytest.approx(0.9)
    assert f["letter_bias"] == pytest.approx(0.5, abs=0.11)


@pytest.mark.slow
def test_capitals_opinion_shift_on_default(default_model):
    """The must-show figure: opinion pressure moves the default model by >= 3 logits."""
    cset = load_family("capitals_opinion").render(default_model.tokenizer)
    summary = measure(default_model, cset).summary
    assert summary["pairs"] >= 40
    assert summary["behavior_shift"] >= 3.0
    assert summary["behavior_shift_ci"][0] > 0
    assert summary["pull"] > 3.0 and summary["accuracy_neutral"] > 0.9
