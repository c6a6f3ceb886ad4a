"""Transfer: a detector trained on one family, scored on every other (lie vs honest AUROC).

For each family with at least :data:`~behaviorlens.detect.train.MIN_EXAMPLES` lies and honest
answers, the probe (layer, position, method) is chosen by cross-validation on that family alone
and fitted on all of it; the diagonal is its nested cross-validated AUROC (the choice made on
inner folds), every other cell its AUROC on a family it never saw. A family with too few
examples to train on is still tested on (its row is empty, with the reason).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..probing.sweep import auroc, best_row, fit_probe, probe_sweep
from ..probing.validity import nested_best
from .examples import SITE, Examples, read_states
from .train import CHOOSABLE, MIN_EXAMPLES, _activations, balanced_groups, default_layers


def transfer_matrix(model: Any, families: dict[str, Examples], layers: Sequence[int] | None = None,
                    positions: Sequence[str] = CHOOSABLE, methods: Sequence[str] = ("mean_diff",), folds: int = 5,
                    seed: int = 0, batch_size: int = 16) -> pd.DataFrame:
    """One row per (train, test) family: ``auroc``, the test family's ``n_lie`` and ``n_honest``,
    the chosen ``layer``, ``position``, ``method``, and ``note`` where a cell is empty."""
    layers = default_layers(model.sites.n_layers) if layers is None else [int(x) for x in layers]
    positions = [p for p in positions if p in CHOOSABLE]
    data = {}
    for name, ex in families.items():
        lh = ex.with_labels("lie", "honest")
        y = (lh.table["label"] == "lie").to_numpy().astype(np.int64)
        states = read_states(model, lh, layers, positions, batch_size) if len(lh) else None
        data[name] = (lh, y, states)
    rows = []
    for train, (lh, y, states) in data.items():
        n_lie, n_honest = int(y.sum()), int(len(y) - y.sum())
        if min(n_lie, n_honest) < MIN_EXAMPLES:
            rows += [{"train": train, "test": test, "auroc": np.nan,
                      "note": f"{train}: {n_lie} lie and {n_honest} honest, fewer than {MIN_EXAMPLES} of a class"}
                     for test in data]
            continue
        groups = balanced_groups(y, lh.groups, seed)
        k = min(folds, len(np.unique(groups)))
        acts = _activations(states, y, groups, layers, positions)
        best = best_row(probe_sweep(acts, methods, k, seed, n_boot=50))
        layer, position, method = int(best["layer"]), str(best["position"]), str(best["method"])
        probe = fit_probe(acts, SITE, layer, position, method, seed=seed)
        for test, (t_lh, t_y, t_states) in data.items():
            row = {"train": train, "test": test, "layer": layer, "position": position, "method": method,
                   "n_lie": int(t_y.sum()), "n_honest": int(len(t_y) - t_y.sum()), "note": ""}
            if test == train:
                row["auroc"] = nested_best(acts, methods, k, seed=seed, n_boot=50)["best_auroc"]
                row["note"] = "nested cross-validation"
            elif t_y.min(initial=1) == t_y.max(initial=0):
                row["auroc"] = np.nan
                row["note"] = f"{test} has no {'lie' if t_y.sum() == 0 else 'honest'} examples"
            else:
                row["auroc"] = auroc(probe.score(t_states[position][:, layers.index(layer)]), t_y)
            rows.append(row)
    return pd.DataFrame(rows)
