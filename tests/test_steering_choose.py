"""Choosing an edit: pairs that built or patched nothing judge, limits are kept, every
candidate is listed, the choice's tables are written."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from steering_helpers import planted_model, planted_set, tiny_side_effects

from behaviorlens.edits import Edit, kind_of
from behaviorlens.errors import BehaviorLensError
from behaviorlens.measure import side_metrics
from behaviorlens.patching import patch
from behaviorlens.patching.results import PatchEvidence
from behaviorlens.steering import steer
from behaviorlens.steering.choose import choose_edit, refit_spread, split_for_choice
from behaviorlens.steering.judge import within_limits
from behaviorlens.steering.run import run_steer_train


@pytest.fixture(scope="module")
def planted():
    model = planted_model()
    cset = planted_set(model, 20)
    patched = cset.subset(range(6))
    evidence = PatchEvidence(pd.concat([patch(model, patched, "head", progress=False).means(),
                                   patch(model, patched, "resid_pre", positions=["last"], progress=False).means()]),
                        {p.row for p in patched})
    return model, cset, evidence, tiny_side_effects(model, "select")


def test_judging_pairs_were_never_patched_or_used_to_build(planted):
    _, cset, evidence, _ = planted
    fit, judge, roles = split_for_choice(cset, evidence.rows, seed=0)
    judged = {p.row for p in judge}
    assert not judged & evidence.rows and not judged & {p.row for p in fit}
    assert set(roles[roles.role == "judge"].row) == judged
    assert set(roles[roles.role == "patched"].row) == evidence.rows
    with pytest.raises(BehaviorLensError, match="only 2 pairs remain"):
        split_for_choice(cset.subset(range(10)), evidence.rows)


def test_choice_is_the_best_within_the_limits_and_every_candidate_is_listed(planted):
    model, cset, evidence, side = planted
    groups = ["head ablation", "per-head steering", "knockout", "vector", "direction ablation", "gated"]
    choice = choose_edit(model, cset, evidence, groups=groups, side_effects=side)
    table = choice.candidates
    assert set(table.group) == set(groups) and table.chosen.sum() == 1
    ok = table[table.within_limits]
    chosen = table[table.chosen].iloc[0]
    assert chosen.within_limits and chosen.pressure_removed_fraction == ok.pressure_removed_fraction.max()
    accuracy = ["accuracy_neutral_change", "factual_accuracy_change", "context_use_accuracy_change",
                "claim_recall_accuracy_change"]
    nulls = table[["null_control_pressure_removed_fraction", "random_pressure_removed_fraction"]].abs()
    limits_ok = (~table.collapse.astype(bool)) & (table.neutral_kl <= 0.05) & \
        (table[accuracy].min(axis=1) >= -0.02 - 1e-9) & ~(nulls > 0.15).any(axis=1)
    assert (limits_ok == table.within_limits).all() and not table.within_limits.all()
    knockouts = table[table.group == "knockout"]
    assert knockouts.null_control.str.contains("non-claim sentence").all()
    assert table.deletion_baseline_pressure_removed_fraction.notna().all()
    assert len(choice.refits) == 3 and choice.refits.seed.tolist() == [0, 1, 2]
    assert choice.refits.pressure_removed_fraction.iloc[0] == chosen.pressure_removed_fraction
    # the chosen figure, recomputed on the judging pairs with the edit applied by hand
    held = split_for_choice(cset, evidence.rows)[1]
    base = side_metrics(model, held)
    with steer(model, choice.edit):
        edited = side_metrics(model, held)
    removed = (base["positive"] - edited["positive"]).sum() / (base["positive"] - base["neutral"]).sum()
    assert chosen.pressure_removed_fraction == pytest.approx(removed, abs=1e-6)
    assert chosen.pressure_removed_fraction > max(0.3, chosen.random_pressure_removed_fraction + 0.1)
    assert choice.edit.notes["strength"] == 1.0 and "judging pairs" in choice.reason
    assert {"detector_recall", "gate_recall", "gate_fires_on_requests"} <= set(choice.probes)
    # a limit nobody can keep is refused, listing every candidate
    with pytest.raises(BehaviorLensError, match="no candidate edit keeps"):
        choose_edit(model, cset, evidence, kl_max=-1.0, groups=["vector"], side_effects=side)


def test_a_family_without_a_neutral_side_is_refused(planted):
    model, cset, evidence, side = planted
    flat = cset.subset(range(len(cset)))
    flat.pairs = [type(p)(**{**p.__dict__, "tokens": {k: v for k, v in p.tokens.items() if k != "neutral"}})
                  for p in flat.pairs]
    with pytest.raises(BehaviorLensError, match="no neutral side"):
        choose_edit(model, flat, evidence, side_effects=side)


def test_steer_train_writes_the_choice_tables(planted, tmp_path):
    model, cset, evidence, side = planted
    import behaviorlens.steering.choose as choose_module

    original = choose_module.SideEffectData
    choose_module.SideEffectData = lambda m, half, requests=None: side
    try:
        summary = run_steer_train(model, cset, tmp_path / "e.safetensors", from_patching=evidence,
                                  groups=["vector", "head ablation"])
    finally:
        choose_module.SideEffectData = original
    folder = tmp_path / "e.choice"
    for name in ("candidates.csv", "choice_pairs.csv", "mechanism.csv", "probes.json", "pareto.png"):
        assert (folder / name).is_file(), name
    assert summary["reason"].startswith("chose ")
    table = pd.read_csv(folder / "candidates.csv")
    saved = sorted((folder / "candidates").glob("*.safetensors"))
    assert len(saved) == len(table)  # every candidate can be scored again (steer eval)
    assert [Edit.load(f).describe() for f in saved] == list(table.edit)


def _limits_table(**columns):
    base = {"collapse": [False], "accuracy_neutral_change": [0.0], "factual_accuracy_change": [0.0],
            "context_use_accuracy_change": [0.0], "claim_recall_accuracy_change": [0.0], "neutral_kl": [0.01],
            "null_control_pressure_removed_fraction": [0.01], "random_pressure_removed_fraction": [0.0]}
    return pd.DataFrame(base | {k: [v] for k, v in columns.items()})


@pytest.mark.parametrize("null", [-0.2, 0.2])
def test_a_matched_null_that_moves_the_model_either_way_breaks_the_limits(null):
    assert bool(within_limits(_limits_table(), 0.05, 0.02).iloc[0])
    assert not bool(within_limits(_limits_table(null_control_pressure_removed_fraction=null), 0.05, 0.02).iloc[0])


def test_a_knockouts_other_words_control_is_reported_not_a_limit():
    """Blocking other words of the question in heads that read it moves the model toward the
    claim (a large negative figure): the heads' doing, so it must not rule the edit out."""
    table = _limits_table(random_pressure_removed_fraction=-1.5)
    assert bool(within_limits(table, 0.05, 0.02).iloc[0])
    assert kind_of("knockout").random_control_label == "as many other words blocked in these heads"


