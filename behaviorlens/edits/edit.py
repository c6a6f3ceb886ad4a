"""One file format for every edit: safetensors tensors + JSON metadata.

An :class:`Edit` holds what any kind may need (vectors per layer, heads per layer with stored
head values, a subspace basis per layer, named weight differences), an optional ``gate`` (a
linear read of the last token's residual stream: the edit acts only on prompts where it fires)
and ``detector`` (a per-token read: the tokens a knockout blocks), ``positions`` (where in a
sequence it acts by default, see :mod:`behaviorlens.interventions.hooks`) and where it came from.
What its ``kind`` makes of those fields is the kind's (:mod:`behaviorlens.edits.kinds`): the
edit delegates validation, layers, description, its interventions and its control to it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import BehaviorLensError
from ..interventions.kinds import Readout
from ..io import atomic_write
from .kind import EditKind, kind_of

HEAD_MODES = ("zero", "mean", "scale", "add")
POSITIONS = ("all", "prompt", "generated")
_META_KEY = "behaviorlens_edit"
TENSOR_FIELDS = {"vector": "vectors", "head_values": "head_values", "basis": "basis", "weight": "weights",
                 "array": "arrays"}  # file prefix -> field


@dataclass
class Edit:
    """An edit of a registered kind (:data:`behaviorlens.edits.kind.KINDS`), with where it came from
    (``notes``)."""

    kind: str
    vectors: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [d_model]
    heads: dict[int, list[int]] = field(default_factory=dict)  # layer -> head indices
    head_values: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [n_heads, head_dim]
    head_mode: str = "mean"
    scale: float = 0.0  # for head_mode "scale": the factor applied to the heads
    basis: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [d_model, rank]
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # parameter name -> difference
    arrays: dict[str, torch.Tensor] = field(default_factory=dict)  # any other named tensor a kind owns
    detector: Readout | None = None
    gate: Readout | None = None
    positions: str = "all"
    model: str = ""
    family: str = ""
    read_at: str = "last"  # the position its vectors were read at (``positions``: where it acts)
    method: str = ""
    d_model: int = 0
    n_heads: int = 0
    head_dim: int = 0
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        spec = kind_of(self.kind)
        if self.head_mode not in HEAD_MODES:
            raise BehaviorLensError(f"unknown head mode {self.head_mode!r}; modes are {', '.join(HEAD_MODES)}")
        if self.positions not in POSITIONS:
            raise BehaviorLensError(f"unknown positions {self.positions!r}; use one of {', '.join(POSITIONS)}")

        def tensors(d: dict) -> dict:
            return {k: v.detach().float().cpu() for k, v in d.items()}

        self.vectors = {int(k): v for k, v in tensors(self.vectors).items()}
        self.heads = {int(k): sorted(int(h) for h in v) for k, v in self.heads.items() if len(v)}
        self.head_values = {int(k): v for k, v in tensors(self.head_values).items()}
        self.basis = {int(k): v for k, v in tensors(self.basis).items()}
        self.weights = tensors(self.weights)
        self.arrays = tensors(self.arrays)
        spec.validate(self)

    # -- facts -------------------------------------------------------------------------------

    @property
    def spec(self) -> EditKind:
        """The kind's class instance, which decides what the fields mean."""
        return kind_of(self.kind)

    @property
    def layers(self) -> list[int]:
        """The layers the edit acts on."""
        return self.spec.layers(self)

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
        gate = f", gated by a probe at layer {self.gate.layer}" if self.gate is not None else ""
        return self.spec.describe(self) + gate

    def check(self, model: Any) -> None:
        """Raise if this edit does not fit the model (width, layers, heads, parameters, readouts)."""
        self.spec.check(self, model)
        s = model.sites
        for readout in (self.detector, self.gate):
            if readout is not None:
                s.check("resid_post", readout.layer)
                if readout.direction.shape != (s.d_model,):
                    raise BehaviorLensError(f"probe at layer {readout.layer} has width "
                                            f"{tuple(readout.direction.shape)}; d_model is {s.d_model}")

    # -- files -------------------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        d = asdict(self)
        for key in (*TENSOR_FIELDS.values(), "detector", "gate"):
            d.pop(key)
        for key in ("detector", "gate"):
            readout = getattr(self, key)
            d[key] = None if readout is None else {"layer": readout.layer, "bias": readout.bias, "gap": readout.gap,
                                                   "decoy": readout.decoy}
        d["heads"] = {str(k): v for k, v in self.heads.items()}
        d["layers"] = self.layers
        d["norm"] = {str(k): v for k, v in self.norm.items()}
        return d

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the edit under its file name."""
        out = {f"{prefix}.{k}": v for prefix, name in TENSOR_FIELDS.items() for k, v in getattr(self, name).items()}
        out |= {key: r.direction for key, r in (("detector", self.detector), ("gate", self.gate)) if r is not None}
        return {k: v.contiguous() for k, v in out.items()}

    def save(self, path: str | Path) -> Path:
        """Write the edit as one safetensors file with its metadata as JSON inside."""
        from safetensors.torch import save_file

        tensors = self.tensors() or {"empty": torch.zeros(0)}  # safetensors needs a tensor
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
            if "position" in meta:  # written before the field was named read_at
                meta["read_at"] = meta.pop("position")
            for key in ("detector", "gate"):
                r = meta.get(key)
                meta[key] = None if r is None else Readout(r["layer"], tensors[key], r["bias"], r.get("gap", 0), r.get("decoy"))

            def named(prefix: str, as_int: bool = True) -> dict:
                items = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
                return {int(k) if as_int else k: v for k, v in items.items()}

            edit = cls(**{name: named(prefix, as_int=name not in ("weights", "arrays"))
                          for prefix, name in TENSOR_FIELDS.items()},
                       **meta)
        except (TypeError, ValueError, KeyError) as err:
            raise BehaviorLensError(f"{path}: corrupt edit metadata ({err})") from None
        if model is not None:
            edit.check(model)
        return edit
