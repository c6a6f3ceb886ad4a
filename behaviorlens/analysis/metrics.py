"""Metrics shared by every stage: the behavior metric, patching metric, bootstrap CIs, KL."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def logit_diff(logits: torch.Tensor, matching: torch.Tensor, not_matching: torch.Tensor) -> torch.Tensor:
    """The behavior metric: logit(matching) - logit(not_matching), per row, in float32."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    logits = logits.float()
    return logits[rows, matching.to(logits.device)] - logits[rows, not_matching.to(logits.device)]


def patching_metric(patched: torch.Tensor | float, clean: torch.Tensor | float, corrupt: torch.Tensor | float):
    """(patched - corrupt) / (clean - corrupt): 0 = no effect, 1 = fully restored."""
    return (patched - corrupt) / (clean - corrupt)


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


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) in nats over the last axis, from logits; float32."""
    logp = torch.log_softmax(logits_p.float(), dim=-1)
    logq = torch.log_softmax(logits_q.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)
