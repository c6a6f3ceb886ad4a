"""The probing stage: sweep, controls, generalization, plots and a summary in one folder."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import BehaviorLensError
from ..io import write_csv, write_json
from ..prompts.contrast import ContrastSet
from .activations import collect, position_span
from .generalization import collect_sets, matrix_from_activations
from .plots import plot_auroc_by_layer, plot_head_heatmap, plot_transfer
from .sweep import PROBE_METHODS, best_row, probe_sweep
from .validity import mark_wording, nested_best, wording_baseline, wording_features

SUMMARY_JSON = "summary.json"


def run_probe(
    model: Any,
    train_set: ContrastSet,
    test_sets: Mapping[str, ContrastSet] | None = None,
    sites: Sequence[str] = ("resid_post",),
    positions: Sequence[str] = ("last",),
    methods: Sequence[str] = PROBE_METHODS,
    out_dir: str | Path = "probe",
    batch_size: int = 16,
    folds: int = 5,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Sweep probes on ``train_set``, test the best one on ``test_sets``, write the artifacts.

    The headline ``best_auroc`` is nested: the best site, layer, position and method are chosen
    on inner folds and scored on outer folds that took no part in the choice, with a CI over
    pairs that covers the selection (``best_in_sample_auroc`` is the grid's best, optimistic by
    construction). Beside every row, the same probe on the wording alone (``wording_auroc``;
    ``wording_explains`` when it reaches the probe's CI; the summary compares it with the nested
    CI).

    Writes ``probes.csv`` (the sweep), ``wording_baseline.csv``, ``generalization.csv`` (train x test AUROC over every
    family at the best site, layer and position; when the best position is a slot another
    family lacks, the best probe at a position every family has), ``probe_auroc.png``, ``probe_heads.png`` when
    heads are probed, ``transfer.png`` and, last, ``summary.json``. Activations are cached under
    ``out_dir/activations`` so a rerun resumes.
    """
    out = Path(out_dir)
    cache = out / "activations"
    acts = collect(model, train_set, sites=sites, positions=positions, batch_size=batch_size,
                   out_dir=cache / train_set.name, progress=progress)
    table = probe_sweep(acts, methods=methods, folds=folds, seed=seed, progress=progress)
    baseline = wording_baseline(wording_features(model, train_set), acts.labels.numpy(),
                                acts.pair_ids.numpy(), methods, folds, seed)
    table = mark_wording(table, baseline)
    nested = nested_best(acts, methods, folds, seed=seed)
    write_csv(out / "probes.csv", table)
    write_csv(out / "wording_baseline.csv", baseline)
    plot_auroc_by_layer(table, out / "probe_auroc.png", title=train_set.name)
    if (table["site"] == "head").any():
        plot_head_heatmap(table, out / "probe_heads.png", title=train_set.name)

    best = best_row(table)
    tests = {n: s for n, s in (test_sets or {}).items() if n != train_set.name}
    sets = {train_set.name: train_set, **tests}
    shared = [p for p in table["position"].unique() if all(_has_position(s, p) for s in sets.values())]
    if not shared:
        raise BehaviorLensError(
            f"none of the probed positions {list(positions)} exists in every test family; "
            "probe a shared position such as 'last' to test transfer"
        )
    moved = best_row(table[table["position"].isin(shared)])  # the best probe every family can take
    site, layer, position, method = moved["site"], int(moved["layer"]), moved["position"], moved["method"]
    head = None if pd.isna(moved["head"]) else int(moved["head"])
    others = collect_sets(model, tests, site, position, None, batch_size, cache, progress)
    matrix = matrix_from_activations({train_set.name: acts, **others}, list(sets), site, layer,
                                     position, method, head, folds, seed)
    write_csv(out / "generalization.csv", matrix)
    plot_transfer(matrix, out / "transfer.png", title=train_set.name)

    from_train = matrix[matrix["train"] == train_set.name].set_index("test")["auroc"]
    best_head = None if pd.isna(best["head"]) else int(best["head"])
    summary = {
        "family": train_set.name,
        "model": getattr(model, "name", ""),
        "n_pairs": len(train_set),
        "best_site": best["site"],
        "best_layer": int(best["layer"]),
        "best_head": best_head,
        "best_position": best["position"],
        "best_method": best["method"],
        "best_auroc": nested["best_auroc"],
        "best_auroc_ci": nested["best_auroc_ci"],
        "best_in_sample_auroc": float(best["auroc_mean"]),
        "best_in_sample_auroc_ci": [float(best["auroc_ci_low"]), float(best["auroc_ci_high"])],
        "nested_choices": nested["nested_choices"],
        "wording_baseline_auroc": float(best["wording_auroc"]),
        "wording_explains": bool(best["wording_auroc"] >= nested["best_auroc_ci"][0]),
        "best_accuracy": float(best["accuracy_mean"]),
        "control_auroc": float(best["control_auroc"]),
        "random_auroc": float(best["random_auroc"]),
        "transfer_auroc": {name: float(from_train[name]) for name in tests},
        "transfer_probe": f"{method} {site} L{layer}" + ("" if head is None else f" H{head}") + f" @ {position}",
    }
    write_json(out / SUMMARY_JSON, summary)
    return summary


@dataclass
class ProbeResult:
    """A finished probing folder (what :func:`run_probe` wrote), read back for a later stage."""

    path: Path
    summary: dict

    @classmethod
    def load(cls, folder: str | Path) -> ProbeResult:
        path = Path(folder) / SUMMARY_JSON
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise BehaviorLensError(f"no probing result in {folder}: cannot read {path.name} ({err})") from None
        if "best_layer" not in summary:
            raise BehaviorLensError(f"{path} is not a probing summary: it has no best_layer")
        return cls(Path(folder), summary)

    @property
    def best_layer(self) -> int:
        """The layer where the behavior was read best (the sweep's best probe)."""
        return int(self.summary["best_layer"])


def _has_position(cset: ContrastSet, position: str) -> bool:
    try:
        position_span(cset[0], "positive", position)
    except BehaviorLensError:
        return False
    return True
