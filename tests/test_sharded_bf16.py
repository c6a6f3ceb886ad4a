"""Every stage on a model sharded by ``device_map`` (part offloaded) and in bfloat16, against
the unsharded float32 figures of the same weights.

One tiny random llama (with the planted pressure of ``steering_helpers.planted_model``) is saved
with ``save_pretrained`` and loaded three times through :func:`behaviorlens.model.load_model`:

- ``f32``: float32, unsharded: the reference;
- ``sharded``: float32, ``device_map`` puts the embedding, layer 0 and the final norm on the
  CPU and offloads layers 1-2 and the unembedding to disk (accelerate keeps their weights on the
  meta device and loads them for each forward: the CPU-only stand-in for a model split over
  devices). Tolerance: 1e-4 absolute on every figure (same weights, same kernels);
- ``bf16``: bfloat16, unsharded. bfloat16 keeps about 3 significant digits, so each test states
  its tolerance, relative to the scale of what it compares.

Every model runs the same attention kernel (SDPA, the loader's default).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_family
from steering_helpers import planted_model, planted_set, tiny_side_effects

from behaviorlens.edits import Readout
from behaviorlens.measure import measure
from behaviorlens.model import load_model
from behaviorlens.patching import attribution_patch, patch
from behaviorlens.patching.ablation import ablation_scan
from behaviorlens.probing import collect
from behaviorlens.probing.probes import make_probe
from behaviorlens.steering import Edit, head_edit, train_vector
from behaviorlens.steering.evaluate import evaluate_steering
from behaviorlens.steering.run import generate_examples

SHARDED = 1e-4  # sharded float32 against unsharded float32: absolute, on every figure
DEVICE_MAP = {
    "model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
    "model.layers.1": "disk", "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "disk",
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{"f32", "sharded", "bf16"}: the same saved weights loaded three ways."""
    folder = tmp_path_factory.mktemp("tiny-planted")
    source = planted_model("llama")
    source.hf.save_pretrained(folder)
    source.tokenizer.save_pretrained(folder)
    loaded = {
        "f32": load_model(str(folder)),
        "sharded": load_model(str(folder), device_map=DEVICE_MAP),
        "bf16": load_model(str(folder), dtype="bfloat16"),
    }
    assert any(p.device.type == "meta" for p in loaded["sharded"].hf.parameters())  # really offloaded
    assert loaded["bf16"].dtype == torch.bfloat16
    return loaded


@pytest.fixture(scope="module")
def cset(models):
    return planted_set(models["f32"], n=6)


@pytest.fixture(scope="module")
def patch_set(models):
    return tiny_family().render(models["f32"].tokenizer)


@pytest.fixture(scope="module")
def side(models):
    """Side-effect prompts built once (their greedy continuations by the float32 model)."""
    return tiny_side_effects(models["f32"])


@pytest.fixture(scope="module")
def f32(models):
    """The float32 figures of a stage, computed once: ``f32(stage, *args)``."""
    memo: dict = {}

    def get(stage, *args):
        key = (stage.__name__, *map(id, args))
        if key not in memo:
            memo[key] = stage(models["f32"], *args)
        return memo[key]

    return get


def scale(x: np.ndarray) -> float:
    return float(np.abs(x).max())


def assert_near(got: np.ndarray, want: np.ndarray, atol: float) -> None:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape
    assert np.isfinite(got).all()
    diff = np.abs(got - want).max() if got.size else 0.0
    assert diff <= atol, f"max abs difference {diff:.3g} > {atol:.3g}"


# -- measure ----------------------------------------------------------------------------------


def _measure(model, cset) -> pd.DataFrame:
    return measure(model, cset).table


def test_a_sharded_model_measures_as_the_unsharded_one(models, f32, cset):
    assert_near(_measure(models["sharded"], cset).metric, f32(_measure, cset).metric, SHARDED)


def test_bfloat16_measures_within_five_percent_of_float32(models, f32, cset):
    """Metrics (logit differences, about 2 here) within 5% of their largest magnitude."""
    want = f32(_measure, cset).metric.to_numpy()
    assert_near(_measure(models["bf16"], cset).metric, want, 0.05 * scale(want))


# -- probe collection and a probe fit ---------------------------------------------------------


def _collect(model, cset):
    return collect(model, cset, sites=("resid_post", "head"), positions=("last", "s:mean"), progress=False)


def _probe(acts, layer: int = 2):
    X, y = acts.features("resid_post", "last", layer), acts.labels.numpy()
    probe = make_probe("mean_diff").fit(X, y, acts.pair_ids.numpy())
    return probe.direction, probe.score(X)


