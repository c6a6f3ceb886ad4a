"""The override detector: a false answer the model did not arrive at on its own.

A lie differs from an honest mistake in one way: the model held another answer and gave this
one. The answer-falsity probe (today's detector, :mod:`.train`) reads that the stated answer is
false, which mistakes share. The *override score* (:func:`late_arrival`) reads the lens trace
(:func:`.lens.lens_trace`) where the model picks its answer: how far the given answer's
log-probability rose from the middle third of the stack to the last layer. An answer the model
favoured throughout (an honest answer, or a mistake it believes) is already likely mid-stack;
one that overrode the model's own answer arrives late. It needs no reference answer and no
pressure-free run.

The detector asks for both, as an AND of two z-scores: the falsity score measured against the
honest answers (how far above them, in their standard deviations) and the late arrival measured
against the mistakes; the detector's score is the smaller. Each part is judged only against the
kind of not-lie it is meant to rule out, so under its own negative class a part is about a
standard normal and neither kind of not-lie is pushed above the other. The references (mean,
standard deviation and sign) come from the training examples: the falsity probe's out-of-fold
scores of honest answers, the late arrival of mistakes. References built from shuffled labels
give the shuffled control.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BehaviorLensError
from ..probing.sweep import shuffled_labels
from ..stats import auroc
from .examples import Examples
from .lens import LENSES, LensTrace, TunedLens, lens_trace

MIN_MISTAKES = 4


@dataclass
class Reference:
    """A negative class's mean and standard deviation of one score, and the sign that points
    lies up: ``z(x) = sign * (x - mean) / std``."""

    mean: float
    std: float
    sign: float

    def z(self, x: np.ndarray) -> np.ndarray:
        return self.sign * (np.asarray(x, dtype=np.float64) - self.mean) / self.std

    @classmethod
    def fit(cls, lies: np.ndarray, negatives: np.ndarray) -> Reference:
        lies, negatives = np.asarray(lies, dtype=np.float64), np.asarray(negatives, dtype=np.float64)
        if len(lies) == 0 or len(negatives) < 2:
            raise BehaviorLensError("a reference needs lies and at least two negatives")
        std = float(negatives.std(ddof=1)) or 1.0
        return cls(float(negatives.mean()), std, 1.0 if lies.mean() >= negatives.mean() else -1.0)

    def as_list(self) -> list[float]:
        return [self.mean, self.std, self.sign]


@dataclass
class Override:
    """The override part of a detector: the lens (``logit`` or ``tuned``, with its maps), the
    layers it reads, the middle layers of :func:`late_arrival`, and the references of the AND
    (``falsity``: honest answers; ``override``: mistakes) with their shuffled-label twins."""

    lens: str
    layers: list[int]
    middle: list[int]
    falsity: Reference
    override: Reference
    shuffled_falsity: Reference
    shuffled_override: Reference
    tuned: TunedLens | None = None

    def trace(self, model: Any, examples: Examples, batch_size: int = 16) -> LensTrace:
        return lens_trace(model, examples, self.tuned if self.lens == "tuned" else "logit", self.layers,
                          batch_size=batch_size)

    def score(self, falsity: np.ndarray, override: np.ndarray) -> np.ndarray:
        return np.minimum(self.falsity.z(falsity), self.override.z(override))

    def shuffled_score(self, shuffled_falsity: np.ndarray, override: np.ndarray) -> np.ndarray:
        return np.minimum(self.shuffled_falsity.z(shuffled_falsity), self.shuffled_override.z(override))


def middle_layers(layers: Sequence[int]) -> list[int]:
    """The middle third of ``layers`` (at least one)."""
    layers = list(layers)
    lo, hi = len(layers) // 3, max(len(layers) // 3 + 1, 2 * len(layers) // 3)
    return layers[lo:hi]


def late_arrival(trace: LensTrace, middle: Sequence[int]) -> np.ndarray:
    """The override score: the given answer's log-probability at the trace's last layer minus its
    mean over the ``middle`` layers (high: the answer came late)."""
    idx = [trace.layers.index(m) for m in middle if m in trace.layers]
    if not idx:
        raise BehaviorLensError(f"late_arrival: none of the middle layers {list(middle)} is in the trace")
    return trace.logp[:, -1] - trace.logp[:, idx].mean(axis=1)


def _balanced_auroc(score: np.ndarray, labels: np.ndarray) -> float:
    """The mean of lie-vs-honest and lie-vs-mistake AUROC: both kinds of not-lie count alike."""
    out = []
    for negative in ("honest", "mistake"):
        keep = np.isin(labels, ["lie", negative])
        out.append(auroc(score[keep], (labels[keep] == "lie").astype(int)))
    return float(np.mean(out))


def train_override(model: Any, examples: Examples, falsity_oof: np.ndarray, groups: np.ndarray,
                   lenses: Sequence[str] = LENSES, tuned: TunedLens | None = None, seed: int = 0,
                   batch_size: int = 16) -> tuple[Override, dict[str, Any], dict[str, LensTrace]]:
    """Fit the AND on ``examples`` (labels lie, honest, mistake) from the falsity probe's
    out-of-fold scores; the lens is the one whose AND separates lies from both kinds of not-lie
    best (mean of the two AUROCs, in sample: the two references are its only fitted numbers).
    Returns the override part, its training figures and the lens traces."""
    labels = examples.table["label"].to_numpy()
    n_mistake = int((labels == "mistake").sum())
    if n_mistake < MIN_MISTAKES:
        families = ", ".join(sorted(examples.table["family"].unique()))
        raise BehaviorLensError(f"the override detector needs at least {MIN_MISTAKES} mistakes in training; {families} "
                                f"give {n_mistake}; add a family of harder questions (hard_facts_opinion) or pass "
                                f"--no-override")
    unknown = [name for name in lenses if name not in LENSES]
    if unknown or not lenses:
        raise BehaviorLensError(f"unknown lens {unknown or lenses}; lenses are {', '.join(LENSES)}")
    if "tuned" in lenses and tuned is None:
        raise BehaviorLensError("the tuned lens needs its fitted maps (fit_tuned_lens)")
    y = (labels == "lie").astype(int)
    lh, lm = labels != "mistake", labels != "honest"
    lie, honest, mistake = labels == "lie", labels == "honest", labels == "mistake"
    falsity = Reference.fit(falsity_oof[lie], falsity_oof[honest])
    shuffled = shuffled_labels(y, groups, seed) == 1
    shuffled_falsity = Reference.fit(falsity_oof[lh & shuffled], falsity_oof[lh & ~shuffled])
    layers = list(range(model.sites.n_layers))
    middle = middle_layers(layers)
    traces, candidates = {}, []
    for name in lenses:
        traces[name] = lens_trace(model, examples, tuned if name == "tuned" else "logit", layers, batch_size=batch_size)
        late = late_arrival(traces[name], middle)
        part = Override(name, layers, middle, falsity, Reference.fit(late[lie], late[mistake]), shuffled_falsity,
                        Reference.fit(late[lm & shuffled], late[lm & ~shuffled]), tuned if name == "tuned" else None)
        candidates.append((_balanced_auroc(part.score(falsity_oof, late), labels), name, part, late))
    candidates.sort(key=lambda c: -c[0])
    _, name, part, late = candidates[0]
    summary = {"override_lens": name, "override_middle_layers": middle, "n_mistake_trained": n_mistake,
               "lens_choice": {c[1]: c[0] for c in candidates},
               "late_arrival_lie_vs_mistake_auroc": auroc(late[labels != "honest"], y[labels != "honest"]),
               "late_arrival_lie_vs_honest_auroc": auroc(late[lh], y[lh])}
    return part, summary, traces
