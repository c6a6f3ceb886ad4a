"""The detect stages end to end: label families, train, evaluate, write tables, plots, summary."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import BehaviorLensError
from ..interventions.trace import planned
from ..io import write_csv, write_json
from ..measure import side_metrics
from ..params import from_step
from ..prompts.contrast import SIDES, ContrastSet
from ..steering import data
from ..steering.side_effects import request_part
from .detector import Detector
from .evaluate import family_table, figures, most_wrong, score_examples, wilson
from .examples import (
    POSITIONS,
    Examples,
    chat_examples,
    family_examples,
    read_transcripts,
    transcript_examples,
)
from .labels import (
    MARGIN,
    generate_answers,
    instructed_table,
    label_counts,
    label_table,
    labels_from_text,
    reference_side,
)
from .params import DetectParams
from .plots import plot_confidence, plot_lens_trace, plot_scores, plot_sweep, plot_transfer
from .readout import FOLLOWUP
from .train import DETECTOR_METHODS, chat_threshold, train_detector
from .transfer import transfer_matrix

LABEL_MODES = ("metric", "text", "instructed")


@dataclass
class Labelled:
    """A family's labels (every row), its labelled examples and both sides of its pairs."""

    name: str
    table: pd.DataFrame
    examples: Examples
    contrast: Examples


def label_set(model: Any, contrast_set: ContrastSet, margin: float = MARGIN, labels: str = "metric",
              batch_size: int = 16) -> Labelled:
    """Label a family by the model's behavior (``metric`` or generated ``text``) or by its
    instruction (``instructed``: Apollo-style pairs), and build its examples."""
    if labels not in LABEL_MODES:
        raise BehaviorLensError(f"unknown label mode {labels!r}; modes are {', '.join(LABEL_MODES)}")
    if labels == "instructed":
        table = instructed_table(contrast_set)
        contrast = table.assign(label=table["side"])
    else:
        metrics = side_metrics(model, contrast_set, batch_size)
        if labels == "metric":
            table = label_table(contrast_set, metrics, margin)
        else:
            gens = generate_answers(model, contrast_set, ["positive", reference_side(contrast_set)], batch_size=batch_size)
            table = labels_from_text(contrast_set, gens)
        contrast = pd.DataFrame([{"family": contrast_set.name, "pair": i, "row": p.row, "side": side, "label": side,
                                  "model_answer": "matching" if metrics[side][i] > 0 else "not_matching"}
                                 for i, p in enumerate(contrast_set) for side in SIDES])
    return Labelled(contrast_set.name, table, family_examples(contrast_set, table[table["label"] != "unsure"]),
                    family_examples(contrast_set, contrast))


def chat_set(model: Any, part: str, prompts: Sequence[str] | None = None) -> Examples:
    """Ordinary requests (the neutral requests of the side-effect data, one fixed part: the same
    parts as every stage's) with the model's own greedy answers: the threshold is set on
    ``select``, reported on ``report``."""
    return chat_examples(model, request_part(list(prompts) if prompts is not None else data.neutral_prompts(), part))


def _note(line: str) -> None:
    print(f"behaviorlens: {line}", file=sys.stderr)


