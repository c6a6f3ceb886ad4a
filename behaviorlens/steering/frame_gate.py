"""The frame gate: is the question about the world, or about the user's own text?

In the default model the same heads copy the user's answer word whether it is an opinion about
the world (a claim to weigh against what the model knows) or a fact of the user's own world (a
passage, a story, a personal fact, the user's own earlier words): no edit that hides tokens can
tell the two apart. The question's frame can: a last-token probe trained on

- positives: the fit pairs' pressured prompts (both sides) and the same prompts with the claim
  in other wordings (:func:`.detectors.reworded_claims`);
- negatives: the fit pairs' no-pressure prompts, the ``fit`` part of context use (passages,
  stories, personal facts, claim recall) and of the ordinary requests,

fires where an edit against deference should act and stays shut where the answer must follow
the user. :func:`frame_gate_quality` scores it on prompts it never saw, per set and per style,
beside a wording-only baseline (bag-of-tokens logistic regression on the same training prompts);
``leave_out`` keeps one context style out of training to show how it does on a frame it never saw.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..edits import Readout
from ..errors import BehaviorLensError
from ..prompts import load_family
from ..prompts.contrast import NEUTRAL, SIDES
from ..reads import token_states
from .detectors import fit_layer, readout_of, reworded_claims

PRESSURED, NO_PRESSURE, REQUEST = "pressured", "no pressure", "request"


@dataclass
class FramePrompts:
    """Prompts with a frame label (1: a claim about the world to weigh; 0: anything else), the
    kind each is (``pressured``, ``no pressure``, a context-use style, ``request``) and its group
    (prompts of one question share a group, so cross-validation keeps them in one fold)."""

    sequences: list[list[int]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)

    def add(self, sequence: Sequence[int], label: int, kind: str, group: int | None = None) -> None:
        self.sequences.append(list(sequence))
        self.labels.append(int(label))
        self.kinds.append(kind)
        self.groups.append(len(self.groups) + 10**6 if group is None else int(group))

    def without(self, kinds: Sequence[str]) -> FramePrompts:
        keep = [i for i, k in enumerate(self.kinds) if k not in kinds]
        return FramePrompts([self.sequences[i] for i in keep], [self.labels[i] for i in keep],
                            [self.kinds[i] for i in keep], [self.groups[i] for i in keep])

    def copy(self) -> FramePrompts:
        return FramePrompts(list(self.sequences), list(self.labels), list(self.kinds), list(self.groups))

    def __len__(self) -> int:
        return len(self.sequences)


def request_prompts(requests: Sequence[tuple[list[int], int]]) -> list[list[int]]:
    """The prompts of side-effect requests (each held as prompt + continuation, tail length)."""
    return [list(seq[: len(seq) - tail + 1]) for seq, tail in requests]


def family_prompts(cset: Any, prompts: FramePrompts | None = None, reworded: Sequence[str] = (),
                   tokenizer: Any = None, seed: int = 0) -> FramePrompts:
    """A family's pressured sides as positives and its no-pressure side as negatives (a pair is a
    group), plus its prompts with the claim in each of the ``reworded`` wordings as positives."""
    out = prompts if prompts is not None else FramePrompts()
    base = max(out.groups, default=-1) + 1
    for i, p in enumerate(cset):
        for side in SIDES:
            out.add(p.tokens[side], 1, PRESSURED, base + i)
        if NEUTRAL in p.tokens:
            out.add(p.tokens[NEUTRAL], 0, NO_PRESSURE, base + i)
    if reworded:
        sequences, _, which = reworded_claims(tokenizer, cset, reworded, seed=seed)
        for seq, w in zip(sequences, which):
            out.add(seq, 1, PRESSURED, base + len(cset) + w)
    return out


def context_prompts(context: Any, requests: Sequence[Sequence[int]] = (),
                    prompts: FramePrompts | None = None) -> FramePrompts:
    """Context-use prompts (kind: their style) and ordinary requests, all negatives."""
    out = prompts if prompts is not None else FramePrompts()
    for p in context:
        out.add(p.tokens["positive"], 0, str(p.variables.get("style", "context")))
    for seq in requests:
        out.add(seq, 0, REQUEST)
    return out


def frame_prompts(model: Any, data: Any, families: Sequence[str] = ()) -> FramePrompts:
    """The frame gate's prompts beyond a training family's: the pressured and no-pressure prompts
    of the development ``families`` (built-in names or paths) and the context-use and request
    prompts of ``data`` (a :class:`~.side_effects.SideEffectData`, its ``fit`` part)."""
    out = FramePrompts()
    for name in families:
        family_prompts(load_family(name).render(model.tokenizer), out)
    return context_prompts(data.context, request_prompts(data.neutral), out)


def _last_states(model: Any, sequences: Sequence[Sequence[int]], layers: Sequence[int]) -> dict[int, np.ndarray]:
    states = token_states(model, sequences, layers)
    return {layer: np.stack([x[-1] for x in v]) for layer, v in states.items()}


def train_frame_gate(model: Any, prompts: FramePrompts, layers: Sequence[int], seed: int = 0,
                     leave_out: Sequence[str] = ()) -> tuple[Readout, pd.DataFrame]:
    """A last-token probe of the question's frame (see the module doc), its layer picked among
    ``layers`` by grouped cross-validated AUROC; ``leave_out``: kinds kept out of training."""
    train = prompts.without(leave_out)
    labels = np.array(train.labels)
    if len(set(labels.tolist())) < 2:
        raise BehaviorLensError("a frame gate needs pressured prompts and prompts of another frame to learn from")
    features = _last_states(model, train.sequences, layers)
    layer, clf, table = fit_layer(features, labels, np.array(train.groups), seed)
    return readout_of(layer, clf), table


def bag_of_tokens(sequences: Sequence[Sequence[int]], vocabulary: np.ndarray) -> np.ndarray:
    """Per sequence, how often each token of ``vocabulary`` occurs in it."""
    index = {int(t): j for j, t in enumerate(vocabulary)}
    out = np.zeros((len(sequences), len(vocabulary)))
    for i, seq in enumerate(sequences):
        for t in seq:
            if int(t) in index:
                out[i, index[int(t)]] += 1
    return out


def wording_gate(train: FramePrompts) -> tuple[Any, np.ndarray]:
    """The wording-only baseline: a logistic regression on the training prompts' token counts."""
    from sklearn.linear_model import LogisticRegression

    vocabulary = np.array(sorted({int(t) for s in train.sequences for t in s}))
    clf = LogisticRegression(C=0.1, max_iter=2000, class_weight="balanced")
    return clf.fit(bag_of_tokens(train.sequences, vocabulary), np.array(train.labels)), vocabulary


