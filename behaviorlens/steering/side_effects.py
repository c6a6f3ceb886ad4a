"""What an edit costs elsewhere: the prompts side effects are measured on, and the measurements.

Three sets, each in two disjoint halves (``select``: what a chooser may use for its limits;
``report``: only for reporting what was chosen):

- *neutral requests*: ordinary user requests, rendered with the model's chat template (the way
  edits meet prompts in use) and as plain text, each followed by the unedited model's greedy
  continuation (``CONTINUATION`` tokens at most); the KL of the edited from the unedited model
  per predicted token, in nats, at the positions that predict the continuation: the edit acts
  there as in generation (an edit of the answer positions acts on them, not on the prompt);
- *reference text*: plain prose cut into chunks of ``CHUNK`` tokens; perplexity with a CI over
  chunks, the edit acting at every position (each is a prediction);
- *factual control*: plain factual questions with a one-token answer and a distractor, none
  shared with a built-in family; accuracy = the share where the answer beats the distractor.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..analysis.metrics import bootstrap_ci, kl_divergence
from ..batching import answer_tail, chunks
from ..errors import BehaviorLensError
from ..scoring import behavior_metric

HALVES = ("select", "report", "all")
CHUNK = 256
CONTINUATION = 16


def _half(items: list, half: str, seed: int = 0) -> list:
    """A fixed half of ``items`` (``select`` and ``report`` are disjoint; ``all`` is everything)."""
    if half not in HALVES:
        raise BehaviorLensError(f"unknown side-effect half {half!r}; use one of {', '.join(HALVES)}")
    if half == "all":
        return list(items)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    keep = sorted(order[: len(order) // 2] if half == "select" else order[len(order) // 2:])
    return [items[i] for i in keep]


def chat_ids(tokenizer: Any, text: str) -> list[int]:
    """A user request as the model meets it: its chat template with the generation prompt."""
    if getattr(tokenizer, "chat_template", None) is None:
        return list(tokenizer(text)["input_ids"])
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


class SideEffectData:
    """The side-effect prompts, tokenized once for a model; ``half`` picks one half of each set
    (``requests`` keeps only the first N neutral requests of it)."""

    def __init__(self, model: Any, half: str = "report", neutral: Sequence[str] | None = None,
                 reference: str | None = None, factual: Any = None, requests: int | None = None) -> None:
        from . import data

        tok = model.tokenizer
        self.half = half
        texts = _half(list(neutral) if neutral is not None else data.neutral_prompts(), half)[:requests]
        self.neutral = continued(model, [chat_ids(tok, t) for t in texts])
        self.neutral_plain = continued(model, [list(tok(t)["input_ids"]) for t in texts])
        ids = list(tok(reference if reference is not None else data.reference_text())["input_ids"])
        if len(ids) < 2:
            raise BehaviorLensError("the reference text needs at least two tokens")
        self.reference = _half([ids[i:i + CHUNK] for i in range(0, len(ids), CHUNK) if len(ids[i:i + CHUNK]) > 1], half)
        if factual is None:
            from ..prompts import load_family

            family = load_family(str(data.factual_family_path()))
            family.chat = getattr(tok, "chat_template", None) is not None  # base models: plain text
            factual = family.render(tok)
        self.factual = factual.subset(sorted(_half(list(range(len(factual))), half)))


@torch.inference_mode()
def continued(model: Any, prompts: list[list[int]], n: int = CONTINUATION, batch_size: int = 16,
              ) -> list[tuple[list[int], int]]:
    """Each prompt followed by all but the last token of the model's greedy continuation (up to
    ``n`` tokens, through an end-of-sequence token), and how many trailing positions predict
    the continuation."""
    out = []
    eos = model.tokenizer.eos_token_id
    for idx in chunks(len(prompts), batch_size):
        batch = model.batch([prompts[i] for i in idx])
        new = model.hf.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                max_new_tokens=n, do_sample=False, pad_token_id=model.pad_id)
        for j, i in enumerate(idx):
            cont = new[j, batch.input_ids.shape[1]:].tolist()
            if eos in cont:
                cont = cont[: cont.index(eos) + 1]
            out.append((prompts[i] + cont[:-1], max(len(cont), 1)))
    return out


@dataclass
class SideEffects:
    """One model state's side-effect measurements (the unedited model's, or an edit's)."""

    neutral: list[torch.Tensor]  # per chat-rendered request: logits at the predicting positions
    neutral_plain: list[torch.Tensor]
    nll: np.ndarray  # mean negative log-likelihood per reference chunk
    factual: np.ndarray  # per factual row: log p(answer) - log p(distractor)

    @property
    def factual_accuracy(self) -> float:
        return float((self.factual > 0).mean())

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll.mean()))


