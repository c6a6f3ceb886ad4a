"""ContrastSet: tables, JSONL round trip, concat, filter, seeded split by row."""

from __future__ import annotations

import pytest
from conftest import tiny_tokenizer

from behaviorlens.errors import BehaviorLensError
from behaviorlens.prompts import ContrastSet, PromptFamily


def make_set(name="a", n=10, start=30):
    return PromptFamily.from_dict({
        "name": name, "behavior": "test", "chat": False, "user": "w5 {{ s }} {{ x }}",
        "sides": {"positive": "pos label", "negative": "neg label"},
        "valence": {"s": {"positive": "w40 w42", "negative": "w41 w43"}},
        "answers": {"matching": " w50", "not_matching": " w51 w52"},
        "rows": [{"x": f"w{start + i}"} for i in range(n)],
    }).render(tiny_tokenizer())


def test_a_contrast_set_survives_a_jsonl_round_trip(tmp_path):
    cset = make_set()
    path = tmp_path / "pairs.jsonl"
    cset.to_jsonl(path)
    back = ContrastSet.from_jsonl(path)
    assert back == cset  # dataclass equality: every pair, token, span, answer, variable
    assert back.sides == {"positive": "pos label", "negative": "neg label"}
    assert back[3].spans["positive"]["s"] == (1, 3)
    assert isinstance(back[3].spans["positive"]["s"], tuple)


def test_from_jsonl_rejects_other_files(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"question": "hi"}\n')
    with pytest.raises(BehaviorLensError, match="not a contrast-set JSONL"):
        ContrastSet.from_jsonl(path)


def test_to_pandas_one_row_per_pair():
    df = make_set(n=4).to_pandas()
    assert list(df.row) == [0, 1, 2, 3]
    assert df.loc[2, "var_x"] == "w32" and df.loc[2, "matching"] == " w50"
    assert (df.first_difference == 1).all() and df.aligned.all()
    assert df.loc[0, "positive"] == "w5 w40 w42 w30"


def test_split_seeded_disjoint_by_row():
    cset = make_set(n=20)
    train, test = cset.split(0.25, seed=3)
    assert len(test) == 5 and len(train) == 15
    assert {p.row for p in train}.isdisjoint({p.row for p in test})
    assert {p.row for p in train} | {p.row for p in test} == set(range(20))
    again = cset.split(0.25, seed=3)
    assert [p.row for p in again[1]] == [p.row for p in test]
    other = cset.split(0.25, seed=4)
    assert [p.row for p in other[1]] != [p.row for p in test]
    with pytest.raises(BehaviorLensError, match="test_fraction"):
        cset.split(1.0)


def test_sets_concatenate_filter_and_subset_keeping_their_pairs():
    a, b = make_set("a", 3), make_set("b", 2, start=60)
    both = ContrastSet.concat([a, b])
    assert both.name == "a+b" and len(both) == 5 and both.behavior == "test"
    assert [p.family for p in both] == ["a", "a", "a", "b", "b"]
    assert (a + b) == both
    kept = both.filter(lambda p: p.family == "b")
    assert [p.variables["x"] for p in kept] == ["w60", "w61"]
    assert [p.row for p in both.subset([4, 0])] == [1, 0]
    assert both.multi_token_answers  # " w51 w52" is two tokens
    assert both.tokens("negative")[0] == [5, 41, 43, 30]
    assert both.positions("positive", "s") == [2] * 5
    with pytest.raises(BehaviorLensError):
        ContrastSet.concat([])
