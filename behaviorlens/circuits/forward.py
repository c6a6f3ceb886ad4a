"""The circuit stage's side of the split forward (:mod:`.split`): pairs described as the jobs
need them, the model's module paths, and jobs run on the model's backend.

A job (``split.*_job``) takes the model's root first: here the plain torch model (the local
path, no hooks but one that stops the embedding forward at block 0), on a traced model nnsight's
envoy inside a session (:func:`behaviorlens.remote.run_session`), the jobs of one stage packed
into as few sessions as :attr:`~behaviorlens.model.Model.session_limits` allow. Only the
figures a job returns travel back.

Columns before ``start`` (the first column where the two sides of a pair differ) hold the same
tokens on both sides: the two sides share one :class:`~.split.Prefix`, whose keys and values
the first split forward of either side records.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..batching import Batch
from ..errors import BehaviorLensError
from ..interventions.kinds import answer_metric
from ..prompts.contrast import ContrastSet
from ..remote import run_session, session_groups
from ..scoring import Scoring, needs_whole, plan
from ..sites import SPLIT_BLOCKS, SplitBlock, split_block
from . import split
from .graph import Graph
from .split import Blocks, Paths, Reads, Run, Side, SideSpec


def paths_of(model) -> Paths:
    """Where the split forward finds ``model``'s modules, or a clear error for a model it cannot split."""
    s = model.sites
    scaling = []
    for L in range(s.n_layers):
        parts = split_block(s, model.hf, L)
        if parts["o_proj"].bias is not None:
            raise BehaviorLensError(f"{model.name}: layer {L}'s attention output has a bias, which "
                                    "belongs to no head; circuits need bias-free output projections")
        attention = s.attention_module(model.hf, L)
        for name in ("q_norm", "k_norm"):
            if hasattr(attention, name):
                raise BehaviorLensError(f"{model.name}: attention with {name} is not split yet")
        scaling.append(float(getattr(attention, "scaling", s.head_dim ** -0.5)))
    block: SplitBlock = SPLIT_BLOCKS[s.arch.family]
    return Paths(layers=s.arch.layers, parts={n: getattr(block, n) for n in SplitBlock.__dataclass_fields__},
                 final_norm=s.arch.final_norm, unembed=s.arch.unembed, head_dim=s.head_dim, scaling=tuple(scaling),
                 softcap=getattr(model.hf.config, "final_logit_softcapping", None))


def blocks(model) -> Blocks:
    """The local model's modules as the split forward reads them."""
    return Blocks(model.hf, paths_of(model), Graph.of(model).shape)


def first_columns(model, cset: ContrastSet, pairs: Sequence[int], side: str) -> tuple[Scoring, Batch, torch.Tensor]:
    """The scoring, batch and each row's first differing column of one side of some pairs."""
    scoring = plan([cset[i] for i in pairs], side, needs_whole(cset.pairs))
    batch = model.batch(scoring.sequences)
    first = torch.tensor([cset[pairs[p]].first_difference() for p in scoring.prompt_of]) + batch.offsets
    return scoring, batch, first


def reads_of(scoring: Scoring, cols: torch.Tensor) -> Reads:
    """A scoring's reads at padded columns ``cols``, with its metric's arguments."""
    return Reads(scoring.sequence, cols, (*scoring.tensors(), scoring.n_prompts, scoring.whole),
                 torch.tensor(scoring.prompt_of))


def side_spec(model, cset: ContrastSet, pairs: Sequence[int], side: str, start: int | None = None
              ) -> tuple[SideSpec, Scoring]:
    """``side`` of ``pairs`` described for a job (split forwards start at ``start``, by default
    the first differing column), with its scoring."""
    cset.require_aligned("circuit discovery")
    scoring, batch, first = first_columns(model, cset, pairs, side)
    start = int(first.min()) if start is None else start
    cols = scoring.position + batch.offsets[scoring.sequence]
    if int(cols.min()) < start:
        raise BehaviorLensError(f"family {cset.name!r}: the answer is read before the sides of a pair differ")
    inputs = {k: v.cpu() for k, v in batch.inputs().items()}
    return SideSpec(inputs, start, first, reads_of(scoring, cols)), scoring


