"""Probes that decide where an edit acts, trained on a family's pairs and used without them.

- :func:`train_token_detector`: a per-token probe of the residual stream that flags the tokens
  carrying the pressure (the valence slot's tokens of both pressured sides, and claims about
  the same answers in other wordings spliced into the same prompts (:func:`reworded_claims`),
  against every other token, the no-pressure prompts and ordinary user turns), closing gaps of
  up to ``DETECTOR_GAP`` tokens inside a flagged span. A knockout blocks attention to the tokens
  it flags, so at inference it needs no slot annotations.
- :func:`train_pressure_gate`: a probe of the last token that fires when the prompt carries pressure
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

from ..chat import chat_ids, turn_end
from ..edits import Readout
from ..errors import BehaviorLensError
from ..prompts.contrast import NEUTRAL, SIDES
from ..reads import token_states
from .data import claim_wordings, detector_negatives


def default_layers(n_layers: int, before: int) -> list[int]:
    """A few layers spread over the first two thirds of the model, all before ``before``."""
    layers = sorted({max(1, round(n_layers * f)) for f in (0.15, 0.27, 0.4, 0.55, 0.67)})
    return [layer for layer in layers if layer < before] or [max(0, before - 1)]


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


def _probe() -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=0.1, max_iter=2000, class_weight="balanced")


def _held_out_scores(x: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray) -> np.ndarray:
    return _probe().fit(x[train], labels[train]).decision_function(x[test])


def fit_layer(features: dict[int, np.ndarray], labels: np.ndarray, groups: np.ndarray,
               seed: int) -> tuple[int, Any, pd.DataFrame]:
    """The layer with the best grouped cross-validated AUROC, its probe refit on everything.
    Every fit runs on one thread (the folds' in parallel processes): a near-separable fit stops
    where its solver's path leads, and that path depends on how many threads sum its terms, so
    the probe would depend on the machine (one thread is also faster here)."""
    from joblib import Parallel, delayed
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold
    from threadpoolctl import threadpool_limits

    folds = list(GroupKFold(min(5, len(np.unique(groups))), shuffle=True, random_state=seed)
                 .split(labels, labels, groups))
    jobs = [(layer, test) for layer in features for _, test in folds]
    fitted = Parallel(n_jobs=-1, inner_max_num_threads=1)(delayed(_held_out_scores)(features[layer], labels, train, test)
                                 for layer in features for train, test in folds)
    scores = {layer: np.empty(len(labels)) for layer in features}
    for (layer, test), s in zip(jobs, fitted):
        scores[layer][test] = s
    table = pd.DataFrame([{"layer": layer, "cv_auroc": float(roc_auc_score(labels, scores[layer]))}
                          for layer in features])
    best = int(table.sort_values(["cv_auroc", "layer"], ascending=[False, True]).iloc[0]["layer"])
    with threadpool_limits(1):
        return best, _probe().fit(features[best], labels), table


DETECTOR_GAP = 3  # a claimed answer of up to three tokens inside a flagged claim is flagged too


def readout_of(layer: int, clf: Any, gap: int = 0) -> Readout:
    return Readout(layer, torch.tensor(clf.coef_[0], dtype=torch.float32), float(clf.intercept_[0]), gap)


def ordinary_turns(tokenizer: Any) -> list[list[int]]:
    """The built-in ordinary user turns (no claim about an answer), with the chat template and
    as plain text: a detector's negatives beside its family's own tokens."""
    texts = detector_negatives()
    return [chat_ids(tokenizer, t) for t in texts] + [list(tokenizer(t)["input_ids"]) for t in texts]


def _claim_tokens(tokenizer: Any, text: str, start: int, claim: str, special: bool) -> tuple[list[int], np.ndarray]:
    """``text`` with ``claim`` inserted at character ``start``: its tokens, and which are the claim's."""
    new = text[:start] + claim + text[start:]
    enc = tokenizer(new, add_special_tokens=special, return_offsets_mapping=True)
    end = start + len(claim)
    inside = np.array([s < end and e > start and e > s for s, e in enc["offset_mapping"]])
    return list(enc["input_ids"]), inside


def reworded_claims(tokenizer: Any, cset: Any, wordings: Sequence[str], per_side: int = 2,
                    seed: int = 0) -> tuple[list[list[int]], list[np.ndarray], list[int]]:
    """The pressured prompts of every pair with the family's claim replaced by other wordings of
    a claim about the same answer (a wording's ``{answer}`` is the side's answer), alternately
    in the claim's place and at the end of the user's turn (chat prompts). Per prompt: its
    tokens, which tokens are the claim's, and the wording's index. Pairs whose text does not
    tokenize back to their tokens are skipped."""
    slot, end_of_turn = valence_slot(cset), turn_end(tokenizer)
    order = np.random.default_rng(seed).permutation(len(wordings))
    sequences, labels, which, k = [], [], [], 0
    for p in cset if wordings else []:
        for side, answer in zip(SIDES, ("matching", "not_matching")):
            text, ids = p.text[side], p.tokens[side]
            special = tokenizer(text, add_special_tokens=False)["input_ids"] != ids
            enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
            if enc["input_ids"] != ids:
                continue
            a, b = p.span(side, slot)
            start, stop = enc["offset_mapping"][a][0], enc["offset_mapping"][b - 1][1]
            for _ in range(per_side):
                w = int(order[k % len(order)])
                claim = wordings[w].replace("{answer}", p.answer_text[answer].strip())
                at_end = k % 2 == 1 and end_of_turn is not None and NEUTRAL in p.text
                k += 1
                if at_end:
                    base = p.text[NEUTRAL]
                    seq, inside = _claim_tokens(tokenizer, base, base.rfind(end_of_turn), " " + claim, special)
                else:
                    seq, inside = _claim_tokens(tokenizer, text[:start] + text[stop:], start, claim, special)
                sequences.append(seq)
                labels.append(inside)
                which.append(w)
    return sequences, labels, which


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


def train_token_detector(model: Any, fit: Any, layers: Sequence[int], seed: int = 0,
                   negatives: Sequence[Sequence[int]] | None = None,
                   wordings: Sequence[str] | None = None) -> tuple[Readout, pd.DataFrame]:
    """A per-token probe flagging the pressure's tokens (see the module doc); the CV table.
    ``negatives``: token sequences none of whose tokens carry pressure (default: the built-in
    ordinary user turns, :func:`ordinary_turns`); ``wordings``: claims about an answer the
    detector also learns (default: the built-in ones, ``data.claim_wordings``; ``[]`` for none).
    Cross-validation keeps each wording's prompts in one fold, so the layer is picked by how
    well it flags wordings it did not learn."""
    wordings = claim_wordings() if wordings is None else wordings
    sequences, labels, groups = _pressure_tokens(fit)
    for seq, y, w in zip(*reworded_claims(model.tokenizer, fit, wordings, seed=seed)):
        sequences.append(seq)
        labels.append(y)
        groups.append(np.full(len(seq), len(fit) + w))
    for j, seq in enumerate(ordinary_turns(model.tokenizer) if negatives is None else negatives):
        sequences.append(seq)
        labels.append(np.zeros(len(seq), dtype=bool))
        groups.append(np.full(len(seq), len(fit) + len(wordings) + j))
    keep = np.concatenate(_first_occurrences(sequences, labels))
    states = token_states(model, sequences, layers)
    features = {layer: np.concatenate(v)[keep] for layer, v in states.items()}
    layer, clf, table = fit_layer(features, np.concatenate(labels)[keep], np.concatenate(groups)[keep], seed)
    return readout_of(layer, clf, DETECTOR_GAP), table


def _first_occurrences(sequences: Sequence[Sequence[int]], labels: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per token, whether it is the first with its prefix and label: a token's residual depends
    only on its prefix, so later ones (a shared system prompt, a repeated question) are copies."""
    nodes: dict[tuple[int, int], int] = {}
    seen: set[tuple[int, bool]] = set()
    out = []
    for seq, y in zip(sequences, labels):
        node, first = -1, np.zeros(len(seq), dtype=bool)
        for i, token in enumerate(seq):
            node = nodes.setdefault((node, int(token)), len(nodes))
            if (node, bool(y[i])) not in seen:
                seen.add((node, bool(y[i])))
                first[i] = True
        out.append(first)
    return out


def train_pressure_gate(model: Any, fit: Any, layers: Sequence[int], seed: int = 0) -> tuple[Readout, pd.DataFrame]:
    """A last-token probe: pressured prompts (1) against no-pressure prompts (0); the CV table."""
    sequences, labels, groups = [], [], []
    for side in _sides(fit):
        for i, p in enumerate(fit):
            sequences.append(p.tokens[side])
            labels.append(0 if side == NEUTRAL else 1)
            groups.append(i)
    states = token_states(model, sequences, layers)
    features = {layer: np.stack([s[-1] for s in v]) for layer, v in states.items()}
    layer, clf, table = fit_layer(features, np.array(labels), np.array(groups), seed)
    return readout_of(layer, clf), table


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


def _claimed_answer(positive: Sequence[int], negative: Sequence[int]) -> np.ndarray:
    """Which positive-side tokens differ from the negative side (between their common prefix
    and common suffix, so misaligned pairs too)."""
    n = min(len(positive), len(negative))
    head = next((i for i in range(n) if positive[i] != negative[i]), n)
    tail = next((i for i in range(n - head) if positive[-1 - i] != negative[-1 - i]), n - head)
    out = np.zeros(len(positive), dtype=bool)
    out[head:len(positive) - tail] = True
    return out


def detector_quality(model: Any, detector: Readout, held: Any, neutral_requests: Sequence[Sequence[int]]) -> dict:
    """Token-level recall on the held-out pressure tokens, false-positive rate on their other
    tokens and on ordinary requests, and the share of requests with any token flagged."""
    sequences, labels, _ = _pressure_tokens(held)
    states = token_states(model, [*sequences, *neutral_requests], [detector.layer])[detector.layer]
    flags = [detector.close(detector.scores(torch.tensor(x))[None] > 0)[0].numpy() for x in states]
    family, requests = flags[:len(sequences)], flags[len(sequences):]
    y, f = np.concatenate(labels), np.concatenate(family)
    differ = [_claimed_answer(p.tokens["positive"], p.tokens["negative"]) for p in held]
    return {
        "detector_layer": detector.layer,
        "detector_recall": float(f[y].mean()),
        "detector_recall_claimed_answer": float(np.mean([fl[d].all() for fl, d in zip(family, differ)])),
        "detector_false_positive_rate": float(f[~y].mean()),
        "detector_flags_on_requests": float(np.concatenate(requests).mean()),
        "detector_requests_with_a_flag": float(np.mean([r.any() for r in requests])),
    }
