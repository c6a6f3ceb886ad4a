"""Memory and time of activation collection against a bare forward of the same batches.

Collects every layer's resid_post at two positions for N pairs (default 200; the family's
pairs are repeated as needed) on the embedded default model, streaming shards to a temporary
folder, and prints the peak resident-memory growth of

- a bare forward (plain transformers, logits dropped) over the same batches, and
- ``collect`` over the same batches,

beside the size of one batch's activations (one shard) and of the final result. Collection
memory is bounded when its peak growth stays within the bare forward's peak plus the result
plus about one shard.

    .venv/bin/python bench/collect_memory.py [--pairs 200] [--batch-size 16] [--family capitals_opinion]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time

import torch

from behaviorlens import load_model
from behaviorlens.batching import chunks
from behaviorlens.probing import collect
from behaviorlens.prompts import ContrastSet, load_family

PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 2**20


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Samples resident memory every 2 ms in a thread; ``growth`` is peak minus start."""

    def __enter__(self):
        self.start = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self.t0 = time.perf_counter()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())
        self.growth = self.peak - self.start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16, help="pairs per forward")
    ap.add_argument("--family", default="capitals_opinion")
    args = ap.parse_args()

    model = load_model()
    base = load_family(args.family).render(model.tokenizer, require_aligned=False)
    cset = ContrastSet.concat([base] * (args.pairs // len(base) + 1), name=base.name).subset(range(args.pairs))
    slot = next(k for k in cset[0].spans["positive"] if k not in ("last", "answer"))
    positions = ("last", slot)
    L, d = model.sites.n_layers, model.sites.d_model
    bytes_per = torch.finfo(model.dtype).bits // 8
    shard = 2 * args.batch_size * L * d * bytes_per * len(positions)
    result = 2 * args.pairs * L * d * bytes_per * len(positions)
    width = max(len(p.tokens[s]) for p in cset for s in ("positive", "negative"))
    hidden = 2 * args.batch_size * width * d * bytes_per * (L + 1)

    def bare() -> None:
        with torch.inference_mode():
            for idx in chunks(len(cset), args.batch_size):
                rows = [cset[i].tokens[s] for i in idx for s in ("positive", "negative")]
                model.hf(**model.batch(rows).inputs(), use_cache=False)

    bare()  # warm up allocator and kernels so neither timed run pays for first use
    with tempfile.TemporaryDirectory() as tmp:  # ... nor nnsight's and safetensors' first use
        collect(model, cset.subset(range(args.batch_size)), sites=("resid_post",), positions=positions,
                batch_size=args.batch_size, out_dir=tmp, progress=False)
    with PeakRSS() as fwd:
        bare()
    with tempfile.TemporaryDirectory() as tmp, PeakRSS() as col:
        acts = collect(model, cset, sites=("resid_post",), positions=positions, batch_size=args.batch_size,
                       out_dir=tmp, progress=False)
        on_disk = sum(f.stat().st_size for f in os.scandir(tmp))
    held = sum(t.numel() * t.element_size() for t in acts.data.values())
    print(f"default model, {args.pairs} pairs ({2 * args.pairs} prompts, up to {width} tokens), "
          f"batch {args.batch_size} pairs, resid_post x {L} layers x positions {positions}, {model.dtype}")
    print(f"  one batch's activations (a shard):   {shard / MB:8.1f} MB")
    print(f"  one batch's full hidden states:      {hidden / MB:8.1f} MB (what a naive collector keeps)")
    print(f"  final result:                        {result / MB:8.1f} MB (held {held / MB:.1f} MB, "
          f"shards on disk {on_disk / MB:.1f} MB)")
    print(f"  bare forward   peak RSS growth:      {fwd.growth / MB:8.1f} MB   time {fwd.seconds:7.1f} s")
    print(f"  collect        peak RSS growth:      {col.growth / MB:8.1f} MB   time {col.seconds:7.1f} s")
    extra = col.growth - fwd.growth
    print(f"  collect minus bare forward:          {extra / MB:8.1f} MB = result + {(extra - result) / MB:.1f} MB "
          f"({(extra - result) / shard:.2f} shards)")
    print(f"  time ratio collect / bare forward:   {col.seconds / fwd.seconds:8.2f}")
    naive = 2 * args.pairs * width * d * bytes_per * (L + 1)
    print(f"  (keeping every position of every layer for all pairs would take {naive / MB:.0f} MB)")


if __name__ == "__main__":
    main()
