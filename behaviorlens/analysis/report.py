"""The self-contained HTML report of a results folder (images inline, jinja2 templates).

The report only reads what the steps left in the folder: ``config.json``, each step's
``summary.json``, its CSV tables and PNG plots. It recomputes nothing.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape

from ..io import atomic_write_text

SECTIONS = (
    ("measure", "Behavior measurement"),
    ("probe", "Where is it linearly readable? (probes)"),
    ("patch", "Where does it act causally? (patching)"),
    ("steer", "Editing it (steering) and what the edit costs"),
)
TABLE_ROWS = 12


def write_report(folder: str | Path) -> Path:
    """Render ``report.html`` from the results in ``folder``; returns its path."""
    folder = Path(folder)
    config = _json(folder / "config.json") or {}
    experiment = config.get("experiment", {})
    sections = []
    for step, title in SECTIONS:
        step_dir = folder / step
        if not (step_dir / "summary.json").exists():
            continue
        sections.append({
            "id": step,
            "title": title,
            "summary": _flat(_json(step_dir / "summary.json")),
            "images": [_image(p, step_dir) for p in sorted(step_dir.rglob("*.png"))],
            "tables": _tables(step, step_dir),
        })
    env = Environment(loader=PackageLoader("behaviorlens.analysis", "templates"),
                      autoescape=select_autoescape(["html", "jinja"]))
    html = env.get_template("report.html.jinja").render(
        name=experiment.get("name", folder.name),
        question=experiment.get("question", ""),
        config=config,
        examples=_json(folder / "measure" / "examples.json") or {},
        generations=_side_by_side(_csv(folder / "steer" / "generations.csv")),
        sections=sections,
    )
    return atomic_write_text(folder / "report.html", html)


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _csv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.exists() else None


def _side_by_side(frame: pd.DataFrame | None) -> pd.DataFrame | None:
    """One row per prompt, one column per multiplier (0 = unsteered)."""
    if frame is None or not {"prompt", "multiplier", "completion"} <= set(frame.columns):
        return frame
    wide = frame.pivot_table(index="prompt", columns="multiplier", values="completion", aggfunc="first", sort=False)
    wide.columns = ["unsteered" if m == 0 else f"steered x{m:g}" for m in wide.columns]
    return wide.reset_index()


def _flat(summary: Any) -> list[tuple[str, str]]:
    out = []
    for k, v in (summary or {}).items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, (list, dict)):
            v = json.dumps(v, default=str)
            v = v if len(v) < 300 else v[:297] + "..."
        out.append((k, str(v)))
    return out


def _image(path: Path, root: Path) -> dict[str, str]:
    data = base64.b64encode(path.read_bytes()).decode()
    caption = str(path.relative_to(root).with_suffix("")).replace("/", " / ").replace("_", " ")
    return {"caption": caption, "src": f"data:image/png;base64,{data}"}


def _tables(step: str, step_dir: Path) -> list[dict[str, str]]:
    """The step's small tables, in full, and its large ones cut to their strongest rows."""
    out = []
    for path in sorted(step_dir.rglob("*.csv")):
        if path.name == "generations.csv" or "cache" in path.parts:
            continue
        frame = pd.read_csv(path)
        note = ""
        if len(frame) > TABLE_ROWS:
            key = next((c for c in ("auroc_mean", "metric", "shift_removed_fraction", "behavior_shift")
                        if c in frame.columns), None)
            if key is None:
                continue
            frame = frame.reindex(frame[key].abs().sort_values(ascending=False).index).head(TABLE_ROWS)
            note = f" (the {TABLE_ROWS} rows with the largest |{key}| of {path.name})"
        out.append({
            "name": str(path.relative_to(step_dir)) + note,
            "html": frame.to_html(index=False, float_format=lambda x: f"{x:.4g}", border=0,
                                  classes="table"),
        })
    return out
