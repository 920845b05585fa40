"""Text for terminals and ``print()``: file data made visible, aligned columns, no dependencies.

Key names, file names, metadata and plan fields come from files, so they may hold anything:
an ESC sequence that recolours or clears the terminal, a ``\\r`` that overwrites the line, a
bidi override (U+202E) that shows ``gpj.exe`` as ``exe.jpg``, a zero-width space that makes two
keys look alike, or a megabyte-long name. ``visible`` is the one function every piece of such
text passes through on its way to a terminal: each character Python does not count as
printable (Unicode's "Other" and "Separator" categories, except the plain space) becomes a
visible escape, the way ``repr`` writes it, and long text is shortened in the middle.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ckptviz.core.diff import Diff, Row

#: Widest a name is shown in running text (summaries, explanations), in characters.
NAME_WIDTH = 200
#: Widest a table column is drawn, in characters.
COLUMN_WIDTH = 60
ELLIPSIS = "…"
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    short = _SHORT_ESCAPES.get(char)
    if short is not None:
        return short
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _escaped(text: str) -> str:
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def visible(text: object, width: int | None = NAME_WIDTH) -> str:
    """``text`` safe to print: control, format and separator characters (C0, DEL, C1, ESC,
    ``\\r``, ``\\n``, bidi overrides, zero-width characters, lone surrogates...) written as
    escapes such as ``\\x1b`` or ``\\u202e``.

    Longer than ``width`` characters (``None``: never clipped), its middle gives way to "…":
    the start and the end, which tell files and tensors apart, stay. Only ``width``
    characters of a longer text are looked at.
    """
    text = str(text)
    if width is None:
        return _escaped(text)
    if len(text) <= width:
        shown = _escaped(text)
        if len(shown) <= width:
            return shown
    kept = max(width - 1, 0)
    head, tail = (kept + 1) // 2, kept // 2
    start = _escaped(text[:head])[:head]
    end = _escaped(text[len(text) - tail :])[-tail:] if tail else ""
    return start + ELLIPSIS + end


def visible_lines(text: object, width: int | None = None) -> str:
    """Like ``visible``, for text of several lines (an error message): the line breaks stay,
    every other control character becomes an escape."""
    return "\n".join(visible(line, width) for line in str(text).split("\n"))


def shape_text(shape: Sequence[int] | None) -> str:
    return "" if shape is None else "[" + ", ".join(str(s) for s in shape) + "]"


#: (padded text of a cell, its column) -> the text to print; the CLI colours cells with it.
CellStyle = Callable[[str, int], str]


def format_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    max_width: int = COLUMN_WIDTH,
    *,
    header_style: Callable[[str], str] | None = None,
    cell_style: CellStyle | None = None,
) -> str:
    """Aligned columns, every cell made ``visible`` and clipped to ``max_width`` characters.

    Styles are applied after padding, so colour codes never break the alignment.
    """
    heads = [visible(h, max_width) for h in headers]
    cells = [[visible(c, max_width) for c in row] for row in rows]
    widths = [len(h) for h in heads]
    for row in cells:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    header = "  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)).rstrip()
    lines = [header_style(header) if header_style else header]
    lines.append("  ".join("-" * w for w in widths))
    for row in cells:
        padded = [c.ljust(w) for c, w in zip(row, widths, strict=True)]
        if cell_style is not None:
            padded = [cell_style(text, i) for i, text in enumerate(padded)]
        lines.append("  ".join(padded).rstrip())
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
    return diff.summary() + "\n\n" + format_table(headers, rows)
