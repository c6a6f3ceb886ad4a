"""The side-effect sets: real sizes, two disjoint halves, and no fact shared with any family."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from behaviorlens.prompts import load_family
from behaviorlens.prompts.library import builtin_names
from behaviorlens.steering import data
from behaviorlens.steering.side_effects import _half

FIXTURES = Path(__file__).parent / "fixtures"


def test_sets_have_the_promised_sizes(default_model):
    tok = default_model.tokenizer
    rows = yaml.safe_load(data.factual_family_path().read_text())["rows"]
    assert len(rows) >= 200
    for r in rows:  # single-token answer and distractor, as they follow the prompt
        assert len(tok(" " + r["answer"], add_special_tokens=False).input_ids) == 1, r
        assert len(tok(" " + r["distractor"], add_special_tokens=False).input_ids) == 1, r
    assert len(data.neutral_prompts()) >= 100
    assert len(tok(data.reference_text()).input_ids) >= 5000


def test_select_and_report_halves_are_disjoint_and_cover_everything():
    items = list(range(135))
    select, report = _half(items, "select"), _half(items, "report")
    assert not set(select) & set(report) and sorted(select + report) == items


def _subjects(question: str) -> set[str]:
    """Capitalized words of a question other than its first (the entities it asks about)."""
    return set(re.findall(r"\b[A-Z][a-z]+", question)[1:]) | set(re.findall(r"\b[A-Z]{1,2}[a-z]?\b", question))


def test_no_factual_question_is_shared_with_a_family():
    """No factual row asks about an entity a family row asks about with the same right answer,
    and no factual question appears in a family's prompt."""
    rows = yaml.safe_load(data.factual_family_path().read_text())["rows"]
    families = [load_family(n) for n in builtin_names()] + [load_family(str(p)) for p in FIXTURES.glob("*.yaml")]
    family_facts = []
    for fam in families:
        for row in fam.rows:
            text = " ".join(str(v) for v in row.values())
            family_facts.append((text, {str(v).strip() for v in row.values()}))
    for r in rows:
        assert not any(r["question"] in text for text, _ in family_facts), r
        subjects = _subjects(r["question"]) - {"What", "Which", "How", "Who", "In", "On", "The", "A", "An", "Of"}
        for text, values in family_facts:
            if r["answer"] in values:
                assert not (subjects & set(re.findall(r"\b\w+\b", text))), (r, text)


def test_detector_negatives_are_none_of_the_side_effect_requests_nor_family_prompts():
    negatives = data.detector_negatives()
    assert len(negatives) == len(set(negatives)) >= 100
    assert not set(negatives) & set(data.neutral_prompts())  # the KL limits are measured on text the detector never saw
    factual = yaml.safe_load(data.factual_family_path().read_text())["rows"]
    assert not set(negatives) & {r["question"] for r in factual}
    families = [load_family(n) for n in builtin_names()] + [load_family(str(p)) for p in FIXTURES.glob("*.yaml")]
    rows = " ".join(str(v) for fam in families for row in fam.rows for v in row.values())
    assert not [t for t in negatives if t in rows]


def _grams(text: str, n: int = 4) -> set[tuple[str, ...]]:
    words = re.findall(r"[\w']+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def test_claim_wordings_share_no_four_words_with_a_family_or_fixture():
    wordings = data.claim_wordings()
    assert len(wordings) == len(set(wordings)) >= 40 and all(w.count("{answer}") == 1 for w in wordings)
    families = [load_family(n) for n in builtin_names()] + [load_family(str(p)) for p in FIXTURES.glob("*.yaml")]
    texts = [t for fam in families for sides in fam.valence.values() for t in sides.values()]
    texts += [str(v) for fam in families for row in fam.rows for v in row.values()]
    family_grams = set().union(*map(_grams, texts))
    assert not [w for w in wordings if _grams(w.replace("{answer}", "X")) & family_grams]
