"""One place per concept: the command line is one package that stages never import; each stage's
parameters are one dataclass from which the command's options and the experiment's keys come;
stages hand over through their writers' loaders."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import tiny_family

from behaviorlens.circuits.params import CircuitParams
from behaviorlens.cli import build_parser, main
from behaviorlens.cli import options as cli_options
from behaviorlens.detect.params import (
    DetectEvalParams,
    DetectParams,
    DetectTrainParams,
    DetectTransferParams,
)
from behaviorlens.errors import BehaviorLensError
from behaviorlens.experiment import STEPS, Runner, validate
from behaviorlens.measure_params import MeasureParams, MeasureStepParams
from behaviorlens.params import from_args, from_step, kwargs, step_schema, user_name
from behaviorlens.patching.params import PatchParams, PatchStepParams
from behaviorlens.patching.run import run_ablation, run_patch
from behaviorlens.probing.params import ProbeParams
from behaviorlens.steering.params import SteerEvalParams, SteerParams, SteerTrainParams

PACKAGE = Path(__file__).resolve().parents[1] / "behaviorlens"
COMMAND_PARAMS = (MeasureParams, ProbeParams, PatchParams, CircuitParams, SteerTrainParams, SteerEvalParams,
                  DetectTrainParams, DetectEvalParams, DetectTransferParams)
ALL_PARAMS = (*COMMAND_PARAMS, *STEPS.values())


def _imports(path: Path) -> set[str]:
    """Absolute names of the modules a file imports (relative imports resolved)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(x for x in (base, node.module) if x)
            out.add(module)
            out |= {f"{module}.{a.name}" for a in node.names}
    return out


def test_no_stage_imports_the_command_line():
    cli = PACKAGE / "cli"
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if cli not in p.parents
                 and any(m == "behaviorlens.cli" or m.startswith("behaviorlens.cli.") for m in _imports(p))]
    assert offenders == []
    assert not list(PACKAGE.rglob("commands.py")) and not (PACKAGE / "cli.py").exists()
    assert not any("importlib" in _imports(p) for p in cli.glob("*.py"))


def test_importing_the_package_loads_no_stage_until_one_is_used():
    import subprocess
    import sys

    code = ("import sys, behaviorlens; before = sorted(m for m in sys.modules if m.startswith('behaviorlens.')); "
            "behaviorlens.run_experiment; print(before); print(sorted(m for m in sys.modules if m.startswith('behaviorlens.')))")
    before, after = (ast.literal_eval(line) for line in subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                           check=True).stdout.splitlines())
    stages = ("steering", "patching", "probing", "circuits", "detect", "experiment")
    assert not [m for m in before if m.split(".")[1] in stages]
    assert {f"behaviorlens.{s}" for s in stages} <= set(after)  # the experiment brings every stage on first use


def test_console_script_is_the_cli_main():
    text = (PACKAGE.parent / "pyproject.toml").read_text()
    assert 'behaviorlens = "behaviorlens.cli:main"' in text


def test_remote_option():
    parse = build_parser().parse_args
    assert parse(["info"]).remote is None
    assert parse(["info", "--remote"]).remote == "ndif"
    assert parse(["info", "--remote", "local"]).remote == "local"
    assert parse(["measure", "fam", "--remote", "--out", "o"]).remote == "ndif"
    with pytest.raises(SystemExit):
        parse(["info", "--remote", "nowhere"])


def test_model_from_args_passes_remote_and_session_limits_on(monkeypatch):
    from behaviorlens.remote import SessionLimits

    seen = {}
    monkeypatch.setattr("behaviorlens.cli.options.load_model", lambda name, **kw: seen.update(name=name, **kw) or "m")
    args = build_parser().parse_args(["info", "--model", "x", "--remote", "local", "--dtype", "bfloat16",
                                      "--max-memory", "40GiB"])
    assert cli_options.model_from_args(args) == "m"
    assert seen == {"name": "x", "device": None, "dtype": "bfloat16", "device_map": None, "remote": "local",
                    "session_limits": None, "max_memory": "40GiB"}
    args = build_parser().parse_args(["info", "--remote", "local", "--session-traces", "8"])
    cli_options.model_from_args(args)
    assert seen["session_limits"] == SessionLimits(traces=8, request_mb=SessionLimits.request_mb)
    args = build_parser().parse_args(["info", "--remote", "local", "--session-result-mb", "64"])
    cli_options.model_from_args(args)
    assert seen["session_limits"] == SessionLimits(result_mb=64)


