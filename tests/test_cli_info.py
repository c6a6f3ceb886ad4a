"""`behaviorlens info` and the CLI's error policy."""

from __future__ import annotations

import re

import pytest

from behaviorlens.cli import main


def _fields(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def test_info_prints_the_default_model(capsys, default_model):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    fields = _fields(out)
    assert fields["layers"] == "30"
    assert fields["d_model"] == "576"
    assert fields["model"] == "default"
    assert fields["family"] == "llama"
    assert fields["architecture"] == "LlamaForCausalLM"
    assert set(fields["sites"].split(", ")) == {"resid_pre", "resid_post", "attn", "mlp", "head"}
    assert float(fields["load_seconds"]) >= 0


def test_info_unknown_model_is_one_line_without_traceback(capsys):
    assert main(["info", "--model", "nope/nope"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("behaviorlens: error: ")
    assert "'nope/nope'" in err
    assert "Traceback" not in err


def test_info_unknown_dtype_is_one_line(capsys):
    assert main(["info", "--dtype", "float64"]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"behaviorlens: error: unknown dtype 'float64'[^\n]*\n", err), err


def test_debug_shows_the_exception(capsys):
    from behaviorlens import BehaviorLensError

    with pytest.raises(BehaviorLensError, match="nope/nope"):
        main(["--debug", "info", "--model", "nope/nope"])
