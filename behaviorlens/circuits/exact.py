"""Exact edge patching: one edge at a time carries the negative side's value, all else runs as is.

The patched run is the positive side with ``input(p) = plain input(p) - a_u(pos) + a_u(neg)`` at
the edge's port only; every node downstream of the port is recomputed (u comes before p, so its
own output is the plain run's). Its effect is
``m(positive) - m(patched)`` (the quantity EAP estimates). Copies of the pairs, one per edge,
run as one batch, each starting at its port's layer from the plain run's cached outputs
(:func:`.split.exact_job`; a chunk of pairs is one job).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..batching import chunks, rows_within
from ..prompts.contrast import ContrastSet
from ..stats import correlation
from . import forward as F
from . import split
from .attribution import EdgeScores
from .graph import Graph


def exact_edges(model, cset: ContrastSet, edges: Sequence[int], pair_batch: int = 8, batch_size: int = 32,
                progress: bool = False) -> EdgeScores:
    """Exact effect of each listed edge (indices into ``Graph.edge_index``) on every pair.

    Returns :class:`EdgeScores` whose rows are the listed edges (others are zero). ``pair_batch``
    pairs per job and ``batch_size`` copies per patched run, or fewer where the model's memory
    budget holds fewer.
    """
    g = Graph.of(model)
    paths = F.paths_of(model)
    row, budget = F.row_bytes(model, cset), model.memory_budget()
    pair_batch = rows_within(pair_batch, 2 * row, budget)  # both sides' outputs are kept
    batch_size = rows_within(batch_size, row, max(row, budget - 2 * row * pair_batch) if budget else None)
    edges = np.asarray(edges, dtype=int)
    ups, ports = (a[edges] for a in g.edge_index)
    order = np.argsort(g.port_layer[ports], kind="stable")  # edges of one layer start together
    items, layout = [], []
    for chunk in chunks(len(cset), pair_batch):
        pairs = list(chunk)
        pos, neg, scoring = F.pair_specs(model, cset, pairs)
        per_copy = max(1, batch_size // max(1, len(pairs)))
        parts, part_edges = [], []
        for part in chunks(len(order), per_copy):
            ks = order[list(part)]
            seq, reads = F.copies_of(pos, scoring, [p for _ in ks for p in range(len(pairs))])
            copy_of_row = reads.pair_of_row // len(pairs)
            acts = [(int(ups[k]), int(ports[k]), (copy_of_row == c).nonzero()[:, 0]) for c, k in enumerate(ks)]
            parts.append(split.Patches(seq, reads, acts, int(g.port_layer[ports[ks]].min())))
            part_edges.append(ks)
        items.append((paths, g.shape, pos, neg, parts))
        layout.append((pairs, part_edges))
    results = F.on_model(model, split.exact_job, items, "exact edge patching", progress=progress)
    effect = np.zeros((g.n_edges, len(cset)))
    shift = np.zeros(len(cset))
    for (pairs, part_edges), (m_pos, m_neg, patched) in zip(layout, results):
        shift[pairs] = (m_pos - m_neg).numpy()
        for ks, metric in zip(part_edges, patched):
            per_edge = metric.view(len(ks), len(pairs)).numpy()
            for c, k in enumerate(ks):
                effect[edges[k], pairs] = m_pos.numpy() - per_edge[c]
    return EdgeScores(g, effect, shift, "exact", cset.name)


def sample_edges(scores: EdgeScores, n_top: int = 60, n_random: int = 60, seed: int = 0) -> np.ndarray:
    """Edges to check: the ``n_top`` largest |attribution| and ``n_random`` others at random."""
    order = np.argsort(-np.abs(scores.values))
    top = order[:n_top]
    rest = order[n_top:]
    rng = np.random.default_rng(seed)
    extra = rng.choice(rest, size=min(n_random, len(rest)), replace=False)
    return np.concatenate([top, extra])


def agreement(estimate: EdgeScores, exact: EdgeScores, edges: Sequence[int]) -> tuple[pd.DataFrame, dict]:
    """Per sampled edge: estimate vs exact value; Pearson and Spearman over the sample."""
    edges = np.asarray(edges, dtype=int)
    f = estimate.graph.edges_frame().iloc[edges].copy()
    f["attribution"] = estimate.values[edges]
    f["exact"] = exact.values[edges]
    stats = {
        "pearson": correlation(f["attribution"], f["exact"], "pearson"),
        "spearman": correlation(f["attribution"], f["exact"], "spearman"),
        "edges": len(edges),
    }
    return f, stats
