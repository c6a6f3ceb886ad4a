"""Probe sweeps: every site x layer (x head) x position x method, cross-validated by pair.

Each row of :func:`probe_sweep` carries the probe's out-of-fold AUROC and accuracy (mean and
spread over folds), a bootstrap confidence interval over pairs of the mean fold AUROC (and the
AUROC of all out-of-fold scores pooled, ``auroc_oof``), and two controls beside it: the same probe trained and tested on pair-level shuffled
labels (a control task: within a random half of the pairs the two sides swap labels, the same
swap at every layer), and the AUROC of a random direction.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..errors import BehaviorLensError
from ..stats import auroc, bootstrap_auroc
from .activations import Activations
from .probes import Probe, make_probe

PROBE_METHODS = ("mean_diff", "logistic", "pca")


def pair_folds(pair_ids: np.ndarray, folds: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index arrays; both sides of a pair always land in the same part."""
    from sklearn.model_selection import GroupKFold

    pair_ids = np.asarray(pair_ids)
    n_pairs = len(np.unique(pair_ids))
    if n_pairs < 2:
        raise BehaviorLensError(f"cross-validation needs at least 2 pairs, got {n_pairs}")
    k = min(folds, n_pairs)
    if k < 2:
        raise BehaviorLensError(f"folds must be at least 2, got {folds}")
    splitter = GroupKFold(k, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(pair_ids)), groups=pair_ids))


def shuffled_labels(labels: np.ndarray, pair_ids: np.ndarray, seed: int = 0) -> np.ndarray:
    """Control-task labels: in a random half of the pairs the two sides swap labels."""
    labels, pair_ids = np.asarray(labels), np.asarray(pair_ids)
    pairs = np.unique(pair_ids)
    rng = np.random.default_rng(seed + 7919)
    flip = np.zeros(len(pairs), dtype=bool)
    flip[rng.permutation(len(pairs))[: len(pairs) // 2]] = True
    flipped = flip[np.searchsorted(pairs, pair_ids)]
    return np.where(flipped, 1 - labels, labels)


def cross_validate(
    method: str, X: np.ndarray, y: np.ndarray, pair_ids: np.ndarray,
    splits: list[tuple[np.ndarray, np.ndarray]], seed: int = 0,
) -> tuple[np.ndarray, list[float], list[float]]:
    """Out-of-fold scores, per-fold AUROC and per-fold accuracy of one probe method."""
    from sklearn.metrics import roc_auc_score

    oof = np.empty(len(y))
    aucs, accs = [], []
    for train, test in splits:
        probe = make_probe(method, seed=seed).fit(X[train], y[train], pair_ids[train])
        s = probe.score(X[test])
        oof[test] = s
        aucs.append(float(roc_auc_score(y[test], s)))
        accs.append(float(np.mean((s > 0).astype(int) == y[test])))
    return oof, aucs, accs


def _units(acts: Activations, sites, positions, layers):
    """(site, position, layer, head) of every probed feature matrix."""
    sites = list(sites or acts.sites)
    positions = list(positions or acts.positions)
    layers = list(acts.layers if layers is None else layers)
    for site in sites:
        for pos in positions:
            data = acts.get(site, pos)
            for layer in layers:
                heads = range(data.shape[2]) if site == "head" else [None]
                for head in heads:
                    yield site, pos, layer, head


def parallel_map(fn: Callable[[Any], Any], items: Sequence[Any], desc: str = "", progress: bool = False) -> list:
    """``[fn(x) for x in items]`` on a thread per core, in order (scikit-learn's solvers
    release the GIL, so probes of different layers fit side by side)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(tqdm(pool.map(fn, items), total=len(items), desc=desc, disable=not progress))


def probe_sweep(
    activations: Activations,
    methods: Sequence[str] = PROBE_METHODS,
    folds: int = 5,
    seed: int = 0,
    sites: Sequence[str] | None = None,
    positions: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    n_boot: int = 1000,
    progress: bool = False,
) -> pd.DataFrame:
    """One row per site, layer (head), position and method: AUROC, accuracy and controls."""
    for m in methods:
        make_probe(m)  # validates the name
    y = activations.labels.numpy()
    groups = activations.pair_ids.numpy()
    splits = pair_folds(groups, folds, seed)
    y_control = shuffled_labels(y, groups, seed)
    units = list(_units(activations, sites, positions, layers))

    def unit_rows(unit: tuple) -> list[dict]:
        site, pos, layer, head = unit
        X = activations.features(site, pos, layer, head)
        rng = np.random.default_rng([seed, layer, 0 if head is None else head + 1])
        r = rng.normal(size=X.shape[1])
        random_auc = auroc(X @ (r / np.linalg.norm(r)), y)
        out = []
        for method in methods:
            oof, aucs, accs = cross_validate(method, X, y, groups, splits, seed)
            _, c_aucs, c_accs = cross_validate(method, X, y_control, groups, splits, seed)
            low, high = bootstrap_auroc(oof, y, groups, n_boot, seed=seed, folds=[t for _, t in splits])
            out.append({
                "site": site,
                "layer": layer,
                "head": head,
                "position": pos,
                "method": method,
                "auroc_mean": float(np.mean(aucs)),
                "auroc_std": float(np.std(aucs)),
                "accuracy_mean": float(np.mean(accs)),
                "accuracy_std": float(np.std(accs)),
                "auroc_oof": auroc(oof, y),
                "auroc_ci_low": low,
                "auroc_ci_high": high,
                "control_auroc": float(np.mean(c_aucs)),
                "control_accuracy": float(np.mean(c_accs)),
                "random_auroc": random_auc,
                "n_pairs": len(np.unique(groups)),
                "folds": len(splits),
            })
        return out

    rows = [r for unit in parallel_map(unit_rows, units, "probe sweep", progress) for r in unit]
    table = pd.DataFrame(rows)
    table["head"] = table["head"].astype("Int64")
    return table


def best_row(table: pd.DataFrame) -> pd.Series:
    """The row with the highest mean cross-validated AUROC (earliest layer on ties)."""
    if table.empty:
        raise BehaviorLensError("the probe table is empty")
    order = table.sort_values(["auroc_mean", "layer"], ascending=[False, True], kind="stable")
    return order.iloc[0]


def fit_probe(
    activations: Activations, site: str, layer: int, position: str, method: str,
    head: int | None = None, seed: int = 0,
) -> Probe:
    """A probe trained on every sample of one site, layer (head) and position."""
    X = activations.features(site, position, layer, head)
    return make_probe(method, seed=seed).fit(X, activations.labels.numpy(), activations.pair_ids.numpy())
