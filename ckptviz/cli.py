"""The ``ckptviz`` command: ``inspect`` one checkpoint, ``diff`` two.

Tables with aligned columns for people (colour only when stdout is a terminal and ``NO_COLOR``
is unset), ``--json`` and ``--csv`` for scripts. Exit codes follow diff(1): 0 identical,
1 different, 2 trouble (the message names the file and the next step; no traceback).
Checkpoints are read with ``weights_only=True``; ``--allow-global NAME`` allows one of a short
list of harmless globals, and only ``--trusted`` unpickles fully. A refusal is worded as the
Python API words it (``core/safety.py``), with these options in place of its arguments.
Names from a file are text: the tables and messages show their control characters as escapes
(``core.text.visible``) in capped columns, ``--csv`` cells never start a spreadsheet formula,
and ``--json`` keeps them exact.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from ckptviz.core.checkpoint import Checkpoint, human_bytes
from ckptviz.core.diff import Diff, Row, compare
from ckptviz.core.errors import CkptvizError, UnsafeCheckpointError
from ckptviz.core.matching import WRAPPER_PREFIXES
from ckptviz.core.reading import read_checkpoint
from ckptviz.core.stats import (
    DEFAULT_MEMORY_BUDGET,
    STAT_COLUMNS,
    TensorStats,
    ValueStats,
    format_number,
    value_stats,
    values_equal,
)
from ckptviz.core.text import format_table, row_cells, shape_text, visible, visible_lines

EXIT_IDENTICAL, EXIT_DIFFERENT, EXIT_TROUBLE = 0, 1, 2

_ANSI = {
    "green": "32",
    "yellow": "33",
    "red": "31",
    "blue": "34",
    "magenta": "35",
    "bold": "1",
    "dim": "2",
}
_STATUS_COLOURS = {
    "match": "green",
    "dtype": "yellow",
    "shape": "red",
    "missing": "blue",
    "unexpected": "magenta",
}
#: The statistics shown in the terminal table; --json/--csv carry all of them.
_STAT_CELLS = (
    ("rel. change", "relative_change"),
    ("max |a-b|", "max_abs_diff"),
    ("cosine", "cosine"),
)


class Styler:
    """ANSI colour, or nothing: pads first, so colour codes never break the alignment."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, text: str, colour: str | None) -> str:
        if not self.enabled or not colour or not text.strip():
            return text
        return f"\033[{_ANSI[colour]}m{text}\033[0m"


def use_colour(stream: TextIO, choice: str) -> bool:
    if choice != "auto":
        return choice == "always"
    if os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def aligned_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    style: Styler,
    colour_of: Callable[[int, str], str | None] = lambda column, cell: None,
) -> str:
    """``format_table`` (cells made visible, columns capped) with the header bold and each cell
    coloured by ``colour_of(column, cell)``."""
    return format_table(
        headers,
        rows,
        header_style=lambda header: style(header, "bold"),
        cell_style=lambda cell, column: style(cell, colour_of(column, cell)),
    )


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


#: A spreadsheet opening the CSV runs a cell that starts with one of these as a formula (a
#: leading tab or carriage return, the other two such starts, is already an escape by then).
_FORMULA_STARTS = ("=", "+", "-", "@")


def _csv_cell(value: Any) -> Any:
    """A CSV cell: text from a file made visible (the CSV may go to a terminal) and, where it
    would start a spreadsheet formula, prefixed with ``'``. ``--json`` keeps text exact."""
    if isinstance(value, tuple):
        return shape_text(value)
    if value is None:
        return ""
    if isinstance(value, str):
        text = visible(value, None)
        return "'" + text if text.startswith(_FORMULA_STARTS) else text
    return value


