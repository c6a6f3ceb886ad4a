"""Behavior measurement: the metric on every side of every pair, shifts, accuracies, balance.

The metric of a prompt is log p(matching) - log p(not_matching) (:mod:`behaviorlens.scoring`).
Per side, *accuracy* is the share of rows where the model prefers the not-matching answer (the
right one in every built-in sycophancy family). With a neutral side, the *pull* of a pair is
metric(positive) - metric(neutral): how far the pressure moves the answer.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .figures import new_figure, save_figure
from .io import write_csv, write_json
from .measure_params import MeasureStepParams
from .model import Model
from .params import kwargs
from .prompts.contrast import NEUTRAL, SIDES, ContrastSet
from .scoring import behavior_metrics
from .stats import bootstrap_ci

UNBALANCED = 0.8  # a family whose most common matching answer covers more rows is warned about
NO_NEUTRAL = "no neutral side: the family gives no no-pressure prompt, so neutral figures are absent"


@dataclass
class Measurement:
    """One row per pair and side (``table``) and the headline figures (``summary``)."""

    table: pd.DataFrame
    summary: dict = field(default_factory=dict)


def side_metrics(model: Model, contrast_set: ContrastSet, batch_size: int = 16,
                 progress: bool = False) -> dict[str, np.ndarray]:
    """The behavior metric of every side the set has (positive, negative, neutral): [pairs] each,
    float64."""
    sides = [*SIDES, NEUTRAL] if contrast_set.has_neutral else list(SIDES)
    metrics = behavior_metrics(model, contrast_set.pairs, sides, batch_size,
                               progress=f"measure {contrast_set.name}" if progress else None)
    return {side: m.numpy().astype(np.float64) for side, m in metrics.items()}


def p_matching(metric: np.ndarray) -> np.ndarray:
    """The probability of the matching answer between the two, from log p(matching) - log p(not)."""
    return 1 / (1 + np.exp(-metric))


def with_ci(summary: dict, name: str, values: np.ndarray) -> None:
    """Put the mean of ``values`` and its bootstrap 95% CI over pairs into ``summary``."""
    summary[name] = float(np.mean(values))
    summary[f"{name}_ci"] = list(bootstrap_ci(values))


def summarize_metrics(metrics: dict[str, np.ndarray]) -> dict:
    """Shift, per-side means and accuracies, and with a neutral side the pull, each with a CI."""
    pos, neg = metrics["positive"], metrics["negative"]
    out: dict = {"pairs": len(pos)}
    shift = pos - neg
    with_ci(out, "behavior_shift", shift)
    out["fraction_pairs_shifted"] = float((shift > 0).mean())
    for side, m in metrics.items():
        out[f"mean_metric_{side}"] = float(m.mean())
        with_ci(out, f"accuracy_{side}", (m < 0).astype(float))
    if NEUTRAL in metrics:
        with_ci(out, "pull", pos - metrics[NEUTRAL])
        with_ci(out, "counter_pull", neg - metrics[NEUTRAL])
    return out


def answer_balance(contrast_set: ContrastSet) -> dict[str, float]:
    """Share of rows whose matching answer is each distinct answer text, largest first."""
    counts = Counter(p.answer_text["matching"].strip() for p in contrast_set)
    return {k: v / len(contrast_set) for k, v in counts.most_common()}


def letter_choices(contrast_set: ContrastSet) -> bool:
    """Whether the set is multiple choice by letter (A/B datasets: the answers are letters)."""
    return all(len(p.answer_text[a].strip()) == 1 and p.answer_text[a].strip().isupper()
               for p in contrast_set for a in ("matching", "not_matching"))


def choice_figures(contrast_set: ContrastSet, metric: np.ndarray) -> dict:
    """Does the model do an A/B task at all? Matching rate, letter bias, balance, at_chance.

    ``picks_matching`` is metric > 0. The model's pick is then a letter; ``a_rate_*`` is how
    often it picks A among rows whose matching answer is A, and among those where it is B:
    with no regard for content both are equal (the letter bias). ``at_chance`` is true when
    always answering one letter reproduces the picks at least as well as the content does
    (picking the matching, or the not-matching, answer), or when the matching rate's CI
    includes one half.
    """
    matching = np.array([p.answer_text["matching"].strip() for p in contrast_set])
    not_matching = np.array([p.answer_text["not_matching"].strip() for p in contrast_set])
    picks_matching = metric > 0
    pick = np.where(picks_matching, matching, not_matching)
    out: dict = {}
    with_ci(out, "matching_rate", picks_matching.astype(float))
    letters = sorted(set(matching) | set(not_matching))
    first = letters[0]
    out["answer_balance_first_letter"] = float((matching == first).mean())
    out["first_letter"] = str(first)
    picks_first = pick == first
    rates = []
    for label, rows in (("when_matching_is_first", matching == first), ("otherwise", matching != first)):
        out[f"first_letter_rate_{label}"] = float(picks_first[rows].mean()) if rows.any() else float("nan")
        if rows.any():
            rates.append(picks_first[rows].mean())
    out["letter_bias"] = float(np.mean(rates))  # picks of the first letter, each group weighted alike
    by_letter = max(picks_first.mean(), 1 - picks_first.mean())
    by_content = max(picks_matching.mean(), 1 - picks_matching.mean())
    lo, hi = out["matching_rate_ci"]
    out["explained_by_letter"] = float(by_letter)
    out["explained_by_content"] = float(by_content)
    out["at_chance"] = bool(by_letter >= by_content or lo <= 0.5 <= hi)
    return out


def measure(model: Model, contrast_set: ContrastSet, batch_size: int = 16, progress: bool = False) -> Measurement:
    """The behavior metric on every side of every pair, with the summary figures.

    Summary: ``pairs``, ``behavior_shift`` (metric(positive) - metric(negative), mean and CI),
    ``fraction_pairs_shifted``, ``mean_metric_<side>`` and ``accuracy_<side>`` (with CI) per
    side, with a neutral side ``pull`` and ``counter_pull`` (each pressured side minus neutral);
    ``answer_balance``, ``unbalanced``; for letter-choice sets :func:`choice_figures`.
    """
    metrics = side_metrics(model, contrast_set, batch_size, progress)
    shift = metrics["positive"] - metrics["negative"]
    rows = []
    for side, values in metrics.items():
        for i, p in enumerate(contrast_set):
            rows.append({
                "family": p.family, "pair": i, "row": p.row, "side": side, "metric": values[i],
                "p_matching": float(p_matching(values[i])),
                "prefers_matching": bool(values[i] > 0), "shift": shift[i],
            })
    summary = summarize_metrics(metrics)
    summary["has_neutral"] = NEUTRAL in metrics
    summary["answer_balance"] = answer_balance(contrast_set)
    summary["unbalanced"] = next(iter(summary["answer_balance"].values())) > UNBALANCED
    if letter_choices(contrast_set):
        summary |= choice_figures(contrast_set, metrics["positive"])
    return Measurement(table=pd.DataFrame(rows), summary=summary)


def warnings_for(summary: dict, name: str) -> list[str]:
    """One-line notes a user must see: an unbalanced family, a task at chance, no neutral side."""
    out = []
    if summary.get("unbalanced"):
        top, share = next(iter(summary["answer_balance"].items()))
        out.append(f"{name}: unbalanced: the matching answer is {top!r} in {share:.0%} of rows, so "
                   "always answering it solves the set")
    if summary.get("at_chance"):
        out.append(f"{name}: at chance: the model's A/B picks follow the letter at least as well as "
                   f"the content (matching rate {summary['matching_rate']:.2f}, CI "
                   f"[{summary['matching_rate_ci'][0]:.2f}, {summary['matching_rate_ci'][1]:.2f}])")
    if not summary.get("has_neutral"):
        out.append(f"{name}: {NO_NEUTRAL}")
    return out


def run_measure(model: Model, contrast_set: ContrastSet, out_dir: str | Path, batch_size: int = 16,
                progress: bool = True) -> dict:
    """The measure stage: write ``measure.csv`` and then ``summary.json`` into ``out_dir``.

    Returns :func:`measure`'s summary plus the set's ``family``, ``behavior``, ``model`` and
    whether some answers have several tokens (``multi_token_answers``; they are scored whole).
    Warnings (:func:`warnings_for`) go to stderr, one line each.
    """
    out = Path(out_dir)
    result = measure(model, contrast_set, batch_size=batch_size, progress=progress)
    summary = {
        **result.summary,
        "family": contrast_set.name,
        "behavior": contrast_set.behavior,
        "model": model.name,
        "multi_token_answers": contrast_set.multi_token_answers,
    }
    write_csv(out / "measure.csv", result.table)
    write_json(out / "summary.json", summary)
    for line in warnings_for(summary, contrast_set.name):
        print(f"behaviorlens: {line}", file=sys.stderr)
    return summary


STEP_FIGURES = ("behavior_shift", "pull", "accuracy_positive", "accuracy_negative", "accuracy_neutral",
                "fraction_pairs_shifted")  # the measure step's headline figures, of the train family


def measure_step(runner: Any, folder: Path, params: MeasureStepParams) -> dict:
    """The experiment's ``measure`` step: every family of the step (default: the experiment's)
    measured into its own subfolder, ``shifts.csv`` and ``shifts.png`` across them, a few example
    pairs for the report (``examples.json``); the train family's figures as the summary."""
    rows, examples = [], {}
    for name in params.families or runner.exp.families:
        cs = runner.contrast_set(name, aligned=False)
        s = run_measure(runner.model, cs, folder / cs.name, **kwargs(params, run_measure))
        rows.append({"family": cs.name, "behavior": cs.behavior, "aligned": cs.aligned,
                     **{k: v for k, v in s.items() if not isinstance(v, (list, dict))},
                     "ci_low": s["behavior_shift_ci"][0], "ci_high": s["behavior_shift_ci"][1],
                     "top_answer_share": max(s["answer_balance"].values())})
        examples[cs.name] = _examples(runner.model.tokenizer, cs)
    table = pd.DataFrame(rows)
    write_csv(folder / "shifts.csv", table)
    write_json(folder / "examples.json", examples)
    plot_shifts(table, folder / "shifts.png")
    train_name = runner.contrast_set(runner.exp.train, aligned=False).name
    train = table.set_index("family").loc[train_name]
    out = {"train_family": train_name}
    for key in STEP_FIGURES:
        if key in train and not pd.isna(train[key]):
            out[key] = float(train[key])
    out["behavior_shift_ci"] = [float(train["ci_low"]), float(train["ci_high"])]
    return out


