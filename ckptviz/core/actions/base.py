"""What an action is: ``ActionDef`` and the context objects handed to its functions.

An action owns everything about itself: when it is refused and why (``refuse``), where the new
value of a model tensor comes from (``value``, or ``prepare`` for a batch), the words of its
verification (``verified_detail``), its part of ``Plan.to_code()`` (``code``), its options, its
words and its widget button. Plan, apply, codegen, the views and the widget look it up by name
and never branch on it. Apply writes and verifies every action the same way:
``target.copy_(value)``, then ``bitwise_equal(target, value.to(target.dtype))``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

from ckptviz.core.vocabulary import COLOUR_ROLES

if TYPE_CHECKING:
    from ckptviz.core.diff import Diff, Row
    from ckptviz.core.plan import Plan

#: A value an option may take: what JSON holds as it is.
OptionValue = str | int | float | bool | None
_OPTION_TYPES: tuple[type, ...] = (str, int, float, bool, type(None))
_NAME = re.compile(r"[a-z_]+")
#: The arguments of ``Plan.set`` and ``Loader.set_action`` besides the options: no option may
#: take one of these names.
RESERVED_OPTION_NAMES = ("pattern", "action", "skip_refused", "model", "key")


@dataclass(frozen=True)
class OptionSpec:
    """One named option of an action: its type, its default, the values it may take (``choices``,
    empty for any value of the type) and a line of words saying what it changes."""

    kind: type
    default: OptionValue
    words: str
    choices: tuple[OptionValue, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in _OPTION_TYPES:
            raise TypeError(
                f"an option's kind must be one of str, int, float, bool or NoneType (a JSON "
                f"value), not {self.kind!r}"
            )
        if not self.words.strip():
            raise ValueError("an option needs words saying what it changes")
        if self.problem(self.default) is not None:
            raise ValueError(f"the default {self.default!r}: {self.problem(self.default)}")

    def problem(self, value: Any) -> str | None:
        """Why ``value`` cannot be this option's value (``None`` if it can)."""
        fits = isinstance(value, self.kind) and not (
            isinstance(value, bool) and self.kind is not bool
        )
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            fits = True  # JSON writes 1.0 as 1
        if not fits:
            return f"expected a {self.kind.__name__}, got {type(value).__name__} {value!r}"
        if self.choices and value not in self.choices:
            return f"{value!r} is not one of {', '.join(repr(c) for c in self.choices)}"
        return None

    def normal(self, value: OptionValue) -> OptionValue:
        """``value`` as the option holds it (an int given for a float option becomes a float)."""
        if self.kind is float and isinstance(value, int):
            return float(value)
        return value


class ShardWrite(Enum):
    """How ``apply_distributed`` writes an action on one rank of a sharded model."""

    #: read the slice of the checkpoint tensor that overlaps this rank's box and copy it there
    CHECKPOINT_OVERLAP = "checkpoint_overlap"
    #: gather the owning module's tensors, run its seeded initialiser, keep this rank's box
    MODULE_INITIALISER = "module_initialiser"


@dataclass(frozen=True, init=False)
class RowContext:
    """What ``refuse`` sees: the row, the live model (``None`` when a plan is checked without
    one, e.g. read from JSON: checked again against the model when applied), the options, and
    the diff the row belongs to (its checkpoint's metadata and key mapping, for an action that
    reads more than the row's own checkpoint tensor; ``None`` when the caller has no diff)."""

    row: Row
    model: torch.nn.Module | None
    options: Mapping[str, OptionValue]
    diff: Diff | None = None

    def __init__(
        self,
        row: Row,
        model: torch.nn.Module | None,
        options: Mapping[str, OptionValue],
        diff: Diff | None = None,
    ) -> None:
        # written into the instance's dict (still frozen to every later write), as ``Row``
        # does: a frozen dataclass's own __init__ calls object.__setattr__ per field, and a
        # new plan and the widget's refusals make one context a row
        fields = self.__dict__
        fields["row"] = row
        fields["model"] = model
        fields["options"] = options
        fields["diff"] = diff


