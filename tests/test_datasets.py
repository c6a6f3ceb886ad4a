"""Real public datasets through the command line: every file of ../shared/data loads, A/B
checks say when a model is at chance, limits and splits are deterministic, errors name the place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from behaviorlens.cli import main
from behaviorlens.cli import options as cli_options
from behaviorlens.prompts.sources import Source, dataset_format, render_source

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FILES = sorted(DATA.glob("*/*/*.json*")) + sorted(DATA.glob("*/*/*/*.json"))
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="the shared datasets sit beside the checkout")


@pytest.fixture
def local(default_model, monkeypatch):
    monkeypatch.setattr(cli_options, "model_from_args", lambda args: default_model)
    return default_model


def rows_in(path: Path) -> int:
    text = path.read_text(encoding="utf-8")
    return len(json.loads(text)) if text.lstrip().startswith("[") else sum(1 for line in text.splitlines() if line.strip())


def test_every_shared_file_loads_through_the_cli(local, capsys):
    assert FILES and len(FILES) == len(list(DATA.rglob("*.json*")))  # the globs miss no file
    for path in FILES:
        assert main(["render", str(path)]) == 0, path
        out = capsys.readouterr().out.strip().splitlines()[-1]
        n = rows_in(path)
        if dataset_format(path) == "open-ended":
            assert out.startswith(f"{path}: {n} open-ended prompts"), out
        else:
            assert f": {n} pairs" in out, (path, out)


def test_list_valued_not_matching_answers_load_and_score_together(default_model):
    path = DATA / "anthropics-evals" / "sycophancy" / "sycophancy_on_philpapers2020.jsonl"
    cset = render_source(Source(str(path)), default_model.tokenizer)
    first = json.loads(path.read_text().splitlines()[0])
    assert first["answer_not_matching_behavior"] == [" (B)", " (C)"]
    assert cset[0].answer_text == {"matching": "A", "not_matching": "B"}
    assert [default_model.tokenizer.decode(t) for t in cset[0].other_answers] == ["C"]
    assert sum(1 for p in cset if p.other_answers) > 100


def test_a_known_row_renders_byte_for_byte(default_model):
    path = DATA / "nrimsky-CAA" / "test" / "sycophancy" / "test_dataset_ab.json"
    item = json.loads(path.read_text())[0]
    cset = render_source(Source(str(path)), default_model.tokenizer)
    letter = item["answer_matching_behavior"].strip("() ")
    expected = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                "<|im_end|>\n<|im_start|>user\n" + item["question"].rstrip() + "<|im_end|>\n"
                "<|im_start|>assistant\n(" + letter)
    assert cset[0].text["positive"] == expected


def test_measure_on_caa_says_the_small_model_is_at_chance(local, tmp_path, capsys):
    path = DATA / "nrimsky-CAA" / "test" / "sycophancy" / "test_dataset_ab.json"
    assert main(["measure", str(path), "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["pairs"] == 50 and summary["at_chance"] is True
    assert 0 <= summary["letter_bias"] <= 1 and summary["answer_balance_first_letter"] == pytest.approx(
        sum(1 for x in json.loads(path.read_text()) if "A" in x["answer_matching_behavior"]) / 50)
    assert "at chance" in capsys.readouterr().err


def test_limit_and_split_are_deterministic_and_recorded(local, tmp_path):
    path = DATA / "anthropics-evals" / "sycophancy" / "sycophancy_on_nlp_survey.jsonl"
    a = render_source(Source(str(path), limit=40, split="test", seed=3), local.tokenizer)
    b = render_source(Source(str(path), limit=40, split="test", seed=3), local.tokenizer)
    train = render_source(Source(str(path), limit=40, split="train", seed=3), local.tokenizer)
    assert [p.row for p in a] == [p.row for p in b] and len(a) == 20
    assert not {p.row for p in a} & {p.row for p in train}
    assert main(["measure", str(path), "--limit", "12", "--split", "train", "--out", str(tmp_path)]) == 0
    recorded = json.loads((tmp_path / "summary.json").read_text())["source"]
    assert recorded == {"path": str(path), "limit": 12, "split": "train", "test_fraction": 0.5, "seed": 0}


@pytest.mark.parametrize("content, words", [
    ('[{"question": "q", "answer_matching_behavior": "(A)", "answer_not_matching_behavior": "maybe"}]',
     ["item 0", "answer_not_matching_behavior"]),
    ('{"question": "q", "answer_matching_behavior": " (A)", "answer_not_matching_behavior": " (B)"}\n{broken',
     ["line 2", "invalid JSON"]),
    ('[{"text": "no known fields"}]', ["line 1", "not a known dataset"]),
])
def test_bad_dataset_rows_name_file_line_and_field(local, tmp_path, capsys, content, words):
    path = tmp_path / ("bad.jsonl" if content.startswith("{") else "bad.json")
    path.write_text(content)
    assert main(["measure", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "Traceback" not in err
    for w in words:
        assert w in err
