"""``Plan.to_code()``: the plan as a short plain-PyTorch snippet (no ckptviz import).

It is the hand-written recipe, written for you: read the checkpoint with ``weights_only=True``,
copy what loads, copy the overlap of what partially loads, re-initialise from a seeded copy of
the owning module. With ``model`` in scope it gives the same tensors as ``plan.apply(model)``.

Big plans stay short: numbered blocks that hold the same tensors (``layers.0`` ...
``layers.999``) are written once, as a loop over the block numbers, with the few keys that
differ dropped or listed one by one; modules re-initialised alike in every block likewise.
The dicts the loops build are checked, when the code is written, to hold exactly the plan's pairs.

File names, checkpoint keys, rename rules and every field of a plan JSON are data: they appear in
the code only as Python literals written by ``repr`` (a comment quoting one quotes its ``repr``
too), so a newline or a quote in them can never start a statement of its own. The loops join
such literals with block numbers in f-strings whose only fields are variables.
"""

from __future__ import annotations

import inspect
import textwrap
from collections import Counter
from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING, Any

from ckptviz.core.formats import format_named, torch_zip

if TYPE_CHECKING:
    from ckptviz.core.diff import Row
    from ckptviz.core.plan import Plan


#: A group of keys is written as a loop once this many numbered blocks share tensor names.
LOOP_FROM = 3
#: Widest line of packed names in the generated code.
CODE_WIDTH = 96


@dataclass(frozen=True)
class _Numbered:
    """A model key ``model_prefix + number + '.' + name`` fed by the checkpoint key
    ``ckpt_prefix + number + '.' + name``: one tensor of a numbered block."""

    model_prefix: str
    ckpt_prefix: str
    number: int
    name: str


def _numbered(model_key: str, ckpt_key: str) -> _Numbered | None:
    """``model_key`` split at its first block number, if ``ckpt_key`` ends the same way."""
    parts = model_key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isascii() and part.isdigit() and str(int(part)) == part:
            name = ".".join(parts[i + 1 :])
            tail = f"{part}.{name}"
            if ckpt_key == tail:
                ckpt_prefix = ""
            elif ckpt_key.endswith("." + tail):
                ckpt_prefix = ckpt_key[: -len(tail)]
            else:
                return None
            model_prefix = ".".join(parts[:i]) + "." if i else ""
            return _Numbered(model_prefix, ckpt_prefix, int(part), name)
    return None


def _packed(items: list[str], indent: str) -> list[str]:
    """``items`` (literals) a few to a line, each line ending in a comma."""
    lines: list[str] = []
    line = ""
    for item in items:
        if line and len(indent) + len(line) + len(item) + 2 > CODE_WIDTH:
            lines.append(indent + line.rstrip())
            line = ""
        line += item + ", "
    if line:
        lines.append(indent + line.rstrip())
    return lines


def numbers_literal(numbers: list[int]) -> str:
    """``range(0, 24)`` (or ``range(0, 24, 4)``) for evenly spaced numbers, else a list in
    which runs of three or more are ranges: ``[*range(0, 7), 9, *range(12, 40)]``."""
    if len(numbers) >= 3:
        step = numbers[1] - numbers[0]
        if step > 0 and all(b - a == step for a, b in pairwise(numbers)):
            stop = numbers[-1] + 1
            return (
                f"range({numbers[0]}, {stop})"
                if step == 1
                else f"range({numbers[0]}, {stop}, {step})"
            )
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    parts = []
    for run in runs:
        if len(run) >= 3:
            parts.append(f"*range({run[0]}, {run[-1] + 1})")
        else:
            parts += [str(n) for n in run]
    return "[" + ", ".join(parts) + "]"


@dataclass
class _Loop:
    """Blocks ``model_prefix + n`` (``n`` in ``numbers``) that each hold ``names``."""

    model_prefix: str
    ckpt_prefix: str
    names: tuple[str, ...]
    numbers: list[int]


