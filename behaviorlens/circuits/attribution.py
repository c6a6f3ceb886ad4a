"""Edge attribution: EAP (gradient x activation difference) and EAP-IG, for every edge at once.

An edge's *effect* is how far the behavior metric falls when that one edge carries the other
side's value: ``m(positive) - m(positive, edge u->p given u's negative-side output)``; positive =
the edge carries the behavior. EAP estimates it to first order for all edges from one split
forward of each side and one backward: ``(a_u(pos) - a_u(neg)) . d m / d input(p)``, summed over
positions. EAP-IG (``steps=k``) averages the gradient over k runs whose input embedding is
interpolated from the negative to the positive side at ``(i + 1/2) / k``. Values are ratios of
means over pairs: the summed effect over the summed shift ``m(positive) - m(negative)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..batching import chunks, rows_within
from ..errors import BehaviorLensError
from ..prompts.contrast import ContrastSet
from . import forward as F
from . import split
from .graph import Graph

CI_EDGES = 500  # edges (by |value|) that get a bootstrap CI


@dataclass
class EdgeScores:
    """Per edge and pair: the estimated (or exact) effect, in metric units; per pair: the shift."""

    graph: Graph
    effect: np.ndarray  # [n_edges, pairs]
    shift: np.ndarray  # [pairs] m(positive) - m(negative)
    method: str
    family: str = ""

    @property
    def values(self) -> np.ndarray:
        """Each edge's effect as a share of the shift (ratio of means over pairs)."""
        return self.effect.sum(1) / self.shift.sum()

    def frame(self, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
        """One row per edge: names, layers, ``attribution`` and (top edges) a bootstrap CI over pairs."""
        f = self.graph.edges_frame()
        f["attribution"] = self.values
        f["rank"] = (-np.abs(f["attribution"])).rank(method="first").astype(int)
        lo = np.full(len(f), np.nan)
        hi = np.full(len(f), np.nan)
        top = np.argsort(-np.abs(self.values))[:CI_EDGES]
        n = self.effect.shape[1]
        if n > 1:
            draws = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
            weights = np.stack([np.bincount(d, minlength=n) for d in draws]).T  # [pairs, boot]
            with np.errstate(divide="ignore", invalid="ignore"):
                boot = (self.effect[top] @ weights) / (self.shift @ weights)
            lo[top], hi[top] = np.nanquantile(boot, 0.025, axis=1), np.nanquantile(boot, 0.975, axis=1)
        f["ci_low"], f["ci_high"] = lo, hi
        return f


def edge_attribution(model, cset: ContrastSet, steps: int = 1, pair_batch: int = 8,
                     progress: bool = False) -> EdgeScores:
    """EAP (``steps=1``) or EAP-IG (``steps=k``) of every edge over every pair of ``cset``: per
    chunk of pairs, a split forward of each side and one backward per step (:func:`.split.attribution_job`).
    Chunks hold ``pair_batch`` pairs, or fewer where the model's memory budget holds fewer."""
    if steps < 1:
        raise BehaviorLensError(f"EAP-IG needs at least 1 step, got {steps}")
    if len(cset) == 0:
        raise BehaviorLensError(f"set {cset.name!r} has no pairs")
    g = Graph.of(model)
    paths = F.paths_of(model)
    model.hf.eval()
    pair_batch = rows_within(pair_batch, 3 * F.row_bytes(model, cset), model.memory_budget())
    parts = [list(c) for c in chunks(len(cset), pair_batch)]
    items = [(paths, g.shape, *F.pair_specs(model, cset, pairs)[:2], steps, len(pairs)) for pairs in parts]
    results = F.on_model(model, split.attribution_job, items, "edge attribution",
                         returned=[g.n_edges * len(pairs) * 4 for pairs in parts], progress=progress)
    effect = np.zeros((g.n_edges, len(cset)))
    shift = np.zeros(len(cset))
    for pairs, (per_pair, pair_shift) in zip(parts, results):
        effect[:, pairs] = per_pair.numpy()
        shift[pairs] = pair_shift.numpy()
    return EdgeScores(g, effect, shift, "eap" if steps == 1 else f"eap-ig{steps}", cset.name)
