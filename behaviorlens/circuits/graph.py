"""The computational graph of a model: nodes, the inputs they read, and the edges between them.

*Upstream nodes* write into the residual stream: the input embedding, every head and every MLP,
in execution order. *Ports* read from it: each head's query input, each key/value head's key
and value input (grouped-query attention shares one key and value projection among several
query heads, so the graph does too: for a model without it there is one per head), each MLP's
input and the logits. An *edge* runs from an upstream node to a port that comes after it; the
port's input is the sum of the contributions of every upstream node before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd

from ..errors import BehaviorLensError
from ..sites import SiteMap, n_kv_heads
from .split import Shape


@dataclass(frozen=True)
class Graph(Shape):
    """Nodes and edges of one model's circuit graph (indices, names and layer of each)."""

    @classmethod
    def of(cls, model) -> Graph:
        """The graph of a behaviorlens :class:`~behaviorlens.model.Model`."""
        s: SiteMap = model.sites
        n_kv = n_kv_heads(model.config)
        if s.n_heads % n_kv:
            raise BehaviorLensError(f"{s.n_heads} query heads do not split into {n_kv} key/value heads")
        return cls(s.n_layers, s.n_heads, n_kv)

    # -- upstream nodes: input, then per layer heads 0..H-1 and the MLP -------------------------

    def head_node(self, layer: int, head: int) -> int:
        return 1 + layer * (self.n_heads + 1) + head

    def mlp_node(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    @cached_property
    def up_names(self) -> list[str]:
        names = ["input"]
        for L in range(self.n_layers):
            names += [f"L{L}H{h}" for h in range(self.n_heads)] + [f"L{L}.mlp"]
        return names

    # -- ports: per layer the query of each head, key and value of each kv head, MLP; logits ----

    def q_port(self, layer: int, head: int) -> int:
        return layer * self.ports_per_layer + head

    def k_port(self, layer: int, kv: int) -> int:
        return layer * self.ports_per_layer + self.n_heads + kv

    def v_port(self, layer: int, kv: int) -> int:
        return layer * self.ports_per_layer + self.n_heads + self.n_kv + kv

    def kv_of(self, head: int) -> int:
        """The key/value head a query head reads."""
        return head // (self.n_heads // self.n_kv)

    @cached_property
    def port_names(self) -> list[str]:
        kv = "H" if self.n_kv == self.n_heads else "KV"
        names = []
        for L in range(self.n_layers):
            names += [f"L{L}H{h}.q" for h in range(self.n_heads)]
            names += [f"L{L}{kv}{g}.k" for g in range(self.n_kv)]
            names += [f"L{L}{kv}{g}.v" for g in range(self.n_kv)]
            names.append(f"L{L}.mlp")
        return names + ["logits"]

    @property
    def shape(self) -> Shape:
        """The sizes alone, as a job takes them (a plain :class:`~.split.Shape`)."""
        return Shape(self.n_layers, self.n_heads, self.n_kv)

    @cached_property
    def port_limit(self) -> np.ndarray:
        """Per port, how many upstream nodes precede it (edges come from nodes 0..limit-1)."""
        return np.array(self.limits, dtype=np.int64)

    @cached_property
    def port_layer(self) -> np.ndarray:
        return np.append(np.repeat(np.arange(self.n_layers), self.ports_per_layer), self.n_layers)

    @cached_property
    def up_layer(self) -> np.ndarray:
        """Layer of each upstream node (-1 for the input)."""
        return np.append(-1, np.repeat(np.arange(self.n_layers), self.n_heads + 1))

    # -- edges --------------------------------------------------------------------------------

    @cached_property
    def valid(self) -> np.ndarray:
        """[n_up, n_ports] bool: whether the edge exists."""
        return np.arange(self.n_up)[:, None] < self.port_limit[None, :]

    @cached_property
    def edge_index(self) -> tuple[np.ndarray, np.ndarray]:
        """(upstream, port) of every edge, in a fixed order (port-major)."""
        ports = np.repeat(np.arange(self.n_ports), self.port_limit)
        ups = np.concatenate([np.arange(n) for n in self.port_limit])
        return ups, ports

    def edge_names(self, ups: np.ndarray, ports: np.ndarray) -> list[str]:
        return [f"{self.up_names[u]}->{self.port_names[p]}" for u, p in zip(ups, ports)]

    def parse_edge(self, name: str) -> tuple[int, int]:
        """(upstream, port) of an edge named ``"L3H1->L7KV0.k"``, or a clear error."""
        try:
            up, port = name.split("->")
            u, p = self.up_names.index(up), self.port_names.index(port)
        except ValueError:
            raise BehaviorLensError(f"edge {name!r} is not in this model's circuit graph") from None
        if not self.valid[u, p]:
            raise BehaviorLensError(f"edge {name!r} runs backwards: {up} comes after {port}")
        return u, p

    def port_node(self, port: int) -> str:
        """The node a port belongs to: ``L3H1`` (query), ``L3KV0`` (key/value), ``L3.mlp``, ``logits``."""
        return self.port_names[port].rsplit(".", 1)[0] if port != self.logits_port else "logits"

    def edges_frame(self) -> pd.DataFrame:
        """One row per edge: upstream and port names, layers and kinds."""
        ups, ports = self.edge_index
        kinds = np.array([n.rsplit(".", 1)[-1] if "." in n else n for n in self.port_names])
        return pd.DataFrame({
            "edge": self.edge_names(ups, ports), "upstream": np.array(self.up_names)[ups],
            "port": np.array(self.port_names)[ports], "up_layer": self.up_layer[ups],
            "port_layer": self.port_layer[ports], "port_kind": kinds[ports], "up": ups, "port_index": ports,
        })
