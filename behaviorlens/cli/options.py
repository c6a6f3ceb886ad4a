"""Options shared by the commands: the model, a family or dataset source, the output folder,
and every stage's parameters derived from its parameter class (:func:`add_params`)."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

from ..errors import BehaviorLensError
from ..model import load_model
from ..params import default_of, user_name
from ..prompts.sources import Source, check_source, render_source
from ..remote import SessionLimits

REMOTE_CHOICES = ("local",)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The model options every model-using subcommand takes."""
    parser.add_argument("--model", default="default", help="'default', a HF id, folder or .gguf")
    parser.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")
    parser.add_argument("--device", default=None, help="e.g. cuda")
    parser.add_argument("--device-map", default=None, help="'auto' to shard over GPUs")
    parser.add_argument("--max-memory", default=None, metavar="SIZE",
                        help="e.g. 40GiB: the working memory a batch may take, where a stage sizes its batches "
                             "by memory (default: a GPU's free memory)")
    add_remote_option(parser)


def add_remote_option(parser: argparse.ArgumentParser) -> None:
    """``--remote`` (NDIF) and ``--remote local`` (nnsight's simulation of it)."""
    parser.add_argument("--remote", nargs="?", const="ndif", default=None, choices=("ndif", *REMOTE_CHOICES),
                        metavar="local",
                        help="run through nnsight: '--remote' alone on NDIF, '--remote local' in nnsight's "
                             "local simulation of it")
    parser.add_argument("--session-traces", type=int, default=None, metavar="N",
                        help=f"with --remote: the most traces one request (a session) holds "
                             f"(default {SessionLimits.traces})")
    parser.add_argument("--session-mb", type=float, default=None, metavar="MB",
                        help=f"with --remote: the most input megabytes one request holds "
                             f"(default {SessionLimits.request_mb:g})")
    parser.add_argument("--session-result-mb", type=float, default=None, metavar="MB",
                        help=f"with --remote: the most megabytes one request returns "
                             f"(default {SessionLimits.result_mb:g})")


def session_limits(args: argparse.Namespace) -> SessionLimits | None:
    """The session limits the options give, or None where none is given."""
    if args.session_traces is None and args.session_mb is None and args.session_result_mb is None:
        return None
    return SessionLimits(args.session_traces or SessionLimits.traces, args.session_mb or SessionLimits.request_mb,
                         args.session_result_mb or SessionLimits.result_mb)


def add_source_options(parser: argparse.ArgumentParser) -> None:
    """Options of every command that takes a family (a built-in name, a YAML file or a dataset)."""
    parser.add_argument("--format", default=None, choices=("caa", "mwe", "sycophancy-eval"),
                        help="dataset format (default: recognised from the file's content)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="use the first N rows")
    parser.add_argument("--split", default=None, choices=("train", "test"),
                        help="use a deterministic part of the pairs (recorded in the results)")
    parser.add_argument("--test-fraction", type=float, default=0.5, help="the test part's share (default 0.5)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the split (default 0)")


def source_from_args(args: argparse.Namespace, path: str):
    """The :class:`~behaviorlens.prompts.sources.Source` a command's family argument names."""
    return Source(path, format=args.format, limit=args.limit, split=args.split,
                  test_fraction=args.test_fraction, seed=args.split_seed)


def check_sources(args: argparse.Namespace, names: list[str]) -> None:
    """Fail on a bad family or dataset, with one line, before a model loads."""
    for name in names:
        check_source(source_from_args(args, name))


def render_from_args(model: Any, args: argparse.Namespace, name: str, aligned: bool = False):
    """A family or dataset named on the command line, rendered with the model's tokenizer."""
    return render_source(source_from_args(args, name), model.tokenizer, require_aligned=aligned)


def prepare_out(path: str | Path | None) -> None:
    """Fail now, with one line, when an output folder cannot be created."""
    if path is None:
        return
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BehaviorLensError(f"cannot write {path}: {err.strerror or err}") from None


def model_from_args(args: argparse.Namespace):
    """The model the command's model options name (``--remote``: through nnsight)."""
    return load_model(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map,
                      remote=args.remote, session_limits=session_limits(args), max_memory=args.max_memory)


# -- stage parameters as options -------------------------------------------------------------


def add_params(parser: argparse.ArgumentParser, cls: type, **overrides: dict[str, Any]) -> None:
    """One option per field of the parameter class ``cls`` (see :mod:`behaviorlens.params`):
    ``--name`` by its user name, ``--no-name`` for a flag that is on by default. ``overrides`` maps
    a field name to argparse keywords that replace the derived ones for this command only."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        options = _argparse_options(f, hints[f.name]) | overrides.get(f.name, {})
        name = user_name(f)
        if "action" not in options and "choices" not in options:
            options.setdefault("metavar", name.upper())
        flag = name.replace("_", "-")
        parser.add_argument(f"--no-{flag}" if options.get("action") == "store_false" else f"--{flag}",
                            dest=f.name, **options)


def _argparse_options(f: dataclasses.Field, hint: Any) -> dict[str, Any]:
    meta = f.metadata
    default = default_of(f)
    options: dict[str, Any] = {"help": meta.get("help") or None}
    for key in ("choices", "metavar"):
        if key in meta:
            options[key] = meta[key]
    base, many = _base_type(hint)
    if base is bool and not many:
        return options | {"action": "store_false" if default else "store_true", "default": default}
    options["type"] = meta.get("type", base if base in (int, float) else str)
    nargs = meta.get("nargs", "+" if many else None)
    if nargs is not None:
        options["nargs"] = nargs
    if isinstance(default, tuple) and nargs is not None:
        default = list(default)
    if "choices" in options and nargs is None and options["type"] is str:
        options.pop("type")
    options["default"] = default
    return options


def _base_type(hint: Any) -> tuple[type, bool]:
    """(element type, whether it is a sequence) of an annotation, None removed."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else (str, False)
    if origin in (list, tuple):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return (_base_type(args[0])[0] if args else str), True
    return (hint if isinstance(hint, type) else str), False
