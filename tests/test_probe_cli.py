"""``behaviorlens probe`` end to end on a tiny saved model and plain-text family files."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml
from conftest import probe_family, tiny_model

from behaviorlens.cli import main
from behaviorlens.probing import activations as A
from behaviorlens.probing import run_probe


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny llama saved as a model folder, and two family YAML files."""
    root = tmp_path_factory.mktemp("probe_cli")
    model = tiny_model("llama")
    model.hf.save_pretrained(root / "model")
    model.tokenizer.save_pretrained(root / "model")
    for name, kw in {"fam_a": {}, "fam_b": {"filler": "w9"}}.items():
        fam = probe_family(name, n=6, **kw)
        data = {k: getattr(fam, k) for k in ("name", "chat", "user", "valence", "answers", "rows")}
        (root / f"{name}.yaml").write_text(yaml.safe_dump(data))
    return root


def test_cli_writes_tables_plots_and_summary(saved, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["probe", str(saved / "fam_a.yaml"), "--model", str(saved / "model"), "--test",
               str(saved / "fam_b.yaml"), "--sites", "resid_post", "head", "--positions", "s:mean",
               "--methods", "mean_diff", "pca", "--folds", "3", "--out", str(out)])
    assert rc == 0
    for f in ("probes.csv", "generalization.csv", "probe_auroc.png", "probe_heads.png", "transfer.png",
              "summary.json"):
        assert (out / f).stat().st_size > 0, f
    summary = json.loads((out / "summary.json").read_text())
    for key in ("best_site", "best_layer", "best_auroc", "control_auroc", "transfer_auroc"):
        assert key in summary
    assert set(summary["transfer_auroc"]) == {"fam_b"}
    probes = pd.read_csv(out / "probes.csv")
    # 3 layers x 2 methods for resid_post, times 4 heads for head
    assert len(probes) == 3 * 2 * (1 + 4)
    assert set(probes["position"]) == {"s:mean"} and probes[probes["site"] == "head"]["head"].max() == 3
    best = probes.sort_values("auroc_mean", ascending=False).iloc[0]
    assert summary["best_auroc"] == pytest.approx(best["auroc_mean"])
    assert summary["control_auroc"] == pytest.approx(best["control_auroc"])
    gen = pd.read_csv(out / "generalization.csv")
    assert len(gen) == 4
    row = gen[(gen["train"] == "fam_a") & (gen["test"] == "fam_b")].iloc[0]
    assert summary["transfer_auroc"]["fam_b"] == pytest.approx(row["auroc"])
    assert "fam_a: best" in capsys.readouterr().out


def test_cli_reports_user_errors(saved, tmp_path, capsys):
    rc = main(["probe", str(saved / "fam_a.yaml"), "--model", str(saved / "model"), "--methods", "svm",
               "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "--methods: invalid choice: 'svm'" in err and len(err.strip().splitlines()) == 1
    rc = main(["probe", str(saved / "fam_a.yaml"), "--model", str(saved / "model"), "--positions", "nope",
               "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "no position named 'nope'" in err and len(err.strip().splitlines()) == 1


def test_rerun_resumes_from_cached_activations(tmp_path, monkeypatch):
    model = tiny_model("llama")
    cset = probe_family("fam_a", n=6).render(model.tokenizer)
    first = run_probe(model, cset, {}, methods=("mean_diff",), folds=3, out_dir=tmp_path, batch_size=2,
                      progress=False)

    def refuse(*args):
        raise AssertionError("a finished batch was recomputed")

    monkeypatch.setattr(A, "read_planned", refuse)
    again = run_probe(model, cset, {}, methods=("mean_diff",), folds=3, out_dir=tmp_path, batch_size=2,
                      progress=False)
    assert again == first and again["transfer_auroc"] == {}


def test_transfer_falls_back_to_a_position_every_family_has(tmp_path):
    from behaviorlens.prompts import PromptFamily

    model = tiny_model("llama")
    train = probe_family("fam_a", n=6).render(model.tokenizer)
    other = PromptFamily.from_dict({
        "name": "fam_t", "chat": False, "user": "w5 w6 {{ t }} w7 w8 w{{ i }}",
        "valence": {"t": {"positive": "w50 w52", "negative": "w51 w53"}},
        "answers": {"matching": " w60", "not_matching": " w61"},
        "rows": [{"i": 70 + i} for i in range(6)],
    }).render(model.tokenizer)
    summary = run_probe(model, train, {"fam_t": other}, positions=("s:mean", "last"), methods=("mean_diff",),
                        folds=3, out_dir=tmp_path, batch_size=3, progress=False)
    assert summary["best_position"] == "s:mean"  # a slot fam_t lacks
    assert summary["transfer_probe"].endswith("@ last") and set(summary["transfer_auroc"]) == {"fam_t"}