@pytest.mark.parametrize("value, expected", [("local", "local"), ("ndif", "ndif"), (True, "ndif"), (False, None)])
def test_experiment_remote_is_passed_to_load_model(monkeypatch, tmp_path, value, expected):
    seen = {}
    monkeypatch.setattr("behaviorlens.experiment.load_model", lambda name, **kw: seen.update(kw) or "m")
    exp = validate({"model": {"name": "default", "remote": value, "session_traces": "12", "session_result_mb": 64},
                    "families": {"train": "capitals_opinion"}, "steps": {"measure": {}}}, "e.yaml")
    assert Runner(exp, tmp_path, log=lambda s: None).model == "m" and seen["remote"] == expected
    assert seen["session_limits"].traces == 12  # converted to its type by the schema
    assert seen["session_limits"].result_mb == 64


def test_experiment_remote_value_is_checked():
    with pytest.raises(BehaviorLensError, match=r"e.yaml: model.remote: 'cloud' is not one of local, ndif"):
        validate({"model": {"remote": "cloud"}, "families": {"train": "capitals_opinion"},
                  "steps": {"measure": {}}}, "e.yaml")


def test_step_keys_come_from_the_parameter_classes():
    for cls in STEPS.values():
        keys = {user_name(f) for f in dataclasses.fields(cls) if f.metadata.get("step", True)}
        assert {f.alias for f in step_schema(cls).model_fields.values()} == keys
    patch_keys = {f.alias for f in step_schema(STEPS["patch"]).model_fields.values()}
    assert patch_keys == {"site", "positions", "direction", "clean", "pairs", "head_sweep", "attribution"}


@pytest.mark.parametrize("cls", ALL_PARAMS, ids=lambda c: c.__name__)
def test_every_parameter_is_documented(cls):
    assert cls.__doc__
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help line"


FUNCTIONS = {  # each command class -> the stage functions its fields are the arguments of
    MeasureParams: ("behaviorlens.measure", "run_measure"),
    ProbeParams: ("behaviorlens.probing.run", "run_probe"),
    PatchParams: ("behaviorlens.patching.run", "run_patch", "run_ablation"),
    CircuitParams: ("behaviorlens.circuits.run", "run_circuit"),
    SteerTrainParams: ("behaviorlens.steering.run", "run_steer_train"),
    SteerEvalParams: ("behaviorlens.steering.run", "run_steer_eval"),
    DetectTrainParams: ("behaviorlens.detect.run", "run_detect_train"),
    DetectEvalParams: ("behaviorlens.detect.run", "run_detect_eval"),
    DetectTransferParams: ("behaviorlens.detect.run", "run_transfer"),
}
NOT_ARGUMENTS = {"test", "exact_edges"}  # circuit: the families scored on; the N of exact_top and exact_random


@pytest.mark.parametrize("cls", COMMAND_PARAMS, ids=lambda c: c.__name__)
def test_field_names_are_the_stage_function_s_argument_names(cls):
    import importlib
    import inspect

    module, *names = FUNCTIONS[cls]
    arguments = set().union(*(inspect.signature(getattr(importlib.import_module(module), n)).parameters
                              for n in names))
    assert {f.name for f in dataclasses.fields(cls)} - NOT_ARGUMENTS <= arguments


COMMANDS = {  # command line -> the parameter class its options come from
    ("measure", "fam"): MeasureParams,
    ("probe", "fam"): ProbeParams,
    ("patch", "fam"): PatchParams,
    ("circuit", "fam"): CircuitParams,
    ("steer", "train", "fam", "--out", "o"): SteerTrainParams,
    ("steer", "eval", "e", "fam", "--out", "o"): SteerEvalParams,
    ("detect", "train", "fam", "--out", "o"): DetectTrainParams,
    ("detect", "eval", "d", "fam", "--out", "o"): DetectEvalParams,
    ("detect", "transfer", "fam", "--out", "o"): DetectTransferParams,
}


@pytest.mark.parametrize("argv", list(COMMANDS), ids=" ".join)
def test_command_options_come_from_the_parameter_classes(argv):
    cls = COMMANDS[argv]
    args = build_parser().parse_args(list(argv))
    params = from_args(cls, args)  # every field is an option, and the command's defaults are the class's
    for f in dataclasses.fields(cls):
        value, default = getattr(params, f.name), getattr(cls(), f.name)
        if f.name == "test":
            continue  # circuit --test: [] on the command line, None (the experiment's) in a step
        assert value == default, f.name


