"""Subcommands for prompt families: ``families``, ``render`` and ``measure``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .contrast import ContrastPair, ContrastSet
from .family import load_family
from .library import builtin_names

_ON, _OFF = "\033[1;33m", "\033[0m"


def add_commands(sub: argparse._SubParsersAction) -> None:
    from ..cli import add_model_options

    fam = sub.add_parser("families", help="list the built-in prompt families")
    fam.add_argument("--measure", action="store_true",
                     help="also measure each family on --model and print a markdown table")
    add_model_options(fam)
    fam.set_defaults(func=_families)

    render = sub.add_parser("render", help="render a family into token-aligned contrast pairs")
    render.add_argument("family", help="a built-in family name or a family YAML file")
    render.add_argument("--out", default=None, help="write the pairs to this JSONL file")
    render.add_argument("--show", type=int, default=0, metavar="N",
                        help="print N pairs with the differing tokens highlighted")
    render.add_argument("--unaligned", action="store_true",
                        help="keep pairs whose sides are not token-aligned (not for patching)")
    render.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                        help="highlight with ANSI colors (default: when printing to a terminal)")
    add_model_options(render)
    render.set_defaults(func=_render)

    meas = sub.add_parser("measure", help="measure a family's behavior shift on a model")
    meas.add_argument("family", help="a built-in family name or a family YAML file")
    meas.add_argument("--out", default=None, help="results folder (default: results/measure-FAMILY)")
    meas.add_argument("--batch-size", type=int, default=16)
    add_model_options(meas)
    meas.set_defaults(func=_measure)


def family_table() -> list[dict]:
    """Name, behavior, rows and description of every built-in family."""
    rows = []
    for name in builtin_names():
        family = load_family(name)
        rows.append({"name": name, "behavior": family.behavior, "rows": len(family.all_rows()),
                     "description": " ".join(family.description.split())})
    return rows


def render_family(family: str, model_or_tokenizer, require_aligned: bool = True) -> ContrastSet:
    """Render a built-in name or YAML path with a model's (or a bare) tokenizer."""
    tokenizer = getattr(model_or_tokenizer, "tokenizer", model_or_tokenizer)
    return load_family(family).render(tokenizer, require_aligned=require_aligned)


def show_pair(pair: ContrastPair, tokenizer, color: bool = False) -> str:
    """Both sides of a pair, token by token, with tokens that differ between sides highlighted
    (ANSI bold yellow, or ``[brackets]`` without color), then the two answers."""
    a, b = pair.tokens["positive"], pair.tokens["negative"]
    lines = [f"--- {pair.family} row {pair.row} ({'aligned' if pair.aligned else 'NOT aligned'})"]
    for side, mine, other in (("positive", a, b), ("negative", b, a)):
        parts = []
        for i, t in enumerate(mine):
            piece = tokenizer.decode([t])
            if i >= len(other) or other[i] != t:
                piece = f"{_ON}{piece}{_OFF}" if color else f"[{piece}]"
            parts.append(piece)
        lines.append(f"{side:>9}: {''.join(parts)!s}")
    answers = ", ".join(f"{k} {pair.answer_text[k]!r}" for k in ("matching", "not_matching"))
    lines.append(f"  answers: {answers}  (scored at token {pair.position('positive', 'answer')})")
    return "\n".join(lines)


def _families(args: argparse.Namespace) -> None:
    rows = family_table()
    if args.measure:
        for line in measured_table(rows, args):
            print(line, flush=True)
        return
    width = max(len(r["name"]) for r in rows)
    print(f"{'name':<{width}}  {'behavior':<11} {'rows':>4}  description")
    for r in rows:
        print(f"{r['name']:<{width}}  {r['behavior']:<11} {r['rows']:>4}  {r['description']}")


def measured_table(rows: list[dict], args: argparse.Namespace):
    """Lines of a markdown table of the given families with their measured shift on
    ``args.model``, yielded as each family is measured."""
    from ..cli import model_from_args
    from ..measure import measure

    model = model_from_args(args)
    header = ("| family | behavior | rows | behavior_shift [95% CI] | fraction_pairs_shifted "
              "| mean metric positive / negative |")
    yield header
    yield "|---|---|---|---|---|---|"
    for r in rows:
        s = measure(model, render_family(r["name"], model), progress=True).summary
        lo, hi = s["behavior_shift_ci"]
        yield (f"| `{r['name']}` | {r['behavior']} | {r['rows']} | {s['behavior_shift']:+.2f} "
               f"[{lo:+.2f}, {hi:+.2f}] | {s['fraction_pairs_shifted']:.2f} | "
               f"{s['mean_metric_positive']:+.2f} / {s['mean_metric_negative']:+.2f} |")


def _render(args: argparse.Namespace) -> None:
    from ..cli import model_from_args

    family = load_family(args.family)  # fail fast on a bad family before loading a model
    model = model_from_args(args)
    cset = family.render(model.tokenizer, require_aligned=not args.unaligned)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    for pair in cset.pairs[: max(args.show, 0)]:
        print(show_pair(pair, model.tokenizer, color=color))
    if args.out:
        cset.to_jsonl(args.out)
    note = "; answers with several tokens are scored by their first" if cset.multi_token_answers else ""
    aligned = "aligned" if cset.aligned else "NOT all aligned"
    print(f"{cset.name}: {len(cset)} pairs, {aligned}{note}"
          + (f"; wrote {args.out}" if args.out else ""))


def _measure(args: argparse.Namespace) -> None:
    from ..cli import model_from_args
    from ..measure import run_measure

    family = load_family(args.family)
    model = model_from_args(args)
    cset = family.render(model.tokenizer)
    out = Path(args.out or f"results/measure-{cset.name}")
    summary = run_measure(model, cset, out, batch_size=args.batch_size)
    print(json.dumps({k: summary[k] for k in (
        "pairs", "mean_metric_positive", "mean_metric_negative", "behavior_shift",
        "behavior_shift_ci", "fraction_pairs_shifted")}, indent=2))
    print(f"wrote {out / 'measure.csv'} and {out / 'summary.json'}")

