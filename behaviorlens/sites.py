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

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .errors import BehaviorLensError

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
    unembed="embed_out",
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

    def read(self, lm: Any, site: str, layer: int) -> torch.Tensor:
        """The live activation of a site inside a trace (heads as [b, s, n_heads, head_dim])."""
        self.check(site, layer)
        block = self.layer(lm, layer)
        if site == "resid_pre":
            return block.input
        if site == "resid_post":
            return block.output
        if site == "attn":
            out = _get(block, self.arch.attn_out).output
            return out[0] if self.arch.attn_out_is_tuple else out
        if site == "mlp":
            return _get(block, self.arch.mlp_out).output
        x = _get(block, self.arch.head_in).input
        return x.view(*x.shape[:-1], self.n_heads, self.head_dim)

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
        live = self.read(lm, site, layer)
        live[index] = value
        return live

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
