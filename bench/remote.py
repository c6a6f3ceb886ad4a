"""The trace path (nnsight traces grouped in sessions, as NDIF runs them) against the local fast path.

For each stage, on the embedded default model: the stage run locally (plain forwards and
hooks, the key-value replay of exact patching), the same stage on a traced model under
nnsight's simulation of NDIF (``remote="local"``: each request serialized, deserialized with
the project hidden, run here), their ratio, the largest difference between their figures, and
the size of the requests: how many traces, and the bytes nnsight serialized for them
(uncompressed; what a remote run uploads per stage: one request per session or lone trace). A bare forward of the stage's first batch is
timed in the same run as the unit.

    .venv/bin/python bench/remote.py [--pairs 8] [--family capitals_opinion] [--only circuit] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from behaviorlens import load_model
from behaviorlens.circuits.attribution import edge_attribution
from behaviorlens.circuits.exact import exact_edges
from behaviorlens.circuits.faithfulness import evaluate
from behaviorlens.edits import Edit, Readout
from behaviorlens.measure import measure
from behaviorlens.patching import patch
from behaviorlens.patching.ablation import ablation_scan
from behaviorlens.patching.attribution import attribution_patch
from behaviorlens.probing.activations import collect
from behaviorlens.prompts import load_family
from behaviorlens.remote import counting_requests
from behaviorlens.steering import steer


def figures(result: Any) -> torch.Tensor:
    """The numbers a stage's result holds, flat, for comparing the two paths."""
    if isinstance(result, torch.Tensor):
        return result.float().flatten()
    if isinstance(result, pd.DataFrame):
        cols = [c for c in ("metric", "patched", "metric_ablated") if c in result.columns]
        return torch.tensor(result[cols].to_numpy(dtype=float)).flatten()
    if hasattr(result, "frame"):
        return figures(result.frame)
    if hasattr(result, "table"):
        return figures(result.table)
    return torch.cat([t.float().flatten() for t in result])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--family", default="capitals_opinion")
    parser.add_argument("--only", default="", help="run only the stages whose name contains this")
    parser.add_argument("--out", default=None, help="folder for remote.csv")
    args = parser.parse_args()

    model = load_model()
    traced = dataclasses.replace(model, remote="local", interventions=[])
    cset = load_family(args.family).render(model.tokenizer).subset(list(range(args.pairs)))
    s = model.sites
    knock = Edit(kind="knockout", heads={5: list(range(s.n_heads))}, n_heads=s.n_heads, positions="generated",
                 detector=Readout(4, torch.randn(s.d_model, generator=torch.Generator().manual_seed(0)), 2.0, 1))
    vector = Edit(kind="vector", vectors={10: torch.randn(s.d_model, generator=torch.Generator().manual_seed(1))})
    prompts = model.batch([p.tokens["positive"] for p in cset][:4])

    def steered(edit: Edit, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def run(m: Any) -> Any:
            with steer(m, edit):
                return fn(m)
        return run

    stages: dict[str, Callable[[Any], Any]] = {
        "measure": lambda m: measure(m, cset),
        "probe collect (resid_post, all layers)": lambda m: [
            collect(m, cset, ["resid_post"], ["last"], progress=False).get("resid_post", "last")],
        "exact patch resid_pre (last position)": lambda m: patch(m, cset, "resid_pre", positions=["last"],
                                                                    progress=False),
        "exact patch resid_pre (all positions: the demo's cells)": lambda m: patch(m, cset, "resid_pre",
                                                                                 progress=False),
        "exact patch head (last)": lambda m: patch(m, cset.subset([0, 1]), "head", layers=[4, 5, 6], progress=False),
        "attribution resid_pre": lambda m: attribution_patch(m, cset, "resid_pre", steps=1, progress=False),
        "ablation scan mlp (mean)": lambda m: ablation_scan(m, cset, "mlp", "mean", layers=[2, 10, 20]),
        "steer eval scoring: knockout": steered(knock, lambda m: measure(m, cset)),
        "steer generate: vector (16 tokens)": steered(vector, lambda m: m.generate(prompts, 16)),
        "circuit EAP (all edges)": lambda m: torch.tensor(edge_attribution(m, cset).effect),
        "circuit exact edge patching (20 edges)": lambda m: torch.tensor(
            exact_edges(m, cset, range(0, 70000, 3500)).effect),
        "circuit faithfulness (3 circuits)": lambda m: torch.tensor(
            evaluate(m, cset, [range(700), range(3500), range(7000)]).metric),
    }
    stages = {name: fn for name, fn in stages.items() if args.only in name}
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.hf(**prompts.inputs(), use_cache=False)
        bare = time.perf_counter() - t0
    rows = []
    for name, fn in stages.items():
        fn(model)  # warm
        t0 = time.perf_counter()
        fast = fn(model)
        t_fast = time.perf_counter() - t0
        with counting_requests() as sent:
            t0 = time.perf_counter()
            slow = fn(traced)
            t_trace = time.perf_counter() - t0
        diff = float((figures(fast) - figures(slow)).abs().max())
        rows.append({"stage": name, "local_s": t_fast, "traced_s": t_trace, "ratio": t_trace / t_fast,
                     "local_in_bare_forwards": t_fast / bare, "max_abs_diff": diff, "requests": sent.requests,
                     "payload_kb": sent.bytes / 1024, "kb_per_request": sent.bytes / 1024 / max(sent.requests, 1)})
        print(f"{name}: local {t_fast:.2f} s, traced {t_trace:.2f} s ({t_trace / t_fast:.1f}x), "
              f"diff {diff:.1e}, {sent.requests} requests, {sent.bytes / 1024:.0f} KB", flush=True)
    table = pd.DataFrame(rows)
    print(f"\nmodel {model.name}, {torch.get_num_threads()} threads, {args.pairs} pairs of {args.family}; "
          f"bare forward of 4 prompts: {bare * 1000:.0f} ms")
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        table.to_csv(Path(args.out) / "remote.csv", index=False)


if __name__ == "__main__":
    main()
