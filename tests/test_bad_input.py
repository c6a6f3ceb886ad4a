"""The README's table of bad inputs: each gets one clear line, exit status 2, no traceback.

Every row runs the real command line (``behaviorlens.cli.main``) on a real bad input, except
the out-of-memory row, which simulates CUDA running out of memory on this CPU-only machine.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from behaviorlens import BehaviorLensError
from behaviorlens.batching import map_batches
from behaviorlens.cli import main

FAMILY = {
    "name": "fam",
    "user": "{{ opinion }}What is the capital of {{ country }}?",
    "assistant_prefix": "The capital of {{ country }} is",
    "valence": {"opinion": {"positive": "I think it is {{ wrong }}. ", "negative": "I think it is {{ right }}. "}},
    "answers": {"matching": " {{ wrong }}", "not_matching": " {{ right }}"},
    "rows": [{"country": "France", "right": "Paris", "wrong": "Berlin"},
             {"country": "Italy", "right": "Rome", "wrong": "Madrid"},
             {"country": "Japan", "right": "Tokyo", "wrong": "Beijing"},
             {"country": "Spain", "right": "Madrid", "wrong": "Rome"}],
}
EXPERIMENT = {"name": "e", "families": {"train": "capitals_opinion"}, "steps": {"measure": {}}}


def family(tmp_path, **change):
    data = {**FAMILY, **change}
    path = tmp_path / "fam.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def experiment(tmp_path, name="exp.yaml", **change):
    path = tmp_path / name
    path.write_text(yaml.safe_dump({**EXPERIMENT, **change}))
    return str(path)


def vector_file(tmp_path, width=576, truncate=False):
    from behaviorlens.steering import Edit

    path = tmp_path / "vec.safetensors"
    Edit(kind="vector", vectors={3: torch.ones(width)}, model="m", d_model=width).save(path)
    if truncate:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return str(path)


def results_of_other_experiment(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"fingerprint": "another-experiment"}))
    return str(out)


def nan_model(tmp_path):
    """A tiny model saved to a folder whose second layer produces NaN."""
    from conftest import tiny_model

    m = tiny_model("llama")
    with torch.no_grad():
        m.sites.mlp_out_proj(m.hf, 1).weight.fill_(float("nan"))
    folder = tmp_path / "nan-model"
    m.hf.save_pretrained(folder)
    m.tokenizer.save_pretrained(folder)
    return str(folder)


def tiny_family(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "chat": False, "user": "w5 w6 {{ s }} w7 w8",
        "valence": {"s": {"positive": "w10", "negative": "w11"}},
        "answers": {"matching": " w20", "not_matching": " w21"}, "rows": [{}] * 4,
    }))
    return str(path)


# every command that writes results, without its --out
OUT_COMMANDS = [
    ["measure", "capitals_opinion"],
    ["probe", "capitals_opinion"],
    ["patch", "capitals_opinion"],
    ["steer", "eval", "edit.safetensors", "capitals_opinion"],
    ["run", "sycophancy"],
]

# (id, argv built from tmp_path, words the one-line message must contain)
CASES = [
    ("yaml syntax error", lambda t: ["render", _write(t, "bad.yaml", "name: x\nuser: [unclosed\n")],
     ["bad.yaml line", "YAML syntax error"]),
    ("unknown field", lambda t: ["render", family(t, colour="red")], ["unknown field", "colour"]),
    ("missing template variable", lambda t: ["render", family(t, user="{{ opinion }}Capital of {{ land }}?")],
     ["fam", "land"]),
    ("unknown slot", lambda t: ["render", family(t, valence={"mood": {"positive": "a", "negative": "b"}})],
     ["slot 'mood'"]),
    ("empty family", lambda t: ["render", family(t, rows=[])], ["empty"]),
    ("misaligned pair", lambda t: ["render", family(t, rows=[{"country": "France", "right": "Paris",
                                                               "wrong": "Ouagadougou"}])],
     ["row 0", "slot 'opinion'", "misaligned"]),
    ("identical answers", lambda t: ["render", family(t, answers={"matching": " {{ right }}",
                                                                   "not_matching": " {{ right }}"})],
     ["row 0", "same token"]),
    ("answer with no tokens", lambda t: ["render", family(t, answers={"matching": "", "not_matching": " x"})],
     ["row 0", "matching", "no tokens"]),
    ("unknown built-in family", lambda t: ["measure", "capitals_opinon"], ["unknown family", "capitals_opinon"]),
    ("unknown model", lambda t: ["info", "--model", "no-such-org/no-such-model"],
     ["cannot load model", "no-such-org/no-such-model"]),
    ("unknown dtype", lambda t: ["info", "--dtype", "float8"], ["unknown dtype", "float8"]),
    ("layer the model lacks", lambda t: ["steer", "train", "capitals_opinion", "--layer", "31",
                                         "--out", str(t / "e.safetensors")],
     ["layer 31 does not exist", "0..29"]),
    ("head index out of range", lambda t: ["steer", "eval", heads_file(t, head=12), "capitals_opinion",
                                           "--out", str(t / "o")], ["head 12 does not exist", "0..8"]),
    ("patching an unaligned set", lambda t: ["patch", family(t, rows=[{"country": "France", "right": "Paris",
                                                                       "wrong": "Ouagadougou"}])],
     ["misaligned"]),
    ("vector width mismatch", lambda t: ["steer", "eval", vector_file(t, width=64), "capitals_opinion",
                                         "--out", str(t / "o")], ["width", "576"]),
    ("truncated vector file", lambda t: ["steer", "eval", vector_file(t, truncate=True), "capitals_opinion",
                                         "--out", str(t / "o")], ["vec.safetensors"]),
    ("experiment with an unknown step", lambda t: ["run", experiment(t, steps={"dance": {}})],
     ["steps: unknown key 'dance'", "keys are circuit"]),
    ("experiment with an unknown key", lambda t: ["run", experiment(t, modle="default")],
     ["unknown key", "modle"]),
    ("output folder not writable", lambda t: ["measure", "capitals_opinion", "--out", _file(t) + "/sub"],
     ["cannot write", "a-file/sub", "Not a directory"]),
    ("results folder of another experiment", lambda t: ["run", experiment(t), "--out", results_of_other_experiment(t)],
     ["different experiment"]),
    ("NaN in activations", lambda t: ["probe", tiny_family(t), "--model", nan_model(t), "--out", str(t / "p")],
     ["row 0", "NaN or inf", "layer 1"]),
    ("family file that is not UTF-8", lambda t: ["measure", _write_bytes(t, "latin.yaml", "name: caf\xe9\n".encode("latin-1"))],
     ["latin.yaml", "not UTF-8"]),
    ("no pairs to patch", lambda t: ["patch", "capitals_opinion", "--pairs", "0", "--out", str(t / "p")],
     ["--pairs 0", "at least one pair"]),
    ("a selection that leaves no pairs", lambda t: ["measure", "capitals_opinion", "--limit", "1", "--split", "train",
                                                    "--out", str(t / "m")], ["capitals_opinion", "leaves no pairs"]),
    ("a dataset in no known format", lambda t: ["render", _write(t, "odd.json", '[{"text": "x"}]')],
     ["odd.json line 1", "not a known dataset"]),
    *[(f"{' '.join(cmd[:2])}: output below a file", lambda t, cmd=cmd: [*cmd, "--out", _file(t) + "/sub"],
       ["cannot write", "a-file/sub"]) for cmd in OUT_COMMANDS],
    *[(f"{' '.join(cmd[:2])}: output on a read-only file system", lambda t, cmd=cmd: [*cmd, "--out", "/sys/behaviorlens-x"],
       ["cannot write", "/sys/behaviorlens-x"]) for cmd in OUT_COMMANDS],
    ("experiment with an unknown remote", lambda t: ["run", experiment(t, model={"name": "default", "remote": "cloud"})],
     ["model.remote", "cloud", "local, ndif"]),
    ("NDIF for a local model", lambda t: ["info", "--remote"], ["--remote", "Hugging Face id", "--remote local"]),
    ("a memory size that is not one", lambda t: ["info", "--max-memory", "lots"],
     ["--max-memory", "'lots'", "40GiB"]),
    ("NDIF without a key", lambda t: ["info", "--model", "meta-llama/Llama-3.1-70B", "--remote"],
     ["no NDIF API key", "NDIF_API_KEY"]),
]


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _write_bytes(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def _file(tmp_path):
    return _write(tmp_path, "a-file", "not a folder")


def heads_file(tmp_path, head):
    from behaviorlens.steering import Edit

    path = tmp_path / "heads.safetensors"
    Edit(kind="heads", heads={3: [head]}, head_mode="zero", model="m", d_model=576, n_heads=9,
         head_dim=64).save(path)
    return str(path)


@pytest.mark.parametrize("case, argv, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_clear_line_and_status_2(tmp_path, capsys, monkeypatch, case, argv, words):
    import nnsight

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", None)  # "NDIF without a key" on any machine
    args = argv(tmp_path)
    capsys.readouterr()  # what building the bad input printed is not the CLI's output
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]  # a progress bar may come before it
    assert line.startswith("behaviorlens: error: ") and err.count("behaviorlens: error") == 1, err
    for w in words:
        assert w in line, (w, err)


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(BehaviorLensError):
        main(["--debug", "render", family(tmp_path, rows=[])])


def test_cuda_out_of_memory_halves_the_batch_and_says_so_once():
    seen, said = [], []

    def run(idx):
        seen.append(len(idx))
        if len(idx) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return list(idx)

    out = map_batches(10, 16, run, log=said.append)
    assert [i for batch in out for i in batch] == list(range(10))  # nothing lost, in order
    assert seen[:3] == [10, 8, 4] and max(seen[3:]) <= 2
    assert len(said) == 1 and "batch size" in said[0]
