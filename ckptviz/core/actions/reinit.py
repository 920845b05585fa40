"""``reinit``: a fresh value for exactly that tensor, from the initialiser that owns it.

Which initialiser, in this order (the first that applies):

1. ``init=``: a function the person gave for the row (``plan.set("classifier", "reinit",
   init=my_init)``), called as ``my_init(module)`` on a copy of the owning module. It must be a
   plain function defined at the top level of a module, so the plan can name it: it is stored
   as ``"package.module:function"`` (a plan saved as JSON holds that string, and ``to_code()``
   imports it). A lambda, a closure, a method or a ``functools.partial`` is refused: it has no
   name a saved plan or its code could find again. Apply never imports a module a plan names
   (a plan file could name any installed module): import it first.
2. transformers: when a ``PreTrainedModel`` owns the module (the nearest one above it, the
   module itself included), its own ``_init_weights(module)`` runs on the copy, then on each
   module between them (a copy whose other tensors are shape-only ``meta`` stand-ins), children
   first, as ``PreTrainedModel.initialize_weights`` does, so a scheme a block applies to its
   children lands too (GPT-2 draws ``c_proj`` with std ``initializer_range / sqrt(2 * n_layer)``).
   ``_is_hf_initialized`` flags are cleared on the copy first (transformers' ``init`` helpers
   skip a flagged tensor, and ``from_pretrained`` flags every loaded one). GPT-2's ``Conv1D``
   has no ``reset_parameters`` and is initialised this way.
3. The module's own ``reset_parameters()`` / ``_reset_parameters()`` (``reset_running_stats()``
   for running statistics): what PyTorch runs when it builds the module.

Every initialiser runs on a deep copy of the owning module (the model is written only by
apply), under a per-module seed from the plan's seed (``reinit_seed``), once per module and
initialiser for all the tensors taken from it. ``Plan.to_code()`` runs the very same
``initialise`` function under the same seeds, so it reproduces apply bit for bit.
"""

from __future__ import annotations

import copy
import re
import sys
import types
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from ckptviz.core._torch_private import forward_pre_hooks, tensor_version
from ckptviz.core.actions.base import (
    ActionDef,
    CodeContext,
    CodePart,
    DetailContext,
    OptionSpec,
    PrepareContext,
    RowContext,
    RowsContext,
    ShardWrite,
    ValueContext,
)
from ckptviz.core.codegen import LOOP_FROM, numbers_literal
from ckptviz.core.errors import PlanError

if TYPE_CHECKING:
    from ckptviz.core.plan import Plan

_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")

#: How a module is initialised anew: (kind, name).
#: ``("function", "package.module:function")``: a function given as ``init=``;
#: ``("library", owner)``: the transformers model at ``owner`` runs its ``_init_weights``;
#: ``("method", name)``: the module's own method (``reset_parameters`` ...).
Initialiser = tuple[str, str]
FUNCTION, LIBRARY, METHOD = "function", "library", "method"
#: A reinit group of a plan whose model is not at hand (read from JSON): the generated code
#: asks ``own_initialiser`` when it runs, with the model then in scope.
OWN = "own"

_REFERENCE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*", re.ASCII)


#: The methods ``own_initialiser`` looks for on a module, in its order (it spells them itself:
#: its source is pasted into generated code; a test checks the two agree).
_METHODS = ("reset_parameters", "_reset_parameters")


def own_initialiser(
    model: torch.nn.Module, module_name: str, tensor_name: str
) -> tuple[str, str] | None:
    """What initialises the model's tensor ``module_name.tensor_name`` when no ``init=`` is
    given: the nearest transformers ``PreTrainedModel`` owning the module (``("library",
    owner)``), else the module's own method (``("method", name)``), else ``None``."""
    modeling = sys.modules.get("transformers.modeling_utils")  # imported by any transformers model
    pretrained = getattr(modeling, "PreTrainedModel", None)
    if pretrained is not None:
        parts = module_name.split(".") if module_name else []
        for end in range(len(parts), -1, -1):
            owner = ".".join(parts[:end])
            if isinstance(model.get_submodule(owner), pretrained):
                return "library", owner
    module = model.get_submodule(module_name)
    running_stats = ("running_mean", "running_var", "num_batches_tracked")
    if tensor_name in running_stats and hasattr(module, "reset_running_stats"):
        return "method", "reset_running_stats"
    for method in ("reset_parameters", "_reset_parameters"):
        if callable(getattr(module, method, None)):
            return "method", method
    return None


