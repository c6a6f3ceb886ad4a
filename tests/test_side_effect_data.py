"""The side-effect sets: real sizes, three disjoint parts by question (fit / select / report), and
no fact shared with any family."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from behaviorlens.prompts import load_family
from behaviorlens.prompts.library import builtin_names
from behaviorlens.steering import data

FIXTURES = Path(__file__).parent / "fixtures"


def test_sets_have_the_promised_sizes(default_model):
    tok = default_model.tokenizer
    rows = yaml.safe_load(data.factual_family_path().read_text())["rows"]
    assert len(rows) >= 200
    for r in rows:  # single-token answer and distractor, as they follow the prompt
        assert len(tok(" " + r["answer"], add_special_tokens=False).input_ids) == 1, r
        assert len(tok(" " + r["distractor"], add_special_tokens=False).input_ids) == 1, r
    assert len(data.neutral_prompts()) >= 204
    assert len(tok(data.reference_text()).input_ids) >= 5000


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


def test_context_use_set_has_four_styles_of_sixty_three_and_renders(default_model):
    rows = yaml.safe_load(data.context_use_family_path().read_text())["rows"]
    assert len(rows) >= 252
    styles = [r["style"] for r in rows]
    assert set(styles) == STYLES and all(styles.count(s) >= 63 for s in STYLES)
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


# -- issue 33: fit / select / report, split by question ----------------------------------------

PARTS = ("fit", "select", "report")


@pytest.fixture(scope="module")
def rendered(default_model):
    """The built-in sets as SideEffectData renders and cuts them."""
    from behaviorlens.steering.side_effects import _builtin

    tok = default_model.tokenizer
    return {"context": _builtin(tok, data.context_use_family_path()),
            "factual": _builtin(tok, data.factual_family_path()),
            "reference": list(tok(data.reference_text())["input_ids"])}


def _parts(rendered) -> dict[str, dict[str, list]]:
    """Each set's three parts: the rendered context-use and factual pairs, the requests (texts)
    and the reference chunks (token tuples)."""
    from behaviorlens.steering.side_effects import SHARES, reference_part, request_part, set_part

    out = {name: {part: list(set_part(rendered[name], part, SHARES[name])) for part in PARTS}
           for name in ("context", "factual")}
    out["requests"] = {part: request_part(data.neutral_prompts(), part) for part in PARTS}
    out["reference"] = {part: [tuple(c) for c in reference_part(rendered["reference"], part)] for part in PARTS}
    return out


def _identity(item) -> list:
    """What identifies an item of a part: its row_keys (a request is its question)."""
    from behaviorlens.steering.side_effects import row_keys

    return row_keys({"question": item}) if isinstance(item, str) else row_keys(item.variables, item.text["positive"])


def _name(item):
    """An item as a hashable name: a pair's row, a request's text, a chunk's tokens."""
    return ("row", item.row) if hasattr(item, "row") else item


def test_the_three_parts_of_every_set_are_disjoint_and_cover_it(rendered):
    ids = rendered["reference"]
    everything = {"context": [("row", p.row) for p in rendered["context"]],
                  "factual": [("row", p.row) for p in rendered["factual"]],
                  "requests": data.neutral_prompts(),
                  "reference": [tuple(ids[i:i + 256]) for i in range(0, len(ids), 256) if len(ids[i:i + 256]) > 1]}
    for name, by_part in _parts(rendered).items():
        names = {part: [_name(item) for item in items] for part, items in by_part.items()}
        assert all(names[part] for part in PARTS), name
        for a, b in [("fit", "select"), ("fit", "report"), ("select", "report")]:
            assert not set(names[a]) & set(names[b]), (name, a, b)
        assert sorted(names["fit"] + names["select"] + names["report"]) == sorted(everything[name]), name


def test_select_and_report_keep_the_sizes_their_limits_and_figures_need(rendered):
    from behaviorlens.steering.judge import CHOICE_REQUESTS

    parts = _parts(rendered)
    for part in PARTS:  # every style in every part: 21 rows each, so one row is under 5 points
        styles = [p.variables["style"] for p in parts["context"][part]]
        assert all(styles.count(s) == 21 for s in STYLES), (part, styles)
    for part in ("select", "report"):
        assert len(parts["requests"][part]) == 68 >= CHOICE_REQUESTS
        assert len(parts["factual"][part]) >= 117 and len(parts["reference"][part]) >= 9
    assert len(parts["requests"]["fit"]) == 68 and len(parts["factual"]["fit"]) >= 55


def test_no_question_crosses_splits(rendered):
    """Rows that share a context or ask the same question in other words are in one part, in
    every set."""
    from behaviorlens.steering.side_effects import part_indices, question_key, row_keys

    for name, by_part in _parts(rendered).items():
        if name == "reference":
            continue
        keys = {part: {k for item in items for k in _identity(item)} for part, items in by_part.items()}
        for a, b in [("fit", "select"), ("fit", "report"), ("select", "report")]:
            assert not keys[a] & keys[b], (name, a, b, keys[a] & keys[b])
    # the identity is more than the row: the recall question asked in four wordings is one question
    wordings = {"Which city did I name?", "Which city did I just name?", "Which city did I say?", "Which city did I guess?"}
    where = {part for part, rows in _parts(rendered)["context"].items() for p in rows if p.variables["question"] in wordings}
    assert len(where) == 1 and sum(p.variables["question"] in wordings for p in rendered["context"]) >= 10
    assert question_key("Which city did I just name?") == question_key("which city did I say") != \
        question_key("Which country did I name?")
    assert question_key("What is the chemical symbol for tin?") != question_key("What is the chemical symbol for neon?")
    # a passage asked twice, and a question asked of two passages, stay together whatever the seed
    rows = [{"context": f"Note {i}: the meeting is in room {i}.", "question": f"Where is meeting {i}?"} for i in range(30)]
    rows[1]["context"] = rows[0]["context"]
    rows[3]["question"] = "Which city did I just name?"
    rows[2]["question"] = "Which city did I say?"
    for seed in range(10):
        fit = set(part_indices([row_keys(r) for r in rows], "fit", seed=seed))
        assert {0, 1} <= fit or not {0, 1} & fit
        assert {2, 3} <= fit or not {2, 3} & fit


