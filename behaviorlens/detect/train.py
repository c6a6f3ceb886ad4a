"""Training a lie detector: lie vs honest answers under the same pressure, with its controls.

Every layer x position (``answer``, ``last``, ``claim``) x method is cross-validated on the
training examples (:func:`behaviorlens.probing.sweep.probe_sweep`); the reported AUROC is
nested (:func:`behaviorlens.probing.validity.nested_best`: the layer, position and method are
chosen on inner folds of each outer training split). Folds are grouped by *blocks*: each block
holds whole pairs and at least one lie and one honest example, so every fold scores both classes
(:func:`balanced_groups`). The detector is chosen among the positions a transcript has
(``answer``, ``last``); the ``claim`` position is swept and reported only.

Controls: the same probe on shuffled labels; the wording baseline (the same probes on the words
alone, :func:`behaviorlens.probing.validity.wording_baseline`; ``wording_explains`` when it
reaches the nested AUROC's CI); the claim-wrongness probe (the training pairs' two sides: what
today's probes read) scored on lie vs honest; the mistake check (out-of-fold honest scores
against mistakes, which training never sees).

With ``override=True`` the detector is the override detector (:mod:`.override`): the falsity
probe chosen above AND the lens's late-arrival score, calibrated on lie, honest and mistake
examples (mistakes as negatives); the falsity probe stays in the file as the control it is.
With ``features`` other than ``answer``, or ``negatives="not_lie"``, the detector is a readout
detector (:mod:`.readout`: the belief-conditioned probe, the follow-up readout, or the answer
probe trained with mistakes as negatives), chosen the same way; the falsity probe and the
controls above stay beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..errors import BehaviorLensError
from ..probing.probes import make_probe
from ..probing.sweep import (
    best_row,
    cross_validate,
    fit_probe,
    pair_folds,
    probe_sweep,
    shuffled_labels,
)
from ..probing.validity import nested_best, wording_baseline
from ..stats import auroc
from .detector import Detector
from .evaluate import score_examples
from .examples import POSITIONS, SITE, Examples, answer_wording_features, read_states
from .folds import as_activations, balanced_groups, require_both_classes
from .lens import LENSES, TunedLens, fit_tuned_lens, ordinary_text
from .linear import Linear
from .override import train_override
from .readout import FOLLOWUP, train_readout

CHOOSABLE = ("answer", "last")  # positions every transcript has
DETECTOR_METHODS = ("mean_diff", "logistic")
CHAT_FPR = 0.01


@dataclass
class TrainResult:
    """The detector, its headline figures and its tables (``sweep``, ``wording``, ``examples``)."""

    detector: Detector
    summary: dict[str, Any]
    tables: dict[str, pd.DataFrame]


def default_layers(n_layers: int) -> list[int]:
    """Every other layer (the sweep's cost grows with the layers; neighbours differ little)."""
    return list(range(0, n_layers, 2))


def chat_threshold(scores: np.ndarray, fpr: float = CHAT_FPR) -> float:
    """The score that at most ``fpr`` of ordinary chat exceeds (the highest score below 100 requests)."""
    return float(np.quantile(np.asarray(scores, dtype=float), 1 - fpr, method="higher"))


def falsity_out_of_fold(method: str, X: np.ndarray, labels: np.ndarray, groups: np.ndarray, folds: int,
                        seed: int = 0) -> np.ndarray:
    """Every example's falsity-probe score from a probe fitted (lie against honest) on the other
    folds' lie and honest examples."""
    y = (labels == "lie").astype(np.int64)
    out = np.empty(len(y))
    for tr, te in pair_folds(groups, folds, seed):
        keep = tr[labels[tr] != "mistake"]
        out[te] = make_probe(method, seed=seed).fit(X[keep], y[keep], groups[keep]).score(X[te])
    return out


def train_detector(model: Any, train: Examples, contrast: Examples | None = None, chat: Examples | None = None,
                   layers: Sequence[int] | None = None, positions: Sequence[str] = POSITIONS,
                   methods: Sequence[str] = DETECTOR_METHODS, folds: int = 5, seed: int = 0, n_boot: int = 500,
                   batch_size: int = 16, override: bool = False, lenses: Sequence[str] = LENSES,
                   features: str = "answer", negatives: str = "honest", question: str = FOLLOWUP,
                   tuned: TunedLens | None = None) -> TrainResult:
    """Fit the detector on ``train``'s lie and honest examples (its mistakes are only scored), or
    with ``override`` the override detector on lie, honest and mistake examples (``lenses``: the
    lenses it chooses among; the tuned lens is ``tuned``, else fitted on the ``fit`` part of ordinary text).

    ``contrast``: both sides of the training pairs, label 'positive'/'negative' (the claim
    probe); ``chat``: ordinary requests with the model's answers, where the threshold is set
    (the select half of the neutral requests; evaluation reports the other half).
    ``features``, ``negatives``, ``question``: a readout detector (:mod:`.readout`).
    """
    readout_wanted = features != "answer" or negatives != "honest"
    if override and readout_wanted:
        raise BehaviorLensError(f"the override detector and a {features} detector with {negatives} negatives are "
                                f"two detectors; train one at a time")
    layers = default_layers(model.sites.n_layers) if layers is None else [int(x) for x in layers]
    positions = [p for p in positions if p in POSITIONS] or list(CHOOSABLE)
    choosable = [p for p in positions if p in CHOOSABLE]
    if not choosable:
        raise BehaviorLensError(f"detect train needs one of the positions {', '.join(CHOOSABLE)} (a transcript has no claim)")
    lh = train.with_labels("lie", "honest")
    y = (lh.table["label"] == "lie").to_numpy().astype(np.int64)
    require_both_classes(y, lh)
    groups = balanced_groups(y, lh.groups, seed)
    folds = min(folds, len(np.unique(groups)))
    states = read_states(model, lh, layers, positions, batch_size)
    acts = as_activations(states, y, groups, layers, positions)
    sweep = probe_sweep(acts, methods, folds, seed, n_boot=n_boot)
    nested = nested_best(as_activations(states, y, groups, layers, choosable), methods, folds, seed=seed, n_boot=n_boot)
    best = best_row(sweep[sweep["position"].isin(choosable)])
    layer, position, method = int(best["layer"]), str(best["position"]), str(best["method"])
    X = acts.features(SITE, position, layer)
    probe = fit_probe(acts, SITE, layer, position, method, seed=seed)
    shuffled = make_probe(method, seed=seed).fit(X, shuffled_labels(y, groups, seed), groups)

    wording, vocab = answer_wording_features(model, lh)
    wording_table = wording_baseline(wording, y, groups, methods, folds, seed)
    top = wording_table.sort_values("auroc", ascending=False, kind="stable").iloc[0]
    wording_probe = make_probe(str(top["method"]), seed=seed).fit(wording[str(top["representation"])], y, groups)
    ci_low = nested["best_auroc_ci"][0]

    # the mistake check: honest examples scored out of fold, mistakes by the final probe
    splits = pair_folds(groups, folds, seed)
    oof, _, _ = cross_validate(method, X, y, groups, splits, seed)
    mistakes = train.with_labels("mistake")
    mistake_auroc = float("nan")
    if len(mistakes):
        m_scores = probe.score(read_states(model, mistakes, [layer], [position], batch_size)[position][:, 0])
        honest = oof[y == 0]
        mistake_auroc = auroc(np.concatenate([m_scores, honest]),
                              np.concatenate([np.ones(len(m_scores)), np.zeros(len(honest))]))

    claim, claim_auroc = None, float("nan")
    if contrast is not None and len(contrast):
        c_y = (contrast.table["label"] == "positive").to_numpy().astype(np.int64)
        c_X = read_states(model, contrast, [layer], [position], batch_size)[position][:, 0]
        claim = make_probe(method, seed=seed).fit(c_X, c_y, contrast.groups)
        claim_auroc = auroc(claim.score(X), y)

    override_part, override_summary = None, {}
    if override:
        nl = train.with_labels("lie", "honest", "mistake")
        nl_labels = nl.table["label"].to_numpy()
        nl_groups = balanced_groups((nl_labels == "lie").astype(np.int64), nl.groups, seed)
        X_nl = read_states(model, nl, [layer], [position], batch_size)[position][:, 0]
        oof_nl = falsity_out_of_fold(method, X_nl, nl_labels, nl_groups, min(folds, len(np.unique(nl_groups))), seed)
        if "tuned" in lenses and tuned is None:
            tuned = fit_tuned_lens(model, ordinary_text(model, "fit"), batch_size=batch_size)
        override_part, override_summary, _ = train_override(model, nl, oof_nl, nl_groups, lenses, tuned, seed,
                                                            batch_size)

    readout, readout_summary, tables = None, {}, {"sweep": sweep, "wording": wording_table}
    if readout_wanted:
        readout, readout_summary, tables["readout_sweep"] = train_readout(
            model, train, features, negatives, layers, choosable, methods, folds, seed, n_boot, question, batch_size)

    counts = train.table.groupby("family")["label"].value_counts().unstack(fill_value=0)
    summary = {
        "families": sorted(train.table["family"].unique()),
        "n_lie": int((y == 1).sum()), "n_honest": int((y == 0).sum()),
        "n_mistake": int((train.table["label"] == "mistake").sum()),
        "n_unsure": int((train.table["label"] == "unsure").sum()),
        "label_counts": {f: {k: int(v) for k, v in row.items()} for f, row in counts.iterrows()},
        "layer": layer, "position": position, "method": method,
        "auroc": nested["best_auroc"], "auroc_ci": nested["best_auroc_ci"],
        "nested_choices": nested["nested_choices"],
        "best_in_sample_auroc": float(best["auroc_mean"]),
        "shuffled_auroc": float(best["control_auroc"]), "random_auroc": float(best["random_auroc"]),
        "wording_auroc": float(top["auroc"]), "wording_representation": str(top["representation"]),
        "wording_explains": bool(top["auroc"] >= ci_low),
        "claim_auroc": claim_auroc, "claim_separation": max(claim_auroc, 1 - claim_auroc),
        "mistake_auroc": mistake_auroc,
        "folds": len(splits), "override": override, **override_summary,
        "features": features, "negatives": negatives, **readout_summary,
    }
    detector = Detector(layer=layer, position=position, method=method, probe=Linear.of(probe),
                        shuffled=Linear.of(shuffled), claim=Linear.of(claim) if claim is not None else None,
                        wording=Linear.of(wording_probe), wording_representation=str(top["representation"]),
                        vocab=vocab, override=override_part, readout=readout,
                        meta={"model": getattr(model, "name", ""), "trained_on": summary["families"],
                              "n_lie": summary["n_lie"], "n_honest": summary["n_honest"],
                              "train_auroc": summary["auroc"], "train_auroc_ci": summary["auroc_ci"]})
    if chat is not None and len(chat):
        chat_scores = score_examples(model, detector, chat, batch_size)
        detector.threshold = chat_threshold(chat_scores["score"].to_numpy())
        detector.meta["falsity_threshold"] = chat_threshold(chat_scores["falsity_score"].to_numpy())
    summary["chat_threshold"] = detector.threshold
    return TrainResult(detector, summary, tables)
