"""The edit kinds of issue 13 against independent references: knockout, subspace, weights,
per-head steering, gates, and the shared-prefix forward under every kind."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from behaviorlens import kv_cache
from behaviorlens.edits import Readout
from behaviorlens.errors import BehaviorLensError
from behaviorlens.steering import Edit, steer
from behaviorlens.steering.apply import knockout
from behaviorlens.steering.bake import edited_module

SEQS = [[5, 6, 7, 8, 9, 10, 11, 12, 33, 34, 35], [5, 6, 7, 8, 9, 10, 11, 12, 36, 37], [5, 6, 7, 8, 9, 10, 11, 12, 38]]


def meta(model):
    s = model.sites
    return dict(d_model=s.d_model, n_heads=s.n_heads, head_dim=s.head_dim, model=model.name)


def attention(model, batch, layer):
    """Attention probabilities of one layer (eager attention returns them)."""
    with torch.inference_mode():
        out = model.hf(**batch.inputs(), output_attentions=True, use_cache=False)
    return out.attentions[layer]


def test_knockout_blocks_exactly_the_chosen_edges(tiny_llama):
    m = tiny_llama
    batch = m.batch(SEQS[:2])
    blocked = torch.zeros_like(batch.input_ids, dtype=torch.bool)
    blocked[:, -4:-2] = True  # two key tokens near the end of each row
    before = attention(m, batch, 1)
    with knockout(m, {1: [0, 2]}, blocked):
        after = attention(m, batch, 1)
    last = after[:, :, -1]  # the answer position's attention
    assert torch.all(last[:, [0, 2]][blocked[:, None, :].expand(-1, 2, -1)] == 0)
    assert torch.allclose(last[:, [0, 2]].sum(-1), torch.ones(2, 2), atol=1e-5)  # renormalized
    assert torch.allclose(after[:, [1, 3]], before[:, [1, 3]], atol=1e-6)  # other heads untouched
    assert torch.allclose(after[:, :, :-1], before[:, :, :-1], atol=1e-6)  # other query positions too
    assert not torch.allclose(last[:, 0], before[:, 0, -1])


def test_knockout_edit_uses_its_detector_flags(tiny_llama):
    m = tiny_llama
    g = torch.Generator().manual_seed(0)
    detector = Readout(0, torch.randn(m.sites.d_model, generator=g), 0.0)
    edit = Edit(kind="knockout", heads={2: [1, 3]}, detector=detector, positions="generated", **meta(m))
    batch = m.batch(SEQS)
    from behaviorlens.reads import reading

    with torch.inference_mode(), reading(m, "resid_post", [0]) as acts:
        m.hf(**batch.inputs(), use_cache=False)
    flags = detector.scores(acts[0]) > 0
    assert flags.any() and not flags.all()
    with knockout(m, {2: [1, 3]}, flags):
        want = m.logits(batch)[:, -1]
    with steer(m, edit):
        got = m.logits(batch)[:, -1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - m.logits(batch)[:, -1]).abs().max() > 1e-4


def test_subspace_clamp_matches_a_hook_reference(tiny_llama):
    m = tiny_llama
    g = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(m.sites.d_model, 3, generator=g))[0]
    point = torch.randn(m.sites.d_model, generator=g)
    edit = Edit(kind="subspace", basis={1: basis}, vectors={1: point}, positions="all", **meta(m))
    batch = m.batch(SEQS)

    def clamp(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        new = h + ((point - h) @ basis) @ basis.T
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = m.hf.model.layers[1].register_forward_hook(clamp)
    try:
        want = m.logits(batch)
    finally:
        handle.remove()
    with steer(m, edit):
        got = m.logits(batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_weights_edit_equals_a_copy_with_changed_weights_and_is_undone(tiny_llama):
    m = tiny_llama
    name = "model.layers.1.self_attn.o_proj.weight"
    param = dict(m.hf.named_parameters())[name]
    delta = torch.randn(param.shape, generator=torch.Generator().manual_seed(2)) * 0.1
    edit = Edit(kind="weights", weights={name: delta}, **meta(m))
    batch = m.batch(SEQS)
    ref = copy.deepcopy(m.hf)
    with torch.no_grad():
        dict(ref.named_parameters())[name].add_(delta)
        want = ref(**batch.inputs(), use_cache=False).logits
    before = param.detach().clone()
    with steer(m, edit):
        got = m.logits(batch)
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)
    assert torch.equal(param, before)  # restored exactly
    torch.testing.assert_close(edited_module(m, edit)(**batch.inputs(), use_cache=False).logits, want)


def test_per_head_steering_adds_to_the_head_output(tiny_llama):
    m = tiny_llama
    s = m.sites
    values = torch.zeros(s.n_heads, s.head_dim)
    values[2] = torch.randn(s.head_dim, generator=torch.Generator().manual_seed(3))
    edit = Edit(kind="heads", heads={1: [2]}, head_values={1: values}, head_mode="add", **meta(m))
    batch = m.batch(SEQS)
    proj = m.hf.model.layers[1].self_attn.o_proj
    handle = proj.register_forward_pre_hook(lambda mod, args: (args[0] + 2.0 * values.flatten(),))
    try:
        want = m.logits(batch)
    finally:
        handle.remove()
    with steer(m, edit, 2.0):
        got = m.logits(batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_gate_opens_and_closes_per_row(tiny_llama):
    m = tiny_llama
    v = torch.randn(m.sites.d_model, generator=torch.Generator().manual_seed(4)) * 5
    batch = m.batch(SEQS)
    plain = m.logits(batch)
    with steer(m, Edit(kind="vector", vectors={2: v}, **meta(m))):
        edited = m.logits(batch)
    zero = torch.zeros(m.sites.d_model)
    for bias, want in ((1.0, edited), (-1.0, plain)):
        gated = Edit(kind="vector", vectors={2: v}, gate=Readout(1, zero, bias), **meta(m))
        with steer(m, gated):
            torch.testing.assert_close(m.logits(batch), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(BehaviorLensError, match="read an earlier layer"):
        with steer(m, Edit(kind="vector", vectors={0: v}, gate=Readout(1, zero, 1.0), **meta(m))):
            pass


@pytest.mark.parametrize("kind", ["vector", "heads", "knockout", "subspace", "weights", "path_ablation",
                                  "indirect_ablation", "edge_knockout"])
def test_shared_prefix_forward_equals_a_padded_batch_under_every_kind(tiny_llama, kind, monkeypatch):
    m = tiny_llama
    s = m.sites
    g = torch.Generator().manual_seed(5)
    edits = {
        "vector": Edit(kind="vector", vectors={1: torch.randn(s.d_model, generator=g)}, positions="generated", **meta(m)),
        "heads": Edit(kind="heads", heads={1: [0]}, head_mode="zero", positions="generated", **meta(m)),
        "knockout": Edit(kind="knockout", heads={2: [0, 1]}, detector=Readout(0, torch.randn(s.d_model, generator=g)),
                         positions="generated", **meta(m)),
        "subspace": Edit(kind="subspace", basis={1: torch.linalg.qr(torch.randn(s.d_model, 2, generator=g))[0]},
                         vectors={1: torch.randn(s.d_model, generator=g)}, positions="generated", **meta(m)),
        "weights": Edit(kind="weights", weights={"model.layers.0.mlp.down_proj.weight": 0.1 * torch.randn(
            s.d_model, 128, generator=g)}, **meta(m)),
        "path_ablation": Edit(kind="path_ablation", heads={1: [0, 3]}, positions="generated", head_values={
            1: torch.randn(s.n_heads, s.head_dim, generator=g)}, **meta(m)),
        "indirect_ablation": Edit(kind="indirect_ablation", heads={1: [0, 3]}, positions="generated", head_values={
            1: torch.randn(s.n_heads, s.head_dim, generator=g)}, **meta(m)),
        "edge_knockout": Edit(kind="edge_knockout", heads={2: [0, 1, 2, 3]}, detector=Readout(
            0, torch.randn(s.d_model, generator=g)), head_values={1: torch.randn(s.n_heads, s.head_dim, generator=g)},
            vectors={0: torch.randn(s.d_model, generator=g)}, arrays={"sources": torch.tensor([[1.0, 2.0], [0.0, -1.0]])},
            **meta(m)),
    }
    rows, positions = torch.arange(3), torch.tensor([len(x) - 1 for x in SEQS])
    with steer(m, edits[kind]):
        cached = m.score_logits(SEQS, rows, positions)
        monkeypatch.setattr(kv_cache, "PREFIX_MIN", 10**6)
        padded = m.score_logits(SEQS, rows, positions)
    torch.testing.assert_close(cached, padded, atol=1e-5, rtol=1e-5)
    assert (padded - m.score_logits(SEQS, rows, positions)).abs().max() > 1e-4  # the edit acted


def test_a_detector_closes_short_gaps_inside_a_flagged_span():
    r = Readout(0, torch.zeros(4), gap=2)
    flags = torch.tensor([[0, 1, 0, 0, 1, 0, 0, 0, 1, 1, 0]], dtype=torch.bool)
    #                         gap of 2: closed  gap of 3: left open
    want = torch.tensor([[0, 1, 1, 1, 1, 0, 0, 0, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(r.close(flags), want)
    assert torch.equal(Readout(0, torch.zeros(4)).close(flags), flags)  # no gap: unchanged


@pytest.mark.parametrize("fitted", [True, False])  # a detector that flags chosen tokens / a random one that flags padding
@pytest.mark.parametrize("prefix_min", [8, 10**6])  # a shared prefix run once (pads mid-row) / one left-padded batch
def test_a_detector_knockout_gives_each_prompt_the_same_logits_batched_or_alone(tiny_llama, prefix_min, fitted, monkeypatch):
    from sklearn.linear_model import LogisticRegression

    from behaviorlens.reads import token_states

    m = tiny_llama
    monkeypatch.setattr(kv_cache, "PREFIX_MIN", prefix_min)
    seqs = [[*SEQS[0][:8], 33, 34, 35, 40, 41, 42, 43, 44, 45], [*SEQS[0][:8], 36, 37, 46], [*SEQS[0][:8], 38, 39]]
    # flag the prefix's last token and a token two or three later: the tokens between are closed
    # only if padding (mid-row in the shared-prefix run, leading in a padded batch) is not counted
    want = [[i in (7, 9) for i in range(len(x))] for x in seqs]
    want[1][10] = True
    states = token_states(m, seqs, [0])[0]
    probe = LogisticRegression(C=1e4, max_iter=5000).fit(np.concatenate(states), np.concatenate(want))
    detector = Readout(0, torch.tensor(probe.coef_[0]), float(probe.intercept_[0]), gap=3)
    assert all(torch.equal(detector.scores(torch.tensor(x)) > 0, torch.tensor(w)) for x, w in zip(states, want))
    if not fitted:
        detector = Readout(0, torch.randn(m.sites.d_model, generator=torch.Generator().manual_seed(3)), 0.0, gap=3)
    edit = Edit(kind="knockout", heads={1: [0, 1, 2, 3], 2: [0, 1, 2, 3]}, detector=detector,
                positions="generated", **meta(m))
    last = torch.tensor([len(x) - 1 for x in seqs])
    with steer(m, edit):
        batched = m.score_logits(seqs, torch.arange(3), last)
        alone = torch.cat([m.score_logits([x], torch.tensor([0]), last[i:i + 1]) for i, x in enumerate(seqs)])
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-4)
    assert (alone - m.score_logits(seqs, torch.arange(3), last)).abs().max() > 1e-3  # the edit acted
