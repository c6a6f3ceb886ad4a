"""Behavior labels: from the metric with a margin, from generated text, on a rendered family."""

import numpy as np
import pytest
from conftest import tiny_tokenizer

from behaviorlens.detect.labels import (
    answer_in_text,
    label_counts,
    label_table,
    labels_from_metrics,
)
from behaviorlens.errors import BehaviorLensError
from behaviorlens.prompts.family import PromptFamily

# metric = log p(wrong) - log p(right): < 0 is right
PRESSURED = np.array([2.0, -2.0, 0.3, 2.0, -2.0, 2.0, -0.2, 0.7])
REFERENCE = np.array([-2.0, -2.0, -2.0, 2.0, 2.0, 0.1, -3.0, -0.7])


def test_labels_from_the_metric_with_a_margin():
    got = labels_from_metrics(PRESSURED, REFERENCE, margin=0.5)
    assert list(got) == ["lie", "honest", "unsure", "mistake", "unsure", "unsure", "unsure", "lie"]


def test_a_zero_margin_leaves_nothing_unsure_but_corrections():
    got = labels_from_metrics(PRESSURED, REFERENCE, margin=0.0)
    # row 4: wrong without pressure, right with it: no label fits, so unsure
    assert list(got) == ["lie", "honest", "lie", "mistake", "unsure", "mistake", "honest", "lie"]


def test_bad_margin_and_shapes_are_one_clear_error():
    with pytest.raises(BehaviorLensError, match="margin"):
        labels_from_metrics(PRESSURED, REFERENCE, margin=-1)
    with pytest.raises(BehaviorLensError, match="one reference metric"):
        labels_from_metrics(PRESSURED, REFERENCE[:3])


def test_answers_in_generated_text():
    assert answer_in_text("The capital of France is Paris.", " Paris", " Berlin") == "right"
    assert answer_in_text("It is berlin, I think", " Paris", " Berlin") == "wrong"
    assert answer_in_text("Paris, not Berlin", " Paris", " Berlin") == "unsure"
    assert answer_in_text("A Parisian café", " Paris", " Berlin") == "unsure"


def test_label_table_uses_the_neutral_side_and_the_answer_given():
    family = PromptFamily.from_dict({
        "name": "toy", "chat": False, "user": "w10 {{ claim }}w11 {{ q }}",
        "valence": {"claim": {"positive": "w20 {{ wrong }} ", "negative": "w20 {{ right }} ", "neutral": ""}},
        "answers": {"matching": " {{ wrong }}", "not_matching": " {{ right }}"},
        "rows": [{"q": f"w{30 + i}", "right": f"w{40 + i}", "wrong": f"w{50 + i}"} for i in range(3)],
    })
    cset = family.render(tiny_tokenizer())
    metrics = {"positive": np.array([1.0, -1.0, 1.0]), "negative": np.array([-5.0, -5.0, -5.0]),
               "neutral": np.array([-1.0, -1.0, 1.0])}
    table = label_table(cset, metrics, margin=0.5)
    assert list(table["reference"].unique()) == ["neutral"]
    assert list(table["label"]) == ["lie", "honest", "mistake"]
    assert list(table["model_answer"]) == ["matching", "not_matching", "matching"]
    counts = label_counts(table).set_index("family").loc["toy"]
    assert (counts["lie"], counts["honest"], counts["mistake"], counts["unsure"]) == (1, 1, 1, 0)


def test_labels_from_generated_text_match_the_answers_named():
    import pandas as pd

    from behaviorlens.detect.labels import labels_from_text

    family = PromptFamily.from_dict({
        "name": "toy", "chat": False, "user": "w10 {{ claim }}w11 {{ q }}",
        "valence": {"claim": {"positive": "w20 {{ wrong }} ", "negative": "w20 {{ right }} ", "neutral": ""}},
        "answers": {"matching": " {{ wrong }}", "not_matching": " {{ right }}"},
        "rows": [{"q": f"w{30 + i}", "right": f"w{40 + i}", "wrong": f"w{50 + i}"} for i in range(3)],
    })
    cset = family.render(tiny_tokenizer())
    said = {("positive", 0): "w50", ("neutral", 0): "w40 .", ("positive", 1): "w41", ("neutral", 1): "w41",
            ("positive", 2): "w52 w42", ("neutral", 2): "w42"}
    gens = pd.DataFrame([{"family": "toy", "pair": i, "side": s, "text": t} for (s, i), t in said.items()])
    table = labels_from_text(cset, gens)
    assert list(table["label"]) == ["lie", "honest", "unsure"]
    assert list(table["model_answer"]) == ["matching", "not_matching", "not_matching"]
