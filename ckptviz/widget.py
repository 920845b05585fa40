"""The Loader widget: a checkpoint and a live model side by side, one action per tensor, applied
to the model in the kernel, with undo, as code and as a saved plan.

A thin stateful view over one ``Diff`` and one ``Plan``. Every control in the front end
(``static/loader.js``) sends a small message naming one of the public methods below, so a script
or a test calls exactly what a click calls.

What goes over the wire, and why it stays small at 10,000 rows:

- ``_rows`` (a synced traitlet) carries the row metadata once per Diff: keys, shapes, dtypes,
  sizes, statuses and the reasons actions are refused. It is sent again only when the Diff itself
  changes (a pair, an accepted suggestion, a loaded plan).
- Actions travel as deltas in custom messages: after every call the widget compares the plan's
  actions with what the front end was last told and sends only the rows that changed, one code
  letter each, with the counters. A single tick is one message of a few hundred bytes.
- A front end that renders later (a second view, a reloaded page) sends ``hello`` and gets the
  full action list in one message.
"""

from __future__ import annotations

import functools
import html
import logging
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar, cast

import anywidget
import torch
import traitlets

from ckptviz.core.apply import Report
from ckptviz.core.diff import STATUSES, Diff, Row, compare
from ckptviz.core.errors import PlanError
from ckptviz.core.explain import explain_row
from ckptviz.core.matching import KeyMapping, RuleSuggestion, Suggestion
from ckptviz.core.plan import ACTIONS, SKIP, Plan, refusal
from ckptviz.core.text import format_table, row_cells, visible

STATIC = Path(__file__).parent / "static"

#: One letter per action in the action strings and deltas sent to the front end.
ACTION_CODES = {"load": "l", "keep": "k", "reinit": "r", "partial": "p", SKIP: "s"}

#: The order of the values in each row of ``_rows["data"]``.
ROW_FIELDS = (
    "status",
    "model_key",
    "model_shape",
    "model_dtype",
    "model_bytes",
    "checkpoint_key",
    "checkpoint_shape",
    "checkpoint_dtype",
    "checkpoint_bytes",
    "note",
    "refused",
    "tied",
    "place",
    "renamed",
)

#: The methods a front-end message may call (its "do"), with the fields passed as arguments.
FRONT_END_CALLS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "set_action": ("pattern", "action"),
        "set_module": ("module", "action"),
        "set_bulk": ("action", "statuses", "filter", "regex"),
        "reset": (),
        "accept": ("which",),
        "pair": ("model_key", "checkpoint_key"),
        "apply": (),
        "undo": (),
        "show_code": (),
        "hide_code": (),
        "save_plan": ("path",),
        "load_plan": ("path",),
    }
)

#: Rows in the static (no-widget) view; larger plans show the rows that differ first.
STATIC_ROWS = 100
#: Above this share of changed rows a full action string is smaller than a delta.
_FULL_RESEND_SHARE = 0.25

log = logging.getLogger(__name__)
Method = TypeVar("Method", bound=Callable[..., Any])


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    return str(exc) or type(exc).__name__


def _user_action(method: Method) -> Method:
    """Run a public method as one user action: show its error in the widget (and raise it for
    code callers), clear the previous notice, and send the front end what changed."""

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
        self._push()
        return result

    return cast(Method, run)


