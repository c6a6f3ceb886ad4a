"""Export a steering vector as a llama.cpp control vector (GGUF).

llama.cpp reads tensors named ``direction.N`` (float32, 1-D, ``n_embd`` long, ``N >= 1``) from a
GGUF file whose architecture is ``controlvector`` and adds ``direction.N`` to the output of
decoder layer ``N`` (0-based), the same place :func:`~behaviorlens.steering.steer` adds a
vector for layer ``N``. Layer 0's output cannot be steered there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..edits import Edit
from ..errors import BehaviorLensError
from ..io import atomic_write


def export_gguf(edit: Edit, path: str | Path, strength: float = 1.0, model_hint: str | None = None) -> Path:
    """Write ``strength *`` the edit's vectors as a llama.cpp control-vector GGUF."""
    import gguf

    if edit.kind != "vector":
        raise BehaviorLensError(
            f"only steering vectors export as llama.cpp control vectors, not a {edit.kind} edit"
        )
    if 0 in edit.vectors:
        raise BehaviorLensError("llama.cpp control vectors cannot steer layer 0; train at a later layer")
    hint = model_hint or edit.notes.get("model_type") or "llama"

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, "controlvector")
        writer.add_string("controlvector.model_hint", hint)
        writer.add_uint32("controlvector.layer_count", len(edit.vectors))
        for layer, vec in sorted(edit.vectors.items()):
            writer.add_tensor(f"direction.{layer}", (strength * vec).numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return atomic_write(path, write)


def read_gguf(path: str | Path) -> dict[int, np.ndarray]:
    """The ``direction.N`` tensors of a control-vector GGUF, by layer."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out: dict[int, np.ndarray] = {}
    for t in reader.tensors:
        if t.name.startswith("direction."):
            out[int(t.name.split(".", 1)[1])] = np.array(t.data, dtype=np.float32)
    return out


def gguf_arch(path: str | Path) -> Any:
    import gguf

    reader = gguf.GGUFReader(str(path))
    field = reader.fields["general.architecture"]
    return bytes(field.parts[field.data[0]]).decode()
