"""Activation collection: chosen sites at named positions for both sides of every pair.

``collect`` runs batched nnsight traces and keeps, for every (site, position), a tensor
``[n_samples, n_layers, d]`` (``head``: ``[n_samples, n_layers, n_heads, head_dim]``). Sample
``2 * i`` is the positive side of pair ``i`` (label 1) and sample ``2 * i + 1`` its negative side
(label 0); ``pair_ids`` keeps the pair of every sample so splits never separate two sides.

With ``out_dir`` every finished batch is written as one safetensors shard next to an index
(model, family, sites, positions, layers, dtype, batch size and a fingerprint of the tokens).
A rerun with the same index reuses the finished shards and computes only the missing ones; a
rerun with a different index discards the old shards and recomputes, with a warning.

Positions: ``last``, ``answer``, a slot name (its last token) or ``<slot>:mean`` (the mean over
the slot's tokens).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..batching import chunks
from ..errors import BehaviorLensError
from ..interventions.server import ReadBatch
from ..io import atomic_write, write_json
from ..prompts.contrast import SIDES, ContrastPair, ContrastSet
from ..reads import read_planned
from ..remote import session_groups
from ..sites import execution_order

INDEX = "index.json"
FORMAT = 1


def _key(site: str, position: str) -> str:
    return f"{site}|{position}"


@dataclass
class Activations:
    """Collected activations, labels (positive = 1, negative = 0) and pair ids."""

    data: dict[tuple[str, str], torch.Tensor]  # (site, position) -> [n, n_layers(, heads), d]
    labels: torch.Tensor  # [n] long
    pair_ids: torch.Tensor  # [n] long
    layers: list[int]
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def sites(self) -> list[str]:
        return list(dict.fromkeys(s for s, _ in self.data))

    @property
    def positions(self) -> list[str]:
        return list(dict.fromkeys(p for _, p in self.data))

    def get(self, site: str, position: str) -> torch.Tensor:
        if (site, position) not in self.data:
            have = ", ".join(f"{s}@{p}" for s, p in self.data)
            raise BehaviorLensError(f"activations have no {site}@{position}; they hold {have}")
        return self.data[(site, position)]

    def features(self, site: str, position: str, layer: int, head: int | None = None) -> np.ndarray:
        """A float32 [n, d] matrix of one layer (and head) for a probe."""
        if layer not in self.layers:
            raise BehaviorLensError(f"activations have no layer {layer}; layers are {self.layers}")
        x = self.get(site, position)[:, self.layers.index(layer)]
        if head is not None:
            x = x[:, head]
        return x.float().numpy()

    @classmethod
    def load(cls, directory: str | Path) -> Activations:
        """Read a finished collection from its folder (index plus every shard)."""
        directory = Path(directory)
        try:
            index = json.loads((directory / INDEX).read_text())
        except (OSError, ValueError) as err:
            raise BehaviorLensError(f"{directory}: no readable activation index ({err})") from None
        n_shards = index["n_shards"]
        missing = [k for k in range(n_shards) if not _shard_path(directory, k).is_file()]
        if missing:
            raise BehaviorLensError(
                f"{directory}: the collection is unfinished (shards {missing[:5]} missing); "
                "rerun collect with the same settings to resume it"
            )
        result, start = _allocate(index), 0
        for k in range(n_shards):
            shard = _read_shard(directory, k)
            _fill(result, shard, start)
            start += shard["labels"].shape[0]
        return result


# -- collection ------------------------------------------------------------------------------


def collect(
    model: Any,
    contrast_set: ContrastSet,
    sites: Sequence[str] = ("resid_post",),
    positions: Sequence[str] = ("last",),
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> Activations:
    """Activations of ``sites`` x ``layers`` at ``positions`` for both sides of every pair.

    ``batch_size`` counts pairs: each forward runs both sides of ``batch_size`` pairs. On a
    remote model the forwards go in as few sessions as its session limits allow.
    """
    sites = list(model.sites.sites(sites))
    positions = list(positions)
    layers = list(range(model.sites.n_layers)) if layers is None else [int(x) for x in layers]
    if not sites or not positions or not layers:
        raise BehaviorLensError("collect needs at least one site, one position and one layer")
    if len(contrast_set) == 0:
        raise BehaviorLensError(f"contrast set {contrast_set.name!r} is empty")
    for layer in layers:
        model.sites.check(sites[0], layer)
    for p in positions:  # validate names on the first pair before running anything
        position_span(contrast_set[0], "positive", p)
    batches = list(chunks(len(contrast_set), batch_size))
    index = {
        "format": FORMAT,
        "model": model.name,
        "family": contrast_set.name,
        "sites": sites,
        "positions": positions,
        "layers": layers,
        "dtype": str(model.dtype).removeprefix("torch."),
        "batch_size": batch_size,
        "n_pairs": len(contrast_set),
        "n_shards": len(batches),
        "fingerprint": _fingerprint(contrast_set, positions),
        "shapes": {_key(s, p): _shape(model, s) for s in sites for p in positions},
    }
    directory = Path(out_dir) if out_dir is not None else None
    if directory is not None:
        _prepare(directory, index)
    result = _allocate(index)
    with tqdm(total=len(batches), desc=f"collect {contrast_set.name}", disable=not progress, unit="batch") as bar:
        todo = []
        for k, idx in enumerate(batches):
            if directory is not None and _shard_path(directory, k).is_file():
                _fill(result, _read_shard(directory, k), 2 * idx.start)
                bar.update()
            else:
                todo.append(k)
        plans = {k: _plan(model, [contrast_set[i] for i in batches[k]], sites, positions, layers) for k in todo}
        row_bytes = sum(int(np.prod(_shape(model, s))) for s in sites) * len(layers) * len(positions) * 4
        returned = [2 * len(batches[k]) * row_bytes for k in todo]
        groups = session_groups(todo, model.session_limits, 0, returned) if model.remote else [[k] for k in todo]
        for group in groups:
            for k, values in zip(group, read_planned(model, [plans[k] for k in group], f"collecting {contrast_set.name}")):
                idx = batches[k]
                shard = _shard(model, values, [contrast_set[i] for i in idx], idx.start, sites, positions, layers)
                if directory is not None:
                    _write_shard(directory, k, shard)
                _fill(result, shard, 2 * idx.start)
                bar.update()
    return result


def _require_finite(values: torch.Tensor, pairs: Sequence, site: str, position: str,
                    layers: Sequence[int]) -> None:
    """Refuse NaN or inf activations, naming the family, row, site, layer and position."""
    bad = ~torch.isfinite(values)
    if bad.any():
        row, layer = (int(i) for i in bad.nonzero()[0][:2])
        pair = pairs[row // 2]
        raise BehaviorLensError(
            f"family {pair.family!r}, row {pair.row}: {site} at layer {layers[layer]}, position "
            f"{position!r} holds NaN or inf (dtype overflow? try --dtype float32)"
        )


def _plan(model: Any, pairs: list[ContrastPair], sites: list[str], positions: list[str],
          layers: list[int]) -> ReadBatch:
    """One forward over both sides of ``pairs`` (positive, negative, positive, ...) that reads
    every site x layer at every position."""
    rows = [(p, side) for p in pairs for side in SIDES]
    batch = model.batch([p.tokens[side] for p, side in rows])
    n, width = len(rows), batch.input_ids.shape[1]
    picks = []
    for name in positions:
        spans = [position_span(p, side, name) for p, side in rows]
        if name.endswith(":mean"):
            w = torch.zeros(n, width)
            for i, (a, b) in enumerate(spans):
                off = int(batch.offsets[i])
                w[i, a + off : b + off] = 1.0 / (b - a)
            picks.append(w.to(model.device))
        else:
            picks.append(batch.columns([b - 1 for _, b in spans]).to(model.device))
    order = execution_order([(s, L) for s in sites for L in layers])
    return ReadBatch(batch.inputs(), [model.sites.ref(site, layer) for site, layer in order], picks,
                     [name.endswith(":mean") for name in positions])


def _shard(model: Any, values: torch.Tensor, pairs: list[ContrastPair], first: int, sites: list[str],
           positions: list[str], layers: list[int]) -> dict[str, torch.Tensor]:
    """One batch's values ([rows, features], as :func:`_plan` read them) as a shard's tensors."""
    n = 2 * len(pairs)
    order = execution_order([(s, L) for s in sites for L in layers])
    saved, start = {}, 0
    for site, layer in order:
        for name in positions:
            size = int(np.prod(_shape(model, site)))
            saved[(site, layer, name)] = values[:, start:start + size].reshape(n, *_shape(model, site))
            start += size
    shard = {}
    for site in sites:
        for name in positions:
            stacked = torch.stack([torch.as_tensor(saved[(site, L, name)]) for L in layers], dim=1)
            _require_finite(stacked, pairs, site, name, layers)
            shard[_key(site, name)] = stacked.detach().cpu().contiguous()
    shard["labels"] = torch.tensor([1 - i % 2 for i in range(n)])
    shard["pair_ids"] = torch.tensor([first + i // 2 for i in range(n)])
    return shard


def position_span(pair: ContrastPair, side: str, name: str) -> tuple[int, int]:
    """Token range whose activations a position reads: its last token, or the whole slot."""
    if name.endswith(":mean"):
        slot = name.removesuffix(":mean")
        if slot in ("last", "answer"):
            raise BehaviorLensError(f"position {name!r}: ':mean' applies to a slot name, not {slot!r}")
        return pair.span(side, slot)
    pos = pair.position(side, name)
    return pos, pos + 1


def _shape(model: Any, site: str) -> list[int]:
    s = model.sites
    return [s.n_heads, s.head_dim] if site == "head" else [s.d_model]


def _fingerprint(contrast_set: ContrastSet, positions: list[str]) -> str:
    """Hash of every token and every span read, so a changed set never reuses old shards."""
    h = hashlib.sha256()
    for p in contrast_set:
        for side in SIDES:
            h.update(json.dumps([p.tokens[side], [position_span(p, side, n) for n in positions]]).encode())
    return h.hexdigest()[:16]


# -- shards and index ------------------------------------------------------------------------


def _shard_path(directory: Path, k: int) -> Path:
    return directory / f"shard-{k:05d}.safetensors"


def _prepare(directory: Path, index: dict) -> None:
    """Keep finished shards only when the stored index equals this run's; else start over."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / INDEX
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        if old == index:
            return
        changed = sorted(k for k in set(index) | set(old or {}) if (old or {}).get(k) != index.get(k))
        warnings.warn(
            f"{directory}: cached activations were collected with different settings "
            f"({', '.join(changed)}); recomputing them",
            stacklevel=3,
        )
    for shard in directory.glob("shard-*.safetensors"):
        shard.unlink()
    write_json(path, index)


def _write_shard(directory: Path, k: int, shard: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    atomic_write(_shard_path(directory, k), lambda tmp: save_file(shard, tmp))


def _read_shard(directory: Path, k: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(_shard_path(directory, k)))


def _allocate(index: dict) -> Activations:
    n = 2 * index["n_pairs"]
    dtype = getattr(torch, index["dtype"])
    data = {
        (s, p): torch.empty(n, len(index["layers"]), *index["shapes"][_key(s, p)], dtype=dtype)
        for s in index["sites"]
        for p in index["positions"]
    }
    meta = {k: index[k] for k in ("model", "family", "sites", "positions", "dtype", "n_pairs")}
    return Activations(
        data=data,
        labels=torch.empty(n, dtype=torch.long),
        pair_ids=torch.empty(n, dtype=torch.long),
        layers=list(index["layers"]),
        meta=meta,
    )


def _fill(result: Activations, shard: dict[str, torch.Tensor], start: int) -> None:
    n = shard["labels"].shape[0]
    result.labels[start : start + n] = shard["labels"]
    result.pair_ids[start : start + n] = shard["pair_ids"]
    for (site, pos), tensor in result.data.items():
        tensor[start : start + n] = shard[_key(site, pos)]
