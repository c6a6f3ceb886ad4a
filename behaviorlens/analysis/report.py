"""The self-contained HTML report of a results folder (images inline, jinja2 templates).

The report opens with its findings: one sentence and one figure per stage, the control that
could dissolve each beside it. Below, each stage's details as formatted tables, and the
per-family examples folded away. It only reads what the steps left in the folder
(``config.json``, each step's ``summary.json``, its CSV tables and PNG plots) and recomputes
nothing.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape

from ..io import atomic_write_text

SECTIONS = (
    ("measure", "How large is the behavior? (measure)"),
    ("probe", "Where is it linearly readable? (probes)"),
    ("patch", "Where does it act causally? (patching)"),
    ("steer", "Editing it, and what the edit costs (steering)"),
)


def write_report(folder: str | Path) -> Path:
    """Render ``report.html`` from the results in ``folder``; returns its path."""
    folder = Path(folder)
    config = _json(folder / "config.json") or {}
    experiment = config.get("experiment", {})
    sections = []
    for step, title in SECTIONS:
        step_dir = folder / step
        summary = _json(step_dir / "summary.json")
        if summary is None:
            continue
        finding, figure, details = BUILDERS[step](step_dir, summary)
        sections.append({"id": step, "title": title, "finding": finding,
                         "figure": _image(figure) if figure is not None and figure.is_file() else None,
                         "details": details,
                         "images": [_image(p) for p in sorted(step_dir.rglob("*.png")) if p != figure]})
    env = Environment(loader=PackageLoader("behaviorlens.analysis", "templates"),
                      autoescape=select_autoescape(["html", "jinja"]))
    env.filters["num"] = _num
    html = env.get_template("report.html.jinja").render(
        name=experiment.get("name", folder.name),
        question=experiment.get("question", ""),
        config=config,
        examples=_json(folder / "measure" / "examples.json") or {},
        generations=_table(_side_by_side(_csv(folder / "steer" / "generations.csv"))),
        predictions=(_json(folder / "summary.json") or {}).get("predictions"),
        sections=sections,
    )
    return atomic_write_text(folder / "report.html", html)


# -- reading -------------------------------------------------------------------------------------


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _csv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.is_file() else None


def _image(path: Path) -> dict[str, str]:
    data = base64.b64encode(path.read_bytes()).decode()
    caption = path.stem.replace("_", " ")
    return {"caption": f"{path.parent.name} / {caption}", "src": f"data:image/png;base64,{data}"}


# -- formatting ----------------------------------------------------------------------------------


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _num(value: Any, digits: int = 3) -> str:
    if _missing(value):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def _pct(value: Any) -> str:
    return "–" if _missing(value) else f"{100 * float(value):.0f}%"


def _ci(summary: dict, key: str, fmt: Callable[[Any], str] = _num) -> str:
    """A figure with its CI, e.g. ``0.62 [0.48, 0.77]``."""
    value, ci = summary.get(key), summary.get(f"{key}_ci")
    if ci is None:
        return fmt(value)
    return f"{fmt(value)} [{fmt(ci[0])}, {fmt(ci[1])}]"


def _table(frame: pd.DataFrame | None, columns: dict[str, str] | None = None,
           formats: dict[str, Callable[[Any], str]] | None = None) -> str | None:
    """An HTML table of chosen columns (``{column: heading}``), every value formatted."""
    if frame is None or frame.empty:
        return None
    if columns:
        frame = frame[[c for c in columns if c in frame.columns]].rename(columns=columns)
    formats = {(columns or {}).get(k, k): f for k, f in (formats or {}).items()}
    cells = frame.copy().astype(object)
    for col in cells.columns:
        fmt = formats.get(col, _num)
        cells[col] = [fmt(v) for v in frame[col]]
    return cells.to_html(index=False, border=0, classes="table", escape=True)


def _kv(rows: dict[str, Any]) -> str:
    """A two-column table of named figures (already formatted)."""
    return _table(pd.DataFrame({"figure": list(rows), "value": [str(v) for v in rows.values()]}),
                  formats={"figure": str, "value": str})


# -- one builder per stage: (finding sentence, headline figure, [(title, html)]) -----------------


def _measure(step: Path, s: dict) -> tuple[str, Path, list]:
    shifts = _csv(step / "shifts.csv")
    name = s.get("train_family", "")
    if "pull" in s:
        finding = (f"On {name}, the user's wrong claim moves the answer {s['pull']:+.2f} logits toward it "
                   f"compared with the same question asked without a claim (accuracy "
                   f"{_pct(s.get('accuracy_neutral'))} without pressure, {_pct(s.get('accuracy_positive'))} "
                   f"under the wrong claim, {_pct(s.get('accuracy_negative'))} under the right one); the "
                   f"shift between the two claims is {s['behavior_shift']:+.2f} "
                   f"[{s['behavior_shift_ci'][0]:+.2f}, {s['behavior_shift_ci'][1]:+.2f}].")
    else:
        finding = (f"On {name}, the behavior shift is {s['behavior_shift']:+.2f} [{s['behavior_shift_ci'][0]:+.2f}, "
                   f"{s['behavior_shift_ci'][1]:+.2f}] logits (no neutral side, so no pull is measured).")
    table = _table(shifts, {"family": "family", "behavior": "behavior", "pairs": "pairs",
                            "behavior_shift": "shift", "ci_low": "shift CI low", "ci_high": "shift CI high",
                            "pull": "pull", "accuracy_positive": "accuracy positive",
                            "accuracy_negative": "accuracy negative", "accuracy_neutral": "accuracy neutral",
                            "top_answer_share": "most common answer", "unbalanced": "unbalanced",
                            "at_chance": "at chance"},
                   {"accuracy_positive": _pct, "accuracy_negative": _pct, "accuracy_neutral": _pct,
                    "top_answer_share": _pct})
    return finding, step / "shifts.png", [("Every family: sides, accuracies, answer balance", table)]


def _probe(step: Path, s: dict) -> tuple[str, Path, list]:
    survives = ("the wording alone does not reach it" if not s.get("wording_explains")
                else "but the prompt's words alone reach it too (wording explains it)")
    finding = (f"The contrast on {s['family']} is linearly readable at {s['best_site']} layer {s['best_layer']} "
               f"@ {s['best_position']} ({s['best_method']}): AUROC {_ci(s, 'best_auroc')} with the choice of "
               f"layer and method made on inner folds (best of the grid in sample: "
               f"{_num(s.get('best_in_sample_auroc'))}); shuffled labels {_num(s['control_auroc'])}, random "
               f"direction {_num(s['random_auroc'])}, words alone {_num(s.get('wording_baseline_auroc'))}: {survives}.")
    probes = _csv(step / "probes.csv")
    top = probes.sort_values("auroc_mean", ascending=False).head(10) if probes is not None else None
    transfer = pd.DataFrame([{"test family": k, "AUROC": v} for k, v in (s.get("transfer_auroc") or {}).items()])
    choices = pd.DataFrame(s.get("nested_choices") or [])
    details = [
        ("Strongest probes (cross-validated by pair), with their controls",
         _table(top, {"site": "site", "layer": "layer", "position": "position", "method": "method",
                      "auroc_mean": "AUROC", "auroc_ci_low": "CI low", "auroc_ci_high": "CI high",
                      "control_auroc": "shuffled labels", "random_auroc": "random direction",
                      "wording_auroc": "words alone", "wording_explains": "wording explains"})),
        ("What each outer fold chose (nested selection)", _table(choices)),
        (f"Transfer of the probe ({s.get('transfer_probe', '')})", _table(transfer)),
        ("Wording baselines", _table(_csv(step / "wording_baseline.csv"))),
    ]
    return finding, step / "probe_auroc.png", details


def _cells_table(cells: list[dict]) -> str | None:
    frame = pd.DataFrame(cells)
    if frame.empty:
        return None
    frame["CI"] = [f"[{_num(a)}, {_num(b)}]" for a, b in frame.pop("ci")]
    return _table(frame, formats={"CI": str})


def _patch(step: Path, s: dict) -> tuple[str, Path, list]:
    parts = []
    if "resid_arrival_layer" in s:
        parts.append(f"the behavior's information reaches the last token at layer {s['resid_arrival_layer']} "
                     f"({s.get('resid_site', 'resid')})")
    top = s.get("heads_top_sites") or []
    if top:
        heads = ", ".join(f"L{t['layer']}H{t['head']} {t['metric']:.2f} [{t['ci'][0]:.2f}, {t['ci'][1]:.2f}]"
                          for t in top[:3])
        parts.append(f"the heads that carry it most at the last token are {heads} (top-5 stability over "
                     f"resampled pairs {_num(s.get('heads_top_k_stability'))})")
    finding = ("Exact patching over " + f"{s.get('resid_pairs', s.get('heads_pairs', '?'))} pairs: "
               + "; ".join(parts) + f". Patching the whole clean residual at the last layer restores "
               f"{_num(s.get('resid_restore_last_layer'))} of the clean metric. Cell values are ratios of means "
               "over pairs; dotted cells have a CI that includes 0.")
    details = []
    for part, title in (("resid", "Residual stream"), ("heads", "Heads at the last position")):
        sub = _json(step / part / "summary.json")
        if sub:
            details.append((f"{title}: cells that carry the behavior", _cells_table(sub.get("top_sites", []))))
            details.append((f"{title}: cells that oppose it", _cells_table(sub.get("opposing_sites", []))))
    attribution = _json(step / "attribution" / "summary.json")
    if attribution:
        details.append(("Attribution patching checked against exact patching", _kv({
            "verified cells": attribution.get("attribution_verified_cells"),
            "wrong (sign, or off by more than 2x)": attribution.get("attribution_wrong_cells"),
            "Pearson": _num(attribution.get("attribution_exact_pearson")),
            "mean absolute error": _num(attribution.get("attribution_exact_mean_abs_error"))})))
    figure = step / "resid" / "heatmap.png"
    return finding, figure, details


def _steer(step: Path, s: dict) -> tuple[str, Path, list]:
    if s.get("pressure_removed_fraction") is not None and s.get("pressure_removed_fraction") == s.get("pressure_removed_fraction"):
        finding = (f"The chosen edit, {s['edit']}, removes {_ci(s, 'pressure_removed_fraction', _pct)} of the "
                   f"pressure on {s['eval_family']}, which it never saw (random control "
                   f"{_pct(s.get('random_control_pressure_removed_fraction'))} ± "
                   f"{_pct(s.get('random_control_pressure_removed_fraction_sd'))} over "
                   f"{s.get('random_controls')} draws). No-pressure accuracy {_pct(s.get('accuracy_neutral_unedited'))} → "
                   f"{_pct(s.get('accuracy_neutral'))}, factual control {_pct(s.get('factual_accuracy_unedited'))} → "
                   f"{_pct(s.get('factual_accuracy'))}, accuracy under the wrong claim "
                   f"{_pct(s.get('accuracy_positive_unedited'))} → {_pct(s.get('accuracy_positive'))} and under the "
                   f"right one {_pct(s.get('accuracy_negative_unedited'))} → {_pct(s.get('accuracy_negative'))}; "
                   f"neutral KL {_num(s.get('neutral_kl'))}; collapse: {_num(s.get('collapse'))}.")
    else:
        finding = (f"The edit, {s['edit']}, removes {_pct(s.get('shift_removed_fraction'))} of the behavior shift on "
                   f"{s['eval_family']} (no neutral side there: pressure removed and collapse cannot be measured).")
    candidates = _csv(step / "choice" / "candidates.csv")
    controls = _csv(step / "eval" / "steering_controls.csv")
    mechanism = _csv(step / "choice" / "mechanism.csv")
    probes = _json(step / "choice" / "probes.json")
    details = [
        ("The choice", f"<p>{_escape(s.get('reason', ''))}</p>"),
        ("Every candidate, judged on pairs that built nothing (limits from the select half of the side effects)",
         _table(candidates, {"group": "group", "edit": "edit", "pressure_removed_fraction": "pressure removed",
                             "accuracy_neutral_change": "no-pressure acc. change",
                             "factual_accuracy_change": "factual acc. change", "neutral_kl": "neutral KL",
                             "collapse": "collapse", "random_pressure_removed_fraction": "random control",
                             "within_limits": "within limits", "chosen": "chosen"},
                {"pressure_removed_fraction": _pct, "accuracy_neutral_change": _points,
                 "factual_accuracy_change": _points, "random_pressure_removed_fraction": _pct})),
        ("Mechanism test: the answer position may not attend to the family's slot tokens",
         _table(mechanism, formats={"pressure_removed_fraction": _pct})),
        ("Detector and gate on held-out prompts", _kv({k: _num(v) for k, v in (probes or {}).items()})
         if probes else None),
        ("The chosen edit on the evaluation family (report half of the side effects)", _kv({
            k: (_ci(s, k) if isinstance(s.get(f"{k}_ci"), list) else _num(s.get(k)))
            for k in ("pressure_removed_fraction", "counter_pressure_removed_fraction", "neutral_metric_change",
                      "collapse", "accuracy_positive_change", "accuracy_negative_change", "accuracy_neutral_change",
                      "factual_accuracy_change", "neutral_kl", "neutral_kl_plain", "perplexity",
                      "perplexity_unedited", "shift_removed_fraction", "anti_steerable_fraction") if k in s})),
        ("Random controls (each draw)", _table(controls, {"draw": "draw", "edit": "edit",
                                                          "heads_patching_effect": "patching effect of its heads",
                                                          "pressure_removed_fraction": "pressure removed",
                                                          "accuracy_neutral_change": "no-pressure acc. change",
                                                          "neutral_kl": "neutral KL", "collapse": "collapse"},
                                              {"pressure_removed_fraction": _pct, "accuracy_neutral_change": _points})),
    ]
    figure = step / "choice" / "pareto.png"
    return finding, figure if figure.is_file() else step / "eval" / "dose_response.png", details


def _points(value: Any) -> str:
    return "–" if _missing(value) else f"{100 * float(value):+.1f} pts"


def _escape(text: str) -> str:
    from markupsafe import escape

    return str(escape(text))


BUILDERS = {"measure": _measure, "probe": _probe, "patch": _patch, "steer": _steer}


def _side_by_side(frame: pd.DataFrame | None) -> pd.DataFrame | None:
    """One row per prompt, one column per multiplier (0 = unsteered)."""
    if frame is None or not {"prompt", "multiplier", "completion"} <= set(frame.columns):
        return frame
    wide = frame.pivot_table(index="prompt", columns="multiplier", values="completion", aggfunc="first", sort=False)
    wide.columns = ["unsteered" if m == 0 else f"steered x{m:g}" for m in wide.columns]
    return wide.reset_index()
