"""The circuit graph and the split forward: plain split forward == the model's forward."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_family, tiny_model

from behaviorlens.circuits import forward as F
from behaviorlens.circuits.graph import Graph
from behaviorlens.errors import BehaviorLensError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_graph_counts_and_names(tiny_llama):
    g = Graph.of(tiny_llama)  # 3 layers, 4 heads, 2 key/value heads
    assert (g.n_up, g.n_ports) == (1 + 3 * 5, 3 * (4 + 2 * 2 + 1) + 1)
    assert g.n_edges == int(g.valid.sum()) == len(g.edges_frame())
    # a layer-1 query reads the input and layer 0's heads and MLP, not layer 1's heads
    assert g.port_limit[g.q_port(1, 0)] == 1 + 5
    assert g.port_limit[g.mlp_port(1)] == 1 + 5 + 4  # the MLP reads its own layer's heads too
    assert g.parse_edge("L0H3->L1KV1.k") == (g.head_node(0, 3), g.k_port(1, 1))
    assert g.kv_of(3) == 1
    with pytest.raises(BehaviorLensError, match="runs backwards"):
        g.parse_edge("L1H0->L1H2.q")
    with pytest.raises(BehaviorLensError, match="not in this model"):
        g.parse_edge("L9H0->logits")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
def test_split_forward_equals_model(arch):
    m = tiny_model(arch)
    cs = tiny_family().render(m.tokenizer)  # rows of different lengths: left padding
    g = Graph.of(m)
    pos, neg = F.sides(m, cs, range(len(cs)))
    plain = F.run(m, pos, keep_outputs=True)
    assert torch.allclose(plain.metric, F.model_metric(m, pos), atol=1e-5)
    assert plain.metric.abs().max() > 1e-3
    other = F.run(m, neg, keep_outputs=True)
    assert torch.allclose(other.metric, F.model_metric(m, neg), atol=1e-5)
    # every edge kept = the plain run; every edge given the negative side's value = the negative run
    keep = F.run(m, pos, mask=torch.ones(g.n_up, g.n_ports), replace=other.outputs)
    none = F.run(m, pos, mask=torch.zeros(g.n_up, g.n_ports), replace=other.outputs)
    assert torch.allclose(keep.metric, plain.metric, atol=1e-5)
    assert torch.allclose(none.metric, other.metric, atol=1e-5)
    assert (plain.metric - other.metric).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["gpt2", "gemma2", "gpt_neox"])
def test_unsplit_families_say_why(arch):
    m = tiny_model(arch)
    with pytest.raises(BehaviorLensError, match=f"the {m.sites.arch.family} family has none"):
        F.paths_of(m)


def test_the_first_split_forward_records_the_model_s_own_keys_and_values(tiny_llama):
    """No forward of the model prepares a side: the first split forward of either side runs the
    columns both sides share and keeps their keys and values, which the model's own attention computes."""
    m = tiny_llama
    cs = tiny_family().render(m.tokenizer)
    g = Graph.of(m)
    pos, neg = F.sides(m, cs, range(len(cs)))
    assert neg.prefix is pos.prefix and not pos.prefix.recorded and pos.start > 0
    F.run(m, neg)
    assert pos.prefix.recorded
    with torch.inference_mode(), m.sites.capture_layer_calls(m.hf) as calls:
        m.hf(**pos.spec.inputs, use_cache=False)
    real = pos.spec.inputs["attention_mask"][:, :pos.start].bool()  # padding columns attend nowhere in the model
    for L in range(g.n_layers):
        for ours, theirs in ((pos.prefix.keys[L], calls.keys_values.keys[L]),
                             (pos.prefix.values[L], calls.keys_values.values[L])):
            theirs = theirs[:, :, :pos.start].transpose(1, 2)
            assert torch.allclose(ours[real], theirs[real], atol=1e-5)
    assert torch.allclose(F.run(m, pos).metric, F.model_metric(m, pos), atol=1e-5)  # a later run reads them
