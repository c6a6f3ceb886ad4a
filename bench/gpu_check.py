"""GPU check: every stage on a Llama-2-7B-shaped model in bf16, and the demo's stages on CUDA vs CPU.

    .venv/bin/python bench/gpu_check.py [--device cuda] [--quick] [--out results/gpu_check]
                                        [--pairs 8] [--repeats 3] [--new-tokens 32] [--eap-pairs N]

Part A (``7b``; ``tiny`` with ``--quick``). A randomly initialized model of Llama-2-7B's shape
(hidden 4096, 32 layers, 32 heads, intermediate 11008, vocab 32000; built on the device in
bfloat16, nothing downloads) and a word-level tokenizer over its vocabulary: ids from 1000 on
are the words of the package's built-in data (so that the built-in families and side-effect sets
steer train and detect read tokenize into distinct ids), the others ``w<id>``, with a plain chat
template. ``--pairs`` contrast pairs of about 45 tokens, random filler tokens around one slot
token in which the sides differ. Each stage is timed as the median of ``--repeats`` runs after a
warm-up (``once``: one run, no warm-up; the earlier stages warmed the kernels), as a ratio to
one bare forward of one side of the pairs (``--pairs`` rows) measured in the same run, with its
peak memory on CUDA (``peak_gib``: ``torch.cuda.max_memory_allocated`` since the stage began,
weights included), its set-up seconds outside the timing (``prep_s``) and the forwards it ran
per call (``forwards``: top-level calls, each generation step one; ``passes`` and ``tokens``:
runs through layer 0, the circuit stages' split forwards included, replays that start at a later
layer not):

- capture: probe collection, ``resid_post`` and ``head`` at every layer, last token, both sides;
- exact patching: ``resid_pre`` at every layer and position, and every head of 4 layers;
- attribution: ``resid_pre`` and ``head`` at every layer, 1 step;
- steered generation: ``--new-tokens`` greedy tokens of the pairs with a steering vector (and
  unsteered, for comparison);
- EAP: ``edge_attribution`` over every edge of the graph (1,592,881 on the 7B shape), on the pairs
  (``--eap-pairs``: fewer), ``EAP_PAIR_BATCH`` pairs per split forward;
- exact edges: ``exact_edges`` on ``EXACT_EDGES`` edges of ``sample_edges`` (the 10 largest |EAP|,
  10 others at random), same pairs; ``pearson``: its agreement with EAP over them (``agreement``);
- steer train (once): ``choose_edit``, what ``steer train`` runs, with the candidate groups
  ``STEER_GROUPS`` only (head ablation and knockout: 6 candidates on the tiny model), on 13 pairs of
  the same random family with a neutral slot token (the first ``--pairs`` are part A's pairs;
  choose_edit judges on 6 pairs no patching saw), evidence from exact head and last-token residual
  patching of one pair, no refits, side effects cut to ``SIDE_EFFECT_ITEMS`` items per set, the
  refusal to score a model without behavior turned off (a random model has none), as bench/scale.py;
- detect (once): ``train_detector`` on ``--pairs`` pairs of ``instructed_lie`` (a detector needs lie
  labels, which the random pairs lack) at ``DETECT_LAYERS`` spread layers (its default, every
  other layer, is 16 layers on the 7B, each fitted on the CPU), ``SIDE_EFFECT_ITEMS`` ordinary
  requests with greedy answers for the threshold.

A stage that raises (out of memory, say) is a ``FAILED`` row and the others still run; the exit
status is then 1.

Part B (``default``). The demo's stages on the embedded default model (float32) on ``--device``
and on the CPU in the same run, on the first ``--pairs`` pairs of ``capitals_opinion``: measure
(the metric per side and pair), probe (collected activations, a mean-difference probe's direction
and scores) and exact patching (``resid_pre`` at 6 layers); printed as the largest absolute
difference and the scale of the CPU figures.

``--quick`` swaps the 7B shape for a tiny Llama (a smoke test, e.g. ``--device cpu --quick``).
``--skip-default`` runs part A only. Prints one table and writes it to ``--out``/gpu_check.csv.

Budget on one H100: under 8 minutes. Not yet run on a GPU; an estimate of about 3 minutes, from
the forwards each stage runs (counted by the smoke test; the 7B forward is 13.5 GFLOP per token,
taken at 300 TFLOP/s, and a small-batch forward or generation step at ~30 ms of kernel launches):
building the model ~15 s; the original stages ~65 s, most of it exact ``resid_pre`` patching
(11,520 patched copies, 180 forwards of 64 copies replayed from the patched layer, ~12 s a call,
4 calls); EAP ~4 s (4 calls) and exact edges ~8 s; steer train ~15 s with its set-up (about 110
forwards and 21k tokens per choose_edit, plus ~30 forwards of evidence and continuations);
detect ~40 s (a few forwards; the rest its fits on the CPU, 4 layers of 4096 features); part B
~15 s; start-up ~15 s. Peak memory: EAP's split forward and gradients at 4 pairs per chunk,
~20 GiB beside the 13.5 GiB of weights (bench/scale.py's fit gives ~19 GiB at 8). The CPU smoke
test (``--device cpu --quick``, part B included) took 36-38 s wall here (two runs, 2 shared cores; 32-34 s after
start-up), 14-15 s of it steer train and detect.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scale import (  # bench/ is this script's path
    SIDE_EFFECT_ITEMS,
    allow_no_behavior,
    one_pair_evidence,
    small_side_effects,
)

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
        "intermediate_size": 128, "vocab_size": 32000}  # the 7B vocabulary: one tokenizer
PROMPT_WORDS = 44  # filler words around the slot: prompts of about 48 tokens
STEER_GROUPS = ("head ablation", "knockout")  # steer train's candidate groups: two cheap ones (6 candidates here)
STEER_PAIRS = 13  # choose_edit judges on at least 6 pairs that no patching saw: 1 patched + 6 fit + 6 judged
EAP_PAIR_BATCH = 4  # pairs per split forward in EAP and exact edge patching (memory: ~rows x columns x ports x d)
DETECT_LAYERS = 4  # layers the detector sweeps (its default, every other layer, is 16 on the 7B: its fits run on the CPU)
EXACT_EDGES = 20  # edges exact_edges checks: the 10 largest |EAP| and 10 others at random


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


CHAT_TEMPLATE = ("{% for m in messages %}w3 {{ m['role'] }} w4 {{ m['content'] }} w6 {% endfor %}"
                 "{% if add_generation_prompt %}w3 assistant w4 {% endif %}")
FIRST_WORD_ID = 1000  # real words take ids from here on (w0..w999 keep theirs: the random family's slot and answers)


def data_words() -> list[str]:
    """Every word (as the whitespace pre-tokenizer splits text) of the package's built-in data and of
    its sources' string literals: the built-in families, side-effect sets and detector questions."""
    from tokenizers import pre_tokenizers

    import behaviorlens

    split = pre_tokenizers.Whitespace().pre_tokenize_str
    root = Path(behaviorlens.__file__).parent
    words = {"system", "user", "assistant"}
    for f in sorted(root.rglob("*")):
        if f.is_file() and f.suffix in (".yaml", ".yml", ".txt", ".json", ".py"):
            words |= {w for w, _ in split(f.read_text(errors="ignore"))}
    return sorted(w for w in words if not (w[0] == "w" and w[1:].isdigit()))