def test_a_sharded_model_collects_and_probes_as_the_unsharded_one(models, f32, cset):
    want, got = f32(_collect, cset), _collect(models["sharded"], cset)
    for key, x in want.data.items():
        assert got.data[key].dtype == torch.float32
        assert_near(got.data[key].numpy(), x.numpy(), SHARDED)
    (dw, sw), (dg, sg) = _probe(want), _probe(got)
    assert_near(dg, dw, SHARDED)
    assert_near(sg, sw, SHARDED)


def test_bfloat16_collects_and_probes_near_float32(models, f32, cset):
    """Activations within 2% of their scale per (site, position); the probe's direction has
    cosine > 0.999 with the float32 one and its scores are within 2% of their scale."""
    want, got = f32(_collect, cset), _collect(models["bf16"], cset)
    for key, x in want.data.items():
        assert got.data[key].dtype == torch.bfloat16  # stored as the model computes them
        assert_near(got.data[key].float().numpy(), x.numpy(), 0.02 * scale(x.numpy()))
    (dw, sw), (dg, sg) = _probe(want), _probe(got)
    assert float(dw @ dg) > 0.999
    assert_near(sg, sw, 0.02 * scale(sw))


# -- exact and attribution patching, ablation scans -------------------------------------------


def _patch_frames(model, cs) -> pd.DataFrame:
    resid = patch(model, cs, "resid_pre", [1], ["s", "last"], progress=False).frame
    head = patch(model, cs, "head", [2], progress=False).frame
    return pd.concat([resid, head]).sort_values(["site", "layer", "head", "position", "pair"])


def test_a_sharded_model_patches_as_the_unsharded_one(models, f32, patch_set):
    want, got = f32(_patch_frames, patch_set), _patch_frames(models["sharded"], patch_set)
    assert_near(got.patched, want.patched, SHARDED)
    assert_near(got.effect, want.effect, SHARDED)


def test_bfloat16_patches_within_five_percent_of_float32(models, f32, patch_set):
    """Patched metrics within 5% of the metric's scale, effects within 5% of the largest gap."""
    want, got = f32(_patch_frames, patch_set), _patch_frames(models["bf16"], patch_set)
    assert_near(got.patched, want.patched, 0.05 * scale(want.patched.to_numpy()))
    assert_near(got.effect, want.effect, 0.05 * scale(want.gap.to_numpy()))


def _attribution(model, cs) -> pd.DataFrame:
    resid = attribution_patch(model, cs, "resid_pre", [0, 1], steps=2, progress=False).frame
    head = attribution_patch(model, cs, "head", [2], steps=2, progress=False).frame
    return pd.concat([resid, head]).sort_values(["site", "layer", "head", "position", "pair"])


def test_a_sharded_model_attributes_as_the_unsharded_one(models, f32, patch_set):
    want, got = f32(_attribution, patch_set), _attribution(models["sharded"], patch_set)
    assert_near(got.effect, want.effect, SHARDED)


def test_bfloat16_attribution_correlates_with_float32(models, f32, patch_set):
    """Estimates within 5% of the largest float32 estimate, Pearson > 0.99 over cells."""
    want, got = f32(_attribution, patch_set), _attribution(models["bf16"], patch_set)
    w, g = want.effect.to_numpy(), got.effect.to_numpy()
    assert_near(g, w, 0.05 * scale(w))
    assert np.corrcoef(g, w)[0, 1] > 0.99


def _ablation(model, cs) -> pd.DataFrame:
    return pd.concat([ablation_scan(model, cs, "head", "mean", layers=[1, 2]),
                      ablation_scan(model, cs, "mlp", "resample", layers=[0])])


def test_a_sharded_model_ablates_as_the_unsharded_one(models, f32, patch_set):
    want, got = f32(_ablation, patch_set), _ablation(models["sharded"], patch_set)
    assert_near(got.metric_ablated, want.metric_ablated, SHARDED)
    assert_near(got.value, want.value, SHARDED)


def test_bfloat16_ablation_correlates_with_float32(models, f32, patch_set):
    """Mean ablated metrics within 5% of the metric's scale, Pearson > 0.99 over components."""
    want, got = f32(_ablation, patch_set), _ablation(models["bf16"], patch_set)
    w, g = want.metric_ablated.to_numpy(), got.metric_ablated.to_numpy()
    assert_near(g, w, 0.05 * scale(want.metric_positive.to_numpy()))
    assert np.corrcoef(g, w)[0, 1] > 0.99


# -- steering evaluation and steered generation -----------------------------------------------


@pytest.fixture(scope="module")
def vector(models, cset) -> Edit:
    """A steering vector at layer 1, trained once on the float32 model."""
    return train_vector(models["f32"], cset, [1])


