"""The detect command line and experiment step: bad input is one line, checked before a model loads."""

from behaviorlens.cli import main
from behaviorlens.experiment import load_experiment, validate


def test_a_missing_detector_file_is_one_line(tmp_path, capsys):
    code = main(["detect", "eval", str(tmp_path / "none.safetensors"), "capitals_opinion", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "none.safetensors does not exist" in err[0]


def test_train_without_a_family_is_one_line(tmp_path, capsys):
    code = main(["detect", "train", "--out", str(tmp_path / "d.safetensors")])
    assert code == 2 and "needs at least one FAMILY" in capsys.readouterr().err


def test_an_unknown_family_is_refused_before_a_model_loads(tmp_path, capsys):
    code = main(["detect", "train", "capitals_opinon", "--out", str(tmp_path / "d.safetensors")])
    assert code == 2 and "capitals_opinon" in capsys.readouterr().err


def test_the_deception_experiment_has_a_detect_step_and_bad_keys_are_refused():
    exp = load_experiment("deception")
    assert exp.steps["detect"]["instructed"] == ["instructed_lie"]
    raw = dict(exp.raw)
    raw["steps"] = {"detect": {"eval": ["no_such_family"]}}
    import pytest

    from behaviorlens.errors import BehaviorLensError

    with pytest.raises(BehaviorLensError, match="no_such_family"):
        validate(raw, "x.yaml")
    raw["steps"] = {"detect": {"margn": 1}}
    with pytest.raises(BehaviorLensError, match="unknown key 'margn'"):
        validate(raw, "x.yaml")


def test_a_broken_transcripts_file_names_the_line(tmp_path, capsys):
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"messages": [], "answer": "x"}\n{"messages": [\n')
    code = main(["detect", "eval", str(tmp_path / "d.safetensors"), str(bad), "--out", str(tmp_path / "o")])
    assert code == 2 and "t.jsonl line 2: invalid JSON" in capsys.readouterr().err
