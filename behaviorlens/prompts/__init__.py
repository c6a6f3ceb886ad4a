"""Prompt families, contrast sets, dataset loaders and the built-in library."""

from .contrast import ANSWERS, SIDES, ContrastPair, ContrastSet
from .family import PromptFamily, load_family

__all__ = ["ANSWERS", "SIDES", "ContrastPair", "ContrastSet", "PromptFamily", "load_family"]
