"""The words ckptviz uses for a row's status: the one source; how a term is shown.

Code, tables, the widget and the docs use these names. The widget sends this module's terms
(name, plain-words label, symbol, colour role) to its front end, which restates none of them;
it sends the actions' terms from the actions registry (``core.actions``) the same way.

Status of a row (how the checkpoint tensor and the model tensor line up):
``match`` same shape and dtype; ``dtype`` same shape, other dtype; ``shape`` same key, other
shape; ``missing`` in the model, not in the checkpoint; ``unexpected`` in the checkpoint, not in
the model.

Action of a row (what apply does to the model tensor): each is one definition in
``core.actions`` (``load``, ``keep``, ``reinit``, ``partial`` and any registered since), whose
``label``, ``symbol`` and ``colour`` are its term; ``skip`` is the one an ``unexpected`` row
shows: it has no model tensor and is never applied.

The enum derives from ``str`` so a member equals its name (``Status.MATCH == "match"``) and
JSON holds the plain name. Python 3.10 has no ``enum.StrEnum``; ``__str__`` gives the same
behaviour.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType


class Status(str, Enum):
    """How a checkpoint tensor and a model tensor line up."""

    MATCH = "match"
    DTYPE = "dtype"
    SHAPE = "shape"
    MISSING = "missing"
    UNEXPECTED = "unexpected"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Term:
    """How a status or an action is shown: ``label`` in plain words, a ``symbol`` that carries
    the meaning without colour, and a ``colour`` role (``ok``, ``warn``, ``bad``, ``info``,
    ``extra``, ``neutral``, ``accent``) that each view maps to its own palette."""

    label: str
    symbol: str
    colour: str


#: Every colour role a term may name; a view defines one colour for each.
COLOUR_ROLES = ("ok", "warn", "bad", "info", "extra", "neutral", "accent")

STATUS_TERMS: Mapping[Status, Term] = MappingProxyType(
    {
        Status.MATCH: Term("same shape and dtype in both", "✓", "ok"),
        Status.DTYPE: Term("same shape, another dtype", "≈", "warn"),
        Status.SHAPE: Term("same key, another shape", "✗", "bad"),
        Status.MISSING: Term("in the model, not in the checkpoint", "−", "info"),
        Status.UNEXPECTED: Term("in the checkpoint, not in the model", "+", "extra"),
    }
)
