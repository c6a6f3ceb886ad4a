"""Benchmark: exact activation patching, optimized vs nnsight one at a time vs TransformerLens 4.

    .venv/bin/python bench/patching.py [--pairs 8] [--layer-step 1] [--reference-cells 40]
                                       [--steps 4] [--repeats 3] [--threads N]

What is compared. ``resid_pre`` at every ``--layer-step``-th layer of the first ``--pairs``
pairs of ``--family`` (default ``capitals_opinion``), denoising (the negative side runs, the
positive side is patched in), on the default model. Every peer computes exactly the cells that
our optimized ``patch`` computes: the (pair, layer, position) cells from each pair's first
differing token on (``computed`` in its frame; earlier positions hold identical activations on
both sides, so their effect is exactly 0 and no peer runs them). Every model runs eager
attention: TransformerLens forces it, so our model is switched to it too (same weights, same
kernels on every side).

- optimized exact: ``behaviorlens.patching.patch``, the full sweep.
- nnsight one at a time, the way an nnsight user writes a sweep: one trace of the source side
  saves ``resid_pre`` at every layer, one trace of the base side gives the baseline, then one
  trace per (layer, position counted from the first difference): the whole left-padded batch of
  pairs runs and that one cell is patched in every row that has it. A random sample of
  ``--reference-cells`` of these forwards is timed and scaled to all of them, plus the two
  setup traces; the sampling error (standard error of the scaled total, finite-population
  corrected) is printed. Its values are checked against ours.
- TransformerLens: ``TransformerBridge.boot_transformers`` on the same weights, then
  ``get_act_patch_resid_pre`` with ``index_df`` listing our computed (layer, pos) cells. Each
  of its patched forwards runs the whole batch of corrupted prompts at one position, so pairs
  are batched by prompt length (one batch of equal-length prompts per length, as its patching
  module asks). The clean ``run_with_cache`` and the corrupted baseline run once per batch.
  Cells are sampled per batch (stratified, at least 2 per batch; ``--reference-cells`` in
  all), each cell's time is read inside one ``get_act_patch_resid_pre`` call per batch, and
  scaled to all cells, with its sampling error. Its values are checked against ours (target:
  1e-4).
- attribution patching, plain (steps=1) and path-averaged (``--steps``), with Pearson and
  Spearman against the exact sweep.

How it is timed. After a warm-up of every peer, ``--repeats`` rounds each time every peer once
(the bare forward, the optimized sweep, the sampled cells of both references, both attribution
runs), in an order that rotates from round to round, so that drift in machine load hits all
peers alike; each figure is the median over rounds (a sampled cell's time is its median over
rounds). Times are wall clock and process CPU time (the steadier one on a shared machine, with
``--threads 1``: on a 2-core machine shared with another busy process, torch's default of 2
threads made every forward about 20x slower, unevenly); every time is also given as a ratio to
one bare forward of the base side of the same pairs. ``--reference-cells 0`` times every cell of both references (no sampling).
TransformerLens is optional: ``pip install transformer-lens``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # TransformerLens draws a progress bar per call

import argparse
import math
import random
import statistics
import time
from dataclasses import dataclass, field

import torch

SITE = "resid_pre"
KINDS = ("wall", "cpu")


def clock(fn):
    """(wall seconds, process CPU seconds) of one call, and its result."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return (time.perf_counter() - wall, time.process_time() - cpu), out


def median(times: list[tuple[float, float]]) -> tuple[float, float]:
    """Median wall and median CPU time of several measurements."""
    return tuple(statistics.median(t[k] for t in times) for k in range(len(KINDS)))  # type: ignore[return-value]


@dataclass
class Estimate:
    """A sweep's time scaled from sampled cells: setup + cells x mean time per cell."""

    total: float
    se: float  # standard error of ``total`` from the sampling of cells (0: every cell timed)
    sampled: int
    cells: int

    def describe(self, bare: float, short: bool = False) -> str:
        if short:
            error = "" if self.sampled >= self.cells else f" +- {self.se:.1f} s"
            return f"{self.total:.1f} s{error} = {self.total / bare:.1f}"
        if self.sampled >= self.cells:
            return f"{self.total:.1f} s (every cell timed) = {self.total / bare:.1f} bare forwards"
        low, high = self.total - 1.96 * self.se, self.total + 1.96 * self.se
        return (f"{self.total:.1f} s +- {self.se:.1f} s (standard error from sampling {self.sampled} of "
                f"{self.cells} cells; 95% CI {low:.1f}-{high:.1f} s) = {self.total / bare:.1f} bare forwards")

    def ratio(self, t: float) -> str:
        """How many times faster ``t`` is than this sweep, with the 95% sampling interval."""
        if self.sampled >= self.cells or self.se == 0:
            return faster(self.total / t)
        low, high = max(self.total - 1.96 * self.se, 0.0), self.total + 1.96 * self.se
        return f"{faster(self.total / t)} (95% CI {low / t:.1f}-{high / t:.1f}x)"


