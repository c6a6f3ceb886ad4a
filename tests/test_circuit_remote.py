"""Circuits on the trace path: every circuit job run inside sessions of nnsight's strict NDIF
simulation (the project's modules hidden there) equals the local path, in the requests stated."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import tiny_family
from test_circuit_planted import PLANTED, planted_model

from behaviorlens.circuits.acdc import acdc
from behaviorlens.circuits.attribution import edge_attribution
from behaviorlens.circuits.composition import composition_table, run_figures
from behaviorlens.circuits.exact import exact_edges
from behaviorlens.circuits.faithfulness import CIRCUIT_ABLATIONS, evaluate
from behaviorlens.cli import main
from behaviorlens.remote import SessionLimits, counting_requests

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-4


def traced(model, **limits):
    return dataclasses.replace(model, remote="local", interventions=[], session_limits=SessionLimits(**limits))


def sent(work, model):
    """``work(model)`` and the requests it sent through the simulation."""
    with counting_requests() as count:
        out = work(model)
    return out, count.requests


def test_every_circuit_job_equals_the_local_path_in_one_session_each(tiny_llama):
    m = tiny_llama
    t = traced(m)
    cs = tiny_family().render(m.tokenizer)
    top = np.argsort(-np.abs(edge_attribution(m, cs).values))  # edges that matter, for pruning
    checks = {
        "eap": lambda x: edge_attribution(x, cs, pair_batch=2).effect,
        "eap-ig": lambda x: edge_attribution(x, cs, steps=3).effect,
        "exact": lambda x: exact_edges(x, cs, [5, 40, 77, 150, 151], batch_size=4).effect,
        **{f"evaluate {c}": (lambda x, c=c: np.stack(
            [*evaluate(x, cs, [top[:10], np.arange(120)], c).metric,
             evaluate(x, cs, [], c).full])) for c in CIRCUIT_ABLATIONS},
        "acdc": lambda x: acdc(x, cs, top[:30], threshold=0.01).steps["faithfulness_without"].to_numpy(),
        "composition": lambda x: composition_table(x, [(0, 1), (1, 2), (2, 3)], n_null=20)[0][
            ["q_comp", "k_comp", "v_comp"]].to_numpy(),
        "head figures": lambda x: run_figures(x, cs)[["ov_copy", "attn_to_claim"]].to_numpy(),
    }
    for name, work in checks.items():
        local, (remote, requests) = work(m), sent(work, t)
        assert requests == (2 if name.startswith("evaluate") else 1), name  # evaluate runs twice above
        assert np.abs(local).max() > 1e-3, name
        assert np.allclose(local, remote, atol=TOL), (name, np.abs(local - remote).max())


def test_sessions_split_within_the_limits_and_still_agree(tiny_llama):
    """EAP's chunks go together while their edge effects fit one request; a limit of a few bytes
    sends each chunk on its own, with the same figures."""
    m = tiny_llama
    cs = tiny_family().render(m.tokenizer)
    local = edge_attribution(m, cs, pair_batch=1)
    together, n_together = sent(lambda x: edge_attribution(x, cs, pair_batch=1), traced(m))
    apart, n_apart = sent(lambda x: edge_attribution(x, cs, pair_batch=1), traced(m, request_mb=1e-6))
    assert (n_together, n_apart) == (1, len(cs))
    for scores in (together, apart):
        assert np.allclose(scores.effect, local.effect, atol=TOL) and np.allclose(scores.shift, local.shift, atol=TOL)


def test_the_circuit_command_runs_remotely_end_to_end(tmp_path, capsys):
    """``behaviorlens circuit ... --remote local`` on the planted model saved to a folder: the same
    circuit, summary and edge table as the local run, in 9 requests: edge attribution, its exact
    check, the choosing and held-out curves, the held-out controls, the test family's curve and
    controls, composition in the weights and the head figures, one session each."""
    m = planted_model()
    m.hf.save_pretrained(tmp_path / "model")
    m.tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "planted.yaml").write_text(yaml.safe_dump(PLANTED))
    family = str(tmp_path / "planted.yaml")
    args = ["circuit", family, "--model", str(tmp_path / "model"), "--pairs", "4", "--test", family,
            "--method", "eap-ig", "--exact-edges", "3"]
    assert main([*args, "--out", str(tmp_path / "local")]) == 0
    with counting_requests() as count:
        assert main([*args, "--remote", "local", "--out", str(tmp_path / "remote")]) == 0
    assert count.requests == 9
    assert "circuit: 3 of 190 edges" in capsys.readouterr().out
    local, remote = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("local", "remote"))
    for s in (local, remote):
        s.pop("timings"), s.pop("seconds")
    assert remote == local
    a, b = (pd.read_csv(tmp_path / d / "edges.csv") for d in ("local", "remote"))
    assert a["edge"].equals(b["edge"]) and np.allclose(a["attribution"], b["attribution"], atol=TOL)
