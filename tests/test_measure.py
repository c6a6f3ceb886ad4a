"""measure / run_measure: batched equals one-at-a-time (left padding never shifts positions)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from behaviorlens.measure import answer_logits, measure, run_measure
from behaviorlens.prompts import PromptFamily, load_family


def varied_set(tokenizer, n=6):
    # rows of different lengths, so a batch needs left padding
    rows = [{"x": " ".join(f"w{30 + j}" for j in range(i + 1))} for i in range(n)]
    return PromptFamily.from_dict({
        "name": "varied", "chat": False, "user": "w5 {{ s }} {{ x }} w6",
        "valence": {"s": {"positive": "w40", "negative": "w41"}},
        "answers": {"matching": " w50", "not_matching": " w51"}, "rows": rows,
    }).render(tokenizer)


def reference_metric(model, pair, side):
    """Unpadded single forward, plain transformers, logits at the pair's answer position."""
    ids = torch.tensor([pair.tokens[side]])
    with torch.inference_mode():
        logits = model.hf(input_ids=ids).logits[0, pair.position(side, "answer")].float()
    m, n = pair.answer_ids
    return (logits[m] - logits[n]).item()


def test_batched_equals_one_at_a_time_tiny(tiny_llama):
    cset = varied_set(tiny_llama.tokenizer)
    result = measure(tiny_llama, cset, batch_size=4)
    table = result.table
    assert len(table) == 2 * len(cset)
    for i, pair in enumerate(cset):
        for side in ("positive", "negative"):
            got = table[(table.pair == i) & (table.side == side)].metric.item()
            assert got == pytest.approx(reference_metric(tiny_llama, pair, side), abs=1e-4)
    shift = table[table.side == "positive"].metric.to_numpy() - table[table.side == "negative"].metric.to_numpy()
    assert result.summary["behavior_shift"] == pytest.approx(shift.mean(), abs=1e-6)
    assert result.summary["fraction_pairs_shifted"] == pytest.approx((shift > 0).mean())
    lo, hi = result.summary["behavior_shift_ci"]
    assert lo <= shift.mean() <= hi


def test_batched_equals_one_at_a_time_default(default_model):
    cset = load_family("facts_opinion").render(default_model.tokenizer).subset(range(0, 45, 9))
    batched = answer_logits(default_model, cset, "positive", batch_size=5)
    single = torch.cat([answer_logits(default_model, cset.subset([i]), "positive", batch_size=1)
                        for i in range(len(cset))])
    assert torch.allclose(batched, single, atol=1e-4)
    m = measure(default_model, cset).table
    for i, pair in enumerate(cset):
        got = m[(m.pair == i) & (m.side == "negative")].metric.item()
        assert got == pytest.approx(reference_metric(default_model, pair, "negative"), abs=1e-3)


def test_run_measure_writes_csv_then_summary(tiny_llama, tmp_path):
    cset = varied_set(tiny_llama.tokenizer, n=5)
    summary = run_measure(tiny_llama, cset, tmp_path / "out", progress=False)
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    for key in ("pairs", "mean_metric_positive", "mean_metric_negative", "behavior_shift",
                "behavior_shift_ci", "fraction_pairs_shifted"):
        assert key in on_disk
    assert on_disk["pairs"] == 5 and len(on_disk["behavior_shift_ci"]) == 2
    assert on_disk["behavior_shift"] == pytest.approx(summary["behavior_shift"])
    import pandas as pd
    table = pd.read_csv(tmp_path / "out" / "measure.csv")
    assert len(table) == 10 and set(table.side) == {"positive", "negative"}
    assert np.isclose(table[table.side == "positive"].metric.mean(), on_disk["mean_metric_positive"], atol=1e-5)


@pytest.mark.slow
def test_capitals_opinion_shift_on_default(default_model):
    """The must-show figure: opinion pressure moves the default model by >= 3 logits."""
    cset = load_family("capitals_opinion").render(default_model.tokenizer)
    summary = measure(default_model, cset).summary
    assert summary["pairs"] >= 40
    assert summary["behavior_shift"] >= 3.0
    assert summary["behavior_shift_ci"][0] > 0