def faster(ratio: float) -> str:
    """``ratio`` (their time / ours) in words."""
    return f"{ratio:.1f}x faster" if ratio >= 1 else f"{1 / ratio:.1f}x slower"


def stratum(times: list[float], population: int) -> tuple[float, float]:
    """Estimated total time of ``population`` cells from sampled per-cell ``times``, and its
    sampling variance (finite-population corrected)."""
    n = len(times)
    mean = statistics.fmean(times)
    if n >= population or n < 2:
        return mean * population, 0.0
    return mean * population, population ** 2 * statistics.variance(times) / n * (1 - n / population)


# -- peers: each times itself once per round ---------------------------------------------------


class Simple:
    """A peer timed as a whole: a bare forward, the optimized sweep, an attribution run."""

    def __init__(self, name: str, fn) -> None:
        self.name, self.fn = name, fn
        self.times: list[tuple[float, float]] = []
        self.result = None

    def warm_up(self) -> None:
        pass

    def round(self) -> str:
        t, self.result = clock(self.fn)
        self.times.append(t)
        return f"{t[0]:.1f} s"

    def median(self) -> tuple[float, float]:
        return median(self.times)


@dataclass
class Stratum:
    """One batch of a sampled reference: its setup, its cells, and the sampled cells' times."""

    setup: object  # () -> state, timed once per round
    run: object  # (state, sampled cells) -> (per-cell (wall, cpu) times, per-cell values by pair)
    cells: list
    sample: list
    label: str = ""
    setup_times: list = field(default_factory=list)
    cell_times: list = field(default_factory=list)  # per round: [(wall, cpu)] per sampled cell

    def estimate(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """(total wall, total CPU) and their sampling variances."""
        setup = median(self.setup_times)
        per_cell = [median(list(ts)) for ts in zip(*self.cell_times)]
        totals, variances = [], []
        for k in range(len(KINDS)):
            total, var = stratum([t[k] for t in per_cell], len(self.cells))
            totals.append(setup[k] + total)
            variances.append(var)
        return tuple(totals), tuple(variances)  # type: ignore[return-value]


class Sampled:
    """A reference sweep timed on sampled cells (stratified by batch) and scaled to all of them;
    each round also checks its values against ours."""

    def __init__(self, name: str, strata: list[Stratum], ours: dict, warm_up) -> None:
        self.name, self.strata, self.ours, self._warm_up = name, strata, ours, warm_up
        self.diff = 0.0

    def warm_up(self) -> None:
        self._warm_up()

    def round(self) -> str:
        wall = 0.0
        for s in self.strata:
            t, state = clock(s.setup)
            s.setup_times.append(t)
            times, values = s.run(state, s.sample)
            s.cell_times.append(times)
            wall += t[0] + sum(x[0] for x in times)
            for key, v in values.items():
                self.diff = max(self.diff, abs(v - self.ours[key]))
        return f"{wall:.1f} s for {sum(len(s.sample) for s in self.strata)} cells"

    def estimates(self) -> dict[str, Estimate]:
        parts = [s.estimate() for s in self.strata]
        sampled = sum(len(s.sample) for s in self.strata)
        cells = sum(len(s.cells) for s in self.strata)
        return {kind: Estimate(sum(p[0][k] for p in parts), math.sqrt(sum(p[1][k] for p in parts)), sampled, cells)
                for k, kind in enumerate(KINDS)}


# -- the benchmark ------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--family", default="capitals_opinion")
    ap.add_argument("--layer-step", type=int, default=1, help="patch every k-th layer")
    ap.add_argument("--reference-cells", type=int, default=40,
                    help="cells timed for each reference (nnsight, TransformerLens); 0 = all")
    ap.add_argument("--steps", type=int, default=4, help="interpolation steps of the improved estimate")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of measurements (medians over rounds)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from behaviorlens import load_model
    from behaviorlens.patching import attribution_patch, compare, patch
    from behaviorlens.patching.plan import make_cells, resolve_sides
    from behaviorlens.prompts import load_family

    model = load_model()
    _use_eager(model.hf)
    cset = load_family(args.family).render(model.tokenizer)
    cset = cset.subset(range(min(args.pairs, len(cset))))
    if cset.multi_token_answers:
        raise SystemExit(f"{args.family} has answers of several tokens; this benchmark needs one-token answers")
    layers = list(range(0, model.sites.n_layers, args.layer_step))
    sides = resolve_sides("positive", "denoise")
    lengths = sorted({len(p.tokens[sides.base]) for p in cset})
    print(f"default model, {args.family}: {len(cset)} pairs of {'/'.join(map(str, lengths))} tokens, "
          f"{SITE} at {len(layers)} layers, torch threads {torch.get_num_threads()}, attention: "
          f"{model.hf.config._attn_implementation} on every side")

    # the cells: exactly those the optimized sweep computes
    exact = patch(model, cset, SITE, layers, progress=False)
    grid = make_cells(cset, sides.base, layers, [None], "all")
    done = exact.frame[exact.frame["computed"]]
    ours = {(int(r.layer), int(r.position), int(r.pair)): float(r.patched) for r in done.itertuples(index=False)}
    first = [p.first_difference() for p in cset]
    expected = {(L, j, i) for L in layers for i, p in enumerate(cset)
                for j in range(first[i], len(p.tokens[sides.base]))}
    if set(ours) != expected:
        raise SystemExit("patch did not compute exactly the cells from the first difference on")
    print(f"cells compared: {len(ours)} (pair, layer, position) cells that patch computes, from each "
          f"pair's first differing token (position {'/'.join(map(str, sorted(set(first))))}) on; the "
          f"{len(grid) - len(ours)} earlier cells of the {len(grid)}-cell grid are exact no-ops")

    batch = model.batch(cset.tokens(sides.base))
    bare = Simple("bare forward", lambda: model.logits(batch))
    bare.warm_up = lambda: model.logits(batch)
    fast = Simple("optimized exact", lambda: patch(model, cset, SITE, layers, progress=False))  # warm: ran above
    ref = nnsight_sweep(model, cset, sides, layers, ours, args.reference_cells)
    tl = transformer_lens_sweep(model, cset, sides, layers, ours, args.reference_cells)
    attribution = {s: Simple(f"attribution steps={s}", lambda s=s: attribution_patch(
        model, cset, SITE, layers, steps=s, progress=False)) for s in sorted({1, args.steps})}
    peers = [bare, fast, ref, *([tl] if tl else []), *attribution.values()]

    for peer in peers:
        peer.warm_up()
    for r in range(args.repeats):
        order = peers[r % len(peers):] + peers[:r % len(peers)]
        done_round = [f"{p.name} {p.round()}" for p in order]
        print(f"round {r + 1}/{args.repeats}: " + "; ".join(done_round), flush=True)

    t_bare = bare.median()
    t_fast = fast.median()
    ref_est = ref.estimates()
    tl_est = tl.estimates() if tl else None
    print(f"\nmedians over {args.repeats} round(s) (wall clock; process CPU time in brackets)")
    print(f"bare forward of the {len(cset)} pairs (base side, padded batch): {t_bare[0]:.3f} s [{t_bare[1]:.3f} s]")
    print(f"optimized exact (patch): {t_fast[0]:.2f} s = {t_fast[0] / t_bare[0]:.1f} bare forwards "
          f"[{t_fast[1]:.2f} s = {t_fast[1] / t_bare[1]:.1f}]")
    for name, est in [("nnsight one at a time", ref_est), (f"TransformerLens {tl.version} get_act_patch_resid_pre"
                                                           if tl else "", tl_est)]:
        if est:
            print(f"{name}: {est['wall'].describe(t_bare[0])} [{est['cpu'].describe(t_bare[1], short=True)}]")
    print(f"max |nnsight - ours| {ref.diff:.2e}" + (f"; max |TransformerLens - ours| {tl.diff:.2e}" if tl else "")
          + " (on the sampled cells)")
    t_attr = {}
    for steps, peer in attribution.items():
        t = t_attr[steps] = peer.median()
        c = compare(peer.result, exact)
        first_layer = compare(_layer(peer.result, layers[0]), _layer(exact, layers[0]))
        print(f"attribution (steps={steps}): {t[0]:.2f} s = {t[0] / t_bare[0]:.1f} bare forwards "
              f"[{t[1]:.2f} s = {t[1] / t_bare[1]:.1f}]; vs exact: pearson {c['pearson']:.3f}, spearman "
              f"{c['spearman']:.3f} (per pair: {c['pearson_pairs']:.3f} / {c['spearman_pairs']:.3f}); "
              f"layer {layers[0]}: pearson {first_layer['pearson']:.3f}")

    print(f"\nratios (the same {len(ours)} cells, {model.hf.config._attn_implementation} attention on every side)")
    print(f"  optimized exact vs nnsight one at a time: {ref_est['wall'].ratio(t_fast[0])} "
          f"[CPU: {ref_est['cpu'].ratio(t_fast[1])}]")
    if tl:
        speed = tl_est["wall"].total / t_fast[0]
        print(f"  optimized exact vs TransformerLens {tl.version}: {tl_est['wall'].ratio(t_fast[0])} "
              f"[CPU: {tl_est['cpu'].ratio(t_fast[1])}]; target >= 3x: {'met' if speed >= 3 else 'NOT MET'}; "
              f"max |TransformerLens - ours| {tl.diff:.2e}, target <= 1e-4: {'met' if tl.diff <= 1e-4 else 'NOT MET'}")
    else:
        print("  optimized exact vs TransformerLens: not measured (transformer-lens is not installed)")
    for steps, t in t_attr.items():
        print(f"  attribution steps={steps} vs optimized exact: {faster(t_fast[0] / t[0])} "
              f"[CPU: {faster(t_fast[1] / t[1])}]")


def _use_eager(hf) -> None:
    """Switch a transformers model to eager attention (what TransformerLens runs)."""
    if hasattr(hf, "set_attn_implementation"):
        hf.set_attn_implementation("eager")
    else:  # older transformers
        hf.config._attn_implementation = "eager"
    if hf.config._attn_implementation != "eager":
        raise SystemExit("could not switch the model to eager attention")


def _sample(cells: list, n: int, rng: random.Random) -> list:
    return list(cells) if n <= 0 or n >= len(cells) else rng.sample(cells, n)


# -- nnsight, one patched cell per forward, all pairs batched ---------------------------------


def nnsight_sweep(model, cset, sides, layers, ours: dict, sample_cells: int) -> Sampled:
    """The one-at-a-time sweep as an nnsight user writes it, on a sample of its forwards."""
    from behaviorlens.scoring import plan

    source_batch = model.batch(cset.tokens(sides.source))
    base_batch = model.batch(cset.tokens(sides.base))
    if not torch.equal(source_batch.offsets, base_batch.offsets):
        raise SystemExit("the two sides of a pair must have the same length")
    offsets = base_batch.offsets.tolist()
    scoring = plan(list(cset), sides.base)  # one-token answers: one sequence per pair
    read_rows = scoring.sequence
    read_cols = scoring.position + base_batch.offsets[scoring.sequence]
    first = [p.first_difference() for p in cset]
    ends = [len(p.tokens[sides.base]) for p in cset]

    def setup():
        acts = {}
        with torch.inference_mode():
            with model.trace(source_batch):
                for L in layers:
                    acts[L] = model.sites.read(model.lm, SITE, L).save()
            with model.trace(base_batch):
                base_logits = model.lm.output.logits.save()
            scoring.metric(torch.as_tensor(base_logits)[read_rows, read_cols])
        return acts

    def forward(acts, layer: int, k: int) -> tuple[list[int], torch.Tensor]:
        """Patch position first_difference + k at ``layer`` in every row that has it."""
        rows = [i for i in range(len(cset)) if first[i] + k < ends[i]]
        cols = [first[i] + k + offsets[i] for i in rows]
        with torch.inference_mode():
            value = acts[layer][rows, cols]
            with model.trace(base_batch):
                model.sites.write(model.lm, SITE, layer, value, (rows, cols))
                logits = model.lm.output.logits.save()
            metric = scoring.metric(torch.as_tensor(logits)[read_rows, read_cols])
        return rows, metric

    def run(acts, sample):
        times, values = [], {}
        for L, k in sample:
            t, (rows, metric) = clock(lambda L=L, k=k: forward(acts, L, k))
            times.append(t)
            values.update({(L, first[i] + k, i): float(metric[i]) for i in rows})
        return times, values

    forwards = [(L, k) for L in layers for k in range(max(e - s for s, e in zip(first, ends)))]
    covered = {(L, first[i] + k, i) for L, k in forwards for i in range(len(cset)) if first[i] + k < ends[i]}
    assert covered == set(ours), "the nnsight sweep must cover exactly the computed cells"
    sample = _sample(forwards, sample_cells, random.Random(0))
    print(f"nnsight: {len(forwards)} forwards (layer x position from the first difference, all {len(cset)} "
          f"pairs batched, left-padded) cover the {len(ours)} cells; {len(sample)} timed")
    s = Stratum(setup, run, forwards, sample)
    return Sampled("nnsight", [s], ours, lambda: run(setup(), sample[:1]))


# -- TransformerLens 4 -------------------------------------------------------------------------


def transformer_lens_sweep(model, cset, sides, layers, ours: dict, sample_cells: int) -> Sampled | None:
    """TransformerLens's ``get_act_patch_resid_pre`` on our computed cells (sampled), or None if
    it is not installed."""
    try:
        from transformer_lens.model_bridge import TransformerBridge
        from transformer_lens.patching import get_act_patch_resid_pre
    except ImportError:
        print("TransformerLens: not installed, skipped (pip install transformer-lens)")
        return None
    from importlib.metadata import version

    import pandas as pd
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from behaviorlens.model import default_model_folder

    hf_logging.disable_progress_bar()
    folder = default_model_folder()
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)  # its own: the bridge configures the tokenizer it gets
    bridge = TransformerBridge.boot_transformers(str(folder), hf_model=hf, tokenizer=tokenizer, device="cpu")
    bridge.eval()
    attention = getattr(bridge.cfg, "attn_implementation", None) or hf.config._attn_implementation
    if attention != model.hf.config._attn_implementation:
        raise SystemExit(f"TransformerLens runs {attention} attention, ours {model.hf.config._attn_implementation}")

    first = [p.first_difference() for p in cset]
    groups: dict[tuple[int, int], list[int]] = {}  # (length, answer position) -> pairs
    for i, p in enumerate(cset):
        groups.setdefault((len(p.tokens[sides.base]), p.position(sides.base, "answer")), []).append(i)
    n_cells = sum(len(layers) * (length - min(first[i] for i in pairs)) for (length, _), pairs in groups.items())
    budget = n_cells if sample_cells <= 0 else sample_cells
    rng = random.Random(1)
    strata = []
    for (length, answer), pairs in groups.items():
        clean = torch.tensor([cset[i].tokens[sides.source] for i in pairs])
        corrupt = torch.tensor([cset[i].tokens[sides.base] for i in pairs])
        matching = torch.tensor([cset[i].answers["matching"][0] for i in pairs])
        not_matching = torch.tensor([cset[i].answers["not_matching"][0] for i in pairs])
        rows = torch.arange(len(pairs))
        stamps: list[tuple[float, float]] = []

        def metric(logits, answer=answer, matching=matching, not_matching=not_matching, rows=rows, stamps=stamps):
            out = logits[rows, answer, matching] - logits[rows, answer, not_matching]
            stamps.append((time.perf_counter(), time.process_time()))
            return out

        def setup(clean=clean, corrupt=corrupt):
            with torch.inference_mode():
                _, cache = bridge.run_with_cache(clean)
                bridge(corrupt)  # the baseline of the corrupted prompts
            return cache

        def run(cache, sample, corrupt=corrupt, pairs=pairs, stamps=stamps, metric=metric):
            """One get_act_patch_resid_pre call on the sampled cells; each cell's time from the
            moments its metric was evaluated."""
            index = pd.DataFrame(sample, columns=["layer", "pos"])
            stamps.clear()
            start = (time.perf_counter(), time.process_time())
            with torch.inference_mode():
                result = get_act_patch_resid_pre(bridge, corrupt, cache, metric, index_axis_names=None,
                                                 index_df=index, reduce="none")
            times = [(b[0] - a[0], b[1] - a[1]) for a, b in zip([start, *stamps], stamps)]
            out = torch.as_tensor(result.values).reshape(len(sample), len(pairs))
            values = {(L, j, i): float(v) for (L, j), row in zip(sample, out)
                      for v, i in zip(row, pairs) if j >= first[i]}
            return times, values

        cells = [(L, j) for L in layers for j in range(min(first[i] for i in pairs), length)]
        n = max(2, round(budget * len(cells) / n_cells))
        strata.append(Stratum(setup, run, cells, _sample(cells, n, rng), f"{len(pairs)} x {length} tokens"))
    covered = {(L, j, i) for s, pairs in zip(strata, groups.values()) for L, j in s.cells for i in pairs
               if j >= first[i]}
    assert covered == set(ours), "the TransformerLens sweep must cover exactly the computed cells"
    sizes = ", ".join(f"{s.label}: {len(s.cells)} cells, {len(s.sample)} timed"
                      for s in strata)
    print(f"TransformerLens: {n_cells} (layer, pos) forwards, pairs batched by length ({sizes})")

    def warm_up():
        s = strata[0]
        s.run(s.setup(), s.sample[:1])

    sweep = Sampled("TransformerLens", strata, ours, warm_up)
    sweep.version = version("transformer-lens")
    return sweep


def _layer(result, layer):
    from behaviorlens.patching import PatchResult

    f = result.frame[result.frame["layer"] == layer]
    return PatchResult(f, result.site, result.direction, result.clean, result.method)


if __name__ == "__main__":
    main()
