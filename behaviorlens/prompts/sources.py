"""Where a contrast set comes from: a built-in family, a family YAML, or a dataset file.

Every command and experiment key that takes a family takes any of these. A dataset file's
format is recognised from its content or named:

- ``caa``: CAA's A/B JSON list (``question``, ``answer_matching_behavior``, ...);
- ``mwe``: Anthropic's model-written evaluations JSONL (the same fields, one object a line);
- ``sycophancy-eval``: sycophancy-eval's ``answer.jsonl`` (``prompt``, ``base``, ``metadata``);
- ``open-ended``: CAA's open-ended JSON (questions only): prompts for ``steer generate``, not pairs.

``limit`` keeps the first N rows; ``split`` keeps a deterministic part (``train`` or ``test``,
``test_fraction`` of the pairs with ``seed``), recorded with the results.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import BehaviorLensError
from . import loaders
from .contrast import ContrastSet
from .family import load_family

FORMATS = ("caa", "mwe", "sycophancy-eval", "open-ended")
DATASET_SUFFIXES = (".json", ".jsonl")
SOURCE_KEYS = {"path", "format", "limit", "split", "test_fraction", "seed", "behavior"}


@dataclass(frozen=True)
class Source:
    """A family or dataset and which of its pairs to use."""

    path: str
    format: str | None = None  # None: a family, or a dataset format recognised from the content
    limit: int | None = None
    split: str | None = None  # None, "train" or "test"
    test_fraction: float = 0.5
    seed: int = 0
    behavior: str | None = None  # for A/B datasets; default: the file's folder name or "sycophancy"

    def __post_init__(self) -> None:
        if self.format is not None and self.format not in FORMATS:
            raise BehaviorLensError(f"{self.path}: unknown format {self.format!r}; formats are {', '.join(FORMATS)}")
        if self.split not in (None, "train", "test"):
            raise BehaviorLensError(f"{self.path}: split is 'train' or 'test', not {self.split!r}")
        if self.limit is not None and self.limit < 1:
            raise BehaviorLensError(f"{self.path}: limit must be at least 1, got {self.limit}")
        if not 0 < self.test_fraction < 1:
            raise BehaviorLensError(f"{self.path}: test_fraction must be in (0, 1), got {self.test_fraction}")

    @property
    def is_dataset(self) -> bool:
        return self.format is not None or Path(self.path).suffix in DATASET_SUFFIXES

    def record(self) -> dict[str, Any]:
        """What the results record about where the pairs came from."""
        return {k: v for k, v in asdict(self).items() if v is not None}


def source_from(spec: str | dict | Source, where: str = "family") -> Source:
    """A :class:`Source` from a name or path, or an experiment's mapping (``path`` plus options).
    Environment variables in a path are expanded (``${CAA_DATASETS}/test/...``)."""
    if isinstance(spec, Source):
        return spec
    if isinstance(spec, str):
        return Source(_expand(spec, where))
    if not isinstance(spec, dict) or "path" not in spec:
        raise BehaviorLensError(f"{where}: a family is a name, a path, or a mapping with 'path' (and "
                                f"{', '.join(sorted(SOURCE_KEYS - {'path'}))})")
    unknown = sorted(set(spec) - SOURCE_KEYS)
    if unknown:
        raise BehaviorLensError(f"{where}: unknown key {unknown[0]!r}; keys are {', '.join(sorted(SOURCE_KEYS))}")
    return Source(**{**spec, "path": _expand(spec["path"], where)})


def _expand(path: str, where: str) -> str:
    expanded = os.path.expandvars(path)
    if "$" in expanded:
        name = expanded[expanded.index("$"):].split("/")[0].strip("${}")
        raise BehaviorLensError(f"{where}: {path} needs the environment variable {name} (set it to the folder "
                                "that holds the dataset)")
    return expanded


def read_text(path: str | Path) -> str:
    """A UTF-8 text file's contents; a file that cannot be read is one line naming it."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise BehaviorLensError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise BehaviorLensError(f"cannot read {path}: {err.strerror}") from None


def dataset_format(path: str | Path) -> str:
    """The format of a dataset file, recognised from its first record."""
    path = Path(path)
    text = read_text(path)
    stripped = text.lstrip()
    if not stripped:
        raise BehaviorLensError(f"{path}: empty dataset")
    kind = "json list" if stripped.startswith("[") else "jsonl"
    try:
        records = json.loads(text) if kind == "json list" else [json.loads(stripped.splitlines()[0])]
    except json.JSONDecodeError as err:
        raise BehaviorLensError(f"{path} line {err.lineno}: invalid JSON ({err.msg})") from None
    if not records:
        raise BehaviorLensError(f"{path}: empty dataset")
    first = records[0]
    if not isinstance(first, dict):
        raise BehaviorLensError(f"{path} line 1: a record must be a JSON object")
    if {"prompt", "base", "metadata"} <= set(first):
        return "sycophancy-eval"
    if "answer_matching_behavior" in first:
        return "caa" if kind == "json list" else "mwe"
    if set(first) == {"question"}:
        return "open-ended"
    raise BehaviorLensError(
        f"{path} line 1: not a known dataset (fields {sorted(first)}); expected CAA or model-written "
        "evaluation A/B records (question, answer_matching_behavior, answer_not_matching_behavior) or "
        "sycophancy-eval records (prompt, base, metadata)"
    )


def check_source(source: Source) -> None:
    """Fail now, without a model, on a family or dataset that cannot load."""
    if source.is_dataset:
        if not Path(source.path).is_file():
            raise BehaviorLensError(f"dataset file {source.path} does not exist")
        fmt = source.format or dataset_format(source.path)
        if fmt == "open-ended":
            raise BehaviorLensError(f"{source.path}: open-ended questions with no answers make no contrast pairs; "
                                    "use them as prompts (steer generate --prompts-file)")
    else:
        load_family(source.path)


def render_source(source: str | Source, tokenizer: Any, require_aligned: bool = True) -> ContrastSet:
    """The contrast set of a family or dataset, limited and split as the source says.

    Dataset rows are rarely token-aligned, so datasets always render with unaligned pairs kept
    (patching refuses the set if it needs alignment).
    """
    source = source_from(source)
    check_source(source)
    if source.is_dataset:
        path = Path(source.path)
        fmt = source.format or dataset_format(path)
        behavior = source.behavior or ("sycophancy" if "sycophancy" in str(path) else path.parent.name or "unspecified")
        if fmt == "caa":
            cset = loaders.load_caa(path, tokenizer, behavior=behavior, limit=source.limit)
        elif fmt == "mwe":
            cset = loaders.load_mwe(path, tokenizer, behavior=behavior, limit=source.limit)
        else:
            cset = loaders.load_sycophancy_eval(path, tokenizer, limit=source.limit)
    else:
        cset = load_family(source.path).render(tokenizer, require_aligned=require_aligned)
        if source.limit is not None:
            cset = cset.subset(range(min(source.limit, len(cset))))
    if source.split is not None:
        train, test = cset.split(source.test_fraction, source.seed)
        cset = train if source.split == "train" else test
    if len(cset) == 0:
        raise BehaviorLensError(f"{source.path}: the selection leaves no pairs")
    return cset


def open_ended_prompts(path: str | Path) -> list[str]:
    """The questions of an open-ended dataset file (CAA's ``test_dataset_open_ended.json``)."""
    path = Path(path)
    if dataset_format(path) != "open-ended":
        raise BehaviorLensError(f"{path}: not an open-ended file (a JSON list of {{question}} objects)")
    return [item["question"] for item in json.loads(path.read_text(encoding="utf-8"))]
