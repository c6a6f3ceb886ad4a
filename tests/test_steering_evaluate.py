"""evaluate_steering: honest scores recomputed from per-pair metrics, guards, random controls."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from steering_helpers import planted_model, planted_set, tiny_set, tiny_side_effects

from behaviorlens.errors import BehaviorLensError
from behaviorlens.prompts import load_family
from behaviorlens.steering import (
    Edit,
    head_edit,
    random_control,
    run_steer_eval,
    steer,
    train_vector,
)
from behaviorlens.steering.evaluate import evaluate_steering, require_behavior
from behaviorlens.steering.pressure import pressure_figures
from behaviorlens.steering.side_effects import tail_logits


@pytest.fixture(scope="module")
def planted():
    model = planted_model()
    return model, planted_set(model), tiny_side_effects(model)


def test_scores_recomputed_from_the_pair_table(planted):
    model, cset, side = planted
    edit = train_vector(model, cset, [2], position="last")
    frame = evaluate_steering(model, edit, cset, [0.0, -1.0], side_effects=side, controls=5)
    zero = frame[frame.strength == 0].iloc[0]
    assert abs(zero.pressure_removed_fraction) < 1e-6 and abs(zero.neutral_kl) < 1e-6
    row = frame[frame.strength == -1.0].iloc[0]
    pairs = frame.attrs["pairs"]
    mine = pairs[(pairs.control == 0) & (pairs.strength == -1.0)]
    pos_u, pos_e, neu_u = mine.metric_positive_unedited, mine.metric_positive, mine.metric_neutral_unedited
    assert row.pressure_removed_fraction == pytest.approx((pos_u - pos_e).sum() / (pos_u - neu_u).sum(), abs=1e-6)
    assert row.pressure_removed_fraction > 0.3  # pushing against the planted direction removes pressure
    lo, hi = row.pressure_removed_fraction_ci
    assert lo <= row.pressure_removed_fraction <= hi
    neg_u, neg_e = mine.metric_negative_unedited, mine.metric_negative
    assert row.counter_pressure_removed_fraction == pytest.approx(
        (neg_u - neg_e).sum() / (neg_u - neu_u).sum(), abs=1e-6)
    for side_name in ("positive", "negative", "neutral"):
        acc = (mine[f"metric_{side_name}"] < 0).mean() - (mine[f"metric_{side_name}_unedited"] < 0).mean()
        assert row[f"accuracy_{side_name}_change"] == pytest.approx(acc)
    # the random columns are the mean over the five draws, recomputed from their pairs
    per_draw = []
    for draw in range(1, 6):
        d = pairs[(pairs.control == draw) & (pairs.strength == -1.0)]
        per_draw.append((d.metric_positive_unedited - d.metric_positive).sum()
                        / (d.metric_positive_unedited - d.metric_neutral_unedited).sum())
    assert row.random_controls == 5
    assert row.random_pressure_removed_fraction == pytest.approx(np.mean(per_draw), abs=1e-6)
    assert row.random_pressure_removed_fraction_sd == pytest.approx(np.std(per_draw), abs=1e-6)
    # side effects by hand: KL(unedited || edited) at the predicting positions of the requests,
    # and the reference text's perplexity with the edit at every position
    base, edited = tail_logits(model, side.neutral, 16), None
    with steer(model, edit, -1.0):
        edited = tail_logits(model, side.neutral, 16)
    kl = torch.cat([(b.log_softmax(-1).exp() * (b.log_softmax(-1) - e.log_softmax(-1))).sum(-1)
                    for b, e in zip(base, edited)]).mean()
    assert row.neutral_kl == pytest.approx(float(kl), rel=1e-4) and row.neutral_kl > 1e-4
    with steer(model, edit, -1.0, positions="all"):
        nll = [float(torch.nn.functional.cross_entropy(model.logits(model.batch([c]))[0, :-1], torch.tensor(c[1:])))
               for c in side.reference]
    assert row.perplexity == pytest.approx(float(np.exp(np.mean(nll))), rel=1e-4)
    assert row.perplexity != pytest.approx(row.perplexity_unedited, rel=1e-6)


@pytest.mark.slow
def test_an_edit_that_shrinks_every_logit_is_collapse_not_removal(default_model):
    """Scaling the final norm by 0.1 scales every logit toward 0: the shift shrinks by 90%, yet
    the pressured answer moves away from the unpressured one."""
    m = default_model
    cset = load_family("capitals_opinion").render(m.tokenizer).subset(range(0, 43, 3))
    name = next(n for n, p in m.hf.named_parameters() if n.endswith("norm.weight") and "layers" not in n)
    weight = dict(m.hf.named_parameters())[name]
    shrink = Edit(kind="weights", weights={name: -0.9 * weight.detach()}, d_model=m.sites.d_model,
                  n_heads=m.sites.n_heads, head_dim=m.sites.head_dim, model=m.name)
    side = tiny_side_effects_for(m)
    row = evaluate_steering(m, shrink, cset, side_effects=side, controls=0).iloc[0]
    assert row.shift_removed_fraction > 0.8
    assert row.pressure_removed_fraction < 0.05
    assert row.collapse


def tiny_side_effects_for(model):
    from behaviorlens.steering.side_effects import SideEffectData

    factual = load_family("capitals_opinion").render(model.tokenizer).subset(range(4))
    return SideEffectData(model, "all", neutral=["Write a haiku about rain.", "How do I boil an egg?"],
                          reference="The river ran past the town and into the sea. " * 20, factual=factual)


def test_no_behavior_to_remove_stops_with_one_line(planted):
    model, cset, side = planted
    noise = np.array([1.0, -1.0, 1.2, -0.9, 0.3, -0.4] * 3)  # mean > 0, CI across 0
    with pytest.raises(BehaviorLensError, match="includes 0"):
        require_behavior({"positive": noise, "negative": np.zeros(18), "neutral": np.zeros(18)}, "noise")
    with pytest.raises(BehaviorLensError, match="wrong sign"):
        require_behavior({"positive": np.full(10, -1.0), "negative": np.zeros(10), "neutral": np.zeros(10)}, "flip")
    with pytest.raises(BehaviorLensError, match="shift"):  # without a neutral side the shift is checked
        require_behavior({"positive": np.zeros(10), "negative": np.zeros(10)}, "flat")
    edit = train_vector(model, cset, [2])
    same = planted_set(model, 6)
    for p in same:  # every side the same prompt: pull exactly 0
        p.tokens["positive"] = p.tokens["negative"] = p.tokens["neutral"]
        p.spans["positive"] = p.spans["negative"] = p.spans["neutral"]
    for m in (model, dataclasses.replace(model, remote="local", interventions=[])):  # traced: checked on the replay
        with pytest.raises(BehaviorLensError, match="no behavior to remove"):
            evaluate_steering(m, edit, same, side_effects=side, controls=0)


def test_pressure_figures_need_no_neutral_side_to_say_so():
    base = {"positive": np.array([1.0, 2.0]), "negative": np.array([-1.0, -2.0])}
    out = pressure_figures(base, base)
    assert np.isnan(out["pressure_removed_fraction"]) and out["collapse"] is None
    assert out["shift_removed_fraction"] == pytest.approx(0.0)


def test_random_head_controls_draw_from_every_untouched_head(tiny_llama):
    model = tiny_llama
    n = model.sites.n_heads
    crowded = {1: list(range(n))}  # layer 1 has no untouched head: the control must draw elsewhere
    edit = head_edit(model, crowded, "mean", reference=tiny_set(model, 4))
    layers_seen = set()
    for seed in range(8):
        rh = random_control(model, edit, seed=seed)
        assert rh.n_edited_heads == n and 1 not in rh.heads
        layers_seen |= set(rh.heads)
    assert layers_seen == {0, 2}  # uniform over all the others, in any layer
    vec = train_vector(model, tiny_set(model, 4), [1])
    rnd = random_control(model, vec, seed=3)
    assert rnd.norm[1] == pytest.approx(vec.norm[1], rel=1e-5)
    assert abs(float(torch.cosine_similarity(rnd.vectors[1], vec.vectors[1], 0))) < 0.9


def test_a_knockout_control_blocks_as_many_other_tokens_in_the_same_heads(tiny_llama):
    from behaviorlens.edits import Readout

    s = tiny_llama.sites
    detector = Readout(0, torch.randn(s.d_model, generator=torch.Generator().manual_seed(0)), 0.0, gap=2)
    edit = Edit(kind="knockout", heads={1: [0, 2]}, detector=detector, positions="generated",
                model=tiny_llama.name, d_model=s.d_model, n_heads=s.n_heads, head_dim=s.head_dim)
    controls = [random_control(tiny_llama, edit, seed) for seed in range(2)]
    assert all(c.heads == edit.heads and c.detector.decoy is not None for c in controls)
    flags = torch.tensor([[1, 1, 0, 0, 0, 0, 1, 0], [0, 0, 0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    real = torch.tensor([[1] * 8, [0, 0, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    drawn = [c.detector.decoys(flags, real) for c in controls]
    for d in drawn:
        assert torch.equal(d.sum(1), flags.sum(1))  # as many tokens per row
        assert not (d & flags).any() and not (d & ~real).any()  # none detected, none padding
    assert torch.equal(drawn[0], controls[0].detector.decoys(flags, real))  # seeded
    assert not torch.equal(drawn[0], drawn[1])


def test_head_controls_report_the_patching_effect_of_their_heads(planted):
    model, cset, side = planted
    edit = head_edit(model, {2: [0, 1]}, "mean", reference=cset)
    effects = {(layer, h): 0.1 * layer + 0.01 * h for layer in range(3) for h in range(4)}
    frame = evaluate_steering(model, edit, cset, side_effects=side, controls=5, head_effects=effects)
    controls = frame.attrs["controls"]
    assert len(controls) == 5
    for _, c in controls.iterrows():
        heads = [(int(x[1:x.index("H")]), int(x[x.index("H") + 1:])) for x in c.edit.split("heads ")[1].split(", ")]
        assert (2, 0) not in heads and (2, 1) not in heads
        assert c.heads_patching_effect == pytest.approx(sum(effects[h] for h in heads))


def test_run_steer_eval_writes_artifacts_at_the_chosen_strength(planted, tmp_path, monkeypatch):
    model, cset, side = planted
    import behaviorlens.steering.evaluate as ev

    monkeypatch.setattr(ev, "SideEffectData", lambda m, half: side)
    edit = train_vector(model, cset, [2])
    edit.notes["strength"] = -1.0  # as chosen on a training family
    summary = run_steer_eval(model, edit, cset, [0.5], None, tmp_path, controls=5)
    for name in ("steering.csv", "steering_pairs.csv", "steering_controls.csv", "dose_response.png", "summary.json"):
        assert (tmp_path / name).is_file()
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["strength"] == -1.0  # never the best row of the evaluation family
    for key in ("pressure_removed_fraction", "collapse", "accuracy_neutral", "accuracy_positive",
                "accuracy_negative", "factual_accuracy_change", "neutral_kl", "random_control_pressure_removed_fraction",
                "random_control_pressure_removed_fraction_sd", "metric_positive_unedited"):
        assert key in saved and saved[key] == summary[key]
