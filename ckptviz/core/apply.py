"""Apply: write a Plan into a live model, all-or-nothing, verified, with undo.

Order of work: check every row against the model and the checkpoint as they are now; compute
fresh values for ``reinit``; snapshot what will be written (kept for ``Report.undo()``, or
dropped once the apply succeeded with ``undo=False``); write in place under ``no_grad``; verify;
on any failure, Ctrl-C included, put back what was written.
Parameters keep their identity, dtype, device and ``requires_grad``.

Meta-device tensors have a shape and no storage: writing into one would silently do nothing, so
apply refuses them unless ``materialise=device`` is given. Then each chosen meta tensor gets real
storage on that device in place (``torch.utils.swap_tensors``: the same Parameter object, so
optimizers and ties hold), is written and verified; undo swaps the meta tensor back. The rest stay
on the meta device, and the report says so.
"""

from __future__ import annotations

import copy
import os
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ckptviz.core._torch_private import tensor_version
from ckptviz.core.checkpoint import Checkpoint, TensorSource, dtype_name, human_bytes
from ckptviz.core.display import render
from ckptviz.core.errors import ApplyError, CheckpointError, PlanError
from ckptviz.core.plan import ACTIONS, initialiser_of, refusal, reinit_seed
from ckptviz.core.reading import read_checkpoint
from ckptviz.core.snapshot import (
    Snapshot,
    SnapshotChoice,
    choose_snapshot,
    nbytes_of,
    new_snapshot,
    swap_tensors,
)
from ckptviz.core.text import visible, visible_lines

if TYPE_CHECKING:
    from ckptviz.core.diff import Row
    from ckptviz.core.plan import Plan


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


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (NaN equals the same NaN; -0.0 differs from 0.0)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point() or a.is_complex():
        ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.int64}
        size = a.element_size()
        if a.is_complex():
            a, b = torch.view_as_real(a), torch.view_as_real(b)
            size //= 2
        return torch.equal(a.contiguous().view(ints[size]), b.contiguous().view(ints[size]))
    return torch.equal(a, b)


def _overlap(a: torch.Size, b: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(0, min(x, y)) for x, y in zip(a, b, strict=True))


def _storage_id(t: torch.Tensor) -> tuple[int, int, tuple[int, ...], tuple[int, ...]]:
    """Identifies the memory a tensor covers: equal for tied tensors."""
    if t.is_meta:  # no storage (every data_ptr is 0): tied meta tensors are one object
        return (id(t), -1, tuple(t.shape), ())
    return (
        t.untyped_storage().data_ptr(),
        int(t.storage_offset()),
        tuple(t.shape),
        tuple(t.stride()),
    )


def _write(target: torch.Tensor, value: torch.Tensor, action: str) -> None:
    """The one place a model tensor is written (tests inject failures here)."""
    if action == "partial":
        region = _overlap(target.shape, tuple(value.shape))
        target[region].copy_(value[region])
    else:
        target.copy_(value)


