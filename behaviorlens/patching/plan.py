"""What a patching run does: which side runs, which side is patched in, and which cells.

A *cell* is one patch of one pair: a site at one layer, one position (or several patched
together), and for ``head`` one head. Denoising runs the corrupt side and patches clean
activations in; noising runs the clean side and patches corrupt activations in. The metric is
normalized against the run's own side (the *base*) and the side patched in (the *source*):
``(patched - base) / (source - base)``, so 0 means no effect and 1 means the patched run
scores like the source side, in both directions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import BehaviorLensError
from ..prompts.contrast import SIDES, ContrastSet
from ..sites import SITES

DIRECTIONS = ("denoise", "noise")


@dataclass(frozen=True)
class Sides:
    """Which side of the pairs is clean, and which runs (base) and is patched in (source)."""

    clean: str
    corrupt: str
    base: str
    source: str
    direction: str


def resolve_sides(clean: str, direction: str) -> Sides:
    if clean not in SIDES:
        raise BehaviorLensError(f"clean must be one of {', '.join(SIDES)}, got {clean!r}")
    if direction not in DIRECTIONS:
        raise BehaviorLensError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    corrupt = SIDES[1 - SIDES.index(clean)]
    if direction == "denoise":
        return Sides(clean, corrupt, base=corrupt, source=clean, direction=direction)
    return Sides(clean, corrupt, base=clean, source=corrupt, direction=direction)


@dataclass(frozen=True)
class Cell:
    """One patch: pair index, layer, the positions patched together, head (or None)."""

    pair: int
    layer: int
    positions: tuple[int, ...]
    head: int | None = None
    name: str = ""

    @property
    def position(self) -> int:
        """The patched position (-1 when several are patched together)."""
        return self.positions[0] if len(self.positions) == 1 else -1


def check_site(model, site: str, layers: Sequence[int] | None,
               head_indices: Sequence[int] | None) -> tuple[list[int], list[int | None]]:
    """Validate site, layers and head indices; return the layer list and the head index list."""
    if site not in SITES:
        raise BehaviorLensError(f"unknown site {site!r}; sites are {', '.join(SITES)}")
    n = model.sites.n_layers
    layers = list(range(n)) if layers is None else [int(x) for x in layers]
    for layer in layers:
        model.sites.check(site, layer)
    if site == "head":
        chosen = list(range(model.sites.n_heads)) if head_indices is None else [int(h) for h in head_indices]
        for h in chosen:
            model.sites.check(site, layers[0] if layers else 0, h)
        return layers, chosen
    if head_indices is not None:
        raise BehaviorLensError(f"head indices only apply to the 'head' site, not {site!r}")
    return layers, [None]


def default_positions(site: str, positions: str | Sequence[str] | None) -> str | list[str]:
    if positions is None:
        return ["last"] if site == "head" else "all"
    if isinstance(positions, str) and positions != "all":
        return [positions]
    return positions if isinstance(positions, str) else list(positions)


def position_names(cset: ContrastSet, pair: int, side: str) -> dict[int, str]:
    """Names of the positions of one pair: each span's tokens get the span's name."""
    p = cset[pair]
    names: dict[int, list[str]] = {}
    for name, (start, end) in p.spans[side].items():
        for i in range(start, end):
            names.setdefault(i, []).append(name)
    return {i: "/".join(v) for i, v in names.items()}


def make_cells(
    cset: ContrastSet,
    side: str,
    layers: Sequence[int],
    head_indices: Sequence[int | None],
    positions: str | Sequence[str],
) -> list[Cell]:
    """Every (pair, layer, position, head) cell of a sweep, in layer order (``[None]``: no heads)."""
    cells = []
    for layer in layers:
        for i, p in enumerate(cset):
            names = position_names(cset, i, side)
            if positions == "all":
                chosen = [(j, names.get(j, "")) for j in range(len(p.tokens[side]))]
            else:
                seen: dict[int, str] = {}
                for name in positions:
                    seen.setdefault(p.position(side, name), name)
                chosen = sorted(seen.items())
            for j, name in chosen:
                for h in head_indices:
                    cells.append(Cell(i, layer, (j,), h, name))
    return cells
