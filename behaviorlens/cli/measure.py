"""``behaviorlens measure FAMILY``: the behavior metric on every side of every pair."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..io import write_json
from ..measure import run_measure
from ..measure_params import MeasureParams
from ..params import from_args, kwargs
from ..prompts.sources import check_source, render_source
from . import options

SHOWN = ["pairs", "behavior_shift", "behavior_shift_ci", "fraction_pairs_shifted",
         "mean_metric_positive", "mean_metric_negative", "mean_metric_neutral", "pull", "pull_ci",
         "accuracy_positive", "accuracy_positive_ci", "accuracy_negative", "accuracy_negative_ci",
         "accuracy_neutral", "accuracy_neutral_ci", "unbalanced", "matching_rate", "matching_rate_ci",
         "letter_bias", "answer_balance_first_letter", "at_chance"]


def add_commands(sub: argparse._SubParsersAction) -> None:
    meas = sub.add_parser("measure", help="measure a family's or dataset's behavior on a model")
    meas.add_argument("family", help="a built-in family name, a family YAML file or a dataset file")
    meas.add_argument("--out", default=None, help="results folder (default: results/measure-FAMILY)")
    options.add_params(meas, MeasureParams)
    options.add_source_options(meas)
    options.add_model_options(meas)
    meas.set_defaults(func=_measure)


def _measure(args: argparse.Namespace) -> None:
    params = from_args(MeasureParams, args)
    source = options.source_from_args(args, args.family)
    check_source(source)
    out = Path(args.out or f"results/measure-{Path(source.path).stem}")
    options.prepare_out(out)
    model = options.model_from_args(args)
    cset = render_source(source, model.tokenizer, require_aligned=False)
    summary = run_measure(model, cset, out, **kwargs(params, run_measure)) | {"source": source.record()}
    write_json(out / "summary.json", summary)
    print(json.dumps({k: summary[k] for k in SHOWN if k in summary}, indent=2))
    print(f"wrote {out / 'measure.csv'} and {out / 'summary.json'}")