def initialise(
    model: torch.nn.Module,
    module_name: str,
    fresh: torch.nn.Module,
    kind: str,
    initialiser: str | Callable[[torch.nn.Module], object],
) -> None:
    """Initialise ``fresh``, a copy of the model's module ``module_name``, in place (the model
    is only read): ``kind`` ``"function"``: ``initialiser(fresh)``; ``"method"``: the copy's own
    method of that name; ``"library"``: the transformers model at ``initialiser`` runs its
    ``_init_weights`` on the copy, then on each module between them, children first as
    ``initialize_weights`` does (on a stand-in of that module holding ``fresh`` and, for every
    other tensor, a shape-only meta tensor), so a scheme a block applies to its children lands
    on ``fresh`` too."""

    def stand_in(module: torch.nn.Module, memo: dict[int, Any]) -> Any:
        # the same class and attributes with tables of its own: nothing reaches the model
        if id(module) in memo:
            return memo[id(module)]
        twin = object.__new__(type(module))
        twin.__dict__.update(module.__dict__)
        twin._parameters, twin._buffers, twin._modules = {}, {}, {}
        for table, twin_table in (
            (module._parameters, twin._parameters),
            (module._buffers, twin._buffers),
        ):
            for name, tensor in table.items():
                if tensor is not None and id(tensor) not in memo:
                    meta = torch.empty_like(tensor, device="meta")
                    if isinstance(tensor, torch.nn.Parameter):
                        meta = torch.nn.Parameter(meta, tensor.requires_grad)
                    memo[id(tensor)] = meta
                twin_table[name] = None if tensor is None else memo[id(tensor)]
        for name, child in module._modules.items():
            twin._modules[name] = None if child is None else stand_in(child, memo)
        memo[id(module)] = twin
        return twin

    for tensor in [*fresh.parameters(), *fresh.buffers()]:
        if hasattr(tensor, "_is_hf_initialized"):  # transformers' init helpers skip such tensors
            del tensor._is_hf_initialized
    if callable(initialiser):  # kind "function"
        initialiser(fresh)
    elif kind == "method":
        getattr(fresh, initialiser)()
    else:
        owner: Any = model.get_submodule(initialiser)  # a transformers PreTrainedModel
        owner._init_weights(fresh)
        parts = module_name.split(".") if module_name else []
        top = len(initialiser.split(".")) if initialiser else 0
        memo: dict[int, Any] = {id(model.get_submodule(module_name)): fresh}
        for end in range(len(parts) - 1, top - 1, -1):
            owner._init_weights(stand_in(model.get_submodule(".".join(parts[:end])), memo))


def reinit_seed(seed: int, module_name: str) -> int:
    """A per-module seed, stable across runs and processes (unlike ``hash``)."""
    return (seed + zlib.crc32(module_name.encode())) % 2**31


# -- init= functions ----------------------------------------------------------------------------