def _materialised_like(target: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Uninitialised storage for a meta tensor, of its kind, to swap in before it is written."""
    empty = torch.empty(target.shape, dtype=target.dtype, device=device)
    if isinstance(target, torch.nn.Parameter):
        return torch.nn.Parameter(empty, requires_grad=target.requires_grad)
    return empty


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
        counts = {a: {"rows": 0, "numel": 0, "bytes": 0} for a in ACTIONS}
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
        parts = []
        for action, c in self.counts.items():
            if c["rows"]:
                parts.append(
                    f"{action} {c['rows']} ({c['numel']:,} values, {human_bytes(c['bytes'])})"
                )
        state = "undone" if self.undone else ("verified" if self.verified else "NOT verified")
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


# -- the apply itself ---------------------------------------------------------------------------


def _checkpoint_for(plan: Plan, source: Any) -> Checkpoint:
    recorded = plan.diff.checkpoint
    if source is not None:
        return read_checkpoint(source, key=recorded.location or None)
    if recorded.fingerprint is not None or (recorded.path is None and recorded._opener):
        recorded.check_unchanged()
        return recorded
    if recorded.path is None:
        raise PlanError(
            f"this plan was made from {recorded.source}, which was never saved to a file: pass it "
            "again with plan.apply(model, source=state_dict)"
        )
    return read_checkpoint(
        recorded.path,
        key=recorded.location or None,
        trusted=recorded.trusted,
        allow_globals=recorded.allow_globals,
    )


def model_row_problem(
    row: Row, action: str, model: torch.nn.Module, now: tuple[tuple[int, ...], str] | None
) -> str | None:
    """Why ``action`` on ``row`` no longer fits the model, whose tensor there has the
    (shape, dtype name) ``now`` (``None``: it has none); ``None`` when it fits."""
    m = row.model
    assert m is not None
    if now is None:
        return "not in this model"
    shape, dtype = now
    if shape != m.shape or dtype != m.dtype:
        return f"the model has {list(shape)} {dtype}, the plan expects {list(m.shape)} {m.dtype}"
    if why := refusal(row, action, model):
        return f"{action}: {why}"
    return None


def _check_model(plan: Plan, model: torch.nn.Module) -> dict[str, str]:
    live = read_checkpoint(model).tensors
    problems: dict[str, str] = {}
    for row, action in plan:
        if row.model is None:
            continue
        now = live.get(row.model.key)
        declared = None if now is None else (now.shape, now.dtype)
        if why := model_row_problem(row, action, model, declared):
            problems[row.model.key] = why
    return problems


def _check_checkpoint(plan: Plan, ckpt: Checkpoint) -> dict[str, str]:
    problems: dict[str, str] = {}
    for row, action in plan:
        if action not in ("load", "partial") or row.checkpoint is None:
            continue
        now = ckpt.tensors.get(row.checkpoint.key)
        want = row.checkpoint
        if now is None:
            problems[row.key] = f"{ckpt.source} no longer has {want.key!r}"
        elif now.shape != want.shape or now.dtype != want.dtype:
            problems[row.key] = (
                f"{ckpt.source} now has {want.key!r} as {list(now.shape)} {now.dtype}, the plan "
                f"expects {list(want.shape)} {want.dtype}"
            )
    return problems


def _check_targets(
    plan: Plan, targets: dict[str, torch.Tensor], materialise: torch.device | None
) -> dict[str, str]:
    problems: dict[str, str] = {}
    for row, action in plan:
        if row.model is None or action == "keep":
            continue
        t = targets[row.key]
        if t.is_meta:
            if why := _meta_refusal(t, action, materialise):
                problems[row.key] = why
        elif any(s == 0 and n > 1 for s, n in zip(t.stride(), t.shape, strict=True)):
            problems[row.key] = (
                "the model tensor is an expanded view (several entries share one memory cell); "
                "replace it with a real tensor (t.clone()) before writing into it"
            )
    return problems


def _meta_refusal(t: torch.Tensor, action: str, materialise: torch.device | None) -> str | None:
    """Why a meta tensor cannot take ``action`` here (``None`` if it can be materialised)."""
    if materialise is None:
        return (
            "the model tensor is on the meta device (a shape, no storage): writing into it "
            "would silently do nothing. Pass materialise='cpu' (or another device) to apply "
            "to give the chosen tensors real storage there (tied tensors stay tied), or "
            "materialise the whole model first with model.to_empty(device='cpu') and tie its "
            "weights again (to_empty gives each tensor its own storage)"
        )
    if action == "partial":
        return (
            "partial keeps the rest of the tensor, but a meta tensor has no values to keep; "
            "reinit it, or materialise and initialise the model first "
            "(model.to_empty(device=...), then its own initialisation)"
        )
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        return (
            f"a {type(t).__name__} on the meta device: only plain parameters and buffers can be "
            "materialised in place; materialise the model yourself first"
        )
    if weakref.getweakrefs(t):
        return (
            "a meta tensor that something holds a weak reference to cannot be given storage in "
            "place; materialise the model first with model.to_empty(device=...)"
        )
    return None


def _device(materialise: str | torch.device | None) -> torch.device | None:
    if materialise is None:
        return None
    try:
        device = torch.device(materialise)
        torch.empty(0, device=device)
    except (RuntimeError, TypeError) as exc:
        raise PlanError(
            f"materialise={materialise!r} is not a device this machine can hold tensors on "
            f"({str(exc).splitlines()[0]}); pass e.g. materialise='cpu'"
        ) from None
    if device.type == "meta":
        raise PlanError("materialise='meta' gives no storage; name a real device, e.g. 'cpu'")
    return device


def _fresh_values(
    plan: Plan, model: torch.nn.Module, materialise: torch.device | None = None
) -> dict[str, torch.Tensor]:
    """Each ``reinit`` tensor's new value, from a copy of its module re-initialised."""
    groups: dict[tuple[str, str], list[str]] = {}
    for key in plan.keys_with("reinit"):
        module_name, _, tensor_name = key.rpartition(".")
        method = initialiser_of(model.get_submodule(module_name), tensor_name)
        assert method is not None  # refusal() checked it
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
            with _seeded(plan.seed, module_name):
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


def apply_plan(
    plan: Plan,
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
    device = _device(materialise)
    problems = _check_model(plan, model)
    if problems:
        raise PlanError(_problem_text("the plan does not fit this model", problems), problems)
    ckpt = _checkpoint_for(plan, source)
    problems = _check_checkpoint(plan, ckpt)
    targets = dict(model.state_dict(keep_vars=True))
    problems.update(_check_targets(plan, targets, device))
    if problems:
        raise PlanError(_problem_text("the plan does not fit the checkpoint", problems), problems)

    written = [(row, a) for row, a in plan if row.model is not None and a != "keep"]
    # The snapshot is what makes a failure part-way leave the model as it was; with undo=False
    # it is dropped as soon as the apply has succeeded. Made (and on disk, its space reserved)
    # before anything is read or written, so a full disk refuses the apply up front.
    # which memory each written row covers (tied rows: the same), worked out once
    idents = {row.key: _storage_id(targets[row.key]) for row, _ in written}
    old_bytes = _old_values_bytes(written, targets, idents)
    choice = choose_snapshot(snapshot, old_bytes, memory_budget)
    saved = new_snapshot(choice, old_bytes, snapshot_dir)
    try:
        fresh = _fresh_values(plan, model, device)
        versions = {k: tensor_version(t) for k, t in targets.items()}
        notes: list[str] = []
        with ckpt.open() as data:
            values = _gather(written, data, fresh)
            _check_tied_sources(written, values, targets, idents, notes)
            entries = _write_all(
                written, targets, idents, values, saved, verify, data.changes, device
            )
    except BaseException:
        saved.close()
        raise
    if not undo:
        saved.close()
    entries += _keep_entries(plan, written, targets, versions)
    notes += _meta_notes(entries, targets, device)
    if choice.kind == "disk":
        notes.append(f"undo snapshot {_where(choice, saved)}: {choice.reason}")
    order = {row.key: i for i, row in enumerate(plan.diff.rows)}
    entries.sort(key=lambda e: order.get(e.key, 0))
    planned = plan.actions  # a copy per access: take it once, not once per tensor
    extra = [k for k in targets if k not in planned]
    if extra:
        notes.append(
            f"{len(extra)} model tensor(s) not in the plan were left alone: {', '.join(extra[:5])}"
        )
    return Report(plan, model, entries, saved if undo else None, notes, choice, saved.directory)


def _where(choice: SnapshotChoice, saved: Snapshot) -> str:
    return "in memory" if choice.kind == "memory" else f"on disk in {saved.directory}"


def _old_values_bytes(
    written: list[tuple[Row, str]], targets: dict[str, torch.Tensor], idents: dict[str, Any]
) -> int:
    """Bytes of the values the snapshot will save: each written storage once, meta ones none."""
    seen: set[Any] = set()
    total = 0
    for row, _ in written:
        target = targets[row.key]
        ident = idents[row.key]
        if ident not in seen and not target.is_meta:
            seen.add(ident)
            total += nbytes_of(target)
    return total


def _problem_text(head: str, problems: dict[str, str]) -> str:
    lines = "\n".join(f"  {k}: {v}" for k, v in list(problems.items())[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    return f"{head} ({len(problems)} row(s)); nothing was changed:\n{lines}{more}"


def _gather(
    written: list[tuple[Row, str]], data: TensorSource, fresh: dict[str, torch.Tensor]
) -> Mapping[str, torch.Tensor]:
    """The value each written row takes: a fresh one, or the checkpoint's tensor."""
    from_checkpoint = {
        row.key: row.checkpoint.key for row, a in written if a != "reinit" and row.checkpoint
    }
    read = data.get_many(from_checkpoint.values()) if data.reads_at_once else None
    return _Values(from_checkpoint, data, fresh, read)


class _Values(Mapping[str, torch.Tensor]):
    """model key -> its new value. A checkpoint tensor is read from the file when it is asked
    for and only the last one is kept, so an apply holds one tensor's bytes at a time (a format
    that reads everything in one pass, such as DCP, hands its tensors over already read)."""

    def __init__(
        self,
        from_checkpoint: dict[str, str],
        data: TensorSource,
        fresh: dict[str, torch.Tensor],
        read: dict[str, torch.Tensor] | None,
    ) -> None:
        self._from, self._data, self._fresh, self._read = from_checkpoint, data, fresh, read
        self._last: tuple[str, torch.Tensor] | None = None

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self._fresh:
            return self._fresh[key]
        checkpoint_key = self._from[key]
        if self._read is not None:
            return self._read[checkpoint_key]
        if self._last is None or self._last[0] != checkpoint_key:
            self._last = None  # drop the last tensor before reading the next
            self._last = (checkpoint_key, self._data[checkpoint_key])
        return self._last[1]

    def __iter__(self) -> Iterator[str]:
        return iter({**self._from, **self._fresh})

    def __len__(self) -> int:
        return len({**self._from, **self._fresh})


def _check_tied_sources(
    written: list[tuple[Row, str]],
    values: Mapping[str, torch.Tensor],
    targets: dict[str, torch.Tensor],
    idents: dict[str, Any],
    notes: list[str],
) -> None:
    """Rows sharing one model storage must agree, or the last write would silently win."""
    actions = {row.key: a for row, a in written}
    groups: dict[Any, list[str]] = {}
    for row, _ in written:
        groups.setdefault(idents[row.key], []).append(row.key)
    for group in groups.values():
        if len(group) < 2:
            continue
        first = group[0]
        dtype = targets[first].dtype
        for other in group[1:]:
            agree = actions[first] == actions[other] and bitwise_equal(
                values[first].to(dtype), values[other].to(dtype)
            )
            if not agree:
                raise PlanError(
                    f"{first} and {other} are tied in the model (one storage), but the plan "
                    f"would write different values into them ({actions[first]} vs "
                    f"{actions[other]}); the checkpoint disagrees with itself. Set one of them "
                    "to keep so the other decides; nothing was changed",
                    {first: f"tied to {other}", other: f"tied to {first}"},
                )
        notes.append(f"tied tensors {' = '.join(group)} written once")


def _write_all(
    written: list[tuple[Row, str]],
    targets: dict[str, torch.Tensor],
    idents: dict[str, Any],
    values: Mapping[str, torch.Tensor],
    snapshot: Snapshot,
    verify: bool,
    changes: Callable[[], str | None],
    materialise: torch.device | None,
) -> list[ReportEntry]:
    """Save, write and verify each storage once, one at a time (while its data is in cache).

    Each storage's old values go into the snapshot just before it is written (a meta target:
    the meta tensor it is swapped for), so a disk snapshot is written in the same streamed pass.
    A row whose memory overlaps another written storage (views of one tensor that are not the
    same view) is verified again once everything is written, as a later write may change it.
    Last, the checkpoint's files must be as they were when it was read (``changes``): data
    read from a file rewritten meanwhile may mix two saves, each tensor "verified" against
    what was read.
    """
    overlapping = _overlapping_rows(written, targets)
    # partial rows still to verify per storage: its old values are kept until the last one
    rows_left: dict[Any, int] = {}
    for row, action in written:
        if action == "partial":
            rows_left[idents[row.key]] = rows_left.get(idents[row.key], 0) + 1
    # old values a partial row's verification compares the kept rest with
    before: dict[int, torch.Tensor] = {}
    materialised: set[int] = set()
    current = "?"
    try:
        with torch.no_grad():
            seen: set[Any] = set()
            entries = []
            for row, action in written:
                current = row.key
                target = targets[row.key]
                ident = idents[row.key]
                if ident not in seen:
                    seen.add(ident)
                    if target.is_meta:
                        assert materialise is not None  # _check_targets refused it otherwise
                        replacement = _materialised_like(target, materialise)
                        snapshot.save_swap(row.key, target, replacement)
                        swap_tensors(target, replacement)
                        materialised.add(id(target))
                    else:
                        kept = snapshot.save(row.key, target)
                        if action == "partial":
                            before[id(target)] = kept if kept is not None else target.clone()
                    _write(target, values[row.key], action)
                fresh = id(target) in materialised
                entries.append(
                    _checked(row, action, target, values[row.key], before, verify, fresh)
                )
                if row.key not in overlapping and action == "partial":
                    rows_left[ident] -= 1
                    if not rows_left[ident]:
                        before.pop(id(target), None)  # (a disk snapshot's transient copy)
            for row, action in written:
                if row.key in overlapping:
                    current = row.key
                    target = targets[row.key]
                    _checked(row, action, target, values[row.key], before, verify)
            changed = changes()
            if changed is not None:
                raise CheckpointError(changed)
        return entries
    except BaseException as exc:
        snapshot.restore()  # holds a second Ctrl-C until everything is back
        if not isinstance(exc, Exception):
            raise  # KeyboardInterrupt and the like: restored, and passed on as they are
        if isinstance(exc, CheckpointError):  # the checkpoint broke or changed while being read
            changed = changes()
            why = f"the checkpoint changed while it was being applied ({changed})"
            raise CheckpointError(
                f"{why if changed else str(exc).rstrip('.')}; nothing was changed in the model "
                "(every tensor already written was restored). Re-run when the file is stable "
                "(once whatever writes it has finished)."
            ) from exc
        raise ApplyError(
            f"apply failed at {current} ({type(exc).__name__}: {exc}); every tensor already "
            "written was restored, the model is as it was",
            {current: str(exc)},
        ) from exc


def _checked(
    row: Row,
    action: str,
    target: torch.Tensor,
    value: torch.Tensor,
    before: dict[int, torch.Tensor],
    verify: bool,
    materialised: bool = False,
) -> ReportEntry:
    ok, detail = True, "not verified (verify=False)"
    if verify:
        ok, detail = _verify(target, value, action, before.get(id(target)))
    if materialised:
        detail = f"materialised on {target.device}; {detail}"
    if not ok:
        raise ApplyError(f"verification failed for {row.key}: {detail}")
    source_key = row.checkpoint_key if action in ("load", "partial") else None
    nbytes = target.numel() * target.element_size()
    return ReportEntry(row.key, action, source_key, target.numel(), nbytes, ok, detail)


def _overlapping_rows(written: list[tuple[Row, str]], targets: dict[str, torch.Tensor]) -> set[str]:
    """Rows sharing memory with another written tensor that is not the very same view."""
    views: dict[int, set[Any]] = {}
    memory: dict[str, int] = {}
    for row, _ in written:
        target = targets[row.key]
        if target.is_meta:  # no memory to share
            continue
        memory[row.key] = target.untyped_storage().data_ptr()
        views.setdefault(memory[row.key], set()).add(_storage_id(target))
    shared = {ptr for ptr, idents in views.items() if len(idents) > 1}
    return {key for key, ptr in memory.items() if ptr in shared}


def _keep_entries(
    plan: Plan,
    written: list[tuple[Row, str]],
    targets: dict[str, torch.Tensor],
    versions: dict[str, int],
) -> list[ReportEntry]:
    """``keep`` rows, verified untouched by their version counter (or changed through a tie)."""
    written_storage = {_storage_id(targets[row.key]): row.key for row, _ in written}
    entries = []
    for row, action in plan:
        if action != "keep" or row.model is None:
            continue
        target = targets[row.key]
        tied_to = written_storage.get(_storage_id(target))
        if tied_to is not None:
            ok, detail = True, f"changed with its tied tensor {tied_to}"
        else:
            ok, detail = tensor_version(target) == versions[row.key], "unchanged"
            if target.is_meta:
                detail = "unchanged; still on the meta device (no values)"
        nbytes = target.numel() * target.element_size()
        entries.append(ReportEntry(row.key, "keep", None, target.numel(), nbytes, ok, detail))
    return entries


def _meta_notes(
    entries: list[ReportEntry], targets: dict[str, torch.Tensor], device: torch.device | None
) -> list[str]:
    """What a person must know after applying to a (partly) meta-device model."""
    notes = []
    materialised = [e.key for e in entries if e.detail.startswith("materialised on")]
    if materialised:
        notes.append(
            f"{len(materialised)} tensor(s) were on the meta device and now have storage on "
            f"{device}; undo() puts them back on the meta device"
        )
    still_meta = [k for k, t in targets.items() if t.is_meta]
    if still_meta:
        shown = ", ".join(still_meta[:5]) + (" ..." if len(still_meta) > 5 else "")
        notes.append(
            f"{len(still_meta)} model tensor(s) are still on the meta device: they have a shape "
            "and dtype but no values, so the model cannot run, train or be saved until they "
            "get some: load or reinit them too (plan.set(...), then apply with "
            f"materialise=...). model.to_empty() would also wipe what was loaded. They are: "
            f"{shown}"
        )
    return notes


def _verify(
    target: torch.Tensor, value: torch.Tensor, action: str, before: torch.Tensor | None
) -> tuple[bool, str]:
    if action == "partial":
        region = _overlap(target.shape, tuple(value.shape))
        ok = bitwise_equal(target[region], value[region].to(target.dtype))
        copied = [s.stop for s in region]
        detail = f"copied the {copied} overlap"
        if before is not None and tuple(copied) != tuple(target.shape):
            outside = torch.ones(target.shape, dtype=torch.bool)
            outside[region] = False
            ok = ok and bitwise_equal(target[outside], before[outside])
            detail += ", kept the rest"
        return ok, detail
    ok = bitwise_equal(target, value.to(target.dtype))
    if action == "load":
        if value.dtype != target.dtype:
            cast = f"{dtype_name(value.dtype)} -> {dtype_name(target.dtype)}"
            return ok, f"equals the checkpoint (cast {cast})"
        return ok, "equals the checkpoint"
    return ok, "fresh values from the module's initialiser"
