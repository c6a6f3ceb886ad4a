"""Generalization: train a probe on one family, test it on others.

A probe is fit on every pair of the training family at one site, layer (head) and position and
scores every pair of each test family; the AUROC of those scores is the transfer. When a test
family is the training family itself, the entry is the cross-validated AUROC (folds by pair),
never an in-sample score.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..prompts.contrast import ContrastSet
from ..stats import auroc
from .activations import Activations, collect
from .sweep import cross_validate, fit_probe, pair_folds


def transfer_table(
    acts: Mapping[str, Activations], train: str, tests: list[str], site: str, layer: int,
    position: str, method: str, head: int | None = None, folds: int = 5, seed: int = 0,
) -> pd.DataFrame:
    """Transfer AUROC of a probe trained on ``acts[train]`` to every ``acts[test]``."""
    source = acts[train]
    probe = fit_probe(source, site, layer, position, method, head=head, seed=seed)
    rows = []
    for test in tests:
        target = acts[test]
        y = target.labels.numpy()
        if test == train:
            groups = source.pair_ids.numpy()
            X = source.features(site, position, layer, head)
            splits = pair_folds(groups, folds, seed)
            _, aucs, _ = cross_validate(method, X, y, groups, splits, seed)
            value, cv = float(np.mean(aucs)), True
        else:
            value = auroc(probe.score(target.features(site, position, layer, head)), y)
            cv = False
        rows.append({
            "train": train,
            "test": test,
            "site": site,
            "layer": layer,
            "head": head,
            "position": position,
            "method": method,
            "auroc": value,
            "cross_validated": cv,
            "n_train_pairs": int(source.meta.get("n_pairs", len(source) // 2)),
            "n_test_pairs": len(target) // 2,
        })
    table = pd.DataFrame(rows)
    table["head"] = table["head"].astype("Int64")
    return table


def collect_sets(
    model: Any, sets: Mapping[str, ContrastSet], site: str, position: str,
    layers: list[int] | None = None, batch_size: int = 16, out_dir: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Activations]:
    """Activations of one site and position for every set (cached under ``out_dir/<name>``)."""
    return {
        name: collect(
            model, cset, sites=(site,), positions=(position,), layers=layers,
            batch_size=batch_size, out_dir=None if out_dir is None else Path(out_dir) / name,
            progress=progress,
        )
        for name, cset in sets.items()
    }


def generalization(
    model: Any, train_set: ContrastSet, test_sets: Mapping[str, ContrastSet], site: str,
    layer: int, position: str, method: str, head: int | None = None, batch_size: int = 16,
    folds: int = 5, seed: int = 0, out_dir: str | Path | None = None, progress: bool = False,
) -> pd.DataFrame:
    """Train on ``train_set``, test on each of ``test_sets``: one row per test set."""
    sets = {train_set.name: train_set, **dict(test_sets)}
    acts = collect_sets(model, sets, site, position, [layer], batch_size, out_dir, progress)
    tests = list(test_sets)
    return transfer_table(acts, train_set.name, tests, site, layer, position, method, head, folds, seed)


def transfer_matrix(
    model: Any, sets: Mapping[str, ContrastSet], site: str, layer: int, position: str = "last",
    method: str = "mean_diff", head: int | None = None, batch_size: int = 16, folds: int = 5,
    seed: int = 0, out_dir: str | Path | None = None, progress: bool = False,
) -> pd.DataFrame:
    """Every ordered pair of ``sets``: train on one, test on the other (diagonal: CV)."""
    acts = collect_sets(model, sets, site, position, [layer], batch_size, out_dir, progress)
    names = list(sets)
    return matrix_from_activations(acts, names, site, layer, position, method, head, folds, seed)


def matrix_from_activations(
    acts: Mapping[str, Activations], names: list[str], site: str, layer: int, position: str,
    method: str, head: int | None = None, folds: int = 5, seed: int = 0,
) -> pd.DataFrame:
    """The transfer matrix from already collected activations (one row per train, test)."""
    tables = [
        transfer_table(acts, train, names, site, layer, position, method, head, folds, seed)
        for train in names
    ]
    return pd.concat(tables, ignore_index=True)
