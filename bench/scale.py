"""What a big model costs: every stage on randomly initialized Llama-shaped models at real widths,
on the CPU with 1-3 layers, fitted against the layer count and extrapolated to 32 and 80 layers.

    .venv/bin/python bench/scale.py --out results/scale                  # the full bench (resumable)
    .venv/bin/python bench/scale.py --quick --out /tmp/scale-quick       # smoke check, tiny widths, < 2 min
    .venv/bin/python bench/scale.py --shapes llama3-70b --layers 2 --stages measure eap --out results/scale
    .venv/bin/python bench/scale.py --fit-only --out results/scale       # refit and reprint measured.csv

Shapes (real widths, intermediate sizes and head counts; ``--layers`` decoder layers, default 1 2 3):

- ``llama2-7b``: d_model 4096, 32 heads, 32 KV heads, intermediate 11008 (real: 32 layers, vocab 32000);
- ``llama3-8b``: d_model 4096, 32 heads, 8 KV heads, intermediate 14336 (real: 32 layers, vocab 128256);
- ``llama3-70b``: d_model 8192, 64 heads, 8 KV heads, intermediate 28672 (real: 80 layers, vocab 128256);
- ``tiny`` (``--quick``): d_model 64, 4 heads, 2 KV heads: the same code paths in seconds (``--quick``
  runs ``QUICK_STAGES`` at 1 and 2 layers; name others with ``--stages``).

Every model is built from a transformers ``LlamaConfig`` with random weights in bfloat16 (the dtype
a 7B-70B study runs in on a GPU; this CPU runs bf16 matmuls on AMX), SDPA attention, untied
embeddings, and the embedded default's tokenizer (SmolLM2, vocabulary 49152), so that the built-in
families and side-effect sets tokenize with their chat template. The vocabulary does not depend on
depth; the estimate swaps the measured embedding and unembedding for the real vocabulary's
(``VOCAB_NOTE``). A random model has no behavior, so the worker turns off the refusal of steer eval
and steer train to score a pull whose CI includes 0 (``allow_no_behavior``): the forwards are the same.

Measuring. A worker subprocess per (shape, layers) builds the model once and runs the stages in turn
(``--fresh-process``: one process per stage). Before each stage it runs one warm-up and one timed
bare forward (both sides of the stage's pairs, one batch, plain transformers, the last column's
logits only), then the stage, timed in wall seconds. Peak memory is the process's resident-set
high-water mark (Linux ``VmHWM``, reset by writing 5 to ``/proc/self/clear_refs`` just before the
stage) minus the resident set just before it: the working memory the stage adds to the loaded
model, whose weights are counted separately and exactly. The worker runs with
``MALLOC_MMAP_THRESHOLD_`` at 1 MiB, so that every tensor buffer is its own mapping and goes back to
the system when freed: a stage cannot hide its peak in memory an earlier one left in the heap. A
guard in the parent kills a worker when the machine's available memory falls under ``--min-free``
GiB (a failure row, not a number); a stage that raises is a failure row with the exception's last
line and the project file:line it came from.

Fitting (``fits.csv``). Wall seconds on a shared machine drift with other processes' load, so the
bare forward per (shape, layers) is the median over that size's stages of their bare forward's
seconds per token, and a stage's ratio is its seconds over that pooled bare forward. Fits against
layers L, least squares, each with R^2, RMS residual and the straight line's R^2: the bare forward's
seconds per token, a + bL per shape; working memory, a + bL, and from 3 depths also a + bL + cL^2
for the stages with a possible term in L^2 (exact patching replays from each patched layer to the
end; the edge graph has ~L^2 edges), whose c says whether memory grows faster than the layers; the
ratio to a bare forward, a + b/L for the stages whose work is per layer (a fixed part amortized over
more layers), a + bL for those whose work per layer grows with depth (a + b/L where noise gave that
line a negative slope).

Extrapolating (``extrapolated.csv``): the fits at 32 and 80 layers, an estimate marked as one.
Memory = the real model's bf16 weights + the working memory's line (for EAP plus its edge-indexed
arrays at the real depth, computed from the graph: bytes at 1-3 layers, too small to fit), times
the default batch's rows over the measured ones where they differ (``DEFAULT_ROWS_FACTOR``),
against one 80 GB GPU (90% usable).
CPU seconds = the ratio's fit x the bare forward's fit; GPU seconds by ``GPU_NOTE``, a lower bound.
A stage measured at one depth keeps its measured working memory and ratio, and says so.

Writes ``measured.csv`` (one row per stage and size; finished rows are skipped on a rerun),
``fits.csv`` and ``extrapolated.csv`` to ``--out`` and prints them.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

GiB = 2**30
SHAPES: dict[str, dict[str, Any]] = {
    "llama2-7b": {"config": {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 32,
                             "intermediate_size": 11008}, "real_layers": 32, "real_vocab": 32000},
    "llama3-8b": {"config": {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
                             "intermediate_size": 14336}, "real_layers": 32, "real_vocab": 128256},
    "llama3-70b": {"config": {"hidden_size": 8192, "num_attention_heads": 64, "num_key_value_heads": 8,
                              "intermediate_size": 28672}, "real_layers": 80, "real_vocab": 128256},
    # --quick: tiny widths, the same code paths
    "tiny": {"config": {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                        "intermediate_size": 128}, "real_layers": 32, "real_vocab": 32000},
}
QUICK_SHAPES = ("tiny",)
QUICK_STAGES = ("measure", "collect", "patch head", "attribution head", "eap")  # --quick's default: seconds each
FULL_SHAPES = ("llama2-7b", "llama3-70b", "llama3-8b")  # the order they run in
FAMILY = "capitals_opinion"
STEER_GROUPS = ("head ablation", "knockout")  # the steer-train candidates this bench builds
SIDE_EFFECT_ITEMS = 4  # requests, factual pairs, context-use pairs and reference chunks kept per part

# stage -> (pairs, growth model of the fits, what it runs). Every stage runs on 8 pairs (16 prompts, one
# batch: measure, collect, steer eval and detect batch 16 pairs by default, so their default batch holds
# twice the rows measured here), steer train on 13 (it judges on at least 6 pairs no patching saw).
STAGES: dict[str, tuple[int, str, str]] = {
    "measure": (8, "linear", "measure(): the metric on all 3 sides"),
    "collect": (8, "linear", "collect(): resid_post at every layer, last token, both sides"),
    "patch resid_pre": (8, "quadratic", "patch(): exact, resid_pre, every layer x position, 64 copies per forward"),
    "patch head": (8, "quadratic", "patch(): exact, every head of every layer, last token, 64 copies per forward"),
    "attribution resid_pre": (8, "linear", "attribution_patch(): resid_pre, every layer x position, IG 4 steps, pair_batch 8"),
    "attribution head": (8, "linear", "attribution_patch(): every head, last token, IG 4 steps, pair_batch 8"),
    "eap": (8, "quadratic", "edge_attribution(): EAP over every edge of the graph, pair_batch 8"),
    "steer eval": (8, "linear", ("evaluate_steering(): a mean-difference vector at the middle layer, 3 sides, "
                                 f"1 random control, side effects cut to {SIDE_EFFECT_ITEMS} items per set")),
    "steer train": (13, "linear", (f"choose_edit(): candidate groups {', '.join(STEER_GROUPS)}; 1 pair patched "
                                   f"for the evidence, refits 0, side effects cut to {SIDE_EFFECT_ITEMS} items per set")),
    "detect": (8, "linear", ("train_detector(): instructed_lie (instructed labels), default layers, 5 folds, "
                             f"{SIDE_EFFECT_ITEMS} ordinary requests with greedy answers for the threshold")),
}
DEFAULT_ROWS_FACTOR = {"measure": 2, "collect": 2, "steer eval": 2, "detect": 2}  # default batch / measured batch
VOCAB_NOTE = ("the models use the embedded tokenizer's vocabulary (49152); the estimate replaces the measured "
              "embedding + unembedding (2 x 49152 x d_model) by the real vocabulary's in the weights; the working "
              "memory of the unembedded columns is left as measured (stages unembed only the columns they read)")
MMAP_THRESHOLD = 1 << 20  # glibc: every allocation of 1 MiB or more is its own mapping, unmapped when freed
GPU_TFLOPS = 400.0  # assumed sustained bf16 throughput of one H100 on a bare forward (~40% of its 989 dense peak)
GPU_NOTE = (f"gpu_s_est = ratio to a bare forward x the bare forward's FLOPs (2 x parameters x tokens) / "
            f"{GPU_TFLOPS:.0f} TFLOP/s (an assumed sustained bf16 rate on one H100; not measured: no GPU here). "
            "A lower bound: it scales the whole stage with the forward, so the stage's CPU-side work (probe fits, "
            "bootstraps, Python per batch) is taken to shrink as the forward does, which it does not")
GPU_BYTES = 80 * GiB  # one 80 GB GPU (an H100 holds 81,559 MiB)
GPU_HEADROOM = 0.9  # of it usable (CUDA context, allocator fragmentation)


# -- the worker: one (shape, layers) in a fresh process, its stages in turn ----------------------------------


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1))


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set


class Peak:
    """Wall seconds and peak resident-set growth (VmHWM after minus VmRSS before) of a block."""

    def __enter__(self) -> Peak:  # noqa: PYI034 (Python 3.10 has no typing.Self)
        gc.collect()
        self.before = _status_kib("VmRSS") * 1024
        _reset_peak()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.growth = _status_kib("VmHWM") * 1024 - self.before


def build_model(shape: str, layers: int) -> Any:
    """A random bf16 Llama of ``shape`` with ``layers`` layers and the embedded tokenizer."""
    import torch
    import transformers as T

    from behaviorlens.model import Model, _wrap, default_model_folder
    from behaviorlens.sites import SiteMap

    folder = default_model_folder()
    tokenizer = T.AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    config = T.LlamaConfig(**SHAPES[shape]["config"], num_hidden_layers=layers, vocab_size=len(tokenizer),
                           max_position_embeddings=2048, tie_word_embeddings=False,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf = T.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    return Model(name=f"random-{shape}-L{layers}", lm=_wrap(hf, tokenizer), tokenizer=tokenizer,
                 sites=SiteMap.from_config(config))


def small_side_effects(model: Any, part: str) -> Any:
    """The built-in side-effect data of ``part``, cut to ``SIDE_EFFECT_ITEMS`` items per set."""
    from behaviorlens.steering import data as builtin
    from behaviorlens.steering.side_effects import CLAIM_RECALL, SideEffectData

    text = " ".join(builtin.reference_text().split()[:400])
    se = SideEffectData(model, part, requests=SIDE_EFFECT_ITEMS, reference=text)
    se.reference = se.reference[:SIDE_EFFECT_ITEMS]
    se.factual = se.factual.subset(range(min(SIDE_EFFECT_ITEMS, len(se.factual))))
    recall = [i for i, p in enumerate(se.context) if p.variables.get("style") == CLAIM_RECALL][:SIDE_EFFECT_ITEMS // 2]
    other = [i for i, p in enumerate(se.context) if p.variables.get("style") != CLAIM_RECALL][:SIDE_EFFECT_ITEMS // 2]
    se.context = se.context.subset(sorted(recall + other))
    se.recall = np.array([p.variables.get("style") == CLAIM_RECALL for p in se.context])
    return se


def prepare_stage(model: Any, stage: str, pairs: int) -> tuple[Callable[[], Any], Any, str]:
    """The stage as a no-argument call, the pairs its bare forward runs, and a note."""
    from behaviorlens import load_family, measure
    from behaviorlens.prompts import ContrastSet

    base = load_family(FAMILY).render(model.tokenizer)
    cset = ContrastSet.concat([base] * (pairs // len(base) + 1), name=base.name).subset(range(pairs)) \
        if pairs > len(base) else base.subset(range(pairs))
    L = model.sites.n_layers
    if stage == "measure":
        return (lambda: measure(model, cset, batch_size=16)), cset, ""
    if stage == "collect":
        from behaviorlens.probing import collect

        return (lambda: collect(model, cset, ("resid_post",), ("last",), batch_size=16, progress=False)), cset, ""
    if stage in ("patch resid_pre", "patch head"):
        from behaviorlens.patching import patch

        site = stage.split()[1]
        return (lambda: patch(model, cset, site, progress=False)), cset, ""
    if stage in ("attribution resid_pre", "attribution head"):
        from behaviorlens.patching import attribution_patch

        site = stage.split()[1]
        return (lambda: attribution_patch(model, cset, site, progress=False)), cset, ""
    if stage == "eap":
        from behaviorlens.circuits.attribution import edge_attribution
        from behaviorlens.circuits.graph import Graph

        return (lambda: edge_attribution(model, cset, steps=1, pair_batch=8)), cset, f"{Graph.of(model).n_edges} edges"
    if stage == "steer eval":
        from behaviorlens.steering import evaluate_steering, train_vector

        edit = train_vector(model, cset, [L // 2])
        data = small_side_effects(model, "report")
        return (lambda: evaluate_steering(model, edit, cset, controls=1, side_effects=data)), cset, "vector"
    if stage == "steer train":
        from behaviorlens.steering import choose_edit

        evidence = one_pair_evidence(model, cset)
        data = small_side_effects(model, "select")

        def run() -> Any:
            choice = choose_edit(model, cset, evidence, groups=STEER_GROUPS, side_effects=data, refits=0,
                                 outside_limits=True)
            return len(choice.candidates)
        return run, cset, ""
    if stage == "detect":
        from behaviorlens.detect.examples import chat_examples
        from behaviorlens.detect.run import label_set
        from behaviorlens.detect.train import train_detector
        from behaviorlens.steering import data as builtin
        from behaviorlens.steering.side_effects import request_part

        lie = load_family("instructed_lie").render(model.tokenizer)
        lie = lie.subset(range(min(pairs, len(lie))))
        labelled = label_set(model, lie, labels="instructed")
        chat = chat_examples(model, request_part(builtin.neutral_prompts(), "select")[:SIDE_EFFECT_ITEMS])
        return (lambda: train_detector(model, labelled.examples, labelled.contrast, chat)), lie, ""
    raise SystemExit(f"scale: unknown stage {stage!r}")


def one_pair_evidence(model: Any, cset: Any) -> Any:
    """Exact head and last-token residual patching of one pair (the others leave the chooser its
    judging pairs): the first pair whose evidence ``PatchEvidence.arrival_layer`` accepts (it raises
    IndexError when no residual cell reaches 0.8 x the largest, as one pair on a random model can give)."""
    from behaviorlens.patching import patch
    from behaviorlens.patching.results import PatchEvidence

    for i in range(len(cset)):
        patched = cset.subset([i])
        evidence = PatchEvidence(pd.concat([patch(model, patched, "head", progress=False).means(),
                                            patch(model, patched, "resid_pre", positions=["last"],
                                                  progress=False).means()]), {p.row for p in patched})
        try:
            evidence.arrival_layer()
            return evidence
        except IndexError:
            continue
    raise SystemExit("no pair gives patching evidence the chooser accepts")


def allow_no_behavior() -> None:
    """A random model has no behavior (its pull's CI includes 0), which steer eval and steer train
    refuse to score; the refusal is turned off here, in this process only: the forwards are the same."""
    from behaviorlens.steering import choose, evaluate

    evaluate.require_behavior = choose.require_behavior = lambda *a, **k: None


def worker(shape: str, layers: int, stages: Sequence[str], pairs: Sequence[int], threads: int) -> list[dict[str, Any]]:
    """Build the model once, then for each stage: prepare, warm up, time a bare forward and the stage."""
    import torch

    torch.set_num_threads(threads)
    allow_no_behavior()
    start = time.perf_counter()
    model = build_model(shape, layers)
    built = time.perf_counter() - start
    common: dict[str, Any] = {
        "shape": shape, "layers": layers, "threads": threads, "dtype": "bfloat16", "build_s": built,
        "params": sum(p.numel() for p in model.hf.parameters()),
        "weights_bytes": sum(p.numel() * p.element_size() for p in model.hf.parameters()),
        "vocab": model.config.vocab_size, "rss_model_bytes": _status_kib("VmRSS") * 1024,
        "fresh_process": len(stages) == 1,
    }
    out = []
    for stage, n in zip(stages, pairs):
        row = {**common, "stage": stage, "pairs": n}
        try:
            fn, cset, note = prepare_stage(model, stage, n)
            rows = [p.tokens[s] for p in cset for s in ("positive", "negative")]
            batch = model.batch(rows)
            row["bare_tokens"] = int(batch.attention_mask.sum())
            row["bare_rows"], row["bare_width"] = batch.input_ids.shape

            def bare(batch: Any = batch) -> None:
                with torch.inference_mode():
                    model.hf(**batch.inputs(), use_cache=False, logits_to_keep=1)

            bare()  # warm-up: first-use costs of kernels and the allocator
            with Peak() as b:
                bare()
            row["bare_s"], row["bare_mem_bytes"] = b.seconds, b.growth
            with Peak() as s:
                result = fn()
            row["stage_s"], row["stage_mem_bytes"] = s.seconds, s.growth
            row["ratio_to_bare"] = s.seconds / b.seconds
            row["note"] = note or (f"{result} candidates" if isinstance(result, int) else "")
            row["status"] = "ok"
        except Exception as err:  # noqa: BLE001 (a failure at real widths is a finding: it goes in the table)
            traceback.print_exc()
            row.update(status="failed", error=describe_error(err))
        out.append(row)
        print(f"scale worker: {shape} L={layers} {stage}: {row['status']}", file=sys.stderr, flush=True)
    return out


def describe_error(err: BaseException) -> str:
    """The exception's last line and the innermost project file:line it passed through."""
    root = Path(__file__).resolve().parents[1]
    tb = traceback.extract_tb(err.__traceback__)
    where = next((f"{Path(fr.filename).resolve().relative_to(root)}:{fr.lineno}" for fr in reversed(tb)
                  if str(root) in str(Path(fr.filename).resolve()) and ".venv" not in fr.filename), "")
    where = where or (f"{tb[-1].filename}:{tb[-1].lineno}" if tb else "")
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first} ({where})"


