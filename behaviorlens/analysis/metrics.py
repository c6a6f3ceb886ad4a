"""Metrics shared by every stage: ratios of means, bootstrap CIs, KL."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


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
