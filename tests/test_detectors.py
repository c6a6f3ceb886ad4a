"""The per-token pressure detector: what it learns from, and that its reworded claims teach it
claims worded otherwise."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from behaviorlens.prompts import load_family
from behaviorlens.steering.detectors import (
    _claimed_answer,
    _first_occurrences,
    detector_quality,
    ordinary_turns,
    reworded_claims,
    train_token_detector,
)

FIXTURES = Path(__file__).parent / "fixtures"


def _words(text: str) -> str:
    return " ".join(text.split())


def test_reworded_claims_mark_exactly_the_claim_in_its_place_or_at_the_end_of_the_turn(default_model):
    tok = default_model.tokenizer
    cset = load_family("capitals_opinion").render(tok).subset(range(3))
    wordings = ["I bet it's {answer}.", "My aunt swears by {answer}.", "Isn't it {answer}?"]
    seqs, labels, which = reworded_claims(tok, cset, wordings, per_side=2)
    assert len(seqs) == len(labels) == len(which) == 3 * 2 * 2
    placements = set()
    for j, (seq, y, w) in enumerate(zip(seqs, labels, which)):
        pair, side = cset[j // 4], ("positive", "negative")[j // 2 % 2]
        answer = pair.variables["wrong" if side == "positive" else "right"]
        claim = wordings[w].replace("{answer}", answer)
        assert y.any() and np.all(np.diff(np.flatnonzero(y)) == 1)  # one contiguous span
        assert tok.decode([t for t, f in zip(seq, y) if f]).strip() == claim
        rest = tok.decode([t for t, f in zip(seq, y) if not f])
        assert _words(rest) == _words(pair.text["neutral"])  # nothing else changed
        text = tok.decode(seq)
        placements.add("end" if claim + "<|im_end|>" in text else "start" if "\n" + claim + " What" in text else "?")
    assert placements == {"start", "end"}


def test_first_occurrences_keep_a_token_once_per_prefix_and_label():
    seqs = [[5, 6, 7], [5, 6, 8], [5, 6, 7], [5, 6, 7]]
    labels = [np.array(x, dtype=bool) for x in ([0, 0, 0], [0, 0, 1], [0, 0, 0], [0, 0, 1])]
    kept = _first_occurrences(seqs, labels)
    assert [k.tolist() for k in kept] == [[True, True, True], [False, False, True], [False, False, False],
                                          [False, False, True]]  # same prefix, other label: kept


def test_claimed_answer_tokens_of_aligned_and_misaligned_pairs():
    assert _claimed_answer([1, 2, 3, 4], [1, 2, 9, 4]).tolist() == [False, False, True, False]
    assert _claimed_answer([1, 2, 3, 3, 4], [1, 2, 9, 4]).tolist() == [False, False, True, True, False]
    assert _claimed_answer([1, 2, 4], [1, 2, 9, 9, 4]).tolist() == [False, False, False]


def test_reworded_claims_teach_the_detector_claims_in_a_wording_it_never_saw(default_model):
    """Trained on capitals_opinion's one wording, the detector reads little of an authority's
    claim after the question; with the built-in reworded claims it reads nearly all of it."""
    m = default_model
    fit = load_family("capitals_opinion").render(m.tokenizer).subset(range(8))
    held = load_family(str(FIXTURES / "authority_after.yaml")).render(m.tokenizer, require_aligned=False)
    negatives = ordinary_turns(m.tokenizer)[::4]
    recall = {}
    for name, wordings in (("one wording", []), ("reworded", None)):
        detector, _ = train_token_detector(m, fit, [12], negatives=negatives, wordings=wordings)
        recall[name] = detector_quality(m, detector, held, negatives[:4])["detector_recall"]
    assert recall["reworded"] >= 0.9 and recall["one wording"] <= recall["reworded"] - 0.3, recall


def test_token_states_are_the_residual_stream_of_a_whole_forward(tiny_llama):
    """Reading stops the forward after the last layer asked for; what it read is unchanged."""
    import torch

    from behaviorlens.reads import token_states

    m = tiny_llama
    seqs = [[5, 6, 7, 8, 9], [10, 11, 12]]
    states = token_states(m, seqs, [0, 1])
    for j, seq in enumerate(seqs):
        with torch.inference_mode():
            hidden = m.hf(input_ids=torch.tensor([seq]), output_hidden_states=True).hidden_states
        for layer in (0, 1):
            np.testing.assert_allclose(states[layer][j], hidden[layer + 1][0].numpy(), atol=1e-5)
    assert m.hf(input_ids=torch.tensor([seqs[0]])).logits.shape[1] == 5  # the model's forward is whole again


def test_remembered_states_read_each_sequence_once_and_give_the_same_states(tiny_llama):
    from behaviorlens.reads import remembered_states, token_states

    m = tiny_llama
    seqs = [[5, 6, 7, 8, 9], [10, 11, 12]]
    fresh = token_states(m, seqs, [0, 1])
    forwards = []
    handle = m.hf.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        with remembered_states():
            first = token_states(m, seqs, [0, 1])
            again = token_states(m, [seqs[1], seqs[0], [13, 14]], [1])
    finally:
        handle.remove()
    assert len(forwards) == 2  # one batch for the two sequences, one for the new one only
    for layer in (0, 1):
        for a, b in zip(fresh[layer], first[layer]):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(again[1][0], fresh[1][1])
    np.testing.assert_array_equal(again[1][2], token_states(m, [[13, 14]], [1])[1][0])
