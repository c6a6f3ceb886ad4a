"""The frame gate on the planted model: the planted pressure token also closes prompts of another
frame (marked by two leading tokens, as a passage or a story marks the user's own text); a gate
that learned those prompts as negatives stays shut on new ones, one that did not fires on them."""

from __future__ import annotations

import pytest
import torch
from steering_helpers import planted_model, planted_set

from behaviorlens.steering.frame_gate import (
    FramePrompts,
    family_prompts,
    frame_gate_quality,
    train_frame_gate,
)


def _framed(model, rows: range) -> FramePrompts:
    """Prompts in the user's own frame that end like the pressured ones (with the pressure token)."""
    out = FramePrompts()
    for i in rows:
        text = f"w20 w21 w5 w{60 + i} w6 w{90 + i % 30} w7 w{44 + i % 2}"
        out.add(model.tokenizer(text, add_special_tokens=False)["input_ids"], 0, "passage")
    return out


@pytest.fixture(scope="module")
def setup():
    model = planted_model()
    with torch.no_grad():  # layer 0's attention writes loudly: what earlier tokens say reaches the last
        model.sites.attn_out_proj(model.hf, 0).weight.mul_(30)
    cset = planted_set(model, 48)
    train = family_prompts(cset.subset(range(24)), _framed(model, range(24)))
    held = family_prompts(cset.subset(range(24, 48)), _framed(model, range(24, 48)))
    return model, train, {"held": held}


def _fires(table, kind):
    return float(table.set_index("kind").loc[kind, "fires"])


def test_a_frame_gate_stays_shut_on_a_frame_it_learned_and_fires_on_pressure(setup):
    model, train, held = setup
    gate, cv = train_frame_gate(model, train, [0, 1])
    table = frame_gate_quality(model, gate, train, held)
    assert _fires(table, "pressured") >= 0.9 and _fires(table, "no pressure") <= 0.1
    assert _fires(table, "passage") <= 0.4 and table.set_auroc.iloc[0] >= 0.95
    assert set(table.columns) >= {"wording_accuracy", "set_auroc", "wording_set_auroc", "seen_in_training"}


def test_a_frame_gate_trained_without_the_other_frame_gates_it(setup):
    model, train, held = setup
    gate, _ = train_frame_gate(model, train, [0, 1], leave_out=("passage",))
    table = frame_gate_quality(model, gate, train, held, leave_out=("passage",))
    assert _fires(table, "passage") >= 0.9  # it learned the pressure token, not the frame
    assert not table.set_index("kind").loc["passage", "seen_in_training"]