def _edits(model, cset, vector: Edit) -> dict[str, Edit]:
    """The vector, a mean-heads edit whose means ``model`` itself computes, a detector knockout."""
    s = model.sites
    g = torch.Generator().manual_seed(3)
    meta = {"d_model": s.d_model, "n_heads": s.n_heads, "head_dim": s.head_dim, "model": model.name}
    return {
        "vector": vector,
        "heads": head_edit(model, {1: [0, 1], 2: [2]}, "mean", reference=cset),
        "knockout": Edit(kind="knockout", heads={1: [0, 1, 2, 3], 2: [0, 1, 2, 3]},
                         detector=Readout(0, torch.randn(s.d_model, generator=g), 0.0), positions="all", **meta),
    }


EVAL_COLUMNS = ["metric_positive", "metric_negative", "metric_neutral", "neutral_kl", "perplexity"]


def _evaluate(model, cset, side, vector: Edit) -> dict[str, pd.DataFrame]:
    """Per kind: evaluate_steering's per-pair metrics (edit and one random control) joined to
    its neutral KL and perplexity."""
    out = {}
    for name, edit in _edits(model, cset, vector).items():
        frame = evaluate_steering(model, edit, cset, [-1.0] if name == "vector" else [1.0],
                                  controls=1, side_effects=side)
        out[name] = frame.attrs["pairs"].merge(frame[["layer", "strength", "neutral_kl", "perplexity"]])
    return out


def test_a_sharded_model_scores_edits_as_the_unsharded_one(models, f32, cset, side, vector):
    want, got = f32(_evaluate, cset, side, vector), _evaluate(models["sharded"], cset, side, vector)
    for name, w in want.items():
        assert len(got[name]) == len(w) == 2 * len(cset)
        for col in EVAL_COLUMNS:  # perplexity (about 130) relative, the rest absolute
            assert_near(got[name][col], w[col], SHARDED * max(1.0, scale(w[col].to_numpy())))
        moved = (w.metric_positive - w.metric_positive_unedited)[w.control == 0].abs().max()
        assert moved > 1e-3, f"the {name} edit did nothing"


def test_bfloat16_scores_edits_near_float32(models, f32, cset, side, vector):
    """Per-pair edited metrics within 5% of their largest magnitude; neutral KL and perplexity
    within 10% of their value."""
    want, got = f32(_evaluate, cset, side, vector), _evaluate(models["bf16"], cset, side, vector)
    for name, w in want.items():
        for col in EVAL_COLUMNS[:3]:
            assert_near(got[name][col], w[col], 0.05 * scale(w[col].to_numpy()))
        for col in EVAL_COLUMNS[3:]:
            assert_near(got[name][col], w[col], 0.1 * scale(w[col].to_numpy()))


def _generate(model, cset, vector: Edit) -> pd.DataFrame:
    return generate_examples(model, vector, cset.subset(range(3)), strengths=(-4.0, 0.0, 4.0), max_new_tokens=6)


def test_a_sharded_model_generates_the_unsharded_tokens_under_an_edit(models, f32, cset, vector):
    want = f32(_generate, cset, vector)
    pd.testing.assert_frame_equal(_generate(models["sharded"], cset, vector), want)
    steered = want[want.strength == 4.0].completion.to_numpy()
    assert (steered != want[want.strength == 0.0].completion.to_numpy()).any()


def test_bfloat16_generates_the_float32_tokens_under_an_edit(models, f32, cset, vector):
    """Greedy bf16 continuations equal the float32 ones token for token (these nine have no
    near-tie within bf16's error; a tie would flip a token and show here)."""
    pd.testing.assert_frame_equal(_generate(models["bf16"], cset, vector), f32(_generate, cset, vector))


def test_a_weights_edit_acts_on_offloaded_layers_as_on_loaded_ones(models):
    """A weights edit on an offloaded layer acts as on the unsharded model."""
    from behaviorlens.steering import steer

    s = models["f32"].sites
    delta = 0.5 * torch.randn(s.d_model, 128, generator=torch.Generator().manual_seed(4))
    edit = Edit(kind="weights", weights={"model.layers.1.mlp.down_proj.weight": delta}, d_model=s.d_model,
                n_heads=s.n_heads, head_dim=s.head_dim, model=models["f32"].name)
    logits = {}
    for name in ("f32", "sharded"):
        model = models[name]
        batch = model.batch([[3, 4, 5, 6], [7, 8, 9]])
        with steer(model, edit, 1.0):
            logits[name] = model.logits(batch)
    assert (logits["f32"] - models["f32"].logits(batch)).abs().max() > 1e-2  # the edit acts
    assert_near(logits["sharded"].numpy(), logits["f32"].numpy(), SHARDED)
