"""Built-in side-effect data: neutral prompts, a reference text and a factual-control family."""

from __future__ import annotations

from pathlib import Path

import yaml

DATA = Path(__file__).parent


def neutral_prompts() -> list[str]:
    """Over a hundred ordinary requests with no opinion in them (for the side-effect KL)."""
    return list(yaml.safe_load((DATA / "neutral.yaml").read_text())["prompts"])


def reference_text() -> str:
    """About 5,800 tokens of plain prose (for the side-effect perplexity)."""
    return (DATA / "reference.txt").read_text()


def factual_family_path() -> Path:
    """Over 200 factual questions with a one-token answer and a distractor, no opinions,
    none shared with a built-in family."""
    return DATA / "factual_control.yaml"
