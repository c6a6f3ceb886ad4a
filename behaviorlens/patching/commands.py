"""``behaviorlens patch FAMILY``: the patching stage from the command line."""

from __future__ import annotations

import argparse

SITE_CHOICES = ("resid_pre", "resid_post", "attn", "mlp", "head")


def add_commands(sub: argparse._SubParsersAction) -> None:
    from ..cli import add_model_options

    p = sub.add_parser(
        "patch",
        help="which layers, positions and heads carry the behavior causally? activation patching",
        description="Exact activation patching or attribution patching of FAMILY's contrast "
        "pairs at every layer x position (or layer x head); writes patching.csv, a heatmap and "
        "summary.json.",
    )
    p.add_argument("family", help="built-in family name or family YAML file")
    add_model_options(p)
    p.add_argument("--site", default="resid_pre", choices=SITE_CHOICES)
    p.add_argument("--method", default="exact", choices=("exact", "attribution"))
    p.add_argument("--direction", default="denoise", choices=("denoise", "noise"))
    p.add_argument("--clean", default="positive", choices=("positive", "negative"),
                   help="which side of the pairs is clean (default: positive)")
    p.add_argument("--positions", nargs="+", default=None,
                   help="'all' or position names (default: all; 'last' for heads)")
    p.add_argument("--steps", type=int, default=4,
                   help="attribution: gradient averaged over N interpolation steps (1 = plain)")
    p.add_argument("--pairs", type=int, default=None, help="use the first N pairs")
    p.add_argument("--batch-size", type=int, default=64, help="patched copies per forward")
    p.add_argument("--out", default=None, help="output folder (default: patch-FAMILY-SITE)")
    p.set_defaults(func=_patch)


def _patch(args: argparse.Namespace) -> None:
    from ..cli import model_from_args
    from ..prompts import load_family
    from .run import run_patch

    family = load_family(args.family)
    model = model_from_args(args)
    cset = family.render(model.tokenizer)
    positions = args.positions
    if positions == ["all"]:
        positions = "all"
    out = args.out or f"patch-{cset.name}-{args.site}"
    s = run_patch(model, cset, site=args.site, method=args.method, direction=args.direction,
                  clean=args.clean, out_dir=out, n_pairs=args.pairs, positions=positions,
                  batch_size=args.batch_size, steps=args.steps)
    print(f"{cset.name}: {args.method} {args.direction} patching of {args.site} over {s['pairs']} pairs"
          f" -> {out}")
    print(f"restore_last_layer {s['restore_last_layer']:.4f}")
    if "attribution_exact_pearson" in s:
        print(f"attribution vs exact on the top {s['attribution_verified_cells']} cells: pearson "
              f"{s['attribution_exact_pearson']:.3f}, spearman {s['attribution_exact_spearman']:.3f}")
    for t in s["top_sites"][:5]:
        head = "" if t["head"] is None else f" head {t['head']}"
        print(f"  layer {t['layer']}{head} @ {t['position_name'] or t['from_end']} {t['token']!r}: "
              f"{t['metric']:+.3f}")
