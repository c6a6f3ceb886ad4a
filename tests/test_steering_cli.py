"""``behaviorlens steer ...`` end to end on a tiny model saved to a folder."""

from __future__ import annotations

import yaml

from behaviorlens.cli import main
from behaviorlens.steering import Edit
from behaviorlens.steering.gguf_export import read_gguf


def _setup(tmp_path, model):
    folder = tmp_path / "tiny"
    model.hf.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    fam = {
        "name": "tiny_cli", "behavior": "test", "chat": False,
        "user": "w5 {{ a }} w6 {{ s }} w7 w8",
        "valence": {"s": {"positive": "w44", "negative": "w45"}},
        "answers": {"matching": " w50", "not_matching": " w51"},
        "rows": [{"a": f"w{60 + i}"} for i in range(6)],
    }
    (tmp_path / "fam.yaml").write_text(yaml.safe_dump(fam))
    return str(folder), str(tmp_path / "fam.yaml")


def test_train_export_edit_generate(tiny_llama, tmp_path, capsys):
    folder, fam = _setup(tmp_path, tiny_llama)
    edit_path = str(tmp_path / "e.safetensors")
    assert main(["steer", "train", fam, "--layer", "1", "--out", edit_path, "--model", folder]) == 0
    edit = Edit.load(edit_path)
    assert edit.kind == "vector" and edit.layers == [1] and edit.family == "tiny_cli"
    assert main(["steer", "export", edit_path, "--gguf", str(tmp_path / "cv.gguf")]) == 0
    assert sorted(read_gguf(tmp_path / "cv.gguf")) == [1]
    abl = str(tmp_path / "a.safetensors")
    assert main(["steer", "train", fam, "--layer", "1", "--kind", "ablate_direction", "--out", abl,
                 "--model", folder]) == 0
    assert main(["steer", "edit", abl, "--out", str(tmp_path / "baked"), "--model", folder]) == 0
    assert (tmp_path / "baked" / "config.json").is_file()
    capsys.readouterr()
    assert main(["steer", "generate", edit_path, "--prompt", "w5 w6 w7", "--strengths", "-4", "0", "4",
                 "--max-new-tokens", "4", "--model", folder]) == 0
    out = capsys.readouterr().out
    assert "[x-4]" in out and "[unedited]" in out and "[x+4]" in out


def test_generate_reads_a_text_prompts_file_one_prompt_a_line_and_an_open_ended_dataset(tiny_llama, tmp_path, capsys):
    import json

    folder, fam = _setup(tmp_path, tiny_llama)
    edit_path = str(tmp_path / "e.safetensors")
    assert main(["steer", "train", fam, "--layer", "1", "--out", edit_path, "--model", folder]) == 0
    text = tmp_path / "prompts.txt"
    text.write_text("w5 w6 w7\n\nw8 w9\n")  # blank lines are no prompts
    dataset = tmp_path / "open_ended.json"
    dataset.write_text(json.dumps([{"question": "w10 w11"}, {"question": "w12"}]))
    for path, prompts in ((text, ["w5 w6 w7", "w8 w9"]), (dataset, ["w10 w11", "w12"])):
        capsys.readouterr()
        assert main(["steer", "generate", edit_path, "--prompts-file", str(path), "--max-new-tokens", "2",
                     "--model", folder]) == 0
        shown = [line for line in capsys.readouterr().out.splitlines() if line.startswith("=== ")]
        assert shown == [f"=== {p!r}" for p in prompts]
    (tmp_path / "empty.txt").write_text("\n \n")
    assert main(["steer", "generate", edit_path, "--prompts-file", str(tmp_path / "empty.txt"), "--model", folder]) == 2
    assert "empty.txt: no prompts" in capsys.readouterr().err


def test_user_errors_exit_2(tiny_llama, tmp_path, capsys):
    folder, fam = _setup(tmp_path, tiny_llama)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 10)
    assert main(["steer", "export", str(tmp_path / "bad.safetensors"), "--gguf", str(tmp_path / "x.gguf")]) == 2
    assert main(["steer", "train", fam, "--out", str(tmp_path / "e.safetensors"), "--model", folder,
                 "--layer", "99"]) == 2
    err = capsys.readouterr().err
    assert "behaviorlens: error:" in err and "layer 99" in err


def test_eval_averages_the_requested_number_of_controls(tiny_llama, tmp_path, monkeypatch, capsys):
    import json

    from steering_helpers import planted_model, tiny_side_effects

    import behaviorlens.steering.evaluate as ev

    model = planted_model()
    side = tiny_side_effects(model)  # token ids only: the saved copy has the same tokenizer
    monkeypatch.setattr(ev, "SideEffectData", lambda m, half: side)
    folder = tmp_path / "planted"
    model.hf.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    fam = tmp_path / "planted.yaml"
    fam.write_text(yaml.safe_dump({
        "name": "planted", "chat": False, "user": "w5 {{ a }} w6 w7{{ s }}",
        "valence": {"s": {"positive": " w44", "negative": " w45", "neutral": ""}},
        "answers": {"matching": " w50", "not_matching": " w51"}, "rows": [{"a": f"w{60 + i}"} for i in range(10)]}))
    edit_path = str(tmp_path / "e.safetensors")
    assert main(["steer", "train", str(fam), "--layer", "2", "--out", edit_path, "--model", str(folder)]) == 0
    out = tmp_path / "eval"
    assert main(["steer", "eval", edit_path, str(fam), "--strengths", "-2", "--controls", "2",
                 "--out", str(out), "--model", str(folder)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["random_controls"] == 2
    assert summary["random_control_pressure_removed_fraction_sd"] >= 0
    assert "pressure_removed_fraction" in capsys.readouterr().out
