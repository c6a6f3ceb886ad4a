"""Whole experiments on a tiny saved model: determinism, resume after interruption, report."""

from __future__ import annotations

import json
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from behaviorlens.experiment import Runner, load_experiment

STEPS = {
    "measure": {},
    "probe": {"methods": ["mean_diff", "logistic"], "folds": 2},
    "patch": {"pairs": 3, "attribution": True},
}


def steer_step(root: Path) -> dict:
    """The steer step with side-effect data in the tiny model's words."""
    (root / "neutral.yaml").write_text(yaml.safe_dump({"prompts": ["w3 w4 w5 w6", "w40 w41 w42", "w7 w8 w9 w33",
                                                                   "w36 w37 w38", "w52 w53", "w61 w62 w63"]}))
    (root / "reference.txt").write_text(" ".join(f"w{30 + i % 60}" for i in range(600)))
    (root / "factual.yaml").write_text(yaml.safe_dump({
        "name": "tiny_factual", "chat": False, "user": "w5 {{ q }} {{ s }}",
        "valence": {"s": {"positive": "w8", "negative": "w8"}},
        "answers": {"matching": " w50", "not_matching": " w51"}, "rows": [{"q": f"w{60 + i}"} for i in range(8)]}))
    (root / "context.yaml").write_text(yaml.safe_dump({
        "name": "tiny_context", "chat": False, "user": "w5 {{ q }} w52 {{ s }}",
        "valence": {"s": {"positive": "w46", "negative": "w46"}},
        "answers": {"matching": " w52", "not_matching": " w53"},
        "rows": [{"q": f"w{60 + i}", "style": "claim_recall" if i % 2 else "passage"} for i in range(8)]}))
    (root / "fillers.yaml").write_text(yaml.safe_dump({"sentences": ["w70 w71", "w72", "w73 w74 w75"]}))
    return {"candidates": ["vector", "head ablation"], "controls": 5, "eval_family": str(root / "fam_b.yaml"),
            "side_effects": {"neutral": str(root / "neutral.yaml"), "reference": str(root / "reference.txt"),
                             "factual": str(root / "factual.yaml"), "context": str(root / "context.yaml"),
                             "fillers": str(root / "fillers.yaml")}}


@pytest.fixture(scope="module")
def experiment_file(tmp_path_factory):
    from steering_helpers import planted_model

    root = tmp_path_factory.mktemp("exp")
    model = planted_model()
    model.hf.save_pretrained(root / "model")
    model.tokenizer.save_pretrained(root / "model")
    words = [f"w{i}" for i in range(30, 90)]
    rows = [{"a": words[i], "b": words[i + 20]} for i in range(20)]
    for name in ("fam_a", "fam_b"):
        (root / f"{name}.yaml").write_text(yaml.safe_dump({
            "name": name, "chat": False, "user": "w5 {{ a }} w6 {{ b }} w7{{ s }}",
            "valence": {"s": {"positive": " w44", "negative": " w45", "neutral": ""}},
            "answers": {"matching": " w50", "not_matching": " w51"}, "rows": rows[:12] if name == "fam_b" else rows,
        }))
    path = root / "exp.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny_study", "question": "Does it work end to end?",
        "model": {"name": str(root / "model")}, "seed": 3, "batch_size": 4,
        "families": {"train": str(root / "fam_a.yaml"), "test": [str(root / "fam_b.yaml")]},
        "predictions": [{"what": "top head", "key": "patch.heads_top_cell", "equals": "L2H0"},
                        {"what": "pressure removed", "key": "steer.pressure_removed_fraction", "at_least": 0.0}],
        "steps": {**STEPS, "steer": steer_step(root)},
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
    for section in ("Findings", "Families and example pairs", "(measure)", "(probes)", "(patching)", "(steering)",
                    "Every candidate", "Predictions stated before the run"):
        assert section in html, section
    assert "{&#34;" not in html and '{"' not in html.split("<body>")[1]  # no JSON blobs in cells
    summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert summary["predictions"]["written_before_the_run"] is True
    assert {r["key"] for r in summary["predictions"]["results"]} == {"patch.heads_top_cell",
                                                                     "steer.pressure_removed_fraction"}
    steer = summary["steer"]
    for key in ("pressure_removed_fraction", "collapse", "accuracy_neutral", "random_control_pressure_removed_fraction_sd"):
        assert key in steer
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


