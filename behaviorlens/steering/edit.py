"""One file format for every edit: safetensors tensors + JSON metadata.

An :class:`Edit` is one of six kinds:

- ``vector``: a steering vector per layer, added to the residual stream leaving that layer;
- ``ablate_direction``: one unit direction projected out of the residual stream everywhere;
- ``heads``: a set of attention heads per layer, replaced by stored values (zero or mean
  ablation), scaled, or with a stored vector added to their output (``add``: per-head steering);
- ``knockout``: in a set of heads, the attention from the positions the edit acts on to the
  tokens its ``detector`` flags (a per-token linear read of the residual stream) is blocked;
- ``subspace``: a low-rank subspace of the residual stream leaving a layer (orthonormal
  ``basis``) is clamped to the coordinates of a stored point (``vectors``: the mean residual
  over no-pressure prompts);
- ``weights``: stored differences added to named parameters (a weight edit, e.g. head-localized
  fine-tuning).

Any kind may carry a ``gate``: a linear read of the last token's residual stream; the edit then
acts only on prompts where the gate fires. ``positions`` says where in a sequence the edit acts
by default (see :mod:`.apply`).
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

KINDS = ("vector", "ablate_direction", "heads", "knockout", "subspace", "weights")
HEAD_MODES = ("zero", "mean", "scale", "add")
POSITIONS = ("all", "prompt", "generated")
_META_KEY = "behaviorlens_edit"


@dataclass
class Edit:
    """An edit of one of :data:`KINDS`, with where it came from (``notes``)."""

    kind: str
    vectors: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [d_model]
    heads: dict[int, list[int]] = field(default_factory=dict)  # layer -> head indices
    head_values: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [n_heads, head_dim]
    head_mode: str = "mean"
    scale: float = 0.0  # for head_mode "scale": the factor applied to the heads
    basis: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [d_model, rank]
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # parameter name -> difference
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
        if self.kind not in KINDS:
            raise BehaviorLensError(f"unknown edit kind {self.kind!r}; kinds are {', '.join(KINDS)}")
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
        need = {"vector": self.vectors, "ablate_direction": self.vectors, "heads": self.heads,
                "knockout": self.heads, "subspace": self.basis, "weights": self.weights}[self.kind]
        if not need:
            raise BehaviorLensError(f"a {self.kind} edit needs at least one "
                                    f"{'head' if self.kind in ('heads', 'knockout') else 'tensor'}")
        if self.kind == "ablate_direction" and len(self.vectors) != 1:
            raise BehaviorLensError("an ablate_direction edit holds exactly one direction")
        if self.kind == "heads" and self.head_mode in ("mean", "add"):
            missing = [layer for layer in self.heads if layer not in self.head_values]
            if missing:
                raise BehaviorLensError(f"{self.head_mode} head edit needs head values for layers {missing}")
        if self.kind == "knockout" and self.detector is None:
            raise BehaviorLensError("a knockout edit needs a detector that finds the tokens to block")
        if self.kind == "subspace" and set(self.basis) != set(self.vectors):
            raise BehaviorLensError("a subspace edit needs a point (vector) for every basis")

    # -- facts -------------------------------------------------------------------------------

    @property
    def layers(self) -> list[int]:
        """The layers the edit acts on (a weights edit: those its parameter names give)."""
        if self.kind in ("heads", "knockout"):
            return sorted(self.heads)
        if self.kind == "weights":
            return sorted({int(p) for name in self.weights for p in name.split(".") if p.isdigit()})
        return sorted(self.vectors)

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

    def head_names(self) -> str:
        """``L23H1, L29H1``; a layer whose every head is edited reads ``L23 (all heads)``."""
        names = []
        for layer in sorted(self.heads):
            hs = self.heads[layer]
            if self.n_heads and sorted(hs) == list(range(self.n_heads)):
                names.append(f"L{layer} (all heads)")
            else:
                names += [f"L{layer}H{h}" for h in hs]
        return ", ".join(names)

    def describe(self) -> str:
        gate = f", gated by a probe at layer {self.gate.layer}" if self.gate is not None else ""
        layers = ",".join(str(x) for x in self.layers)
        if self.kind == "heads":
            text = {"scale": f"scaling heads {self.head_names()} by {self.scale:g}",
                    "add": f"per-head steering of {self.head_names()} ({self.method})"}.get(
                self.head_mode, f"{self.head_mode}-ablation of heads {self.head_names()}")
        elif self.kind == "knockout" and self.detector.decoy is not None:
            text = (f"attention knockout in heads {self.head_names()} to as many random tokens of the "
                    f"conversation (not the first token, the template or a flagged token; draw "
                    f"{self.detector.decoy}) as the probe at layer {self.detector.layer} flags")
        elif self.kind == "knockout":
            text = (f"attention knockout in heads {self.head_names()} to the tokens a per-token probe "
                    f"at layer {self.detector.layer} flags")
        elif self.kind == "subspace":
            rank = next(iter(self.basis.values())).shape[1]
            text = f"rank-{rank} subspace clamp at layer {layers} ({self.positions}, {self.method})"
        elif self.kind == "weights":
            text = f"{self.method or 'weight'} edit of {len(self.weights)} tensors (layers {layers})"
        elif self.kind == "ablate_direction":
            text = f"ablation of the {self.method} direction from layer {layers} ({self.read_at})"
        else:
            text = f"{self.method} steering vector at layer {layers} ({self.read_at})"
        return text + gate

    def check(self, model: Any) -> None:
        """Raise if this edit does not fit the model (width, layers, heads, parameters)."""
        s = model.sites
        for layer, v in self.vectors.items():
            if v.shape != (s.d_model,):
                raise BehaviorLensError(
                    f"edit vector at layer {layer} has width {tuple(v.shape)}, but the model "
                    f"{model.name!r} has d_model {s.d_model}"
                )
            if self.kind in ("vector", "subspace"):
                s.check("resid_post", layer)
        for layer, heads in self.heads.items():
            for h in heads:
                s.check("head", layer, h)
        for layer, vals in self.head_values.items():
            if vals.shape != (s.n_heads, s.head_dim):
                raise BehaviorLensError(
                    f"edit head values at layer {layer} have shape {tuple(vals.shape)}, but the "
                    f"model {model.name!r} has {s.n_heads} heads of width {s.head_dim}"
                )
        for layer, b in self.basis.items():
            if b.dim() != 2 or b.shape[0] != s.d_model:
                raise BehaviorLensError(f"subspace at layer {layer} has basis {tuple(b.shape)}; d_model is {s.d_model}")
        for readout in (self.detector, self.gate):
            if readout is not None:
                s.check("resid_post", readout.layer)
                if readout.direction.shape != (s.d_model,):
                    raise BehaviorLensError(f"probe at layer {readout.layer} has width "
                                            f"{tuple(readout.direction.shape)}; d_model is {s.d_model}")
        if self.weights:
            params = dict(model.hf.named_parameters())
            for name, delta in self.weights.items():
                if name not in params or params[name].shape != delta.shape:
                    raise BehaviorLensError(f"the model {model.name!r} has no parameter {name!r} of shape "
                                            f"{tuple(delta.shape)}")

    # -- files -------------------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("vectors", "head_values", "basis", "weights", "detector", "gate"):
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
        out = {f"vector.{k}": v for k, v in self.vectors.items()}
        out |= {f"head_values.{k}": v for k, v in self.head_values.items()}
        out |= {f"basis.{k}": v for k, v in self.basis.items()}
        out |= {f"weight.{k}": v for k, v in self.weights.items()}
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

            edit = cls(vectors=named("vector"), head_values=named("head_values"), basis=named("basis"),
                       weights=named("weight", as_int=False), **meta)
        except (TypeError, ValueError, KeyError) as err:
            raise BehaviorLensError(f"{path}: corrupt edit metadata ({err})") from None
        if model is not None:
            edit.check(model)
        return edit
