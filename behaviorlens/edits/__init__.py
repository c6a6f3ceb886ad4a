"""Edits: one file format (:class:`Edit`) and one class per kind (:mod:`.kinds`), registered
by name (:data:`.kind.KINDS`); :func:`interventions` turns an edit into what acts on a model."""

from ..interventions.kinds import Readout
from . import kinds  # noqa: F401  (registers every kind)
from .build import interventions
from .edit import HEAD_MODES, POSITIONS, Edit
from .kind import KINDS, EditKind, kind_of

__all__ = ["HEAD_MODES", "KINDS", "POSITIONS", "Edit", "EditKind", "Readout", "interventions", "kind_of"]
