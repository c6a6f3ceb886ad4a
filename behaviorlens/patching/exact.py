"""Exact activation patching: batched and optimized (``patch``) and one at a time (reference).

``patch`` gives the same numbers as running one full forward per cell, with less work:

1. positions before the first token where the two sides of a pair differ hold identical
   activations (causal attention), so patching them is a no-op: reported as metric 0 exactly;
2. a patched run at layer L starts from the cached residual of the base run at L, replaying
   the blocks' own masks and position embeddings (:meth:`SiteMap.run_from`);
3. it also starts at the first patched column: earlier columns are unchanged, so they enter
   attention as the base run's recorded keys and values and are not recomputed (cells are
   sorted by column, so each batch of copies starts as late as it can);
4. only the answer positions go through the final norm and the unembedding;
5. the patched copies of the base prompt (one per cell, or one per cell and answer when
   answers of several tokens are teacher-forced: :mod:`behaviorlens.scoring`) run as one batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..batching import Batch, chunks
from ..errors import BehaviorLensError
from ..interventions.kinds import SetSite
from ..interventions.trace import traced_logits
from ..model import Model
from ..prompts.contrast import ContrastSet
from ..scoring import Scoring, needs_whole, plan
from ..sites import LayerCalls, check_edit, saved_edit
from .hooks import Overwrite, reading
from .plan import Cell, Sides, check_site, default_positions, make_cells, resolve_sides
from .results import PatchResult, build_frame


@dataclass
class SideRun:
    """One forward of one side of a chunk of pairs: the scoring sequences' batch, the metric per
    pair and the activations (rows are the scoring's sequences)."""

    batch: Batch
    scoring: Scoring
    metric: torch.Tensor  # [pairs] float32 behavior metric
    acts: dict[int, torch.Tensor]  # layer -> site activation
    resid: dict[int, torch.Tensor]  # layer -> residual entering the layer
    calls: LayerCalls | None = None  # with replay: the blocks' calls, keys and values


def run_side(model: Model, cset: ContrastSet, pairs: Sequence[int], side: str, site: str,
             layers: Sequence[int], starts: Sequence[int] = (), replay: bool = False) -> SideRun:
    """Forward one side of some pairs, keeping the site at ``layers`` and residuals at ``starts``
    (and, with ``replay``, what :meth:`SiteMap.run_from` needs to rerun it from there)."""
    scoring = plan([cset[i] for i in pairs], side, needs_whole(cset.pairs))
    batch = model.batch(scoring.sequences)
    cols = scoring.position + batch.offsets[scoring.sequence]
    if model.traced:  # the trace path reads the site in the trace; patched runs are whole forwards
        refs = [model.sites.ref(site, layer) for layer in layers] + [model.sites.ref("resid_pre", L) for L in starts]
        logits, reads = traced_logits(model, batch, scoring.sequence, cols, reads=refs)
        return SideRun(batch, scoring, scoring.metric(logits).cpu(), dict(zip(layers, reads)),
                       dict(zip(starts, reads[len(layers):])))
    with torch.inference_mode(), reading(model, site, layers) as acts, \
            reading(model, "resid_pre", starts) as resid, \
            (model.sites.capture_layer_calls(model.hf) if replay else nullcontext()) as calls:
        logits = model.logits_at(batch, scoring.sequence, cols)
    return SideRun(batch, scoring, scoring.metric(logits).cpu(), acts, resid, calls)


def patch(
    model: Model,
    contrast_set: ContrastSet,
    site: str = "resid_pre",
    layers: Sequence[int] | None = None,
    positions: str | Sequence[str] | None = None,
    heads: Sequence[int] | None = None,
    clean: str = "positive",
    direction: str = "denoise",
    batch_size: int = 64,
    pair_batch: int = 16,
    progress: bool = True,
) -> PatchResult:
    """Exact activation patching of ``site`` at every layer x position (x head).

    ``positions`` is ``"all"`` or a list of position names (default: all; ``["last"]`` for
    heads). ``batch_size`` is the number of patched copies per forward.
    """
    contrast_set.require_aligned("activation patching")
    sides = resolve_sides(clean, direction)
    layers, head_list = check_site(model, site, layers, heads)
    cells = make_cells(contrast_set, sides.base, layers, head_list, default_positions(site, positions))
    patched, computed, metrics = run_cells(model, contrast_set, site, sides, cells, batch_size,
                                           pair_batch, progress)
    frame = build_frame(model, contrast_set, site, sides, cells, patched, metrics, computed)
    return PatchResult(frame, site, direction, clean, "exact")


def run_cells(model: Model, cset: ContrastSet, site: str, sides: Sides, cells: list[Cell],
              batch_size: int = 64, pair_batch: int = 16, progress: bool = False,
              ) -> tuple[list[float], list[bool], dict[str, list[float]]]:
    """Patched metric of every cell (batched, from cached residuals); skips provable no-ops."""
    patched = [0.0] * len(cells)
    computed = [False] * len(cells)
    metrics: dict[str, list[float]] = {sides.clean: [0.0] * len(cset), sides.corrupt: [0.0] * len(cset)}
    by_pair: dict[int, list[int]] = {}
    for k, c in enumerate(cells):
        by_pair.setdefault(c.pair, []).append(k)
    pairs = sorted(set(range(len(cset))))
    bar = tqdm(total=len(cells), desc=f"patch {site}", disable=not progress)
    for chunk in chunks(len(pairs), pair_batch):
        chunk_pairs = [pairs[i] for i in chunk]
        todo = [k for i in chunk_pairs for k in by_pair.get(i, [])]
        layers = sorted({cells[k].layer for k in todo})
        source = run_side(model, cset, chunk_pairs, sides.source, site, layers)
        base = run_side(model, cset, chunk_pairs, sides.base, site, [], layers, replay=True)
        row_of = {p: r for r, p in enumerate(chunk_pairs)}
        for r, p in enumerate(chunk_pairs):
            metrics[sides.source][p] = float(source.metric[r])
            metrics[sides.base][p] = float(base.metric[r])
        live = []
        for k in todo:
            c = cells[k]
            if max(c.positions) < cset[c.pair].first_difference():
                patched[k] = float(base.metric[row_of[c.pair]])
            else:
                live.append(k)
        bar.update(len(todo) - len(live))
        first_row = {r: base.scoring.prompt_of.index(r) for r in range(len(chunk_pairs))}
        for layer in layers:
            at_layer = sorted((k for k in live if cells[k].layer == layer), key=lambda k: min(cells[k].positions)
                              + int(base.batch.offsets[first_row[row_of[cells[k].pair]]]))
            for part in chunks(len(at_layer), batch_size):
                ks = [at_layer[i] for i in part]
                values = _patched_runs(model, site, layer, [cells[k] for k in ks],
                                       [row_of[cells[k].pair] for k in ks], source, base)
                for k, v in zip(ks, values):
                    patched[k], computed[k] = v, True
                bar.update(len(ks))
    bar.close()
    return patched, computed, metrics


@torch.inference_mode()
def _patched_runs(model: Model, site: str, layer: int, cells: list[Cell], rows: list[int],
                  source: SideRun, base: SideRun) -> list[float]:
    """One batched forward from ``layer``: cell k patched into copies of the base sequences of
    pair row rows[k] (one copy per scoring sequence); its patched metric per cell."""
    if model.traced:
        return _patched_traces(model, site, layer, cells, rows, source, base)
    device = model.device
    copies, seq_of_copy = base.scoring.take(rows)
    offsets = base.batch.offsets
    copy_idx, row_idx, col_idx, head_idx = [], [], [], []
    for c, seq in enumerate(seq_of_copy):
        cell = cells[copies.prompt_of[c]]
        for j in cell.positions:
            copy_idx.append(c)
            row_idx.append(seq)  # the source batch has the same sequences, lengths and padding
            col_idx.append(j + int(offsets[seq]))
            head_idx.append(cell.head)
    seq_t = torch.tensor(seq_of_copy)
    read_cols = copies.position + offsets[seq_t][copies.sequence]
    start = min(min(col_idx), int(read_cols.min())) if base.calls.can_start_later else 0
    src = source.acts[layer]
    col_t = torch.tensor(col_idx, device=src.device)
    row_src = torch.tensor(row_idx, device=src.device)
    if site == "head":
        head_t = torch.tensor(head_idx, device=src.device)
        values = src[row_src, col_t, head_t]
        index = (torch.tensor(copy_idx), col_t - start, head_t)
    else:
        values = src[row_src, col_t]
        index = (torch.tensor(copy_idx), col_t - start)
    index = tuple(t.to(device) for t in index)
    rows_t = seq_t.to(device)
    hidden = base.resid[layer].index_select(0, rows_t.to(base.resid[layer].device))[:, start:]
    with Overwrite(model, site, layer, index, values):
        out = model.sites.run_from(model.hf, layer, hidden, base.calls, rows_t, start)
    read = out[copies.sequence.to(out.device), (read_cols - start).to(out.device)]
    logits = model.sites.logits_from_hidden(model.hf, read).float()
    return copies.metric(logits).cpu().tolist()


def _patched_traces(model: Model, site: str, layer: int, cells: list[Cell], rows: list[int],
                    source: SideRun, base: SideRun) -> list[float]:
    """The trace path of :func:`_patched_runs`: the copies run whole, patched by a
    :class:`~behaviorlens.interventions.kinds.SetSite` (one trace, any backend)."""
    copies, seq_of_copy = base.scoring.take(rows)
    batch = model.batch([base.scoring.sequences[seq] for seq in seq_of_copy])
    src_rows, src_cols, copy_idx, cols, heads = [], [], [], [], []
    for c, seq in enumerate(seq_of_copy):
        cell = cells[copies.prompt_of[c]]
        for j in cell.positions:
            src_rows.append(seq)  # the source batch has the same sequences, lengths and padding
            src_cols.append(j + int(base.batch.offsets[seq]))
            copy_idx.append(c)
            cols.append(j + int(batch.offsets[c]))
            heads.append(cell.head)
    src = source.acts[layer]
    index = [torch.tensor(copy_idx), torch.tensor(cols)]
    values = src[torch.tensor(src_rows), torch.tensor(src_cols)]
    if site == "head":
        index.append(torch.tensor(heads))
        values = values[torch.arange(len(heads)), torch.tensor(heads)]
    patch = SetSite(model.sites.ref(site, layer), values, tuple(t.to(model.device) for t in index))
    read_cols = copies.position + batch.offsets[copies.sequence]
    logits = traced_logits(model, batch, copies.sequence, read_cols, extra=[patch])
    return copies.metric(logits).cpu().tolist()


# -- the reference: one nnsight forward per cell --------------------------------------------


def patch_one_at_a_time(
    model: Model,
    contrast_set: ContrastSet,
    site: str = "resid_pre",
    layers: Sequence[int] | None = None,
    positions: str | Sequence[str] | None = None,
    heads: Sequence[int] | None = None,
    clean: str = "positive",
    direction: str = "denoise",
    progress: bool = True,
) -> PatchResult:
    """The slow reference: one full nnsight forward of the unpadded base prompt per cell.

    No cell is skipped and nothing is cached; each edit is checked with ``saved_edit`` /
    ``check_edit``. Same table as :func:`patch`.
    """
    contrast_set.require_aligned("activation patching")
    sides = resolve_sides(clean, direction)
    layers, head_list = check_site(model, site, layers, heads)
    cells = make_cells(contrast_set, sides.base, layers, head_list, default_positions(site, positions))
    patched, metrics = cells_one_at_a_time(model, contrast_set, site, sides, cells, progress)
    frame = build_frame(model, contrast_set, site, sides, cells, patched, metrics, [True] * len(cells))
    return PatchResult(frame, site, direction, clean, "exact-reference")


def cells_one_at_a_time(model: Model, cset: ContrastSet, site: str, sides: Sides,
                        cells: list[Cell], progress: bool = False) -> tuple[list[float], dict[str, list[float]]]:
    metrics: dict[str, list[float]] = {sides.clean: [0.0] * len(cset), sides.corrupt: [0.0] * len(cset)}
    whole = needs_whole(cset.pairs)
    sources: dict[int, dict[int, torch.Tensor]] = {}
    for i, p in enumerate(cset):
        layers = sorted({c.layer for c in cells if c.pair == i})
        sources[i], metrics[sides.source][i] = _nnsight_run(model, plan([p], sides.source, whole), site, layers)
        metrics[sides.base][i] = _nnsight_run(model, plan([p], sides.base, whole), site, [])[1]
    patched = []
    for c in tqdm(cells, desc=f"patch {site} (one at a time)", disable=not progress):
        scoring = plan([cset[c.pair]], sides.base, whole)
        patched.append(_nnsight_run(model, scoring, site, [], (c, sources[c.pair][c.layer]))[1])
    return patched, metrics


def _nnsight_run(model: Model, scoring: Scoring, site: str, layers: Sequence[int],
                 write: tuple[Cell, torch.Tensor] | None = None) -> tuple[dict[int, torch.Tensor], float]:
    """One nnsight forward of one pair's scoring sequences: the site at ``layers`` (of the first
    sequence, by unpadded position) and the metric; ``write`` patches a cell with the source
    activations it is given (every sequence at the cell's positions)."""
    batch = model.batch(scoring.sequences)
    offsets = batch.offsets
    saved = {}
    if write is not None:  # (values an nnsight trace uses are prepared before it)
        cell, source = write
        rows = [r for r in range(len(batch)) for _ in cell.positions]
        cols = [j + int(offsets[r]) for r in range(len(batch)) for j in cell.positions]
        index = (rows, cols) if cell.head is None else (rows, cols, cell.head)
        value = source[list(cell.positions) * len(batch)]
        if cell.head is not None:
            value = value[:, cell.head]
    with torch.inference_mode(), model.trace(batch):
        for layer in layers:
            saved[layer] = model.sites.read(model.lm, site, layer)[0, int(offsets[0]):].detach().clone().save()
        if write is not None:
            live = model.sites.write(model.lm, site, cell.layer, value, index)
            edited = saved_edit(live, index)
        logits = model.lm.output.logits.save()
    if write is not None:
        check_edit(edited, value, f"{site} at layer {cell.layer}")
    cols = scoring.position + offsets[scoring.sequence]
    metric = scoring.metric(torch.as_tensor(logits)[scoring.sequence, cols])
    return {k: torch.as_tensor(v) for k, v in saved.items()}, float(metric[0])


def patch_whole(model: Model, contrast_set: ContrastSet, site: str = "resid_post", layer: int | None = None,
                clean: str = "positive", direction: str = "denoise", batch_size: int = 64) -> PatchResult:
    """Patch the site at every position of each pair at once (default: the last layer).

    Patching the whole residual stream at the last layer must give metric 1 (the source
    side's logits exactly); at ``resid_pre`` of layer 0 likewise.
    """
    contrast_set.require_aligned("activation patching")
    sides = resolve_sides(clean, direction)
    layer = model.sites.n_layers - 1 if layer is None else layer
    model.sites.check(site, layer)
    if site == "head":
        raise BehaviorLensError("patch_whole patches a whole site; use resid_pre, resid_post, attn or mlp")
    cells = [Cell(i, layer, tuple(range(len(p.tokens[sides.base]))), None, "all")
             for i, p in enumerate(contrast_set)]
    patched, computed, metrics = run_cells(model, contrast_set, site, sides, cells, batch_size)
    frame = build_frame(model, contrast_set, site, sides, cells, patched, metrics, computed)
    return PatchResult(frame, site, direction, clean, "exact")
