"""The ``behaviorlens`` command: one subcommand per user job.

Each package adds its own subcommands through an ``add_commands(subparsers)`` function in its
``commands.py``; this module owns the entry point and the error policy: a
:class:`BehaviorLensError` prints one line and exits with status 2 (``--debug`` shows the
traceback).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
from collections.abc import Sequence

from .errors import BehaviorLensError

_WRITE_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.ENOSPC, errno.EEXIST}

COMMAND_MODULES = (
    "behaviorlens.prompts.commands",
    "behaviorlens.probing.commands",
    "behaviorlens.patching.commands",
    "behaviorlens.steering.commands",
    "behaviorlens.circuits.commands",
    "behaviorlens.detect.commands",
    "behaviorlens.experiment_commands",
)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The model options every model-using subcommand takes."""
    parser.add_argument("--model", default="default", help="'default', a HF id, folder or .gguf")
    parser.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")
    parser.add_argument("--device", default=None, help="e.g. cuda")
    parser.add_argument("--device-map", default=None, help="'auto' to shard over GPUs")
    parser.add_argument("--remote", action="store_true",
                        help="NDIF remote execution: not supported by any stage (refused with one line)")


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
    from .prompts.sources import Source

    return Source(path, format=args.format, limit=args.limit, split=args.split,
                  test_fraction=args.test_fraction, seed=args.split_seed)


def prepare_out(path: str | None) -> None:
    """Fail now, with one line, when an output folder cannot be created."""
    from pathlib import Path

    if path is None:
        return
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BehaviorLensError(f"cannot write {path}: {err.strerror or err}") from None


def model_from_args(args: argparse.Namespace):
    from .model import REMOTE_REFUSED, load_model

    if args.remote:
        stage = " ".join(x for x in (args.command, getattr(args, "steer_command", None)) if x)
        raise BehaviorLensError(f"{stage}: {REMOTE_REFUSED}")
    return load_model(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map)


def _info(args: argparse.Namespace) -> None:
    model = model_from_args(args)
    for key, value in model.info().items():
        print(f"{key:>13}: {value}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="behaviorlens",
        description="Find and edit the latent variables behind a language model's behavior.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="architecture, sizes, sites and load time of a model")
    add_model_options(info)
    info.set_defaults(func=_info)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except BehaviorLensError as err:
        if args.debug:
            raise
        print(f"behaviorlens: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if args.debug or err.errno not in _WRITE_ERRORS:
            raise
        print(f"behaviorlens: error: cannot write {err.filename}: {err.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("behaviorlens: interrupted; finished batches are kept and a rerun resumes", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
