"""Circuits per style on a planted two-style model: two styles share one head and differ in another.

The planted model. Residual directions: e0 on every token, e4 on the first token. Style 1's claim
token carries e1; style 2's carries e8 and a little e1. Layer 0: head A (L0H0) attends uniformly
and writes e3 where it sees e1; head C (L0H2) does the same where it sees e8. Layer 1: the shared
head B (L1H0) queries with e0 and keys on e3, takes e4 as its value and writes e5; the matching
answer's unembedding reads -e5. So style 1 runs input -> A.v, A -> B.k, B -> logits; style 2 runs
input -> C.v, C -> B.k, B -> logits, with a weaker A path beside it. The core holds B's edge to the
logits, each style's circuit adds its own head, and the matrix is asymmetric: style 1's circuit
keeps some of style 2 (through the weak A path) while style 2's keeps nothing of style 1.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import blank_llama, wrapped

from behaviorlens.analysis.report import write_report
from behaviorlens.circuits import Graph
from behaviorlens.circuits.params import CircuitParams
from behaviorlens.circuits.run import circuit_step
from behaviorlens.circuits.styles import core_and_union, edges_of, overlap, run_styles
from behaviorlens.cli import main
from behaviorlens.errors import BehaviorLensError
from behaviorlens.model import Model
from behaviorlens.params import from_step
from behaviorlens.prompts import PromptFamily

pytestmark = pytest.mark.usefixtures("one_thread")

D, HD = 64, 16
A, B, C = "L0H0", "L1H0", "L0H2"
ROWS = [{"a": "w60", "b": "w70"}, {"a": "w61 w62", "b": "w71"}, {"a": "w63", "b": "w72 w73"},
        {"a": "w64 w65 w66", "b": "w74"}, {"a": "w67", "b": "w75 w76"}, {"a": "w68 w69", "b": "w77"}]
STYLE1 = {"name": "style_one", "chat": False, "user": "w5 w6 {{ a }} {{ s }} w7 {{ b }} w8 w9",
          "valence": {"s": {"positive": "w40", "negative": "w41"}},
          "answers": {"matching": " w50", "not_matching": " w51"}, "rows": ROWS}
STYLE2 = STYLE1 | {"name": "style_two", "user": "w5 w10 {{ b }} w11 {{ s }} {{ a }} w12",
                   "valence": {"s": {"positive": "w42", "negative": "w43"}}}
CHAIN1 = {"input->L0KV0.v", f"{A}->L1KV0.k", f"{B}->logits"}
CHAIN2 = {"input->L0KV1.v", f"{C}->L1KV0.k", f"{B}->logits"}


def two_style_model(leak: float = 0.5, seed: int = 0) -> Model:
    hf, e = blank_llama(D, 0.6, seed)
    with torch.no_grad():
        emb = hf.model.embed_tokens.weight
        emb[40] += 2 * e[1]
        emb[41] += 2 * e[2]
        emb[42] += 2 * e[8] + leak * e[1]
        emb[43] += 2 * e[9]
        emb[5] += 2 * e[4]
        a0, a1 = hf.model.layers[0].self_attn, hf.model.layers[1].self_attn
        a0.v_proj.weight[0] = e[1]  # kv head 0 (heads 0, 1) reads style 1's cue
        a0.v_proj.weight[HD] = e[8]  # kv head 1 (heads 2, 3) reads style 2's
        a0.o_proj.weight[:, 0] = e[3]  # head A writes e3
        a0.o_proj.weight[:, 2 * HD] = e[3]  # head C writes e3 too
        a1.q_proj.weight[7] = e[0]  # head B: query e0, key e3, value e4, writes e5
        a1.k_proj.weight[7] = e[3]
        a1.v_proj.weight[0] = e[4]
        a1.o_proj.weight[:, 0] = 3 * e[5]
        hf.lm_head.weight.zero_()
        hf.lm_head.weight[50] = -3 * e[5]
    return wrapped(hf, "two-style")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The experiment's circuit step with ``styles``, on the planted model (as the runner calls it)."""
    m = two_style_model()
    sets = {f["name"]: PromptFamily.from_dict(f).render(m.tokenizer) for f in (STYLE1, STYLE2)}
    out = tmp_path_factory.mktemp("styles") / "circuit"
    runner = SimpleNamespace(model=m, exp=SimpleNamespace(train="style_one", test=["style_two"], seed=0),
                             contrast_set=lambda name: sets[name])
    params = from_step(CircuitParams, {"styles": ["style_two"], "size": 3 / Graph.of(m).n_edges,
                                       "method": "eap-ig", "steps": 4, "exact_edges": 5})
    s = circuit_step(runner, out, params)
    return m, s, out


def _names(m, circuit: str, out) -> set[str]:
    return set(json.loads((out / "circuits" / f"{circuit}.json").read_text())["edges"])


