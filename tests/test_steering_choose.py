"""Choosing edits: last-token patching against full forwards, and choose_edit's decision."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from behaviorlens.analysis.metrics import logit_diff
from behaviorlens.errors import BehaviorLensError
from behaviorlens.steering import choose_edit
from behaviorlens.steering.patching_last import patch_last
from steering_helpers import tiny_set, tiny_side_effects


@torch.inference_mode()
def test_last_token_patching_matches_full_forwards(tiny_llama):
    model = tiny_llama
    s = model.sites
    cset = tiny_set(model, 4)
    table = patch_last(model, cset, batch_size=3)
    assert set(table.columns) >= {"site", "layer", "head", "position", "position_name", "token", "pair", "metric"}
    assert len(table) == len(cset) * s.n_layers * (1 + s.n_heads)
    # reference: full forwards, patching one head / residual of one pair with an nnsight write
    p = cset[1]
    ids = torch.tensor([p.answer_ids])
    pos_b, neg_b = model.batch([p.tokens["positive"]]), model.batch([p.tokens["negative"]])

    def metric(batch, edit=None):
        with model.trace(batch):
            if edit:
                edit()
            out = model.lm.output.logits[:, -1].save()
        return float(logit_diff(out, ids[:, 0], ids[:, 1]))

    clean, corrupt = metric(neg_b), metric(pos_b)
    with model.trace(neg_b):
        h = s.read(model.lm, "head", 2)[:, -1, 1].clone().save()
    patched = metric(pos_b, lambda: s.write(model.lm, "head", 2, h, (slice(None), -1, 1)))
    got = table[(table.site == "head") & (table.layer == 2) & (table["head"] == 1) & (table.pair == 1)].metric.item()
    assert got == pytest.approx((patched - corrupt) / (clean - corrupt), abs=1e-4)
    with model.trace(neg_b):
        r = s.read(model.lm, "resid_post", 1)[:, -1].clone().save()
    patched = metric(pos_b, lambda: s.write(model.lm, "resid_post", 1, r, (slice(None), -1)))
    got = table[(table.site == "resid_post") & (table.layer == 1) & (table.pair == 1)].metric.item()
    assert got == pytest.approx((patched - corrupt) / (clean - corrupt), abs=1e-4)


def test_choose_edit_from_patching_table(tiny_llama):
    model = tiny_llama
    cset = tiny_set(model, 8)
    table = patch_last(model, cset)
    edit, reason = choose_edit(model, cset, table, side_effects=tiny_side_effects(model))
    assert reason.startswith("chose ") and "candidates:" in reason and "held-out" in reason
    assert edit.notes["held_out_neutral_kl"] <= 0.1
    cands = reason.split("candidates:")[1]
    assert cands.count("removes") >= 2  # several candidates were judged
    with pytest.raises(BehaviorLensError, match="lacks columns"):
        choose_edit(model, cset, pd.DataFrame({"site": ["head"]}), side_effects=tiny_side_effects(model))
