"""What runs on the server inside one session: a stage's whole chunk, written with torch,
transformers and the shipped classes only, so that it travels by value (:mod:`behaviorlens.remote`)
and only its figures come back.

Reading sites (:func:`read_chunk`) returns only the columns chosen. Scoring batches
(:func:`score_chunk`) run one trace each and return the metric per prompt, or an edited
forward's KL from the unedited one (run once per session for the same reads), never the
vocabulary-wide logits. A chunk of exact
activation patching (:func:`patch_chunk`) is one session of traces: the source run (the site
read at each layer, kept on the server), the base run (its keys and values kept), then each
batch of patched copies, which starts at its first patched column from the base run's keys and
values and reads only the answer columns. The behavior metric of every run is computed
on the server; the activations never travel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .access import SiteRef
from .kinds import ForwardState, Intervention, ReadSite, SetSite, answer_metric, run


@dataclass
class Forward:
    """One traced forward: its inputs, extra forward keywords (``logits_to_keep``), the logits it
    reads (rows, columns of the kept logits) and the metric's tensors for them."""

    inputs: dict[str, torch.Tensor]
    rows: torch.Tensor
    cols: torch.Tensor
    metric: tuple | None  # answer_metric's arguments after the logits; None: return the logits read
    keep: dict[str, int] = field(default_factory=dict)
    state: ForwardState = field(default_factory=ForwardState)  # what its interventions share
    unedited: str | None = None  # a key: return the KL from the unedited forward's logits at the same reads


@dataclass
class PatchPart:
    """One batch of patched copies of base sequences: the copies' forward (columns ``start:``,
    the earlier ones from the base run's keys and values), the site it writes, where the values
    come from in the source run's read (``source``) and where they go (``target``)."""

    forward: Forward
    site: SiteRef
    read: int  # which of the source run's reads holds the values
    rows: torch.Tensor  # the base sequence of each copy
    start: int
    source: tuple[torch.Tensor, ...]
    target: tuple[torch.Tensor, ...]


@dataclass
class ReadBatch:
    """One forward that reads sites at chosen columns: each of ``refs`` (in execution order) at
    each selection of ``picks`` (a column per row, or weights over the columns where ``means``);
    with no picks, at every column."""

    inputs: dict[str, torch.Tensor]
    refs: list[SiteRef]
    picks: list[torch.Tensor]
    means: list[bool]


def read_values(lm: Any, batch: ReadBatch) -> torch.Tensor:
    """Inside a trace: every (site, selection) value, flattened and side by side: [rows, features]."""
    values = []
    for ref in batch.refs:
        x = ref.read(lm)
        rows = x.shape[0]
        if not batch.picks:
            values.append(x.reshape(rows, -1))
        index = torch.arange(rows, device=x.device)
        for mean, pick in zip(batch.means, batch.picks):
            pick = pick.to(x.device)
            v = torch.einsum("bs,bs...->b...", pick, x.float()) if mean else x[index, pick]
            values.append(v.to(x.dtype).reshape(rows, -1))
    return torch.cat(values, 1)


def read_chunk(lm: Any, batches: list[ReadBatch]) -> list[torch.Tensor]:
    """Inside a session: :func:`read_values` of each batch, one trace each."""
    out = []
    with torch.inference_mode():
        for batch in batches:
            with lm.trace(**batch.inputs):
                out.append(read_values(lm, batch))
    return out


