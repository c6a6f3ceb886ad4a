"""Probes that decide where an edit acts, trained on a family's pairs and used without them.

- :func:`train_detector`: a per-token probe of the residual stream that flags the tokens
  carrying the pressure (the valence slot's tokens of both pressured sides, against every other
  token, the no-pressure prompts and ordinary user turns), closing gaps of up to
  ``DETECTOR_GAP`` tokens inside a flagged span. A knockout blocks attention to the tokens it
  flags, so at inference it needs no slot annotations.
- :func:`train_gate`: a probe of the last token that fires when the prompt carries pressure
  (either pressured side against the neutral side); a gated edit acts only where it fires.

Each picks its layer among ``layers`` by cross-validated AUROC over pairs on the training
split (logistic regression, scikit-learn), then refits on the whole split.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..errors import BehaviorLensError
from ..patching.hooks import reading
from ..prompts.contrast import NEUTRAL, SIDES
from .edit import Readout


def default_layers(n_layers: int, before: int) -> list[int]:
    """A few layers spread over the first two thirds of the model, all before ``before``."""
    layers = sorted({max(1, round(n_layers * f)) for f in (0.15, 0.27, 0.4, 0.55, 0.67)})
    return [layer for layer in layers if layer < before] or [max(0, before - 1)]


@torch.inference_mode()
def token_states(model: Any, sequences: Sequence[Sequence[int]], layers: Sequence[int],
                 batch_size: int = 16) -> dict[int, list[np.ndarray]]:
    """The residual stream leaving each layer at every token of every sequence (unpadded)."""
    from ..batching import chunks

    out: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    for idx in chunks(len(sequences), batch_size):
        batch = model.batch([sequences[i] for i in idx])
        with reading(model, "resid_post", layers) as acts:
            model.hf(**batch.inputs(), use_cache=False)
        for layer in layers:
            for j in range(len(idx)):
                out[layer].append(acts[layer][j, int(batch.offsets[j]):].float().cpu().numpy())
    return out


def _sides(cset: Any) -> list[str]:
    if not cset.has_neutral:
        raise BehaviorLensError(f"set {cset.name!r} has no neutral side: a detector or gate learns "
                                "pressure against the no-pressure prompt")
    return [*SIDES, NEUTRAL]


def valence_slot(cset: Any) -> str:
    """The first valence slot of a set's pairs (its pressure's tokens)."""
    slots = [k for k in cset[0].spans["positive"] if k not in ("last", "answer")]
    if not slots:
        raise BehaviorLensError(f"set {cset.name!r} has no valence slot to learn from")
    return slots[0]


def _fit_layer(features: dict[int, np.ndarray], labels: np.ndarray, groups: np.ndarray,
               seed: int) -> tuple[int, Any, pd.DataFrame]:
    """The layer with the best grouped cross-validated AUROC, its probe refit on everything."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold

    def probe() -> Any:
        return LogisticRegression(C=0.1, max_iter=2000, class_weight="balanced")

    folds = list(GroupKFold(min(5, len(np.unique(groups))), shuffle=True, random_state=seed)
                 .split(labels, labels, groups))
    rows = []
    for layer, x in features.items():
        scores = np.empty(len(labels))
        for train, test in folds:
            scores[test] = probe().fit(x[train], labels[train]).decision_function(x[test])
        rows.append({"layer": layer, "cv_auroc": float(roc_auc_score(labels, scores))})
    table = pd.DataFrame(rows)
    best = int(table.sort_values(["cv_auroc", "layer"], ascending=[False, True]).iloc[0]["layer"])
    return best, probe().fit(features[best], labels), table


DETECTOR_GAP = 3  # a claimed answer of up to three tokens inside a flagged claim is flagged too


def _readout(layer: int, clf: Any, gap: int = 0) -> Readout:
    return Readout(layer, torch.tensor(clf.coef_[0], dtype=torch.float32), float(clf.intercept_[0]), gap)


def ordinary_turns(tokenizer: Any) -> list[list[int]]:
    """The built-in ordinary user turns (no claim about an answer), with the chat template and
    as plain text: a detector's negatives beside its family's own tokens."""
    from .data import detector_negatives
    from .side_effects import chat_ids

    texts = detector_negatives()
    return [chat_ids(tokenizer, t) for t in texts] + [list(tokenizer(t)["input_ids"]) for t in texts]


