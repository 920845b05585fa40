"""The actions registry: every action a plan may choose for a row, one definition each.

``register_action(ActionDef(...))`` adds one (a definition that lacks a step is refused when it
is made or registered, never silently defaulted when applied); ``action_named(name)`` finds one;
``registered_actions()`` lists them in registration order, the order of the widget's buttons.
The built-ins, registered here: ``load``, ``keep``, ``reinit``, ``partial``, ``resample``,
``adapt_channels``, ``merge``. ``skip`` is not an action: it is what an ``unexpected`` row shows
(no model tensor, never applied).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ckptviz.core.actions import adapt_channels, keep, load, merge, partial, reinit, resample
from ckptviz.core.actions.base import (
    UNDECIDED,
    ActionDef,
    CodeContext,
    CodePart,
    DetailContext,
    OptionSpec,
    OptionValue,
    PrepareContext,
    RowContext,
    RowsContext,
    ShardWrite,
    Undecided,
    ValueContext,
    definition_problems,
)
from ckptviz.core.errors import PlanError
from ckptviz.core.vocabulary import Term

if TYPE_CHECKING:
    from ckptviz.core.diff import Diff, Row
    from ckptviz.core.plan import Plan

__all__ = [
    "SKIP",
    "SKIP_TERM",
    "UNDECIDED",
    "ActionDef",
    "CodeContext",
    "CodePart",
    "DetailContext",
    "OptionSpec",
    "OptionValue",
    "PrepareContext",
    "RowContext",
    "RowsContext",
    "ShardWrite",
    "Undecided",
    "ValueContext",
    "action_named",
    "action_names",
    "action_terms",
    "checked_options",
    "checkpoint_keys_read",
    "checkpoint_reads",
    "default_action",
    "default_actions",
    "default_fitting_action",
    "register_action",
    "registered",
    "registered_actions",
    "unregister_action",
]

#: What an ``unexpected`` row shows: it has no model tensor and is never applied.
SKIP = "skip"
SKIP_TERM = Term("never applied: the model has no tensor for this checkpoint entry", "·", "extra")

_REGISTRY: dict[str, ActionDef] = {}
_Claiming = tuple[str, Callable[[RowContext], bool], Mapping[str, OptionValue]]
_BUILT_IN = (
    load.ACTION,
    keep.ACTION,
    reinit.ACTION,
    partial.ACTION,
    resample.ACTION,
    adapt_channels.ACTION,
    merge.ACTION,
)
#: What a row whose two tensors fit takes by default, and what every other model row takes.
_FITTING_DEFAULT = load.ACTION.name
_OTHER_DEFAULT = keep.ACTION.name


def register_action(action: ActionDef) -> ActionDef:
    """Add ``action`` to the registry (after the ones already there); returns it.

    Raises ``TypeError`` if the definition is incomplete and ``ValueError`` if its name is taken.
    """
    if not isinstance(action, ActionDef):
        raise TypeError(f"register_action takes an ActionDef, not {type(action).__name__}")
    problems = definition_problems(action)
    if problems:
        raise TypeError(f"action {action.name!r} is not complete: " + "; ".join(problems))
    if action.name in _REGISTRY or action.name == SKIP:
        raise ValueError(
            f"an action named {action.name!r} is registered already; choose another name"
        )
    _REGISTRY[action.name] = action
    _forget_claiming()
    return action


def unregister_action(name: str) -> None:
    """Remove an action registered with ``register_action`` (the built-ins stay)."""
    if any(a.name == name for a in _BUILT_IN):
        raise ValueError(f"{name!r} is a built-in action and cannot be unregistered")
    if _REGISTRY.pop(name, None) is None:
        raise KeyError(f"no action {name!r} is registered")
    _forget_claiming()


@contextmanager
def registered(action: ActionDef) -> Iterator[ActionDef]:
    """``action`` registered for the ``with`` block, unregistered after it."""
    register_action(action)
    try:
        yield action
    finally:
        unregister_action(action.name)


def registered_actions() -> tuple[ActionDef, ...]:
    """Every registered action, in registration order (the built-ins first)."""
    return tuple(_REGISTRY.values())


def action_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def action_named(name: str) -> ActionDef:
    """The registered action ``name``; ``PlanError`` naming the registered ones if none."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise PlanError(
            f"unknown action {name!r}; expected one of {', '.join(_REGISTRY)}"
        ) from None


def action_terms() -> dict[str, Term]:
    """name -> how it is shown, for every registered action and then ``skip``."""
    terms = {a.name: Term(a.label, a.symbol, a.colour) for a in _REGISTRY.values()}
    terms[SKIP] = SKIP_TERM
    return terms


