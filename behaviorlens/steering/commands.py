"""``behaviorlens steer train|eval|edit|export|generate``."""

from __future__ import annotations

import argparse
import json

from ..errors import BehaviorLensError


def _family(model, name: str):
    from ..prompts import load_family

    return load_family(name).render(model.tokenizer)


def _train(args: argparse.Namespace) -> None:
    from ..cli import model_from_args
    from .run import run_steer_train

    if args.layer is None and args.from_patching is None:
        raise BehaviorLensError("steer train needs --layer L or --from-patching DIR")
    model = model_from_args(args)
    summary = run_steer_train(model, _family(model, args.family), args.out, layer=args.layer,
                              method=args.method, position=args.position, kind=args.kind,
                              from_patching=args.from_patching, max_accuracy_drop=args.max_accuracy_drop)
    if summary["reason"]:
        print(summary["reason"])
    print(f"wrote {summary['edit']} to {summary['path']}")


def _load_edit(model, path: str):
    from .edit import Edit

    return Edit.load(path, model)


def _eval(args: argparse.Namespace) -> None:
    from ..cli import model_from_args
    from .run import run_steer_eval

    model = model_from_args(args)
    edit = _load_edit(model, args.edit)
    summary = run_steer_eval(model, edit, _family(model, args.family), args.multipliers,
                             args.layers, args.out, batch_size=args.batch_size, controls=args.controls)
    print(json.dumps(summary, indent=2))


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

    model = model_from_args(args)
    edit = _load_edit(model, args.edit)
    table = generate_examples(model, edit, args.prompt, args.multipliers, args.max_new_tokens,
                              positions=args.positions)
    for prompt, rows in table.groupby("prompt", sort=False):
        print(f"=== {prompt!r}")
        for _, r in rows.iterrows():
            print(f"[x{r.multiplier:+g}] {r.completion}")


def add_commands(sub) -> None:
    from ..cli import add_model_options

    steer = sub.add_parser("steer", help="train, evaluate, bake, export and try edits")
    cmds = steer.add_subparsers(dest="steer_command", required=True)

    p = cmds.add_parser("train", help="train a steering vector, or choose an edit from patching")
    p.add_argument("family")
    p.add_argument("--layer", type=int)
    p.add_argument("--method", default="mean_diff", choices=["mean_diff", "pca", "probe"])
    p.add_argument("--position", default="last")
    p.add_argument("--kind", default="vector", choices=["vector", "ablate_direction"])
    p.add_argument("--from-patching", dest="from_patching", default=None)
    p.add_argument("--max-accuracy-drop", dest="max_accuracy_drop", type=float, default=None,
                   help="with --from-patching: skip edits losing more factual accuracy (e.g. 0.1)")
    p.add_argument("--out", required=True)
    add_model_options(p)
    p.set_defaults(func=_train)

    p = cmds.add_parser("eval", help="effect, side effects and random control of an edit")
    p.add_argument("edit")
    p.add_argument("family")
    p.add_argument("--multipliers", type=float, nargs="+", default=[1.0])
    p.add_argument("--layers", type=int, nargs="+", default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--controls", type=int, default=3, help="random controls to average (default 3)")
    p.add_argument("--out", required=True)
    add_model_options(p)
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
    p.add_argument("--prompt", action="append", required=True)
    p.add_argument("--multipliers", type=float, nargs="+", default=[-4.0, 0.0, 4.0])
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--positions", default="all", choices=["all", "prompt", "generated"])
    add_model_options(p)
    p.set_defaults(func=_generate)
