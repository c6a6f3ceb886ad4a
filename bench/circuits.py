"""Benchmark: edge attribution (EAP, EAP-IG) and exact edge patching against a bare forward pass,
and how well EAP agrees with exact edge patching.

    .venv/bin/python bench/circuits.py [--family capitals_opinion] [--pairs 8] [--steps 4]
                                       [--edges 40] [--repeats 3] [--threads 1]

On the default model, the first ``--pairs`` pairs of ``--family``. Timed in the same run, each
the median over ``--repeats`` rounds (wall clock and process CPU time):

- bare forward: one plain forward of the positive side's batch (what a ratio of 1 means);
- split forward: the same side through :mod:`behaviorlens.circuits.forward` from the first
  differing column (every port its own input; the cost of keeping edges apart);
- EAP over every edge: a split forward of the negative side that also runs the shared columns
  and records their keys and values, one split forward of the positive side with its backward,
  and the gradient-times-difference products (issue 32's target: at most 4 bare passes);
- EAP-IG with ``--steps`` interpolation steps;
- exact edge patching of ``--edges`` edges (the top ones by EAP), batched; per edge.

Then the accuracy: EAP against exact edge patching on the ``--edges`` top and ``--edges``
random edges (Pearson and Spearman over the sample; issue 32's target: Pearson at least 0.8).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", default="capitals_opinion")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--edges", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from behaviorlens import load_family, load_model
    from behaviorlens.circuits import forward as F
    from behaviorlens.circuits.attribution import edge_attribution
    from behaviorlens.circuits.exact import agreement, exact_edges, sample_edges
    from behaviorlens.circuits.graph import Graph

    model = load_model()
    cset = load_family(args.family).render(model.tokenizer).subset(range(args.pairs))
    g = Graph.of(model)
    pos, _ = F.sides(model, cset, range(len(cset)))
    B = F.blocks(model)
    eap = edge_attribution(model, cset)
    top = np.argsort(-np.abs(eap.values))[: args.edges]
    F.run(model, pos, B)  # records the shared prefix: "split forward" is the suffix alone

    def bare() -> None:
        with torch.inference_mode():
            model.hf(**pos.spec.inputs, use_cache=False)

    peers = {
        "bare forward": bare,
        "split forward": lambda: F.run(model, pos, B),
        "EAP (all edges)": lambda: edge_attribution(model, cset),
        f"EAP-IG, {args.steps} steps": lambda: edge_attribution(model, cset, steps=args.steps),
        f"exact, {args.edges} edges": lambda: exact_edges(model, cset, top, batch_size=64),
    }
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in peers}
    for r in range(args.repeats):
        names = list(peers)
        names = names[r % len(names):] + names[: r % len(names)]  # rotate: drift hits every peer alike
        for name in names:
            times[name].append(timed(peers[name]))
    wall = {k: statistics.median(t[0] for t in v) for k, v in times.items()}
    cpu = {k: statistics.median(t[1] for t in v) for k, v in times.items()}
    base_w, base_c = wall["bare forward"], cpu["bare forward"]
    print(f"{model.name}, {args.family}: {len(cset)} pairs, {g.n_edges} edges, {args.threads} thread(s), "
          f"median of {args.repeats} rounds")
    print(f"{'':28s} {'wall s':>8s} {'x fwd':>7s} {'cpu s':>8s} {'x fwd':>7s}")
    for k in peers:
        print(f"{k:28s} {wall[k]:8.2f} {wall[k] / base_w:7.1f} {cpu[k]:8.2f} {cpu[k] / base_c:7.1f}")
    k = f"exact, {args.edges} edges"
    print(f"{'exact, per edge':28s} {wall[k] / args.edges:8.3f} {wall[k] / args.edges / base_w:7.2f} "
          f"{cpu[k] / args.edges:8.3f} {cpu[k] / args.edges / base_c:7.2f}")
    print(f"EAP per edge: {wall['EAP (all edges)'] / g.n_edges * 1e6:.1f} µs wall; exact patching of every edge "
          f"would take ~{wall[k] / args.edges * g.n_edges / 3600:.1f} h")
    sample = sample_edges(eap, args.edges, args.edges, seed=0)
    _, stats = agreement(eap, exact_edges(model, cset, sample, batch_size=64), sample)
    ratio = wall["EAP (all edges)"] / base_w
    print(f"EAP against exact edge patching on {stats['edges']} sampled edges ({args.edges} top, {args.edges} random): "
          f"Pearson {stats['pearson']:.3f}, Spearman {stats['spearman']:.3f}")
    print(f"targets (issue 32): EAP <= 4 bare passes: {ratio:.2f}x wall ({cpu['EAP (all edges)'] / base_c:.2f}x cpu), "
          f"{'met' if ratio <= 4 else 'MISSED'}; Pearson >= 0.8: {stats['pearson']:.3f}, "
          f"{'met' if stats['pearson'] >= 0.8 else 'MISSED'}")


if __name__ == "__main__":
    main()
