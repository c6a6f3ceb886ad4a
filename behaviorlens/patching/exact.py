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
from ..interventions.access import SiteRef
from ..interventions.server import Forward, PatchPart, patch_chunk
from ..interventions.trace import scored_forward, traced_logits
from ..model import Model
from ..prompts.contrast import ContrastSet
from ..reads import reading
from ..remote import run_session, session_groups
from ..scoring import Scoring, needs_whole, plan
from ..sites import LayerCalls, check_edit, saved_edit
from .hooks import Overwrite
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
    head_indices: Sequence[int] | None = None,
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
    layers, head_list = check_site(model, site, layers, head_indices)
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
    with tqdm(total=len(cells), desc=f"patch {site}", disable=not progress) as bar:
        for chunk in chunks(len(pairs), pair_batch):
            chunk_pairs = [pairs[i] for i in chunk]
            todo = [k for i in chunk_pairs for k in by_pair.get(i, [])]
            live = [k for k in todo if max(cells[k].positions) >= cset[cells[k].pair].first_difference()]
            run = _traced_chunk if model.traced else _local_chunk
            source, base, values = run(model, cset, site, sides, cells, chunk_pairs, live, batch_size, bar)
            row_of = {p: r for r, p in enumerate(chunk_pairs)}
            for r, p in enumerate(chunk_pairs):
                metrics[sides.source][p] = float(source[r])
                metrics[sides.base][p] = float(base[r])
            for k in todo:  # a cell before the first difference patches equal values: the base metric
                patched[k], computed[k] = (values[k], True) if k in values else (float(base[row_of[cells[k].pair]]), False)
            bar.update(len(todo) - len(live))
    return patched, computed, metrics


def _by_start(cells: list[Cell], live: list[int], layer: int, offset_of: dict[int, int]) -> list[int]:
    """The live cells at ``layer``, by their first patched column (so each batch starts late)."""
    return sorted((k for k in live if cells[k].layer == layer),
                  key=lambda k: min(cells[k].positions) + offset_of[cells[k].pair])


def _local_chunk(model: Model, cset: ContrastSet, site: str, sides: Sides, cells: list[Cell], pairs: list[int],
                 live: list[int], batch_size: int, bar: tqdm) -> tuple[torch.Tensor, torch.Tensor, dict[int, float]]:
    """One chunk of pairs locally: both sides' forwards, then each batch of copies replayed from
    the cached residual at its layer and column. Source and base metrics and the live cells' values."""
    layers = sorted({cells[k].layer for k in live})
    source = run_side(model, cset, pairs, sides.source, site, layers)
    base = run_side(model, cset, pairs, sides.base, site, [], layers, replay=True)
    row_of = {p: r for r, p in enumerate(pairs)}
    offset_of = {p: int(base.batch.offsets[base.scoring.prompt_of.index(r)]) for p, r in row_of.items()}
    values: dict[int, float] = {}
    for layer in layers:
        at_layer = _by_start(cells, live, layer, offset_of)
        for part in chunks(len(at_layer), batch_size):
            ks = [at_layer[i] for i in part]
            out = _patched_runs(model, site, layer, [cells[k] for k in ks], [row_of[cells[k].pair] for k in ks],
                                source, base)
            values.update(zip(ks, out))
            bar.update(len(ks))
    return source.metric, base.metric, values


@torch.inference_mode()
def _patched_runs(model: Model, site: str, layer: int, cells: list[Cell], rows: list[int],
                  source: SideRun, base: SideRun) -> list[float]:
    """One batched forward from ``layer``: cell k patched into copies of the base sequences of
    pair row rows[k] (one copy per scoring sequence); its patched metric per cell."""
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