# -- the parent: runs, guards, fits, extrapolates ------------------------------------------------


def mem_available() -> int:
    text = Path("/proc/meminfo").read_text()
    return int(re.search(r"MemAvailable:\s+(\d+)", text).group(1)) * 1024


def run_worker(shape: str, layers: int, stages: Sequence[str], pairs: Sequence[int], threads: int,
               min_free: float, timeout: float) -> list[dict[str, Any]]:
    """One worker subprocess under the free-memory guard; a killed or crashed one gives failed rows."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = Path(f.name)
    cmd = [sys.executable, __file__, "--worker", json.dumps({"shape": shape, "layers": layers, "stages": list(stages),
                                                              "pairs": list(pairs), "threads": threads,
                                                              "result": str(result)})]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}  # large blocks go back to the OS when freed
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
        start, low, why = time.perf_counter(), mem_available(), ""
        while proc.poll() is None:
            low = min(low, mem_available())
            if low < min_free * GiB:
                why = f"killed by the memory guard: available memory {low / GiB:.1f} GiB < --min-free {min_free} GiB"
            elif time.perf_counter() - start > timeout:
                why = f"killed after --timeout {timeout:.0f} s"
            if why:
                proc.kill()
                proc.wait()
                break
            time.sleep(0.2)
        log.seek(0)
        lines = [x for x in log.read().splitlines() if x.strip()]
    rows = json.loads(result.read_text()) if result.exists() and result.stat().st_size else []
    result.unlink(missing_ok=True)
    wall = time.perf_counter() - start
    done = {r["stage"] for r in rows}
    for stage, n in zip(stages, pairs):
        if stage not in done:
            rows.append({"shape": shape, "layers": layers, "stage": stage, "pairs": n, "status": "failed",
                         "error": why or (lines[-1] if lines else f"worker exit {proc.returncode}")})
    for r in rows:
        r["worker_wall_s"], r["min_available_gib"] = wall, low / GiB
    return rows


TERMS = {"a+bL": lambda L: [np.ones_like(L), L], "a+bL+cL^2": lambda L: [np.ones_like(L), L, L**2],
         "a+b/L": lambda L: [np.ones_like(L), 1 / L]}


def fit(layers: np.ndarray, values: np.ndarray, model: str) -> dict[str, Any]:
    """Least squares of ``values`` against layers L: ``linear`` a + bL, ``quadratic`` a + bL + cL^2 (a + bL
    below 3 depths), ``amortized`` a + b/L (a ratio whose fixed part spreads over more layers).
    Coefficients, R^2 and RMS residual, and the straight line's R^2 beside them."""
    L = layers.astype(float)

    def lsq(form: str) -> tuple[np.ndarray, float, float]:
        X = np.stack(TERMS[form](L), 1)
        coef, *_ = np.linalg.lstsq(X, values, rcond=None)
        resid = values - X @ coef
        ss = float(((values - values.mean()) ** 2).sum())
        r2 = 1 - float((resid**2).sum()) / ss if ss > 0 else 1.0
        return coef, r2, float(np.sqrt((resid**2).mean()))
    _, r2_lin, _ = lsq("a+bL")
    form = {"linear": "a+bL", "amortized": "a+b/L",
            "quadratic": "a+bL+cL^2" if len(np.unique(L)) >= 3 else "a+bL"}[model]
    coef, r2, rms = lsq(form)
    coef = list(coef) + [0.0] * (3 - len(coef))
    return {"a": float(coef[0]), "b": float(coef[1]), "c": float(coef[2]), "r2": r2, "rms": rms,
            "r2_linear": r2_lin, "model": form, "points": len(L)}


