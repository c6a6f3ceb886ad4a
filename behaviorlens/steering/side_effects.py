"""What an edit costs elsewhere: the prompts side effects are measured on, and the measurements.

Every set is split three ways by question (:func:`part_indices`): ``fit`` (what detectors,
gates and invariance losses train on), ``select`` (what a chooser may use for its limits) and
``report`` (only for reporting what was chosen). A question never appears in two parts: rows that
ask the same question (:func:`row_keys`) stay together. The sets:

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
import re
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..batching import answer_tail, chunks
from ..chat import chat_ids, has_template, render_chat
from ..errors import BehaviorLensError
from ..interventions.trace import planned
from ..prompts import load_family
from ..scoring import behavior_metric, log_likelihoods
from ..stats import bootstrap_ci
from . import data

PARTS = ("fit", "select", "report")
SPLITS = (*PARTS, "all")
# each set's shares of rows, in PARTS order: the context-use set and the requests feed fit's
# gates and invariance losses; the factual control and the reference text keep more for the
# limits and figures
SHARES = {"requests": (1, 1, 1), "context": (1, 1, 1), "factual": (1, 2, 2), "reference": (1, 2, 2)}
FILL_ORDER = ("select", "report", "fit")  # who gets a remainder first
CLAIM_RECALL = "claim_recall"  # the context-use style scored on its own
REQUEST = "request"  # the kind of an ordinary request (part_prompts)
CHUNK = 256
CONTINUATION = 16

# words a question's identity ignores, and words taken as one (a recall question asked with
# another verb: "Which city did I say?" is "Which city did I just name?")
_FUNCTION_WORDS = frozenset([
    "a", "an", "the", "of", "in", "on", "at", "to", "is", "was", "are", "were", "be", "been", "am", "i", "i'm",
    "we", "my", "our", "me", "us", "you", "your", "what", "which", "who", "whom", "whose", "how", "did", "do",
    "does", "for", "and", "or", "with", "by", "from", "it", "its", "this", "that", "just"])
_SAME_WORD = dict.fromkeys(["say", "said", "name", "named", "mention", "mentioned", "guess", "guessed", "give",
                            "gave", "call", "called", "pick", "picked", "choose", "chose"], "say")


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def question_key(text: str) -> frozenset[str]:
    """What identifies a question across wordings: its words, lower-cased, without function words
    and with recall verbs taken as one ("Which city did I just name?" = "which city did I say")."""
    return frozenset(_SAME_WORD.get(w, w) for w in _words(text)) - _FUNCTION_WORDS


def row_keys(variables: Mapping[str, Any], text: str = "") -> list[tuple[str, Any]]:
    """The identities of one row: its question (:func:`question_key`) and its context (the user's
    passage, story, fact or claim, up to case and punctuation); rows sharing either ask the same
    question. A row with neither (a request, another family's row) is its ``text``."""
    keys: list[tuple[str, Any]] = []
    if variables.get("question") is not None:
        keys.append(("question", question_key(str(variables["question"]))))
    if variables.get("context") is not None:
        keys.append(("context", " ".join(_words(str(variables["context"])))))
    return keys or [("question", question_key(text))]


def _groups(keys: Sequence[Iterable[Hashable]]) -> list[list[int]]:
    """Items linked by a shared key, transitively (in order of their first item)."""
    parent = list(range(len(keys)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[Hashable, int] = {}
    for i, ks in enumerate(keys):
        for k in ks:
            parent[root(i)] = root(first.setdefault(k, i))
    out: dict[int, list[int]] = {}
    for i in range(len(keys)):
        out.setdefault(root(i), []).append(i)
    return list(out.values())


def part_indices(keys: Sequence[Iterable[Hashable]], part: str, shares: Sequence[float] = (1, 1, 1),
                 strata: Sequence[Hashable] | None = None, seed: int = 0) -> list[int]:
    """The indices of the items in ``part`` (one of ``fit``, ``select``, ``report``; ``all`` is
    everything). Items sharing a key are one question and go to one part. Questions are dealt in a
    seeded order, largest first, each to the part furthest below its share (``shares`` in PARTS
    order) within its stratum (a context-use style), so each part has about its share of every
    stratum. Deterministic: the same items give the same parts."""
    if part not in SPLITS:
        raise BehaviorLensError(f"unknown side-effect part {part!r}; use one of {', '.join(SPLITS)}")
    if part == "all":
        return list(range(len(keys)))
    if len(shares) != len(PARTS) or min(shares) <= 0:
        raise BehaviorLensError(f"shares need one positive number per part ({', '.join(PARTS)}), got {shares}")
    share = dict(zip(PARTS, shares))
    groups = _groups(keys)
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    rank = {g: r for r, g in enumerate(order)}
    strata = list(strata) if strata is not None else [None] * len(keys)
    filled: dict[tuple[Hashable, str], int] = {}
    out = []
    for g in sorted(range(len(groups)), key=lambda g: (-len(groups[g]), rank[g])):
        stratum, size = strata[groups[g][0]], len(groups[g])
        to = min(FILL_ORDER, key=lambda p: (filled.get((stratum, p), 0) + size) / share[p])
        filled[(stratum, to)] = filled.get((stratum, to), 0) + size
        if to == part:
            out += groups[g]
    return sorted(out)


def set_part(cset: Any, part: str, shares: Sequence[float], seed: int = 0) -> Any:
    """One part of a rendered side-effect set (by :func:`row_keys`, balanced over ``style``)."""
    keys = [row_keys(p.variables, p.text["positive"]) for p in cset]
    return cset.subset(part_indices(keys, part, shares, [p.variables.get("style") for p in cset], seed))


def request_part(requests: Sequence[str], part: str, seed: int = 0) -> list[str]:
    """One part of the ordinary requests (a request is its :func:`question_key`)."""
    keys = [[("question", question_key(str(t)))] for t in requests]
    return [requests[i] for i in part_indices(keys, part, SHARES["requests"], seed=seed)]




def reference_part(ids: Sequence[int], part: str) -> list[list[int]]:
    """One part of a reference text's chunks of ``CHUNK`` tokens (a chunk is its own item)."""
    pieces = [list(ids[i:i + CHUNK]) for i in range(0, len(ids), CHUNK) if len(ids[i:i + CHUNK]) > 1]
    return [pieces[i] for i in part_indices([[i] for i in range(len(pieces))], part, SHARES["reference"])]


def part_prompts(tokenizer: Any, part: str = "fit", neutral: Sequence[str] | None = None,
                 context: Any = None) -> list[tuple[str, str]]:
    """The prompts of one part as the model meets them, each with its kind: the context-use rows
    (their rendered chat prompt up to the answer; kind = their style: ``passage``, ``fiction``,
    ``personal``, ``claim_recall``) and the ordinary requests (the chat-rendered request; kind
    ``request``). ``neutral`` and ``context`` replace the built-in sets, as in
    :class:`SideEffectData`. For a gate's negatives and an invariance loss: ``fit`` by default."""
    context = context if context is not None else _builtin(tokenizer, data.context_use_family_path())
    out = [(p.text["positive"], str(p.variables.get("style", "context")))
           for p in set_part(context, part, SHARES["context"])]
    for t in request_part(list(neutral) if neutral is not None else data.neutral_prompts(), part):
        out.append((render_chat(tokenizer, [{"role": "user", "content": t}]) if has_template(tokenizer) else t,
                    REQUEST))
    return out


class SideEffectData:
    """The side-effect prompts of one part (``fit``, ``select``, ``report`` or ``all``), tokenized
    once for a model (``requests`` keeps only the first N neutral requests of the part), each
    request followed by the unedited model's continuation (``continuations``: the chat and plain
    requests already continued, as :meth:`parts` does for several parts at once). ``fillers`` are
    the non-claim sentences a knockout's null blocks in a claim's place
    (:func:`.baselines.filler_null`)."""

    def __init__(self, model: Any, part: str = "report", neutral: Sequence[str] | None = None,
                 reference: str | None = None, factual: Any = None, requests: int | None = None,
                 context: Any = None, fillers: Sequence[str] | None = None,
                 continuations: Sequence[list[tuple[list[int], int]]] | None = None) -> None:
        tok = model.tokenizer
        self.part = part
        if continuations is None:
            continuations = continued(model, _request_ids(tok, neutral, part, requests))
        self.neutral, self.neutral_plain = continuations
        ids = list(tok(reference if reference is not None else data.reference_text())["input_ids"])
        if len(ids) < 2:
            raise BehaviorLensError("the reference text needs at least two tokens")
        self.reference = reference_part(ids, part)
        factual = factual if factual is not None else _builtin(tok, data.factual_family_path())
        self.factual = set_part(factual, part, SHARES["factual"])
        context = context if context is not None else _builtin(tok, data.context_use_family_path())
        self.context = set_part(context, part, SHARES["context"])
        self.recall = np.array([p.variables.get("style") == CLAIM_RECALL for p in self.context])
        self.fillers = list(fillers) if fillers is not None else data.null_sentences()

    @classmethod
    def parts(cls, model: Any, requests: Mapping[str, int | None], neutral: Sequence[str] | None = None,
              **sets: Any) -> dict[str, SideEffectData]:
        """One per part (``requests``: part -> how many neutral requests, None for all; ``sets``:
        the other keywords of the constructor), every part's requests continued together (on a
        traced model, one session)."""
        ids = [x for part, n in requests.items() for x in _request_ids(model.tokenizer, neutral, part, n)]
        runs = continued(model, ids)
        return {part: cls(model, part, neutral, requests=n, continuations=runs[2 * k:2 * k + 2], **sets)
                for k, (part, n) in enumerate(requests.items())}


def _request_ids(tokenizer: Any, neutral: Sequence[str] | None, part: str, requests: int | None,
                 ) -> list[list[list[int]]]:
    """The first ``requests`` neutral requests of a part, as chat-rendered and as plain token ids."""
    texts = request_part(list(neutral) if neutral is not None else data.neutral_prompts(), part)[:requests]
    return [[chat_ids(tokenizer, t) for t in texts], [list(tokenizer(t)["input_ids"]) for t in texts]]


def _builtin(tokenizer: Any, path: Any) -> Any:
    """A built-in side-effect family rendered for a tokenizer (plain text for base models)."""
    family = load_family(str(path))
    family.chat = has_template(tokenizer)
    return family.render(tokenizer)


@torch.inference_mode()
def continued(model: Any, prompt_sets: Sequence[list[list[int]]], n: int = CONTINUATION, batch_size: int = 16,
              ) -> list[list[tuple[list[int], int]]]:
    """Per set, each prompt followed by all but the last token of the model's greedy continuation
    (up to ``n`` tokens, through an end-of-sequence token), and how many trailing positions
    predict the continuation. Every batch of every set is generated together (on a traced model,
    as few sessions as its limits allow)."""
    eos = model.tokenizer.eos_token_id
    batches = [(k, idx, model.batch([prompts[i] for i in idx]))
               for k, prompts in enumerate(prompt_sets) for idx in chunks(len(prompts), batch_size)]
    out: list[list[tuple[list[int], int]]] = [[] for _ in prompt_sets]
    for (k, idx, batch), new in zip(batches, model.generate_each([b for _, _, b in batches], n)):
        for j, i in enumerate(idx):
            cont = new[j, batch.input_ids.shape[1]:].tolist()
            if eos in cont:
                cont = cont[: cont.index(eos) + 1]
            out[k].append((prompt_sets[k][i] + cont[:-1], max(len(cont), 1)))
    return out


@dataclass
class SideEffects:
    """One model state's side-effect measurements (the unedited model's, or an edit's)."""

    neutral_kl: float  # mean per-token KL from the unedited model on the chat-rendered requests (0 for it)
    neutral_kl_plain: float  # likewise on the plain-text ones
    nll: np.ndarray  # mean negative log-likelihood per reference chunk
    factual: np.ndarray  # per factual row: log p(answer) - log p(distractor)
    context: np.ndarray  # per context-use row, likewise
    recall: np.ndarray  # per context-use row: whether it is a claim-recall row
    reference: tuple | None = None  # the unedited model's: tail logits (chat, plain) an edit's KL compares with

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


def _tail_reads(seqs: list[tuple[list[int], int]], batch_size: int) -> Iterator[tuple]:
    """Per batch: its indices, sequences, tails, and the (row, position) reads of every tail token."""
    for idx in chunks(len(seqs), batch_size):
        sequences = [seqs[i][0] for i in idx]
        tails = [seqs[i][1] for i in idx]
        rows = torch.tensor([j for j, t in enumerate(tails) for _ in range(t)])
        positions = torch.tensor([len(sequences[j]) - t + k for j, t in enumerate(tails) for k in range(t)])
        yield idx, sequences, tails, rows, positions


def tail_logits(model: Any, seqs: list[tuple[list[int], int]], batch_size: int) -> list[torch.Tensor] | None:
    """Logits at the last ``tail`` positions of each sequence, the edit acting there: unedited,
    what :func:`tail_kl` compares an edit with. None on a traced model, whose server runs the
    unedited forward beside each edited one, so vocabulary-wide logits never travel."""
    if model.traced:
        return None
    out = []
    for _, sequences, tails, rows, positions in _tail_reads(seqs, batch_size):
        with answer_tail(torch.tensor(tails)):
            out += list(torch.split(model.score_logits(sequences, rows, positions).cpu(), tails))
    return out


def tail_kl(model: Any, seqs: list[tuple[list[int], int]], unedited: list[torch.Tensor] | None,
            batch_size: int) -> float:
    """Mean per-token KL(unedited || as the model runs now) over the last ``tail`` positions of
    every sequence, in nats, the edit acting there (``unedited``: :func:`tail_logits`). On a
    traced model every batch goes in one session (or in the planned work it is part of)."""
    def per_token() -> list[torch.Tensor]:
        kls = []
        for idx, sequences, tails, rows, positions in _tail_reads(seqs, batch_size):
            base = torch.cat([unedited[i] for i in idx]) if unedited is not None else None
            with answer_tail(torch.tensor(tails)):
                kls.append(model.kl_from_unedited(sequences, rows, positions, base).cpu())
        return kls

    return float(torch.cat(planned(model, per_token, "the neutral KL")).mean())


@torch.inference_mode()
def _nll(model: Any, chunks_: list[list[int]], batch_size: int) -> np.ndarray:
    """Mean negative log-likelihood per token of each chunk (every token after its first)."""
    lengths = torch.tensor([len(c) - 1 for c in chunks_], dtype=torch.float32)
    return (-log_likelihoods(model, chunks_, batch_size) / lengths).numpy()


def measure_side_effects(model: Any, data: SideEffectData, batch_size: int = 16,
                         apply: Callable[..., Any] = lambda positions=None: nullcontext(),
                         unedited: SideEffects | None = None) -> SideEffects:
    """The neutral KLs (chat and plain) from ``unedited`` (the unedited model's measurement;
    None: this is that measurement), reference NLL per chunk and factual metric per row, each
    inside ``apply(positions)``: a context that applies the edit (at every position for the
    reference text, where every token is a prediction; elsewhere where the edit acts)."""
    with apply("all"):
        nll = _nll(model, data.reference, batch_size)
    with apply():
        sets = (data.neutral, data.neutral_plain)
        if unedited is None:
            reference = tuple(tail_logits(model, s, batch_size) for s in sets)
            kls = (0.0, 0.0)
        else:
            reference = None
            kls = tuple(tail_kl(model, s, r, batch_size) for s, r in zip(sets, unedited.reference or (None, None)))
        return SideEffects(
            neutral_kl=kls[0],
            neutral_kl_plain=kls[1],
            nll=nll,
            factual=behavior_metric(model, data.factual.pairs, "positive", batch_size).numpy(),
            context=behavior_metric(model, data.context.pairs, "positive", batch_size).numpy(),
            recall=data.recall,
            reference=reference,
        )


def compare_side_effects(base: SideEffects, edited: SideEffects) -> dict[str, Any]:
    """The side-effect columns of an evaluation row: KLs, perplexity, factual accuracy, context
    use and claim recall."""
    return {
        "neutral_kl": edited.neutral_kl,
        "neutral_kl_plain": edited.neutral_kl_plain,
        "perplexity": edited.perplexity,
        "perplexity_unedited": base.perplexity,
        "perplexity_ci": [float(np.exp(x)) for x in bootstrap_ci(edited.nll)],
    } | answer_figures(base.factual, edited.factual, "factual") | context_figures(base.context, edited.context, base.recall)
