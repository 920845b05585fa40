"""``reinit``: a fresh value from the owning module's own initialiser, for exactly that tensor.

The initialiser runs on a copy of the module (the model is written only by apply), seeded per
module from the plan's seed (``reinit_seed``), once per module and initialiser for all the
tensors taken from it.
"""

from __future__ import annotations

import copy
import zlib
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from ckptviz.core._torch_private import forward_pre_hooks, tensor_version
from ckptviz.core.actions.base import (
    ActionDef,
    CodeContext,
    CodePart,
    DetailContext,
    PrepareContext,
    RowContext,
    ShardWrite,
    ValueContext,
)
from ckptviz.core.codegen import LOOP_FROM, numbers_literal
from ckptviz.core.errors import PlanError

if TYPE_CHECKING:
    from ckptviz.core.plan import Plan

_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


def initialiser_of(module: torch.nn.Module, tensor_name: str) -> str | None:
    """The method of ``module`` that initialises ``tensor_name``, if it has one."""
    if tensor_name in _RUNNING_STATS and hasattr(module, "reset_running_stats"):
        return "reset_running_stats"
    for method in ("reset_parameters", "_reset_parameters"):
        if callable(getattr(module, method, None)):
            return method
    return None


def reinit_seed(seed: int, module_name: str) -> int:
    """A per-module seed, stable across runs and processes (unlike ``hash``)."""
    return (seed + zlib.crc32(module_name.encode())) % 2**31


def _reparametrized_by(module: torch.nn.Module, tensor_name: str) -> str | None:
    """The old-style hook (``torch.nn.utils.weight_norm``/``spectral_norm``) owning a tensor."""
    wrappers = {"WeightNorm": "weight_norm", "SpectralNorm": "spectral_norm"}
    for hook in forward_pre_hooks(module):
        wrapper = wrappers.get(type(hook).__name__)
        name = getattr(hook, "name", None)
        if wrapper and isinstance(name, str) and tensor_name.startswith(f"{name}_"):
            return f"torch.nn.utils.{wrapper}"
    return None


def fresh_values(
    keys: list[str],
    model: torch.nn.Module,
    seed: int | None,
    materialise: torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Each of ``keys``' new value, from a copy of its module re-initialised."""
    groups: dict[tuple[str, str], list[str]] = {}
    for key in keys:
        module_name, _, tensor_name = key.rpartition(".")
        method = initialiser_of(model.get_submodule(module_name), tensor_name)
        assert method is not None  # _refuse checked it
        groups.setdefault((module_name, method), []).append(tensor_name)
    fresh: dict[str, torch.Tensor] = {}
    for (module_name, method), names in groups.items():
        module = model.get_submodule(module_name)
        keys = [f"{module_name}.{n}" if module_name else n for n in names]
        try:
            # the initialiser runs on a copy: the model is written only by _write
            clone = copy.deepcopy(module)
            if any(t.is_meta for t in clone.state_dict(keep_vars=True).values()):
                # a meta module initialises nothing: give the copy storage, then initialise it
                clone.to_empty(device=materialise or "cpu")
            before = {n: (id(getattr(clone, n)), tensor_version(getattr(clone, n))) for n in names}
            with _seeded(seed, module_name):
                getattr(clone, method)()
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
            raise PlanError(
                f"cannot reinit {', '.join(keys)}: running {type(module).__name__}.{method}() "
                f"on a copy of {module_name or 'the model'} failed ({type(exc).__name__}: "
                f"{reason}); keep it instead. Nothing was changed",
                dict.fromkeys(keys, f"{method}() failed on a copy of the module"),
            ) from None
        for name in names:
            value = getattr(clone, name)
            key = f"{module_name}.{name}" if module_name else name
            if (id(value), tensor_version(value)) == before[name]:
                raise PlanError(
                    f"cannot reinit {key}: {type(module).__name__}.{method}() does not initialise "
                    f"{name!r} (a parametrization or custom tensor); keep it instead",
                    {key: f"{method}() does not initialise it"},
                )
            fresh[key] = value.detach()
    return fresh


@contextmanager
def _seeded(seed: int | None, module_name: str) -> Iterator[None]:
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(reinit_seed(seed, module_name))
        yield


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
        lines.append(f"    ({prefix!r}, {numbers_literal(numbers)}, [")
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


def reinit_groups(plan: Plan, keys: list[str]) -> dict[tuple[str, str], list[str]]:
    """The plan's ``reinit`` tensors by (module, the initialiser that sets them), as the code
    calls them: one seeded call per module and method."""
    reinit: dict[tuple[str, str], list[str]] = {}
    model = plan.diff.model
    for key in keys:
        module_name, _, tensor_name = key.rpartition(".")
        method = "reset_parameters"
        if model is not None:
            method = initialiser_of(model.get_submodule(module_name), tensor_name) or method
        reinit.setdefault((module_name, method), []).append(tensor_name)
    return reinit


def _refuse(ctx: RowContext) -> str | None:
    model, m = ctx.model, ctx.row.model
    if model is None or m is None:
        return None  # checked when applied, against the model given then
    module_name, _, tensor_name = m.key.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return f"no module {module_name!r} owns it (a custom state_dict key)"
    if initialiser_of(module, tensor_name) is None:
        return (
            f"{type(module).__name__} ({module_name or 'the model'}) has no reset_parameters(); "
            "keep it, or give that module a reset_parameters method"
        )
    if wrapper := _reparametrized_by(module, tensor_name):
        return (
            f"{tensor_name} belongs to {wrapper} on {type(module).__name__} "
            f"({module_name or 'the model'}): the module's initialiser writes the weight that "
            f"{wrapper} computes, not {tensor_name}. Keep it, or remove {wrapper}, reinit, and "
            "apply it again"
        )
    return None


def _prepare(ctx: PrepareContext) -> Mapping[str, torch.Tensor]:
    return fresh_values([row.key for row, _ in ctx.rows], ctx.model, ctx.seed, ctx.materialise)


def _value(ctx: ValueContext) -> torch.Tensor:
    return ctx.prepared[ctx.row.key]


def _detail(ctx: DetailContext) -> str:
    return "fresh values from the module's initialiser"


def _code(ctx: CodeContext) -> CodePart:
    groups = reinit_groups(ctx.plan, [row.key for row, _ in ctx.rows])
    if not groups:
        return CodePart()
    imports = ["import copy"]
    if _reinit_loops(ctx.plan.seed, groups)[1]:
        imports.append("import zlib")
    body = [
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
    return CodePart(data=reinit_lines(ctx.plan.seed, groups), body=body, imports=imports)


ACTION = ActionDef(
    name="reinit",
    label="draw a fresh value with the module's own initialiser",
    symbol="↻",
    colour="accent",
    explain=(
        "reinit draws the tensor anew with its module's own initialiser (reset_parameters), "
        "seeded by the plan: for a layer the checkpoint has no fitting values for, such as a "
        "new classifier head."
    ),
    refuse=_refuse,
    refusal_needs_model=True,
    prepare=_prepare,
    value=_value,
    verified_detail=_detail,
    code=_code,
    distributed=ShardWrite.MODULE_INITIALISER,
)
