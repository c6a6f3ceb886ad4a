"""What every detector's training shares: blocks of pairs for cross-validation, the minimum
examples per class, and the states as probing's activations."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from ..errors import BehaviorLensError
from ..probing.activations import Activations
from .examples import SITE, Examples


def balanced_groups(labels: np.ndarray, pairs: np.ndarray, seed: int = 0) -> np.ndarray:
    """Block ids: every pair in one block, every block with at least one label-1 and one label-0
    example where the pairs allow it (one block per pair holding a minority-class example)."""
    labels, pairs = np.asarray(labels), np.asarray(pairs)
    pair_ids = np.unique(pairs)
    minority = 1 if (labels == 1).sum() <= (labels == 0).sum() else 0
    has_minority = np.array([np.any(labels[pairs == p] == minority) for p in pair_ids])
    rng = np.random.default_rng(seed)
    seeds = rng.permutation(pair_ids[has_minority])
    rest = rng.permutation(pair_ids[~has_minority])
    if len(seeds) == 0:
        return pd.factorize(pairs)[0]
    block = {int(p): i for i, p in enumerate(seeds)}
    block.update({int(p): i % len(seeds) for i, p in enumerate(rest)})
    return np.array([block[int(p)] for p in pairs], dtype=np.int64)


MIN_EXAMPLES = 4  # per class: folds of blocks with both classes, three of them in every outer training split


def require_both_classes(y: np.ndarray, examples: Examples) -> None:
    """Refuse training data with fewer than :data:`MIN_EXAMPLES` lies or not-lies, naming the families."""
    n_lie, n_honest = int((y == 1).sum()), int((y == 0).sum())
    if min(n_lie, n_honest) < MIN_EXAMPLES:
        families = ", ".join(sorted(examples.table["family"].unique()))
        raise BehaviorLensError(
            f"detect train needs at least {MIN_EXAMPLES} lie and {MIN_EXAMPLES} honest examples; {families} give "
            f"{n_lie} lie and {n_honest} honest; add families or lower the margin")


def as_activations(states: dict[str, np.ndarray], y: np.ndarray, groups: np.ndarray, layers: Sequence[int],
                   positions: Sequence[str]) -> Activations:
    """Detector states (position -> [n, layers, d]) as probing's :class:`Activations`."""
    return Activations(data={(SITE, p): torch.from_numpy(states[p]) for p in positions},
                       labels=torch.as_tensor(y, dtype=torch.long), pair_ids=torch.as_tensor(groups, dtype=torch.long),
                       layers=list(layers))
