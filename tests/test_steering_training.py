"""Learned edits on the planted model: the subspace interchange and the low-rank edit trained with
an invariance loss remove the planted pressure, and the invariance weight is what keeps the
invariance prompts' answers where they were."""

from __future__ import annotations

import pytest
import torch
from steering_helpers import planted_model, planted_set

from behaviorlens.prompts.contrast import NEUTRAL
from behaviorlens.scoring import behavior_metric
from behaviorlens.steering import steer
from behaviorlens.steering.training import train_lowrank, train_subspace

INVARIANCE = [[5, 61, 6, 44, 8, 9, 44], [5, 62, 44, 6, 7, 44], [12, 13, 44, 14, 44], [3, 4, 44, 5, 6, 7, 44]]


@pytest.fixture(scope="module")
def planted():
    model = planted_model()
    return model, planted_set(model, 12)


def _removed(model, cset, edit) -> float:
    pos, neu = behavior_metric(model, cset.pairs, "positive"), behavior_metric(model, cset.pairs, NEUTRAL)
    with steer(model, edit):
        edited = behavior_metric(model, cset.pairs, "positive")
    return float((pos - edited).sum() / (pos - neu).sum())


def test_a_trained_subspace_clamp_removes_the_planted_pressure(planted):
    model, cset = planted
    edit = train_subspace(model, cset, 1, 2, steps=40)
    assert edit.kind == "subspace" and edit.read_at == "last"
    assert _removed(model, cset, edit) > 0.3


def _answer_logp(model, sequences):
    batch = model.batch(sequences)
    with torch.inference_mode():
        return torch.log_softmax(model.logits(batch)[:, -1].float(), -1)


def test_a_lowrank_edit_removes_the_pressure_and_its_invariance_weight_keeps_other_prompts(planted):
    model, cset = planted
    free = train_lowrank(model, cset, 1, 2, INVARIANCE, weight=0.0, steps=60)
    held = train_lowrank(model, cset, 1, 2, INVARIANCE, weight=20.0, steps=60)
    assert free.notes["fit_pressure_removed"] > 0.5 and _removed(model, cset, free) > 0.5
    assert held.notes["fit_invariance_kl"] < 0.5 * free.notes["fit_invariance_kl"]
    base = _answer_logp(model, INVARIANCE)  # the exact edit on the invariance prompts, as trained
    moved = {}
    for name, edit in (("free", free), ("held", held)):
        with steer(model, edit, positions="all"):
            logp = _answer_logp(model, INVARIANCE)
        moved[name] = float((base.exp() * (base - logp)).sum(-1).mean())
    assert moved["held"] < 0.5 * moved["free"]
