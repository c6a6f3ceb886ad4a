"""Applying edits at run time: :func:`steer` puts an edit's interventions
(:func:`behaviorlens.edits.interventions`) in force while a block runs, as
local hooks or inside the traces of a remote model (:func:`behaviorlens.interventions.hooks.applied`,
which also says what ``positions`` means); every context manager undoes its edit on exit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ..batching import chunks
from ..chat import Scaffold
from ..edits import POSITIONS, Edit, interventions
from ..edits.kinds.knockout import knockouts
from ..errors import BehaviorLensError
from ..interventions.hooks import applied
from ..reads import masked_sums


def _check_positions(positions: str) -> None:
    if positions not in POSITIONS:
        raise BehaviorLensError(f"unknown positions {positions!r}; use one of {', '.join(POSITIONS)}")


@contextmanager
def steer(
    model: Any,
    edit: Edit,
    strength: float = 1.0,
    layers: Sequence[int] | None = None,
    positions: str | None = None,
) -> Iterator[Edit]:
    """Apply an edit while the block runs; removes every hook (and restores weights) on exit.

    - ``vector``: ``strength * vector`` is added to the residual stream leaving each layer
      (``layers`` picks a subset of the edit's layers, or moves a one-layer vector elsewhere);
    - ``ablate_direction``: ``strength`` times the component along the direction is removed
      from everything written into the residual stream (1 = ablation, 2 = reflection);
    - ``heads``: each head moves ``strength`` of the way to its stored value (or scale), or
      gets ``strength`` times its stored vector added (``add``);
    - ``knockout``: attention of the heads to the detected tokens is blocked (it has no
      strength: any strength other than 0 blocks it fully);
    - ``subspace``: the subspace coordinates move ``strength`` of the way to its point's;
    - ``weights``: ``strength`` times the stored differences are added to the parameters.

    ``positions`` defaults to the edit's own.
    """
    positions = edit.positions if positions is None else positions
    _check_positions(positions)
    edit.check(model)
    edit.spec.check_readouts(edit)
    decoys = edit.detector is not None and edit.detector.decoy is not None
    with applied(model, interventions(edit, model, strength, layers, positions),
                  Scaffold(model.tokenizer) if decoys else None):
        yield edit


@contextmanager
def knockout(model: Any, heads: dict[int, Sequence[int]], blocked: torch.Tensor,
             positions: str = "generated") -> Iterator[None]:
    """Block attention of ``heads`` ({layer: [head, ...]}) from the ``positions`` query tokens to
    the key columns where ``blocked`` ([batch, padded columns] bool, for the next batch run) is
    true: the mechanism test of a path, with key tokens given (e.g. a family's slot tokens)."""
    _check_positions(positions)
    with applied(model, knockouts(model, heads, positions, blocked)):
        yield


def direction_edit(model: Any, direction: torch.Tensor, layer: int = -1, **meta: Any) -> Edit:
    """An ablate_direction edit for a raw direction (normalized to unit length)."""
    direction = torch.as_tensor(direction).detach().float().cpu().flatten()
    norm = direction.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise BehaviorLensError("cannot ablate a zero or non-finite direction")
    s = model.sites
    meta.setdefault("method", "direction")
    return Edit(kind="ablate_direction", vectors={layer: direction / norm}, model=model.name,
                d_model=s.d_model, n_heads=s.n_heads, head_dim=s.head_dim, **meta)


@contextmanager
def ablate_direction(model: Any, direction: torch.Tensor | Edit, positions: str = "all") -> Iterator[Edit]:
    """Project a direction out of the residual stream at every layer and position."""
    edit = direction if isinstance(direction, Edit) else direction_edit(model, direction)
    with steer(model, edit, 1.0, positions=positions) as e:
        yield e


@torch.inference_mode()
def head_means(
    model: Any, reference: Any, layers: Sequence[int], position: str = "all", batch_size: int = 16,
    sides: Sequence[str] = ("positive", "negative"),
) -> dict[int, torch.Tensor]:
    """Mean output of every head of the given layers over a ContrastSet's ``sides``.

    ``position="all"`` averages over every real token; a position name (e.g. ``"last"``)
    averages over that token of each prompt.
    """
    batches, masks = [], []
    for side in sides:
        for idx in chunks(len(reference), batch_size):
            pairs = [reference[i] for i in idx]
            batch = model.batch([p.tokens[side] for p in pairs])
            if position == "all":
                mask = batch.attention_mask.bool().cpu()
            else:
                mask = torch.zeros(batch.input_ids.shape, dtype=torch.bool)
                mask[torch.arange(len(pairs)), batch.columns([p.position(side, position) for p in pairs]).cpu()] = True
            batches.append(batch)
            masks.append(mask)
    sums = masked_sums(model, batches, masks, "head", layers)
    count = sum(int(m.sum()) for m in masks)
    return {layer: (v / max(count, 1)).float() for layer, v in sums.items()}


def head_edit(
    model: Any,
    heads: dict[int, Sequence[int]],
    mode: str = "zero",
    reference: Any = None,
    means: dict[int, torch.Tensor] | None = None,
    scale: float = 0.0,
    position: str = "all",
    **meta: Any,
) -> Edit:
    """A heads edit: zero-, mean-ablate (means from ``reference`` or given) or scale heads.

    A mean ablation keeps the means of every layer it was given (all layers when computed
    from ``reference``): its random control draws heads from any layer.
    """
    s = model.sites
    heads = {int(k): list(v) for k, v in heads.items() if len(v)}
    for layer, hs in heads.items():
        for h in hs:
            s.check("head", layer, h)
    values: dict[int, torch.Tensor] = {}
    if mode == "mean":  # every layer's means are kept, so a random control can draw any head
        if means is None:
            if reference is None:
                raise BehaviorLensError("mean head ablation needs a reference ContrastSet or means")
            means = head_means(model, reference, range(s.n_layers), position=position)
        missing = sorted(set(heads) - set(means))
        if missing:
            raise BehaviorLensError(f"mean head ablation has no mean values for layers {missing}")
        values = dict(means)
    meta.setdefault("method", f"{mode}_heads")
    if reference is not None:
        meta.setdefault("family", reference.name)
    return Edit(kind="heads", heads=heads, head_values=values, head_mode=mode, scale=scale,
                model=model.name, read_at=position, d_model=s.d_model, n_heads=s.n_heads,
                head_dim=s.head_dim, **meta)


@contextmanager
def ablate_heads(
    model: Any,
    heads: dict[int, Sequence[int]],
    mode: str = "zero",
    reference: Any = None,
    means: dict[int, torch.Tensor] | None = None,
    positions: str = "all",
) -> Iterator[Edit]:
    """Zero- or mean-ablate attention heads (``{layer: [head, ...]}``) while the block runs."""
    if mode not in ("zero", "mean"):
        raise BehaviorLensError(f"unknown head ablation mode {mode!r}; use 'zero' or 'mean'")
    edit = head_edit(model, heads, mode, reference=reference, means=means)
    with steer(model, edit, 1.0, positions=positions) as e:
        yield e


@contextmanager
def scale_heads(model: Any, heads: dict[int, Sequence[int]], factor: float, positions: str = "all") -> Iterator[Edit]:
    """Multiply the outputs of attention heads by ``factor`` while the block runs."""
    edit = head_edit(model, heads, "scale", scale=factor)
    with steer(model, edit, 1.0, positions=positions) as e:
        yield e