def pair_specs(model, cset: ContrastSet, pairs: Sequence[int]) -> tuple[SideSpec, SideSpec, Scoring]:
    """Both sides of some pairs, with one start column (the columns before it hold the same tokens
    on both sides), and the positive side's scoring."""
    pos, scoring = side_spec(model, cset, pairs, "positive")
    start = pos.start
    neg, _ = side_spec(model, cset, pairs, "negative", start)
    for name in ("input_ids", "attention_mask"):
        if not torch.equal(pos.inputs[name][:, :start], neg.inputs[name][:, :start]):
            raise BehaviorLensError(f"family {cset.name!r}: pairs {list(pairs)} differ before column {start}, "
                                    "where both sides should hold the same tokens")
    return pos, neg, scoring


def row_bytes(model, cset: ContrastSet) -> int:
    """Bytes one pair's sequences take in a split forward at most: every node's output and every
    port's input at each column from the first differing one (an estimate for sizing jobs to the
    model's memory budget; a gradient run keeps about three times as much)."""
    g = Graph.of(model)
    width = max(len(p.tokens[side]) - p.first_difference() for p in cset for side in ("positive", "negative"))
    rows = len(plan([cset[0]], "positive", needs_whole(cset.pairs)).sequences)
    return rows * width * (g.n_up + g.n_ports) * model.sites.d_model * (torch.finfo(model.dtype).bits // 8)


def copies_of(spec: SideSpec, scoring: Scoring, prompts: Sequence[int]) -> tuple[torch.Tensor, Reads]:
    """Copies of some prompts of a side (repeats allowed): each copy's row in the side and the
    copies' reads (columns relative to the side's start)."""
    new, seqs = scoring.take(list(prompts))
    old_reads: dict[int, list[int]] = {}
    for r, q in enumerate(spec.reads.row.tolist()):
        old_reads.setdefault(q, []).append(r)
    cols = [int(spec.reads.col[r]) - spec.start for s in seqs for r in old_reads.get(s, [])]
    return torch.tensor(seqs), reads_of(new, torch.tensor(cols))


def on_model(model, job: Callable[..., Any], items: Sequence[tuple], what: str,
             returned: Sequence[int] | None = None, progress: bool = False) -> list:
    """``job(root, *item)`` for every item: here on the torch model, or on a traced model in as few
    sessions as its limits allow (``returned``: bytes each item sends back, where that is more
    than its inputs)."""
    if not model.traced:
        return [job(model.hf, *item) for item in tqdm(items, desc=what, disable=not progress)]
    out: list = []
    groups = session_groups(list(items), model.session_limits, fixed=0, returned=returned)
    for group in tqdm(groups, desc=f"{what} (sessions)", disable=not progress):
        out += run_session(model, split.each, job, group, what=what)
    return out


# -- the local path, for tests and benchmarks ----------------------------------------------------


def prepare(model, cset: ContrastSet, pairs: Sequence[int], side: str, start: int | None = None,
            prefix: split.Prefix | None = None, B: Blocks | None = None) -> Side:
    """``side`` of ``pairs`` embedded here for split forwards (``prefix``: the other side's)."""
    spec, _ = side_spec(model, cset, pairs, side, start)
    out = split.prepare(model.hf, B or blocks(model), spec, prefix)
    out.spec = spec
    return out


def sides(model, cset: ContrastSet, pairs: Sequence[int], B: Blocks | None = None) -> tuple[Side, Side]:
    """Both sides of some pairs, prepared here with one shared prefix."""
    pos, neg, _ = pair_specs(model, cset, pairs)
    B = B or blocks(model)
    p, n = split.prepare_pair(model.hf, B, pos, neg)
    p.spec, n.spec = pos, neg
    return p, n


def run(model, side: Side, B: Blocks | None = None, **kwargs: Any) -> Run:
    """One split forward of a side prepared here (see :func:`.split.run`)."""
    return split.run(B or blocks(model), side, **kwargs)


def model_metric(model, side: Side) -> torch.Tensor:
    """The metric of a side prepared here, from the model's own forward: what a plain split
    forward must equal."""
    spec = side.spec
    with torch.inference_mode():
        inputs = {k: v.to(model.device) for k, v in spec.inputs.items()}
        logits = model.hf(**inputs, use_cache=False).logits[spec.reads.row, spec.reads.col]
    return answer_metric(logits, *spec.reads.metric).cpu()