def test_command_line_values_reach_the_parameters_under_the_names_users_type():
    args = build_parser().parse_args(["patch", "fam", "--pairs", "3", "--positions", "all", "--clean", "negative",
                                      "--site", "head", "--ablation", "zero"])
    p = from_args(PatchParams, args)
    assert (p.n_pairs, p.positions, p.clean, p.site, p.convention) == (3, "all", "negative", "head", "zero")
    assert kwargs(p, run_ablation) == {"site": "head", "convention": "zero", "n_pairs": 3}
    assert "convention" not in kwargs(p, run_patch) and kwargs(p, run_patch)["n_pairs"] == 3
    args = build_parser().parse_args(["detect", "train", "fam", "--out", "o", "--no-chat", "--methods", "pca"])
    p = from_args(DetectTrainParams, args)
    assert p.chat is False and p.methods == ("pca",)
    args = build_parser().parse_args(["detect", "transfer", "fam", "--out", "o", "--methods", "logistic"])
    assert from_args(DetectTransferParams, args).methods == ["logistic"]
    args = build_parser().parse_args(["steer", "train", "fam", "--out", "o", "--candidates", "knockout"])
    assert from_args(SteerTrainParams, args).groups == ("knockout",)


def test_step_defaults_differ_where_the_experiment_s_do():
    assert from_step(PatchStepParams, {}).n_pairs == 8 and PatchParams().n_pairs is None
    assert from_step(PatchStepParams, {}).positions == "all"
    assert from_step(SteerParams, {}).outside_limits is True and SteerParams().outside_limits is False


def test_a_step_passes_its_function_only_the_command_s_arguments_it_takes():
    patch = from_step(PatchStepParams, {"pairs": 3, "head_sweep": False})
    assert kwargs(patch) == {"direction": "denoise", "clean": "positive", "positions": "all", "n_pairs": 3,
                             "site": "resid_pre"}  # no heads (the step's own), no method or convention
    steer = from_step(SteerParams, {"candidates": ["vector"], "side_effects": {"neutral": "n.yaml"}})
    from behaviorlens.steering.run import run_steer_train

    train = kwargs(steer, run_steer_train)
    assert train["groups"] == ("vector",) and "side_effects" not in train and "position" not in train
    detect = from_step(DetectParams, {"methods": ["pca"], "transfer_methods": ["logistic"], "instructed": ["x"]})
    assert detect.train_kwargs()["methods"] == ("pca",) and "instructed" not in detect.train_kwargs()
    assert detect.transfer_kwargs()["methods"] == ["logistic"] and "positions" not in detect.transfer_kwargs()
    assert set(detect.eval_kwargs()) == {"margin", "labels", "chat"}
    assert kwargs(from_step(MeasureStepParams, {"families": ["a"]})) == {}


# -- hand-overs ------------------------------------------------------------------------------


def test_patch_step_hands_on_its_exact_runs(tiny_llama, tmp_path):
    from behaviorlens.patching.results import PatchStepResult, evidence_of, patch_runs
    from behaviorlens.patching.run import run_patch

    cs = tiny_family().render(tiny_llama.tokenizer)
    step = tmp_path / "patch"
    run_patch(tiny_llama, cs, out_dir=step / "resid", progress=False)
    run_patch(tiny_llama, cs, site="head", out_dir=step / "heads", progress=False)
    run_patch(tiny_llama, cs, method="attribution", out_dir=step / "attribution", verify_k=4, progress=False)
    evidence = PatchStepResult.load(step).evidence()
    expected = pd.concat([pd.read_csv(step / "heads" / "patching_means.csv"),
                          pd.read_csv(step / "resid" / "patching_means.csv")], ignore_index=True)
    pd.testing.assert_frame_equal(evidence.cells, expected)
    assert evidence.rows == {p.row for p in cs}
    assert evidence.head_effects() and all(isinstance(k, tuple) for k in evidence.head_effects())
    assert [r.path.name for r in patch_runs([step])] == ["heads", "resid"]  # a step folder: its exact runs
    pd.testing.assert_frame_equal(evidence_of(patch_runs([step / "heads", step / "resid"])).cells, expected)
    assert PatchStepResult.load(tmp_path / "nothing").evidence() is None
    with pytest.raises(BehaviorLensError, match="no patching result in"):
        patch_runs([tmp_path])


def test_probe_result_loader(tmp_path):
    from behaviorlens.probing.run import ProbeResult

    (tmp_path / "summary.json").write_text(json.dumps({"best_layer": 7}))
    assert ProbeResult.load(tmp_path).best_layer == 7
    with pytest.raises(BehaviorLensError, match="no probing result in"):
        ProbeResult.load(tmp_path / "missing")


def test_steer_reads_no_other_stage_s_file_names():
    import inspect

    from behaviorlens.steering import step

    source = inspect.getsource(step)
    for name in ("patching_means.csv", "patching.csv", ".glob(", '"best_layer"'):
        assert name not in source


def test_main_keeps_the_error_policy(capsys):
    assert main(["measure", "no-such-family-anywhere"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("behaviorlens: error: ")
