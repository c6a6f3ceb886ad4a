"""One experiment YAML -> every step -> one results folder with tables, plots and a report.

An experiment names a model, its families (one to train on, others to test on; built-in names,
family YAML files or dataset files) and the steps to run, and may state predictions before it
runs. It is validated completely before any model loads. Each step writes into its own
subfolder and finishes by writing ``summary.json`` there; a rerun skips a step whose
fingerprint (its parameters, the experiment's, and the fingerprints of the steps it reads) is
unchanged (``force`` reruns them), so an interrupted run resumes and a changed upstream step
reruns what depends on it.
"""

from __future__ import annotations

import hashlib
import json
import platform
import random
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from .circuits.params import CircuitParams
from .detect.params import DetectParams
from .errors import BehaviorLensError
from .io import write_json
from .remote import mode as remote_mode
from .measure_params import MeasureParams
from .params import from_step, step_keys
from .patching.params import PatchParams
from .probing.params import ProbeParams
from .steering.params import SteerParams

EXPERIMENTS = Path(__file__).parent / "experiments"
STEPS = ("measure", "probe", "patch", "circuit", "steer", "detect")
TOP_KEYS = {"name", "question", "model", "seed", "families", "steps", "batch_size", "predictions"}
MODEL_KEYS = {"name", "dtype", "device", "device_map", "remote"}
FAMILY_KEYS = {"train", "test"}
STEP_PARAMS: dict[str, type] = {  # each step's parameter class: its fields are the step's keys
    "measure": MeasureParams, "probe": ProbeParams, "patch": PatchParams, "circuit": CircuitParams,
    "detect": DetectParams, "steer": SteerParams,
}
STEP_KEYS: dict[str, set[str]] = {step: step_keys(cls) for step, cls in STEP_PARAMS.items()}
DEPENDS = {"steer": ("patch", "probe")}  # a step's fingerprint includes these steps' fingerprints
PREDICTION_KEYS = {"what", "key", "equals", "at_least", "at_most"}
PACKAGES = ("behaviorlens", "torch", "transformers", "nnsight", "scikit-learn", "pandas", "numpy")


@dataclass
class Experiment:
    """A validated experiment specification."""

    name: str
    model: dict[str, Any]
    train: Any  # a family name or path, or a dataset mapping (prompts.sources)
    test: list[Any]
    steps: dict[str, dict[str, Any]]
    question: str = ""
    seed: int = 0
    batch_size: int = 16
    source: str = ""
    raw: dict[str, Any] = field(default_factory=dict)
    predictions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def families(self) -> list[Any]:
        return [self.train, *[f for f in self.test if f != self.train]]

    def fingerprint(self) -> str:
        """Identifies what the experiment computes (everything but its steps, question and predictions)."""
        core = {k: v for k, v in self.raw.items() if k not in ("steps", "question", "predictions")}
        return _hash(core)

    def predictions_hash(self) -> str:
        return _hash(self.predictions)


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def builtin_experiments() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS.glob("*.yaml"))


