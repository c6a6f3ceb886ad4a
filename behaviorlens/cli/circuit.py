"""``behaviorlens circuit FAMILY... [--test FAMILY ...] --out DIR``: which heads and MLPs feed which?"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..circuits.params import CircuitParams
from ..circuits.run import run_circuit
from ..errors import BehaviorLensError
from ..params import from_args
from ..prompts.sources import Source, check_source, render_source
from . import options


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "circuit",
        help="which heads and MLPs feed which? edge attribution, faithfulness, composition; per style",
        description="Edge attribution (EAP or EAP-IG) over FAMILY's pairs, checked against exact edge "
                    "patching; the smallest top-edge circuit keeping --keep of the behavior on half the "
                    "pairs (or --size), scored on the other half and on --test families beside random "
                    "circuits and the complement; Q/K/V composition of its heads. Writes edges.csv, "
                    "circuit.json, plots and summary.json. With several families: one circuit per family, "
                    "the family x family transfer matrix, the shared core and the union, the heads specific "
                    "to each style (transfer.csv, core_graph.png, specific_heads.csv, summary.json).",
    )
    p.add_argument("family", nargs="+", help="built-in family names or family YAML files (token-aligned pairs)")
    options.add_model_options(p)
    options.add_source_options(p)
    options.add_params(p, CircuitParams, test={"default": []}, styles={"help": argparse.SUPPRESS})
    p.add_argument("--out", default=None, help="output folder (default: circuit-FAMILY)")
    p.set_defaults(func=_circuit)


def _circuit(args: argparse.Namespace) -> None:
    params = from_args(CircuitParams, args)
    names = list(args.family) + list(params.styles or [])
    sources = [options.source_from_args(args, n) for n in names]
    tests = [Source(t) for t in params.test or []]
    for s in [*sources, *tests]:
        check_source(s)
    if params.n_pairs < 4:
        raise BehaviorLensError(f"--pairs {params.n_pairs}: a circuit needs at least 4 pairs (half choose, half score)")
    if params.test_pairs < 1 or params.exact_edges < 1 or params.steps < 1 or params.acdc_candidates < 0:
        raise BehaviorLensError("--test-pairs, --exact-edges and --steps must be at least 1, --acdc at least 0")
    if params.size is not None and not 0 < params.size <= 1:
        raise BehaviorLensError(f"--size {params.size:g}: a circuit's size is a share of the edges in (0, 1]")
    if len(names) > 1 and params.acdc_candidates:
        raise BehaviorLensError("--acdc prunes one family's circuit; give one FAMILY with it")
    out = args.out or f"circuit-{'-'.join(Path(n).stem for n in names)}"
    options.prepare_out(out)
    model = options.model_from_args(args)
    sets = [render_source(s, model.tokenizer) for s in sources]
    test_sets = [render_source(t, model.tokenizer) for t in tests]

    s = run_circuit(model, sets[0], test_sets, out, styles=sets[1:], **params.kwargs())
    if len(sets) > 1:
        _print_styles(s, out)
    else:
        _print_one(s, sets[0].name, out)


def _print_one(s: dict, name: str, out: str) -> None:
    print(f"{name}: {s['method']} over {s['select_pairs']} pairs -> {out}")
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


def _print_styles(s: dict, out: str) -> None:
    import pandas as pd

    print(f"{len(s['families'])} circuits ({s['method']}), core {s['core_edges']} edges, union {s['union_edges']} of "
          f"{s['total_edges']} -> {out}")
    matrix = pd.read_csv(Path(out) / "transfer.csv")
    table = matrix.pivot_table(index="circuit", columns="family", values="faithfulness", sort=False)
    print("faithfulness on held-out pairs (rows: circuit, columns: family):")
    print(table.round(2).to_string())
    for sentence in s["sentences"]:
        print(f"- {sentence}")
