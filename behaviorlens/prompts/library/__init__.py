"""Built-in prompt families, one YAML file each."""

from __future__ import annotations

from pathlib import Path

from ...errors import BehaviorLensError

LIBRARY = Path(__file__).parent


def builtin_names() -> list[str]:
    return sorted(p.stem for p in LIBRARY.glob("*.yaml"))


def builtin_path(name: str) -> Path:
    path = LIBRARY / f"{name}.yaml"
    if not path.is_file():
        raise BehaviorLensError(
            f"unknown family {name!r}: not a file, and the built-in families are "
            f"{', '.join(builtin_names())}"
        )
    return path
