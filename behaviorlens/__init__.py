"""behaviorlens: find and surgically edit the latent variables behind a model's behavior.

``import behaviorlens`` loads the core (models, sites, batching, prompt families) and the
measure; the other stages load when first used (``run_experiment`` and ``load_experiment``
import the experiment, and with it every stage, on first access)."""

from importlib import import_module
from typing import Any

from .batching import Batch
from .errors import BehaviorLensError
from .measure import measure
from .model import Model, load_model
from .prompts import ContrastPair, ContrastSet, PromptFamily, load_family
from .sites import SITES, SiteMap

_STAGES = {"load_experiment": ".experiment", "run_experiment": ".experiment"}

__all__ = [
    "SITES", "Batch", "BehaviorLensError", "ContrastPair", "ContrastSet", "Model", "PromptFamily",
    "SiteMap", "load_experiment", "load_family", "load_model", "measure", "run_experiment",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _STAGES:
        return getattr(import_module(_STAGES[name], __name__), name)
    raise AttributeError(f"module 'behaviorlens' has no attribute {name!r}")
