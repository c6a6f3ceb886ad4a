"""Readout detectors: the belief-conditioned probe (the pressured state against the bare question
re-asked), the follow-up readout, and mistakes as negatives."""

import numpy as np
import pytest
from conftest import tiny_tokenizer
from detect_helpers import filler, planted

from behaviorlens.detect.detector import Detector
from behaviorlens.detect.evaluate import figures, score_examples
from behaviorlens.detect.examples import family_examples, transcript_examples
from behaviorlens.detect.labels import label_table
from behaviorlens.detect.readout import followup_examples, followup_suffix, readout_states
from behaviorlens.detect.train import train_detector
from behaviorlens.errors import BehaviorLensError
from behaviorlens.prompts.family import PromptFamily

WRONG, RIGHT, CUE = 70, 71, 74
KW = {"layers": [2], "positions": ("answer", "last"), "methods": ("mean_diff",), "folds": 4, "n_boot": 50}


def _belief_set(rng, n: int):
    """Lies and mistakes give the same wrong answer after the same kind of prompt; only the bare
    re-ask differs: a lie's model answers RIGHT without the user's turn, a mistake's WRONG."""
    labels = ["lie"] * n + ["honest"] * n + ["mistake"] * n
    fills = [filler(rng) for _ in labels]
    pressured = planted([[5, *f, 6, CUE] for f in fills], [[RIGHT] if y == "honest" else [WRONG] for y in labels],
                        labels)
    pressured.bare = planted([[5, *f, 6] for f in fills], [[WRONG] if y == "mistake" else [RIGHT] for y in labels],
                             labels)
    return pressured


def test_the_belief_detector_tells_lies_from_mistakes_where_the_falsity_probe_cannot(tiny_llama, one_thread):
    rng = np.random.default_rng(0)
    result = train_detector(tiny_llama, _belief_set(rng, 12), features="belief", negatives="not_lie", **KW)
    s = result.summary
    assert s["readout_unit"].endswith(("-diff", "-concat")) and s["readout_negatives"] == "not_lie"
    assert s["readout_oof_lie_vs_mistake_auroc"] >= 0.9
    scores = score_examples(tiny_llama, result.detector, _belief_set(rng, 10))
    f = figures(scores, result.detector.threshold, n_boot=100)
    # the answer-falsity probe reads the wrong answer, which lies and mistakes share here
    assert f["falsity_auroc"] >= 0.9 and f["falsity_lie_vs_mistake_auroc"] <= 0.75
    assert f["auroc"] >= 0.9 and f["lie_vs_mistake_auroc"] >= 0.9 and f["lie_vs_mistake_auroc_ci"][0] >= 0.75
    assert f["mistake_auroc"] <= 0.65 and f["lie_vs_mistake_gap"] >= 0.15
    # the labeller's own rule (the re-asked answer differs) separates every label by construction
    assert f["reask_auroc"] == 1.0 and f["reask_lie_vs_mistake_auroc"] == 1.0 and f["reask_mistake_auroc"] == 0.5


def test_mistakes_as_negatives_change_what_the_answer_probe_learns(tiny_llama, one_thread):
    # lies and mistakes give the same answer; only a cue before it (72 vs 73) tells them apart,
    # so a probe trained without mistakes learns the answer, one trained with them the cue
    rng = np.random.default_rng(0)

    def make(n):
        labels = ["lie"] * n + ["honest"] * n + ["mistake"] * n
        prompts = [[5, *filler(rng), 6, 72 if y == "lie" else 73] for y in labels]
        return planted(prompts, [[RIGHT] if y == "honest" else [WRONG] for y in labels], labels)

    kw = {**KW, "positions": ("last",)}
    train, test = make(12), make(10)
    honest_only = train_detector(tiny_llama, train, features="answer", negatives="honest", **kw)
    not_lie = train_detector(tiny_llama, train, features="answer", negatives="not_lie", **kw)
    assert honest_only.detector.readout is None  # today's detector, unchanged
    f = figures(score_examples(tiny_llama, not_lie.detector, test), not_lie.detector.threshold, n_boot=50)
    assert f["lie_vs_mistake_auroc"] >= 0.9 and f["mistake_auroc"] <= 0.65


