"""What could dissolve a probe result: the wording alone, and choosing the best of a grid."""

from __future__ import annotations

import torch
from conftest import probe_family, tiny_model

from behaviorlens.probing import run_probe
from behaviorlens.probing.activations import Activations
from behaviorlens.probing.sweep import probe_sweep
from behaviorlens.probing.validity import nested_best


def test_sides_that_differ_only_in_wording_are_explained_by_the_wording(tmp_path):
    """Each side is one fixed word: any probe reads it perfectly, and so does the wording alone."""
    model = tiny_model("llama")
    cset = probe_family("words", pos="w40", neg="w43", n=12).render(model.tokenizer)
    summary = run_probe(model, cset, {}, methods=("mean_diff", "logistic"), folds=3, out_dir=tmp_path,
                        batch_size=6, progress=False)
    assert summary["best_auroc"] > 0.9
    assert summary["wording_baseline_auroc"] == 1.0 and summary["wording_explains"] is True


def _noise(n_pairs: int, n_layers: int, d: int, signal: float, seed: int = 0) -> Activations:
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([1, 0] * n_pairs)
    x = torch.randn(2 * n_pairs, n_layers, d, generator=g)
    x[:, -1, 0] += signal * (2 * labels - 1)  # only the last layer carries the label, if at all
    return Activations({("resid_post", "last"): x}, labels, torch.arange(n_pairs).repeat_interleave(2),
                       list(range(n_layers)))


def test_nested_selection_removes_the_winners_curse():
    """On labels no layer carries, the best of 40 layers looks better than chance in sample;
    scored on folds that took no part in choosing it, it is at chance."""
    acts = _noise(n_pairs=20, n_layers=40, d=8, signal=0.0)
    in_sample = probe_sweep(acts, methods=("mean_diff",), folds=5).auroc_mean.max()
    nested = nested_best(acts, ("mean_diff",), folds=5)
    assert in_sample > 0.65
    assert nested["best_auroc"] < in_sample - 0.1 and nested["best_auroc_ci"][0] < 0.5


def test_nested_selection_keeps_a_real_signal():
    acts = _noise(n_pairs=20, n_layers=10, d=8, signal=3.0)
    nested = nested_best(acts, ("mean_diff",), folds=5)
    assert nested["best_auroc"] > 0.95
    assert {c["layer"] for c in nested["nested_choices"]} == {9}
    assert nested["best_auroc_ci"][0] > 0.9
