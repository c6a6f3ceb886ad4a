"""The split forward: the model run so that every port reads its own copy of the residual stream.

A plain forward gives every head's query, key and value projection and every MLP the same
residual stream. Here each port (see :mod:`.graph`) gets its own input, the sum of the upstream
nodes' contributions, so one edge can be changed without touching the others:

    input(port) = sum over upstream u before the port of  r_u + mask[u, port] * (a_u - r_u)

where ``a_u`` is node u's output in this run and ``r_u`` its replacement (the other side's
output, a mean, or another pair's). ``mask`` = 1 everywhere is the plain forward; a gradient
run adds a zero *probe* to every port input and reads d metric / d input(port) from it.

The blocks are computed from the model's own modules (norms, projections, MLPs, unembedding);
only attention's score-softmax-sum is written out, so that each head can get its own query and
each key/value head its own key and value input. A test proves the plain split forward equal to
the model's forward. This is a local path in plain torch (no hooks): an nnsight trace replays the
model's own forward, which gives all heads one shared input.

Columns before ``start`` (the first column where the two sides of a pair differ) hold the same
tokens on both sides: the two sides share one :class:`Prefix`. The first split forward of either
side runs those columns too, as plain blocks in the same layer loop, and records their keys and
values; every later run of either side starts at ``start`` and reads them. No forward of the
model itself runs (preparing a side only embeds its tokens).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..batching import Batch
from ..errors import BehaviorLensError
from ..prompts.contrast import ContrastSet
from ..remote import refuse
from ..scoring import Scoring, needs_whole, plan
from ..sites import split_block
from .graph import Graph


@dataclass
class Prefix:
    """The columns before ``start`` of some rows: their input, rotary angles and mask, and once a
    split forward has run them, each layer's keys and values (after rotary)."""

    embed: torch.Tensor  # [rows, start, d]
    cos: torch.Tensor  # [rows, start, head_dim]
    sin: torch.Tensor
    mask: torch.Tensor  # [rows, 1, start, start] additive
    keys: list[torch.Tensor] | None = None  # per layer [rows, start, n_kv, head_dim]
    values: list[torch.Tensor] | None = None

    @property
    def recorded(self) -> bool:
        return self.keys is not None

    def take(self, idx: torch.Tensor) -> Prefix:
        pick = (lambda ts: None if ts is None else [t[idx] for t in ts])
        return Prefix(self.embed[idx], self.cos[idx], self.sin[idx], self.mask[idx], pick(self.keys),
                      pick(self.values))


@dataclass
class Side:
    """One side of some pairs, prepared for split forwards from column ``start`` on.

    Rows are the scoring's sequences (one per pair for one-token answers). ``S`` suffix columns.
    """

    scoring: Scoring
    batch: Batch
    start: int
    own: torch.Tensor  # [rows, S] bool: columns at or after the row's first differing token
    embed: torch.Tensor  # [rows, S, d] the input node's output
    cos: torch.Tensor  # [rows, S, head_dim]
    sin: torch.Tensor
    prefix: Prefix  # the columns before start, shared with the other side of the same pairs
    mask: torch.Tensor  # [rows, 1, S, T] additive attention mask
    read_row: torch.Tensor  # [reads]
    read_col: torch.Tensor  # [reads] column - start

    def take(self, prompts: Sequence[int]) -> Side:
        """The same side for the given prompts (repeats allowed): copies to run with different edits."""
        scoring, seqs = self.scoring.take(list(prompts))
        idx = torch.tensor(seqs, device=self.embed.device)
        read_col = self.read_col.new_tensor([0] * len(scoring.sequence))
        old_reads: dict[int, list[int]] = {}
        for r, q in enumerate(self.read_row.tolist()):
            old_reads.setdefault(q, []).append(r)
        k = 0
        for new_s, old_s in enumerate(seqs):  # take() keeps each sequence's reads in order
            for r in old_reads.get(old_s, []):
                read_col[k] = self.read_col[r]
                k += 1
        return Side(scoring, self.batch, self.start, self.own[idx], self.embed[idx], self.cos[idx], self.sin[idx],
                    self.prefix.take(idx), self.mask[idx], scoring.sequence.to(self.embed.device), read_col)

    @property
    def rows(self) -> int:
        return self.embed.shape[0]

    @property
    def width(self) -> int:
        return self.embed.shape[1]