def timed_once(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of one call, no warm-up (for the costly stages; the earlier stages warmed the kernels)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def word_tokenizer(vocab: int) -> Any:
    """A whitespace word-level tokenizer of ``vocab`` ids: w0 pads and stands for unknown words, w1
    ends, w2 begins; ids from ``FIRST_WORD_ID`` on are the words of the built-in data
    (:func:`data_words`), the rest w<id>; with a plain chat template: the built-in
    families, side-effect sets and detector examples that steer train and detect read tokenize into
    distinct ids, as on a real tokenizer, with the vocabulary of Llama-2."""
    import transformers as T
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    words = data_words()
    if FIRST_WORD_ID + len(words) > vocab:
        raise SystemExit(f"gpu_check: {len(words)} data words do not fit ids {FIRST_WORD_ID}..{vocab - 1}")
    names = [f"w{i}" for i in range(vocab)]  # one name per id (transformers rebuilds the vocabulary from them)
    names[FIRST_WORD_ID:FIRST_WORD_ID + len(words)] = words
    table = {name: i for i, name in enumerate(names)}
    tok = Tokenizer(models.WordLevel(table, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = T.PreTrainedTokenizerFast(tokenizer_object=tok)
    specials = {"pad_token": "w0", "eos_token": "w1", "bos_token": "w2", "unk_token": "w0"}
    tokenizer.add_special_tokens({k: AddedToken(v, single_word=True, special=True) for k, v in specials.items()})
    tokenizer.padding_side = "left"
    tokenizer.chat_template = CHAT_TEMPLATE
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


def random_family(pairs: int, tokenizer: Any, neutral: bool = False) -> PromptFamily:
    """``pairs`` rows of random filler tokens (ids 100 and up, as the tokenizer names them) around a one-token
    slot (w40 / w41, with ``neutral`` also w42 for steer train's no-pressure side), answers w50 / w51. The
    rows do not depend on ``pairs``: a longer family starts with the same rows."""
    rng = np.random.default_rng(0)
    names = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))

    def words(n: int) -> str:
        return " ".join(names[i] for i in rng.integers(100, len(names), n))

    rows = [{"a": words(PROMPT_WORDS // 2 + i % 3), "b": words(PROMPT_WORDS // 2 - 4)} for i in range(pairs)]
    slot = {"positive": "w40", "negative": "w41", **({"neutral": "w42"} if neutral else {})}
    return PromptFamily.from_dict({
        "name": "random", "chat": False, "user": "w5 {{ a }} {{ s }} {{ b }} w7",
        "valence": {"s": slot}, "answers": {"matching": " w50", "not_matching": " w51"}, "rows": rows,
    })


class Counter:
    """Forwards of the model while a stage runs: ``forwards`` (calls of the top-level module, each
    generation step one), ``passes`` (calls of layer 0's MLP: every run through the layers, the
    circuit stages' split forwards included) and ``tokens`` (rows x columns through that MLP)."""

    def __init__(self, model: Model) -> None:
        self.forwards = self.passes = self.tokens = 0
        mlp = model.hf.model.layers[0].mlp  # a Llama
        self.handles = [model.hf.register_forward_pre_hook(self._top), mlp.register_forward_pre_hook(self._mlp)]

    def _top(self, module: Any, args: tuple) -> None:
        self.forwards += 1

    def _mlp(self, module: Any, args: tuple) -> None:
        self.passes += 1
        self.tokens += int(args[0].shape[:-1].numel()) if args and torch.is_tensor(args[0]) else 0

    def reset(self) -> None:
        self.forwards = self.passes = self.tokens = 0

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def steer_train_stage(model: Model, args: argparse.Namespace) -> tuple[Callable[[], Any], str, list[int]]:
    """choose_edit (what ``steer train`` runs) on ``STEER_PAIRS`` rows of the random family with a neutral
    side (its first ``--pairs`` are part A's pairs), ``STEER_GROUPS`` only, evidence from exact head and
    last-token residual patching of one pair, no refits, side effects cut to ``SIDE_EFFECT_ITEMS`` items."""
    from behaviorlens.steering import choose_edit

    allow_no_behavior()
    cset = random_family(max(args.pairs, STEER_PAIRS), model.tokenizer, neutral=True).render(model.tokenizer)
    evidence = one_pair_evidence(model, cset)
    data = small_side_effects(model, "select")
    found: list[int] = []

    def run() -> None:
        choice = choose_edit(model, cset, evidence, groups=STEER_GROUPS, side_effects=data, refits=0,
                             outside_limits=True)
        found[:] = [len(choice.candidates)]
    return run, (f"choose_edit, groups {' + '.join(STEER_GROUPS)}, {len(cset)} pairs (1 patched), refits 0, "
                 f"side effects {SIDE_EFFECT_ITEMS} per set"), found


def detect_stage(model: Model, args: argparse.Namespace) -> tuple[Callable[[], Any], str]:
    """train_detector at ``DETECT_LAYERS`` spread layers on ``--pairs`` pairs of instructed_lie (instructed
    labels: a detector needs lie labels, which the random pairs lack), rendered with the chat template, and ``SIDE_EFFECT_ITEMS``
    ordinary requests with the model's greedy answers for the threshold (as bench/scale.py)."""
    from behaviorlens.detect.examples import chat_examples
    from behaviorlens.detect.run import label_set
    from behaviorlens.detect.train import train_detector
    from behaviorlens.steering import data as builtin
    from behaviorlens.steering.side_effects import request_part

    lie = load_family("instructed_lie").render(model.tokenizer)
    lie = lie.subset(range(min(args.pairs, len(lie))))
    labelled = label_set(model, lie, labels="instructed")
    chat = chat_examples(model, request_part(builtin.neutral_prompts(), "select")[:SIDE_EFFECT_ITEMS])
    n = model.sites.n_layers
    layers = list(range(0, n, max(1, n // DETECT_LAYERS)))[:DETECT_LAYERS]
    return (lambda: train_detector(model, labelled.examples, labelled.contrast, chat, layers=layers),
            f"train_detector, instructed_lie {len(lie)} pairs, layers {layers}, 5 folds, {SIDE_EFFECT_ITEMS} requests")


def part_a(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Every stage as a multiple of a bare forward, with its peak memory on CUDA."""
    from behaviorlens.circuits import Graph, agreement, edge_attribution, exact_edges, sample_edges

    part = "tiny" if args.quick else "7b"
    start = time.perf_counter()
    model = random_llama(TINY if args.quick else SEVEN_B, device)
    built = time.perf_counter() - start
    print(f"{part}: built {model.name} on {device} in {built:.1f} s", file=sys.stderr, flush=True)
    cset = random_family(args.pairs, model.tokenizer).render(model.tokenizer)
    eap_set = cset.subset(range(min(args.eap_pairs or args.pairs, len(cset))))
    n_layers = model.sites.n_layers
    batch = model.batch([p.tokens["negative"] for p in cset])
    gen_inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    vector = train_vector(model, cset, [n_layers // 2])
    head_layers = list(range(0, n_layers, max(1, n_layers // 4)))[:4]
    counter = Counter(model)
    rows: list[dict] = []
    base: float | None = None
    eap: dict[str, Any] = {}

    def bare() -> None:
        with torch.inference_mode():
            model.hf(**batch.inputs(), use_cache=False)

    def generate(steered: bool) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode(), (steer(model, vector, 4.0) if steered else nullcontext()):
                model.hf.generate(**gen_inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                  do_sample=False, pad_token_id=model.pad_id)
        return run

    def run_eap() -> None:
        eap["scores"] = edge_attribution(model, eap_set, steps=1, pair_batch=EAP_PAIR_BATCH)

    def run_exact() -> None:
        eap["exact"] = exact_edges(model, eap_set, eap["edges"], pair_batch=EAP_PAIR_BATCH)

    def make_eap() -> tuple[Callable[[], None], str]:
        return run_eap, (f"edge_attribution, {len(eap_set)} pairs, pair_batch {EAP_PAIR_BATCH}, "
                         f"{Graph.of(model).n_edges} edges")

    def make_exact() -> tuple[Callable[[], None], str]:
        if "scores" not in eap:
            raise RuntimeError("no EAP scores to sample edges from (the EAP stage failed)")
        eap["edges"] = sample_edges(eap["scores"], n_top=EXACT_EDGES // 2, n_random=EXACT_EDGES - EXACT_EDGES // 2)
        return run_exact, f"exact_edges on {len(eap['edges'])} edges (sample_edges: half top |EAP|), {len(eap_set)} pairs"

    def agree() -> str:
        _, stats = agreement(eap["scores"], eap["exact"], eap["edges"])
        eap["pearson"], eap["spearman"] = stats["pearson"], stats["spearman"]
        return f"pearson {stats['pearson']:.3f}, spearman {stats['spearman']:.3f}"

    # name -> (make: () -> (fn, what[, found]), repeats: the median of that many after a warm-up, or 0: once)
    stages: dict[str, tuple[Callable[[], tuple], int]] = {
        "bare forward": (lambda: (bare, f"{len(cset)} rows x {batch.input_ids.shape[1]} tokens"), args.repeats),
        "capture": (lambda: (lambda: collect(model, cset, ("resid_post", "head"), ("last",), batch_size=len(cset),
                                             progress=False), "resid_post + head, every layer, both sides"),
                    args.repeats),
        "exact patching resid_pre": (lambda: (lambda: patch(model, cset, "resid_pre", progress=False),
                                              "every layer x position"), args.repeats),
        "exact patching head": (lambda: (lambda: patch(model, cset, "head", head_layers, progress=False),
                                         f"every head of layers {head_layers}"), args.repeats),
        "attribution resid_pre+head": (lambda: (lambda: (attribution_patch(model, cset, "resid_pre", steps=1,
                                                                           progress=False),
                                                         attribution_patch(model, cset, "head", steps=1,
                                                                           progress=False)),
                                                "every layer (x head), 1 step"), args.repeats),
        "generation unsteered": (lambda: (generate(False), f"{args.new_tokens} tokens"), args.repeats),
        "generation steered": (lambda: (generate(True), f"{args.new_tokens} tokens, vector at L{n_layers // 2}"),
                               args.repeats),
        "eap (every edge)": (make_eap, args.repeats),
        "exact edges (sampled)": (make_exact, args.repeats),
        "steer train": (lambda: steer_train_stage(model, args), 0),
        "detect": (lambda: detect_stage(model, args), 0),
    }
    for name, (make, repeats) in stages.items():
        row = {"part": part, "stage": name, "seconds": np.nan, "ratio_to_bare": np.nan, "peak_gib": np.nan,
               "prep_s": np.nan, "forwards": np.nan, "passes": np.nan, "tokens": np.nan, "pearson": np.nan,
               "max_abs_diff": np.nan, "cpu_scale": np.nan, "what": ""}
        try:
            prep = time.perf_counter()
            made = make()
            fn, row["what"] = made[0], made[1]
            row["prep_s"] = time.perf_counter() - prep
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            counter.reset()
            seconds = timed(fn, device, repeats) if repeats else timed_once(fn, device)
            calls = repeats + 1 if repeats else 1
            row.update(seconds=seconds, forwards=counter.forwards / calls, passes=counter.passes / calls,
                       tokens=counter.tokens / calls)
            if device.type == "cuda":
                row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            base = seconds if base is None else base
            row["ratio_to_bare"] = seconds / base
            if len(made) > 2 and made[2]:
                row["what"] += f"; {made[2][0]} candidates"
            if name == "exact edges (sampled)":
                row["what"] = f"{row['what']}; {agree()}"
                row["pearson"] = eap["pearson"]
            print(f"{part}: {name}: {seconds:.3f} s ({seconds / base:.1f}x bare; prep {row['prep_s']:.1f} s)",
                  file=sys.stderr, flush=True)
        except Exception as err:  # one stage failing (e.g. out of memory) leaves the others' rows
            if base is None:
                raise
            traceback.print_exc()
            row["what"] = f"FAILED {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            print(f"{part}: {name}: {row['what']}", file=sys.stderr, flush=True)
        rows.append(row)
        if device.type == "cuda" and str(row["what"]).startswith("FAILED"):  # after the except: its frames are gone
            gc.collect()
            torch.cuda.empty_cache()
    counter.remove()
    if device.type == "cuda":
        peaks = [r["peak_gib"] for r in rows if not np.isnan(r["peak_gib"])]
        rows.append({"part": part, "stage": "peak memory (GiB)", "seconds": max(peaks, default=np.nan),
                     "ratio_to_bare": np.nan, "max_abs_diff": np.nan, "cpu_scale": np.nan,
                     "what": "torch.cuda.max_memory_allocated, the largest stage's (weights included)"})
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
    ap.add_argument("--eap-pairs", type=int, help="pairs of the EAP and exact-edge stages (default --pairs)")
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
    failed = table[table["what"].astype(str).str.startswith("FAILED")]
    if len(failed):
        raise SystemExit(f"gpu_check: {len(failed)} stage(s) failed: {', '.join(failed['stage'])}")


if __name__ == "__main__":
    main()
