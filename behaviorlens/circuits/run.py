"""The circuit stage: ``run_circuit`` writes edges.csv, circuit.json, curves, controls,
composition tables, plots and summary.json.

Nothing scores what chose it: edge attribution and the circuit's size are chosen on one half of
the pairs (``select``); faithfulness is reported on the other half (``heldout``) and on other
families (``test_faithfulness``), each beside random circuits of the same size and the complement.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..errors import BehaviorLensError
from ..io import write_csv, write_json
from ..prompts.contrast import ContrastSet
from . import faithfulness as Fa
from .acdc import acdc
from .attribution import edge_attribution
from .circuit import EDGE_METHODS, Circuit, edges_of
from .composition import composition_table, run_figures
from .exact import agreement, exact_edges, sample_edges
from .graph import Graph
from .plots import circuit_graph, composition_plot, faithfulness_curve, head_figures_plot
from .styles import run_styles

if TYPE_CHECKING:
    from .params import CircuitParams

def test_faithfulness(model, circuit: Circuit, cset: ContrastSet, convention: str | None = None,
                      n_random: int = 3, seed: int = 0) -> pd.DataFrame:
    """A saved circuit on another family: circuit, complement and random circuits of its size."""
    g = Graph.of(model)
    return Fa.controls(model, cset, circuit.indices(g), convention or circuit.convention, n_random, seed)


def _subset(cset: ContrastSet, n: int | None) -> ContrastSet:
    return cset if n is None else cset.subset(range(min(n, len(cset))))


def circuit_heads(edges: pd.DataFrame, g: Graph, k: int = 8) -> list[tuple[int, int]]:
    """The circuit's heads with the largest summed |attribution| over their edges (as the upstream
    node or as the query; a key/value port credits each query head that reads it)."""
    weight: dict[tuple[int, int], float] = {}
    per = g.n_heads // g.n_kv
    for _, e in edges.iterrows():
        names = [e["upstream"], e["port"]]
        for name in names:
            if name in ("input", "logits") or name.endswith(".mlp"):
                continue
            name = name.split(".")[0]  # a port: L3H1.q -> L3H1, L3KV0.k -> L3KV0
            if "KV" in name:
                L, kv = (int(x) for x in name[1:].split("KV"))
                heads = [(L, kv * per + j) for j in range(per)]
            else:
                L, h = (int(x) for x in name[1:].split("H"))
                heads = [(L, h)]
            for hd in heads:
                weight[hd] = weight.get(hd, 0.0) + abs(float(e["attribution"])) / len(heads)
    return [h for h, _ in sorted(weight.items(), key=lambda kv: -kv[1])[:k]]


def run_circuit(model, cset: ContrastSet, tests: Sequence[ContrastSet] = (), out_dir: str | Path = "circuit",
                n_pairs: int | None = 16, test_pairs: int | None = 16, method: str = "eap", steps: int = 4,
                convention: str = "counterfactual", keep: float = 0.8, size: float | None = None,
                fractions: Sequence[float] = Fa.FRACTIONS, exact_top: int = 40, exact_random: int = 40,
                n_random: int = 3, seed: int = 0, pair_batch: int = 8, acdc_candidates: int = 0, acdc_threshold: float = 0.01,
                styles: Sequence[ContrastSet] = (), progress: bool = True) -> dict:
    """Find the circuit of ``cset``'s behavior and score it where nothing chose it (module doc): the
    top ``size`` share of the edges, or the smallest top-edge circuit keeping ``keep``.

    ``acdc_candidates > 0`` also prunes that many top edges with ACDC on the selection pairs and
    scores the result on the held-out pairs beside the top-k attribution circuit of its size.
    ``styles``: more families, each with its own circuit; then the transfer matrix, the core and
    the union (:func:`~.styles.run_styles`) instead, ``tests`` scored as columns.
    """
    if styles:
        if acdc_candidates:
            raise BehaviorLensError("ACDC prunes one family's circuit; it does not run with more families (styles)")
        return run_styles(model, [cset, *styles], tests, out_dir, n_pairs=n_pairs, test_pairs=test_pairs, size=size,
                          keep=keep, method=method, steps=steps, convention=convention, fractions=fractions,
                          exact_top=exact_top, exact_random=exact_random, n_random=n_random, seed=seed,
                          pair_batch=pair_batch, progress=progress)
    if method not in EDGE_METHODS:
        raise BehaviorLensError(f"unknown attribution method {method!r}; use one of {', '.join(EDGE_METHODS)}")
    if convention not in Fa.CIRCUIT_ABLATIONS:
        raise BehaviorLensError(f"unknown ablation {convention!r}; use one of {', '.join(Fa.CIRCUIT_ABLATIONS)}")
    if not 0 < keep <= 1:
        raise BehaviorLensError(f"keep must be in (0, 1], got {keep}")
    if size is not None:
        edges_of(size, Graph.of(model))
    cset.require_aligned("circuit discovery")
    cset = _subset(cset, n_pairs)
    if len(cset) < 4:
        raise BehaviorLensError(f"set {cset.name!r} has {len(cset)} pairs; a circuit needs 4 (half choose, half score)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, t0: float) -> float:
        timings[name] = round(time.perf_counter() - t0, 2)
        return time.perf_counter()

    select, heldout = cset.split(0.5, seed)
    select_rows = [p.row for p in select]
    g = Graph.of(model)
    t = time.perf_counter()
    scores = edge_attribution(model, select, steps=1 if method == "eap" else steps, pair_batch=pair_batch,
                              progress=progress)
    t = lap("attribution", t)
    sample = sample_edges(scores, exact_top, exact_random, seed)
    exact = exact_edges(model, select, sample, pair_batch=pair_batch, progress=progress)
    check, stats = agreement(scores, exact, sample)
    t = lap("exact_edges", t)
    edges = scores.frame()
    edges["exact"] = np.nan
    edges.loc[sample, "exact"] = exact.values[sample]
    order = Fa.ranked(scores)
    curves = [Fa.curve(model, select, order, fractions, convention, pair_batch, "select"),
              Fa.curve(model, heldout, order, fractions, convention, pair_batch, "heldout")]
    k = edges_of(size, g) if size is not None else Fa.choose_size(curves[0], keep)
    chosen = order[:k]
    controls = [Fa.controls(model, heldout, chosen, convention, n_random, seed, pair_batch).assign(pairs="heldout")]
    t = lap("faithfulness", t)
    edges["in_circuit"] = False
    edges.loc[chosen, "in_circuit"] = True
    circuit = Circuit(model.name, cset.name, edges.loc[chosen, "edge"].tolist(),
                      [float(v) for v in edges.loc[chosen, "attribution"]], g.n_edges,
                      scores.method, convention, keep, select_rows)
    circuit.save(out / "circuit.json")
    acdc_summary, acdc_edges = _acdc(model, select, heldout, order, acdc_candidates, acdc_threshold, convention,
                                     pair_batch, out, g) if acdc_candidates else ({}, None)
    if acdc_edges is not None:
        Circuit(model.name, cset.name, g.edge_names(*(a[acdc_edges] for a in g.edge_index)),
                [float(v) for v in edges.loc[acdc_edges, "attribution"]], g.n_edges, f"acdc({scores.method})",
                convention, keep, select_rows).save(out / "circuit_acdc.json")
        t = lap("acdc", t)
    test_summary: dict[str, dict] = {}
    for test in tests:
        test.require_aligned("circuit evaluation")
        tset = _subset(test, test_pairs)
        curves.append(Fa.curve(model, tset, order, fractions, convention, pair_batch, "test"))
        ctl = Fa.controls(model, tset, chosen, convention, n_random, seed, pair_batch).assign(pairs="test")
        controls.append(ctl)
        test_summary[tset.name] = _control_figures(ctl)
        if acdc_edges is not None:
            ctl = Fa.controls(model, tset, acdc_edges, convention, n_random, seed, pair_batch)
            controls.append(ctl.assign(pairs="test", circuit="acdc_" + ctl["circuit"]))
            acdc_summary.setdefault("acdc_test_faithfulness", {})[tset.name] = _control_figures(ctl)["faithfulness"]
    t = lap("test_families", t)
    curve = pd.concat(curves, ignore_index=True)
    control = pd.concat(controls, ignore_index=True)
    write_csv(out / "edges.csv", edges.sort_values("rank"))
    write_csv(out / "exact_edges.csv", check)
    write_csv(out / "faithfulness_curve.csv", curve)
    write_csv(out / "controls.csv", control)
    title = f"{cset.name} ({model.name}, {scores.method}, {convention} ablation)"
    faithfulness_curve(curve, control, out / "faithfulness_curve.png", keep, k, title)
    circuit_graph(edges.loc[chosen[:60]], g, out / "circuit_graph.png",
                  f"{cset.name}: top {min(60, k)} of the circuit's {k} edges")
    heads = circuit_heads(edges.loc[chosen], g)
    comp, null = composition_table(model, heads, seed=seed)
    figures = run_figures(model, heldout)
    names = [f"L{L}H{h}" for L, h in heads]
    figures["in_circuit"] = figures["head"].isin(names)
    for col in ("ov_copy", "attn_to_claim"):
        ref = np.sort(figures[col].to_numpy())
        figures[f"{col}_pct"] = np.searchsorted(ref, figures[col].to_numpy(), side="left") / len(ref)
    write_csv(out / "composition.csv", comp)
    write_csv(out / "composition_null.csv", null)
    write_csv(out / "head_figures.csv", figures)
    composition_plot(comp, null, out / "composition.png", f"{cset.name}: composition of the circuit's heads")
    head_figures_plot(figures, names, out / "head_figures.png", f"{cset.name}: OV copy and QK to the claim")
    lap("composition", t)
    held = _control_figures(controls[0])
    summary = {
        "family": cset.name, "model": model.name, "method": scores.method, "convention": convention,
        "keep": keep, "pairs": len(cset), "select_pairs": len(select), "heldout_pairs": len(heldout),
        "total_edges": g.n_edges, "circuit_edges": int(k), "edges_fraction": k / g.n_edges,
        "faithfulness": held["faithfulness"], "faithfulness_ci": held["faithfulness_ci"],
        "random_faithfulness": held["random_faithfulness"], "random_faithfulness_max": held["random_faithfulness_max"],
        "complement_faithfulness": held["complement_faithfulness"],
        "select_faithfulness": float(curves[0].set_index("edges").loc[k, "faithfulness"]),
        "attribution_exact_pearson": stats["pearson"], "attribution_exact_spearman": stats["spearman"],
        "exact_edges_checked": stats["edges"],
        "test_faithfulness": {f: s["faithfulness"] for f, s in test_summary.items()},
        "test_faithfulness_ci": {f: s["faithfulness_ci"] for f, s in test_summary.items()},
        "test_random_faithfulness": {f: s["random_faithfulness"] for f, s in test_summary.items()},
        "test_complement_faithfulness": {f: s["complement_faithfulness"] for f, s in test_summary.items()},
        "top_edges": edges.loc[chosen[:10], "edge"].tolist(),
        "circuit_heads": names,
        "top_composition": _top_composition(comp),
        **acdc_summary,
        "timings": timings, "seconds": round(time.perf_counter() - start, 2),
    }
    write_json(out / "summary.json", summary)
    return summary


def _acdc(model, select: ContrastSet, heldout: ContrastSet, order: np.ndarray, n: int, threshold: float,
          convention: str, pair_batch: int, out: Path, g: Graph) -> tuple[dict, np.ndarray]:
    """ACDC over the top ``n`` edges, beside the attribution circuit of the size it ends at."""
    pruned = acdc(model, select, order[:n], threshold, convention, pair_batch)
    write_csv(out / "acdc.csv", pruned.steps)
    k = max(1, len(pruned.edges))
    ev = Fa.evaluate(model, heldout, [pruned.edges, order[:k]], convention, pair_batch)
    return {"acdc_candidates": int(n), "acdc_threshold": threshold, "acdc_edges": len(pruned.edges),
            "acdc_seconds": round(pruned.seconds, 2), "acdc_select_faithfulness": pruned.faithfulness,
            "acdc_faithfulness": ev.faithfulness(0)[0],
            "acdc_same_size_attribution_faithfulness": ev.faithfulness(1)[0]}, pruned.edges


def _control_figures(ctl: pd.DataFrame) -> dict:
    c = ctl.set_index("circuit")
    rnd = ctl[ctl["circuit"].str.startswith("random")]["faithfulness"]
    return {"faithfulness": float(c.loc["circuit", "faithfulness"]),
            "faithfulness_ci": [float(c.loc["circuit", "ci_low"]), float(c.loc["circuit", "ci_high"])],
            "random_faithfulness": float(rnd.mean()), "random_faithfulness_max": float(rnd.max()),
            "complement_faithfulness": float(c.loc["complement", "faithfulness"])}


def _top_composition(comp: pd.DataFrame) -> list[dict]:
    """The strongest Q-, K- and V-composition among the circuit's head pairs, with null percentiles."""
    rows = []
    for kind in ("q_comp", "k_comp", "v_comp"):
        if len(comp):
            r = comp.loc[comp[kind].idxmax()]
            rows.append({"kind": kind, "pair": f"{r['upstream']}>{r['downstream']}", "score": float(r[kind]),
                         "null_percentile": float(r[f"{kind}_pct"])})
    return rows


def circuit_step(runner: Any, folder: Path, params: CircuitParams) -> dict:
    """The experiment's ``circuit`` step: the train family's circuit, scored on the test families
    (or the step's own ``test`` list); flat ``test_faithfulness_FAMILY`` keys for predictions. With
    ``styles``, one circuit per family (the train family and the styles) and the transfer matrix
    (:func:`~.styles.run_styles`), the test families scored as columns."""
    train = runner.contrast_set(runner.exp.train)
    tests = [runner.contrast_set(t) for t in (runner.exp.test if params.test is None else params.test)]
    styles = [runner.contrast_set(t) for t in params.styles or []]
    tests = [t for t in tests if t.name not in {c.name for c in styles}]
    s = run_circuit(runner.model, train, tests, folder, styles=styles,
                    **(params.kwargs() | {"seed": runner.exp.seed}), progress=False)
    return s if styles else s | {f"test_faithfulness_{k}": v for k, v in s["test_faithfulness"].items()}
