"""Transfer: a detector trained on one family, scored on every other (lie vs honest AUROC).

For each family with at least :data:`~behaviorlens.detect.folds.MIN_EXAMPLES` lies and honest
answers, the probe (layer, position, method) is chosen by cross-validation on that family alone
and fitted on all of it; the diagonal is its nested cross-validated AUROC (the choice made on
inner folds), every other cell its AUROC on a family it never saw. A family with too few
examples to train on is still tested on (its row is empty, with the reason).

``features`` and ``negatives`` make it the matrix of a readout detector (:mod:`.readout`: the
belief-conditioned probe, the follow-up readout; trained against honest answers or against
honest answers and mistakes); every cell also holds ``lie_vs_mistake_auroc`` where the test
family has lies and mistakes.

``override`` makes it the override detector's matrix (:mod:`.override`): :func:`.train.train_detector`
on each family with the lies, honest answers and mistakes it needs, one tuned lens for all rows,
every other family scored by the whole detector (the falsity probe AND the late arrival) and by
its falsity probe alone. Its diagonal is empty: the AND's references are fitted in sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..errors import BehaviorLensError
from ..probing.sweep import best_row, fit_probe, probe_sweep
from ..probing.validity import nested_best
from ..stats import auroc
from .evaluate import score_examples
from .examples import SITE, Examples
from .folds import MIN_EXAMPLES, as_activations, balanced_groups
from .lens import LENSES, fit_tuned_lens, ordinary_text
from .override import MIN_MISTAKES
from .readout import FOLLOWUP, readout_states, training_index, unit_names
from .train import CHOOSABLE, default_layers, train_detector


def _cell(probe: Any, states: dict[str, np.ndarray], labels: np.ndarray, unit: str, column: int,
          negative: str) -> float:
    return _scored(probe.score(states[unit][:, column]), labels, negative)


def transfer_matrix(model: Any, families: dict[str, Examples], layers: Sequence[int] | None = None,
                    positions: Sequence[str] = CHOOSABLE, methods: Sequence[str] = ("mean_diff",), folds: int = 5,
                    seed: int = 0, batch_size: int = 16, features: str = "answer", negatives: str = "honest",
                    question: str = FOLLOWUP, override: bool = False, lenses: Sequence[str] = LENSES) -> pd.DataFrame:
    """One row per (train, test) family: ``auroc`` (lie vs honest), ``lie_vs_mistake_auroc``, the
    test family's ``n_lie``, ``n_honest`` and ``n_mistake``, the chosen ``layer``, ``position``,
    ``method``, and ``note`` where a cell is empty (``override``: see the module doc)."""
    layers = default_layers(model.sites.n_layers) if layers is None else [int(x) for x in layers]
    if override:
        if features != "answer" or negatives != "honest":
            raise BehaviorLensError(f"the override detector and a {features} detector with {negatives} negatives "
                                    f"are two detectors; build one matrix at a time")
        return override_matrix(model, families, layers, positions, methods, folds, seed, batch_size, lenses)
    units = unit_names(features, [p for p in positions if p in CHOOSABLE])
    parts = {name: ex.with_labels("lie", "honest", "mistake") for name, ex in families.items()}
    read = [p for p in parts.values() if len(p)]  # every family's states in one read
    every = readout_states(model, Examples.concat(read), features, layers, units, question, batch_size) if read else {}
    data, start = {}, 0
    for name, part in parts.items():
        states = {u: v[start:start + len(part)] for u, v in every.items()} if len(part) else None
        start += len(part)
        data[name] = (part, part.table["label"].to_numpy(), states)
    rows = []
    for train, (part, labels, states) in data.items():
        keep = training_index(labels, negatives)
        y = (labels[keep] == "lie").astype(np.int64)
        n_lie, n_neg = int(y.sum()), len(np.unique(keep)) - int(y.sum())
        if min(n_lie, n_neg) < MIN_EXAMPLES:
            rows += [{"train": train, "test": test, "auroc": np.nan,
                      "note": f"{train}: {n_lie} lie and {n_neg} {negatives}, fewer than {MIN_EXAMPLES} of a class"}
                     for test in data]
            continue
        groups = balanced_groups(y, part.groups[keep], seed)
        k = min(folds, len(np.unique(groups)))
        acts = as_activations({u: v[keep] for u, v in states.items()}, y, groups, layers, units)
        best = best_row(probe_sweep(acts, methods, k, seed, n_boot=50))
        layer, unit, method = int(best["layer"]), str(best["position"]), str(best["method"])
        probe = fit_probe(acts, SITE, layer, unit, method, seed=seed)
        for test, (_, t_labels, t_states) in data.items():
            count = _counts(t_labels)
            row = {"train": train, "test": test, "layer": layer, "position": unit, "method": method, **count,
                   "note": ""}
            if test != train:
                row["lie_vs_mistake_auroc"] = _cell(probe, t_states, t_labels, unit, layers.index(layer), "mistake")
            if test == train:
                row["auroc"] = nested_best(acts, methods, k, seed=seed, n_boot=50)["best_auroc"]
                row["note"] = "nested cross-validation"
            elif min(count["n_lie"], count["n_honest"]) == 0:
                row["auroc"] = np.nan
                row["note"] = f"{test} has no {'lie' if count['n_lie'] == 0 else 'honest'} examples"
            else:
                row["auroc"] = _cell(probe, t_states, t_labels, unit, layers.index(layer), "honest")
            rows.append(row)
    return pd.DataFrame(rows)


def _counts(labels: np.ndarray) -> dict[str, int]:
    return {f"n_{c}": int((labels == c).sum()) for c in ("lie", "honest", "mistake")}


def override_matrix(model: Any, families: dict[str, Examples], layers: Sequence[int], positions: Sequence[str],
                    methods: Sequence[str], folds: int, seed: int, batch_size: int,
                    lenses: Sequence[str] = LENSES) -> pd.DataFrame:
    """The override detector's matrix (see the module doc): per cell ``auroc``,
    ``lie_vs_mistake_auroc`` and the falsity probe's (``falsity_*``), the test family's counts,
    the row's ``layer``, ``position``, ``method`` and ``lens``."""
    parts = {name: ex.with_labels("lie", "honest", "mistake") for name, ex in families.items()}
    every = Examples.concat([p for p in parts.values() if len(p)] or list(parts.values()))
    rows, tuned = [], None
    for train, part in parts.items():
        n = _counts(part.table["label"].to_numpy())
        if min(n["n_lie"], n["n_honest"]) < MIN_EXAMPLES or n["n_mistake"] < MIN_MISTAKES:
            rows += [{"train": train, "test": test, "auroc": np.nan,
                      "note": f"{train}: {n['n_lie']} lie, {n['n_honest']} honest and {n['n_mistake']} mistake; it "
                              f"needs {MIN_EXAMPLES}, {MIN_EXAMPLES} and {MIN_MISTAKES}"} for test in parts]
            continue
        if "tuned" in lenses and tuned is None:  # one tuned lens for every row
            tuned = fit_tuned_lens(model, ordinary_text(model, "fit"), batch_size=batch_size)
        det = train_detector(model, part, layers=layers, positions=positions, methods=methods, folds=folds,
                             seed=seed, n_boot=50, batch_size=batch_size, override=True, lenses=lenses,
                             tuned=tuned).detector
        scores = score_examples(model, det, every, batch_size)
        for test in parts:
            t = scores[scores["family"] == test]
            labels = t["label"].to_numpy()
            row = {"train": train, "test": test, "layer": det.layer, "position": det.position,
                   "method": det.method, "lens": det.override.lens, **_counts(labels), "note": ""}
            if test == train:
                row.update(auroc=np.nan, note="trained here (the AND's references are fitted in sample)")
            else:
                for prefix, column in (("", "score"), ("falsity_", "falsity_score")):
                    score = t[column].to_numpy(dtype=float)
                    row[f"{prefix}auroc"] = _scored(score, labels, "honest")
                    row[f"{prefix}lie_vs_mistake_auroc"] = _scored(score, labels, "mistake")
            rows.append(row)
    return pd.DataFrame(rows)


def _scored(score: np.ndarray, labels: np.ndarray, negative: str) -> float:
    keep = np.isin(labels, ["lie", negative])
    y = (labels[keep] == "lie").astype(int)
    return auroc(score[keep], y) if 0 < y.sum() < len(y) else np.nan
