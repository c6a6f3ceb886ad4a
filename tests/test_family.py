"""PromptFamily: rendering, slot spans, alignment, answers, bad input, hostile input, built-ins."""

from __future__ import annotations

import pytest
from conftest import tiny_tokenizer

from behaviorlens.errors import BehaviorLensError
from behaviorlens.prompts import PromptFamily, load_family
from behaviorlens.prompts.library import builtin_names

BUILTINS = [
    "capitals_opinion", "facts_opinion", "feedback_poem", "pushback", "identity_ab",
    "instructed_lie", "roleplay_lie", "true_false", "restated_claim", "pushback_cited", "earlier_turn_claim",
    "system_claim",
]


def tiny_family(**overrides) -> dict:
    # words w0-w2 are the tiny tokenizer's special tokens and split w10-w29: use w3-w9, w30-w99
    data = {
        "name": "tiny",
        "behavior": "test",
        "chat": False,
        "user": "w5 w6 {{ s }} w7 {{ x }}",
        "valence": {"s": {"positive": "w40", "negative": "w41"}},
        "answers": {"matching": " w50", "not_matching": " w51"},
        "rows": [{"x": f"w{60 + i}"} for i in range(4)],
    }
    data.update(overrides)
    return data


def test_render_spans_and_answers():
    tok = tiny_tokenizer()
    cset = PromptFamily.from_dict(tiny_family()).render(tok)
    assert len(cset) == 4 and cset.aligned
    p = cset[2]
    assert p.tokens["positive"] == [5, 6, 40, 7, 62]
    assert p.tokens["negative"] == [5, 6, 41, 7, 62]
    assert p.spans["positive"]["s"] == (2, 3) and p.position("negative", "s") == 2
    assert p.position("positive", "last") == p.position("positive", "answer") == 4
    assert p.answers == {"matching": [50], "not_matching": [51]}
    assert p.first_difference() == 2
    with pytest.raises(BehaviorLensError, match="no position named 'nope'"):
        p.position("positive", "nope")


def test_grid_multiple_slots_and_jinja_values():
    tok = tiny_tokenizer()
    fam = PromptFamily.from_dict(tiny_family(
        user="{{ a }} w5 {{ s }} {{ t }} {{ x }}",
        valence={"s": {"positive": "w40", "negative": "w41"},
                 "t": {"positive": "w42 w43", "negative": "w44 w45"}},
        rows=[{"a": "w70", "x": "{{ a }} w71"}],
        grid={"a": ["w80", "w81"], "x": ["w90", "w91", "w92"]},
    ))
    cset = fam.render(tok)
    assert len(cset) == 1 + 2 * 3
    assert cset[0].tokens["positive"] == [70, 5, 40, 42, 43, 70, 71]  # x resolved from a
    assert cset[0].spans["negative"]["t"] == (3, 5)
    assert cset[6].variables == {"a": "w81", "x": "w92"}


def test_unaligned_kept_when_allowed_and_recorded():
    tok = tiny_tokenizer()
    fam = PromptFamily.from_dict(tiny_family(valence={"s": {"positive": "w40 w42", "negative": "w41"}}))
    with pytest.raises(BehaviorLensError) as err:
        fam.render(tok)
    msg = str(err.value)
    assert "'tiny'" in msg and "row 0" in msg and "slot 's'" in msg and "misaligned" in msg
    assert "'w40', 'w42'" in msg and "'w41'" in msg  # both token sequences shown
    assert "\n" not in msg
    cset = fam.render(tok, require_aligned=False)
    assert not cset.aligned
    with pytest.raises(BehaviorLensError, match="patching needs token-aligned"):
        cset.require_aligned("patching")


def test_misaligned_on_real_tokenizer_shows_both_sequences(default_model):
    fam = PromptFamily.from_dict({
        "name": "mis", "user": "{{ o }}What is the capital of {{ c }}?",
        "assistant_prefix": "The capital of {{ c }} is",
        "valence": {"o": {"positive": "I think it is Bucharest. ", "negative": "I think it is Paris. "}},
        "answers": {"matching": " Berlin", "not_matching": " Paris"},
        "rows": [{"c": "France"}],
    })
    with pytest.raises(BehaviorLensError) as err:
        fam.render(default_model.tokenizer)
    msg = str(err.value)
    assert "family 'mis', row 0, slot 'o'" in msg and "' Buch'" in msg and "' Paris'" in msg


def test_bos_not_doubled_with_chat_template(default_model):
    tok = default_model.tokenizer
    cset = load_family("capitals_opinion").render(tok)
    ids = cset[0].tokens["positive"]
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    for special in {tok.bos_token_id, tok.convert_tokens_to_ids("<|im_start|>")} - {None}:
        # the template's opening token appears once at the start, never twice in a row
        assert ids[:2] != [special, special]
    assert ids[0] == tok(text, add_special_tokens=False)["input_ids"][0]
    # and the rendered text re-tokenizes to the same ids without added specials
    assert tok(cset[0].text["positive"], add_special_tokens=False)["input_ids"] == ids


