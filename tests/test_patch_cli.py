"""The patching stage: run_patch artifacts, resuming from cached layers, and the CLI."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import tiny_family

import behaviorlens.patching.run as run_module
from behaviorlens.cli import main
from behaviorlens.errors import BehaviorLensError
from behaviorlens.patching import patch, run_patch


def test_run_patch_writes_artifacts_and_resumes(tiny_llama, tmp_path, monkeypatch):
    cs = tiny_family().render(tiny_llama.tokenizer)
    monkeypatch.setattr(run_module, "LAYERS_PER_CACHE_FILE", 2)  # 3 layers: two cache files
    summary = run_patch(tiny_llama, cs, out_dir=tmp_path, progress=False)
    for name in ("patching.csv", "patching_means.csv", "heatmap.png", "summary.json"):
        assert (tmp_path / name).is_file()
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert abs(summary["restore_last_layer"] - 1) < 1e-4
    carry, oppose = summary["top_sites"], summary["opposing_sites"]
    assert carry and all(t["metric"] > 0 for t in carry) and all(t["metric"] < 0 for t in oppose)
    assert [t["metric"] for t in carry] == sorted((t["metric"] for t in carry), reverse=True)
    assert all(t["ci"][0] <= t["metric"] <= t["ci"][1] for t in carry + oppose)
    assert 0 <= summary["top_k_stability"] <= 1
    table = pd.read_csv(tmp_path / "patching.csv")
    direct = patch(tiny_llama, cs, progress=False).frame
    assert abs(table["patched"].to_numpy() - direct["patched"].to_numpy()).max() < 1e-6
    assert sorted(f.name for f in (tmp_path / "cache").glob("layers_*.csv")) == [
        "layers_000-001.csv", "layers_002-002.csv"]

    def fail(*a, **k):
        raise AssertionError("a cached layer was recomputed")

    monkeypatch.setattr(run_module, "patch", fail)  # every layer is cached: nothing reruns
    again = run_patch(tiny_llama, cs, out_dir=tmp_path, progress=False)
    assert again["top_sites"] == summary["top_sites"]


def test_run_patch_heads_and_attribution(tiny_llama, tmp_path):
    cs = tiny_family().render(tiny_llama.tokenizer)
    heads = run_patch(tiny_llama, cs, site="head", out_dir=tmp_path / "h", progress=False)
    assert (tmp_path / "h" / "heatmap_heads.png").is_file()
    assert all(t["head"] is not None and t["position_name"] == "last" for t in heads["top_sites"])
    attr = run_patch(tiny_llama, cs, method="attribution", out_dir=tmp_path / "a", verify_k=10, steps=4,
                     progress=False)
    assert attr["attribution_exact_pearson"] > 0.9
    assert -1 <= attr["attribution_exact_spearman"] <= 1
    assert (tmp_path / "a" / "verification.csv").is_file()
    with pytest.raises(BehaviorLensError, match="unknown patching method"):
        run_patch(tiny_llama, cs, method="magic", out_dir=tmp_path / "x")


def test_cli_patch_default_attribution(tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["patch", "capitals_opinion", "--method", "attribution", "--pairs", "2",
                 "--site", "resid_pre", "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"] == 2 and summary["method"] == "attribution"
    assert abs(summary["restore_last_layer"] - 1) < 0.01
    assert "attribution_exact_pearson" in summary
    assert "restore_last_layer" in capsys.readouterr().out


def test_cli_errors_are_one_line(capsys):
    assert main(["patch", "no_such_family_xyz"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("behaviorlens: error:") and err.count("\n") == 1
