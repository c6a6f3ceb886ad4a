"""Probe sweeps: pair-grouped folds, pair-level control labels, AUROC and its bootstrap, rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from behaviorlens.probing import Activations, best_row, pair_folds, probe_sweep, shuffled_labels
from behaviorlens.stats import auroc, bootstrap_auroc


def synthetic(n_pairs=40, d=16, layers=3, signal_layer=2, heads=None, seed=0):
    """Paired activations whose labels are readable along u at ``signal_layer`` only."""
    rng = np.random.default_rng(seed)
    shape = (d,) if heads is None else (heads, d)
    u = rng.normal(size=shape)
    u /= np.linalg.norm(u)
    y = np.tile([1, 0], n_pairs)
    X = rng.normal(size=(2 * n_pairs, layers, *shape))
    X[:, signal_layer] += np.multiply.outer(y - 0.5, u) * 6
    return Activations(
        data={("resid_post" if heads is None else "head", "last"): torch.tensor(X, dtype=torch.float32)},
        labels=torch.tensor(y),
        pair_ids=torch.tensor(np.repeat(np.arange(n_pairs), 2)),
        layers=list(range(layers)),
        meta={"n_pairs": n_pairs},
    )


def test_folds_never_split_a_pair():
    ids = np.repeat(np.arange(23), 2)
    splits = pair_folds(ids, 5, seed=3)
    assert len(splits) == 5
    seen = np.concatenate([test for _, test in splits])
    assert sorted(seen) == list(range(46))  # every sample tested exactly once
    for train, test in splits:
        assert not set(ids[train]) & set(ids[test])
        assert set(np.bincount(ids[test])[np.unique(ids[test])]) == {2}
    other = pair_folds(ids, 5, seed=4)
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(splits, other))  # seed shuffles
    assert len(pair_folds(np.repeat(np.arange(3), 2), 5)) == 3  # at most one fold per pair


def test_control_labels_swap_whole_pairs():
    y = np.tile([1, 0], 50)
    ids = np.repeat(np.arange(50), 2)
    ys = shuffled_labels(y, ids, seed=0)
    for p in range(50):
        assert sorted(ys[ids == p]) == [0, 1]  # still one of each side in every pair
    assert np.sum(ys != y) == 50  # half of the pairs swapped
    assert np.array_equal(ys, shuffled_labels(y, ids, seed=0))
    assert not np.array_equal(ys, shuffled_labels(y, ids, seed=1))


def test_auroc_matches_sklearn_with_ties_and_weights():
    rng = np.random.default_rng(0)
    for _ in range(10):
        s = rng.normal(size=60).round(1)
        y = rng.integers(0, 2, size=60)
        w = rng.integers(0, 4, size=60)
        assert auroc(s, y) == pytest.approx(roc_auc_score(y, s))
        assert auroc(s, y, w) == pytest.approx(roc_auc_score(y, s, sample_weight=w))


def test_bootstrap_resamples_pairs():
    rng = np.random.default_rng(1)
    ids = np.repeat(np.arange(30), 2)
    y = np.tile([1, 0], 30)
    s = rng.normal(size=60) + y
    low, high = bootstrap_auroc(s, y, ids, n_boot=200, seed=5)
    draws = np.random.default_rng(5).integers(0, 30, size=(200, 30))
    ref = []
    for d in draws:  # the same draws, scored by sklearn on the explicitly resampled rows
        rows = np.concatenate([np.flatnonzero(ids == p) for p in d])
        ref.append(roc_auc_score(y[rows], s[rows]))
    assert (low, high) == pytest.approx((np.quantile(ref, 0.025), np.quantile(ref, 0.975)))
    assert low < auroc(s, y) < high

    folds = [test for _, test in pair_folds(ids, 3, seed=0)]
    s[folds[0]] += 5  # a fold on another scale: pooling would mix scales, fold means do not
    low, high = bootstrap_auroc(s, y, ids, n_boot=200, seed=5, folds=folds)
    ref = []
    for d in draws:
        means = []
        for f in folds:
            rows = np.concatenate([np.flatnonzero(ids == p) for p in d if p in set(ids[f])])
            means.append(roc_auc_score(y[rows], s[rows]))
        ref.append(np.mean(means))
    assert (low, high) == pytest.approx((np.quantile(ref, 0.025), np.quantile(ref, 0.975)))


def test_sweep_finds_the_planted_layer_above_controls():
    acts = synthetic()
    table = probe_sweep(acts, folds=4, n_boot=200)
    assert len(table) == 3 * 3
    assert {"site", "layer", "head", "position", "method", "auroc_mean", "auroc_std", "accuracy_mean",
            "accuracy_std", "auroc_ci_low", "auroc_ci_high", "control_auroc", "random_auroc"} <= set(table)
    hit = table[table["layer"] == 2]
    assert (hit["auroc_mean"] > 0.95).all() and (hit["accuracy_mean"] > 0.85).all()
    assert (hit["control_auroc"].between(0.25, 0.75)).all()
    assert (hit["auroc_ci_low"] > 0.85).all()
    assert ((hit["auroc_ci_low"] <= hit["auroc_mean"]) & (hit["auroc_mean"] <= hit["auroc_ci_high"])).all()
    miss = table[table["layer"] != 2]
    assert (miss["auroc_mean"].between(0.2, 0.8)).all()
    assert best_row(table)["layer"] == 2
    assert (table["folds"] == 4).all() and table["head"].isna().all()


def test_head_sweep_has_one_row_per_head():
    acts = synthetic(n_pairs=20, d=4, layers=2, signal_layer=1, heads=3)
    table = probe_sweep(acts, methods=("mean_diff",), folds=3, n_boot=50)
    assert len(table) == 2 * 3
    assert table["head"].tolist() == [0, 1, 2, 0, 1, 2]
    assert (table[table["layer"] == 1]["auroc_mean"] > 0.8).any()


def test_sweep_is_deterministic():
    acts = synthetic(n_pairs=12, layers=1, signal_layer=0)
    a = probe_sweep(acts, methods=("mean_diff", "pca"), folds=3, n_boot=50, seed=7)
    b = probe_sweep(acts, methods=("mean_diff", "pca"), folds=3, n_boot=50, seed=7)
    pd.testing.assert_frame_equal(a, b)