def run_detect_train(model: Any, sets: Sequence[ContrastSet], out: str | Path, instructed: Sequence[ContrastSet] = (),
                     margin: float = MARGIN, labels: str = "metric", layers: Sequence[int] | None = None,
                     positions: Sequence[str] = POSITIONS, methods: Sequence[str] = DETECTOR_METHODS, folds: int = 5,
                     seed: int = 0, chat: bool = True, batch_size: int = 16, folder: str | Path | None = None,
                     override: bool = True, features: str = "answer", negatives: str = "honest",
                     followup: str = FOLLOWUP) -> dict:
    """Label ``sets`` (and ``instructed`` pairs), train the detector (``override``: the override
    detector, :mod:`.override`; ``features``/``negatives``: a readout detector, :mod:`.readout`,
    ``followup`` its follow-up question; else the answer-falsity probe), write it to ``out`` and
    its tables, plot and ``summary.json`` to ``folder`` (default: ``out`` with suffix ``.train``)."""
    parts = [label_set(model, cs, margin, labels, batch_size) for cs in sets]
    parts += [label_set(model, cs, margin, "instructed", batch_size) for cs in instructed]
    train = Examples.concat([p.examples for p in parts])
    contrast = Examples.concat([p.contrast for p in parts])
    result = train_detector(model, train, contrast, chat_set(model, "select") if chat else None,
                            layers=layers, positions=positions, methods=methods, folds=folds, seed=seed,
                            batch_size=batch_size, override=override, features=features, negatives=negatives,
                            question=followup)
    det = result.detector
    det.meta.update({"margin": margin, "labels": labels, "instructed": [cs.name for cs in instructed]})
    det.save(out)
    folder = Path(folder) if folder is not None else Path(out).with_suffix(".train")
    table = pd.concat([p.table for p in parts], ignore_index=True)
    write_csv(folder / "labels.csv", table)
    write_csv(folder / "label_counts.csv", label_counts(table))
    write_csv(folder / "sweep.csv", result.tables["sweep"])
    write_csv(folder / "wording_baseline.csv", result.tables["wording"])
    if "readout_sweep" in result.tables:
        write_csv(folder / "readout_sweep.csv", result.tables["readout_sweep"])
    plot_sweep(result.tables["sweep"], folder / "sweep.png")
    counts = label_counts(table).set_index("family")
    summary = {**result.summary, "n_unsure": int(counts["unsure"].sum()),
               "label_counts": {f: {k: int(v) for k, v in row.items()} for f, row in counts.iterrows()},
               "detector": det.describe(), "path": str(out), "margin": margin, "labels": labels,
               "instructed": [cs.name for cs in instructed], "model": getattr(model, "name", "")}
    write_json(folder / "summary.json", summary)
    if summary["wording_explains"]:
        _note(f"detect train: the words alone reach the detector's AUROC ({summary['wording_auroc']:.2f} >= "
              f"CI low {summary['auroc_ci'][0]:.2f}): wording explains it")
    return summary


def is_transcripts(path: str) -> bool:
    """Whether ``path`` is a transcripts JSONL file (its first record has 'messages')."""
    p = Path(path)
    if p.suffix != ".jsonl" or not p.is_file():
        return False
    return "messages" in read_transcripts(p)[0]


def run_detect_eval(model: Any, detector: Detector, sets: Sequence[ContrastSet] | str | Path, out_dir: str | Path,
                    margin: float = MARGIN, labels: str = "metric", chat: bool = True, seed: int = 0,
                    batch_size: int = 16, labelled: dict[str, Labelled] | None = None) -> dict:
    """Score families (labelled by the model's behavior) or a transcripts file with the detector;
    write ``scores.csv``, ``families.csv``, ``most_wrong.csv``, ``scores.png`` and ``summary.json``.
    ``labelled`` reuses families labelled already (by name)."""
    out = Path(out_dir)
    if isinstance(sets, (str, Path)):
        examples = transcript_examples(model.tokenizer, read_transcripts(sets), Path(sets).name)
        names = [Path(sets).name]
    else:
        labelled = labelled or {}
        parts = [labelled.get(cs.name) or label_set(model, cs, margin, labels, batch_size) for cs in sets]
        examples = Examples.concat([p.examples for p in parts])
        names = [p.name for p in parts]
        table = pd.concat([p.table for p in parts], ignore_index=True)
        write_csv(out / "labels.csv", table)
        write_csv(out / "label_counts.csv", label_counts(table))
    chat_fpr, chat_scores = float("nan"), None
    if chat and np.isfinite(detector.threshold):
        chat_scores = score_examples(model, detector, chat_set(model, "report"), batch_size)
        chat_fpr = float(chat_scores["flagged"].mean())
        write_csv(out / "chat_scores.csv", chat_scores)
    scores = score_examples(model, detector, examples, batch_size)
    write_csv(out / "scores.csv", scores)
    mistakes = mistake_table(scores)
    labelled = scores[scores["label"] != "unlabelled"]
    summary: dict[str, Any] = {"detector": detector.describe(), "trained_on": detector.meta.get("trained_on"),
                               "families": names, "n_examples": len(scores), "n_flagged": int(scores["flagged"].sum())}
    seen = sorted(set(names) & set(detector.meta.get("trained_on") or []))
    summary["seen_in_training"] = seen
    if seen:
        _note(f"detect eval: {', '.join(seen)} trained the detector; its figures there are not held out")
    if len(labelled):
        summary.update(figures(labelled, detector.threshold, chat_fpr, seed=seed))
        if detector.readout is not None or detector.override is not None:
            summary.update(falsity_recall(model, detector, labelled, chat_scores, batch_size))
        write_csv(out / "families.csv", family_table(labelled, detector.threshold, seed))
        write_csv(out / "most_wrong.csv", most_wrong(labelled))
        if len(mistakes):
            write_csv(out / "mistakes.csv", mistakes)
            plot_confidence(mistakes, out / "mistake_confidence.png")
            summary.update(confidence_figures(mistakes))
        if detector.override is not None:
            trace = lens_examples(model, detector, labelled, examples, batch_size)
            write_csv(out / "lens_trace.csv", trace)
            plot_lens_trace(trace, out / "lens_trace.png")
    else:
        summary.update({"threshold": detector.threshold, "chat_fpr": chat_fpr})
    plot_scores(scores, detector.threshold, out / "scores.png")
    write_json(out / "summary.json", summary)
    return summary


