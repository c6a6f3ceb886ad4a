"""``behaviorlens probe FAMILY``: the probing stage from the command line."""

from __future__ import annotations

import argparse

from .sweep import METHODS


def add_commands(sub: argparse._SubParsersAction) -> None:
    from ..cli import add_model_options, add_source_options

    p = sub.add_parser(
        "probe",
        help="where is the behavior linearly readable? probe sweeps, controls, transfer",
        description="Collect activations of FAMILY, sweep probes over sites, layers and "
        "positions with controls, and test the best probe on the --test families.",
    )
    p.add_argument("family", help="built-in family name, family YAML file or dataset file")
    add_model_options(p)
    add_source_options(p)
    p.add_argument("--test", nargs="*", default=[], metavar="FAMILY",
                   help="families or dataset files to test transfer on (whole; --split and --limit apply to FAMILY)")
    p.add_argument("--sites", nargs="+", default=["resid_post"], help="resid_pre resid_post attn mlp head")
    p.add_argument("--positions", nargs="+", default=["last"], help="last, answer, SLOT or SLOT:mean")
    p.add_argument("--methods", nargs="+", default=list(METHODS), help=" ".join(METHODS))
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="pairs per forward")
    p.add_argument("--out", default=None, help="output folder (default: probe-FAMILY)")
    p.set_defaults(func=_probe)


def _probe(args: argparse.Namespace) -> None:
    from pathlib import Path

    from ..cli import model_from_args, prepare_out, source_from_args
    from ..prompts.sources import check_source, render_source, source_from
    from .run import run_probe
    from .sweep import make_probe

    for m in args.methods:
        make_probe(m)  # fail on a bad name before loading anything
    source = source_from_args(args, args.family)
    for spec in (source, *args.test):
        check_source(source_from(spec))
    out = args.out or f"probe-{Path(args.family).stem}"
    prepare_out(out)
    model = model_from_args(args)
    train = render_source(source, model.tokenizer, require_aligned=False)
    tests = {s.name: s for s in (render_source(t, model.tokenizer, require_aligned=False) for t in args.test)}
    summary = run_probe(
        model, train, tests, sites=tuple(args.sites), positions=tuple(args.positions),
        methods=tuple(args.methods), out_dir=out, batch_size=args.batch_size, folds=args.folds,
        seed=args.seed,
    )
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
