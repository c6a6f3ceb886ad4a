"""The experiment's ``steer`` step: train (or choose) an edit, evaluate it on a family that
chose nothing, and show what it does to a few prompts."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ..edits import Edit
from ..io import write_csv
from ..params import kwargs
from ..patching.results import PatchStepResult
from ..probing.run import ProbeResult
from .judge import CHOICE_REQUESTS
from .params import SideEffects, SteerParams
from .run import generate_examples, run_steer_eval, run_steer_train
from .side_effects import SideEffectData


def steer_step(runner: Any, folder: Path, params: SteerParams) -> dict:
    """Train a vector at ``params.layer`` (``probe``: the probe step's best layer), or choose an
    edit from this run's patch step; evaluate it on ``params.eval_family`` (default: the first test
    family) into ``eval/``; ``generations.csv`` where the step names prompts. Reads the patch and
    probe steps through their loaders (:class:`PatchStepResult`, :class:`ProbeResult`)."""
    exp = runner.exp
    train = runner.contrast_set(exp.train, aligned=False)
    eval_set = runner.contrast_set(params.eval_family or (exp.test[0] if exp.test else exp.train), aligned=False)
    evidence, head_effects = None, None
    if params.layer is None:  # what to edit comes from this run's patching results
        evidence = PatchStepResult.load(runner.out / "patch").evidence()
        head_effects = evidence.head_effects() if evidence is not None else None
    layer = params.layer
    if layer == "probe":  # the layer where the probe step read the behavior best
        layer = ProbeResult.load(runner.out / "probe").best_layer
    edit_path = folder / "edit.safetensors"
    choosing = layer is None  # the select part judges the candidates, the report part the edit
    parts = side_effect_data(runner, params.side_effects, {"select": CHOICE_REQUESTS, "report": None} if choosing
                             else {"report": None})
    train_summary = run_steer_train(
        runner.model, train, edit_path, **(kwargs(params, run_steer_train) | {"layer": layer}),
        from_patching=evidence, choice_dir=folder / "choice", seed=exp.seed, side_effects=parts.get("select"),
    )
    edit = Edit.load(edit_path, runner.model)
    if params.strength is not None:  # the headline strength, stated before the run
        edit.notes["strength"] = params.strength
    eval_summary = run_steer_eval(
        runner.model, edit, eval_set, out_dir=folder / "eval",
        **(kwargs(params, run_steer_eval) | {"batch_size": exp.batch_size}), seed=exp.seed,
        head_effects=head_effects, side_effects=parts["report"],
    )
    if params.generate is not None and params.generate.prompts:
        frame = generate_examples(runner.model, edit, params.generate.prompts, [0.0, eval_summary["strength"]],
                                  max_new_tokens=params.generate.max_new_tokens, seed=exp.seed)
        write_csv(folder / "generations.csv", frame)
    return {"eval_family": eval_set.name, "edit": train_summary["edit"], "reason": train_summary["reason"],
            **eval_summary}


def side_effect_data(runner: Any, spec: SideEffects | None, requests: Mapping[str, int | None],
                     ) -> dict[str, SideEffectData]:
    """The side-effect data of each part (``requests``: part -> how many neutral requests, None
    for all), continued together: the step's own files where it names them, else the built-in sets."""
    spec = spec or SideEffects()
    sets = {k: runner.contrast_set(v, aligned=False) for k, v in (("factual", spec.factual),
                                                                  ("context", spec.context)) if v is not None}
    own: dict[str, Any] = {}
    if spec.neutral is not None:
        own["neutral"] = list(_yaml(spec.neutral)["prompts"])
    if spec.reference is not None:
        own["reference"] = Path(spec.reference).read_text(encoding="utf-8")
    if spec.fillers is not None:
        own["fillers"] = list(_yaml(spec.fillers)["sentences"])
    return SideEffectData.parts(runner.model, requests, **sets, **own)


def _yaml(path: str) -> Any:
    return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
