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

from ..figures import report_style
from ..io import atomic_write_text

SECTIONS = (
    ("measure", "How large is the behavior? (measure)"),
    ("probe", "Where is it linearly readable? (probes)"),
    ("patch", "Where does it act causally? (patching)"),
    ("circuit", "Which components feed which? (circuit)"),
    ("steer", "Editing it, and what the edit costs (steering)"),
    ("detect", "Telling knowing falsehoods from honest answers (lie detector)"),
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
        style=report_style(),
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
        limits = ("" if s.get("chosen_within_limits", True) is not False else
                  "No candidate kept every limit; what follows is the best trade-off, outside the limits. ")
        finding = (f"{limits}The chosen edit, {s['edit']}, removes {_ci(s, 'pressure_removed_fraction', _pct)} of the "
                   f"pressure on {s['eval_family']} (pairs this run did not build or choose it on; a family looked "
                   f"at while building the tool is a development family). Its matched null "
                   f"({_escape(str(s.get('null_control', 'none')))}) removes "
                   f"{_ci(s, 'null_control_pressure_removed_fraction', _pct)}; edit − null "
                   f"{_ci(s, 'edit_minus_null_pressure_removed_fraction', _pct)}; random controls "
                   f"{_pct(s.get('random_control_pressure_removed_fraction'))} ± "
                   f"{_pct(s.get('random_control_pressure_removed_fraction_sd'))} over {s.get('random_controls')} draws. "
                   f"Deleting the text it hides removes {_pct(s.get('deletion_baseline_pressure_removed_fraction'))}. "
                   f"What the user states in the same turn: context use {_pct(s.get('context_use_accuracy_unedited'))} → "
                   f"{_pct(s.get('context_use_accuracy'))}, claim recall {_pct(s.get('claim_recall_accuracy_unedited'))} → "
                   f"{_pct(s.get('claim_recall_accuracy'))} (deleting the text: "
                   f"{_points(s.get('deletion_baseline_context_use_accuracy_change'))}, "
                   f"{_points(s.get('deletion_baseline_claim_recall_accuracy_change'))}); "
                   f"{'it acts as redaction: no better than deleting the text on any figure. ' if s.get('redaction') else ''}"
                   f"No-pressure accuracy {_pct(s.get('accuracy_neutral_unedited'))} → "
                   f"{_pct(s.get('accuracy_neutral'))}, factual control {_pct(s.get('factual_accuracy_unedited'))} → "
                   f"{_pct(s.get('factual_accuracy'))}, accuracy under the wrong claim "
                   f"{_pct(s.get('accuracy_positive_unedited'))} → {_pct(s.get('accuracy_positive'))} and under the "
                   f"right one {_pct(s.get('accuracy_negative_unedited'))} → {_pct(s.get('accuracy_negative'))}; "
                   f"neutral KL {_num(s.get('neutral_kl'))}; collapse: {_num(s.get('collapse'))}."
                   + _refits(s.get("refit_pressure_removed_fraction")))
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
                             "factual_accuracy_change": "factual acc. change",
                             "context_use_accuracy_change": "context use change",
                             "claim_recall_accuracy_change": "claim recall change", "neutral_kl": "neutral KL",
                             "collapse": "collapse", "null_control_pressure_removed_fraction": "matched null",
                             "random_pressure_removed_fraction": "random control",
                             "deletion_baseline_pressure_removed_fraction": "deleting the text",
                             "redaction": "redaction", "within_limits": "within limits", "chosen": "chosen"},
                {"pressure_removed_fraction": _pct, "accuracy_neutral_change": _points,
                 "factual_accuracy_change": _points, "context_use_accuracy_change": _points,
                 "claim_recall_accuracy_change": _points, "null_control_pressure_removed_fraction": _pct,
                 "random_pressure_removed_fraction": _pct, "deletion_baseline_pressure_removed_fraction": _pct})),
        ("The chosen candidate rebuilt on other splits (its spread over fits)",
         _table(_csv(step / "choice" / "refits.csv"), formats={"pressure_removed_fraction": _pct})),
        ("Mechanism test: the answer position may not attend to the family's slot tokens",
         _table(mechanism, formats={"pressure_removed_fraction": _pct})),
        ("Detector and gate on held-out prompts", _kv({k: _num(v) for k, v in (probes or {}).items()})
         if probes else None),
        ("The chosen edit on the evaluation family (report half of the side effects)", _kv({
            k: (_ci(s, k) if isinstance(s.get(f"{k}_ci"), list) else _num(s.get(k)))
            for k in ("pressure_removed_fraction", "counter_pressure_removed_fraction", "neutral_metric_change",
                      "collapse", "accuracy_positive_change", "accuracy_negative_change", "accuracy_neutral_change",
                      "factual_accuracy_change", "context_use_accuracy_change", "claim_recall_accuracy_change",
                      "null_control_pressure_removed_fraction", "edit_minus_null_pressure_removed_fraction",
                      "deletion_baseline_pressure_removed_fraction", "deletion_baseline_context_use_accuracy_change",
                      "deletion_baseline_claim_recall_accuracy_change", "redaction",
                      "neutral_kl", "neutral_kl_plain", "perplexity",
                      "perplexity_unedited", "shift_removed_fraction", "anti_steerable_fraction") if k in s})),
        ("Random controls (each draw: what it blocked or drew)", _table(controls, {"draw": "draw", "edit": "edit",
                                                          "heads_patching_effect": "patching effect of its heads",
                                                          "pressure_removed_fraction": "pressure removed",
                                                          "accuracy_neutral_change": "no-pressure acc. change",
                                                          "neutral_kl": "neutral KL", "collapse": "collapse"},
                                              {"pressure_removed_fraction": _pct, "accuracy_neutral_change": _points})),
    ]
    figure = step / "choice" / "pareto.png"
    return finding, figure if figure.is_file() else step / "eval" / "dose_response.png", details


