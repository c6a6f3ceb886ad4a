"""``behaviorlens patch FAMILY``: the patching stage from the command line."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import BehaviorLensError

SITE_CHOICES = ("resid_pre", "resid_post", "attn", "mlp", "head")


def add_commands(sub: argparse._SubParsersAction) -> None:
    from ..cli import add_model_options, add_source_options
    from .ablation import CONVENTIONS
    from .run import METHODS

    p = sub.add_parser(
        "patch",
        help="which layers, positions and heads carry the behavior causally? activation patching",
        description="Exact activation patching or attribution patching of FAMILY's contrast "
        "pairs at every layer x position (or layer x head); writes patching.csv, a heatmap and "
        "summary.json.",
    )
    p.add_argument("family", help="built-in family name, family YAML file or dataset file")
    add_model_options(p)
    add_source_options(p)
    p.add_argument("--site", default="resid_pre", choices=SITE_CHOICES)
    p.add_argument("--method", default="exact", choices=(*METHODS, "ablation"),
                   help="ablation: knock out each head (--site head) or layer component (attn, mlp) in turn")
    p.add_argument("--ablation", default="mean", choices=CONVENTIONS,
                   help="with --method ablation: what replaces the component (default: mean over the "
                        "negative side; resample: a random other pair's)")
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
    from ..cli import model_from_args, prepare_out, source_from_args
    from ..prompts.sources import check_source, render_source
    from .run import run_patch

    source = source_from_args(args, args.family)
    check_source(source)
    if args.pairs is not None and args.pairs < 1:
        raise BehaviorLensError(f"--pairs {args.pairs}: patching needs at least one pair")
    out = args.out or f"patch-{Path(args.family).stem}-{args.site}"
    prepare_out(out)
    model = model_from_args(args)
    cset = render_source(source, model.tokenizer)
    if args.method == "ablation":
        from .run import run_ablation

        s = run_ablation(model, cset, args.site, args.ablation, out, n_pairs=args.pairs)
        print(f"{cset.name}: {args.ablation}-ablation of each {args.site} over {s['pairs']} pairs -> {out} "
              "(value = drop of the behavior metric as a share of the shift; positive = important)")
        for t in s["top_sites"][:5]:
            head = "" if t["head"] is None else f" head {t['head']}"
            print(f"  layer {t['layer']}{head}: {t['value']:+.3f} [{t['ci'][0]:+.3f}, {t['ci'][1]:+.3f}]")
        return
    positions = args.positions
    if positions == ["all"]:
        positions = "all"
    s = run_patch(model, cset, site=args.site, method=args.method, direction=args.direction,
                  clean=args.clean, out_dir=out, n_pairs=args.pairs, positions=positions,
                  batch_size=args.batch_size, steps=args.steps)
    print(f"{cset.name}: {args.method} {args.direction} patching of {args.site} over {s['pairs']} pairs"
          f" -> {out}")
    print(f"restore_last_layer {s['restore_last_layer']:.4f}")
    if "attribution_exact_pearson" in s:
        print(f"attribution vs exact on the top {s['attribution_verified_cells']} cells: pearson "
              f"{s['attribution_exact_pearson']:.3f}, spearman {s['attribution_exact_spearman']:.3f}")
    print(f"top-5 stability over resampled pairs: {s['top_k_stability']:.2f}")
    for label, cells in (("carry the behavior", s["top_sites"][:5]), ("oppose it", s["opposing_sites"][:3])):
        print(f"cells that {label}:")
        for t in cells:
            head = "" if t["head"] is None else f" head {t['head']}"
            print(f"  layer {t['layer']}{head} @ {t['position_name'] or t['from_end']} {t['token']!r}: "
                  f"{t['metric']:+.3f} [{t['ci'][0]:+.3f}, {t['ci'][1]:+.3f}]")
