"""Dataset loaders: public sycophancy/behavior datasets into a :class:`ContrastSet`.

Every loader builds a :class:`PromptFamily` in code and renders it, so chat templates, token
alignment, answer tokens and named positions are handled exactly as for a YAML family.
Dataset text enters as :class:`Verbatim` row values, never as a template.

How one dataset row becomes a contrast pair:

* **A/B datasets** (Anthropic's model-written evaluations JSONL, CAA's JSON list): a row is a
  single prompt with two answer letters, so the pair contrasts the *answer* the assistant gives,
  as in contrastive activation addition: the positive side is the question followed by the
  assistant turn ``(`` + the matching letter, the negative side the same with the not-matching
  letter. The valence slot ``choice`` is that letter (the natural place to read a steering
  vector or probe). The answer is scored at the ``(`` just before the slot, which both sides
  share, so ``measure`` reports the model's preference for the matching letter as the mean
  metric on either side, and a shift of zero by construction.
* **sycophancy-eval** (``answer.jsonl``): rows come as prompt variants of one question. The pair
  contrasts the template that asserts the incorrect answer ("I think the answer is X, but I'm
  really not sure.") with the same template asserting the correct answer; where the claim
  follows the question, the valence slot is the whole claim and the neutral side is the plain
  question (the dataset's own no-opinion variant); the assistant turn starts "The answer is",
  and matching = the incorrect answer, as in ``capitals_opinion``.
* Rows with several not-matching answers (multiple choice, e.g. philpapers) score them
  together: log p(matching) - log sum p(not matching).

Real dataset rows are rarely token-aligned (answers differ in length), so loaders render with
``require_aligned=False`` by default and the set records which pairs are unaligned.
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path
from typing import Any

from ..errors import BehaviorLensError
from .contrast import ContrastSet
from .family import PromptFamily, Verbatim

_LETTER = re.compile(r"^\s*\(?([A-Z])\)?\s*$")


def load_mwe(path: str | Path, tokenizer: Any, *, behavior: str = "sycophancy", name: str | None = None,
             chat: bool = True, require_aligned: bool = False, limit: int | None = None) -> ContrastSet:
    """Anthropic model-written evaluations JSONL: ``question``, ``answer_matching_behavior``,
    ``answer_not_matching_behavior`` (" (A)" / " (B)"). One pair per line (see module doc)."""
    path = Path(path)
    items = [(i + 1, d) for i, d in enumerate(read_jsonl(path))]
    return _ab_set(items, path, tokenizer, behavior, name or path.stem, chat, require_aligned, limit)


def load_caa(path: str | Path, tokenizer: Any, *, behavior: str = "sycophancy", name: str | None = None,
             chat: bool = True, require_aligned: bool = False, limit: int | None = None) -> ContrastSet:
    """CAA's A/B format: a JSON list of ``{question, answer_matching_behavior,
    answer_not_matching_behavior}`` with answers "(A)"/"(B)". One pair per item."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, list):
        raise BehaviorLensError(f"{path}: a CAA file is a JSON list of items")
    items = [(i, d) for i, d in enumerate(data)]
    return _ab_set(items, path, tokenizer, behavior, name or path.stem, chat, require_aligned, limit)


def load_sycophancy_eval(path: str | Path, tokenizer: Any, *, name: str | None = None,
                         assistant_prefix: str = "The answer is", require_aligned: bool = False,
                         limit: int | None = None) -> ContrastSet:
    """sycophancy-eval ``answer.jsonl``: rows ``{prompt: [{type, content}], base: {question,
    correct_answer, incorrect_answer, ...}, metadata: {prompt_template}}``. Each row whose
    template asserts ``{incorrect_answer}`` becomes one pair (see module doc); other variants
    (no opinion, "I don't think...") are skipped."""
    path = Path(path)
    rows: list[dict] = []
    template: str | None = None
    for line, d in enumerate(read_jsonl(path), start=1):
        try:
            tpl = d["metadata"]["prompt_template"]
            base = d["base"]
            kinds = [m["type"] for m in d["prompt"]]
        except (KeyError, TypeError):
            raise BehaviorLensError(
                f"{path} line {line}: needs 'prompt' (a message list), 'base' and "
                "'metadata.prompt_template'"
            ) from None
        if "{incorrect_answer}" not in tpl or "{correct_answer}" in tpl or "don't think" in tpl:
            continue
        if kinds != ["human"]:
            raise BehaviorLensError(f"{path} line {line}: expected one human message, got {kinds}")
        for key in ("question", "correct_answer", "incorrect_answer"):
            if not isinstance(base.get(key), str):
                raise BehaviorLensError(f"{path} line {line}: base needs a string {key!r}")
        if template is not None and tpl != template:
            raise BehaviorLensError(f"{path} line {line}: mixes several asserting templates")
        template = tpl
        rows.append({k: Verbatim(base[k]) for k in ("question", "correct_answer", "incorrect_answer")})
    if template is None:
        raise BehaviorLensError(f"{path}: no row asserts an incorrect answer (prompt_template with {{incorrect_answer}})")
    if template.startswith("{question}"):  # the claim follows the question: leaving it out gives the plain question
        claim = _jinja_from_format(template[len("{question}"):].replace("{incorrect_answer}", "\0"), path)
        user, valence = "{{ question }}{{ claim }}", {
            "positive": claim.replace("\0", "{{ incorrect_answer }}"),
            "negative": claim.replace("\0", "{{ correct_answer }}"), "neutral": ""}
    else:
        user = _jinja_from_format(template.replace("{incorrect_answer}", "\0"), path).replace("\0", "{{ claim }}")
        valence = {"positive": "{{ incorrect_answer }}", "negative": "{{ correct_answer }}"}
    family = PromptFamily.from_dict({
        "name": name or path.stem, "behavior": "sycophancy", "chat": True,
        "description": f"sycophancy-eval opinion pairs from {path.name}",
        "sides": {"positive": "user asserts the incorrect answer", "negative": "user asserts the correct answer"},
        "user": user, "assistant_prefix": assistant_prefix,
        "valence": {"claim": valence},
        "answers": {"matching": " {{ incorrect_answer }}", "not_matching": " {{ correct_answer }}"},
        "rows": rows[:limit],
    }, source=str(path))
    return family.render(tokenizer, require_aligned=require_aligned)


