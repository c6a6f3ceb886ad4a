"""The base class of an edit kind and the registry from kind names to kinds.

An :class:`EditKind` owns everything that differs between kinds: which of the edit's fields it
needs and how they are validated, the layers it acts on, its description, the interventions it
makes, its random control, its baking (or why it cannot bake), when its gate and detector must
be read, and whether it has a strength. A kind registers itself by subclassing; every module in
:mod:`behaviorlens.edits.kinds` is imported with the package, so a new kind is one new file there.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from ..errors import BehaviorLensError

KINDS: dict[str, EditKind] = {}


def kind_of(name: str) -> EditKind:
    """The registered kind called ``name``."""
    if name not in KINDS:
        raise BehaviorLensError(f"unknown edit kind {name!r}; kinds are {', '.join(KINDS)}")
    return KINDS[name]


class EditKind(ABC):
    """One kind of edit. Instances are stateless; each method takes the :class:`~.edit.Edit`."""

    name: ClassVar[str]
    has_strength: ClassVar[bool] = True  # False: any strength but 0 acts fully (a knockout)
    gateable: ClassVar[bool] = True  # False: it acts from the first layer on, so nothing is read before it
    acts_after_its_layer: ClassVar[bool] = False  # True: it changes the residual leaving its layer
    moves_to_layers: ClassVar[bool] = False  # True: ``layers`` may apply it at other layers than its own
    matched_null: ClassVar[str] = "random"  # the null it is scored against: "random" draws or a "filler" sentence
    random_control_label: ClassVar[str] = "random control"  # what its random control is, as a table says it
    cannot_bake: ClassVar[str | None] = None  # why fixed weights cannot express it (None: it bakes)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            KINDS[cls.name] = cls()

    @abstractmethod
    def validate(self, edit: Any) -> None:
        """Raise if the edit's fields do not make an edit of this kind."""

    @abstractmethod
    def layers(self, edit: Any) -> list[int]:
        """The layers the edit acts on."""

    @abstractmethod
    def describe(self, edit: Any) -> str:
        """What the edit does, in a sentence fragment (its gate is added by :class:`~.edit.Edit`)."""

    @abstractmethod
    def check(self, edit: Any, model: Any) -> None:
        """Raise if the edit's own fields do not fit ``model`` (widths, layers, heads)."""

    @abstractmethod
    def interventions(self, edit: Any, model: Any, strength: float, layers: Sequence[int] | None,
                      positions: str) -> list:
        """The interventions (:mod:`behaviorlens.interventions.kinds`) that make the edit."""

    @abstractmethod
    def random_control(self, edit: Any, model: Any, g: torch.Generator) -> Any:
        """The matching random edit: the same size and place, drawn with ``g``."""

    def bake(self, edit: Any, sites: Any, hf: torch.nn.Module, strength: float) -> None:
        """Write the edit into the weights of ``hf`` (a copy of the model's module)."""
        why = self.cannot_bake or f"a {self.name} edit has no weight form"
        raise BehaviorLensError(f"{edit.describe()}: {why}; apply it at run time "
                                "(steer eval / steer generate)")

    def at_tokens(self, edit: Any, model: Any, tokens: torch.Tensor) -> list:
        """The interventions of its filler null (a kind whose ``matched_null`` is "filler"): the
        edit acting at the given ``tokens`` ([batch, columns] bool) instead of its detector's."""
        raise BehaviorLensError(f"a {self.name} edit has no filler null: its matched null is random draws")

    def intended_sign(self, edit: Any, strength: float) -> float:
        """+1 if the edit at ``strength`` is meant to raise the behavior, -1 to lower it."""
        return -1.0 if strength > 0 else 1.0

    def check_readouts(self, edit: Any) -> None:
        """A gate or detector must be read before the first layer the edit acts on."""
        if edit.gate is None and edit.detector is None:
            return
        if edit.gate is not None and not self.gateable:
            raise BehaviorLensError(f"a {self.name} edit acts from the first layer on, so it cannot be gated")
        first = min(self.layers(edit))
        for what, readout in (("gate", edit.gate), ("detector", edit.detector)):
            if readout is not None and (readout.layer > first or (readout.layer == first
                                                                  and not self.acts_after_its_layer)):
                raise BehaviorLensError(f"the edit's {what} reads layer {readout.layer}, after the edit acts "
                                        f"at layer {first}; read an earlier layer")


def check_vectors(edit: Any, model: Any, site: str | None = "resid_post") -> None:
    """Each vector is d_model wide (and its layer exists, where ``site`` names where it acts)."""
    s = model.sites
    for layer, v in edit.vectors.items():
        if v.shape != (s.d_model,):
            raise BehaviorLensError(f"edit vector at layer {layer} has width {tuple(v.shape)}, but the model "
                                    f"{model.name!r} has d_model {s.d_model}")
        if site is not None:
            s.check(site, layer)


def check_heads(edit: Any, model: Any) -> None:
    """Every edited head exists."""
    for layer, heads in edit.heads.items():
        for h in heads:
            model.sites.check("head", layer, h)


def need(edit: Any, field: str, what: str) -> None:
    """Raise unless the edit's ``field`` holds something."""
    if not getattr(edit, field):
        raise BehaviorLensError(f"a {edit.kind} edit needs at least one {what}")


def random_like(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random tensor of ``t``'s shape and norm."""
    r = torch.randn(t.shape, generator=g)
    return r / r.norm() * t.norm()


def head_names(edit: Any) -> str:
    """``L23H1, L29H1``; a layer whose every head is edited reads ``L23 (all heads)``."""
    names = []
    for layer in sorted(edit.heads):
        hs = edit.heads[layer]
        if edit.n_heads and sorted(hs) == list(range(edit.n_heads)):
            names.append(f"L{layer} (all heads)")
        else:
            names += [f"L{layer}H{h}" for h in hs]
    return ", ".join(names)
