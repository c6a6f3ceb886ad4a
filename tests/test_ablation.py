"""Ablation scans: the three conventions against a hand computation with plain torch hooks."""

from __future__ import annotations

import pytest
import torch

from behaviorlens.cli import main
from behaviorlens.patching.ablation import ablation_scan
from behaviorlens.prompts import PromptFamily


def two_pairs(tok):
    return PromptFamily.from_dict({
        "name": "abl", "chat": False, "user": "w5 {{ x }} {{ s }} w6",
        "valence": {"s": {"positive": "w40", "negative": "w41"}},
        "answers": {"matching": " w50", "not_matching": " w51"},
        "rows": [{"x": "w30 w31 w32"}, {"x": "w33"}],
    }).render(tok)


def head_outputs(model, seq, layer):
    """Input of the output projection (heads concatenated) for one unpadded prompt."""
    got = {}
    proj = model.hf.model.layers[layer].self_attn.o_proj
    h = proj.register_forward_pre_hook(lambda mod, args: got.setdefault("x", args[0][0].clone()))
    with torch.inference_mode():
        model.hf(input_ids=torch.tensor([seq]))
    h.remove()
    return got["x"].view(len(seq), model.sites.n_heads, model.sites.head_dim)


def metric_with(model, pair, layer, head, fill):
    proj = model.hf.model.layers[layer].self_attn.o_proj

    def replace(mod, args):
        x = args[0].clone().view(1, len(fill), model.sites.n_heads, model.sites.head_dim)
        x[0, :, head] = fill
        return (x.view(args[0].shape),)

    h = proj.register_forward_pre_hook(replace)
    with torch.inference_mode():
        logits = model.hf(input_ids=torch.tensor([pair.tokens["positive"]])).logits[0, -1]
    h.remove()
    return float(logits[50] - logits[51])


def plain_metric(model, seq):
    with torch.inference_mode():
        logits = model.hf(input_ids=torch.tensor([seq])).logits[0, -1]
    return float(logits[50] - logits[51])


def test_three_conventions_match_a_hand_computation(tiny_llama):
    m = tiny_llama
    cs = two_pairs(m.tokenizer)
    layer, head = 1, 2
    negatives = [head_outputs(m, p.tokens["negative"], layer)[:, head] for p in cs]
    pos = [plain_metric(m, p.tokens["positive"]) for p in cs]
    neg = [plain_metric(m, p.tokens["negative"]) for p in cs]
    mean = torch.cat(negatives).mean(0)
    for convention in ("zero", "mean", "resample"):
        ablated = []
        for i, p in enumerate(cs):
            n = len(p.tokens["positive"])
            if convention == "zero":
                fill = torch.zeros(n, m.sites.head_dim)
            elif convention == "mean":
                fill = mean.expand(n, -1)
            else:  # the other pair's negative side, aligned from the end, padded with its mean
                other = negatives[1 - i]
                fill = other.mean(0).expand(n, -1).clone()
                k = min(n, len(other))
                fill[n - k:] = other[len(other) - k:]
            ablated.append(metric_with(m, p, layer, head, fill))
        want = (sum(pos) - sum(ablated)) / (sum(pos) - sum(neg))
        table = ablation_scan(m, cs, "head", convention, layers=[layer])
        row = table[table["head"] == head].iloc[0]
        assert row.value == pytest.approx(want, abs=1e-4), convention
        assert row.metric_ablated == pytest.approx(sum(ablated) / 2, abs=1e-4)


def test_patch_method_ablation_writes_the_scan_and_its_heatmap(tiny_llama, tmp_path, monkeypatch, capsys):
    from behaviorlens.cli import options

    path = tmp_path / "fam.yaml"
    path.write_text("name: abl\nchat: false\nuser: 'w5 {{ x }} {{ s }} w6'\nvalence: {s: {positive: w40, negative: w41}}\n"
                    "answers: {matching: ' w50', not_matching: ' w51'}\nrows: [{x: w30}, {x: w31 w32}, {x: w33}]\n")
    monkeypatch.setattr(options, "model_from_args", lambda args: tiny_llama)
    assert main(["patch", str(path), "--method", "ablation", "--ablation", "zero", "--site", "mlp",
                 "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "ablation.csv").is_file() and (tmp_path / "out" / "heatmap_ablation.png").is_file()
    assert "zero-ablation of each mlp" in capsys.readouterr().out
