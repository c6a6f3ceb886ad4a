"""evaluate_steering: the table's numbers against direct recomputation; run_steer_eval files."""

from __future__ import annotations

import json

import pytest
import torch
from steering_helpers import tiny_set, tiny_side_effects

from behaviorlens.analysis.metrics import kl_divergence
from behaviorlens.steering import head_edit, random_control, run_steer_eval, steer, train_vector
from behaviorlens.steering.evaluate import behavior_metrics, evaluate_steering


def test_evaluate_vector_table(tiny_llama):
    model = tiny_llama
    cset = tiny_set(model, 6)
    edit = train_vector(model, cset, [1, 2])
    side = tiny_side_effects(model)
    frame = evaluate_steering(model, edit, cset, [0.0, -3.0], side_effects=side)
    assert list(zip(frame.layer, frame.multiplier)) == [(1, 0.0), (1, -3.0), (2, 0.0), (2, -3.0)]
    zero = frame[frame.multiplier == 0]
    assert (zero.shift_removed_fraction.abs() < 1e-6).all() and (zero.neutral_kl.abs() < 1e-6).all()
    # recompute one row directly
    row = frame[(frame.layer == 2) & (frame.multiplier == -3.0)].iloc[0]
    base = behavior_metrics(model, cset)
    with steer(model, edit, -3.0, layers=[2]):
        st = behavior_metrics(model, cset)
        steered_neutral = [model.logits(model.batch([ids]))[0] for ids in side.neutral]
    base_neutral = [model.logits(model.batch([ids]))[0] for ids in side.neutral]
    shift0 = (base[:, 0] - base[:, 1]).mean()
    shift = (st[:, 0] - st[:, 1]).mean()
    assert row.shift_removed_fraction == pytest.approx(float(1 - shift / shift0), abs=1e-4)
    kl = torch.cat([kl_divergence(b, s) for b, s in zip(base_neutral, steered_neutral)]).mean()
    assert row.neutral_kl == pytest.approx(float(kl), abs=1e-5)
    moved = ((st[:, 0] - st[:, 1]) - (base[:, 0] - base[:, 1])) * -1  # negative multiplier: intended down
    assert row.anti_steerable_fraction == pytest.approx(float((moved < 0).float().mean()))
    for col in ("random_shift_removed_fraction", "random_neutral_kl", "random_perplexity",
                "random_factual_accuracy", "perplexity", "factual_accuracy"):
        assert col in frame and frame[col].notna().all()
    pairs = frame.attrs["pairs"]
    assert len(pairs) == (1 + 3) * len(frame) * len(cset) and set(pairs.control) == {0, 1, 2, 3}
    # the random columns are the mean over the three draws
    drawn = pairs[(pairs.control > 0) & (pairs.layer == 2) & (pairs.multiplier == -3.0)]
    per_draw = 1 - drawn.groupby("control")["shift"].mean() / row.shift_unsteered
    assert row.random_shift_removed_fraction == pytest.approx(per_draw.mean(), abs=1e-5)
    assert row.random_shift_removed_fraction_sd == pytest.approx(per_draw.std(ddof=0), abs=1e-5)


def test_random_controls_match_the_edit(tiny_llama):
    model = tiny_llama
    cset = tiny_set(model, 4)
    vec = train_vector(model, cset, [1])
    rnd = random_control(model, vec, seed=3)
    assert rnd.norm[1] == pytest.approx(vec.norm[1], rel=1e-5)
    assert abs(float(torch.cosine_similarity(rnd.vectors[1], vec.vectors[1], 0))) < 0.9
    heads = head_edit(model, {2: [0, 1]}, "mean", reference=cset)
    rh = random_control(model, heads, seed=3)
    assert rh.n_edited_heads == 2 and set(rh.heads[2]).isdisjoint({0, 1})


def test_random_heads_never_include_the_edited_heads(tiny_llama):
    model = tiny_llama
    n = model.sites.n_heads
    crowded = {1: list(range(n - 1)), 2: [0]}  # layer 1 has one untouched head: the rest go to layer 2
    edit = head_edit(model, crowded, "zero")
    for seed in range(5):
        rh = random_control(model, edit, seed=seed)
        assert rh.n_edited_heads == n and rh.heads[1] == [n - 1]
        assert 0 not in rh.heads[2] and set(rh.heads) == {1, 2}


def test_run_steer_eval_writes_artifacts(tiny_llama, tmp_path, monkeypatch):
    model = tiny_llama
    cset = tiny_set(model, 4)
    side = tiny_side_effects(model)
    import behaviorlens.steering.evaluate as ev

    monkeypatch.setattr(ev, "SideEffectData", lambda m: side)
    edit = head_edit(model, {2: [0, 1]}, "mean", reference=cset)
    summary = run_steer_eval(model, edit, cset, [0.5, 1.0], None, tmp_path)
    for name in ("steering.csv", "steering_pairs.csv", "dose_response.png", "summary.json"):
        assert (tmp_path / name).is_file()
    saved = json.loads((tmp_path / "summary.json").read_text())
    for key in ("best_multiplier", "best_layer", "shift_removed_fraction", "neutral_kl",
                "factual_accuracy_change", "random_control_shift_removed_fraction"):
        assert key in saved and saved[key] == summary[key]
