"""Every registered edit kind, through the same checks: it survives its file, its random control
is of its own kind and differs, it bakes exactly or refuses in one line, and it acts the same on
the trace path (nnsight's simulation of NDIF) as on the local hooks."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_family, tiny_model

from behaviorlens.edits import KINDS, Edit, Readout, kind_of
from behaviorlens.edits.kind import EditKind
from behaviorlens.edits.kinds.edge_knockout import source_rows
from behaviorlens.errors import BehaviorLensError
from behaviorlens.model import Model, _wrap
from behaviorlens.reads import site_values
from behaviorlens.scoring import behavior_metric
from behaviorlens.steering import steer
from behaviorlens.steering.bake import edited_module
from behaviorlens.steering.evaluate import random_control
from behaviorlens.steering.run import generate_examples

KIND_NAMES = ["vector", "ablate_direction", "heads", "knockout", "subspace", "lowrank", "weights", "path_ablation",
              "indirect_ablation", "edge_knockout"]


def _examples(m, cset) -> dict[str, list[Edit]]:
    """At least one edit of every kind (and of every mode and readout a kind has); the gate
    opens on some prompts of ``cset`` and stays shut on others."""
    s = m.sites
    g = torch.Generator().manual_seed(3)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    meta = dict(d_model=s.d_model, n_heads=s.n_heads, head_dim=s.head_dim, model=m.name)
    direction = rand(s.d_model)
    last = site_values(m, m.batch([p.tokens["positive"] for p in cset]), "resid_post", [0])[0][:, -1]
    scores = (last @ direction).sort().values
    gate = Readout(0, direction, -float(scores[:2].mean()))  # fires on the two highest-scoring rows
    detector = Readout(0, rand(s.d_model), 0.0, gap=1)
    values = {1: rand(s.n_heads, s.head_dim), 2: rand(s.n_heads, s.head_dim)}
    return {
        "vector": [Edit(kind="vector", vectors={1: 3 * rand(s.d_model)}, **meta),
                   Edit(kind="vector", vectors={1: 3 * rand(s.d_model)}, gate=gate, positions="generated", **meta)],
        "ablate_direction": [Edit(kind="ablate_direction", vectors={-1: rand(s.d_model)}, **meta)],
        "heads": [Edit(kind="heads", heads={1: [0, 3]}, head_values=values, head_mode="mean", **meta),
                  Edit(kind="heads", heads={2: [1]}, head_mode="scale", scale=3.0, **meta),
                  Edit(kind="heads", heads={1: [2], 2: [0]}, head_values=values, head_mode="add", gate=gate,
                       positions="generated", **meta)],
        "knockout": [Edit(kind="knockout", heads={1: [0, 1, 2, 3], 2: [0, 1, 2, 3]}, detector=detector,
                          positions="generated", **meta)],
        "subspace": [Edit(kind="subspace", basis={1: torch.linalg.qr(rand(s.d_model, 2))[0]},
                          vectors={1: 3 * rand(s.d_model)}, **meta)],
        "lowrank": [Edit(kind="lowrank", basis={1: torch.linalg.qr(rand(s.d_model, 2))[0]},
                         arrays={"weight.1": rand(2, s.d_model), "bias.1": rand(2)}, **meta)],
        "weights": [Edit(kind="weights", weights={"model.layers.1.self_attn.o_proj.weight": 0.5 * rand(s.d_model, s.d_model)},
                         **meta)],
        "path_ablation": [Edit(kind="path_ablation", heads={1: [0, 3], 2: [1]}, head_values=values, **meta),
                          Edit(kind="path_ablation", heads={2: [2]}, head_values=values, gate=gate,
                               positions="generated", **meta)],
        "indirect_ablation": [Edit(kind="indirect_ablation", heads={1: [0, 3], 2: [1]}, head_values=values, **meta),
                              Edit(kind="indirect_ablation", heads={1: [2]}, head_values=values, gate=gate,
                                   positions="generated", **meta)],
        "edge_knockout": [Edit(kind="edge_knockout", heads={2: [0, 1, 2, 3]}, head_values=values,
                               vectors={0: rand(s.d_model), 1: rand(s.d_model)}, detector=detector,
                               arrays={"sources": source_rows({1: [0, 2]}, [1])}, **meta),
                          Edit(kind="edge_knockout", heads={2: [2, 3]}, head_values=values,
                               vectors={0: rand(s.d_model), 1: rand(s.d_model)}, detector=detector, gate=gate,
                               arrays={"sources": source_rows({1: [1]}, [0])}, **meta)],
    }


@pytest.fixture(scope="module")
def setup():
    m = tiny_model("llama")
    cset = tiny_family().render(m.tokenizer)
    return m, cset, _examples(m, cset)


def test_every_registered_kind_has_an_example_here(setup):
    _, _, examples = setup
    assert set(KINDS) == set(examples)  # a new kind must join these checks


def test_an_unknown_kind_is_refused_in_one_line():
    with pytest.raises(BehaviorLensError, match="unknown edit kind 'dance'; kinds are .*vector"):
        Edit(kind="dance")
    with pytest.raises(BehaviorLensError, match="unknown edit kind"):
        kind_of("dance")


def test_a_subclass_registers_itself_and_the_edit_delegates_to_it(monkeypatch):
    monkeypatch.setattr("behaviorlens.edits.kind.KINDS", dict(KINDS))

    class Nothing(EditKind):
        name = "nothing"
        has_strength = False

        def validate(self, edit):
            if edit.vectors:
                raise BehaviorLensError("a nothing edit holds no vectors")

        def layers(self, edit):
            return [0]

        def describe(self, edit):
            return "nothing at all"

        def check(self, edit, model):
            pass

        def interventions(self, edit, model, strength, layers, positions):
            return []

        def random_control(self, edit, model, g):
            return edit

    edit = Edit(kind="nothing")
    assert edit.spec.name == "nothing" and edit.layers == [0] and edit.describe() == "nothing at all"
    with pytest.raises(BehaviorLensError, match="no vectors"):
        Edit(kind="nothing", vectors={0: torch.ones(3)})
    with pytest.raises(BehaviorLensError, match="a nothing edit has no weight form"):
        Nothing().bake(edit, None, None, 1.0)


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_each_kind_survives_its_file_and_has_a_random_control_of_its_own_kind(setup, kind, tmp_path):
    m, _, examples = setup
    for i, edit in enumerate(examples[kind]):
        back = Edit.load(edit.save(tmp_path / f"{kind}{i}.safetensors"), m)
        assert back.describe() == edit.describe() and back.layers == edit.layers
        assert back.tensors().keys() == edit.tensors().keys()
        assert all(torch.equal(a, back.tensors()[k]) for k, a in edit.tensors().items())
        control = random_control(m, edit, seed=1)
        assert control.kind == edit.kind and control.gate is edit.gate
        moved = any(not torch.equal(a, control.tensors().get(k, 0 * a)) for k, a in edit.tensors().items()
                    if k not in ("gate", "detector"))
        assert moved or control.heads != edit.heads or control.detector.decoy is not None


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_each_kind_acts_the_same_traced_and_local(setup, kind):
    m, cset, examples = setup
    traced = dataclasses.replace(m, remote="local", interventions=[])
    plain = behavior_metric(m, cset.pairs, "positive")
    for edit in examples[kind]:
        with steer(m, edit):
            local = behavior_metric(m, cset.pairs, "positive")
        with steer(traced, edit):
            remote = behavior_metric(traced, cset.pairs, "positive")
        assert torch.allclose(local, remote, atol=1e-4), edit.describe()
        moved = (local - plain).abs() > 1e-3
        assert moved.any(), f"{edit.describe()} did nothing"
        if edit.gate is not None:
            assert not moved.all(), f"{edit.describe()}: its gate opened on every prompt"


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_each_kind_bakes_to_its_runtime_effect_or_says_why_not(setup, kind):
    m, cset, examples = setup
    edit = dataclasses.replace(examples[kind][0], positions="all")
    if edit.spec.cannot_bake:
        with pytest.raises(BehaviorLensError, match=edit.spec.cannot_bake.split(" (")[0]):
            edited_module(m, edit)
        return
    with steer(m, edit):
        runtime = behavior_metric(m, cset.pairs, "positive")
    baked = Model(name="baked", lm=_wrap(edited_module(m, edit), m.tokenizer), tokenizer=m.tokenizer, sites=m.sites)
    assert torch.allclose(runtime, behavior_metric(baked, cset.pairs, "positive"), atol=1e-4)
    assert (runtime - behavior_metric(m, cset.pairs, "positive")).abs().max() > 1e-3


def test_a_kind_without_strength_says_so():
    assert not kind_of("knockout").has_strength
    assert all(kind_of(k).has_strength for k in KINDS if k != "knockout")


def test_generation_labels_the_unedited_model_and_a_kind_without_strength(setup):
    m, cset, examples = setup
    knock = generate_examples(m, examples["knockout"][0], cset, max_new_tokens=2)
    assert list(dict.fromkeys(knock.label)) == ["unedited", "edited"]
    vector = generate_examples(m, examples["vector"][0], cset, max_new_tokens=2)
    assert list(dict.fromkeys(vector.label)) == ["x-4", "unedited", "x+4"]