def _compacted(
    pairs: list[tuple[str, str]],
) -> tuple[list[tuple[str, str]], list[_Loop], list[tuple[str, int, str]]]:
    """``pairs`` as (pairs one by one, loops over numbered blocks, keys the loops must drop as
    (model prefix, number, name)).

    Per numbered block kind (model and checkpoint prefix), the commonest set of tensor names is
    the loop's; a block holding at least half of them joins the loop, its other names one by
    one and the names it lacks dropped; a kind becomes a loop only from ``LOOP_FROM`` blocks
    and when that writes fewer lines.
    """
    kinds: dict[tuple[str, str], dict[int, list[str]]] = {}
    for model_key, ckpt_key in pairs:
        numbered = _numbered(model_key, ckpt_key)
        if numbered is not None:
            blocks = kinds.setdefault((numbered.model_prefix, numbered.ckpt_prefix), {})
            blocks.setdefault(numbered.number, []).append(numbered.name)
    looped: set[str] = set()
    loops: list[_Loop] = []
    dropped: list[tuple[str, int, str]] = []
    for (model_prefix, ckpt_prefix), blocks in kinds.items():
        sets = Counter(tuple(names) for names in blocks.values())
        template = sets.most_common(1)[0][0]
        wanted = set(template)
        members = [
            n for n, names in blocks.items() if 2 * len(wanted.intersection(names)) >= len(wanted)
        ]
        lacking = [
            (model_prefix, n, name) for n in members for name in template if name not in blocks[n]
        ]
        covered = sum(len(wanted.intersection(blocks[n])) for n in members)
        loop_lines = 3 + len(_packed([repr(name) for name in template], ""))
        loop_lines += 4 + len(_dropped_loops(lacking)) if lacking else 0
        if len(members) < LOOP_FROM or loop_lines >= covered:
            continue
        loops.append(_Loop(model_prefix, ckpt_prefix, template, sorted(members)))
        dropped += lacking
        looped.update(
            f"{model_prefix}{n}.{name}" for n in members for name in blocks[n] if name in wanted
        )
    one_by_one = [(m, c) for m, c in pairs if m not in looped]
    return one_by_one, loops, dropped


def _dropped_loops(dropped: list[tuple[str, int, str]]) -> list[_Loop]:
    """The keys to drop as loops: per prefix, the names dropped from the same numbers."""
    numbers: dict[tuple[str, str], list[int]] = {}
    for prefix, n, name in dropped:
        numbers.setdefault((prefix, name), []).append(n)
    names: dict[tuple[str, tuple[int, ...]], list[str]] = {}
    for (prefix, name), ns in numbers.items():
        names.setdefault((prefix, tuple(ns)), []).append(name)
    return [_Loop(prefix, "", tuple(nm), list(ns)) for (prefix, ns), nm in names.items()]


def _expanded(
    one_by_one: list[tuple[str, str]], loops: list[_Loop], dropped: list[_Loop]
) -> dict[str, str]:
    """What the generated lines build: the check that compacting kept every pair."""
    built: dict[str, str] = {}
    for loop in loops:
        for n in loop.numbers:
            for name in loop.names:
                built[f"{loop.model_prefix}{n}.{name}"] = f"{loop.ckpt_prefix}{n}.{name}"
    for loop in dropped:
        for n in loop.numbers:
            for name in loop.names:
                del built[f"{loop.model_prefix}{n}.{name}"]
    built.update(one_by_one)
    return built


