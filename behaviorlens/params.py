"""Stage parameters, declared once.

Each stage declares its tunable parameters as one dataclass (``PatchParams``, ``ProbeParams``, ...)
whose fields are made with :func:`param`: a default and a help line, plus where the parameter
appears. From that one declaration come the command's options (``cli/options.add_params``), the
experiment step's keys (:func:`step_keys`), the values of a step (:func:`from_step`) or of a
command line (:func:`from_args`) and the stage function's keyword arguments (:func:`kwargs`).

Metadata keys a field may carry (all optional):

- ``help``: the one line shown by ``--help`` and in the experiment's documentation;
- ``choices``, ``nargs``, ``type``, ``action``, ``metavar``, ``flag`` (default ``--name-with-dashes``):
  how the command line reads it when the annotation alone does not say;
- ``cli`` / ``step``: False where the parameter is not a command option / not an experiment key;
- ``command``: the subcommand (or a tuple of them) that takes it (e.g. ``train`` or ``eval`` of ``steer``);
- ``step_default``: the experiment step's default where it differs from the command's;
- ``arg``: the stage function's keyword when it is not the field's name (``None``: not passed).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

P = TypeVar("P")
_UNSET: Any = dataclasses.MISSING


def param(default: Any = _UNSET, help: str = "", *, cli: bool = True, step: bool = True,
          step_default: Any = _UNSET, command: str | None = None, arg: str | None = _UNSET,
          **argparse_options: Any) -> Any:
    """A stage parameter: a dataclass field with its default and help line (see the module doc).

    A list or dict default is copied for every instance.
    """
    meta = {"help": help, "cli": cli, "step": step, "command": command, **argparse_options}
    if step_default is not _UNSET:
        meta["step_default"] = step_default
    if arg is not _UNSET:
        meta["arg"] = arg
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def params_fields(cls: type, *, cli: bool | None = None, step: bool | None = None,
                  command: str | None = None) -> list[dataclasses.Field]:
    """The fields of a parameter class, optionally only the command's or the step's."""
    out = []
    for f in dataclasses.fields(cls):
        m = f.metadata
        if cli is not None and m.get("cli", True) != cli:
            continue
        if step is not None and m.get("step", True) != step:
            continue
        if command is not None and not takes(f, command):
            continue
        out.append(f)
    return out


def takes(f: dataclasses.Field, command: str) -> bool:
    """Whether the subcommand ``command`` takes the field (a field of no command: every one does)."""
    own = f.metadata.get("command")
    return own is None or command == own or (isinstance(own, tuple) and command in own)


def default_of(f: dataclasses.Field, step: bool = False) -> Any:
    """A field's default (the experiment step's own where it has one)."""
    if step and "step_default" in f.metadata:
        return f.metadata["step_default"]
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def step_keys(cls: type) -> set[str]:
    """The keys an experiment step of this stage accepts: its fields not marked ``step=False``."""
    return {f.name for f in params_fields(cls, step=True)}


def from_step(cls: type[P], mapping: Mapping[str, Any] | None) -> P:
    """The parameters of an experiment step (its keys were validated against :func:`step_keys`)."""
    mapping = mapping or {}
    values = {f.name: mapping[f.name] if f.name in mapping else default_of(f, step=True)
              for f in dataclasses.fields(cls)}
    return cls(**values)


def from_args(cls: type[P], args: argparse.Namespace) -> P:
    """The parameters a command line gave (fields the command does not take keep their default)."""
    return cls(**{f.name: getattr(args, f.name) if hasattr(args, f.name) else default_of(f)
                  for f in dataclasses.fields(cls)})


def kwargs(params: Any, names: Iterable[str] | None = None, command: str | None = None) -> dict[str, Any]:
    """The stage function's keyword arguments: every field (or only ``names``, or only the fields
    of ``command``) under its ``arg`` name; fields with ``arg=None`` are the caller's to use, not
    the function's."""
    wanted = None if names is None else set(names)
    out = {}
    for f in dataclasses.fields(params):
        if wanted is not None and f.name not in wanted:
            continue
        if command is not None and not takes(f, command):
            continue
        arg = f.metadata.get("arg", f.name)
        if arg is not None:
            out[arg] = getattr(params, f.name)
    return out
