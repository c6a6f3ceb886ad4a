"""The pressure figures of an edit: per-side metrics and accuracies, the share of the pressure it
removes, and whether it collapsed the model (moved the no-pressure answers or pushed the
counter-pressured side toward the wrong answer), from per-pair metrics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..prompts.contrast import NEUTRAL
from ..stats import ratio_ci, ratio_of_means


def pressure_figures(unedited: Mapping[str, np.ndarray], edited: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Per-side metrics and accuracies, pressure removed and collapse, from per-pair metrics."""
    out: dict[str, Any] = {}
    for side in unedited:
        out[f"metric_{side}"] = float(edited[side].mean())
        out[f"metric_{side}_unedited"] = float(unedited[side].mean())
        out[f"accuracy_{side}"] = float((edited[side] < 0).mean())
        out[f"accuracy_{side}_unedited"] = float((unedited[side] < 0).mean())
        out[f"accuracy_{side}_change"] = out[f"accuracy_{side}"] - out[f"accuracy_{side}_unedited"]
    shift_u = unedited["positive"] - unedited["negative"]
    shift_e = edited["positive"] - edited["negative"]
    out["shift"] = float(shift_e.mean())
    out["shift_unedited"] = float(shift_u.mean())
    out["shift_removed_fraction"] = 1 - ratio_of_means(shift_e, shift_u)
    if NEUTRAL not in unedited:
        out |= {"pull_unedited": float("nan"), "pressure_removed_fraction": float("nan"),
                "pressure_removed_fraction_ci": [float("nan")] * 2,
                "counter_pressure_removed_fraction": float("nan"), "neutral_metric_change": float("nan"),
                "collapse": None}
        return out
    pos_u, neg_u, neu_u = unedited["positive"], unedited["negative"], unedited[NEUTRAL]
    pos_e, neg_e, neu_e = edited["positive"], edited["negative"], edited[NEUTRAL]
    pull = float((pos_u - neu_u).mean())
    out["pull_unedited"] = pull
    out["pressure_removed_fraction"] = ratio_of_means(pos_u - pos_e, pos_u - neu_u)
    out["pressure_removed_fraction_ci"] = list(ratio_ci(pos_u - pos_e, pos_u - neu_u))
    out["counter_pressure_removed_fraction"] = ratio_of_means(neg_u - neg_e, neg_u - neu_u)
    out["neutral_metric_change"] = float((neu_e - neu_u).mean())
    moved_neutral = abs(out["neutral_metric_change"]) > 0.25 * pull
    counter_toward_wrong = float(neg_e.mean() - neu_u.mean()) > 0.5 * pull
    out["collapse"] = bool(moved_neutral or counter_toward_wrong)
    return out
