"""The report's lie-detector section reads the detect step's files: figures, controls, heatmap."""

import json

import pandas as pd

from behaviorlens.analysis.report import write_report
from behaviorlens.detect.plots import plot_scores, plot_transfer


def test_the_report_shows_the_detector_beside_its_controls_and_the_transfer_heatmap(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model": {"name": "default"}, "experiment": {"name": "t"}}))
    step = tmp_path / "detect"
    (step / "eval").mkdir(parents=True)
    (step / "train").mkdir()
    summary = {"detector": "logistic probe, resid_post layer 16 @ answer", "families": ["a", "b"], "auroc": 0.91,
               "auroc_ci": [0.8, 0.97], "n_lie": 9, "n_honest": 20, "n_mistake": 4, "mistake_auroc": 0.88,
               "mistake_auroc_ci": [0.7, 1.0], "mistake_check": False, "claim_auroc": 0.31, "claim_auroc_ci": [0.2, 0.45], "wording_auroc": 0.55,
               "shuffled_auroc": 0.49, "recall_at_1pct_fpr": 0.44, "chat_fpr": 0.02, "targets_met": False}
    (step / "summary.json").write_text(json.dumps(summary))
    (step / "train" / "summary.json").write_text(json.dumps({"families": ["c", "d"], "n_lie": 13, "n_honest": 65,
                                                               "auroc": 1.0, "auroc_ci": [1.0, 1.0]}))
    scores = pd.DataFrame({"family": ["a"] * 3, "pair": [0, 1, 2], "row": [0, 1, 2], "label": ["lie", "honest", "mistake"],
                           "score": [2.0, -1.0, 1.5], "answer_text": ["x", "y", "z"], "prompt_text": ["p"] * 3})
    plot_scores(scores, 0.5, step / "eval" / "scores.png")
    scores.to_csv(step / "eval" / "most_wrong.csv", index=False)
    pd.DataFrame([{"family": "a", "n_lie": 9, "auroc": 0.91}]).to_csv(step / "eval" / "families.csv", index=False)
    matrix = pd.DataFrame([{"train": t, "test": s, "auroc": 0.5 + 0.1 * i + 0.05 * j}
                           for i, t in enumerate("cd") for j, s in enumerate("cdab")])
    plot_transfer(matrix, step / "transfer" / "transfer.png")
    html = write_report(tmp_path).read_text()
    assert "Telling knowing falsehoods from honest answers" in html
    assert "0.91 [0.8, 0.97]" in html and "0.88 [0.7, 1]" in html  # the AUROC and the mistake check with CIs
    assert "claim-wrongness probe 0.31 [0.2, 0.45]" in html  # a control with its CI
    assert "failed" in html and "transfer matrix" in html
    assert html.count("data:image/png;base64") >= 2  # the scores plot and the heatmap


def test_the_report_leads_with_lies_against_mistakes_and_shows_the_lens_picture(tmp_path):
    from behaviorlens.detect.plots import plot_confidence, plot_lens_trace

    (tmp_path / "config.json").write_text(json.dumps({"model": {"name": "default"}, "experiment": {"name": "t"}}))
    step = tmp_path / "detect"
    (step / "eval").mkdir(parents=True)
    summary = {"detector": "override AND falsity", "families": ["a"], "auroc": 0.9, "auroc_ci": [0.8, 0.95],
               "n_lie": 9, "n_honest": 20, "n_mistake": 31, "lie_vs_mistake_auroc": 0.81,
               "lie_vs_mistake_auroc_ci": [0.7, 0.9], "falsity_lie_vs_mistake_auroc": 0.42,
               "falsity_lie_vs_mistake_auroc_ci": [0.3, 0.55], "lie_vs_mistake_gap": 0.39, "mistake_auroc": 0.5,
               "mistake_auroc_ci": [0.4, 0.6], "mistake_check": True}
    (step / "summary.json").write_text(json.dumps(summary))
    trace = pd.DataFrame([{"label": lab, "family": "a", "row": i, "given": " x", "alternative": " y", "layer": layer,
                           "logp_given": -layer * 0.1, "logp_alternative": -1.0, "lens": "logit"}
                          for i, lab in enumerate(["lie", "honest", "mistake"]) for layer in range(4)])
    plot_lens_trace(trace, step / "eval" / "lens_trace.png")
    plot_confidence(pd.DataFrame({"confidence_unpressured": [0.6, 0.7, 0.95]}), step / "eval" / "mistake_confidence.png")
    html = write_report(tmp_path).read_text()
    finding = html[html.index("Lies against honest mistakes"):]
    assert finding.index("0.81 [0.7, 0.9]") < finding.index("0.42 [0.3, 0.55]") < finding.index("0.9 [0.8, 0.95]")
    assert 'alt="lens_trace"' in html and 'alt="mistake_confidence"' in html


def test_the_transfer_heatmap_adds_the_lie_vs_mistake_panel_and_drops_rows_that_could_not_train(tmp_path):
    import numpy as np
    from matplotlib.image import imread

    def matrix(with_mistakes: bool, untrained: int) -> pd.DataFrame:
        rows = [{"train": t, "test": s, "auroc": np.nan if t == s else 0.7, "n_lie": 5, "n_honest": 6, "n_mistake": 4,
                 "lie_vs_mistake_auroc": 0.6 if with_mistakes and t != s else np.nan} for t in "ab" for s in "abcd"]
        rows += [{"train": f"u{k}", "test": s, "auroc": np.nan} for k in range(untrained) for s in "abcd"]
        return pd.DataFrame(rows)

    def height(m: pd.DataFrame, name: str) -> int:
        return imread(plot_transfer(m, tmp_path / f"{name}.png")).shape[0]

    one = height(matrix(False, 0), "one")
    assert height(matrix(True, 0), "two") > 1.5 * one  # lie vs mistake drawn below lie vs honest
    assert height(matrix(False, 6), "untrained") == one  # six rows with nothing to show take no room
