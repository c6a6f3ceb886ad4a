"""What could dissolve a probe result: wording alone, and choosing the best of a grid.

- :func:`wording_features` / :func:`wording_baseline`: the same probe fitted, with the same
  folds, on representations that hold only the wording: bag-of-tokens counts of each prompt,
  and the input embeddings of the tokens where the two sides of the pair differ. A probe whose
  AUROC the wording baseline reaches (within the probe's CI) may be reading the words, not a
  hidden variable (``wording_explains``).
- :func:`nested_best`: the best unit (site, layer, head, position, method) is chosen on inner
  folds of each outer training split and scored on the outer fold it never saw (folds grouped
  by pair), so the reported AUROC and its CI include the selection.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..errors import BehaviorLensError
from ..prompts.contrast import SIDES
from ..stats import bootstrap_auroc
from .activations import Activations
from .probes import make_probe
from .sweep import cross_validate, pair_folds, parallel_map


def wording_features(model: Any, contrast_set: Any) -> dict[str, np.ndarray]:
    """Per sample (``2 * i`` = positive side of pair ``i``, ``2 * i + 1`` = negative): bag-of-tokens
    counts of the prompt, and the mean input embedding of the tokens where the pair's sides differ."""
    samples = [p.tokens[side] for p in contrast_set for side in SIDES]
    vocab = {t: j for j, t in enumerate(sorted({t for s in samples for t in s}))}
    counts = np.zeros((len(samples), len(vocab)))
    for i, seq in enumerate(samples):
        for t in seq:
            counts[i, vocab[t]] += 1
    embed = model.sites.embedding(model.hf).weight
    rows = []
    for p in contrast_set:
        a, b = p.tokens["positive"], p.tokens["negative"]
        differ = [j for j in range(min(len(a), len(b))) if a[j] != b[j]] or [min(len(a), len(b)) - 1]
        for seq in (a, b):
            ids = torch.tensor([seq[j] for j in differ if j < len(seq)], device=embed.device)
            rows.append(embed[ids].float().mean(0).detach().cpu().numpy())
    return {"bag_of_tokens": counts, "differing_embeddings": np.stack(rows)}


def wording_baseline(features: dict[str, np.ndarray], labels: np.ndarray, pair_ids: np.ndarray,
                     methods: Sequence[str], folds: int = 5, seed: int = 0) -> pd.DataFrame:
    """AUROC (mean over the same pair-grouped folds as the sweep) of each probe method on each
    wording representation."""
    splits = pair_folds(pair_ids, folds, seed)
    rows = []
    for kind, X in features.items():
        for method in methods:
            _, aucs, _ = cross_validate(method, X, labels, pair_ids, splits, seed)
            rows.append({"representation": kind, "method": method, "auroc": float(np.mean(aucs))})
    return pd.DataFrame(rows)


def mark_wording(table: pd.DataFrame, baseline: pd.DataFrame) -> pd.DataFrame:
    """Add ``wording_auroc`` (the best wording representation for the row's method) and
    ``wording_explains`` (it reaches the probe's AUROC CI) to a sweep table."""
    best = baseline.groupby("method")["auroc"].max()
    out = table.copy()
    out["wording_auroc"] = out["method"].map(best)
    out["wording_explains"] = out["wording_auroc"] >= out["auroc_ci_low"]
    return out


def nested_best(activations: Activations, methods: Sequence[str], folds: int = 5, inner: int = 3,
                seed: int = 0, n_boot: int = 1000) -> dict[str, Any]:
    """Selection inside the score: see the module doc. Returns ``best_auroc`` (mean over outer
    folds), ``best_auroc_ci`` (pair bootstrap of the outer folds' scores) and what each outer
    fold chose."""
    y = activations.labels.numpy()
    groups = activations.pair_ids.numpy()
    units = [(site, pos, layer, head)
             for site in activations.sites for pos in activations.positions
             for layer in activations.layers
             for head in (range(activations.get(site, pos).shape[2]) if site == "head" else [None])]
    outer = pair_folds(groups, folds, seed)
    oof = np.empty(len(y))
    aucs, chosen = [], []
    from sklearn.metrics import roc_auc_score

    for train, test in outer:
        if len(np.unique(groups[train])) < inner:
            raise BehaviorLensError(f"nested selection needs at least {inner} pairs in every outer training split")
        inner_splits = pair_folds(groups[train], inner, seed + 1)
        def inner_scores(unit: tuple, train=train, inner_splits=inner_splits) -> list[float]:
            X = activations.features(*unit)[train]
            return [float(np.mean(cross_validate(method, X, y[train], groups[train], inner_splits, seed)[1]))
                    for method in methods]

        best, best_score = None, -np.inf
        for unit, scores in zip(units, parallel_map(inner_scores, units)):
            for method, score in zip(methods, scores):
                if score > best_score + 1e-12:
                    best, best_score = (*unit, method), score
        site, pos, layer, head, method = best
        X = activations.features(site, pos, layer, head)
        probe = make_probe(method, seed=seed).fit(X[train], y[train], groups[train])
        oof[test] = probe.score(X[test])
        aucs.append(float(roc_auc_score(y[test], oof[test])))
        chosen.append({"site": site, "position": pos, "layer": int(layer),
                       "head": None if head is None else int(head), "method": method,
                       "inner_auroc": best_score})
    low, high = bootstrap_auroc(oof, y, groups, n_boot, seed=seed, folds=[t for _, t in outer])
    return {"best_auroc": float(np.mean(aucs)), "best_auroc_ci": [low, high], "nested_choices": chosen}
