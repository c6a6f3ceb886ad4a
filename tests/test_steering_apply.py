"""Runtime edits against independent references: nnsight writes, manual generation loops."""

from __future__ import annotations

import pytest
import torch
from steering_helpers import tiny_set

from behaviorlens.errors import BehaviorLensError
from behaviorlens.steering import (
    Edit,
    ablate_direction,
    ablate_heads,
    head_means,
    scale_heads,
    steer,
)


def _vec(model, layer=1, scale=4.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(model.sites.d_model, generator=g) * scale
    return Edit(kind="vector", vectors={layer: v}, d_model=model.sites.d_model)


def test_vector_matches_nnsight_write(tiny):
    model = tiny
    edit = _vec(model)
    batch = model.batch([[3, 4, 5, 6, 7], [8, 9, 33]])
    with steer(model, edit, 1.5):
        hooked = model.logits(batch)
    with torch.inference_mode(), model.trace(batch):
        live = model.sites.read(model.lm, "resid_post", 1)
        model.sites.write(model.lm, "resid_post", 1, live + 1.5 * edit.vectors[1])
        ref = model.lm.output.logits.save()
    torch.testing.assert_close(hooked, ref.float(), atol=1e-4, rtol=1e-4)
    assert (hooked - model.logits(batch)).abs().max() > 1e-3  # and the edit did something
    # hooks are gone afterwards, also inside nnsight traces the edit applies
    with steer(model, edit, 1.5), torch.inference_mode(), model.trace(batch):
        traced = model.lm.output.logits.save()
    torch.testing.assert_close(traced.float(), hooked, atol=1e-4, rtol=1e-4)


def test_hooks_removed_on_error(tiny_llama):
    batch = tiny_llama.batch([[3, 4, 5]])
    base = tiny_llama.logits(batch)
    with pytest.raises(RuntimeError), steer(tiny_llama, _vec(tiny_llama), 3.0):
        raise RuntimeError("boom")
    torch.testing.assert_close(tiny_llama.logits(batch), base)


def _greedy(model, ids, n, first=None, later=None):
    """Reference greedy loop with a KV cache; ``first``/``later`` are context factories."""
    from contextlib import nullcontext

    hf = model.hf
    with (first or nullcontext)():
        out = hf(input_ids=ids, use_cache=True)
    cache, toks = out.cache, [int(out.logits[0, -1].argmax())]
    for _ in range(n - 1):
        with (later or nullcontext)():
            out = hf(input_ids=torch.tensor([[toks[-1]]]), cache=cache, use_cache=True)
        cache = out.cache
        toks.append(int(out.logits[0, -1].argmax()))
    return toks


@torch.inference_mode()
def test_steering_reaches_generated_tokens(tiny_llama):
    model = tiny_llama
    edit = _vec(model, layer=2, scale=6.0)
    ids = torch.tensor([[3, 4, 5, 6]])
    n = 6
    plain = model.hf.generate(ids, max_new_tokens=n, do_sample=False)[0, 4:].tolist()
    with steer(model, edit, 1.0):
        steered = model.hf.generate(ids, max_new_tokens=n, do_sample=False)[0, 4:].tolist()
    assert steered[0] != plain[0], "the first generated token is steered"
    # later tokens are changed by the intervention itself, not only through the first token:
    # feed the steered first token unsteered and compare
    with steer(model, edit, 1.0):
        rest_steered = _greedy(model, torch.tensor([[3, 4, 5, 6, steered[0]]]), n - 1)
    rest_plain = _greedy(model, torch.tensor([[3, 4, 5, 6, steered[0]]]), n - 1)
    assert rest_steered == steered[1:]
    assert rest_steered != rest_plain
    # reference loop: steer everything
    ctx = lambda: steer(model, edit, 1.0)
    assert _greedy(model, ids, n, ctx, ctx) == steered
    # "prompt": only the prompt forward is steered
    with steer(model, edit, 1.0, positions="prompt"):
        prompt_only = model.hf.generate(ids, max_new_tokens=n, do_sample=False)[0, 4:].tolist()
    assert prompt_only == _greedy(model, ids, n, ctx, None)
    assert prompt_only[0] == steered[0] and prompt_only != steered


@torch.inference_mode()
def test_generated_positions_leave_earlier_prompt_tokens(tiny_llama):
    model = tiny_llama
    edit = _vec(model, layer=1)
    batch = model.batch([[3, 4, 5, 6, 7]])
    base = model.logits(batch)
    with steer(model, edit, 1.0, positions="generated"):
        gen = model.logits(batch)
    torch.testing.assert_close(gen[:, :-1], base[:, :-1])
    assert (gen[:, -1] - base[:, -1]).abs().max() > 1e-3
    with pytest.raises(BehaviorLensError, match="positions"):
        with steer(model, edit, 1.0, positions="everywhere"):
            pass


@torch.inference_mode()
def test_direction_ablation_removes_component(tiny):
    model = tiny
    r = torch.randn(model.sites.d_model)
    r = r / r.norm()
    batch = model.batch([[3, 4, 5, 6], [7, 8, 9]])
    seen = []
    hooks = [model.sites.module(model.hf, "resid_post", i).register_forward_hook(
        lambda m, a, o: seen.append((o[0] if isinstance(o, tuple) else o) @ r)) for i in range(model.sites.n_layers)]
    try:
        with ablate_direction(model, r):
            model.logits(batch)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == model.sites.n_layers
    for proj in seen:
        assert proj.abs().max() < 1e-4


@torch.inference_mode()
def test_head_ablation_matches_nnsight(tiny):
    model = tiny
    s = model.sites
    cset = tiny_set(model)
    means = head_means(model, cset, [1])
    batch = model.batch([[3, 4, 5, 6, 7], [8, 9, 33]])
    with ablate_heads(model, {1: [0, 2]}, "mean", means=means):
        hooked = model.logits(batch)
    with model.trace(batch):
        for h in (0, 2):
            s.write(model.lm, "head", 1, means[1][h], (slice(None), slice(None), h))
        ref = model.lm.output.logits.save()
    torch.testing.assert_close(hooked, ref.float(), atol=1e-4, rtol=1e-4)
    with ablate_heads(model, {1: [0, 2]}, "zero"):
        zero = model.logits(batch)
    with scale_heads(model, {1: [0, 2]}, 0.0):
        scaled0 = model.logits(batch)
    torch.testing.assert_close(zero, scaled0, atol=1e-5, rtol=1e-5)
    assert (zero - hooked).abs().max() > 1e-4


@torch.inference_mode()
def test_head_means_match_reference(tiny_llama):
    """Mean over every real token of both sides, checked against one-prompt-at-a-time hooks."""
    model = tiny_llama
    s = model.sites
    cset = tiny_set(model, 4)
    means = head_means(model, cset, [2], batch_size=3)
    acc, n = torch.zeros(s.n_heads, s.head_dim), 0
    grab = {}
    h = s.module(model.hf, "head", 2).register_forward_pre_hook(lambda m, a: grab.update(x=a[0]))
    try:
        for p in cset:
            for side in ("positive", "negative"):
                model.hf(torch.tensor([p.tokens[side]]))
                acc += grab["x"][0].view(-1, s.n_heads, s.head_dim).sum(0)
                n += len(p.tokens[side])
    finally:
        h.remove()
    torch.testing.assert_close(means[2], acc / n, atol=1e-5, rtol=1e-4)
