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
from contextlib import nullcontext
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any

import pydantic
import yaml

from .analysis.report import write_report
from .circuits.params import CircuitParams
from .circuits.run import circuit_step
from .detect.params import DetectParams
from .detect.run import detect_step, step_families
from .errors import BehaviorLensError
from .io import write_json
from .measure import measure_step
from .measure_params import MeasureStepParams
from .model import load_model
from .params import Schema, from_step, kwargs, schema_error, step_schema
from .patching.params import PatchStepParams
from .patching.run import patch_step
from .probing.params import ProbeParams
from .probing.run import run_probe
from .prompts.sources import check_source, render_source, source_from
from .remote import SessionLimits, counting_requests
from .remote import mode as remote_mode
from .steering.params import SteerParams
from .steering.step import steer_step

EXPERIMENTS = Path(__file__).parent / "experiments"
STEPS: dict[str, type] = {  # each step, in the order they run, and its parameter class: its fields are the step's keys
    "measure": MeasureStepParams, "probe": ProbeParams, "patch": PatchStepParams, "circuit": CircuitParams,
    "steer": SteerParams, "detect": DetectParams,
}
DEPENDS = {"steer": ("patch", "probe")}  # a step's fingerprint includes these steps' fingerprints
PACKAGES = ("behaviorlens", "torch", "transformers", "nnsight", "scikit-learn", "pandas", "numpy")

# -- the file's schema ---------------------------------------------------------------------------

Family = str | dict[str, Any]  # a name or path, or a mapping: path plus options (prompts.sources)


def _as_list(value: Any) -> Any:
    """One family or none as a list of them."""
    return [] if value is None else [value] if isinstance(value, (str, dict)) else value


class ModelSpec(Schema):
    """The model: a name ('default', a Hugging Face id, a folder or a .gguf file) and how to load it."""

    name: str = "default"
    dtype: str | None = None
    device: str | None = None
    device_map: str | None = None
    remote: str | bool | None = None
    session_traces: int = SessionLimits.traces  # what one remote request may hold
    session_mb: float = SessionLimits.request_mb
    session_result_mb: float = SessionLimits.result_mb
    max_memory: str | None = None  # e.g. 40GiB: a batch's working memory where a stage sizes batches by memory


class Families(Schema):
    """The family the steps train on and those they test on."""

    train: Family
    test: Annotated[list[Family], pydantic.BeforeValidator(_as_list)] = pydantic.Field(default_factory=list)


class Prediction(Schema):
    """A figure stated before the run: a key of the summary (``step.figure``) and one test."""

    what: str | None = None
    key: str
    equals: Any = None
    at_least: float | None = None
    at_most: float | None = None

    @pydantic.model_validator(mode="after")
    def _one_test(self) -> Prediction:
        if len(self.model_fields_set & {"equals", "at_least", "at_most"}) != 1:
            raise ValueError("needs one of equals, at_least, at_most")
        return self


StepsSchema = pydantic.create_model(
    "Steps", __base__=Schema,
    **{name: (Annotated[step_schema(cls) | None, pydantic.BeforeValidator(lambda v: {} if v is None else v)], None)
       for name, cls in STEPS.items()},
)


class ExperimentFile(Schema):
    """An experiment file: the model, the families, the steps and the predictions."""

    name: str | None = None
    question: str = ""
    model: Annotated[ModelSpec, pydantic.BeforeValidator(lambda v: {"name": v} if isinstance(v, str) else v)] = \
        ModelSpec()
    seed: int = 0
    batch_size: int = 16
    families: Families
    steps: StepsSchema  # type: ignore[valid-type]
    predictions: list[Prediction] = pydantic.Field(default_factory=list)


