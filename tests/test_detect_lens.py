"""Lens traces: the last layer's lens is the model's own output; a tuned lens fits ordinary text."""

import numpy as np
import pytest
import torch
from detect_helpers import filler, planted

from behaviorlens.detect.lens import fit_tuned_lens, lens_trace
from behaviorlens.errors import BehaviorLensError


def test_the_last_layer_of_the_logit_lens_is_the_models_own_next_token_distribution(tiny_llama):
    rng = np.random.default_rng(0)
    ex = planted([[5, *filler(rng, int(rng.integers(3, 8)))] for _ in range(4)], [[70 + i] for i in range(4)],
                 ["lie", "honest", "mistake", "honest"])
    trace = lens_trace(tiny_llama, ex, "logit", k=3)
    for i, seq in enumerate(ex.sequences):
        with torch.no_grad():
            logits = tiny_llama.hf(torch.tensor([seq])).logits[0, int(ex.positions["last"][i])]
        logp = torch.log_softmax(logits.float(), -1)
        given = seq[int(ex.answer_start[i])]
        assert trace.given[i] == given
        assert trace.logp[i, -1] == pytest.approx(float(logp[given]), abs=1e-4)
        assert trace.rank[i, -1] == int((logp > logp[given]).sum())
        others = logp.clone()
        others[given] = -torch.inf
        assert list(trace.alternatives[i]) == others.topk(3).indices.tolist()
        assert trace.margin[i, -1] == pytest.approx(float(logp[given] - others.max()), abs=1e-4)


def test_a_tuned_lens_predicts_the_last_layer_better_than_the_identity_on_unseen_text(tiny_llama):
    from behaviorlens.reads import token_states

    rng = np.random.default_rng(0)
    fit = [[5, *filler(rng, 24)] for _ in range(30)]
    unseen = [[5, *filler(rng, 24)] for _ in range(6)]
    lens = fit_tuned_lens(tiny_llama, fit, layers=[0, 1])
    states = token_states(tiny_llama, unseen, [0, 1, 2])
    target = np.concatenate(states[2])
    for layer in (0, 1):
        h = np.concatenate(states[layer])
        assert np.mean((lens.apply(h, layer) - target) ** 2) < 0.8 * np.mean((h - target) ** 2)
    with pytest.raises(BehaviorLensError, match="no map for layer 2"):
        lens.apply(target, 2)