def default_fitting_action() -> str:
    """The action a row whose two tensors fit takes by default (``load``)."""
    return _FITTING_DEFAULT


def default_action(row: Row, diff: Diff | None = None, model: Any = None) -> str:
    """The well-known recipe: rows whose tensors fit load, other model rows keep, rows without a
    model tensor skip; before that, an action whose ``default_for`` claims the row (given the
    row's ``diff``: ``merge`` claims a LoRA target's weight when an adapter meets a plain
    model)."""
    if row.model is None:
        return SKIP
    if diff is not None:
        for name, claims, options in _claiming():
            if claims(RowContext(row, model, options, diff)):
                return name
    if row.status in ("match", "dtype"):
        return _FITTING_DEFAULT
    return _OTHER_DEFAULT


def default_actions(
    rows: Iterable[Row], diff: Diff | None = None, model: Any = None
) -> dict[str, str]:
    """model key -> ``default_action(row, diff, model)`` for each row with a model tensor, in
    order: one look at the registry for all of them, and each row's decision inline (a new
    plan asks it of every row). A ``default_for`` may read anything of its row (``merge``
    reads the key), so it is still asked per row, with a context of its own as
    ``default_action`` gives it."""
    claiming = _claiming() if diff is not None else []
    fitting, other = _FITTING_DEFAULT, _OTHER_DEFAULT
    actions: dict[str, str] = {}
    for row in rows:
        info = row.model
        if info is None:
            continue
        for name, claims, options in claiming:
            if claims(RowContext(row, model, options, diff)):
                actions[info.key] = name
                break
        else:
            actions[info.key] = fitting if row.status in ("match", "dtype") else other
    return actions


def _claiming() -> list[_Claiming]:
    """(name, ``default_for``, default options) of each registered action with a
    ``default_for``: made once per change of the registry (``default_action`` asks it for every
    row of a plan)."""
    global _CLAIMING
    if _CLAIMING is None:
        _CLAIMING = [
            (a.name, a.default_for, MappingProxyType(a.defaults()))
            for a in _REGISTRY.values()
            if a.default_for is not None
        ]
    return _CLAIMING


def _forget_claiming() -> None:
    global _CLAIMING
    _CLAIMING = None


#: What ``_claiming`` made of the registry (``None``: made again when next asked).
_CLAIMING: list[_Claiming] | None = None


def checkpoint_keys_read(action: ActionDef, ctx: RowContext) -> tuple[str, ...]:
    """The checkpoint keys ``action`` reads for the row of ``ctx``: its own checkpoint tensor
    (``reads_checkpoint``) and what its ``needs`` names."""
    keys: list[str] = []
    if action.reads_checkpoint and ctx.row.checkpoint is not None:
        keys.append(ctx.row.checkpoint.key)
    if action.needs is not None:
        keys += [k for k in action.needs(ctx) if k not in keys]
    return tuple(keys)


def checkpoint_reads(plan: Plan) -> dict[str, list[str]]:
    """checkpoint key -> the model keys whose planned action reads it, in plan order: every
    checkpoint tensor the plan uses (a ``merge`` row uses its adapter's ``lora_A`` and
    ``lora_B``), for counting what a plan loads of what the checkpoint offers."""
    reads: dict[str, list[str]] = {}
    for row, name in plan:
        if row.model is None:
            continue
        action = _REGISTRY[name]
        ctx = RowContext(row, plan.diff.model, MappingProxyType(plan.options(row.key)), plan.diff)
        for key in checkpoint_keys_read(action, ctx):
            reads.setdefault(key, []).append(row.key)
    return reads


def checked_options(action: ActionDef, options: Mapping[str, Any]) -> dict[str, OptionValue]:
    """``options`` for ``action`` validated, holding only the values that differ from the
    defaults; ``PlanError`` on an unknown option or a wrong value."""
    problems = []
    kept: dict[str, OptionValue] = {}
    for name, value in options.items():
        spec = action.options.get(name)
        if spec is None:
            known = ", ".join(action.options) or "none"
            problems.append(f"unknown option {name!r} (its options: {known})")
        elif (why := spec.problem(value)) is not None:
            problems.append(f"option {name!r}: {why}")
        elif spec.normal(value) != spec.default:
            kept[name] = spec.normal(value)
    if problems:
        raise PlanError(f"{action.name}: " + "; ".join(problems))
    return kept


for _action in _BUILT_IN:
    register_action(_action)
del _action
