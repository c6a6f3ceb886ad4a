"""Constrained head-set search: which heads an edit should act in, traded against what the user
tells the model.

For an edit made from a set of heads (a knockout of the flagged tokens from the answer
position, or mean ablation at the answer position), greedy forward selection adds the head
that raises the objective most while it rises, then backward selection drops a head while
dropping raises it. The objective, on the fit split only:

    pressure removed on the fit pairs - λ × mean(context-use cost, claim-recall cost)

where a cost is the share of the margin (log p(answer) - log p(distractor)) the edit takes from
the ``fit`` part's rows the model gets right. One search per λ of a sweep gives the front of
pressure removed against context use; the chooser then judges every point on pairs and side
effects the search never read. Evaluations are memoized per head set, so the λ share them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..edits import Edit
from ..prompts.contrast import NEUTRAL
from ..scoring import behavior_metric
from ..stats import ratio_of_means
from .apply import steer

LAMBDAS = (0.0, 1.0, 4.0)  # the sweep: 0 is pressure alone
POOL = 8  # heads a search may add: the best by their own objective at its λ
MAX_HEADS = 5
FIT_PAIRS = 12
CONTEXT_ROWS = 8  # rows of each part (context use, claim recall) the cost is read on

Head = tuple[int, int]


def greedy_select(pool: Sequence[Head], objective: Callable[[frozenset], float],
                  max_size: int = MAX_HEADS) -> tuple[frozenset, list[dict]]:
    """Forward selection from the empty set (add the head that raises ``objective`` most, while
    it rises, up to ``max_size``), then backward (drop the head whose removal raises it most,
    while it rises). Returns the set and its steps."""
    chosen: frozenset = frozenset()
    best = objective(chosen)
    steps = []
    while len(chosen) < max_size:
        scored = [(objective(chosen | {h}), h) for h in pool if h not in chosen]
        if not scored:
            break
        value, head = max(scored)
        if value <= best:
            break
        chosen, best = chosen | {head}, value
        steps.append({"step": "add", "head": head, "objective": value})
    while len(chosen) > 1:
        value, head = max((objective(chosen - {h}), h) for h in chosen)
        if value <= best:
            break
        chosen, best = chosen - {head}, value
        steps.append({"step": "drop", "head": head, "objective": value})
    return chosen, steps


def heads_of(chosen: Iterable[Head]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for layer, head in sorted(chosen):
        out.setdefault(layer, []).append(head)
    return out


class SearchFigures:
    """The search's figures of an edit, per head set, memoized: pressure removed on up to
    ``FIT_PAIRS`` fit pairs and the context-use and claim-recall costs on up to ``CONTEXT_ROWS``
    right rows of each part of the fit side effects, all read in one batch (an edit of the
    answer position then recomputes one column of each row: :mod:`behaviorlens.kv_cache`)."""

    def __init__(self, model: Any, fit: Any, context: Any, recall: np.ndarray,
                 make: Callable[[dict[int, list[int]]], Edit]) -> None:
        self.model, self.make = model, make
        pairs = list(fit.pairs[:FIT_PAIRS])
        self.neutral = behavior_metric(model, pairs, NEUTRAL).numpy()
        right = behavior_metric(model, context.pairs, "positive").numpy() > 0
        self.parts = {"pressure": slice(0, len(pairs))}
        for name, rows in (("context_use", ~recall), ("claim_recall", recall)):
            keep = np.flatnonzero(rows & right)[:CONTEXT_ROWS]
            self.parts[name] = slice(len(pairs), len(pairs) + len(keep))
            pairs += [context.pairs[i] for i in keep]
        self.pairs = pairs
        self.base = self._metric()
        self.memo: dict[frozenset, dict[str, float]] = {}

    def _metric(self) -> np.ndarray:
        return behavior_metric(self.model, self.pairs, "positive", batch_size=len(self.pairs)).numpy()

    def __call__(self, chosen: frozenset) -> dict[str, float]:
        if chosen not in self.memo:
            self.memo[chosen] = self._figures(chosen)
        return self.memo[chosen]

    def _figures(self, chosen: frozenset) -> dict[str, float]:
        if not chosen:
            return {"pressure_removed": 0.0, "context_use_cost": 0.0, "claim_recall_cost": 0.0}
        with steer(self.model, self.make(heads_of(chosen))):
            moved = self.base - self._metric()
        p = self.parts["pressure"]
        out = {"pressure_removed": ratio_of_means(moved[p], self.base[p] - self.neutral)}
        for name in ("context_use", "claim_recall"):
            rows = self.parts[name]
            out[f"{name}_cost"] = max(0.0, ratio_of_means(moved[rows], self.base[rows])) if moved[rows].size else 0.0
        return out

    def objective(self, lam: float) -> Callable[[frozenset], float]:
        def value(chosen: frozenset) -> float:
            f = self(chosen)
            return f["pressure_removed"] - lam * (f["context_use_cost"] + f["claim_recall_cost"]) / 2
        return value


def search_heads(figures: SearchFigures, heads: Iterable[Head], lambdas: Sequence[float] = LAMBDAS,
                 pool: int = POOL, max_size: int = MAX_HEADS) -> pd.DataFrame:
    """One greedy search per λ over ``heads``: the front, a row per λ with the chosen heads, their
    fit figures and the search's steps."""
    heads = list(heads)
    rows = []
    for lam in lambdas:
        value = figures.objective(lam)
        ranked = sorted(heads, key=lambda h: value(frozenset([h])), reverse=True)[:pool]
        chosen, steps = greedy_select(ranked, value, max_size)
        rows.append({"lambda": lam, "heads": heads_of(chosen), "n_heads": len(chosen), **figures(chosen),
                     "objective": value(chosen),
                     "steps": "; ".join(f"{s['step']} L{s['head'][0]}H{s['head'][1]}" for s in steps),
                     "evaluations": len(figures.memo)})
    return pd.DataFrame(rows)
