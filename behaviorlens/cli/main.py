"""The entry point and the error policy: a :class:`BehaviorLensError` prints one line and exits
with status 2 (``--debug`` shows the traceback); a write error names the path; an interrupt
exits with 130."""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Sequence

from ..errors import BehaviorLensError
from . import circuit, detect, experiment, measure, options, patch, probe, prompts, steer

_WRITE_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.ENOSPC, errno.EEXIST}
COMMANDS = (prompts, measure, probe, patch, steer, circuit, detect, experiment)


def _info(args: argparse.Namespace) -> None:
    model = options.model_from_args(args)
    for key, value in model.info().items():
        print(f"{key:>13}: {value}")


class _Parser(argparse.ArgumentParser):
    """Argument mistakes follow the error policy too: one line, status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"behaviorlens: error: {self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="behaviorlens",
        description="Find and edit the latent variables behind a language model's behavior.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="architecture, sizes, sites and load time of a model")
    options.add_model_options(info)
    info.set_defaults(func=_info)
    for module in COMMANDS:
        module.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, or a mistake already said in one line
        return int(stop.code or 0)
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
