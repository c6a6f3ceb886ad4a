"""The behavior metric of a prompt, each answer scored whole.

metric = log p(matching | prompt) - log p(not_matching | prompt), where an answer's log
probability is the sum over its tokens, teacher-forced after the prompt: the prompt plus all but
the answer's last token runs once per answer, and the logits at the answer's positions are
read. Rows with several not-matching answers (multiple choice) score them together:
log sum_a p(a). When every answer of a set is one token, the prompt runs once and the metric is
logit(matching) - logit(not_matching) at the answer position: the same number, since the
softmax normalizer cancels.

:class:`Scoring` says what to run and which logits to read for a list of prompts; every stage
that computes the metric (measure, patching, attribution, steering) goes through it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .batching import answer_tail, chunks, map_batches
from .errors import BehaviorLensError
from .interventions.kinds import answer_metric
from .interventions.trace import traced_scores
from .prompts.contrast import needs_whole


@dataclass
class Scoring:
    """Sequences to run and the logits to read from them to score some prompts.

    Read ``r`` takes the logits at token ``position[r]`` of sequence ``sequence[r]`` and scores
    token ``token[r]`` for answer ``answer[r]``; an answer belongs to prompt
    ``answer_prompt[a]`` and is matching or not (``answer_matching[a]``).
    """

    sequences: list[list[int]]
    prompt_of: list[int]  # per sequence: the prompt it scores
    sequence: torch.Tensor  # [reads]
    position: torch.Tensor  # [reads] token index within the (unpadded) sequence
    token: torch.Tensor  # [reads]
    answer: torch.Tensor  # [reads]
    answer_prompt: torch.Tensor  # [answers]
    answer_matching: torch.Tensor  # [answers] bool
    n_prompts: int
    whole: bool  # True: log-softmax of every answer token; False: raw logits of one-token answers

    def metric(self, logits: torch.Tensor) -> torch.Tensor:
        """The metric per prompt from the logits of every read ([reads, vocab]), in float32."""
        return answer_metric(logits, *self.tensors(), self.n_prompts, self.whole)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """What :func:`~behaviorlens.interventions.kinds.answer_metric` needs besides the logits."""
        return self.token, self.answer, self.answer_prompt, self.answer_matching

    def take(self, prompts: Sequence[int]) -> tuple[Scoring, list[int]]:
        """The scoring of the given prompts (repeats allowed) and, per new sequence, the old one."""
        seqs_of: dict[int, list[int]] = {}
        for s, p in enumerate(self.prompt_of):
            seqs_of.setdefault(p, []).append(s)
        answers_of: dict[int, list[int]] = {}
        for a, p in enumerate(self.answer_prompt.tolist()):
            answers_of.setdefault(p, []).append(a)
        reads_of: dict[int, list[int]] = {}
        for r, s in enumerate(self.sequence.tolist()):
            reads_of.setdefault(s, []).append(r)
        old_seq, prompt_of, seq, pos, tok, ans, ans_prompt, ans_matching = [], [], [], [], [], [], [], []
        for new_p, p in enumerate(prompts):
            answer_map = {}
            for a in answers_of[p]:
                answer_map[a] = len(ans_prompt)
                ans_prompt.append(new_p)
                ans_matching.append(bool(self.answer_matching[a]))
            for s in seqs_of[p]:
                new_s = len(old_seq)
                old_seq.append(s)
                prompt_of.append(new_p)
                for r in reads_of.get(s, []):
                    seq.append(new_s)
                    pos.append(int(self.position[r]))
                    tok.append(int(self.token[r]))
                    ans.append(answer_map[int(self.answer[r])])
        taken = Scoring(
            sequences=[self.sequences[s] for s in old_seq], prompt_of=prompt_of,
            sequence=torch.tensor(seq), position=torch.tensor(pos), token=torch.tensor(tok),
            answer=torch.tensor(ans), answer_prompt=torch.tensor(ans_prompt),
            answer_matching=torch.tensor(ans_matching), n_prompts=len(prompts), whole=self.whole,
        )
        return taken, old_seq

    def tails(self) -> torch.Tensor:
        """Per sequence, how many trailing tokens are answer positions (the ones read)."""
        lengths = torch.tensor([len(s) for s in self.sequences])
        first = torch.full((len(self.sequences),), 10**9).scatter_reduce(
            0, self.sequence, self.position, "amin", include_self=True)
        return lengths - first


def plan(pairs: Sequence, side: str, whole: bool | None = None) -> Scoring:
    """What to run to score one side of each pair (``whole``: default :func:`needs_whole`)."""
    whole = needs_whole(pairs) if whole is None else whole
    sequences: list[list[int]] = []
    prompt_of, seq, pos, tok, ans, ans_prompt, ans_matching = [], [], [], [], [], [], []
    for i, p in enumerate(pairs):
        prompt = list(p.tokens[side])
        at = p.position(side, "answer")
        alternatives = [(p.answers["matching"], True), (p.answers["not_matching"], False)]
        alternatives += [(ids, False) for ids in p.other_answers]
        if whole and at != len(prompt) - 1:
            raise BehaviorLensError(
                f"family {p.family!r}, row {p.row}: answers of several tokens are scored after the "
                "prompt, but this family scores its answer before the end of the prompt"
            )
        if not whole:
            sequences.append(prompt)
            prompt_of.append(i)
        for ids, matching in alternatives:
            a = len(ans_prompt)
            ans_prompt.append(i)
            ans_matching.append(matching)
            if whole:
                sequences.append(prompt + list(ids[:-1]))
                prompt_of.append(i)
            for t, token in enumerate(ids if whole else ids[:1]):
                seq.append(len(sequences) - 1)
                pos.append(at + t)
                tok.append(token)
                ans.append(a)
    return Scoring(
        sequences=sequences, prompt_of=prompt_of, sequence=torch.tensor(seq),
        position=torch.tensor(pos), token=torch.tensor(tok), answer=torch.tensor(ans),
        answer_prompt=torch.tensor(ans_prompt), answer_matching=torch.tensor(ans_matching),
        n_prompts=len(pairs), whole=whole,
    )


def own_tokens(sequences: Sequence[Sequence[int]]) -> Scoring:
    """What to run to score each sequence's own tokens after its first, teacher-forced and summed:
    one prompt per sequence whose matching answer is those tokens and whose other answer is empty
    (log p = 0), so its metric is the sequence's log-likelihood. The whole sequence runs (its last
    column too, which a gate reads) and every column but the last is read."""
    sequences = [list(s) for s in sequences]
    if any(len(s) < 2 for s in sequences):
        raise BehaviorLensError("a sequence scored on its own tokens needs at least two of them")
    seq = [i for i, s in enumerate(sequences) for _ in s[1:]]
    pos = [t for s in sequences for t in range(len(s) - 1)]
    tok = [x for s in sequences for x in s[1:]]
    return Scoring(
        sequences=sequences, prompt_of=list(range(len(sequences))), sequence=torch.tensor(seq),
        position=torch.tensor(pos), token=torch.tensor(tok), answer=torch.tensor(seq) * 2,
        answer_prompt=torch.arange(len(sequences)).repeat_interleave(2),
        answer_matching=torch.tensor([True, False]).repeat(len(sequences)), n_prompts=len(sequences), whole=True,
    )


def log_likelihoods(model, sequences: Sequence[Sequence[int]], batch_size: int = 16) -> torch.Tensor:
    """Each sequence's log-likelihood of its tokens after the first (:func:`own_tokens`): [sequences],
    float32, on the CPU. On a traced model it is computed on the server, every batch together
    (inside :func:`~behaviorlens.interventions.trace.planned` work, with its other forwards)."""
    scorings = [own_tokens([sequences[i] for i in idx]) for idx in chunks(len(sequences), batch_size)]
    if not scorings:
        return torch.zeros(0)
    metrics = traced_scores(model, scorings) if model.traced else [score(model, s) for s in scorings]
    return torch.cat([m.float().cpu() for m in metrics])


def score(model, scoring: Scoring) -> torch.Tensor:
    """One batched forward of the scoring's sequences (a shared prefix runs once); the metric per prompt."""
    if model.traced:
        return traced_scores(model, [scoring])[0]
    with answer_tail(scoring.tails()):
        logits = model.score_logits(scoring.sequences, scoring.sequence, scoring.position)
    return scoring.metric(logits)


