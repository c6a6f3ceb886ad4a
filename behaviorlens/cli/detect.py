"""``behaviorlens detect train|eval|transfer``: lie detectors from the model's own behavior."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..detect.detector import Detector
from ..detect.params import DetectEvalParams, DetectTrainParams, DetectTransferParams
from ..detect.run import is_transcripts, run_detect_eval, run_detect_train, run_transfer
from ..errors import BehaviorLensError
from ..params import from_args, kwargs
from . import options


def _sets(model, args: argparse.Namespace, names: list[str]):
    return [options.render_from_args(model, args, n) for n in names]


def _check(args: argparse.Namespace, names: list[str], out: str) -> None:
    """Fail on a bad family or output folder before a model loads."""
    options.check_sources(args, names)
    options.prepare_out(out)


def _print(summary: dict, keys: tuple[str, ...]) -> None:
    print(json.dumps({k: summary[k] for k in keys if k in summary}, indent=2, default=str))


def _train(args: argparse.Namespace) -> None:
    params = from_args(DetectTrainParams, args)
    if not args.family and not args.instructed:
        raise BehaviorLensError("detect train needs at least one FAMILY (or --instructed FAMILY)")
    _check(args, args.family + args.instructed, str(Path(args.out).parent))
    model = options.model_from_args(args)
    summary = run_detect_train(model, _sets(model, args, args.family), args.out,
                               instructed=_sets(model, args, args.instructed), **kwargs(params, run_detect_train))
    _print(summary, ("detector", "label_counts", "n_lie", "n_honest", "n_mistake", "auroc", "auroc_ci",
                     "shuffled_auroc", "wording_auroc", "wording_explains", "claim_auroc", "mistake_auroc",
                     "override_lens", "lens_choice", "readout", "readout_auroc", "readout_auroc_ci",
                     "readout_oof_lie_vs_honest_auroc", "readout_oof_lie_vs_mistake_auroc",
                     "readout_oof_mistake_vs_honest_auroc", "chat_threshold"))
    print(f"wrote the detector to {args.out} and its tables to {Path(args.out).with_suffix('.train')}")


def _eval(args: argparse.Namespace) -> None:
    params = from_args(DetectEvalParams, args)
    transcripts = len(args.family) == 1 and is_transcripts(args.family[0])
    if not transcripts:
        _check(args, args.family, args.out)
    else:
        options.prepare_out(args.out)
    detector = Detector.load(args.detector)
    model = options.model_from_args(args)
    sets = args.family[0] if transcripts else _sets(model, args, args.family)
    summary = run_detect_eval(model, detector, sets, args.out, **kwargs(params, run_detect_eval))
    _print(summary, ("detector", "families", "n_lie", "n_honest", "n_mistake", "n_unsure", "auroc", "auroc_ci",
                     "lie_vs_mistake_auroc", "lie_vs_mistake_auroc_ci", "falsity_lie_vs_mistake_auroc",
                     "lie_vs_mistake_gap", "mistake_auroc", "mistake_auroc_ci", "mistake_check", "recall_at_1pct_fpr", "chat_fpr", "claim_auroc",
                     "wording_auroc", "shuffled_auroc", "falsity_auroc", "falsity_mistake_auroc",
                     "reask_lie_vs_mistake_auroc", "targets_met", "n_examples", "n_flagged"))
    print(f"wrote scores, tables and summary.json to {args.out}")


def _transfer(args: argparse.Namespace) -> None:
    params = from_args(DetectTransferParams, args)
    _check(args, args.family, args.out)
    model = options.model_from_args(args)
    summary = run_transfer(model, _sets(model, args, args.family), args.out, **kwargs(params, run_transfer))
    _print(summary, ("transfer_auroc", "mean_transfer_auroc", "trainable"))


def _common(p: argparse.ArgumentParser, cls: type) -> None:
    options.add_params(p, cls)
    options.add_model_options(p)
    options.add_source_options(p)


def add_commands(sub: argparse._SubParsersAction) -> None:
    detect = sub.add_parser("detect", help="lie detectors from the model's own behavior-labelled answers")
    cmds = detect.add_subparsers(dest="detect_command", required=True)

    p = cmds.add_parser("train", help="fit a lie-vs-honest probe with its controls")
    p.add_argument("family", nargs="*", default=[], help="families labelled by the model's behavior")
    p.add_argument("--instructed", nargs="+", default=[], metavar="FAMILY",
                   help="Apollo-style instructed pairs: the lie side and the honest side, labelled by instruction")
    p.add_argument("--out", required=True, help="the detector file (.safetensors)")
    _common(p, DetectTrainParams)
    p.set_defaults(func=_train)

    p = cmds.add_parser("eval", help="score families or a transcripts file with a detector")
    p.add_argument("detector")
    p.add_argument("family", nargs="+", help="families, or one transcripts .jsonl ({messages, answer[, label]})")
    p.add_argument("--out", required=True)
    _common(p, DetectEvalParams)
    p.set_defaults(func=_eval)

    p = cmds.add_parser("transfer", help="train on each family, test on every other: the matrix and its heatmap")
    p.add_argument("family", nargs="+")
    p.add_argument("--out", required=True)
    _common(p, DetectTransferParams)
    p.set_defaults(func=_transfer)
