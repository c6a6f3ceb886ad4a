"""Sites: reads and writes through nnsight against the same thing done with plain torch hooks."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from conftest import tiny_model

from behaviorlens import BehaviorLensError
from behaviorlens.sites import SITES, SiteMap, check_edit, execution_order, saved_edit

ROWS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22, 23]]  # two lengths: row 1 is left-padded


def _batch(model):
    return model.batch(ROWS)


def _plain_forward(model, batch, **kwargs):
    with torch.inference_mode():
        return model.hf(**batch.inputs(), use_cache=False, **kwargs)


def _hook_reads(model, batch):
    """Every site at every layer, taken with plain torch hooks on ``sites.module``."""
    sites, got, handles = model.sites, {}, []

    def pre(key):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            if key[0] == "head":
                x = x.view(*x.shape[:-1], sites.n_heads, sites.head_dim)
            got[key] = x.detach().clone()

        return hook

    def post(key):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            got[key] = out.detach().clone()

        return hook

    for layer in range(sites.n_layers):
        for site in SITES:
            module = sites.module(model.hf, site, layer)
            if site in ("resid_pre", "head"):
                handles.append(module.register_forward_pre_hook(pre((site, layer)), with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(post((site, layer))))
    try:
        out = _plain_forward(model, batch, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return got, out.hidden_states


def _hook_edit(model, site, layer, value, index):
    """The same in-place edit as ``sites.write``, made with a plain torch hook on a copy."""
    sites = model.sites
    module = sites.module(model.hf, site, layer)

    if site in ("resid_pre", "head"):

        def hook(module, args, kwargs):
            key_in_args = bool(args)
            x = (args[0] if key_in_args else kwargs["hidden_states"]).clone()
            view = x.view(*x.shape[:-1], sites.n_heads, sites.head_dim) if site == "head" else x
            view[index] = value
            if key_in_args:
                return (x, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": x}

        return module.register_forward_pre_hook(hook, with_kwargs=True)

    def post_hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        out = out.clone()
        out[index] = value
        return (out, *output[1:]) if isinstance(output, tuple) else out

    return module.register_forward_hook(post_hook)


def _all_pairs(model):
    return execution_order(
        [(site, layer) for site in SITES for layer in range(model.sites.n_layers)]
    )


# -- reads ------------------------------------------------------------------------------------


def test_execution_order_sorts_by_layer_then_site():
    pairs = [("resid_post", 1), ("head", 1), ("mlp", 0), ("resid_pre", 2), ("attn", 0)]
    assert execution_order(pairs) == [
        ("attn", 0), ("mlp", 0), ("head", 1), ("resid_post", 1), ("resid_pre", 2)
    ]


def test_read_matches_torch_hooks_and_hidden_states(tiny):
    batch = _batch(tiny)
    sites = tiny.sites
    saved = {}
    with torch.inference_mode(), tiny.trace(batch):
        for site, layer in _all_pairs(tiny):
            saved[(site, layer)] = sites.read(tiny.lm, site, layer).save()
    reference, hidden = _hook_reads(tiny, batch)

    assert set(saved) == set(reference) == {(s, i) for s in SITES for i in range(sites.n_layers)}
    b, s = batch.input_ids.shape
    for key, ref in reference.items():
        got = torch.as_tensor(saved[key])
        want_shape = (b, s, sites.n_heads, sites.head_dim) if key[0] == "head" else (b, s, sites.d_model)
        assert got.shape == want_shape, key
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6, msg=f"{tiny.name} {key}")

    # the residual stream against output_hidden_states of a plain forward
    n = sites.n_layers
    assert len(hidden) == n + 1
    for layer in range(n):
        torch.testing.assert_close(torch.as_tensor(saved[("resid_pre", layer)]), hidden[layer])
    for layer in range(n - 1):
        torch.testing.assert_close(torch.as_tensor(saved[("resid_post", layer)]), hidden[layer + 1])
    # the last hidden state is the final norm of the last layer's output
    with torch.inference_mode():
        normed = sites.final_norm(tiny.hf)(torch.as_tensor(saved[("resid_post", n - 1)]))
    torch.testing.assert_close(normed, hidden[n])

    # attn and mlp are exactly what each block adds to the residual stream, and the heads are
    # what the attention output projection turns into the attention contribution
    for layer in range(n):
        pre, head, attn, mlp, post = (torch.as_tensor(saved[(s, layer)]) for s in SITES)
        torch.testing.assert_close(pre + attn + mlp, post, atol=1e-5, rtol=1e-5)
        with torch.inference_mode():
            projected = sites.attn_out_proj(tiny.hf, layer)(head.flatten(-2))
            if sites.arch.family == "gemma2":  # Gemma 2 normalizes the block output
                projected = sites.module(tiny.hf, "attn", layer)(projected)
        torch.testing.assert_close(projected, attn, atol=1e-5, rtol=1e-5)

    # sites really differ from each other (the map does not point twice at one module)
    assert not torch.allclose(reference[("attn", 0)], reference[("mlp", 0)])
    assert not torch.allclose(reference[("resid_pre", 1)], reference[("resid_post", 1)])


# -- writes -----------------------------------------------------------------------------------


def _edits(model):
    n, last_head = model.sites.n_layers, model.sites.n_heads - 1
    return [
        ("resid_pre", 0, 0.0, (slice(None), -1)),
        ("resid_post", n - 2, 3.0, (slice(None), slice(-2, None), slice(0, 8))),
        ("attn", 1, 0.0, ...),
        ("mlp", n - 1, 2.5, (0, -1)),
        ("head", 1, 0.0, (slice(None), -1, last_head)),
        ("head", 0, 1.5, (1, slice(None), 0, slice(0, 4))),
    ]


@pytest.mark.parametrize("edit", range(6), ids=lambda i: f"edit{i}")
def test_write_matches_torch_hook(tiny, edit):
    site, layer, value, index = _edits(tiny)[edit]
    batch = _batch(tiny)
    clean = _plain_forward(tiny, batch).logits

    with torch.inference_mode(), tiny.trace(batch):
        tiny.sites.write(tiny.lm, site, layer, value, index)
        edited = tiny.lm.output.logits.save()
    edited = torch.as_tensor(edited)

    handle = _hook_edit(tiny, site, layer, value, index)
    try:
        reference = _plain_forward(tiny, batch).logits
    finally:
        handle.remove()

    assert not torch.allclose(edited, clean, atol=1e-4), f"{site}@{layer} changed nothing"
    torch.testing.assert_close(edited, reference, atol=1e-5, rtol=1e-5)
    # the hook is gone and nnsight left no edit behind
    torch.testing.assert_close(_plain_forward(tiny, batch).logits, clean)


def test_write_with_tensor_value_on_every_position(tiny_llama):
    model, batch = tiny_llama, _batch(tiny_llama)
    vec = torch.linspace(-1, 1, model.sites.d_model)
    with torch.inference_mode(), model.trace(batch):
        model.sites.write(model.lm, "resid_post", 1, vec, (slice(None), slice(None)))
        edited = model.lm.output.logits.save()
    handle = _hook_edit(model, "resid_post", 1, vec, (slice(None), slice(None)))
    try:
        reference = _plain_forward(model, batch).logits
    finally:
        handle.remove()
    torch.testing.assert_close(torch.as_tensor(edited), reference, atol=1e-5, rtol=1e-5)


# -- saved_edit / check_edit ------------------------------------------------------------------


def test_saved_edit_and_check_edit(tiny):
    batch = _batch(tiny)
    head = tiny.sites.n_heads - 1
    index = (slice(None), -1, head)
    value = torch.full((len(batch), tiny.sites.head_dim), 0.25)
    with torch.inference_mode(), tiny.trace(batch):
        live = tiny.sites.write(tiny.lm, "head", 1, value, index)
        saved = saved_edit(live, index)
        live2 = tiny.sites.write(tiny.lm, "mlp", 1, 0.0, (slice(None), -1))
        saved2 = saved_edit(live2, (slice(None), -1))
    check_edit(saved, value, "head 1.last")
    check_edit(saved2, torch.zeros(len(batch), tiny.sites.d_model), "mlp 1")
    with pytest.raises(RuntimeError, match="head 1.last"):
        check_edit(saved, value + 1.0, "head 1.last")
    with pytest.raises(RuntimeError, match="mlp 1"):
        check_edit(saved2, torch.zeros(len(batch), tiny.sites.d_model + 1), "mlp 1")


def test_saved_copy_is_the_edited_value_not_the_original(tiny_llama):
    """A read without a write saves the original; check_edit against the edit value fails."""
    model, batch = tiny_llama, _batch(tiny_llama)
    index = (slice(None), -1)
    with torch.inference_mode(), model.trace(batch):
        saved = saved_edit(model.sites.read(model.lm, "resid_post", 0), index)
    with pytest.raises(RuntimeError):
        check_edit(saved, torch.zeros(len(batch), model.sites.d_model), "resid_post 0")


# -- errors -----------------------------------------------------------------------------------


def test_errors_name_the_layer_head_and_site(tiny):
    sites = tiny.sites
    n = sites.n_layers
    with pytest.raises(BehaviorLensError, match=rf"layer {n} does not exist.*0\.\.{n - 1}"):
        sites.module(tiny.hf, "mlp", n)
    with pytest.raises(BehaviorLensError, match=r"layer -1 does not exist"):
        sites.check("resid_post", -1)
    with pytest.raises(BehaviorLensError, match=rf"head {sites.n_heads} does not exist"):
        sites.check("head", 0, sites.n_heads)
    with pytest.raises(BehaviorLensError, match=r"unknown site 'neurons'"):
        sites.module(tiny.hf, "neurons", 0)
    with pytest.raises(BehaviorLensError, match=r"unknown site 'residual'"):
        sites.sites(["resid_pre", "residual"])
    assert sites.sites() == list(SITES)


def test_errors_inside_a_trace(tiny_llama):
    model, batch = tiny_llama, _batch(tiny_llama)
    n, h = model.sites.n_layers, model.sites.n_heads
    layer_error = pytest.raises(BehaviorLensError, match=rf"layer {n} does not exist")
    with layer_error, torch.inference_mode(), model.trace(batch):
        model.sites.read(model.lm, "resid_post", n).save()
    site_error = pytest.raises(BehaviorLensError, match=r"unknown site 'attention'")
    with site_error, torch.inference_mode(), model.trace(batch):
        model.sites.read(model.lm, "attention", 0).save()
    head_error = pytest.raises(BehaviorLensError, match=rf"head {h + 3} does not exist")
    with head_error, torch.inference_mode(), model.trace(batch):
        model.sites.write(model.lm, "head", 0, 0.0, (slice(None), -1, h + 3))
    # a negative head counts from the end, like any index
    with torch.inference_mode(), model.trace(batch):
        live = model.sites.write(model.lm, "head", 0, 0.0, (slice(None), -1, -1))
        saved = saved_edit(live, (slice(None), -1, h - 1))
    check_edit(saved, torch.zeros(len(batch), model.sites.head_dim), "head -1")


def test_an_unknown_architecture_names_the_known_families():
    config = T.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    with pytest.raises(BehaviorLensError, match=r"'bert'.*known families: .*llama"):
        SiteMap.from_config(config)


def test_the_site_map_finds_each_site_s_module_and_shape(tiny):
    sites = tiny.sites
    assert (sites.n_layers, sites.d_model, sites.n_heads, sites.head_dim) == (3, 64, 4, 16)
    assert len(sites.layers(tiny.hf)) == 3
    assert sites.module(tiny.hf, "resid_pre", 2) is sites.layers(tiny.hf)[2]
    assert sites.module(tiny.hf, "head", 1) is sites.attn_out_proj(tiny.hf, 1)


# -- padding ----------------------------------------------------------------------------------


def test_left_padded_row_matches_the_row_alone(tiny):
    batch = _batch(tiny)
    assert batch.offsets.tolist() == [0, len(ROWS[0]) - len(ROWS[1])]
    padded = tiny.logits(batch)[:, -1]
    for i, row in enumerate(ROWS):
        alone = tiny.logits(tiny.batch([row]))[0, -1]
        torch.testing.assert_close(padded[i], alone, atol=1e-5, rtol=1e-5)
    # and through nnsight: resid_post of the padded row's real tokens equals the row alone
    short = ROWS[1]
    with torch.inference_mode(), tiny.trace(batch):
        together = tiny.sites.read(tiny.lm, "resid_post", tiny.sites.n_layers - 1).save()
    with torch.inference_mode(), tiny.trace(tiny.batch([short])):
        alone = tiny.sites.read(tiny.lm, "resid_post", tiny.sites.n_layers - 1).save()
    start = int(batch.offsets[1])
    torch.testing.assert_close(torch.as_tensor(together)[1, start:], torch.as_tensor(alone)[0],
                               atol=1e-5, rtol=1e-5)


def test_positions_come_from_the_mask():
    """Without the batch's position ids a left-padded row would differ: the test has teeth.

    (GPT-2 has learned absolute positions; rotary models are shift-invariant, so they would
    not notice.)
    """
    model = tiny_model("gpt2")
    batch = _batch(model)
    assert batch.position_ids[1].tolist() == [0, 0, 0, 0, 1, 2, 3]
    alone = model.logits(model.batch([ROWS[1]]))[0, -1]
    with torch.inference_mode():
        naive = model.hf(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask,
            position_ids=torch.arange(batch.input_ids.shape[1]).expand_as(batch.input_ids),
            use_cache=False,
        ).logits[1, -1]
    assert not torch.allclose(naive, alone, atol=1e-4)