@dataclass
class RowsContext:
    """What ``refuse_rows`` sees: many rows of one diff, asked with the same options (a view
    asks every row of a table at once)."""

    rows: Sequence[Row]
    model: torch.nn.Module | None
    options: Mapping[str, OptionValue]
    diff: Diff | None = None

    def each(self) -> Iterator[RowContext]:
        """One ``RowContext`` per row, in order: what ``refuse`` would see for each."""
        for row in self.rows:
            yield RowContext(row, self.model, self.options, self.diff)


@dataclass
class ValueContext:
    """What ``value`` sees for one row.

    ``current`` is the model tensor as it is now (read-only: clone before changing it);
    ``checkpoint_tensor`` reads the row's checkpoint tensor when first asked (only for an action
    that ``reads_checkpoint``); ``needed(key)`` reads one of the checkpoint tensors the action's
    ``needs`` named for this row; ``prepared`` holds what the action's ``prepare`` computed for
    this apply, by model key; ``diff`` is the plan's diff.
    """

    row: Row
    model: torch.nn.Module
    options: Mapping[str, OptionValue]
    seed: int | None
    materialise: torch.device | None
    current: torch.Tensor
    prepared: Mapping[str, torch.Tensor]
    read_checkpoint: Callable[[], torch.Tensor] | None = None
    diff: Diff | None = None
    read_needed: Callable[[str], torch.Tensor] | None = None
    needed_keys: Sequence[str] = ()

    @property
    def module_name(self) -> str:
        return self.row.key.rpartition(".")[0]

    @property
    def tensor_name(self) -> str:
        return self.row.key.rpartition(".")[2]

    @property
    def checkpoint_tensor(self) -> torch.Tensor:
        if self.read_checkpoint is None:
            raise RuntimeError(
                f"{self.row.key}: this action does not read the checkpoint (reads_checkpoint "
                "is False), so its value cannot use the checkpoint tensor"
            )
        return self.read_checkpoint()

    def needed(self, key: str) -> torch.Tensor:
        """The checkpoint tensor ``key``, one the action's ``needs`` named for this row (read
        when asked; apply keeps the last tensors read only)."""
        if self.read_needed is None or key not in self.needed_keys:
            raise RuntimeError(
                f"{self.row.key}: {key!r} is not among the checkpoint keys this action's needs "
                "named for the row, so its value cannot read it"
            )
        return self.read_needed(key)


@dataclass(frozen=True)
class PrepareContext:
    """What ``prepare`` sees: every row of the plan taking the action, in plan order, with its
    options, the live model, the plan's seed and the ``materialise`` device."""

    rows: Sequence[tuple[Row, Mapping[str, OptionValue]]]
    model: torch.nn.Module
    seed: int | None
    materialise: torch.device | None


@dataclass(frozen=True)
class DetailContext:
    """What ``verified_detail`` sees: the row, the written model tensor, the value written,
    the options, the plan's diff and the model written to (``None`` where a caller has none)."""

    row: Row
    target: torch.Tensor
    value: torch.Tensor
    options: Mapping[str, OptionValue]
    diff: Diff | None = None
    model: torch.nn.Module | None = None


@dataclass(frozen=True)
class CodeContext:
    """What ``code`` sees: the plan, and its rows taking the action with their options."""

    plan: Plan
    rows: Sequence[tuple[Row, Mapping[str, OptionValue]]]


@dataclass(frozen=True)
class CodePart:
    """An action's part of ``Plan.to_code()``.

    ``imports``: lines like ``"import copy"`` (``import torch`` is always there);
    ``functions``: plain functions (only ``torch``, ``math`` and ``torch.nn.functional as F``)
    whose source the snippet includes, the same ones ``value`` calls, so apply and the code run
    the same operations; ``data``: lines building the action's tables; ``body``: statements run
    under ``torch.no_grad()`` with ``model``, ``params`` (its state dict, ``keep_vars=True``) and
    ``state`` (the checkpoint's tensors) in scope.
    """

    data: Sequence[str] = ()
    body: Sequence[str] = ()
    imports: Sequence[str] = ()
    functions: Sequence[Callable[..., Any]] = ()


class Undecided:
    """The type of ``UNDECIDED``."""

    def __repr__(self) -> str:
        return "UNDECIDED"


