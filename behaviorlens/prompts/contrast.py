"""Contrast pairs and sets: both sides of every prompt, token ids, named positions, answers."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import BehaviorLensError
from ..io import atomic_write_text

SIDES = ("positive", "negative")  # the two token-aligned sides
NEUTRAL = "neutral"  # the optional no-pressure side: not aligned, never a patching source
ANSWERS = ("matching", "not_matching")


@dataclass
class ContrastPair:
    """One row of a family rendered on both sides (and on the neutral side, when it has one).

    ``spans[side][name]`` is a half-open token range ``[start, end)`` for each named position:
    every valence slot, ``last`` (the final prompt token) and ``answer`` (the token whose
    logits predict the answer; the final prompt token). The neutral side, when present, has
    only ``last`` and ``answer``. ``answers`` are token ids as they follow the prompt;
    ``other_answers`` are further not-matching answers (multiple-choice rows), scored together
    with ``not_matching``.
    """

    family: str
    row: int
    variables: dict[str, Any]
    text: dict[str, str]
    tokens: dict[str, list[int]]
    spans: dict[str, dict[str, tuple[int, int]]]
    answers: dict[str, list[int]]
    answer_text: dict[str, str]
    aligned: bool = True
    other_answers: list[list[int]] = field(default_factory=list)

    @property
    def has_neutral(self) -> bool:
        return NEUTRAL in self.tokens

    def position(self, side: str, name: str) -> int:
        """Token index of a named position: the last token of its span."""
        try:
            return self.spans[side][name][1] - 1
        except KeyError:
            known = ", ".join(self.spans[side])
            raise BehaviorLensError(
                f"family {self.family!r}, row {self.row}: no position named {name!r} "
                f"(positions: {known})"
            ) from None

    def span(self, side: str, name: str) -> tuple[int, int]:
        self.position(side, name)  # validates the name
        return tuple(self.spans[side][name])  # type: ignore[return-value]

    def first_difference(self) -> int:
        """First token index where the two sides differ (their length if they never do)."""
        a, b = self.tokens["positive"], self.tokens["negative"]
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return i
        return min(len(a), len(b))


@dataclass
class ContrastSet:
    """The rendered pairs of one family (or several, concatenated)."""

    name: str
    behavior: str
    pairs: list[ContrastPair]
    sides: dict[str, str] = field(default_factory=lambda: {s: s for s in SIDES})
    description: str = ""

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self) -> Iterator[ContrastPair]:
        return iter(self.pairs)

    def __getitem__(self, i: int) -> ContrastPair:
        return self.pairs[i]

    @property
    def aligned(self) -> bool:
        """True when every pair's sides have the same length and differ only in valence slots."""
        return all(p.aligned for p in self.pairs)

    @property
    def multi_token_answers(self) -> bool:
        """True when some answer has several tokens (answers are then scored whole)."""
        return needs_whole(self.pairs)

    @property
    def has_neutral(self) -> bool:
        """True when every pair has a neutral (no-pressure) side."""
        return bool(self.pairs) and all(p.has_neutral for p in self.pairs)

    def require_aligned(self, purpose: str) -> None:
        """Raise a clear error when ``purpose`` needs token-aligned pairs and these are not."""
        bad = [p.row for p in self.pairs if not p.aligned]
        if bad:
            raise BehaviorLensError(
                f"{purpose} needs token-aligned pairs, but set {self.name!r} was rendered with "
                f"require_aligned=False and rows {bad[:5]} are unaligned"
            )

    def tokens(self, side: str) -> list[list[int]]:
        return [p.tokens[side] for p in self.pairs]

    def positions(self, side: str, name: str) -> list[int]:
        return [p.position(side, name) for p in self.pairs]

    # -- building new sets -------------------------------------------------------------------

    def filter(self, keep: Callable[[ContrastPair], bool]) -> ContrastSet:
        return replace(self, pairs=[p for p in self.pairs if keep(p)])

    def subset(self, indices: Iterable[int]) -> ContrastSet:
        return replace(self, pairs=[self.pairs[i] for i in indices])

    def split(self, test_fraction: float = 0.5, seed: int = 0) -> tuple[ContrastSet, ContrastSet]:
        """Seeded train/test split by pair (both sides of a pair stay together)."""
        if not 0 < test_fraction < 1:
            raise BehaviorLensError(f"test_fraction must be in (0, 1), got {test_fraction}")
        order = list(range(len(self.pairs)))
        random.Random(seed).shuffle(order)
        n_test = max(1, round(len(order) * test_fraction))
        test = sorted(order[:n_test])
        train = sorted(order[n_test:])
        return self.subset(train), self.subset(test)

    @classmethod
    def concat(cls, sets: Iterable[ContrastSet], name: str | None = None) -> ContrastSet:
        sets = list(sets)
        if not sets:
            raise BehaviorLensError("cannot concatenate an empty list of contrast sets")
        behaviors = {s.behavior for s in sets}
        return cls(
            name=name or "+".join(s.name for s in sets),
            behavior=behaviors.pop() if len(behaviors) == 1 else "mixed",
            pairs=[p for s in sets for p in s.pairs],
            sides=sets[0].sides,
        )

    def __add__(self, other: ContrastSet) -> ContrastSet:
        return ContrastSet.concat([self, other])

    # -- files and tables --------------------------------------------------------------------

    def to_pandas(self) -> pd.DataFrame:
        """One row per pair: family, row, both texts, answers, lengths, alignment."""
        return pd.DataFrame(
            [
                {
                    "family": p.family,
                    "row": p.row,
                    "positive": p.text["positive"],
                    "negative": p.text["negative"],
                    "neutral": p.text.get(NEUTRAL),
                    "matching": p.answer_text["matching"],
                    "not_matching": p.answer_text["not_matching"],
                    "tokens": len(p.tokens["positive"]),
                    "first_difference": p.first_difference(),
                    "aligned": p.aligned,
                    **{f"var_{k}": v for k, v in p.variables.items()},
                }
                for p in self.pairs
            ]
        )

    def to_jsonl(self, path: str | Path) -> None:
        """Write a header line (the set) and one line per pair."""
        header = {"name": self.name, "behavior": self.behavior, "sides": self.sides,
                  "description": self.description}
        lines = [json.dumps({"contrast_set": header})]
        lines += [json.dumps(asdict(p)) for p in self.pairs]
        atomic_write_text(path, "\n".join(lines) + "\n")

    @classmethod
    def from_jsonl(cls, path: str | Path) -> ContrastSet:
        lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
        try:
            header = json.loads(lines[0])["contrast_set"]
            pairs = []
            for ln in lines[1:]:
                d = json.loads(ln)
                d["spans"] = {s: {k: tuple(v) for k, v in sp.items()} for s, sp in d["spans"].items()}
                pairs.append(ContrastPair(**d))
        except (IndexError, KeyError, TypeError, ValueError) as err:
            raise BehaviorLensError(f"{path}: not a contrast-set JSONL file ({err})") from None
        return cls(pairs=pairs, **header)


def needs_whole(pairs: Sequence) -> bool:
    """Whether some answer of these pairs has several tokens (then every answer is scored whole)."""
    return any(len(ids) > 1 for p in pairs for ids in [*p.answers.values(), *p.other_answers])
