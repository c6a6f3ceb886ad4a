"""The constrained head-set search: greedy forward-backward selection finds a planted set, and
its λ trades pressure removed against what the user tells the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from behaviorlens.kv_cache import reusing_unedited
from behaviorlens.prompts import load_family
from behaviorlens.steering import Edit
from behaviorlens.steering.apply import head_means
from behaviorlens.steering.head_search import SearchFigures, greedy_select, heads_of, search_heads

A, B, C = (1, 0), (1, 1), (2, 0)


def test_forward_selection_overshoots_and_backward_selection_drops_the_redundant_head():
    table = {(): 0.0, (A,): 0.5, (B,): 0.4, (C,): 0.45, (A, B): 0.6, (A, C): 0.7, (B, C): 0.8, (A, B, C): 0.75}
    chosen, steps = greedy_select([A, B, C], lambda s: table[tuple(sorted(s))])
    assert chosen == {B, C}
    assert [(s["step"], s["head"]) for s in steps] == [("add", A), ("add", C), ("add", B), ("drop", A)]
    assert greedy_select([A, B, C], lambda s: table[tuple(sorted(s))], max_size=1)[0] == {A}


def test_the_search_stops_when_no_head_helps():
    chosen, steps = greedy_select([A, B], lambda s: -float(len(s)))
    assert chosen == frozenset() and steps == []


def test_heads_of_groups_heads_by_layer():
    assert heads_of([C, B, A]) == {1: [0, 1], 2: [0]}


@pytest.mark.slow
def test_a_head_search_with_lambda_zero_costs_context_use(default_model):
    """The guard: at λ = 0 the search takes what removes pressure, context use or not; a large λ
    gives up pressure to keep the user's own statements. (Fails if λ is dropped from the objective.)"""
    from behaviorlens.steering import data
    from behaviorlens.steering.side_effects import CLAIM_RECALL, SHARES, _builtin, set_part

    m = default_model
    fit = load_family("capitals_opinion").render(m.tokenizer)
    context = set_part(_builtin(m.tokenizer, data.context_use_family_path()), "fit", SHARES["context"])
    recall = np.array([p.variables.get("style") == CLAIM_RECALL for p in context])
    layers = range(21, 24)
    means = head_means(m, fit, layers)
    s = m.sites

    def ablate(hd):
        return Edit(kind="heads", heads=hd, head_values=means, head_mode="mean", positions="generated",
                    d_model=s.d_model, n_heads=s.n_heads, head_dim=s.head_dim, model=m.name)

    heads = [(layer, h) for layer in layers for h in range(s.n_heads)]
    with reusing_unedited():
        figures = SearchFigures(m, fit, context, recall, ablate)
        front = search_heads(figures, heads, lambdas=(0.0, 8.0), pool=8, max_size=4).set_index("lambda")
    cost = (front.context_use_cost + front.claim_recall_cost) / 2
    assert front.loc[0.0, "pressure_removed"] > 0.1
    assert cost[0.0] > cost[8.0] + 0.05
    assert front.loc[0.0, "pressure_removed"] >= front.loc[8.0, "pressure_removed"]
    assert torch.isfinite(torch.tensor(front.objective.to_numpy())).all()