@dataclass
class Experiment:
    """A validated experiment specification."""

    name: str
    model: dict[str, Any]
    train: Any  # a family name or path, or a dataset mapping (prompts.sources)
    test: list[Any]
    steps: dict[str, dict[str, Any]]  # each step's keys as written, their values of the declared types
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
    """Check the file against its schema (:class:`ExperimentFile`), then the model's remote mode,
    every family and the steps' hand-overs; raise one clear line for the first problem."""
    try:
        spec = ExperimentFile.model_validate(data)
    except pydantic.ValidationError as err:
        raise schema_error(err, source, data) from None
    remote_mode(spec.model.remote, f"{source}: model.remote")
    steps = {name: getattr(spec.steps, name).model_dump(by_alias=True, exclude_unset=True)
             for name in STEPS if name in spec.steps.model_fields_set}
    if not steps:
        raise BehaviorLensError(f"{source}: steps: name at least one of {', '.join(STEPS)}")
    exp = Experiment(
        name=spec.name or Path(source).stem,
        model={"name": "default", **spec.model.model_dump(exclude_unset=True)},
        train=spec.families.train,
        test=spec.families.test,
        steps=steps,
        question=spec.question,
        seed=spec.seed,
        batch_size=spec.batch_size,
        source=source,
        raw=data,
        predictions=[p.model_dump(exclude_unset=True) for p in spec.predictions],
    )
    names = [*exp.families, *(spec.steps.measure.families or [] if "measure" in steps else [])]
    if "steer" in steps and spec.steps.steer.eval_family is not None:
        names.append(spec.steps.steer.eval_family)
    if "circuit" in steps:
        names.extend([*(spec.steps.circuit.test or []), *(spec.steps.circuit.styles or [])])
    if "detect" in steps:  # the detect step's own families
        for part in step_families(steps["detect"], exp.train, exp.test).values():
            names.extend(part)
    for name in names:
        check_source(source_from(name, f"{source}: family"))  # a clear error for an unknown or broken family
    if "steer" in steps and spec.steps.steer.layer == "probe" and "probe" not in steps:
        raise BehaviorLensError(f"{source}: steps.steer.layer: 'probe' needs a probe step")
    return exp


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
            m = self.exp.model
            self.log(f"loading model {m['name']!r}")
            self._model = load_model(m["name"], device=m.get("device"), dtype=m.get("dtype"),
                                     device_map=m.get("device_map"), remote=self.remote,
                                     session_limits=SessionLimits(
                                         m.get("session_traces", SessionLimits.traces),
                                         m.get("session_mb", SessionLimits.request_mb),
                                         m.get("session_result_mb", SessionLimits.result_mb)),
                                     max_memory=m.get("max_memory"))
        return self._model

    @property
    def remote(self) -> str | None:
        """The model's ``remote`` key as :func:`~behaviorlens.model.load_model` takes it: 'ndif', 'local' or None."""
        return remote_mode(self.exp.model.get("remote"))

    def contrast_set(self, spec: Any, aligned: bool = True):
        source = source_from(spec)
        key = (source, aligned)
        if key not in self._sets:
            self._sets[key] = render_source(source, self.model.tokenizer, require_aligned=aligned)
        return self._sets[key]

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
                with counting_requests() if self.remote else nullcontext() as sent:
                    step_summary = getattr(self, f"_{step}")(folder, self.exp.steps[step])
                step_summary["seconds"] = round(time.perf_counter() - start, 1)
                if sent is not None:  # what the step sent to NDIF (or its simulation)
                    step_summary |= {"remote_requests": sent.requests, "remote_bytes": sent.bytes}
                write_json(folder / "summary.json", step_summary)
                write_json(folder / "step.json", record | {"finished": True, "seconds": step_summary["seconds"]})
            summary[step] = json.loads((folder / "summary.json").read_text())
        if self.exp.predictions:
            summary["predictions"] = score_predictions(self.exp, self.out, summary)
        write_json(self.out / "summary.json", summary)

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

    # -- steps: each runs in its package; the runner hands it itself (model, families, folder) ----

    def _measure(self, folder: Path, params: dict) -> dict:
        return measure_step(self, folder, from_step(MeasureStepParams, params))

    def _probe(self, folder: Path, params: dict) -> dict:
        p = from_step(ProbeParams, params)
        train = self.contrast_set(self.exp.train, aligned=False)
        tests = {cs.name: cs for cs in (self.contrast_set(n, aligned=False) for n in self.exp.test)}
        return run_probe(self.model, train, tests, out_dir=folder,
                         **(kwargs(p, run_probe) | {"batch_size": self.exp.batch_size}))

    def _patch(self, folder: Path, params: dict) -> dict:
        return _flatten(patch_step(self, folder, from_step(PatchStepParams, params)))

    def _circuit(self, folder: Path, params: dict) -> dict:
        return circuit_step(self, folder, from_step(CircuitParams, params))

    def _steer(self, folder: Path, params: dict) -> dict:
        return steer_step(self, folder, from_step(SteerParams, params))

    def _detect(self, folder: Path, params: dict) -> dict:
        return detect_step(self, folder, from_step(DetectParams, params))


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
                   remote: str | None = None, session_limits: SessionLimits | None = None) -> Path:
    """Validate and run an experiment; returns the results folder (holding report.html).
    ``remote`` ('local' or 'ndif') and ``session_limits`` override the experiment's ``model.remote``,
    ``model.session_traces``, ``model.session_mb`` and ``model.session_result_mb``."""
    exp = load_experiment(name_or_path)
    given: dict[str, Any] = {}
    if remote is not None:
        given["remote"] = remote_mode(remote)
    if session_limits is not None:
        given |= {"session_traces": session_limits.traces, "session_mb": session_limits.request_mb,
                  "session_result_mb": session_limits.result_mb}
    if given:
        exp.model.update(given)
        raw = exp.raw.get("model", "default")
        exp.raw["model"] = {**({"name": raw} if isinstance(raw, str) else raw), **given}
    out = Path(out or Path("results") / exp.name)
    Runner(exp, out, force=force).run()
    return out
