"""Statistics shared by every stage: ratios of means, bootstrap CIs, KL, AUROC, correlation."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean over the given values."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n_boot, values.size))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def ratio_of_means(num: Sequence[float] | np.ndarray, den: Sequence[float] | np.ndarray) -> float:
    """sum(num) / sum(den) over pairs (a ratio of means: pairs with a small ``den`` do not dominate)."""
    total = float(np.sum(den))
    return float(np.sum(num)) / total if total != 0 else float("nan")


def ratio_ci(num: Sequence[float] | np.ndarray, den: Sequence[float] | np.ndarray, n_boot: int = 2000,
             level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of :func:`ratio_of_means`, resampling pairs."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if num.size == 0:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, num.size, size=(n_boot, num.size))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = num[idx].sum(1) / den[idx].sum(1)
    ratios = ratios[np.isfinite(ratios)]
    if ratios.size == 0:
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    return float(np.quantile(ratios, alpha)), float(np.quantile(ratios, 1 - alpha))


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) in nats over the last axis, from logits; float32."""
    logp = torch.log_softmax(logits_p.float(), dim=-1)
    logq = torch.log_softmax(logits_q.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def auroc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Weighted AUROC (ties count one half), the Mann-Whitney statistic."""
    return float(_auroc_grouped(*_tie_groups(scores), labels, weights))


def _tie_groups(scores: np.ndarray) -> tuple[np.ndarray, int]:
    _, inverse = np.unique(np.asarray(scores), return_inverse=True)
    return inverse.ravel(), int(inverse.max()) + 1


def _auroc_grouped(inverse: np.ndarray, n_groups: int, labels: np.ndarray, weights: np.ndarray | None) -> float:
    labels = np.asarray(labels)
    w = np.ones(len(labels)) if weights is None else np.asarray(weights, dtype=np.float64)
    pos = np.bincount(inverse, weights=w * (labels == 1), minlength=n_groups)
    neg = np.bincount(inverse, weights=w * (labels == 0), minlength=n_groups)
    total = pos.sum() * neg.sum()
    if total == 0:
        return float("nan")
    below = np.cumsum(neg) - neg
    return float(np.dot(pos, below + 0.5 * neg) / total)


def _auroc_grouped_many(inverse: np.ndarray, n_groups: int, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """:func:`_auroc_grouped` for each row of ``weights`` [n_boot, samples] at once."""
    onehot = np.zeros((len(labels), n_groups))
    onehot[np.arange(len(labels)), inverse] = 1.0
    pos = (weights * (labels == 1)) @ onehot
    neg = (weights * (labels == 0)) @ onehot
    total = pos.sum(1) * neg.sum(1)
    below = np.cumsum(neg, 1) - neg
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total == 0, np.nan, (pos * (below + 0.5 * neg)).sum(1) / total)


def bootstrap_auroc(
    scores: np.ndarray, labels: np.ndarray, pair_ids: np.ndarray, n_boot: int = 1000,
    level: float = 0.95, seed: int = 0, folds: list[np.ndarray] | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUROC, resampling whole pairs.

    With ``folds`` (the test indices of each cross-validation fold) the statistic is the mean
    over folds of the AUROC within each fold, matching how ``auroc_mean`` is computed from
    out-of-fold scores whose scale may differ between folds.
    """
    labels = np.asarray(labels)
    pairs, pair_index = np.unique(np.asarray(pair_ids), return_inverse=True)
    parts = [np.arange(len(labels))] if folds is None else [np.asarray(f) for f in folds]
    groups = [_tie_groups(np.asarray(scores)[f]) for f in parts]
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(pairs), size=(n_boot, len(pairs)))
    counts = np.zeros((n_boot, len(pairs)))
    np.add.at(counts, (np.repeat(np.arange(n_boot), len(pairs)), draws.ravel()), 1)
    weights = counts[:, pair_index]  # [n_boot, samples]: each sample weighted by its pair's draws
    per_fold = np.stack([_auroc_grouped_many(inv, n, labels[f], weights[:, f])
                         for f, (inv, n) in zip(parts, groups)])
    with warnings.catch_warnings():  # a draw whose folds all lack one class is dropped below
        warnings.simplefilter("ignore", RuntimeWarning)
        values = np.nanmean(per_fold, 0)
    values = values[~np.isnan(values)]
    alpha = (1 - level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))


def correlation(a: Sequence[float], b: Sequence[float], kind: str = "pearson") -> float:
    """Pearson or Spearman correlation; NaN when either side is constant."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    fn = pearsonr if kind == "pearson" else spearmanr
    return float(fn(a, b)[0])
