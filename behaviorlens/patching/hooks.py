"""A plain torch hook that overwrites cells of one site at one layer (the local fast path of
exact patching). Sites are hooked as :mod:`behaviorlens.reads` reads them: module inputs with
pre-hooks, heads seen as ``[batch, seq, n_heads, head_dim]``.
"""

from __future__ import annotations

import torch
from typing_extensions import Self

from ..reads import INPUT_SITES, split_heads
from ..sites import check_edit, module_output


class Overwrite:
    """Context manager: overwrite ``site[index] = values`` at one layer in the next forward.

    ``index`` is a tuple of index tensors into the site as seen here (heads on the third
    axis). After the edit the hook reads the region back and checks it equals ``values``;
    on exit it checks the hook fired exactly once, so a silent no-op fails loudly.
    """

    def __init__(self, model, site: str, layer: int, index: tuple, values: torch.Tensor) -> None:
        self.model, self.site, self.layer = model, site, layer
        self.index, self.values = index, values
        self.fired = 0

    def _edit(self, x: torch.Tensor) -> torch.Tensor:
        view = split_heads(self.model, x) if self.site == "head" else x
        index = tuple(t.to(view.device) for t in self.index)
        view[index] = self.values.to(view.device, view.dtype)
        check_edit(view[index], self.values, f"{self.site} at layer {self.layer}")
        self.fired += 1
        return x

    def __enter__(self) -> Self:
        module = self.model.sites.module(self.model.hf, self.site, self.layer)
        if self.site in INPUT_SITES:
            def pre(mod, args):
                return (self._edit(args[0]), *args[1:])
            self.handle = module.register_forward_pre_hook(pre)
        else:
            def post(mod, args, out):
                self._edit(module_output(out))
                return out
            self.handle = module.register_forward_hook(post)
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        self.handle.remove()
        if exc_type is None and self.fired != 1:
            raise RuntimeError(
                f"the patch of {self.site} at layer {self.layer} ran {self.fired} times, not once"
            )
