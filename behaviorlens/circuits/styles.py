"""Circuits per claim style: one circuit per family, each scored on every family (the transfer
matrix), the circuits' shared core and their union, and the heads and edges specific to a style.

Nothing scores what chose it. Each family's circuit is chosen on its own choosing half (edge
attribution and, unless a size is stated, the smallest top-edge circuit keeping ``keep`` there);
every cell of the matrix is scored on the column family's held-out half, beside random circuits of
the row circuit's size on the same pairs. ``tests`` families get a column and no circuit. The
*core* holds the edges every family's circuit holds; the *union* those any of them holds.

A circuit's heads are the ``TOP_HEADS`` heads (outputs or queries, or key/value heads) with the
largest share of its |attribution|. One of them is *specific* to its style when every other
family's circuit gives it less than ``SPECIFIC`` times that share, *shared* when every other gives
it at least ``SHARED`` times that share, and *partly shared* between.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import BehaviorLensError
from ..io import write_csv, write_json
from ..prompts.contrast import ContrastSet
from ..stats import ratio_ci, ratio_of_means
from . import faithfulness as Fa
from .attribution import edge_attribution
from .circuit import EDGE_METHODS, Circuit, edges_of
from .composition import composition_table
from .exact import agreement, exact_edges, sample_edges
from .graph import Graph
from .plots import circuit_graph, transfer_plot

TOP_HEADS = 10
SPECIFIC, SHARED = 0.25, 0.5  # share elsewhere over share here: below the first specific, above the second shared
CORE_GRAPH_EDGES = 40  # edges of the core drawn


@dataclass
class StyleCircuit:
    """One family's circuit: its edges (indices, by decreasing |attribution|), their attribution,
    the pairs that chose it and the held-out pairs that score it."""

    circuit: Circuit
    edges: np.ndarray
    attribution: np.ndarray  # [n_edges] every edge's attribution on the choosing pairs
    select: ContrastSet
    heldout: ContrastSet
    curve: pd.DataFrame  # faithfulness over size on the choosing pairs
    check: dict  # EAP against exact edge patching on sampled edges


def choose(model, cset: ContrastSet, size: float | None = None, keep: float = 0.8, method: str = "eap",
           steps: int = 4, convention: str = "counterfactual", fractions: Sequence[float] = Fa.FRACTIONS,
           exact_top: int = 20, exact_random: int = 20, pair_batch: int = 8, seed: int = 0,
           progress: bool = False) -> StyleCircuit:
    """``cset``'s circuit, chosen on half its pairs: the top ``size`` share of the edges by
    attribution, or the smallest top-edge circuit keeping ``keep`` of the behavior on that half."""
    select, heldout = cset.split(0.5, seed)
    g = Graph.of(model)
    scores = edge_attribution(model, select, steps=1 if method == "eap" else steps, pair_batch=pair_batch,
                              progress=progress)
    sample = sample_edges(scores, exact_top, exact_random, seed)
    _, check = agreement(scores, exact_edges(model, select, sample, pair_batch=pair_batch), sample)
    order = Fa.ranked(scores)
    curve = Fa.curve(model, select, order, fractions, convention, pair_batch, "select")
    k = edges_of(size, g) if size is not None else Fa.choose_size(curve, keep)
    chosen = order[:k]
    circuit = Circuit(model.name, cset.name, g.edge_names(*(a[chosen] for a in g.edge_index)),
                      [float(v) for v in scores.values[chosen]], g.n_edges, scores.method, convention, keep,
                      [p.row for p in select])
    return StyleCircuit(circuit, chosen, scores.values, select, heldout, curve, check)


def core_and_union(circuits: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The edges every circuit holds and the edges any holds (sorted indices)."""
    core, union = np.asarray(circuits[0]), np.asarray(circuits[0])
    for c in circuits[1:]:
        core, union = np.intersect1d(core, c), np.union1d(union, c)
    return np.sort(core), np.sort(union)