def predict(f: Any, layers: float) -> float:
    """A fit's value at ``layers``."""
    get = (lambda k: f[k]) if isinstance(f, dict) else (lambda k: getattr(f, k))
    terms = TERMS[get("model")](np.array([float(layers)]))
    return float(sum(c * t[0] for c, t in zip((get("a"), get("b"), get("c")), terms)))


def bare_per_token(measured: pd.DataFrame) -> pd.DataFrame:
    """Per (shape, layers): the median over that size's stages of their bare forward's seconds per token
    (every stage ran one just before it, so the median is steadier than any one on a shared machine)."""
    ok = measured[measured["status"] == "ok"]
    per = (ok.bare_s / ok.bare_tokens).groupby([ok["shape"], ok["layers"]]).median()
    return per.rename("s_per_token").reset_index()


def with_pooled_ratio(measured: pd.DataFrame) -> pd.DataFrame:
    """The finished rows with ``pooled_ratio``: stage seconds over the size's pooled bare forward
    (:func:`bare_per_token` x the stage's bare tokens), steadier than the ratio to the one bare
    forward run just before the stage."""
    ok = measured[measured["status"] == "ok"].copy()
    per = bare_per_token(measured).set_index(["shape", "layers"])["s_per_token"]
    ok["pooled_bare_s"] = [per[(s, L)] * t for s, L, t in zip(ok["shape"], ok["layers"], ok["bare_tokens"])]
    ok["pooled_ratio"] = ok["stage_s"] / ok["pooled_bare_s"]
    return ok


