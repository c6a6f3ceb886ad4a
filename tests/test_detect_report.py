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
               "mistake_auroc_ci": [0.7, 1.0], "mistake_check": False, "claim_auroc": 0.31, "wording_auroc": 0.55,
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
    assert "failed" in html and "transfer matrix" in html
    assert html.count("data:image/png;base64") >= 2  # the scores plot and the heatmap
