"""Static tables: pandas DataFrames and styled HTML for Diff, Plan, Report and ValueStats.

The HTML is a pandas Styler rendered to a plain ``<table>``, so it survives nbviewer, GitHub and
HTML export, where widgets do not render. Every highlighted cell also says its status in words,
so colour is never the only signal. Every cell, header, caption and ``title`` is HTML-escaped,
and the table is marked for MathJax to leave alone: what a file names is shown as text, never
read as markup or math.

A big diff stays small: the table shows at most ``TABLE_ROWS`` rows, those that differ first,
and one last line counts the rest per status (``to_frame()`` still holds every row). Cells are
left-aligned and do not wrap, except keys, which may break only after a dot; a key longer than
``KEY_WIDTH`` loses its middle to "…" and shows whole on hover.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from typing import Any

from ckptviz.core.actions import (
    SKIP,
    action_terms,
    default_action,
    default_fitting_action,
)
from ckptviz.core.display import register_renderer
from ckptviz.core.text import visible

#: Classes that keep MathJax (JupyterLab: ``mathjax_ignore``; classic Notebook, nbviewer:
#: ``tex2jax_ignore``) from typesetting a name such as ``$x^2$`` inside the element as math.
NO_MATH_CLASSES = "mathjax_ignore tex2jax_ignore"
#: Most rows a static table shows; the others are counted in its last line.
TABLE_ROWS = 200
#: Widest a key is shown in a cell, in characters (the middle gives way to "…").
KEY_WIDTH = 80
#: Keys up to this many characters stay whole on one line; longer ones may break after a dot.
BREAK_WIDTH = 40
#: Widest a key is shown on hover (its ``title``): whole for any real model, bounded for a
#: hostile megabyte-long name.
TITLE_WIDTH = 2000

#: Background colours per status / action, light enough for black text in any theme.
STATUS_COLOURS = {
    "match": "#e6f4ea",
    "dtype": "#fff4ce",
    "shape": "#fde2e1",
    "missing": "#e8eaf6",
    "unexpected": "#f3e5f5",
}
#: Background colour per colour role (``vocabulary.COLOUR_ROLES``): an action's cells take its
#: role's.
ROLE_COLOURS = {
    "ok": "#e6f4ea",
    "warn": "#fff4ce",
    "bad": "#fde2e1",
    "info": "#e8eaf6",
    "extra": "#f3e5f5",
    "neutral": "#f1f3f4",
    "accent": "#e3f2fd",
}


def action_colours() -> dict[str, str]:
    """Background colour per action (every registered one, and ``skip``)."""
    return {name: ROLE_COLOURS[term.colour] for name, term in action_terms().items()}


STATUS_MARKS = {"match": "✓", "dtype": "≈", "shape": "✗", "missing": "−", "unexpected": "+"}
#: Columns of prose (they wrap; every other cell stays on one line).
PROSE_COLUMNS = ("note", "detail")
_VERIFIED = {True: "✓ yes", False: "✗ NO"}
_UNDONE = "↶ undone"
_EQUAL = {True: "yes", False: "no"}


def _shape(shape: Any) -> str:
    return "" if shape is None else "[" + ", ".join(str(s) for s in shape) + "]"


def frame(obj: Any) -> Any:
    import pandas as pd

    records = obj.to_records()
    df = pd.DataFrame.from_records(records, columns=getattr(obj, "columns", None))
    for column in ("model_shape", "checkpoint_shape"):
        if column in df:
            df[column] = df[column].map(lambda s: tuple(s) if s is not None else None)
    return df


def key_cell(key: Any) -> str:
    """The HTML of a key's cell: escaped; past ``BREAK_WIDTH`` characters breakable after a dot
    (``<wbr>``) and nowhere else; its middle clipped past ``KEY_WIDTH``, with the whole key in
    a ``title`` (escaped, quotes included)."""
    text = "" if key is None else str(key)
    shown = visible(text, KEY_WIDTH)
    cell = html.escape(shown, quote=False)
    if len(shown) > BREAK_WIDTH:
        cell = ".<wbr>".join(html.escape(part, quote=False) for part in shown.split("."))
    whole = visible(text, TITLE_WIDTH)
    if shown != whole:
        title = html.escape(whole, quote=True)
        cell = f'<span title="{title}">{cell}</span>'
    return cell


def pick_rows(count: int, differs: Callable[[int], bool], limit: int = TABLE_ROWS) -> list[int]:
    """Positions of the rows a capped table shows: those that differ first (in order), then
    the others, ``limit`` in all."""
    first = [i for i in range(count) if differs(i)][:limit]
    if len(first) < limit:
        shown = set(first)
        first += [i for i in range(count) if i not in shown][: limit - len(first)]
    return first


def _more_line(hidden: Sequence[str], total: int) -> str:
    """ "19,800 more rows: 19,700 match, 100 dtype" for the rows a table leaves out."""
    counts: dict[str, int] = {}
    for word in hidden:
        counts[word] = counts.get(word, 0) + 1
    words = ", ".join(f"{n:,} {w}" for w, n in counts.items())
    return f"{len(hidden):,} more rows: {words} (to_frame() lists all {total:,})"


def _styled(
    df: Any,
    caption: str,
    colour_columns: dict[str, dict[str, str]],
    key_columns: Sequence[str] = (),
    more: str = "",
) -> str:
    def colour(value: Any, colours: dict[str, str]) -> str:
        background = colours.get(str(value))
        return f"background-color: {background}; color: #111" if background else ""

    # Keys, shapes, dtypes, file names and notes come from files: every cell, header and the
    # caption is escaped (a Styler writes them into the HTML as they are otherwise); key cells
    # are escaped by key_cell, which adds its own break points and title.
    keys = [c for c in key_columns if c in df]
    styler = (
        df.style.format(escape="html")
        .format(key_cell, subset=keys)
        .format_index(escape="html", axis="columns")
        .format_index(escape="html", axis="index")
        .hide(axis="index")
        .set_caption(html.escape(caption))
        .set_table_attributes(f'class="{NO_MATH_CLASSES}"')
    )
    for column, colours in colour_columns.items():
        if column in df:
            styler = styler.map(lambda v, c=colours: colour(v, c), subset=[column])
    styles = [
        {"selector": "", "props": "border-collapse: collapse; font-size: 12px;"},
        {"selector": "th", "props": "text-align: left; padding: 2px 8px; white-space: nowrap;"},
        {
            "selector": "td",
            "props": "text-align: left; vertical-align: top; padding: 2px 8px; "
            "font-family: monospace; white-space: nowrap;",
        },
        {"selector": "caption", "props": "text-align: left; font-weight: bold;"},
    ]
    # keys break after their dots only; notes are prose and wrap like prose
    wrapping = [*keys, *(c for c in PROSE_COLUMNS if c in df)]
    styles += [
        {"selector": f"td.col{list(df.columns).index(c)}", "props": "white-space: normal;"}
        for c in wrapping
    ]
    text = str(styler.set_table_styles(styles).to_html())
    if more:
        # One last row across the table; "</tbody>" cannot come from a file (cells are escaped).
        footer = (
            f'<tr><td colspan="{max(len(df.columns), 1)}" style="font-style: italic;">'
            f"{html.escape(more)}</td></tr>\n"
        )
        text = text.replace("</tbody>", footer + "</tbody>", 1)
    return text


def _diff_table(diff: Any, positions: Sequence[int], actions: dict[str, str] | None = None) -> Any:
    import pandas as pd

    left, right = ("model", "checkpoint") if diff.against_model else ("a", "b")
    records = []
    for i in positions:
        row = diff.rows[i]
        m, c = row.model, row.checkpoint
        record = {
            "status": f"{STATUS_MARKS[row.status]} {row.status}",
            f"{left} key": m.key if m else "",
            f"{left} shape": _shape(m.shape) if m else "",
            f"{left} dtype": m.dtype if m else "",
            f"{right} key": c.key if c else "",
            f"{right} shape": _shape(c.shape) if c else "",
            f"{right} dtype": c.dtype if c else "",
        }
        if actions is not None:
            record["action"] = actions.get(row.key, SKIP)
        record["note"] = row.note
        records.append(record)
    columns = ["status", f"{left} key", f"{left} shape", f"{left} dtype"]
    columns += [f"{right} key", f"{right} shape", f"{right} dtype"]
    columns += ["action", "note"] if actions is not None else ["note"]
    return pd.DataFrame(records, columns=columns), (f"{left} key", f"{right} key")


def _status_marks() -> dict[str, str]:
    return {f"{STATUS_MARKS[s]} {s}": colour for s, colour in STATUS_COLOURS.items()}


def _shown_caption(caption: str, shown: int, total: int) -> str:
    if shown < total:
        caption += f" (showing {shown:,} of {total:,} rows, those that differ first)"
    return caption


def diff_html(diff: Any) -> str:
    rows = diff.rows
    shown = pick_rows(len(rows), lambda i: rows[i].status != "match")
    df, keys = _diff_table(diff, shown)
    kept = set(shown)
    hidden = [r.status for i, r in enumerate(rows) if i not in kept]
    more = _more_line(hidden, len(rows)) if hidden else ""
    caption = _shown_caption(diff.summary().replace("\n", " · "), len(shown), len(rows))
    return _styled(df, caption, {"status": _status_marks()}, keys, more)


def plan_html(plan: Any, rows: Sequence[int] | None = None) -> str:
    """The plan's table; ``rows`` (positions in ``plan.diff.rows``) shows only those (the
    caller says what it left out).

    Rows whose status is not ``match`` or whose action is not ``load`` come first.
    """
    actions = {row.key: action for row, action in plan}
    all_rows = plan.diff.rows
    candidates = list(range(len(all_rows))) if rows is None else list(rows)

    def differs(i: int) -> bool:
        row = all_rows[candidates[i]]
        return row.status != "match" or actions.get(row.key) != default_action(row)

    shown = [candidates[i] for i in pick_rows(len(candidates), differs)]
    df, keys = _diff_table(plan.diff, shown, actions)
    more = ""
    if rows is None:  # a caller choosing the rows says what it left out
        kept = set(shown)
        hidden = [
            f"{all_rows[i].status} → {actions.get(all_rows[i].key, SKIP)}"
            for i in candidates
            if i not in kept
        ]
        more = _more_line(hidden, len(all_rows)) if hidden else ""
    caption = _shown_caption(plan.summary(), len(shown), len(all_rows))
    colours = {"status": _status_marks(), "action": action_colours()}
    return _styled(df, caption, colours, keys, more)


def report_html(report: Any) -> str:
    import pandas as pd

    entries = report.entries
    shown = pick_rows(
        len(entries),
        lambda i: not entries[i].verified or entries[i].action != default_fitting_action(),
    )
    records = report.to_records()
    df = pd.DataFrame([records[i] for i in shown], columns=list(records[0]) if records else None)
    if not df.empty:
        # after undo no row holds what apply wrote: say so instead of "verified"
        df["verified"] = df["verified"].map(
            lambda ok: _UNDONE if report.undone else _VERIFIED[bool(ok)]
        )
    kept = set(shown)
    hidden = [
        f"{e.action}, verified" if e.verified else f"{e.action}, NOT verified"
        for i, e in enumerate(entries)
        if i not in kept
    ]
    caption = report.summary() + "".join(f" · note: {n}" for n in report.notes)
    caption = _shown_caption(caption, len(shown), len(entries))
    verified = {_VERIFIED[True]: "#e6f4ea", _VERIFIED[False]: "#fde2e1"}
    more = _more_line(hidden, len(entries)) if hidden else ""
    colours = {"action": action_colours(), "verified": verified}
    return _styled(df, caption, colours, ("key", "checkpoint_key"), more)


def stats_html(stats: Any) -> str:
    """Value statistics: the pairs that are not bit-for-bit equal first."""
    import pandas as pd

    from ckptviz.core.stats import format_number

    entries = stats.entries
    shown = pick_rows(len(entries), lambda i: not entries[i].equal)
    records = []
    for i in shown:
        e = entries[i]
        records.append(
            {
                "key": e.key,
                "b key": e.b_key if e.b_key != e.key else "",
                "status": f"{STATUS_MARKS[e.status]} {e.status}",
                "relative change": format_number(e.relative_change),
                "max |a−b|": format_number(e.max_abs_diff),
                "cosine": format_number(e.cosine),
                "NaN/Inf a": f"{e.nan_a}/{e.inf_a}",
                "NaN/Inf b": f"{e.nan_b}/{e.inf_b}",
                "equal": _EQUAL[e.equal],
                "note": e.note,
            }
        )
    df = pd.DataFrame(records)
    kept = set(shown)
    hidden = [
        f"{e.status}, {'equal' if e.equal else 'not equal'}"
        for i, e in enumerate(entries)
        if i not in kept
    ]
    a, b = stats.side_names
    not_equal = sum(not e.equal for e in entries)
    caption = f"value statistics, a = {a}, b = {b}: {len(entries):,} pairs, {not_equal:,} not equal"
    caption = _shown_caption(caption, len(shown), len(entries))
    more = _more_line(hidden, len(entries)) if hidden else ""
    return _styled(df, caption, {"status": _status_marks()}, ("key", "b key"), more)


def _html(obj: Any) -> str:
    from ckptviz.core.diff import Diff
    from ckptviz.core.plan import Plan
    from ckptviz.core.report import Report
    from ckptviz.core.stats import ValueStats

    if isinstance(obj, Diff):
        return diff_html(obj)
    if isinstance(obj, Plan):
        return plan_html(obj)
    if isinstance(obj, Report):
        return report_html(obj)
    if isinstance(obj, ValueStats):
        return stats_html(obj)
    raise TypeError(f"no HTML table for {type(obj).__name__}")


register_renderer("frame", frame)
register_renderer("html", _html)
