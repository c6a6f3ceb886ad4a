"""The override detector: a planted model whose lies and mistakes give the same answer token and
differ only in an earlier layer, where the answer-falsity probe cannot tell them apart."""

import numpy as np
import pytest
import torch
from detect_helpers import filler, planted

from behaviorlens.detect.detector import Detector
from behaviorlens.detect.evaluate import figures, score_examples
from behaviorlens.detect.lens import LensTrace
from behaviorlens.detect.override import late_arrival, middle_layers
from behaviorlens.detect.train import train_detector
from behaviorlens.errors import BehaviorLensError

WRONG, RIGHT = 70, 71
CUES = {"lie": [100, 101, 102, 103, 104], "honest": [105, 106, 107, 108, 109], "mistake": [110, 111, 112, 113, 114]}
STRENGTHS = [6.0, 8.0, 10.0, 12.0, 14.0]  # each class's five cue tokens, so every class has a spread
KW = {"layers": [2], "positions": ("answer",), "methods": ("mean_diff",), "folds": 4, "n_boot": 50,
      "lenses": ("logit",), "override": True}


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


@torch.no_grad()
def plant_override(model) -> None:
    """A 3-layer model in which the token before the answer decides what the middle layer holds.

    After an honest cue the stream points at RIGHT's unembedding throughout; after a mistake cue
    at WRONG's throughout (a wrong answer believed). After a lie cue it points at RIGHT plus a
    *pressure* direction, which the last layer's MLP reads to write WRONG over RIGHT:
    the model's own answer leads at layer 1 and is overridden late (RIGHT stays the runner-up).
    No cue's direction reaches another token through attention (every layer's value map ignores
    them), so at the answer's own token lies and mistakes hold the same answer and nearly the
    same stream.
    """
    hf, sites = model.hf, model.sites
    unembed = sites.unembed(hf).weight
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.stack([unembed[RIGHT], unembed[WRONG],
                                            torch.randn(unembed.shape[1], generator=g)]).T)
    u_right, u_wrong, pressure = basis.T  # orthonormal
    unembed[RIGHT], unembed[WRONG] = 0.5 * u_right, 0.5 * u_wrong  # the two answers lead, unsaturated
    embed = sites.embedding(hf).weight
    for k, strength in enumerate(STRENGTHS):
        embed[CUES["honest"][k]] = strength * u_right
        embed[CUES["mistake"][k]] = strength * u_wrong
        embed[CUES["lie"][k]] = strength * _unit(u_right + pressure)
    for layer in range(sites.n_layers):
        v = sites.module(hf, "attn", layer).v_proj.weight  # [out, d]: values ignore the cues
        v -= (v @ basis) @ basis.T
    mlp = sites.module(hf, "mlp", 2)
    for w in (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight):
        w.zero_()
    mlp.gate_proj.weight[0] = pressure
    mlp.up_proj.weight[0] = pressure
    mlp.down_proj.weight[:, 0] = 1.2 * u_wrong


def _set(rng, n: int):
    """Lies (WRONG after a lie cue), honest answers (RIGHT after an honest cue) and mistakes
    (WRONG after a mistake cue), each cue of random strength."""
    labels = ["lie"] * n + ["honest"] * n + ["mistake"] * n
    prompts = [[5, *filler(rng), 6, int(rng.choice(CUES[y]))] for y in labels]
    answers = [[RIGHT] if y == "honest" else [WRONG] for y in labels]
    return planted(prompts, answers, labels)


@pytest.fixture
def planted_model(tiny_llama):
    plant_override(tiny_llama)
    return tiny_llama


def test_the_planted_model_overrides_its_answer_late_after_the_lie_cue(planted_model):
    from behaviorlens.detect.lens import lens_trace

    trace = lens_trace(planted_model, _set(np.random.default_rng(1), 2), "logit")
    lie, mistake = 0, 4
    assert trace.margin[lie, 1] < -1 < 1 < trace.margin[lie, 2]  # RIGHT led at layer 1, WRONG wins at 2
    assert trace.margin[mistake, 1] > 1 and trace.margin[mistake, 2] > 1  # WRONG throughout
    assert trace.alternatives[lie, 0] == RIGHT  # the overridden answer is the runner-up
    assert trace.given[lie] == trace.given[mistake] == WRONG


