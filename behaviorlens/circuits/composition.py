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
import torch

from ..prompts.contrast import ContrastSet
from ..stats import bootstrap_ci
from . import forward as F
from .attribution import sides
from .graph import Graph


def _gain(norm: torch.nn.Module, d: int, device, dtype) -> torch.Tensor:
    """A norm's per-dimension gain: its output on sqrt(d) * unit vectors (rms 1), over sqrt(d)."""
    with torch.no_grad():
        eye = torch.eye(d, device=device, dtype=dtype) * d ** 0.5
        return torch.diagonal(norm(eye)).float() / d ** 0.5


class HeadWeights:
    """Per head: W_Q, W_K, W_V ([hd, d], gain folded) and W_O ([d, hd]), float32."""

    def __init__(self, model, graph: Graph) -> None:
        self.g = graph
        W = F.Weights(model, graph)
        d, hd = model.sites.d_model, model.sites.head_dim
        self.q, self.k, self.v, self.o = [], [], [], []
        for L, b in enumerate(W.blocks):
            gain = _gain(b["attn_norm"], d, model.device, model.dtype)
            wq = b["q_proj"].weight.detach().float().view(graph.n_heads, hd, d) * gain
            wk = b["k_proj"].weight.detach().float().view(graph.n_kv, hd, d) * gain
            wv = b["v_proj"].weight.detach().float().view(graph.n_kv, hd, d) * gain
            wo = b["o_proj"].weight.detach().float().view(d, graph.n_heads, hd).permute(1, 0, 2)
            for h in range(graph.n_heads):
                kv = graph.kv_of(h)
                self.q.append(wq[h])
                self.k.append(wk[kv])
                self.v.append(wv[kv])
                self.o.append(wo[h])

    def index(self, layer: int, head: int) -> int:
        return layer * self.g.n_heads + head

    def ov(self, i: int) -> torch.Tensor:
        return self.o[i] @ self.v[i]

    def scores(self, pairs: Sequence[tuple[int, int]]) -> pd.DataFrame:
        """Q-, K-, V-composition of each (earlier head index, later head index) pair."""
        rows = []
        for a, b in pairs:
            oa, va, qb, kb, ob, vb = self.o[a], self.v[a], self.q[b], self.k[b], self.o[b], self.v[b]
            n_ov_a = _fro(oa, va)
            n_qk_b = _fro(qb.T, kb)
            n_ov_b = _fro(ob, vb)
            k_comp = _ratio(_fro(qb.T, (kb @ oa) @ va), n_qk_b * n_ov_a)
            q_comp = _ratio(_fro(kb.T, (qb @ oa) @ va), n_qk_b * n_ov_a)
            v_comp = _ratio(_fro(ob, (vb @ oa) @ va), n_ov_b * n_ov_a)
            rows.append({"q_comp": q_comp, "k_comp": k_comp, "v_comp": v_comp})
        return pd.DataFrame(rows, columns=["q_comp", "k_comp", "v_comp"])


def _ratio(num: float, den: float) -> float:
    """num / den, and 0 where a head has no weights (nothing composes with a zero matrix)."""
    return num / den if den > 0 else 0.0


def _fro(left: torch.Tensor, right: torch.Tensor) -> float:
    """|left @ right|_F for [d, r] @ [r, d] factors, through r x r products."""
    return float(torch.sqrt(torch.clamp(torch.trace((left.T @ left) @ (right @ right.T)), min=0)))


def head_name(g: Graph, i: int) -> str:
    return f"L{i // g.n_heads}H{i % g.n_heads}"


def composition_table(model, heads: Sequence[tuple[int, int]], n_null: int = 1000,
                      seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Scores of every earlier-to-later pair of ``heads`` [(layer, head)], and the random-pair null.

    Each circuit pair gets its percentile in the null (``*_pct``: the share of random pairs
    scoring lower).
    """
    g = Graph.of(model)
    hw = HeadWeights(model, g)
    idx = sorted({hw.index(L, h) for L, h in heads})
    pairs = [(a, b) for a in idx for b in idx if a // g.n_heads < b // g.n_heads]
    table = pd.concat([pd.DataFrame({"upstream": [head_name(g, a) for a, _ in pairs],
                                     "downstream": [head_name(g, b) for _, b in pairs]}),
                       hw.scores(pairs)], axis=1) if pairs else pd.DataFrame(
        columns=["upstream", "downstream", "q_comp", "k_comp", "v_comp"])
    rng = np.random.default_rng(seed)
    n_all = g.n_layers * g.n_heads
    null_pairs = []
    while len(null_pairs) < n_null and g.n_layers > 1:
        a, b = (int(x) for x in rng.integers(0, n_all, 2))
        if a // g.n_heads < b // g.n_heads:
            null_pairs.append((a, b))
    null = pd.concat([pd.DataFrame({"upstream": [head_name(g, a) for a, _ in null_pairs],
                                    "downstream": [head_name(g, b) for _, b in null_pairs]}),
                      hw.scores(null_pairs)], axis=1)
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
    hw = HeadWeights(model, g)
    pairs = list(range(min(8, len(cset)))) if pairs is None else list(pairs)
    pos, _ = sides(model, cset, pairs)
    W = F.Weights(model, g)
    r = F.run(model, g, pos, keep_outputs=True, attention_layers=range(g.n_layers), weights=W)
    out = r.outputs.float()
    unembed = model.hf.get_output_embeddings().weight.detach().float()
    final_gain = _gain(model.sites.final_norm(model.hf), model.sites.d_model, model.device, model.dtype)
    first_seq = [pos.scoring.prompt_of.index(i) for i in range(len(pairs))]
    copy = np.zeros((g.n_layers * g.n_heads, len(pairs)))
    attn = np.zeros_like(copy)
    for i, p in enumerate(pairs):
        row = first_seq[i]
        off = int(pos.batch.offsets[row]) - pos.start
        claim = [c + off for c in claim_positions(cset, p)]
        claim_token = cset[p].tokens["positive"][claim_positions(cset, p)[-1]]
        answer_col = int(pos.read_col[(pos.read_row == row).nonzero()[0, 0]])
        for L in range(g.n_layers):
            first = 1 + L * (g.n_heads + 1)
            resid = out[:first, row, claim[-1]].sum(0)
            x = resid / resid.pow(2).mean().sqrt()
            probs = r.attention[L][row, :, answer_col].float()  # [heads, T]
            for h in range(g.n_heads):
                k = hw.index(L, h)
                logits = unembed @ (final_gain * (hw.o[k] @ (hw.v[k] @ x)))
                spread = float(logits.std())
                copy[k, i] = float(logits[claim_token] - logits.mean()) / spread if spread > 0 else 0.0
                attn[k, i] = float(probs[h, [pos.start + c for c in claim]].sum())
    frame = pd.DataFrame({
        "head": [head_name(g, k) for k in range(len(copy))],
        "layer": [k // g.n_heads for k in range(len(copy))],
        "ov_copy": copy.mean(1), "attn_to_claim": attn.mean(1), "pairs": len(pairs),
    })
    for name, values in (("ov_copy", copy), ("attn_to_claim", attn)):
        cis = np.array([bootstrap_ci(v) for v in values])
        frame[f"{name}_ci_low"], frame[f"{name}_ci_high"] = cis[:, 0], cis[:, 1]
    return frame
