"""``behaviorlens circuit FAMILY [--test FAMILY ...] --out DIR``: which heads and MLPs feed which?"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..circuits.params import CircuitParams
from ..errors import BehaviorLensError
from ..params import from_args
from . import options


def add_commands(sub: argparse._SubParsersAction) -> None:
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
    options.add_model_options(p)
    options.add_source_options(p)
    options.add_params(p, CircuitParams, test={"default": []})
    p.add_argument("--out", default=None, help="output folder (default: circuit-FAMILY)")
    p.set_defaults(func=_circuit)


def _circuit(args: argparse.Namespace) -> None:
    from ..circuits.run import run_circuit
    from ..prompts.sources import Source, check_source, render_source

    params = from_args(CircuitParams, args)
    source = options.source_from_args(args, args.family)
    check_source(source)
    tests = [Source(t) for t in params.test or []]
    for t in tests:
        check_source(t)
    if params.n_pairs < 4:
        raise BehaviorLensError(f"--pairs {params.n_pairs}: a circuit needs at least 4 pairs (half choose, half score)")
    if params.test_pairs < 1 or params.exact_edges < 1 or params.steps < 1 or params.acdc_candidates < 0:
        raise BehaviorLensError("--test-pairs, --exact-edges and --steps must be at least 1, --acdc at least 0")
    out = args.out or f"circuit-{Path(args.family).stem}"
    options.prepare_out(out)
    model = options.model_from_args(args)
    cset = render_source(source, model.tokenizer)
    test_sets = [render_source(t, model.tokenizer) for t in tests]
    s = run_circuit(model, cset, test_sets, out, **params.kwargs())
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
