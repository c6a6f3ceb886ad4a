"""``behaviorlens steer train|eval|edit|export|generate``: edits, chosen, judged and applied."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..edits import Edit
from ..errors import BehaviorLensError
from ..params import from_args, kwargs
from ..prompts.sources import open_ended_prompts, read_text
from ..steering.bake import bake
from ..steering.evaluate import NO_NEUTRAL
from ..steering.gguf_export import export_gguf
from ..steering.params import SteerEvalParams, SteerTrainParams
from ..steering.run import generate_examples, run_steer_eval, run_steer_train
from . import options

CANDIDATE_COLUMNS = ["group", "edit", "pressure_removed_fraction", "accuracy_neutral_change",
                     "factual_accuracy_change", "context_use_accuracy_change", "claim_recall_accuracy_change",
                     "neutral_kl", "collapse", "null_control_pressure_removed_fraction",
                     "random_pressure_removed_fraction", "deletion_baseline_pressure_removed_fraction",
                     "redaction", "within_limits", "chosen"]


def _check(args: argparse.Namespace, out: str | None) -> None:
    """Fail on a bad family or output folder before a model loads."""
    options.check_sources(args, [args.family])
    options.prepare_out(out)


def _train(args: argparse.Namespace) -> None:
    import pandas as pd

    params = from_args(SteerTrainParams, args)
    if params.layer is None and args.from_patching is None:
        raise BehaviorLensError("steer train needs --layer L or --from-patching DIR [DIR ...]")
    _check(args, str(Path(args.out).parent))
    model = options.model_from_args(args)
    summary = run_steer_train(model, options.render_from_args(model, args, args.family), args.out,
                              from_patching=args.from_patching, **kwargs(params, run_steer_train))
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
    return Edit.load(path, model)


def _eval(args: argparse.Namespace) -> None:
    params = from_args(SteerEvalParams, args)
    _check(args, args.out)
    model = options.model_from_args(args)
    edit = _load_edit(model, args.edit)
    family = options.render_from_args(model, args, args.family)
    summary = run_steer_eval(model, edit, family, out_dir=args.out, **kwargs(params, run_steer_eval))
    print(json.dumps(summary, indent=2))
    if not family.has_neutral:
        print(f"behaviorlens: {family.name} {NO_NEUTRAL}", file=sys.stderr)


def _edit(args: argparse.Namespace) -> None:
    model = options.model_from_args(args)
    edit = _load_edit(model, args.edit)
    out = bake(model, edit, args.out, strength=args.strength)
    print(f"wrote the edited model ({edit.describe()}) to {out}")


def _export(args: argparse.Namespace) -> None:
    edit = Edit.load(args.edit)
    out = export_gguf(edit, args.gguf, strength=args.strength, model_hint=args.model_hint)
    print(f"wrote a llama.cpp control vector ({len(edit.vectors)} layers) to {out}")


def _generate(args: argparse.Namespace) -> None:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += read_prompts(args.prompts_file)[: args.limit]
    if not prompts:
        raise BehaviorLensError("steer generate needs --prompt TEXT or --prompts-file FILE")
    model = options.model_from_args(args)
    edit = _load_edit(model, args.edit)
    table = generate_examples(model, edit, prompts, args.strengths, args.max_new_tokens,
                              positions=args.positions)
    for prompt, rows in table.groupby("prompt", sort=False):
        print(f"=== {prompt!r}")
        for _, r in rows.iterrows():
            print(f"[{r.label}] {r.completion}")


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of ``--prompts-file``: an open-ended dataset file (``.json`` or ``.jsonl``: CAA's
    ``test_dataset_open_ended.json``), or plain text, one prompt a line (blank lines skipped)."""
    path = Path(path)
    if path.suffix.lower() in (".json", ".jsonl"):
        return open_ended_prompts(path)
    prompts = [line.strip() for line in read_text(path).splitlines() if line.strip()]
    if not prompts:
        raise BehaviorLensError(f"{path}: no prompts (one a line)")
    return prompts


def add_commands(sub: argparse._SubParsersAction) -> None:
    steer = sub.add_parser("steer", help="train, evaluate, bake, export and try edits")
    cmds = steer.add_subparsers(dest="steer_command", required=True)

    p = cmds.add_parser("train", help="train a steering vector, or choose an edit from patching")
    p.add_argument("family")
    p.add_argument("--from-patching", dest="from_patching", nargs="+", default=None, metavar="DIR",
                   help="patching result folders (e.g. heads and resid): choose an edit from them")
    options.add_params(p, SteerTrainParams)
    p.add_argument("--out", required=True)
    options.add_model_options(p)
    options.add_source_options(p)
    p.set_defaults(func=_train)

    p = cmds.add_parser("eval", help="effect, side effects and random control of an edit")
    p.add_argument("edit")
    p.add_argument("family")
    options.add_params(p, SteerEvalParams)
    p.add_argument("--out", required=True)
    options.add_model_options(p)
    options.add_source_options(p)
    p.set_defaults(func=_eval)

    p = cmds.add_parser("edit", help="bake an edit into the weights (save_pretrained folder)")
    p.add_argument("edit")
    p.add_argument("--strength", type=float, default=1.0)
    p.add_argument("--out", required=True)
    options.add_model_options(p)
    p.set_defaults(func=_edit)

    p = cmds.add_parser("export", help="export a steering vector as a llama.cpp control vector")
    p.add_argument("edit")
    p.add_argument("--gguf", required=True)
    p.add_argument("--strength", type=float, default=1.0)
    p.add_argument("--model-hint", default=None)
    p.set_defaults(func=_export)

    p = cmds.add_parser("generate", help="unsteered and steered continuations side by side")
    p.add_argument("edit")
    p.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for several)")
    p.add_argument("--prompts-file", default=None, metavar="FILE",
                   help="a text file, one prompt a line, or an open-ended dataset file (.json: CAA's "
                        "test_dataset_open_ended.json)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="the first N prompts of --prompts-file")
    p.add_argument("--strengths", type=float, nargs="+", default=None,
                   help="default -4 0 4 (0: unedited); a kind without strength (a knockout) shows unedited "
                        "and edited")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--positions", default=None, choices=["all", "prompt", "generated"],
                   help="where the edit acts (default: the edit's own)")
    options.add_model_options(p)
    p.set_defaults(func=_generate)
