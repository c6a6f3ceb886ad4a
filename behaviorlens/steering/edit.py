"""One file format for every edit: safetensors tensors + JSON metadata.

An :class:`Edit` is one of three kinds:

- ``vector``: a steering vector per layer, added to the residual stream leaving that layer;
- ``ablate_direction``: one unit direction projected out of the residual stream everywhere;
- ``heads``: a set of attention heads per layer, replaced by stored values (zero or mean
  ablation) or scaled.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import BehaviorLensError
from ..io import atomic_write

KINDS = ("vector", "ablate_direction", "heads")
HEAD_MODES = ("zero", "mean", "scale")
_META_KEY = "behaviorlens_edit"


@dataclass
class Edit:
    """A steering vector, a direction to ablate, or a head edit, with where it came from."""

    kind: str
    vectors: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [d_model]
    heads: dict[int, list[int]] = field(default_factory=dict)  # layer -> head indices
    head_values: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [n_heads, head_dim]
    head_mode: str = "mean"
    scale: float = 0.0  # for head_mode "scale": the factor applied to the heads
    model: str = ""
    family: str = ""
    position: str = "last"
    method: str = ""
    d_model: int = 0
    n_heads: int = 0
    head_dim: int = 0
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise BehaviorLensError(f"unknown edit kind {self.kind!r}; kinds are {', '.join(KINDS)}")
        if self.head_mode not in HEAD_MODES:
            raise BehaviorLensError(f"unknown head mode {self.head_mode!r}; modes are {', '.join(HEAD_MODES)}")
        self.vectors = {int(k): v.detach().float().cpu() for k, v in self.vectors.items()}
        self.heads = {int(k): sorted(int(h) for h in v) for k, v in self.heads.items()}
        self.head_values = {int(k): v.detach().float().cpu() for k, v in self.head_values.items()}
        if self.kind in ("vector", "ablate_direction") and not self.vectors:
            raise BehaviorLensError(f"a {self.kind} edit needs at least one vector")
        if self.kind == "ablate_direction" and len(self.vectors) != 1:
            raise BehaviorLensError("an ablate_direction edit holds exactly one direction")
        if self.kind == "heads" and not any(self.heads.values()):
            raise BehaviorLensError("a heads edit needs at least one head")
        if self.kind == "heads" and self.head_mode == "mean":
            missing = [layer for layer in self.heads if layer not in self.head_values]
            if missing:
                raise BehaviorLensError(f"mean head ablation needs mean values for layers {missing}")

    # -- facts -------------------------------------------------------------------------------

    @property
    def layers(self) -> list[int]:
        return sorted(self.heads if self.kind == "heads" else self.vectors)

    @property
    def norm(self) -> dict[int, float]:
        return {layer: float(v.norm()) for layer, v in sorted(self.vectors.items())}

    @property
    def direction(self) -> torch.Tensor:
        """The unit direction of an ablate_direction edit (or of a one-layer vector)."""
        if len(self.vectors) != 1:
            raise BehaviorLensError(f"this {self.kind} edit has no single direction")
        v = next(iter(self.vectors.values()))
        return v / v.norm().clamp_min(1e-12)

    @property
    def n_edited_heads(self) -> int:
        return sum(len(h) for h in self.heads.values())

    def describe(self) -> str:
        if self.kind == "heads":
            heads = ", ".join(f"L{layer}H{h}" for layer in sorted(self.heads) for h in self.heads[layer])
            return f"{self.head_mode}-ablation of heads {heads}" if self.head_mode != "scale" else (
                f"scaling heads {heads} by {self.scale:g}")
        layers = ",".join(str(x) for x in self.layers)
        if self.kind == "ablate_direction":
            return f"ablation of the {self.method} direction from layer {layers} ({self.position})"
        return f"{self.method} steering vector at layer {layers} ({self.position})"

    def check(self, model: Any) -> None:
        """Raise if this edit does not fit the model (width, layers, heads)."""
        s = model.sites
        for layer, v in self.vectors.items():
            if v.shape != (s.d_model,):
                raise BehaviorLensError(
                    f"edit vector at layer {layer} has width {tuple(v.shape)}, but the model "
                    f"{model.name!r} has d_model {s.d_model}"
                )
            if self.kind == "vector":
                s.check("resid_post", layer)
        for layer, heads in self.heads.items():
            for h in heads:
                s.check("head", layer, h)
            vals = self.head_values.get(layer)
            if vals is not None and vals.shape != (s.n_heads, s.head_dim):
                raise BehaviorLensError(
                    f"edit head values at layer {layer} have shape {tuple(vals.shape)}, but the "
                    f"model {model.name!r} has {s.n_heads} heads of width {s.head_dim}"
                )

    # -- files -------------------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("vectors", "head_values"):
            d.pop(key)
        d["heads"] = {str(k): v for k, v in self.heads.items()}
        d["layers"] = self.layers
        d["norm"] = {str(k): v for k, v in self.norm.items()}
        return d

    def save(self, path: str | Path) -> Path:
        """Write the edit as one safetensors file with its metadata as JSON inside."""
        from safetensors.torch import save_file

        tensors = {f"vector.{k}": v.contiguous() for k, v in self.vectors.items()}
        tensors |= {f"head_values.{k}": v.contiguous() for k, v in self.head_values.items()}
        if not tensors:  # safetensors needs at least one tensor; zero ablation has none
            tensors["empty"] = torch.zeros(0)
        meta = {_META_KEY: json.dumps(self.metadata(), default=str)}
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | Path, model: Any = None) -> Edit:
        """Read an edit file; with ``model``, also check that it fits that model."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise BehaviorLensError(f"edit file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta_text = (f.metadata() or {}).get(_META_KEY)
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise BehaviorLensError(f"{path}: not a readable edit file (truncated or corrupt: {err})") from None
        if meta_text is None:
            raise BehaviorLensError(f"{path}: a safetensors file without behaviorlens edit metadata")
        try:
            meta = json.loads(meta_text)
            for key in ("layers", "norm"):
                meta.pop(key, None)
            meta["heads"] = {int(k): v for k, v in meta.get("heads", {}).items()}
            vectors = {int(k.split(".", 1)[1]): v for k, v in tensors.items() if k.startswith("vector.")}
            values = {int(k.split(".", 1)[1]): v for k, v in tensors.items() if k.startswith("head_values.")}
            edit = cls(vectors=vectors, head_values=values, **meta)
        except (TypeError, ValueError, KeyError) as err:
            raise BehaviorLensError(f"{path}: corrupt edit metadata ({err})") from None
        if model is not None:
            edit.check(model)
        return edit


SteeringVector = Edit