def test_a_changed_upstream_step_reruns_what_reads_it(experiment_file, tmp_path, monkeypatch):
    _run(experiment_file, tmp_path / "r")
    data = yaml.safe_load(experiment_file.read_text())
    data["steps"]["patch"]["pairs"] = 4  # the steer step reads the patching result
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(data))
    ran = []

    def refuse(self, folder, params):
        raise AssertionError("a step that did not change ran again")

    original_steer = Runner._steer
    monkeypatch.setattr(Runner, "_measure", refuse)
    monkeypatch.setattr(Runner, "_probe", refuse)
    monkeypatch.setattr(Runner, "_steer", lambda self, f, p: ran.append("steer") or original_steer(self, f, p))
    Runner(load_experiment(changed), tmp_path / "r", log=lambda _: None).run()
    assert ran == ["steer"]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class _Images(HTMLParser):
    """The <img> tags of a dumped DOM (their attributes) and the body's attributes."""

    def __init__(self):
        super().__init__()
        self.images, self.body = [], {}

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))
        elif tag == "body":
            self.body = dict(attrs)


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                    reason="the browser check needs Debian's chromium (.ci/run installs it; CI never skips)")
def test_report_opens_in_a_real_browser(experiment_file, tmp_path):
    """Headless Chromium loads the report: every section is there, every image decodes, the page
    logs no console error, and every figure is shown at the width it was drawn at (natural width
    = shown width x the stated pixel ratio), so its smallest text, recorded in the PNG when it was
    saved, reaches the page at least as large as the body text."""
    import base64
    import io
    import subprocess

    from PIL import Image

    from behaviorlens import figures as plots

    assert CHROMIUM is not None, "CI must have chromium: .ci/run installs it"
    _run(experiment_file, tmp_path / "r")
    report = tmp_path / "r" / "report.html"
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", "--window-size=1280,1000",
         "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", report.as_uri()],
        check=True, capture_output=True, text=True, timeout=180,
    )
    dom = done.stdout
    for section in ("findings", "measure", "probe", "patch", "steer", "families", "setup"):
        assert f'id="{section}"' in dom, section
    images = dom.count("<img ")
    assert images >= 6 and f'data-images="{images}/{images}"' in dom  # every image decoded
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line and "report.html" in line]
    assert not console, console

    parsed = _Images()
    parsed.feed(dom)
    body_px = float(parsed.body["data-body-font-px"])  # the body text size the browser used
    assert body_px >= 12
    checked = set()
    for img in parsed.images:
        png = Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1])))
        natural, shown = float(img["data-natural-width"]), float(img["data-shown-width"])
        assert natural == png.width
        # drawn at the width it is shown at: the figure's stated CSS width, at the stated pixel ratio
        assert shown == pytest.approx(float(png.text[plots.WIDTH_KEY]), abs=1), (img["alt"], shown)
        assert natural / shown == pytest.approx(plots.PIXEL_RATIO, rel=0.01), (img["alt"], natural, shown)
        # the smallest text set in the figure, as the page shows it (pt -> image px -> CSS px)
        smallest_px = float(png.text[plots.MIN_FONT_KEY]) * png.info["dpi"][0] / 72 * shown / natural
        assert smallest_px >= body_px - 0.05, (img["alt"], smallest_px, body_px)
        checked.add(img["alt"])
    assert {"choice / pareto", "resid / heatmap", "heads / heatmap heads"} <= checked  # the Pareto plot, the heatmaps


def test_a_remote_run_records_what_each_step_sent_within_its_request_budget(experiment_file, tmp_path):
    raw = yaml.safe_load(experiment_file.read_text())
    raw.pop("predictions")
    local = tmp_path / "local.yaml"
    local.write_text(yaml.safe_dump(raw))
    raw["model"]["remote"] = "local"
    remote = tmp_path / "remote.yaml"
    remote.write_text(yaml.safe_dump(raw))
    _run(remote, tmp_path / "remote")
    _run(local, tmp_path / "local")
    sent = {step: json.loads((tmp_path / "remote" / step / "summary.json").read_text()) for step in raw["steps"]}
    # The budget follows from the sessions: measure and probe send one request per family (every
    # side's batches, every batch's reads); patch one per exact sweep of up to 16 layers and one
    # for its whole-residual restore, for resid and heads, and attribution 5 (its two sides, the
    # gradient trace, the exact check of its top cells, the restore). Steer 10: the greedy
    # continuations of its side-effect data (1: both parts' chat and plain batches), head means (1,
    # and 1 per refit), the pairs it must find a behavior on before building or scoring anything (1
    # each for choosing and evaluating), the steering vector's collection (1), one session for
    # judging every candidate with its controls, nulls and the mechanism test, one for the refits,
    # and one for the evaluation with its controls and side effects (the reference text's
    # log-likelihood computed there, one number per chunk back).
    assert {step: s["remote_requests"] for step, s in sent.items()} == {"measure": 2, "probe": 2, "patch": 9,
                                                                        "steer": 10}
    assert all(s["remote_bytes"] > 1000 * s["remote_requests"] for s in sent.values())
    remote_tables, local_tables = _tables(tmp_path / "remote"), _tables(tmp_path / "local")
    assert remote_tables.keys() == local_tables.keys()
    for name in ("steer/choice/candidates.csv", "steer/eval/steering.csv", "steer/choice/refits.csv"):
        a, b = remote_tables[name], local_tables[name]
        numbers = [c for c in a.columns if a[c].dtype.kind == "f"]
        assert numbers and np.allclose(a[numbers], b[numbers], atol=1e-4, equal_nan=True), name
    assert "remote_requests" not in json.loads((tmp_path / "local" / "measure" / "summary.json").read_text())