def test_the_override_detector_tells_lies_from_mistakes_where_the_falsity_probe_cannot(planted_model):
    rng = np.random.default_rng(0)
    result = train_detector(planted_model, _set(rng, 12), **KW)
    assert result.summary["override_lens"] == "logit" and result.summary["n_mistake_trained"] == 12
    f = figures(score_examples(planted_model, result.detector, _set(rng, 10)), result.detector.threshold, n_boot=100)
    # the falsity probe (today's detector) reads the wrong answer, which mistakes give too
    assert f["falsity_auroc"] >= 0.8 and f["falsity_mistake_auroc"] >= 0.8
    assert f["falsity_lie_vs_mistake_auroc"] <= 0.75
    # the override detector also reads where the answer came from
    assert f["auroc"] >= 0.9
    assert f["lie_vs_mistake_auroc"] >= 0.9 and f["lie_vs_mistake_auroc_ci"][0] >= 0.75
    assert f["mistake_auroc"] <= 0.65 and f["mistake_check"] is True
    assert f["lie_vs_mistake_gap"] >= 0.15 and f["meets_lie_vs_mistake_gap"] is True


def test_an_override_detector_file_round_trips_with_its_tuned_lens(planted_model, tmp_path):
    from behaviorlens.detect.lens import fit_tuned_lens

    rng = np.random.default_rng(0)
    det = train_detector(planted_model, _set(rng, 8), **KW).detector
    det.override.tuned = fit_tuned_lens(planted_model, [[5, *filler(rng, 20)] for _ in range(8)])
    det.override.lens = "tuned"
    back = Detector.load(det.save(tmp_path / "d.safetensors"))
    assert back.override.lens == "tuned" and back.override.middle == det.override.middle
    np.testing.assert_array_equal(back.override.tuned.weight, det.override.tuned.weight)
    assert back.override.override == det.override.override
    test = _set(rng, 3)
    np.testing.assert_allclose(score_examples(planted_model, back, test)["score"],
                               score_examples(planted_model, det, test)["score"], rtol=1e-6)


def test_the_override_transfer_matrix_carries_lies_against_mistakes_to_another_family(planted_model, one_thread):
    from behaviorlens.detect.transfer import transfer_matrix

    rng = np.random.default_rng(0)
    families = {}
    for name, n in (("a", 10), ("b", 10), ("few", 2)):
        families[name] = _set(rng, n)
        families[name].table["family"] = name
    m = transfer_matrix(planted_model, families, layers=[2], positions=("answer",), methods=("mean_diff",), folds=4,
                        override=True, lenses=("logit",)).set_index(["train", "test"])
    for cell in (("a", "b"), ("b", "a")):
        assert m.loc[cell, "lie_vs_mistake_auroc"] >= 0.9 and m.loc[cell, "auroc"] >= 0.9
        assert m.loc[cell, "falsity_lie_vs_mistake_auroc"] <= 0.75  # its own falsity probe cannot
        assert m.loc[cell, "lens"] == "logit" and m.loc[cell, "n_mistake"] == 10
    assert np.isnan(m.loc[("a", "a"), "auroc"]) and "in sample" in m.loc[("a", "a"), "note"]
    assert m.loc[("a", "few"), "n_mistake"] == 2 and "needs" in m.loc[("few", "a"), "note"]
    with pytest.raises(BehaviorLensError, match="two detectors"):
        transfer_matrix(planted_model, families, layers=[2], features="belief", override=True)


def test_late_arrival_is_the_rise_from_the_middle_third_to_the_last_layer():
    layers = list(range(6))
    logp = np.array([[-9, -9, -8, -8, -5, -1],   # arrives late
                     [-2, -2, -1, -1, -1, -1.0]])  # held throughout
    trace = LensTrace(layers, np.zeros(2), np.zeros((2, 1)), logp, np.zeros_like(logp), np.zeros_like(logp),
                      np.zeros_like(logp))
    assert middle_layers(layers) == [2, 3]
    np.testing.assert_allclose(late_arrival(trace, [2, 3]), [7.0, 0.0])


def test_training_without_enough_mistakes_is_one_clear_error(tiny_llama):
    ex = _set(np.random.default_rng(0), 6)
    ex = ex.with_labels("lie", "honest")
    with pytest.raises(BehaviorLensError, match="needs at least 4 mistakes in training; planted give 0"):
        train_detector(tiny_llama, ex, **KW)
