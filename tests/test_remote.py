"""The trace path under nnsight's simulation of NDIF equals the local fast path, stage by stage.

A traced model (``remote="local"``) serializes every forward as an NDIF request, deserializes
it with the ``behaviorlens`` package hidden (only the shipped intervention modules travel by
value) and runs it on the same weights; the local model runs plain forwards with hooks.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_family, tiny_model
from steering_helpers import planted_model, planted_set, tiny_side_effects

from behaviorlens import remote
from behaviorlens.edits import Edit, Readout
from behaviorlens.errors import BehaviorLensError
from behaviorlens.measure import measure
from behaviorlens.patching import patch
from behaviorlens.patching.ablation import ablation_scan
from behaviorlens.patching.attribution import attribution_patch
from behaviorlens.probing.activations import collect
from behaviorlens.steering import head_edit, steer
from behaviorlens.steering.evaluate import evaluate_steering

TOL = 1e-4


def traced(model):
    """The same weights, every forward a trace through the strict NDIF simulation."""
    return dataclasses.replace(model, remote="local", interventions=[])


@pytest.fixture
def counted(monkeypatch):
    """Counts the traces that went through the simulation (so a test cannot pass locally)."""
    calls = []
    original = remote.strict_simulation

    def counting(lm):
        calls.append(1)
        return original(lm)

    monkeypatch.setattr(remote, "strict_simulation", counting)
    return calls


def frames_equal(a, b, columns, tol=TOL):
    for column in columns:
        assert (a[column].astype(float) - b[column].astype(float)).abs().max() < tol, column


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_measure_probe_and_patching_give_the_local_figures_under_the_simulation(arch, counted):
    m = tiny_model(arch)
    t = traced(m)
    cset = tiny_family().render(m.tokenizer)
    a, b = measure(m, cset), measure(t, cset)
    frames_equal(a.table, b.table, ["metric"])
    assert counted
    acts_a = collect(m, cset, ["resid_post", "head"], ["last", "s:mean"], progress=False)
    acts_b = collect(t, cset, ["resid_post", "head"], ["last", "s:mean"], progress=False)
    for site in ("resid_post", "head"):
        for pos in ("last", "s:mean"):
            assert torch.allclose(acts_a.get(site, pos), acts_b.get(site, pos), atol=TOL)
    for site in ("resid_pre", "head"):
        fast, slow = patch(m, cset, site, progress=False), patch(t, cset, site, progress=False)
        frames_equal(fast.frame, slow.frame, ["patched", "effect"])
        moved = fast.frame[fast.frame["computed"]]
        assert ((moved["patched"] - moved["corrupt"]).abs() > 1e-4).any()


def test_attribution_and_ablation_give_the_local_figures_under_the_simulation(counted):
    m = tiny_model("llama")
    t = traced(m)
    cset = tiny_family().render(m.tokenizer)
    for site, steps in (("resid_pre", 1), ("head", 3)):
        a = attribution_patch(m, cset, site, steps=steps, progress=False)
        b = attribution_patch(t, cset, site, steps=steps, progress=False)
        frames_equal(a.frame, b.frame, ["patched"])
        assert a.frame["patched"].std() > 1e-3
    for site in ("head", "mlp"):
        a, b = ablation_scan(m, cset, site, "resample"), ablation_scan(t, cset, site, "resample")
        frames_equal(a, b, ["metric_ablated", "value"])
        assert (a["metric_ablated"] - a["metric_positive"]).abs().max() > 1e-3
    assert counted


@pytest.fixture(scope="module")
def planted():
    model = planted_model()
    return model, planted_set(model), tiny_side_effects(model)


def test_steer_eval_of_a_knockout_and_a_heads_edit(planted, counted):
    m, cset, side = planted
    t = traced(m)
    s = m.sites
    detector = Readout(0, torch.randn(s.d_model, generator=torch.Generator().manual_seed(0)), 1.0, gap=1)
    edits = [Edit(kind="knockout", heads={1: [0, 1, 2, 3], 2: [0, 1, 2, 3]}, detector=detector, n_heads=s.n_heads,
                  positions="generated"),
             head_edit(m, {1: [0, 3], 2: [2]}, "mean", reference=cset)]
    columns = ["pressure_removed_fraction", "neutral_kl", "factual_accuracy_change", "context_use_accuracy_change",
               "perplexity_change"]
    for edit in edits:
        a = evaluate_steering(m, edit, cset, [1.0], side_effects=side, controls=1)
        b = evaluate_steering(t, edit, cset, [1.0], side_effects=side, controls=1)
        present = [c for c in columns if c in a.columns and a[c].notna().all()]
        assert "pressure_removed_fraction" in present
        frames_equal(a, b, present)
        pairs_a, pairs_b = a.attrs["pairs"], b.attrs["pairs"]
        frames_equal(pairs_a, pairs_b, [c for c in pairs_a.columns if c.startswith("metric_")])
        mine = pairs_a[pairs_a.control == 0]  # the edit does something
        assert (mine["metric_positive"] - mine["metric_positive_unedited"]).abs().max() > 1e-2
    assert counted


@pytest.mark.parametrize("kind", ["vector", "heads", "gated", "knockout"])
def test_steered_generation_gives_the_local_tokens_under_the_simulation(kind, counted):
    m = tiny_model("llama")
    t = traced(m)
    batch = m.batch([[2, 5, 6, 7, 8], [2, 9, 10]])
    direction = torch.randn(64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), m.lm.trace(batch.inputs()):
        last = m.lm.model.layers[0].output[:, -1].save()
    scores = last @ direction
    gate = Readout(0, direction, -float(scores.mean()))  # fires on one row of the two
    assert int(((last @ direction) + gate.bias > 0).sum()) == 1
    edit = {"vector": Edit(kind="vector", vectors={1: 4 * torch.ones(64)}, positions="generated"),
            "heads": Edit(kind="heads", heads={1: [0, 2]}, head_mode="scale", scale=3.0),
            "gated": Edit(kind="vector", vectors={1: 4 * torch.ones(64)}, gate=gate),
            "knockout": Edit(kind="knockout", heads={1: [0, 1, 2, 3], 2: [0, 1, 2, 3]}, n_heads=4,
                             detector=Readout(0, direction, 0.0, 1), positions="generated")}[kind]
    batches = [batch, m.batch([[3, 11, 12, 13], [2, 14], [4, 15, 16]])]
    with steer(m, edit):
        fast = m.generate_each(batches, 6)
    with steer(t, edit), remote.counting_requests() as sent:
        slow = t.generate_each(batches, 6)
    assert sent.requests == 1  # both batches' generate traces in one session
    assert all(torch.equal(a, b) for a, b in zip(fast, slow, strict=True))
    assert not torch.equal(fast[0], m.generate(batch, 6))
    assert torch.equal(t.generate(batch, 6), m.generate(batch, 6))  # unedited: no loop over the steps
    t.session_limits = remote.SessionLimits(traces=1)  # one generate trace per session
    with steer(t, edit), remote.counting_requests() as sent:
        split = t.generate_each(batches, 6)
    assert sent.requests == 2 and all(torch.equal(a, b) for a, b in zip(fast, split, strict=True))
    assert counted


def test_the_simulation_hides_the_project():
    """A trace that reaches for project code fails here as it would on NDIF."""
    m = tiny_model("llama")
    with pytest.raises(ModuleNotFoundError, match="behaviorlens"):
        with torch.inference_mode(), m.lm.trace(torch.tensor([[2, 5, 6]]), **remote.trace_kwargs("local", m.lm)):
            m.sites.read(m.lm, "resid_post", 1).save()  # a SiteMap method: not shipped


def test_a_local_hook_is_refused_on_the_trace_path():
    m = tiny_model("llama")
    t = traced(m)
    handle = m.sites.module(m.hf, "mlp", 1).register_forward_hook(lambda *a: None)
    try:
        with pytest.raises(RuntimeError, match="would not run remotely"):
            t.logits(t.batch([[2, 5, 6]]))
    finally:
        handle.remove()


def test_remote_modes_parse_and_ndif_mistakes_say_what_is_wrong(monkeypatch):
    assert remote.mode(True) == "ndif" and remote.mode("local") == "local" and remote.mode(None) is None
    with pytest.raises(BehaviorLensError, match="not one of local, ndif"):
        remote.mode("cloud")
    from behaviorlens.model import load_model

    with pytest.raises(BehaviorLensError, match="Hugging Face id"):
        load_model("default", remote="ndif")
    import nnsight

    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", None)
    with pytest.raises(BehaviorLensError, match="NDIF_API_KEY"):
        remote.check_ndif("meta-llama/Llama-3.1-70B")


def test_the_default_model_measures_and_knocks_out_as_it_does_locally(default_model, counted):
    """The embedded chat model (SDPA attention, boolean masks, a shared chat prefix that the fast
    path runs once): measure and a detector knockout and its random-token control."""
    from behaviorlens.prompts import load_family

    m = default_model
    t = traced(m)
    cset = load_family("capitals_opinion").render(m.tokenizer).subset(list(range(4)))
    plain_fast, plain_slow = measure(m, cset), measure(t, cset)
    frames_equal(plain_fast.table, plain_slow.table, ["metric"])
    s = m.sites
    for decoy in (None, 3):
        direction = torch.randn(s.d_model, generator=torch.Generator().manual_seed(0))
        edit = Edit(kind="knockout", heads={5: list(range(s.n_heads)), 6: list(range(s.n_heads))},
                    detector=Readout(4, direction, 2.0, 1, decoy), n_heads=s.n_heads, positions="generated")
        with steer(m, edit):
            fast = measure(m, cset)
        with steer(t, edit):
            slow = measure(t, cset)
        frames_equal(fast.table, slow.table, ["metric"])
        assert (fast.table["metric"] - plain_fast.table["metric"]).abs().max() > 1e-2
    assert counted


def test_counting_requests_counts_each_traced_forward_and_puts_nnsight_back():
    from nnsight.schema.request import RequestModel

    before = RequestModel.__dict__["serialize"]
    m = traced(tiny_model("llama"))
    batch = m.batch([[5, 6, 7], [8, 9]])
    with remote.counting_requests() as sent:
        first = m.logits(batch)
        m.logits(batch)
    assert sent.requests == 2 and sent.bytes > 1000
    assert RequestModel.__dict__["serialize"] is before
    torch.testing.assert_close(m.logits(batch), first)  # nnsight still serializes after the count
    assert sent.requests == 2


def test_patching_goes_in_one_session_per_chunk_and_any_session_size_gives_the_local_figures():
    m = tiny_model("llama")
    t = traced(m)
    cset = tiny_family().render(m.tokenizer)
    fast = patch(m, cset, "resid_pre", progress=False)
    with remote.counting_requests() as whole:
        slow = patch(t, cset, "resid_pre", progress=False)
    frames_equal(fast.frame, slow.frame, ["patched", "effect"])
    assert whole.requests == 1  # the family's pairs fit one chunk, its copies one session
    t.session_limits = remote.SessionLimits(traces=3)  # one batch of copies per session
    with remote.counting_requests() as split:
        small = patch(t, cset, "resid_pre", batch_size=4, progress=False)
    frames_equal(fast.frame, small.frame, ["patched", "effect"])
    assert split.requests > 4


def test_measure_and_collection_send_one_session_per_family_unless_the_limits_split_them():
    m = tiny_model("llama")
    t = traced(m)
    cset = tiny_family().render(m.tokenizer)
    with remote.counting_requests() as sent:
        measure(t, cset, batch_size=2)
    assert sent.requests == 1  # every batch of both sides in one session
    local = collect(m, cset, ["resid_post"], ["last"], batch_size=2, progress=False)
    with remote.counting_requests() as sent:
        one = collect(t, cset, ["resid_post"], ["last"], batch_size=2, progress=False)
    assert sent.requests == 1
    t.session_limits = remote.SessionLimits(result_mb=1e-6)  # what comes back splits them: one batch each
    with remote.counting_requests() as sent:
        split = collect(t, cset, ["resid_post"], ["last"], batch_size=2, progress=False)
    assert sent.requests == -(-len(cset) // 2)
    for acts in (one, split):
        assert torch.allclose(local.get("resid_post", "last"), acts.get("resid_post", "last"), atol=TOL)


def test_a_failed_session_is_retried_once_then_fails_in_one_line_naming_the_work(monkeypatch, capsys):
    m = tiny_model("llama")
    t = traced(m)
    cset = tiny_family().render(m.tokenizer)
    expected = measure(m, cset).table["metric"]
    lm_type = type(t.lm)
    real = lm_type.session
    failures = []

    def flaky(self, *args, **kwargs):
        if len(failures) < failing:
            failures.append(1)
            raise ConnectionError("the socket closed")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(lm_type, "session", flaky)
    failing = 1
    got = measure(t, cset).table["metric"]
    assert (got - expected).abs().max() < TOL and failures == [1]
    assert "the session failed (ConnectionError: the socket closed); retrying once" in capsys.readouterr().err
    failing, failures[:] = 10, []
    with pytest.raises(BehaviorLensError) as err:
        measure(t, cset)
    assert len(failures) == 2 and "scoring: the session failed twice (local): ConnectionError" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("site", ["head", "resid_post"])
def test_a_site_read_by_hooks_equals_the_same_read_in_a_trace(site):
    from behaviorlens.interventions.hooks import applied
    from behaviorlens.interventions.kinds import ReadSite
    from behaviorlens.interventions.trace import traced_logits

    m = tiny_model("llama")
    batch = m.batch([[5, 6, 7, 8], [9, 10]])
    ref = m.sites.ref(site, 1)
    with applied(m, [ReadSite(ref, "x")]) as state, torch.inference_mode():
        m.hf(**batch.inputs(), use_cache=False)
    _, reads = traced_logits(traced(m), batch, reads=[ref])
    assert state.reads["x"].shape == reads[0].shape and reads[0].abs().max() > 0
    torch.testing.assert_close(state.reads["x"], reads[0], atol=1e-5, rtol=1e-5)


def test_planned_work_sends_its_forwards_together_and_gives_the_values_of_unplanned_work():
    from contextlib import nullcontext

    from behaviorlens.interventions.trace import PlanDiverged, planned
    from behaviorlens.scoring import behavior_metric

    m = tiny_model("llama")
    t = traced(m)
    cset = tiny_family().render(m.tokenizer)
    pairs = list(cset)
    seqs = [p.tokens["positive"] for p in pairs[:3]]
    rows, positions = torch.tensor([0, 1, 2, 2]), torch.tensor([len(seqs[0]) - 1, 3, 2, len(seqs[2]) - 1])
    edits = [None, head_edit(m, {1: [0, 2]}, "zero"), head_edit(m, {0: [1]}, "zero")]

    def work(model):
        out = []
        for edit in edits:
            with steer(model, edit) if edit is not None else nullcontext():
                out += [behavior_metric(model, pairs, "positive", batch_size=2), model.score_logits(seqs, rows, positions)]
        return out

    want = work(m)
    with remote.counting_requests() as sent:
        got = planned(t, lambda: work(t))
    assert sent.requests == 1  # 3 edits x (3 scoring batches + 1 logits forward) in one session
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0)
    assert (want[2] - want[0]).abs().max() > 1e-3  # the edits change what is scored
    t.session_limits = remote.SessionLimits(traces=4)
    with remote.counting_requests() as sent:
        again = planned(t, lambda: work(t))
    assert sent.requests == 3 and all(torch.equal(a, b) for a, b in zip(got, again))

    def diverging():  # asks for another forward once it sees real values
        first = behavior_metric(t, pairs, "positive")
        return behavior_metric(t, pairs[: 1 + int(first.abs().sum() > 0)], "positive")

    with pytest.raises(PlanDiverged, match="differently on its replay"):
        planned(t, diverging)


def test_the_kl_from_the_unedited_model_and_generation_are_planned_into_one_session():
    from behaviorlens.interventions.trace import planned

    m = tiny_model("llama")
    t = traced(m)
    seqs = [[2, 5, 6, 7, 8], [2, 9, 10, 11]]
    rows, positions = torch.tensor([0, 0, 1]), torch.tensor([3, 4, 3])
    unedited = m.score_logits(seqs, rows, positions)
    batch = m.batch(seqs)
    edits = [head_edit(m, {1: [0, 2]}, "zero"), Edit(kind="vector", vectors={1: 4 * torch.ones(64)})]

    def work(model):
        out = []
        for edit in edits:
            with steer(model, edit):
                out += [model.kl_from_unedited(seqs, rows, positions, unedited), model.generate(batch, 4)]
        return out

    want = work(m)
    with remote.counting_requests() as sent:
        got = planned(t, lambda: work(t))
    assert sent.requests == 1  # both edits' KL (the unedited forward run on the server) and generations
    for kl, kl_traced in zip(want[::2], got[::2]):
        assert kl.shape == (3,) and kl.min() > 1e-4  # one KL per read, and each edit moves it
        torch.testing.assert_close(kl, kl_traced, atol=TOL, rtol=0)
    assert all(torch.equal(a, b) for a, b in zip(want[1::2], got[1::2]))
    with steer(t, edits[0]), remote.counting_requests() as sent:
        alone = t.kl_from_unedited(seqs, rows, positions, None)
    assert sent.requests == 1 and torch.allclose(alone, want[0], atol=TOL)
    from behaviorlens.steering.side_effects import tail_kl, tail_logits

    tails = [(s, 2) for s in seqs]
    reference = tail_logits(m, tails, 1)
    with steer(m, edits[1]):
        local = tail_kl(m, tails, reference, 1)
    with steer(t, edits[1]), remote.counting_requests() as sent:
        assert tail_kl(t, tails, tail_logits(t, tails, 1), 1) == pytest.approx(local, abs=TOL)
    assert sent.requests == 1 and local > 1e-4  # both batches in one session


def test_planned_work_passes_over_reads_its_replay_kept_from_the_recording():
    """Site reads run while recording; where the work keeps them (remembered states), its replay
    does not read again, and the plan passes over those reads instead of diverging."""
    from behaviorlens.interventions.trace import planned
    from behaviorlens.reads import remembered_states, token_states
    from behaviorlens.scoring import behavior_metric

    m = tiny_model("llama")
    t = traced(m)
    pairs = list(tiny_family().render(m.tokenizer))
    seqs = [p.tokens["positive"] for p in pairs]

    def work(model):
        states = token_states(model, seqs, [1], batch_size=2)[1]  # read now (recording), kept for the replay
        return [torch.tensor(np.stack([x[-1] for x in states])), behavior_metric(model, pairs, "positive")]

    want = work(m)
    with remembered_states(), remote.counting_requests() as sent:
        got = planned(t, lambda: work(t))
    assert sent.requests == 1 + 1  # every batch read in one session, then one session of scoring
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0)


@pytest.mark.parametrize("position", ["all", "last"])
def test_head_means_read_every_batch_in_one_session_and_equal_the_local_means(position):
    from behaviorlens.steering.apply import head_means

    m = tiny_model("llama")
    t = traced(m)
    cset = tiny_family().render(m.tokenizer)
    want = head_means(m, cset, [0, 1], position, batch_size=2)
    with remote.counting_requests() as sent:
        got = head_means(t, cset, [1, 0], position, batch_size=2)
    assert sent.requests == 1  # 2 sides x 3 batches
    assert set(got) == {0, 1}
    for layer in want:
        torch.testing.assert_close(got[layer], want[layer], atol=1e-5, rtol=0)
        assert want[layer].abs().max() > 1e-3


def test_detect_s_greedy_answers_go_in_one_session_and_equal_the_local_ones():
    from behaviorlens.detect.labels import generate_answers

    m = tiny_model("llama")
    cs = tiny_family().render(m.tokenizer)
    want = generate_answers(m, cs, ["positive", "negative"], max_new_tokens=3, batch_size=2)
    with remote.counting_requests() as sent:
        got = generate_answers(traced(m), cs, ["positive", "negative"], max_new_tokens=3, batch_size=2)
    assert sent.requests == 1 and len(got) == 2 * len(cs)  # 4 batches of 2 sides, one session
    pd.testing.assert_frame_equal(want, got)


def test_states_at_named_tokens_read_only_those_tokens_in_one_session_and_equal_the_local_ones():
    from behaviorlens.reads import states_at

    m = tiny_model("llama")
    seqs = [[2, 5, 6, 7, 8], [2, 9, 10], [3, 11, 12, 13], [4, 15], [2, 16, 17, 18, 19, 20]]
    columns = {"last": [len(s) - 1 for s in seqs], "second": [1, 1, -1, 1, 1]}  # -1: undefined, zeros
    want = states_at(m, seqs, [0, 2], columns, batch_size=2)
    with remote.counting_requests() as sent:
        got = states_at(traced(m), seqs, [0, 2], columns, batch_size=2)
    assert sent.requests == 1  # 3 batches in one session
    for name in columns:
        np.testing.assert_allclose(got[name], want[name], atol=TOL, rtol=0)
    assert not got["second"][2].any() and np.abs(got["second"][0]).sum() > 0
    assert np.abs(want["last"][:, 0] - want["second"][:, 0]).max() > 1e-3  # the names read different tokens
