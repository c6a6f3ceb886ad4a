"""bench/scale.py: the growth fits, the real models' weights and edges, and the extrapolated table (no model runs)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

SCALE = Path(__file__).resolve().parents[1] / "bench" / "scale.py"


@pytest.fixture(scope="module")
def scale():
    spec = importlib.util.spec_from_file_location("bench_scale", SCALE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_quadratic_fit_recovers_the_layers_squared_term_and_the_line_misses_it(scale):
    L = np.array([1, 2, 3, 4])
    f = scale.fit(L, 0.5 + 0.25 * L + 0.125 * L**2, "quadratic")
    assert (f["a"], f["b"], f["c"]) == pytest.approx((0.5, 0.25, 0.125))
    assert f["r2"] == pytest.approx(1.0) and f["r2_linear"] < 1.0
    line = scale.fit(L, 2.0 + 3.0 * L, "linear")
    assert (line["a"], line["b"], line["c"], line["r2"]) == pytest.approx((2.0, 3.0, 0.0, 1.0))


def test_real_weights_match_the_published_parameter_counts(scale):
    params = {name: scale.real_weights_bytes(name, scale.SHAPES[name]["real_layers"], scale.SHAPES[name]["real_vocab"]) / 2
              for name in scale.FULL_SHAPES}
    assert params["llama2-7b"] == pytest.approx(6.74e9, rel=0.01)
    assert params["llama3-8b"] == pytest.approx(8.03e9, rel=0.01)
    assert params["llama3-70b"] == pytest.approx(70.6e9, rel=0.01)


def test_the_edge_graph_grows_with_layers_squared(scale):
    L = np.arange(1, 9)
    edges = np.array([scale.real_edges("llama3-70b", int(n)) for n in L], dtype=float)
    f = scale.fit(L, edges, "quadratic")
    assert f["c"] > 0 and f["rms"] < 1e-6 * edges.max()


def test_the_extrapolated_table_says_a_70b_model_needs_more_than_one_gpu(scale):
    rows = []
    for shape in ("llama2-7b", "llama3-70b"):
        for L in (1, 2, 3):
            rows.append({"shape": shape, "layers": L, "stage": "measure", "pairs": 16, "status": "ok",
                         "stage_mem_bytes": 0.1 * L * scale.GiB, "stage_s": 2.0 * L, "bare_s": 1.0 * L,
                         "bare_mem_bytes": 0.0, "bare_tokens": 1000})
    measured = pd.DataFrame(rows)
    ext = scale.extrapolate(measured, scale.fits_table(measured)).set_index("model")
    assert ext.loc["llama2-7b", "fits"] == "one 80 GB GPU"
    assert ext.loc["llama2-7b", "working_gib_est"] == pytest.approx(3.2)
    assert ext.loc["llama2-7b", "ratio_to_bare_est"] == pytest.approx(2.0)
    assert ext.loc["llama3-70b", "fits"].startswith("device_map over")
