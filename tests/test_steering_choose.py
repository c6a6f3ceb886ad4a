"""Choosing an edit from a patching result."""

from __future__ import annotations

import pandas as pd
import pytest
from steering_helpers import tiny_set, tiny_side_effects

from behaviorlens.errors import BehaviorLensError
from behaviorlens.patching import patch
from behaviorlens.steering import choose_edit


def test_choose_edit_from_patching_table(tiny_llama):
    model = tiny_llama
    cset = tiny_set(model, 8)
    table = patch(model, cset, "head", progress=False).frame
    edit, reason = choose_edit(model, cset, table, side_effects=tiny_side_effects(model))
    assert reason.startswith("chose ") and "candidates:" in reason and "held-out" in reason
    assert edit.notes["held_out_neutral_kl"] <= 0.1
    cands = reason.split("candidates:")[1]
    assert cands.count("removes") >= 2  # several candidates were judged
    # residual cells of a map over every position: vector candidates come from the last token
    table = pd.concat([table, patch(model, cset, "resid_pre", positions="all", progress=False).frame])
    _, reason = choose_edit(model, cset, table, side_effects=tiny_side_effects(model))
    vectors = [line for line in reason.splitlines() if "steering vector at layer" in line]
    assert len(vectors) == 3 and all("(last)" in line for line in vectors)
    assert any("ablation of the mean_diff direction" in line for line in reason.splitlines())
    # an accuracy limit no candidate can meet is refused, listing every candidate's cost
    lines = [line for line in reason.splitlines() if "factual accuracy" in line]
    assert len(lines) >= len(vectors) + 1
    with pytest.raises(BehaviorLensError, match="factual accuracy drop <= -100%"):
        choose_edit(model, cset, table, accuracy_drop_max=-1.0, side_effects=tiny_side_effects(model))
    with pytest.raises(BehaviorLensError, match="lacks columns"):
        choose_edit(model, cset, pd.DataFrame({"site": ["head"]}), side_effects=tiny_side_effects(model))
