"""Activation collection against plain torch hooks on unpadded rows; shards, index and resume."""

from __future__ import annotations

import pytest
import torch
from conftest import probe_family, tiny_model

from behaviorlens import BehaviorLensError
from behaviorlens.probing import activations as A
from behaviorlens.probing import collect
from behaviorlens.probing.activations import Activations

SITES = ("resid_pre", "resid_post", "attn", "mlp", "head")
POSITIONS = ("last", "s", "s:mean", "answer")


def hook_reference(model, cset, sites, positions, layers):
    """Each prompt run ALONE (no padding) with torch hooks; positions read from the spans."""
    sm = model.sites
    out = {(s, p): [] for s in sites for p in positions}
    for pair in cset:
        for side in ("positive", "negative"):
            got, handles = {}, []
            for layer in layers:
                for site in sites:
                    mod = sm.module(model.hf, site, layer)
                    if site in ("resid_pre", "head"):
                        def pre(m, args, kwargs, key=(site, layer), got=got):
                            x = args[0] if args else kwargs["hidden_states"]
                            if key[0] == "head":
                                x = x.view(*x.shape[:-1], sm.n_heads, sm.head_dim)
                            got[key] = x[0].detach().clone()
                        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
                    else:
                        def post(m, args, output, key=(site, layer), got=got):
                            o = output[0] if isinstance(output, tuple) else output
                            got[key] = o[0].detach().clone()
                        handles.append(mod.register_forward_hook(post))
            try:
                with torch.inference_mode():
                    model.hf(torch.tensor([pair.tokens[side]]), use_cache=False)
            finally:
                for h in handles:
                    h.remove()
            for site in sites:
                for name in positions:
                    per_layer = []
                    for layer in layers:
                        x = got[(site, layer)]
                        if name.endswith(":mean"):
                            a, b = pair.spans[side][name.removesuffix(":mean")]
                            per_layer.append(x[a:b].mean(0))
                        else:
                            per_layer.append(x[pair.position(side, name)])
                    out[(site, name)].append(torch.stack(per_layer))
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_collect_equals_unpadded_torch_hooks(family):
    model = tiny_model(family)
    cset = probe_family(n=5).render(model.tokenizer)
    assert len({len(p.tokens["positive"]) for p in cset}) > 1  # batches really are padded
    acts = collect(model, cset, sites=SITES, positions=POSITIONS, batch_size=2, progress=False)
    ref = hook_reference(model, cset, SITES, POSITIONS, range(model.sites.n_layers))
    for key, want in ref.items():
        got = acts.get(*key)
        assert got.shape == want.shape, key
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4, msg=f"{key}")
    assert acts.labels.tolist() == [1, 0] * len(cset)
    assert acts.pair_ids.tolist() == [i // 2 for i in range(2 * len(cset))]
    # "last" is a different token from the slot, so the two positions must differ
    assert not torch.allclose(acts.get("resid_post", "last"), acts.get("resid_post", "s"))


def test_collect_default_model_matches_hooks(default_model):
    from behaviorlens.prompts import load_family

    cset = load_family("capitals_opinion").render(default_model.tokenizer).subset([0])
    layers = [3, 17]
    acts = collect(default_model, cset, sites=("resid_post",), positions=("last", "opinion:mean"),
                   layers=layers, batch_size=2, progress=False)
    ref = hook_reference(default_model, cset, ("resid_post",), ("last", "opinion:mean"), layers)
    for key, want in ref.items():
        torch.testing.assert_close(acts.get(*key), want, atol=1e-4, rtol=1e-4)


class Stop(Exception):
    pass


def test_interrupted_collection_resumes(tmp_path, monkeypatch):
    model = tiny_model("llama")
    cset = probe_family(n=6).render(model.tokenizer)
    kw = {"sites": ("resid_post", "head"), "positions": ("last", "s:mean"), "batch_size": 2, "progress": False}
    fresh = collect(model, cset, **kw)

    real = A.read_planned
    reads = []

    def stop_after_the_first(model, plans, name):  # the run dies while reading the second batch
        if reads:
            raise Stop
        reads.append(1)
        return real(model, plans, name)

    monkeypatch.setattr(A, "read_planned", stop_after_the_first)
    with pytest.raises(Stop):
        collect(model, cset, out_dir=tmp_path, **kw)
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == ["shard-00000.safetensors"]
    with pytest.raises(BehaviorLensError, match="unfinished"):
        Activations.load(tmp_path)

    calls = []
    monkeypatch.setattr(A, "read_planned", lambda m, plans, name: calls.append(len(plans)) or real(m, plans, name))
    resumed = collect(model, cset, out_dir=tmp_path, **kw)
    assert calls == [1, 1]  # only the two missing batches ran
    loaded = Activations.load(tmp_path)
    for result in (resumed, loaded):
        assert result.layers == fresh.layers
        assert torch.equal(result.labels, fresh.labels) and torch.equal(result.pair_ids, fresh.pair_ids)
        for key in fresh.data:
            torch.testing.assert_close(result.data[key], fresh.data[key], atol=1e-6, rtol=0)

    calls.clear()
    collect(model, cset, out_dir=tmp_path, **kw)
    assert calls == []  # a finished collection is read back, not recomputed


def test_changed_settings_recompute(tmp_path):
    model = tiny_model("llama")
    cset = probe_family(n=4).render(model.tokenizer)
    collect(model, cset, positions=("last",), batch_size=2, out_dir=tmp_path, progress=False)
    with pytest.warns(UserWarning, match="positions"):
        got = collect(model, cset, positions=("s",), batch_size=2, out_dir=tmp_path, progress=False)
    want = collect(model, cset, positions=("s",), batch_size=2, progress=False)
    torch.testing.assert_close(got.get("resid_post", "s"), want.get("resid_post", "s"))
    other = probe_family(n=4, pos="w54 w55").render(model.tokenizer)  # same settings, new tokens
    with pytest.warns(UserWarning, match="fingerprint"):
        got = collect(model, other, positions=("s",), batch_size=2, out_dir=tmp_path, progress=False)
    want = collect(model, other, positions=("s",), batch_size=2, progress=False)
    torch.testing.assert_close(got.get("resid_post", "s"), want.get("resid_post", "s"))


def test_bad_requests_raise_clear_errors():
    model = tiny_model("llama")
    cset = probe_family(n=2).render(model.tokenizer)
    with pytest.raises(BehaviorLensError, match="no position named 'nope'"):
        collect(model, cset, positions=("nope",), progress=False)
    with pytest.raises(BehaviorLensError, match="unknown site"):
        collect(model, cset, sites=("resid",), progress=False)
    with pytest.raises(BehaviorLensError, match="layer 7 does not exist"):
        collect(model, cset, layers=[7], progress=False)
    acts = collect(model, cset, progress=False)
    with pytest.raises(BehaviorLensError, match="no mlp@last"):
        acts.get("mlp", "last")
