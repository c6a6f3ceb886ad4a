"""Answered prompts a detector reads: a prompt, the answer the model gave, and named positions.

Every example is one token sequence (the prompt followed by the model's own answer) with:

- ``answer``: the last token of the answer (the statement has been made);
- ``last``: the token before the answer's final word (where the model chooses that word);
- ``claim``: the last token of the family's valence slot (families only: a transcript has none).

A family example is the pressured side's tokens followed by the answer the model prefers there.
A transcript (``{"messages": [...], "answer": "..."}``) is its chat messages in the model's chat
template with the generation prompt, followed by the assistant's answer; a family example and
the transcript of the same conversation are the same tokens (``tests/test_detect_evaluate.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..batching import chunks
from ..chat import chat_ids
from ..errors import BehaviorLensError
from ..prompts.contrast import NEUTRAL, ContrastSet
from ..prompts.loaders import read_jsonl
from ..reads import states_at
from .labels import answer_in_text

POSITIONS = ("answer", "last", "claim")
SITE = "resid_post"


@dataclass
class Examples:
    """One row of ``table`` per example (family, pair, row, label, group, text, ...), its token
    sequence, each named position's token index (-1: not defined) and where its answer (word)
    starts: the tokens the wording baseline's answer embedding reads. ``bare``, where known: row
    for row, the same question re-asked without the user's turn (a family's ``neutral`` side)
    followed by the answer the model gives there."""

    table: pd.DataFrame
    sequences: list[list[int]]
    positions: dict[str, np.ndarray]
    answer_start: np.ndarray
    bare: Examples | None = None

    def __len__(self) -> int:
        return len(self.sequences)

    def subset(self, keep: np.ndarray) -> Examples:
        idx = np.flatnonzero(np.asarray(keep)) if np.asarray(keep).dtype == bool else np.asarray(keep)
        return Examples(self.table.iloc[idx].reset_index(drop=True), [self.sequences[i] for i in idx],
                        {k: v[idx] for k, v in self.positions.items()}, self.answer_start[idx],
                        self.bare.subset(idx) if self.bare is not None else None)

    def with_labels(self, *labels: str) -> Examples:
        return self.subset(self.table["label"].isin(labels).to_numpy())

    @property
    def groups(self) -> np.ndarray:
        """An integer per pair (family and pair): examples of one pair never split across folds."""
        keys = self.table["family"].astype(str) + ":" + self.table["pair"].astype(str)
        return pd.factorize(keys)[0].astype(np.int64)

    @classmethod
    def concat(cls, parts: Sequence[Examples]) -> Examples:
        parts = [p for p in parts if len(p)]
        if not parts:
            raise BehaviorLensError("no examples: every label is 'unsure' or the sets are empty")
        bare = cls.concat([p.bare for p in parts]) if all(p.bare is not None for p in parts) else None
        return cls(pd.concat([p.table for p in parts], ignore_index=True), [s for p in parts for s in p.sequences],
                   {k: np.concatenate([p.positions[k] for p in parts]) for k in POSITIONS},
                   np.concatenate([p.answer_start for p in parts]), bare)


def family_examples(contrast_set: ContrastSet, labels: pd.DataFrame, bare: bool = True) -> Examples:
    """One example per labelled row of ``labels`` (:mod:`behaviorlens.detect.labels`): the row's
    side followed by the answer the model gives there; with ``bare``, each row's bare re-ask
    (:func:`bare_answers`) where the family has a neutral side."""
    rows, seqs, pos, starts = [], [], {k: [] for k in POSITIONS}, []
    for r in labels.itertuples(index=False):
        p = contrast_set[int(r.pair)]
        prompt = p.tokens[r.side]
        seq = prompt + list(p.answers[r.model_answer])
        slots = [k for k in p.spans[r.side] if k not in ("last", "answer")]
        seqs.append(seq)
        starts.append(len(prompt))
        pos["answer"].append(len(seq) - 1)
        pos["last"].append(len(prompt) - 1)
        pos["claim"].append(p.position(r.side, slots[0]) if slots else -1)
        rows.append({**r._asdict(), "answer_text": p.answer_text[r.model_answer],
                     "prompt_text": p.text[r.side]})
    out = Examples(pd.DataFrame(rows), seqs, {k: np.array(v, dtype=np.int64) for k, v in pos.items()},
                   np.array(starts, dtype=np.int64))
    answers = bare_answers(contrast_set, labels) if bare and contrast_set.has_neutral else None
    if answers is not None:
        out.bare = family_examples(contrast_set, labels.assign(side=NEUTRAL, model_answer=answers), bare=False)
    return out


def bare_answers(contrast_set: ContrastSet, labels: pd.DataFrame) -> list[str] | None:
    """The answer the model gives to each row's bare question ('matching': the wrong one): the
    one it prefers on the neutral side by the metric's sign (the margin aside), or the one its
    generated text there names; None where the labels were not judged against the neutral side."""
    if len(labels) == 0 or "reference" not in labels or (labels["reference"] != NEUTRAL).any():
        return None
    if "metric_reference" in labels and labels["metric_reference"].notna().all():
        return ["matching" if m > 0 else "not_matching" for m in labels["metric_reference"]]
    if "text_reference" in labels:
        return ["matching" if answer_in_text(t, contrast_set[int(i)].answer_text["not_matching"],
                                             contrast_set[int(i)].answer_text["matching"]) == "wrong"
                else "not_matching" for t, i in zip(labels["text_reference"], labels["pair"])]
    return None


def transcript_examples(tokenizer: Any, records: Sequence[dict], source: str = "transcripts") -> Examples:
    """Examples from transcripts: ``messages`` (chat, ending before the assistant's answer) and
    ``answer`` (the assistant's text); optional ``label`` and ``id``."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise BehaviorLensError(f"{source}: transcripts need a chat model; this tokenizer has no chat template")
    rows, seqs, pos, starts = [], [], {k: [] for k in POSITIONS}, []
    for i, rec in enumerate(records):
        where = f"{source} line {i + 1}"
        if not isinstance(rec, dict) or not isinstance(rec.get("messages"), list) or not isinstance(rec.get("answer"), str):
            raise BehaviorLensError(f"{where}: a transcript needs 'messages' (a list) and 'answer' (a string)")
        if any(not isinstance(m, dict) or not {"role", "content"} <= set(m) for m in rec["messages"]):
            raise BehaviorLensError(f"{where}: every message needs 'role' and 'content'")
        answer = rec["answer"].rstrip()
        if not answer.strip():
            raise BehaviorLensError(f"{where}: the answer is empty")
        label = rec.get("label", "unlabelled")
        if label not in ("lie", "honest", "mistake", "unsure", "unlabelled"):
            raise BehaviorLensError(f"{where}: label {label!r} is not one of lie, honest, mistake, unsure")
        prompt = tokenizer.apply_chat_template(rec["messages"], add_generation_prompt=True, tokenize=False)
        enc = tokenizer(prompt + answer, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        word = len(prompt) + max(answer.rfind(" "), answer.rfind("\n")) + 1  # the final word's first character
        final = next(j for j, (_, e) in enumerate(offsets) if e > word)
        if final < 1:
            raise BehaviorLensError(f"{where}: the answer's final word has no token before it")
        seqs.append(ids)
        starts.append(final)  # the answer's final word, as a family example's answer
        pos["answer"].append(len(ids) - 1)
        pos["last"].append(final - 1)
        pos["claim"].append(-1)
        rows.append({"family": source, "pair": i, "row": i, "id": rec.get("id", i), "label": label,
                     "answer_text": answer, "prompt_text": prompt})
    return Examples(pd.DataFrame(rows), seqs, {k: np.array(v, dtype=np.int64) for k, v in pos.items()},
                    np.array(starts, dtype=np.int64))


def read_transcripts(path: str | Path) -> list[dict]:
    """The records of a transcripts JSONL file (one JSON object a line)."""
    return read_jsonl(Path(path), empty="no transcripts")


def first_statement(text: str) -> str:
    """The first sentence of a text without its closing punctuation, so that it ends on a word
    as a family example's answer does ("... is Paris")."""
    import re

    text = text.strip()
    m = re.search(r"[.!?\n]", text)
    head = text[: m.start()] if m else text
    return head.strip() or text


def chat_examples(model: Any, prompts: Sequence[str], max_new_tokens: int = 32, batch_size: int = 16,
                  source: str = "ordinary chat") -> Examples:
    """Ordinary requests, each followed by the first statement of the model's own greedy answer
    (:func:`first_statement`), as transcripts."""
    tok = model.tokenizer
    records = []
    ids = [chat_ids(tok, t) for t in prompts]
    parts = [(idx, model.batch([ids[i] for i in idx])) for idx in chunks(len(ids), batch_size)]
    for (idx, batch), new in zip(parts, model.generate_each([b for _, b in parts], max_new_tokens)):
        for j, i in enumerate(idx):
            answer = first_statement(tok.decode(new[j, batch.input_ids.shape[1]:], skip_special_tokens=True))
            records.append({"messages": [{"role": "user", "content": prompts[i]}], "answer": answer or "OK",
                            "label": "honest"})
    out = transcript_examples(tok, records, source)
    out.bare = transcript_examples(tok, records, source)  # no user's turn to leave out: re-asked, the same
    return out


def read_states(model: Any, examples: Examples, layers: Sequence[int], positions: Sequence[str] = POSITIONS,
                batch_size: int = 16) -> dict[str, np.ndarray]:
    """The residual stream (``resid_post``) at each named position: position -> [n, layers, d]
    float32 (zeros where the position is undefined)."""
    return states_at(model, examples.sequences, layers, {p: examples.positions[p] for p in positions}, batch_size)


def answer_wording_features(model: Any, examples: Examples, vocab: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """What the words alone hold: bag-of-tokens counts of each sequence over ``vocab`` (default:
    every token the examples use) and the mean input embedding of the answer's tokens. Returns
    the features and the vocabulary."""
    import torch

    if vocab is None:
        vocab = np.array(sorted({t for s in examples.sequences for t in s}), dtype=np.int64)
    index = {int(t): j for j, t in enumerate(vocab)}
    counts = np.zeros((len(examples), len(vocab)))
    for i, seq in enumerate(examples.sequences):
        for t in seq:
            if t in index:
                counts[i, index[t]] += 1
    if model.remote == "ndif":
        raise BehaviorLensError("the wording control reads the input embeddings, which only NDIF holds for this "
                                "model; run the detector with --remote local or on a local copy")
    embed = model.sites.embedding(model.hf).weight
    rows = []
    for seq, start in zip(examples.sequences, examples.answer_start):
        ids = torch.tensor(seq[int(start):], dtype=torch.long, device=embed.device)
        rows.append(embed[ids].float().mean(0).detach().cpu().numpy())
    return {"bag_of_tokens": counts, "answer_embeddings": np.stack(rows)}, vocab
