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

from collections import Counter
from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING

from ckptviz.core.formats import format_named, torch_zip
from ckptviz.core.plan import initialiser_of, reinit_seed

if TYPE_CHECKING:
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


def _numbers_literal(numbers: list[int]) -> str:
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
            f"    ({loop.model_prefix!r}, {loop.ckpt_prefix!r}, {_numbers_literal(loop.numbers)}, ["
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
            numbers = _numbers_literal(loop.numbers)
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


#: One module to re-initialise: its name, its initialiser and the tensors taken from it.
_Reinit = tuple[str, str, list[str]]


def _block_split(module_name: str) -> tuple[str, int, str] | None:
    """``"layers.3.attn"`` -> ``("layers.", 3, ".attn")``: split at the first block number."""
    parts = module_name.split(".")
    for i, part in enumerate(parts):
        if part.isascii() and part.isdigit() and str(int(part)) == part:
            prefix = ".".join(parts[:i]) + "." if i else ""
            suffix = "".join("." + p for p in parts[i + 1 :])
            return prefix, int(part), suffix
    return None


def _reinit_loops(
    seed: int | None, reinit: dict[tuple[str, str], list[str]]
) -> tuple[list[_Reinit], list[tuple[str, list[int], list[tuple[str, str, list[str]]]]]]:
    """The modules to re-initialise as (one by one, loops over numbered blocks that are
    re-initialised alike). With ``seed=None`` the global RNG makes the order matter, so
    everything stays one by one, in plan order."""
    entries = [(module, method, names) for (module, method), names in reinit.items()]
    if seed is None:
        return entries, []
    blocks: dict[str, dict[int, list[tuple[str, str, list[str]]]]] = {}
    for module, method, names in entries:
        split = _block_split(module)
        if split is not None:
            prefix, number, suffix = split
            blocks.setdefault(prefix, {}).setdefault(number, []).append((suffix, method, names))
    looped: set[str] = set()
    loops = []
    for prefix, by_number in blocks.items():
        kinds = Counter(repr(modules) for modules in by_number.values())
        common, count = kinds.most_common(1)[0]
        if count < LOOP_FROM:
            continue
        numbers = sorted(n for n, modules in by_number.items() if repr(modules) == common)
        template = by_number[numbers[0]]
        loops.append((prefix, numbers, template))
        looped.update(f"{prefix}{n}{suffix}" for n in numbers for suffix, _, _ in template)
    return [e for e in entries if e[0] not in looped], loops


def reinit_lines(seed: int | None, reinit: dict[tuple[str, str], list[str]]) -> list[str]:
    """Lines that build ``reinit``: (module, initialiser, tensor names, seed) per module; numbered
    blocks re-initialised alike as a loop, each module's seed worked out from its name as
    ``Plan`` does (``(seed + crc32(name)) % 2**31``)."""
    if not reinit:
        return []
    one_by_one, loops = _reinit_loops(seed, reinit)
    seed_note = "seed" if seed is not None else "seed (None: global RNG)"
    comment = f"module, its initialiser, tensors to take from it, {seed_note}"
    if one_by_one:
        lines = [f"reinit = [  # {comment}"]
        for module_name, method, names in one_by_one:
            module_seed = reinit_seed(seed, module_name) if seed is not None else None
            lines.append(f"    ({module_name!r}, {method!r}, {names!r}, {module_seed!r}),")
        lines.append("]")
    else:
        lines = [f"reinit = []  # {comment}"]
    if not loops:
        return lines
    lines += [
        "# numbered blocks re-initialised alike: module = prefix + number + suffix",
        "for prefix, numbers, modules in [",
    ]
    for prefix, numbers, modules in loops:
        lines.append(f"    ({prefix!r}, {_numbers_literal(numbers)}, [")
        lines += [f"        {module!r}," for module in modules]
        lines.append("    ]),")
    lines += [
        "]:",
        "    for i in numbers:",
        "        for suffix, initialiser, names in modules:",
        "            module_name = f'{prefix}{i}{suffix}'",
        f"            module_seed = ({seed!r} + zlib.crc32(module_name.encode())) % 2**31",
        "            reinit.append((module_name, initialiser, names, module_seed))",
    ]
    return lines