def _traced_chunk(model: Model, cset: ContrastSet, site: str, sides: Sides, cells: list[Cell], pairs: list[int],
                  live: list[int], batch_size: int, bar: tqdm) -> tuple[torch.Tensor, torch.Tensor, dict[int, float]]:
    """One chunk of pairs as sessions (:func:`~behaviorlens.interventions.server.patch_chunk`):
    the same figures as :func:`_local_chunk`, computed on the model's backend; a batch of copies
    starts at its first patched column from the base run's keys and values where the model allows
    (no active interventions, a forward that takes a cache)."""
    whole = needs_whole(cset.pairs)
    interventions = list(model.interventions)
    resume = model.cache_argument is not None and not interventions

    def side(name: str) -> tuple[Scoring, Batch, Forward]:
        scoring = plan([cset[i] for i in pairs], name, whole)
        batch = model.batch(scoring.sequences)
        return scoring, batch, scored_forward(model, batch, scoring, scoring.position + batch.offsets[scoring.sequence])

    _, _, source = side(sides.source)
    scoring, batch, base = side(sides.base)
    layers = sorted({cells[k].layer for k in live})
    reads = [model.sites.ref(site, layer) for layer in layers]
    row_of = {p: r for r, p in enumerate(pairs)}
    offset_of = {p: int(batch.offsets[scoring.prompt_of.index(r)]) for p, r in row_of.items()}
    parts, order = [], []
    for read, layer in enumerate(layers):
        at_layer = _by_start(cells, live, layer, offset_of)
        for part in chunks(len(at_layer), batch_size):
            ks = [at_layer[i] for i in part]
            parts.append(_copies(model, batch, scoring, reads[read], read, [cells[k] for k in ks],
                                 [row_of[cells[k].pair] for k in ks], resume))
            order += ks
    values: dict[int, float] = {}
    for group in session_groups(parts, model.session_limits):
        src, base_metric, out = run_session(model, patch_chunk, source, base, reads, group, interventions,
                                            model.cache_argument, what=f"patching {site}")
        done = order[:len(out)]
        values.update(zip(done, out.tolist()))
        order = order[len(out):]
        bar.update(len(done))
    if not parts:
        src, base_metric, _ = run_session(model, patch_chunk, source, base, reads, [], interventions,
                                          model.cache_argument, what=f"patching {site}")
    return src.cpu(), base_metric.cpu(), values


def _copies(model: Model, batch: Batch, scoring: Scoring, ref: SiteRef, read: int, cells: list[Cell],
            rows: list[int], resume: bool) -> PatchPart:
    """One batch of patched copies of the base sequences (cell k patched into copies of pair row
    rows[k], one copy per scoring sequence), as a :class:`PatchPart`."""
    copies, seq_of_copy = scoring.take(rows)
    seq = torch.tensor(seq_of_copy)
    src_rows, src_cols, copy_idx, copy_heads = [], [], [], []
    for c, s in enumerate(seq_of_copy):
        cell = cells[copies.prompt_of[c]]
        for j in cell.positions:
            src_rows.append(s)  # the source batch has the same sequences, lengths and padding
            src_cols.append(j + int(batch.offsets[s]))
            copy_idx.append(c)
            copy_heads.append(cell.head)
    cols = torch.tensor(src_cols)
    read_cols = copies.position + batch.offsets[seq][copies.sequence]
    start = min(int(cols.min()), int(read_cols.min())) if resume else 0
    source = [torch.tensor(src_rows), cols]
    target = [torch.tensor(copy_idx), cols - start]
    if ref.n_heads:
        source.append(torch.tensor(copy_heads))
        target.append(torch.tensor(copy_heads))
    taken = Batch(batch.input_ids[seq], batch.attention_mask[seq], batch.position_ids[seq], batch.offsets[seq])
    device = model.device
    return PatchPart(scored_forward(model, taken, copies, read_cols, start), ref, read, seq.to(device), start,
                     tuple(t.to(device) for t in source), tuple(t.to(device) for t in target))


# -- the reference: one nnsight forward per cell --------------------------------------------


def patch_one_at_a_time(
    model: Model,
    contrast_set: ContrastSet,
    site: str = "resid_pre",
    layers: Sequence[int] | None = None,
    positions: str | Sequence[str] | None = None,
    head_indices: Sequence[int] | None = None,
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
    layers, head_list = check_site(model, site, layers, head_indices)
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
