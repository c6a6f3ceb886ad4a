"""``behaviorlens probe FAMILY``: the probing stage from the command line."""

from __future__ import annotations

import argparse

from .sweep import METHODS


def add_commands(sub: argparse._SubParsersAction) -> None:
    from ..cli import add_model_options

    p = sub.add_parser(
        "probe",
        help="where is the behavior linearly readable? probe sweeps, controls, transfer",
        description="Collect activations of FAMILY, sweep probes over sites, layers and "
        "positions with controls, and test the best probe on the --test families.",
    )
    p.add_argument("family", help="built-in family name or family YAML file")
    add_model_options(p)
    p.add_argument("--test", nargs="*", default=[], metavar="FAMILY", help="families to test transfer on")
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

    from ..cli import model_from_args
    from ..prompts import load_family
    from .run import run_probe
    from .sweep import make_probe

    for m in args.methods:
        make_probe(m)  # fail on a bad name before loading anything
    model = model_from_args(args)

    def render(name: str):
        return load_family(name).render(model.tokenizer, require_aligned=False)

    train = render(args.family)
    tests = {s.name: s for s in map(render, args.test)}
    out = args.out or f"probe-{train.name}"
    summary = run_probe(
        model, train, tests, sites=tuple(args.sites), positions=tuple(args.positions),
        methods=tuple(args.methods), out_dir=out, batch_size=args.batch_size, folds=args.folds,
        seed=args.seed,
    )
    print(
        f"{train.name}: best {summary['best_method']} probe at {summary['best_site']} layer "
        f"{summary['best_layer']} @ {summary['best_position']}: AUROC {summary['best_auroc']:.3f} "
        f"(control {summary['control_auroc']:.3f}, random direction {summary['random_auroc']:.3f})"
    )
    for name, value in summary["transfer_auroc"].items():
        print(f"  transfer to {name}: AUROC {value:.3f}")
    print(f"wrote {Path(out) / 'summary.json'}")