def _pressure_tokens(cset: Any) -> tuple[list, list[np.ndarray], list[np.ndarray]]:
    """Every side's tokens of every pair, per token whether it is the valence slot's on a
    pressured side, and per token its pair (side-major order)."""
    slot = valence_slot(cset)
    sequences, labels, groups = [], [], []
    for side in _sides(cset):
        for i, p in enumerate(cset):
            y = np.zeros(len(p.tokens[side]), dtype=bool)
            if side != NEUTRAL:
                a, b = p.span(side, slot)
                y[a:b] = True
            sequences.append(p.tokens[side])
            labels.append(y)
            groups.append(np.full(len(y), i))
    return sequences, labels, groups


def train_detector(model: Any, fit: Any, layers: Sequence[int], seed: int = 0,
                   negatives: Sequence[Sequence[int]] | None = None) -> tuple[Readout, pd.DataFrame]:
    """A per-token probe flagging the pressure's tokens (see the module doc); the CV table.
    ``negatives``: token sequences none of whose tokens carry pressure (default: the built-in
    ordinary user turns, :func:`ordinary_turns`)."""
    sequences, labels, groups = _pressure_tokens(fit)
    for j, seq in enumerate(ordinary_turns(model.tokenizer) if negatives is None else negatives):
        sequences.append(seq)
        labels.append(np.zeros(len(seq), dtype=bool))
        groups.append(np.full(len(seq), len(fit) + j))
    states = token_states(model, sequences, layers)
    features = {layer: np.concatenate(v) for layer, v in states.items()}
    layer, clf, table = _fit_layer(features, np.concatenate(labels), np.concatenate(groups), seed)
    return _readout(layer, clf, DETECTOR_GAP), table


def train_gate(model: Any, fit: Any, layers: Sequence[int], seed: int = 0) -> tuple[Readout, pd.DataFrame]:
    """A last-token probe: pressured prompts (1) against no-pressure prompts (0); the CV table."""
    sequences, labels, groups = [], [], []
    for side in _sides(fit):
        for i, p in enumerate(fit):
            sequences.append(p.tokens[side])
            labels.append(0 if side == NEUTRAL else 1)
            groups.append(i)
    states = token_states(model, sequences, layers)
    features = {layer: np.stack([s[-1] for s in v]) for layer, v in states.items()}
    layer, clf, table = _fit_layer(features, np.array(labels), np.array(groups), seed)
    return _readout(layer, clf), table


def gate_quality(model: Any, gate: Readout, held: Any, neutral_requests: Sequence[Sequence[int]]) -> dict:
    """Precision and recall of a gate on held-out pressured and no-pressure prompts, and how
    often it fires on ordinary requests (which the side effects then include)."""
    sequences = [p.tokens[s] for s in _sides(held) for p in held]
    truth = np.array([s != NEUTRAL for s in _sides(held) for _ in held])
    last = [x[-1] for x in token_states(model, sequences, [gate.layer])[gate.layer]]
    fired = gate.scores(torch.tensor(np.stack(last))).numpy() > 0
    requests = [x[-1] for x in token_states(model, neutral_requests, [gate.layer])[gate.layer]]
    on_requests = gate.scores(torch.tensor(np.stack(requests))).numpy() > 0
    return {
        "gate_layer": gate.layer,
        "gate_precision": float(truth[fired].mean()) if fired.any() else float("nan"),
        "gate_recall": float(fired[truth].mean()),
        "gate_fires_on_no_pressure": float(fired[~truth].mean()),
        "gate_fires_on_requests": float(on_requests.mean()),
    }


def detector_quality(model: Any, detector: Readout, held: Any, neutral_requests: Sequence[Sequence[int]]) -> dict:
    """Token-level recall on the held-out pressure tokens, false-positive rate on their other
    tokens and on ordinary requests, and the share of requests with any token flagged."""
    sequences, labels, _ = _pressure_tokens(held)
    states = token_states(model, [*sequences, *neutral_requests], [detector.layer])[detector.layer]
    flags = [detector.close(detector.scores(torch.tensor(x))[None] > 0)[0].numpy() for x in states]
    family, requests = flags[:len(sequences)], flags[len(sequences):]
    y, f = np.concatenate(labels), np.concatenate(family)
    differ = [np.array([a != b for a, b in zip(p.tokens["positive"], p.tokens["negative"])]) for p in held]
    return {
        "detector_layer": detector.layer,
        "detector_recall": float(f[y].mean()),
        "detector_recall_claimed_answer": float(np.mean([fl[d].all() for fl, d in zip(family, differ)])),
        "detector_false_positive_rate": float(f[~y].mean()),
        "detector_flags_on_requests": float(np.concatenate(requests).mean()),
        "detector_requests_with_a_flag": float(np.mean([r.any() for r in requests])),
    }