def overlap(styles: dict[str, StyleCircuit]) -> pd.DataFrame:
    """Every pair of circuits: shared edges, Jaccard, and Jaccard weighted by attribution (each
    edge weighs its share of the circuit's |attribution|; sum of minima over sum of maxima)."""
    rows = []
    for a, b in combinations(styles, 2):
        wa, wb = _weights(styles[a]), _weights(styles[b])
        edges = set(wa) | set(wb)
        shared = set(wa) & set(wb)
        low = sum(min(wa.get(e, 0.0), wb.get(e, 0.0)) for e in edges)
        high = sum(max(wa.get(e, 0.0), wb.get(e, 0.0)) for e in edges)
        for x, y in ((a, b), (b, a)):
            rows.append({"circuit": x, "other": y, "edges": len(styles[x].edges), "other_edges": len(styles[y].edges),
                         "shared_edges": len(shared), "jaccard": len(shared) / max(1, len(edges)),
                         "weighted_jaccard": low / high if high > 0 else 0.0})
    return pd.DataFrame(rows)


def _weights(s: StyleCircuit) -> dict[int, float]:
    w = np.abs(s.attribution[s.edges])
    total = float(w.sum()) or 1.0
    return {int(e): float(v) / total for e, v in zip(s.edges, w)}


def transfer(model, circuits: dict[str, np.ndarray], columns: dict[str, ContrastSet],
             convention: str = "counterfactual", n_random: int = 3, seed: int = 0,
             pair_batch: int = 8) -> pd.DataFrame:
    """Every circuit on every family's pairs: one row per cell, the faithfulness with its CI over
    pairs beside random circuits of the circuit's size (their mean, with a CI, and maximum)."""
    g = Graph.of(model)
    randoms = {name: [Fa.random_edges(g, len(e), seed + i) for i in range(n_random)] for name, e in circuits.items()}
    rows = []
    for family, cset in columns.items():
        names = list(circuits)
        kept = [circuits[n] for n in names] + [r for n in names for r in randoms[n]]
        ev = Fa.evaluate(model, cset, kept, convention, pair_batch)
        den = ev.full - ev.empty
        for i, (name, edges) in enumerate(circuits.items()):
            num = ev.metric[i] - ev.empty
            first = len(names) + i * n_random
            rnd = ev.metric[first:first + n_random] - ev.empty if n_random else None
            lo, hi = ratio_ci(num, den)
            row = {"circuit": name, "family": family, "edges": len(edges), "edges_fraction": len(edges) / g.n_edges,
                   "faithfulness": ratio_of_means(num, den), "ci_low": lo, "ci_high": hi}
            if rnd is not None:
                rlo, rhi = ratio_ci(rnd.mean(0), den)
                row |= {"random_faithfulness": ratio_of_means(rnd.mean(0), den), "random_ci_low": rlo,
                        "random_ci_high": rhi, "random_max": max(ratio_of_means(r, den) for r in rnd)}
            rows.append(row | {"n_pairs": len(cset), "convention": convention})
    return pd.DataFrame(rows)


def edge_table(g: Graph, edges: np.ndarray, attribution: np.ndarray) -> pd.DataFrame:
    """The graph's edge rows for ``edges`` with their ``attribution``."""
    f = g.edges_frame().iloc[np.asarray(edges, dtype=int)].copy()
    f["attribution"] = attribution[np.asarray(edges, dtype=int)]
    return f


def node_weights(edges: pd.DataFrame) -> dict[str, float]:
    """Each head's summed |attribution| over a circuit's edges it takes part in: as the upstream
    node (``L3H1``: its output), as a query (``L3H1``) or as a key/value head (``L3KV0``, shared
    by its query heads under grouped-query attention). MLPs, the input and the logits are left out."""
    weight: dict[str, float] = {}
    for up, port, a in zip(edges["upstream"], edges["port"], edges["attribution"].abs()):
        for node in (up, "" if port.endswith(".mlp") else port.rsplit(".", 1)[0]):
            if node not in ("", "input", "logits") and not node.endswith("mlp"):
                weight[node] = weight.get(node, 0.0) + float(a)
    return weight


