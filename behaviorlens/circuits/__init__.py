"""Circuits: the edge graph, edge attribution (EAP, EAP-IG), exact edge patching, circuits and
their faithfulness, and how their heads compose in the weights."""

from .acdc import Pruned, acdc
from .attribution import EdgeScores, edge_attribution
from .circuit import Circuit
from .composition import composition_table, run_figures
from .exact import agreement, exact_edges, sample_edges
from .faithfulness import CIRCUIT_ABLATIONS, controls, curve, evaluate
from .graph import Graph
from .run import run_circuit, test_faithfulness

__all__ = ["CIRCUIT_ABLATIONS", "Circuit", "EdgeScores", "Graph", "Pruned", "acdc", "agreement", "composition_table", "controls", "curve",
           "edge_attribution", "evaluate", "exact_edges", "run_circuit", "run_figures", "sample_edges",
           "test_faithfulness"]
