"""The patching stage: ``run_patch`` writes patching.csv, heatmaps and summary.json."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from ..errors import BehaviorLensError
from ..io import write_csv, write_json
from ..model import Model
from ..params import kwargs
from ..prompts.contrast import ContrastSet
from .ablation import ablation_scan
from .attribution import DEFAULT_STEPS, attribution_patch, verify_top_k
from .exact import patch, patch_whole
from .params import PatchParams
from .plan import check_site, default_positions
from .plots import head_heatmap, position_heatmap
from .results import (
    CELLS_CSV,
    MEANS_CSV,
    STEP_ATTRIBUTION,
    STEP_HEADS,
    STEP_RESID,
    SUMMARY_JSON,
    PatchResult,
)

PATCH_METHODS = ("exact", "attribution")  # run_patch; ablation scans run through run_ablation
LAYERS_PER_CACHE_FILE = 5
REMOTE_LAYERS_PER_CACHE_FILE = 16  # remotely each group is one session (one request): 2 per sweep of 30 layers


def run_patch(
    model: Model,
    contrast_set: ContrastSet,
    site: str = "resid_pre",
    method: str = "exact",
    direction: str = "denoise",
    clean: str = "positive",
    out_dir: str | Path = "patching",
    n_pairs: int | None = None,
    positions: str | list[str] | None = None,
    head_indices: list[int] | None = None,
    steps: int = DEFAULT_STEPS,
    verify_k: int = 30,
    batch_size: int = 64,
    progress: bool = True,
) -> dict:
    """Patch ``site`` at every layer x position (x head); write tables, heatmap, summary.

    Exact sweeps cache each finished layer under ``out_dir/cache`` so a rerun resumes.
    Attribution runs verify their ``verify_k`` strongest cells with exact patching and report
    ``attribution_exact_pearson`` / ``_spearman`` over them. Cell values are ratios of means over
    pairs with bootstrap CIs; the summary lists the carrying cells (``top_sites``, largest
    positive) apart from the opposing ones (``opposing_sites``), ``top_cell`` (e.g. ``L23H1``),
    ``top_k_stability`` (the mean share of the top 5 that stays in the top 5 when pairs are
    resampled) and, for residual sites, ``arrival_layer``: the first layer whose last-token cell
    holds 80% of the largest last-token value. ``summary.json`` is written last.
    """
    if method not in PATCH_METHODS:
        raise BehaviorLensError(f"unknown patching method {method!r}; use one of {', '.join(PATCH_METHODS)}")
    contrast_set.require_aligned("activation patching")
    if n_pairs is not None:
        if n_pairs < 1:
            raise BehaviorLensError(f"patching needs at least one pair, got n_pairs={n_pairs}")
        contrast_set = contrast_set.subset(range(min(n_pairs, len(contrast_set))))
    if len(contrast_set) == 0:
        raise BehaviorLensError(f"set {contrast_set.name!r} has no pairs to patch")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers, _ = check_site(model, site, None, head_indices)
    positions = default_positions(site, positions)
    start = time.perf_counter()
    summary: dict = {
        "family": contrast_set.name, "model": model.name, "site": site, "method": method,
        "direction": direction, "clean": clean, "pairs": len(contrast_set),
        "positions": positions if isinstance(positions, str) else list(positions),
    }
    if method == "exact":
        result = _cached_sweep(model, contrast_set, site, layers, positions, head_indices, clean, direction,
                               batch_size, out / "cache", progress)
    else:
        result = attribution_patch(model, contrast_set, site, positions=positions, head_indices=head_indices,
                                   clean=clean, direction=direction, steps=steps, progress=progress)
        check = verify_top_k(model, contrast_set, result, k=verify_k, batch_size=batch_size)
        write_csv(out / "verification.csv", check.table)
        summary.update(
            attribution_steps=steps,
            attribution_exact_pearson=check.pearson,
            attribution_exact_spearman=check.spearman,
            attribution_exact_pearson_pairs=check.pearson_pairs,
            attribution_exact_mean_abs_error=check.mean_abs_error,
            attribution_verified_cells=len(check.table),
            attribution_wrong_cells=int(check.table["wrong"].sum()),
        )
    write_csv(out / CELLS_CSV, result.frame)
    means = result.means()
    write_csv(out / MEANS_CSV, means)
    title = f"{contrast_set.name}: {method} {direction} {site} ({model.name})"
    if site == "head":
        head_heatmap(means, out / "heatmap_heads.png", title)
    else:
        position_heatmap(means, out / "heatmap.png", title)
    restore = patch_whole(model, contrast_set, "resid_post", None, clean, direction, batch_size)
    f = result.frame.drop_duplicates("pair")
    last = means[(means["from_end"] == 0) & means["head"].isna()].sort_values("layer")
    if len(last) and last["metric"].max() > 0:
        summary["arrival_layer"] = int(last[last["metric"] >= 0.8 * last["metric"].max()]["layer"].iloc[0])
    carriers = result.carriers(10)
    if len(carriers):
        top = carriers.iloc[0]
        summary["top_cell"] = f"L{int(top['layer'])}" + ("" if pd.isna(top["head"]) else f"H{int(top['head'])}")
    summary.update(
        top_sites=_cells(carriers),
        opposing_sites=_cells(result.opposers(5)),
        top_k_stability=result.top_k_stability(5),
        significant_cells=int(means["significant"].sum()),
        restore_last_layer=float(restore.means()["metric"].iloc[0]),
        mean_clean=float(f["clean"].mean()),
        mean_corrupt=float(f["corrupt"].mean()),
        seconds=round(time.perf_counter() - start, 2),
    )
    write_json(out / SUMMARY_JSON, summary)
    return summary


def patch_step(runner: Any, folder: Path, params: PatchParams) -> dict:
    """The experiment's ``patch`` step on the train family: exact patching of ``params.site``
    (``resid/``), of every head at the last position (``heads/``) and attribution patching of the
    site (``attribution/``), each where ``params`` asks; their summaries under those names.
    A later step reads them back with :class:`~.results.PatchStepResult`."""
    cs = runner.contrast_set(runner.exp.train)
    common = kwargs(params) | {"method": "exact"}
    summary = {STEP_RESID: run_patch(runner.model, cs, out_dir=folder / STEP_RESID, **common)}
    if params.head_sweep:
        summary[STEP_HEADS] = run_patch(runner.model, cs, out_dir=folder / STEP_HEADS,
                                        **(common | {"site": "head", "positions": None}))
    if params.attribution:
        summary[STEP_ATTRIBUTION] = run_patch(runner.model, cs, out_dir=folder / STEP_ATTRIBUTION,
                                              **(common | {"method": "attribution", "positions": None}))
    return summary


def run_ablation(model: Model, contrast_set: ContrastSet, site: str = "head", convention: str = "mean",
                 out_dir: str | Path = "ablation", n_pairs: int | None = None, seed: int = 0,
                 progress: bool = True) -> dict:
    """An ablation scan (:func:`~.ablation.ablation_scan`): writes ``ablation.csv``, a layer x
    head (or layer) heatmap and ``summary.json`` (the components whose knock-out lowers the
    behavior most, and those whose knock-out raises it)."""
    if n_pairs is not None:
        if n_pairs < 1:
            raise BehaviorLensError(f"an ablation scan needs at least one pair, got n_pairs={n_pairs}")
        contrast_set = contrast_set.subset(range(min(n_pairs, len(contrast_set))))
    out = Path(out_dir)
    table = ablation_scan(model, contrast_set, site, convention, seed=seed, progress=progress)
    write_csv(out / "ablation.csv", table)
    grid = table.rename(columns={"value": "metric"}).assign(
        significant=(table.ci_low > 0) | (table.ci_high < 0),
        head=table["head"].fillna(0) if site != "head" else table["head"])
    head_heatmap(grid, out / "heatmap_ablation.png",
                 f"{contrast_set.name}: {convention}-ablation of each {site} ({model.name})")

    def named(rows: pd.DataFrame) -> list[dict]:
        return [{"layer": int(r.layer), "head": None if pd.isna(r["head"]) else int(r["head"]),
                 "value": float(r.value), "ci": [float(r.ci_low), float(r.ci_high)]} for _, r in rows.iterrows()]

    summary = {"family": contrast_set.name, "model": model.name, "site": site, "method": "ablation",
               "convention": convention, "pairs": len(contrast_set),
               "top_sites": named(table[table.value > 0].sort_values("value", ascending=False).head(10)),
               "opposing_sites": named(table[table.value < 0].sort_values("value").head(5))}
    write_json(out / "summary.json", summary)
    return summary


def _cells(cells: pd.DataFrame) -> list[dict]:
    """Cells as plain records (site, layer, head, position, token, value and its CI)."""
    rows = []
    for _, r in cells.iterrows():
        rows.append({
            "site": r["site"],
            "layer": int(r["layer"]),
            "head": None if pd.isna(r["head"]) else int(r["head"]),
            "from_end": int(r["from_end"]),
            "position_name": r["position_name"],
            "token": r["token"],
            "metric": float(r["metric"]),
            "ci": [float(r["metric_ci_low"]), float(r["metric_ci_high"])],
        })
    return rows


def _cached_sweep(model: Model, cset: ContrastSet, site: str, layers: list[int], positions,
                  head_indices, clean: str, direction: str, batch_size: int, cache: Path,
                  progress: bool) -> PatchResult:
    """Exact sweep a few layers at a time; finished groups are read back from ``cache``.

    Each group costs one forward of each side on top of its cells, so groups of
    ``LAYERS_PER_CACHE_FILE`` layers keep that overhead small while a rerun still resumes; on a
    remote model each group is a request, so groups hold ``REMOTE_LAYERS_PER_CACHE_FILE``.
    """
    per_file = LAYERS_PER_CACHE_FILE if model.remote is None else REMOTE_LAYERS_PER_CACHE_FILE
    key = {
        "model": model.name, "set": cset.name, "site": site, "clean": clean, "direction": direction,
        "positions": positions, "heads": head_indices, "layers_per_file": per_file,
        "tokens": hashlib.sha256(json.dumps([p.tokens for p in cset]).encode()).hexdigest(),
    }
    key_file = cache / "key.json"
    if cache.exists() and (not key_file.exists() or json.loads(key_file.read_text()) != key):
        shutil.rmtree(cache)
    cache.mkdir(parents=True, exist_ok=True)
    write_json(key_file, key)
    frames = []
    groups = [layers[i:i + per_file] for i in range(0, len(layers), per_file)]
    bar = tqdm(total=len(layers), desc=f"patch {site} (layers)", disable=not progress)
    for group in groups:
        path = cache / f"layers_{group[0]:03d}-{group[-1]:03d}.csv"
        if path.exists():
            frame = pd.read_csv(path, keep_default_na=False, na_values={"head": [""]})
            frame["head"] = frame["head"].astype("Int64")
        else:
            frame = patch(model, cset, site, group, positions, head_indices, clean, direction,
                          batch_size, progress=False).frame
            write_csv(path, frame)
        frames.append(frame)
        bar.update(len(group))
    bar.close()
    return PatchResult(pd.concat(frames, ignore_index=True), site, direction, clean, "exact")
