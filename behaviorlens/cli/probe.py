"""``behaviorlens probe FAMILY``: where is the behavior linearly readable?"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..params import from_args, kwargs
from ..probing.params import ProbeParams
from ..probing.run import run_probe
from ..prompts.sources import check_source, render_source, source_from
from . import options


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "probe",
        help="where is the behavior linearly readable? probe sweeps, controls, transfer",
        description="Collect activations of FAMILY, sweep probes over sites, layers and "
        "positions with controls, and test the best probe on the --test families.",
    )
    p.add_argument("family", help="built-in family name, family YAML file or dataset file")
    options.add_model_options(p)
    options.add_source_options(p)
    p.add_argument("--test", nargs="*", default=[], metavar="FAMILY",
                   help="families or dataset files to test transfer on (whole; --split and --limit apply to FAMILY)")
    options.add_params(p, ProbeParams)
    p.add_argument("--out", default=None, help="output folder (default: probe-FAMILY)")
    p.set_defaults(func=_probe)


def _probe(args: argparse.Namespace) -> None:
    params = from_args(ProbeParams, args)
    source = options.source_from_args(args, args.family)
    for spec in (source, *args.test):
        check_source(source_from(spec))
    out = args.out or f"probe-{Path(args.family).stem}"
    options.prepare_out(out)
    model = options.model_from_args(args)
    train = render_source(source, model.tokenizer, require_aligned=False)
    tests = {s.name: s for s in (render_source(t, model.tokenizer, require_aligned=False) for t in args.test)}
    summary = run_probe(model, train, tests, out_dir=out, **kwargs(params, run_probe))
    lo, hi = summary["best_auroc_ci"]
    print(
        f"{train.name}: best {summary['best_method']} probe at {summary['best_site']} layer "
        f"{summary['best_layer']} @ {summary['best_position']}: nested AUROC {summary['best_auroc']:.3f} "
        f"[{lo:.3f}, {hi:.3f}] (best of the grid in sample {summary['best_in_sample_auroc']:.3f}; control "
        f"{summary['control_auroc']:.3f}, random direction {summary['random_auroc']:.3f})"
    )
    if summary["wording_explains"]:
        print(f"wording explains it: the same probe on the prompt's words alone reaches AUROC "
              f"{summary['wording_baseline_auroc']:.3f}, within the probe's CI")
    for name, value in summary["transfer_auroc"].items():
        print(f"  transfer to {name}: AUROC {value:.3f}")
    print(f"wrote {Path(out) / 'summary.json'}")