def _metric(lm: Any, f: Forward, unedited: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The forward's behavior metric, its KL(unedited || edited) per read where it names an
    unedited forward, or (a forward with neither) its float32 logits read."""
    logits = lm.output.logits[f.rows, f.cols]
    if f.unedited is not None:
        base = unedited[f.unedited]
        return (base.exp() * (base - torch.log_softmax(logits.float(), -1))).sum(-1)
    return logits.float() if f.metric is None else answer_metric(logits, *f.metric)


def score_chunk(lm: Any, forwards: list[Forward], interventions: list[Intervention],
                unedited: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Inside a session: the behavior metric of each forward (float32 per prompt), its KL from
    the unedited forward (run first, without the interventions, and kept in ``unedited`` by key
    for the session's later forwards at the same reads), or the logits it reads."""
    metrics = []
    unedited = {} if unedited is None else unedited
    with torch.inference_mode():
        for f in forwards:
            if f.unedited is not None and f.unedited not in unedited:
                with lm.trace(**f.inputs, use_cache=False, **f.keep):
                    unedited[f.unedited] = torch.log_softmax(lm.output.logits[f.rows, f.cols].float(), -1)
            with lm.trace(**f.inputs, use_cache=False, **f.keep):
                run(lm, interventions, f.state)
                metrics.append(_metric(lm, f, unedited))
    return metrics


def run_jobs(lm: Any, jobs: list[tuple]) -> list[list[torch.Tensor]]:
    """Inside a session: each job in order, ``("score", forwards, interventions)`` by
    :func:`score_chunk` (the unedited forwards a KL compares with run once per session) or
    ``("generate", prompts, interventions, max_new_tokens, kwargs)`` by :func:`generate_chunk`."""
    unedited: dict[str, torch.Tensor] = {}
    return [score_chunk(lm, *args, unedited) if kind == "score" else generate_chunk(lm, *args) for kind, *args in jobs]


def patch_chunk(lm: Any, source: Forward, base: Forward, reads: list[SiteRef], parts: list[PatchPart],
                interventions: list[Intervention], cache_argument: str | None) -> tuple[torch.Tensor, ...]:
    """Inside a session: the source and base metrics and each part's patched metric per copy
    (all float32, concatenated over parts)."""
    from transformers import DynamicCache

    resume = cache_argument is not None and any(p.start > 0 for p in parts)
    with torch.inference_mode():
        state = source.state
        with lm.trace(**source.inputs, use_cache=False, **source.keep):
            run(lm, [*interventions, *(ReadSite(ref, i) for i, ref in enumerate(reads))], state)
            source_metric = _metric(lm, source)
        acts = [state.reads[i] for i in range(len(reads))]
        with lm.trace(**base.inputs, use_cache=resume, **base.keep):
            run(lm, interventions, base.state)
            base_metric = _metric(lm, base)
            if resume:
                out = lm.output
                past = [(layer.keys, layer.values) for layer in (getattr(out, "cache", None) or out.past_key_values).layers]
        patched = []
        for part in parts:
            f, start = part.forward, part.start
            extra = dict(f.keep)
            if start > 0:
                extra[cache_argument] = DynamicCache(
                    ddp_cache_data=[(k[part.rows, :, :start], v[part.rows, :, :start]) for k, v in past])
            patch = SetSite(part.site, acts[part.read][part.source], part.target)
            with lm.trace(**f.inputs, use_cache=start > 0, **extra):
                run(lm, [*interventions, patch], f.state)
                patched.append(_metric(lm, f))
    return source_metric, base_metric, torch.cat(patched) if patched else torch.zeros(0)


def generate_chunk(lm: Any, jobs: list[tuple[dict[str, torch.Tensor], ForwardState, list[dict[str, torch.Tensor]]]],
                   interventions: list[Intervention], max_new_tokens: int, kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """Inside a session: greedy ``generate`` of each job (its prompt, its forward state, and the
    columns an edit touches in the prompt's forward and in each new token's), the interventions
    acting at every step; the prompt and new token ids of each."""
    out = []
    with torch.inference_mode():
        for prompt, state, steps in jobs:
            with lm.generate(max_new_tokens=max_new_tokens, do_sample=False, **kwargs) as tracer:
                with tracer.invoke(prompt):
                    if interventions:  # (a loop that touches no module would never wait for the model)
                        for _ in tracer.all():
                            state.cols = steps[min(state.step, 1)]
                            run(lm, interventions, state)
                            state.step += 1
                with tracer.invoke():
                    out.append(tracer.result)
    return out