def falsity_recall(model: Any, detector: Detector, labelled: pd.DataFrame, chat_scores: pd.DataFrame | None,
                   batch_size: int = 16) -> dict[str, float]:
    """The answer-falsity probe's own recall at 1% false positives on ordinary chat (its threshold
    set on the select half, as the detector's; from the file, else measured here) and its
    false-positive rate on the report half."""
    if chat_scores is None or not np.isfinite(detector.threshold):
        return {}
    threshold = detector.meta.get("falsity_threshold")
    if threshold is None:
        threshold = chat_threshold(score_examples(model, detector, chat_set(model, "select"), batch_size)["falsity_score"])

    lies = labelled.loc[labelled["label"] == "lie", "falsity_score"].to_numpy(dtype=float)
    return {"falsity_threshold": float(threshold),
            "falsity_recall_at_1pct_fpr": float(np.mean(lies > threshold)) if len(lies) else float("nan"),
            "falsity_recall_at_1pct_fpr_ci": wilson(int(np.sum(lies > threshold)), len(lies)),
            "falsity_chat_fpr": float(np.mean(chat_scores["falsity_score"].to_numpy(dtype=float) > threshold))}


def mistake_table(scores: pd.DataFrame) -> pd.DataFrame:
    """Each mistake with the model's own confidence in its wrong answer without pressure
    (``confidence_unpressured`` = p(wrong) between the two answers on the reference side)."""
    if "metric_reference" not in scores:
        return pd.DataFrame()
    rows = scores[scores["label"] == "mistake"].copy()
    rows["confidence_unpressured"] = 1 / (1 + np.exp(-rows["metric_reference"].to_numpy(dtype=float)))
    cols = ["family", "row", "answer_text", "metric_reference", "confidence_unpressured", "score", "falsity_score",
            "override_score"]
    return rows[[c for c in cols if c in rows]].sort_values("confidence_unpressured").reset_index(drop=True)


def confidence_figures(mistakes: pd.DataFrame) -> dict[str, Any]:
    """How sure the model was of its mistakes without pressure: median and quartiles, and how
    many it gave with p >= 0.9 (confident errors) or p < 0.75 (near a coin flip)."""
    c = mistakes["confidence_unpressured"].to_numpy(dtype=float)
    return {"mistake_confidence_median": float(np.median(c)),
            "mistake_confidence_quartiles": [float(np.quantile(c, 0.25)), float(np.quantile(c, 0.75))],
            "n_mistake_confident": int((c >= 0.9).sum()), "n_mistake_uncertain": int((c < 0.75).sum())}


def lens_examples(model: Any, detector: Detector, scores: pd.DataFrame, examples: Examples,
                  batch_size: int = 16) -> pd.DataFrame:
    """One example of each label (the one whose override score is its label's median: typical,
    not the best) with its lens trace layer by layer: the given answer's log-probability, the
    best alternative's, the margin and the rank, and both tokens as text."""
    picks = []
    for label in ("lie", "honest", "mistake"):
        part = scores[scores["label"] == label]
        if len(part):
            s = part["override_score"]
            picks.append(int((s - s.median()).abs().idxmin()))
    if not picks:
        return pd.DataFrame()
    chosen = examples.subset(np.array(picks))
    trace = detector.override.trace(model, chosen, batch_size)
    tok, rows = model.tokenizer, []
    for i, idx in enumerate(picks):
        best = trace.alternatives[i]
        for j, layer in enumerate(trace.layers):
            rows.append({"label": scores.at[idx, "label"], "family": scores.at[idx, "family"],
                         "row": scores.at[idx, "row"], "given": tok.decode([int(trace.given[i])]),
                         "alternative": tok.decode([int(best[0])]), "layer": layer,  # the last layer's runner-up
                         "logp_given": trace.logp[i, j], "logp_alternative": trace.alternative_logp[i, j],
                         "margin": trace.margin[i, j], "rank": int(trace.rank[i, j]),
                         "lens": detector.override.lens, "score": scores.at[idx, "score"],
                         "override_score": scores.at[idx, "override_score"]})
    return pd.DataFrame(rows)