# -- helpers ------------------------------------------------------------------------------------


def _ab_set(items, path, tokenizer, behavior, name, chat, require_aligned, limit) -> ContrastSet:
    rows = []
    for where, d in items:
        if not isinstance(d, dict):
            raise BehaviorLensError(f"{path} item {where}: not an object")
        try:
            question = d["question"]
            m, n = d["answer_matching_behavior"], d["answer_not_matching_behavior"]
        except KeyError as err:
            raise BehaviorLensError(f"{path} item {where}: missing {err.args[0]!r}") from None
        if isinstance(m, list):  # some MWE files list several matching answers
            m = m[0]
        others = n[1:] if isinstance(n, list) else []  # several not-matching answers: scored together
        n = n[0] if isinstance(n, list) and n else n
        letters = [_LETTER.match(a) if isinstance(a, str) else None for a in (m, n, *others)]
        if not all(letters):
            field = "answer_matching_behavior" if not letters[0] else "answer_not_matching_behavior"
            raise BehaviorLensError(f"{path} item {where}, field {field!r}: answers must be letters like "
                                    f"' (A)', got {m!r} and {d['answer_not_matching_behavior']!r}")
        rows.append({"question": Verbatim(question.rstrip()), "matching": letters[0].group(1),
                     "not_matching": letters[1].group(1), "others": [x.group(1) for x in letters[2:]]})
    family = PromptFamily.from_dict({
        "name": name, "behavior": behavior, "chat": chat,
        "description": f"A/B pairs from {Path(path).name}: the answer letter differs",
        "sides": {"positive": "assistant picks the matching answer", "negative": "assistant picks the other answer"},
        "user": "{{ question }}", "assistant_prefix": "({{ choice }}", "answer_before": "choice",
        "valence": {"choice": {"positive": "{{ matching }}", "negative": "{{ not_matching }}"}},
        "answers": {"matching": "{{ matching }}", "not_matching": "{{ not_matching }}"},
        "rows": [{k: v for k, v in r.items() if k != "others"} for r in rows[:limit]],
    }, source=str(path))
    cset = family.render(tokenizer, require_aligned=require_aligned)
    for pair, row in zip(cset, rows):
        pair.other_answers = [tokenizer(letter, add_special_tokens=False)["input_ids"] for letter in row["others"]]
    return cset


def _jinja_from_format(template: str, path) -> str:
    """A Python format template ("{question} ...") as jinja2; literal braces are kept as text."""
    out = []
    for literal, field, spec, conv in string.Formatter().parse(template):
        out.append(literal.replace("{", "{{ '{' }}").replace("}", "{{ '}' }}") if ("{" in literal or "}" in literal) else literal)
        if field is not None:
            if not field.isidentifier():
                raise BehaviorLensError(f"{path}: unsupported template field {field!r}")
            out.append("{{ " + field + " }}")
    return "".join(out)


def read_jsonl(path: Path, empty: str = "empty dataset") -> list[dict]:
    """The JSON objects of a JSONL file, one a line; one-line errors naming the file and line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise BehaviorLensError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise BehaviorLensError(f"cannot read {path}: {err.strerror}") from None
    out = []
    for i, line in enumerate(lines, start=1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise BehaviorLensError(f"{path} line {i}: invalid JSON ({err.msg})") from None
    if not out:
        raise BehaviorLensError(f"{path}: {empty}")
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise BehaviorLensError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise BehaviorLensError(f"cannot read {path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise BehaviorLensError(f"{path} line {err.lineno}: invalid JSON ({err.msg})") from None
