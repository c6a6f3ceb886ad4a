"""Linear probes with one interface: ``fit(X, y, groups)``, ``score``, ``predict``, ``direction``.

- :class:`MeanDiffProbe`: the difference of the class means, with a threshold fit on the
  training split.
- :class:`LogisticProbe`: L2 logistic regression on standardized features, its regularization
  chosen by cross-validation over pairs (scikit-learn ``LogisticRegressionCV``).
- :class:`PCAProbe`: the first principal component of the paired differences (RepE style),
  oriented so that the positive side projects higher.

``direction`` is a float32 unit vector in the space the features came from (model space for
residual sites), so a probe can become a steering vector. ``score`` is higher for the
positive (label 1) side.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod

import numpy as np

from ..errors import BehaviorLensError


class Probe(ABC):
    """A linear probe: ``score(X) = X @ w + b``; ``direction`` is ``w`` normalized."""

    name = "probe"

    def __init__(self) -> None:
        self.weight: np.ndarray | None = None
        self.bias = 0.0

    @abstractmethod
    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> Probe:
        """Fit on features ``X`` [n, d] and labels ``y`` (1 = positive side); pairs in ``groups``."""

    def _require_fit(self) -> np.ndarray:
        if self.weight is None:
            raise BehaviorLensError(f"the {self.name} probe is used before it was fit")
        return self.weight

    def score(self, X: np.ndarray) -> np.ndarray:
        """Continuous score per row, higher for the positive side; 0 is the decision threshold."""
        return np.asarray(X, dtype=np.float64) @ self._require_fit() + self.bias

    def predict(self, X: np.ndarray) -> np.ndarray:
        return (self.score(X) > 0).astype(np.int64)

    @property
    def direction(self) -> np.ndarray:
        w = self._require_fit()
        return (w / np.linalg.norm(w)).astype(np.float32)


def _check(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y).astype(np.int64)
    if X.ndim != 2 or X.shape[0] != y.shape[0]:
        raise BehaviorLensError(f"probe needs X [n, d] and y [n]; got {X.shape} and {y.shape}")
    if set(np.unique(y)) != {0, 1}:
        raise BehaviorLensError("probe training data needs both labels (0 and 1)")
    return X, y


def _best_threshold(proj: np.ndarray, y: np.ndarray) -> float:
    """The cut on a 1-d projection with the highest training accuracy (midpoint between values)."""
    order = np.argsort(proj, kind="stable")
    p, t = proj[order], y[order]
    # cut after position i: predictions 0 for [0..i], 1 for (i..n); i = -1 means all ones
    correct_below = np.concatenate([[0], np.cumsum(t == 0)])
    correct_above = np.concatenate([[np.sum(t == 1)], np.sum(t == 1) - np.cumsum(t == 1)])
    acc = correct_below + correct_above
    valid = np.ones_like(acc, dtype=bool)
    valid[1:-1] = p[1:] > p[:-1]  # no cut between equal values
    i = int(np.argmax(np.where(valid, acc, -1)))
    if i == 0:
        return float(p[0] - 1.0)
    if i == len(p):
        return float(p[-1] + 1.0)
    return float((p[i - 1] + p[i]) / 2)


class MeanDiffProbe(Probe):
    """Direction = mean(positive) - mean(negative); threshold fit on the training split."""

    name = "mean_diff"

    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> MeanDiffProbe:
        X, y = _check(X, y)
        w = X[y == 1].mean(0) - X[y == 0].mean(0)
        if not np.any(w):
            w = np.zeros(X.shape[1])
            w[0] = 1.0
        w = w / np.linalg.norm(w)
        self.weight = w
        self.bias = -_best_threshold(X @ w, y)
        return self


class PCAProbe(Probe):
    """First principal component of the paired differences (positive minus negative side).

    RepE presents each pair in random order, so the differences are symmetric around zero; the
    component is therefore taken about zero (the top right singular vector of the difference
    matrix), oriented so that the positive side projects higher, with a threshold fit on the
    training split. Rows without a partner (``groups`` missing or a lone side) fall back to
    pairing every positive with the mean of the negatives.
    """

    name = "pca"

    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> PCAProbe:
        X, y = _check(X, y)
        diffs = _paired_differences(X, y, groups)
        w = _top_component(diffs)
        if (X[y == 1] @ w).mean() < (X[y == 0] @ w).mean():
            w = -w
        self.weight = w
        self.bias = -_best_threshold(X @ w, y)
        return self


def _top_component(D: np.ndarray) -> np.ndarray:
    """Top right singular vector of ``D`` (uncentered), via the smaller Gram matrix."""
    if D.shape[0] < D.shape[1]:
        _, vecs = np.linalg.eigh(D @ D.T)
        w = D.T @ vecs[:, -1]
    else:
        _, vecs = np.linalg.eigh(D.T @ D)
        w = vecs[:, -1]
    norm = np.linalg.norm(w)
    if norm == 0:
        raise BehaviorLensError("PCA probe: the paired differences are all zero")
    return w / norm


def _paired_differences(X: np.ndarray, y: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    if groups is not None:
        groups = np.asarray(groups)
        diffs = []
        for g in np.unique(groups):
            pos = np.flatnonzero((groups == g) & (y == 1))
            neg = np.flatnonzero((groups == g) & (y == 0))
            if len(pos) and len(neg):
                diffs.append(X[pos].mean(0) - X[neg].mean(0))
        if len(diffs) >= 1:
            return np.stack(diffs)
    return X[y == 1] - X[y == 0].mean(0)


class LogisticProbe(Probe):
    """L2 logistic regression on standardized features, C chosen by grouped inner CV.

    The weights are mapped back from standardized to raw feature space (``w / scale``), so
    ``direction`` lives in model space and ``score`` takes raw activations.
    """

    name = "logistic"

    def __init__(
        self,
        Cs: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0),
        inner_folds: int = 3,
        max_iter: int = 1000,
        seed: int = 0,
    ):
        super().__init__()
        self.Cs, self.inner_folds, self.max_iter, self.seed = Cs, inner_folds, max_iter, seed
        self.C: float | None = None

    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> LogisticProbe:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegressionCV

        X, y = _check(X, y)
        mean, scale = X.mean(0), X.std(0)
        scale[scale < 1e-12] = 1.0
        Z = (X - mean) / scale
        cv = _inner_splits(y, groups, self.inner_folds, self.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            clf = LogisticRegressionCV(
                Cs=list(self.Cs), cv=cv, scoring="roc_auc", max_iter=self.max_iter,
                solver="liblinear", random_state=self.seed,
                l1_ratios=(0.0,), use_legacy_attributes=False,
            ).fit(Z, y)
        coef = clf.coef_.ravel()
        self.C = float(np.ravel(clf.C_)[0])
        self.weight = coef / scale
        self.bias = float(clf.intercept_.ravel()[0] - np.dot(coef, mean / scale))
        return self


def _inner_splits(y: np.ndarray, groups: np.ndarray | None, folds: int, seed: int) -> list:
    """Inner CV splits that keep groups (pairs) together, each with both labels in training."""
    from sklearn.model_selection import GroupKFold, StratifiedKFold

    if groups is None:
        k = max(2, min(folds, int(np.bincount(y).min())))
        return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(y, y))
    k = max(2, min(folds, len(np.unique(groups))))
    return list(GroupKFold(k, shuffle=True, random_state=seed).split(y, y, groups))


PROBES: dict[str, type[Probe]] = {
    "mean_diff": MeanDiffProbe,
    "logistic": LogisticProbe,
    "pca": PCAProbe,
}


def make_probe(method: str, seed: int = 0) -> Probe:
    """A fresh probe by method name."""
    if method not in PROBES:
        raise BehaviorLensError(f"unknown probe method {method!r}; methods are {', '.join(PROBES)}")
    return LogisticProbe(seed=seed) if method == "logistic" else PROBES[method]()
