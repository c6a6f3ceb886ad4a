"""Experiment files are validated completely before any model loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from behaviorlens import BehaviorLensError
from behaviorlens.cli import main
from behaviorlens.experiment import builtin_experiments, load_experiment

GOOD = {
    "name": "t",
    "model": {"name": "default"},
    "families": {"train": "capitals_opinion", "test": []},
    "steps": {"measure": {}},
}


def _write(tmp_path, data):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def no_model(monkeypatch):
    """Fail loudly if anything tries to load a model."""

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before validation finished")

    monkeypatch.setattr("behaviorlens.model.load_model", refuse)
    monkeypatch.setattr("behaviorlens.experiment.load_model", refuse)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"stepz": {}}, ["unknown key", "stepz"]),
        ({"steps": {"measure": {}, "dance": {}}}, ["steps: unknown key 'dance'", "measure, patch"]),
        ({"steps": {"probe": {"layerz": 3}}}, ["steps.probe: unknown key 'layerz'", "folds"]),
        ({"families": {"train": "no_such_family"}}, ["no_such_family"]),
        ({"model": {"name": "default", "precision": "fp8"}}, ["model", "precision"]),
        ({"families": {"test": ["capitals_opinion"]}}, ["train"]),
    ],
)
def test_bad_experiment_is_one_clear_error_before_loading(tmp_path, no_model, change, words):
    path = _write(tmp_path, {**GOOD, **change})
    with pytest.raises(BehaviorLensError) as err:
        load_experiment(path)
    message = str(err.value)
    assert "\n" not in message
    for w in words:
        assert w in message


@pytest.mark.parametrize("steps, line", [
    ({"patch": {"pairs": 8, "head_sweep": True, "attribution": False, "sitez": "resid_pre"}},
     "exp.yaml: steps.patch: unknown key 'sitez'; keys are attribution, clean, direction, head_sweep, pairs, positions, site"),
    ({"patch": {"pairs": "eight"}}, "exp.yaml: steps.patch.pairs: expected a valid integer, got 'eight'"),
    ({"steer": {"strengths": [1, "strong"]}}, "exp.yaml: steps.steer.strengths[1]: expected a valid number, got 'strong'"),
    ({"steer": {"generate": {"prompts": ["hi"], "max_tokens": 5}}},
     "exp.yaml: steps.steer.generate: unknown key 'max_tokens'; keys are max_new_tokens, prompts"),
    ({"probe": {"methods": ["mean_diff", "svm"]}},
     "exp.yaml: steps.probe.methods[1]: expected 'mean_diff', 'logistic' or 'pca', got 'svm'"),
])
def test_a_schema_error_is_one_line_naming_the_file_and_key_and_exits_2(tmp_path, no_model, capsys, steps, line):
    path = _write(tmp_path, {**GOOD, "steps": steps})
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"behaviorlens: error: {tmp_path / line}\n"


def test_values_are_coerced_to_their_declared_types(tmp_path, no_model):
    path = _write(tmp_path, {**GOOD, "seed": "3", "steps": {
        "patch": {"pairs": "3", "head_sweep": "false"}, "steer": {"strengths": [-1, 2], "strength": 1, "controls": "2"}}})
    exp = load_experiment(path)
    assert exp.seed == 3 and exp.steps["patch"] == {"pairs": 3, "head_sweep": False}
    assert exp.steps["steer"] == {"strengths": [-1.0, 2.0], "strength": 1.0, "controls": 2}
    assert all(type(v) is float for v in exp.steps["steer"]["strengths"])


def test_cli_run_with_bad_experiment_exits_2_without_traceback(tmp_path, no_model, capsys):
    path = _write(tmp_path, {**GOOD, "steps": {"dance": {}}})
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and "dance" in err


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nsteps: [unclosed\n")
    with pytest.raises(BehaviorLensError, match=r"broken.yaml line \d+: YAML syntax error"):
        load_experiment(path)


def test_builtin_experiments_validate(monkeypatch):
    # the CAA experiments name their dataset folder by an environment variable
    caa = Path(__file__).resolve().parents[2] / "shared" / "data" / "nrimsky-CAA"
    monkeypatch.setenv("CAA_DATASETS", str(caa))
    names = [n for n in builtin_experiments() if caa.is_dir() or not n.startswith("caa_")]
    assert {"sycophancy", "deception", "llama2_7b"} <= set(names)
    for name in names:
        exp = load_experiment(name)
        assert exp.steps and exp.train
    assert load_experiment("llama2_7b").model["device"] == "cuda"


@pytest.mark.parametrize("key", ["test", "styles"])
def test_an_unknown_circuit_family_is_refused_when_the_file_loads(tmp_path, key):
    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump({"families": {"train": "capitals_opinion"},
                                    "steps": {"circuit": {key: ["nope_family"]}}}))
    with pytest.raises(BehaviorLensError, match="unknown family 'nope_family'"):
        load_experiment(path)
