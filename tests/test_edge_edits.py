"""Edits made from edges (issue 32): path ablation (heads removed from the logits only), its
complement (removed from every later layer, kept for the logits) and edge knockout (sources' output taken out of destination heads' keys and values at flagged tokens),
each against a reference written here with plain torch."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_model
from steering_helpers import CACHE_SEQS, edited_from_the_kept_cache

from behaviorlens.edits import Edit, Readout
from behaviorlens.edits.kinds.edge_knockout import source_rows
from behaviorlens.errors import BehaviorLensError
from behaviorlens.reads import reading
from behaviorlens.steering import steer

SEQS = [[5, 6, 7, 8, 9, 10, 11, 12, 33, 34, 35], [5, 6, 7, 8, 9, 10, 11, 12, 36, 37], [5, 6, 7, 8, 9, 10, 11, 12, 38]]


@pytest.fixture(scope="module")
def m():
    return tiny_model("llama")


def meta(m):
    s = m.sites
    return {"d_model": s.d_model, "n_heads": s.n_heads, "head_dim": s.head_dim, "model": m.name}


def means(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {layer: torch.randn(m.sites.n_heads, m.sites.head_dim, generator=g) for layer in range(m.sites.n_layers)}


def run(m, batch, site, layers):
    """(logits, the site at each layer) of one forward, with whatever edit is in force."""
    with torch.inference_mode(), reading(m, site, layers) as acts:
        logits = m.hf(**batch.inputs(), use_cache=False).logits
    return logits, {k: v.clone() for k, v in acts.items()}


def test_path_ablation_changes_only_the_logits_by_the_removed_head_contribution(m):
    s = m.sites
    values = means(m)
    edit = Edit(kind="path_ablation", heads={0: [1], 1: [0, 3]}, head_values=values, **meta(m))
    batch = m.batch(SEQS)
    layers = list(range(s.n_layers))
    _, z = run(m, batch, "head", layers)
    _, resid = run(m, batch, "resid_post", layers)
    with steer(m, edit):
        logits, edited = run(m, batch, "resid_post", layers)
    for layer in layers:  # every block's output, the last one's included, is the unedited one
        torch.testing.assert_close(edited[layer], resid[layer], atol=1e-6, rtol=0)
    removed = torch.zeros_like(resid[0])
    for layer, hs in edit.heads.items():
        w = s.attn_out_proj(m.hf, layer).weight
        for h in hs:
            cols = slice(h * s.head_dim, (h + 1) * s.head_dim)
            removed += (values[layer][h] - z[layer][:, :, h]) @ w[:, cols].T
    with torch.inference_mode():
        want = s.logits_from_hidden(m.hf, resid[s.n_layers - 1] + removed)
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
    assert (logits - m.logits(batch)).abs().max() > 1e-3


def test_indirect_ablation_is_the_head_ablation_with_the_direct_path_given_back(m):
    s = m.sites
    values, heads = means(m), {1: [0, 3]}
    batch = m.batch(SEQS)
    layers = list(range(s.n_layers))
    _, z = run(m, batch, "head", [1])
    with steer(m, Edit(kind="heads", heads=heads, head_mode="mean", head_values=values, **meta(m))):
        ablated_logits, ablated = run(m, batch, "resid_post", layers)
    edit = Edit(kind="indirect_ablation", heads=heads, head_values=values, **meta(m))
    with steer(m, edit):
        logits, edited = run(m, batch, "resid_post", layers)
    for layer in layers:  # every later layer reads the moved output, as under the head ablation
        torch.testing.assert_close(edited[layer], ablated[layer], atol=1e-6, rtol=0)
    w = s.attn_out_proj(m.hf, 1).weight
    given_back = sum((z[1][:, :, h] - values[1][h]) @ w[:, h * s.head_dim:(h + 1) * s.head_dim].T for h in heads[1])
    with torch.inference_mode():
        want = s.logits_from_hidden(m.hf, ablated[s.n_layers - 1] + given_back)
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
    assert (logits - ablated_logits).abs().max() > 1e-3 and (logits - m.logits(batch)).abs().max() > 1e-3
    traced = dataclasses.replace(m, remote="local", interventions=[])
    with steer(traced, edit):
        torch.testing.assert_close(traced.logits(batch), logits, atol=1e-4, rtol=1e-4)


def _edge(m, dest, sources, mlps=(), detector=None):
    s = m.sites
    g = torch.Generator().manual_seed(7)
    detector = detector or Readout(0, torch.randn(s.d_model, generator=g), 0.0)
    return Edit(kind="edge_knockout", heads=dest, head_values=means(m, 1),
                vectors={layer: torch.randn(s.d_model, generator=g) for layer in range(s.n_layers)},
                arrays={"sources": source_rows(sources, mlps)}, detector=detector, **meta(m))


def _flags(m, batch, detector):
    _, acts = run(m, batch, "resid_post", [detector.layer])
    return (detector.scores(acts[detector.layer]) > 0) & batch.attention_mask.bool()


def test_edge_knockout_changes_only_the_destination_heads_after_the_first_flagged_token(m):
    edit = _edge(m, {2: [2, 3]}, {0: [0], 1: [1, 2]}, mlps=[1])
    batch = m.batch(SEQS)
    flags = _flags(m, batch, edit.detector)
    assert flags.any() and not flags.all()
    _, before = run(m, batch, "head", [0, 1, 2])
    with steer(m, edit):
        _, after = run(m, batch, "head", [0, 1, 2])
    for layer in (0, 1):
        torch.testing.assert_close(after[layer], before[layer], atol=1e-6, rtol=0)
    real = batch.attention_mask.bool()[..., None]  # (padding queries see every key: left out)
    moved = ((after[2] - before[2]).abs().amax(-1) > 1e-6) & real  # [b, s, heads]
    assert not moved[..., :2].any()  # the other key/value group reads the real stream
    first = flags.float().argmax(1)
    for row in range(len(SEQS)):
        assert not moved[row, : int(first[row])].any()  # nothing before the first flagged token
    assert moved[..., 2:].any()


def test_edge_knockout_equals_keys_and_values_read_from_the_changed_stream(m):
    """With every head of the layer as destination, the edit is the key and value projections'
    input replaced at the flagged tokens by the norm of the stream without the sources."""
    s = m.sites
    edit = _edge(m, {2: [0, 1, 2, 3]}, {0: [0, 3], 1: [1]}, mlps=[0])
    batch = m.batch(SEQS)
    flags = _flags(m, batch, edit.detector)
    _, z = run(m, batch, "head", [0, 1])
    _, mlp = run(m, batch, "mlp", [0])
    _, pre = run(m, batch, "resid_pre", [2])
    change = edit.vectors[0] - mlp[0]
    for layer, hs in {0: [0, 3], 1: [1]}.items():
        w = s.attn_out_proj(m.hf, layer).weight
        for h in hs:
            cols = slice(h * s.head_dim, (h + 1) * s.head_dim)
            change = change + (edit.head_values[layer][h] - z[layer][:, :, h]) @ w[:, cols].T
    attn = m.hf.model.layers[2].self_attn
    with torch.inference_mode():
        normed = m.hf.model.layers[2].input_layernorm(pre[2] + change)

    def swap(module, args):
        return (torch.where(flags[..., None], normed, args[0]),)

    handles = [attn.k_proj.register_forward_pre_hook(swap), attn.v_proj.register_forward_pre_hook(swap)]
    try:
        want = m.logits(batch)
    finally:
        for h in handles:
            h.remove()
    with steer(m, edit):
        got = m.logits(batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - m.logits(batch)).abs().max() > 1e-3


def test_edge_knockout_acts_the_same_traced_batched_and_in_generation(m):
    edit = _edge(m, {2: [0, 1]}, {1: [0, 1, 2]}, mlps=[0])
    traced = dataclasses.replace(m, remote="local", interventions=[])
    batch = m.batch(SEQS)
    with steer(m, edit):
        local = m.logits(batch)
        alone = m.logits(m.batch(SEQS[:1]))
        ids = m.generate(m.batch(SEQS[:1]), 3)
    with steer(traced, edit):
        remote = traced.logits(batch)
        traced_ids = traced.generate(traced.batch(SEQS[:1]), 3)
    torch.testing.assert_close(local, remote, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(local[0, -len(SEQS[0]):], alone[0], atol=1e-4, rtol=1e-4)
    assert torch.equal(torch.as_tensor(ids), torch.as_tensor(traced_ids))


def test_edge_knockout_refuses_a_split_key_value_group_and_late_sources(m):
    with pytest.raises(BehaviorLensError, match="L2H2 shares its keys and values with L2H3 .*list them all"):
        _edge(m, {2: [2]}, {0: [0]}).check(m)
    with pytest.raises(BehaviorLensError, match="sources at layers \\[2\\] do not come before the destination layer 2"):
        _edge(m, {2: [0, 1]}, {2: [0]})
    with pytest.raises(BehaviorLensError, match="its positions are 'all'"):
        dataclasses.replace(_edge(m, {2: [0, 1]}, {0: [0]}), positions="generated")


def test_path_ablation_refuses_a_post_norm_model():
    g2 = tiny_model("gemma2")
    s = g2.sites
    edit = Edit(kind="path_ablation", heads={1: [0]}, head_values={1: torch.zeros(s.n_heads, s.head_dim)},
                d_model=s.d_model, n_heads=s.n_heads, head_dim=s.head_dim)
    with pytest.raises(BehaviorLensError, match="needs a llama-family model"):
        edit.check(g2)


@pytest.mark.parametrize("tail", [1, 3])  # reads at the last position / a teacher-forced 3-token answer
@pytest.mark.parametrize("kind", ["path_ablation", "edge_knockout"])
def test_an_edge_edit_started_from_the_kept_cache_gives_the_full_forwards_logits(m, kind, tail):
    _, states = run(m, m.batch(CACHE_SEQS[:1]), "resid_post", [0])
    direction = states[0][0, 10] - states[0][0, :9].mean(0)  # toward a token after the prefix
    flagger = Readout(0, direction, -float((states[0][0, :9] @ direction).max()) - 1e-3)  # nothing in the prefix
    assert _flags(m, m.batch(CACHE_SEQS), flagger).any()
    edit = (Edit(kind="path_ablation", heads={1: [0, 2]}, head_values=means(m), positions="generated", **meta(m))
            if kind == "path_ablation" else _edge(m, {2: [0, 1, 2, 3]}, {1: [1, 3]}, mlps=[0], detector=flagger))
    assert edited_from_the_kept_cache(m, edit, tail).reused >= 1  # it started late from the kept keys and values


def test_an_edge_knockout_at_given_tokens_is_its_cut_at_the_detectors_tokens(m):
    from behaviorlens.interventions.hooks import applied

    edit = _edge(m, {2: [0, 1]}, {1: [0, 3]}, mlps=[0])
    batch = m.batch(SEQS)
    flags = _flags(m, batch, edit.detector)
    with steer(m, edit):
        want = m.logits(batch)
    with applied(m, edit.spec.at_tokens(edit, m, flags)):
        got = m.logits(batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    plain = m.logits(batch)
    with applied(m, edit.spec.at_tokens(edit, m, torch.zeros_like(flags))):  # no token: no cut
        torch.testing.assert_close(m.logits(batch), plain, atol=1e-6, rtol=0)
    with pytest.raises(BehaviorLensError, match="has no filler null"):
        Edit(kind="path_ablation", heads={1: [0]}, head_values=means(m), **meta(m)).spec.at_tokens(None, m, flags)


def test_eap_sources_are_the_nodes_whose_edges_into_the_destination_carry_the_behavior(m):
    """Summed positive effect of each upstream node's edges into the destination groups' keys and
    values, the top k; edges into other ports, from the input, or of negative effect never count."""
    import numpy as np

    from behaviorlens.circuits.attribution import EdgeScores
    from behaviorlens.circuits.graph import Graph
    from behaviorlens.steering.candidates import eap_sources

    g = Graph.of(m)  # 3 layers, 4 heads in 2 key/value groups
    effect = np.zeros((g.n_edges, 1))
    ups, ports = g.edge_index

    def put(up: str, port: str, value: float) -> None:
        u, p = g.parse_edge(f"{up}->{port}")
        effect[np.flatnonzero((ups == u) & (ports == p))[0], 0] = value

    put("L0H1", "L2KV1.k", 0.5)
    put("L0H1", "L2KV1.v", 0.2)  # L0H1 sums to 0.7
    put("L1.mlp", "L2KV1.v", 0.4)
    put("L1H3", "L2KV1.k", 0.3)
    put("L1H2", "L2KV1.k", -0.9)  # carries against the behavior
    put("L0H0", "L2KV0.k", 2.0)  # another group
    put("L0H0", "L2H1.q", 2.0)  # a query
    put("input", "L2KV1.k", 3.0)  # the input is no head or MLP
    scores = EdgeScores(g, effect, np.ones(1), "eap")
    assert eap_sources(scores, 2, [1], 2) == ({0: [1]}, [1])
    assert eap_sources(scores, 2, [1], 5) == ({0: [1], 1: [3]}, [1])
    assert eap_sources(scores, 2, [0, 1], 1) == ({0: [0]}, [])
