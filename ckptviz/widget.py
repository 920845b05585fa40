"""The Loader widget: a checkpoint and a live model side by side, one action per tensor, applied
to the model in the kernel, with undo, as code and as a saved plan.

A thin stateful view over one ``Diff`` and one ``Plan``. Every control in the front end
(``static/loader.js``) sends a small message naming one of the public methods below, so a script
or a test calls exactly what a click calls.

What goes over the wire, and why it stays small at 10,000 rows:

- ``_rows`` (a synced traitlet) carries the row metadata once per Diff: keys, shapes, dtypes,
  sizes, statuses and the reasons actions are refused, the rows as one binary JSON buffer. It is
  sent again only when the Diff itself changes (a pair, an accepted suggestion, a loaded plan).
  Above ``OPEN_ALL_ROWS`` rows it also names the module groups to open: those holding a row
  that differs.
- Actions travel as deltas in custom messages: ``set_action``, ``set_module`` and ``set_bulk``
  return the keys they changed, and the widget updates its copy of the action codes and the
  counters for those rows only, so a tick costs the same at 100 rows and at 100,000; other calls
  compare every row. A single tick is one message of a few hundred bytes.
- ``_report`` holds the last apply, the ``history`` of applies and undos, and per row the action
  an apply still in effect wrote (the table marks those rows); ``code_stale`` says whether the
  code shown still does what ``apply`` would.
- A front end that renders later (a second view, a reloaded page) sends ``hello`` and gets the
  full action list in one message.
- ``_vocabulary`` and ``_columns`` (sent once) say what the statuses and actions are called, how
  they look and which columns the table has: the front end restates none of it.

Everything the checkpoint controls (keys, shapes, dtypes, notes, file names) reaches the page as
DOM text only; ``loader.js`` never parses a string as HTML. Plan files are read and written only
inside one folder (``plan_dir``, by default the working directory when the Loader was made).
"""

from __future__ import annotations

import functools
import html
import json
import logging
import os
import re
import stat
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar, cast

import anywidget
import torch
import traitlets

from ckptviz import widget_columns
from ckptviz.core.actions import (
    SKIP,
    UNDECIDED,
    OptionValue,
    RowContext,
    RowsContext,
    Undecided,
    action_named,
    action_names,
    action_terms,
    default_action,
    registered_actions,
)
from ckptviz.core.checkpoint import gc_paused
from ckptviz.core.diff import STATUSES, Diff, Row, compare
from ckptviz.core.errors import PlanError
from ckptviz.core.explain import explain_row
from ckptviz.core.matching import (
    KeyMapping,
    RuleSuggestion,
    Suggestion,
    match_keys,
    with_pair,
    with_rule,
)
from ckptviz.core.plan import Plan, refusal
from ckptviz.core.planfile import plan_from_dict
from ckptviz.core.report import CheckpointCoverage, Report
from ckptviz.core.text import format_table, row_cells, visible
from ckptviz.core.vocabulary import COLOUR_ROLES, STATUS_TERMS, Status

STATIC = Path(__file__).parent / "static"

_CODE_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def action_codes() -> dict[str, str]:
    """One character per action (``skip`` and every registered one) in the action strings and
    deltas sent to the front end: its initial, or the next of its letters still free, or any
    free letter; ``skip`` and the built-ins come first, so their codes never change."""
    codes: dict[str, str] = {}
    for name in (SKIP, *action_names()):
        taken = set(codes.values())
        free = [ch for ch in name + _CODE_LETTERS if ch in _CODE_LETTERS and ch not in taken]
        codes[name] = free[0]
    return codes


#: The order of the values in each row of ``_rows["data"]``: the status, the model side and
#: the checkpoint side (each a list of the declared columns' values), and what the table needs
#: besides (see ``_rows_state``).
ROW_FIELDS = ("status", "model", "checkpoint", "note", "refused", "tied", "place", "renamed")

#: A plan file larger than this is refused before it is read.
PLAN_FILE_LIMIT = 256 * 2**20

#: The methods a front-end message may call (its "do"), with the fields passed as arguments.
FRONT_END_CALLS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "set_action": ("pattern", "action"),
        "set_module": ("module", "action"),
        "set_bulk": ("action", "statuses", "filter", "regex"),
        "reset": (),
        "accept": ("which",),
        "accept_all": (),
        "pair": ("model_key", "checkpoint_key"),
        "apply": (),
        "undo": (),
        "show_code": (),
        "hide_code": (),
        "save_plan": ("path", "overwrite"),
        "load_plan": ("path",),
    }
)

#: Rows in the static (no-widget) view; larger plans show the rows that differ first.
STATIC_ROWS = 100
#: Tied keys named per row: a file can tie thousands of keys to one storage, and naming them all
#: in every row would make the table grow with the square of the group.
TIED_SHOWN = 8
#: Above this share of changed rows a full action string is smaller than a delta.
_FULL_RESEND_SHARE = 0.25

log = logging.getLogger(__name__)
Method = TypeVar("Method", bound=Callable[..., Any])


class PlanFileExistsError(PlanError):
    """``save_plan`` would replace an existing file; pass ``overwrite=True`` to replace it."""


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    return str(exc) or type(exc).__name__


def _user_action(method: Method) -> Method:
    """Run a public method as one user action: show its error in the widget (and raise it for
    code callers), clear the previous notice, and send the front end what changed."""

    # these return the keys whose action changed: the front end is told about those rows only
    incremental = method.__name__ in ("set_action", "set_module", "set_bulk")

    @functools.wraps(method)
    def run(self: Loader, *args: Any, **kwargs: Any) -> Any:
        self.notice = ""
        try:
            result = method(self, *args, **kwargs)
        except Exception as exc:
            self.error = _error_text(exc)
            self._push()
            raise
        self.error = ""
        self._push(changed=result if incremental else None)
        return result

    return cast(Method, run)


@dataclass(frozen=True)
class HistoryEntry:
    """One apply or undo done through the Loader, in the order they happened.

    ``kind`` is ``"apply"`` or ``"undo"``; ``summary`` says what it wrote or restored;
    ``undoable`` is true for the one apply that ``Loader.undo()`` would put back now.
    """

    step: int
    kind: str
    summary: str
    undoable: bool


