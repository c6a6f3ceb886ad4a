"""Circuits from edge scores, and how much of the behavior they keep.

A circuit is a set of edges. Running it means the positive side with every edge *outside* it
carrying a replacement value instead of its own (each port's input is rebuilt edge by edge, see
:mod:`.forward`). Replacement conventions, all acting only at or after the pair's first
differing token (earlier columns are the same tokens on both sides and keep their own values):

- ``counterfactual`` (default): the upstream node's output on the same pair's negative side;
- ``mean``: its mean over the negative sides of all pairs, columns aligned from the end;
- ``resample``: its output on another pair's negative side (a fixed derangement within each
  batch of pairs), columns aligned from the end (where that prompt is shorter: the mean).

*Faithfulness* is ``sum(m(circuit) - m(empty)) / sum(m(positive) - m(empty))`` over pairs (a
ratio of means): 1 = the circuit keeps the whole behavior, 0 = no more than with every edge
replaced. Under ``counterfactual``, ``m(empty)`` is the negative side's metric exactly. Under
``mean`` and ``resample`` the replaced columns lose the question too, not only the claim: check
``metric_empty`` in the controls table (on capitals_opinion it lies *above* the positive side's
metric, so the ratio's denominator is small or of the wrong sign and the curve is unstable).
Edges are ranked by |attribution|; the circuit of size k is the top k (no connectivity pruning).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..batching import chunks
from ..errors import BehaviorLensError
from ..prompts.contrast import ContrastSet
from ..stats import ratio_ci, ratio_of_means
from . import forward as F
from . import split
from .attribution import EdgeScores
from .graph import Graph

CIRCUIT_ABLATIONS = ("counterfactual", "mean", "resample")
FRACTIONS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def ranked(scores: EdgeScores) -> np.ndarray:
    """Edge indices by decreasing |attribution|."""
    return np.argsort(-np.abs(scores.values), kind="stable")


def random_edges(graph: Graph, k: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).choice(graph.n_edges, size=k, replace=False)


def batches_of(model, cset: ContrastSet, convention: str, pair_batch: int = 8) -> list[split.Batch]:
    """The set in batches of pairs as :class:`~.split.Prepared` takes them (for ``resample``,
    each positive row's donor: the row of the next pair in the batch, a fixed derangement)."""
    if convention not in CIRCUIT_ABLATIONS:
        raise BehaviorLensError(f"unknown ablation {convention!r}; use one of {', '.join(CIRCUIT_ABLATIONS)}")
    if len(cset) < (2 if convention == "resample" else 1):
        raise BehaviorLensError(f"set {cset.name!r} has {len(cset)} pairs: too few to evaluate a circuit")
    out = []
    for chunk in chunks(len(cset), pair_batch):
        pairs = list(chunk)
        pos, neg, scoring = F.pair_specs(model, cset, pairs)
        donors = []
        if convention == "resample":
            if len(pairs) < 2:
                raise BehaviorLensError("resample ablation needs at least 2 pairs per batch")
            rows_of = {p: [r for r, q in enumerate(scoring.prompt_of) if q == p] for p in range(len(pairs))}
            donor = {}
            for p in range(len(pairs)):
                other = rows_of[(p + 1) % len(pairs)]
                donor |= {r: other[min(k, len(other) - 1)] for k, r in enumerate(rows_of[p])}
            donors = [donor[r] for r in range(len(scoring.prompt_of))]
        out.append(split.Batch(pos, neg, torch.tensor(pairs), torch.tensor(donors, dtype=torch.long)))
    return out


@dataclass
class Evaluation:
    """The metric of every pair under each mask, with the full and empty runs."""

    metric: np.ndarray  # [masks, pairs]
    full: np.ndarray  # [pairs]
    empty: np.ndarray  # [pairs]

    def faithfulness(self, i: int) -> tuple[float, float, float]:
        """Ratio of means and its bootstrap CI over pairs for mask ``i``."""
        num, den = self.metric[i] - self.empty, self.full - self.empty
        lo, hi = ratio_ci(num, den)
        return ratio_of_means(num, den), lo, hi


def evaluate(model, cset: ContrastSet, circuits: Sequence[Sequence[int]], convention: str = "counterfactual",
             pair_batch: int = 8) -> Evaluation:
    """Run the positive side of every pair with each circuit (edge indices) kept and every other
    edge replaced (one job: every batch prepared once, then every circuit); see the module doc."""
    g = Graph.of(model)
    ups, ports = g.edge_index
    kept = [(torch.as_tensor(ups[np.asarray(e, dtype=int)]), torch.as_tensor(ports[np.asarray(e, dtype=int)]))
            for e in circuits]
    item = (F.paths_of(model), g.shape, batches_of(model, cset, convention, pair_batch), convention, len(cset), kept)
    full, empty, metric = F.on_model(model, split.evaluate_job, [item], "circuit evaluation")[0]
    return Evaluation(metric.numpy(), full.numpy(), empty.numpy())


def curve(model, cset: ContrastSet, order: np.ndarray, fractions: Sequence[float] = FRACTIONS,
          convention: str = "counterfactual", pair_batch: int = 8, label: str = "") -> pd.DataFrame:
    """Faithfulness of the top-k circuits, k a fraction of all edges: one row per size."""
    g = Graph.of(model)
    sizes = sorted({max(1, int(f * g.n_edges)) for f in fractions})  # never above the stated fraction
    ev = evaluate(model, cset, [order[:k] for k in sizes], convention, pair_batch)
    rows = []
    for i, k in enumerate(sizes):
        value, lo, hi = ev.faithfulness(i)
        rows.append({"pairs": label, "family": cset.name, "edges": k, "edges_fraction": k / g.n_edges,
                     "faithfulness": value, "ci_low": lo, "ci_high": hi, "convention": convention,
                     "n_pairs": len(cset)})
    return pd.DataFrame(rows)


def choose_size(select_curve: pd.DataFrame, keep: float) -> int:
    """The smallest circuit on the curve whose faithfulness reaches ``keep`` (else the largest)."""
    ok = select_curve[select_curve["faithfulness"] >= keep].sort_values("edges")
    return int(ok["edges"].iloc[0] if len(ok) else select_curve["edges"].max())


def controls(model, cset: ContrastSet, circuit: np.ndarray, convention: str = "counterfactual",
             n_random: int = 3, seed: int = 0, pair_batch: int = 8) -> pd.DataFrame:
    """The circuit beside random circuits of the same size and its complement, on ``cset``."""
    g = Graph.of(model)
    k = len(circuit)
    complement = np.setdiff1d(np.arange(g.n_edges), circuit)
    masks = {"circuit": circuit, "complement": complement}
    masks |= {f"random{i}": random_edges(g, k, seed + i) for i in range(n_random)}
    ev = evaluate(model, cset, list(masks.values()), convention, pair_batch)
    rows = []
    for i, (name, edges) in enumerate(masks.items()):
        value, lo, hi = ev.faithfulness(i)
        rows.append({"family": cset.name, "circuit": name, "edges": len(edges), "faithfulness": value,
                     "ci_low": lo, "ci_high": hi, "convention": convention, "n_pairs": len(cset),
                     "metric_circuit": float(ev.metric[i].mean()), "metric_full": float(ev.full.mean()),
                     "metric_empty": float(ev.empty.mean())})
    return pd.DataFrame(rows)
