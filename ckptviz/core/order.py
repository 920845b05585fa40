"""The order rows are drawn in: the model's, also when side ``a`` is a file that forgot it.

A live model and torch files keep the order the model registered its tensors in (``head``
before ``embed`` if the model says so, ``layers.9`` before ``layers.10``), and a ``Diff``'s rows
follow side ``a``. A safetensors file keeps none: its header lists tensors by dtype and name.
So when side ``a`` is such a file and side ``b`` keeps an order, rows follow ``b``; when
neither does, rows follow their names with numbers counted (``layers.9`` before
``layers.10``), and ``order_words`` says so.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ckptviz.core.formats import format_named

if TYPE_CHECKING:
    from ckptviz.core.checkpoint import Checkpoint
    from ckptviz.core.diff import Diff, Row

_NUMBER = re.compile(r"(\d+)")


def keeps_order(side: Checkpoint) -> bool:
    """Whether ``side`` lists its tensors in the model's order (its format says)."""
    fmt = format_named(side.format)
    return fmt is None or side.format not in fmt.unordered


def name_order(key: str) -> tuple[tuple[int, int | str], ...]:
    """A sort key that counts the numbers in a name: ``layers.9`` before ``layers.10``."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part) for part in _NUMBER.split(key) if part
    )


def order_source(diff: Diff) -> str:
    """Where the order comes from: ``"a"`` (the model or first file), ``"b"`` or ``"names"``."""
    if keeps_order(diff.model_side):
        return "a"
    return "b" if keeps_order(diff.checkpoint) else "names"


def order_words(diff: Diff) -> str:
    """The order in words, for a plot's title."""
    return {
        "a": "in model order",
        "b": f"in model order (as {diff.side_names[1]} keeps it)",
        "names": "in name order (neither file keeps the model's order)",
    }[order_source(diff)]


def in_model_order(diff: Diff, rows: list[Row]) -> list[Row]:
    """``rows`` (of ``diff``) in the model's order as well as the files tell it."""
    source = order_source(diff)
    if source == "a":
        return rows
    if source == "names":
        return sorted(rows, key=lambda r: name_order(r.key))
    position = {key: i for i, key in enumerate(diff.checkpoint.tensors)}
    last = len(position)
    # rows without a b side (missing) go after the b row before them in a's order
    ranks: list[tuple[int, int]] = []
    previous = -1
    for i, row in enumerate(rows):
        b_key = row.checkpoint_key
        if b_key is not None and b_key in position:
            previous = position[b_key]
            ranks.append((previous, i))
        else:
            ranks.append((previous if previous >= 0 else last, i))
    return [row for _, row in sorted(zip(ranks, rows, strict=True), key=lambda p: p[0])]
