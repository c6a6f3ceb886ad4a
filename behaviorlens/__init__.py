"""behaviorlens: find and surgically edit the latent variables behind a model's behavior."""

from .batching import Batch
from .errors import BehaviorLensError
from .experiment import load_experiment, run_experiment
from .measure import measure
from .model import Model, load_model
from .prompts import ContrastPair, ContrastSet, PromptFamily, load_family
from .sites import SITES, SiteMap

__all__ = [
    "SITES", "Batch", "BehaviorLensError", "ContrastPair", "ContrastSet", "Model", "PromptFamily",
    "SiteMap", "load_experiment", "load_family", "load_model", "measure", "run_experiment",
]
__version__ = "0.1.0"