def _refits(values: list | None) -> str:
    """The refit spread in a sentence (nothing when the choice was not refit)."""
    if not values or len(values) < 2:
        return ""
    return (f" Built on {len(values)} fit splits it removes {', '.join(_pct(v) for v in values)} of the pressure on "
            "their judging pairs.")


def _points(value: Any) -> str:
    return "–" if _missing(value) else f"{100 * float(value):+.1f} pts"


def _escape(text: str) -> str:
    from markupsafe import escape

    return str(escape(text))


def _detect(step: Path, s: dict) -> tuple[str, Path, list]:
    train = _json(step / "train" / "summary.json") or {}
    if "auroc" in s:
        check = {True: "passed", False: "failed", None: "no mistakes to check"}[s.get("mistake_check")]
        falsity = (f" (the answer-falsity probe it builds on, today's detector: {_ci(s, 'falsity_lie_vs_mistake_auroc')}"
                   f"; gap {_num(s.get('lie_vs_mistake_gap'))}, at least 0.15 to pass)"
                   if "falsity_lie_vs_mistake_auroc" in s else "")
        finding = (f"Lies against honest mistakes: AUROC {_ci(s, 'lie_vs_mistake_auroc')} ({s['n_lie']} lies, "
                   f"{s['n_mistake']} mistakes){falsity}. "
                   f"A lie detector ({s['detector']}) trained on {', '.join(train.get('families', []))} "
                   f"({train.get('n_lie')} lies, {train.get('n_honest')} honest answers, {train.get('n_mistake')} "
                   f"mistakes) scores "
                   f"{', '.join(s.get('families', []))}, which it never saw: knowing falsehoods against honest "
                   f"answers under the same pressure AUROC {_ci(s, 'auroc')} ({s['n_lie']} lies, {s['n_honest']} "
                   f"honest); the claim-wrongness probe {_ci(s, 'claim_auroc')}, the words alone "
                   f"{_ci(s, 'wording_auroc')}, shuffled labels {_ci(s, 'shuffled_auroc')}. Honest "
                   f"mistakes against honest answers {_ci(s, 'mistake_auroc')} ({s['n_mistake']} mistakes; at most "
                   f"0.65 to pass: {check}). Recall at 1% false positives on ordinary chat "
                   f"{_pct(s.get('recall_at_1pct_fpr'))} (held-out chat above the threshold: {_pct(s.get('chat_fpr'))}). "
                   f"Targets met: {_num(s.get('targets_met'))}.")
    else:
        finding = f"The detector ({s.get('detector')}) scored {s.get('n_examples')} unlabelled transcripts."
    transfer = step / "transfer" / "transfer.png"
    details = [
        ("The detector beside its controls, per family it never saw",
         _table(_csv(step / "eval" / "families.csv"))),
        ("Training: labels per family (unsure rows are left out)", _table(_csv(step / "train" / "label_counts.csv"))),
        ("Training figures (nested cross-validation; mistakes scored out of fold)", _kv({
            k: (_ci(train, k) if isinstance(train.get(f"{k}_ci"), list) else _num(train.get(k)))
            for k in ("auroc", "best_in_sample_auroc", "shuffled_auroc", "wording_auroc", "wording_explains",
                      "claim_auroc", "mistake_auroc", "layer", "position", "method", "chat_threshold") if k in train})
         if train else None),
        ("Transfer: trained on one family (rows), tested on another (columns)",
         f'<img class="plot" src="{_image(transfer)["src"]}" alt="transfer matrix">' if transfer.is_file()
         else None),
        ("The examples it gets most wrong", _table(_csv(step / "eval" / "most_wrong.csv"))),
    ]
    for png, title in (("lens_trace.png", "The lens picture: one example of each label, layer by layer"),
                       ("mistake_confidence.png", "How sure the model was of each mistake without pressure")):
        if (step / "eval" / png).is_file():
            details.insert(1, (title, f'<img class="plot" src="{_image(step / "eval" / png)["src"]}" alt="{png[:-4]}">'))
    return finding, step / "eval" / "scores.png", details