class Loader(anywidget.AnyWidget):
    """Compare ``model`` with the checkpoint ``source``, choose an action per tensor, apply.

    ``compare_kwargs`` go to ``ckptviz.compare`` (``rename``, ``key``, ``trusted``,
    ``allow_globals``). Display the widget in a notebook; drive it from code with the same
    methods its buttons call: ``set_action``, ``set_module``, ``set_bulk``, ``accept``, ``pair``,
    ``apply``, ``undo``, ``show_code``, ``save_plan``, ``load_plan``.
    """

    _esm = STATIC / "loader.js"
    _css = STATIC / "loader.css"

    _rows = traitlets.Dict().tag(sync=True)
    _info = traitlets.Dict().tag(sync=True)
    _suggestions: traitlets.List[dict[str, Any]] = traitlets.List().tag(sync=True)
    _report = traitlets.Dict().tag(sync=True)
    _code = traitlets.Unicode("").tag(sync=True)
    #: The last action's failure in words ("" when it succeeded); the model was not changed.
    error = traitlets.Unicode("").tag(sync=True)
    #: What the last action did that the table alone does not show (refused rows, saved file).
    notice = traitlets.Unicode("").tag(sync=True)

    def __init__(self, model: torch.nn.Module, source: Any, **compare_kwargs: Any) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"Loader needs a live torch.nn.Module to load into, got {type(model).__name__}; "
                "to compare two checkpoints use ckptviz.compare(a, b)"
            )
        self._model = model
        self._plan = compare(model, source, **compare_kwargs).plan()
        self._reports: list[Report] = []
        self._generation = 0
        self._sent_diff: Diff | None = None
        self._sent_codes = ""
        super().__init__(**self._diff_state())
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
    def report(self) -> Report | None:
        """The last apply's Report (``None`` before the first apply)."""
        return self._reports[-1] if self._reports else None

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
        self, pattern: str | re.Pattern[str], action: str, *, skip_refused: bool = False
    ) -> list[str]:
        """Set ``action`` on the rows ``pattern`` names (key, module, glob or compiled regex).

        A refused row raises ``PlanError`` and changes nothing, unless ``skip_refused``.
        Returns the keys whose action changed.
        """
        return self._plan.set(pattern, action, skip_refused=skip_refused)

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
    def pair(self, model_key: str, checkpoint_key: str) -> None:
        """Feed the missing model key ``model_key`` from the unexpected ``checkpoint_key``."""
        self._plan.pair(model_key, checkpoint_key)

    @_user_action
    def apply(self) -> Report:
        """Apply the plan to the live model (all-or-nothing, verified); Undo is enabled after."""
        report = self._plan.apply(self._model)
        self._reports.append(report)
        self._report = self._report_state()
        return report

    @_user_action
    def undo(self) -> int:
        """Put back what the last apply not yet undone wrote; returns how many tensors."""
        for report in reversed(self._reports):
            if report.can_undo:
                restored = report.undo()
                self._report = self._report_state()
                self.notice = f"undone: {restored} tensor(s) restored bit for bit"
                return restored
        raise PlanError("nothing to undo: apply the plan first")

    @_user_action
    def show_code(self) -> str:
        """Show ``plan.to_code()`` in the widget and return it."""
        self._code = self._plan.to_code()
        return self._code

    @_user_action
    def hide_code(self) -> None:
        self._code = ""

    @_user_action
    def save_plan(self, path: str | Path) -> Path:
        """Write the plan as JSON (``Plan.from_json`` or ``load_plan`` read it back)."""
        target = Path(path).expanduser()
        try:
            self._plan.to_json(target)
        except OSError as exc:
            raise PlanError(f"{target}: cannot write the plan ({exc.strerror or exc})") from None
        self.notice = f"plan saved to {target.resolve()}"
        return target

    @_user_action
    def load_plan(self, path: str | Path) -> None:
        """Take the key mapping and actions of a saved plan; every row must fit this model
        and checkpoint, or nothing changes."""
        self._plan = _plan_for(self._plan.diff, Plan.from_json(Path(path).expanduser()), path)
        self.notice = f"plan loaded from {path}"

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
        try:
            getattr(self, do)(**kwargs)
        except Exception:
            # Already shown in the widget by _user_action; the traceback goes to the log.
            log.debug("Loader.%s(%r) failed", do, kwargs, exc_info=True)
        if "id" in content:  # the slow calls (apply, files) show "busy" until this answer
            self.send({"type": "done", "id": content["id"]})

    def _push(self) -> None:
        """Tell the front end what changed: everything for a new Diff, else the action delta."""
        if self._plan.diff is not self._sent_diff:
            with self.hold_sync():  # one update message for the three traits
                for name, value in self._diff_state().items():
                    setattr(self, name, value)
            return
        self._send_actions(full=False)

    def _diff_state(self) -> dict[str, Any]:
        """Traits that describe the Diff; computed again only when the Diff changes."""
        plan = self._plan
        self._generation += 1
        self._sent_diff = plan.diff
        self._sent_codes = _action_codes(plan)
        return {
            "_rows": _rows_state(plan, self._generation, self._sent_codes),
            "_info": _info_state(plan, self._model),
            "_suggestions": _suggestion_state(self.suggestions),
        }

    def _send_actions(self, *, full: bool) -> None:
        codes = _action_codes(self._plan)
        message: dict[str, Any] = {"type": "actions", "gen": self._generation}
        changes = [
            [i, new]
            for i, (old, new) in enumerate(zip(self._sent_codes, codes, strict=True))
            if old != new
        ]
        if not full and not changes:
            return
        if full or len(changes) > _FULL_RESEND_SHARE * len(codes):
            message["all"] = codes
        else:
            message["changes"] = changes
        message["counts"] = _counts_state(self._plan)
        self._sent_codes = codes
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
        report = self.report
        if report is None:
            return {}
        keys = {a: report.keys(a) for a in ACTIONS}
        return {
            "summary": report.summary(),
            "verified": report.verified,
            "undone": report.undone,
            "can_undo": any(r.can_undo for r in self._reports),
            "counts": report.counts,
            "keys": {a: k[:6] for a, k in keys.items()},
            "notes": list(report.notes),
            "applies": len(self._reports),
        }

    # -- where widgets do not render -------------------------------------------------------------
    def _repr_mimebundle_(self, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]] | None:
        bundle = super()._repr_mimebundle_(**kwargs)
        if bundle is None:
            return None
        data, metadata = bundle
        data["text/plain"] = static_text(self)
        data["text/html"] = static_html(self)
        return data, metadata

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
    return "".join(
        ACTION_CODES[actions[r.key]] if r.model is not None else ACTION_CODES[SKIP]
        for r in plan.diff.rows
    )


