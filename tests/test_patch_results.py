"""Patching cell values: ratios of means with CIs, carriers apart from opposers, top-k stability."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from behaviorlens.patching.results import COLUMNS, PatchResult


def result(cells: dict[int, list[tuple[float, float]]]) -> PatchResult:
    """A hand-made denoising result: layer -> [(effect, gap) per pair] at one position."""
    rows = []
    for layer, pairs in cells.items():
        for pair, (effect, gap) in enumerate(pairs):
            rows.append({"site": "resid_pre", "layer": layer, "head": None, "position": 3, "from_end": 0,
                         "position_name": "last", "token": "x", "pair": pair, "row": pair,
                         "patched": effect, "clean": gap, "corrupt": 0.0, "effect": effect, "gap": gap,
                         "computed": True})
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame["head"] = frame["head"].astype("Int64")
    return PatchResult(frame, "resid_pre", "denoise", "positive")


def test_a_pair_with_a_tiny_gap_does_not_dominate():
    # pair 1 barely differs between its sides; its own ratio is 10, the mean of ratios 5.25
    means = result({0: [(0.5, 1.0), (0.001, 0.0001)]}).means()
    assert means["metric"].iloc[0] == pytest.approx(0.501 / 1.0001)


def test_cells_carry_cis_and_carriers_are_apart_from_opposers():
    rng = np.random.default_rng(0)
    pairs = 12
    res = result({
        0: [(0.9 + 0.05 * rng.normal(), 1.0) for _ in range(pairs)],   # carries
        1: [(-0.6 + 0.05 * rng.normal(), 1.0) for _ in range(pairs)],  # opposes, larger than layer 2
        2: [(0.3 * rng.normal(), 1.0) for _ in range(pairs)],          # noise around 0
    })
    m = res.means().set_index("layer")
    assert m.loc[0, "significant"] and m.loc[1, "significant"] and not m.loc[2, "significant"]
    assert m.loc[0, "metric_ci_low"] <= m.loc[0, "metric"] <= m.loc[0, "metric_ci_high"]
    assert list(res.carriers(5)["layer"])[0] == 0 and (res.carriers(5)["metric"] > 0).all()
    assert list(res.opposers(5)["layer"]) == [1] + ([2] if m.loc[2, "metric"] < 0 else [])


def test_top_k_stability_tells_a_steady_ranking_from_noise():
    rng = np.random.default_rng(1)
    steady = result({layer: [(1.0 - 0.1 * layer + 0.01 * rng.normal(), 1.0) for _ in range(10)]
                     for layer in range(8)})
    noisy = result({layer: [(rng.normal(), 1.0) for _ in range(10)] for layer in range(8)})
    assert steady.top_k_stability(3) > 0.95
    assert noisy.top_k_stability(3) < 0.8


def test_the_arrival_layer_is_the_first_to_hold_most_of_the_effect_and_none_when_no_cell_carries_it():
    from behaviorlens.patching.results import PatchEvidence

    def evidence(metrics):
        return PatchEvidence(pd.DataFrame({"site": "resid_pre", "layer": range(len(metrics)), "head": None,
                                           "from_end": 0, "metric": metrics}), set())

    assert evidence([0.1, 0.5, 0.85, 1.0]).arrival_layer() == 1  # resid_pre 2 enters after layer 1
    assert evidence([-0.5]).arrival_layer() is None
    assert evidence([-0.5, float("nan")]).arrival_layer() is None