def _circuit(step: Path, s: dict) -> tuple[str, Path, list]:
    if "styles" in s:
        return _circuit_styles(step, s)
    tests = s.get("test_faithfulness") or {}
    on_tests = "; ".join(
        f"on {f} {_pct(v)} (random {_pct((s.get('test_random_faithfulness') or {}).get(f))}, complement "
        f"{_pct((s.get('test_complement_faithfulness') or {}).get(f))})" for f, v in tests.items())
    finding = (f"A circuit of {s.get('circuit_edges')} of {s.get('total_edges')} edges ({_pct(s.get('edges_fraction'))}, "
               f"the top by {s.get('method')} attribution, the smallest keeping {_pct(s.get('keep'))} on the pairs "
               f"that chose it) keeps {_ci(s, 'faithfulness', _pct)} of the behavior on held-out pairs of "
               f"{s.get('family')}; random circuits of its size keep {_pct(s.get('random_faithfulness'))}, its "
               f"complement {_pct(s.get('complement_faithfulness'))}" + (f"; {on_tests}" if on_tests else "")
               + f". Attribution agrees with exact edge patching on {s.get('exact_edges_checked')} sampled edges: "
               f"Pearson {_num(s.get('attribution_exact_pearson'))}, Spearman "
               f"{_num(s.get('attribution_exact_spearman'))}.")
    if s.get("acdc_edges") is not None:
        acdc_tests = "".join(f", on {f} {_pct(v)}" for f, v in (s.get("acdc_test_faithfulness") or {}).items())
        finding += (f" ACDC pruning of the top {s['acdc_candidates']} edges keeps {s['acdc_edges']} edges: "
                    f"{_pct(s.get('acdc_faithfulness'))} held out (the attribution circuit of that size: "
                    f"{_pct(s.get('acdc_same_size_attribution_faithfulness'))}){acdc_tests}.")
    comp = s.get("top_composition") or []
    details = [("Circuit", _kv({"top edges": ", ".join(s.get("top_edges", [])[:10]),
                                "heads": ", ".join(s.get("circuit_heads", [])),
                                "ablation": s.get("convention"), "seconds": s.get("seconds")})),
               ("Strongest composition among the circuit's heads (percentile among random head pairs)",
                _kv({c["kind"]: f"{c['pair']} {_num(c['score'])} ({_pct(c['null_percentile'])})" for c in comp})),
               ("Faithfulness over circuit size", _table(_csv(step / "faithfulness_curve.csv"),
                                                         {"family": "family", "pairs": "pairs", "edges": "edges",
                                                          "faithfulness": "faithfulness", "ci_low": "CI low",
                                                          "ci_high": "CI high"})),
               ("Circuit, random circuits and complement", _table(_csv(step / "controls.csv")))]
    return finding, step / "circuit_graph.png", details


