"""Benchmark: exact activation patching (one at a time vs optimized) and attribution patching.

    .venv/bin/python bench/patching.py [--pairs 8] [--layer-step 1] [--reference-cells 40]

On the default model and ``capitals_opinion``, ``resid_pre`` at every layer x position:

- one-at-a-time exact: one full nnsight forward per cell. Running every cell takes hours on a
  small CPU, so a random sample of ``--reference-cells`` cells is timed and its median cost per
  cell is multiplied by the number of cells (the sample is also compared with the sweep);
- optimized exact (``patch``): the full sweep;
- attribution patching, plain (steps=1) and path-averaged (``--steps``), with Pearson and
  Spearman against the exact sweep over cell means, overall and at layer 0;
- TransformerLens's ``get_act_patch_resid_pre`` when transformer-lens is installed
  (``pip install -e '.[bench]'`` after torch).

Every time is also printed as a ratio to one bare forward of the same pairs.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch


def timed(fn, repeats: int = 1):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--family", default="capitals_opinion")
    ap.add_argument("--layer-step", type=int, default=1, help="patch every k-th layer")
    ap.add_argument("--reference-cells", type=int, default=40)
    ap.add_argument("--steps", type=int, default=4, help="interpolation steps of the improved estimate")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the fast measurements")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from behaviorlens import load_model
    from behaviorlens.patching import attribution_patch, compare, patch
    from behaviorlens.patching.exact import cells_one_at_a_time
    from behaviorlens.patching.plan import make_cells, resolve_sides
    from behaviorlens.prompts import load_family

    model = load_model()
    cset = load_family(args.family).render(model.tokenizer)
    cset = cset.subset(range(min(args.pairs, len(cset))))
    layers = list(range(0, model.sites.n_layers, args.layer_step))
    sides = resolve_sides("positive", "denoise")
    print(f"default model, {args.family}: {len(cset)} pairs x {len(cset[0].tokens['positive'])} tokens, "
          f"resid_pre at {len(layers)} layers x every position, torch threads {torch.get_num_threads()}")

    batch = model.batch(cset.tokens(sides.base))
    bare, _ = timed(lambda: model.logits(batch), args.repeats)
    print(f"bare forward of the {len(cset)} pairs: {bare:.3f} s")

    t_fast, exact = timed(lambda: patch(model, cset, "resid_pre", layers, progress=False), 1)
    cells = make_cells(cset, sides.base, layers, [None], "all")
    computed = int(exact.frame["computed"].sum())
    print(f"optimized exact: {t_fast:.2f} s for {len(cells)} cells ({computed} run, "
          f"{len(cells) - computed} provable no-ops) = {t_fast / bare:.1f} bare forwards")

    sample_idx = sorted(random.Random(0).sample(range(len(cells)), min(args.reference_cells, len(cells))))
    sample = [cells[i] for i in sample_idx]
    t_reads, _ = timed(lambda: cells_one_at_a_time(model, cset, "resid_pre", sides, []), 1)
    t_sample, (values, _) = timed(lambda: cells_one_at_a_time(model, cset, "resid_pre", sides, sample), 1)
    per_cell = (t_sample - t_reads) / len(sample)
    t_ref = per_cell * len(cells) + t_reads
    diff = max(abs(v - exact.frame["patched"].iloc[i]) for v, i in zip(values, sample_idx))
    print(f"one-at-a-time exact (nnsight): {per_cell:.3f} s per cell (mean of {len(sample)} sampled "
          f"cells) -> {t_ref:.1f} s for the sweep = {t_ref / bare:.1f} bare forwards")
    print(f"max |optimized - one-at-a-time| on the sampled cells: {diff:.2e}")

    results = {}
    for steps in sorted({1, args.steps}):
        t, est = timed(lambda s=steps: attribution_patch(model, cset, "resid_pre", layers, steps=s,
                                                         progress=False), args.repeats)
        c = compare(est, exact)
        first = compare(_layer(est, layers[0]), _layer(exact, layers[0]))
        results[steps] = t
        print(f"attribution (steps={steps}): {t:.2f} s = {t / bare:.1f} bare forwards; vs exact: "
              f"pearson {c['pearson']:.3f}, spearman {c['spearman']:.3f} (per pair: "
              f"{c['pearson_pairs']:.3f} / {c['spearman_pairs']:.3f}); layer {layers[0]}: pearson "
              f"{first['pearson']:.3f}")

    t_tl = transformer_lens_sweep(model, cset, sides, layers, exact, args.reference_cells, bare)

    print("\nratios")
    print(f"  optimized exact vs one-at-a-time: {t_ref / t_fast:.1f}x faster (target >= 5x)")
    for steps, t in results.items():
        print(f"  attribution steps={steps} vs optimized exact: {t_fast / t:.1f}x faster (target >= 20x)")
    if t_tl:
        print(f"  optimized exact vs TransformerLens: {t_tl / t_fast:.1f}x faster (target >= 3x)")


def transformer_lens_sweep(model, cset, sides, layers, exact, sample_cells: int, bare: float):
    """TransformerLens 4's ``get_act_patch_resid_pre`` on the same pairs, or None if not installed.

    TransformerLens patches a batch of equal-length prompts, one full forward of the batch per
    (layer, position), without skipping anything; pairs are grouped by length. A random sample
    of cells is timed per group and scaled to the whole sweep; its values are compared with
    ours (TransformerLens forces eager attention, so ~1e-4 drift from SDPA is expected).
    """
    try:
        from transformer_lens.model_bridge import TransformerBridge
        from transformer_lens.patching import get_act_patch_resid_pre
    except ImportError:
        print("TransformerLens: not installed, skipped (pip install transformer-lens)")
        return None
    import pandas as pd
    from transformers import AutoModelForCausalLM

    from behaviorlens.model import DEFAULT_CACHE_NAME, cache_root

    hf = AutoModelForCausalLM.from_pretrained(cache_root() / DEFAULT_CACHE_NAME, dtype=torch.float32,
                                              attn_implementation="eager").eval()
    bridge = TransformerBridge.boot_transformers("HuggingFaceTB/SmolLM2-135M-Instruct", hf_model=hf,
                                                 tokenizer=model.tokenizer, device="cpu")
    bridge.eval()
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(cset):
        groups.setdefault(len(p.tokens[sides.base]), []).append(i)
    total, diffs, rng = 0.0, [], random.Random(1)
    per_pair = exact.frame.set_index(["layer", "position", "pair"])["patched"]
    for length, pairs in groups.items():
        clean = torch.tensor([cset[i].tokens[sides.source] for i in pairs])
        corrupt = torch.tensor([cset[i].tokens[sides.base] for i in pairs])
        ids = torch.tensor([cset[i].answer_ids for i in pairs])
        answer = cset[pairs[0]].position(sides.base, "answer")

        def metric(logits, ids=ids, answer=answer):
            rows = torch.arange(len(ids))
            return logits[rows, answer, ids[:, 0]] - logits[rows, answer, ids[:, 1]]

        with torch.inference_mode():
            _, cache = bridge.run_with_cache(clean)
            cells = [(L, j) for L in layers for j in range(length)]
            sample = rng.sample(cells, min(max(1, sample_cells // len(groups)), len(cells)))
            index = pd.DataFrame(sample, columns=["layer", "pos"])
            start = time.perf_counter()
            result = get_act_patch_resid_pre(bridge, corrupt, cache, metric, index_axis_names=None,
                                             index_df=index, reduce="none")
            per_cell = (time.perf_counter() - start) / len(sample)
        values = torch.as_tensor(result.values if hasattr(result, "values") else result).reshape(len(sample), -1)
        for (L, j), row in zip(sample, values):
            diffs += [abs(float(v) - per_pair[(L, j, i)]) for v, i in zip(row, pairs)]
        total += per_cell * len(cells)
    print(f"TransformerLens {_tl_version()} get_act_patch_resid_pre: {total:.1f} s for the sweep "
          f"(scaled from sampled cells, pairs batched by length: {sorted(map(len, groups.values()))}) "
          f"= {total / bare:.1f} bare forwards; max |TransformerLens - ours| {max(diffs):.2e}")
    return total


def _tl_version() -> str:
    from importlib.metadata import version

    return version("transformer-lens")


def _layer(result, layer):
    from behaviorlens.patching import PatchResult

    f = result.frame[result.frame["layer"] == layer]
    return PatchResult(f, result.site, result.direction, result.clean, result.method)


if __name__ == "__main__":
    main()