def _counts_state(plan: Plan) -> dict[str, list[int]]:
    return {a: [c["rows"], c["numel"]] for a, c in plan.counts.items()}


def _rows_state(plan: Plan, generation: int, codes: str) -> dict[str, Any]:
    """Row metadata, one list per row in ``ROW_FIELDS`` order; refusal reasons deduplicated."""
    reasons: dict[str, int] = {}
    data = []
    mapping = plan.diff.mapping
    prefixes_only = KeyMapping(mapping.checkpoint_prefix, mapping.model_prefix)
    for row in plan.diff.rows:
        m, c = row.model, row.checkpoint
        # where the row sits in the module tree, if not at its key: an unexpected key goes where
        # the model would have it
        place = None if m else mapping.model_prefix + mapping.checkpoint_name(row.key)
        # renamed by a rule or by hand (not merely a wrapper prefix): show the checkpoint key
        renamed = 0
        if m is not None and c is not None:
            renamed = int(prefixes_only.checkpoint_name(c.key) != prefixes_only.model_name(m.key))
        # per action: 0 if it may apply, else 1 + the index of its reason in "reasons"
        why_not = [refusal(row, action, plan.diff.model) for action in ACTIONS]
        codes_of_row = [reasons.setdefault(why, len(reasons) + 1) if why else 0 for why in why_not]
        refused = codes_of_row if any(codes_of_row) else 0
        data.append(
            [
                row.status,
                m.key if m else None,
                list(m.shape) if m else None,
                m.dtype if m else None,
                m.nbytes if m else 0,
                c.key if c else None,
                list(c.shape) if c else None,
                c.dtype if c else None,
                c.nbytes if c else 0,
                row.note,
                refused,
                list(row.tied),
                place if place != row.key else None,
                renamed,
            ]
        )
    return {
        "gen": generation,
        "fields": list(ROW_FIELDS),
        "actions_order": list(ACTIONS),
        "data": data,
        "reasons": list(reasons),
        "actions": codes,
        "counts": _counts_state(plan),
    }


def _info_state(plan: Plan, model: torch.nn.Module) -> dict[str, Any]:
    diff = plan.diff
    ckpt = diff.checkpoint
    owners = {r.module for r in diff.rows if r.model is not None}
    module_types = {
        name: type(module).__name__ for name, module in model.named_modules() if name in owners
    }
    checkpoint_name = ckpt.path.name if ckpt.path is not None else ckpt.source
    stem = ckpt.path.stem if ckpt.path is not None else "checkpoint"
    return {
        "model": type(model).__name__,
        "checkpoint": checkpoint_name,
        "checkpoint_source": ckpt.source,
        "summary": diff.summary,
        "mapping": diff.mapping.describe(),
        "module_types": module_types,
        "plan_path": f"{stem}.plan.json",
        "statuses": diff.counts,
    }


def _suggestion_state(items: Sequence[RuleSuggestion | Suggestion]) -> list[dict[str, Any]]:
    state: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, RuleSuggestion):
            state.append(
                {
                    "kind": "rule",
                    "pattern": item.pattern,
                    "replacement": item.replacement,
                    "pairs": item.pairs,
                }
            )
        else:
            state.append(
                {
                    "kind": "pair",
                    "model_key": item.model_key,
                    "checkpoint_key": item.checkpoint_key,
                    "score": round(item.score, 3),
                    "reason": item.reason,
                }
            )
    return state


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
        elif why := plan.refusal(key, action):
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
        plan.set(key, action)
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
        if r.status != "match" or r.note or (r.model is not None and actions[r.key] != "load")
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
        diff.summary,
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
    summary = "<br>".join(html.escape(line) for line in diff.summary.splitlines())
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