def test_a_refit_that_builds_fewer_candidates_says_so_instead_of_failing(planted):
    model, cset, evidence, side = planted
    spread = refit_spread(model, cset, evidence, "vector", 7, 0, 1, groups=["vector"])
    assert len(spread) == 1 and np.isnan(spread.pressure_removed_fraction.iloc[0])
    assert spread.edit.iloc[0].startswith("no vector candidate number 8 on this split (2 built)")


def test_the_head_search_adds_a_candidate_per_lambda_and_writes_its_front(planted):
    from behaviorlens.steering.head_search import LAMBDAS

    model, cset, evidence, side = planted
    choice = choose_edit(model, cset, evidence, groups=["searched heads"], side_effects=side, refits=0,
                         fit_side_effects=tiny_side_effects(model, "fit"), frame_families=(), outside_limits=True)
    front = choice.head_search
    assert set(front.edit) == {"knockout", "mean ablation"} and sorted(set(front["lambda"])) == sorted(LAMBDAS)
    searched = choice.candidates[choice.candidates.group == "searched heads"]
    assert len(searched) == (front.n_heads > 0).sum() > 0
    # each candidate is the edit its front row names: that kind, those heads, at the answer positions
    kinds = {"knockout": "knockout", "mean ablation": "heads"}
    for (_, row), i in zip(front[front.n_heads > 0].iterrows(), searched.candidate):
        edit = choice.edits[i]
        assert (edit.kind, edit.heads, edit.positions) == (kinds[row.edit], row.heads, "generated")
    cost = (front.context_use_cost + front.claim_recall_cost) / 2
    np.testing.assert_allclose(front.objective, front.pressure_removed - front["lambda"] * cost, atol=1e-9)
    assert (front.n_heads <= 5).all() and front[front.n_heads > 0].steps.str.startswith("add").all()


def test_the_chooser_builds_and_judges_the_edge_groups_like_every_candidate(planted):
    model, cset, evidence, side = planted
    choice = choose_edit(model, cset, evidence, groups=["path ablation", "indirect ablation", "edge knockout"],
                         side_effects=side, refits=0, outside_limits=True)
    table = choice.candidates
    assert set(table.group) == {"path ablation", "indirect ablation", "edge knockout"}
    kinds = {e.kind for e in choice.edits}
    assert kinds == {"path_ablation", "indirect_ablation", "edge_knockout"}
    paths, edges = table[table.group.str.endswith("ablation")], table[table.group == "edge knockout"]
    direct, indirect = (table[table.group == g].edit.tolist() for g in ("path ablation", "indirect ablation"))
    assert len(direct) == len(indirect) and all(d != i for d, i in zip(direct, indirect))  # the same heads, cut apart
    drawn = paths[paths.null_control.notna()]  # (a 3-layer model leaves no other heads for the widest)
    assert len(drawn) and drawn.null_control.str.contains("of the same size").all()  # random draws: its null
    assert edges.null_control.str.contains("non-claim sentence").all()  # a knockout's filler null
    by_eap = edges[edges.evidence.str.contains("by edge attribution")]
    assert len(by_eap) == 2  # into every head of the layer, and into its top heads' groups
    assert table[table.null_control.notna()].null_control_pressure_removed_fraction.notna().all()
    assert table.deletion_baseline_pressure_removed_fraction.notna().all()
    assert table.within_limits.dtype == bool