def test_core_holds_the_shared_head_and_each_style_adds_its_own(run):
    m, s, out = run
    assert _names(m, "style_one", out) == CHAIN1
    assert _names(m, "style_two", out) == CHAIN2
    assert _names(m, "core", out) == {f"{B}->logits"}
    assert _names(m, "union", out) == CHAIN1 | CHAIN2
    # A and the key/value head it reads through are style 1's; C and its key/value head style 2's;
    # B and its key input (which both styles write into) are shared
    assert set(s["styles"]["style_one"]["specific_heads"]) == {A, "L0KV0"}
    assert set(s["styles"]["style_two"]["specific_heads"]) == {C, "L0KV1"}
    for style in ("style_one", "style_two"):
        assert set(s["styles"][style]["shared_heads"]) == {B, "L1KV0"}
    comp = {c["pair"]: c for c in s["composition"]}
    assert comp[f"{A}>{B}"]["k_comp"] > 0.99 and comp[f"{C}>{B}"]["k_comp"] > 0.99
    assert comp[f"{A}>{B}"]["family"] == "style_one" and comp[f"{C}>{B}"]["family"] == "style_two"


def test_matrix_shows_the_asymmetry_beside_random_circuits(run):
    _, s, out = run
    st = s["styles"]
    # style 2's own three edges leave its weak A path out; the union (its specific edges plus
    # style 1's) recovers the rest
    assert st["style_one"]["own_faithfulness"] > 0.9 and 0.7 < st["style_two"]["own_faithfulness"] < 0.9
    assert st["style_two"]["union_faithfulness"] > st["style_two"]["own_faithfulness"] + 0.1
    one_on_two = st["style_two"]["best_other_faithfulness"]  # style 1's circuit on style 2's held-out pairs
    two_on_one = st["style_one"]["best_other_faithfulness"]
    assert abs(two_on_one) < 0.05 and one_on_two > 0.1
    # the core alone (B -> logits, its inputs ablated) keeps nothing
    for family in ("style_one", "style_two"):
        assert abs(st[family]["core_faithfulness"]) < 0.05
        assert st[family]["union_faithfulness"] > 0.9
        assert abs(st[family]["own_random"]) < 0.1
    assert s["overlap"]["style_one|style_two"] < 0.5
    for name in ("transfer.csv", "overlap.csv", "specific_heads.csv", "specific_edges.csv",
                 "specific_composition.csv", "curves.csv", "transfer.png", "core_graph.png", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    assert len(s["sentences"]) == 2 and A in s["sentences"][0] and C in s["sentences"][1]


def test_report_shows_the_matrix_the_core_and_one_sentence_per_style(run):
    _, s, out = run
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(s))
    (out.parent / "config.json").write_text(json.dumps({"model": {"name": "two-style"}, "experiment": {"name": "t"}}))
    html = write_report(out.parent).read_text()
    section = html[html.index('<h2 id="circuit">'):]
    assert html[html.index('id="finding-circuit"'):].count("data:image/png") >= 1
    for heading in ("One sentence per style", "The transfer matrix", "The core against the union", "The core circuit",
                    "Heads specific to a style"):
        assert heading in section, heading
    assert s["sentences"][1][:60] in section


def test_core_union_and_overlap_of_known_sets():
    core, union = core_and_union([np.array([1, 2, 3]), np.array([3, 2, 9]), np.array([2, 3])])
    assert core.tolist() == [2, 3] and union.tolist() == [1, 2, 3, 9]
    a = SimpleNamespace(edges=np.array([0, 1]), attribution=np.array([3.0, 1.0, 0.0]))
    b = SimpleNamespace(edges=np.array([0, 2]), attribution=np.array([1.0, 0.0, 1.0]))
    f = overlap({"a": a, "b": b}).set_index("circuit")
    # weights a: {0: .75, 1: .25}; b: {0: .5, 2: .5}: minima .5, maxima .75 + .25 + .5
    assert f.loc["a", "jaccard"] == pytest.approx(1 / 3)
    assert f.loc["a", "weighted_jaccard"] == pytest.approx(0.5 / 1.5)


def test_bad_input_says_one_line():
    m = two_style_model()
    one = PromptFamily.from_dict(STYLE1).render(m.tokenizer)
    with pytest.raises(BehaviorLensError, match="at least 2 families"):
        run_styles(m, [one], out_dir="/nonexistent-never-written")
    with pytest.raises(BehaviorLensError, match="appears twice"):
        run_styles(m, [one, one], out_dir="/nonexistent-never-written")
    with pytest.raises(BehaviorLensError, match=r"size must be a share of the edges in \(0, 1\], got 2"):
        edges_of(2, Graph.of(m))
    assert main(["circuit", "capitals_opinion", "pushback", "--size", "0"]) == 2
