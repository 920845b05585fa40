"""The Report of an apply: what changed, verified, and ``undo()`` to put the model back."""

from __future__ import annotations

import warnings
import weakref
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

from ckptviz.core.actions import action_named, action_names, checkpoint_keys_read
from ckptviz.core.actions.base import ActionDef, OptionValue, RowContext
from ckptviz.core.checkpoint import human_bytes
from ckptviz.core.display import render
from ckptviz.core.errors import PlanError
from ckptviz.core.snapshot import Snapshot, SnapshotChoice
from ckptviz.core.text import visible, visible_lines

if TYPE_CHECKING:
    from ckptviz.core.diff import Row
    from ckptviz.core.plan import Plan


class CheckpointCoverage:
    """Which of a checkpoint's tensors a plan reads into the model, kept up to date row by row.

    Counts every checkpoint key a row's action reads: its own tensor (``reads_checkpoint``) and
    what the action ``needs`` (a ``merge`` row reads its adapter's ``lora_A`` and ``lora_B``),
    as the actions registry says. ``update(keys)`` re-counts only those model rows, so a view
    that changes a few actions pays for those rows, not for the whole plan.
    """

    def __init__(self, plan: Plan) -> None:
        self._plan = plan
        self.total = len(plan.diff.checkpoint.tensors)
        # what each row was counted with: its action, and for an action with ``needs`` the
        # keys it read then (its options may have changed since)
        self._counted: dict[str, str] = plan.actions
        self._needed_of: dict[str, tuple[str, ...]] = {}
        self._readers: Counter[str] = Counter()
        self._count(plan)

    @property
    def loaded(self) -> int:
        """How many distinct checkpoint tensors the plan reads."""
        return len(self._readers)

    def _count(self, plan: Plan) -> None:
        """Count every row once (a plan of 100,000 rows: each action is looked up once, the
        common rows, which read their own checkpoint tensor, in one comprehension)."""
        actions = self._counted
        definitions = {name: action_named(name) for name in set(actions.values())}
        reads_own = {n for n, d in definitions.items() if d.needs is None and d.reads_checkpoint}
        rows = plan.diff.rows
        self._readers.update(
            c.key
            for row in rows
            if (m := row.model) is not None
            and (c := row.checkpoint) is not None
            and actions[m.key] in reads_own
        )
        if any(d.needs is not None for d in definitions.values()):
            for row in rows:
                m = row.model
                if m is not None and (definition := definitions[actions[m.key]]).needs:
                    self._needed_of[m.key] = now = self._needed(row, m.key, definition)
                    self._readers.update(now)

    def _needed(self, row: Row, key: str, action: ActionDef) -> tuple[str, ...]:
        plan = self._plan
        options = MappingProxyType(plan.options(key))
        return checkpoint_keys_read(action, RowContext(row, plan.diff.model, options, plan.diff))

    def _reads(self, row: Row, key: str, action: str) -> tuple[str, ...]:
        """The checkpoint keys the row reads with ``action`` as it is now."""
        definition = action_named(action)
        if definition.needs is not None:
            return self._needed(row, key, definition)
        c = row.checkpoint
        return (c.key,) if definition.reads_checkpoint and c is not None else ()

    def update(self, model_keys: Iterable[str]) -> None:
        """Count the rows of ``model_keys`` again, with their actions as they are now."""
        plan = self._plan
        diff = plan.diff
        for key in model_keys:
            row = diff.row(key)
            action = plan.action(key)
            before = self._needed_of.pop(key, None)
            if before is None:
                counted = self._counted.get(key)
                before = () if counted is None else self._reads(row, key, counted)
            now = self._reads(row, key, action)
            self._counted[key] = action
            if action_named(action).needs is not None:
                self._needed_of[key] = now
            if now == before:
                continue
            self._readers.subtract(before)
            for gone in before:
                if not self._readers[gone]:
                    del self._readers[gone]
            self._readers.update(now)

    def warning(self) -> str | None:
        """The short warning when fewer than half of the checkpoint's tensors reach the model
        ("0 of 39 checkpoint tensors loaded"); ``None`` when at least half do."""
        return coverage_warning(self.loaded, self.total)


def checkpoint_coverage(plan: Plan) -> tuple[int, int]:
    """(how many of the checkpoint's tensors the plan reads into the model, how many it holds)."""
    coverage = CheckpointCoverage(plan)
    return coverage.loaded, coverage.total


def coverage_warning(loaded: int, total: int) -> str | None:
    """The short warning when fewer than half of a checkpoint's tensors reach the model
    ("0 of 39 checkpoint tensors loaded"); ``None`` when at least half do (or it holds none)."""
    if total == 0 or 2 * loaded >= total:
        return None
    return f"{loaded} of {total} checkpoint tensors loaded"


