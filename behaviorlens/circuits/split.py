"""The split forward itself, and every circuit computation built on it, written with torch and
the shipped modules only: it runs here on the model's modules (the local path) and, shipped by
value (:mod:`behaviorlens.remote`), inside an NDIF session on the server's (the trace path).

Each port (see :mod:`.graph`) reads its own copy of the residual stream, the sum of the upstream
nodes' contributions, so that one edge can be changed without touching the others:

    input(port) = sum over upstream u before the port of  r_u + mask[u, port] * (a_u - r_u)

where ``a_u`` is node u's output in this run and ``r_u`` its replacement. The blocks are computed
from the model's own modules (norms, projections, MLPs, unembedding), reached by path from a root
that is either the plain torch model or nnsight's envoy of it; only attention's
score-softmax-sum is written out. The residual entering block 0 and the rotary angles come from
the model's own forward, stopped at block 0 (a hook here, a trace on the server).

Only the figures a stage keeps leave a job: per-pair metrics, edge effects, composition scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..interventions.kinds import answer_metric


@dataclass(frozen=True)
class Shape:
    """The circuit graph's sizes: upstream nodes (input, then per layer its heads and MLP) and
    ports (per layer each head's query, each key/value head's key and value, the MLP; logits)."""

    n_layers: int
    n_heads: int
    n_kv: int

    @property
    def n_up(self) -> int:
        return 1 + self.n_layers * (self.n_heads + 1)

    @property
    def ports_per_layer(self) -> int:
        return self.n_heads + 2 * self.n_kv + 1

    @property
    def n_ports(self) -> int:
        return self.n_layers * self.ports_per_layer + 1

    def mlp_port(self, layer: int) -> int:
        return layer * self.ports_per_layer + self.n_heads + 2 * self.n_kv

    @property
    def logits_port(self) -> int:
        return self.n_ports - 1

    @property
    def limits(self) -> list[int]:
        """Per port, how many upstream nodes precede it (edges come from nodes 0..limit-1)."""
        out = []
        for L in range(self.n_layers):
            first_up = 1 + L * (self.n_heads + 1)
            out += [first_up] * (self.ports_per_layer - 1) + [first_up + self.n_heads]
        return out + [self.n_up]

    @property
    def n_edges(self) -> int:
        return sum(self.limits)


@dataclass(frozen=True)
class Paths:
    """Where the split forward finds the model's modules, from the causal-LM root."""

    layers: str
    parts: dict[str, str]  # attn_norm, q_proj, k_proj, v_proj, o_proj, mlp_norm, mlp: paths inside a block
    final_norm: str
    unembed: str
    head_dim: int
    scaling: tuple[float, ...]  # per layer, the attention's score scale
    softcap: float | None = None  # final logit soft-capping


