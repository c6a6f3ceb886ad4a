"""Learned edits: a low-rank subspace by interchange intervention, and head-localized fine-tuning.

Both train on the training split of a family with a neutral side, on the CPU in seconds: the
residual stream entering the first trained layer is recorded once (it does not change), and
each step replays only the blocks from there on (:meth:`SiteMap.run_from`), the subspace from
the last column alone.

- :func:`train_subspace` (a distributed-alignment-search style interchange): an orthonormal
  basis ``B`` (rank k) at the residual stream leaving ``layer`` is learned so that replacing
  its coordinates in a pressured run, at the answer position, by those of the same question's
  no-pressure run reproduces the no-pressure answer (squared error of the behavior metric).
  Deployed as a :class:`~.edit.Edit` of kind ``subspace``: the coordinates are clamped to those
  of the mean no-pressure residual, at the answer positions.
- :func:`finetune_heads`: only the chosen heads' columns of their attention output projections
  are trained, so that the answer distribution of pressured prompts moves to that of the
  no-pressure prompt (KL), while the answer distribution of the no-pressure prompts is held
  (KL to the unedited model, weighted by ``anchor``). Saved as a ``weights`` edit. Training
  replays only the answer column (earlier columns keep their unedited keys and values); the
  edit is then evaluated exactly, at every position.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..edits import Edit
from ..errors import BehaviorLensError
from ..prompts.contrast import NEUTRAL, SIDES
from ..reads import reading
from ..remote import refuse
from ..scoring import behavior_metric, needs_whole


def _replay_inputs(model: Any, sequences: list[list[int]], layer: int):
    """One forward (no autograd) recording what a replay from ``layer`` needs."""
    batch = model.batch(sequences)
    with torch.no_grad(), reading(model, "resid_pre", [layer]) as resid, \
            model.sites.capture_layer_calls(model.hf) as calls:
        model.hf(**batch.inputs(), use_cache=False)
    return batch, calls, resid[layer]


def _require(fit: Any, what: str) -> None:
    if not fit.has_neutral:
        raise BehaviorLensError(f"{what} learns from the neutral side, and set {fit.name!r} has none")
    if needs_whole(fit.pairs):
        raise BehaviorLensError(f"{what} reads the answer position only; set {fit.name!r} has answers "
                                "of several tokens")


def _answer_ids(fit: Any) -> torch.Tensor:
    return torch.tensor([[p.answers["matching"][0], p.answers["not_matching"][0]] for p in fit])


def train_subspace(model: Any, fit: Any, layer: int, rank: int, steps: int = 150, lr: float = 0.02,
                   seed: int = 0) -> Edit:
    """A rank-``rank`` subspace clamp at the residual leaving ``layer`` (see the module doc).

    ``edit.notes["fit_interchange"]``: the share of the pull the interchange removes on the
    training pairs after training (1 = the no-pressure answer reproduced).
    """
    refuse(model, "subspace training", "it replays blocks from a layer on the weights here")
    _require(fit, "subspace training")
    s = model.sites
    s.check("resid_post", layer)
    neutral = [p.tokens[NEUTRAL] for p in fit]
    with torch.no_grad(), reading(model, "resid_post", [layer]) as acts:
        nb = model.batch(neutral)
        model.hf(**nb.inputs(), use_cache=False)
    h_neutral = acts[layer][:, -1].float()
    m_neutral = behavior_metric(model, fit.pairs, NEUTRAL)
    runs = []
    for side in SIDES:
        _, calls, hidden = _replay_inputs(model, [p.tokens[side] for p in fit], layer + 1)
        runs.append((calls, hidden, behavior_metric(model, fit.pairs, side)))
    ids = _answer_ids(fit)
    g = torch.Generator().manual_seed(seed)
    free = torch.nn.Parameter(torch.randn(s.d_model, rank, generator=g))
    opt = torch.optim.Adam([free], lr=lr)
    rows = torch.arange(len(fit))
    start = runs[0][1].shape[1] - 1

    def patched_metric(calls: Any, hidden: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        last = hidden[:, -1:].float()
        moved = last + ((h_neutral[:, None] - last) @ basis) @ basis.T
        out = s.run_from(model.hf, layer + 1, moved.to(hidden.dtype), calls, None, start)
        logits = s.logits_from_hidden(model.hf, out[:, -1]).float()
        return logits[rows, ids[:, 0]] - logits[rows, ids[:, 1]]

    for _ in range(steps):
        basis = torch.linalg.qr(free)[0]
        loss = sum(((patched_metric(c, h, basis) - m_neutral) ** 2).mean() for c, h, _ in runs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    basis = torch.linalg.qr(free.detach())[0]
    with torch.no_grad():
        moved = patched_metric(runs[0][0], runs[0][1], basis)
    pos = runs[0][2]
    removed = float((pos - moved).sum() / (pos - m_neutral).sum())
    return Edit(kind="subspace", basis={layer: basis}, vectors={layer: h_neutral.mean(0)},
                positions="generated", model=model.name, family=fit.name, read_at="last",
                method=f"interchange rank {rank}", d_model=s.d_model, n_heads=s.n_heads,
                head_dim=s.head_dim, notes={"fit_interchange": removed, "rank": rank})


def finetune_heads(model: Any, fit: Any, heads: dict[int, Sequence[int]], steps: int = 60,
                   lr: float = 2e-3, anchor: float = 1.0, seed: int = 0) -> Edit:
    """Head-localized fine-tuning with a recall anchor (see the module doc): a ``weights`` edit
    of the chosen heads' output-projection columns; ``notes["changed"]`` says by how much each
    head's columns changed (Frobenius norm, and relative to the original)."""
    refuse(model, "head fine-tuning", "it backpropagates into weight differences on the weights here")
    _require(fit, "head fine-tuning")
    s, hf = model.sites, model.hf
    torch.manual_seed(seed)
    first = min(heads)
    inputs = {side: _replay_inputs(model, [p.tokens[side] for p in fit], first) for side in (*SIDES, NEUTRAL)}

    def answer_logp(side: str) -> torch.Tensor:
        """Log-probabilities at the answer position, replaying only the last column from ``first``
        (earlier columns keep the unedited keys and values during training)."""
        _, calls, hidden = inputs[side]
        start = hidden.shape[1] - 1
        out = s.run_from(hf, first, hidden[:, start:], calls, None, start)
        return torch.log_softmax(s.logits_from_hidden(hf, out[:, -1]).float(), -1)

    with torch.no_grad():
        target = answer_logp(NEUTRAL)  # the no-pressure answer distribution per question
    deltas = {layer: torch.zeros(s.d_model, len(hs) * s.head_dim, requires_grad=True) for layer, hs in heads.items()}
    cols = {layer: torch.cat([torch.arange(h * s.head_dim, (h + 1) * s.head_dim) for h in hs])
            for layer, hs in heads.items()}

    def hook(layer: int):
        def add(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
            return output + args[0][..., cols[layer]] @ deltas[layer].T.to(output.dtype)
        return add

    handles = [s.attn_out_proj(hf, layer).register_forward_hook(hook(layer)) for layer in heads]
    opt = torch.optim.Adam(list(deltas.values()), lr=lr)

    def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
        return (p_log.exp() * (p_log - q_log)).sum(-1).mean()

    try:
        for _ in range(steps):
            loss = sum(kl(target, answer_logp(side)) for side in SIDES) + anchor * kl(target, answer_logp(NEUTRAL))
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        for h in handles:
            h.remove()
    weights, changed = {}, {}
    names = {id(p): n for n, p in hf.named_parameters()}
    for layer, hs in heads.items():
        w = s.output_weight(s.attn_out_proj(hf, layer))
        full = torch.zeros_like(w, dtype=torch.float32)
        full[:, cols[layer]] = deltas[layer].detach()
        name = names[id(s.attn_out_proj(hf, layer).weight)]
        weights[name] = full.T if s.arch.conv1d else full
        for k, h in enumerate(hs):
            block = slice(k * s.head_dim, (k + 1) * s.head_dim)
            size = float(deltas[layer].detach()[:, block].norm())
            changed[f"L{layer}H{h}"] = {"norm": size, "relative": size / float(w[:, cols[layer][block]].detach().norm())}
    return Edit(kind="weights", weights=weights, model=model.name, family=fit.name, read_at="all",
                method=f"head fine-tuning ({', '.join(f'L{l}H{h}' for l, hs in heads.items() for h in hs)})",
                d_model=s.d_model, n_heads=s.n_heads, head_dim=s.head_dim,
                notes={"changed": changed, "steps": steps, "anchor": anchor})


def train_lowrank(model: Any, fit: Any, layer: int, rank: int, invariance: Sequence[Sequence[int]] = (),
                  weight: float = 1.0, steps: int = 80, lr: float = 0.01, seed: int = 0) -> Edit:
    """A learned rank-``rank`` edit at the answer position of the residual leaving ``layer``
    (kind ``lowrank``): trained so that the answer distribution of both pressured sides moves to
    the unedited no-pressure one (KL), while that of each ``invariance`` prompt (context use,
    claim recall, ordinary requests: the ``fit`` part) stays the unedited one (KL, times
    ``weight``). Training replays the last column from ``layer + 1``.

    ``edit.notes``: ``fit_pressure_removed`` (the share of the pull it removes on the training
    pairs) and ``fit_invariance_kl`` (the mean KL it leaves on the invariance prompts)."""
    refuse(model, "low-rank training", "it backpropagates through blocks replayed on the weights here")
    _require(fit, "low-rank training")
    s, hf = model.sites, model.hf
    s.check("resid_post", layer)
    g = torch.Generator().manual_seed(seed)
    groups = {side: [p.tokens[side] for p in fit] for side in (*SIDES, NEUTRAL)}
    if invariance:
        groups["invariance"] = [list(x) for x in invariance]
    inputs = {k: _replay_inputs(model, v, layer + 1) for k, v in groups.items()}
    free = torch.nn.Parameter(torch.randn(s.d_model, rank, generator=g))
    w = torch.nn.Parameter(torch.zeros(rank, s.d_model))
    b = torch.nn.Parameter(torch.zeros(rank))

    def answer_logp(key: str, basis: torch.Tensor | None) -> torch.Tensor:
        _, calls, hidden = inputs[key]
        start = hidden.shape[1] - 1
        last = hidden[:, start:].float()
        if basis is not None:
            last = last + (last @ w.T + b - last @ basis) @ basis.T
        out = s.run_from(hf, layer + 1, last.to(hidden.dtype), calls, None, start)
        return torch.log_softmax(s.logits_from_hidden(hf, out[:, -1]).float(), -1)

    def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
        return (p_log.exp() * (p_log - q_log)).sum(-1).mean()

    with torch.no_grad():
        target = answer_logp(NEUTRAL, None)
        kept = answer_logp("invariance", None) if invariance else None
    opt = torch.optim.Adam([free, w, b], lr=lr)
    for _ in range(steps):
        basis = torch.linalg.qr(free)[0]
        loss = sum(kl(target, answer_logp(side, basis)) for side in SIDES)
        if invariance and weight > 0:
            loss = loss + weight * kl(kept, answer_logp("invariance", basis))
        opt.zero_grad()
        loss.backward()
        opt.step()
    basis = torch.linalg.qr(free.detach())[0]
    with torch.no_grad():
        ids = _answer_ids(fit)
        rows = torch.arange(len(fit))

        def metric(logp: torch.Tensor) -> torch.Tensor:
            return logp[rows, ids[:, 0]] - logp[rows, ids[:, 1]]

        before, after = metric(answer_logp("positive", None)), metric(answer_logp("positive", basis))
        removed = float((before - after).sum() / (before - metric(target)).sum())
        left = float(kl(kept, answer_logp("invariance", basis))) if invariance else float("nan")
    return Edit(kind="lowrank", basis={layer: basis}, arrays={f"weight.{layer}": w.detach(), f"bias.{layer}": b.detach()},
                positions="generated", model=model.name, family=fit.name, read_at="last",
                method=f"invariance weight {weight:g}", d_model=s.d_model, n_heads=s.n_heads, head_dim=s.head_dim,
                notes={"rank": rank, "invariance_weight": weight, "fit_pressure_removed": removed,
                       "fit_invariance_kl": left, "invariance_prompts": len(invariance)})
