"""The side-effect sets: real sizes, two disjoint halves, and no fact shared with any family."""

from __future__ import annotations

import functools
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


# -- issue 22: context use, null sentences, claims in every style ------------------------------

STYLES = {"passage", "fiction", "personal", "claim_recall"}
# held-out fixture -> the development families of the same claim style
NEW_FIXTURES = {
    "restated_varied": ["restated_claim"],
    "pushback_cited_varied": ["pushback_cited", "pushback"],
    "earlier_turn_varied": ["earlier_turn_claim"],
    "system_claim_varied": ["system_claim"],
}
NEW_DEVELOPMENT = ["restated_claim", "pushback_cited", "earlier_turn_claim", "system_claim"]


@functools.lru_cache(maxsize=1)
def _all_families() -> tuple:
    return tuple([load_family(n) for n in builtin_names()] + [load_family(str(p)) for p in FIXTURES.glob("*.yaml")])


def _answer_texts(fam) -> set[str]:
    from behaviorlens.prompts.family import _render, _resolve

    out = set()
    for i, row in enumerate(fam.all_rows()):
        values = _resolve(row, f"{fam.name} row {i}")
        out |= {_render(fam.answers[a], values, fam.name).strip() for a in ("matching", "not_matching")}
    return out


def _claim_texts(fam) -> list[str]:
    """Every row's claim as the pressured sides render it, the claimed answer replaced by X."""
    from behaviorlens.prompts.family import _render, _resolve

    out = []
    for i, row in enumerate(fam.all_rows()):
        values = _resolve({**row, "wrong": "X", "right": "X"}, f"{fam.name} row {i}")
        for sides in fam.valence.values():
            out += [_render(sides[s], values, fam.name) for s in ("positive", "negative")]
    return out


def test_context_use_set_has_four_styles_of_forty_and_renders(default_model):
    rows = yaml.safe_load(data.context_use_family_path().read_text())["rows"]
    assert len(rows) >= 160
    styles = [r["style"] for r in rows]
    assert set(styles) == STYLES and all(styles.count(s) >= 40 for s in STYLES)
    assert len({(r["context"], r["question"]) for r in rows}) == len(rows)
    for r in rows:  # the answer is in the user's own turn; the distractor is something else
        assert r["answer"].lower() in r["context"].lower() and r["answer"] != r["distractor"], r
    fam = load_family(str(data.context_use_family_path()))
    cset = fam.render(default_model.tokenizer)
    assert len(cset) == len(rows)
    for p in cset:  # one valence slot, the same text on both sides: only one side is scored
        assert p.tokens["positive"] == p.tokens["negative"] and "given" in p.spans["positive"]


def test_no_context_use_question_is_shared_with_a_family_fixture_or_detector_negative():
    rows = yaml.safe_load(data.context_use_family_path().read_text())["rows"]
    families = _all_families()
    family_text = " ".join(str(v) for fam in families for row in fam.all_rows() for v in row.values()).lower()
    factual = [r["question"] for r in yaml.safe_load(data.factual_family_path().read_text())["rows"]]
    others = [str(row["question"]) for fam in families for row in fam.all_rows() if "question" in row]
    others += factual + data.detector_negatives() + data.neutral_prompts()
    for r in rows:
        assert r["question"].lower() not in family_text, r
        asked = (r["context"] + " " + r["question"]).lower()
        assert not [q for q in others if q.lower() in asked], r
        assert r["question"] not in factual and r["question"] not in data.detector_negatives()


def test_new_fixtures_share_no_four_words_with_claim_wordings_or_development_families():
    wording_grams = set().union(*(_grams(w.replace("{answer}", "X")) for w in data.claim_wordings()))
    for fixture, developments in NEW_FIXTURES.items():
        fam = load_family(str(FIXTURES / f"{fixture}.yaml"))
        fixture_grams = set().union(*map(_grams, _claim_texts(fam)))
        assert not fixture_grams & wording_grams, (fixture, fixture_grams & wording_grams)
        for name in developments:
            dev_grams = set().union(*map(_grams, _claim_texts(load_family(name))))
            assert not fixture_grams & dev_grams, (fixture, name, fixture_grams & dev_grams)


def test_new_fixtures_ask_no_question_of_another_family_or_the_factual_control():
    factual = {r["question"] for r in yaml.safe_load(data.factual_family_path().read_text())["rows"]}
    families = _all_families()
    for fixture in NEW_FIXTURES:
        questions = {r["question"] for r in load_family(str(FIXTURES / f"{fixture}.yaml")).all_rows()}
        assert len(questions) >= 20 and not questions & factual
        for fam in families:
            if fam.name != fixture:
                assert not questions & {r.get("question") for r in fam.all_rows()}, (fixture, fam.name)


def test_new_claim_families_render_aligned_with_a_neutral_side(default_model):
    for path in [FIXTURES / f"{n}.yaml" for n in NEW_FIXTURES] + NEW_DEVELOPMENT:
        fam = load_family(str(path))
        assert fam.behavior == "sycophancy" and fam.has_neutral
        cset = fam.render(default_model.tokenizer)
        assert cset.aligned and len(cset) >= (40 if path in NEW_DEVELOPMENT else 20)
        assert len({p.text["positive"] for p in cset}) == len(cset)


def test_null_sentences_are_short_non_claims_naming_no_answer():
    sentences = data.null_sentences()
    assert len(sentences) == len(set(sentences)) == 40
    assert all(5 <= len(s.split()) <= 14 for s in sentences)
    answers = {a.lower() for fam in _all_families() if fam.behavior == "sycophancy" for a in _answer_texts(fam)
               if len(a) > 1}  # an A/B family's letters are no answer a sentence could name
    answers |= {r["answer"].lower() for r in yaml.safe_load(data.context_use_family_path().read_text())["rows"]}
    named = {s: set(re.findall(r"[\w']+", s.lower())) & answers for s in sentences}
    assert not {s: w for s, w in named.items() if w}
    wording_grams = set().union(*(_grams(w.replace("{answer}", "X")) for w in data.claim_wordings()))
    assert not [s for s in sentences if _grams(s) & wording_grams]
    assert not set(sentences) & set(data.detector_negatives())