def test_fit_is_deterministic(rendered):
    """The same rows in every call and every process (no unseeded draw, no set or hash order)."""
    import json
    import os
    import random
    import subprocess
    import sys

    from behaviorlens.steering.side_effects import SHARES, request_part, set_part

    def fit():
        return ([p.row for p in set_part(rendered["context"], "fit", SHARES["context"])],
                [p.row for p in set_part(rendered["factual"], "fit", SHARES["factual"])],
                request_part(data.neutral_prompts(), "fit"))

    first = fit()
    random.seed(12345)
    assert fit() == first
    script = """
import json, yaml
from behaviorlens.steering import data
from behaviorlens.steering.side_effects import SHARES, part_indices, request_part, row_keys
def rows(path, name):
    rs = yaml.safe_load(path.read_text())["rows"]
    return part_indices([row_keys(r) for r in rs], "fit", SHARES[name], [r.get("style") for r in rs])
print(json.dumps([rows(data.context_use_family_path(), "context"), rows(data.factual_family_path(), "factual"),
                  request_part(data.neutral_prompts(), "fit")]))
"""
    for hash_seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": hash_seed})
        assert tuple(json.loads(out.stdout.splitlines()[-1])) == first


def test_side_effect_data_has_a_fit_part_like_select_and_report():
    from steering_helpers import planted_model, tiny_context_set, tiny_set

    from behaviorlens.steering.side_effects import SideEffectData, measure_side_effects

    model = planted_model()
    factual, context = tiny_set(model, 10, "tiny_factual"), tiny_context_set(model, 12)
    built = {part: SideEffectData(model, part, neutral=[f"w{30 + i} w{36 + i} w{84 + i}" for i in range(6)],
                                  reference=" ".join(f"w{30 + i % 60}" for i in range(1500)), factual=factual,
                                  context=context, fillers=["w70 w71"]) for part in PARTS}
    for attr, rows in [("context", lambda d: [p.row for p in d.context]), ("factual", lambda d: [p.row for p in d.factual]),
                       ("neutral", lambda d: [tuple(s) for s, _ in d.neutral]), ("reference", lambda d: [tuple(c) for c in d.reference])]:
        got = {part: rows(d) for part, d in built.items()}
        assert all(got.values()), attr
        assert len(set().union(*got.values())) == sum(map(len, got.values())), attr  # disjoint
    fit = built["fit"]
    assert fit.part == "fit" and len(fit.context) == 4 and fit.recall.sum() == 2 and len(fit.neutral) == 2
    side = measure_side_effects(model, fit, batch_size=4)
    assert len(side.context) == 4 and len(side.factual) == len(fit.factual) and np.isfinite(side.nll).all()


def test_fit_prompts_come_as_chat_prompts_with_their_kind(default_model, rendered):
    from behaviorlens.chat import render_chat
    from behaviorlens.steering.side_effects import SHARES, part_prompts, request_part, set_part

    tok = default_model.tokenizer
    prompts = part_prompts(tok)
    kinds = [k for _, k in prompts]
    assert {k: kinds.count(k) for k in set(kinds)} == {**{s: 21 for s in STYLES}, "request": 68}
    fit_rows = set_part(rendered["context"], "fit", SHARES["context"])
    assert [t for t, k in prompts if k != "request"] == [p.text["positive"] for p in fit_rows]
    assert all(t.endswith(p.variables["prefix"]) and p.variables["context"] in t for (t, _), p in zip(prompts, fit_rows))
    assert [t for t, k in prompts if k == "request"] == \
        [render_chat(tok, [{"role": "user", "content": r}]) for r in request_part(data.neutral_prompts(), "fit")]
    assert not {t for t, _ in prompts} & {t for t, _ in part_prompts(tok, "select")}


_REQUEST_WORDS = {"a", "an", "the", "of", "in", "on", "at", "to", "is", "was", "are", "be", "i", "my", "me", "we",
                  "you", "your", "what", "which", "who", "how", "do", "does", "did", "for", "and", "or", "with",
                  "by", "from", "it", "this", "that", "can", "could", "should", "would", "will", "give", "tell",
                  "make", "list", "write", "explain", "some", "good", "way", "best"}


def _close(a: str, b: str) -> bool:
    """Two requests sharing at least half their content words (function words and request verbs
    left out)."""
    x, y = ({w for w in re.findall(r"[a-z0-9']+", t.lower())} - _REQUEST_WORDS for t in (a, b))
    return len(x & y) >= 0.5 * len(x | y)


def test_no_ordinary_request_asks_what_a_detector_negative_asks_in_other_words():
    """The detector trains on its negatives: a request close to one would put the same request in
    its training and in the limits."""
    assert _close("How do I center a div in CSS?", "How do I center a div horizontally with CSS?")
    assert not [(r, n) for r in data.neutral_prompts() for n in data.detector_negatives() if _close(r, n)]
