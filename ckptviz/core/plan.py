"""The Plan: one action per row of a Diff, editable, saved as JSON, written out as code.

The actions are those of the registry (``ckptviz.core.actions``): ``load`` (copy, casting the
dtype; shapes must agree), ``keep`` (leave the model's value), ``reinit`` (a fresh value from the
owning module's own initialiser, for exactly that tensor), ``partial`` (copy the overlapping
slice of a grown or shrunk tensor, keep the rest) and any registered since; a row may hold
options for its action (``plan.set(key, action, name=value)``, ``plan.options(key)``).
``unexpected`` rows have no model tensor: they are shown as ``skip`` and never applied.

A Plan is edited in place (``set``, ``accept``, ``pair``, ``rename``); a Diff never changes
(its ``accept``, ``pair`` and ``rename`` return a new Diff).
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

from ckptviz.core.actions import (
    SKIP,
    OptionValue,
    RowContext,
    action_named,
    action_names,
    checked_options,
    default_action,
    default_actions,
)
from ckptviz.core.actions.reinit import function_reference
from ckptviz.core.diff import Diff, Row
from ckptviz.core.display import render
from ckptviz.core.errors import PlanError
from ckptviz.core.matching import RuleSuggestion, Suggestion
from ckptviz.core.safety import GlobalSpec
from ckptviz.core.text import visible

if TYPE_CHECKING:
    from ckptviz.core.report import Report


class Plan:
    """An action for every row of ``diff``; defaults follow the well-known recipe.

    ``match``/``dtype`` rows load, ``shape``/``missing`` rows keep the model's value.
    ``seed`` makes ``reinit`` reproducible (``None`` uses the global RNG, like PyTorch does).
    """

    def __init__(self, diff: Diff, actions: Mapping[str, str] | None = None, seed: int | None = 0):
        if diff.model_side.format != "module":
            raise PlanError(
                f"nothing to apply to: {diff.model_side.source} is a checkpoint, not a model. "
                "Compare against a live nn.Module to plan and apply; use diff.stats() to "
                "compare two checkpoints' values."
            )
        self.diff = diff
        self.seed = seed
        self._actions = default_actions(diff.rows, diff, diff.model)
        # model key -> the options that differ from its action's defaults (absent: none)
        self._options: dict[str, dict[str, OptionValue]] = {}
        if actions:
            for key, action in actions.items():
                self.set(key, action)

    # -- reading ---------------------------------------------------------------------------------
    def action(self, key: str) -> str:
        row = self.diff.row(key)
        return self._actions[key] if row.model is not None else SKIP

    @property
    def actions(self) -> dict[str, str]:
        """model key -> action, in model order (``unexpected`` rows are not listed)."""
        return dict(self._actions)

    def __iter__(self) -> Iterator[tuple[Row, str]]:
        for row in self.diff.rows:
            yield row, (self._actions[row.key] if row.model is not None else SKIP)

    def keys_with(self, action: str) -> list[str]:
        return [k for k, a in self._actions.items() if a == action]

    def options(self, key: str) -> dict[str, OptionValue]:
        """The options of the row's action, every one of them (the defaults where none was
        set); ``{}`` for an action without options and for an ``unexpected`` row."""
        action = self.action(key)
        if action == SKIP:
            return {}
        return {**action_named(action).defaults(), **self._options.get(key, {})}

    def chosen_options(self, key: str) -> dict[str, OptionValue]:
        """Only the options of the row set to something other than their default."""
        return self._options.get(key, {})

    @property
    def rows_with_options(self) -> dict[str, dict[str, OptionValue]]:
        """model key -> ``chosen_options(key)``, for every row that has any (a copy)."""
        return {key: dict(chosen) for key, chosen in self._options.items()}

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        """Per action: how many rows and how many values (parameters and buffers)."""
        counts = {a: {"rows": 0, "numel": 0} for a in (*action_names(), SKIP)}
        for row, action in self:
            counts[action]["rows"] += 1
            counts[action]["numel"] += row.numel
        return counts

    # -- what may apply where -------------------------------------------------------------------
    def refusal(
        self,
        key: str,
        action: str,
        model: torch.nn.Module | None = None,
        **options: OptionValue,
    ) -> str | None:
        """Why ``action`` (with ``options``) cannot apply to the row ``key`` (``None`` if it
        can)."""
        live = model if model is not None else self.diff.model
        return refusal(self.diff.row(key), action, live, options, self.diff)

    def allowed(self, key: str) -> dict[str, str | None]:
        """Every action for the row, with the reason it is refused or ``None``."""
        return {a: self.refusal(key, a) for a in action_names()}

    # -- editing ---------------------------------------------------------------------------------
    def rows_for(self, pattern: str | re.Pattern[str]) -> list[Row]:
        """Rows a pattern names: an exact key, a module name, a glob, or a compiled regex."""
        diff = self.diff
        if isinstance(pattern, re.Pattern):
            return [r for r in diff.rows if r.model and pattern.search(r.key)]
        try:
            return [diff.row(pattern)]
        except KeyError:
            pass
        prefix = pattern + "."
        under_module = [r for r in diff.rows if r.model and r.key.startswith(prefix)]
        if under_module:
            return under_module
        if any(ch in pattern for ch in "*?["):
            return [r for r in diff.rows if r.model and fnmatch.fnmatchcase(r.key, pattern)]
        return []

    def set(
        self,
        pattern: str | re.Pattern[str],
        action: str,
        *,
        skip_refused: bool = False,
        **options: OptionValue | Callable[..., object],
    ) -> list[str]:
        """Set the action (and its ``options``, by name) of every row ``pattern`` names;
        returns the keys whose action or options changed.

        A function given as an option (``reinit``'s ``init=``) is stored by its name,
        ``"package.module:function"`` (``function_reference``), so the plan can be saved and
        re-run; one without such a name (a lambda, a closure) raises ``PlanError`` saying why.

        An unknown option or a value of the wrong type raises ``PlanError``. A refused row
        raises ``PlanError`` naming each row and why, and nothing changes; with
        ``skip_refused=True`` the rows that can take the action do and the others stay.
        """
        named = {k: function_reference(v) if callable(v) else v for k, v in options.items()}
        kept = checked_options(action_named(action), named)
        rows = self.rows_for(pattern)
        if not rows:
            close = [k for k in self._actions if str(pattern).strip("*?") in k][:5]
            hint = f" Close keys: {', '.join(close)}." if close else ""
            raise PlanError(
                f"{str(pattern)!r} names no row: expected a key, a module name or a glob like "
                f"'fc.*'.{hint}"
            )
        refused = {
            r.key: why
            for r in rows
            if (why := refusal(r, action, self.diff.model, kept, self.diff))
        }
        if refused and not skip_refused:
            lines = "; ".join(f"{k}: {why}" for k, why in list(refused.items())[:8])
            more = f" (and {len(refused) - 8} more)" if len(refused) > 8 else ""
            raise PlanError(f"cannot {action} {len(refused)} row(s): {lines}{more}", refused)
        changed = []
        for row in rows:
            if row.key in refused:
                continue
            if self._actions[row.key] != action or self._options.get(row.key, {}) != kept:
                self._actions[row.key] = action
                if kept:
                    self._options[row.key] = dict(kept)
                else:
                    self._options.pop(row.key, None)
                changed.append(row.key)
        return changed

    def reset(self) -> None:
        """Back to the default actions (without options)."""
        diff = self.diff
        self._actions = default_actions(diff.rows, diff, diff.model)
        self._options = {}

    def pair(self, model_key: str, checkpoint_key: str) -> list[str]:
        """Feed ``model_key`` from ``checkpoint_key``, in place; the row gets its default
        action. Returns the model keys whose pairing changed."""
        return self._rebase(self.diff.pair(model_key, checkpoint_key))

    def accept(self, suggestion: Suggestion | RuleSuggestion) -> list[str]:
        """Take a suggestion of ``diff.suggestions`` or ``diff.rule_suggestions``, in place.
        Returns the model keys whose pairing changed (their rows get their default action)."""
        return self._rebase(self.diff.accept(suggestion))

    def rename(self, pattern: str, replacement: str) -> list[str]:
        """Add a rename rule (as ``Diff.rename``), in place. Returns the model keys whose
        pairing changed (their rows get their default action)."""
        return self._rebase(self.diff.rename(pattern, replacement))

    def _rebase(self, diff: Diff) -> list[str]:
        """Move to a new Diff, keeping each action whose row still fits it; returns the model
        keys whose pairing changed."""
        old_rows = {r.key: r for r in self.diff.rows if r.model is not None}
        old_actions, old_options = self._actions, self._options
        self.diff = diff
        self._actions = {}
        self._options = {}
        changed = []
        for row in diff.rows:
            if row.model is None:
                continue
            before = old_rows.get(row.key)
            same = before is not None and before.checkpoint_key == row.checkpoint_key
            if not same:
                changed.append(row.key)
            options = old_options.get(row.key, {})
            keep = same and not refusal(row, old_actions[row.key], diff.model, options, diff)
            fresh = default_action(row, diff, diff.model)
            self._actions[row.key] = old_actions[row.key] if keep else fresh
            if keep and options:
                self._options[row.key] = options
        return changed

    # -- applying --------------------------------------------------------------------------------
    def apply(
        self,
        model: torch.nn.Module,
        *,
        undo: bool = True,
        verify: bool = True,
        source: Any = None,
        materialise: str | torch.device | None = None,
        snapshot: str = "auto",
        snapshot_dir: str | os.PathLike[str] | None = None,
        memory_budget: int | None = None,
    ) -> Report:
        """Apply to ``model`` in place, all-or-nothing, and return the verified ``Report``.

        The old values of what is written are saved first (the snapshot), so that any failure,
        Ctrl-C included, puts the model back bit for bit, and ``Report.undo()`` can later.
        ``snapshot`` says where: ``"memory"``, ``"disk"`` (a temporary file in ``snapshot_dir``,
        by default the system's temp folder, its space reserved before anything is written) or
        ``"auto"`` (disk when the old values exceed ``memory_budget`` bytes, by default a quarter
        of the memory available). ``undo=False`` drops the snapshot once the apply succeeded.
        ``source`` reads the tensors from another copy of the checkpoint (a path or an
        in-memory state dict). ``materialise`` names the device on which model tensors still on
        the meta device get storage when the plan writes them (without it, writing into one is
        refused).
        """
        from ckptviz.core.apply import apply_plan

        return apply_plan(
            self,
            model,
            undo=undo,
            verify=verify,
            source=source,
            materialise=materialise,
            snapshot=snapshot,
            snapshot_dir=snapshot_dir,
            memory_budget=memory_budget,
        )

    def preview(self, key: str, *, source: Any = None) -> torch.Tensor:
        """The value row ``key``'s action would write into the model (in its dtype), worked out
        as ``apply`` does, without writing: e.g. a resampled position grid before applying.
        ``source`` reads the checkpoint from another copy, as in ``apply``."""
        from ckptviz.core.apply import preview_value

        return preview_value(self, key, source=source)

    # -- saving ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready data (see ``core.planfile``)."""
        from ckptviz.core.planfile import plan_to_dict

        return plan_to_dict(self)

    def to_json(self, path: str | Path | None = None, indent: int = 1) -> str:
        """The plan as JSON (also written to ``path`` when given)."""
        from ckptviz.core.planfile import plan_to_json

        return plan_to_json(self, path, indent)

    @classmethod
    def from_json(
        cls,
        text_or_path: str | Path,
        *,
        trusted: bool = False,
        allow_globals: Sequence[GlobalSpec] = (),
    ) -> Plan:
        """A plan saved with ``to_json`` (the JSON text, or the path of a file holding it).

        The plan reads its checkpoint again when applied, with ``weights_only`` safety unless
        this call passes ``trusted`` or ``allow_globals``: a JSON file never grants trust on its
        own, whatever it records.
        """
        from ckptviz.core.planfile import plan_from_json

        return plan_from_json(text_or_path, trusted=trusted, allow_globals=allow_globals)

    def to_code(self, *, distributed: bool = False) -> str:
        """A short plain-PyTorch snippet that, with ``model`` in scope, does what ``apply`` does.

        ``distributed=True``: the variant every rank of a torch.distributed job runs on its
        sharded model, as ``ckptviz.apply_distributed`` does (reading only its slices).
        """
        if distributed:
            from ckptviz.core.distributed import distributed_code

            return distributed_code(self)
        from ckptviz.core.codegen import plan_code

        return plan_code(self)

    # -- views -----------------------------------------------------------------------------------
    def to_records(self) -> list[dict[str, Any]]:
        records = []
        for row, action in self:
            record = row.to_record()
            record["action"] = action
            records.append(record)
        return records

    def to_frame(self) -> Any:
        return render("frame", self)

    def _repr_html_(self) -> str:
        return str(render("html", self))

    def summary(self) -> str:
        """One line: the plan's checkpoint and how many rows take each action; a WARNING when
        fewer than half of the checkpoint's tensors would load."""
        from ckptviz.core.report import checkpoint_coverage, coverage_causes, coverage_warning

        parts = [f"{c['rows']} {a}" for a, c in self.counts.items() if c["rows"]]
        line = f"Plan for {visible(self.diff.checkpoint.source)}: " + ", ".join(parts)
        if warning := coverage_warning(*checkpoint_coverage(self)):
            causes = "; ".join(short for short, _ in coverage_causes(self))
            line += f"; WARNING: {warning} by this plan ({causes or 'see report.warnings'})"
        return line

    def __str__(self) -> str:
        from ckptviz.core.text import diff_text

        actions = {row.key: action for row, action in self}
        return self.summary() + "\n" + diff_text(self.diff, actions, "action")

    def __repr__(self) -> str:
        return f"<{self.summary()}>"


def refusal(
    row: Row,
    action: str,
    model: torch.nn.Module | None,
    options: Mapping[str, OptionValue] | None = None,
    diff: Diff | None = None,
) -> str | None:
    """Why ``action`` (with ``options``, defaults where absent) cannot apply to ``row`` of
    ``diff``, in words a person can act on; ``None`` if it can."""
    try:
        definition = action_named(action)
    except PlanError as exc:
        return str(exc)
    if row.model is None:
        return (
            "the model has no tensor to receive this checkpoint entry: it is never applied. "
            "Pair it with the missing key it belongs to."
        )
    full = {**definition.defaults(), **(options or {})}
    return definition.refuse(RowContext(row, model, MappingProxyType(full), diff))
