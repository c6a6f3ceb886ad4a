"""Whole experiments on a tiny saved model: determinism, resume after interruption, report."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import tiny_model

from behaviorlens.experiment import Runner, load_experiment

STEPS = {
    "measure": {},
    "probe": {"methods": ["mean_diff", "logistic"], "folds": 2},
    "patch": {"pairs": 3, "attribution": True},
}  # steering needs real words for its side-effect data: the demo test covers it


@pytest.fixture(scope="module")
def experiment_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    model = tiny_model("llama")
    model.hf.save_pretrained(root / "model")
    model.tokenizer.save_pretrained(root / "model")
    words = [f"w{i}" for i in range(30, 90)]
    rows = [{"a": words[i], "b": words[i + 20], "x": words[i + 40]} for i in range(8)]
    for name, (pos, neg) in {"fam_a": ("w10", "w11"), "fam_b": ("w12", "w13")}.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump({
            "name": name, "chat": False, "user": "w5 {{ a }} {{ s }} {{ b }} w6",
            "valence": {"s": {"positive": pos, "negative": neg}},
            "answers": {"matching": "{{ x }}", "not_matching": "w7"}, "rows": rows,
        }))
    path = root / "exp.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny_study", "question": "Does it work end to end?",
        "model": {"name": str(root / "model")}, "seed": 3, "batch_size": 4,
        "families": {"train": str(root / "fam_a.yaml"), "test": [str(root / "fam_b.yaml")]},
        "steps": STEPS,
    }))
    return path


def _tables(folder: Path) -> dict[str, pd.DataFrame]:
    return {
        str(p.relative_to(folder)): pd.read_csv(p)
        for p in sorted(folder.rglob("*.csv"))
        if "cache" not in p.parts and "activations" not in p.parts
    }


def _run(path, out, **kw):
    Runner(load_experiment(path), out, log=lambda _: None, **kw).run()


def test_same_seed_gives_identical_tables_and_a_full_report(experiment_file, tmp_path):
    _run(experiment_file, tmp_path / "one")
    _run(experiment_file, tmp_path / "two")
    one, two = _tables(tmp_path / "one"), _tables(tmp_path / "two")
    assert set(one) == set(two) and len(one) >= 6
    for name in one:
        pd.testing.assert_frame_equal(one[name], two[name], check_exact=True, obj=name)
    html = (tmp_path / "one" / "report.html").read_text()
    for section in ("Families and example pairs", "Behavior measurement", "(probes)", "(patching)"):
        assert section in html
    pngs = list((tmp_path / "one").rglob("*.png"))
    assert len(pngs) >= 4 and html.count("data:image/png;base64,") == len(pngs)
    assert "http" not in html.replace("http-equiv", "")  # self-contained: nothing to fetch


def test_interrupted_run_resumes_to_the_same_tables(experiment_file, tmp_path, monkeypatch):
    _run(experiment_file, tmp_path / "full")

    def crash(self, folder, params):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Runner, "_patch", crash)
        with pytest.raises(KeyboardInterrupt):
            _run(experiment_file, tmp_path / "resumed")
    assert (tmp_path / "resumed" / "probe" / "summary.json").exists()
    assert not (tmp_path / "resumed" / "patch" / "summary.json").exists()

    def refuse(self, folder, params):
        raise AssertionError("a finished step ran again")

    with monkeypatch.context() as m:
        m.setattr(Runner, "_measure", refuse)
        m.setattr(Runner, "_probe", refuse)
        _run(experiment_file, tmp_path / "resumed")
    full, resumed = _tables(tmp_path / "full"), _tables(tmp_path / "resumed")
    assert set(full) == set(resumed)
    for name in full:
        pd.testing.assert_frame_equal(full[name], resumed[name], check_exact=True, obj=name)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="the browser check runs where Debian's chromium is installed")
def test_report_opens_in_a_real_browser(experiment_file, tmp_path):
    import subprocess

    chromium = CHROMIUM

    _run(experiment_file, tmp_path / "r")
    shot = tmp_path / "shot.png"
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
         (tmp_path / "r" / "report.html").as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
