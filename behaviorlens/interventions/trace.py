"""The trace path: one nnsight forward with the model's active interventions, sent to the
model's backend (local, nnsight's NDIF simulation, or NDIF); only the logits read come back.

Everything a trace body touches is prepared here first (column masks, the conversation's
own tokens for a detector control) so that the body holds only tensors, the model's envoys
and objects of the modules :mod:`behaviorlens.remote` ships.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

import nnsight
import numpy as np
import torch

from ..batching import Batch, answer_tail, current_answer_tail
from ..chat import Scaffold
from ..errors import BehaviorLensError
from ..remote import payload_bytes, run_session, session_groups
from . import kinds
from .access import SiteRef
from .kinds import ForwardState, Intervention, Knockout, ReadDetector, ReadSite
from .server import Forward, generate_chunk, run_jobs, score_chunk

T = TypeVar("T")


def context(model: Any, batch: Batch, interventions: list) -> ForwardState:
    """What the interventions need to know about one padded batch run as a prompt."""
    b, width = batch.input_ids.shape
    every = torch.ones(b, width, dtype=torch.bool)
    tail = torch.as_tensor(current_answer_tail()).expand(b)
    answer = torch.arange(width)[None, :] >= (width - tail)[:, None]
    real = batch.attention_mask.bool().cpu()
    content = None
    if any(isinstance(iv, ReadDetector) and iv.readout.decoy is not None for iv in interventions):
        content = Scaffold(model.tokenizer).content(batch.input_ids.cpu(), real)
    return ForwardState({"all": every, "prompt": every, "generated": answer}, real, content)


def scored_forward(model: Any, batch: Batch, scoring: Any, cols: torch.Tensor, start: int = 0) -> Forward:
    """A session's forward of ``batch``'s columns ``start:`` (the earlier ones come from a cache),
    with the model's active interventions, reading ``scoring``'s logits at padded columns ``cols``."""
    inputs = {k: v if k == "attention_mask" else v[:, start:] for k, v in batch.inputs().items()}
    keep, local = model.unembedded(batch.input_ids.shape[1] - start, cols - start)
    state = context(model, batch, model.interventions) if model.interventions else ForwardState()
    return Forward(inputs, scoring.sequence, local, (*scoring.tensors(), scoring.n_prompts, scoring.whole), keep, state)


def traced_scores(model: Any, scorings: Sequence[Any]) -> list[torch.Tensor]:
    """The behavior metric of each scoring (one batch each), computed on the model's backend:
    as few sessions as :attr:`~behaviorlens.model.Model.session_limits` allow (inside
    :func:`planned`, with every other forward of the planned work)."""
    _no_local_hooks(model.hf)
    forwards = []
    for scoring in scorings:
        batch = model.batch(scoring.sequences)
        with answer_tail(scoring.tails()):
            forwards.append(scored_forward(model, batch, scoring, scoring.position + batch.offsets[scoring.sequence]))
    plan = _PLAN.get()
    if plan is not None:
        return plan.deferred(forwards, list(model.interventions), [torch.zeros(s.n_prompts) for s in scorings])
    metrics: list[torch.Tensor] = []
    for group in session_groups(forwards, model.session_limits, fixed=0):
        metrics += run_session(model, score_chunk, group, list(model.interventions), what="scoring")
    return [m.cpu() for m in metrics]


def traced_logits(model: Any, batch: Batch, rows: torch.Tensor | None = None, columns: torch.Tensor | None = None,
                  grad: bool = False, extra: Sequence[Intervention] = (), reads: Sequence[SiteRef] | None = None,
                  ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Float32 logits at (row, padded column) reads ([reads, vocab]), or at every column, with
    the model's active interventions and ``extra`` ones; with ``reads``, also the activations
    of those sites (read after every intervention at them) as a second value."""
    _no_local_hooks(model.hf)
    lm, interventions = model.lm, [*model.interventions, *extra]
    state = context(model, batch, interventions)
    run = kinds.run
    inputs = batch.inputs()
    read_refs = list(reads or ())
    interventions += [ReadSite(ref, i) for i, ref in enumerate(read_refs)]
    forward = {"use_cache": False}
    if rows is not None:  # only the columns from the first one read go through the unembedding
        keep, columns = model.unembedded(batch.input_ids.shape[1], columns)
        forward |= keep
    plan = _PLAN.get()
    if plan is not None and rows is not None and not grad and not read_refs:
        width = model.hf.get_output_embeddings().weight.shape[0]
        return plan.deferred([Forward(inputs, rows, columns, None, keep, state)], interventions,
                             [torch.zeros(len(rows), width)])[0]
    if plan is not None:  # every column, a gradient, or sites read: run now, kept for the replay
        return now(inputs, interventions, lambda: traced_logits(model, batch, rows, columns, grad, extra, reads))
    with torch.inference_mode(not grad), lm.trace(inputs, **forward, **model.trace_kwargs()):
        run(lm, interventions, state)
        acts = nnsight.save([state.reads[i] for i in range(len(read_refs))])
        logits = lm.output.logits
        if rows is not None:
            logits = logits[rows, columns]
        out = logits.float().save()
    if reads is not None:
        return torch.as_tensor(out), [torch.as_tensor(a) for a in acts]
    return torch.as_tensor(out)


