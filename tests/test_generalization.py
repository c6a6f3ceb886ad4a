"""Train-on-X, test-on-Y transfer, against a probe fit and scored by hand."""

from __future__ import annotations

import pytest
from conftest import probe_family, tiny_model
from sklearn.metrics import roc_auc_score

from behaviorlens.probing import collect, fit_probe, generalization, transfer_matrix


def test_generalization_equals_manual_fit_and_score():
    model = tiny_model("llama")
    a = probe_family("a", n=6).render(model.tokenizer)
    b = probe_family("b", n=6, filler="w9").render(model.tokenizer)  # same valence words
    c = probe_family("c", n=6, pos="w80 w81", neg="w82 w83").render(model.tokenizer)
    table = generalization(model, a, {"b": b, "c": c}, site="resid_post", layer=2, position="last",
                           method="mean_diff", batch_size=4)
    assert list(table["test"]) == ["b", "c"] and not table["cross_validated"].any()
    acts = {n: collect(model, s, layers=[2], progress=False) for n, s in {"a": a, "b": b, "c": c}.items()}
    probe = fit_probe(acts["a"], "resid_post", 2, "last", "mean_diff")
    for name in ("b", "c"):
        x = acts[name].features("resid_post", "last", 2)
        want = roc_auc_score(acts[name].labels.numpy(), x @ probe.direction)
        assert table.set_index("test").loc[name, "auroc"] == pytest.approx(want, abs=1e-12)
    # same valence words in a new context: the direction transfers
    assert table.set_index("test").loc["b", "auroc"] > 0.9


def test_transfer_matrix_covers_every_ordered_pair(tmp_path):
    model = tiny_model("llama")
    sets = {
        "a": probe_family("a", n=6).render(model.tokenizer),
        "b": probe_family("b", n=6, filler="w9").render(model.tokenizer),
        "c": probe_family("c", n=6, pos="w80 w81", neg="w82 w83").render(model.tokenizer),
    }
    m = transfer_matrix(model, sets, site="resid_post", layer=1, position="s:mean", method="pca",
                        folds=3, out_dir=tmp_path)
    assert len(m) == 9
    assert set(zip(m["train"], m["test"])) == {(x, y) for x in sets for y in sets}
    diag = m[m["train"] == m["test"]]
    assert diag["cross_validated"].all() and not m[m["train"] != m["test"]]["cross_validated"].any()
    assert (m["auroc"].between(0, 1)).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # cached per set
