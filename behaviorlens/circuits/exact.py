"""Exact edge patching: one edge at a time carries the negative side's value, all else runs as is.

The patched run is the positive side with ``input(p) = plain input(p) - a_u(pos) + a_u(neg)`` at
the edge's port only; every node downstream of the port is recomputed (u comes before p, so its
own output is the plain run's). Its effect is
``m(positive) - m(patched)`` (the quantity EAP estimates). Copies of the pairs, one per edge,
run as one batch, each starting at its port's layer from the plain run's cached outputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..batching import chunks
from ..prompts.contrast import ContrastSet
from ..stats import correlation
from . import forward as F
from .attribution import EdgeScores, sides
from .graph import Graph


def exact_edges(model, cset: ContrastSet, edges: Sequence[int], pair_batch: int = 8, batch_size: int = 32,
                progress: bool = False) -> EdgeScores:
    """Exact effect of each listed edge (indices into ``Graph.edge_index``) on every pair.

    Returns :class:`EdgeScores` whose rows are the listed edges (others are zero).
    """
    g = Graph.of(model)
    W = F.Weights(model, g)
    edges = np.asarray(edges, dtype=int)
    ups, ports = (a[edges] for a in g.edge_index)
    effect = np.zeros((g.n_edges, len(cset)))
    shift = np.zeros(len(cset))
    order = np.argsort(g.port_layer[ports], kind="stable")  # edges of one layer start together
    bar = tqdm(total=len(edges) * len(cset), desc="exact edge patching", disable=not progress)
    for chunk in chunks(len(cset), pair_batch):
        pairs = list(chunk)
        pos, neg = sides(model, cset, pairs)
        a_pos = F.run(model, g, pos, keep_outputs=True, weights=W)
        a_neg = F.run(model, g, neg, keep_outputs=True, weights=W)
        shift[pairs] = (a_pos.metric - a_neg.metric).numpy()
        per_copy = max(1, batch_size // max(1, len(pairs)))
        for part in chunks(len(order), per_copy):
            ks = order[list(part)]
            copies = pos.take([p for _ in ks for p in range(len(pairs))])
            seq = torch.tensor([s for _ in ks for s in range(pos.rows)])
            copy_of_row = torch.tensor(copies.scoring.prompt_of) // len(pairs)
            shifts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            for c, k in enumerate(ks):
                rows = (copy_of_row == c).nonzero()[:, 0]
                value = a_neg.outputs[ups[k], seq[rows]] - a_pos.outputs[ups[k], seq[rows]]
                if ports[k] in shifts:  # another edge into the same port, in other rows
                    r0, v0 = shifts[ports[k]]
                    rows, value = torch.cat([r0, rows]), torch.cat([v0, value])
                shifts[int(ports[k])] = (rows.to(model.device), value)
            layer = int(g.port_layer[ports[ks]].min())
            r = F.run(model, g, copies, cached=a_pos.outputs[:, seq], start_layer=layer, weights=W, shifts=shifts)
            patched = r.metric.view(len(ks), len(pairs)).numpy()
            base = a_pos.metric.numpy()[None]
            for c, k in enumerate(ks):
                effect[edges[k], pairs] = base[0] - patched[c]
            bar.update(len(ks) * len(pairs))
    bar.close()
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
