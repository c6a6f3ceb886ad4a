"""A planted circuit: head A's output is head B's key input.

Edge attribution finds input -> A.v, A -> B.k and B -> logits, drops the distractor head D that
reads the same token but writes where nothing reads, the circuit keeps the behavior on pairs
that did not choose it, random circuits and the complement do not, and the weights show A -> B
as K-composition (not Q or V).

The planted model. Residual directions: e0 on every token, e1 / e2 on the slot token of the
positive / negative side, e4 on the first token. Layer 0: head A (L0H0) attends uniformly and writes e3 where it sees e1;
the distractor D (L0H2) reads the same and writes e6, which nothing reads. Layer 1: head B
(L1H0) queries with e0 and keys on e3 (A's output is B's key input), takes e4 as its value and
writes e5; the unembedding of the matching answer reads -e5. So the behavior flows
input -> A.v, A -> B.k, B -> logits; every other head and every MLP writes nothing.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from conftest import blank_llama, wrapped

from behaviorlens.analysis.report import write_report
from behaviorlens.circuits import Circuit, Graph, composition_table, edge_attribution, exact_edges
from behaviorlens.circuits import test_faithfulness as score_on_family
from behaviorlens.circuits.acdc import acdc
from behaviorlens.circuits.exact import agreement
from behaviorlens.circuits.faithfulness import CIRCUIT_ABLATIONS, controls, ranked
from behaviorlens.circuits.params import CircuitParams
from behaviorlens.circuits.run import circuit_step, run_circuit
from behaviorlens.cli import main
from behaviorlens.errors import BehaviorLensError
from behaviorlens.model import Model
from behaviorlens.params import from_step
from behaviorlens.prompts import PromptFamily

pytestmark = pytest.mark.usefixtures("one_thread")

D, HD = 64, 16
A, B, DISTRACTOR = "L0H0", "L1H0", "L0H2"


PLANTED = {
    "name": "planted", "chat": False,
    "user": "w5 w6 {{ a }} {{ s }} w7 {{ b }} w8 w9",
    "valence": {"s": {"positive": "w40", "negative": "w41"}},
    "answers": {"matching": " w50", "not_matching": " w51"},
    "rows": [{"a": "w60", "b": "w70"}, {"a": "w61 w62", "b": "w71"}, {"a": "w63", "b": "w72 w73"},
             {"a": "w64 w65 w66", "b": "w74"}],
}


def planted_family() -> PromptFamily:
    return PromptFamily.from_dict(PLANTED)


def planted_model(seed: int = 0, qk: float = 1.0, write: float = 1.0, noise: float = 0.6) -> Model:
    hf, e = blank_llama(D, noise, seed)
    with torch.no_grad():
        emb = hf.model.embed_tokens.weight
        emb[40] += 2 * e[1]
        emb[41] += 2 * e[2]
        emb[5] += 2 * e[4]
        a0, a1 = hf.model.layers[0].self_attn, hf.model.layers[1].self_attn
        # layer 0: kv head 0 (heads 0, 1) and kv head 1 (heads 2, 3) read e1; uniform attention
        for g in (0, 1):
            a0.v_proj.weight[g * HD] = e[1]
        a0.o_proj.weight[:, 0 * HD] = write * e[3]  # head A writes e3
        a0.o_proj.weight[:, 2 * HD] = write * e[6]  # the distractor writes e6
        # layer 1, head B (kv head 0): query e0, key e3 (slowly rotating dim 7), value e4, writes e5
        a1.q_proj.weight[0 * HD + 7] = qk * e[0]
        a1.k_proj.weight[7] = qk * e[3]
        a1.v_proj.weight[0] = e[4]
        a1.o_proj.weight[:, 0] = 3 * e[5]
        hf.lm_head.weight.zero_()
        hf.lm_head.weight[50] = -3 * e[5]
    return wrapped(hf, "planted")


CHAIN = ["input->L0KV0.v", f"{A}->L1KV0.k", f"{B}->logits"]


@pytest.fixture(scope="module")
def planted():
    m = planted_model()
    return m, planted_family().render(m.tokenizer)


def _distractor_edges(frame):
    return frame[(frame["upstream"] == DISTRACTOR) | (frame["edge"] == "input->L0KV1.v")]


def test_eap_finds_the_key_edge_and_drops_the_distractor(planted):
    m, cs = planted
    f = edge_attribution(m, cs).frame().sort_values("rank")
    assert set(f["edge"].head(2)) == {f"{A}->L1KV0.k", f"{B}->logits"}
    assert _distractor_edges(f)["attribution"].abs().max() < 0.05
    # EAP-IG also gets A's value input, which first-order EAP underrates through the RMSNorm
    ig = edge_attribution(m, cs, steps=4)
    assert set(ig.frame().sort_values("rank")["edge"].head(3)) == set(CHAIN)
    edges = np.arange(ig.graph.n_edges)
    exact = exact_edges(m, cs, edges, batch_size=64)
    table, stats = agreement(ig, exact, edges)
    assert stats["pearson"] > 0.99
    t = table.set_index("edge")
    assert (t.loc[CHAIN, "exact"] > 0.9).all()
    assert _distractor_edges(table)["exact"].abs().max() < 0.05


@pytest.mark.parametrize("convention", CIRCUIT_ABLATIONS)
def test_circuit_keeps_the_behavior_and_controls_do_not(planted, convention):
    m, cs = planted
    order = ranked(edge_attribution(m, cs, steps=4))
    ctl = controls(m, cs, order[:3], convention, n_random=3).set_index("circuit")["faithfulness"]
    assert ctl["circuit"] > 0.9
    assert ctl["complement"] < 0.1
    assert ctl.filter(like="random").abs().max() < 0.1


def test_composition_of_the_planted_pair(planted):
    m, _ = planted
    heads = [(L, h) for L in range(3) for h in range(4)]
    table, null = composition_table(m, heads, n_null=200)
    ab = table[(table["upstream"] == A) & (table["downstream"] == B)].iloc[0]
    assert ab["k_comp"] > 0.99 and ab["q_comp"] < 1e-6 and ab["v_comp"] < 1e-6
    assert table["k_comp"].idxmax() == ab.name
    others = table.drop(ab.name)
    assert others[["q_comp", "k_comp", "v_comp"]].to_numpy().max() < 0.01
    assert null["k_comp"].median() < 0.01


def test_run_circuit_writes_its_results_and_report(planted, tmp_path):
    m, cs = planted
    out = tmp_path / "circuit"
    runner = SimpleNamespace(model=m, exp=SimpleNamespace(train="planted", test=["planted"], seed=0),
                             contrast_set=lambda spec: cs)  # the experiment step, on the planted model
    params = from_step(CircuitParams, {"method": "eap-ig", "steps": 4, "exact_edges": 5, "acdc": 20,
                                       "acdc_threshold": 0.02})
    s = circuit_step(runner, out, params)
    s.pop("test_faithfulness_planted")
    for name in ("edges.csv", "circuit.json", "faithfulness_curve.csv", "controls.csv", "composition.csv",
                 "composition_null.csv", "head_figures.csv", "faithfulness_curve.png", "circuit_graph.png",
                 "composition.png", "head_figures.png", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(s))
    assert s["circuit_edges"] == 3 and s["faithfulness"] > 0.9 and s["random_faithfulness"] < 0.1
    assert s["test_faithfulness"]["planted"] > 0.9
    assert s["acdc_edges"] == 3 and s["acdc_faithfulness"] > 0.9  # pruned on 2 pairs, scored on the other 2
    assert s["acdc_test_faithfulness"]["planted"] > 0.9
    assert set(Circuit.load(out / "circuit_acdc.json").edges) == set(CHAIN)
    k = next(r for r in s["top_composition"] if r["kind"] == "k_comp")
    assert k["pair"] == f"{A}>{B}" and k["score"] > 0.99
    circuit = Circuit.load(out / "circuit.json")
    assert set(circuit.edges) == set(CHAIN)
    again = score_on_family(m, circuit, cs, n_random=1).set_index("circuit")["faithfulness"]
    assert again["circuit"] > 0.9
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(BehaviorLensError, match="is not a circuit.json"):
        Circuit.load(tmp_path / "bad.json")
    (tmp_path / "config.json").write_text(json.dumps({"model": {"name": "planted"}, "experiment": {"name": "t"}}))
    html = write_report(tmp_path).read_text()
    finding = html[html.index('id="finding-circuit"'):][:3000]
    assert "A circuit of 3 of 190 edges" in finding and "data:image/png" in finding


def test_cli_end_to_end(planted, tmp_path, capsys):
    """``behaviorlens circuit`` on the planted model saved to a folder and its family as a YAML file."""
    m, _ = planted
    m.hf.save_pretrained(tmp_path / "model")
    m.tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "planted.yaml").write_text(yaml.safe_dump(PLANTED))
    family = str(tmp_path / "planted.yaml")
    out = tmp_path / "out"
    code = main(["circuit", family, "--model", str(tmp_path / "model"), "--pairs", "4", "--test", family,
                 "--method", "eap-ig", "--exact-edges", "3", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "circuit: 3 of 190 edges" in printed and "on planted:" in printed
    assert set(Circuit.load(out / "circuit.json").edges) == set(CHAIN)


def test_acdc_prunes_to_the_planted_chain(planted):
    m, cs = planted
    pruned = acdc(m, cs, np.arange(190), threshold=0.02)  # every edge of the graph
    g = Graph.of(m)
    assert set(g.edge_names(*(a[pruned.edges] for a in g.edge_index))) == set(CHAIN)
    assert pruned.faithfulness > 0.9 and len(pruned.steps) == 190


def test_bad_input_says_one_line(planted):
    m, cs = planted
    with pytest.raises(BehaviorLensError, match="needs 4"):
        run_circuit(m, cs.subset(range(2)), out_dir="/nonexistent-never-written")
    with pytest.raises(BehaviorLensError, match="unknown ablation"):
        controls(m, cs, np.arange(3), "zero")
    with pytest.raises(BehaviorLensError, match="at least 1 step"):
        edge_attribution(m, cs, steps=0)
    with pytest.raises(BehaviorLensError, match="threshold must be at least 0"):
        acdc(m, cs, [0], threshold=-1)