def tail_logits(model: Any, seqs: list[tuple[list[int], int]], batch_size: int) -> list[torch.Tensor]:
    """Logits at the last ``tail`` positions of each sequence, the edit acting there."""
    out = []
    for idx in chunks(len(seqs), batch_size):
        sequences = [seqs[i][0] for i in idx]
        tails = [seqs[i][1] for i in idx]
        rows = torch.tensor([j for j, t in enumerate(tails) for _ in range(t)])
        positions = torch.tensor([len(sequences[j]) - t + k for j, t in enumerate(tails) for k in range(t)])
        with answer_tail(torch.tensor(tails)):
            logits = model.score_logits(sequences, rows, positions).cpu()
        out += list(torch.split(logits, tails))
    return out


@torch.inference_mode()
def _nll(model: Any, chunks_: list[list[int]], batch_size: int) -> np.ndarray:
    out = []
    for idx in chunks(len(chunks_), batch_size):
        batch = model.batch([chunks_[i] for i in idx])
        logits = model.logits(batch).cpu()
        for j, i in enumerate(idx):
            ids = torch.tensor(chunks_[i])
            out.append(float(torch.nn.functional.cross_entropy(logits[j, -len(ids):-1], ids[1:])))
    return np.array(out)


def measure_side_effects(model: Any, data: SideEffectData, batch_size: int = 16,
                         apply: Callable[..., Any] = lambda positions=None: nullcontext()) -> SideEffects:
    """Neutral logits (chat and plain), reference NLL per chunk and factual metric per row, each
    inside ``apply(positions)``: a context that applies the edit (at every position for the
    reference text, where every token is a prediction; elsewhere where the edit acts)."""
    with apply("all"):
        nll = _nll(model, data.reference, batch_size)
    with apply():
        return SideEffects(
            neutral=tail_logits(model, data.neutral, batch_size),
            neutral_plain=tail_logits(model, data.neutral_plain, batch_size),
            nll=nll,
            factual=behavior_metric(model, data.factual.pairs, "positive", batch_size).numpy(),
        )


def mean_kl(base: list[torch.Tensor], edited: list[torch.Tensor]) -> float:
    """Mean per-token KL(unedited || edited) over every token of every prompt, nats."""
    return float(torch.cat([kl_divergence(b, e) for b, e in zip(base, edited)]).mean())


def compare_side_effects(base: SideEffects, edited: SideEffects) -> dict[str, Any]:
    """The side-effect columns of an evaluation row: KLs, perplexity and factual accuracy."""
    correct_base, correct = (base.factual > 0).astype(float), (edited.factual > 0).astype(float)
    return {
        "neutral_kl": mean_kl(base.neutral, edited.neutral),
        "neutral_kl_plain": mean_kl(base.neutral_plain, edited.neutral_plain),
        "perplexity": edited.perplexity,
        "perplexity_unedited": base.perplexity,
        "perplexity_ci": [float(np.exp(x)) for x in bootstrap_ci(edited.nll)],
        "factual_accuracy": edited.factual_accuracy,
        "factual_accuracy_unedited": base.factual_accuracy,
        "factual_accuracy_change": edited.factual_accuracy - base.factual_accuracy,
        "factual_accuracy_change_ci": list(bootstrap_ci(correct - correct_base)),
    }