def _write_csv(out: TextIO, columns: Sequence[str], records: Sequence[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({c: _csv_cell(record.get(c)) for c in columns})
    out.write(buffer.getvalue())


def _write_json(out: TextIO, document: dict[str, Any]) -> None:
    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return _finite_or_none(value)

    json.dump(clean(document), out, indent=2, allow_nan=False)
    out.write("\n")


# -- reading -------------------------------------------------------------------------------------


def _read(path: str, key: str | None, args: argparse.Namespace) -> Checkpoint:
    return read_checkpoint(
        path, key=key, trusted=args.trusted, allow_globals=tuple(args.allow_global or ())
    )


def wrapper_prefix(keys: Sequence[str]) -> str:
    """The chain of known wrapper prefixes (``module.``, ``_orig_mod.``, …) on every key."""
    prefix = ""
    for _ in range(3):
        for token in WRAPPER_PREFIXES:
            longer = prefix + token
            if keys and all(k.startswith(longer) and len(k) > len(longer) for k in keys):
                prefix = longer
                break
        else:
            break
    return prefix


def _side(ckpt: Checkpoint) -> dict[str, Any]:
    return {
        "source": ckpt.source,
        "format": ckpt.format,
        "location": "/".join(ckpt.location),
        "tensors": len(ckpt.tensors),
        "total_bytes": ckpt.total_bytes,
        "total_numel": ckpt.total_numel,
    }


# -- inspect -------------------------------------------------------------------------------------


def run_inspect(args: argparse.Namespace, out: TextIO) -> int:
    ckpt = _read(args.file, args.key, args)
    prefix = wrapper_prefix(ckpt.keys())
    records: list[dict[str, Any]] = [
        {
            "name": info.key,
            "shape": info.shape,
            "dtype": info.dtype,
            "numel": info.numel,
            "nbytes": info.nbytes,
        }
        for info in ckpt.tensors.values()
    ]
    if args.format == "json":
        _write_json(
            out,
            {
                **_side(ckpt),
                "candidates": ["/".join(c) for c in ckpt.candidates],
                "wrapper_prefix": prefix,
                "skipped": ckpt.skipped,
                "ties": [list(t) for t in ckpt.ties],
                "metadata": ckpt.metadata,
                "tensors": [{**r, "shape": list(r["shape"])} for r in records],
            },
        )
        return EXIT_IDENTICAL
    if args.format == "csv":
        _write_csv(out, ["name", "shape", "dtype", "numel", "nbytes"], records)
        return EXIT_IDENTICAL
    style = Styler(use_colour(out, args.color))
    summary = visible_lines(ckpt.summary()).splitlines()
    lines = [style(summary[0], "bold"), *summary[1:]]
    if not ckpt.location:
        lines.append("state dict found at the top level")
    if prefix:
        lines.append(
            f"wrapper prefix: every key starts with {prefix!r} (ckptviz removes it when comparing)"
        )
    if ckpt.metadata:
        shown = ", ".join(f"{visible(k)}={visible(v)}" for k, v in list(ckpt.metadata.items())[:8])
        lines.append(f"metadata: {shown}")
    rows = [
        [r["name"], shape_text(r["shape"]), r["dtype"], f"{r['numel']:,}", human_bytes(r["nbytes"])]
        for r in records
    ]
    rows.append(
        ["total", "", "", f"{ckpt.total_numel:,}", human_bytes(ckpt.total_bytes)],
    )
    table = aligned_table(["name", "shape", "dtype", "values", "size"], rows, style)
    out.write("\n".join(lines) + "\n\n" + table + "\n")
    return EXIT_IDENTICAL


# -- diff ----------------------------------------------------------------------------------------


#: CLI column -> Row.to_record() field: side a is the reference, b the other checkpoint
_ROW_COLUMNS = {
    "status": "status",
    "a_key": "model_key",
    "a_shape": "model_shape",
    "a_dtype": "model_dtype",
    "b_key": "checkpoint_key",
    "b_shape": "checkpoint_shape",
    "b_dtype": "checkpoint_dtype",
    "note": "note",
}


def _row_record(row: Row) -> dict[str, Any]:
    record = row.to_record()
    return {column: record[field] for column, field in _ROW_COLUMNS.items()}


#: the statistics columns, with what was compared first ("equal" has its own column)
_MEASURES = ("compared", "compared_shape", *(c for c in STAT_COLUMNS if c != "equal"))


def _stats_fields(stats: TensorStats | None) -> dict[str, Any]:
    if stats is None:
        return {**dict.fromkeys(_MEASURES), "stats_note": None}
    record = stats.to_record()
    return {**{m: record[m] for m in _MEASURES}, "stats_note": stats.note}


def run_diff(args: argparse.Namespace, out: TextIO) -> int:
    left = _read(args.a, args.key_a, args)
    right = _read(args.b, args.key_b, args)
    diff = compare(left, right, rename=args.rename or None)
    progress: bool | None = False if args.no_progress or not sys.stderr.isatty() else None
    budget = int(args.memory_budget * 2**20)
    stats: ValueStats | None = None
    equal: dict[str, bool] | None = None
    if args.stats:
        stats = value_stats(diff, progress=progress, memory_budget=budget)
        equal = {entry.key: entry.equal for entry in stats}
    elif diff.identical and not args.no_values:
        equal = values_equal(diff, progress=progress, memory_budget=budget)
    identical = diff.identical and (equal is None or all(equal.values()))
    verdict = _verdict(diff, equal, stats)
    records = []
    for row in diff.rows:
        record = _row_record(row)
        if equal is not None:
            record["values_equal"] = equal.get(row.key)
        if stats is not None:
            record.update(_stats_fields(stats.get(row.key)))
        records.append(record)
    if args.format == "json":
        _write_json(
            out,
            {
                "a": _side(left),
                "b": _side(right),
                "mapping": diff.mapping.describe(("a", "b")),
                "counts": diff.counts,
                **(_suggestion_records(diff) if args.suggest else {}),
                "values_compared": "stats" if stats else ("bytes" if equal is not None else "no"),
                "identical": identical,
                "verdict": verdict,
                "rows": records,
            },
        )
    elif args.format == "csv":
        columns = list(_ROW_COLUMNS)
        if equal is not None:
            columns.append("values_equal")
        if stats is not None:
            columns += [*_MEASURES, "stats_note"]
        _write_csv(out, columns, records)
    else:
        style = Styler(use_colour(out, args.color))
        out.write(_diff_text(diff, left, right, equal, stats, verdict, style, args.suggest) + "\n")
    return EXIT_IDENTICAL if identical else EXIT_DIFFERENT


def _suggestion_records(diff: Diff) -> dict[str, Any]:
    return {
        "suggestions": [
            {
                "a_key": s.model_key,
                "b_key": s.checkpoint_key,
                "score": s.score,
                "ambiguous": s.ambiguous,
                "other_a_keys": list(s.other_model_keys),
                "other_b_keys": list(s.other_checkpoint_keys),
                "reason": s.reason,
            }
            for s in diff.suggestions
        ],
        "rule_suggestions": [
            {"pattern": r.pattern, "replacement": r.replacement, "pairs": r.pairs}
            for r in diff.rule_suggestions
        ],
    }


def _suggestion_lines(diff: Diff) -> list[str]:
    """Suggested rules (each as the --rename that takes it) and pairs, a vs b."""
    lines = []
    for rule in diff.rule_suggestions:
        escaped = rule.pattern.replace("=", "\\=")  # the first bare = splits REGEX=REPL
        option = f"--rename {shlex.quote(f'{escaped}={rule.replacement}')}"
        lines.append(f"rule: {visible(option)}  (pairs {rule.pairs} more keys)")
    for s in diff.suggestions:
        lines.append(
            f"pair: a {visible(s.model_key)} <- b {visible(s.checkpoint_key)}  "
            f"(score {s.score:.2f}; {visible(s.reason)})"
        )
    return lines or ["no rename suggestions"]


def _verdict(diff: Diff, equal: dict[str, bool] | None, stats: ValueStats | None) -> str:
    differing = [k for k, same in (equal or {}).items() if not same]
    nonfinite = [e.key for e in stats or () if e.nonfinite]
    parts = []
    if not diff.identical:
        counts = ", ".join(f"{n} {s}" for s, n in diff.counts.items() if n and s != "match")
        renamed = sum(1 for r in diff.rows if r.note.startswith("renamed"))
        if renamed:
            counts = ", ".join(p for p in (counts, f"{renamed} renamed") if p)
        parts.append(f"keys, shapes or dtypes differ ({counts})")
    if equal is None:
        parts.append("values not compared (add --stats)")
    elif differing:
        parts.append(f"values differ in {len(differing)} of {len(equal)} tensor pairs")
    if nonfinite:
        shown = ", ".join(visible(k) for k in nonfinite[:5])
        parts.append(f"{len(nonfinite)} tensor pair(s) hold NaN/Inf: {shown}")
    if diff.identical and equal is not None and not differing:
        return "identical: same keys, shapes, dtypes and bytes"
    if diff.identical and equal is None:
        return "same keys, shapes and dtypes; " + parts[-1]
    return "different: " + "; ".join(parts)


def _diff_text(
    diff: Diff,
    left: Checkpoint,
    right: Checkpoint,
    equal: dict[str, bool] | None,
    stats: ValueStats | None,
    verdict: str,
    style: Styler,
    suggest: bool = False,
) -> str:
    headers = ["status", "a key", "shape", "dtype", "b key", "shape", "dtype"]
    if equal is not None:
        headers.append("values")
    if stats is not None:
        headers += [title for title, _ in _STAT_CELLS] + ["NaN/Inf a", "NaN/Inf b"]
    headers.append("note")
    rows = []
    for row in diff.rows:
        cells = row_cells(row)
        if equal is not None:
            cells.append("" if row.key not in equal else ("same" if equal[row.key] else "differ"))
        notes = [row.note] if row.note else []
        if stats is not None:
            entry = stats.get(row.key)
            if entry is None:
                cells += [""] * (len(_STAT_CELLS) + 2)
            else:
                cells += [format_number(getattr(entry, field)) for _, field in _STAT_CELLS]
                cells += [f"{entry.nan_a}/{entry.inf_a}", f"{entry.nan_b}/{entry.inf_b}"]
                if entry.note:
                    notes.append(entry.note)
        cells.append("; ".join(notes))
        rows.append(cells)
    status_column = 0
    values_column = headers.index("values") if "values" in headers else -1
    nonfinite_columns = {i for i, h in enumerate(headers) if h.startswith("NaN/Inf")}

    def colour_of(column: int, cell: str) -> str | None:
        if column == status_column:
            return _STATUS_COLOURS.get(cell.strip())
        if column == values_column:
            return {"same": "green", "differ": "red"}.get(cell.strip())
        if column in nonfinite_columns and cell.strip() not in ("", "0/0"):
            return "red"
        return None

    hint = "listed below" if suggest else "add --suggest to list them"
    head = [_side_line("a", left), _side_line("b", right), visible_lines(diff.summary_for(hint))]
    table = aligned_table(headers, rows, style, colour_of)
    verdict_line = style(verdict, "green" if verdict.startswith("identical") else "bold")
    below = "\n\nrename suggestions (b keys to a keys, none applied):\n" + "\n".join(
        _suggestion_lines(diff)
    )
    return "\n".join(head) + "\n\n" + table + (below if suggest else "") + "\n\n" + verdict_line


# -- entry point ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from ckptviz import __version__

    parser = argparse.ArgumentParser(
        prog="ckptviz",
        description="Look inside PyTorch checkpoints and compare them, without loading them "
        "whole. Exit status: 0 identical, 1 different, 2 trouble.",
    )
    parser.add_argument("--version", action="version", version=f"ckptviz {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    safety = argparse.ArgumentParser(add_help=False)
    group = safety.add_argument_group("unsafe checkpoints (read with weights_only=True otherwise)")
    group.add_argument(
        "--allow-global",
        action="append",
        metavar="NAME",
        help="allow this harmless pickle global (argparse.Namespace, numpy arrays, scalars and "
        "dtypes, pathlib paths, frozenset, slice; any other needs --trusted); repeat for several",
    )
    group.add_argument(
        "--trusted",
        action="store_true",
        help="unpickle fully: only for files you trust, it can run any code they contain",
    )
    output = argparse.ArgumentParser(add_help=False)
    formats = output.add_mutually_exclusive_group()
    formats.add_argument(
        "--json", dest="format", action="store_const", const="json", help="JSON for scripts"
    )
    formats.add_argument(
        "--csv", dest="format", action="store_const", const="csv", help="CSV, one row per tensor"
    )
    output.set_defaults(format="text")
    output.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default="auto",
        help="colour the table (auto: only on a terminal, and not when NO_COLOR is set)",
    )

    inspect = commands.add_parser(
        "inspect",
        parents=[output, safety],
        help="list a checkpoint's tensors",
        description="List a checkpoint's tensors (name, shape, dtype, size) from its metadata, "
        "where the state dict sits in a nested checkpoint, its wrapper prefix and the entries "
        "that are not tensors. No tensor data is read.",
    )
    inspect.add_argument("file", help="a torch (.pt/.pth/.bin/.ckpt) or .safetensors file")
    inspect.add_argument(
        "--key",
        help="where the state dict is in a nested checkpoint, e.g. state_dict or ema/module",
    )
    inspect.set_defaults(run=run_inspect)

    diff = commands.add_parser(
        "diff",
        parents=[output, safety],
        help="compare two checkpoints",
        description="Line up checkpoint A against checkpoint B (wrapper prefixes are found on "
        "their own) and list every tensor with its status: match, dtype, shape, missing (in A "
        "only), unexpected (in B only). When keys, shapes and dtypes agree the bytes are compared "
        "too. Exit status: 0 identical, 1 different, 2 trouble.",
    )
    diff.add_argument("a", help="checkpoint A, the reference (relative change is |A-B|/|A|)")
    diff.add_argument("b", help="checkpoint B")
    diff.add_argument(
        "--stats",
        action="store_true",
        help="compare values: relative change, max |A-B|, cosine, NaN/Inf counts per tensor "
        "(streamed one tensor pair at a time)",
    )
    diff.add_argument(
        "--rename",
        action="append",
        metavar="REGEX=REPL",
        help="rename B's keys before matching (RE2 regex: no backreferences or lookarounds; "
        "\\1 for groups; \\= for a literal =); repeat for several",
    )
    diff.add_argument(
        "--key-a", metavar="KEY", help="where the state dict is inside A (nested checkpoints)"
    )
    diff.add_argument(
        "--key-b", metavar="KEY", help="where the state dict is inside B (nested checkpoints)"
    )
    diff.add_argument(
        "--no-values",
        action="store_true",
        help="compare keys, shapes and dtypes only; never read tensor data",
    )
    diff.add_argument(
        "--suggest",
        action="store_true",
        help="list rename suggestions: rules (as the --rename that takes each) and pairs of "
        "keys, ambiguous ones marked; none is applied",
    )
    diff.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    diff.add_argument(
        "--memory-budget",
        type=float,
        default=DEFAULT_MEMORY_BUDGET / 2**20,
        metavar="MIB",
        help="MiB of file data read before the files are reopened, which bounds memory "
        "(default %(default).0f)",
    )
    diff.set_defaults(run=run_diff)
    return parser


def _side_line(name: str, ckpt: Checkpoint) -> str:
    where = f", at {visible(ckpt.location_text)}" if ckpt.location else ""
    return f"{name}: {visible(ckpt.source)} ({visible(ckpt.format)}{where})"


def _error(message: str) -> None:
    """The message on stderr, its file-controlled parts (names, keys) made visible."""
    sys.stderr.write(f"ckptviz: error: {visible_lines(message)}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 identical, 1 different, 2 trouble)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "memory_budget", 1) <= 0:
        parser.error("--memory-budget must be a positive number of MiB")
    try:
        status: int = args.run(args, sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader (head, less) left early: stay quiet, and keep Python's exit-time flush
        # from failing again on the closed pipe
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_TROUBLE
    except UnsafeCheckpointError as exc:
        _error(exc.command_line_message)  # the Python API's words, options spelled for here
        return EXIT_TROUBLE
    except CkptvizError as exc:
        _error(str(exc))
        return EXIT_TROUBLE
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        _error(f"{where}{exc.strerror or exc}")
        return EXIT_TROUBLE
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Exception as exc:
        _error(
            f"unexpected {type(exc).__name__}: {exc}. This is a bug in ckptviz; please report "
            "it with the command you ran."
        )
        return EXIT_TROUBLE
    return status
