"""The Loader's table columns, declared once: the front end renders whatever this list says.

Each side of the table (checkpoint, model) shows the same columns, made from that side's
``TensorInfo``. A new column is one entry here: its value travels in every row, in each side's
list of values (in this order), and ``static/loader.js`` draws it by its ``kind``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING, Any, cast

from ckptviz.core.vocabulary import Status

if TYPE_CHECKING:
    from ckptviz.core.checkpoint import TensorInfo

#: How the front end can show a value: the tensor's key (indented in the module tree, with its
#: tags), a shape as ``[a, b]``, plain text, or a byte count in KiB/MiB/GiB.
COLUMN_KINDS = ("key", "shape", "text", "bytes")
#: Width hints the front end knows: ``name`` (grows most, for keys), ``wide`` (grows, for
#: shapes), ``short`` (fixed, for a dtype or a size).
WIDTHS = ("name", "wide", "short")


class Field:
    """A column value that is one ``TensorInfo`` field as it is (a shape as its tuple, which
    JSON writes as a list). A side's columns that are all fields are read by one getter
    (``side_values``): a table of 100,000 rows makes 200,000 sides."""

    __slots__ = ("_get", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._get = attrgetter(name)

    def __call__(self, tensor: TensorInfo) -> Any:
        return self._get(tensor)


@dataclass(frozen=True)
class Column:
    """One column of each side of the Loader's table.

    ``value`` makes the cell from one side's tensor (it must return JSON: ``None``, numbers,
    strings, lists of those). ``width`` is one of ``WIDTHS``. ``flagged_by`` names
    the status whose rows highlight this cell (with the status's symbol). ``medium`` says
    whether the column stays when the notebook is of middling width; ``narrow`` whether it is
    part of the one-line summary the narrow layout shows under a row's name.
    """

    key: str
    title: str
    value: Callable[[TensorInfo], Any]
    kind: str
    width: str
    flagged_by: Status | None = None
    medium: bool = True
    narrow: bool = False

    def __post_init__(self) -> None:
        if self.kind not in COLUMN_KINDS:
            raise ValueError(
                f"column {self.key!r}: kind {self.kind!r} is not one of {COLUMN_KINDS}"
            )
        if self.width not in WIDTHS:
            raise ValueError(f"column {self.key!r}: width {self.width!r} is not one of {WIDTHS}")

    def state(self) -> dict[str, Any]:
        """What the front end receives about the column (everything but ``value``)."""
        return {
            "key": self.key,
            "title": self.title,
            "kind": self.kind,
            "width": self.width,
            "flagged_by": None if self.flagged_by is None else self.flagged_by.value,
            "medium": self.medium,
            "narrow": self.narrow,
        }


#: The columns of each side, in order. The first is the key: the front end builds the module
#: tree and every request from it.
COLUMNS: tuple[Column, ...] = (
    Column("key", "name", Field("key"), "key", width="name"),
    Column(
        "shape",
        "shape",
        Field("shape"),
        "shape",
        width="wide",
        flagged_by=Status.SHAPE,
        narrow=True,
    ),
    Column(
        "dtype",
        "dtype",
        Field("dtype"),
        "text",
        width="short",
        flagged_by=Status.DTYPE,
        narrow=True,
    ),
    Column("bytes", "size", Field("nbytes"), "bytes", width="short", medium=False),
)

if COLUMNS[0].key != "key" or len({c.key for c in COLUMNS}) != len(COLUMNS):
    raise ValueError("the first widget column must be the key, and column keys must be unique")


def side_values(columns: Sequence[Column]) -> Callable[[TensorInfo], Sequence[Any]]:
    """What makes the cells of one side of a row, every column's value in order: one
    ``attrgetter`` of all the fields when every column is a ``Field``, else each value."""
    if len(columns) > 1 and all(isinstance(c.value, Field) for c in columns):
        return attrgetter(*(cast(Field, c.value).name for c in columns))
    values = [c.value for c in columns]
    return lambda tensor: [value(tensor) for value in values]
