"""How a circuit's heads compose, read from the weights and from one run.

Weights (Elhage et al. 2021), with each head's input RMSNorm gain folded into its q/k/v
projections (the norm's 1/rms scale and rotary positions are left out):
``W_OV = W_O W_V`` and ``W_QK = W_Q^T W_K`` (query residual on the left), and for an earlier
head A and a later head B

- Q-composition ``|W_QK(B)^T W_OV(A)| / (|W_QK(B)| |W_OV(A)|)`` (A writes what B's query reads),
- K-composition ``|W_QK(B) W_OV(A)| / ...`` (A writes what B's keys read),
- V-composition ``|W_OV(B) W_OV(A)| / ...``,

Frobenius norms, computed through head_dim x head_dim factors. The null is the same scores for
random pairs of heads of the model (earlier layer to later layer).

From a run of the positive side: the *OV copy score* of a head is the z-score, among all
vocabulary logits, of the claimed answer's logit when the head's OV circuit is applied to the
residual stream at the claim's token (then unembedded through the final norm's gain); the *QK*
figure is the attention the head's query at the answer position pays to the claim's tokens
(the tokens where the two sides differ). Their null is every head of the model; CIs bootstrap the
pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..prompts.contrast import ContrastSet
from ..stats import bootstrap_ci
from . import forward as F
from . import split
from .graph import Graph


def head_name(g: Graph, i: int) -> str:
    return f"L{i // g.n_heads}H{i % g.n_heads}"


def composition_table(model, heads: Sequence[tuple[int, int]], n_null: int = 1000,
                      seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Scores of every earlier-to-later pair of ``heads`` [(layer, head)], and the random-pair null.

    Each circuit pair gets its percentile in the null (``*_pct``: the share of random pairs
    scoring lower).
    """
    g = Graph.of(model)
    idx = sorted({L * g.n_heads + h for L, h in heads})
    pairs = [(a, b) for a in idx for b in idx if a // g.n_heads < b // g.n_heads]
    rng = np.random.default_rng(seed)
    n_all = g.n_layers * g.n_heads
    null_pairs = []
    while len(null_pairs) < n_null and g.n_layers > 1:
        a, b = (int(x) for x in rng.integers(0, n_all, 2))
        if a // g.n_heads < b // g.n_heads:
            null_pairs.append((a, b))
    scores = F.on_model(model, split.composition_job, [(F.paths_of(model), g.shape, pairs + null_pairs)],
                        "composition")[0].numpy()
    table, null = (pd.DataFrame({"upstream": [head_name(g, a) for a, _ in ps],
                                 "downstream": [head_name(g, b) for _, b in ps],
                                 "q_comp": sc[:, 0], "k_comp": sc[:, 1], "v_comp": sc[:, 2]})
                   for ps, sc in ((pairs, scores[:len(pairs)]), (null_pairs, scores[len(pairs):])))
    for kind in ("q_comp", "k_comp", "v_comp"):
        ref = np.sort(null[kind].to_numpy())
        table[f"{kind}_pct"] = np.searchsorted(ref, table[kind].to_numpy(), side="left") / max(1, len(ref))
    return table, null


def claim_positions(cset: ContrastSet, pair: int) -> list[int]:
    """Token positions where the pair's two sides differ (the claim)."""
    p = cset[pair]
    return [i for i, (a, b) in enumerate(zip(p.tokens["positive"], p.tokens["negative"])) if a != b]


def run_figures(model, cset: ContrastSet, pairs: Sequence[int] | None = None) -> pd.DataFrame:
    """OV copy score and attention to the claim, for every head of the model (one row each)."""
    g = Graph.of(model)
    pairs = list(range(min(8, len(cset)))) if pairs is None else list(pairs)
    pos, _, scoring = F.pair_specs(model, cset, pairs)
    claims = []
    for i, p in enumerate(pairs):
        row = scoring.prompt_of.index(i)
        off = int(pos.inputs["attention_mask"][row].eq(0).sum()) - pos.start  # left padding
        where = claim_positions(cset, p)
        answer_col = int(pos.reads.col[(pos.reads.row == row).nonzero()[0, 0]]) - pos.start
        claims.append((row, [c + off for c in where], cset[p].tokens["positive"][where[-1]], answer_col))
    copy, attn = (t.numpy() for t in F.on_model(
        model, split.head_figures_job, [(F.paths_of(model), g.shape, pos, claims)], "head figures")[0])
    frame = pd.DataFrame({
        "head": [head_name(g, k) for k in range(len(copy))],
        "layer": [k // g.n_heads for k in range(len(copy))],
        "ov_copy": copy.mean(1), "attn_to_claim": attn.mean(1), "pairs": len(pairs),
    })
    for name, values in (("ov_copy", copy), ("attn_to_claim", attn)):
        cis = np.array([bootstrap_ci(v) for v in values])
        frame[f"{name}_ci_low"], frame[f"{name}_ci_high"] = cis[:, 0], cis[:, 1]
    return frame