def fits_table(measured: pd.DataFrame) -> pd.DataFrame:
    """The fits against layers: per shape the bare forward's seconds per token (linear); per (shape,
    stage) working memory in GiB (linear; for the stages with an L^2 term also quadratic, from 3
    depths, as ``stage_mem_gib_quadratic``: the estimate uses the line, plus for EAP the edge-indexed
    arrays computed from the graph, too small at 1-3 layers to fit) and the ratio
    to a bare forward (:func:`with_pooled_ratio`; amortized a + b/L for the stages whose work is per
    layer, linear for those whose work per layer grows with depth, amortized where noise gave that line
    a negative slope)."""
    out = []
    bare = bare_per_token(measured)
    for shape, g in bare.groupby("shape", sort=False):
        if g.layers.nunique() >= 2:
            f = fit(g.layers.to_numpy(), g.s_per_token.to_numpy(float), "linear")
            out.append({"shape": shape, "stage": "bare forward", "quantity": "bare_s_per_token", **f,
                        "measured_at": " ".join(str(x) for x in g.layers)})
    ok = with_pooled_ratio(measured)
    for (shape, stage), g in ok.groupby(["shape", "stage"], sort=False):
        g = g.sort_values("layers")
        if g.layers.nunique() < 2:
            continue
        growth = STAGES[stage][1]
        L = g.layers.to_numpy()
        fitted = [("stage_mem_gib", g.stage_mem_bytes / GiB, "linear"),
                  ("ratio_to_bare", g.pooled_ratio, "amortized" if growth == "linear" else "linear")]
        if growth == "quadratic" and g.layers.nunique() >= 3:  # the curvature, to look for an L^2 term
            fitted.append(("stage_mem_gib_quadratic", g.stage_mem_bytes / GiB, "quadratic"))
        for qty, values, model in fitted:
            f = fit(L, values.to_numpy(float), model)
            if qty == "ratio_to_bare" and model == "linear" and f["b"] < 0:  # noise: a growing ratio fell
                f = {**fit(L, values.to_numpy(float), "amortized"), "model": "a+b/L"}
            out.append({"shape": shape, "stage": stage, "quantity": qty, **f,
                        "measured_at": " ".join(str(x) for x in L)})
    return pd.DataFrame(out)


