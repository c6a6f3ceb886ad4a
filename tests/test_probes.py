"""Probes on synthetic Gaussian data with a planted direction, and on label-shuffled data."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from behaviorlens import BehaviorLensError
from behaviorlens.probing import LogisticProbe, MeanDiffProbe, PCAProbe, make_probe
from behaviorlens.probing.probes import _best_threshold

METHODS = ("mean_diff", "logistic", "pca")


def planted(n_pairs=80, d=48, signal=3.0, seed=0, spread=0.0):
    """Paired data: a shared per-pair base (feature scales spread by ``spread``), noise, and
    +-signal/2 along a unit vector u. All features are offset, so nothing is centered."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    scales = np.exp(rng.normal(size=d) * spread)
    base = (0.5 * rng.normal(size=(n_pairs, d)) * scales).repeat(2, axis=0)
    y = np.tile([1, 0], n_pairs)
    X = base + 0.2 * rng.normal(size=(2 * n_pairs, d)) + np.outer(y - 0.5, u) * signal + 3.0
    return X, y, np.repeat(np.arange(n_pairs), 2), u


@pytest.mark.parametrize("method", METHODS)
def test_planted_direction_is_found(method):
    X, y, g, u = planted()
    train, test = slice(0, 120), slice(120, None)
    probe = make_probe(method).fit(X[train], y[train], g[train])
    assert roc_auc_score(y[test], probe.score(X[test])) > 0.97
    assert np.mean(probe.predict(X[test]) == y[test]) > 0.9
    d = probe.direction
    assert d.dtype == np.float32 and d.shape == (X.shape[1],)
    assert abs(np.linalg.norm(d) - 1) < 1e-5
    assert float(d @ u) > 0.9  # the planted direction, with the positive side up


@pytest.mark.parametrize("method", METHODS)
def test_shuffled_labels_give_chance(method):
    X, y, g, _ = planted(n_pairs=150, seed=1)
    rng = np.random.default_rng(3)
    flip = rng.integers(0, 2, size=150).repeat(2).astype(bool)  # swap sides of random pairs
    ys = np.where(flip, 1 - y, y)
    probe = make_probe(method).fit(X[:200], ys[:200], g[:200])
    assert 0.35 < roc_auc_score(ys[200:], probe.score(X[200:])) < 0.65


@pytest.mark.parametrize("d", [48, 300])  # fewer and more features than samples
def test_logistic_maps_standardization_back_to_model_space(d):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    X, y, g, _ = planted(d=d, seed=2, signal=0.4, spread=1.0)
    probe = LogisticProbe().fit(X, y, g)
    scaler = StandardScaler().fit(X)
    ref = LogisticRegression(C=probe.C, solver="liblinear", tol=1e-8, max_iter=10000).fit(scaler.transform(X), y)
    np.testing.assert_allclose(probe.score(X), ref.decision_function(scaler.transform(X)), rtol=1e-4, atol=1e-4)
    w = ref.coef_.ravel() / scaler.scale_
    np.testing.assert_allclose(probe.direction, w / np.linalg.norm(w), atol=1e-4)


def test_mean_diff_threshold_maximizes_training_accuracy():
    rng = np.random.default_rng(0)
    for _ in range(20):
        p = rng.normal(size=30).round(1)
        y = rng.integers(0, 2, size=30)
        cut = _best_threshold(p, y)
        best = max(np.mean((p > c) == y) for c in np.concatenate([p - 1e-9, p + 1e-9, [p.min() - 1]]))
        assert np.mean((p > cut) == y) == pytest.approx(best)
    X = np.array([[0.0], [1.0], [2.0], [3.0]]) + 10
    probe = MeanDiffProbe().fit(X, np.array([0, 0, 1, 1]))
    assert probe.predict(X).tolist() == [0, 0, 1, 1] and probe.score(np.array([[11.5]]))[0] == 0


def test_pca_uses_pairs_and_orients_positive_up():
    X, y, g, u = planted(signal=-3.0)  # positive side lies along -u
    probe = PCAProbe().fit(X, y, g)
    assert float(probe.direction @ u) < -0.9
    assert roc_auc_score(y, probe.score(X)) > 0.97


def test_probe_mistakes_fail_in_one_line():
    with pytest.raises(BehaviorLensError, match="unknown probe method"):
        make_probe("svm")
    with pytest.raises(BehaviorLensError, match="before it was fit"):
        _ = MeanDiffProbe().direction
    with pytest.raises(BehaviorLensError, match="both labels"):
        MeanDiffProbe().fit(np.zeros((4, 2)), np.ones(4))
