"""Choosing an edit from evidence: candidates from a patching result, judged on held-out pairs.

Candidates: mean-ablation of the top-k heads at the last position (k = 1..max_heads), and,
from the residual-stream cells at the last token (where the answer is read out), a
mean-difference vector (pushed against the behavior) and the ablation of its direction at the
layer where the behavior's information arrives there. Each is applied to a held-out split
of the training family; the winner removes the largest fraction of the behavior shift within
the side-effect limits (neutral KL, and optionally factual accuracy).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ..analysis.metrics import kl_divergence
from ..errors import BehaviorLensError
from .apply import head_edit, head_means, steer
from .edit import Edit
from .evaluate import SideEffectData, _factual_accuracy, _neutral_logits, behavior_metrics
from .vectors import train_vector

PATCHING_COLUMNS = ("site", "layer", "head", "position_name", "metric")


def load_patching(patching: str | Path | pd.DataFrame) -> pd.DataFrame:
    """A patching table (frame, ``patching.csv`` or a folder holding it)."""
    if isinstance(patching, pd.DataFrame):
        table = patching
    else:
        path = Path(patching)
        if path.is_dir():
            path = path / "patching.csv"
        if not path.is_file():
            raise BehaviorLensError(f"no patching result at {path} (expected patching.csv)")
        table = pd.read_csv(path)
    missing = [c for c in PATCHING_COLUMNS if c not in table.columns]
    if missing:
        raise BehaviorLensError(f"patching table lacks columns {missing}")
    return table


def candidates(model: Any, fit: Any, table: pd.DataFrame, max_heads: int = 10,
               vector_multipliers: tuple[float, ...] = (1.0, 2.0, 4.0)) -> list[tuple[Edit, str]]:
    """Candidate edits suggested by a patching table, each with its evidence."""
    cells = table.groupby(["site", "layer", "head", "position_name"], dropna=False)["metric"].mean().reset_index()
    out: list[tuple[Edit, str]] = []
    heads = cells[(cells.site == "head") & (cells.position_name == "last")].sort_values("metric", ascending=False)
    if len(heads):
        top = heads.head(max_heads)
        layers = sorted({int(x) for x in top.layer})
        means = head_means(model, fit, layers)
        for k in range(1, len(top) + 1):
            chosen: dict[int, list[int]] = {}
            for _, r in top.head(k).iterrows():
                chosen.setdefault(int(r.layer), []).append(int(r["head"]))
            evidence = ", ".join(f"L{int(r.layer)}H{int(r['head'])} ({r.metric:.2f})" for _, r in top.head(k).iterrows())
            edit = head_edit(model, chosen, "mean", means=means, family=fit.name, position="all")
            out.append((edit, f"top {k} head(s) at the last position by patching: {evidence}"))
    resid = cells[cells.site.isin(["resid_pre", "resid_post"])]
    resid = resid[resid.position_name.map(lambda n: "last" in str(n).split("/"))]
    if len(resid):
        at = resid.sort_values("layer")
        arrive = at[at.metric >= 0.8 * at.metric.max()].iloc[0]
        layer = int(arrive.layer) - (1 if arrive.site == "resid_pre" and int(arrive.layer) > 0 else 0)
        why = (f"{arrive.site} at the last token reaches {arrive.metric:.2f} of the shift at layer "
               f"{int(arrive.layer)} (max {at.metric.max():.2f})")
        vec = train_vector(model, fit, [layer], "mean_diff", position="last")
        for m in vector_multipliers:
            scaled = Edit(kind="vector", vectors={layer: -m * vec.vectors[layer]}, model=model.name,
                          family=fit.name, position="last", method=f"mean_diff x -{m:g}",
                          d_model=vec.d_model, n_heads=vec.n_heads, head_dim=vec.head_dim,
                          notes={"intent": "reduce"})
            out.append((scaled, why))
        direction = Edit(kind="ablate_direction", vectors={layer: vec.direction}, model=model.name,
                         family=fit.name, position="last", method="mean_diff",
                         d_model=vec.d_model, n_heads=vec.n_heads, head_dim=vec.head_dim)
        out.append((direction, why))
    if not out:
        raise BehaviorLensError("the patching table has no head or resid cells at the last token to choose from")
    return out


def judge(model: Any, edit: Edit, held: Any, side: SideEffectData, base: dict) -> dict[str, float]:
    """Fraction of the held-out shift removed, neutral KL and factual accuracy change of a candidate."""
    with steer(model, edit, 1.0):
        m = behavior_metrics(model, held)
        neutral = _neutral_logits(model, side.neutral, 16)
        accuracy = _factual_accuracy(model, side.factual, 16)
    shift = float((m[:, 0] - m[:, 1]).mean())
    kl = float(torch.cat([kl_divergence(b, s) for b, s in zip(base["neutral"], neutral)]).mean())
    return {"shift_removed_fraction": 1 - shift / base["shift"], "neutral_kl": kl,
            "factual_accuracy_change": accuracy - base["factual_accuracy"]}


def choose_edit(
    model: Any,
    train_set: Any,
    patching: str | Path | pd.DataFrame | None = None,
    test_fraction: float = 0.5,
    seed: int = 0,
    kl_max: float = 0.1,
    accuracy_drop_max: float | None = None,
    side_effects: SideEffectData | None = None,
) -> tuple[Edit, str]:
    """Pick the edit the evidence supports; returns it and a sentence saying what and why.

    The winner removes the most held-out shift among candidates with neutral KL <= ``kl_max``
    (and, if given, a factual accuracy drop <= ``accuracy_drop_max``); every candidate's
    figures are listed. Without a patching result, exact head and residual patching at the
    last token is run on the fitting split (:func:`behaviorlens.patching.patch`).
    """
    if len(train_set) < 4:
        raise BehaviorLensError(f"set {train_set.name!r} has {len(train_set)} pairs; choosing an edit needs at least 4")
    fit, held = train_set.split(test_fraction, seed)
    if patching is None:
        from ..patching import patch

        table = pd.concat([patch(model, fit, "head", progress=False).frame,
                           patch(model, fit, "resid_post", positions=["last"], progress=False).frame])
    else:
        table = load_patching(patching)
    side = side_effects or SideEffectData(model)
    base_m = behavior_metrics(model, held)
    base = {"shift": float((base_m[:, 0] - base_m[:, 1]).mean()),
            "neutral": _neutral_logits(model, side.neutral, 16),
            "factual_accuracy": _factual_accuracy(model, side.factual, 16)}
    scored = []
    for edit, why in candidates(model, fit, table):
        res = judge(model, edit, held, side, base)
        scored.append((edit, why, res))
    limits = f"neutral KL <= {kl_max}"
    if accuracy_drop_max is not None:
        limits += f" and factual accuracy drop <= {accuracy_drop_max:.0%}"
    ok = [s for s in scored if s[2]["neutral_kl"] <= kl_max
          and (accuracy_drop_max is None or -s[2]["factual_accuracy_change"] <= accuracy_drop_max + 1e-9)]
    lines = [f"  {e.describe()}: removes {r['shift_removed_fraction']:.0%} of the held-out shift, "
             f"neutral KL {r['neutral_kl']:.3f}, factual accuracy {100 * r['factual_accuracy_change']:+.1f} points"
             for e, _, r in scored]
    if not ok:
        raise BehaviorLensError(f"no candidate edit keeps {limits}:\n" + "\n".join(lines))
    edit, why, res = max(ok, key=lambda s: s[2]["shift_removed_fraction"])
    edit.notes |= {"chosen_because": why, "held_out_shift_removed_fraction": res["shift_removed_fraction"],
                   "held_out_neutral_kl": res["neutral_kl"],
                   "held_out_factual_accuracy_change": res["factual_accuracy_change"],
                   "train_family": train_set.name}
    reason = (
        f"chose {edit.describe()}: evidence: {why}; on {len(held)} held-out pairs of "
        f"{train_set.name!r} it removes {res['shift_removed_fraction']:.0%} of the behavior shift "
        f"with neutral KL {res['neutral_kl']:.3f} and factual accuracy "
        f"{100 * res['factual_accuracy_change']:+.1f} points (best of {len(scored)} candidates with "
        f"{limits}).\ncandidates:\n" + "\n".join(lines)
    )
    return edit, reason