def specific(g: Graph, styles: dict[str, StyleCircuit]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per family, the heads of its circuit (module doc: ``specific`` to it, ``shared`` by every
    circuit, or ``partly shared``); and every edge only its circuit holds (by decreasing |attribution|)."""
    shares = {}
    for name, s in styles.items():
        w = node_weights(edge_table(g, s.edges, s.attribution))
        total = sum(w.values()) or 1.0
        shares[name] = {k: v / total for k, v in w.items()}
    heads, only = [], []
    for name, s in styles.items():
        others = [shares[o] for o in styles if o != name]
        for node, share in sorted(shares[name].items(), key=lambda kv: -kv[1])[:TOP_HEADS]:
            ratios = [o.get(node, 0.0) / share for o in others]
            kind = ("specific" if max(ratios) < SPECIFIC else "shared" if min(ratios) >= SHARED else "partly shared")
            heads.append({"family": name, "head": node, "share": share, "share_elsewhere_max": max(ratios) * share,
                          "share_elsewhere_min": min(ratios) * share, "kind": kind})
        held = set().union(*[set(o.edges.tolist()) for n, o in styles.items() if n != name])
        t = edge_table(g, np.array([e for e in s.edges if e not in held], dtype=int), s.attribution).assign(family=name)
        only.append(t.reindex(t["attribution"].abs().sort_values(ascending=False).index))
    return pd.DataFrame(heads), pd.concat(only, ignore_index=True)


def specific_composition(model, heads: pd.DataFrame, n_null: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Q-, K- and V-composition of each style-specific head with each shared head (whichever
    comes first writes, the later reads), with percentiles among random head pairs."""
    if heads.empty:
        return pd.DataFrame()
    query = heads[~heads["head"].str.contains("KV")]  # key/value heads have no output of their own
    spec = query[query["kind"] == "specific"]
    shared = sorted(set(query.loc[query["kind"] == "shared", "head"]))
    if spec.empty or not shared:
        return pd.DataFrame()
    names = sorted(set(spec["head"]) | set(shared))
    table, _ = composition_table(model, [_head(n) for n in names], n_null=n_null, seed=seed)
    style = dict(zip(spec["head"], spec["family"]))
    pick = ((table["upstream"].isin(style) & table["downstream"].isin(shared))
            | (table["downstream"].isin(style) & table["upstream"].isin(shared)))
    out = table[pick].copy()
    out.insert(0, "family", [style.get(u, style.get(d)) for u, d in zip(out["upstream"], out["downstream"])])
    return out.reset_index(drop=True)


def _head(name: str) -> tuple[int, int]:
    L, h = name[1:].split("H")
    return int(L), int(h)


def run_styles(model, families: Sequence[ContrastSet], tests: Sequence[ContrastSet] = (),
               out_dir: str | Path = "circuit", n_pairs: int | None = 16, test_pairs: int | None = 16,
               size: float | None = None, keep: float = 0.8, method: str = "eap", steps: int = 4,
               convention: str = "counterfactual", fractions: Sequence[float] = Fa.FRACTIONS,
               exact_top: int = 20, exact_random: int = 20, n_random: int = 3, seed: int = 0,
               pair_batch: int = 8, progress: bool = True) -> dict:
    """One circuit per family, the transfer matrix, the core and union, the style-specific heads
    and edges and their composition with the shared heads; writes them to ``out_dir`` (module doc)."""
    if len(families) < 2:
        raise BehaviorLensError("circuits per style need at least 2 families")
    if method not in EDGE_METHODS:
        raise BehaviorLensError(f"unknown attribution method {method!r}; use one of {', '.join(EDGE_METHODS)}")
    if size is not None:
        edges_of(size, Graph.of(model))
    if not 0 < keep <= 1:
        raise BehaviorLensError(f"keep must be in (0, 1], got {keep}")
    names = [c.name for c in [*families, *tests]]
    if len(set(names)) < len(names):
        raise BehaviorLensError(f"a family appears twice among {', '.join(names)}")
    for c in [*families, *tests]:
        c.require_aligned("circuit discovery")
    families = [c if n_pairs is None else c.subset(range(min(n_pairs, len(c)))) for c in families]
    tests = [c if test_pairs is None else c.subset(range(min(test_pairs, len(c)))) for c in tests]
    for c in families:
        if len(c) < 4:
            raise BehaviorLensError(f"set {c.name!r} has {len(c)} pairs; a circuit needs 4 (half choose, half score)")
    out = Path(out_dir)
    (out / "circuits").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    g = Graph.of(model)
    styles = {c.name: choose(model, c, size, keep, method, steps, convention, fractions, exact_top, exact_random,
                             pair_batch, seed, progress) for c in families}
    t_choose = time.perf_counter() - start
    core, union = core_and_union([s.edges for s in styles.values()])
    circuits = {name: s.edges for name, s in styles.items()} | {"core": core, "union": union}
    mean_attr = np.mean([s.attribution for s in styles.values()], axis=0)
    for name, s in styles.items():
        s.circuit.save(out / "circuits" / f"{name}.json")
    for name, edges in (("core", core), ("union", union)):
        Circuit(model.name, "+".join(styles), g.edge_names(*(a[edges] for a in g.edge_index)),
                [float(v) for v in mean_attr[edges]], g.n_edges, f"{name}({method})", convention, keep,
                []).save(out / "circuits" / f"{name}.json")
    columns = {name: s.heldout for name, s in styles.items()} | {c.name: c for c in tests}
    write_csv(out / "curves.csv", pd.concat([s.curve for s in styles.values()], ignore_index=True))
    matrix = transfer(model, circuits, columns, convention, n_random, seed, pair_batch)
    write_csv(out / "transfer.csv", matrix)
    heads, only = specific(g, styles)
    comp = specific_composition(model, heads, seed=seed)
    pairs = overlap(styles)
    write_csv(out / "overlap.csv", pairs)
    write_csv(out / "specific_heads.csv", heads)
    write_csv(out / "specific_edges.csv", only)
    write_csv(out / "specific_composition.csv", comp)
    transfer_plot(matrix, pairs, list(circuits), list(columns), out / "transfer.png",
                  f"Each circuit (rows) on each family's held-out pairs (columns), {model.name}")
    if len(core):
        circuit_graph(edge_table(g, core, mean_attr).pipe(lambda f: f.reindex(
            f["attribution"].abs().sort_values(ascending=False).index)).head(CORE_GRAPH_EDGES), g,
            out / "core_graph.png", f"The core: the {_count(len(core), 'edge')} all {len(styles)} family circuits "
            f"hold, the top by mean attribution")
    summary = _summary(model, g, styles, tests, matrix, heads, comp, pairs, core, union)
    summary |= {"seconds": round(time.perf_counter() - start, 2), "choose_seconds": round(t_choose, 2),
                "size": size, "keep": keep, "method": method, "convention": convention,
                "sentences": sentences(summary)}
    write_json(out / "summary.json", summary)
    return summary


def _cell(matrix: pd.DataFrame, circuit: str, family: str) -> pd.Series:
    return matrix[(matrix["circuit"] == circuit) & (matrix["family"] == family)].iloc[0]


def _summary(model, g: Graph, styles: dict[str, StyleCircuit], tests: Sequence[ContrastSet], matrix: pd.DataFrame,
             heads: pd.DataFrame, comp: pd.DataFrame, pairs: pd.DataFrame, core: np.ndarray,
             union: np.ndarray) -> dict:
    """The headline figures, per family and flat (``own_faithfulness_FAMILY``...) for predictions."""
    s: dict = {"model": model.name, "families": list(styles), "tests": [t.name for t in tests],
               "total_edges": g.n_edges, "core_edges": len(core), "core_fraction": len(core) / g.n_edges,
               "union_edges": len(union), "union_fraction": len(union) / g.n_edges}
    per: dict[str, dict] = {}
    for family in [*styles, *(t.name for t in tests)]:
        d: dict = {}
        for circuit in ("core", "union", *([family] if family in styles else [])):
            c = _cell(matrix, circuit, family)
            key = "own" if circuit == family else circuit
            d |= {f"{key}_faithfulness": float(c["faithfulness"]), f"{key}_ci": [float(c["ci_low"]), float(c["ci_high"])],
                  f"{key}_random": float(c.get("random_faithfulness", np.nan))}
        others = matrix[(matrix["family"] == family) & matrix["circuit"].isin([n for n in styles if n != family])]
        if len(others):
            best = others.loc[others["faithfulness"].idxmax()]
            d |= {"best_other": str(best["circuit"]), "best_other_faithfulness": float(best["faithfulness"])}
        if family in styles:
            st = styles[family]
            h = heads[heads["family"] == family] if len(heads) else heads
            d |= {"edges": len(st.edges), "edges_fraction": len(st.edges) / g.n_edges,
                  "specific_edges": int(len(np.setdiff1d(st.edges, np.concatenate(
                      [o.edges for n, o in styles.items() if n != family])))),
                  "specific_heads": h.loc[h["kind"] == "specific", "head"].tolist() if len(h) else [],
                  "shared_heads": h.loc[h["kind"] == "shared", "head"].tolist() if len(h) else [],
                  "attribution_exact_pearson": st.check["pearson"], "exact_edges_checked": st.check["edges"]}
        per[family] = d
        for k in ("own_faithfulness", "core_faithfulness", "union_faithfulness"):
            if k in d:
                s[f"{k}_{family}"] = d[k]
    s["styles"] = per
    s["attribution_exact_pearson"] = min(st.check["pearson"] for st in styles.values())  # the worst family's
    s["overlap"] = {f"{r['circuit']}|{r['other']}": float(r["weighted_jaccard"]) for _, r in pairs.iterrows()
                    if r["circuit"] < r["other"]}
    s["composition"] = [{"family": r["family"], "pair": f"{r['upstream']}>{r['downstream']}",
                         **{k: float(r[k]) for k in ("q_comp", "k_comp", "v_comp")},
                         **{f"{k}_pct": float(r[f"{k}_pct"]) for k in ("q_comp", "k_comp", "v_comp")}}
                        for _, r in comp.iterrows()] if len(comp) else []
    return s


def sentences(s: dict) -> list[str]:
    """One sentence per family: what its behavior shares with the other styles and what it does not."""
    out = []
    n = len(s["families"])
    for family, d in s["styles"].items():
        core = (f"the core shared by all {n} circuits ({_count(s['core_edges'], 'edge')}) keeps {_pct(d['core_faithfulness'])} "
                f"[{_pct(d['core_ci'][0])}, {_pct(d['core_ci'][1])}] (random circuits of its size "
                f"{_pct(d['core_random'])}), the union {_pct(d['union_faithfulness'])}")
        best = (f"; the best other family's circuit ({d['best_other']}) keeps {_pct(d['best_other_faithfulness'])}"
                if "best_other" in d else "")
        if "own_faithfulness" not in d:
            out.append(f"{family} (no circuit of its own): {core}{best}.")
            continue
        spec = ", ".join(d["specific_heads"]) or "no head"
        verb = "are" if len(d["specific_heads"]) > 1 else "is"
        out.append(f"{family}: its own circuit ({_count(d['edges'], 'edge')}, {_pct(d['edges_fraction'])}) keeps "
                   f"{_pct(d['own_faithfulness'])} [{_pct(d['own_ci'][0])}, {_pct(d['own_ci'][1])}] on held-out pairs "
                   f"(random {_pct(d['own_random'])}); {core}; {d['specific_edges']} of its edges are in no other "
                   f"family's circuit, and {spec} {verb} specific to it"
                   f"{best}.")
    return out


def _pct(v: float) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{round(100 * v)}%"  # an int: never "-0%"


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")