def real_weights_bytes(shape: str, layers: int, vocab: int) -> float:
    """bf16 bytes of the real model (untied embedding and unembedding)."""
    c = SHAPES[shape]["config"]
    d, h, kv, ff = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["intermediate_size"]
    hd = d // h
    per_layer = d * h * hd * 2 + d * kv * hd * 2 + 3 * d * ff + 2 * d
    return 2.0 * (layers * per_layer + 2 * vocab * d + d)


def real_edges(shape: str, layers: int) -> int:
    """Edges of the real model's circuit graph."""
    from behaviorlens.circuits.graph import Graph

    c = SHAPES[shape]["config"]
    return Graph(layers, c["num_attention_heads"], c["num_key_value_heads"]).n_edges


def eap_quadratic_bytes(shape: str, layers: int, pairs: int) -> float:
    """The edge-indexed arrays of ``edge_attribution`` (they grow with layers^2): the per-pair effect of
    every edge (float64, [edges, pairs]) and one chunk's [upstream, ports, rows] products (float32)."""
    from behaviorlens.circuits.graph import Graph

    c = SHAPES[shape]["config"]
    g = Graph(layers, c["num_attention_heads"], c["num_key_value_heads"])
    rows = 2 * min(pairs, 8)  # pair_batch 8, both sides' prompts
    return g.n_edges * pairs * 8.0 + g.n_up * g.n_ports * rows * 4.0