def _walk(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


class Blocks:
    """The model's modules, per layer by part name, and per-head views of the projections."""

    def __init__(self, root: Any, paths: Paths, shape: Shape) -> None:
        self.paths, self.shape = paths, shape
        layers = _walk(root, paths.layers)
        self.blocks = [{name: _walk(layers[L], p) for name, p in paths.parts.items()} for L in range(shape.n_layers)]
        self.final_norm, self.unembed = _walk(root, paths.final_norm), _walk(root, paths.unembed)
        self.layer0 = layers[0]
        self.H, self.G, self.hd = shape.n_heads, shape.n_kv, paths.head_dim

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

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm, unembedding and any soft-capping of residual-stream rows, float32."""
        logits = self.unembed(self.final_norm(hidden)).float()
        cap = self.paths.softcap
        return torch.tanh(logits / cap) * cap if cap else logits


class _Stop(Exception):
    pass


def first_block_input(root: Any, blocks: Blocks, inputs: dict[str, torch.Tensor]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The residual entering block 0 and the rotary cos and sin, from the model's own forward
    stopped there: a trace on an nnsight model (the server's), a hook on a torch one."""
    if hasattr(root, "trace"):
        with torch.no_grad(), root.trace(**inputs, use_cache=False) as tracer:
            args, kwargs = blocks.layer0.inputs
            hidden = (args[0] if args else kwargs["hidden_states"]).save()
            cos, sin = kwargs["position_embeddings"]
            cos, sin = cos.save(), sin.save()
            tracer.stop()
        return hidden, cos, sin
    seen: dict[str, Any] = {}

    def stop(module: Any, args: tuple, kwargs: dict) -> None:
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]
        seen["rotary"] = kwargs["position_embeddings"]
        raise _Stop

    device = next(root.parameters()).device
    handle = blocks.layer0.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        with torch.no_grad():
            root(**{k: v.to(device) for k, v in inputs.items()}, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen["hidden"], *seen["rotary"]


@dataclass
class Prefix:
    """The columns before ``start``: their input, rotary angles and mask, and once a split
    forward has run them, each layer's keys and values (after rotary)."""

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
class Reads:
    """Where a side's metric reads the logits and what it needs besides them: rows (sequences),
    columns (padded), :func:`answer_metric`'s arguments after the logits, and each row's pair."""

    row: torch.Tensor
    col: torch.Tensor
    metric: tuple
    pair_of_row: torch.Tensor  # [rows] the pair (0..pairs-1) of each sequence


@dataclass
class SideSpec:
    """One side of some pairs, as shipped: the padded tokens, the first column split forwards
    run (``start``), each row's first differing column and the reads."""

    inputs: dict[str, torch.Tensor]
    start: int
    first: torch.Tensor  # [rows]
    reads: Reads


@dataclass
class Side:
    """One side prepared for split forwards from column ``start`` on (``S`` suffix columns)."""

    start: int
    own: torch.Tensor  # [rows, S] bool: columns at or after the row's first differing token
    embed: torch.Tensor  # [rows, S, d] the input node's output
    cos: torch.Tensor  # [rows, S, head_dim]
    sin: torch.Tensor
    prefix: Prefix  # the columns before start, shared with the other side of the same pairs
    mask: torch.Tensor  # [rows, 1, S, T] additive attention mask
    reads: Reads  # columns relative to start
    spec: SideSpec | None = None  # what it was prepared from (where it was prepared here)

    @property
    def rows(self) -> int:
        return self.embed.shape[0]

    @property
    def width(self) -> int:
        return self.embed.shape[1]

    def copies(self, seq: torch.Tensor, reads: Reads) -> Side:
        """Rows ``seq`` of this side (repeats allowed) read as ``reads`` (columns relative to start)."""
        seq = seq.to(self.embed.device)
        return Side(self.start, self.own[seq], self.embed[seq], self.cos[seq], self.sin[seq], self.prefix.take(seq),
                    self.mask[seq], _on(reads, self.embed.device))


def _on(reads: Reads, device: Any) -> Reads:
    return Reads(reads.row.to(device), reads.col.to(device), reads.metric, reads.pair_of_row)


def prepare(root: Any, blocks: Blocks, spec: SideSpec, prefix: Prefix | None = None) -> Side:
    """``spec`` embedded for split forwards (the model's forward runs only up to block 0).
    ``prefix``: the other side's, when both sides hold the same tokens before ``start``."""
    hidden, cos, sin = first_block_input(root, blocks, spec.inputs)
    hidden = hidden.detach().clone()
    dtype, device = hidden.dtype, hidden.device
    rows, T = spec.inputs["input_ids"].shape
    cos, sin = (t.detach().expand(rows, -1, -1).clone() for t in (cos, sin))
    q_cols = torch.arange(T)
    allowed = (q_cols[None, :] <= q_cols[:, None])[None] & spec.inputs["attention_mask"].bool().cpu()[:, None, :]
    allowed |= torch.eye(T, dtype=torch.bool)[None]  # a padding row attends to itself
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None].to(device)
    start = spec.start
    if prefix is None:
        prefix = Prefix(hidden[:, :start], cos[:, :start], sin[:, :start], mask[:, :, :start, :start])
    reads = Reads(spec.reads.row.to(device), (spec.reads.col - start).to(device), spec.reads.metric,
                  spec.reads.pair_of_row)
    return Side(start=start, own=(torch.arange(start, T)[None, :] >= spec.first[:, None]).to(device),
                embed=hidden[:, start:], cos=cos[:, start:], sin=sin[:, start:], prefix=prefix,
                mask=mask[:, :, start:], reads=reads)


