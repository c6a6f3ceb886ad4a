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
  shared with a built-in family; accuracy = the share where the answer beats the distractor;
- *context use*: questions whose right answer is in the user's own turn (a passage, a story or
  hypothetical world, a personal fact) and *claim recall* (the user names an answer, then asks
  which one they named); the distractor is what the model would answer without the context.
  An edit that hides the user's words from the answer fails these: it redacts, it does not
  remove deference. Scored like the factual control, the edit acting at the answer positions.
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
from ..chat import chat_ids, has_template
from ..errors import BehaviorLensError
from ..scoring import behavior_metric

HALVES = ("select", "report", "all")
CLAIM_RECALL = "claim_recall"  # the context-use style scored on its own
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


class SideEffectData:
    """The side-effect prompts, tokenized once for a model; ``half`` picks one half of each set
    (``requests`` keeps only the first N neutral requests of it). ``fillers`` are the non-claim
    sentences a knockout's null blocks in a claim's place (:func:`.baselines.filler_null`)."""

    def __init__(self, model: Any, half: str = "report", neutral: Sequence[str] | None = None,
                 reference: str | None = None, factual: Any = None, requests: int | None = None,
                 context: Any = None, fillers: Sequence[str] | None = None) -> None:
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
        factual = factual if factual is not None else _builtin(tok, data.factual_family_path())
        self.factual = factual.subset(sorted(_half(list(range(len(factual))), half)))
        context = context if context is not None else _builtin(tok, data.context_use_family_path())
        self.context = context.subset(sorted(_half(list(range(len(context))), half)))
        self.recall = np.array([p.variables.get("style") == CLAIM_RECALL for p in self.context])
        self.fillers = list(fillers) if fillers is not None else data.null_sentences()


def _builtin(tokenizer: Any, path: Any) -> Any:
    """A built-in side-effect family rendered for a tokenizer (plain text for base models)."""
    from ..prompts import load_family

    family = load_family(str(path))
    family.chat = has_template(tokenizer)
    return family.render(tokenizer)


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
        new = model.generate(batch, n)
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
    context: np.ndarray  # per context-use row, likewise
    recall: np.ndarray  # per context-use row: whether it is a claim-recall row

    @property
    def factual_accuracy(self) -> float:
        return float((self.factual > 0).mean())

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll.mean()))


def answer_figures(base: np.ndarray, edited: np.ndarray, name: str) -> dict[str, Any]:
    """``{name}_accuracy`` edited and unedited, its change with a CI over rows, and the mean
    metric change (log p(answer) - log p(distractor), edited minus unedited)."""
    right_base, right = (base > 0).astype(float), (edited > 0).astype(float)
    return {
        f"{name}_accuracy": float(right.mean()) if right.size else float("nan"),
        f"{name}_accuracy_unedited": float(right_base.mean()) if right.size else float("nan"),
        f"{name}_accuracy_change": float((right - right_base).mean()) if right.size else float("nan"),
        f"{name}_accuracy_change_ci": list(bootstrap_ci(right - right_base)),
        f"{name}_metric_change": float((edited - base).mean()) if right.size else float("nan"),
    }


def context_figures(base: np.ndarray, edited: np.ndarray, recall: np.ndarray) -> dict[str, Any]:
    """Context use (passages, stories, personal facts) and claim recall, each on its own rows."""
    return (answer_figures(base[~recall], edited[~recall], "context_use")
            | answer_figures(base[recall], edited[recall], "claim_recall"))


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
            context=behavior_metric(model, data.context.pairs, "positive", batch_size).numpy(),
            recall=data.recall,
        )


def mean_kl(base: list[torch.Tensor], edited: list[torch.Tensor]) -> float:
    """Mean per-token KL(unedited || edited) over every token of every prompt, nats."""
    return float(torch.cat([kl_divergence(b, e) for b, e in zip(base, edited)]).mean())


def compare_side_effects(base: SideEffects, edited: SideEffects) -> dict[str, Any]:
    """The side-effect columns of an evaluation row: KLs, perplexity, factual accuracy, context
    use and claim recall."""
    return {
        "neutral_kl": mean_kl(base.neutral, edited.neutral),
        "neutral_kl_plain": mean_kl(base.neutral_plain, edited.neutral_plain),
        "perplexity": edited.perplexity,
        "perplexity_unedited": base.perplexity,
        "perplexity_ci": [float(np.exp(x)) for x in bootstrap_ci(edited.nll)],
    } | answer_figures(base.factual, edited.factual, "factual") | context_figures(base.context, edited.context, base.recall)
