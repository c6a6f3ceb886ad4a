"""``behaviorlens circuit FAMILY [--test FAMILY ...] --out DIR``: the circuit stage."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import BehaviorLensError


def add_commands(sub: argparse._SubParsersAction) -> None:
    from ..cli import add_model_options, add_source_options
    from .faithfulness import CONVENTIONS
    from .run import METHODS

    p = sub.add_parser(
        "circuit",
        help="which heads and MLPs feed which? edge attribution, faithfulness, composition",
        description="Edge attribution (EAP or EAP-IG) over FAMILY's pairs, checked against exact edge "
                    "patching; the smallest top-edge circuit keeping --keep of the behavior on half the "
                    "pairs, scored on the other half and on --test families beside random circuits and "
                    "the complement; Q/K/V composition of its heads. Writes edges.csv, circuit.json, "
                    "plots and summary.json.",
    )
    p.add_argument("family", help="built-in family name or family YAML file (token-aligned pairs)")
    add_model_options(p)
    add_source_options(p)
    p.add_argument("--test", nargs="+", default=[], metavar="FAMILY", help="families to score the circuit on")
    p.add_argument("--pairs", type=int, default=16, help="use the first N pairs (half choose, half score)")
    p.add_argument("--test-pairs", type=int, default=16, help="pairs of each --test family")
    p.add_argument("--method", default="eap", choices=METHODS)
    p.add_argument("--steps", type=int, default=4, help="EAP-IG interpolation steps")
    p.add_argument("--ablation", default="counterfactual", choices=CONVENTIONS,
                   help="what an edge outside the circuit carries (default: the pair's negative side)")
    p.add_argument("--keep", type=float, default=0.8,
                   help="choose the smallest circuit keeping this share of the behavior (default 0.8)")
    p.add_argument("--exact-edges", type=int, default=40,
                   help="check attribution by exact patching of the N top and N random edges")
    p.add_argument("--acdc", type=int, default=0, metavar="N",
                   help="also prune the top N edges greedily (ACDC) and compare (one forward per edge)")
    p.add_argument("--acdc-threshold", type=float, default=0.01,
                   help="ACDC drops an edge costing less than this much faithfulness (default 0.01)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default: circuit-FAMILY)")
    p.set_defaults(func=_circuit)


def _circuit(args: argparse.Namespace) -> None:
    from ..cli import model_from_args, prepare_out, source_from_args
    from ..prompts.sources import Source, check_source, render_source
    from .run import run_circuit

    source = source_from_args(args, args.family)
    check_source(source)
    tests = [Source(t) for t in args.test]
    for t in tests:
        check_source(t)
    if args.pairs < 4:
        raise BehaviorLensError(f"--pairs {args.pairs}: a circuit needs at least 4 pairs (half choose, half score)")
    if args.test_pairs < 1 or args.exact_edges < 1 or args.steps < 1 or args.acdc < 0:
        raise BehaviorLensError("--test-pairs, --exact-edges and --steps must be at least 1, --acdc at least 0")
    out = args.out or f"circuit-{Path(args.family).stem}"
    prepare_out(out)
    model = model_from_args(args)
    cset = render_source(source, model.tokenizer)
    test_sets = [render_source(t, model.tokenizer) for t in tests]
    s = run_circuit(model, cset, test_sets, out, n_pairs=args.pairs, test_pairs=args.test_pairs,
                    method=args.method, steps=args.steps, convention=args.ablation, keep=args.keep,
                    exact_top=args.exact_edges, exact_random=args.exact_edges, seed=args.seed,
                    acdc_candidates=args.acdc, acdc_threshold=args.acdc_threshold)
    print(f"{cset.name}: {s['method']} over {s['select_pairs']} pairs -> {out}")
    print(f"circuit: {s['circuit_edges']} of {s['total_edges']} edges ({s['edges_fraction']:.2%}); "
          f"held-out faithfulness {s['faithfulness']:.2f} [{s['faithfulness_ci'][0]:.2f}, "
          f"{s['faithfulness_ci'][1]:.2f}], random {s['random_faithfulness']:.2f}, "
          f"complement {s['complement_faithfulness']:.2f}")
    print(f"attribution vs exact on {s['exact_edges_checked']} edges: pearson "
          f"{s['attribution_exact_pearson']:.3f}, spearman {s['attribution_exact_spearman']:.3f}")
    if "acdc_edges" in s:
        print(f"ACDC over the top {s['acdc_candidates']} edges: {s['acdc_edges']} edges in {s['acdc_seconds']:.0f} s, "
              f"held-out faithfulness {s['acdc_faithfulness']:.2f} (attribution circuit of that size "
              f"{s['acdc_same_size_attribution_faithfulness']:.2f})"
              + "".join(f"; on {f} {v:.2f}" for f, v in s.get("acdc_test_faithfulness", {}).items()))
    for fam, value in s["test_faithfulness"].items():
        print(f"  on {fam}: {value:.2f} (random {s['test_random_faithfulness'][fam]:.2f}, "
              f"complement {s['test_complement_faithfulness'][fam]:.2f})")
