"""Exact activation patching at the last prompt token, for choosing edits.

A minimal, private stand-in until ``behaviorlens.patching`` is available: each head output
(and residual stream) of the behavior side at the last token is replaced by its value on the
control side, and the behavior metric is re-read. Because only the last token changes, the
prompt minus its last token runs once with a KV cache and every patch is a one-token step.

The table uses the patching package's columns (site, layer, head, position, position_name,
token, pair, metric) with metric = (patched - positive) / (negative - positive): the fraction
of the pair's behavior shift that patching that one site removes.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..analysis.metrics import logit_diff
from ..batching import chunks


@torch.inference_mode()
def patch_last(model: Any, cset: Any, batch_size: int = 32, progress: bool = False) -> pd.DataFrame:
    """Head and resid_post patching (control side into behavior side) at the last token."""
    cset.require_aligned("patching")
    s, hf = model.sites, model.hf
    rows: list[dict] = []
    for idx in chunks(len(cset), batch_size):
        pairs = [cset[i] for i in idx]
        ids = torch.tensor([p.answer_ids for p in pairs])
        neg_heads, neg_resid, neg_metric = _control_values(model, pairs, ids)
        prefix = model.batch([p.tokens["positive"][:-1] for p in pairs])
        last = torch.tensor([[p.tokens["positive"][-1]] for p in pairs], device=model.device)
        mask = torch.cat([prefix.attention_mask, torch.ones_like(last)], 1)
        pos = torch.tensor([[len(p.tokens["positive"]) - 1] for p in pairs], device=model.device)
        out = hf(**prefix.inputs(), use_cache=True)
        cache, n_prefix = out.cache, prefix.input_ids.shape[1]

        def step(hooks: list[tuple[Any, Any, bool]] = (), rep: int = 1) -> torch.Tensor:
            handles = [(m.register_forward_pre_hook(h) if pre else m.register_forward_hook(h))
                       for m, h, pre in hooks]
            try:
                logits = hf(input_ids=last.repeat_interleave(rep, 0), attention_mask=mask.repeat_interleave(rep, 0),
                            position_ids=pos.repeat_interleave(rep, 0), cache=cache, use_cache=True).logits[:, -1]
            finally:
                for h in handles:
                    h.remove()
                extra = cache.get_seq_length() - n_prefix
                if extra > 0:
                    cache.crop(-extra)
            return logit_diff(logits, ids.repeat_interleave(rep, 0)[:, 0], ids.repeat_interleave(rep, 0)[:, 1]).cpu()

        pos_metric = step()
        denom = neg_metric - pos_metric
        # one step per layer: row (pair, variant), variant 0 patches the residual stream,
        # variant 1 + h patches head h
        rep = 1 + s.n_heads
        cache.batch_repeat_interleave(rep)
        variant = torch.arange(len(pairs) * rep) % rep
        for layer in tqdm(range(s.n_layers), desc="patching at last", disable=not progress):
            hooks = [
                (s.module(hf, "head", layer), _head_hook(neg_heads[layer], variant, s.n_heads, s.head_dim), True),
                (s.module(hf, "resid_post", layer), _resid_hook(neg_resid[layer], variant, rep), False),
            ]
            patched = step(hooks, rep).view(len(pairs), rep)
            metric = (patched - pos_metric[:, None]) / denom[:, None]
            for j, i in enumerate(idx):
                p = cset[i]
                for v in range(rep):
                    rows.append({
                        "site": "resid_post" if v == 0 else "head", "layer": layer,
                        "head": v - 1, "position": p.position("positive", "last"),
                        "position_name": "last", "token": p.tokens["positive"][-1], "pair": i,
                        "metric": float(metric[j, v]),
                    })
    return pd.DataFrame(rows)


def _control_values(model: Any, pairs: list, ids: torch.Tensor):
    """Last-token head outputs and residual streams of the control side, and its metric."""
    s, hf = model.sites, model.hf
    heads: dict[int, torch.Tensor] = {}
    resid: dict[int, torch.Tensor] = {}
    handles = []
    for layer in range(s.n_layers):
        def pre(m, a, layer=layer):
            heads[layer] = a[0][:, -1].view(-1, s.n_heads, s.head_dim).clone()
        def post(m, a, o, layer=layer):
            resid[layer] = (o[0] if isinstance(o, tuple) else o)[:, -1].clone()
        handles.append(s.module(hf, "head", layer).register_forward_pre_hook(pre))
        handles.append(s.module(hf, "resid_post", layer).register_forward_hook(post))
    try:
        batch = model.batch([p.tokens["negative"] for p in pairs])
        logits = hf(**batch.inputs(), use_cache=False).logits[:, -1]
    finally:
        for h in handles:
            h.remove()
    return heads, resid, logit_diff(logits, ids[:, 0], ids[:, 1]).cpu()


def _head_hook(values: torch.Tensor, variant: torch.Tensor, n_heads: int, head_dim: int):
    """Rows with variant 1 + h get head h of the control side (values: [pairs, heads, dim])."""
    rep = 1 + n_heads
    rows = torch.nonzero(variant > 0).flatten()
    heads = variant[rows] - 1
    src = values[rows // rep, heads]

    def hook(module: Any, args: tuple) -> tuple:
        x = args[0].clone()
        view = x.view(*x.shape[:-1], n_heads, head_dim)
        view[rows.to(x.device), -1, heads.to(x.device)] = src.to(x.device, x.dtype)
        return (x, *args[1:])

    return hook


def _resid_hook(values: torch.Tensor, variant: torch.Tensor, rep: int):
    """Rows with variant 0 get the control side's residual stream (values: [pairs, d])."""
    rows = torch.nonzero(variant == 0).flatten()
    src = values[rows // rep]

    def hook(module: Any, args: tuple, output: Any) -> Any:
        hs = (output[0] if isinstance(output, tuple) else output).clone()
        hs[rows.to(hs.device), -1] = src.to(hs.device, hs.dtype)
        return (hs, *output[1:]) if isinstance(output, tuple) else hs

    return hook
