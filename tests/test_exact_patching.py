"""Exact activation patching: the optimized batched sweep against one nnsight forward per cell."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_family, tiny_model

from behaviorlens.errors import BehaviorLensError
from behaviorlens.patching import patch, patch_one_at_a_time, patch_whole
from behaviorlens.patching.hooks import Overwrite
from behaviorlens.prompts import load_family
from behaviorlens.reads import reading

ARCHS = ["llama", "gpt2", "gpt_neox", "gemma2"]


def assert_same(fast, slow, tol=1e-4):
    keys = ["site", "layer", "head", "position", "pair"]
    a = fast.frame.set_index(keys).sort_index()
    b = slow.frame.set_index(keys).sort_index()
    assert a.index.equals(b.index)
    assert (a["patched"] - b["patched"]).abs().max() < tol
    assert (a["effect"] - b["effect"]).abs().max() < tol
    # the sweep did something: some computed cells moved the metric
    moved = a[a["computed"]]
    assert ((moved["patched"] - moved["corrupt"]).abs() > 2e-5).any()


@pytest.mark.parametrize("arch", ARCHS)
def test_run_from_matches_full_forward(arch):
    m = tiny_model(arch)
    batch = m.batch([[3, 4, 5, 6, 7, 8], [9, 10, 11, 12], [5, 5, 5, 5, 5]])
    starts = {}
    hooks = [block.register_forward_pre_hook(lambda mod, a, i=i: starts.__setitem__(i, a[0].clone()))
             for i, block in enumerate(m.sites.layers(m.hf))]
    with torch.no_grad(), m.sites.capture_layer_calls(m.hf) as calls:
        full = m.hf(**batch.inputs(), use_cache=False).logits
    for h in hooks:
        h.remove()
    rows = torch.tensor([2, 0, 0, 1])
    assert calls.can_start_later
    with torch.no_grad():
        for layer in range(m.sites.n_layers):
            for start in (0, 2, 5):  # later columns: the earlier ones come from recorded keys/values
                out = m.sites.run_from(m.hf, layer, starts[layer][rows, start:], calls, rows, start)
                logits = m.sites.logits_from_hidden(m.hf, out[:, -1])
                torch.testing.assert_close(logits, full[rows, -1], atol=1e-5, rtol=1e-5)


def test_run_from_later_column_without_padding(default_model):
    """SDPA gets no mask for an unpadded batch: a replay from a later column builds its own."""
    m = default_model
    batch = m.batch([list(range(100, 120)), list(range(200, 220))])
    with torch.inference_mode(), m.sites.capture_layer_calls(m.hf) as calls, \
            reading(m, "resid_pre", [25]) as resid:
        full = m.hf(**batch.inputs(), use_cache=False).logits
    assert calls.calls[25].get("attention_mask") is None and calls.can_start_later
    with torch.inference_mode():
        out = m.sites.run_from(m.hf, 25, resid[25][:, 12:], calls, None, 12)
        logits = m.sites.logits_from_hidden(m.hf, out)
    torch.testing.assert_close(logits, full[:, 12:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_equals_one_at_a_time_tiny(arch):
    m = tiny_model(arch)
    cs = tiny_family().render(m.tokenizer).subset([0, 1])  # lengths 7 and 8: left padding
    for site, positions, layers in [("resid_pre", "all", [1]), ("attn", ["s"], [0]),
                                    ("mlp", ["s", "last"], [2]), ("resid_post", ["s", "last"], [0])]:
        fast = patch(m, cs, site, layers, positions, batch_size=5, progress=False)
        slow = patch_one_at_a_time(m, cs, site, layers, positions, progress=False)
        assert_same(fast, slow)
    fast = patch(m, cs, "head", [2], batch_size=3, progress=False)
    slow = patch_one_at_a_time(m, cs, "head", [2], progress=False)
    assert set(fast.frame["head"]) == set(range(m.sites.n_heads))
    assert_same(fast, slow)


def test_noising_and_negative_clean_match_reference(tiny_llama):
    cs = tiny_family().render(tiny_llama.tokenizer)
    for clean, direction in [("positive", "noise"), ("negative", "denoise")]:
        kw = {"clean": clean, "direction": direction, "progress": False}
        fast = patch(tiny_llama, cs, "resid_pre", [1], ["s", "last"], **kw)
        slow = patch_one_at_a_time(tiny_llama, cs, "resid_pre", [1], ["s", "last"], **kw)
        assert_same(fast, slow)
        f = fast.frame
        base = f["clean"] if direction == "noise" else f["corrupt"]
        source = f["corrupt"] if direction == "noise" else f["clean"]
        assert (f["patched"] - base - f["effect"]).abs().max() < 1e-6
        assert (source - base - f["gap"]).abs().max() < 1e-6
        # a cell's value is the ratio of means over pairs, not a mean of per-pair ratios
        cell = fast.means().iloc[0]
        rows = f[(f.layer == cell.layer) & (f.from_end == cell.from_end)]
        assert cell.metric == pytest.approx(rows.effect.sum() / rows.gap.sum(), abs=1e-6)


def test_whole_residual_restores_and_nothing_changes_nothing(tiny_llama):
    m = tiny_llama
    cs = tiny_family().render(m.tokenizer)
    for direction in ("denoise", "noise"):
        last = patch_whole(m, cs, "resid_post", None, direction=direction).frame
        assert (last["effect"] - last["gap"]).abs().max() < 1e-4
        first = patch_whole(m, cs, "resid_pre", 0, direction=direction).frame
        assert (first["effect"] - first["gap"]).abs().max() < 1e-4
    # positions before the first difference are skipped as no-ops: metric exactly 0 there,
    # and the reference (which does patch them) agrees that nothing changes
    cs = cs.subset([0])
    fast = patch(m, cs, "resid_pre", [1], progress=False).frame
    slow = patch_one_at_a_time(m, cs, "resid_pre", [1], progress=False).frame
    first_diff = {i: p.first_difference() for i, p in enumerate(cs)}
    early = fast["position"] < fast["pair"].map(first_diff)
    assert early.any() and not fast.loc[early, "computed"].any()
    assert (fast.loc[early, "effect"] == 0).all()
    assert (fast.loc[early, "patched"] == fast.loc[early, "corrupt"]).all()
    assert (slow.loc[early.values, "effect"].abs() < 1e-5).all()
    assert fast.loc[~early, "computed"].all()


def test_patch_that_does_not_fire_fails_loudly(tiny_llama):
    m = tiny_llama
    index = (torch.tensor([0]), torch.tensor([0]))
    overwrite = Overwrite(m, "mlp", 1, index, torch.zeros(1, m.sites.d_model))
    with pytest.raises(RuntimeError, match="ran 0 times"), overwrite:
        pass  # no forward: the patch never happened


def test_unaligned_set_refused(tiny_llama):
    fam = tiny_family(valence={"s": {"positive": "w40 w42", "negative": "w41"}})
    cs = fam.render(tiny_llama.tokenizer, require_aligned=False)
    with pytest.raises(BehaviorLensError, match="activation patching needs token-aligned"):
        patch(tiny_llama, cs, progress=False)
    with pytest.raises(BehaviorLensError, match="unknown site"):
        patch(tiny_llama, tiny_family().render(tiny_llama.tokenizer), site="resid", progress=False)


def test_batched_equals_one_at_a_time_default(default_model):
    m = default_model
    cs = load_family("capitals_opinion").render(m.tokenizer).subset([0, 1])
    last = m.sites.n_layers - 1
    fast = patch(m, cs, "resid_pre", [3, last], ["opinion", "last"], progress=False)
    slow = patch_one_at_a_time(m, cs, "resid_pre", [3, last], ["opinion", "last"], progress=False)
    assert_same(fast, slow)
    head_fast = patch(m, cs, "head", [last], progress=False)
    head_slow = patch_one_at_a_time(m, cs, "head", [last], progress=False)
    assert_same(head_fast, head_slow)
    restore = patch_whole(m, cs, "resid_post")
    assert restore.means()["metric"].iloc[0] == pytest.approx(1.0, abs=1e-3)


@pytest.mark.slow
def test_batched_equals_one_at_a_time_default_all_positions(default_model):
    m = default_model
    cs = load_family("capitals_opinion").render(m.tokenizer).subset([0, 1])
    layers = [0, 14, m.sites.n_layers - 1]
    fast = patch(m, cs, "resid_pre", layers, "all", progress=False)
    slow = patch_one_at_a_time(m, cs, "resid_pre", layers, "all", progress=False)
    assert_same(fast, slow)
    assert (~fast.frame["computed"]).sum() > len(fast.frame) / 3  # the chat prefix is skipped