def function_reference(function: Any) -> str:
    """``"package.module:function"`` naming ``function``, as a plan stores an ``init=``;
    ``PlanError`` saying why if a saved plan or its code could not find it again by that name
    (a lambda, a closure, a method, a ``functools.partial``, a builtin)."""
    if isinstance(function, str):
        return function
    name = getattr(function, "__qualname__", None) or repr(function)
    unsaveable = (
        f"init={name} cannot be saved in the plan or re-run by its code (Plan.to_json, "
        "Plan.to_code): they name the function as 'package.module:function'"
    )
    fix = (
        "define it with def at the top level of a module (e.g. def init_head(module): ...) "
        "and pass that function, or its name 'package.module:function'"
    )
    if not isinstance(function, types.FunctionType):
        raise PlanError(f"{unsaveable}, and a {type(function).__name__} has no such name; {fix}")
    if function.__name__ == "<lambda>" or "<locals>" in function.__qualname__:
        what = (
            "a lambda" if function.__name__ == "<lambda>" else "a function defined inside another"
        )
        raise PlanError(f"{unsaveable}, and {what} has no such name; {fix}")
    where, name = function.__module__, function.__name__
    if function.__qualname__ != name or getattr(sys.modules.get(where), name, None) is not function:
        raise PlanError(
            f"{unsaveable}, and {function.__module__}:{function.__qualname__} does not lead back "
            f"to this function; {fix}"
        )
    return f"{where}:{name}"


def reference_problem(reference: str, *, resolve: bool = True) -> str | None:
    """Why the ``init=`` reference cannot be used (``None`` if it can); ``resolve=False`` checks
    only its form (a plan read from JSON, checked again against the running process when
    applied)."""
    if not _REFERENCE.fullmatch(reference):
        return (
            f"init={reference!r} is not 'package.module:function' (dotted Python names, then a "
            "colon and the function's name)"
        )
    if not resolve:
        return None
    module_name, _, name = reference.partition(":")
    module = sys.modules.get(module_name)
    if module is None:
        return (
            f"init={reference!r}: module {module_name!r} is not imported, and ckptviz never "
            "imports a module a plan names (a plan file could name any installed module); "
            f"import {module_name} first, then apply"
        )
    function = getattr(module, name, None)
    if not isinstance(function, types.FunctionType) or function.__name__ != name:
        return (
            f"init={reference!r}: {module_name}.{name} is not a function defined in that module "
            f"(found {type(function).__name__}); name a def at the top level of a module"
        )
    return None


def resolved_function(reference: str) -> Callable[[torch.nn.Module], Any]:
    """The function ``reference`` names (``PlanError`` if ``reference_problem`` finds one)."""
    if (problem := reference_problem(reference)) is not None:
        raise PlanError(problem)
    module_name, _, name = reference.partition(":")
    function: Callable[[torch.nn.Module], Any] = getattr(sys.modules[module_name], name)
    return function


def initialiser_for(
    model: torch.nn.Module, module_name: str, tensor_name: str, init: str = ""
) -> Initialiser | None:
    """The initialiser reinit runs for one tensor, in the order of the module's doc."""
    if init:
        return FUNCTION, init
    found: Initialiser | None = own_initialiser(model, module_name, tensor_name)
    return found


def describe(initialiser: Initialiser, model: torch.nn.Module | None = None) -> str:
    """Words naming an initialiser, as a report or an error says it."""
    kind, name = initialiser
    if kind == FUNCTION:
        return f"init={name}"
    if kind == LIBRARY:
        owner = type(model.get_submodule(name)).__name__ if model is not None else "the model"
        return f"transformers' {owner}._init_weights"
    return f"{name}()"


# -- fresh values ---------------------------------------------------------------------------------


