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
    "behaviorlens.experiment_commands",
)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The model options every model-using subcommand takes."""
    parser.add_argument("--model", default="default", help="'default', a HF id, folder or .gguf")
    parser.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")
    parser.add_argument("--device", default=None, help="e.g. cuda")
    parser.add_argument("--device-map", default=None, help="'auto' to shard over GPUs")
    parser.add_argument("--remote", action="store_true", help="run on NDIF through nnsight")


def model_from_args(args: argparse.Namespace):
    from .model import load_model

    return load_model(
        args.model,
        device=args.device,
        dtype=args.dtype,
        device_map=args.device_map,
        remote=args.remote,
    )


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