def mapping_lines(name: str, comment: str, pairs: list[tuple[str, str]]) -> list[str]:
    """Lines that build the dict ``name`` of model key -> checkpoint key: one line per pair,
    or, for numbered blocks of the same tensors (``layers.0`` ... ``layers.999``), a loop.
    Every key is a ``repr`` literal; the f-strings only join such literals with numbers."""
    if not pairs:
        return []
    one_by_one, loops, lacking = _compacted(pairs)
    dropped = _dropped_loops(lacking)
    if loops and _expanded(one_by_one, loops, dropped) != dict(pairs):
        # loops of one model prefix read from several checkpoint prefixes can overlap: then
        # the plain list, which is always right
        one_by_one, loops, dropped = pairs, [], []
    if not loops:
        lines = [f"{name} = {{  # {comment}"]
        lines += [f"    {m!r}: {c!r}," for m, c in one_by_one]
        return [*lines, "}"]
    lines = [f"{name} = {{}}  # {comment}"]
    model_key, ckpt_key = "f'{model_prefix}{i}.{tensor}'", "f'{ckpt_prefix}{i}.{tensor}'"
    lines += [
        "# numbered blocks holding the same tensors: model prefix + number + '.' + name, read",
        "# from checkpoint prefix + number + '.' + name",
        "for model_prefix, ckpt_prefix, numbers, names in [",
    ]
    for loop in loops:
        lines.append(
            f"    ({loop.model_prefix!r}, {loop.ckpt_prefix!r}, {numbers_literal(loop.numbers)}, ["
        )
        lines += _packed([repr(n) for n in loop.names], " " * 8)
        lines.append("    ]),")
    lines += [
        "]:",
        "    for i in numbers:",
        "        for tensor in names:",
        f"            {name}[{model_key}] = {ckpt_key}",
    ]
    if dropped:
        lines.append("for model_prefix, numbers, names in [  # in those blocks, but not here")
        for loop in dropped:
            listed = ", ".join(repr(n) for n in loop.names)
            numbers = numbers_literal(loop.numbers)
            lines.append(f"    ({loop.model_prefix!r}, {numbers}, [{listed}]),")
        lines += [
            "]:",
            "    for i in numbers:",
            "        for tensor in names:",
            f"            del {name}[{model_key}]",
        ]
    if one_by_one:
        lines.append(f"{name}.update({{  # the others, one by one")
        lines += [f"    {m!r}: {c!r}," for m, c in one_by_one]
        lines.append("})")
    return lines


def _read_lines(plan: Plan) -> list[str]:
    ckpt = plan.diff.checkpoint
    if ckpt.path is None:
        return [
            f"# The checkpoint was {ckpt.source!r}, not a file: put that state dict in `state`.",
            "state = state_dict",
        ]
    from ckptviz.core.actions import checkpoint_reads

    keys = list(checkpoint_reads(plan))  # rows' own tensors and what actions need besides
    # a plan file that recorded no known format: torch.load's lines
    fmt = format_named(ckpt.format) or torch_zip.FORMAT
    return fmt.read_code(ckpt, keys)


def _meta_guard(plan: Plan) -> list[str]:
    """For a model on the meta device: copying into it would silently do nothing, so stop."""
    model = plan.diff.model
    from ckptviz.core.actions import action_named

    written = {r.key for r, a in plan if r.model and action_named(a).writes}
    if model is None or not any(
        t.is_meta for k, t in model.state_dict(keep_vars=True).items() if k in written
    ):
        return []
    return [
        "# The model was on the meta device (shapes, no storage), where copies do nothing:",
        "# give it storage first, e.g. model.to_empty(device='cpu'), or use",
        "# plan.apply(model, materialise='cpu'), which gives storage to the written tensors only.",
        "if any(t.is_meta for t in params.values()):",
        "    raise RuntimeError('the model is on the meta device: materialise it first')",
        "",
    ]


def plan_code(plan: Plan) -> str:
    from ckptviz.core.actions import CodeContext, registered_actions

    by_action: dict[str, list[tuple[Row, dict[str, Any]]]] = {}
    for row, action in plan:
        if row.model is not None:
            by_action.setdefault(action, []).append((row, plan.options(row.key)))
    parts = [
        action.code(CodeContext(plan, by_action[action.name]))
        for action in registered_actions()
        if action.name in by_action
    ]
    counts = ", ".join(f"{c['rows']} {a}" for a, c in plan.counts.items() if c["rows"])

    lines = [
        f"# ckptviz plan for {plan.diff.checkpoint.source!r}, in plain PyTorch: {counts}.",
        "# Rows not listed keep the model's current values. Needs `model` in scope.",
    ]
    imports = list(dict.fromkeys(line for part in parts for line in part.imports))
    if imports:
        lines += [*imports, ""]
    lines += ["import torch", ""]
    functions = list(dict.fromkeys(fn for part in parts for fn in part.functions))
    for function in functions:
        # the very functions apply runs: the code computes the same values, bit for bit
        lines += [*textwrap.dedent(inspect.getsource(function)).rstrip().splitlines(), "", ""]
    lines += _read_lines(plan)
    lines += ["params = model.state_dict(keep_vars=True)", ""]
    lines += _meta_guard(plan)
    for part in parts:
        lines += part.data
    lines += ["", "with torch.no_grad():"]
    body = [line for part in parts for line in part.body]
    if not body:
        body = ["pass  # the plan changes nothing"]
    lines += ["    " + line for line in body]
    return "\n".join(lines) + "\n"
