"""behaviorlens: find and surgically edit the latent variables behind a model's behavior."""

from .batching import Batch
from .errors import BehaviorLensError
from .model import Model, load_model
from .sites import SITES, SiteMap

__all__ = ["Batch", "BehaviorLensError", "Model", "SITES", "SiteMap", "load_model"]
__version__ = "0.1.0"
