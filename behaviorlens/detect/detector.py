"""The detector file: a lie-vs-honest probe and the controls that travel with it.

A :class:`Detector` holds the chosen probe (site ``resid_post``, one layer, one position), and
beside it, fitted on the same training data: the same probe on shuffled labels, the
claim-wrongness probe (the two sides of the training pairs: is the user's claim wrong?) and the
wording probe (bag-of-tokens or answer embeddings), plus the threshold set on ordinary chat.
An override detector (:mod:`.override`) adds its lens (a tuned lens's maps as tensors) and the
references of its AND; its ``probe`` is then the answer-falsity probe it builds on. A readout
detector (:mod:`.readout`: the belief-conditioned probe, the follow-up readout, or a probe
trained with mistakes as negatives) adds its probe and shuffled twin; the falsity probe, the
claim and wording probes stay beside it as its controls.
It is one safetensors file: the weights as tensors, everything else as JSON metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BehaviorLensError
from ..io import atomic_write
from .lens import TunedLens
from .linear import Linear
from .override import Override, Reference
from .readout import Readout

FORMAT = 1
HEADS = ("probe", "shuffled", "claim", "wording")


@dataclass
class Detector:
    """A fitted lie detector (see the module doc). ``meta`` records the model, the training
    families, label counts and the figures of training."""

    layer: int
    position: str
    method: str
    probe: Linear
    shuffled: Linear
    claim: Linear | None
    wording: Linear
    wording_representation: str
    vocab: np.ndarray
    threshold: float = float("nan")
    meta: dict[str, Any] = field(default_factory=dict)
    override: Any = None  # an .override.Override, or None: the falsity probe is the detector
    readout: Any = None  # a .readout.Readout, or None

    def save(self, path: str | Path) -> Path:
        from safetensors.numpy import save_file

        tensors = {f"{h}.weight": getattr(self, h).weight.astype(np.float32) for h in HEADS if getattr(self, h) is not None}
        tensors["vocab"] = np.asarray(self.vocab, dtype=np.int64)
        if self.readout is not None:
            tensors["readout.weight"] = self.readout.probe.weight.astype(np.float32)
            tensors["readout_shuffled.weight"] = self.readout.shuffled.weight.astype(np.float32)
        if self.override is not None and self.override.tuned is not None:
            tensors["tuned.weight"] = self.override.tuned.weight.astype(np.float32)
            tensors["tuned.bias"] = self.override.tuned.bias.astype(np.float32)
        head = {"format": FORMAT, "layer": self.layer, "position": self.position, "method": self.method,
                "wording_representation": self.wording_representation, "threshold": self.threshold,
                "bias": {h: getattr(self, h).bias for h in HEADS if getattr(self, h) is not None},
                "meta": self.meta, "override": _override_head(self.override),
                "readout": self.readout.head() if self.readout is not None else None}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"detector": json.dumps(head, default=str)}))

    @classmethod
    def load(cls, path: str | Path) -> Detector:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise BehaviorLensError(f"detector file {path} does not exist")
        try:
            with safe_open(str(path), "np") as f:
                head = json.loads((f.metadata() or {})["detector"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        except Exception as err:  # noqa: BLE001 (safetensors raises its own types for a damaged file)
            raise BehaviorLensError(f"{path}: not a readable detector file ({type(err).__name__}: {err})") from None
        if head.get("format") != FORMAT:
            raise BehaviorLensError(f"{path}: detector format {head.get('format')!r}, expected {FORMAT}")
        heads = {h: Linear(tensors[f"{h}.weight"], float(head["bias"][h])) if f"{h}.weight" in tensors else None
                 for h in HEADS}
        return cls(layer=int(head["layer"]), position=head["position"], method=head["method"],
                   wording_representation=head["wording_representation"], vocab=tensors["vocab"],
                   threshold=float(head["threshold"]), meta=head.get("meta", {}),
                   override=_override_of(head.get("override"), tensors),
                   readout=_readout_of(head.get("readout"), tensors), **heads)

    def check(self, model: Any) -> None:
        """Refuse a model the detector cannot read (a layer it lacks, another width)."""
        model.sites.check("resid_post", self.layer)
        if self.readout is not None:
            model.sites.check("resid_post", self.readout.layer)
        if model.sites.d_model != self.probe.weight.shape[0]:
            raise BehaviorLensError(f"detector width {self.probe.weight.shape[0]} does not match the model "
                                    f"{model.name!r} (d_model {model.sites.d_model})")

    def describe(self) -> str:
        falsity = f"{self.method} probe, resid_post layer {self.layer} @ {self.position}"
        if self.readout is not None:
            return f"{self.readout.describe()} (beside the answer-falsity {falsity})"
        if self.override is None:
            return falsity
        return (f"override AND falsity: late arrival under the {self.override.lens} lens (layers "
                f"{self.override.middle[0]}-{self.override.middle[-1]} to {self.override.layers[-1]}) and the {falsity}")


def _override_head(override: Any) -> dict | None:
    if override is None:
        return None
    cals = ("falsity", "override", "shuffled_falsity", "shuffled_override")
    return {"lens": override.lens, "layers": override.layers, "middle": override.middle,
            "tuned_layers": override.tuned.layers if override.tuned is not None else None,
            **{c: getattr(override, c).as_list() for c in cals}}


def _override_of(head: dict | None, tensors: dict[str, np.ndarray]) -> Any:
    if head is None:
        return None

    tuned = (TunedLens(head["tuned_layers"], tensors["tuned.weight"], tensors["tuned.bias"])
             if head.get("tuned_layers") is not None else None)
    return Override(head["lens"], [int(x) for x in head["layers"]], [int(x) for x in head["middle"]],
                    *(Reference(*head[c]) for c in ("falsity", "override", "shuffled_falsity", "shuffled_override")),
                    tuned=tuned)


def _readout_of(head: dict | None, tensors: dict[str, np.ndarray]) -> Any:
    if head is None:
        return None

    return Readout(head["features"], head["unit"], int(head["layer"]), head["method"],
                   Linear(tensors["readout.weight"], float(head["bias"]["probe"])),
                   Linear(tensors["readout_shuffled.weight"], float(head["bias"]["shuffled"])),
                   head["negatives"], head["question"])
