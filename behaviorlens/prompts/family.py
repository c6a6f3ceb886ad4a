"""Prompt families: jinja2 templates whose valence slots flip a prompt between two sides.

A family renders every row on both sides, and on a third, ``neutral`` side (the same prompt
without the pressure) when its slots give one. Slot text is wrapped in private-use marker
characters while the prompt is templated (chat template included), so each slot's character
span, and from the tokenizer's offsets its token span, is known exactly. The two sides must
then have the same tokens outside the slots; otherwise the pair is misaligned. The neutral
side need not align. Answers are tokenized as they follow the prompt.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from jinja2 import StrictUndefined, TemplateError, UndefinedError
from jinja2.sandbox import SandboxedEnvironment

from ..chat import has_template, render_chat
from ..errors import BehaviorLensError
from .contrast import ANSWERS, NEUTRAL, SIDES, ContrastPair, ContrastSet
from .library import builtin_path

FIELDS = {
    "name", "behavior", "description", "system", "user", "messages", "assistant_prefix", "chat",
    "valence", "answers", "rows", "grid", "sides", "answer_before",
}
_OPEN, _CLOSE = 0xE100, 0xE300  # private-use code points marking slot k: chr(_OPEN + k)
_ENV = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)


@dataclass
class PromptFamily:
    """A templated family of contrast pairs (see the README for the YAML format)."""

    name: str
    valence: dict[str, dict[str, str]]
    answers: dict[str, str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    behavior: str = "unspecified"
    description: str = ""
    system: str | None = None
    user: str | None = None
    messages: list[dict[str, str]] | None = None
    assistant_prefix: str | None = None
    chat: bool = True
    grid: dict[str, list[Any]] | None = None
    sides: dict[str, str] | None = None
    answer_before: str | None = None  # score the answer at the token before this slot
    source: str = ""

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: str | Path) -> PromptFamily:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise BehaviorLensError(f"{path}: not UTF-8 text (byte {err.start}); a family file is UTF-8 YAML") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            problem = getattr(err, "problem", None) or "invalid YAML"
            raise BehaviorLensError(f"{path}{where}: YAML syntax error: {problem}") from None
        except OSError as err:
            raise BehaviorLensError(f"cannot read family file {path}: {err.strerror}") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> PromptFamily:
        if not isinstance(data, dict):
            raise BehaviorLensError(f"{source}: a family must be a mapping of fields")
        unknown = sorted(set(data) - FIELDS)
        if unknown:
            raise BehaviorLensError(
                f"{source}: unknown field {unknown[0]!r}; fields are {', '.join(sorted(FIELDS))}"
            )
        name = data.get("name") or Path(source).stem
        for key in ("valence", "answers"):
            if not data.get(key):
                raise BehaviorLensError(f"family {name!r} ({source}): missing field {key!r}")
        if not data.get("user") and not data.get("messages"):
            raise BehaviorLensError(f"family {name!r} ({source}): needs 'user' or 'messages'")
        family = cls(**{**data, "name": name}, source=source)
        family.validate()
        return family

    def validate(self) -> None:
        where = f"family {self.name!r}"
        for slot, sides in self.valence.items():
            if not isinstance(sides, dict) or not set(SIDES) <= set(sides) <= {*SIDES, NEUTRAL}:
                raise BehaviorLensError(
                    f"{where}, slot {slot!r}: needs 'positive' and 'negative' (and optionally 'neutral')"
                )
        with_neutral = [slot for slot, sides in self.valence.items() if NEUTRAL in sides]
        if with_neutral and len(with_neutral) != len(self.valence):
            missing = next(slot for slot in self.valence if slot not in with_neutral)
            raise BehaviorLensError(
                f"{where}, slot {missing!r}: slot {with_neutral[0]!r} has a neutral side, so every "
                "slot needs one (often '')"
            )
        if set(self.answers) != set(ANSWERS):
            raise BehaviorLensError(f"{where}: answers need exactly 'matching' and 'not_matching'")
        if self.messages is not None:
            for i, m in enumerate(self.messages):
                if not isinstance(m, dict) or set(m) != {"role", "content"}:
                    raise BehaviorLensError(f"{where}, message {i}: needs 'role' and 'content'")
        templates = [self.system, self.user, self.assistant_prefix]
        templates += [m["content"] for m in self.messages or []]
        used = set()
        for t in templates:
            if t:
                used |= _variables(t, where)
        for slot in self.valence:
            if slot not in used:
                raise BehaviorLensError(f"{where}, slot {slot!r}: no template uses {{{{ {slot} }}}}")
        if self.answer_before is not None and self.answer_before not in self.valence:
            raise BehaviorLensError(f"{where}: answer_before {self.answer_before!r} is not a valence slot")
        rows = self.all_rows()
        if not rows:
            raise BehaviorLensError(f"{where}: the family is empty (no rows and no grid)")
        self._check_variables(rows, where)

    def _check_variables(self, rows: list[dict[str, Any]], where: str) -> None:
        """Every template variable must be a valence slot or a value some row defines."""
        named = {"system": self.system, "user": self.user, "assistant_prefix": self.assistant_prefix}
        named.update({f"message {i}": m["content"] for i, m in enumerate(self.messages or [])})
        for slot, sides in self.valence.items():
            named.update({f"slot {slot!r} {side}": text for side, text in sides.items()})
        named.update({f"answer {a!r}": self.answers[a] for a in ANSWERS})
        defined = set(self.valence) | {k for r in rows if isinstance(r, dict) for k in r}
        for label, template in named.items():
            if not template:
                continue
            if not isinstance(template, str):
                raise BehaviorLensError(f"{where}, {label}: must be a string, got {template!r}")
            unknown = sorted(_variables(template, where) - defined)
            if unknown:
                raise BehaviorLensError(
                    f"{where}, {label}: unknown variable {unknown[0]!r} (not a valence slot, "
                    f"and no row defines it)"
                )

    def matching_answers(self) -> list[str]:
        """The matching answer's text of every row (no tokenizer needed: for balance checks)."""
        return [_render(self.answers["matching"], _resolve(row, f"family {self.name!r}, row {i}"),
                        f"family {self.name!r}, row {i}, answer 'matching'")
                for i, row in enumerate(self.all_rows())]

    def all_rows(self) -> list[dict[str, Any]]:
        """The explicit rows, then the cross product of the grid."""
        rows = [dict(r) for r in self.rows or []]
        if self.grid:
            keys = list(self.grid)
            rows += [dict(zip(keys, combo)) for combo in itertools.product(*self.grid.values())]
        return rows

    # -- rendering -----------------------------------------------------------------------------

    @property
    def has_neutral(self) -> bool:
        """Whether the slots give a neutral (no-pressure) side."""
        return all(NEUTRAL in sides for sides in self.valence.values())

    def render(self, tokenizer: Any, require_aligned: bool = True) -> ContrastSet:
        """Render every row on both sides (and the neutral side) into a :class:`ContrastSet`.

        With ``require_aligned=False`` misaligned pairs are kept (for probing and steering) and
        the set records it, so patching refuses it.
        """
        pairs = [self._render_row(tokenizer, i, row, require_aligned) for i, row in enumerate(self.all_rows())]
        return ContrastSet(
            name=self.name,
            behavior=self.behavior,
            pairs=pairs,
            sides=self.sides or {s: s for s in SIDES},
            description=self.description,
        )

    def _render_row(self, tokenizer: Any, index: int, row: dict, require_aligned: bool) -> ContrastPair:
        where = f"family {self.name!r}, row {index}"
        variables = _resolve(row, where)
        text, tokens, spans = {}, {}, {}
        for side in (*SIDES, NEUTRAL) if self.has_neutral else SIDES:
            text[side], tokens[side], spans[side] = self._render_side(tokenizer, variables, side, where)
        answer_text = {a: _render(self.answers[a], variables, f"{where}, answer {a!r}") for a in ANSWERS}
        answers = {a: self._answer_tokens(tokenizer, text, tokens, spans, answer_text[a], f"{where}, answer {a!r}")
                   for a in ANSWERS}
        if answers["matching"] == answers["not_matching"]:
            raise BehaviorLensError(
                f"{where}: answers {answer_text['matching']!r} and {answer_text['not_matching']!r} "
                "have the same tokens, so the metric cannot tell them apart"
            )
        aligned = _alignment_problem(self.name, index, tokenizer, tokens, spans)
        if aligned is not None and require_aligned:
            raise BehaviorLensError(aligned)
        return ContrastPair(
            family=self.name,
            row=index,
            variables=variables,
            text=text,
            tokens=tokens,
            spans=spans,
            answers=answers,
            answer_text=answer_text,
            aligned=aligned is None,
        )

    def _answer_tokens(self, tokenizer: Any, text: dict, tokens: dict, spans: dict, answer: str,
                       where: str) -> list[int]:
        """The answer's tokens as they follow the prompt, the same after every side.

        An answer scored before a slot (``answer_before``) must be one token. Elsewhere the
        prompt plus the answer is tokenized and the prompt's own tokens must come first,
        unchanged; what follows them is the answer (a SentencePiece tokenizer may split an
        answer differently after the prompt than alone: the tokens in context are the ones
        scored).
        """
        alone = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if not alone:
            raise BehaviorLensError(f"{where}: {answer!r} has no tokens")
        if self.answer_before is not None:
            if len(alone) != 1:
                raise BehaviorLensError(f"{where}: an answer scored before a slot must be one token, "
                                        f"{answer!r} has {len(alone)}")
            return alone
        found = {}
        for side, prompt in text.items():
            if prompt.endswith((" ", "\n")) and answer.startswith(" "):
                raise BehaviorLensError(
                    f"{where}: the prompt ends in whitespace and the answer {answer!r} starts with "
                    "a space; drop one of them"
                )
            ids = tokens[side]
            full = tokenizer(prompt + answer, add_special_tokens=not self.chat)["input_ids"]
            if full[:len(ids)] != ids or len(full) == len(ids):
                raise BehaviorLensError(
                    f"{where}: on the {side} side the answer {answer!r} merges with the prompt's last "
                    f"token {tokenizer.decode(ids[-1:])!r}, so it cannot be scored after the prompt; "
                    "end the prompt or start the answer differently"
                )
            rest = full[len(ids):]
            if not self.chat and tokenizer.eos_token_id is not None and rest[-1:] == [tokenizer.eos_token_id] \
                    and alone[-1:] != [tokenizer.eos_token_id]:
                rest = rest[:-1]  # a tokenizer that appends EOS to every text
            found[side] = rest
        if len({tuple(v) for v in found.values()}) > 1:
            shown = ", ".join(f"{side} {[tokenizer.decode([t]) for t in v]}" for side, v in found.items())
            raise BehaviorLensError(f"{where}: {answer!r} tokenizes differently after each side ({shown})")
        return found[SIDES[0]]

    def _render_side(self, tokenizer: Any, variables: dict, side: str, where: str):
        slots = list(self.valence)
        values = dict(variables)
        for k, slot in enumerate(slots):
            inner = _render(self.valence[slot][side], variables, f"{where}, slot {slot!r}")
            values[slot] = inner if side == NEUTRAL else chr(_OPEN + k) + inner + chr(_CLOSE + k)
        messages = self._messages(values, where)
        prefix = _render(self.assistant_prefix, values, f"{where}, assistant_prefix") if self.assistant_prefix else ""
        if self.chat:
            if not has_template(tokenizer):
                raise BehaviorLensError(f"{where}: chat is true but the tokenizer has no chat template")
            marked = render_chat(tokenizer, messages)
            marked += prefix
        else:
            marked = "\n".join([m["content"] for m in messages] + ([prefix] if prefix else []))
        clean, char_spans = _strip_markers(marked, slots)
        enc = tokenizer(clean, add_special_tokens=not self.chat, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        spans: dict[str, tuple[int, int]] = {}
        for name, (a, b) in char_spans.items():
            a, b = _trim_whitespace(clean, a, b)
            inside = [i for i, (s, e) in enumerate(offsets) if s < b and e > a and e > s]
            if not inside:
                raise BehaviorLensError(f"{where}, slot {name!r}: the {side} slot text is empty")
            spans[name] = (inside[0], inside[-1] + 1)
        n = len(ids)
        spans["last"] = (n - 1, n)
        spans["answer"] = (n - 1, n)
        if self.answer_before:
            start = spans[self.answer_before][0]
            spans["answer"] = (start - 1, start)
        return clean, ids, spans

    def _messages(self, values: dict, where: str) -> list[dict[str, str]]:
        if self.messages is not None:
            return [
                {"role": m["role"], "content": _render(m["content"], values, f"{where}, message {i}")}
                for i, m in enumerate(self.messages)
            ]
        out = []
        if self.system:
            out.append({"role": "system", "content": _render(self.system, values, f"{where}, system")})
        out.append({"role": "user", "content": _render(self.user, values, f"{where}, user")})
        return out


def load_family(name_or_path: str | Path) -> PromptFamily:
    """A built-in family by name, or a family YAML file by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise BehaviorLensError(f"family file {path} does not exist")
        return PromptFamily.from_yaml(path)
    return PromptFamily.from_yaml(builtin_path(str(name_or_path)))


# -- helpers ------------------------------------------------------------------------------------


def _variables(template: str, where: str) -> set[str]:
    from jinja2 import meta

    try:
        return meta.find_undeclared_variables(_ENV.parse(template))
    except TemplateError as err:
        raise BehaviorLensError(f"{where}: template error in {template!r}: {err}") from None


def _render(template: str, values: dict, where: str) -> str:
    try:
        return _ENV.from_string(template).render(**values)
    except UndefinedError as err:
        raise BehaviorLensError(f"{where}: missing template variable ({err.message})") from None
    except TemplateError as err:
        raise BehaviorLensError(f"{where}: template error: {err}") from None


class Verbatim(str):
    """A row value used as plain text, never rendered as a template (e.g. dataset text)."""


def _resolve(row: dict, where: str) -> dict[str, Any]:
    """Row values may themselves be jinja2 templates over the other values of the row."""
    if not isinstance(row, dict):
        raise BehaviorLensError(f"{where}: a row must be a mapping, got {row!r}")
    values = dict(row)
    for _ in range(4):
        changed = False
        for k, v in values.items():
            if isinstance(v, str) and not isinstance(v, Verbatim) and "{" in v:
                new = _render(v, values, f"{where}, value {k!r}")
                changed |= new != v
                values[k] = new
        if not changed:
            break
    return values


def _trim_whitespace(text: str, a: int, b: int) -> tuple[int, int]:
    """A slot's character span without its surrounding whitespace (unless that is all of it).

    A token such as " What" that only starts with a slot's trailing space then stays outside
    the slot, so the slot's named position is its own last token.
    """
    inner = text[a:b]
    if not inner.strip():
        return a, b
    return a + len(inner) - len(inner.lstrip()), b - len(inner) + len(inner.rstrip())


def _strip_markers(marked: str, slots: list[str]) -> tuple[str, dict[str, tuple[int, int]]]:
    """Remove slot markers; return the clean text and each slot's character span."""
    out: list[str] = []
    spans: dict[str, tuple[int, int]] = {}
    open_at: dict[int, int] = {}
    seen: dict[int, int] = {}
    length = 0
    for ch in marked:
        code = ord(ch)
        if _OPEN <= code < _OPEN + len(slots):
            open_at[code - _OPEN] = length
        elif _CLOSE <= code < _CLOSE + len(slots):
            k = code - _CLOSE
            seen[k] = seen.get(k, 0) + 1
            name = slots[k] if seen[k] == 1 else f"{slots[k]}.{seen[k]}"
            spans[name] = (open_at.pop(k), length)
        else:
            out.append(ch)
            length += 1
    return "".join(out), spans


def _alignment_problem(family: str, row: int, tokenizer: Any, tokens: dict, spans: dict) -> str | None:
    """None when the sides align; otherwise a message naming family, row and slot."""
    pos, neg = tokens["positive"], tokens["negative"]
    slot_names = [k for k in spans["positive"] if k not in ("last", "answer")]
    for slot in slot_names:
        if spans["positive"][slot] != spans["negative"][slot]:
            a, b = spans["positive"][slot], spans["negative"][slot]
            return (
                f"family {family!r}, row {row}, slot {slot!r}: misaligned pair: the slot is "
                f"{a[1] - a[0]} tokens on the positive side {_show(tokenizer, pos, a)} and "
                f"{b[1] - b[0]} on the negative side {_show(tokenizer, neg, b)}; make both "
                "sides the same number of tokens"
            )
    inside = {i for s in slot_names for i in range(*spans["positive"][s])}
    if len(pos) != len(neg):
        i = next((j for j, (x, y) in enumerate(zip(pos, neg)) if x != y and j not in inside), min(len(pos), len(neg)))
    else:
        diffs = [j for j, (x, y) in enumerate(zip(pos, neg)) if x != y and j not in inside]
        if not diffs:
            return None
        i = diffs[0]
    near = max((s for s in slot_names if spans["positive"][s][0] <= i), key=lambda s: spans["positive"][s][0], default=None)
    window = (max(0, i - 3), i + 4)
    return (
        f"family {family!r}, row {row}, slot {near!r}: misaligned pair: the sides differ outside "
        f"the valence slots at token {i}: positive {_show(tokenizer, pos, window)} vs negative "
        f"{_show(tokenizer, neg, window)}"
    )


def _show(tokenizer: Any, ids: list[int], span: tuple[int, int]) -> str:
    return str([tokenizer.decode([t]) for t in ids[span[0]:span[1]]])
