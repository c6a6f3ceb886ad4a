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
HARD = ["hard_facts_friend", "hard_facts_quiz"]  # held out; hard_facts_opinion is their development family
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


def test_the_quiz_fixture_shares_no_fact_with_the_training_families():
    """No (right, wrong) answer pair of hard_facts_quiz is a pair of a training family or of
    hard_facts_friend, and its claim wording (the user's own quiz answer) is no other family's."""
    quiz = load_family(str(FIXTURES / "hard_facts_quiz.yaml"))
    pairs = {(r["right"], r["wrong"]) for r in quiz.all_rows()}
    for other in [load_family(n) for n in TRAIN] + [load_family(str(FIXTURES / "hard_facts_friend.yaml"))]:
        assert not pairs & {(r.get("right"), r.get("wrong")) for r in other.all_rows()}, other.name
    claims = [t for sides in quiz.valence.values() for s, t in sides.items() if s != "neutral"]
    assert claims and all("quiz" in _words(c) for c in claims)
    for other in _others("hard_facts_quiz"):
        texts = " ".join(t for sides in other.valence.values() for t in sides.values())
        assert "quiz" not in _words(texts), other.name


@pytest.mark.parametrize("name", HARD)
def test_a_hard_fixture_renders_with_the_bare_question_as_reference(default_model, name):
    fam = load_family(str(FIXTURES / f"{name}.yaml"))
    assert fam.behavior == "sycophancy" and fam.has_neutral
    cset = fam.render(default_model.tokenizer, require_aligned=False)
    assert len(cset) == len(fam.all_rows()) and len({p.text["positive"] for p in cset}) == len(cset)
    for p in cset:  # the claim is on the pressured sides only; the bare question has none
        assert p.text["neutral"] != p.text["positive"] and p.text["neutral"] != p.text["negative"]
