"""Named activation sites, per architecture family.

This is the only module that knows module paths such as ``model.layers[i].self_attn.o_proj``.
Everything else asks for a site by name:

- ``resid_pre``  the residual stream entering layer L          [batch, seq, d_model]
- ``resid_post`` the residual stream leaving layer L           [batch, seq, d_model]
- ``attn``       the attention block's contribution to the residual stream
- ``mlp``        the MLP block's contribution to the residual stream
- ``head``       per-head attention outputs: the input of the attention output projection,
                 split into heads                              [batch, seq, n_heads, head_dim]

Inside an nnsight trace, :meth:`SiteMap.read` returns the live tensor of a site and
:meth:`SiteMap.write` edits it in place. Within one trace, sites must be visited in execution
order (:func:`execution_order` sorts them), since nnsight 0.8 refuses to go back in time.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Self

import torch

from .errors import BehaviorLensError
from .interventions.access import RANKS, SiteRef, module_output

SITES = ("resid_pre", "head", "attn", "mlp", "resid_post")  # execution order within a layer


@dataclass(frozen=True)
class Architecture:
    """Module paths of one architecture family, relative to the causal-LM module."""

    family: str
    layers: str  # the ModuleList of decoder blocks
    attn: str  # attention module, inside a block (its output is a tuple)
    head_in: str  # attention output projection, inside a block
    attn_out: str  # module whose output is added to the residual stream for attention
    mlp_out: str  # module whose output is added to the residual stream for the MLP
    mlp_proj: str  # MLP output projection, inside a block
    embed: str  # token embedding
    final_norm: str
    unembed: str
    pos_embed: str | None = None  # learned absolute positions (GPT-2)
    attn_out_is_tuple: bool = True
    conv1d: bool = False  # GPT-2 stores projections as Conv1D ([in, out] weights)


_LLAMA = Architecture(
    family="llama",
    layers="model.layers",
    attn="self_attn",
    head_in="self_attn.o_proj",
    attn_out="self_attn",
    mlp_out="mlp",
    mlp_proj="mlp.down_proj",
    embed="model.embed_tokens",
    final_norm="model.norm",
    unembed="lm_head",
)
_GEMMA2 = Architecture(
    family="gemma2",
    layers="model.layers",
    attn="self_attn",
    head_in="self_attn.o_proj",
    attn_out="post_attention_layernorm",  # Gemma 2/3 normalize each block's output
    mlp_out="post_feedforward_layernorm",
    mlp_proj="mlp.down_proj",
    embed="model.embed_tokens",
    final_norm="model.norm",
    unembed="lm_head",
    attn_out_is_tuple=False,
)
_GPT2 = Architecture(
    family="gpt2",
    layers="transformer.h",
    attn="attn",
    head_in="attn.c_proj",
    attn_out="attn",
    mlp_out="mlp",
    mlp_proj="mlp.c_proj",
    embed="transformer.wte",
    final_norm="transformer.ln_f",
    unembed="lm_head",
    pos_embed="transformer.wpe",
    conv1d=True,
)
_NEOX = Architecture(
    family="gpt_neox",
    layers="gpt_neox.layers",
    attn="attention",
    head_in="attention.dense",
    attn_out="attention",
    mlp_out="mlp",
    mlp_proj="mlp.dense_4h_to_h",
    embed="gpt_neox.embed_in",
    final_norm="gpt_neox.final_layer_norm",
    unembed="lm_head",
)

ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _GEMMA2,
    "gemma3_text": _GEMMA2,
    "gpt2": _GPT2,
    "gpt_neox": _NEOX,
}


def _get(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part)
    return root


@dataclass(frozen=True)
class SiteMap:
    """Where each named site of one model lives, and its shape."""

    arch: Architecture
    n_layers: int
    d_model: int
    n_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: Any) -> SiteMap:
        """Resolve the site map of a transformers config, or say which families are known."""
        model_type = getattr(config, "model_type", None)
        if model_type not in ARCHITECTURES:
            known = ", ".join(sorted(ARCHITECTURES))
            raise BehaviorLensError(
                f"architecture {model_type!r} has no site map; known families: {known}"
            )
        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        d_model = _first(cfg, "hidden_size", "n_embd")
        n_heads = _first(cfg, "num_attention_heads", "n_head")
        head_dim = getattr(cfg, "head_dim", None) or d_model // n_heads
        return cls(
            arch=ARCHITECTURES[model_type],
            n_layers=_first(cfg, "num_hidden_layers", "n_layer"),
            d_model=d_model,
            n_heads=n_heads,
            head_dim=head_dim,
        )

    # -- validation -------------------------------------------------------------------------

    def check(self, site: str, layer: int, head: int | None = None) -> None:
        """Raise a clear error for a site, layer or head this model does not have."""
        if site not in SITES:
            raise BehaviorLensError(f"unknown site {site!r}; sites are {', '.join(SITES)}")
        if not 0 <= layer < self.n_layers:
            raise BehaviorLensError(
                f"layer {layer} does not exist: this {self.arch.family} model has layers "
                f"0..{self.n_layers - 1}"
            )
        if head is not None and not 0 <= head < self.n_heads:
            raise BehaviorLensError(
                f"head {head} does not exist: layer {layer} has heads 0..{self.n_heads - 1}"
            )

    # -- inside an nnsight trace --------------------------------------------------------------

    def layer(self, lm: Any, layer: int) -> Any:
        return _get(lm, self.arch.layers)[layer]

    def ref(self, site: str, layer: int) -> SiteRef:
        """Where a named site lives (:class:`~behaviorlens.interventions.access.SiteRef`)."""
        self.check(site, layer)
        block = f"{self.arch.layers}.{layer}"
        order = (layer, RANKS[site])
        if site == "resid_pre":
            return SiteRef(block, "input", order=order)
        if site == "resid_post":
            return SiteRef(block, "output", order=order)
        if site == "head":
            return SiteRef(f"{block}.{self.arch.head_in}", "input", n_heads=self.n_heads, order=order)
        path = self.arch.attn_out if site == "attn" else self.arch.mlp_out
        return SiteRef(f"{block}.{path}", "output", order=order)

    def attention_call_ref(self, layer: int) -> SiteRef:
        """The call of a block's attention module (its keyword arguments hold the mask)."""
        self.check("attn", layer)
        return SiteRef(f"{self.arch.layers}.{layer}.{self.arch.attn}", "inputs", order=(layer, RANKS["attn_call"]))

    def final_norm_ref(self) -> SiteRef:
        """The input of the final norm: the residual stream the logits read."""
        return SiteRef(self.arch.final_norm, "input", order=(self.n_layers, 0))

    def split_refs(self, layer: int) -> tuple[SiteRef, list[SiteRef]]:
        """Block ``layer``'s attention norm (its input) and its key and value projections (their
        outputs, in execution order), from the family's :class:`SplitBlock`, or a clear error."""
        parts = SPLIT_BLOCKS.get(self.arch.family)
        if parts is None:
            raise BehaviorLensError(f"the {self.arch.family} family has no known split of a block into its "
                                    f"norm and projections: {SPLIT_REASONS.get(self.arch.family, 'none is known')}")
        self.check("attn", layer)
        block = f"{self.arch.layers}.{layer}"
        projections = [SiteRef(f"{block}.{path}", "output", order=(layer, 2, i + 1))
                       for i, path in enumerate((parts.k_proj, parts.v_proj))]
        return SiteRef(f"{block}.{parts.attn_norm}"), projections

    def residual_source_refs(self) -> list[SiteRef]:
        """Every output that sums into the residual stream: embeddings, each attn and mlp."""
        refs = [SiteRef(self.arch.embed, order=(-1, RANKS["embed"]))]
        if self.arch.pos_embed:
            refs.append(SiteRef(self.arch.pos_embed, order=(-1, RANKS["embed"])))
        return refs + [self.ref(site, i) for i in range(self.n_layers) for site in ("attn", "mlp")]

    def parameter_ref(self, hf_model: torch.nn.Module, name: str) -> SiteRef:
        """The module owning parameter ``name``, ordered by layer and registration."""
        names = [n for n, _ in hf_model.named_parameters()]
        path = name.rsplit(".", 1)[0]
        prefix = self.arch.layers + "."
        layer = int(path[len(prefix):].split(".")[0]) if path.startswith(prefix) else -1
        return SiteRef(path, order=(layer, RANKS["linear"], names.index(name)))

    def read(self, lm: Any, site: str, layer: int) -> torch.Tensor:
        """The live activation of a site inside a trace (heads as [b, s, n_heads, head_dim])."""
        return self.ref(site, layer).read(lm)

    def write(self, lm: Any, site: str, layer: int, value: Any, index: Any = ...) -> torch.Tensor:
        """Set ``site[index] = value`` in place inside a trace; returns the edited live tensor.

        ``index`` indexes the site's shape as :meth:`read` gives it (heads on the third axis).
        Pass the returned tensor to :func:`saved_edit` to check afterwards that it took effect.
        """
        if site == "head" and isinstance(index, tuple) and len(index) > 2:
            head = index[2]
            if isinstance(head, int) and not isinstance(head, bool):
                # an out-of-range head would otherwise surface as a bare IndexError mid-trace
                wrapped = head + self.n_heads if head < 0 <= head + self.n_heads else head
                self.check(site, layer, wrapped)
        return self.ref(site, layer).write(lm, value, index)

    # -- plain torch modules (hooks, weight edits) -------------------------------------------

    def module(self, hf_model: torch.nn.Module, site: str, layer: int) -> torch.nn.Module:
        """The torch module whose output (or, for resid_pre and head, input) is the site."""
        self.check(site, layer)
        block = _get(hf_model, self.arch.layers)[layer]
        if site in ("resid_pre", "resid_post"):
            return block
        path = {"attn": self.arch.attn_out, "mlp": self.arch.mlp_out, "head": self.arch.head_in}
        return _get(block, path[site])

    def layers(self, hf_model: torch.nn.Module) -> torch.nn.ModuleList:
        return _get(hf_model, self.arch.layers)

    def embedding(self, hf_model: torch.nn.Module) -> torch.nn.Module:
        return _get(hf_model, self.arch.embed)

    def final_norm(self, hf_model: torch.nn.Module) -> torch.nn.Module:
        return _get(hf_model, self.arch.final_norm)

    def unembed(self, hf_model: torch.nn.Module) -> torch.nn.Module:
        return _get(hf_model, self.arch.unembed)

    def attn_out_proj(self, hf_model: torch.nn.Module, layer: int) -> torch.nn.Module:
        return _get(self.layers(hf_model)[layer], self.arch.head_in)

    def mlp_out_proj(self, hf_model: torch.nn.Module, layer: int) -> torch.nn.Module:
        return _get(self.layers(hf_model)[layer], self.arch.mlp_proj)

    def residual_writers(self, hf_model: torch.nn.Module) -> list[torch.nn.Module]:
        """Every module whose weights write into the residual stream, in model order."""
        if self.arch.family == "gemma2":
            raise BehaviorLensError(
                "Gemma 2/3 normalize each block's output before the residual add, so no weight "
                "edit removes a direction exactly; use runtime ablation instead"
            )
        mods = [self.embedding(hf_model)]
        if self.arch.pos_embed:
            mods.append(_get(hf_model, self.arch.pos_embed))
        for i in range(self.n_layers):
            mods += [self.attn_out_proj(hf_model, i), self.mlp_out_proj(hf_model, i)]
        return mods

    def output_weight(self, module: torch.nn.Module) -> torch.Tensor:
        """A residual writer's weight as [d_model, fan_in] (embeddings: [d_model, vocab])."""
        w = module.weight
        if isinstance(module, torch.nn.Embedding) or self.arch.conv1d:
            return w.T
        return w

    def sites(self, names: Iterable[str] | None = None) -> list[str]:
        names = list(names or SITES)
        for n in names:
            if n not in SITES:
                raise BehaviorLensError(f"unknown site {n!r}; sites are {', '.join(SITES)}")
        return names

    # -- running the decoder from a layer (added for activation patching) --------------------

    def capture_layer_calls(self, hf_model: torch.nn.Module) -> LayerCalls:
        """Context manager recording each decoder block's call arguments during one forward.

        ``with sites.capture_layer_calls(hf) as calls: hf(**inputs)``; afterwards ``calls``
        replays blocks from any layer (:meth:`run_from`) with the masks, position ids and
        rotary embeddings the model itself built, for any architecture. It also keeps every
        block's attention keys and values, so a replay can start at a later column.
        """
        return LayerCalls(self.layers(hf_model), hf_model.config)

    def run_from(
        self,
        hf_model: torch.nn.Module,
        layer: int,
        hidden: torch.Tensor,
        calls: LayerCalls,
        rows: torch.Tensor | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        """Run blocks ``layer..end`` on ``hidden`` (the residual entering ``layer``).

        ``rows`` maps each row of ``hidden`` to the row of the captured forward whose masks
        and positions it uses (copies of one prompt share a row). With ``start > 0``,
        ``hidden`` holds only the columns from ``start`` on: the columns before it, unchanged
        from the captured forward, enter attention as its cached keys and values
        (:attr:`LayerCalls.can_start_later` says whether this model allows it). Returns the last
        block's output (before the final norm); ``layer == n_layers`` returns ``hidden``.
        """
        for i in range(layer, self.n_layers):
            kwargs = calls.for_rows(i, rows, start)
            hidden = module_output(self.layers(hf_model)[i](hidden, **kwargs))
        return hidden

    def logits_from_hidden(self, hf_model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm, unembedding and any final logit soft-capping of last-block outputs."""
        logits = hf_model.get_output_embeddings()(self.final_norm(hf_model)(hidden))
        cap = getattr(hf_model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # -- steering (added for behaviorlens.steering) -------------------------------------------

    def attention_module(self, hf_model: torch.nn.Module, layer: int) -> torch.nn.Module:
        """The attention module of a block (it receives the attention mask)."""
        self.check("attn", layer)
        return _get(self.layers(hf_model)[layer], self.arch.attn)

    def attention_linears(self, hf_model: torch.nn.Module, layer: int) -> list[torch.nn.Module]:
        """The q, k, v and output projections of a Llama- or Gemma-style attention block."""
        attn = self.attention_module(hf_model, layer)
        return [getattr(attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]

    def residual_sources(self, hf_model: torch.nn.Module) -> list[torch.nn.Module]:
        """Modules whose outputs sum to the residual stream: embeddings, every attn and mlp.

        Unlike :meth:`residual_writers` this works for every family (Gemma 2/3 included): a
        direction projected out of all these outputs never enters the residual stream.
        """
        mods = [self.embedding(hf_model)]
        if self.arch.pos_embed:
            mods.append(_get(hf_model, self.arch.pos_embed))
        for i in range(self.n_layers):
            mods += [self.module(hf_model, "attn", i), self.module(hf_model, "mlp", i)]
        return mods


CACHE_ARGUMENTS = ("cache", "past_key_values", "layer_past", "past_key_value")


class LayerCalls:
    """The arguments each decoder block received in one forward, and its keys and values.

    Arguments are stored by name. During the forward, each block gets a :class:`KeyValueRecord`
    as its cache argument, which keeps the keys and values its attention computed (and
    returns them unchanged), so that a replay can start at a later column.
    """

    def __init__(self, blocks: torch.nn.ModuleList, config: Any) -> None:
        self.blocks = blocks
        self.attention = getattr(config, "_attn_implementation", None)
        self.calls: dict[int, dict[str, Any]] = {}
        self.cache_args: dict[int, str] = {}  # block -> the name of its cache argument
        self.keys_values = KeyValueRecord()
        self.handles: list[Any] = []

    def __enter__(self) -> Self:
        for i, block in enumerate(self.blocks):
            self.handles.append(block.register_forward_pre_hook(self._hook(i), with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _hook(self, i: int) -> Any:
        params = inspect.signature(type(self.blocks[i]).forward).parameters  # (self, hidden, ...)
        names = [n for n, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD][2:]
        cache_arg = next((n for n in CACHE_ARGUMENTS if n in params), None)

        def hook(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            named = dict(zip(names, args[1:])) | kwargs
            self.calls[i] = {k: None if _is_cache(v) else v for k, v in named.items()}
            if cache_arg is None:
                return None
            self.cache_args[i] = cache_arg
            return args[:1], named | {cache_arg: self.keys_values}

        return hook

    @property
    def can_start_later(self) -> bool:
        """Whether replays may start at a later column: every block's keys and values were
        recorded, and its mask is a 4-D SDPA or eager mask (or none: plain causal SDPA)."""
        if self.attention not in ("sdpa", "eager") or len(self.keys_values.keys) < len(self.calls):
            return False

        def mask_ok(mask: Any) -> bool:
            return mask.dim() == 4 if isinstance(mask, torch.Tensor) else mask is None and self.attention == "sdpa"

        return bool(self.calls) and all(i in self.cache_args and mask_ok(c.get("attention_mask"))
                                        for i, c in self.calls.items())

    def for_rows(self, layer: int, rows: torch.Tensor | None, start: int = 0) -> dict[str, Any]:
        """Block ``layer``'s arguments by name, batch axes re-indexed by ``rows``, from column ``start``."""
        if layer not in self.calls:
            raise RuntimeError(f"no forward pass was captured for block {layer}")
        kwargs = dict(self.calls[layer])
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        if rows is not None:
            kwargs = _take_rows(kwargs, rows)
        if start == 0:
            return kwargs
        if not self.can_start_later:
            raise RuntimeError("this model's blocks cannot be replayed from a later column")
        keys = self.keys_values.keys[layer]
        length = keys.shape[-2]
        mask = kwargs.get("attention_mask")
        if mask is None:  # SDPA without padding: plain causal attention
            mask = torch.ones(length, length, dtype=torch.bool, device=keys.device).tril()[None, None]
        kwargs["attention_mask"] = mask[..., start:, :]
        for name in ("position_ids", "cache_position"):
            if isinstance(kwargs.get(name), torch.Tensor):
                kwargs[name] = kwargs[name][..., start:]
        if kwargs.get("position_embeddings") is not None:
            kwargs["position_embeddings"] = tuple(t[..., start:, :] for t in kwargs["position_embeddings"])
        kwargs[self.cache_args[layer]] = KeyValuePrefix(self.keys_values, rows, start)
        return kwargs


class KeyValueRecord:
    """Stands in for a transformers cache during one forward: keeps each layer's keys and values."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer: int, *args: Any, **kwargs: Any,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[layer], self.values[layer] = keys, values
        return keys, values


class KeyValuePrefix:
    """Stands in for a transformers cache in a replay: the recorded keys and values of the
    columns before ``start`` come first, then the replayed columns' own."""

    def __init__(self, record: KeyValueRecord, rows: torch.Tensor | None, start: int) -> None:
        self.record, self.rows, self.start = record, rows, start

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer: int, *args: Any, **kwargs: Any,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        def prefix(t: torch.Tensor) -> torch.Tensor:
            t = t[..., : self.start, :]
            return t if self.rows is None else t.index_select(0, self.rows.to(t.device))

        return (torch.cat([prefix(self.record.keys[layer]), keys], -2),
                torch.cat([prefix(self.record.values[layer]), values], -2))


def _is_cache(value: Any) -> bool:
    """A key/value cache object (replayed blocks must not append to the captured one)."""
    return any(c.__name__.endswith("Cache") for c in type(value).__mro__)


def _take_rows(value: Any, rows: torch.Tensor) -> Any:
    """Index the batch axis of tensors (2+ dims, batch size > 1 or broadcastable) in a structure."""
    if isinstance(value, torch.Tensor):
        if value.dim() >= 2 and value.shape[0] > 1:
            return value.index_select(0, rows.to(value.device))
        return value
    if isinstance(value, tuple):
        return tuple(_take_rows(v, rows) for v in value)
    if isinstance(value, list):
        return [_take_rows(v, rows) for v in value]
    if isinstance(value, dict):
        return {k: _take_rows(v, rows) for k, v in value.items()}
    return value


def execution_order(pairs: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
    """Sort (site, layer) pairs in the order a forward pass reaches them."""
    return sorted(pairs, key=lambda p: (p[1], SITES.index(p[0])))


def saved_edit(live: torch.Tensor, index: Any = ...) -> torch.Tensor:
    """Inside a trace: keep a copy of an edited region to compare with :func:`check_edit`."""
    return live[index].detach().clone().save()


def check_edit(saved: torch.Tensor, expected: torch.Tensor, what: str, atol: float = 1e-5) -> None:
    """After a trace: raise if an edit did not take effect (a silent no-op fails loudly)."""
    got = torch.as_tensor(saved)
    if got.shape != expected.shape or not torch.allclose(
        got.float(), expected.to(got.device).float(), atol=atol, rtol=1e-4
    ):
        raise RuntimeError(f"the edit of {what} did not take effect")


def _first(cfg: Any, *names: str) -> int:
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return int(v)
    raise BehaviorLensError(f"config has none of {names}")


# -- circuits (added for behaviorlens.circuits) -----------------------------------------------


@dataclass(frozen=True)
class SplitBlock:
    """Paths, inside a decoder block, of the parts the circuit graph splits a block into.

    Only sequential pre-norm blocks with separate q/k/v projections qualify: the residual
    stream is a plain sum of the embedding, every head's output and every MLP's output.
    """

    attn_norm: str
    q_proj: str
    k_proj: str
    v_proj: str
    o_proj: str
    mlp_norm: str
    mlp: str


_LLAMA_SPLIT = SplitBlock("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                          "self_attn.o_proj", "post_attention_layernorm", "mlp")
SPLIT_BLOCKS: dict[str, SplitBlock] = {"llama": _LLAMA_SPLIT}
SPLIT_REASONS = {
    "gemma2": "Gemma 2/3 normalize each block's output before the residual add, so head outputs do not "
              "sum to the residual stream",
    "gpt2": "GPT-2 fuses q, k and v into one Conv1D projection (not split yet)",
    "gpt_neox": "GPT-NeoX runs attention and MLP in parallel and fuses q, k and v (not split yet)",
}


def split_block(sites: SiteMap, hf_model: torch.nn.Module, layer: int) -> dict[str, torch.nn.Module]:
    """The modules of block ``layer`` by :class:`SplitBlock` field name, or a clear error."""
    parts = SPLIT_BLOCKS.get(sites.arch.family)
    if parts is None:
        reason = SPLIT_REASONS.get(sites.arch.family, "no split is known for it")
        raise BehaviorLensError(f"circuits need a split of each block into heads and MLP, and the "
                                f"{sites.arch.family} family has none: {reason}")
    sites.check("attn", layer)
    block = sites.layers(hf_model)[layer]
    return {name: _get(block, getattr(parts, name)) for name in SplitBlock.__dataclass_fields__}


def n_kv_heads(config: Any) -> int:
    """Key/value heads per layer (grouped-query attention shares each among several query heads)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(cfg, "num_key_value_heads", None) or _first(cfg, "num_attention_heads", "n_head"))
