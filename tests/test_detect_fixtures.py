"""The held-out families of hard questions (issue 31, item 4): the lie detector's test families
that supply honest mistakes ask nothing another family, the side-effect data or a detector
negative asks, and render with the bare question as their reference."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from behaviorlens.prompts import load_family
from behaviorlens.prompts.library import builtin_names
from behaviorlens.steering import data

FIXTURES = Path(__file__).parent / "fixtures"
HARD = ["hard_facts_friend", "hard_facts_quiz", "facts_mentor"]  # held out; hard_facts_opinion is their development family
TRAIN = ["capitals_opinion", "pushback", "hard_facts_opinion"]  # the readout detectors' training families


def _others(name: str) -> list:
    return [load_family(n) for n in builtin_names()] + [load_family(str(p)) for p in FIXTURES.glob("*.yaml")
                                                         if p.stem != name]


def _words(text: str) -> list[str]:
    return re.findall(r"[\w']+", text.lower())


@pytest.mark.parametrize("name", HARD)
def test_a_hard_fixture_asks_no_question_asked_elsewhere(name):
    fam = load_family(str(FIXTURES / f"{name}.yaml"))
    questions = {r["question"] for r in fam.all_rows()}
    assert len(questions) == len(fam.all_rows()) >= 20
    for other in _others(name):
        assert not questions & {r.get("question") for r in other.all_rows()}, other.name
    factual = yaml.safe_load(data.factual_family_path().read_text())["rows"]
    context = yaml.safe_load(data.context_use_family_path().read_text())["rows"]
    assert not questions & {r["question"] for r in factual + context}
    assert not questions & set(data.detector_negatives())


# held-out family -> the word its claim style goes by, and whether no other family's rows fill
# that word into a claim either (authority_varied's rows name "the quiz"; "teacher", "tutor" and
# "textbook" fill other families' claims, so facts_mentor's word is "mentor")
CLAIM_WORDS = {"hard_facts_quiz": ("quiz", False), "facts_mentor": ("mentor", True)}


@pytest.mark.parametrize("name", CLAIM_WORDS)
def test_a_held_out_fixture_shares_no_fact_with_the_training_families(name):
    """No (right, wrong) answer pair of the family is a pair of a training family or of another
    held-out family, no right answer is a training family's right answer, and its claim wording
    is no other family's."""
    word, nor_in_rows = CLAIM_WORDS[name]
    fam = load_family(str(FIXTURES / f"{name}.yaml"))
    pairs = {(r["right"], r["wrong"]) for r in fam.all_rows()}
    train = [load_family(n) for n in TRAIN]
    for other in train + [load_family(str(FIXTURES / f"{n}.yaml")) for n in HARD if n != name]:
        assert not pairs & {(r.get("right"), r.get("wrong")) for r in other.all_rows()}, other.name
    rights = {str(r["right"]).lower() for r in fam.all_rows()}
    assert not rights & {str(r.get("right")).lower() for other in train for r in other.all_rows()}
    claims = [t for sides in fam.valence.values() for s, t in sides.items() if s != "neutral"]
    assert claims and all(word in _words(c) for c in claims)
    for other in _others(name):
        texts = " ".join(t for sides in other.valence.values() for t in sides.values())
        if nor_in_rows:
            texts += " " + " ".join(str(v) for r in other.all_rows() for v in r.values())
        assert word not in _words(texts), other.name


@pytest.mark.parametrize("name", HARD)
def test_a_hard_fixture_renders_with_the_bare_question_as_reference(default_model, name):
    fam = load_family(str(FIXTURES / f"{name}.yaml"))
    assert fam.behavior == "sycophancy" and fam.has_neutral
    cset = fam.render(default_model.tokenizer, require_aligned=False)
    assert len(cset) == len(fam.all_rows()) and len({p.text["positive"] for p in cset}) == len(cset)
    for p in cset:  # the claim is on the pressured sides only; the bare question has none
        assert p.text["neutral"] != p.text["positive"] and p.text["neutral"] != p.text["negative"]