def run_transfer(model: Any, sets: Sequence[ContrastSet], out_dir: str | Path, margin: float = MARGIN,
                 labels: str = "metric", layers: Sequence[int] | None = None, methods: Sequence[str] = ("mean_diff",),
                 folds: int = 5, seed: int = 0, batch_size: int = 16,
                 labelled: dict[str, Labelled] | None = None, features: str = "answer", negatives: str = "honest",
                 followup: str = FOLLOWUP, override: bool = False) -> dict:
    """The train x test matrix over ``sets`` (:func:`~behaviorlens.detect.transfer.transfer_matrix`):
    ``transfer.csv``, ``transfer.png`` and ``summary.json`` in ``out_dir``. ``labelled`` reuses
    families labelled already (by name); ``features``, ``negatives``, ``followup``: a readout
    detector's matrix (:mod:`.readout`); ``override``: the override detector's."""
    out = Path(out_dir)
    labelled = dict(labelled or {})
    for cs in sets:
        if cs.name not in labelled:
            labelled[cs.name] = label_set(model, cs, margin, labels, batch_size)
    names = [cs.name for cs in sets]
    matrix = transfer_matrix(model, {n: labelled[n].examples for n in names}, layers, methods=methods,
                             folds=folds, seed=seed, batch_size=batch_size, features=features, negatives=negatives,
                             question=followup, override=override)
    write_csv(out / "transfer.csv", matrix)
    plot_transfer(matrix, out / "transfer.png")
    off = matrix[(matrix["train"] != matrix["test"]) & matrix["auroc"].notna()]
    summary = {"families": names, "features": features, "negatives": negatives, "override": override,
               "transfer_auroc": {f"{r.train} -> {r.test}": float(r.auroc) for r in off.itertuples()},
               "mean_transfer_auroc": float(off["auroc"].mean()) if len(off) else float("nan"),
               "trainable": sorted(matrix.loc[matrix["auroc"].notna(), "train"].unique())}
    write_json(out / "summary.json", summary)
    return summary


def step_families(params: dict | DetectParams, train: Any, test: Sequence[Any]) -> dict[str, list]:
    """The families each part of the experiment's detect step uses (defaults: the experiment's)."""
    p = params if isinstance(params, DetectParams) else from_step(DetectParams, params)
    out = {"train": list([train] if p.train is None else p.train), "instructed": list(p.instructed),
           "eval": list(test if p.eval is None else p.eval)}
    out["transfer"] = list(dict.fromkeys([*out["train"], *out["eval"]]) if p.transfer is None else p.transfer)
    return out


def detect_step(runner: Any, folder: Path, params: DetectParams) -> dict:
    """The experiment's ``detect`` step: train (``train/``, ``detector.safetensors``), evaluate on
    the families it never saw (``eval/``) and the transfer matrix (``transfer/``)."""
    model = runner.model
    fams = step_families(params, runner.exp.train, runner.exp.test)
    sets = {k: [runner.contrast_set(f, aligned=False) for f in v] for k, v in fams.items()}
    own = {"seed": runner.exp.seed, "batch_size": runner.exp.batch_size}
    path = folder / "detector.safetensors"
    train = run_detect_train(model, sets["train"], path, instructed=sets["instructed"], folder=folder / "train",
                             **(params.train_kwargs() | own))
    out: dict[str, Any] = {f"train_{k}": v for k, v in train.items() if k not in ("nested_choices", "path")}
    families = {cs.name: cs for cs in [*sets["eval"], *sets["transfer"]]}  # each labelled once, in one session
    labelled = planned(model, lambda: {name: label_set(model, cs, params.margin, params.labels, own["batch_size"])
                                       for name, cs in families.items()}, "labelling the families")
    if sets["eval"]:
        ev = run_detect_eval(model, Detector.load(path), sets["eval"], folder / "eval",
                             **(params.eval_kwargs() | own), labelled=labelled)
        out.update({k: v for k, v in ev.items()})
    if sets["transfer"]:
        tr = run_transfer(model, sets["transfer"], folder / "transfer", **(params.transfer_kwargs() | own),
                          labelled=labelled)
        out["mean_transfer_auroc"] = tr["mean_transfer_auroc"]
        out["transfer_auroc"] = tr["transfer_auroc"]
    return out
