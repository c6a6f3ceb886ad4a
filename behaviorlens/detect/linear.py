"""A linear probe as a detector file stores it: ``score(X) = X @ weight + bias``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BehaviorLensError


@dataclass
class Linear:
    """``score(X) = X @ weight + bias``."""

    weight: np.ndarray
    bias: float

    def score(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if X.shape[-1] != self.weight.shape[0]:
            raise BehaviorLensError(f"detector width {self.weight.shape[0]} does not match features of width {X.shape[-1]}")
        return X @ self.weight.astype(np.float64) + self.bias

    @classmethod
    def of(cls, probe: Any) -> Linear:
        return cls(np.asarray(probe.weight, dtype=np.float32), float(probe.bias))