def load_experiment(name_or_path: str | Path) -> Experiment:
    """A built-in experiment by name or an experiment YAML by path, fully validated."""
    path = Path(name_or_path)
    if not path.exists() and (EXPERIMENTS / f"{name_or_path}.yaml").exists():
        path = EXPERIMENTS / f"{name_or_path}.yaml"
    if not path.exists():
        raise BehaviorLensError(
            f"experiment {str(name_or_path)!r}: no such file, and the built-in experiments are "
            f"{', '.join(builtin_experiments())}"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise BehaviorLensError(f"{path}{where}: YAML syntax error: {getattr(err, 'problem', err)}") from None
    return validate(data, str(path))


def validate(data: Any, source: str) -> Experiment:
    """Check every key, step, family and prediction; raise one clear error for the first problem."""
    from .prompts.sources import check_source, source_from

    if not isinstance(data, dict):
        raise BehaviorLensError(f"{source}: an experiment must be a mapping")
    _known(data, TOP_KEYS, source)
    model = data.get("model", {"name": "default"})
    if isinstance(model, str):
        model = {"name": model}
    _known(model, MODEL_KEYS, f"{source}: model")
    remote_mode(model.get("remote"), f"{source}: model.remote")
    families = data.get("families") or {}
    _known(families, FAMILY_KEYS, f"{source}: families")
    if "train" not in families:
        raise BehaviorLensError(f"{source}: families needs a 'train' family")
    test = families.get("test") or []
    test = [test] if isinstance(test, (str, dict)) else list(test)
    steps = data.get("steps") or {}
    if not isinstance(steps, dict) or not steps:
        raise BehaviorLensError(f"{source}: 'steps' must map step names ({', '.join(STEPS)}) to parameters")
    for step, params in steps.items():
        if step not in STEP_KEYS:
            raise BehaviorLensError(f"{source}: unknown step {step!r}; steps are {', '.join(STEPS)}")
        _known(params or {}, STEP_KEYS[step], f"{source}: step {step!r}")
    predictions = data.get("predictions") or []
    if not isinstance(predictions, list):
        raise BehaviorLensError(f"{source}: predictions must be a list")
    for i, pred in enumerate(predictions):
        _known(pred, PREDICTION_KEYS, f"{source}: prediction {i + 1}")
        tests = [k for k in ("equals", "at_least", "at_most") if k in pred]
        if "key" not in pred or len(tests) != 1:
            raise BehaviorLensError(f"{source}: prediction {i + 1} needs a 'key' (step.figure of summary.json) "
                                    "and one of equals, at_least, at_most")
    exp = Experiment(
        name=data.get("name") or Path(source).stem,
        model={"name": "default", **model},
        train=families["train"],
        test=test,
        steps={s: dict(steps[s] or {}) for s in STEPS if s in steps},
        question=data.get("question", ""),
        seed=int(data.get("seed", 0)),
        batch_size=int(data.get("batch_size", 16)),
        source=source,
        raw=data,
        predictions=predictions,
    )
    names = [*exp.families, *exp.steps.get("measure", {}).get("families", [])]
    if "eval_family" in exp.steps.get("steer", {}):
        names.append(exp.steps["steer"]["eval_family"])
    names.extend(exp.steps.get("circuit", {}).get("test", []))
    if "detect" in exp.steps:  # the detect step's own families
        from .detect.run import step_families

        for part in step_families(exp.steps["detect"], exp.train, exp.test).values():
            names.extend(part)
    for spec in names:
        check_source(source_from(spec, f"{source}: family"))  # a clear error for an unknown or broken family
    layer = exp.steps.get("steer", {}).get("layer")
    if layer == "probe" and "probe" not in exp.steps:
        raise BehaviorLensError(f"{source}: step 'steer': layer 'probe' needs a probe step")
    return exp


def _known(mapping: Any, allowed: set[str], where: str) -> None:
    if not isinstance(mapping, dict):
        raise BehaviorLensError(f"{where}: expected a mapping, got {mapping!r}")
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise BehaviorLensError(f"{where}: unknown key {unknown[0]!r}; keys are {', '.join(sorted(allowed))}")


# -- running -------------------------------------------------------------------------------------


class Runner:
    """Runs an experiment's steps in order into ``out``; finished steps are skipped on rerun."""

    def __init__(self, experiment: Experiment, out: str | Path, force: bool = False, log: Callable[[str], None] = print):
        self.exp = experiment
        self.out = Path(out)
        self.force = force
        self.log = log
        self._model = None
        self._sets: dict[Any, Any] = {}
        self._fingerprints: dict[str, str] = {}

    # lazily loaded so that a fully finished run needs no model
    @property
    def model(self):
        if self._model is None:
            from .model import load_model

            m = self.exp.model
            self.log(f"loading model {m['name']!r}")
            self._model = load_model(m["name"], device=m.get("device"), dtype=m.get("dtype"),
                                     device_map=m.get("device_map"), remote=self.remote)
        return self._model

    @property
    def remote(self) -> str | None:
        """The model's ``remote`` key as :func:`~behaviorlens.model.load_model` takes it: 'ndif', 'local' or None."""
        return remote_mode(self.exp.model.get("remote"))

    def contrast_set(self, spec: Any, aligned: bool = True):
        from .prompts.sources import render_source, source_from

        source = source_from(spec)
        key = (source, aligned)
        if key not in self._sets:
            self._sets[key] = render_source(source, self.model.tokenizer, require_aligned=aligned)
        return self._sets[key]

    def side_effects(self, params: dict, half: str, requests: int | None = None):
        """Side-effect data for the steer step: its own files where it names them, else the built-in sets."""
        from .steering.side_effects import SideEffectData

        spec = params.get("side_effects") or {}
        sets = {k: self.contrast_set(spec[k], aligned=False) for k in ("factual", "context") if k in spec}
        return SideEffectData(self.model, half, requests=requests, **sets, **_side_effect_sources(params))

    def fingerprint(self, step: str) -> str:
        """The step's parameters, the experiment's fingerprint and those of the steps it reads."""
        upstream = {s: self._fingerprints.get(s) for s in DEPENDS.get(step, ()) if s in self.exp.steps}
        return _hash({"params": self.exp.steps[step], "experiment": self.exp.fingerprint(), "upstream": upstream})

    def run(self) -> dict[str, Any]:
        self._prepare_folder()
        _seed(self.exp.seed)
        summary: dict[str, Any] = {}
        self._fingerprints.clear()
        for i, step in enumerate(self.exp.steps, 1):
            folder = self.out / step
            fingerprint = self.fingerprint(step)
            self._fingerprints[step] = fingerprint
            if not self.force and _finished(folder, fingerprint):
                self.log(f"[{i}/{len(self.exp.steps)}] {step}: finished earlier, skipped")
            else:
                self.log(f"[{i}/{len(self.exp.steps)}] {step}")
                record: dict[str, Any] = {"params": self.exp.steps[step], "fingerprint": fingerprint,
                                          "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
                if i == 1:  # the predictions as they stood before anything ran
                    record["predictions_hash"] = self.exp.predictions_hash()
                    record["predictions"] = self.exp.predictions
                write_json(folder / "step.json", record | {"finished": False})
                start = time.perf_counter()
                step_summary = getattr(self, f"_{step}")(folder, self.exp.steps[step])
                step_summary["seconds"] = round(time.perf_counter() - start, 1)
                write_json(folder / "summary.json", step_summary)
                write_json(folder / "step.json", record | {"finished": True, "seconds": step_summary["seconds"]})
            summary[step] = json.loads((folder / "summary.json").read_text())
        if self.exp.predictions:
            summary["predictions"] = score_predictions(self.exp, self.out, summary)
        write_json(self.out / "summary.json", summary)
        from .analysis.report import write_report

        report = write_report(self.out)
        self.log(f"report: {report}")
        return summary

    def _prepare_folder(self) -> None:
        config_path = self.out / "config.json"
        if config_path.exists() and not self.force:
            try:
                previous = json.loads(config_path.read_text()).get("fingerprint")
            except ValueError:
                previous = None
            if previous != self.exp.fingerprint():
                raise BehaviorLensError(
                    f"{self.out} holds results of a different experiment; choose another --out "
                    "or pass --force to overwrite"
                )
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(config_path, self._config())
        except OSError as err:
            raise BehaviorLensError(f"cannot write {self.out}: {err.strerror or err}") from None

    def _config(self) -> dict[str, Any]:
        versions = {}
        for pkg in PACKAGES:
            try:
                versions[pkg] = metadata.version(pkg)
            except metadata.PackageNotFoundError:
                versions[pkg] = None
        return {
            "experiment": self.exp.raw,
            "source": self.exp.source,
            "fingerprint": self.exp.fingerprint(),
            "model": self.exp.model,
            "dtype": self.exp.model.get("dtype") or "float32",
            "seed": self.exp.seed,
            "python": platform.python_version(),
            "packages": versions,
            "git_commit": _git_commit(),
        }

    # -- steps -----------------------------------------------------------------------------

    def _measure(self, folder: Path, params: dict) -> dict:
        import pandas as pd

        from .analysis.plots import plot_shifts
        from .io import write_csv
        from .measure import run_measure
        from .params import kwargs

        p = from_step(MeasureParams, params)
        rows, examples = [], {}
        for name in p.families or self.exp.families:
            cs = self.contrast_set(name, aligned=False)
            s = run_measure(self.model, cs, folder / cs.name, **kwargs(p))
            rows.append({"family": cs.name, "behavior": cs.behavior, "aligned": cs.aligned,
                         **{k: v for k, v in s.items() if not isinstance(v, (list, dict))},
                         "ci_low": s["behavior_shift_ci"][0], "ci_high": s["behavior_shift_ci"][1],
                         "top_answer_share": max(s["answer_balance"].values())})
            examples[cs.name] = _examples(self.model.tokenizer, cs)
        table = pd.DataFrame(rows)
        write_csv(folder / "shifts.csv", table)
        write_json(folder / "examples.json", examples)
        plot_shifts(table, folder / "shifts.png")
        train_name = self.contrast_set(self.exp.train, aligned=False).name
        train = table.set_index("family").loc[train_name]
        out = {"train_family": train_name}
        for key in ("behavior_shift", "pull", "accuracy_positive", "accuracy_negative", "accuracy_neutral",
                    "fraction_pairs_shifted"):
            if key in train and not pd.isna(train[key]):
                out[key] = float(train[key])
        out["behavior_shift_ci"] = [float(train["ci_low"]), float(train["ci_high"])]
        return out

    def _probe(self, folder: Path, params: dict) -> dict:
        from .probing import run_probe

        p = from_step(ProbeParams, params)
        train = self.contrast_set(self.exp.train, aligned=False)
        tests = {cs.name: cs for cs in (self.contrast_set(n, aligned=False) for n in self.exp.test)}
        return run_probe(self.model, train, tests, out_dir=folder, **(p.kwargs() | {"batch_size": self.exp.batch_size}))

    def _patch(self, folder: Path, params: dict) -> dict:
        from .patching.run import patch_step

        return _flatten(patch_step(self, folder, from_step(PatchParams, params)))

    def _circuit(self, folder: Path, params: dict) -> dict:
        from .circuits.run import circuit_step

        return circuit_step(self, folder, from_step(CircuitParams, params))

    def _detect(self, folder: Path, params: dict) -> dict:
        from .detect.run import detect_step

        return detect_step(self, folder, from_step(DetectParams, params))

    def _steer(self, folder: Path, params: dict) -> dict:
        from .io import write_csv
        from .patching.results import PatchStepResult
        from .probing.run import ProbeResult
        from .steering import Edit, generate_examples, run_steer_eval, run_steer_train
        from .steering.choose import CHOICE_REQUESTS

        p = from_step(SteerParams, params)
        train = self.contrast_set(self.exp.train, aligned=False)
        eval_set = self.contrast_set(p.eval_family or (self.exp.test[0] if self.exp.test else self.exp.train),
                                     aligned=False)
        evidence, head_effects = None, None
        if p.layer is None:  # what to edit comes from this run's patching results
            evidence = PatchStepResult.load(self.out / "patch").evidence()
            head_effects = evidence.head_effects() if evidence is not None else None
        layer = p.layer
        if layer == "probe":  # the layer where the probe step read the behavior best
            layer = ProbeResult.load(self.out / "probe").best_layer
        edit_path = folder / "edit.safetensors"
        train_summary = run_steer_train(
            self.model, train, edit_path, **(p.train_kwargs() | {"layer": layer}), from_patching=evidence,
            choice_dir=folder / "choice", seed=self.exp.seed,
            side_effects=self.side_effects(params, "select", CHOICE_REQUESTS) if layer is None else None,
        )
        edit = Edit.load(edit_path, self.model)
        if p.strength is not None:  # the headline strength, stated before the run
            edit.notes["strength"] = float(p.strength)
        eval_summary = run_steer_eval(
            self.model, edit, eval_set, out_dir=folder / "eval",
            **(p.eval_kwargs() | {"batch_size": self.exp.batch_size}), seed=self.exp.seed,
            head_effects=head_effects, side_effects=self.side_effects(params, "report"),
        )
        gen = p.generate or {}
        if gen.get("prompts"):
            frame = generate_examples(
                self.model, edit, gen["prompts"], [0.0, eval_summary["strength"]],
                max_new_tokens=gen.get("max_new_tokens", 24), seed=self.exp.seed,
            )
            write_csv(folder / "generations.csv", frame)
        return {"eval_family": eval_set.name, "edit": train_summary["edit"],
                "reason": train_summary["reason"], **eval_summary}


def _side_effect_sources(params: dict) -> dict[str, Any]:
    """The steer step's own side-effect data, if it names any (else the built-in sets)."""
    spec = params.get("side_effects") or {}
    out: dict[str, Any] = {}
    if "neutral" in spec:
        out["neutral"] = list(yaml.safe_load(Path(spec["neutral"]).read_text(encoding="utf-8"))["prompts"])
    if "reference" in spec:
        out["reference"] = Path(spec["reference"]).read_text(encoding="utf-8")
    if "fillers" in spec:
        out["fillers"] = list(yaml.safe_load(Path(spec["fillers"]).read_text(encoding="utf-8"))["sentences"])
    return out


def _finished(folder: Path, fingerprint: str) -> bool:
    try:
        record = json.loads((folder / "step.json").read_text())
    except (OSError, ValueError):
        return False
    return record.get("finished") is True and record.get("fingerprint") == fingerprint and \
        (folder / "summary.json").exists()


def _lookup(summary: dict, key: str) -> Any:
    """``step.figure`` in the experiment summary (a flat key after the step name)."""
    step, _, figure = key.partition(".")
    value = summary.get(step, {})
    return value.get(figure) if isinstance(value, dict) else None


def score_predictions(exp: Experiment, out: Path, summary: dict) -> dict[str, Any]:
    """Each prediction held or failed beside the measured value, and whether the predictions
    were written before the run (their hash in the first step's ``step.json``)."""
    first = out / next(iter(exp.steps)) / "step.json"
    try:
        recorded = json.loads(first.read_text()).get("predictions_hash")
    except (OSError, ValueError):
        recorded = None
    rows = []
    for pred in exp.predictions:
        value = _lookup(summary, pred["key"])
        if "equals" in pred:
            test, held = f"= {pred['equals']}", value == pred["equals"] or str(value) == str(pred["equals"])
        elif "at_least" in pred:
            test, held = f">= {pred['at_least']}", isinstance(value, (int, float)) and value >= pred["at_least"]
        else:
            test, held = f"<= {pred['at_most']}", isinstance(value, (int, float)) and value <= pred["at_most"]
        rows.append({"what": pred.get("what", pred["key"]), "key": pred["key"], "predicted": test,
                     "measured": value, "held": bool(held) if value is not None else None})
    return {"written_before_the_run": recorded == exp.predictions_hash(), "recorded_hash": recorded,
            "results": rows}


def _flatten(summary: dict, prefix: str = "") -> dict:
    out: dict[str, Any] = {}
    for k, v in summary.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k not in ("transfer_auroc", "shifts"):
            out.update(_flatten(v, key + "_"))
        else:
            out[key] = v
    return out


def _examples(tokenizer: Any, contrast_set: Any, n: int = 2) -> list[dict]:
    """Token strings of a few pairs with the differing positions marked, for the report."""
    out = []
    for p in list(contrast_set)[:n]:
        pos, neg = p.tokens["positive"], p.tokens["negative"]
        start = p.first_difference()
        lo = max(0, min(start, len(pos)) - 12)
        out.append({
            "row": p.row,
            "positive": [tokenizer.decode([t]) for t in pos[lo:]],
            "negative": [tokenizer.decode([t]) for t in neg[lo:]],
            "differs": [i - lo for i in range(lo, min(len(pos), len(neg))) if pos[i] != neg[i]],
            "matching": p.answer_text["matching"],
            "not_matching": p.answer_text["not_matching"],
        })
    return out


def _seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False,
            cwd=Path(__file__).parent,
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_experiment(name_or_path: str | Path, out: str | Path | None = None, force: bool = False,
                   remote: str | None = None) -> Path:
    """Validate and run an experiment; returns the results folder (holding report.html).
    ``remote`` ('local' or 'ndif') overrides the experiment's ``model.remote``."""
    exp = load_experiment(name_or_path)
    if remote is not None:
        exp.model["remote"] = remote_mode(remote)
        raw = exp.raw.get("model", "default")
        exp.raw["model"] = {**({"name": raw} if isinstance(raw, str) else raw), "remote": exp.model["remote"]}
    out = Path(out or Path("results") / exp.name)
    Runner(exp, out, force=force).run()
    return out