#: What an action's ``refuse_by_sides`` answers for a row its sides alone do not decide.
UNDECIDED = Undecided()


def _plot_whole(
    row: Row, numel: int, options: Mapping[str, OptionValue]
) -> Sequence[tuple[str, int, bool]]:
    return ()


@dataclass(frozen=True)
class ActionDef:
    """One action: everything plan, apply, codegen, the views and the widget need of it.

    - ``name``: the JSON name and ``plan.set(..., name)``; lowercase letters and ``_``.
    - ``label``, ``symbol``, ``colour``: the words, a mark that carries the meaning without
      colour, and a colour role of ``vocabulary.COLOUR_ROLES``; the widget's button and legend.
    - ``explain``: one plain-words sentence for teaching: what it does, when it fits.
    - ``refuse(RowContext)``: why it cannot apply to the row, in words a person can act on;
      ``None`` if it can. ``refusal_needs_model``: the answer depends on the model (not only on
      the row's shapes and the options), so views cannot share it between rows of one shape.
      ``refuse_by_sides(RowContext)``: optional, for such an action: ``refuse``'s answer where
      the row's sides decide it (which sides it has, their shapes and dtypes, with the options
      and the diff, never the key or the model), else ``UNDECIDED``; views share it between
      rows whose sides agree and ask ``refuse`` for the others. ``refuse`` must answer the same.
      ``refuse_rows(RowsContext)``: optional, ``refuse``'s answers for many rows at once (one
      per row, in order), for an action whose refusal reads the model and can answer a table
      of rows faster than row by row (``reinit``: from each module's class where that is
      exact); ``refuse_each`` asks it, else ``refuse`` per row. It must answer as ``refuse``.
    - ``writes``: False only for an action that leaves the model tensor alone (verified
      untouched by its version counter).
    - ``reads_checkpoint``: its value needs the row's checkpoint tensor (read lazily, one at a
      time). ``needs(RowContext)``: optional, the checkpoint keys its value reads besides that
      (``merge``: the adapter's ``lora_A``/``lora_B`` of the row's module), from
      ``ctx.diff``; apply checks them against the checkpoint before writing, reads them one row
      at a time (``ValueContext.needed``), ``to_code()`` reads them into ``state``, and
      ``checkpoint_reads(plan)`` counts them as used. ``reads_current``: its value starts from
      the model tensor's present values (so it is refused on a meta tensor, which has none).
    - ``value(ValueContext)``: the complete new value of the model tensor (its shape; apply
      casts to the tensor's dtype). ``prepare(PrepareContext)``: optional, computes values for
      all the plan's rows of this action at once (model key -> value), before anything is
      written; ``value`` finds them in ``ctx.prepared``.
    - ``verified_detail(DetailContext)``: the report's words once the value was verified.
    - ``code(CodeContext)``: its ``CodePart`` of ``Plan.to_code()``.
    - ``options``: named options (``OptionSpec``), JSON values only.
    - ``distributed``: how ``apply_distributed`` writes it (``ShardWrite``); ``None``: refused
      there, with words.
    - ``plot_parts(row, numel, options)``: how ``plot_report`` splits a tensor's values, as
      (label, values, kept) parts, for the options it was applied with; empty: all its values
      under its name.
    - ``default_for(RowContext)``: optional, True where a new plan gives the row this action
      by default (before ``load``/``keep``); the diff's summary must then say so.
    - ``advise(RowContext)``: optional, a plain-words sentence for ``explain_row`` about this
      action on this row: that it is the one that fits (a position grid: resample), or a warning
      where it would run but mean nothing (``partial`` on a flattened grid); ``None``: nothing
      to add.
    - ``always_shown``: the widget puts its button on every row, refused or not (struck
      through, the reason on hover), so a learner sees why it does not apply. False for an
      action that fits few rows (a grid to resample, a stem conv, a LoRA adapter): its button
      appears only where it may apply (or is the row's action), and the widget names it in one
      short line where it does not fit, so the table stays narrow and the reasons readable.
    """

    name: str
    label: str
    symbol: str
    colour: str
    explain: str
    refuse: Callable[[RowContext], str | None]
    verified_detail: Callable[[DetailContext], str]
    code: Callable[[CodeContext], CodePart]
    value: Callable[[ValueContext], torch.Tensor] | None = None
    writes: bool = True
    reads_checkpoint: bool = False
    reads_current: bool = False
    refusal_needs_model: bool = False
    refuse_by_sides: Callable[[RowContext], str | Undecided | None] | None = None
    refuse_rows: Callable[[RowsContext], Sequence[str | None]] | None = None
    prepare: Callable[[PrepareContext], Mapping[str, torch.Tensor]] | None = None
    options: Mapping[str, OptionSpec] = field(default_factory=lambda: MappingProxyType({}))
    distributed: ShardWrite | None = None
    plot_parts: Callable[[Row, int, Mapping[str, OptionValue]], Sequence[tuple[str, int, bool]]] = (
        _plot_whole
    )
    advise: Callable[[RowContext], str | None] | None = None
    needs: Callable[[RowContext], Sequence[str]] | None = None
    default_for: Callable[[RowContext], bool] | None = None
    always_shown: bool = True

    def __post_init__(self) -> None:
        problems = definition_problems(self)
        if problems:
            raise TypeError(f"action {self.name!r} is not complete: " + "; ".join(problems))
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    def defaults(self) -> dict[str, OptionValue]:
        return {name: spec.default for name, spec in self.options.items()}

    def refuse_each(self, ctx: RowsContext) -> list[str | None]:
        """``refuse``'s answer for each of ``ctx.rows``, in order (``refuse_rows`` if given)."""
        if self.refuse_rows is None:
            return [self.refuse(each) for each in ctx.each()]
        answers = list(self.refuse_rows(ctx))
        if len(answers) != len(ctx.rows):
            raise ValueError(
                f"action {self.name!r}: refuse_rows answered {len(answers)} rows of {len(ctx.rows)}"
            )
        return answers