def verdict(total: float, weights: float) -> str:
    """Where a stage of this size runs: one 80 GB GPU, device_map over several, or NDIF."""
    usable = GPU_BYTES * GPU_HEADROOM
    if total <= usable:
        return "one 80 GB GPU"
    n = int(np.ceil(total / usable))
    return f"device_map over {n} x 80 GB, or NDIF" if n <= 8 else "NDIF (more than 8 x 80 GB)"


def extrapolate(measured: pd.DataFrame, fits: pd.DataFrame) -> pd.DataFrame:
    """Each stage of each shape at its real depth: estimated memory, ratio to a bare forward, CPU and
    GPU seconds. CPU seconds = the ratio's fit x the bare forward's (seconds per token, fitted per shape,
    times the stage's bare tokens). A stage measured at one depth only keeps its measured working
    memory and ratio (``fit`` says so)."""
    rows = []
    ok = measured[measured["status"] == "ok"]
    for (shape, stage), g in ok.groupby(["shape", "stage"], sort=False):
        sel = fits[(fits["shape"] == shape) & (fits["stage"] == stage)] if not fits.empty else fits
        f = {r.quantity: r for r in sel.itertuples()}
        bare = fits[(fits["shape"] == shape) & (fits["quantity"] == "bare_s_per_token")] if not fits.empty else fits
        if bare.empty:
            continue
        Lr, vocab = SHAPES[shape]["real_layers"], SHAPES[shape]["real_vocab"]
        m = g.sort_values("layers").iloc[-1]
        bare_s = predict(bare.iloc[0], Lr) * m.bare_tokens
        if f:
            work = max(predict(f["stage_mem_gib"], Lr), 0.0) * GiB
            if stage == "eap":  # the edge-indexed arrays grow with L^2 but are bytes at 1-3 layers: add them
                work += eap_quadratic_bytes(shape, Lr, int(m.pairs)) - eap_quadratic_bytes(shape, 0, int(m.pairs))
            ratio = predict(f["ratio_to_bare"], Lr)
            mem = f["stage_mem_gib"]
            growth = f"{mem.b:+.3g} GiB/L" + (f" {mem.c:+.3g} GiB/L^2" if mem.c else "")
            how = f"memory {mem.model}, ratio {f['ratio_to_bare'].model}; layers {mem.measured_at}"
            if ratio < 1:  # every stage runs at least one forward: a fit below 1 is noise
                ratio, how = 1.0, how + "; ratio floored at 1"
        else:
            work, ratio = m.stage_mem_bytes, m.ratio_to_bare
            growth, how = "not fitted", f"one depth (L={m.layers}): its memory and ratio held"
        weights = real_weights_bytes(shape, Lr, vocab)
        factor = DEFAULT_ROWS_FACTOR.get(stage, 1)
        total = weights + work * factor
        flops = 2 * (weights / 2) * m.bare_tokens
        rows.append({
            "model": shape, "layers": Lr, "stage": stage, "pairs": int(m.pairs), "fit": how,
            "weights_gib": weights / GiB, "working_gib_est": work / GiB,
            "working_gib_default_batch_est": work * factor / GiB, "total_gib_est": total / GiB,
            "memory_growth": growth, "ratio_to_bare_est": ratio, "cpu_s_est": ratio * bare_s,
            "bare_cpu_s_est": bare_s, "gpu_s_est": ratio * flops / (GPU_TFLOPS * 1e12), "fits": verdict(total, weights),
            "edges": real_edges(shape, Lr) if stage == "eap" else np.nan,
            "edge_arrays_gib": eap_quadratic_bytes(shape, Lr, int(m.pairs)) / GiB if stage == "eap" else np.nan,
        })
    return pd.DataFrame(rows)


