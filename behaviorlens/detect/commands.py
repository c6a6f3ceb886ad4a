"""``behaviorlens detect train|eval|transfer``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import BehaviorLensError


def _sets(model, args: argparse.Namespace, names: list[str]):
    from ..cli import source_from_args
    from ..prompts.sources import render_source

    return [render_source(source_from_args(args, n), model.tokenizer, require_aligned=False) for n in names]


def _check(args: argparse.Namespace, names: list[str], out: str) -> None:
    """Fail on a bad family or output folder before a model loads."""
    from ..cli import prepare_out, source_from_args
    from ..prompts.sources import check_source

    for n in names:
        check_source(source_from_args(args, n))
    prepare_out(out)


def _print(summary: dict, keys: tuple[str, ...]) -> None:
    print(json.dumps({k: summary[k] for k in keys if k in summary}, indent=2, default=str))


def _train(args: argparse.Namespace) -> None:
    from ..cli import model_from_args
    from .run import run_detect_train

    if not args.family and not args.instructed:
        raise BehaviorLensError("detect train needs at least one FAMILY (or --instructed FAMILY)")
    _check(args, args.family + args.instructed, str(Path(args.out).parent))
    model = model_from_args(args)
    summary = run_detect_train(model, _sets(model, args, args.family), args.out,
                               instructed=_sets(model, args, args.instructed), margin=args.margin,
                               labels=args.labels, layers=args.layers, positions=args.positions,
                               methods=args.methods, folds=args.folds, seed=args.seed, chat=not args.no_chat,
                               batch_size=args.batch_size)
    _print(summary, ("detector", "label_counts", "n_lie", "n_honest", "n_mistake", "auroc", "auroc_ci",
                     "shuffled_auroc", "wording_auroc", "wording_explains", "claim_auroc", "mistake_auroc",
                     "chat_threshold"))
    print(f"wrote the detector to {args.out} and its tables to {Path(args.out).with_suffix('.train')}")


def _eval(args: argparse.Namespace) -> None:
    from ..cli import model_from_args
    from .detector import Detector
    from .run import is_transcripts, run_detect_eval

    transcripts = len(args.family) == 1 and is_transcripts(args.family[0])
    if not transcripts:
        _check(args, args.family, args.out)
    else:
        from ..cli import prepare_out

        prepare_out(args.out)
    detector = Detector.load(args.detector)
    model = model_from_args(args)
    sets = args.family[0] if transcripts else _sets(model, args, args.family)
    summary = run_detect_eval(model, detector, sets, args.out, margin=args.margin, labels=args.labels,
                              chat=not args.no_chat, seed=args.seed, batch_size=args.batch_size)
    _print(summary, ("detector", "families", "n_lie", "n_honest", "n_mistake", "n_unsure", "auroc", "auroc_ci",
                     "mistake_auroc", "mistake_check", "recall_at_1pct_fpr", "chat_fpr", "claim_auroc",
                     "wording_auroc", "shuffled_auroc", "targets_met", "n_examples", "n_flagged"))
    print(f"wrote scores, tables and summary.json to {args.out}")


def _transfer(args: argparse.Namespace) -> None:
    from ..cli import model_from_args
    from .run import run_transfer

    _check(args, args.family, args.out)
    model = model_from_args(args)
    summary = run_transfer(model, _sets(model, args, args.family), args.out, margin=args.margin,
                           labels=args.labels, layers=args.layers, methods=args.methods, folds=args.folds,
                           seed=args.seed, batch_size=args.batch_size)
    _print(summary, ("transfer_auroc", "mean_transfer_auroc", "trainable"))


def _common(p: argparse.ArgumentParser) -> None:
    from ..cli import add_model_options, add_source_options
    from .labels import MARGIN

    p.add_argument("--margin", type=float, default=MARGIN,
                   help=f"nats: a side is right (wrong) when its metric is below -margin (above margin); default {MARGIN}")
    p.add_argument("--labels", default="metric", choices=["metric", "text"],
                   help="label by the whole-answer metric, or by the model's greedy text matched to the answers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    add_model_options(p)
    add_source_options(p)


def add_commands(sub) -> None:
    from .examples import POSITIONS
    from .train import METHODS

    detect = sub.add_parser("detect", help="lie detectors from the model's own behavior-labelled answers")
    cmds = detect.add_subparsers(dest="detect_command", required=True)

    p = cmds.add_parser("train", help="fit a lie-vs-honest probe with its controls")
    p.add_argument("family", nargs="*", default=[], help="families labelled by the model's behavior")
    p.add_argument("--instructed", nargs="+", default=[], metavar="FAMILY",
                   help="Apollo-style instructed pairs: the lie side and the honest side, labelled by instruction")
    p.add_argument("--out", required=True, help="the detector file (.safetensors)")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="default: every other layer")
    p.add_argument("--positions", nargs="+", default=list(POSITIONS), choices=list(POSITIONS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=["mean_diff", "logistic", "pca"])
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--no-chat", action="store_true", help="skip the threshold on ordinary chat")
    _common(p)
    p.set_defaults(func=_train)

    p = cmds.add_parser("eval", help="score families or a transcripts file with a detector")
    p.add_argument("detector")
    p.add_argument("family", nargs="+", help="families, or one transcripts .jsonl ({messages, answer[, label]})")
    p.add_argument("--out", required=True)
    p.add_argument("--no-chat", action="store_true", help="skip the false-positive rate on ordinary chat")
    _common(p)
    p.set_defaults(func=_eval)

    p = cmds.add_parser("transfer", help="train on each family, test on every other: the matrix and its heatmap")
    p.add_argument("family", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--layers", type=int, nargs="+", default=None, help="default: every other layer")
    p.add_argument("--methods", nargs="+", default=["mean_diff"], choices=["mean_diff", "logistic", "pca"])
    p.add_argument("--folds", type=int, default=5)
    _common(p)
    p.set_defaults(func=_transfer)
