"""``behaviorlens run`` and ``behaviorlens demo``: an experiment end to end."""

from __future__ import annotations

import argparse
import time

from ..experiment import run_experiment
from .options import add_remote_option, session_limits


def _run(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    out = run_experiment(args.experiment, out=args.out, force=args.force, remote=args.remote,
                         session_limits=session_limits(args))
    print(f"done in {time.perf_counter() - start:.0f} s; open {out / 'report.html'}")


def add_commands(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="run an experiment YAML (or a built-in experiment) end to end")
    run.add_argument("experiment", help="path to an experiment YAML, or a built-in one: sycophancy, deception, caa_sycophancy, "
                     "llama2_7b, caa_sycophancy_llama2_7b")
    run.add_argument("--out", default=None, help="results folder (default: results/NAME)")
    run.add_argument("--force", action="store_true", help="rerun finished steps / overwrite")
    add_remote_option(run)
    run.set_defaults(func=_run)
    demo = sub.add_parser("demo", help="the built-in sycophancy study on the embedded default model")
    demo.add_argument("--out", default="results/sycophancy")
    demo.add_argument("--force", action="store_true")
    add_remote_option(demo)
    demo.set_defaults(func=_run, experiment="sycophancy")