def prepare_pair(root: Any, blocks: Blocks, pos: SideSpec, neg: SideSpec) -> tuple[Side, Side]:
    """Both sides of some pairs, sharing one prefix (the first split forward records it)."""
    p = prepare(root, blocks, pos)
    return p, prepare(root, blocks, neg, prefix=p.prefix)


@dataclass
class Run:
    """What a split forward gives: the metric per pair and, if kept, every node's output."""

    metric: torch.Tensor  # [pairs] float32
    outputs: torch.Tensor | None  # [n_up, rows, S, d]
    probes: list[torch.Tensor] | None  # per port group: the zero probe added to its inputs
    attention: dict[int, torch.Tensor] | None = None  # layer -> [rows, heads, S, T]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), -1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


def run(blocks: Blocks, side: Side, *, mask: torch.Tensor | None = None, replace: torch.Tensor | None = None,
        probes: bool = False, keep_outputs: bool = False, embed: torch.Tensor | None = None,
        cached: torch.Tensor | None = None, start_layer: int = 0, attention_layers: Sequence[int] = (),
        shifts: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None) -> Run:
    """One split forward of ``side``; gradients only with ``probes``.

    ``mask``: [n_up, n_ports] or [rows, n_up, n_ports] (1 keep, 0 replace), with ``replace``
    [n_up, rows, S, d]. ``embed`` overrides the input node's output. ``cached`` (the plain
    run's outputs) lets a run start at ``start_layer``: nodes before it keep their cached
    outputs. ``probes`` keeps a zero tensor per port group (their gradients: :func:`port_grads`).
    ``shifts`` maps a port to (rows, values [n, S, d]) added to its input in those rows (without
    a mask: exact edge patching, where the edge's upstream output is the cached plain one).
    """
    with torch.set_grad_enabled(probes):
        return _run(blocks, side, mask, replace, probes, keep_outputs, embed, cached, start_layer,
                    attention_layers, shifts or {})


