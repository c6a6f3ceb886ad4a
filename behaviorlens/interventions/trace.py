"""The trace path: one nnsight forward with the model's active interventions, sent to the
model's backend (local, nnsight's NDIF simulation, or NDIF); only the logits read come back.

Everything a trace body touches is prepared here first (column masks, the conversation's
own tokens for a detector control) so that the body holds only tensors, the model's envoys
and objects of the modules :mod:`behaviorlens.remote` ships.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import nnsight
import torch

from ..batching import Batch, answer_tail, current_answer_tail
from ..errors import BehaviorLensError
from ..remote import run_session, session_groups
from . import kinds
from .access import SiteRef
from .kinds import ForwardState, Intervention, Knockout, ReadDetector, ReadSite
from .server import Forward, score_chunk


def context(model: Any, batch: Batch, interventions: list) -> ForwardState:
    """What the interventions need to know about one padded batch run as a prompt."""
    b, width = batch.input_ids.shape
    every = torch.ones(b, width, dtype=torch.bool)
    tail = torch.as_tensor(current_answer_tail()).expand(b)
    answer = torch.arange(width)[None, :] >= (width - tail)[:, None]
    real = batch.attention_mask.bool().cpu()
    content = None
    if any(isinstance(iv, ReadDetector) and iv.readout.decoy is not None for iv in interventions):
        from ..chat import Scaffold

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
    as few sessions as :attr:`~behaviorlens.model.Model.session_limits` allow."""
    _no_local_hooks(model.hf)
    forwards = []
    for scoring in scorings:
        batch = model.batch(scoring.sequences)
        with answer_tail(scoring.tails()):
            forwards.append(scored_forward(model, batch, scoring, scoring.position + batch.offsets[scoring.sequence]))
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


def traced_generate(model: Any, batch: Batch, max_new_tokens: int, **kwargs: Any) -> torch.Tensor:
    """Greedy ``generate`` as one trace, the active interventions acting at every step (the
    prompt's forward, then each new token's); returns the prompt and new token ids."""
    _no_local_hooks(model.hf)
    lm, interventions = model.lm, list(model.interventions)
    if any(isinstance(iv, ReadDetector) and iv.readout.decoy is not None for iv in interventions) or \
            any(isinstance(iv, Knockout) and iv.blocked is not None for iv in interventions):
        raise BehaviorLensError("a knockout control (random tokens, or tokens given for the prompt only) has no "
                                "traced generation: its tokens would have to be drawn anew at every step; "
                                "score it (steer eval) or generate locally")
    state = context(model, batch, interventions)
    b = batch.input_ids.shape[0]
    ones = torch.ones(b, 1, dtype=torch.bool)
    steps = [state.cols, {"all": ones, "prompt": ~ones, "generated": ones}]  # the prompt's columns, then one new token's
    run = kinds.run
    prompt = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    with warnings.catch_warnings():
        # the loop over steps ends when generation does; what follows it runs in its own invoke
        warnings.filterwarnings("ignore", message=".*was never reached: the loop asked for a step")
        with torch.inference_mode(), lm.generate(max_new_tokens=max_new_tokens, do_sample=False, **kwargs,
                                                 **model.trace_kwargs()) as tracer:
            with tracer.invoke(prompt):
                if interventions:  # (a loop that touches no module would never wait for the model)
                    for _ in tracer.all():
                        state.cols = steps[min(state.step, 1)]
                        run(lm, interventions, state)
                        state.step += 1
            with tracer.invoke():
                ids = tracer.result.save()
    return torch.as_tensor(ids)


def site_values(model: Any, batch: Batch, site: str, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """The site's activation at each layer over one batch (a trace on a traced model, else hooks)."""
    if model.traced:
        _, reads = traced_logits(model, batch, reads=[model.sites.ref(site, layer) for layer in layers])
        return dict(zip(layers, reads))
    from ..patching.hooks import reading

    with torch.inference_mode(), reading(model, site, layers) as acts:
        model.hf(**batch.inputs(), use_cache=False)
    return acts
