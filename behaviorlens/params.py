"""Stage parameters, declared once.

Each subcommand's parameters are one dataclass (``PatchParams``, ``SteerTrainParams``, ...) whose
fields, made with :func:`param`, are named as the stage function's arguments. Where an experiment
step takes more than a command, its class is a :class:`Step`: it extends the command classes
with fields of its own (the families it runs on, say). From these declarations come the
command's options (``cli/options.add_params``), the step's schema (:func:`step_schema`), the
parameters of a step (:func:`from_step`) or of a command line (:func:`from_args`) and a stage
function's keyword arguments (:func:`kwargs`).

Metadata keys a field may carry (all optional):

- ``help``: the one line shown by ``--help`` and in the experiment's documentation;
- ``name``: what a user types, as an option (``--name``) and as an experiment key, where it is
  not the field's name;
- ``step``: False where an experiment step does not take it (the stage function's default holds);
- ``step_default``: the experiment step's default where it differs from the command's;
- ``choices``, ``nargs``, ``type``, ``metavar``: how the command line reads it when the annotation
  alone does not say (``choices`` also bound a step's values).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import operator
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar

import pydantic

from .errors import BehaviorLensError

P = TypeVar("P")
_UNSET: Any = dataclasses.MISSING


def param(default: Any = _UNSET, help: str = "", *, name: str | None = None, step: bool = True,
          step_default: Any = _UNSET, **argparse_options: Any) -> Any:
    """A stage parameter: a dataclass field with its default and help line (see the module doc).

    A list or dict default is copied for every instance.
    """
    meta = {"help": help, "step": step, **argparse_options}
    if name is not None:
        meta["name"] = name
    if step_default is not _UNSET:
        meta["step_default"] = step_default
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class Step:
    """Marks an experiment step's parameter class: the command classes it extends, plus fields of
    its own, which no stage function takes."""


def user_name(f: dataclasses.Field) -> str:
    """What a user types for a field: its option (with dashes) and its experiment key."""
    return f.metadata.get("name", f.name)


def default_of(f: dataclasses.Field, step: bool = False) -> Any:
    """A field's default (the experiment step's own where it has one)."""
    if step and "step_default" in f.metadata:
        return f.metadata["step_default"]
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def step_fields(cls: type) -> list[dataclasses.Field]:
    """The fields an experiment step of this class takes (not marked ``step=False``)."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("step", True)]


# -- schemas -----------------------------------------------------------------------------------


class Schema(pydantic.BaseModel):
    """Base of every experiment-file schema: unknown keys refused (naming the keys there are),
    values coerced to their declared types."""

    model_config = pydantic.ConfigDict(extra="forbid")

    @pydantic.model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            keys = {f.alias or name for name, f in cls.model_fields.items()}
            unknown = [k for k in data if k not in keys]
            if unknown:
                raise ValueError(f"unknown key {unknown[0]!r}; keys are {', '.join(sorted(keys))}")
        return data


@functools.cache
def step_schema(cls: type) -> type[Schema]:
    """The schema of an experiment step of parameter class ``cls``: one key per step field (its
    user name), of the field's type (bounded by its ``choices``), with the step's default."""
    hints = typing.get_type_hints(cls)
    fields = {}
    for f in step_fields(cls):
        hint = hints[f.name]
        if "choices" in f.metadata:
            hint = _bounded(hint, tuple(f.metadata["choices"]))
        default = pydantic.Field(default_factory=functools.partial(default_of, f, True), alias=user_name(f))
        fields[f.name] = (hint, default)
    return pydantic.create_model(cls.__name__, __base__=Schema, __doc__=cls.__doc__, **fields)


def _bounded(hint: Any, choices: tuple) -> Any:
    """``hint`` with ``str`` (also inside lists, tuples and unions) replaced by one of ``choices``."""
    if hint is str:
        return Literal[choices]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return functools.reduce(operator.or_, (_bounded(a, choices) for a in args))
    if origin in (list, tuple):
        return origin[tuple(a if a is Ellipsis else _bounded(a, choices) for a in args)]
    return hint


def schema_error(err: pydantic.ValidationError, where: str, data: Any) -> BehaviorLensError:
    """One line for a schema's first complaint: where, the key path in ``data`` and what was expected."""
    first = err.errors()[0]
    path = _path(data, first["loc"], missing=first["type"] == "missing")
    same = [e for e in err.errors() if _path(data, e["loc"], e["type"] == "missing") == path]
    if first["type"] == "missing":
        what = "required, missing"
    elif first["type"] == "value_error":
        what = first["msg"].removeprefix("Value error, ")
    else:
        expected = dict.fromkeys(_expected(e) for e in same)
        what = f"expected {' or '.join(expected)}, got {first['input']!r}"
    key = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path).lstrip(".")
    return BehaviorLensError(f"{where}: {key + ': ' if key else ''}{what}")


def _path(data: Any, loc: tuple, missing: bool = False) -> list:
    """The keys of ``loc`` that are keys of ``data`` (pydantic also names the union member it tried)."""
    path, node = [], data
    for i, key in enumerate(loc):
        if (isinstance(node, Mapping) and key in node
                or isinstance(node, (list, tuple)) and isinstance(key, int) and key < len(node)):
            path.append(key)
            node = node[key]
        elif missing and i == len(loc) - 1:
            path.append(key)
    return path


def _expected(error: dict) -> str:
    """What one pydantic complaint expected, in a few words."""
    if error["type"] in ("model_type", "dict_type", "model_attributes_type"):
        return "a mapping"
    msg = error["msg"].removeprefix("Input should be ")
    return msg if error["type"] == "literal_error" else msg.split(",")[0].replace("tuple", "list")


# -- values ------------------------------------------------------------------------------------


def from_step(cls: type[P], mapping: Mapping[str, Any] | None, where: str = "") -> P:
    """The parameters of an experiment step, validated against :func:`step_schema` (a
    :class:`BehaviorLensError` naming ``where`` and the key otherwise)."""
    mapping = mapping or {}
    try:
        values = step_schema(cls).model_validate(mapping)
    except pydantic.ValidationError as err:
        raise schema_error(err, where or cls.__name__, mapping) from None
    return cls(**{name: getattr(values, name) for name in type(values).model_fields})


def from_args(cls: type[P], args: argparse.Namespace) -> P:
    """The parameters a command line gave (sequences as the annotation's tuple or list)."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name)
        if isinstance(value, list) and typing.get_origin(hints[f.name]) is tuple:
            value = tuple(value)
        values[f.name] = value
    return cls(**values)


def kwargs(params: Any, fn: Callable | None = None) -> dict[str, Any]:
    """A stage function's keyword arguments from ``params``: the fields whose names ``fn`` takes
    (a parameter class takes its fields; no ``fn``: every field). A :class:`Step` passes neither
    its own fields nor those it does not take (the function's defaults hold)."""
    names = [f.name for f in dataclasses.fields(params)]
    if isinstance(params, Step):
        command = {f.name for base in type(params).__mro__[1:]
                   if dataclasses.is_dataclass(base) and not issubclass(base, Step) for f in dataclasses.fields(base)}
        taken = {f.name for f in step_fields(type(params))}
        names = [n for n in names if n in command and n in taken]
    if fn is not None:
        names = [n for n in names if n in inspect.signature(fn).parameters]
    return {n: getattr(params, n) for n in names}
