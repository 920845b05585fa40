"""Static tables: pandas DataFrames and styled HTML for Diff, Plan and Report.

The HTML is a pandas Styler rendered to a plain ``<table>`` with inline styles, so it survives
nbviewer, GitHub and HTML export, where widgets do not render. Every highlighted cell also says
its status in words, so colour is never the only signal. Every cell, header and caption is
HTML-escaped, and the table is marked for MathJax to leave alone: what a file names is shown as
text, never read as markup or math.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

from ckptviz.core.display import register_renderer

#: Classes that keep MathJax (JupyterLab: ``mathjax_ignore``; classic Notebook, nbviewer:
#: ``tex2jax_ignore``) from typesetting a name such as ``$x^2$`` inside the element as math.
NO_MATH_CLASSES = "mathjax_ignore tex2jax_ignore"

#: Background colours per status / action, light enough for black text in any theme.
STATUS_COLOURS = {
    "match": "#e6f4ea",
    "dtype": "#fff4ce",
    "shape": "#fde2e1",
    "missing": "#e8eaf6",
    "unexpected": "#f3e5f5",
}
ACTION_COLOURS = {
    "load": "#e6f4ea",
    "keep": "#f1f3f4",
    "reinit": "#e3f2fd",
    "partial": "#fff4ce",
    "skip": "#f3e5f5",
}
STATUS_MARKS = {"match": "✓", "dtype": "≈", "shape": "✗", "missing": "−", "unexpected": "+"}


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


def _styled(df: Any, caption: str, colour_columns: dict[str, dict[str, str]]) -> str:
    def colour(value: Any, colours: dict[str, str]) -> str:
        background = colours.get(str(value))
        return f"background-color: {background}; color: #111" if background else ""

    # Keys, shapes, dtypes, file names and notes come from files: every cell, header and the
    # caption is escaped (a Styler writes them into the HTML as they are otherwise).
    styler = (
        df.style.format(escape="html")
        .format_index(escape="html", axis="columns")
        .format_index(escape="html", axis="index")
        .hide(axis="index")
        .set_caption(html.escape(caption))
        .set_table_attributes(f'class="{NO_MATH_CLASSES}"')
    )
    for column, colours in colour_columns.items():
        if column in df:
            styler = styler.map(lambda v, c=colours: colour(v, c), subset=[column])
    styler = styler.set_table_styles(
        [
            {"selector": "", "props": "border-collapse: collapse; font-size: 12px;"},
            {"selector": "th", "props": "text-align: left; padding: 2px 8px;"},
            {"selector": "td", "props": "padding: 2px 8px; font-family: monospace;"},
            {"selector": "caption", "props": "text-align: left; font-weight: bold;"},
        ]
    )
    return str(styler.to_html())


def _diff_table(
    diff: Any, actions: dict[str, str] | None = None, only: Sequence[int] | None = None
) -> Any:
    import pandas as pd

    left, right = ("model", "checkpoint") if diff.against_model else ("a", "b")
    rows = []
    for row in diff.rows if only is None else [diff.rows[i] for i in only]:
        m, c = row.model, row.checkpoint
        record = {
            "status": row.status,
            f"{left} key": m.key if m else "",
            f"{left} shape": _shape(m.shape) if m else "",
            f"{left} dtype": m.dtype if m else "",
            f"{right} key": c.key if c else "",
            f"{right} shape": _shape(c.shape) if c else "",
            f"{right} dtype": c.dtype if c else "",
        }
        if actions is not None:
            record["action"] = actions.get(row.key, "skip")
        record["note"] = row.note
        rows.append(record)
    df = pd.DataFrame(rows)
    if not df.empty:
        df["status"] = df["status"].map(lambda s: f"{STATUS_MARKS[s]} {s}")
    return df


def diff_html(diff: Any) -> str:
    df = _diff_table(diff)
    marks = {f"{STATUS_MARKS[s]} {s}": colour for s, colour in STATUS_COLOURS.items()}
    caption = diff.summary.replace("\n", " · ")
    return _styled(df, caption, {"status": marks})


def plan_html(plan: Any, rows: Sequence[int] | None = None) -> str:
    """The plan's table; ``rows`` (positions in ``plan.diff.rows``) shows only those."""
    actions = {row.key: action for row, action in plan}
    df = _diff_table(plan.diff, actions, rows)
    marks = {f"{STATUS_MARKS[s]} {s}": colour for s, colour in STATUS_COLOURS.items()}
    caption = plan.summary()
    if rows is not None and len(rows) < len(plan.diff.rows):
        caption += f" (showing {len(rows):,} of {len(plan.diff.rows):,} rows)"
    return _styled(df, caption, {"status": marks, "action": ACTION_COLOURS})


def report_html(report: Any) -> str:
    import pandas as pd

    df = pd.DataFrame(report.to_records())
    if not df.empty:
        df["verified"] = df["verified"].map(lambda ok: "✓ yes" if ok else "✗ NO")
    caption = report.summary() + "".join(f" · note: {n}" for n in report.notes)
    verified = {"✓ yes": "#e6f4ea", "✗ NO": "#fde2e1"}
    return _styled(df, caption, {"action": ACTION_COLOURS, "verified": verified})


def _html(obj: Any) -> str:
    from ckptviz.core.apply import Report
    from ckptviz.core.diff import Diff
    from ckptviz.core.plan import Plan

    if isinstance(obj, Diff):
        return diff_html(obj)
    if isinstance(obj, Plan):
        return plan_html(obj)
    if isinstance(obj, Report):
        return report_html(obj)
    raise TypeError(f"no HTML table for {type(obj).__name__}")


register_renderer("frame", frame)
register_renderer("html", _html)
