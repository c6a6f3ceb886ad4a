"""Plain torch hooks on a site: read every layer's activation, or overwrite cells of one layer.

Sites whose value is a module *input* (``resid_pre``: the block input; ``head``: the input of
the attention output projection) use forward pre-hooks; the others use forward hooks on the
module :meth:`SiteMap.module` names. Heads are seen as ``[batch, seq, n_heads, head_dim]``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from typing_extensions import Self

from ..sites import check_edit, module_output

INPUT_SITES = ("resid_pre", "head")


def _heads(model, x: torch.Tensor) -> torch.Tensor:
    return x.view(*x.shape[:-1], model.sites.n_heads, model.sites.head_dim)


@contextmanager
def reading(model, site: str, layers: Sequence[int], keep_grad: bool = False) -> Iterator[dict[int, torch.Tensor]]:
    """Collect the site's activation at each layer during the forwards run inside the block.

    With ``keep_grad`` the live tensors (in the autograd graph) are kept instead of copies,
    so gradients with respect to them can be taken afterwards (heads then stay unsplit:
    ``[batch, seq, n_heads * head_dim]``).
    """
    found: dict[int, torch.Tensor] = {}
    handles = []

    def keep(layer: int, x: torch.Tensor) -> None:
        found[layer] = x if keep_grad else x.detach().clone()

    for layer in layers:
        module = model.sites.module(model.hf, site, layer)
        if site in INPUT_SITES:
            def pre(mod, args, layer=layer):
                x = args[0]  # with keep_grad, heads stay unsplit: a view is not in the graph
                keep(layer, _heads(model, x) if site == "head" and not keep_grad else x)
            handles.append(module.register_forward_pre_hook(pre))
        else:
            def post(mod, args, out, layer=layer):
                keep(layer, module_output(out))
            handles.append(module.register_forward_hook(post))
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


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
        view = _heads(self.model, x) if self.site == "head" else x
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
