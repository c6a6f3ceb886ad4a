"""Steered vs unsteered generation time on the embedded default, in one run.

Prints the median wall time of greedy generation (same prompts, same number of new tokens,
``min_new_tokens`` forces the length) with no edit, with a steering vector at every position,
with a head mean-ablation, and with any saved edit (``--edit``, e.g. the demo's chosen one), and
their ratios to the unsteered run. Target: <= 1.1x.

    .venv/bin/python bench/steered_generation.py [--new-tokens 48] [--repeats 5] [--edit FILE]
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch

from behaviorlens import load_model
from behaviorlens.prompts import load_family
from behaviorlens.steering import Edit, head_edit, steer, train_vector


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--edit", default=None, help="a saved edit to time as well (e.g. results/sycophancy/steer/edit.safetensors)")
    args = ap.parse_args()
    model = load_model()
    cset = load_family("capitals_opinion").render(model.tokenizer).subset(range(8))
    vector = train_vector(model, cset, [15])
    heads = head_edit(model, {20: [0, 1, 2]}, "mean", reference=cset)
    batch = model.batch([p.tokens["positive"] for p in cset][: args.batch])
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}

    def run(ctx) -> float:
        with torch.inference_mode(), ctx:
            start = time.perf_counter()
            model.hf.generate(**inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                              do_sample=False, pad_token_id=model.pad_id)
            return time.perf_counter() - start

    cases = {
        "unsteered": lambda: nullcontext(),
        "vector (all positions)": lambda: steer(model, vector, -2.0),
        "heads (3 mean-ablated)": lambda: steer(model, heads, 1.0),
    }
    if args.edit:
        chosen = Edit.load(args.edit, model)
        print(f"--edit: {chosen.describe()}")
        cases["--edit"] = lambda: steer(model, chosen, 1.0)
    run(nullcontext())  # warm-up
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.repeats):  # interleaved so that load changes hit every case alike
        for name, make in cases.items():
            times[name].append(run(make()))
    base = statistics.median(times["unsteered"])
    print(f"generation of {args.new_tokens} tokens x {len(batch)} prompts, median of {args.repeats}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:>24}: {med:7.3f} s  ratio {med / base:5.3f}x")


if __name__ == "__main__":
    main()
