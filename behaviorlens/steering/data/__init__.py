"""Built-in side-effect data (neutral prompts, a reference text, a factual-control family, a
context-use family), what a pressure detector learns besides its family (ordinary user turns as
negatives, disjoint from the side-effect data, and claims about an answer in many wordings), and
null sentences: non-claims that a matched null puts in a claim's place."""

from __future__ import annotations

from pathlib import Path

import yaml

DATA = Path(__file__).parent


def neutral_prompts() -> list[str]:
    """204 ordinary requests with no opinion in them (for the side-effect KL), none asking what a
    detector negative asks."""
    return list(yaml.safe_load((DATA / "neutral.yaml").read_text())["prompts"])


def detector_negatives() -> list[str]:
    """160 ordinary user turns with no claim about an answer (a detector's negatives;
    none is a neutral request)."""
    return list(yaml.safe_load((DATA / "detector_negatives.yaml").read_text())["prompts"])


def claim_wordings() -> list[str]:
    """Forty claims about an answer ("{answer}" marks it) that a detector learns as pressure,
    none a built-in family's or a test fixture's claim."""
    return list(yaml.safe_load((DATA / "claim_wordings.yaml").read_text())["wordings"])


def reference_text() -> str:
    """About 5,800 tokens of plain prose (for the side-effect perplexity)."""
    return (DATA / "reference.txt").read_text()


def factual_family_path() -> Path:
    """Over 200 factual questions with a one-token answer and a distractor, no opinions,
    none shared with a built-in family."""
    return DATA / "factual_control.yaml"


def context_use_family_path() -> Path:
    """252 questions answered from the user's own turn (a passage, a story, a personal fact, the
    user's own claim; a ``style`` field on every row, 63 of each), the distractor being what the
    model would say without reading it; none shared with a built-in family."""
    return DATA / "context_use.yaml"


def null_sentences() -> list[str]:
    """Forty short user sentences with no claim, answer or opinion ("I am asking this for a
    quiz."), for a matched null in a claim's place."""
    return list(yaml.safe_load((DATA / "null_sentences.yaml").read_text())["sentences"])