def behavior_metric(model, pairs: Sequence, side: str, batch_size: int = 16,
                    whole: bool | None = None) -> torch.Tensor:
    """The behavior metric of one side of every pair: [pairs], float32, on the CPU."""
    return behavior_metrics(model, pairs, [side], batch_size, whole)[side]


def behavior_metrics(model, pairs: Sequence, sides: Sequence[str], batch_size: int = 16,
                     whole: bool | None = None, progress: str | None = None) -> dict[str, torch.Tensor]:
    """The behavior metric of each side of every pair ({side: [pairs]}). On a traced model every
    batch of every side goes in as few sessions as the model's limits allow. ``progress``: a bar's
    label (local runs: one step per side)."""
    pairs = list(pairs)
    whole = needs_whole(pairs) if whole is None else whole
    if not pairs:
        return {side: torch.zeros(0) for side in sides}
    batches = list(chunks(len(pairs), batch_size))
    if model.traced:
        plans = [(side, plan([pairs[i] for i in idx], side, whole)) for side in sides for idx in batches]
        metrics = traced_scores(model, [p for _, p in plans])
        return {side: torch.cat([m for (s, _), m in zip(plans, metrics) if s == side]) for side in sides}
    out = {}
    for side in tqdm(sides, desc=progress, disable=progress is None):
        out[side] = torch.cat(map_batches(len(pairs), batch_size,
                                          lambda idx, side=side: score(model, plan([pairs[i] for i in idx], side, whole)).cpu()))
    return out