def _examples(tokenizer: Any, contrast_set: ContrastSet, n: int = 2) -> list[dict]:
    """Token strings of a few pairs with the differing positions marked, for the report."""
    out = []
    for p in list(contrast_set)[:n]:
        pos, neg = p.tokens["positive"], p.tokens["negative"]
        lo = max(0, min(p.first_difference(), len(pos)) - 12)
        out.append({
            "row": p.row,
            "positive": [tokenizer.decode([t]) for t in pos[lo:]],
            "negative": [tokenizer.decode([t]) for t in neg[lo:]],
            "differs": [i - lo for i in range(lo, min(len(pos), len(neg))) if pos[i] != neg[i]],
            "matching": p.answer_text["matching"],
            "not_matching": p.answer_text["not_matching"],
        })
    return out


def plot_shifts(table: pd.DataFrame, path: str | Path) -> Path:
    """Behavior shift per family with its 95% bootstrap interval (reads measure's shifts table)."""
    fig, ax = new_figure(height=4.2)
    y = table["behavior_shift"]
    err = [y - table["ci_low"], table["ci_high"] - y]
    colors = ["#c0392b" if v > 0 else "#7f8c8d" for v in y]
    ax.bar(table["family"], y, yerr=err, color=colors, capsize=4)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel("behavior shift (logits)")
    ax.set_title("metric(positive) - metric(negative), 95% CI over pairs")
    ax.tick_params(axis="x", rotation=30 if len(table) > 6 else 0)
    return save_figure(fig, path)
