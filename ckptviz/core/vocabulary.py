"""The words ckptviz uses for a row's status and action: the one source.

Code, tables, the widget and the docs use these names. The widget sends this module's terms
(name, plain-words label, symbol, colour role) to its front end, which restates none of them.

Status of a row (how the checkpoint tensor and the model tensor line up):
``match`` same shape and dtype; ``dtype`` same shape, other dtype; ``shape`` same key, other
shape; ``missing`` in the model, not in the checkpoint; ``unexpected`` in the checkpoint, not in
the model.

Action of a row (what apply does to the model tensor): ``load``, ``keep``, ``reinit``,
``partial``; ``skip`` is the one an ``unexpected`` row shows: it has no model tensor and is never
applied.

The enums derive from ``str`` so a member equals its name (``Status.MATCH == "match"``) and
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


class Action(str, Enum):
    """What apply does with a row. ``SKIP`` is shown for rows without a model tensor."""

    LOAD = "load"
    KEEP = "keep"
    REINIT = "reinit"
    PARTIAL = "partial"
    SKIP = "skip"

    def __str__(self) -> str:
        return self.value


#: The actions a person or a script may choose for a row that has a model tensor, in UI order.
CHOSEN_ACTIONS: tuple[Action, ...] = tuple(a for a in Action if a is not Action.SKIP)


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

ACTION_TERMS: Mapping[Action, Term] = MappingProxyType(
    {
        Action.LOAD: Term(
            "copy the checkpoint's tensor into the model (casting the dtype if it differs)",
            "↓",
            "ok",
        ),
        Action.KEEP: Term("leave the model's current value", "=", "neutral"),
        Action.REINIT: Term("draw a fresh value with the module's own initialiser", "↻", "accent"),
        Action.PARTIAL: Term(
            "copy the overlapping slice of a grown or shrunk tensor; the rest keeps its value",
            "◧",
            "warn",
        ),
        Action.SKIP: Term(
            "never applied: the model has no tensor for this checkpoint entry", "·", "extra"
        ),
    }
)
