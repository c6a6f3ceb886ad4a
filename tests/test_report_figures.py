"""Every report figure is drawn at the width the report shows it at, with no text smaller than the
report's body text: the shared save_figure enforces it and records it in the PNG, and every
stage's plots go through it (tables the size of the demo model's: 24 layers, 14 heads)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from behaviorlens import figures as plots
from behaviorlens.figures import plt, save_figure
from behaviorlens.measure import plot_shifts

LAYERS, HEADS = 24, 14


def check_png(path) -> dict:
    """The PNG is the report's figure width at the report's pixel ratio, and its smallest text,
    shown at that width, is at least the body text size (CSS px)."""
    image = Image.open(path)
    assert image.width == plots.FIGURE_WIDTH_PX * plots.PIXEL_RATIO, (path, image.width)
    assert image.text[plots.WIDTH_KEY] == str(plots.FIGURE_WIDTH_PX)
    dpi = image.info["dpi"][0]
    smallest = float(image.text[plots.MIN_FONT_KEY])
    shown_px = smallest * dpi / 72 / plots.PIXEL_RATIO  # CSS px of the smallest text, the PNG shown at its width
    assert shown_px >= plots.BODY_FONT_PX - 0.05, (path, smallest, shown_px)
    return {"width": image.width, "min_font_pt": smallest, "shown_px": shown_px}


def test_the_shared_sizes_agree_with_each_other():
    assert plots.MIN_FONT_PT * plots.DPI / 72 / plots.PIXEL_RATIO == pytest.approx(plots.BODY_FONT_PX)
    assert plots.FIGURE_WIDTH_IN * plots.DPI == pytest.approx(plots.FIGURE_WIDTH_PX * plots.PIXEL_RATIO)
    # the figure fits the report's body with a finding box's border and padding (1 em) around it
    assert plots.FIGURE_WIDTH_PX + 2 + 2 * 1 + 2 * plots.BODY_FONT_PX <= plots.REPORT_WIDTH_PX


def test_save_figure_draws_any_figure_at_the_report_width_with_body_size_text(tmp_path):
    fig, ax = plt.subplots(figsize=(14, 3))  # too wide, and every text too small
    ax.plot([0, 1, 2], [3, 1, 2], label="a line")
    ax.set_xlabel("x", fontsize=6)
    ax.set_title("a title", fontsize=7)
    ax.tick_params(labelsize=5)
    note = ax.text(1, 2, "a note", fontsize=4)
    ax.legend(fontsize=5)
    check = check_png(save_figure(fig, tmp_path / "f.png"))
    assert check["min_font_pt"] == plots.MIN_FONT_PT
    assert note.get_fontsize() == plots.MIN_FONT_PT and ax.xaxis.label.get_fontsize() == plots.MIN_FONT_PT
    assert all(t.get_fontsize() >= plots.MIN_FONT_PT for t in ax.get_xticklabels() + ax.get_yticklabels())


def test_the_recorded_size_is_the_smallest_text_drawn(tmp_path):
    """Text above the floor is left as it is, and the PNG says what the smallest was."""
    with plt.rc_context({"font.size": 20}):
        fig, ax = plt.subplots()
        ax.plot([0, 1], [0, 1])
        ax.set_title("big", fontsize=30)
        ax.set_xlabel("smallest", fontsize=17)
        ax.tick_params(labelsize=18)
    check = check_png(save_figure(fig, tmp_path / "f.png"))
    assert check["min_font_pt"] == 17
    assert abs(Image.open(tmp_path / "f.png").height - fig.get_figheight() * plots.DPI) <= 1  # no tight crop


def test_long_titles_wrap_to_the_width():
    text = "candidate edits: size = neutral KL, hollow = outside the limits " * 3
    lines = plots.wrap(text, 0.5).split("\n")
    assert len(lines) > 1 and all(len(line) <= plots.CHARS_PER_WIDTH // 2 for line in lines)
    assert plots.tick_step(60, 600) > 1 and plots.tick_step(10, 600) == 1


def test_the_measure_plot_is_drawn_at_the_report_width(tmp_path):
    table = pd.DataFrame({"family": ["capitals_opinion", "facts_opinion", "restated_varied"],
                          "behavior_shift": [3.1, 1.2, -0.2], "ci_low": [2.8, 0.9, -0.5], "ci_high": [3.4, 1.5, 0.1]})
    check_png(plot_shifts(table, tmp_path / "shifts.png"))


def test_the_patching_heatmaps_are_drawn_at_the_report_width(tmp_path):
    from behaviorlens.patching.plots import head_heatmap, position_heatmap

    rng = np.random.default_rng(0)
    positions = pd.DataFrame([{"layer": L, "from_end": -p, "metric": rng.normal(), "significant": rng.random() > 0.3,
                               "token": f" token{p}"} for L in range(LAYERS) for p in range(40)])
    check_png(position_heatmap(positions, tmp_path / "heatmap.png",
                               "capitals_opinion: exact denoise resid_pre (Qwen/Qwen2.5-0.5B-Instruct)"))
    heads = pd.DataFrame([{"layer": L, "head": h, "metric": rng.normal(), "significant": rng.random() > 0.3}
                          for L in range(LAYERS) for h in range(HEADS)])
    check_png(head_heatmap(heads, tmp_path / "heads.png", "capitals_opinion: heads at the last position"))


def candidates() -> pd.DataFrame:
    rng = np.random.default_rng(1)
    n = 12
    return pd.DataFrame({
        "group": ["knockout", "head edit", "vector", "trained"] * 3, "edit": [f"e{i}" for i in range(n)],
        "pressure_removed_fraction": rng.uniform(0, 1, n), "neutral_kl": rng.uniform(0, 0.1, n),
        "within_limits": rng.random(n) > 0.5, "chosen": [True] + [False] * (n - 1),
        "accuracy_neutral_change": rng.uniform(-0.1, 0, n), "factual_accuracy_change": rng.uniform(-0.1, 0, n),
        "context_use_accuracy_change": rng.uniform(-0.3, 0, n), "claim_recall_accuracy_change": rng.uniform(-0.3, 0, n),
        "random_accuracy_neutral_change": rng.uniform(-0.05, 0, n), "random_pressure_removed_fraction": rng.normal(0, .1, n)})


def test_the_steering_plots_are_drawn_at_the_report_width(tmp_path):
    from behaviorlens.steering.plots import dose_response, pareto

    check_png(pareto(candidates(), tmp_path / "pareto.png", 0.05, 0.02))
    frame = pd.DataFrame([{"layer": L, "strength": s, "kind": "vector", "pressure_removed_fraction": s / 8,
                           "shift_removed_fraction": s / 8, "neutral_kl": s / 100, "random_pressure_removed_fraction": 0.0,
                           "random_neutral_kl": s / 200} for L in (10, 14, 18) for s in (1, 2, 4, 8)])
    check_png(dose_response(frame, tmp_path / "dose.png"))


def test_the_probing_plots_are_drawn_at_the_report_width(tmp_path):
    from behaviorlens.probing.plots import plot_auroc_by_layer, plot_head_heatmap, plot_transfer

    rng = np.random.default_rng(2)
    rows = [{"site": site, "position": "last", "method": method, "layer": L, "head": h,
             "auroc_mean": rng.uniform(0.5, 1), "auroc_ci_low": 0.5, "auroc_ci_high": 1.0, "control_auroc": 0.5,
             "random_auroc": 0.55, "wording_auroc": 0.7}
            for site, heads in (("resid_post", [np.nan]), ("head", range(HEADS)))
            for method in ("mean_diff", "logistic") for L in range(LAYERS) for h in heads]
    table = pd.DataFrame(rows)
    check_png(plot_auroc_by_layer(table, tmp_path / "auroc.png", "capitals_opinion"))
    check_png(plot_head_heatmap(table, tmp_path / "heads.png", "capitals_opinion"))
    names = ["capitals_opinion", "facts_opinion", "restated_varied", "pushback_cited_varied"]
    transfer = pd.DataFrame([{"train": a, "test": b, "auroc": rng.uniform(0.5, 1), "site": "resid_post", "layer": 14,
                              "head": np.nan, "method": "logistic", "position": "last"} for a in names for b in names])
    check_png(plot_transfer(transfer, tmp_path / "transfer.png", "capitals_opinion"))


def test_the_circuit_plots_are_drawn_at_the_report_width(tmp_path):
    from behaviorlens.circuits.graph import Graph
    from behaviorlens.circuits.plots import (
        circuit_graph,
        composition_plot,
        faithfulness_curve,
        head_figures_plot,
    )

    rng = np.random.default_rng(3)
    g = Graph(LAYERS, HEADS, 2)
    curve = pd.DataFrame([{"pairs": pairs, "family": "capitals_opinion", "edges": k, "edges_fraction": k / 1000,
                           "faithfulness": min(1, k / 100), "ci_low": 0, "ci_high": 1}
                          for pairs in ("selection", "held out") for k in (10, 30, 100, 300, 1000)])
    controls = pd.DataFrame([{"circuit": c, "family": "capitals_opinion", "edges": e, "faithfulness": f}
                             for c, e, f in (("random 0", 100, 0.1), ("random 1", 100, 0.05), ("complement", 900, 0.2))])
    check_png(faithfulness_curve(curve, controls, tmp_path / "curve.png", 0.8, 100, "capitals_opinion (model)"))
    edges = pd.DataFrame([{"upstream": f"L{L}H{L % HEADS}", "port": f"L{L + 3}H{(L + 1) % HEADS}.q", "port_kind": "q",
                           "attribution": rng.normal()} for L in range(0, 20, 2)]
                         + [{"upstream": "L20.mlp", "port": "logits", "port_kind": "logits", "attribution": 1.0}])
    check_png(circuit_graph(edges, g, tmp_path / "graph.png", "capitals_opinion: top 11 of the circuit's 11 edges"))
    comp = pd.DataFrame({"upstream": [f"L{i}H0" for i in range(6)], "downstream": [f"L{i + 4}H1" for i in range(6)],
                         **{k: rng.uniform(0, 0.3, 6) for k in ("q_comp", "k_comp", "v_comp")}})
    null = pd.DataFrame({k: rng.uniform(0, 0.2, 200) for k in ("q_comp", "k_comp", "v_comp")})
    check_png(composition_plot(comp, null, tmp_path / "comp.png", "capitals_opinion: composition"))
    figures = pd.DataFrame([{"head": f"L{L}H{h}", "layer": L, "ov_copy": rng.normal(), "attn_to_claim": rng.random()}
                            for L in range(LAYERS) for h in range(HEADS)])
    check_png(head_figures_plot(figures, ["L10H3", "L14H2"], tmp_path / "heads.png", "capitals_opinion: heads"))


def test_the_detect_plots_are_drawn_at_the_report_width(tmp_path):
    from behaviorlens.detect.plots import plot_scores, plot_sweep, plot_transfer

    rng = np.random.default_rng(4)
    sweep = pd.DataFrame([{"position": pos, "method": m, "layer": L, "auroc_mean": rng.uniform(0.5, 1),
                           "control_auroc": 0.5} for pos in ("answer", "mean") for m in ("logistic", "mean_diff")
                          for L in range(LAYERS)])
    check_png(plot_sweep(sweep, tmp_path / "sweep.png"))
    scores = pd.DataFrame([{"family": f, "label": lab, "score": rng.normal()} for f in ("a", "b", "c")
                           for lab in ("lie", "honest", "mistake") for _ in range(5)])
    check_png(plot_scores(scores, 0.5, tmp_path / "scores.png"))
    matrix = pd.DataFrame([{"train": t, "test": s, "auroc": rng.uniform(0.4, 1), "n_lie": 9, "n_honest": 20}
                           for t in "cd" for s in "cdab"])
    check_png(plot_transfer(matrix, tmp_path / "transfer.png"))