def first_columns(model, cset: ContrastSet, pairs: Sequence[int], side: str) -> tuple[Scoring, Batch, torch.Tensor]:
    """The scoring, batch and each row's first differing column of one side of some pairs."""
    whole = needs_whole(cset.pairs)
    scoring = plan([cset[i] for i in pairs], side, whole)
    batch = model.batch(scoring.sequences)
    first = torch.tensor([cset[pairs[p]].first_difference() for p in scoring.prompt_of]) + batch.offsets
    return scoring, batch, first


def prepare(model, cset: ContrastSet, pairs: Sequence[int], side: str, start: int | None = None,
            prefix: Prefix | None = None) -> Side:
    """``side`` of ``pairs`` embedded for split forwards (no forward of the model runs).

    ``prefix``: the other side's, when both sides hold the same tokens before ``start``.
    """
    refuse(model, "circuit discovery", "it runs each block split into heads and edges in plain torch on the weights "
           "here (no trace path yet)")
    cset.require_aligned("circuit discovery")
    scoring, batch, first = first_columns(model, cset, pairs, side)
    start = int(first.min()) if start is None else start
    cols = scoring.position + batch.offsets[scoring.sequence]
    if int(cols.min()) < start:
        raise BehaviorLensError(f"family {cset.name!r}: the answer is read before the sides of a pair differ")
    with torch.inference_mode():
        hidden, call = model.sites.first_block_call(model.hf, batch.inputs())
    hidden = hidden.clone()  # out of inference mode: gradient runs use it
    cos, sin = (t.expand(len(batch), -1, -1).clone() for t in call["position_embeddings"])
    T = batch.input_ids.shape[1]
    q_cols = torch.arange(T)
    allowed = (q_cols[None, :] <= q_cols[:, None])[None] & batch.attention_mask.bool().cpu()[:, None, :]
    allowed |= torch.eye(T, dtype=torch.bool)[None]  # a padding row attends to itself
    mask = torch.zeros(allowed.shape, dtype=model.dtype).masked_fill(~allowed, torch.finfo(model.dtype).min)
    mask = mask[:, None].to(model.device)
    if prefix is None:
        prefix = Prefix(hidden[:, :start], cos[:, :start], sin[:, :start], mask[:, :, :start, :start])
    return Side(
        scoring=scoring, batch=batch, start=start,
        own=(torch.arange(start, T)[None, :] >= first[:, None]).to(model.device),
        embed=hidden[:, start:], cos=cos[:, start:], sin=sin[:, start:], prefix=prefix,
        mask=mask[:, :, start:], read_row=scoring.sequence.to(model.device), read_col=(cols - start).to(model.device),
    )


def model_metric(model, side: Side) -> torch.Tensor:
    """The metric of ``side`` from the model's own forward: what a plain split forward must equal."""
    cols = side.scoring.position + side.batch.offsets[side.scoring.sequence]
    return side.scoring.metric(model.logits_at(side.batch, side.scoring.sequence, cols)).cpu()


@contextmanager
def frozen(model) -> Iterator[None]:
    """The model's parameters need no gradient inside the block (a gradient run then computes
    only the gradients of its probes); restored in ``finally``."""
    params = [p for p in model.hf.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@dataclass
class Run:
    """What a split forward gives: the metric per pair and, if kept, every node's output."""

    metric: torch.Tensor  # [pairs] float32
    outputs: torch.Tensor | None  # [n_up, rows, S, d]
    probes: list[torch.Tensor] | None  # per port: the zero probe added to its input
    attention: dict[int, torch.Tensor] | None = None  # layer -> [rows, heads, S, T]


class Weights:
    """Per-head views of each layer's projections (no copies of the model's parameters)."""

    def __init__(self, model, graph: Graph) -> None:
        s = model.sites
        self.H, self.G, self.hd = graph.n_heads, graph.n_kv, s.head_dim
        self.blocks = [split_block(s, model.hf, L) for L in range(s.n_layers)]
        self.scaling = []
        for L, b in enumerate(self.blocks):
            if b["o_proj"].bias is not None:
                raise BehaviorLensError(f"{model.name}: layer {L}'s attention output has a bias, which "
                                        "belongs to no head; circuits need bias-free output projections")
            for name in ("q_norm", "k_norm"):
                if hasattr(s.attention_module(model.hf, L), name):
                    raise BehaviorLensError(f"{model.name}: attention with {name} is not split yet")
            self.scaling.append(float(getattr(s.attention_module(model.hf, L), "scaling", self.hd ** -0.5)))

    def proj(self, L: int, name: str, x: torch.Tensor, n_heads: int) -> torch.Tensor:
        """Each head's projection of its own input: x [r, s, n_heads, d] -> [r, s, n_heads, hd]."""
        lin = self.blocks[L][name]
        w = lin.weight.view(n_heads, self.hd, -1)
        out = torch.einsum("rshd,hed->rshe", x, w)
        return out if lin.bias is None else out + lin.bias.view(n_heads, self.hd)

    def out(self, L: int, z: torch.Tensor) -> torch.Tensor:
        """Each head's output in the residual stream: z [r, s, H, hd] -> [r, s, H, d]."""
        w = self.blocks[L]["o_proj"].weight  # [d, H*hd]
        return torch.einsum("rshe,hde->rshd", z, w.view(w.shape[0], self.H, self.hd).transpose(0, 1))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), -1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


