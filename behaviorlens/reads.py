"""Reading sites: the one place a stage reads activations from, on either backend.

- :func:`reading`: plain torch hooks that keep a site's value at each layer during the forwards
  run inside the block (local models; with ``keep_grad`` the live tensors, for gradients).
- :func:`site_values`: a site at each layer over one batch (a trace on a traced model).
- :func:`token_states`: the residual stream at every token of each sequence, the forward
  stopped after the last layer needed (on a traced model every batch together, as few sessions
  as the limits allow); inside :func:`remembered_states` each sequence is read once.
- :func:`states_at`: the residual stream at one chosen token per sequence and name.
- :func:`masked_sums`: a site's sum over chosen tokens of many batches (head means), one session
  on a remote model.
- :func:`read_planned`: planned reads at chosen columns (:class:`~.interventions.server.ReadBatch`),
  as few sessions as the limits allow on a remote model (collection's reads, token states).

Sites whose value is a module *input* (``resid_pre``: the block input; ``head``: the input of
the attention output projection) are read with forward pre-hooks, the others with forward
hooks; heads are seen as ``[batch, seq, n_heads, head_dim]``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import numpy as np
import torch

from .batching import Batch, chunks
from .interventions.server import ReadBatch, read_chunk
from .interventions.trace import now, traced_logits
from .remote import run_session, session_groups
from .sites import module_output

INPUT_SITES = ("resid_pre", "head")


def split_heads(model: Any, x: torch.Tensor) -> torch.Tensor:
    """``[..., n_heads * head_dim]`` seen as ``[..., n_heads, head_dim]``."""
    return x.view(*x.shape[:-1], model.sites.n_heads, model.sites.head_dim)


@contextmanager
def reading(model: Any, site: str, layers: Sequence[int], keep_grad: bool = False) -> Iterator[dict[int, torch.Tensor]]:
    """Collect the site's activation at each layer during the (local) forwards run inside the block.

    With ``keep_grad`` the live tensors (in the autograd graph) are kept instead of copies,
    so gradients with respect to them can be taken afterwards (heads then stay unsplit:
    ``[batch, seq, n_heads * head_dim]``).
    """
    found: dict[int, torch.Tensor] = {}
    handles = []

    def keep(layer: int, x: torch.Tensor) -> None:
        found[layer] = x if keep_grad else x.detach().clone()

    for layer in layers:
        module = model.sites.module(model.hf, site, layer)
        if site in INPUT_SITES:
            def pre(mod, args, layer=layer):
                x = args[0]  # with keep_grad, heads stay unsplit: a view is not in the graph
                keep(layer, split_heads(model, x) if site == "head" and not keep_grad else x)
            handles.append(module.register_forward_pre_hook(pre))
        else:
            def post(mod, args, out, layer=layer):
                keep(layer, module_output(out))
            handles.append(module.register_forward_hook(post))
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


class _Read(Exception):
    """Raised once the last layer a read needs has run: the rest of the forward is skipped."""


def _stop(*_: Any) -> None:
    raise _Read


@torch.inference_mode()
def site_values(model: Any, batch: Batch, site: str, layers: Sequence[int], stop: bool = False) -> dict[int, torch.Tensor]:
    """The site's activation at each layer over one batch. On a traced model one trace (every
    layer runs); locally hooks, and with ``stop`` the forward ends after the last of ``layers``."""
    if model.traced:
        _, reads = traced_logits(model, batch, reads=[model.sites.ref(site, layer) for layer in layers])
        return dict(zip(layers, reads))
    with reading(model, site, layers) as acts:
        handle = None
        if stop:
            last = model.sites.module(model.hf, "resid_post", max(layers))
            handle = last.register_forward_hook(_stop)
        try:
            model.hf(**batch.inputs(), use_cache=False)
        except _Read:
            pass
        finally:
            if handle is not None:
                handle.remove()
    return acts


_MEMO: ContextVar[dict | None] = ContextVar("token_states_memo", default=None)


@contextmanager
def remembered_states() -> Iterator[None]:
    """Inside, :func:`token_states` keeps what it read (per sequence and layer, unedited model)
    and reads each sequence once: refits of a detector on overlapping splits share their reads."""
    token = _MEMO.set({})
    try:
        yield
    finally:
        _MEMO.reset(token)


def token_states(model: Any, sequences: Sequence[Sequence[int]], layers: Sequence[int],
                 batch_size: int = 16) -> dict[int, list[np.ndarray]]:
    """The residual stream leaving each layer at every token of every sequence (unpadded,
    float32). Locally the forward stops after the last of ``layers``."""
    memo = _MEMO.get()
    if memo is None:
        return _token_states(model, sequences, layers, batch_size)
    keys = [(id(model), tuple(int(t) for t in seq)) for seq in sequences]
    missing = {layer: sorted({i for i, k in enumerate(keys) if (k, layer) not in memo}) for layer in layers}
    todo = sorted(set().union(*missing.values()))
    if todo:
        read = _token_states(model, [sequences[i] for i in todo], layers, batch_size)
        for layer in layers:
            for i, x in zip(todo, read[layer]):
                memo[(keys[i], layer)] = x
    return {layer: [memo[(k, layer)] for k in keys] for layer in layers}


def _token_states(model: Any, sequences: Sequence[Sequence[int]], layers: Sequence[int],
                  batch_size: int) -> dict[int, list[np.ndarray]]:
    out: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    if model.traced and not model.interventions:  # every batch in as few sessions as the limits allow
        parts = list(chunks(len(sequences), batch_size))
        batches = [model.batch([sequences[i] for i in idx]) for idx in parts]
        plans = [ReadBatch(b.inputs(), [model.sites.ref("resid_post", layer) for layer in layers], [], [])
                 for b in batches]
        ids = {"input_ids": torch.cat([b.input_ids.flatten().cpu() for b in batches])}
        values = now(ids, [], lambda: read_planned(model, plans, "reading token states"))
        for b, v in zip(batches, values):
            v = v.float().cpu().view(len(b), len(layers), b.input_ids.shape[1], -1)
            for j, layer in enumerate(layers):
                out[layer] += [v[k, j, int(b.offsets[k]):].numpy() for k in range(len(b))]
        return out
    for idx in chunks(len(sequences), batch_size):
        batch = model.batch([sequences[i] for i in idx])
        acts = site_values(model, batch, "resid_post", layers, stop=True)
        for layer in layers:
            out[layer] += [acts[layer][j, int(batch.offsets[j]):].float().cpu().numpy() for j in range(len(idx))]
    return out


def states_at(model: Any, sequences: Sequence[Sequence[int]], layers: Sequence[int],
              columns: Mapping[str, Sequence[int]], batch_size: int = 16) -> dict[str, np.ndarray]:
    """The residual stream (``resid_post``) at one token of each sequence per name in ``columns``
    (a token index per sequence; negative: undefined, read as zeros): name -> [n, layers, d] float32.
    On a traced model only those tokens come back, every batch in as few sessions as the limits allow."""
    layers = [int(x) for x in layers]
    for layer in layers:
        model.sites.check("resid_post", layer)
    n = len(sequences)
    out = {name: np.zeros((n, len(layers), model.sites.d_model), dtype=np.float32) for name in columns}
    if model.traced and not model.interventions:
        names, parts = list(columns), list(chunks(n, batch_size))
        batches = [model.batch([sequences[i] for i in idx]) for idx in parts]
        refs = [model.sites.ref("resid_post", layer) for layer in layers]
        plans = [ReadBatch(b.inputs(), refs, [torch.tensor([max(int(columns[name][i]), 0) for i in idx])
                                              + b.offsets.cpu() for name in names], [False] * len(names))
                 for idx, b in zip(parts, batches)]
        ids = {"input_ids": torch.cat([b.input_ids.flatten().cpu() for b in batches])}
        values = now(ids, [], lambda: read_planned(model, plans, "reading states"))
        for idx, v in zip(parts, values):
            v = v.float().cpu().view(len(idx), len(layers), len(names), -1).numpy()
            for k, i in enumerate(idx):
                for a, name in enumerate(names):
                    if int(columns[name][i]) >= 0:
                        out[name][i] = v[k, :, a]
        return out
    for idx in chunks(n, batch_size):
        states = token_states(model, [sequences[i] for i in idx], layers, batch_size)
        for j, layer in enumerate(layers):
            for k, i in enumerate(idx):
                for name, cols in columns.items():
                    t = int(cols[i])
                    if t >= 0:
                        out[name][i, j] = states[layer][k][t]
    return out


def masked_sums(model: Any, batches: Sequence[Batch], masks: Sequence[torch.Tensor], site: str,
                layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Per layer, the site's value summed over the tokens each boolean mask (``[rows, width]`` of
    its batch) picks, over every batch: float64, the site's shape. On a traced model every batch
    goes in one session, which returns each row's mean over its picked tokens (so a low-precision
    dtype rounds a mean, not a sum); locally hooks, each forward stopped after the last layer."""
    layers = sorted(int(x) for x in layers)
    shape = (model.sites.n_heads, model.sites.head_dim) if site == "head" else (model.sites.d_model,)
    sums = {layer: torch.zeros(shape, dtype=torch.float64) for layer in layers}
    if model.traced:
        counts = [m.sum(1, keepdim=True).clamp(min=1) for m in masks]
        plans = [ReadBatch(b.inputs(), [model.sites.ref(site, layer) for layer in layers],
                           [(m / c).to(model.device)], [True]) for b, m, c in zip(batches, masks, counts)]
        size = int(np.prod(shape))
        for values, count in zip(read_planned(model, plans, f"summing {site}"), counts):
            weighted = values.double().cpu() * count.double()
            for j, layer in enumerate(layers):
                sums[layer] += weighted[:, j * size:(j + 1) * size].sum(0).view(shape)
        return sums
    for batch, mask in zip(batches, masks):
        acts = site_values(model, batch, site, layers, stop=True)
        for layer in layers:
            x = acts[layer].float()
            sums[layer] += x[mask.to(x.device)].sum(0).double().cpu()
    return sums


def read_planned(model: Any, plans: list[ReadBatch], what: str) -> list[torch.Tensor]:
    """Each planned forward's values (``[rows, features]``): on a remote model, as few sessions as
    its limits allow (what comes back counted too)."""
    d = model.sites.d_model
    returned = [4 * d * len(p.refs) * p.inputs["input_ids"].shape[0] * (len(p.picks) or p.inputs["input_ids"].shape[1])
                for p in plans]
    out: list[torch.Tensor] = []
    for group in session_groups(plans, model.session_limits, fixed=0, returned=returned):
        out += run_session(model, read_chunk, group, what=what)
    return out