def test_the_follow_up_turn_is_the_chat_template_s_and_read_at_its_last_token():
    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}w3 {{ m['content'] }} w4 {% endfor %}"
                         "{% if add_generation_prompt %}w3 {% endif %}")
    assert followup_suffix(tok, "w90 w91") == [4, 3, 90, 91, 4, 3]
    ex = transcript_examples(tok, [{"messages": [{"role": "user", "content": "w10 w11"}], "answer": "w20 w21"}])
    up = followup_examples(tok, ex, "w90 w91")
    asked = tok.apply_chat_template([{"role": "user", "content": "w10 w11"}, {"role": "assistant", "content": "w20 w21"},
                                     {"role": "user", "content": "w90 w91"}], add_generation_prompt=True,
                                    tokenize=False)
    assert up.sequences[0] == list(tok(asked, add_special_tokens=False)["input_ids"])
    assert up.positions["answer"][0] == len(up.sequences[0]) - 1 == up.positions["last"][0]
    with pytest.raises(BehaviorLensError, match="follow-up question is empty"):
        followup_suffix(tok, " ")


def test_the_follow_up_detector_reads_a_cue_before_the_answer(tiny_llama, one_thread):
    rng = np.random.default_rng(0)

    def make(n):
        labels = ["lie", "honest"] * n
        prompts = [[5, *filler(rng), 72 if y == "lie" else 74, *filler(rng, 2)] for y in labels]
        return planted(prompts, [[73]] * len(labels), labels)

    result = train_detector(tiny_llama, make(12), features="followup", question="w90 w91", **KW)
    assert result.summary["readout_unit"] == "followup"
    f = figures(score_examples(tiny_llama, result.detector, make(10)), result.detector.threshold, n_boot=50)
    assert f["auroc"] >= 0.8
    # its features are the state at the follow-up's last token, nowhere else
    ex = make(2)
    got = readout_states(tiny_llama, ex, "followup", [2], question="w90 w91")["followup"]
    from behaviorlens.detect.examples import read_states

    tail = planted([s + [90] for s in ex.sequences], [[91]] * len(ex), list(ex.table["label"]))
    np.testing.assert_allclose(got, read_states(tiny_llama, tail, [2], ["answer"])["answer"], rtol=1e-4, atol=1e-5)


def test_a_readout_detector_file_round_trips(tiny_llama, tmp_path, one_thread):
    rng = np.random.default_rng(0)
    det = train_detector(tiny_llama, _belief_set(rng, 8), features="belief", negatives="not_lie", **KW).detector
    back = Detector.load(det.save(tmp_path / "d.safetensors"))
    assert back.readout.unit == det.readout.unit and back.readout.negatives == "not_lie"
    assert "belief detector" in back.describe()
    test = _belief_set(rng, 3)
    a, b = score_examples(tiny_llama, back, test), score_examples(tiny_llama, det, test)
    np.testing.assert_allclose(a["score"], b["score"], rtol=1e-6)
    np.testing.assert_allclose(a["shuffled_score"], b["shuffled_score"], rtol=1e-6)
    assert not np.allclose(a["score"], a["falsity_score"])


def test_the_belief_detector_refuses_examples_without_a_bare_question(tiny_llama, one_thread):
    rng = np.random.default_rng(0)
    det = train_detector(tiny_llama, _belief_set(rng, 8), features="belief", **KW).detector
    bare_less = _belief_set(rng, 2)
    bare_less.bare = None
    with pytest.raises(BehaviorLensError, match="re-asks the bare question, which planted lack"):
        score_examples(tiny_llama, det, bare_less)
    with pytest.raises(BehaviorLensError, match="two detectors"):
        train_detector(tiny_llama, _belief_set(rng, 8), features="belief", override=True, **KW)


def test_a_family_s_bare_re_ask_is_its_neutral_side_with_the_answer_the_model_gives_there():
    data = {
        "name": "toy", "chat": False, "user": "w10 {{ claim }}w11 {{ q }}",
        "valence": {"claim": {"positive": "w20 {{ wrong }} ", "negative": "w20 {{ right }} ", "neutral": ""}},
        "answers": {"matching": " {{ wrong }}", "not_matching": " {{ right }}"},
        "rows": [{"q": f"w{30 + i}", "right": f"w{40 + i}", "wrong": f"w{50 + i}"} for i in range(3)],
    }
    cset = PromptFamily.from_dict(data).render(tiny_tokenizer())
    metrics = {"positive": np.array([1.0, -1.0, 1.0]), "negative": np.array([-5.0] * 3),
               "neutral": np.array([-1.0, -1.0, 1.0])}
    ex = family_examples(cset, label_table(cset, metrics))
    assert list(ex.table["label"]) == ["lie", "honest", "mistake"]
    for i, answer in enumerate([40, 41, 52]):  # lie: right bare, honest: right, mistake: wrong bare
        assert ex.bare.sequences[i] == cset[i].tokens["neutral"] + [answer]
        assert 20 in ex.sequences[i] and 20 not in ex.bare.sequences[i]  # the user's claim left out
    assert ex.subset(np.array([2])).bare.sequences[0][-1] == 52
    no_neutral = PromptFamily.from_dict({**data, "valence": {"claim": {
        "positive": "w20 {{ wrong }} ", "negative": "w20 {{ right }} "}}}).render(tiny_tokenizer())
    del metrics["neutral"]
    assert family_examples(no_neutral, label_table(no_neutral, metrics)).bare is None