def run(model, graph: Graph, side: Side, *, mask: torch.Tensor | None = None,
        replace: torch.Tensor | None = None, probes: bool = False, keep_outputs: bool = False,
        embed: torch.Tensor | None = None, cached: torch.Tensor | None = None, start_layer: int = 0,
        attention_layers: Sequence[int] = (), weights: Weights | None = None,
        shifts: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None) -> Run:
    """One split forward of ``side`` (see the module doc); gradients only with ``probes``.

    ``mask``: [n_up, n_ports] or [rows, n_up, n_ports] (1 keep, 0 replace), with ``replace``
    [n_up, rows, S, d]. ``embed`` overrides the input node's output. ``cached`` (the plain
    run's outputs) lets a run start at ``start_layer``: nodes before it keep their cached
    outputs. ``probes`` keeps a zero tensor per port (call ``.grad`` after a backward).
    ``shifts`` maps a port to (rows, values [n, S, d]) added to its input in those rows (without
    a mask: exact edge patching, where the edge's upstream output is the cached plain one).
    """
    with torch.set_grad_enabled(probes):
        return _run(model, graph, side, mask, replace, probes, keep_outputs, embed, cached, start_layer,
                    attention_layers, weights, shifts or {})


def _run(model, graph, side, mask, replace, probes, keep_outputs, embed, cached, start_layer,
         attention_layers, weights, shifts) -> Run:
    g, s = graph, model.sites
    W = weights or Weights(model, g)
    H, G = g.n_heads, g.n_kv
    rows, S, d = side.rows, side.width, s.d_model
    x0 = side.embed if embed is None else embed
    if mask is not None and replace is None:
        raise ValueError("a masked run needs replacement outputs")
    first_node = 1 + start_layer * (H + 1)
    outs: list[torch.Tensor] = [x0] if cached is None else [cached[u] for u in range(first_node)]
    if cached is None and start_layer:
        raise ValueError("starting at a later layer needs the cached outputs")
    pre = side.prefix
    record = not pre.recorded
    if record and start_layer:
        raise ValueError("starting at a later layer needs the prefix's recorded keys and values")
    prefix_resid = pre.embed
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    resid = sum(outs) if mask is None else None
    if mask is not None:
        delta = torch.zeros(g.n_up, rows, S, d, dtype=model.dtype, device=model.device)
        rsum = torch.zeros(g.n_up + 1, rows, S, d, dtype=model.dtype, device=model.device)
        rsum[1:] = replace.cumsum(0)
        for u, a in enumerate(outs):
            delta[u] = a - replace[u]
        mask = mask.to(model.device, model.dtype)
    probe_list: list[torch.Tensor] = []

    def port_inputs(ports: Sequence[int]) -> torch.Tensor:
        """Inputs of ports sharing one limit: [rows, S, len(ports), d]."""
        lim = int(g.port_limit[ports[0]])
        if mask is None:
            x = resid[:, :, None, :].expand(rows, S, len(ports), d)
            moved = [(j, shifts[p]) for j, p in enumerate(ports) if p in shifts]
            if moved:
                x = x.clone()
                for j, (r, value) in moved:
                    x[r, :, j] += value.to(x.dtype)
        else:
            m = mask[..., :lim, ports]
            flat = delta[:lim].reshape(lim, -1)
            if m.dim() == 2:
                mixed = (m.T @ flat).view(len(ports), rows, S, d)
            else:
                mixed = torch.einsum("rup,ursd->prsd", m, delta[:lim])
            x = (rsum[lim][None] + mixed).permute(1, 2, 0, 3)
        if probes:
            p = torch.zeros(rows, S, len(ports), d, dtype=model.dtype, device=model.device, requires_grad=True)
            probe_list.append(p)
            x = x + p
        return x

    def emit(a: torch.Tensor) -> None:
        nonlocal resid
        u = len(outs)
        outs.append(a)
        if mask is None:
            resid = resid + a
        else:
            delta[u] = a - replace[u]

    attention = {}
    for L in range(start_layer, g.n_layers):
        blk = W.blocks[L]
        if record:  # the shared columns, as the plain block: their keys and values are kept
            with torch.no_grad():
                prefix_resid, k_pre, v_pre = _plain_block(W, L, prefix_resid, pre)
            keys.append(k_pre)
            values.append(v_pre)
        else:
            k_pre, v_pre = pre.keys[L], pre.values[L]
        base = L * g.ports_per_layer
        x = port_inputs(list(range(base, base + H + 2 * G)))
        x = blk["attn_norm"](x)
        q = _rotate(W.proj(L, "q_proj", x[:, :, :H], H), side.cos, side.sin)
        k = _rotate(W.proj(L, "k_proj", x[:, :, H:H + G], G), side.cos, side.sin)
        v = W.proj(L, "v_proj", x[:, :, H + G:], G)
        k = torch.cat([k_pre.to(k.dtype), k], 1).repeat_interleave(H // G, dim=2)
        v = torch.cat([v_pre.to(v.dtype), v], 1).repeat_interleave(H // G, dim=2)
        scores = torch.einsum("rqhe,rkhe->rhqk", q, k) * W.scaling[L] + side.mask
        probs = torch.softmax(scores.float(), -1).to(q.dtype)
        if L in attention_layers:
            attention[L] = probs.detach()
        heads = W.out(L, torch.einsum("rhqk,rkhe->rqhe", probs, v))
        for h in range(H):
            emit(heads[:, :, h])
        xm = port_inputs([g.mlp_port(L)])[:, :, 0]
        emit(blk["mlp"](blk["mlp_norm"](xm)))
    if record:
        pre.keys, pre.values = keys, values
    xf = port_inputs([g.logits_port])[:, :, 0]
    hidden = xf[side.read_row, side.read_col]
    logits = s.logits_from_hidden(model.hf, hidden).float()
    metric = side.scoring.metric(logits)
    outputs = torch.stack(outs) if keep_outputs else None
    return Run(metric, outputs, probe_list if probes else None, attention or None)


def _plain_block(W: Weights, L: int, x: torch.Tensor, pre: Prefix) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block ``L`` on the prefix columns as the model runs it (one input for every head): the
    residual leaving it and the block's keys and values [rows, start, n_kv, head_dim]."""
    blk, H, G, hd = W.blocks[L], W.H, W.G, W.hd
    rows, n = x.shape[:2]
    h = blk["attn_norm"](x)
    q = _rotate(blk["q_proj"](h).view(rows, n, H, hd), pre.cos, pre.sin)
    k = _rotate(blk["k_proj"](h).view(rows, n, G, hd), pre.cos, pre.sin)
    v = blk["v_proj"](h).view(rows, n, G, hd)
    kr, vr = (t.repeat_interleave(H // G, dim=2) for t in (k, v))
    scores = torch.einsum("rqhe,rkhe->rhqk", q, kr) * W.scaling[L] + pre.mask
    probs = torch.softmax(scores.float(), -1).to(q.dtype)
    z = torch.einsum("rhqk,rkhe->rqhe", probs, vr).reshape(rows, n, H * hd)
    x = x + blk["o_proj"](z)
    return x + blk["mlp"](blk["mlp_norm"](x)), k, v


def probe_grads(graph: Graph, probes: list[torch.Tensor]) -> torch.Tensor:
    """The gradients of the probes in port order: [n_ports, rows, S, d]."""
    parts = []
    for p in probes:
        gr = torch.zeros_like(p) if p.grad is None else p.grad
        parts.append(gr.permute(2, 0, 1, 3))
    out = torch.cat(parts)
    if out.shape[0] != graph.n_ports:
        raise RuntimeError(f"expected {graph.n_ports} ports, got {out.shape[0]}")
    return out