def superlinear(fits: pd.DataFrame) -> pd.DataFrame:
    """The quadratic fits of working memory (stages with an L^2 term, 3+ depths): c, and c L^2's share at the real depth."""
    q = fits[fits["quantity"] == "stage_mem_gib_quadratic"].copy()
    if q.empty:
        return q
    Lr = q["shape"].map(lambda s: SHAPES[s]["real_layers"])
    q["quadratic_share_at_real_depth"] = q.c * Lr**2 / (q.a + q.b * Lr + q.c * Lr**2)
    return q[["shape", "stage", "quantity", "a", "b", "c", "r2", "r2_linear", "quadratic_share_at_real_depth"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/scale")
    ap.add_argument("--quick", action="store_true",
                    help="smoke check: the tiny shape, layers 1 2, 1 thread, the stages in QUICK_STAGES, in this process")
    ap.add_argument("--shapes", nargs="+", choices=sorted(SHAPES))
    ap.add_argument("--layers", nargs="+", type=int, help="default 1 2 3")
    ap.add_argument("--stages", nargs="+", choices=list(STAGES),
                    help="default: every stage (--quick: QUICK_STAGES; steer eval, steer train and detect spend "
                         "10-40 s each preparing their data even on tiny widths)")
    ap.add_argument("--pairs", type=int, help="override every stage's pair count")
    ap.add_argument("--threads", type=int, help="torch threads per worker (default 2; --quick: 1)")
    ap.add_argument("--fresh-process", action="store_true",
                    help="one process per stage (default: every stage of a (shape, layers) in one process)")
    ap.add_argument("--min-free", type=float, default=2.0, help="GiB of available memory the guard keeps")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per worker")
    ap.add_argument("--rerun", action="store_true", help="rerun rows already in measured.csv")
    ap.add_argument("--fit-only", action="store_true", help="refit and print measured.csv, run nothing")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        w = json.loads(args.worker)
        rows = worker(w["shape"], w["layers"], w["stages"], w["pairs"], w["threads"])
        Path(w["result"]).write_text(json.dumps(rows, default=float))
        return

    stages = args.stages or (list(QUICK_STAGES) if args.quick else list(STAGES))
    threads = args.threads or (1 if args.quick else 2)
    shapes = list(args.shapes or (QUICK_SHAPES if args.quick else FULL_SHAPES))
    layer_counts = args.layers or ([1, 2] if args.quick else [1, 2, 3])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "measured.csv"
    measured = pd.read_csv(path) if path.exists() else pd.DataFrame(columns=["shape", "layers", "stage", "status"])
    order = sorted(((shape, L) for shape in shapes for L in layer_counts),
                   key=lambda x: (x[1] > 2, shapes.index(x[0]), x[1]))  # two depths of every shape first
    for shape, L in [] if args.fit_only else order:
        if True:
            key = (measured["shape"] == shape) & (measured["layers"] == L)
            done = set(measured[key & (measured["status"] == "ok")]["stage"])
            todo = [st for st in stages if args.rerun or st not in done]
            pairs = [args.pairs or STAGES[st][0] for st in todo]
            groups = [([t], [n]) for t, n in zip(todo, pairs)] if args.fresh_process else [(todo, pairs)]
            for stages, ns in groups:
                if not stages:
                    continue
                if args.quick:  # a smoke check: in this process, no second start-up (no memory guard either)
                    rows = worker(shape, L, stages, ns, threads)
                else:
                    rows = run_worker(shape, L, stages, ns, threads, args.min_free, args.timeout)
                for row in rows:
                    msg = (f"{row['stage_s']:.2f} s ({row['ratio_to_bare']:.1f}x bare), "
                           f"+{row['stage_mem_bytes'] / GiB:.2f} GiB" if row["status"] == "ok" else row["error"])
                    print(f"scale: {shape} L={L} {row['stage']}: {msg}", file=sys.stderr, flush=True)
                gone = key & measured["stage"].isin(stages)
                measured = pd.concat([measured[~gone], pd.DataFrame(rows)], ignore_index=True)
                measured.to_csv(path, index=False)
    if not (measured["status"] == "ok").any():
        raise SystemExit(f"scale: nothing measured in {path}")
    report(measured, out)


def summary(ext: pd.DataFrame) -> pd.DataFrame:
    """One row per stage, one column per model: "working GiB | x bare | where" (the estimate)."""
    cell = ext.apply(lambda r: f"{r.working_gib_default_batch_est:.2g} | {r.ratio_to_bare_est:.3g}x | "
                               f"{r.fits.split(',')[0]}", axis=1)
    table = ext.assign(cell=cell).pivot(index="stage", columns="model", values="cell")
    weights = ext.groupby("model").weights_gib.first().map(lambda w: f"weights {w:.1f} GiB")
    table.loc["(weights, bf16, real vocab)"] = weights
    order = [st for st in STAGES if st in table.index] + ["(weights, bf16, real vocab)"]
    return table.reindex(order).fillna("not measured")


def code_version() -> str:
    """The commit the bench ran on and how many package files differed from it (read-only git)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--short", "behaviorlens"], cwd=root, capture_output=True,
                               text=True, check=False).stdout.splitlines()
    except OSError:
        return "unknown (no git)"
    return f"{head}, {len(dirty)} files under behaviorlens/ differ from it" if dirty else head


def report(measured: pd.DataFrame, out: Path) -> None:
    """Fit, extrapolate, print and write the three tables."""
    fits = fits_table(measured)
    fits.to_csv(out / "fits.csv", index=False)
    ext = extrapolate(measured, fits) if not fits.empty else pd.DataFrame()
    ext.to_csv(out / "extrapolated.csv", index=False)
    fmt = {"float_format": lambda x: f"{x:.4g}", "index": False}
    print(f"code: {code_version()}")
    print("STAGES (capitals_opinion pairs unless said):")
    for stage, (pairs, _, what) in STAGES.items():
        print(f"  {stage}: {pairs} pairs; {what}")
    with pd.option_context("display.width", 250, "display.max_colwidth", 80, "display.max_rows", 500):
        cols = ["shape", "layers", "stage", "pairs", "status", "bare_tokens", "bare_s", "stage_s", "ratio_to_bare",
                "stage_mem_bytes", "weights_bytes"]
        m = measured.reindex(columns=cols).copy()
        m["stage_mem_gib"] = m.pop("stage_mem_bytes") / GiB
        m["weights_gib"] = m.pop("weights_bytes") / GiB
        print("MEASURED (CPU, bfloat16, working memory = peak VmHWM minus VmRSS before the stage):")
        print(m.to_string(**fmt))
        failed = measured[measured["status"] != "ok"]
        for r in failed.itertuples():
            print(f"FAILED {r.shape} L={r.layers} {r.stage}: {r.error}")
        if not fits.empty:
            print("\nFITS against layers L (least squares; r2_linear: the straight line's R^2):")
            print(fits.to_string(**fmt))
            sl = superlinear(fits)
            if not sl.empty:
                print("\nCURVATURE of working memory (a + bL + cL^2 from 3+ depths; c > 0 would be super-linear):")
                print(sl.to_string(**fmt))
        if not ext.empty:
            print("\nESTIMATE (extrapolated from the fits, not measured) at the real depth; weights at the real vocab:")
            print(ext.to_string(**fmt))
            print("\nSUMMARY (estimate): working GiB at the default batch | ratio to a bare forward | where it runs")
            print(summary(ext).to_string())
            print(f"\n{VOCAB_NOTE}.\n{GPU_NOTE}.")
    print(f"\nwrote {out / 'measured.csv'}, {out / 'fits.csv'}, {out / 'extrapolated.csv'}")


if __name__ == "__main__":
    main()
