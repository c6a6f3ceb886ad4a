"""``behaviorlens patch FAMILY``: which layers, positions and heads carry the behavior causally?"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import BehaviorLensError
from ..params import from_args, kwargs
from ..patching.params import PatchParams
from ..patching.run import run_ablation, run_patch
from ..prompts.sources import check_source, render_source
from . import options


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "patch",
        help="which layers, positions and heads carry the behavior causally? activation patching",
        description="Exact activation patching or attribution patching of FAMILY's contrast "
        "pairs at every layer x position (or layer x head); writes patching.csv, a heatmap and "
        "summary.json.",
    )
    p.add_argument("family", help="built-in family name, family YAML file or dataset file")
    options.add_model_options(p)
    options.add_source_options(p)
    options.add_params(p, PatchParams)
    p.add_argument("--out", default=None, help="output folder (default: patch-FAMILY-SITE)")
    p.set_defaults(func=_patch)


def _patch(args: argparse.Namespace) -> None:
    params = from_args(PatchParams, args)
    source = options.source_from_args(args, args.family)
    check_source(source)
    if params.n_pairs is not None and params.n_pairs < 1:
        raise BehaviorLensError(f"--pairs {params.n_pairs}: patching needs at least one pair")
    out = args.out or f"patch-{Path(args.family).stem}-{params.site}"
    options.prepare_out(out)
    model = options.model_from_args(args)
    cset = render_source(source, model.tokenizer)
    if params.method == "ablation":
        s = run_ablation(model, cset, out_dir=out, **kwargs(params, run_ablation))
        print(f"{cset.name}: {params.convention}-ablation of each {params.site} over {s['pairs']} pairs -> {out} "
              "(value = drop of the behavior metric as a share of the shift; positive = important)")
        for t in s["top_sites"][:5]:
            head = "" if t["head"] is None else f" head {t['head']}"
            print(f"  layer {t['layer']}{head}: {t['value']:+.3f} [{t['ci'][0]:+.3f}, {t['ci'][1]:+.3f}]")
        return
    s = run_patch(model, cset, out_dir=out, **kwargs(params, run_patch))
    print(f"{cset.name}: {params.method} {params.direction} patching of {params.site} over {s['pairs']} pairs"
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
