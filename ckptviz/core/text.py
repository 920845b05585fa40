"""Plain-text tables for terminals and ``print()``: aligned columns, no dependencies."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ckptviz.core.diff import Diff, Row


def shape_text(shape: Sequence[int] | None) -> str:
    return "" if shape is None else "[" + ", ".join(str(s) for s in shape) + "]"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], max_width: int = 60) -> str:
    def clip(cell: str) -> str:
        return cell if len(cell) <= max_width else cell[: max_width - 1] + "…"

    cells = [[clip(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in cells:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def row_cells(row: Row) -> list[str]:
    m, c = row.model, row.checkpoint
    return [
        row.status,
        m.key if m else "",
        shape_text(m.shape) if m else "",
        m.dtype if m else "",
        c.key if c else "",
        shape_text(c.shape) if c else "",
        c.dtype if c else "",
    ]


def diff_text(diff: Diff, extra: dict[str, str] | None = None, extra_header: str = "") -> str:
    left, right = diff.side_names
    if len(left) > 20:
        left, right = "a", "b"
    headers = ["status", f"{left} key", "shape", "dtype", f"{right} key", "shape", "dtype"]
    rows = [row_cells(r) for r in diff.rows]
    if extra is not None:
        headers.append(extra_header)
        rows = [[*cells, extra.get(r.key, "")] for cells, r in zip(rows, diff.rows, strict=True)]
    return diff.summary + "\n\n" + format_table(headers, rows)
