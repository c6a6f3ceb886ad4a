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

from ..errors import BehaviorLensError
from ..prompts.contrast import ContrastSet
from . import forward as F
from . import split
from .faithfulness import batches_of
from .graph import Graph


@dataclass
class Pruned:
    """What ACDC kept, its faithfulness on the pairs it pruned on, and one row per visited edge."""

    edges: np.ndarray
    faithfulness: float
    steps: pd.DataFrame
    seconds: float


def acdc(model, cset: ContrastSet, candidates: Sequence[int], threshold: float = 0.01,
         convention: str = "counterfactual", pair_batch: int = 8) -> Pruned:
    """Greedy pruning of ``candidates`` (edge indices) on ``cset``, as one job (each visit needs
    the last one's result: on a traced model the loop runs inside the session); see the module doc."""
    if threshold < 0:
        raise BehaviorLensError(f"the ACDC threshold must be at least 0, got {threshold}")
    start = time.perf_counter()
    g = Graph.of(model)
    ups, ports = g.edge_index
    cand = np.asarray(candidates, dtype=int)
    order = cand[np.lexsort((-ups[cand], -ports[cand]))]  # logits first, latest upstream first
    item = (F.paths_of(model), g.shape, batches_of(model, cset, convention, pair_batch), convention, len(cset),
            [(int(ups[e]), int(ports[e])) for e in order], threshold)
    dropped, without, running, final = F.on_model(model, split.prune_job, [item], "ACDC")[0]
    kept = np.array(sorted(int(e) for e, d in zip(order, dropped) if not d), dtype=int)
    steps = pd.DataFrame({"edge": g.edge_names(ups[order], ports[order]), "faithfulness_without": without,
                          "dropped": dropped, "faithfulness": running})
    return Pruned(kept, final, steps, time.perf_counter() - start)