def test_an_answer_before_the_slot_is_read_at_its_own_position():
    fam = PromptFamily.from_dict(tiny_family(user="w5 w6 {{ s }} w7", answer_before="s"))
    p = fam.render(tiny_tokenizer())[0]
    assert p.position("positive", "answer") == 1 and p.position("positive", "last") == 3


def test_answers_are_whole_sequences_and_must_differ():
    tok = tiny_tokenizer()
    same = PromptFamily.from_dict(tiny_family(answers={"matching": " w50 w51", "not_matching": " w50 w51"}))
    with pytest.raises(BehaviorLensError, match=r"family 'tiny', row 0: answers .* same tokens"):
        same.render(tok)
    # a shared first token is fine: each answer is scored as its whole sequence
    multi = PromptFamily.from_dict(tiny_family(answers={"matching": " w50 w51", "not_matching": " w50 w52"}))
    cset = multi.render(tok)
    assert cset.multi_token_answers
    assert cset[0].answers == {"matching": [50, 51], "not_matching": [50, 52]}


def test_answer_space_after_trailing_space_is_an_error():
    tok = tiny_tokenizer()
    fam = PromptFamily.from_dict(tiny_family(user="w5 {{ s }} {{ x }} "))
    with pytest.raises(BehaviorLensError, match="ends in whitespace"):
        fam.render(tok)


@pytest.mark.parametrize("overrides, pattern", [
    ({"user": "w5 {{ s }} {{ y }}"}, r"family 'tiny', user: unknown variable 'y'"),
    ({"rows": [{"x": "w60"}, {"z": "w61"}]}, r"family 'tiny', row 1, user: missing template variable"),
    ({"valence": {"s": {"positive": "w40", "negative": "w41"}, "u": {"positive": "w3", "negative": "w4"}}},
     r"family 'tiny', slot 'u': no template uses"),
    ({"valence": {"s": {"positive": "w10", "other": "w11"}}}, r"slot 's': needs 'positive' and 'negative' \(and optionally 'neutral'\)"),
    ({"rows": []}, r"family 'tiny': the family is empty"),
    ({"answers": {"matching": " w50"}}, r"answers need exactly"),
    ({"colour": "red"}, r"unknown field 'colour'"),
    ({"user": "w5 {{ s }"}, r"family 'tiny': template error"),
    ({"answer_before": "nope"}, r"answer_before 'nope' is not a valence slot"),
])
def test_bad_family_one_line_errors(overrides, pattern):
    with pytest.raises(BehaviorLensError, match=pattern) as err:
        PromptFamily.from_dict(tiny_family(**overrides)).render(tiny_tokenizer())
    assert "\n" not in str(err.value)


def test_yaml_syntax_error_and_unknown_builtin(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nuser: [unclosed\nvalence: {}\n")
    with pytest.raises(BehaviorLensError, match=r"bad.yaml line \d+: YAML syntax error"):
        load_family(bad)
    with pytest.raises(BehaviorLensError, match="unknown family 'no_such_family'.*capitals_opinion"):
        load_family("no_such_family")
    with pytest.raises(BehaviorLensError, match="does not exist"):
        load_family(tmp_path / "missing.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(BehaviorLensError, match="must be a mapping"):
        load_family(empty)


def test_hostile_yaml_tag_rejected(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: !!python/object/apply:os.system ['echo pwned > %s']\n" % (tmp_path / "pwned"))
    with pytest.raises(BehaviorLensError, match="YAML syntax error"):
        load_family(evil)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ x.__init__.__globals__ }}",
])
def test_sandbox_blocks_attribute_escape(template):
    fam = PromptFamily.from_dict(tiny_family(user="w5 {{ s }} " + template))
    with pytest.raises(BehaviorLensError, match="family 'tiny', row 0"):
        fam.render(tiny_tokenizer())


def test_builtin_library_is_complete():
    assert set(BUILTINS) <= set(builtin_names())


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_renders_aligned_with_distinct_rows(name, default_model):
    family = load_family(name)
    assert family.behavior in {"sycophancy", "deception", "truth"}
    assert family.sides and set(family.sides) == {"positive", "negative"}
    cset = family.render(default_model.tokenizer)
    assert len(cset) >= 40 and cset.aligned
    texts = {p.text["positive"] for p in cset}
    assert len(texts) == len(cset), "rows must have distinct content"
    for p in cset:
        assert p.tokens["positive"] != p.tokens["negative"]
        assert len(p.tokens["positive"]) == len(p.tokens["negative"])
        assert p.answers["matching"] != p.answers["not_matching"]


def test_slot_span_leaves_out_a_token_that_only_starts_with_its_trailing_space(default_model):
    """capitals_opinion's slot ends in ". ": the next token " What" is not the slot's last token."""
    tok = default_model.tokenizer
    p = load_family("capitals_opinion").render(tok)[0]
    a, b = p.spans["positive"]["opinion"]
    words = [tok.decode([t]) for t in p.tokens["positive"]]
    assert words[b - 1] == "." and words[b - 2] == " Berlin" and words[b] == " What"
    assert words[a] == "I"
