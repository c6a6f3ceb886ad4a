"""``behaviorlens families`` and ``behaviorlens render``: prompt families and datasets."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

from ..measure import UNBALANCED, measure
from ..prompts.contrast import ContrastPair, ContrastSet
from ..prompts.family import load_family
from ..prompts.library import builtin_names
from ..prompts.sources import check_source, dataset_format, open_ended_prompts, render_source
from . import options

_ON, _OFF = "\033[1;33m", "\033[0m"


def add_commands(sub: argparse._SubParsersAction) -> None:
    fam = sub.add_parser("families", help="list the built-in prompt families")
    fam.add_argument("--measure", action="store_true",
                     help="also measure each family on --model and print a markdown table")
    options.add_model_options(fam)
    fam.set_defaults(func=_families)

    render = sub.add_parser("render", help="render a family or dataset into contrast pairs")
    render.add_argument("family", help="a built-in family name, a family YAML file or a dataset file")
    render.add_argument("--out", default=None, help="write the pairs to this JSONL file")
    render.add_argument("--show", type=int, default=0, metavar="N",
                        help="print N pairs with the differing tokens highlighted")
    render.add_argument("--unaligned", action="store_true",
                        help="keep pairs whose sides are not token-aligned (not for patching)")
    render.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                        help="highlight with ANSI colors (default: when printing to a terminal)")
    options.add_source_options(render)
    options.add_model_options(render)
    render.set_defaults(func=_render)


def family_table() -> list[dict]:
    """Name, behavior, rows, neutral side, answer balance and description of every built-in family."""
    from collections import Counter

    rows = []
    for name in builtin_names():
        family = load_family(name)
        counts = Counter(a.strip() for a in family.matching_answers())
        top, n = counts.most_common(1)[0]
        rows.append({"name": name, "behavior": family.behavior, "rows": len(family.all_rows()),
                     "neutral": family.has_neutral, "top_answer": top, "top_answer_share": n / sum(counts.values()),
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
    print(f"{'name':<{width}}  {'behavior':<11} {'rows':>4}  neutral  top answer  description")
    for r in rows:
        top = f"{r['top_answer_share']:.0%} {r['top_answer']}"
        print(f"{r['name']:<{width}}  {r['behavior']:<11} {r['rows']:>4}  {'yes' if r['neutral'] else 'no ':<7}  "
              f"{top[:10]:<10}  {r['description']}")
        if r["top_answer_share"] > UNBALANCED:
            print(f"behaviorlens: {r['name']}: unbalanced: the matching answer is {r['top_answer']!r} in "
                  f"{r['top_answer_share']:.0%} of rows", file=sys.stderr)


def measured_table(rows: list[dict], args: argparse.Namespace) -> Iterator[str]:
    """Lines of a markdown table of the given families measured on ``args.model`` (every side,
    accuracies, balance), yielded as each family is measured."""
    model = options.model_from_args(args)
    yield ("| family | behavior | rows | behavior_shift [95% CI] | pull [95% CI] | accuracy positive / "
           "negative / neutral | most common matching answer |")
    yield "|---|---|---|---|---|---|---|"
    for r in rows:
        s = measure(model, render_family(r["name"], model), progress=True).summary
        lo, hi = s["behavior_shift_ci"]
        pull = (f"{s['pull']:+.2f} [{s['pull_ci'][0]:+.2f}, {s['pull_ci'][1]:+.2f}]" if "pull" in s else "(no neutral side)")
        acc = " / ".join(f"{s[f'accuracy_{k}']:.2f}" if f"accuracy_{k}" in s else "-" for k in ("positive", "negative", "neutral"))
        top, share = next(iter(s["answer_balance"].items()))
        yield (f"| `{r['name']}` | {r['behavior']} | {r['rows']} | {s['behavior_shift']:+.2f} "
               f"[{lo:+.2f}, {hi:+.2f}] | {pull} | {acc} | {top!r} {share:.0%} |")


def _render(args: argparse.Namespace) -> None:
    source = options.source_from_args(args, args.family)
    if source.is_dataset and Path(source.path).is_file() and (source.format or dataset_format(source.path)) == "open-ended":
        prompts = open_ended_prompts(source.path)
        print(f"{source.path}: {len(prompts)} open-ended prompts (questions with no answers, so no contrast "
              "pairs; use them with steer generate --prompts-file)")
        return
    check_source(source)  # fail fast on a bad family before loading a model
    model = options.model_from_args(args)
    cset = render_source(source, model.tokenizer, require_aligned=not args.unaligned)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    for pair in cset.pairs[: max(args.show, 0)]:
        print(show_pair(pair, model.tokenizer, color=color))
    if args.out:
        cset.to_jsonl(args.out)
    notes = []
    if cset.multi_token_answers:
        notes.append("answers of several tokens are scored whole")
    notes.append("with a neutral side" if cset.has_neutral else "no neutral side")
    aligned = "aligned" if cset.aligned else "NOT all aligned"
    print(f"{cset.name}: {len(cset)} pairs, {aligned}; {'; '.join(notes)}"
          + (f"; wrote {args.out}" if args.out else ""))
