"""Attribution patching: exact where the metric is linear, converging where one cell carries all."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_family, tiny_model

from behaviorlens.errors import BehaviorLensError
from behaviorlens.patching import attribution_patch, patch, verify_top_k
from behaviorlens.prompts import load_family


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_equals_exact_when_metric_is_linear(arch):
    """With the final norm replaced by Identity, the logits are linear in the last block's
    output and in its MLP output, so the gradient estimate must equal the exact effect."""
    m = tiny_model(arch)
    path = m.sites.arch.final_norm.rsplit(".", 1)
    parent = m.hf.get_submodule(path[0])
    setattr(parent, path[1], torch.nn.Identity())
    with torch.no_grad():
        m.hf.get_output_embeddings().weight.mul_(100.0)  # effects well above float error
    cs = tiny_family().render(m.tokenizer)
    last = m.sites.n_layers - 1
    for site in ("resid_post", "mlp"):
        exact = patch(m, cs, site, [last], progress=False).frame
        effect = (exact["patched"] - exact["corrupt"]).abs().max()
        assert effect > 0.01  # not a trivial case
        for steps in (1, 3):
            est = attribution_patch(m, cs, site, [last], steps=steps, progress=False).frame
            assert (est["patched"] - exact["patched"]).abs().max() < 1e-3 * effect


def test_nonlinear_case_differs_and_steps_converge(tiny_llama):
    """Layer 0 at a one-token valence slot carries the whole difference: plain attribution is
    off there (the model is not linear), the path-averaged estimate converges to exact."""
    fam = tiny_family(valence={"s": {"positive": "w40", "negative": "w41"}})
    cs = fam.render(tiny_llama.tokenizer)
    exact = patch(tiny_llama, cs, "resid_pre", [0], ["s"], progress=False).frame
    assert np.allclose(exact["effect"], exact["gap"], atol=1e-4)  # the slot is the only difference at layer 0
    errors = {}
    for steps in (1, 16):
        est = attribution_patch(tiny_llama, cs, "resid_pre", [0], ["s"], steps=steps, progress=False)
        errors[steps] = np.abs((est.frame["effect"] - exact["effect"]) / exact["gap"]).max()
    assert errors[16] < 0.02 < errors[1]


def test_attribution_of_heads_covers_every_cell_and_names_its_ig_steps(tiny_llama):
    cs = tiny_family().render(tiny_llama.tokenizer)
    est = attribution_patch(tiny_llama, cs, "head", steps=2, direction="noise", progress=False)
    f = est.frame
    assert len(f) == len(cs) * tiny_llama.sites.n_layers * tiny_llama.sites.n_heads
    assert f["computed"].all() and f["effect"].abs().max() > 0
    assert est.method == "attribution-ig2"


def test_verify_top_k_reports_agreement(tiny_llama):
    cs = tiny_family().render(tiny_llama.tokenizer)
    est = attribution_patch(tiny_llama, cs, steps=4, progress=False)
    check = verify_top_k(tiny_llama, cs, est, k=8)
    assert len(check.table) == 8
    assert check.pearson > 0.9 and check.spearman > 0.5
    exact = patch(tiny_llama, cs, progress=False).means()
    row = check.table.iloc[0]
    same = exact[(exact["layer"] == row["layer"]) & (exact["from_end"] == row["from_end"])]
    assert abs(float(same["metric"].iloc[0]) - row["exact"]) < 1e-4


def test_unaligned_set_refused(tiny_llama):
    fam = tiny_family(valence={"s": {"positive": "w40 w42", "negative": "w41"}})
    cs = fam.render(tiny_llama.tokenizer, require_aligned=False)
    with pytest.raises(BehaviorLensError, match="attribution patching needs token-aligned"):
        attribution_patch(tiny_llama, cs, progress=False)


def test_sign_agrees_on_top_cells_of_default(default_model):
    cs = load_family("capitals_opinion").render(default_model.tokenizer).subset(range(3))
    est = attribution_patch(default_model, cs, "resid_pre", progress=False)
    check = verify_top_k(default_model, cs, est, k=30)
    assert not check.table["wrong_sign"].any(), check.table
    assert check.pearson > 0.8 and check.spearman > 0.5
    assert check.mean_abs_error < 0.2 and check.table["wrong"].sum() <= 3, check.table
