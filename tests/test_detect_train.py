"""Training controls: the wording baseline says when the words alone carry the label."""

import numpy as np
import pytest
from detect_helpers import filler, planted

from behaviorlens.detect.folds import balanced_groups
from behaviorlens.detect.train import train_detector
from behaviorlens.errors import BehaviorLensError

KW = {"layers": [1, 2], "positions": ("answer", "last"), "methods": ("mean_diff",), "folds": 4, "n_boot": 100}


def test_a_label_that_follows_one_fixed_word_is_explained_by_the_wording(tiny_llama):
    rng = np.random.default_rng(0)
    labels = ["lie", "honest"] * 12
    prompts = [[5, *filler(rng), 50 if y == "lie" else 51, *filler(rng, 2)] for y in labels]
    result = train_detector(tiny_llama, planted(prompts, [[7]] * len(labels), labels), **KW)
    s = result.summary
    assert s["auroc"] >= 0.8
    assert s["wording_auroc"] >= 0.95
    assert s["wording_explains"] is True


def test_a_label_the_words_cannot_see_is_not_explained_by_them(tiny_llama):
    # both classes hold the same tokens; only their order differs, which the bag of tokens and
    # the answer's embedding cannot see, but attention with positions can
    same = filler(np.random.default_rng(1))
    labels = ["lie", "honest"] * 12
    prompts = [[5, *same, *((50, 51) if y == "lie" else (51, 50))] for y in labels]
    result = train_detector(tiny_llama, planted(prompts, [[7]] * len(labels), labels), **KW)
    s = result.summary
    assert s["wording_auroc"] == pytest.approx(0.5)
    assert s["auroc"] >= 0.9
    assert s["wording_explains"] is False


def test_blocks_keep_pairs_together_and_hold_both_classes():
    labels = np.array([1, 0, 0, 0, 1, 0, 0, 1, 0, 0, 1, 1])
    pairs = np.array([0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9])
    blocks = balanced_groups(labels, pairs)
    for p in np.unique(pairs):
        assert len(set(blocks[pairs == p])) == 1
    for b in np.unique(blocks):
        assert set(labels[blocks == b]) == {0, 1}


def test_too_few_lies_is_one_clear_error(tiny_llama):
    labels = ["lie"] * 2 + ["honest"] * 10
    ex = planted([[5, 6, 8]] * 12, [[7]] * 12, labels)
    with pytest.raises(BehaviorLensError, match="2 lie and 10 honest"):
        train_detector(tiny_llama, ex, **KW)