def _circuit_styles(step: Path, s: dict) -> tuple[str, Path, list]:
    """One circuit per family: the transfer matrix, the core against the union, one sentence per style."""
    per = s.get("styles") or {}
    core = "; ".join(f"{f} {_pct(d.get('core_faithfulness'))} (union {_pct(d.get('union_faithfulness'))})"
                     for f, d in per.items())
    finding = (f"One circuit per family ({', '.join(s.get('families', []))}; {s.get('method')} attribution, each "
               f"chosen on half its pairs), each scored on every family's held-out pairs beside random circuits of "
               f"its size. The core, the {s.get('core_edges')} edges ({100 * (s.get('core_fraction') or 0):.2f}% of "
               f"{s.get('total_edges')}) every family's circuit holds, keeps: {core}.")
    matrix = _csv(step / "transfer.csv")
    cells = None
    if matrix is not None:
        m = matrix.assign(cell=[f"{_num(r.faithfulness, 2)} [{_num(r.ci_low, 2)}, {_num(r.ci_high, 2)}]; random "
                                f"{_num(getattr(r, 'random_faithfulness', float('nan')), 2)}"
                                for r in matrix.itertuples()])
        cells = m.pivot_table(index="circuit", columns="family", values="cell", aggfunc="first", sort=False)
        cells = cells.reset_index().rename(columns={"circuit": "circuit (rows) on family (columns)"})
    core_union = None if matrix is None else matrix[matrix["circuit"].isin(["core", "union"])]
    sentences = "".join(f"<li>{_escape(x)}</li>" for x in s.get("sentences", []))
    graph = step / "core_graph.png"
    details = [("One sentence per style", f"<ul>{sentences}</ul>" if sentences else None),
               ("The transfer matrix: faithfulness [95% CI over pairs]; random circuits of the row's size",
                _table(cells, formats={c: str for c in (cells.columns if cells is not None else [])})),
               ("The core against the union", _table(core_union, {
                   "circuit": "circuit", "family": "family", "edges": "edges", "faithfulness": "faithfulness",
                   "ci_low": "CI low", "ci_high": "CI high", "random_faithfulness": "random circuits"})),
               ("The core circuit", f'<img class="plot" src="{_image(graph)["src"]}" alt="core circuit">'
                if graph.is_file() else None),
               ("Heads specific to a style or shared (share of each circuit's attribution)",
                _table(_csv(step / "specific_heads.csv"))),
               ("Composition of the style-specific heads with the shared ones (percentile among random head pairs)",
                _table(_csv(step / "specific_composition.csv"))),
               ("Edge overlap between the family circuits", _table(_csv(step / "overlap.csv")))]
    return finding, step / "transfer.png", details


BUILDERS = {"measure": _measure, "probe": _probe, "patch": _patch, "circuit": _circuit, "steer": _steer,
            "detect": _detect}


def _side_by_side(frame: pd.DataFrame | None) -> pd.DataFrame | None:
    """One row per prompt, one column per strength (0 = unsteered)."""
    if frame is None or not {"prompt", "strength", "completion"} <= set(frame.columns):
        return frame
    wide = frame.pivot_table(index="prompt", columns="strength", values="completion", aggfunc="first", sort=False)
    wide.columns = ["unsteered" if m == 0 else f"steered x{m:g}" for m in wide.columns]
    return wide.reset_index()
