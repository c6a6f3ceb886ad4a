"""Every command line the README shows is one the command line accepts: no documented option or
subcommand that does not exist. (Each subcommand also runs end to end in its own CLI test.)"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from behaviorlens.cli import build_parser
from behaviorlens.experiment import builtin_experiments
from behaviorlens.prompts.library import builtin_names

README = Path(__file__).resolve().parents[1] / "README.md"


def documented_commands() -> list[str]:
    """The ``behaviorlens ...`` lines inside the README's fenced code blocks, comments removed."""
    out, fenced = [], False
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif fenced and line.startswith("behaviorlens "):
            out.append(line.split(" #")[0].strip())
    return out


def test_the_readme_shows_commands():
    assert len(documented_commands()) >= 10


@pytest.mark.parametrize("line", documented_commands())
def test_documented_command_parses(line):
    args = build_parser().parse_args(shlex.split(line)[1:])
    assert callable(args.func)
    names = {"family": set(builtin_names()), "experiment": set(builtin_experiments())}
    for key, known in names.items():
        value = getattr(args, key, None)
        if isinstance(value, str) and value.isidentifier() and not value.isupper():  # FAMILY: a placeholder
            assert value in known, f"{line}: no built-in {key} {value!r}"
