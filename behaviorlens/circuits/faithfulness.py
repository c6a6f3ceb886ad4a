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
from .attribution import EdgeScores, sides
from .graph import Graph

CIRCUIT_ABLATIONS = ("counterfactual", "mean", "resample")
FRACTIONS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def mask_of(graph: Graph, edges: Sequence[int]) -> torch.Tensor:
    """[n_up, n_ports] float mask with 1 at the given edges (indices into ``edge_index``)."""
    ups, ports = graph.edge_index
    idx = np.asarray(edges, dtype=int)
    m = torch.zeros(graph.n_up, graph.n_ports)
    m[torch.as_tensor(ups[idx]), torch.as_tensor(ports[idx])] = 1.0
    return m


def ranked(scores: EdgeScores) -> np.ndarray:
    """Edge indices by decreasing |attribution|."""
    return np.argsort(-np.abs(scores.values), kind="stable")


def random_edges(graph: Graph, k: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).choice(graph.n_edges, size=k, replace=False)


def _column_means(model, g: Graph, cset: ContrastSet, pair_batch: int, W: F.Weights) -> dict[int, torch.Tensor]:
    """Per offset from the end (-1 = last column): every node's mean negative-side output."""
    total: dict[int, torch.Tensor] = {}
    count: dict[int, int] = {}
    for chunk in chunks(len(cset), pair_batch):
        _, neg = sides(model, cset, list(chunk))
        out = F.run(model, g, neg, keep_outputs=True, weights=W).outputs
        for c in range(neg.width):
            off = c - neg.width
            keep = neg.own[:, c]
            if keep.any():
                total[off] = total.get(off, 0) + out[:, keep, c].sum(1)
                count[off] = count.get(off, 0) + int(keep.sum())
    return {off: total[off] / count[off] for off in total}


def replacement(convention: str, pos: F.Side, a_pos: torch.Tensor, a_neg: torch.Tensor,
                means: dict[int, torch.Tensor] | None) -> torch.Tensor:
    """The replacement outputs [n_up, rows, S, d] of one batch under a convention."""
    if convention == "counterfactual":
        return a_neg
    out = a_pos.clone()
    S = pos.width
    for c in range(S):
        rows = pos.own[:, c]
        if rows.any():
            out[:, rows, c] = means[c - S][:, None].to(out.dtype)
    if convention == "mean":
        return out
    pairs = sorted(set(pos.scoring.prompt_of))
    if len(pairs) < 2:
        raise BehaviorLensError("resample ablation needs at least 2 pairs per batch")
    rows_of = {p: [r for r, q in enumerate(pos.scoring.prompt_of) if q == p] for p in pairs}
    for i, p in enumerate(pairs):
        other = rows_of[pairs[(i + 1) % len(pairs)]]
        for k, r in enumerate(rows_of[p]):
            o = other[min(k, len(other) - 1)]
            cols = pos.own[r] & pos.own[o]
            out[:, r, cols] = a_neg[:, o, cols]
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


class Evaluator:
    """The prepared batches of a set (positive side, replacements, full and empty metrics): the
    metric of every pair under any circuit mask costs one masked split forward per batch."""

    def __init__(self, model, cset: ContrastSet, convention: str = "counterfactual", pair_batch: int = 8) -> None:
        if convention not in CIRCUIT_ABLATIONS:
            raise BehaviorLensError(f"unknown ablation {convention!r}; use one of {', '.join(CIRCUIT_ABLATIONS)}")
        if len(cset) < (2 if convention == "resample" else 1):
            raise BehaviorLensError(f"set {cset.name!r} has {len(cset)} pairs: too few to evaluate a circuit")
        self.model, self.g = model, Graph.of(model)
        self.W = F.Weights(model, self.g)
        means = _column_means(model, self.g, cset, pair_batch, self.W) if convention != "counterfactual" else None
        self.batches = []
        self.full, self.empty = np.zeros(len(cset)), np.zeros(len(cset))
        for chunk in chunks(len(cset), pair_batch):
            pairs = list(chunk)
            pos, neg = sides(model, cset, pairs)
            a_pos = F.run(model, self.g, pos, keep_outputs=True, weights=self.W)
            a_neg = F.run(model, self.g, neg, keep_outputs=True, weights=self.W)
            rep = replacement(convention, pos, a_pos.outputs, a_neg.outputs, means)
            self.full[pairs] = a_pos.metric.numpy()
            self.batches.append((pairs, pos, rep))
        self.empty = self.metric(torch.zeros(self.g.n_up, self.g.n_ports))

    def metric(self, mask: torch.Tensor) -> np.ndarray:
        """The metric of every pair with only the mask's edges kept."""
        out = np.zeros(len(self.full))
        for pairs, pos, rep in self.batches:
            out[pairs] = F.run(self.model, self.g, pos, mask=mask, replace=rep, weights=self.W).metric.numpy()
        return out

    def faithfulness(self, mask: torch.Tensor) -> float:
        return ratio_of_means(self.metric(mask) - self.empty, self.full - self.empty)


def evaluate(model, cset: ContrastSet, masks: Sequence[torch.Tensor], convention: str = "counterfactual",
             pair_batch: int = 8) -> Evaluation:
    """Run the positive side of every pair with each circuit mask; see the module doc."""
    ev = Evaluator(model, cset, convention, pair_batch)
    return Evaluation(np.stack([ev.metric(m) for m in masks]), ev.full, ev.empty)


def curve(model, cset: ContrastSet, order: np.ndarray, fractions: Sequence[float] = FRACTIONS,
          convention: str = "counterfactual", pair_batch: int = 8, label: str = "") -> pd.DataFrame:
    """Faithfulness of the top-k circuits, k a fraction of all edges: one row per size."""
    g = Graph.of(model)
    sizes = sorted({max(1, int(f * g.n_edges)) for f in fractions})  # never above the stated fraction
    ev = evaluate(model, cset, [mask_of(g, order[:k]) for k in sizes], convention, pair_batch)
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
    ev = evaluate(model, cset, [mask_of(g, e) for e in masks.values()], convention, pair_batch)
    rows = []
    for i, (name, edges) in enumerate(masks.items()):
        value, lo, hi = ev.faithfulness(i)
        rows.append({"family": cset.name, "circuit": name, "edges": len(edges), "faithfulness": value,
                     "ci_low": lo, "ci_high": hi, "convention": convention, "n_pairs": len(cset),
                     "metric_circuit": float(ev.metric[i].mean()), "metric_full": float(ev.full.mean()),
                     "metric_empty": float(ev.empty.mean())})
    return pd.DataFrame(rows)