def coverage_causes(plan: Plan) -> list[tuple[str, str]]:
    """Why a plan leaves checkpoint tensors out, as (a few words, the advice) per cause: keys
    that do not line up, shapes that changed, tensors that fit but are set to keep/reinit."""
    unexpected = shape = not_loaded = 0
    for row, action in plan:
        if row.model is None:
            unexpected += 1
        elif row.checkpoint is not None and not action_named(action).reads_checkpoint:
            if row.status == "shape":
                shape += 1
            else:
                not_loaded += 1
    causes = []
    if unexpected:
        causes.append(
            (
                f"{unexpected} unexpected: see diff.suggestions and the key mapping",
                f"{unexpected} checkpoint key(s) have no model tensor (unexpected rows): the keys "
                "may not line up: look at diff.suggestions and diff.rule_suggestions (pairs and "
                "rename rules to accept) and the key mapping line of the diff's summary (a "
                "prefix to strip or add, e.g. a base model's checkpoint into a model with a head)",
            )
        )
    if shape:
        causes.append(
            (
                f"{shape} changed shape: see diff.explain(key)",
                f"{shape} tensor(s) have another shape in the model and are kept or "
                "re-initialised: the architecture changed there; partial, resample or "
                "adapt_channels copy what fits where that has a meaning (diff.explain(key) says "
                "which)",
            )
        )
    if not_loaded:
        words = f"{not_loaded} tensor(s) that could load are set to keep or reinit"
        causes.append((words, words))
    return causes


def coverage_advice(plan: Plan, loaded: int, total: int) -> str:
    """What to look at when little of the checkpoint loads, in words that fit the case."""
    causes = [advice for _, advice in coverage_causes(plan)]
    why = "; ".join(causes) if causes else "the checkpoint holds little the model has"
    return (
        f"{loaded} of {total} checkpoint tensors loaded: fewer than half of the checkpoint "
        f"reaches the model, so the model keeps mostly its own values. {why[0].upper()}{why[1:]}"
    )


@dataclass
class ReportEntry:
    """What apply did to one model tensor."""

    key: str
    action: str
    checkpoint_key: str | None
    numel: int
    nbytes: int
    verified: bool
    detail: str = ""
    #: the options it was applied with, every one (defaults included; ``{}`` for an action
    #: without options)
    options: Mapping[str, OptionValue] = field(default_factory=dict)


