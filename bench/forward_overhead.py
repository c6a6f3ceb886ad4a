"""What nnsight costs on top of a bare forward pass, on the embedded default model.

Three ways to run the same batches, all under ``torch.inference_mode()``:

- ``bare``          ``model.hf(**batch.inputs())``: plain transformers, no nnsight
- ``trace``         an nnsight trace with no intervention
- ``trace+resid``   an nnsight trace saving ``resid_post`` at every layer

A warm-up pass of each, then ``--reps`` timed passes over all batches, the three ways
interleaved within each repeat (in a rotating order) so that drift in machine load hits them
alike. Prints each median and its ratio to the bare forward, in wall-clock time and in process
CPU time (the steadier one on a shared machine, with ``--threads 1``), plus the warm load time
of ``load_model()``.

    python bench/forward_overhead.py [--reps 5] [--prompts 64] [--tokens 40] [--batch 16]
                                     [--device cuda] [--dtype bfloat16] [--threads 1]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch

from behaviorlens import load_model
from behaviorlens.batching import chunks

TEXT = (
    "The capital of France is Paris, and the capital of Germany is Berlin. Rivers run from "
    "the mountains to the sea, carrying silt that builds the deltas where cities grow. A "
    "careful reader checks each claim against a second source before repeating it, and a "
    "careful model should do the same when a user insists on an answer that is wrong. "
    "Italy's capital is Rome; Japan's is Tokyo; Spain's is Madrid; Canada's is Ottawa. "
)


def make_prompts(tokenizer, n: int, tokens: int) -> list[list[int]]:
    """``n`` distinct token sequences of about ``tokens`` tokens (lengths vary: real padding)."""
    ids = tokenizer(TEXT * (n // 4 + 4), add_special_tokens=False).input_ids
    prompts = []
    for i in range(n):
        length = tokens - 4 + i % 9  # tokens-4 .. tokens+4
        start = (i * 7) % (len(ids) - length)
        prompts.append(ids[start : start + length])
    return prompts


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    load_model(device=args.device, dtype=args.dtype)  # builds the cache if it is missing
    start = time.perf_counter()
    model = load_model(device=args.device, dtype=args.dtype)
    warm_load = time.perf_counter() - start

    prompts = make_prompts(model.tokenizer, args.prompts, args.tokens)
    batches = [model.batch([prompts[i] for i in r]) for r in chunks(len(prompts), args.batch)]
    layers = range(model.sites.n_layers)
    device = model.device

    def bare() -> None:
        for batch in batches:
            model.hf(**batch.inputs(), use_cache=False)

    def trace() -> None:
        for batch in batches:
            with model.trace(batch, use_cache=False):
                pass

    def trace_resid() -> None:
        for batch in batches:
            saved = []
            with model.trace(batch, use_cache=False):
                for layer in layers:
                    saved.append(model.sites.read(model.lm, "resid_post", layer).save())
            assert len(saved) == len(layers) and saved[-1].shape[0] == len(batch)

    ways = {"bare": bare, "trace": trace, "trace+resid": trace_resid}
    times: dict[str, list[float]] = {name: [] for name in ways}
    cpu: dict[str, list[float]] = {name: [] for name in ways}  # robust when the box is shared
    with torch.inference_mode():
        for name, fn in ways.items():  # warm-up
            t0 = time.perf_counter()
            fn()
            sync(device)
            print(f"warm-up {name}: {time.perf_counter() - t0:.2f} s", file=sys.stderr, flush=True)
        names = list(ways)
        for rep in range(args.reps):
            order = names[rep % len(names) :] + names[: rep % len(names)]  # no fixed order
            for name in order:
                fn = ways[name]
                sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                sync(device)
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
            done = ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items())
            print(f"repeat {rep + 1}/{args.reps}: {done}", file=sys.stderr, flush=True)

    n_tok = sum(len(p) for p in prompts)
    print(
        f"model: {model.name} ({model.info()['architecture']}, {model.sites.n_layers} layers), "
        f"{model.dtype}, {device}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}"
    )
    print(
        f"{len(prompts)} prompts, {n_tok} tokens ({min(map(len, prompts))}-"
        f"{max(map(len, prompts))} each), batch {args.batch} -> {len(batches)} batches; "
        f"median of {args.reps} after a warm-up"
    )
    print(f"warm load_model(): {warm_load:.2f} s")
    base, cpu_base = statistics.median(times["bare"]), statistics.median(cpu["bare"])
    print(
        f"{'way':<13} {'median s':>9} {'ratio':>6} {'min s':>8} {'cpu s':>8} {'ratio':>6}"
        "   all runs, wall (s)"
    )
    for name, ts in times.items():
        med, cmed = statistics.median(ts), statistics.median(cpu[name])
        runs = " ".join(f"{t:.3f}" for t in ts)
        print(
            f"{name:<13} {med:>9.3f} {med / base:>6.2f} {min(ts):>8.3f} {cmed:>8.3f} "
            f"{cmed / cpu_base:>6.2f}   {runs}"
        )
    print("(median s: wall-clock median; cpu s: median process CPU time, all threads)")


if __name__ == "__main__":
    main()
