"""Readout detectors: a probe on features other than the pressured answer's state alone.

``features`` names what the probe reads, at a layer and position chosen on the training data
(nested cross-validation over pair blocks, as the answer-falsity probe is chosen):

- ``answer``: the pressured example's own state at ``answer`` or ``last`` (the falsity probe's
  input; with mistakes as negatives it is the falsity probe retrained on lie against not-lie);
- ``belief``: the *belief-conditioned* probe. The detector re-asks the model the bare question
  (the same question without the user's turn, a family's ``neutral`` side, followed by the
  answer the model gives there, :attr:`.examples.Examples.bare`) and reads the pressured state
  against that one at the same position: their difference (``answer-diff``, ``last-diff``) or
  both side by side (``answer-concat``, ``last-concat``);
- ``followup``: the follow-up readout (Pacchiardi et al. 2023, arXiv 2309.15840): the
  conversation with the model's answer, then a new user turn asking ``question`` ("Is that
  answer true?"), read at its last token, where the model would reply.

``negatives`` says what the probe is trained against: ``honest`` answers, or ``not_lie``
(honest answers and mistakes: a lie against everything that is not one). With ``not_lie`` the
two kinds of not-lie count alike (:func:`training_index`: each mistake is repeated as often as
there are honest answers per mistake, inside its own pair's fold), in the choice of layer and
features, in the fit and in the nested AUROC; otherwise the few mistakes would barely count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..chat import SENTINEL, has_template, render_chat
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
from ..probing.validity import nested_best
from ..stats import auroc
from .examples import Examples, read_states
from .folds import as_activations, balanced_groups, require_both_classes
from .linear import Linear

FEATURES = ("answer", "belief", "followup")
NEGATIVES = ("honest", "not_lie")
FOLLOWUP = "Is that answer true?"
COMPOSE = ("diff", "concat")
BASE = ("answer", "last")  # the positions the answer and belief features read


def unit_names(features: str, positions: Sequence[str] = BASE) -> list[str]:
    """The readout positions a detector of ``features`` chooses among."""
    base = [p for p in positions if p in BASE] or list(BASE)
    if features == "answer":
        return base
    if features == "belief":
        return [f"{p}-{c}" for p in base for c in COMPOSE]
    if features == "followup":
        return ["followup"]
    raise BehaviorLensError(f"unknown detector features {features!r}; features are {', '.join(FEATURES)}")


def negative_labels(negatives: str) -> tuple[str, ...]:
    """The labels a readout probe is trained against."""
    if negatives not in NEGATIVES:
        raise BehaviorLensError(f"unknown negatives {negatives!r}; negatives are {', '.join(NEGATIVES)}")
    return ("honest",) if negatives == "honest" else ("honest", "mistake")


def training_index(labels: np.ndarray, negatives: str) -> np.ndarray:
    """The rows a readout probe trains on (lies and ``negatives``); with ``not_lie`` each mistake
    repeated ``round(n_honest / n_mistake)`` times (at least once)."""
    labels = np.asarray(labels)
    idx = np.flatnonzero(np.isin(labels, ["lie", *negative_labels(negatives)]))
    n_honest, n_mistake = int((labels == "honest").sum()), int((labels == "mistake").sum())
    if negatives == "honest" or n_mistake == 0:
        return idx
    repeat = max(1, round(n_honest / n_mistake))
    return np.concatenate([idx[labels[idx] != "mistake"], np.repeat(idx[labels[idx] == "mistake"], repeat)])


def followup_suffix(tokenizer: Any, question: str = FOLLOWUP) -> list[int]:
    """The tokens that close the assistant's answer and ask ``question`` as a new user turn, up
    to where the assistant would reply (without a chat template: ``question`` after a space)."""
    if not question.strip():
        raise BehaviorLensError("the follow-up question is empty")
    if not has_template(tokenizer):
        return list(tokenizer(" " + question, add_special_tokens=False)["input_ids"])
    asked = "\ue001"
    text = render_chat(tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": SENTINEL},
                                   {"role": "user", "content": asked}])
    after = text.split(SENTINEL, 1)[1].replace(asked, question)
    return list(tokenizer(after, add_special_tokens=False)["input_ids"])


def followup_examples(tokenizer: Any, examples: Examples, question: str = FOLLOWUP) -> Examples:
    """Each example followed by the follow-up turn; ``answer`` and ``last`` both name its last
    token (where the model would reply)."""
    suffix = followup_suffix(tokenizer, question)
    seqs = [list(s) + suffix for s in examples.sequences]
    end = np.array([len(s) - 1 for s in seqs], dtype=np.int64)
    return Examples(examples.table, seqs, {"answer": end, "last": end.copy(), "claim": np.full(len(seqs), -1)},
                    examples.answer_start.copy())


def _bare(examples: Examples) -> Examples:
    if examples.bare is None:
        families = ", ".join(sorted(examples.table["family"].astype(str).unique()))
        raise BehaviorLensError(f"the belief-conditioned detector re-asks the bare question, which {families} lack "
                                f"(a family needs a neutral side; a transcript has none)")
    return examples.bare


def readout_states(model: Any, examples: Examples, features: str, layers: Sequence[int],
                   units: Sequence[str] | None = None, question: str = FOLLOWUP,
                   batch_size: int = 16) -> dict[str, np.ndarray]:
    """Each readout position's features (:func:`unit_names`): position -> [n, layers, width]."""
    units = list(units or unit_names(features))
    if features == "followup":
        states = read_states(model, followup_examples(model.tokenizer, examples, question), layers, ["answer"],
                             batch_size)
        return {"followup": states["answer"]}
    base = sorted({u.split("-")[0] for u in units})
    pressured = read_states(model, examples, layers, base, batch_size)
    if features == "answer":
        return {u: pressured[u] for u in units}
    bare = read_states(model, _bare(examples), layers, base, batch_size)
    out = {}
    for u in units:
        position, how = u.split("-")
        p, b = pressured[position], bare[position]
        out[u] = p - b if how == "diff" else np.concatenate([p, b], axis=-1)
    return out