class Report:
    """What an apply changed, verified; ``undo()`` puts the model back bit for bit.

    The old values ``undo()`` needs are kept in memory or in a temporary file on disk
    (``snapshot_kind``, ``snapshot_dir``, ``snapshot_bytes``); the file is freed when the
    report is dropped, once ``undo()`` ran, or when undo is no longer possible.
    """

    def __init__(
        self,
        plan: Plan,
        model: torch.nn.Module,
        entries: list[ReportEntry],
        snapshot: Snapshot | None,
        notes: list[str],
        snapshot_choice: SnapshotChoice | None = None,
        snapshot_dir: Path | None = None,
    ) -> None:
        self.plan = plan
        self.model = model
        self.entries = entries
        self.notes = notes
        self._snapshot = snapshot
        self.undone = False
        #: where apply kept the old values while writing: "memory" or "disk" (with
        #: ``undo=False`` too, where they were dropped once the apply succeeded)
        self.snapshot_kind: str | None = snapshot_choice.kind if snapshot_choice else None
        #: why that kind (the ``snapshot=`` argument, or the budget ``auto`` compared with)
        self.snapshot_reason: str | None = snapshot_choice.reason if snapshot_choice else None
        #: the folder of the disk snapshot's temporary file (an unnamed file: it does not show
        #: in a listing of the folder, but takes its space until freed)
        self.snapshot_dir = snapshot_dir
        loaded, total = checkpoint_coverage(plan)  # what the applied plan read, merges too
        #: the loud, structured warnings of this apply: each a sentence saying what to look at
        #: (fewer than half of the checkpoint's tensors loaded); also among ``notes``
        self.warnings: list[str] = []
        self._coverage = coverage_warning(loaded, total)
        if self._coverage is not None:
            self.warnings.append(coverage_advice(plan, loaded, total))
            self.notes = [f"WARNING: {w}" for w in self.warnings] + list(notes)
        if snapshot is not None:
            # dropping the report frees the snapshot (the file's space) without waiting for undo
            weakref.finalize(self, snapshot.close)

    @property
    def verified(self) -> bool:
        return all(e.verified for e in self.entries)

    @property
    def can_undo(self) -> bool:
        return self._snapshot is not None and not self._snapshot.closed and not self.undone

    @property
    def snapshot_bytes(self) -> int:
        """Bytes of old values held for undo, in memory or on disk (0 once undone or dropped)."""
        if self._snapshot is None or self._snapshot.closed:
            return 0
        return self._snapshot.nbytes

    def _drop_snapshot(self) -> None:
        if self._snapshot is not None:
            self._snapshot.close()

    def keys(self, action: str) -> list[str]:
        return [e.key for e in self.entries if e.action == action]

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        counts = {a: {"rows": 0, "numel": 0, "bytes": 0} for a in action_names()}
        for e in self.entries:
            counts[e.action]["rows"] += 1
            counts[e.action]["numel"] += e.numel
            counts[e.action]["bytes"] += e.nbytes
        return counts

    def undo(self) -> int:
        """Restore every tensor apply wrote; returns how many. A second call does nothing."""
        if self._snapshot is None:
            warnings.warn(
                "nothing to undo: this apply ran with undo=False, so no snapshot was kept",
                stacklevel=2,
            )
            return 0
        if self.undone:
            warnings.warn(
                "already undone: the model is back as it was before this apply", stacklevel=2
            )
            return 0
        if self._snapshot.closed:
            warnings.warn(
                "nothing to undo: the snapshot was discarded when an earlier undo() found the "
                "model changed",
                stacklevel=2,
            )
            return 0
        live = {id(t) for t in self.model.state_dict(keep_vars=True).values()}
        replaced = [t for t in self._snapshot.targets if id(t) not in live]
        if replaced:
            self._drop_snapshot()
            raise PlanError(
                f"cannot undo: {len(replaced)} tensor(s) written by this apply are no longer in "
                "the model (it was changed or rebuilt since); nothing was restored, and the "
                f"{self._snapshot.kind} snapshot was discarded, as it can no longer put this "
                "model back"
            )
        try:
            restored = self._snapshot.restore()
        finally:
            self.undone = True
            self._drop_snapshot()
        return restored

    def summary(self) -> str:
        """One line: what each action wrote, whether it is verified, and the undo snapshot."""
        parts = []
        for action, c in self.counts.items():
            if c["rows"]:
                parts.append(
                    f"{action} {c['rows']} ({c['numel']:,} values, {human_bytes(c['bytes'])})"
                )
        state = "undone" if self.undone else ("verified" if self.verified else "NOT verified")
        if self._coverage is not None:
            # "verified" alone would read as "the transfer worked": it only says the writes hold
            state += f", but WARNING: {self._coverage} (report.warnings says what to look at)"
        return (
            f"Applied {visible(self.plan.diff.checkpoint.source)}: "
            + ", ".join(parts)
            + f"; {state}"
            + self._snapshot_text()
        )

    def _snapshot_text(self) -> str:
        if self.snapshot_kind is None or self.undone:
            return ""
        where = "in memory" if self.snapshot_kind == "memory" else f"on disk in {self.snapshot_dir}"
        if self._snapshot is None:
            return f"; no undo kept (the apply was guarded by a snapshot {where})"
        if self._snapshot.closed:
            return "; undo no longer possible (snapshot discarded)"
        return f"; undo snapshot: {human_bytes(self.snapshot_bytes)} {where}"

    def to_records(self) -> list[dict[str, Any]]:
        return [
            {
                "key": e.key,
                "action": e.action,
                "checkpoint_key": e.checkpoint_key,
                "numel": e.numel,
                "bytes": e.nbytes,
                "verified": e.verified,
                "detail": e.detail,
            }
            for e in self.entries
        ]

    def to_frame(self) -> Any:
        return render("frame", self)

    def _repr_html_(self) -> str:
        return str(render("html", self))

    def plot(self, **options: Any) -> Any:
        """A matplotlib Figure: per module, its values by what apply did to them (see
        ``ckptviz.plot_report`` for the options)."""
        return render("plot", self, **options)

    def __str__(self) -> str:
        from ckptviz.core.text import format_table

        # after undo no row holds what apply wrote: "verified" would describe a state that is gone
        rows = [
            [e.key, e.action, e.checkpoint_key or "", self._row_state(e), e.detail]
            for e in self.entries
        ]
        table = format_table(["model key", "action", "from", "verified", "detail"], rows)
        notes = "".join(f"\nnote: {visible_lines(n)}" for n in self.notes)
        return self.summary() + notes + "\n\n" + table

    def __repr__(self) -> str:
        return f"<Report {self.summary()}>"

    def _row_state(self, entry: ReportEntry) -> str:
        if self.undone:
            return "undone"
        return "yes" if entry.verified else "NO"
