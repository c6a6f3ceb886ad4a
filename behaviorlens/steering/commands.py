"""``behaviorlens steer train|eval|edit|export|generate``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from ..errors import BehaviorLensError

CANDIDATE_COLUMNS = ["group", "edit", "pressure_removed_fraction", "accuracy_neutral_change",
                     "factual_accuracy_change", "context_use_accuracy_change", "claim_recall_accuracy_change",
                     "neutral_kl", "collapse", "null_control_pressure_removed_fraction",
                     "random_pressure_removed_fraction", "deletion_baseline_pressure_removed_fraction",
                     "redaction", "within_limits", "chosen"]


def _family(model, args: argparse.Namespace):
    from ..cli import source_from_args
    from ..prompts.sources import render_source

    return render_source(source_from_args(args, args.family), model.tokenizer, require_aligned=False)


def _check(args: argparse.Namespace, out: str | None) -> None:
    """Fail on a bad family or output folder before a model loads."""
    from ..cli import prepare_out, source_from_args
    from ..prompts.sources import check_source

    check_source(source_from_args(args, args.family))
    prepare_out(out)


def _train(args: argparse.Namespace) -> None:
    from ..cli import model_from_args
    from .run import run_steer_train

    if args.layer is None and args.from_patching is None:
        raise BehaviorLensError("steer train needs --layer L or --from-patching DIR [DIR ...]")
    _check(args, str(Path(args.out).parent))
    model = model_from_args(args)
    summary = run_steer_train(model, _family(model, args), args.out, layer=args.layer,
                              method=args.method, position=args.position, kind=args.kind,
                              from_patching=args.from_patching, kl_max=args.kl_max,
                              max_accuracy_drop=args.max_accuracy_drop, groups=args.candidates,
                              refits=args.refits, outside_limits=args.outside_limits)
    if summary["reason"]:
        folder = Path(args.out).with_suffix(".choice")
        table = pd.read_csv(folder / "candidates.csv")
        table = table[[c for c in CANDIDATE_COLUMNS if c in table]]
        table["edit"] = table["edit"].str.slice(0, 60)  # the whole description is in the CSV
        print(table.to_string(index=False, float_format="%.3f", justify="left"))
        print(summary["reason"])
        print(f"wrote the candidate table, the pairs' roles, the mechanism test and pareto.png to {folder}")
    print(f"wrote {summary['edit']} to {summary['path']}")


def _load_edit(model, path: str):
    from .edit import Edit

    return Edit.load(path, model)


def _eval(args: argparse.Namespace) -> None:
    from ..cli import model_from_args
    from .evaluate import NO_NEUTRAL
    from .run import run_steer_eval

    _check(args, args.out)
    model = model_from_args(args)
    edit = _load_edit(model, args.edit)
    family = _family(model, args)
    summary = run_steer_eval(model, edit, family, args.multipliers,
                             args.layers, args.out, batch_size=args.batch_size, controls=args.controls)
    print(json.dumps(summary, indent=2))
    if not family.has_neutral:
        print(f"behaviorlens: {family.name} {NO_NEUTRAL}", file=sys.stderr)


def _edit(args: argparse.Namespace) -> None:
    from ..cli import model_from_args
    from .bake import bake

    model = model_from_args(args)
    edit = _load_edit(model, args.edit)
    out = bake(model, edit, args.out, multiplier=args.multiplier)
    print(f"wrote the edited model ({edit.describe()}) to {out}")


def _export(args: argparse.Namespace) -> None:
    from .edit import Edit
    from .gguf_export import export_gguf

    edit = Edit.load(args.edit)
    out = export_gguf(edit, args.gguf, multiplier=args.multiplier, model_hint=args.model_hint)
    print(f"wrote a llama.cpp control vector ({len(edit.vectors)} layers) to {out}")


def _generate(args: argparse.Namespace) -> None:
    from ..cli import model_from_args
    from .run import generate_examples

    prompts = list(args.prompt or [])
    if args.prompts_file:
        from ..prompts.sources import open_ended_prompts

        prompts += open_ended_prompts(args.prompts_file)[: args.limit]
    if not prompts:
        raise BehaviorLensError("steer generate needs --prompt TEXT or --prompts-file FILE")
    model = model_from_args(args)
    edit = _load_edit(model, args.edit)
    table = generate_examples(model, edit, prompts, args.multipliers, args.max_new_tokens,
                              positions=args.positions)
    for prompt, rows in table.groupby("prompt", sort=False):
        print(f"=== {prompt!r}")
        for _, r in rows.iterrows():
            print(f"[x{r.multiplier:+g}] {r.completion}")


def add_commands(sub) -> None:
    from ..cli import add_model_options, add_source_options
    from .choose import ACCURACY_DROP_MAX, GROUPS, KL_MAX

    steer = sub.add_parser("steer", help="train, evaluate, bake, export and try edits")
    cmds = steer.add_subparsers(dest="steer_command", required=True)

    p = cmds.add_parser("train", help="train a steering vector, or choose an edit from patching")
    p.add_argument("family")
    p.add_argument("--layer", type=int)
    p.add_argument("--method", default="mean_diff", choices=["mean_diff", "pca", "probe"])
    p.add_argument("--position", default="last")
    p.add_argument("--kind", default="vector", choices=["vector", "ablate_direction"])
    p.add_argument("--from-patching", dest="from_patching", nargs="+", default=None, metavar="DIR",
                   help="patching result folders (e.g. heads and resid): choose an edit from them")
    p.add_argument("--max-accuracy-drop", dest="max_accuracy_drop", type=float, default=ACCURACY_DROP_MAX,
                   help="the most accuracy a chosen edit may cost on each of the no-pressure side, the "
                        "factual control, context use and claim recall (default 0.02: 2 points)")
    p.add_argument("--kl-max", dest="kl_max", type=float, default=KL_MAX,
                   help="the most neutral KL a chosen edit may cost (default 0.05 nats/token)")
    p.add_argument("--candidates", nargs="+", default=list(GROUPS), metavar="GROUP",
                   help="candidate groups to build: " + ", ".join(f"'{g}'" for g in GROUPS))
    p.add_argument("--refits", type=int, default=2,
                   help="rebuild the chosen candidate on this many other splits: its spread (default 2)")
    p.add_argument("--outside-limits", dest="outside_limits", action="store_true",
                   help="when no candidate keeps the limits, save the best trade-off (marked so) instead of stopping")
    p.add_argument("--out", required=True)
    add_model_options(p)
    add_source_options(p)
    p.set_defaults(func=_train)

    p = cmds.add_parser("eval", help="effect, side effects and random control of an edit")
    p.add_argument("edit")
    p.add_argument("family")
    p.add_argument("--multipliers", type=float, nargs="+", default=[1.0])
    p.add_argument("--layers", type=int, nargs="+", default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--controls", type=int, default=5, help="random controls to average (default 5)")
    p.add_argument("--out", required=True)
    add_model_options(p)
    add_source_options(p)
    p.set_defaults(func=_eval)

    p = cmds.add_parser("edit", help="bake an edit into the weights (save_pretrained folder)")
    p.add_argument("edit")
    p.add_argument("--multiplier", type=float, default=1.0)
    p.add_argument("--out", required=True)
    add_model_options(p)
    p.set_defaults(func=_edit)

    p = cmds.add_parser("export", help="export a steering vector as a llama.cpp control vector")
    p.add_argument("edit")
    p.add_argument("--gguf", required=True)
    p.add_argument("--multiplier", type=float, default=1.0)
    p.add_argument("--model-hint", default=None)
    p.set_defaults(func=_export)

    p = cmds.add_parser("generate", help="unsteered and steered continuations side by side")
    p.add_argument("edit")
    p.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for several)")
    p.add_argument("--prompts-file", default=None, metavar="FILE",
                   help="an open-ended dataset file (CAA's test_dataset_open_ended.json)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="the first N prompts of --prompts-file")
    p.add_argument("--multipliers", type=float, nargs="+", default=[-4.0, 0.0, 4.0])
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--positions", default=None, choices=["all", "prompt", "generated"],
                   help="where the edit acts (default: the edit's own)")
    add_model_options(p)
    p.set_defaults(func=_generate)