def _run(B: Blocks, side, mask, replace, probes, keep_outputs, embed, cached, start_layer, attention_layers,
         shifts) -> Run:
    g = B.shape
    H, G = g.n_heads, g.n_kv
    x0 = side.embed if embed is None else embed
    rows, S, d = x0.shape
    dtype, device = x0.dtype, x0.device
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
        delta = torch.zeros(g.n_up, rows, S, d, dtype=dtype, device=device)
        rsum = torch.zeros(g.n_up + 1, rows, S, d, dtype=dtype, device=device)
        rsum[1:] = replace.cumsum(0)
        for u, a in enumerate(outs):
            delta[u] = a - replace[u]
        mask = mask.to(device, dtype)
    probe_list: list[torch.Tensor] = []
    limits = g.limits

    def port_inputs(ports: Sequence[int]) -> torch.Tensor:
        """Inputs of ports sharing one limit: [rows, S, len(ports), d]."""
        lim = limits[ports[0]]
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
            p = torch.zeros(rows, S, len(ports), d, dtype=dtype, device=device, requires_grad=True)
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
        blk = B.blocks[L]
        if record:  # the shared columns, as the plain block: their keys and values are kept
            with torch.no_grad():
                prefix_resid, k_pre, v_pre = _plain_block(B, L, prefix_resid, pre)
            keys.append(k_pre)
            values.append(v_pre)
        else:
            k_pre, v_pre = pre.keys[L], pre.values[L]
        base = L * g.ports_per_layer
        x = port_inputs(list(range(base, base + H + 2 * G)))
        x = blk["attn_norm"](x)
        q = _rotate(B.proj(L, "q_proj", x[:, :, :H], H), side.cos, side.sin)
        k = _rotate(B.proj(L, "k_proj", x[:, :, H:H + G], G), side.cos, side.sin)
        v = B.proj(L, "v_proj", x[:, :, H + G:], G)
        k = torch.cat([k_pre.to(k.dtype), k], 1).repeat_interleave(H // G, dim=2)
        v = torch.cat([v_pre.to(v.dtype), v], 1).repeat_interleave(H // G, dim=2)
        scores = torch.einsum("rqhe,rkhe->rhqk", q, k) * B.paths.scaling[L] + side.mask
        probs = torch.softmax(scores.float(), -1).to(q.dtype)
        if L in attention_layers:
            attention[L] = probs.detach()
        heads = B.out(L, torch.einsum("rhqk,rkhe->rqhe", probs, v))
        for h in range(H):
            emit(heads[:, :, h])
        xm = port_inputs([g.mlp_port(L)])[:, :, 0]
        emit(blk["mlp"](blk["mlp_norm"](xm)))
    if record:
        pre.keys, pre.values = keys, values
    xf = port_inputs([g.logits_port])[:, :, 0]
    reads = side.reads
    metric = answer_metric(B.logits(xf[reads.row, reads.col]), *reads.metric)
    outputs = torch.stack(outs) if keep_outputs else None
    return Run(metric, outputs, probe_list if probes else None, attention or None)


def _plain_block(B: Blocks, L: int, x: torch.Tensor, pre: Prefix) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block ``L`` on the prefix columns as the model runs it (one input for every head): the
    residual leaving it and the block's keys and values [rows, start, n_kv, head_dim]."""
    blk, H, G, hd = B.blocks[L], B.H, B.G, B.hd
    rows, n = x.shape[:2]
    h = blk["attn_norm"](x)
    q = _rotate(blk["q_proj"](h).view(rows, n, H, hd), pre.cos, pre.sin)
    k = _rotate(blk["k_proj"](h).view(rows, n, G, hd), pre.cos, pre.sin)
    v = blk["v_proj"](h).view(rows, n, G, hd)
    kr, vr = (t.repeat_interleave(H // G, dim=2) for t in (k, v))
    scores = torch.einsum("rqhe,rkhe->rhqk", q, kr) * B.paths.scaling[L] + pre.mask
    probs = torch.softmax(scores.float(), -1).to(q.dtype)
    z = torch.einsum("rhqk,rkhe->rqhe", probs, vr).reshape(rows, n, H * hd)
    x = x + blk["o_proj"](z)
    return x + blk["mlp"](blk["mlp_norm"](x)), k, v


def port_grads(blocks: Blocks, side: Side, embed: torch.Tensor | None = None, keep_outputs: bool = False
               ) -> tuple[torch.Tensor, Run]:
    """d sum(metric) / d input(port) for every port ([n_ports, rows, S, d], float32), and the run
    (metric and outputs detached). Only the probes' gradients are computed."""
    with torch.inference_mode(False):
        r = run(blocks, side, probes=True, embed=embed, keep_outputs=keep_outputs)
        with torch.enable_grad():
            grads = torch.autograd.grad(r.metric.sum(), r.probes, allow_unused=True)
    parts = [(torch.zeros_like(p) if gr is None else gr).permute(2, 0, 1, 3) for p, gr in zip(r.probes, grads)]
    out = torch.cat(parts)
    if out.shape[0] != blocks.shape.n_ports:
        raise RuntimeError(f"expected {blocks.shape.n_ports} ports, got {out.shape[0]}")
    outputs = None if r.outputs is None else r.outputs.detach()
    return out, Run(r.metric.detach(), outputs, None)


def edge_products(g: Shape, diff: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """``diff[u] . grads[p]`` summed over columns for every edge (port-major, as the graph's
    ``edge_index``) and row: [n_edges, rows]. Ports that read the same upstream nodes go
    together, so only edges that exist are multiplied."""
    rows = diff.shape[1]
    d = diff.float().permute(1, 0, 2, 3).reshape(rows, g.n_up, -1)  # [rows, n_up, S*d]
    gr = grads.float().permute(1, 2, 3, 0).reshape(rows, -1, g.n_ports)  # [rows, S*d, n_ports]
    limits = g.limits
    parts, p = [], 0
    while p < g.n_ports:
        q = p
        while q < g.n_ports and limits[q] == limits[p]:
            q += 1
        block = torch.bmm(d[:, :limits[p]], gr[:, :, p:q])  # [rows, lim, ports p..q-1]
        parts.append(block.permute(2, 1, 0).reshape(-1, rows))
        p = q
    return torch.cat(parts)


def per_pair(values: torch.Tensor, reads: Reads, pairs: int) -> torch.Tensor:
    """Row values summed per pair along the last axis: [..., pairs]."""
    out = torch.zeros(*values.shape[:-1], pairs, dtype=values.dtype, device=values.device)
    return out.index_add_(-1, reads.pair_of_row.to(values.device), values)


# -- jobs: what one chunk of pairs computes, here or inside a session ---------------------------


def each(root: Any, job: Any, items: list) -> list:
    """Inside a session: ``job(root, *item)`` for every item (a stage's chunks, sent together)."""
    return [job(root, *item) for item in items]


def attribution_job(root: Any, paths: Paths, shape: Shape, pos: SideSpec, neg: SideSpec, steps: int,
                    pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EAP (``steps=1``) or EAP-IG of every edge on one chunk of pairs: the estimated effect per
    edge and pair [n_edges, pairs] and the shift m(positive) - m(negative) per pair. EAP-IG averages
    the gradient over inputs interpolated from the negative side's embedding to the positive's
    at ``(i + 1/2) / steps``."""
    B = Blocks(root, paths, shape)
    p, n = prepare_pair(root, B, pos, neg)
    a_neg = run(B, n, keep_outputs=True)  # also records the shared prefix
    total = None
    alphas = [1.0] if steps == 1 else [(i + 0.5) / steps for i in range(steps)]
    a_pos = None
    for alpha in alphas:
        embed = p.embed if alpha == 1.0 else n.embed + alpha * (p.embed - n.embed)
        grads, r = port_grads(B, p, embed=embed, keep_outputs=alpha == 1.0)
        a_pos = r if alpha == 1.0 else a_pos
        total = grads if total is None else total + grads
    if a_pos is None:
        a_pos = run(B, p, keep_outputs=True)
    products = edge_products(shape, a_pos.outputs - a_neg.outputs, total / len(alphas))
    return per_pair(products.cpu(), p.reads, pairs), (a_pos.metric - a_neg.metric).cpu()


@dataclass
class Patches:
    """One batch of exact edge patches: copies of the positive side (``seq``: the side's row of
    each copy, ``reads``: theirs), and per edge its upstream node, port and the copy rows it acts
    in; the run starts at ``layer``."""

    seq: torch.Tensor
    reads: Reads
    edges: list[tuple[int, int, torch.Tensor]]
    layer: int


def exact_job(root: Any, paths: Paths, shape: Shape, pos: SideSpec, neg: SideSpec, parts: list[Patches]
              ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Exact edge patching on one chunk of pairs: each edge of each part carries the negative
    side's value into its port, all else as is. The positive and negative metrics, and each
    part's patched metric per copy."""
    B = Blocks(root, paths, shape)
    p, n = prepare_pair(root, B, pos, neg)
    a_pos = run(B, p, keep_outputs=True)
    a_neg = run(B, n, keep_outputs=True)
    patched = []
    for part in parts:
        seq = part.seq.to(a_pos.outputs.device)
        shifts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for up, port, rows in part.edges:
            rows = rows.to(seq.device)
            value = a_neg.outputs[up, seq[rows]] - a_pos.outputs[up, seq[rows]]
            if port in shifts:  # another edge into the same port, in other rows
                r0, v0 = shifts[port]
                rows, value = torch.cat([r0, rows]), torch.cat([v0, value])
            shifts[port] = (rows, value)
        r = run(B, p.copies(seq, part.reads), cached=a_pos.outputs[:, seq], start_layer=part.layer, shifts=shifts)
        patched.append(r.metric.cpu())
    return a_pos.metric.cpu(), a_neg.metric.cpu(), patched


@dataclass
class Batch:
    """One batch of pairs for masked runs: both sides, the pairs' indices in the set and, for
    ``resample``, each positive row's donor row (another pair's)."""

    pos: SideSpec
    neg: SideSpec
    pairs: torch.Tensor
    donors: torch.Tensor


class Prepared:
    """Every batch of a set ready for masked runs: the positive side and the replacement outputs
    of each, with the full and empty metrics per pair. Replacement conventions (acting only at or
    after each pair's first differing token): ``counterfactual`` (the same pair's negative side),
    ``mean`` (the mean negative-side output over all pairs, columns aligned from the end),
    ``resample`` (another pair's negative side, ``others`` giving each row's donor row)."""

    def __init__(self, root: Any, paths: Paths, shape: Shape, batches: list[Batch], convention: str,
                 n_pairs: int) -> None:
        self.B, self.n_pairs = Blocks(root, paths, shape), n_pairs
        self.batches: list[tuple[torch.Tensor, Side, torch.Tensor]] = []
        means = _column_means(root, self.B, batches) if convention != "counterfactual" else None
        self.full = torch.zeros(n_pairs, dtype=torch.float64)
        for b in batches:
            p, n = prepare_pair(root, self.B, b.pos, b.neg)
            a_pos = run(self.B, p, keep_outputs=True)
            a_neg = run(self.B, n, keep_outputs=True)
            self.full[b.pairs] = a_pos.metric.cpu().double()
            self.batches.append((b.pairs, p, _replacement(convention, p, a_pos.outputs, a_neg.outputs, means, b.donors)))
        self.empty = self.metric(torch.zeros(shape.n_up, shape.n_ports))

    def metric(self, mask: torch.Tensor) -> torch.Tensor:
        """The metric of every pair with only the mask's edges kept."""
        out = torch.zeros(self.n_pairs, dtype=torch.float64)
        for pairs, p, rep in self.batches:
            out[pairs] = run(self.B, p, mask=mask, replace=rep).metric.cpu().double()
        return out

    def faithfulness(self, mask: torch.Tensor) -> float:
        """Ratio of means over pairs: sum(m(circuit) - m(empty)) / sum(m(full) - m(empty))."""
        total = float((self.full - self.empty).sum())
        return float((self.metric(mask) - self.empty).sum()) / total if total != 0 else float("nan")


def _column_means(root: Any, B: Blocks, batches: list[Batch]) -> dict[int, torch.Tensor]:
    """Per offset from the end (-1 = last column): every node's mean negative-side output."""
    total: dict[int, torch.Tensor] = {}
    count: dict[int, int] = {}
    for b in batches:
        _, n = prepare_pair(root, B, b.pos, b.neg)
        out = run(B, n, keep_outputs=True).outputs
        for c in range(n.width):
            off = c - n.width
            keep = n.own[:, c]
            if keep.any():
                total[off] = total.get(off, 0) + out[:, keep, c].sum(1)
                count[off] = count.get(off, 0) + int(keep.sum())
    return {off: total[off] / count[off] for off in total}


def _replacement(convention: str, pos: Side, a_pos: torch.Tensor, a_neg: torch.Tensor,
                 means: dict[int, torch.Tensor] | None, donors: torch.Tensor) -> torch.Tensor:
    """The replacement outputs [n_up, rows, S, d] of one batch under a convention."""
    if convention == "counterfactual":
        return a_neg
    out = a_pos.clone()
    S = pos.width
    for c in range(S):
        rows = pos.own[:, c]
        if rows.any():
            out[:, rows, c] = means[c - S][:, None].to(out.dtype)
    if convention == "resample":
        for r, o in enumerate(donors.tolist()):
            cols = pos.own[r] & pos.own[o]
            out[:, r, cols] = a_neg[:, o, cols]
    return out


def mask_of(shape: Shape, ups: torch.Tensor, ports: torch.Tensor) -> torch.Tensor:
    """[n_up, n_ports] float mask with 1 at the edges (ups[i], ports[i])."""
    m = torch.zeros(shape.n_up, shape.n_ports)
    m[ups.long(), ports.long()] = 1.0
    return m


def evaluate_job(root: Any, paths: Paths, shape: Shape, batches: list[Batch], convention: str, n_pairs: int,
                 circuits: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The full and empty metrics per pair and the metric with each circuit's edges (upstream
    and port indices) kept: [circuits, pairs]."""
    prepared = Prepared(root, paths, shape, batches, convention, n_pairs)
    metrics = [prepared.metric(mask_of(shape, ups, ports)) for ups, ports in circuits]
    metrics = torch.stack(metrics) if metrics else torch.zeros(0, n_pairs, dtype=torch.float64)
    return prepared.full, prepared.empty, metrics


def prune_job(root: Any, paths: Paths, shape: Shape, batches: list[Batch], convention: str, n_pairs: int,
              order: list[tuple[int, int]], threshold: float) -> tuple[list[bool], list[float], list[float], float]:
    """ACDC's greedy pass over candidate edges (upstream, port) in visiting order: each is dropped
    when dropping it lowers faithfulness by less than ``threshold``. Per edge: whether it was
    dropped, the faithfulness without it and the faithfulness after the visit; then the final one."""
    prepared = Prepared(root, paths, shape, batches, convention, n_pairs)
    mask = torch.zeros(shape.n_up, shape.n_ports)
    for u, p in order:
        mask[u, p] = 1.0
    current = prepared.faithfulness(mask)
    dropped, without, running = [], [], []
    for u, p in order:
        mask[u, p] = 0.0
        trial = prepared.faithfulness(mask)
        drop = current - trial < threshold
        if drop:
            current = trial
        else:
            mask[u, p] = 1.0
        dropped.append(bool(drop))
        without.append(trial)
        running.append(current)
    return dropped, without, running, current


# -- composition: heads read from the weights and from one run ----------------------------------


def _gain(norm: Any, d: int, like: torch.Tensor) -> torch.Tensor:
    """A norm's per-dimension gain: its output on sqrt(d) * unit vectors (rms 1), over sqrt(d)."""
    with torch.no_grad():
        eye = torch.eye(d, device=like.device, dtype=like.dtype) * d ** 0.5
        return torch.diagonal(norm(eye)).float() / d ** 0.5


@dataclass
class HeadWeights:
    """Per head (layer-major): W_Q, W_K, W_V ([hd, d], the attention norm's gain folded in) and
    W_O ([d, hd]), float32."""

    q: list[torch.Tensor] = field(default_factory=list)
    k: list[torch.Tensor] = field(default_factory=list)
    v: list[torch.Tensor] = field(default_factory=list)
    o: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def of(cls, B: Blocks) -> HeadWeights:
        hw, H, G, hd = cls(), B.H, B.G, B.hd
        for b in B.blocks:
            w = b["q_proj"].weight
            d = w.shape[-1]
            gain = _gain(b["attn_norm"], d, w)
            wq = w.detach().float().view(H, hd, d) * gain
            wk = b["k_proj"].weight.detach().float().view(G, hd, d) * gain
            wv = b["v_proj"].weight.detach().float().view(G, hd, d) * gain
            wo = b["o_proj"].weight.detach().float().view(d, H, hd).permute(1, 0, 2)
            for h in range(H):
                kv = h // (H // G)
                hw.q.append(wq[h])
                hw.k.append(wk[kv])
                hw.v.append(wv[kv])
                hw.o.append(wo[h])
        return hw


def _fro(left: torch.Tensor, right: torch.Tensor) -> float:
    """|left @ right|_F for [d, r] @ [r, d] factors, through r x r products."""
    return float(torch.sqrt(torch.clamp(torch.trace((left.T @ left) @ (right @ right.T)), min=0)))


def _ratio(num: float, den: float) -> float:
    """num / den, and 0 where a head has no weights (nothing composes with a zero matrix)."""
    return num / den if den > 0 else 0.0


def composition_job(root: Any, paths: Paths, shape: Shape, pairs: list[tuple[int, int]]) -> torch.Tensor:
    """Q-, K- and V-composition of each (earlier head, later head) pair of head indices: [pairs, 3]."""
    hw = HeadWeights.of(Blocks(root, paths, shape))
    rows = []
    for a, b in pairs:
        oa, va, qb, kb, ob, vb = hw.o[a], hw.v[a], hw.q[b], hw.k[b], hw.o[b], hw.v[b]
        n_ov_a, n_qk_b, n_ov_b = _fro(oa, va), _fro(qb.T, kb), _fro(ob, vb)
        rows.append([_ratio(_fro(kb.T, (qb @ oa) @ va), n_qk_b * n_ov_a),
                     _ratio(_fro(qb.T, (kb @ oa) @ va), n_qk_b * n_ov_a),
                     _ratio(_fro(ob, (vb @ oa) @ va), n_ov_b * n_ov_a)])
    return torch.tensor(rows, dtype=torch.float32).view(len(pairs), 3)


def head_figures_job(root: Any, paths: Paths, shape: Shape, pos: SideSpec,
                     claims: list[tuple[int, list[int], int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head and pair [heads, pairs]: the OV copy score (z-score among all vocabulary logits of
    the claimed token's logit, the head's OV circuit applied to the residual at the claim's last
    token and unembedded through the final norm's gain) and the attention the answer position
    pays to the claim's tokens. ``claims``: per pair its row, claim columns (relative to start),
    claimed token and answer column (relative to start)."""
    B = Blocks(root, paths, shape)
    hw = HeadWeights.of(B)
    p = prepare(root, B, pos)
    r = run(B, p, keep_outputs=True, attention_layers=range(shape.n_layers))
    out = r.outputs.float()
    unembed = B.unembed.weight.detach().float()
    gain = _gain(B.final_norm, out.shape[-1], r.outputs)
    H = shape.n_heads
    copy = torch.zeros(shape.n_layers * H, len(claims))
    attn = torch.zeros_like(copy)
    for i, (row, claim, token, answer_col) in enumerate(claims):
        for L in range(shape.n_layers):
            resid = out[:1 + L * (H + 1), row, claim[-1]].sum(0)
            x = resid / resid.pow(2).mean().sqrt()
            probs = r.attention[L][row, :, answer_col].float()  # [heads, T]
            for h in range(H):
                k = L * H + h
                logits = unembed @ (gain * (hw.o[k] @ (hw.v[k] @ x)))
                spread = float(logits.std())
                copy[k, i] = float(logits[token] - logits.mean()) / spread if spread > 0 else 0.0
                attn[k, i] = float(probs[h, [p.start + c for c in claim]].sum())
    return copy, attn