def definition_problems(definition: ActionDef) -> list[str]:
    """What an action definition lacks or gets wrong (empty when it is complete)."""
    # Any: the fields are checked as given at run time, whatever their annotations promise
    action: Any = definition
    problems = []
    if not isinstance(action.name, str) or not _NAME.fullmatch(action.name):
        problems.append(f"name {action.name!r} must be lowercase letters and '_' only")
    for word in ("label", "symbol", "explain"):
        text = getattr(action, word)
        if not isinstance(text, str) or not text.strip():
            problems.append(f"{word} must be non-empty words")
    if action.colour not in COLOUR_ROLES:
        problems.append(f"colour {action.colour!r} must be one of {', '.join(COLOUR_ROLES)}")
    steps = ["refuse", "verified_detail", "code", "plot_parts"]
    if action.writes:
        steps.append("value")
    for step in steps:
        if not callable(getattr(action, step)):
            problems.append(f"{step} must be a function")
    reads = action.reads_checkpoint or action.needs is not None
    if not action.writes and (action.value is not None or reads):
        problems.append("an action that does not write has no value and reads no checkpoint")
    for optional in (
        "prepare",
        "advise",
        "needs",
        "default_for",
        "refuse_by_sides",
        "refuse_rows",
    ):
        if getattr(action, optional) is not None and not callable(getattr(action, optional)):
            problems.append(f"{optional} must be a function or None")
    if not isinstance(action.always_shown, bool):
        problems.append("always_shown must be True or False")
    if action.distributed is not None and not isinstance(action.distributed, ShardWrite):
        problems.append("distributed must be a ShardWrite or None")
    if not isinstance(action.options, Mapping):
        problems.append("options must map names to OptionSpec")
    else:
        for name, spec in action.options.items():
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                problems.append(f"option name {name!r} must be lowercase letters and '_' only")
            elif name in RESERVED_OPTION_NAMES:
                problems.append(
                    f"option name {name!r} is taken by plan.set's own arguments "
                    f"({', '.join(RESERVED_OPTION_NAMES)})"
                )
            if not isinstance(spec, OptionSpec):
                problems.append(f"option {name!r} must be an OptionSpec")
    return problems
