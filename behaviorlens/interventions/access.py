"""Reading and overwriting one site, on an nnsight envoy tree or on the plain torch modules.

A :class:`SiteRef` is what :meth:`behaviorlens.sites.SiteMap.ref` resolves a named site to: a
module path, which side of the call it is (``input``, ``output``, or ``inputs``: the call's
positional and keyword arguments), how many heads its last axis splits into, and where the
forward pass reaches it. It needs nothing but torch, so it travels by value inside a remote
(NDIF) request (:mod:`behaviorlens.remote`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# Where, within one layer, a forward pass reaches each kind of site (then any module's
# parameters, by their registration order).
RANKS = {"embed": 0, "resid_pre": 1, "attn_call": 2, "head": 3, "linear": 4, "attn": 5, "mlp": 6, "resid_post": 7}


def module_output(out: Any) -> torch.Tensor:
    """The hidden-state tensor a block or sub-module returned (the first element of a tuple)."""
    return out[0] if isinstance(out, tuple) else out


@dataclass(frozen=True)
class SiteRef:
    """One site: ``path`` (from the causal-LM root), ``part`` and execution ``order``."""

    path: str
    part: str = "output"  # "input", "output" or "inputs" (the call's (args, kwargs))
    n_heads: int = 0  # > 0: the last axis viewed as [n_heads, head_dim]
    order: tuple = (0, 0)

    def module(self, root: Any) -> Any:
        """The envoy (or torch module) at ``path`` below ``root``."""
        for part in self.path.split("."):
            root = root[int(part)] if part.isdigit() else getattr(root, part)
        return root

    def read(self, root: Any) -> torch.Tensor:
        """The live tensor of the site inside a trace (heads as [..., heads, head_dim])."""
        node = self.module(root)
        x = module_output(node.input if self.part == "input" else node.output)
        return x.view(*x.shape[:-1], self.n_heads, x.shape[-1] // self.n_heads) if self.n_heads else x

    def write(self, root: Any, value: torch.Tensor, index: Any = ...) -> torch.Tensor:
        """Set ``site[index] = value`` in place inside a trace; returns the live tensor."""
        live = self.read(root)
        live[index] = value
        return live