def _reparametrized_by(module: torch.nn.Module, tensor_name: str) -> str | None:
    """The old-style hook (``torch.nn.utils.weight_norm``/``spectral_norm``) owning a tensor."""
    hooks = forward_pre_hooks(module)
    if not hooks:
        return None
    wrappers = {"WeightNorm": "weight_norm", "SpectralNorm": "spectral_norm"}
    for hook in hooks:
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
    inits: Mapping[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """Each of ``keys``' new value, from a copy of its module initialised anew; ``inits`` maps
    a key to the ``init=`` function named for it (``"package.module:function"``)."""
    groups: dict[tuple[str, Initialiser], list[str]] = {}
    for key in keys:
        module_name, _, tensor_name = key.rpartition(".")
        initialiser = initialiser_for(model, module_name, tensor_name, (inits or {}).get(key, ""))
        assert initialiser is not None  # _refuse checked it
        groups.setdefault((module_name, initialiser), []).append(tensor_name)
    fresh: dict[str, torch.Tensor] = {}
    for (module_name, initialiser), names in groups.items():
        module = model.get_submodule(module_name)
        keys = [f"{module_name}.{n}" if module_name else n for n in names]
        kind, name = initialiser
        words = describe(initialiser, model)
        function = resolved_function(name) if kind == FUNCTION else name
        try:
            # the initialiser runs on a copy: the model is written only by _write
            clone = copy.deepcopy(module)
            if any(t.is_meta for t in clone.state_dict(keep_vars=True).values()):
                # a meta module initialises nothing: give the copy storage, then initialise it
                clone.to_empty(device=materialise or "cpu")
            before = {n: (id(getattr(clone, n)), tensor_version(getattr(clone, n))) for n in names}
            with _seeded(seed, module_name):
                initialise(model, module_name, clone, kind, function)
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
            raise PlanError(
                f"cannot reinit {', '.join(keys)}: running {words} on a copy of "
                f"{module_name or 'the model'} ({type(module).__name__}) failed "
                f"({type(exc).__name__}: {reason}); keep it instead. Nothing was changed",
                dict.fromkeys(keys, f"{words} failed on a copy of the module"),
            ) from None
        for name in names:
            value = getattr(clone, name)
            key = f"{module_name}.{name}" if module_name else name
            if (id(value), tensor_version(value)) == before[name]:
                raise PlanError(
                    f"cannot reinit {key}: {words} does not initialise {name!r} of "
                    f"{type(module).__name__} (a parametrization or custom tensor); give it an "
                    "init= function (plan.set(key, 'reinit', init=my_init)), or keep it",
                    {key: f"{words} does not initialise it"},
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


# -- code -----------------------------------------------------------------------------------------

#: One module to initialise anew: its name, its initialiser and the tensors taken from it.
_Reinit = tuple[str, Initialiser, list[str]]


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
    seed: int | None, reinit: dict[tuple[str, Initialiser], list[str]]
) -> tuple[list[_Reinit], list[tuple[str, list[int], list[tuple[str, Initialiser, list[str]]]]]]:
    """The modules to re-initialise as (one by one, loops over numbered blocks that are
    re-initialised alike). With ``seed=None`` the global RNG makes the order matter, so
    everything stays one by one, in plan order."""
    entries = [(module, initialiser, names) for (module, initialiser), names in reinit.items()]
    if seed is None:
        return entries, []
    blocks: dict[str, dict[int, list[tuple[str, Initialiser, list[str]]]]] = {}
    for module, initialiser, names in entries:
        split = _block_split(module)
        if split is not None:
            prefix, number, suffix = split
            blocks.setdefault(prefix, {}).setdefault(number, []).append(
                (suffix, initialiser, names)
            )
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


def reinit_lines(seed: int | None, reinit: dict[tuple[str, Initialiser], list[str]]) -> list[str]:
    """Lines that build ``reinit``: (module, (kind, initialiser), tensor names, seed) per module;
    numbered blocks re-initialised alike as a loop, each module's seed worked out from its name
    as ``Plan`` does (``(seed + crc32(name)) % 2**31``)."""
    if not reinit:
        return []
    one_by_one, loops = _reinit_loops(seed, reinit)
    seed_note = "seed" if seed is not None else "seed (None: global RNG)"
    comment = f"module, (kind, initialiser), tensors to take from it, {seed_note}"
    if one_by_one:
        lines = [f"reinit = [  # {comment}"]
        for module_name, initialiser, names in one_by_one:
            module_seed = reinit_seed(seed, module_name) if seed is not None else None
            lines.append(f"    ({module_name!r}, {initialiser!r}, {names!r}, {module_seed!r}),")
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


def reinit_groups(plan: Plan, keys: list[str]) -> dict[tuple[str, Initialiser], list[str]]:
    """The plan's ``reinit`` tensors by (module, the initialiser that sets them), as the code
    calls them: one seeded call per module and initialiser. Without the model at hand (a plan
    read from JSON) a tensor without ``init=`` is its own group ``("own", tensor name)``, which
    the code resolves with ``own_initialiser`` when it runs (one call per tensor under the
    module's seed gives the same values as one call for all of them)."""
    reinit: dict[tuple[str, Initialiser], list[str]] = {}
    model = plan.diff.model
    for key in keys:
        module_name, _, tensor_name = key.rpartition(".")
        init = str(plan.options(key).get("init") or "")
        initialiser: Initialiser | None
        if model is not None:
            initialiser = initialiser_for(model, module_name, tensor_name, init)
        else:
            initialiser = (FUNCTION, init) if init else (OWN, tensor_name)
        if initialiser is None:
            raise PlanError(f"cannot reinit {key}: nothing initialises it (see plan.allowed)")
        reinit.setdefault((module_name, initialiser), []).append(tensor_name)
    return reinit


# -- the action -------------------------------------------------------------------------------


def _refuse(ctx: RowContext) -> str | None:
    model, m = ctx.model, ctx.row.model
    init = str(ctx.options.get("init") or "")
    if init and (problem := reference_problem(init, resolve=model is not None)):
        return problem
    if model is None or m is None:
        return None  # checked when applied, against the model given then
    module_name, _, tensor_name = m.key.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return f"no module {module_name!r} owns it (a custom state_dict key)"
    if not init and initialiser_for(model, module_name, tensor_name) is None:
        return (
            f"{type(module).__name__} ({module_name or 'the model'}) has no reset_parameters() "
            "and no transformers model owns it; give it an init= function "
            "(plan.set(key, 'reinit', init=my_init)), or keep it"
        )
    if wrapper := _reparametrized_by(module, tensor_name):
        return (
            f"{tensor_name} belongs to {wrapper} on {type(module).__name__} "
            f"({module_name or 'the model'}): the module's initialiser writes the weight that "
            f"{wrapper} computes, not {tensor_name}. Keep it, or remove {wrapper}, reinit, and "
            "apply it again"
        )
    return None


def _refuse_rows(ctx: RowsContext) -> list[str | None]:
    """``_refuse`` for a table of rows, without asking it for the rows it would let through
    for certain: a key that names its module (found), no ``init=``, a module whose class
    defines ``reset_parameters``/``_reset_parameters`` as a plain function its instance does
    not hide (``own_initialiser`` then finds one, whichever transformers model owns it) and no
    forward pre-hook (nothing reparametrizes the tensor). Every other row asks ``_refuse``."""
    model = ctx.model
    if model is None or ctx.options.get("init"):
        return [_refuse(each) for each in ctx.each()]
    # per class: the method of _METHODS it defines as a plain function ("" if none); a local
    # table, so no class outlives the call through it
    method_of: dict[type, str] = {}
    answers: list[str | None] = []
    let_through = None  # the module of the last row let through (its next tensor follows it)
    for row in ctx.rows:
        m = row.model
        if m is None:
            answers.append(None)  # as _refuse: the model side is checked when applied
            continue
        module_name = m.key.rpartition(".")[0]
        if module_name == let_through:  # what lets a row through is its module's alone
            answers.append(None)
            continue
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            module = None
        if module is not None:
            cls = type(module)
            method = method_of.get(cls)
            if method is None:
                method = method_of[cls] = next(
                    (n for n in _METHODS if isinstance(getattr(cls, n, None), types.FunctionType)),
                    "",
                )
            if method and method not in module.__dict__ and not forward_pre_hooks(module):
                answers.append(None)
                let_through = module_name
                continue
        answers.append(_refuse(RowContext(row, model, ctx.options, ctx.diff)))
    return answers


def _prepare(ctx: PrepareContext) -> Mapping[str, torch.Tensor]:
    keys = [row.key for row, _ in ctx.rows]
    inits = {row.key: str(options.get("init") or "") for row, options in ctx.rows}
    return fresh_values(keys, ctx.model, ctx.seed, ctx.materialise, inits)


def _value(ctx: ValueContext) -> torch.Tensor:
    return ctx.prepared[ctx.row.key]


def _detail(ctx: DetailContext) -> str:
    init = ctx.options.get("init")
    if init:
        return f"fresh values from init={init}"
    if ctx.model is not None:
        module_name, _, tensor_name = ctx.row.key.rpartition(".")
        found = initialiser_for(ctx.model, module_name, tensor_name)
        if found is not None:  # (what wrote the value: _refuse and fresh_values found it)
            kind, name = found
            if kind == METHOD:
                owner = type(ctx.model.get_submodule(module_name)).__name__
                return f"fresh values from {owner}.{name}()"
            return f"fresh values from {describe(found, ctx.model)}"
    return "fresh values from the owning transformers model's _init_weights or the module's own"


def _code(ctx: CodeContext) -> CodePart:
    groups = reinit_groups(ctx.plan, [row.key for row, _ in ctx.rows])
    if not groups:
        return CodePart()
    kinds = {kind for _, (kind, _) in groups}
    imports = ["import copy"]
    functions: list[Callable[..., Any]] = []
    call = "getattr(fresh, initialiser)()"  # only modules' own methods: no helper needed
    if kinds != {METHOD}:
        imports.append("from collections.abc import Callable")
        functions.append(initialise)
        call = "initialise(model, module_name, fresh, kind, initialiser)"
    body = [
        "for module_name, (kind, initialiser), names, seed in reinit:",
        "    module = model.get_submodule(module_name)",
    ]
    if OWN in kinds:  # the plan was read without its model: the model in scope decides
        imports.append("import sys")
        functions.insert(0, own_initialiser)
        body += [
            "    if kind == 'own':  # no init=: a transformers model's own, else the module's",
            "        kind, initialiser = own_initialiser(model, module_name, initialiser)",
        ]
    if FUNCTION in kinds:
        imports.append("import importlib")
        body += [
            "    if kind == 'function':  # 'package.module:function', given as init=",
            "        where, _, name = initialiser.partition(':')",
            "        initialiser = getattr(importlib.import_module(where), name)",
        ]
    if _reinit_loops(ctx.plan.seed, groups)[1]:
        imports.append("import zlib")
    body += [
        "    fresh = copy.deepcopy(module)",
        "    with torch.random.fork_rng(devices=[], enabled=seed is not None):",
        "        if seed is not None:",
        "            torch.manual_seed(seed)",
        f"        {call}",
        "    for name in names:",
        "        getattr(module, name).copy_(getattr(fresh, name))",
    ]
    data = reinit_lines(ctx.plan.seed, groups)
    return CodePart(data=data, body=body, imports=imports, functions=functions)


ACTION = ActionDef(
    name="reinit",
    label="draw a fresh value with the initialiser that owns the tensor",
    symbol="↻",
    colour="accent",
    explain=(
        "reinit draws the tensor anew, seeded by the plan, for a layer the checkpoint has no "
        "fitting values for, such as a new classifier head. Its initialiser, the first that "
        "applies: an init= function you give (a def at the top level of a module); the "
        "owning transformers model's own _init_weights (normal(0, initializer_range), zero "
        "bias; GPT-2's Conv1D too); the module's own reset_parameters."
    ),
    refuse=_refuse,
    refusal_needs_model=True,
    refuse_rows=_refuse_rows,
    prepare=_prepare,
    value=_value,
    verified_detail=_detail,
    code=_code,
    options={
        "init": OptionSpec(
            str,
            "",
            "a function 'package.module:function' called on a copy of the owning module to "
            "initialise it ('': the transformers model's _init_weights, else the module's "
            "reset_parameters)",
        )
    },
    distributed=ShardWrite.MODULE_INITIALISER,
)