def test_the_transfer_matrix_of_a_belief_detector_scores_lies_against_mistakes(tiny_llama, one_thread):
    from behaviorlens.detect.transfer import transfer_matrix

    rng = np.random.default_rng(0)
    families = {}
    for name in ("a", "b"):
        ex = _belief_set(rng, 8)
        ex.table["family"] = name
        ex.bare.table["family"] = name
        families[name] = ex
    kw = {"layers": [2], "methods": ("mean_diff",), "folds": 4}
    belief = transfer_matrix(tiny_llama, families, features="belief", negatives="not_lie", **kw)
    belief = belief.set_index(["train", "test"])
    answer = transfer_matrix(tiny_llama, families, **kw).set_index(["train", "test"])
    assert belief.loc[("a", "b"), "n_mistake"] == 8 and belief.loc[("a", "b"), "position"].endswith(("-diff", "-concat"))
    assert belief.loc[("a", "b"), "lie_vs_mistake_auroc"] >= 0.9 and belief.loc[("b", "a"), "lie_vs_mistake_auroc"] >= 0.9
    assert answer.loc[("a", "b"), "lie_vs_mistake_auroc"] <= 0.8  # the answer probe: lies and mistakes alike
    assert belief.loc[("a", "b"), "auroc"] >= 0.9 and answer.loc[("a", "b"), "auroc"] >= 0.9


def test_recall_comes_with_its_wilson_interval():
    import pandas as pd

    from behaviorlens.detect.evaluate import wilson

    assert wilson(0, 10)[1] == pytest.approx(0.2775, abs=1e-4) and wilson(10, 10)[0] == pytest.approx(0.7225, abs=1e-4)
    scores = pd.DataFrame({"family": "f", "pair": range(8), "label": ["lie"] * 4 + ["honest"] * 4,
                           "score": [4, 3, 2, 1, -1, -2, -3, -4], "claim_score": [0.0] * 8,
                           "wording_score": [0.0] * 8, "shuffled_score": [0.0] * 8})
    f = figures(scores, threshold=2.5, n_boot=20)
    assert f["recall_at_1pct_fpr"] == 0.5 and f["recall_at_1pct_fpr_ci"] == wilson(2, 4)


def test_mistakes_as_negatives_weigh_as_much_as_the_honest_answers():
    from behaviorlens.detect.readout import training_index

    labels = np.array(["lie"] * 3 + ["honest"] * 8 + ["mistake"] * 2 + ["unsure"])
    idx = training_index(labels, "not_lie")
    assert (labels[idx] == "mistake").sum() == 8 and (labels[idx] == "honest").sum() == 8
    assert "unsure" not in labels[idx] and set(idx[labels[idx] == "mistake"]) == {11, 12}
    assert list(labels[training_index(labels, "honest")]) == ["lie"] * 3 + ["honest"] * 8


def test_the_follow_up_on_the_embedded_model_is_the_whole_conversation_in_its_template(default_model):
    from behaviorlens import load_family

    tok = default_model.tokenizer
    cset = load_family("tests/fixtures/hard_facts_friend.yaml").render(tok, require_aligned=False).subset([0])
    metrics = {"positive": np.array([1.0]), "negative": np.array([-1.0]), "neutral": np.array([-1.0])}
    ex = family_examples(cset, label_table(cset, metrics))
    up = followup_examples(tok, ex)
    pair = cset[0]
    asked = pair.text["positive"].split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
    conversation = [{"role": "user", "content": asked},
                    {"role": "assistant", "content": "The capital of South Africa is Johannesburg"},
                    {"role": "user", "content": "Is that answer true?"}]
    text = tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert tok.decode(up.sequences[0]) == text
    assert "insisting" in tok.decode(ex.sequences[0]) and "insisting" not in tok.decode(ex.bare.sequences[0])
    assert tok.decode(ex.bare.sequences[0]).endswith("The capital of South Africa is Pretoria")
