"""Stage entry points: train (or choose) an edit, evaluate it, generate side by side."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ..errors import BehaviorLensError
from ..io import write_csv, write_json
from .apply import steer
from .edit import Edit
from .evaluate import evaluate_steering
from .plots import dose_response
from .vectors import train_vector

KL_LIMIT = 0.1


def run_steer_train(
    model: Any,
    train_set: Any,
    out_path: str | Path,
    layer: int | None = None,
    method: str = "mean_diff",
    position: str = "last",
    kind: str = "vector",
    from_patching: str | Path | pd.DataFrame | None = None,
    max_accuracy_drop: float | None = None,
) -> dict:
    """Train an edit at ``layer`` (or choose one from a patching result) and save it.

    With ``from_patching`` (or no ``layer``), :func:`~.choose.choose_edit` picks the edit
    kind and site and says why (optionally refusing edits that cost more than
    ``max_accuracy_drop`` of factual accuracy); without a patching result it patches heads itself.
    """
    reason = ""
    if from_patching is not None or layer is None:
        from .choose import choose_edit

        edit, reason = choose_edit(model, train_set, from_patching, accuracy_drop_max=max_accuracy_drop)
    else:
        edit = train_vector(model, train_set, [layer], method, position)
        if kind == "ablate_direction":
            edit = Edit(kind="ablate_direction", vectors={layer: edit.direction}, model=edit.model,
                        family=edit.family, position=position, method=method, d_model=edit.d_model,
                        n_heads=edit.n_heads, head_dim=edit.head_dim, notes=edit.notes)
        elif kind != "vector":
            raise BehaviorLensError(f"steer train --kind is 'vector' or 'ablate_direction', not {kind!r}")
    edit.notes["model_type"] = getattr(model.config, "model_type", "")
    if reason:
        edit.notes["reason"] = reason
    edit.save(out_path)
    return {
        "path": str(out_path), "kind": edit.kind, "edit": edit.describe(), "layers": edit.layers,
        "method": edit.method, "position": edit.position,
        "norm": {str(k): v for k, v in edit.norm.items()}, "reason": reason,
    }


def summarize(frame: pd.DataFrame, kl_limit: float = KL_LIMIT) -> dict:
    """Headline figures: the row removing most shift with neutral KL within the limit."""
    ok = frame[frame.neutral_kl <= kl_limit]
    best = (ok.loc[ok.shift_removed_fraction.idxmax()] if len(ok)
            else frame.loc[frame.neutral_kl.idxmin()])
    out = {
        "best_multiplier": float(best.multiplier),
        "best_layer": int(best.layer),
        "shift_removed_fraction": float(best.shift_removed_fraction),
        "neutral_kl": float(best.neutral_kl),
        "factual_accuracy_change": float(best.factual_accuracy - best.factual_accuracy_unsteered),
        "random_control_shift_removed_fraction": float(best.get("random_shift_removed_fraction", float("nan"))),
        "random_control_shift_removed_fraction_sd": float(best.get("random_shift_removed_fraction_sd", float("nan"))),
        "random_controls": int(best.get("random_controls", 0)),
        "random_control_neutral_kl": float(best.get("random_neutral_kl", float("nan"))),
        "anti_steerable_fraction": float(best.anti_steerable_fraction),
        "perplexity_change": float(best.perplexity - best.perplexity_unsteered),
        "shift_unsteered": float(best.shift_unsteered),
        "kl_limit": kl_limit,
        "within_kl_limit": bool(len(ok)),
        "edit": str(best.edit),
    }
    return out


def run_steer_eval(
    model: Any,
    edit: Edit,
    eval_set: Any,
    multipliers: Sequence[float] = (1.0,),
    layers: Sequence[int] | None = None,
    out_dir: str | Path = "steering",
    batch_size: int = 16,
    seed: int = 0,
    controls: int = 3,
) -> dict:
    """Evaluate an edit; writes steering.csv, steering_pairs.csv, dose_response.png, summary.json."""
    out_dir = Path(out_dir)
    frame = evaluate_steering(model, edit, eval_set, multipliers, layers, batch_size, seed=seed,
                              controls=controls)
    write_csv(out_dir / "steering.csv", frame)
    write_csv(out_dir / "steering_pairs.csv", frame.attrs["pairs"])
    dose_response(frame, out_dir / "dose_response.png")
    summary = summarize(frame) | {"eval_family": eval_set.name, "train_family": edit.family,
                                  "model": model.name}
    write_json(out_dir / "summary.json", summary)
    return summary


def _prompt_ids(model: Any, prompts: Any) -> list[list[int]]:
    if hasattr(prompts, "pairs"):
        return [list(p.tokens["positive"]) for p in prompts]
    tok = model.tokenizer
    out = []
    for text in prompts:
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            ids = tok(text)["input_ids"]
        out.append(list(ids))
    return out


@torch.inference_mode()
def generate_examples(
    model: Any,
    edit: Edit,
    prompts: Any,
    multipliers: Sequence[float] = (-4.0, 0.0, 4.0),
    max_new_tokens: int = 40,
    seed: int = 0,
    positions: str = "all",
) -> pd.DataFrame:
    """Greedy continuations of each prompt (strings or a ContrastSet's behavior side) per multiplier."""
    from contextlib import nullcontext

    ids = _prompt_ids(model, prompts)
    texts = [model.tokenizer.decode(x) for x in ids]
    batch = model.batch(ids)
    rows = []
    for m in multipliers:
        torch.manual_seed(seed)
        ctx = steer(model, edit, m, positions=positions) if m != 0 else nullcontext()
        with ctx:
            out = model.hf.generate(**{k: v for k, v in batch.inputs().items() if k != "position_ids"},
                                    max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=model.pad_id)
        new = out[:, batch.input_ids.shape[1]:]
        for i, text in enumerate(texts):
            rows.append({"prompt": text, "multiplier": float(m),
                         "completion": model.tokenizer.decode(new[i], skip_special_tokens=True)})
    return pd.DataFrame(rows)
