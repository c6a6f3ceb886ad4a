"""What an edit must beat: deletion of the text it hides, a matched null that may move the model
neither way, and context use kept; each guard fails a test when removed."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from steering_helpers import planted_model, planted_set, tiny_set

from behaviorlens.chat import Scaffold
from behaviorlens.edits import Readout
from behaviorlens.measure import side_metrics
from behaviorlens.scoring import behavior_metric
from behaviorlens.steering.baselines import (
    blocked_metric,
    deletion_baseline,
    filler_pairs,
    is_redaction,
    null_broken,
)
from behaviorlens.steering.judge import within_limits
from behaviorlens.steering.side_effects import context_figures


@pytest.fixture(scope="module")
def planted():
    model = planted_model()
    return model, planted_set(model, 10)


def test_deleting_the_claim_slot_gives_the_no_pressure_prompt(planted):
    model, cset = planted
    base = side_metrics(model, cset)
    out = deletion_baseline(model, cset, None, None, base, None)
    # the neutral side is the same prompt without the slot: deleting it removes all the pressure
    assert out["deletion_baseline_pressure_removed_fraction"] == pytest.approx(1.0, abs=1e-5)
    assert out["deletion_baseline_counter_pressure_removed_fraction"] == pytest.approx(1.0, abs=1e-5)
    assert "deletion_baseline_context_use_accuracy_change" not in out  # nothing flagged there


def test_a_detector_that_flags_everything_deletes_all_but_the_answer_position(planted):
    model, cset = planted
    s = model.sites
    everything = Readout(0, torch.zeros(s.d_model), 1.0)
    base = side_metrics(model, cset)
    out = deletion_baseline(model, cset, None, everything, base, None)
    last = [type(p)(**{**p.__dict__, "tokens": {k: v[-1:] for k, v in p.tokens.items()},
                       "spans": {k: {"last": (0, 1), "answer": (0, 1)} for k in p.tokens}}) for p in cset]
    alone = behavior_metric(model, last, "positive").numpy()
    removed = (base["positive"] - alone).sum() / (base["positive"] - base["neutral"]).sum()
    assert out["deletion_baseline_pressure_removed_fraction"] == pytest.approx(removed, abs=1e-5)


def test_an_edit_no_better_than_deletion_on_any_figure_is_redaction():
    deleted = {"deletion_baseline_pressure_removed_fraction": 0.9,
               "deletion_baseline_context_use_accuracy_change": -0.20,
               "deletion_baseline_claim_recall_accuracy_change": -0.60}
    like_deletion = {"pressure_removed_fraction": 0.85, "context_use_accuracy_change": -0.19,
                     "claim_recall_accuracy_change": -0.59} | deleted
    surgical = like_deletion | {"claim_recall_accuracy_change": 0.0}
    assert is_redaction(like_deletion) is True
    assert is_redaction(surgical) is False
    assert is_redaction({"pressure_removed_fraction": 0.5}) is None  # nothing to compare


def test_a_null_that_moves_the_model_either_way_is_broken_and_fails_the_limits():
    assert null_broken(-1.06) and null_broken(0.3) and not null_broken(0.05) and not null_broken(float("nan"))
    table = pd.DataFrame([
        {"collapse": False, "neutral_kl": 0.0, "accuracy_neutral_change": 0.0, "factual_accuracy_change": 0.0,
         "context_use_accuracy_change": 0.0, "claim_recall_accuracy_change": 0.0,
         "null_control_pressure_removed_fraction": r, "random_pressure_removed_fraction": -1.5}
        for r in (0.05, -0.5, 0.5)])  # (a knockout's other-words control is no limit: test_steering_choose)
    assert within_limits(table, 0.05, 0.02).tolist() == [True, False, False]


def test_context_use_and_claim_recall_are_limits():
    row = {"collapse": False, "neutral_kl": 0.0, "accuracy_neutral_change": 0.0, "factual_accuracy_change": 0.0,
           "context_use_accuracy_change": 0.0, "claim_recall_accuracy_change": 0.0}
    table = pd.DataFrame([row, row | {"claim_recall_accuracy_change": -0.05},
                          row | {"context_use_accuracy_change": -0.03}])
    assert within_limits(table, 0.05, 0.02).tolist() == [True, False, False]


def test_context_figures_score_claim_recall_rows_apart():
    base = np.array([1.0, 1.0, 1.0, 1.0])
    edited = np.array([1.0, -1.0, 1.0, -1.0])
    recall = np.array([False, True, False, True])
    out = context_figures(base, edited, recall)
    assert out["context_use_accuracy_change"] == 0.0 and out["claim_recall_accuracy_change"] == -1.0


def test_random_token_nulls_never_draw_the_first_token_or_the_template(default_model):
    tok = default_model.tokenizer
    scaffold = Scaffold(tok)
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "I think it is Berlin. Which city?"}],
                                                add_generation_prompt=True, tokenize=True, return_dict=False)])
    content = scaffold.content(ids)
    words = tok.decode(ids[0][content[0]])
    assert words.strip() == "I think it is Berlin. Which city?"
    assert not content[0, 0] and int(content.sum()) == len(tok("I think it is Berlin. Which city?")["input_ids"])
    detector = Readout(0, torch.zeros(1), decoy=0)
    flags = torch.zeros_like(ids, dtype=torch.bool)
    flags[0, -3] = True
    for seed in range(50):
        drawn = Readout(0, torch.zeros(1), decoy=seed).decoys(flags, content)
        assert int(drawn.sum()) == 1 and not (drawn & ~content).any()
    assert detector.decoys(flags, None)[0].sum() == 1


def test_filler_pairs_replace_only_the_claim_and_blocking_nothing_changes_nothing(planted):
    model, _ = planted
    cset = tiny_set(model, 6)  # the claim mid-prompt
    sentences = ["w70 w71", "w72", "w73 w74 w75"]
    pairs, spans = filler_pairs(model, cset, sentences)
    for p, new, (a, b) in zip(cset, pairs, spans):
        old = p.tokens["positive"]
        sa, sb = p.span("positive", "s")
        assert new.tokens["positive"][:sa] == old[:sa] and new.tokens["positive"][b:] == old[sb:]
        assert (b - a) == 1 and new.position("positive", "last") == len(new.tokens["positive"]) - 1
    free = blocked_metric(model, pairs, "positive", spans, {})
    assert np.allclose(free, behavior_metric(model, pairs, "positive").numpy(), atol=1e-5)
    blocked = blocked_metric(model, pairs, "positive", spans, {1: [0, 1, 2, 3]})
    assert not np.allclose(blocked, free, atol=1e-4)  # blocking the span does reach the heads


def test_a_knockout_control_in_use_draws_only_among_the_conversation_s_tokens(planted, monkeypatch):
    from behaviorlens.edits import Edit
    from behaviorlens.steering import steer

    model, cset = planted
    s = model.sites
    seen = []
    original = Readout.decoys

    def spy(self, flags, eligible=None):
        seen.append(eligible.clone())
        return original(self, flags, eligible)

    monkeypatch.setattr(Readout, "decoys", spy)
    control = Edit(kind="knockout", heads={1: [0]}, detector=Readout(0, torch.zeros(s.d_model), -1.0, decoy=3),
                   positions="generated", model=model.name, d_model=s.d_model, n_heads=s.n_heads, head_dim=s.head_dim)
    with steer(model, control):
        behavior_metric(model, cset.pairs[:3], "positive")
    assert seen, "the control drew no decoys"
    for eligible in seen:
        first = eligible.int().argmax(1)  # first eligible column per row
        assert (first > 0).all() or not eligible[:, 0].any()
        batch = model.batch([p.tokens["positive"] for p in cset.pairs[:3]])
        starts = batch.offsets
        assert not eligible[torch.arange(len(starts)), starts].any()  # never a row's first token
