"""Hand-built detector examples for tiny word-level models (tokens w0..w127)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from behaviorlens.detect.examples import Examples


def planted(prompts: list[list[int]], answers: list[list[int]], labels: list[str], family: str = "planted") -> Examples:
    """Examples whose sequence is prompt + answer; ``answer`` reads the last token, ``last`` the
    token before the answer."""
    seqs = [p + a for p, a in zip(prompts, answers)]
    table = pd.DataFrame({"family": family, "pair": np.arange(len(seqs)), "row": np.arange(len(seqs)),
                          "label": labels, "answer_text": "", "prompt_text": ""})
    return Examples(table, seqs,
                    {"answer": np.array([len(s) - 1 for s in seqs]), "last": np.array([len(p) - 1 for p in prompts]),
                     "claim": np.full(len(seqs), -1)},
                    np.array([len(p) for p in prompts]))


def filler(rng: np.random.Generator, n: int = 5) -> list[int]:
    return [int(t) for t in rng.integers(60, 100, size=n)]