class Loader(anywidget.AnyWidget):
    """Compare ``model`` with the checkpoint ``source``, choose an action per tensor, apply.

    ``compare_kwargs`` go to ``ckptviz.compare`` (``rename``, ``key``, ``trusted``,
    ``allow_globals``). Display the widget in a notebook; drive it from code with the same
    methods its buttons call: ``set_action``, ``set_module``, ``set_bulk``, ``accept``,
    ``accept_all``, ``pair``, ``apply``, ``undo``, ``show_code``, ``save_plan``, ``load_plan``.
    ``history`` lists the applies and undos.

    Plan files are saved and loaded only inside ``plan_dir`` (by default the working directory
    at the time the Loader is made): a name with ``..``, a path outside it, or a symbolic link
    leading out of it is refused, and an existing file is replaced only with ``overwrite=True``.
    """

    _esm = STATIC / "loader.js"
    _css = STATIC / "loader.css"

    _rows = traitlets.Dict().tag(sync=True)
    _info = traitlets.Dict().tag(sync=True)
    _suggestions: traitlets.List[dict[str, Any]] = traitlets.List().tag(sync=True)
    _report = traitlets.Dict().tag(sync=True)
    _code = traitlets.Unicode("").tag(sync=True)
    #: Names, words, symbols and colour roles of every status and action (constant).
    _vocabulary = traitlets.Dict().tag(sync=True)
    #: The declared table columns (constant): see ``ckptviz.widget_columns``.
    _columns: traitlets.List[dict[str, Any]] = traitlets.List().tag(sync=True)
    #: The last action's failure in words ("" when it succeeded); the model was not changed.
    error = traitlets.Unicode("").tag(sync=True)
    #: What the last action did that the table alone does not show (refused rows, saved file).
    notice = traitlets.Unicode("").tag(sync=True)
    #: The code shown (``show_code``) no longer does what ``apply`` would: the plan changed since.
    code_stale = traitlets.Bool(False).tag(sync=True)

    def __init__(
        self,
        model: torch.nn.Module,
        source: Any,
        *,
        plan_dir: str | os.PathLike[str] | None = None,
        **compare_kwargs: Any,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"Loader needs a live torch.nn.Module to load into, got {type(model).__name__}; "
                "to compare two checkpoints use ckptviz.compare(a, b)"
            )
        folder = Path(os.getcwd() if plan_dir is None else plan_dir).resolve()
        if not folder.is_dir():
            raise PlanError(f"plan_dir {str(folder)!r} is not a folder; pass an existing one")
        self._plan_dir = folder
        self._model = model
        self._reports: list[Report] = []
        # (kind, index of the report in _reports, summary) per apply and undo
        self._log: list[tuple[str, int, str]] = []
        self._generation = 0
        self._sent_diff: Diff | None = None
        # what the front end was last told: one action code per row, and the counters
        self._codes = bytearray()
        self._counts: dict[str, list[int]] = {}
        self._row_of: dict[str, int] = {}
        self._numel: list[int] = []
        # the options the front end was told, by row index (rows whose options are the defaults
        # are absent)
        self._options: dict[int, dict[str, OptionValue]] = {}
        # the plan the shown code was made from: (Diff, action codes), None when none is shown
        self._code_source: tuple[Diff, bytes, dict[int, dict[str, OptionValue]]] | None = None
        # one pause for the whole build: the objects it makes are scanned once, after it
        with gc_paused():
            self._plan = compare(model, source, **compare_kwargs).plan()
            diff_state = self._diff_state()
        super().__init__(
            _vocabulary=_vocabulary_state(),
            _columns=[c.state() for c in widget_columns.COLUMNS],
            **diff_state,
        )
        self.on_msg(self._on_front_end_message)

    # -- what a script reads ---------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def plan(self) -> Plan:
        """The plan the widget edits. After editing it directly, call ``refresh()``."""
        return self._plan

    @property
    def diff(self) -> Diff:
        return self._plan.diff

    @property
    def plan_dir(self) -> Path:
        """The folder plan files are saved to and loaded from (symbolic links resolved)."""
        return self._plan_dir

    @property
    def report(self) -> Report | None:
        """The last apply's Report (``None`` before the first apply)."""
        return self._reports[-1] if self._reports else None

    @property
    def history(self) -> list[HistoryEntry]:
        """Every apply and undo done through this Loader, oldest first; the entry marked
        ``undoable`` is the apply ``undo()`` would put back."""
        latest = self._undoable_report()
        return [
            HistoryEntry(step, kind, summary, kind == "apply" and index == latest)
            for step, (kind, index, summary) in enumerate(self._log, 1)
        ]

    @property
    def code(self) -> str:
        """Plain PyTorch that does what ``apply()`` does, ready to paste into a cell."""
        return self._plan.to_code()

    @property
    def suggestions(self) -> list[RuleSuggestion | Suggestion]:
        """Rename suggestions, rules first (one rule pairs many keys); ``accept(i)`` takes one."""
        diff = self._plan.diff
        return [*diff.rule_suggestions, *diff.suggestions]

    def explain(self, key: str) -> str:
        """Plain words on a row's status and what each action would do."""
        return self._plan.diff.explain(key)

    # -- what a click does -----------------------------------------------------------------------
    @_user_action
    def set_action(
        self,
        pattern: str | re.Pattern[str],
        action: str,
        *,
        skip_refused: bool = False,
        **options: OptionValue,
    ) -> list[str]:
        """Set ``action`` (with its ``options``, by name) on the rows ``pattern`` names (key,
        module, glob or compiled regex), as ``Plan.set`` does.

        A refused row raises ``PlanError`` and changes nothing, unless ``skip_refused``.
        Returns the keys whose action or options changed.
        """
        return self._plan.set(pattern, action, skip_refused=skip_refused, **options)

    @_user_action
    def set_module(self, module: str, action: str) -> list[str]:
        """A module group row: ``action`` on every tensor under ``module`` that can take it.

        The rows that cannot are left as they were and named, with why, in ``notice``.
        """
        rows = self._plan.rows_for(module)
        if not rows:
            raise PlanError(f"no module {module!r} with tensors in this model")
        changed = self._plan.set(module, action, skip_refused=True)
        self.notice = self._refusal_notice(action, rows, f"under {module or 'the model'}")
        return changed

    @_user_action
    def set_bulk(
        self,
        action: str,
        *,
        statuses: Collection[str] | None = None,
        filter: str = "",
        regex: bool = False,
    ) -> list[str]:
        """``action`` on every row shown by a status selection and a key filter (all rows by
        default): ``set_bulk("load")`` loads everything that fits, ``set_bulk("keep")`` nothing.

        ``filter`` is a case-insensitive substring of the model or checkpoint key, or with
        ``regex=True`` a Python regular expression searched in either key. Rows that cannot take
        the action stay as they were and are named in ``notice``.
        """
        rows = self.rows_shown(statuses=statuses, filter=filter, regex=regex)
        keys = [r.key for r in rows if r.model is not None]
        if not keys:
            raise PlanError(
                f"no model rows are shown: widen the status selection or the filter ({filter!r})"
                if filter
                else "no model rows are shown: widen the status selection"
            )
        changed: list[str] = []
        for key in keys:
            changed += self._plan.set(key, action, skip_refused=True)
        self.notice = self._refusal_notice(action, rows, "shown")
        return changed

    def rows_shown(
        self, *, statuses: Collection[str] | None = None, filter: str = "", regex: bool = False
    ) -> list[Row]:
        """The rows a status selection and a key filter show (as ``set_bulk`` reads them)."""
        wanted = set(STATUSES if statuses is None else statuses)
        unknown = wanted - set(STATUSES)
        if unknown:
            raise PlanError(f"unknown status {sorted(unknown)}; expected some of {STATUSES}")
        match = _key_filter(filter, regex)
        return [
            r
            for r in self._plan.diff.rows
            if r.status in wanted and (match(r.model_key) or match(r.checkpoint_key))
        ]

    @_user_action
    def reset(self) -> None:
        """Back to the default actions: load what fits, keep the rest."""
        self._plan.reset()

    @_user_action
    def accept(self, which: int | str) -> None:
        """Take a rename suggestion: its index in ``suggestions``, or the model key (or
        checkpoint key) of a suggested pair."""
        items = self.suggestions
        if isinstance(which, int):
            if not 0 <= which < len(items):
                raise PlanError(
                    f"no suggestion #{which}: there are {len(items)} (see loader.suggestions)"
                )
            chosen = items[which]
        else:
            pairs = [
                s
                for s in items
                if isinstance(s, Suggestion) and which in (s.model_key, s.checkpoint_key)
            ]
            if not pairs:
                raise PlanError(
                    f"no rename suggestion names {which!r}; pair it by hand with "
                    "loader.pair(model_key, checkpoint_key)"
                )
            chosen = pairs[0]
        self._plan.accept(chosen)

    @_user_action
    def accept_all(self) -> int:
        """Take every rename suggestion at once: each rule, then each pair no rule covers.
        Returns how many model tensors no checkpoint entry fed before and one feeds now."""
        diff = self._plan.diff
        rules = diff.rule_suggestions
        if not rules and not diff.suggestions:
            raise PlanError("no rename suggestions to accept")
        mapping = diff.mapping
        for rule in rules:
            mapping = with_rule(mapping, rule.pattern, rule.replacement)
        # a pair a rule already feeds, or whose checkpoint key a rule took, is not added again
        fed = match_keys(list(diff.model_side.tensors), list(diff.checkpoint.tensors), mapping)
        taken = set(fed.values())
        for s in diff.suggestions:
            if s.model_key not in fed and s.checkpoint_key not in taken:
                mapping = with_pair(mapping, s.model_key, s.checkpoint_key)
        unfed = {r.key for r in diff.rows if r.model is not None and r.checkpoint is None}
        # one new Diff for everything (Plan.accept per item would build one per suggestion)
        self._plan._rebase(Diff(diff.model_side, diff.checkpoint, mapping, diff.model))
        now = self._plan.diff
        return sum(1 for r in now.rows if r.key in unfed and r.checkpoint is not None)

    @_user_action
    def pair(self, model_key: str, checkpoint_key: str) -> None:
        """Feed the missing model key ``model_key`` from the unexpected ``checkpoint_key``."""
        self._plan.pair(model_key, checkpoint_key)

    @_user_action
    def apply(self) -> Report:
        """Apply the plan to the live model (all-or-nothing, verified); Undo is enabled after."""
        report = self._plan.apply(self._model)
        self._reports.append(report)
        self._log.append(("apply", len(self._reports) - 1, report.summary()))
        self._report = self._report_state()
        return report

    @_user_action
    def undo(self) -> int:
        """Put back what the last apply not yet undone wrote; returns how many tensors."""
        index = self._undoable_report()
        if index is None:
            raise PlanError("nothing to undo: apply the plan first")
        restored = self._reports[index].undo()
        self._log.append(
            (
                "undo",
                index,
                f"undid apply #{self._apply_number(index)}: "
                f"{restored} tensor(s) restored bit for bit",
            )
        )
        self._report = self._report_state()
        self.notice = f"undone: {restored} tensor(s) restored bit for bit"
        return restored

    def _undoable_report(self) -> int | None:
        """The index of the last report not yet undone, which ``undo`` puts back."""
        for index in range(len(self._reports) - 1, -1, -1):
            if self._reports[index].can_undo:
                return index
        return None

    def _apply_number(self, report_index: int) -> int:
        """The step in ``history`` of the apply that made a report."""
        return next(
            step
            for step, (kind, index, _) in enumerate(self._log, 1)
            if kind == "apply" and index == report_index
        )

    @_user_action
    def show_code(self) -> str:
        """Show ``plan.to_code()`` in the widget and return it."""
        self._code = self._plan.to_code()
        self._code_source = (self._plan.diff, bytes(self._codes_now()), self._options_now())
        return self._code

    @_user_action
    def hide_code(self) -> None:
        self._code = ""
        self._code_source = None

    @_user_action
    def save_plan(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the plan as JSON to ``path`` inside ``plan_dir`` (``Plan.from_json`` or
        ``load_plan`` read it back); returns the file written.

        An existing file is replaced only with ``overwrite=True`` (the widget asks first).
        """
        if not isinstance(overwrite, bool):
            raise PlanError(f"overwrite must be True or False, got {overwrite!r}")
        target = _confined(path, self._plan_dir)
        text = self._plan.to_json()
        if target.exists() and not target.is_file():
            raise PlanError(f"{target} is not a regular file; choose another plan file name")
        if target.exists() and not overwrite:
            raise PlanFileExistsError(
                f"{target} exists already: replace it (save_plan(..., overwrite=True)), "
                "or choose another name"
            )
        flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        flags |= os.O_TRUNC if overwrite else os.O_EXCL
        try:
            descriptor = os.open(target, flags, 0o644)
        except FileExistsError:
            raise PlanFileExistsError(
                f"{target} exists already: replace it (save_plan(..., overwrite=True)), "
                "or choose another name"
            ) from None
        except OSError as exc:
            raise PlanError(f"{target}: cannot write the plan ({exc.strerror or exc})") from None
        with os.fdopen(descriptor, "w", encoding="utf-8") as out:
            out.write(text)
        self.notice = f"plan saved to {target}"
        return target

    @_user_action
    def load_plan(self, path: str | os.PathLike[str]) -> None:
        """Take the key mapping and actions of a plan saved in ``plan_dir``; every row must fit
        this model and checkpoint, or nothing changes."""
        source = _confined(path, self._plan_dir)
        saved = plan_from_dict(_read_plan_json(source))
        self._plan = _plan_for(self._plan.diff, saved, source)
        self.notice = f"plan loaded from {source}"

    @_user_action
    def refresh(self) -> None:
        """Send the front end what changed after ``plan`` was edited directly."""

    # -- wire protocol ---------------------------------------------------------------------------
    def _on_front_end_message(self, _: Any, content: Any, buffers: Sequence[bytes]) -> None:
        if not isinstance(content, dict):
            return
        do = content.get("do")
        if do == "hello":
            self._send_actions(full=True)
            return
        if do == "explain":
            self._send_explanation(content.get("index"), content.get("gen"))
            return
        if not isinstance(do, str) or do not in FRONT_END_CALLS:
            self.error = f"the widget sent an unknown request {do!r}"
            return
        kwargs = {f: content[f] for f in FRONT_END_CALLS[do] if f in content}
        if do == "set_action" and isinstance(content.get("options"), dict):
            # an action's options, by name (the action checks them; their names never clash
            # with the method's own arguments)
            kwargs.update({str(k): v for k, v in content["options"].items()})
        try:
            getattr(self, do)(**kwargs)
        except PlanFileExistsError:
            # the error is shown; the front end asks whether to replace the file
            self.send({"type": "confirm_overwrite", "path": kwargs.get("path")})
        except Exception:
            # Already shown in the widget by _user_action; the traceback goes to the log.
            log.debug("Loader.%s(%r) failed", do, kwargs, exc_info=True)
        if "id" in content:  # the slow calls (apply, files) show "busy" until this answer
            self.send({"type": "done", "id": content["id"]})

    def _push(self, changed: Sequence[str] | None = None) -> None:
        """Tell the front end what changed: everything for a new Diff, else the action delta.

        ``changed`` names the keys whose action changed when the caller knows them: the work
        is then in proportion to those rows; without it every row is compared."""
        if self._plan.diff is not self._sent_diff:
            with gc_paused():
                diff_state = self._diff_state()
            with self.hold_sync():  # one update message for the traits
                for name, value in diff_state.items():
                    setattr(self, name, value)
                self._update_code_stale()
            return
        if changed is None:
            self._send_actions(full=False)
        else:
            self._send_changes(changed)
        self._update_code_stale()
        self._update_summary(changed)

    def _update_summary(self, changed: Sequence[str] | None) -> None:
        """The summary line, again when the actions changed what the checkpoint loads (its
        WARNING when fewer than half of the checkpoint's tensors load comes or goes); the
        rows of ``changed`` are counted again (every row when it is ``None``)."""
        self._coverage.update(self._plan.actions if changed is None else changed)
        summary = _summary_text(self._diff_summary, self._coverage)
        if self._info and self._info.get("summary") != summary:
            self._info = {**self._info, "summary": summary}

    def _update_code_stale(self) -> None:
        source = self._code_source
        stale = source is not None and (
            source[0] is not self._plan.diff
            or source[1] != self._codes
            or source[2] != self._options
        )
        if stale != self.code_stale:
            self.code_stale = stale

    def _diff_state(self) -> dict[str, Any]:
        """Traits that describe the Diff; computed again only when the Diff changes."""
        plan = self._plan
        self._generation += 1
        self._sent_diff = plan.diff
        self._row_of, self._numel, self._codes, self._counts = _row_index(plan)
        self._options = self._options_now()
        self._diff_summary = plan.diff.summary()
        self._coverage = CheckpointCoverage(plan)
        modules = _ModuleIndex(self._model)  # one walk of the model for both
        owners = modules if plan.diff.model is self._model else None
        rows_state = _rows_state(plan, self._generation, self._codes.decode(), self._counts, owners)
        rows_state["options"] = _options_message(self._options)
        return {
            "_rows": rows_state,
            "_info": _info_state(
                plan, self._model, self._plan_dir, modules, self._diff_summary, self._coverage
            ),
            "_suggestions": _suggestion_state(plan.diff),
            "_report": self._report_state(),
        }

    def _codes_now(self) -> bytearray:
        """One action code per row, read from the plan (every row)."""
        return bytearray(_action_codes(self._plan).encode())

    def _options_now(self) -> dict[int, dict[str, OptionValue]]:
        """The rows' options that differ from their action's defaults, by row index."""
        row_of = self._row_of
        chosen = self._plan.rows_with_options
        return dict(sorted((row_of[key], options) for key, options in chosen.items()))

    def _option_changes(self, keys: Sequence[str]) -> list[list[Any]]:
        """[index, options] for the rows of ``keys`` whose options differ from what the front
        end was told (``{}``: back to the defaults), remembered as told."""
        changes: list[list[Any]] = []
        for key in keys:
            index = self._row_of[key]
            now = dict(self._plan.chosen_options(key))
            if now != self._options.get(index, {}):
                if now:
                    self._options[index] = now
                else:
                    self._options.pop(index, None)
                changes.append([index, now])
        return changes

    def _send_changes(self, keys: Sequence[str]) -> None:
        """The delta for rows whose action the caller changed: work in proportion to them."""
        if not keys:
            return
        changes = []
        option_changes = self._option_changes(keys)
        codes = action_codes()
        actions_of = {code: name for name, code in codes.items()}
        for key in keys:
            index = self._row_of[key]
            action = self._plan.action(key)
            new = ord(codes[action])
            old = self._codes[index]
            if old == new:
                continue
            numel = self._numel[index]
            before = self._counts[actions_of[chr(old)]]
            after = self._counts[action]
            before[0] -= 1
            before[1] -= numel
            after[0] += 1
            after[1] += numel
            self._codes[index] = new
            changes.append([index, chr(new)])
        if not changes and not option_changes:
            return
        message: dict[str, Any] = {"type": "actions", "gen": self._generation}
        if len(changes) > _FULL_RESEND_SHARE * len(self._codes):
            message["all"] = self._codes.decode()
        else:
            message["changes"] = changes
        message["counts"] = self._counts
        if option_changes:
            message["options"] = option_changes
        self.send(message)

    def _send_actions(self, *, full: bool) -> None:
        codes = self._codes_now()
        message: dict[str, Any] = {"type": "actions", "gen": self._generation}
        changes = [
            [i, chr(new)]
            for i, (old, new) in enumerate(zip(self._codes, codes, strict=True))
            if old != new
        ]
        options = self._options_now()
        if not full and not changes and options == self._options:
            return
        if full or len(changes) > _FULL_RESEND_SHARE * len(codes):
            message["all"] = codes.decode()
        else:
            message["changes"] = changes
        if full or options != self._options:
            message["options"] = _options_message(options)
            message["options_full"] = True
        self._options = options
        self._codes = codes
        self._counts = _counts_state(self._plan)
        message["counts"] = self._counts
        self.send(message)

    def _send_explanation(self, index: Any, generation: Any) -> None:
        rows = self._plan.diff.rows
        if generation != self._generation or not isinstance(index, int):
            return
        if not 0 <= index < len(rows):
            return
        text = explain_row(self._plan.diff, rows[index])
        self.send({"type": "explain", "gen": generation, "index": index, "text": text})

    def _refusal_notice(self, action: str, rows: Sequence[Row], where: str) -> str:
        refused = {
            r.key: why
            for r in rows
            if r.model is not None and (why := self._plan.refusal(r.key, action))
        }
        if not refused:
            return ""
        model_rows = sum(1 for r in rows if r.model is not None)
        shown = "; ".join(f"{k}: {why}" for k, why in list(refused.items())[:4])
        more = f" (and {len(refused) - 4} more)" if len(refused) > 4 else ""
        return (
            f"{action} set on {model_rows - len(refused)} of {model_rows} rows {where}; "
            f"{len(refused)} cannot take it and kept their action: {shown}{more}"
        )

    def _report_state(self) -> dict[str, Any]:
        """The last apply, the history of applies and undos, and which rows hold written values."""
        report = self.report
        if report is None:
            return {}
        keys = {a: report.keys(a) for a in action_names()}
        return {
            "summary": report.summary(),
            "verified": report.verified,
            "undone": report.undone,
            "can_undo": self._undoable_report() is not None,
            "counts": report.counts,
            "keys": {a: k[:6] for a, k in keys.items()},
            "notes": list(report.notes),
            "applies": len(self._reports),
            "history": [
                {"step": e.step, "kind": e.kind, "summary": e.summary, "undoable": e.undoable}
                for e in self.history
            ],
            "applied": self.applied_codes(),
        }

    def applied_codes(self) -> str:
        """Per row of the table, the code of the action an apply still in effect wrote to it
        (``load``, ``reinit``, ``partial``, ...), else ``"."``: the rows the table marks applied."""
        codes = action_codes()
        marks = bytearray(b"." * len(self._plan.diff.rows))
        row_of = {r.key: i for i, r in enumerate(self._plan.diff.rows) if r.model is not None}
        for report in self._reports:  # oldest first: a later apply's action wins
            if report.undone:
                continue
            for entry in report.entries:
                index = row_of.get(entry.key)
                if index is not None and action_named(entry.action).writes:
                    marks[index] = ord(codes[entry.action])
        return marks.decode()

    # -- where widgets do not render -------------------------------------------------------------
    def _repr_mimebundle_(self, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]] | None:
        bundle = super()._repr_mimebundle_(**kwargs)
        if bundle is None:
            return None
        data, metadata = bundle
        data["text/plain"] = static_text(self)
        data["text/html"] = static_html(self)
        return data, metadata

    def _ipython_display_(self, **kwargs: Any) -> None:
        """Two outputs: the static table, then the live widget.

        A front end without this widget's live model (a notebook reopened without its kernel,
        nbconvert's HTML, nbviewer, GitHub) shows an output's best format it can render, and
        for a widget output that is the widget view even when the model is gone ("model not
        found", or an empty box). The static table is therefore an output of its own, which
        every reader sees; where the live widget renders, its stylesheet hides the static
        output next to it (``loader.css``: ``:has(.ckv)``)."""
        from IPython.display import display as untyped_display

        display = cast(Callable[..., None], untyped_display)
        display(
            {"text/html": static_html(self), "text/plain": static_text(self)},
            raw=True,
        )
        bundle = super()._repr_mimebundle_(**kwargs)
        if bundle is None:
            return
        data, metadata = bundle
        data["text/plain"] = (
            f"ckptviz.Loader ({type(self._model).__name__}): the interactive widget; "
            "its static table is the output above"
        )
        display(data, metadata=metadata, raw=True)

    def __repr__(self) -> str:
        return f"<Loader {self._plan.summary()}>"


def _key_filter(text: str, regex: bool) -> Callable[[str | None], bool]:
    if not text:
        return lambda key: key is not None
    if regex:
        try:
            pattern = re.compile(text)
        except re.error as exc:
            raise PlanError(
                f"the filter {text!r} is not a valid regular expression: {exc}"
            ) from None
        return lambda key: key is not None and pattern.search(key) is not None
    needle = text.lower()
    return lambda key: key is not None and needle in key.lower()


def _action_codes(plan: Plan) -> str:
    actions = plan.actions
    codes = action_codes()
    return "".join(
        codes[actions[r.key]] if r.model is not None else codes[SKIP] for r in plan.diff.rows
    )


def _options_message(options: Mapping[int, Mapping[str, OptionValue]]) -> list[list[Any]]:
    """[index, options] per row whose options differ from its action's defaults."""
    return [[index, dict(chosen)] for index, chosen in options.items()]


def _counts_state(plan: Plan) -> dict[str, list[int]]:
    return {a: [c["rows"], c["numel"]] for a, c in plan.counts.items()}


def _row_index(
    plan: Plan,
) -> tuple[dict[str, int], list[int], bytearray, dict[str, list[int]]]:
    """In one pass over the rows: the row of each model key, each row's value count, its
    action code, and per action its rows and values (``plan.counts``, as lists)."""
    actions = plan.actions  # a copy: taken once
    code_of = {action: ord(code) for action, code in action_codes().items()}
    counts: dict[str, list[int]] = {action: [0, 0] for action in (*action_names(), SKIP)}
    row_of: dict[str, int] = {}
    numels: list[int] = []
    codes = bytearray()
    numel_of: dict[tuple[int, ...], int] = {}  # most rows share their shape with many others
    for index, row in enumerate(plan.diff.rows):
        info = row.model
        if info is not None:
            row_of[info.key] = index
            action = actions[info.key]
        else:
            info = row.checkpoint
            assert info is not None  # a row has at least one side
            action = SKIP
        numel = numel_of.get(info.shape)
        if numel is None:
            numel = numel_of[info.shape] = info.numel
        numels.append(numel)
        codes.append(code_of[action])
        figures = counts[action]
        figures[0] += 1
        figures[1] += numel
    return row_of, numels, codes, counts


class _ModuleIndex:
    """The model, with ``get_submodule`` from one walk of it: ``refusal`` asks it once per row,
    and ``Module.get_submodule`` walks the path each time. Everything else an action's
    ``refuse`` asks of the model is passed through to the model itself."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._model = model
        self._modules: dict[str, torch.nn.Module] = dict(
            model.named_modules(remove_duplicate=False)
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def items(self) -> Iterator[tuple[str, torch.nn.Module]]:
        """Every (name, module), shared modules under each of their names, in model order."""
        return iter(self._modules.items())

    def get_submodule(self, name: str) -> torch.nn.Module:
        try:
            return self._modules[name]
        except KeyError:
            raise AttributeError(f"no submodule {name!r}") from None


class _Refusals:
    """``refusal`` for every row of a table and every action, numbered as the front end
    reads it: each distinct reason once (``reasons``), each distinct list of a row's reason
    codes once (``sets``), and per row the number of its list (0: every action may apply).

    Asked once per distinct question where it can be: apart from an action whose refusal
    reads the model (``refusal_needs_model``: ``reinit`` reads the row's module), a refusal
    depends only on the action, which sides the row has, and their shapes and dtypes, which
    most rows of a table share. An action whose refusal reads the model answers once per
    question too where the row's sides decide it (its ``refuse_by_sides``: ``resample``
    where the shapes agree); the rows it leaves undecided are asked all at once, with the
    action's default options, through ``refuse_each`` (its ``refuse_rows`` where it has one),
    as ``refusal`` would ask each."""

    def __init__(self, owners: torch.nn.Module | None, diff: Diff | None = None) -> None:
        self._owners = owners
        self._diff = diff
        self._names = action_names()
        self._definitions = [action_named(name) for name in self._names]
        self._per_row = {i for i, d in enumerate(self._definitions) if d.refusal_needs_model}
        #: reason -> its code (1 + its index)
        self.reasons: dict[str, int] = {}
        #: a row's codes, one per action in ``action_names()`` order -> its number (1 + index)
        self.sets: dict[tuple[int, ...], int] = {}
        # the sides of a row (shape and dtype of each, None where absent) -> (the reason per
        # action, None at the actions its sides leave to be asked per row; those actions)
        self._known: dict[tuple[Any, ...], tuple[tuple[str | None, ...], tuple[int, ...]]] = {}
        self._number_of_known: dict[tuple[str | None, ...], int] = {}

    def numbers(self, rows: Sequence[Row]) -> list[int]:
        """Each row's number in ``sets`` (0 where every action may apply)."""
        known_of: list[tuple[str | None, ...]] = []
        asked: dict[int, list[int]] = {}  # action index -> the rows to ask it per row
        known = self._known
        for index, row in enumerate(rows):
            m, c = row.model, row.checkpoint
            # one flat tuple: a shape is never None, so the sides cannot be confused
            if m is not None:
                question: tuple[Any, ...] = (
                    (m.shape, m.dtype, c.shape, c.dtype) if c is not None else (m.shape, m.dtype)
                )
            else:
                assert c is not None  # a row has at least one side
                question = (None, c.shape, c.dtype)
            entry = known.get(question)
            if entry is None:
                entry = known[question] = self._first(row)
            reasons, still = entry
            known_of.append(reasons)
            for i in still:
                asked.setdefault(i, []).append(index)
        # the actions asked per row: all their rows at once, then only the refused ones differ
        refused_at: dict[int, dict[int, str]] = {}
        for i, indices in asked.items():
            definition = self._definitions[i]
            ctx = RowsContext(
                [rows[k] for k in indices],
                self._owners,
                MappingProxyType(definition.defaults()),
                self._diff,
            )
            for k, why in zip(indices, definition.refuse_each(ctx), strict=True):
                if why is not None:
                    refused_at.setdefault(k, {})[i] = why
        numbers: list[int] = []
        number_of_known = self._number_of_known
        for index, reasons in enumerate(known_of):
            refused = refused_at.get(index)
            if refused is None:
                number = number_of_known.get(reasons)
                if number is None:
                    number = number_of_known[reasons] = self._number(reasons)
            else:
                whys = list(reasons)
                for i, why in refused.items():
                    whys[i] = why
                number = self._number(tuple(whys))
            numbers.append(number)
        return numbers

    def _number(self, whys: tuple[str | None, ...]) -> int:
        if not any(whys):
            return 0
        codes = tuple(
            self.reasons.setdefault(why, len(self.reasons) + 1) if why else 0 for why in whys
        )
        return self.sets.setdefault(codes, len(self.sets) + 1)

    def _first(self, row: Row) -> tuple[tuple[str | None, ...], tuple[int, ...]]:
        """The reasons of the first row of its question (``None`` at the actions its sides do
        not decide), and those actions."""
        names, owners, diff = self._names, self._owners, self._diff
        if row.model is None:  # no model tensor: nothing reads the model
            return tuple(refusal(row, n, owners, None, diff) for n in names), ()
        reasons: list[str | None] = []
        still: list[int] = []
        for i, (name, definition) in enumerate(zip(names, self._definitions, strict=True)):
            if i not in self._per_row:
                reasons.append(refusal(row, name, owners, None, diff))
                continue
            early: str | Undecided | None = UNDECIDED
            if definition.refuse_by_sides is not None:
                ctx = RowContext(row, owners, MappingProxyType(definition.defaults()), diff)
                early = definition.refuse_by_sides(ctx)
            if isinstance(early, Undecided):
                reasons.append(None)
                still.append(i)
            else:
                reasons.append(early)
        return tuple(reasons), tuple(still)


#: How a row's checkpoint side travels when every column of it equals the model side's (a
#: key loaded as it is): one number instead of the same values again.
SAME_AS_MODEL = 1


def _rows_state(
    plan: Plan,
    generation: int,
    codes: str,
    counts: Mapping[str, list[int]],
    modules: _ModuleIndex | None = None,
) -> dict[str, Any]:
    """Row metadata, one list per row in ``ROW_FIELDS`` order: a side is the list of its
    columns' values (``null`` where the row has no such side; the checkpoint side is
    ``SAME_AS_MODEL`` where it equals the model side); ``refused`` is the row's number in
    ``refusal_sets`` (0: every action may apply), each set a reason code per action in
    ``actions_order`` (0: it may, else 1 + the index of its reason in ``reasons``).
    ``modules`` is an index of ``plan.diff.model`` already made (else one is made here).

    The rows travel as one JSON buffer (``data``): a binary buffer is sent as it is,
    where a list of 100,000 lists would be walked value by value on its way to the wire."""
    columns = widget_columns.COLUMNS  # read at each call: a column added is a column sent
    data = []
    mapping = plan.diff.mapping
    prefixes_only = KeyMapping(mapping.checkpoint_prefix, mapping.model_prefix)
    # without prefixes a pair is renamed exactly when its two keys differ
    no_prefixes = not (mapping.checkpoint_prefix or mapping.model_prefix)
    model = plan.diff.model
    if modules is None and model is not None:
        modules = _ModuleIndex(model)
    refusals = _Refusals(cast(torch.nn.Module, modules) if modules is not None else None, plan.diff)
    rows = plan.diff.rows
    refused = refusals.numbers(rows)
    side = widget_columns.side_values(columns)
    for row, number in zip(rows, refused, strict=True):
        m, c = row.model, row.checkpoint
        # where the row sits in the module tree, if not at its key: an unexpected key goes where
        # the model would have it
        place = None
        renamed = 0
        model_side: Sequence[Any] | None = None
        checkpoint_side: Sequence[Any] | int | None = None
        if m is None:
            assert c is not None  # a row has at least one side
            place = mapping.model_prefix + mapping.checkpoint_name(c.key)
            if place == c.key:
                place = None
            checkpoint_side = side(c)
        else:
            model_side = side(m)
            if c is not None:
                checkpoint_side = side(c)
                if checkpoint_side == model_side:
                    checkpoint_side = SAME_AS_MODEL
                # renamed by a rule or by hand (not merely a wrapper prefix): the checkpoint
                # key is shown
                if no_prefixes:
                    renamed = int(c.key != m.key)
                else:
                    renamed = int(
                        prefixes_only.checkpoint_name(c.key) != prefixes_only.model_name(m.key)
                    )
        data.append(
            [
                row.status,
                model_side,
                checkpoint_side,
                row.note,
                number,
                _tied_shown(row.tied) if row.tie_group else 0,
                place,
                renamed,
            ]
        )
    return {
        "gen": generation,
        "fields": list(ROW_FIELDS),
        "same_as_model": SAME_AS_MODEL,
        "actions_order": list(action_names()),
        # ASCII JSON: a key with a lone surrogate (a file can hold one) stays exact as \udc80
        "data": json.dumps(data, separators=(",", ":")).encode("ascii"),
        "reasons": list(refusals.reasons),
        "refusal_sets": [list(codes) for codes in refusals.sets],
        "actions": codes,
        # a copy: the Loader updates its counters in place as actions change
        "counts": {action: list(figures) for action, figures in counts.items()},
        "expanded": _opening_groups(plan.diff),
    }


#: Above this many rows the table opens on the rows that differ, other groups collapsed.
OPEN_ALL_ROWS = 300


def _opening_groups(diff: Diff) -> list[str] | None:
    """The module groups the table opens expanded: every group when the table is small
    (``None``), else only those holding a row that differs (another status, or renamed)."""
    if len(diff.rows) <= OPEN_ALL_ROWS:
        return None
    expanded: set[str] = set()
    for row in diff.rows:
        if row.status == Status.MATCH and not row.note:
            continue
        place = (
            row.key
            if row.model is not None
            else diff.mapping.model_prefix + (diff.mapping.checkpoint_name(row.key))
        )
        parts = place.split(".")[:-1]
        for depth in range(1, len(parts) + 1):
            expanded.add(".".join(parts[:depth]))
    return sorted(expanded)


def _summary_text(diff_summary: str, coverage: CheckpointCoverage) -> str:
    """The widget's summary line: the Diff's summary, and a WARNING when fewer than half of
    the checkpoint's tensors load with the plan as it is ("0 of 39 checkpoint tensors
    loaded"), saying what to look at."""
    text = diff_summary
    if warning := coverage.warning():
        text += (
            f"\nWARNING: {warning} by this plan; the model keeps its own values for the rest. "
            "Unexpected rows: keys that may not line up (see the suggestions and the key "
            "mapping); shape rows: the architecture changed there (each row's details say what "
            "fits)"
        )
    return text


def _info_state(
    plan: Plan,
    model: torch.nn.Module,
    plan_dir: Path,
    modules: _ModuleIndex | None,
    diff_summary: str,
    coverage: CheckpointCoverage,
) -> dict[str, Any]:
    """``modules`` is an index of ``model`` already made (else one is made here)."""
    diff = plan.diff
    ckpt = diff.checkpoint
    owners = {r.model.key.rpartition(".")[0] for r in diff.rows if r.model is not None}
    if modules is None:
        modules = _ModuleIndex(model)
    module_types = {
        name: type(module).__name__ for name, module in modules.items() if name in owners
    }
    checkpoint_name = ckpt.path.name if ckpt.path is not None else ckpt.source
    stem = ckpt.path.stem if ckpt.path is not None else "checkpoint"
    return {
        "model": type(model).__name__,
        "checkpoint": checkpoint_name,
        "checkpoint_source": ckpt.source,
        "summary": _summary_text(diff_summary, coverage),
        "mapping": diff.mapping.describe(),
        "module_types": module_types,
        "plan_path": f"{stem}.plan.json",
        "plan_dir": str(plan_dir),
        "statuses": diff.counts,
    }


def _vocabulary_state() -> dict[str, Any]:
    """The statuses and actions as the front end shows them, from ``core.vocabulary`` and the
    actions registry."""
    codes = action_codes()
    explains = {a.name: a.explain for a in registered_actions()}
    # skip has no button: only registered actions can be shown on every row
    always_shown = {a.name: a.always_shown for a in registered_actions()}
    # each action's options as the front end builds a control for them: a <select> for
    # choices, a number field for int/float, a checkbox for bool, a text field for str
    options = {
        a.name: [
            {
                "name": name,
                "kind": spec.kind.__name__,
                "default": spec.default,
                "choices": list(spec.choices),
                "words": spec.words,
            }
            for name, spec in a.options.items()
        ]
        for a in registered_actions()
    }
    return {
        "statuses": [
            {
                "name": s.value,
                "label": t.label,
                "symbol": t.symbol,
                "colour": t.colour,
                # a row of this status is a difference: "next difference" stops on it
                "differs": s is not Status.MATCH,
            }
            for s, t in STATUS_TERMS.items()
        ],
        # every registered action, in registration order (one button each), then skip
        "actions": [
            {
                "name": name,
                "label": term.label,
                "symbol": term.symbol,
                "colour": term.colour,
                "code": codes[name],
                "chosen": name != SKIP,
                "explain": explains.get(name, term.label),
                # its button is on every row (refused ones struck through, the reason on hover),
                # else only where it may apply or is the row's action
                "always_shown": always_shown.get(name, False),
                "options": options.get(name, []),
            }
            for name, term in action_terms().items()
        ],
        "colours": list(COLOUR_ROLES),
    }


def _confined(path: Any, folder: Path) -> Path:
    """``path`` (relative to ``folder``, or absolute) with every symbolic link resolved, if it
    stays inside ``folder``; else a ``PlanError`` that says why and what to do."""
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    where = f"plan files are saved and loaded inside {str(folder)!r}"
    elsewhere = "pass plan_dir= to Loader to use another folder"
    if not isinstance(path, str) or not path.strip():
        raise PlanError(f"name the plan file, e.g. 'model.plan.json': {where}")
    if "\x00" in path:
        raise PlanError(f"the plan file name {path!r} holds a NUL character; {where}")
    given = Path(path)
    if ".." in given.parts:
        raise PlanError(f"the plan file name {path!r} contains '..': {where}; {elsewhere}")
    if given.parts and given.parts[0].startswith("~"):
        raise PlanError(
            f"the plan file name {path!r} starts with '~', which is not expanded: {where}; "
            + elsewhere
        )
    candidate = given if given.is_absolute() else folder / given
    try:
        resolved = candidate.resolve()
    except (OSError, RuntimeError) as exc:  # a symbolic link loop
        raise PlanError(f"{path!r}: cannot resolve the path ({exc}); {where}") from None
    if not resolved.is_relative_to(folder):
        through_link = candidate.absolute().is_relative_to(folder)
        raise PlanError(
            f"the plan file {path!r} is outside {str(folder)!r}"
            + (f" (a symbolic link leads to {str(resolved)!r})" if through_link else "")
            + f": {where}; {elsewhere}"
        )
    if resolved == folder:
        raise PlanError(f"{path!r} is the plan folder itself: {where}; name a file in it")
    return resolved


def _read_plan_json(path: Path) -> Any:
    """The parsed JSON of a regular file of at most ``PLAN_FILE_LIMIT`` bytes."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        descriptor = os.open(path, flags)
    except FileNotFoundError:
        raise PlanError(f"{path}: no such plan file; save one first or check the name") from None
    except OSError as exc:
        raise PlanError(f"{path}: cannot read the plan file ({exc.strerror or exc})") from None
    info = os.fstat(descriptor)
    if not stat.S_ISREG(info.st_mode):
        os.close(descriptor)
        raise PlanError(f"{path} is not a regular file; a plan file is JSON saved by ckptviz")
    if info.st_size > PLAN_FILE_LIMIT:
        os.close(descriptor)
        raise PlanError(
            f"{path} is {info.st_size:,} bytes, more than a plan file may be "
            f"({PLAN_FILE_LIMIT:,}); it is not a ckptviz plan"
        )
    with os.fdopen(descriptor, "rb") as source:
        data = source.read(PLAN_FILE_LIMIT + 1)
    if len(data) > PLAN_FILE_LIMIT:
        raise PlanError(f"{path} grew past {PLAN_FILE_LIMIT:,} bytes while being read")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlanError(f"{path}: not a ckptviz plan: the JSON is malformed ({exc})") from None


def readable_rule(rule: RuleSuggestion, example: str | None = None) -> str:
    """A rename rule in words a person reads at a glance: ``blocks.* → layers.*``.

    The rules ``suggest_rules`` makes are a name between two guards; any other pattern is shown
    as the regular expression it is."""
    found = re.fullmatch(r"\\[bB](.*)\(\[\^A-Za-z_\]\|\$\)", rule.pattern)
    if found is None or not rule.replacement.endswith("\\1"):
        return f"{rule.pattern} → {rule.replacement}"
    old = re.sub(r"\\(.)", r"\1", found.group(1))
    new = re.sub(r"\\(.)", r"\1", rule.replacement[:-2])
    before = after = "*"
    if example is not None and (at := re.search(rule.pattern, example)) is not None:
        # the rule's match takes the character after the name (group 1) and puts it back
        start, end = at.start(), at.start(1)
        before = "" if not start else "*." if example[start - 1] == "." else "*"
        after = "" if end == len(example) else ".*" if example[end] == "." else "*"
    return f"{before}{old}{after} → {before}{new}{after}"


def _suggestion_state(diff: Diff) -> list[dict[str, Any]]:
    """Rules first, each with the suggested pairs it covers; then the pairs no rule covers.
    ``index`` is the item's place in ``Loader.suggestions`` (what ``accept`` takes)."""
    rules = diff.rule_suggestions
    pairs = diff.suggestions
    mapping = diff.mapping
    covered: dict[int, list[list[str]]] = {i: [] for i in range(len(rules))}
    free: list[dict[str, Any]] = []
    for offset, pair in enumerate(pairs):
        name = mapping.model_name(pair.model_key)
        owner = next(
            (
                i
                for i, rule in enumerate(rules)
                if with_rule(mapping, rule.pattern, rule.replacement).checkpoint_name(
                    pair.checkpoint_key
                )
                == name
            ),
            None,
        )
        if owner is not None:
            covered[owner].append([pair.checkpoint_key, pair.model_key])
            continue
        free.append(
            {
                "kind": "pair",
                "index": len(rules) + offset,
                "model_key": pair.model_key,
                "checkpoint_key": pair.checkpoint_key,
                "score": round(pair.score, 3),
                "reason": pair.reason,
            }
        )
    state: list[dict[str, Any]] = []
    for i, rule in enumerate(rules):
        examples = covered[i][:3]
        state.append(
            {
                "kind": "rule",
                "index": i,
                "pattern": rule.pattern,
                "replacement": rule.replacement,
                "readable": readable_rule(rule, examples[0][0] if examples else None),
                "pairs": rule.pairs,
                "examples": examples,
            }
        )
    return state + free


def _plan_for(diff: Diff, saved: Plan, path: str | Path) -> Plan:
    """A plan on this widget's model and checkpoint with a saved plan's mapping and actions."""
    remapped = Diff(diff.model_side, diff.checkpoint, saved.diff.mapping, diff.model)
    plan = Plan(remapped, seed=saved.seed)
    ours = {r.key: r for r in remapped.rows if r.model is not None}
    theirs = {r.key: (r, action) for r, action in saved if r.model is not None}
    problems: dict[str, str] = {}
    for key, (row, action) in theirs.items():
        mine = ours.get(key)
        if mine is None:
            problems[key] = "this model has no such tensor"
        elif mine.checkpoint_key != row.checkpoint_key:
            problems[key] = (
                f"the plan feeds it from {row.checkpoint_key!r}, here it is fed from "
                f"{mine.checkpoint_key!r}"
            )
        elif mine.status != row.status:
            problems[key] = f"the plan saw status {row.status}, here it is {mine.status}"
        elif why := plan.refusal(key, action, None, **cast(dict[str, Any], saved.options(key))):
            problems[key] = f"{action}: {why}"
    for key in ours.keys() - theirs.keys():
        problems[key] = "the plan has no action for it"
    if problems:
        raise PlanError(
            f"{path}: the saved plan does not fit this model and checkpoint; nothing changed. "
            + "; ".join(f"{k}: {v}" for k, v in list(problems.items())[:6])
            + (f" (and {len(problems) - 6} more)" if len(problems) > 6 else ""),
            problems,
        )
    for key, (_, action) in theirs.items():
        plan.set(key, action, **cast(dict[str, Any], saved.options(key)))
    return plan


# -- the static view: text/html and text/plain for places where widgets do not render ----------


def _rows_to_show(plan: Plan, limit: int) -> list[int]:
    """Every row if they fit; else the rows that differ or do not load first, in table order."""
    rows = plan.diff.rows
    if len(rows) <= limit:
        return list(range(len(rows)))
    actions = plan.actions
    notable = [
        i
        for i, r in enumerate(rows)
        if r.status != "match"
        or r.note
        or (r.model is not None and actions[r.key] != default_action(r))
    ]
    chosen = set(notable[:limit])
    rest = (i for i in range(len(rows)) if i not in chosen)
    while len(chosen) < limit:
        chosen.add(next(rest))
    return sorted(chosen)


def _counts_line(plan: Plan) -> str:
    parts = [
        f"{action} {c['rows']:,} row{'' if c['rows'] == 1 else 's'} ({c['numel']:,} values)"
        for action, c in plan.counts.items()
        if c["rows"]
    ]
    return "Plan: " + ", ".join(parts)


def static_text(loader: Loader) -> str:
    """What a terminal shows: the summary, the counters and the plan's rows as text."""
    plan = loader.plan
    diff = plan.diff
    shown = _rows_to_show(plan, 40)
    headers = ["status", "model key", "shape", "dtype", "checkpoint key", "shape", "dtype"]
    table = format_table(
        [*headers, "action"],
        [[*row_cells(diff.rows[i]), plan.action(diff.rows[i].key)] for i in shown],
    )
    more = len(diff.rows) - len(shown)
    lines = [
        f"ckptviz.Loader: {type(loader.model).__name__} <- {visible(diff.checkpoint.source)}",
        diff.summary(),
        _counts_line(plan),
    ]
    if loader.report is not None:
        lines.append(loader.report.summary())
    lines += ["", table]
    if more:
        lines.append(f"... {more:,} more rows that match and load (loader.plan.to_frame())")
    return "\n".join(lines)


def static_html(loader: Loader) -> str:
    """What nbviewer, GitHub and exported HTML show: the styled plan table and its summary."""
    from ckptviz import tables

    plan = loader.plan
    diff = plan.diff
    shown = _rows_to_show(plan, STATIC_ROWS)
    table = tables.plan_html(plan, rows=shown)
    head = (
        f"<strong>ckptviz.Loader</strong>: {html.escape(type(loader.model).__name__)} &larr; "
        f"{html.escape(diff.checkpoint.source)}"
        " <span style='opacity:.7'>(the interactive widget shows here when run in Jupyter)</span>"
    )
    summary = "<br>".join(html.escape(line) for line in diff.summary().splitlines())
    parts = [f"<p>{head}</p>", f"<p>{summary}<br>{html.escape(_counts_line(plan))}</p>", table]
    if len(shown) < len(diff.rows):
        parts.append(
            f"<p>... {len(diff.rows) - len(shown):,} more rows that match and load "
            "(<code>loader.plan.to_frame()</code> lists them all)</p>"
        )
    if loader.report is not None:
        parts.append(loader.report._repr_html_())
    body = f"<div class='{tables.NO_MATH_CLASSES}'>" + "".join(parts) + "</div>"
    return "<div class='ckptviz-loader-static'>" + body + "</div>"


def _tied_shown(tied: Sequence[str]) -> list[str]:
    """The first ``TIED_SHOWN`` keys a row is tied to, then how many more (shown as text)."""
    if len(tied) <= TIED_SHOWN:
        return list(tied)
    return [*tied[:TIED_SHOWN], f"… and {len(tied) - TIED_SHOWN:,} more"]
