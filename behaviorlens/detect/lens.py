"""Lens traces: what each layer would answer, read where the model picks its answer.

At ``last`` (the token before the answer's final word) the residual stream leaving every layer
goes through the model's own final norm and unembedding: the *logit lens*. A *tuned lens* first
maps each layer's stream by an affine map fitted, by ridge least squares, to the last layer's
stream on ordinary text (the ``fit`` part of the side-effect data only; the regression form of
Din et al. 2023 "Jump to conclusions" rather than the KL-trained lens of Belrose et al. 2023). Its
maps are fitted as the identity plus a ridge correction, so a layer the text cannot inform stays
the logit lens.

For each layer the trace holds the answer the model gave (its first token): its log-probability,
its rank, and its margin to the best *alternative*, one of the tokens the last layer ranks
highest after the given one (the answers the model weighed itself; no reference answer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..chat import chat_ids
from ..errors import BehaviorLensError
from ..reads import token_states
from ..steering import data
from ..steering.side_effects import reference_part, request_part
from .examples import Examples, read_states

LENSES = ("logit", "tuned")
ALTERNATIVES = 5  # the last layer's top tokens after the given one
RIDGE = 10.0


@dataclass
class TunedLens:
    """Per-layer affine maps ``h -> h @ weight[i] + bias[i]`` into the last layer's stream."""

    layers: list[int]
    weight: np.ndarray  # [layers, d, d]
    bias: np.ndarray  # [layers, d]

    def apply(self, h: np.ndarray, layer: int) -> np.ndarray:
        if layer not in self.layers:
            raise BehaviorLensError(f"the tuned lens has no map for layer {layer}; it has {self.layers}")
        i = self.layers.index(layer)
        return h @ self.weight[i] + self.bias[i]


@dataclass
class LensTrace:
    """Per example and layer (``layers``): ``logp``, ``rank`` (0 = top) and ``margin`` of the
    given answer token (``given``) against the best of ``alternatives``."""

    layers: list[int]
    given: np.ndarray  # [n]
    alternatives: np.ndarray  # [n, k]
    logp: np.ndarray  # [n, L]
    rank: np.ndarray  # [n, L]
    margin: np.ndarray  # [n, L]
    alternative_logp: np.ndarray  # [n, L]: the best alternative's log-probability


def ordinary_text(model: Any, part: str = "fit") -> list[list[int]]:
    """Token sequences of ordinary text of one side-effect part: the reference prose's chunks
    and the ordinary requests as the model meets them."""
    tok = model.tokenizer
    prose = reference_part(list(tok(data.reference_text())["input_ids"]), part)
    requests = [chat_ids(tok, t) for t in request_part(data.neutral_prompts(), part)]
    return prose + requests


def fit_tuned_lens(model: Any, sequences: Sequence[Sequence[int]], layers: Sequence[int] | None = None,
                   alpha: float = RIDGE, batch_size: int = 16) -> TunedLens:
    """Ridge maps from each layer's stream (every token of ``sequences``) to the last layer's."""
    from sklearn.linear_model import Ridge

    last = model.sites.n_layers - 1
    layers = list(range(model.sites.n_layers)) if layers is None else [int(x) for x in layers]
    if not sequences:
        raise BehaviorLensError("the tuned lens needs ordinary text to fit on; got no sequences")
    states = token_states(model, list(sequences), sorted(set(layers) | {last}), batch_size)
    target = np.concatenate(states[last]).astype(np.float64)
    d = target.shape[1]
    weight, bias = np.zeros((len(layers), d, d), np.float32), np.zeros((len(layers), d), np.float32)
    for i, layer in enumerate(layers):
        X = np.concatenate(states[layer]).astype(np.float64)
        fit = Ridge(alpha=alpha).fit(X, target - X)  # identity plus a correction the ridge shrinks
        weight[i] = np.eye(d) + fit.coef_.T
        bias[i] = fit.intercept_
    return TunedLens(layers, weight, bias)


@torch.inference_mode()
def _log_softmax(model: Any, hidden: np.ndarray) -> torch.Tensor:
    h = torch.as_tensor(hidden, dtype=model.dtype, device=model.device)
    return torch.log_softmax(model.sites.logits_from_hidden(model.hf, h).float(), dim=-1).cpu()


def lens_trace(model: Any, examples: Examples, lens: str | TunedLens = "logit", layers: Sequence[int] | None = None,
               k: int = ALTERNATIVES, batch_size: int = 16) -> LensTrace:
    """The lens trace of every example at ``last`` (see the module doc). ``lens``: ``"logit"``
    or a :class:`TunedLens`."""
    if isinstance(lens, str) and lens != "logit":
        raise BehaviorLensError(f"unknown lens {lens!r}: pass 'logit' or a fitted TunedLens")
    if model.remote == "ndif":
        raise BehaviorLensError("the lens reads the unembedding, which only NDIF holds for this model; "
                                "run with --remote local or on a local copy")
    last = model.sites.n_layers - 1
    layers = list(range(model.sites.n_layers)) if layers is None else [int(x) for x in layers]
    if (examples.positions["last"] < 0).any():
        raise BehaviorLensError("the lens reads position 'last', which some examples lack")
    read = sorted(set(layers) | {last})
    states = read_states(model, examples, read, ["last"], batch_size)["last"]  # [n, read, d]
    given = np.array([seq[int(s)] for seq, s in zip(examples.sequences, examples.answer_start)], dtype=np.int64)
    n = len(examples)
    final = _log_softmax(model, states[:, read.index(last)])
    masked = final.clone()
    masked[torch.arange(n), torch.as_tensor(given)] = -torch.inf
    alternatives = masked.topk(k, dim=-1).indices.numpy()
    out = {name: np.zeros((n, len(layers))) for name in ("logp", "rank", "margin", "alternative_logp")}
    for j, layer in enumerate(layers):
        h = states[:, read.index(layer)]
        if isinstance(lens, TunedLens) and layer != last:
            h = lens.apply(h, layer)
        lp = _log_softmax(model, h)
        g = lp[torch.arange(n), torch.as_tensor(given)]
        alt = lp.gather(1, torch.as_tensor(alternatives)).max(dim=1).values
        out["logp"][:, j] = g.numpy()
        out["rank"][:, j] = (lp > g[:, None]).sum(dim=1).numpy()
        out["alternative_logp"][:, j] = alt.numpy()
        out["margin"][:, j] = (g - alt).numpy()
    return LensTrace(layers, given, alternatives, **out)
