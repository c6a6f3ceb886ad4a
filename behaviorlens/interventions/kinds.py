"""The interventions: what each edit kind, readout and patch does to a site's tensor.

Each class holds its tensors and acts in one of two ways that share its tensor math:

- inside an nnsight trace, on the envoys of its sites (:meth:`Intervention.act`, run by
  :func:`run` in execution order): the path every backend takes, local, nnsight's simulation
  of NDIF and NDIF itself;
- in the local fast path, as plain torch hooks (:meth:`Intervention.hooks`, installed by
  :func:`behaviorlens.interventions.hooks.applied`, which also handles generation with a
  key-value cache), calling the same ``change``/``mask`` functions.

This module needs nothing but torch: a remote request ships it by value.

A :class:`ForwardState`, prepared before a trace (:func:`behaviorlens.interventions.trace.context`),
is what the interventions of one forward share.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from .access import SiteRef, module_output


@dataclass
class Readout:
    """A linear read of the residual stream leaving ``layer``: it fires where
    ``hidden @ direction + bias > 0`` (a probe turned into a detector or a gate). A detector
    also flags the tokens between two flagged tokens at most ``gap`` tokens apart: a claim is
    one span, and its middle (the claimed answer itself) is the part least like the training
    family's claims."""

    layer: int
    direction: torch.Tensor  # [d_model]
    bias: float = 0.0
    gap: int = 0
    decoy: int | None = None  # a control: see :meth:`decoys`

    def __post_init__(self) -> None:
        self.layer = int(self.layer)
        self.direction = torch.as_tensor(self.direction).detach().float().cpu().flatten()
        self.bias = float(self.bias)
        self.gap = int(self.gap)
        self.decoy = None if self.decoy is None else int(self.decoy)

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.float() @ self.direction.to(hidden.device) + self.bias

    def close(self, flags: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
        """``flags`` [batch, tokens] with every run of at most ``gap`` unflagged tokens between
        two flagged ones flagged too. ``real`` [batch, tokens] marks the columns holding tokens
        (not padding): padding is never flagged and does not count in a gap."""
        if real is not None:
            flags = flags & real
        if self.gap <= 0 or flags.shape[1] < 3:
            return flags
        if real is None:
            idx = torch.arange(flags.shape[1], device=flags.device).expand_as(flags)
        else:
            idx = torch.cumsum(real.long(), 1)  # a token's index among the row's tokens
        big = flags.shape[1] + self.gap + 2
        before = torch.cummax(torch.where(flags, idx, -big), 1).values
        after = torch.flip(torch.cummin(torch.flip(torch.where(flags, idx, 2 * big), [1]), 1).values, [1])
        closed = flags | (after - before <= self.gap + 1)
        return closed if real is None else closed & real

    def decoys(self, flags: torch.Tensor, eligible: torch.Tensor | None = None) -> torch.Tensor:
        """The control of a detector with ``decoy`` set: per row, as many tokens as ``flags``
        holds (at most as many as there are), drawn at random (seeded by ``decoy``) among the
        ``eligible`` tokens (the conversation's own words: no padding, first token or template
        token) it does not flag."""
        free = ~flags if eligible is None else eligible & ~flags
        g = torch.Generator().manual_seed(int(self.decoy))
        draw = torch.rand(flags.shape, generator=g).to(flags.device).masked_fill(~free, -1.0)
        rank = torch.empty_like(flags, dtype=torch.long)
        order = draw.argsort(1, descending=True)
        rank.scatter_(1, order, torch.arange(flags.shape[1], device=flags.device).expand_as(order).contiguous())
        return free & (rank < flags.sum(1, keepdim=True))

    def flags(self, hidden: torch.Tensor, real: torch.Tensor | None, content: torch.Tensor | None) -> torch.Tensor:
        """The tokens a detector blocks: its closed flags, or for a control its decoys."""
        detected = self.close(self.scores(hidden) > 0, real)
        return detected if self.decoy is None else self.decoys(detected, content if content is not None else real)


def _replaced(output: Any, new: torch.Tensor) -> Any:
    """``output`` with its tensor replaced by ``new``."""
    return (new, *output[1:]) if isinstance(output, tuple) else new


@dataclass
class ForwardState:
    """What the interventions of one traced forward share: per positions name the columns an
    edit touches (``cols``, [batch, seq] bool), the columns holding tokens (``real``), the
    conversation's own tokens (``content``: a detector control draws among them); what readouts
    find (``gate`` [batch], ``flags`` [batch, seq] and ``seen``, the columns the flags cover);
    the sites read (``reads``); and in generation the step (0: the prompt's forward)."""

    cols: dict[str, torch.Tensor] = field(default_factory=dict)
    real: torch.Tensor | None = None
    content: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    flags: torch.Tensor | None = None
    seen: torch.Tensor | None = None
    reads: dict[Any, torch.Tensor] = field(default_factory=dict)
    step: int = 0


def _select(state: ForwardState, positions: str, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``new`` at the columns ``positions`` names (and rows whose gate fired), else ``old``."""
    cols = state.cols[positions].to(old.device)
    new = torch.where(cols.view(*cols.shape, *([1] * (old.dim() - 2))), new, old)
    gate = state.gate
    if gate is None:
        return new
    return torch.where(gate.to(old.device).view(-1, *([1] * (old.dim() - 1))), new, old)


class Intervention(ABC):
    """Base class: the sites an intervention visits (:meth:`refs`) and what it does there."""

    @abstractmethod
    def refs(self) -> list[SiteRef]:
        """The sites it visits."""

    @abstractmethod
    def act(self, root: Any, ref: SiteRef, state: ForwardState) -> None:
        """What it does at ``ref`` inside a trace."""

    @abstractmethod
    def hooks(self, hf: torch.nn.Module, phase: Any) -> list[Any]:
        """The local fast path: torch hooks on ``hf`` doing what :meth:`act` does in a trace, with
        ``phase`` (:class:`~behaviorlens.interventions.hooks.HookState`) for the columns, the
        gate, the flags and the reads; returns their handles."""

    def parameter_changes(self) -> dict[str, torch.Tensor]:
        """Differences the local fast path adds to the model's parameters while it is in force."""
        return {}

    def first_change(self, width: int, tail: int, flags: Any) -> int:
        """The first column of a local forward (``width`` columns, the last ``tail`` of them
        answer positions) it may change, so that the columns before come from the unedited
        model's cache (:mod:`behaviorlens.kv_cache`). ``flags(readout)`` gives a detector's kept
        flags, ``flags(None)`` those of the forward's one detector (None when not kept)."""
        return 0

    def detector(self) -> Readout | None:
        """The readout whose flags it sets, if it is a detector."""
        return None


def _first_of(positions: str, width: int, tail: int) -> int:
    return width - tail if positions == "generated" else 0


@dataclass
class ReadGate(Intervention):
    """Reads a gate at the last token of the residual stream leaving its layer."""

    readout: Readout
    ref: SiteRef

    def refs(self) -> list[SiteRef]:
        return [self.ref]

    def act(self, root: Any, ref: SiteRef, state: ForwardState) -> None:
        if state.step == 0:  # read in the prompt's forward; holds for the generated tokens
            state.gate = self.readout.scores(ref.read(root)[:, -1]) > 0

    def hooks(self, hf: torch.nn.Module, phase: Any) -> list[Any]:
        return [self.ref.module(hf).register_forward_hook(phase.read_gate(self.readout))]

    def first_change(self, width: int, tail: int, flags: Any) -> int:
        return width  # it reads the last column, which every forward recomputes


@dataclass
class ReadDetector(Intervention):
    """Flags the tokens a detector finds (or its control's decoys) for a knockout."""

    readout: Readout
    ref: SiteRef

    def refs(self) -> list[SiteRef]:
        return [self.ref]

    def act(self, root: Any, ref: SiteRef, state: ForwardState) -> None:
        h = ref.read(root)
        if state.step == 0:
            real = state.real.to(h.device)
            content = state.content
            state.flags = self.readout.flags(h, real, None if content is None else content.to(h.device))
            state.seen = real
            return
        # a generation step: the new tokens' flags join the prompt's, and the span closing runs again
        real = torch.cat([state.seen, torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)], 1)
        found = torch.cat([state.flags, self.readout.scores(h) > 0], 1)
        state.flags, state.seen = self.readout.close(found, real), real

    def hooks(self, hf: torch.nn.Module, phase: Any) -> list[Any]:
        return [self.ref.module(hf).register_forward_hook(phase.read_detector(self.readout))]

    def first_change(self, width: int, tail: int, flags: Any) -> int:
        return width if flags(self.readout) is not None else 0

    def detector(self) -> Readout | None:
        return self.readout


@dataclass
class Residual(Intervention):
    """A change of the residual stream at some sites, at ``positions``: the base of the
    vector, subspace and direction-ablation kinds."""

    sites: list[SiteRef]
    positions: str = "all"

    def refs(self) -> list[SiteRef]:
        return list(self.sites)

    @abstractmethod
    def change(self, h: torch.Tensor) -> torch.Tensor:
        """The new residual from the old one."""

    def act(self, root: Any, ref: SiteRef, state: ForwardState) -> None:
        h = ref.read(root)
        h[...] = _select(state, self.positions, h, self.change(h))

    def hooks(self, hf: torch.nn.Module, phase: Any) -> list[Any]:
        def hook(module: Any, args: Any, output: Any) -> Any:
            h = module_output(output)
            cols = phase.columns(self.positions, h.shape[0], h.shape[1], h.device)
            if cols is None:
                return None
            return _replaced(output, phase.gated(h, torch.where(cols[..., None], self.change(h), h)))

        return [ref.module(hf).register_forward_hook(hook) for ref in self.sites]

    def first_change(self, width: int, tail: int, flags: Any) -> int:
        return _first_of(self.positions, width, tail)


@dataclass
class AddVector(Residual):
    """``strength * vector`` added to the residual stream."""

    vector: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    strength: float = 1.0

    def change(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.strength * self.vector.to(h.device, h.dtype)


@dataclass
class AblateDirection(Residual):
    """``strength`` times the component along a unit direction removed (1 ablates, 2 reflects)."""

    direction: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    strength: float = 1.0

    def change(self, h: torch.Tensor) -> torch.Tensor:
        d = self.direction.to(h.device, h.dtype)
        return h - self.strength * (h @ d).unsqueeze(-1) * d


@dataclass
class ClampSubspace(Residual):
    """The coordinates in an orthonormal ``basis`` [d_model, rank] moved ``strength`` of the way
    to those of ``point``."""

    basis: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    point: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    strength: float = 1.0

    def change(self, h: torch.Tensor) -> torch.Tensor:
        b, point = self.basis.to(h.device, h.dtype), self.point.to(h.device, h.dtype)
        return h + self.strength * ((point - h) @ b) @ b.T


@dataclass
class LowRank(Residual):
    """A learned low-rank edit: the coordinates ``h @ basis`` (orthonormal ``basis`` [d_model,
    rank]) replaced by ``h @ weight.T + bias`` (``weight`` [rank, d_model], ``bias`` [rank]),
    ``strength`` of the way (LoReFT's form, Wu et al. 2024)."""

    basis: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    weight: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    bias: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    strength: float = 1.0

    def change(self, h: torch.Tensor) -> torch.Tensor:
        b, w = self.basis.to(h.device, h.dtype), self.weight.to(h.device, h.dtype)
        return h + self.strength * (h @ w.T + self.bias.to(h.device, h.dtype) - h @ b) @ b.T


@dataclass
class EditHeads(Intervention):
    """Heads of one layer (the attention output projection's input, split into heads) moved
    ``strength`` of the way to stored values (zero/mean), scaled, or given a vector (``add``)."""

    site: SiteRef
    heads: list[int]
    mode: str  # "zero", "mean", "scale" or "add"
    values: torch.Tensor | None = None  # [n_heads, head_dim]
    scale: float = 0.0
    strength: float = 1.0
    positions: str = "all"

    def refs(self) -> list[SiteRef]:
        return [self.site]

    def change(self, cur: torch.Tensor) -> torch.Tensor:
        """The new value of the selected heads ``cur`` [..., len(heads), head_dim]."""
        idx = torch.tensor(self.heads, dtype=torch.long)
        if self.mode == "scale":
            return cur * (1 + self.strength * (self.scale - 1))
        if self.mode == "add":
            return cur + self.strength * self.values[idx].to(cur.device, cur.dtype)
        v = torch.zeros(len(self.heads), cur.shape[-1]) if self.values is None else self.values[idx]
        return cur + self.strength * (v.to(cur.device, cur.dtype) - cur)

    def act(self, root: Any, ref: SiteRef, state: ForwardState) -> None:
        x = ref.read(root)  # [b, s, heads, head_dim]
        idx = torch.tensor(self.heads, dtype=torch.long, device=x.device)
        cur = x[:, :, idx]
        x[:, :, idx] = _select(state, self.positions, cur, self.change(cur))

    def hooks(self, hf: torch.nn.Module, phase: Any) -> list[Any]:
        heads = torch.tensor(self.heads, dtype=torch.long)

        def hook(module: Any, args: Any) -> Any:  # on the output projection's input
            x = args[0]
            cols = phase.columns(self.positions, x.shape[0], x.shape[1], x.device)
            if cols is None:
                return None
            new = x.clone().view(*x.shape[:-1], self.site.n_heads, x.shape[-1] // self.site.n_heads)
            idx = heads.to(x.device)
            cur = new[:, :, idx]
            new[:, :, idx] = torch.where(cols[..., None, None], self.change(cur), cur)
            return (phase.gated(x, new.view(x.shape)), *args[1:])

        return [self.site.module(hf).register_forward_pre_hook(hook)]

    def first_change(self, width: int, tail: int, flags: Any) -> int:
        return _first_of(self.positions, width, tail)


def knockout_mask(mask: torch.Tensor | None, keys: torch.Tensor, cols: torch.Tensor, gate: torch.Tensor | None,
                  heads: list[int], n_heads: int, q: int, past: int, device: Any) -> torch.Tensor:
    """An attention mask [b, n_heads, q, past + q] where ``heads`` may not attend from the
    ``cols`` query columns ([b, q] bool) to the ``keys`` columns ([b, >= past + q] bool), a
    token always seeing itself; rows whose ``gate`` did not fire keep the given mask."""
    b = cols.shape[0]
    k = past + q
    if mask is None:
        allowed = torch.ones(q, k, dtype=torch.bool, device=device).tril(past)[None, None]
    elif mask.dtype == torch.bool:
        allowed = mask[..., :k]
    else:
        allowed = mask[..., :k] == 0
    allowed = allowed.expand(b, n_heads, q, k).clone()
    block = keys[:, :k].to(device)[:, None, None, :] & cols.to(device)[:, None, :, None]
    diagonal = torch.arange(k, device=device)[None, :] == (past + torch.arange(q, device=device))[:, None]
    block = block & ~diagonal
    if gate is not None:
        block = block & gate.to(device)[:, None, None, None]
    h = torch.tensor(heads, dtype=torch.long, device=device)
    allowed[:, h] &= ~block.expand(b, len(heads), q, k)
    if mask is None or mask.dtype == torch.bool:
        return allowed
    return torch.zeros_like(allowed, dtype=mask.dtype).masked_fill(~allowed, torch.finfo(mask.dtype).min)


@dataclass
class Knockout(Intervention):
    """Heads of one layer may not attend from ``positions`` to the flagged tokens: those a
    detector flags in the same forward, or the given ``blocked`` [batch, columns] ones."""

    call: SiteRef  # the attention module's call (its keyword arguments)
    heads: list[int]
    n_heads: int
    positions: str = "all"
    blocked: torch.Tensor | None = None

    def refs(self) -> list[SiteRef]:
        return [self.call]

    def act(self, root: Any, ref: SiteRef, state: ForwardState) -> None:
        node = ref.module(root)
        args, kwargs = node.inputs
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        keys = self.blocked if self.blocked is not None else state.flags
        if keys is None:
            return
        cols = state.cols[self.positions]
        q = hidden.shape[1]
        mask = knockout_mask(kwargs["attention_mask"], keys, cols, state.gate, self.heads, self.n_heads,
                             q, keys.shape[1] - q, hidden.device)
        node.inputs = (args, {**kwargs, "attention_mask": mask})

    def hooks(self, hf: torch.nn.Module, phase: Any) -> list[Any]:
        def hook(module: Any, args: Any, kwargs: dict) -> Any:  # the attention module's call
            if "attention_mask" not in kwargs:
                phase.fail(f"{type(module).__name__} takes no attention_mask keyword; a knockout cannot reach "
                           "its attention")
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            cols = phase.columns(self.positions, hidden.shape[0], hidden.shape[1], hidden.device)
            keys = self.blocked if self.blocked is not None else phase.flags
            if cols is None or keys is None:
                return None
            mask = knockout_mask(kwargs["attention_mask"], keys, cols, phase.gate, self.heads, self.n_heads,
                                 hidden.shape[1], phase.past, hidden.device)
            return args, kwargs | {"attention_mask": mask}

        return [self.call.module(hf).register_forward_pre_hook(hook, with_kwargs=True)]

    def first_change(self, width: int, tail: int, flags: Any) -> int:
        if self.positions != "all":
            return _first_of(self.positions, width, tail)
        keys = self.blocked if self.blocked is not None else flags(None)
        if keys is None:
            return 0
        keys = keys[:, :width].bool()  # a token after the first blocked one is the first to change
        first = torch.where(keys.any(1), keys.float().argmax(1) + 1, torch.full_like(keys[:, 0], width, dtype=torch.long))
        return int(first.min())


@dataclass
class AddWeights(Intervention):
    """``strength`` times a weight (and bias) difference added to a linear module, as the
    change of its output: ``input @ delta.T`` (a request may not change parameters, and an
    offloaded one is not here to change). Differences of other parameters (``params`` only)
    are added to the parameters themselves, locally."""

    module: SiteRef
    weight: torch.Tensor | None = None  # [out, in]
    bias: torch.Tensor | None = None  # [out]
    strength: float = 1.0
    params: dict[str, torch.Tensor] = field(default_factory=dict)  # parameter name -> difference (hooks)

    def refs(self) -> list[SiteRef]:
        return [self.module]

    @property
    def linear(self) -> bool:
        """Whether it acts as a change of the module's output (else: on its parameters, locally)."""
        return self.weight is not None or self.bias is not None

    def change(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The module's new output, from its input ``x`` and output ``out``."""
        delta = torch.zeros_like(out)
        if self.weight is not None:
            delta = delta + x @ self.weight.to(x.device, x.dtype).T
        if self.bias is not None:
            delta = delta + self.bias.to(out.device, out.dtype)
        return out + self.strength * delta

    def act(self, root: Any, ref: SiteRef, state: ForwardState) -> None:
        node = ref.module(root)
        x = node.input
        out = node.output
        out[...] = self.change(x, out)

    def parameter_changes(self) -> dict[str, torch.Tensor]:
        return {} if self.linear else {name: self.strength * d for name, d in self.params.items()}

    def hooks(self, hf: torch.nn.Module, phase: Any) -> list[Any]:
        if not self.linear:  # its parameters change in place instead (parameter_changes)
            return []
        return [self.module.module(hf).register_forward_hook(lambda mod, args, out: self.change(args[0], out))]


@dataclass
class SetSite(Intervention):
    """``site[index] = value``: an activation patch."""

    site: SiteRef
    value: torch.Tensor
    index: Any = ...

    def refs(self) -> list[SiteRef]:
        return [self.site]

    def act(self, root: Any, ref: SiteRef, state: ForwardState) -> None:
        x = ref.read(root)
        x[self.index] = self.value.to(x.device, x.dtype)

    def hooks(self, hf: torch.nn.Module, phase: Any) -> list[Any]:
        module, ref = self.site.module(hf), self.site

        def place(x: torch.Tensor) -> torch.Tensor:  # on a copy of the module's input or output
            x = x.clone()
            view = x.view(*x.shape[:-1], ref.n_heads, x.shape[-1] // ref.n_heads) if ref.n_heads else x
            view[self.index] = self.value.to(x.device, x.dtype)
            return x

        if ref.part == "input":
            return [module.register_forward_pre_hook(lambda mod, args: (place(args[0]), *args[1:]))]
        return [module.register_forward_hook(lambda mod, args, out: _replaced(out, place(module_output(out))))]


@dataclass
class ReadSite(Intervention):
    """Keeps a copy of a site's value (after the edits at it) as ``state.reads[key]``."""

    site: SiteRef
    key: Any

    def refs(self) -> list[SiteRef]:
        return [self.site]

    def act(self, root: Any, ref: SiteRef, state: ForwardState) -> None:
        state.reads[self.key] = ref.read(root).detach().clone()

    def hooks(self, hf: torch.nn.Module, phase: Any) -> list[Any]:
        module, ref = self.site.module(hf), self.site

        def keep(x: torch.Tensor) -> None:
            x = x.detach().clone()
            phase.reads[self.key] = x.view(*x.shape[:-1], ref.n_heads, x.shape[-1] // ref.n_heads) if ref.n_heads else x

        if ref.part == "input":
            return [module.register_forward_pre_hook(lambda mod, args: keep(args[0]))]
        return [module.register_forward_hook(lambda mod, args, out: keep(module_output(out)))]


def answer_metric(logits: torch.Tensor, token: torch.Tensor, answer: torch.Tensor, answer_prompt: torch.Tensor,
                  matching: torch.Tensor, n_prompts: int, whole: bool) -> torch.Tensor:
    """The behavior metric per prompt from the logits of every read ([reads, vocab]), in float32:
    log p(matching answers) - log p(other answers) (see :class:`behaviorlens.scoring.Scoring`)."""
    logits = logits.float()
    rows = torch.arange(len(logits), device=logits.device)
    token = token.to(logits.device)
    scores = torch.log_softmax(logits, -1)[rows, token] if whole else logits[rows, token]
    per_answer = torch.zeros(len(answer_prompt), device=logits.device).index_add(0, answer.to(logits.device), scores)
    matching = matching.to(logits.device)
    prompt = answer_prompt.to(logits.device)
    return (_group_logsumexp(per_answer[matching], prompt[matching], n_prompts)
            - _group_logsumexp(per_answer[~matching], prompt[~matching], n_prompts))


def _group_logsumexp(values: torch.Tensor, groups: torch.Tensor, n: int) -> torch.Tensor:
    """logsumexp of ``values`` within each group 0..n-1 (a plain sum where a group has one)."""
    counts = torch.bincount(groups, minlength=n)
    if bool((counts == 1).all()):
        return torch.zeros(n, device=values.device).index_add(0, groups, values)
    peak = torch.full((n,), -torch.inf, device=values.device).scatter_reduce(
        0, groups, values.detach(), "amax", include_self=True)
    total = torch.zeros(n, device=values.device).index_add(0, groups, (values - peak[groups]).exp())
    return total.log() + peak


def run(root: Any, interventions: list[Intervention], state: ForwardState) -> None:
    """Inside a trace: every intervention at each of its sites, in execution order (readouts
    before edits at the same site)."""
    steps = []
    for i, iv in enumerate(interventions):
        reads = isinstance(iv, (ReadGate, ReadDetector))  # (a ReadSite reads after the edits)
        for ref in iv.refs():
            steps.append((tuple(ref.order), 0 if reads else 1, i, ref, iv))
    steps.sort(key=lambda s: s[:3])
    for _, _, _, ref, iv in steps:
        iv.act(root, ref, state)


def head_change(z: torch.Tensor, heads: list[int], values: torch.Tensor, weight: torch.Tensor,
                strength: float) -> torch.Tensor:
    """What moving ``heads`` of ``z`` [b, s, n_heads, head_dim] ``strength`` of the way to
    ``values`` [len(heads), head_dim] adds to the output projection's output (``weight``
    [d_model, n_heads * head_dim]; a bias cancels): [b, s, d_model]."""
    idx = torch.tensor(heads, dtype=torch.long, device=z.device)
    diff = torch.zeros_like(z)
    diff[:, :, idx] = values.to(z.device, z.dtype) - z[:, :, idx]
    return strength * diff.flatten(-2) @ weight.to(z.device, z.dtype).T


@dataclass
class Sources:
    """Components whose output an edge edit takes out of one downstream input: per site, the
    heads of an output projection's input (``heads``, values [len(heads), head_dim]) or, with no
    heads, a block's whole MLP output (values [d_model]). Sites come in execution order: the
    first one of a forward starts its sum afresh."""

    sites: list[SiteRef]
    heads: list[list[int]]
    values: list[torch.Tensor]
    strength: float = 1.0

    def change(self, i: int, x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """What moving source ``i`` (its site's tensor ``x``, heads split or not) to its values
        adds to the residual stream."""
        if self.heads[i]:
            z = x.view(*x.shape[:2], self.sites[i].n_heads, -1)
            return head_change(z, self.heads[i], self.values[i], weight, self.strength)
        return self.strength * (self.values[i].to(x.device, x.dtype) - x)

    def act(self, root: Any, i: int, state: ForwardState, key: Any) -> None:
        """Inside a trace: add source ``i``'s change to ``state.reads[key]``."""
        node = self.sites[i].module(root)
        x = module_output(node.input if self.sites[i].part == "input" else node.output)
        add = self.change(i, x, node.weight if self.heads[i] else None)
        state.reads[key] = add if i == 0 or key not in state.reads else state.reads[key] + add

    def hooks(self, hf: torch.nn.Module, phase: Any, key: Any) -> list[Any]:
        """Hooks adding each source's change to ``phase.reads[key]``."""
        handles = []
        for i, site in enumerate(self.sites):
            module = site.module(hf)

            def keep(x: torch.Tensor, i: int = i, module: Any = module) -> None:
                add = self.change(i, x, module.weight if self.heads[i] else None)
                phase.reads[key] = add if i == 0 or key not in phase.reads else phase.reads[key] + add

            if site.part == "input":
                handles.append(module.register_forward_pre_hook(lambda mod, args, keep=keep: keep(args[0])))
            else:
                handles.append(module.register_forward_hook(lambda mod, args, out, keep=keep: keep(module_output(out))))
        return handles


@dataclass
class PathAblation(Intervention):
    """Source heads' output moved toward stored values in one downstream input only: the
    residual stream entering the final norm (the logits' input), at ``positions``. Every layer
    after the heads still reads their unchanged output."""

    sources: Sources
    target: SiteRef  # the final norm's input
    positions: str = "all"

    def refs(self) -> list[SiteRef]:
        return [*self.sources.sites, self.target]

    def act(self, root: Any, ref: SiteRef, state: ForwardState) -> None:
        key = ("path", id(self))
        if ref != self.target:
            self.sources.act(root, self.sources.sites.index(ref), state, key)
            return
        add = state.reads.pop(key, None)
        if add is None:
            return
        h = ref.read(root)
        h[...] = _select(state, self.positions, h, h + add.to(h.device, h.dtype))

    def hooks(self, hf: torch.nn.Module, phase: Any) -> list[Any]:
        key = ("path", id(self))

        def hook(module: Any, args: Any) -> Any:
            add = phase.reads.pop(key, None)
            h = args[0]
            cols = phase.columns(self.positions, h.shape[0], h.shape[1], h.device)
            if add is None or cols is None:
                return None
            new = torch.where(cols[..., None], h + add.to(h.device, h.dtype), h)
            return (phase.gated(h, new), *args[1:])

        return [*self.sources.hooks(hf, phase, key), self.target.module(hf).register_forward_pre_hook(hook)]

    def first_change(self, width: int, tail: int, flags: Any) -> int:
        return _first_of(self.positions, width, tail)


def _edge_columns(flags: torch.Tensor | None, gate: torch.Tensor | None, q: int, device: Any) -> torch.Tensor | None:
    """The flagged tokens [b, q] among a forward's last ``q`` columns, in rows whose gate fired."""
    if flags is None:
        return None
    cols = flags[:, -q:].to(device)
    return cols if gate is None else cols & gate.to(device)[:, None]


@dataclass
class EdgeKnockout(Intervention):
    """One layer's key/value heads ``kv_heads`` read, at the tokens a detector flags, keys and
    values computed from the residual stream entering the layer with the sources' change added
    (their output there moved toward stored values), normed by the layer's own input norm. The
    residual stream, the queries and every other key/value head read the unchanged stream.
    ``blocked`` [batch, columns] gives the tokens instead of a detector (a filler null)."""

    sources: Sources
    block: SiteRef  # the layer's input (resid_pre)
    norm: SiteRef  # the layer's attention input norm (a module called on the changed stream)
    projections: list[SiteRef]  # the key and value projections' outputs
    kv_heads: list[int]
    head_dim: int
    blocked: torch.Tensor | None = None

    def refs(self) -> list[SiteRef]:
        return [*self.sources.sites, self.block, *self.projections]

    def _columns(self, width: int, device: Any) -> torch.Tensor:
        """The output columns of the chosen key/value heads [width] bool."""
        cols = torch.zeros(width // self.head_dim, self.head_dim, dtype=torch.bool, device=device)
        cols[torch.tensor(self.kv_heads, dtype=torch.long, device=device)] = True
        return cols.flatten()

    def _replaced(self, out: torch.Tensor, normed: torch.Tensor, proj: Any, where: torch.Tensor) -> torch.Tensor:
        """A projection's output with the chosen heads' columns at ``where`` [b, q] recomputed from ``normed``."""
        bias = None if proj.bias is None else proj.bias.to(out.dtype)
        new = torch.nn.functional.linear(normed.to(out.dtype), proj.weight.to(out.dtype), bias)
        pick = where[..., None] & self._columns(out.shape[-1], out.device)
        return torch.where(pick, new, out)

    def act(self, root: Any, ref: SiteRef, state: ForwardState) -> None:
        key = ("edge", id(self))
        if ref in self.sources.sites:
            self.sources.act(root, self.sources.sites.index(ref), state, key)
        elif ref == self.block:
            h = ref.read(root)
            add = state.reads.pop(key, None)
            if add is not None:
                state.reads[key + ("normed",)] = self.norm.module(root)(h + add.to(h.device, h.dtype))
        else:
            normed = state.reads.get(key + ("normed",))
            node = ref.module(root)
            out = node.output
            flags = self.blocked if self.blocked is not None else state.flags
            where = _edge_columns(flags, state.gate, out.shape[1], out.device)
            if normed is not None and where is not None:
                out[...] = self._replaced(out, normed, node, where)
            if ref == self.projections[-1]:
                state.reads.pop(key + ("normed",), None)

    def hooks(self, hf: torch.nn.Module, phase: Any) -> list[Any]:
        key = ("edge", id(self))
        norm = self.norm.module(hf)

        def block(module: Any, args: Any, kwargs: dict) -> None:
            h = args[0] if args else kwargs["hidden_states"]
            add = phase.reads.pop(key, None)
            phase.reads.pop(key + ("normed",), None)
            if add is not None:
                phase.reads[key + ("normed",)] = norm(h + add.to(h.device, h.dtype))

        def projection(module: Any, args: Any, out: torch.Tensor) -> Any:
            normed = phase.reads.get(key + ("normed",))
            keys = self.blocked if self.blocked is not None else phase.flags
            flags = None if keys is None else keys[:, phase.past:phase.past + out.shape[1]]
            where = _edge_columns(flags, phase.gate, out.shape[1], out.device)
            if normed is None or where is None:
                return None
            return self._replaced(out, normed, module, where)

        return [*self.sources.hooks(hf, phase, key),
                self.block.module(hf).register_forward_pre_hook(block, with_kwargs=True),
                *[p.module(hf).register_forward_hook(projection) for p in self.projections]]

    def first_change(self, width: int, tail: int, flags: Any) -> int:
        keys = self.blocked if self.blocked is not None else flags(None)
        if keys is None:
            return 0
        keys = keys[:, :width].bool()  # the first flagged token's keys and values are the first to change
        first = torch.where(keys.any(1), keys.float().argmax(1), torch.full_like(keys[:, 0], width, dtype=torch.long))
        return int(first.min())
