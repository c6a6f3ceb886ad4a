"""The ``behaviorlens`` command: one module per user job, the shared options in :mod:`.options`.

Stages never import this package; it imports them.
"""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
