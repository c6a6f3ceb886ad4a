"""EAP against exact edge patching, and exact edge patching against plain torch hooks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_family, tiny_model

from behaviorlens.circuits import forward as F
from behaviorlens.circuits.attribution import edge_attribution
from behaviorlens.circuits.exact import agreement, exact_edges
from behaviorlens.circuits.graph import Graph
from behaviorlens.circuits.split import edge_products
from behaviorlens.reads import reading

pytestmark = pytest.mark.usefixtures("one_thread")


def _linear_logits(m):
    """The final norm replaced by Identity: the metric is linear in the logits' input."""
    path = m.sites.arch.final_norm.rsplit(".", 1)
    setattr(m.hf.get_submodule(path[0]), path[1], torch.nn.Identity())
    return m


def test_eap_equals_exact_where_linear():
    m = _linear_logits(tiny_model("llama"))
    cs = tiny_family().render(m.tokenizer)
    g = Graph.of(m)
    est = edge_attribution(m, cs)
    edges = np.flatnonzero(g.edge_index[1] == g.logits_port)  # every edge into the logits
    exact = exact_edges(m, cs, edges, batch_size=8)
    table, _ = agreement(est, exact, edges)
    assert table["exact"].abs().max() > 0.05  # not a trivial case
    assert np.abs(table["attribution"] - table["exact"]).max() < 1e-4
    # elsewhere the model is not linear: EAP is an estimate, close but not equal
    inner = np.flatnonzero(g.edge_index[1] != g.logits_port)
    t2, s2 = agreement(est, exact_edges(m, cs, inner, batch_size=64), inner)
    assert np.abs(t2["attribution"] - t2["exact"]).max() > 1e-3
    assert s2["pearson"] > 0.5


def test_exact_edge_patching_matches_torch_hooks(tiny_llama):
    """Edges into an MLP and into the logits, patched with hooks on the model's own forward."""
    m = tiny_llama
    cs = tiny_family().render(m.tokenizer)
    g = Graph.of(m)
    pairs = list(range(len(cs)))
    pos, neg = F.sides(m, cs, pairs)
    outs = {}
    for name, side in (("pos", pos), ("neg", neg)):
        with torch.inference_mode(), reading(m, "head", [0]) as heads, reading(m, "mlp", [0]) as mlps:
            m.hf(**side.spec.inputs, use_cache=False)
        wo = m.sites.attn_out_proj(m.hf, 0).weight.detach().view(64, 4, 16)
        outs[name] = {"L0H2": torch.einsum("bshe,dhe->bshd", heads[0], wo)[:, :, 2], "L0.mlp": mlps[0]}
    cases = [("L0H2", "L1.mlp", m.hf.model.layers[1].post_attention_layernorm),
             ("L0.mlp", "logits", m.hf.model.norm), ("L0H2", "L2.mlp", m.hf.model.layers[2].post_attention_layernorm)]
    ups, ports = g.edge_index
    for up, port, module in cases:
        u, p = g.parse_edge(f"{up}->{port}")
        k = int(np.flatnonzero((ups == u) & (ports == p))[0])
        ours = exact_edges(m, cs, [k]).effect[k]
        delta = outs["neg"][up] - outs["pos"][up]
        handle = module.register_forward_pre_hook(lambda mod, args, delta=delta: (args[0] + delta, *args[1:]))
        try:
            patched = F.model_metric(m, pos)
        finally:
            handle.remove()
        reference = (F.model_metric(m, pos) - patched).numpy()
        assert np.abs(reference).max() > 1e-4, (up, port)
        assert np.allclose(ours, reference, atol=1e-5), (up, port, ours, reference)


def test_copies_and_single_runs_agree(tiny_llama):
    """Batched copies (several edges, several pairs per forward) equal one edge at a time."""
    m = tiny_llama
    cs = tiny_family().render(m.tokenizer)
    edges = [5, 40, 77, 150, 151]
    together = exact_edges(m, cs, edges, batch_size=64).effect[edges]
    alone = np.stack([exact_edges(m, cs, [e], batch_size=1, pair_batch=1).effect[e] for e in edges])
    assert np.allclose(together, alone, atol=1e-5)
    assert np.abs(together).max() > 1e-3


def test_edge_products_are_the_dense_products_at_every_edge():
    g = Graph(3, 4, 2)
    gen = torch.Generator().manual_seed(0)
    diff, grads = torch.randn(g.n_up, 3, 5, 8, generator=gen), torch.randn(g.n_ports, 3, 5, 8, generator=gen)
    ups, ports = g.edge_index
    dense = torch.einsum("ursd,prsd->upr", diff, grads)[torch.as_tensor(ups), torch.as_tensor(ports)]
    assert torch.allclose(edge_products(g, diff, grads), dense, atol=1e-4)


def test_attribution_leaves_the_weights_as_it_found_them(tiny_llama):
    m = tiny_llama
    before = [p.requires_grad for p in m.hf.parameters()]
    edge_attribution(m, tiny_family().render(m.tokenizer))
    assert [p.requires_grad for p in m.hf.parameters()] == before and any(before)
    assert all(p.grad is None for p in m.hf.parameters())


def test_a_memory_budget_shrinks_the_chunks_and_keeps_the_figures(tiny_llama, monkeypatch):
    """A budget of two pairs' split-forward memory sends EAP two pairs at a time, same figures."""
    import dataclasses

    from behaviorlens.circuits import split

    m = tiny_llama
    cs = tiny_family().render(m.tokenizer)
    whole = edge_attribution(m, cs, pair_batch=8)
    sizes = []
    job = split.attribution_job
    monkeypatch.setattr(split, "attribution_job", lambda *args: sizes.append(args[-1]) or job(*args))
    budget = dataclasses.replace(m, max_memory=2 * 3 * F.row_bytes(m, cs))
    assert budget.memory_budget() == 6 * F.row_bytes(m, cs) and m.memory_budget() is None  # the CPU: none
    chunked = edge_attribution(budget, cs, pair_batch=8)
    assert sizes == [2, len(cs) - 2]
    assert np.allclose(chunked.effect, whole.effect, atol=1e-5) and np.allclose(chunked.shift, whole.shift, atol=1e-6)