def _read_lines(plan: Plan) -> list[str]:
    ckpt = plan.diff.checkpoint
    if ckpt.path is None:
        return [
            f"# The checkpoint was {ckpt.source!r}, not a file: put that state dict in `state`.",
            "state = state_dict",
        ]
    wanted = [r.checkpoint_key for r, a in plan if a in ("load", "partial") and r.model]
    keys = [k for k in wanted if k is not None]
    # a plan file that recorded no known format: torch.load's lines
    fmt = format_named(ckpt.format) or torch_zip.FORMAT
    return fmt.read_code(ckpt, keys)


def _meta_guard(plan: Plan) -> list[str]:
    """For a model on the meta device: copying into it would silently do nothing, so stop."""
    model = plan.diff.model
    written = {r.key for r, a in plan if r.model and a != "keep"}
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


def reinit_groups(plan: Plan) -> dict[tuple[str, str], list[str]]:
    """The plan's ``reinit`` tensors by (module, the initialiser that sets them), as the code
    calls them: one seeded call per module and method."""
    reinit: dict[tuple[str, str], list[str]] = {}
    model = plan.diff.model
    for key in plan.keys_with("reinit"):
        module_name, _, tensor_name = key.rpartition(".")
        method = "reset_parameters"
        if model is not None:
            method = initialiser_of(model.get_submodule(module_name), tensor_name) or method
        reinit.setdefault((module_name, method), []).append(tensor_name)
    return reinit


def plan_code(plan: Plan) -> str:
    load = [(r.key, r.checkpoint_key or "") for r, a in plan if a == "load" and r.model]
    partial = [(r.key, r.checkpoint_key or "") for r, a in plan if a == "partial" and r.model]
    reinit = reinit_groups(plan)
    counts = ", ".join(f"{c['rows']} {a}" for a, c in plan.counts.items() if c["rows"])

    lines = [
        f"# ckptviz plan for {plan.diff.checkpoint.source!r}, in plain PyTorch: {counts}.",
        "# Rows not listed keep the model's current values. Needs `model` in scope.",
    ]
    if reinit:
        lines.append("import copy")
        if _reinit_loops(plan.seed, reinit)[1]:
            lines.append("import zlib")
        lines.append("")
    lines += ["import torch", ""]
    lines += _read_lines(plan)
    lines += ["params = model.state_dict(keep_vars=True)", ""]
    lines += _meta_guard(plan)
    lines += mapping_lines("load", "model key: checkpoint key", load)
    lines += mapping_lines("partial", "copy the overlapping slice, keep the rest", partial)
    lines += reinit_lines(plan.seed, reinit)
    lines += ["", "with torch.no_grad():"]
    body = []
    if load:
        body += [
            "for name, ckpt_name in load.items():",
            "    params[name].copy_(state[ckpt_name])",
        ]
    if partial:
        body += [
            "for name, ckpt_name in partial.items():",
            "    dst, src = params[name], state[ckpt_name]",
            "    overlap = tuple(slice(0, min(a, b)) for a, b in zip(dst.shape, src.shape))",
            "    dst[overlap].copy_(src[overlap])",
        ]
    if reinit:
        body += [
            "for module_name, initialiser, names, seed in reinit:",
            "    module = model.get_submodule(module_name)",
            "    fresh = copy.deepcopy(module)",
            "    with torch.random.fork_rng(devices=[], enabled=seed is not None):",
            "        if seed is not None:",
            "            torch.manual_seed(seed)",
            "        getattr(fresh, initialiser)()",
            "    for name in names:",
            "        getattr(module, name).copy_(getattr(fresh, name))",
        ]
    if not body:
        body = ["pass  # the plan changes nothing"]
    lines += ["    " + line for line in body]
    return "\n".join(lines) + "\n"
