"""ACDC-style greedy pruning (Conmy et al. 2023), over a candidate set of edges.

Start from the candidate edges (all edges, or the top ones by attribution); visit ports from the
logits back to the input (reverse topological order) and, at each port, its incoming edges from
the latest upstream node back; drop an edge when dropping it lowers faithfulness (see
:mod:`.faithfulness`) by less than ``threshold``, keep it otherwise. Each visit is one masked
forward of every pair, so pruning ``n`` candidates costs ``n`` forwards: on a CPU, a candidate set
of a few hundred edges, not the whole graph.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..errors import BehaviorLensError
from ..prompts.contrast import ContrastSet
from .faithfulness import Evaluator, mask_of


@dataclass
class Pruned:
    """What ACDC kept, its faithfulness on the pairs it pruned on, and one row per visited edge."""

    edges: np.ndarray
    faithfulness: float
    steps: pd.DataFrame
    seconds: float


def acdc(model, cset: ContrastSet, candidates: Sequence[int], threshold: float = 0.01,
         convention: str = "counterfactual", pair_batch: int = 8, progress: bool = False) -> Pruned:
    """Greedy pruning of ``candidates`` (edge indices) on ``cset``; see the module doc."""
    if threshold < 0:
        raise BehaviorLensError(f"the ACDC threshold must be at least 0, got {threshold}")
    start = time.perf_counter()
    ev = Evaluator(model, cset, convention, pair_batch)
    g = ev.g
    ups, ports = g.edge_index
    cand = np.asarray(candidates, dtype=int)
    order = cand[np.lexsort((-ups[cand], -ports[cand]))]  # logits first, latest upstream first
    keep = set(cand.tolist())
    current = ev.faithfulness(mask_of(g, sorted(keep)))
    rows = []
    for e in tqdm(order, desc="ACDC", disable=not progress):
        keep.discard(int(e))
        trial = ev.faithfulness(mask_of(g, sorted(keep)))
        dropped = current - trial < threshold
        if dropped:
            current = trial
        else:
            keep.add(int(e))
        rows.append({"edge": g.edge_names(ups[[e]], ports[[e]])[0], "faithfulness_without": trial,
                     "dropped": bool(dropped), "faithfulness": current})
    return Pruned(np.array(sorted(keep), dtype=int), current, pd.DataFrame(rows), time.perf_counter() - start)
