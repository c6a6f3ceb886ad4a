"""GPU check: the stages on a Llama-2-7B-shaped model in bf16, and the demo's stages on CUDA vs CPU.

    .venv/bin/python bench/gpu_check.py [--device cuda] [--quick] [--out results/gpu_check]
                                        [--pairs 8] [--repeats 3] [--new-tokens 32]

Part A (``7b``; ``tiny`` with ``--quick``). A randomly initialized model of Llama-2-7B's shape
(hidden 4096, 32 layers, 32 heads, intermediate 11008, vocab 32000; built on the device in
bfloat16, nothing downloads) and a word-level tokenizer over its vocabulary. ``--pairs``
contrast pairs of about 48 tokens, which differ in one slot token. Timed, each as the median of
``--repeats`` runs after a warm-up, and as a ratio to one bare forward of one side of the pairs
(``--pairs`` rows) measured in the same run:

- capture: probe collection, ``resid_post`` and ``head`` at every layer, last token, both sides;
- exact patching: ``resid_pre`` at every layer and position, and every head of 4 layers;
- attribution: ``resid_pre`` and ``head`` at every layer, 1 step;
- steered generation: ``--new-tokens`` greedy tokens of the pairs with a steering vector (and
  unsteered, for comparison).

Part B (``default``). The demo's stages on the embedded default model (float32) on ``--device``
and on the CPU in the same run, on the first ``--pairs`` pairs of ``capitals_opinion``: measure
(the metric per side and pair), probe (collected activations, a mean-difference probe's direction
and scores) and exact patching (``resid_pre`` at 6 layers); printed as the largest absolute
difference and the scale of the CPU figures.

``--quick`` swaps the 7B shape for a tiny Llama (a smoke test, e.g. ``--device cpu --quick``).
``--skip-default`` runs part A only. Prints one table and writes it to ``--out``/gpu_check.csv.
Budget on one H100: under 8 minutes (not yet run on a GPU; the CPU smoke test takes about 50 s).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from behaviorlens.model import Model, _wrap, load_model
from behaviorlens.patching import attribution_patch, patch
from behaviorlens.probing import collect
from behaviorlens.probing.probes import make_probe
from behaviorlens.prompts import PromptFamily, load_family
from behaviorlens.sites import SiteMap
from behaviorlens.steering import steer, train_vector

SEVEN_B = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
           "intermediate_size": 11008, "vocab_size": 32000}
TINY = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
        "intermediate_size": 128, "vocab_size": 512}
PROMPT_WORDS = 44  # filler words around the slot: prompts of about 48 tokens


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median wall seconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def word_tokenizer(vocab: int) -> Any:
    """A whitespace word-level tokenizer over w0..w{vocab-1} (w0 pads, w1 ends, w2 begins)."""
    import transformers as T
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = T.PreTrainedTokenizerFast(tokenizer_object=tok)
    specials = {"pad_token": "w0", "eos_token": "w1", "bos_token": "w2", "unk_token": "w0"}
    tokenizer.add_special_tokens({k: AddedToken(v, single_word=True, special=True) for k, v in specials.items()})
    tokenizer.padding_side = "left"
    return tokenizer


def random_llama(shape: dict, device: torch.device) -> Model:
    """A randomly initialized Llama of ``shape`` in bfloat16, built directly on ``device``."""
    import transformers as T

    config = T.LlamaConfig(**shape, max_position_embeddings=512)
    torch.manual_seed(0)
    with torch.device(device):
        hf = T.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    if next(hf.parameters()).dtype != torch.bfloat16:
        raise SystemExit(f"gpu_check: the random model was built in {next(hf.parameters()).dtype}, not bfloat16")
    tokenizer = word_tokenizer(config.vocab_size)
    return Model(name="random-llama-7b-shape" if shape is SEVEN_B else "random-llama-tiny",
                 lm=_wrap(hf, tokenizer), tokenizer=tokenizer, sites=SiteMap.from_config(config))


def random_family(pairs: int, vocab: int) -> PromptFamily:
    """``pairs`` rows of random filler words around a one-token slot (w40 / w41), answers w50 / w51."""
    rng = np.random.default_rng(0)

    def words(n: int) -> str:
        return " ".join(f"w{i}" for i in rng.integers(100, vocab, n))

    rows = [{"a": words(PROMPT_WORDS // 2 + i % 3), "b": words(PROMPT_WORDS // 2 - 4)} for i in range(pairs)]
    return PromptFamily.from_dict({
        "name": "random", "chat": False, "user": "w5 {{ a }} {{ s }} {{ b }} w7",
        "valence": {"s": {"positive": "w40", "negative": "w41"}},
        "answers": {"matching": " w50", "not_matching": " w51"}, "rows": rows,
    })


def part_a(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Capture, exact patching, attribution and steered generation as multiples of a bare forward."""
    part = "tiny" if args.quick else "7b"
    start = time.perf_counter()
    model = random_llama(TINY if args.quick else SEVEN_B, device)
    built = time.perf_counter() - start
    print(f"{part}: built {model.name} on {device} in {built:.1f} s", file=sys.stderr, flush=True)
    cset = random_family(args.pairs, model.config.vocab_size).render(model.tokenizer)
    n_layers = model.sites.n_layers
    batch = model.batch([p.tokens["negative"] for p in cset])
    gen_inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    vector = train_vector(model, cset, [n_layers // 2])
    head_layers = list(range(0, n_layers, max(1, n_layers // 4)))[:4]

    def bare() -> None:
        with torch.inference_mode():
            model.hf(**batch.inputs(), use_cache=False)

    def generate(steered: bool) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode(), (steer(model, vector, 4.0) if steered else nullcontext()):
                model.hf.generate(**gen_inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                  do_sample=False, pad_token_id=model.pad_id)
        return run

    stages: dict[str, tuple[Callable[[], Any], str]] = {
        "bare forward": (bare, f"{len(cset)} rows x {batch.input_ids.shape[1]} tokens"),
        "capture": (lambda: collect(model, cset, ("resid_post", "head"), ("last",), batch_size=len(cset),
                                    progress=False), "resid_post + head, every layer, both sides"),
        "exact patching resid_pre": (lambda: patch(model, cset, "resid_pre", progress=False),
                                     "every layer x position"),
        "exact patching head": (lambda: patch(model, cset, "head", head_layers, progress=False),
                                f"every head of layers {head_layers}"),
        "attribution resid_pre+head": (lambda: (attribution_patch(model, cset, "resid_pre", steps=1, progress=False),
                                                attribution_patch(model, cset, "head", steps=1, progress=False)),
                                       "every layer (x head), 1 step"),
        "generation unsteered": (generate(False), f"{args.new_tokens} tokens"),
        "generation steered": (generate(True), f"{args.new_tokens} tokens, vector at L{n_layers // 2}"),
    }
    rows, base = [], None
    for name, (fn, what) in stages.items():
        seconds = timed(fn, device, args.repeats)
        base = seconds if base is None else base
        rows.append({"part": part, "stage": name, "seconds": seconds,
                     "ratio_to_bare": seconds / base, "max_abs_diff": np.nan, "cpu_scale": np.nan, "what": what})
        print(f"{part}: {name}: {seconds:.3f} s ({seconds / base:.1f}x bare)", file=sys.stderr, flush=True)
    if device.type == "cuda":
        rows.append({"part": part, "stage": "peak memory (GiB)",
                     "seconds": torch.cuda.max_memory_allocated(device) / 2**30, "ratio_to_bare": np.nan,
                     "max_abs_diff": np.nan, "cpu_scale": np.nan, "what": "torch.cuda.max_memory_allocated"})
    return rows


def demo_figures(model: Model, pairs: int) -> dict[str, np.ndarray]:
    """The demo's stages on the first ``pairs`` pairs of capitals_opinion, as arrays."""
    from behaviorlens.measure import measure

    cset = load_family("capitals_opinion").render(model.tokenizer).subset(range(pairs))
    n_layers = model.sites.n_layers
    table = measure(model, cset).table
    acts = collect(model, cset, ("resid_post",), ("last",), progress=False)
    X, y = acts.features("resid_post", "last", n_layers // 2), acts.labels.numpy()
    probe = make_probe("mean_diff").fit(X, y, acts.pair_ids.numpy())
    layers = list(range(0, n_layers, max(1, n_layers // 6)))[:6]
    frame = patch(model, cset, "resid_pre", layers, progress=False).frame
    return {
        "measure metric": table.metric.to_numpy(),
        "probe activations": acts.get("resid_post", "last").float().numpy(),
        "probe direction": probe.direction,
        "probe scores": probe.score(X),
        "patch patched metric": frame.patched.to_numpy(),
        "patch effect": frame.effect.to_numpy(),
    }


def part_b(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """The demo's stages on the default model on ``device`` against the CPU, same run."""
    figures, seconds = {}, {}
    cpu = torch.device("cpu")
    for where in dict.fromkeys((device, cpu)):  # once when --device is the CPU (a smoke test)
        start = time.perf_counter()
        model = load_model("default", device=str(where))
        figures[where] = demo_figures(model, args.pairs)
        seconds[where] = time.perf_counter() - start
        print(f"default: stages on {where} in {seconds[where]:.1f} s", file=sys.stderr, flush=True)
        del model
    got, want = figures[device], figures[cpu]
    rows = []
    for name, w in want.items():
        g = got[name]
        if g.shape != w.shape:
            raise SystemExit(f"default: {name} has shape {g.shape} on {device}, {w.shape} on the CPU")
        rows.append({"part": "default", "stage": name, "seconds": np.nan, "ratio_to_bare": np.nan,
                     "max_abs_diff": float(np.abs(g.astype(np.float64) - w.astype(np.float64)).max()),
                     "cpu_scale": float(np.abs(w).max()), "what": f"{device} vs cpu, float32"})
    rows.append({"part": "default", "stage": "all stages", "seconds": seconds[device], "ratio_to_bare": np.nan,
                 "max_abs_diff": np.nan, "cpu_scale": np.nan, "what": f"on {device} (cpu: {seconds[cpu]:.1f} s)"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="a tiny Llama instead of the 7B shape (smoke test)")
    ap.add_argument("--out", default="results/gpu_check")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--skip-default", action="store_true", help="part A only")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; use --device cpu --quick for a smoke test")
    start = time.perf_counter()
    rows = part_a(args, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the 7B model is gone with part_a's frame
    if not args.skip_default:
        rows += part_b(args, device)
    table = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "gpu_check.csv", index=False)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"gpu_check on {gpu}, torch {torch.__version__}, {time.perf_counter() - start:.0f} s in all")
    with pd.option_context("display.width", 160, "display.max_colwidth", 60):
        print(table.to_string(index=False, float_format=lambda x: f"{x:.4g}", na_rep=""))
    print(f"wrote {out / 'gpu_check.csv'}")


if __name__ == "__main__":
    main()