def frame_gate_quality(model: Any, gate: Readout, train: FramePrompts, held: Mapping[str, FramePrompts],
                       leave_out: Sequence[str] = ()) -> pd.DataFrame:
    """Per held-out set and kind of prompt: how many, the share the gate fires on, its accuracy
    (firing on pressured prompts, shut on every other), and the same for the wording-only
    baseline trained on the same prompts. ``seen_in_training`` says whether that kind of prompt
    (not these prompts) was among the gate's training kinds."""
    from sklearn.metrics import roc_auc_score

    words, vocabulary = wording_gate(train.without(leave_out))
    trained = set(train.without(leave_out).kinds)
    rows = []
    for name, prompts in held.items():
        if not len(prompts):
            continue
        last = _last_states(model, prompts.sequences, [gate.layer])[gate.layer]
        scores = gate.scores(torch.from_numpy(last)).numpy()
        counts = bag_of_tokens(prompts.sequences, vocabulary)
        fired, baseline = scores > 0, words.predict(counts).astype(bool)
        kinds, labels = np.array(prompts.kinds), np.array(prompts.labels).astype(bool)
        both = 0 < labels.sum() < len(labels)
        auroc = float(roc_auc_score(labels, scores)) if both else float("nan")
        wording_auroc = float(roc_auc_score(labels, words.decision_function(counts))) if both else float("nan")
        for kind in sorted(set(prompts.kinds)):
            k = kinds == kind
            rows.append({"set": name, "kind": kind, "prompts": int(k.sum()), "should_fire": bool(labels[k][0]),
                         "fires": float(fired[k].mean()), "accuracy": float((fired[k] == labels[k]).mean()),
                         "wording_accuracy": float((baseline[k] == labels[k]).mean()),
                         "set_auroc": auroc, "wording_set_auroc": wording_auroc, "seen_in_training": kind in trained})
    return pd.DataFrame(rows)
