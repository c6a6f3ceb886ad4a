"""Training steering vectors from a ContrastSet: mean difference (CAA), PCA, probe direction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..batching import chunks
from ..errors import BehaviorLensError
from ..prompts.contrast import SIDES
from .edit import Edit

METHODS = ("mean_diff", "pca", "probe")


@torch.inference_mode()
def collect_resid(
    model: Any, contrast_set: Any, layers: Sequence[int], position: str = "last", batch_size: int = 16
) -> dict[str, dict[int, torch.Tensor]]:
    """Residual stream leaving each layer at a named position: ``{side: {layer: [pairs, d]}}``."""
    s, hf = model.sites, model.hf
    for layer in layers:
        s.check("resid_post", layer)
    out: dict[str, dict[int, list[torch.Tensor]]] = {side: {layer: [] for layer in layers} for side in SIDES}
    current: dict[str, Any] = {}

    def make(layer: int):
        def hook(module: Any, args: Any, output: Any) -> None:
            hs = output[0] if isinstance(output, tuple) else output
            out[current["side"]][layer].append(hs[current["rows"], current["cols"]].float().cpu())
        return hook

    handles = [s.module(hf, "resid_post", layer).register_forward_hook(make(layer)) for layer in layers]
    try:
        for side in SIDES:
            for idx in chunks(len(contrast_set), batch_size):
                pairs = [contrast_set[i] for i in idx]
                batch = model.batch([p.tokens[side] for p in pairs])
                current.update(side=side, rows=torch.arange(len(pairs)),
                               cols=batch.columns([p.position(side, position) for p in pairs]))
                # only the blocks up to the deepest requested layer matter, but a full forward
                # keeps this independent of the architecture
                hf(**batch.inputs(), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {side: {layer: torch.cat(v) for layer, v in d.items()} for side, d in out.items()}


def train_vector(
    model: Any,
    contrast_set: Any,
    layers: int | Sequence[int],
    method: str = "mean_diff",
    position: str = "last",
    batch_size: int = 16,
) -> Edit:
    """A steering vector per layer pointing from the control side to the behavior side.

    ``mean_diff``: mean(positive) - mean(negative) at ``position`` (CAA). ``pca``: the first
    principal direction of the paired differences, signed and scaled like the mean difference
    projected on it. ``probe``: a logistic-regression probe's weight direction, scaled the same
    way. Adding the vector pushes toward the behavior; a negative multiplier pushes away.
    """
    if method not in METHODS:
        raise BehaviorLensError(f"unknown steering method {method!r}; methods are {', '.join(METHODS)}")
    layers = [layers] if isinstance(layers, int) else list(layers)
    if not layers:
        raise BehaviorLensError("train_vector needs at least one layer")
    if len(contrast_set) < 2:
        raise BehaviorLensError(f"set {contrast_set.name!r} has {len(contrast_set)} pairs; need at least 2")
    acts = collect_resid(model, contrast_set, layers, position, batch_size)
    vectors = {}
    for layer in layers:
        pos, neg = acts["positive"][layer].double(), acts["negative"][layer].double()
        mean_diff = pos.mean(0) - neg.mean(0)
        if method == "mean_diff":
            vec = mean_diff
        else:
            direction = _pca_direction(pos - neg) if method == "pca" else _probe_direction(pos, neg)
            proj = float(mean_diff @ direction)
            # signed and scaled by the mean difference: a positive multiplier still pushes
            # toward the behavior
            vec = direction * (proj if proj != 0 else 1.0)
        vectors[layer] = vec.float()
    s = model.sites
    return Edit(kind="vector", vectors=vectors, model=model.name, family=contrast_set.name,
                position=position, method=method, d_model=s.d_model, n_heads=s.n_heads,
                head_dim=s.head_dim, notes={"pairs": len(contrast_set)})


def _pca_direction(diffs: torch.Tensor) -> torch.Tensor:
    """Unit first principal direction of paired differences (uncentered), signed like their mean."""
    _, _, vt = torch.linalg.svd(diffs, full_matrices=False)
    d = vt[0]
    return d if float(d @ diffs.mean(0)) >= 0 else -d


def _probe_direction(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Unit weight direction of a logistic-regression probe separating the two sides."""
    from sklearn.linear_model import LogisticRegression

    x = torch.cat([pos, neg]).numpy()
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    scale = x.std(0) + 1e-8
    clf = LogisticRegression(C=1.0, max_iter=2000).fit((x - x.mean(0)) / scale, y)
    w = torch.from_numpy(clf.coef_[0] / scale)
    return w / w.norm()
