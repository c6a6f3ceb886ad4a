"""The circuit command and experiment step: bad input is refused with one line, before a model loads."""

from __future__ import annotations

import pytest

from behaviorlens.cli import main
from behaviorlens.errors import BehaviorLensError
from behaviorlens.experiment import validate


@pytest.mark.parametrize("argv, says", [
    (["circuit", "no_such_family_xyz"], "no_such_family_xyz"),
    (["circuit", "capitals_opinion", "--pairs", "2"], "at least 4 pairs"),
    (["circuit", "capitals_opinion", "--test", "no_such_family_xyz"], "no_such_family_xyz"),
    (["circuit", "capitals_opinion", "--steps", "0"], "at least 1"),
])
def test_cli_errors_are_one_line(capsys, argv, says):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and says in err and err.startswith("behaviorlens: error:")


def test_experiment_step_is_validated():
    base = {"families": {"train": "capitals_opinion", "test": ["facts_opinion"]}}
    exp = validate(base | {"steps": {"circuit": {"pairs": 8, "test": ["pushback"], "method": "eap"}}}, "x.yaml")
    assert list(exp.steps) == ["circuit"]
    with pytest.raises(BehaviorLensError, match="unknown key 'edges'"):
        validate(base | {"steps": {"circuit": {"edges": 3}}}, "x.yaml")
    with pytest.raises(BehaviorLensError, match="no_such_family_xyz"):
        validate(base | {"steps": {"circuit": {"test": ["no_such_family_xyz"]}}}, "x.yaml")
