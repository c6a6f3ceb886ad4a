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

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..batching import chunks
from ..errors import BehaviorLensError
from ..prompts.contrast import ContrastSet
from . import forward as F
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


def sides(model, cset: ContrastSet, pairs: Sequence[int]) -> tuple[F.Side, F.Side]:
    """Both sides of some pairs prepared with one shared start column and one shared prefix (the
    columns before it hold the same tokens on both sides; the first split forward of either side
    records their keys and values)."""
    _, _, first = F.first_columns(model, cset, pairs, "positive")
    start = int(first.min())
    pos = F.prepare(model, cset, pairs, "positive", start)
    neg = F.prepare(model, cset, pairs, "negative", start, prefix=pos.prefix)
    same = torch.equal(pos.batch.input_ids[:, :start], neg.batch.input_ids[:, :start]) and torch.equal(
        pos.batch.attention_mask[:, :start], neg.batch.attention_mask[:, :start])
    if not same:
        raise BehaviorLensError(f"family {cset.name!r}: pairs {list(pairs)} differ before column {start}, "
                                "where both sides should hold the same tokens")
    return pos, neg


def edge_attribution(model, cset: ContrastSet, steps: int = 1, pair_batch: int = 8,
                     progress: bool = False) -> EdgeScores:
    """EAP (``steps=1``) or EAP-IG (``steps=k``) of every edge over every pair of ``cset``."""
    if steps < 1:
        raise BehaviorLensError(f"EAP-IG needs at least 1 step, got {steps}")
    if len(cset) == 0:
        raise BehaviorLensError(f"set {cset.name!r} has no pairs")
    g = Graph.of(model)
    W = F.Weights(model, g)
    effect = np.zeros((g.n_edges, len(cset)))
    shift = np.zeros(len(cset))
    model.hf.eval()
    for chunk in tqdm(list(chunks(len(cset), pair_batch)), desc="edge attribution", disable=not progress):
        pairs = list(chunk)
        pos, neg = sides(model, cset, pairs)
        a_neg = F.run(model, g, neg, keep_outputs=True, weights=W)  # also records the shared prefix
        grads, a_pos = mean_port_grads(model, g, pos, neg, steps, W)
        per_row = edge_products(g, a_pos.outputs - a_neg.outputs, grads)  # [n_edges, rows]
        per_pair = torch.zeros(g.n_edges, len(pairs)).index_add_(1, torch.tensor(pos.scoring.prompt_of), per_row)
        effect[:, pairs] = per_pair.numpy()
        shift[pairs] = (a_pos.metric - a_neg.metric).numpy()
    return EdgeScores(g, effect, shift, "eap" if steps == 1 else f"eap-ig{steps}", cset.name)


def edge_products(g: Graph, diff: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """``diff[u] . grads[p]`` summed over columns for every edge (in ``edge_index`` order) and row:
    [n_edges, rows]. Ports that read the same upstream nodes go together, so only edges that
    exist are multiplied."""
    rows = diff.shape[1]
    d = diff.float().permute(1, 0, 2, 3).reshape(rows, g.n_up, -1)  # [rows, n_up, S*d]
    gr = grads.float().permute(1, 2, 3, 0).reshape(rows, -1, g.n_ports)  # [rows, S*d, n_ports]
    limits = g.port_limit
    parts, p = [], 0
    while p < g.n_ports:
        q = p
        while q < g.n_ports and limits[q] == limits[p]:
            q += 1
        lim = int(limits[p])
        block = torch.bmm(d[:, :lim], gr[:, :, p:q])  # [rows, lim, ports p..q-1]
        parts.append(block.permute(2, 1, 0).reshape(-1, rows).cpu())  # port-major, as edge_index
        p = q
    return torch.cat(parts)


def mean_port_grads(model, g: Graph, pos: F.Side, neg: F.Side, steps: int,
                    W: F.Weights) -> tuple[torch.Tensor, F.Run]:
    """d m / d input(port) on the positive side ([n_ports, rows, S, d]); with ``steps > 1``
    averaged over inputs interpolated from the negative side's embedding to the positive's.
    Also the plain positive run (outputs detached; with one step, the gradient run itself)."""
    total = None
    alphas = [1.0] if steps == 1 else [(i + 0.5) / steps for i in range(steps)]
    plain = None
    for alpha in alphas:
        embed = pos.embed if alpha == 1.0 else neg.embed + alpha * (pos.embed - neg.embed)
        with F.frozen(model):
            r = F.run(model, g, pos, probes=True, embed=embed, weights=W, keep_outputs=alpha == 1.0)
            r.metric.sum().backward()
        if alpha == 1.0:
            plain = F.Run(r.metric.detach(), r.outputs.detach(), None)
        grads = F.probe_grads(g, r.probes)
        total = grads if total is None else total + grads
    if plain is None:
        plain = F.run(model, g, pos, keep_outputs=True, weights=W)
    return total / len(alphas), plain
