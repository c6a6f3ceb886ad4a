"""Scoring: answers of several tokens are scored whole, one-token answers take the shortcut."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_tokenizer

from behaviorlens.errors import BehaviorLensError
from behaviorlens.interventions.trace import planned
from behaviorlens.measure import measure
from behaviorlens.patching import patch
from behaviorlens.patching.exact import patch_one_at_a_time
from behaviorlens.prompts import PromptFamily
from behaviorlens.remote import counting_requests
from behaviorlens.scoring import behavior_metric, log_likelihoods


def family(answers=(" w50 w51", " w52 w53 w54"), n=5, **extra):
    rows = [{"x": " ".join(f"w{30 + j}" for j in range(i + 1))} for i in range(n)]
    return PromptFamily.from_dict({
        "name": "multi", "chat": False, "user": "w5 {{ s }} {{ x }} w6",
        "valence": {"s": {"positive": "w40", "negative": "w41", "neutral": ""}},
        "answers": {"matching": answers[0], "not_matching": answers[1]}, "rows": rows, **extra,
    })


def summed_logprob(model, prompt: list[int], answer: list[int]) -> float:
    """Hand computation: one unpadded forward of prompt + answer, log-softmax, sum."""
    ids = torch.tensor([prompt + answer])
    with torch.inference_mode():
        logp = torch.log_softmax(model.hf(input_ids=ids).logits[0].float(), -1)
    return sum(float(logp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(answer))


def test_multi_token_answers_are_scored_whole(tiny_llama):
    cset = family().render(tiny_llama.tokenizer)
    assert cset.multi_token_answers and cset[0].answers["not_matching"] == [52, 53, 54]
    table = measure(tiny_llama, cset, batch_size=3).table
    for i, p in enumerate(cset):
        for side in ("positive", "negative", "neutral"):
            want = summed_logprob(tiny_llama, p.tokens[side], p.answers["matching"]) - \
                summed_logprob(tiny_llama, p.tokens[side], p.answers["not_matching"])
            got = table[(table.pair == i) & (table.side == side)].metric.item()
            assert got == pytest.approx(want, abs=1e-4)
    first = behavior_metric(tiny_llama, cset.pairs, "positive", whole=False)
    whole = torch.tensor(table[table.side == "positive"].metric.to_numpy())
    assert (first - whole).abs().max() > 0.1  # the first-token shortcut is a different number here


def test_one_token_shortcut_equals_the_whole_score(tiny_llama):
    cset = family(answers=(" w50", " w52")).render(tiny_llama.tokenizer)
    assert not cset.multi_token_answers
    shortcut = behavior_metric(tiny_llama, cset.pairs, "negative")
    whole = behavior_metric(tiny_llama, cset.pairs, "negative", whole=True)
    assert torch.allclose(shortcut, whole, atol=1e-5)


def test_several_not_matching_answers_are_scored_together(tiny_llama):
    cset = family(answers=(" w50", " w52")).render(tiny_llama.tokenizer)
    for p in cset:
        p.other_answers = [[53], [54]]
    got = behavior_metric(tiny_llama, cset.pairs, "positive")
    for i, p in enumerate(cset):
        ids = torch.tensor([p.tokens["positive"]])
        with torch.inference_mode():
            logp = torch.log_softmax(tiny_llama.hf(input_ids=ids).logits[0, -1].float(), -1)
        want = logp[50] - torch.logsumexp(logp[[52, 53, 54]], 0)
        assert float(got[i]) == pytest.approx(float(want), abs=1e-4)


def test_patching_multi_token_batched_equals_one_at_a_time(tiny_llama):
    cset = family().render(tiny_llama.tokenizer)
    fast = patch(tiny_llama, cset, "resid_pre", layers=[0, 2], progress=False).frame
    slow = patch_one_at_a_time(tiny_llama, cset, "resid_pre", layers=[0, 2], progress=False).frame
    assert torch.allclose(torch.tensor(fast.patched.to_numpy()), torch.tensor(slow.patched.to_numpy()), atol=1e-4)
    # patching the clean side's whole residual at layer 0 gives the clean side's metric
    at_slot = fast[(fast.layer == 0) & (fast.position_name == "s")]
    assert len(at_slot) == len(cset)
    assert torch.allclose(torch.tensor(at_slot.patched.to_numpy()), torch.tensor(at_slot.clean.to_numpy()), atol=1e-4)


def test_answer_merging_with_the_prompt_names_the_row():
    tok = tiny_tokenizer()
    with pytest.raises(BehaviorLensError, match=r"row 0, answer 'matching'.*merges with the prompt"):
        family(answers=("w50", " w52")).render(tok)


def test_identical_answers_are_refused():
    with pytest.raises(BehaviorLensError, match="have the same tokens"):
        family(answers=(" w50 w51", " w50 w51")).render(tiny_tokenizer())


def test_two_word_cities_on_the_default_model(default_model):
    """Must show: answers of several tokens are scored whole on a real model (hand computation
    to 1e-4), and the first-token metric is a different number."""
    from pathlib import Path

    from behaviorlens.prompts import load_family

    m = default_model
    cset = load_family(Path(__file__).parent / "fixtures" / "two_word_cities.yaml").render(m.tokenizer)
    multi = cset.filter(lambda p: len(p.answers["matching"]) > 1).subset(range(4))
    assert len(multi) == 4 and multi.multi_token_answers
    table = measure(m, multi).table
    for i, p in enumerate(multi):
        for side in ("positive", "neutral"):
            want = summed_logprob(m, p.tokens[side], p.answers["matching"]) - \
                summed_logprob(m, p.tokens[side], p.answers["not_matching"])
            assert table[(table.pair == i) & (table.side == side)].metric.item() == pytest.approx(want, abs=1e-4)
    first = behavior_metric(m, multi.pairs, "positive", whole=False)
    whole = torch.tensor(table[table.side == "positive"].metric.to_numpy())
    assert (first - whole).abs().max() > 0.05


def test_a_sequence_scored_on_its_own_tokens_gives_its_log_likelihood_on_either_path(tiny_llama):
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 120, (n,), generator=g).tolist() for n in (12, 7, 2, 12)]
    by_hand = []
    for s in seqs:
        logits = tiny_llama.logits(tiny_llama.batch([s]))[0, :-1]
        by_hand.append(-float(torch.nn.functional.cross_entropy(logits, torch.tensor(s[1:]), reduction="sum")))
    local = log_likelihoods(tiny_llama, seqs, batch_size=3)
    torch.testing.assert_close(local, torch.tensor(by_hand), atol=1e-4, rtol=0)
    traced = dataclasses.replace(tiny_llama, remote="local", interventions=[])
    with counting_requests() as sent:  # computed on the server, deferred with the rest of planned work
        remote = planned(traced, lambda: log_likelihoods(traced, seqs, batch_size=3))
    assert sent.requests == 1
    torch.testing.assert_close(remote, local, atol=1e-4, rtol=0)
    with pytest.raises(BehaviorLensError, match="at least two"):
        log_likelihoods(tiny_llama, [[5]])