def traced_kl(model: Any, batch: Batch, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """KL(unedited || with the model's active interventions) in nats at (row, padded column)
    reads ([reads], float32): the server runs the unedited forward too (once per session for the
    same reads), so no vocabulary-wide logits come back."""
    _no_local_hooks(model.hf)
    interventions = list(model.interventions)
    keep, columns = model.unembedded(batch.input_ids.shape[1], columns)
    inputs = batch.inputs()
    digest = hashlib.sha1(repr(keep).encode())  # what identifies the unedited forward and its reads
    for t in (inputs["input_ids"], inputs["attention_mask"], rows, columns):
        digest.update(t.cpu().numpy().tobytes())
    f = Forward(inputs, rows, columns, None, keep, context(model, batch, interventions), digest.hexdigest())
    plan = _PLAN.get()
    if plan is not None:
        return plan.deferred([f], interventions, [torch.zeros(len(rows))])[0]
    return run_session(model, score_chunk, [f], interventions, what="the KL from the unedited model")[0].cpu()


class PlanDiverged(RuntimeError):
    """The replay of planned work asked for other forwards than its recording did."""


class Plan:
    """The forwards some work asks for, recorded on a first run (each deferred one answered with
    zeros of its shape), then run in as few sessions as the model's limits allow, and handed back
    in order on a second run (:func:`planned`). A forward that cannot wait (every column's logits,
    gradients, site reads) runs during the recording and is handed back as it was; one the
    replay does not ask for again (it kept the value, as :func:`~behaviorlens.reads.remembered_states`
    does) is passed over."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.replaying = False
        self.cursor = 0

    def _key(self, inputs: dict, interventions: list) -> tuple:
        ids = inputs["input_ids"]
        return (tuple(ids.shape), hashlib.sha1(ids.cpu().numpy().tobytes()).hexdigest(),
                tuple(type(iv).__name__ for iv in interventions))

    def _next(self, key: tuple) -> Any:
        while (self.cursor < len(self.calls) and self.calls[self.cursor]["job"] is None
               and self.calls[self.cursor]["key"] != key):
            self.cursor += 1  # a forward run now whose value the replay already holds (a memo of it)
        if self.cursor >= len(self.calls) or self.calls[self.cursor]["key"] != key:
            raise PlanDiverged(f"planned work asked for forward {self.cursor + 1} differently on its replay: "
                               "it must ask for the same forwards whatever the values it gets back")
        self.cursor += 1
        return self.calls[self.cursor - 1]["result"]

    def deferred(self, forwards: list[Forward], interventions: list, zeros: list[torch.Tensor]) -> list:
        """Record forwards to run later (answered now with ``zeros`` of their shape); on the replay,
        their values."""
        return self._defer(("score", forwards, interventions), forwards[0].inputs, len(forwards), zeros)

    def deferred_generation(self, job: tuple, zeros: list[torch.Tensor]) -> list:
        """Record a generation (:func:`~.server.generate_chunk`'s arguments) to run later, as
        :meth:`deferred` does."""
        return self._defer(("generate", *job), job[0][0][0], len(job[0]), zeros)

    def _defer(self, job: tuple, inputs: dict, traces: int, zeros: list[torch.Tensor]) -> list:
        key = self._key(inputs, job[2]) + (job[0], traces)
        if self.replaying:
            return self._next(key)
        returned = sum(x.numel() * x.element_size() for x in zeros)
        self.calls.append({"key": key, "job": job, "traces": traces, "returned": returned, "result": None})
        return zeros

    def eager(self, inputs: dict, interventions: list, compute: Callable[[], Any]) -> Any:
        """Run a forward now (recording) and hand its value back again on the replay."""
        key = self._key(inputs, interventions) + ("now",)
        if self.replaying:
            return self._next(key)
        token = _PLAN.set(None)
        try:
            result = compute()
        finally:
            _PLAN.reset(token)
        self.calls.append({"key": key, "job": None, "result": result})
        return result

    def run(self, model: Any, what: str) -> None:
        """Every deferred job, packed into sessions within the model's limits."""
        jobs = [c for c in self.calls if c["job"] is not None]
        groups: list[list[dict]] = []
        traces = sent = back = 0.0
        limits = model.session_limits
        for job in jobs:
            n = job["traces"]
            mb, out = payload_bytes(job["job"]) / 2**20, job["returned"] / 2**20
            if (not groups or traces + n > limits.traces or sent + mb > limits.request_mb
                    or back + out > limits.result_mb):
                groups.append([])
                traces = sent = back = 0.0
            groups[-1].append(job)
            traces += n
            sent += mb
            back += out
        for group in groups:
            with _quiet_generation():
                results = run_session(model, run_jobs, [j["job"] for j in group], what=what)
            for job, result in zip(group, results):
                job["result"] = [r.cpu() for r in result]


_PLAN: ContextVar[Plan | None] = ContextVar("planned_forwards", default=None)


def planned(model: Any, work: Callable[[], T], what: str = "planned work") -> T:
    """``work()`` with its forwards sent together: on a traced model it runs twice, first
    recording the scoring and logits forwards it asks for (answered with zeros), then, once they
    have run in as few sessions as the limits allow, again with their values. ``work`` must ask
    for the same forwards whatever values it gets (a replay that differs raises); values derived
    from zeros must not raise. On a local model it runs once, as it is."""
    if not model.traced or _PLAN.get() is not None:
        return work()
    plan = Plan()
    token = _PLAN.set(plan)
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            work()
    finally:
        _PLAN.reset(token)
    plan.run(model, what)
    plan.replaying = True
    token = _PLAN.set(plan)
    try:
        out = work()
    finally:
        _PLAN.reset(token)
    left = [c for c in plan.calls[plan.cursor:] if c["job"] is not None]
    if left:
        raise PlanDiverged(f"{what}: its replay left {len(left)} of the recorded forwards unasked")
    return out


def now(inputs: dict, interventions: list, compute: Callable[[], T]) -> T:
    """``compute()`` (forwards of ``inputs``) run now even inside :func:`planned` work: during its
    recording, and handed back on its replay."""
    plan = _PLAN.get()
    return compute() if plan is None else plan.eager(inputs, interventions, compute)


def recording() -> bool:
    """True during the first (recording) run of :func:`planned` work: the values it gets are zeros."""
    plan = _PLAN.get()
    return plan is not None and not plan.replaying


def _no_local_hooks(hf: torch.nn.Module) -> None:
    """A hook of this process would act in nnsight's local simulation but not on NDIF: refuse it."""
    for name, module in hf.named_modules():
        if module._forward_hooks or module._forward_pre_hooks:
            raise RuntimeError(f"a local torch hook is registered on {name or 'the model'}; it would not run "
                               "remotely, so a traced forward refuses it")


def traced_gradients(model: Any, batch: Batch, rows: torch.Tensor, columns: torch.Tensor, scoring: Any,
                     sites: Sequence[SiteRef], start: torch.Tensor | None = None) -> list[torch.Tensor]:
    """d sum(metric) / d each site's activation (heads unsplit), in one trace with a backward
    pass; ``start`` replaces the residual entering layer 0 (an interpolation's input)."""
    _no_local_hooks(model.hf)
    lm, metric = model.lm, kinds.answer_metric
    refs = [SiteRef(r.path, r.part, 0, r.order) for r in sites]
    first = model.sites.ref("resid_pre", 0)
    tensors, n_prompts, whole = scoring.tensors(), scoring.n_prompts, scoring.whole
    inputs = batch.inputs()
    keep, columns = model.unembedded(batch.input_ids.shape[1], columns)  # only the columns read are unembedded
    forward = {"use_cache": False, **keep}
    with torch.inference_mode(False), torch.enable_grad(), lm.trace(inputs, **forward, **model.trace_kwargs()):
        if start is not None:
            first.module(lm).input = start.clone().requires_grad_(True)
        live = [ref.read(lm) for ref in refs]
        total = metric(lm.output.logits[rows, columns], *tensors, n_prompts, whole).sum()
        with total.backward():
            grads = [h.grad for h in reversed(live)]
            grads = nnsight.save(grads[::-1])
    return [torch.as_tensor(g).detach() for g in grads]


def traced_generate(model: Any, batches: Sequence[Batch], max_new_tokens: int, **kwargs: Any) -> list[torch.Tensor]:
    """Greedy ``generate`` of each batch (prompt and new token ids), the active interventions
    acting at every step (the prompt's forward, then each new token's): one trace per batch, as
    few sessions as :attr:`~behaviorlens.model.Model.session_limits` allow."""
    _no_local_hooks(model.hf)
    interventions = list(model.interventions)
    if any(isinstance(iv, ReadDetector) and iv.readout.decoy is not None for iv in interventions) or \
            any(isinstance(iv, Knockout) and iv.blocked is not None for iv in interventions):
        raise BehaviorLensError("a knockout control (random tokens, or tokens given for the prompt only) has no "
                                "traced generation: its tokens would have to be drawn anew at every step; "
                                "score it (steer eval) or generate locally")
    jobs = []
    for batch in batches:
        state = context(model, batch, interventions)
        ones = torch.ones(batch.input_ids.shape[0], 1, dtype=torch.bool)
        steps = [state.cols, {"all": ones, "prompt": ~ones, "generated": ones}]  # the prompt's columns, then a new token's
        jobs.append(({"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}, state, steps))
    plan = _PLAN.get()
    if plan is not None:
        zeros = [torch.zeros(b.input_ids.shape[0], b.input_ids.shape[1] + max_new_tokens, dtype=torch.long)
                 for b in batches]
        return plan.deferred_generation((jobs, interventions, max_new_tokens, kwargs), zeros)
    out: list[torch.Tensor] = []
    with _quiet_generation():
        for group in session_groups(jobs, model.session_limits, fixed=0):
            out += run_session(model, generate_chunk, group, interventions, max_new_tokens, kwargs, what="generation")
    return [torch.as_tensor(x) for x in out]


@contextmanager
def _quiet_generation() -> Iterator[None]:
    """Warnings off for what generation is expected to say: the loop over its steps ends when
    generation does, and what follows it runs in its own invoke."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*was never reached: the loop asked for a step")
        yield
