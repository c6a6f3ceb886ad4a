"""An edited forward that starts from the unedited model's kept keys and values gives the
numbers of a full forward, under every kind, and starts there only when the edit allows."""

from __future__ import annotations

import pytest
import torch
from steering_helpers import CACHE_SEQS, edited_from_the_kept_cache

from behaviorlens import kv_cache
from behaviorlens.edits import Readout
from behaviorlens.steering import Edit, steer

SEQS = CACHE_SEQS  # a shared 9-token prefix (run once), rows of different lengths


def _meta(model):
    s = model.sites
    return {"d_model": s.d_model, "n_heads": s.n_heads, "head_dim": s.head_dim, "model": model.name}


def _edits(m):
    s = m.sites
    g = torch.Generator().manual_seed(7)
    flagger = Readout(0, torch.randn(s.d_model, generator=g), 0.5)  # flags some tokens of each row
    return {
        "vector at the answer": (Edit(kind="vector", vectors={1: 3 * torch.randn(s.d_model, generator=g)},
                                      positions="generated", **_meta(m)), True),
        "gated vector at the answer": (Edit(kind="vector", vectors={2: 3 * torch.randn(s.d_model, generator=g)},
                                            gate=Readout(1, torch.randn(s.d_model, generator=g)),
                                            positions="generated", **_meta(m)), True),
        "heads at the answer": (Edit(kind="heads", heads={1: [0, 2]}, head_mode="zero", positions="generated",
                                     **_meta(m)), True),
        "knockout from the answer": (Edit(kind="knockout", heads={1: [0, 1, 2, 3]}, detector=flagger,
                                          positions="generated", **_meta(m)), True),
        "knockout from every position": (Edit(kind="knockout", heads={1: [0, 1, 2, 3]}, detector=flagger,
                                              positions="all", **_meta(m)), True),
        "vector at every position": (Edit(kind="vector", vectors={1: 3 * torch.randn(s.d_model, generator=g)},
                                          **_meta(m)), False),
        "weights": (Edit(kind="weights", weights={"model.layers.0.mlp.down_proj.weight": 0.1 * torch.randn(
            s.d_model, 128, generator=g)}, **_meta(m)), False),
    }


@pytest.mark.parametrize("tail", [1, 3])  # reads at the last position / a teacher-forced 3-token answer
@pytest.mark.parametrize("name", ["vector at the answer", "gated vector at the answer", "heads at the answer",
                                  "knockout from the answer", "knockout from every position",
                                  "vector at every position", "weights"])
def test_an_edit_started_from_the_kept_cache_gives_the_full_forwards_logits(tiny_llama, name, tail):
    edit, starts_late = _edits(tiny_llama)[name]
    store = edited_from_the_kept_cache(tiny_llama, edit, tail)
    assert store.reused == (2 if starts_late and edit.detector is None else int(starts_late))
    assert store.reused + store.full == 2


def test_a_batch_the_unedited_model_never_ran_runs_in_full(tiny_llama):
    m = tiny_llama
    edit, _ = _edits(m)["vector at the answer"]
    last = torch.tensor([len(x) - 1 for x in SEQS])
    with kv_cache.reusing_unedited() as store, steer(m, edit):
        m.score_logits(SEQS, torch.arange(3), last)
    assert store.reused == 0 and not store.batches


def test_the_kept_batches_stay_within_their_byte_budget(tiny_llama):
    m = tiny_llama
    with kv_cache.reusing_unedited(budget=1) as store:
        for seq in SEQS:
            m.score_logits([seq], torch.tensor([0]), torch.tensor([len(seq) - 1]))
    assert len(store.batches) == 1  # always the last one, however small the budget


def test_a_knockout_control_draws_its_tokens_from_the_kept_detection(tiny_llama):
    from dataclasses import replace

    m = tiny_llama
    edit, _ = _edits(m)["knockout from the answer"]
    control = replace(edit, detector=replace(edit.detector, decoy=123))
    rows, last = torch.arange(3), torch.tensor([len(x) - 1 for x in SEQS])
    with steer(m, control):
        full = m.score_logits(SEQS, rows, last)
    with kv_cache.reusing_unedited() as store:
        m.score_logits(SEQS, rows, last)
        with steer(m, edit):
            m.score_logits(SEQS, rows, last)  # keeps the detection
        with steer(m, control):
            reused = m.score_logits(SEQS, rows, last)
    assert store.reused == 1
    torch.testing.assert_close(reused, full, atol=1e-5, rtol=1e-5)
    with steer(m, edit):
        assert (m.score_logits(SEQS, rows, last) - full).abs().max() > 1e-4  # the draws differ from the detection