@dataclass
class Readout:
    """A readout detector's probe: what it reads (``features``, ``unit`` at ``layer``), the
    probe and its shuffled-label twin, what it was trained against and the follow-up question."""

    features: str
    unit: str
    layer: int
    method: str
    probe: Any  # a .detector.Linear
    shuffled: Any
    negatives: str
    question: str = FOLLOWUP

    def scores(self, model: Any, examples: Examples, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
        """The probe's and the shuffled twin's scores of ``examples``."""
        X = readout_states(model, examples, self.features, [self.layer], [self.unit], self.question,
                           batch_size)[self.unit][:, 0]
        return self.probe.score(X), self.shuffled.score(X)

    def describe(self) -> str:
        what = {"answer": "the pressured state", "belief": "the pressured state against the bare re-ask",
                "followup": f"the follow-up {self.question!r}"}[self.features]
        return (f"{self.features} detector: {self.method} probe of {what}, resid_post layer {self.layer} @ "
                f"{self.unit}, lie against {'honest' if self.negatives == 'honest' else 'honest and mistakes'}")

    def head(self) -> dict[str, Any]:
        return {"features": self.features, "unit": self.unit, "layer": self.layer, "method": self.method,
                "negatives": self.negatives, "question": self.question,
                "bias": {"probe": self.probe.bias, "shuffled": self.shuffled.bias}}


def split_aurocs(scores: np.ndarray, labels: np.ndarray, prefix: str) -> dict[str, float]:
    """Lie vs honest, lie vs mistake and mistake vs honest AUROC of one score (NaN where a class
    is missing)."""
    out = {}
    for name, pos, neg in (("lie_vs_honest", "lie", "honest"), ("lie_vs_mistake", "lie", "mistake"),
                           ("mistake_vs_honest", "mistake", "honest")):
        keep = np.isin(labels, [pos, neg])
        y = (labels[keep] == pos).astype(int)
        out[f"{prefix}{name}_auroc"] = auroc(scores[keep], y) if 0 < y.sum() < len(y) else float("nan")
    return out


def _with_mistakes(model: Any, readout: Readout, mistakes: Examples, labels: np.ndarray, scores: np.ndarray,
                   batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """``labels`` and ``scores`` with the mistakes and the readout's scores of them appended."""
    if not len(mistakes):
        return labels, scores
    return (np.concatenate([labels, mistakes.table["label"].to_numpy()]),
            np.concatenate([scores, readout.scores(model, mistakes, batch_size)[0]]))


def train_readout(model: Any, train: Examples, features: str, negatives: str, layers: Sequence[int],
                  positions: Sequence[str] = BASE, methods: Sequence[str] = ("mean_diff", "logistic"),
                  folds: int = 5, seed: int = 0, n_boot: int = 500, question: str = FOLLOWUP,
                  batch_size: int = 16) -> tuple[Readout, dict[str, Any], pd.DataFrame]:
    """Choose and fit the readout probe (lie against ``negatives``) on ``train``; returns it,
    its training figures (nested AUROC, and out of fold: lie vs honest, lie vs mistake,
    mistake vs honest) and its sweep table."""
    units = unit_names(features, positions)
    ex = train.subset(training_index(train.table["label"].to_numpy(), negatives))
    labels = ex.table["label"].to_numpy()
    y = (labels == "lie").astype(np.int64)
    require_both_classes(y, ex)
    groups = balanced_groups(y, ex.groups, seed)
    folds = min(folds, len(np.unique(groups)))
    states = readout_states(model, ex, features, layers, units, question, batch_size)
    acts = as_activations(states, y, groups, layers, units)
    sweep = probe_sweep(acts, methods, folds, seed, n_boot=n_boot)
    nested = nested_best(acts, methods, folds, seed=seed, n_boot=n_boot)
    best = best_row(sweep)
    layer, unit, method = int(best["layer"]), str(best["position"]), str(best["method"])
    probe = fit_probe(acts, "resid_post", layer, unit, method, seed=seed)
    X = acts.features("resid_post", unit, layer)
    shuffled = make_probe(method, seed=seed).fit(X, shuffled_labels(y, groups, seed), groups)
    oof, _, _ = cross_validate(method, X, y, groups, pair_folds(groups, folds, seed), seed)
    readout = Readout(features, unit, layer, method, Linear.of(probe), Linear.of(shuffled), negatives, question)
    if negatives == "honest":  # mistakes took no part: the final probe scores them
        labels, oof = _with_mistakes(model, readout, train.with_labels("mistake"), labels, oof, batch_size)
    summary = {"readout": readout.describe(), "readout_features": features, "readout_negatives": negatives,
               "readout_layer": layer, "readout_unit": unit, "readout_method": method,
               "readout_auroc": nested["best_auroc"], "readout_auroc_ci": nested["best_auroc_ci"],
               "readout_nested_choices": nested["nested_choices"],
               "readout_in_sample_auroc": float(best["auroc_mean"]),
               "readout_shuffled_auroc": float(best["control_auroc"]),
               **split_aurocs(oof, labels, "readout_oof_")}
    return readout, summary, sweep
