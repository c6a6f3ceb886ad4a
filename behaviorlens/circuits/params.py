"""The circuit stage's parameters (:mod:`behaviorlens.params`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..params import kwargs, param
from .circuit import EDGE_METHODS
from .faithfulness import CIRCUIT_ABLATIONS
from .run import run_circuit


@dataclass
class CircuitParams:
    """What ``behaviorlens circuit`` and an experiment's ``circuit`` step take (:func:`~.run.run_circuit`)."""

    test: list[Any] | None = param(None, "families to score the circuit on (experiment default: its test "
                                   "families)", metavar="FAMILY")
    styles: list[Any] | None = param(None, "more families, each with its own circuit: the transfer matrix, the "
                                     "shared core and union, style-specific heads (on the command line: more "
                                     "FAMILY arguments)", metavar="FAMILY")
    size: float | None = param(None, "each circuit's size as a share of the edges (default: the smallest keeping "
                               "--keep on the choosing pairs)")
    n_pairs: int = param(16, "use the first N pairs (half choose, half score)", name="pairs")
    test_pairs: int = param(16, "pairs of each --test family")
    method: str = param("eap", "edge attribution: EAP or EAP-IG", choices=EDGE_METHODS)
    steps: int = param(4, "EAP-IG interpolation steps")
    convention: str = param("counterfactual", "what an edge outside the circuit carries (default: the pair's "
                            "negative side)", name="ablation", choices=CIRCUIT_ABLATIONS)
    keep: float = param(0.8, "choose the smallest circuit keeping this share of the behavior (default 0.8)")
    exact_edges: int = param(40, "check attribution by exact patching of the N top and N random edges")
    acdc_candidates: int = param(0, "also prune the top N edges greedily (ACDC) and compare (one forward per "
                                 "edge)", name="acdc", metavar="N")
    acdc_threshold: float = param(0.01, "ACDC drops an edge costing less than this much faithfulness "
                                  "(default 0.01)")
    seed: int = param(0, "seed of the random circuits (an experiment uses its own seed)", step=False)

    def kwargs(self) -> dict[str, Any]:
        """:func:`~.run.run_circuit`'s keyword arguments but the families (``test``, ``styles``: the
        caller renders them): ``exact_edges`` top and as many random edges."""
        out = kwargs(self, run_circuit) | {"exact_top": self.exact_edges, "exact_random": self.exact_edges}
        out.pop("styles", None)
        return out
