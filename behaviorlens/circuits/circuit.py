"""A chosen circuit (``circuit.json``): its edges by name and how it was chosen; the attribution
methods that choose one, and the number of edges a circuit of a given size holds."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import BehaviorLensError
from ..io import write_json
from .graph import Graph

EDGE_METHODS = ("eap", "eap-ig")


@dataclass
class Circuit:
    """A chosen circuit: its edges by name and how it was chosen (``circuit.json``)."""

    model: str
    family: str
    edges: list[str]
    attribution: list[float]
    total_edges: int
    method: str
    convention: str
    keep: float
    select_pairs: list[int]

    @property
    def edges_fraction(self) -> float:
        return len(self.edges) / self.total_edges

    def save(self, path: str | Path) -> Path:
        return write_json(path, asdict(self) | {"n_edges": len(self.edges), "edges_fraction": self.edges_fraction})

    @classmethod
    def load(cls, path: str | Path) -> Circuit:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise BehaviorLensError(f"cannot read circuit {path}: {err}") from None
        fields = cls.__dataclass_fields__
        missing = [f for f in fields if f not in data]
        if missing:
            raise BehaviorLensError(f"{path} is not a circuit.json: it lacks {', '.join(missing)}")
        return cls(**{k: data[k] for k in fields})

    def indices(self, graph: Graph) -> np.ndarray:
        """Edge indices in ``graph`` (a clear error for a circuit of another model)."""
        if graph.n_edges != self.total_edges:
            raise BehaviorLensError(f"circuit of {self.model} ({self.total_edges} edges) does not fit this model "
                                    f"({graph.n_edges} edges)")
        ups, ports = graph.edge_index
        where = {(int(u), int(p)): i for i, (u, p) in enumerate(zip(ups, ports))}
        return np.array([where[graph.parse_edge(e)] for e in self.edges], dtype=int)


def edges_of(size: float, g: Graph) -> int:
    """Edges in a circuit of ``size`` (a share of all edges, never above it; at least one)."""
    if not 0 < size <= 1:
        raise BehaviorLensError(f"size must be a share of the edges in (0, 1], got {size:g}")
    return max(1, int(size * g.n_edges + 1e-9))
