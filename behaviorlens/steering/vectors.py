"""Training steering vectors from a ContrastSet: mean difference (CAA), PCA, probe direction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..edits import Edit
from ..errors import BehaviorLensError
from ..probing import collect, make_probe

VECTOR_METHODS = ("mean_diff", "pca", "probe")


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
    projected on it. ``probe``: a logistic probe's direction (:mod:`behaviorlens.probing`), scaled the same
    way. Adding the vector pushes toward the behavior; a negative strength pushes away.
    """
    if method not in VECTOR_METHODS:
        raise BehaviorLensError(f"unknown steering method {method!r}; methods are {', '.join(VECTOR_METHODS)}")
    layers = [layers] if isinstance(layers, int) else list(layers)
    if not layers:
        raise BehaviorLensError("train_vector needs at least one layer")
    if len(contrast_set) < 2:
        raise BehaviorLensError(f"set {contrast_set.name!r} has {len(contrast_set)} pairs; need at least 2")

    acts = collect(model, contrast_set, sites=("resid_post",), positions=(position,), layers=layers,
                   batch_size=batch_size, progress=False)
    vectors = {}
    for layer in layers:
        x = acts.features("resid_post", position, layer)
        pos = torch.from_numpy(x[acts.labels.numpy() == 1]).double()
        neg = torch.from_numpy(x[acts.labels.numpy() == 0]).double()
        mean_diff = pos.mean(0) - neg.mean(0)
        if method == "mean_diff":
            vec = mean_diff
        else:
            if method == "pca":
                direction = _pca_direction(pos - neg)
            else:
                probe = make_probe("logistic").fit(x, acts.labels.numpy(), acts.pair_ids.numpy())
                direction = torch.from_numpy(probe.direction).double()
            proj = float(mean_diff @ direction)
            # signed and scaled by the mean difference: a positive strength still pushes
            # toward the behavior
            vec = direction * (proj if proj != 0 else 1.0)
        vectors[layer] = vec.float()
    s = model.sites
    return Edit(kind="vector", vectors=vectors, model=model.name, family=contrast_set.name,
                read_at=position, method=method, d_model=s.d_model, n_heads=s.n_heads,
                head_dim=s.head_dim, notes={"pairs": len(contrast_set)})


def _pca_direction(diffs: torch.Tensor) -> torch.Tensor:
    """Unit first principal direction of paired differences (uncentered), signed like their mean."""
    _, _, vt = torch.linalg.svd(diffs, full_matrices=False)
    d = vt[0]
    return d if float(d @ diffs.mean(0)) >= 0 else -d
