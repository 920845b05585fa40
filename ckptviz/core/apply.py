"""Apply: write a Plan into a live model, all-or-nothing, verified, with undo.

Every action is looked up in the registry (``core.actions``) and written the same way: its
``value`` is the complete new value of the model tensor, ``target.copy_(value)`` writes it and
``bitwise_equal(target, value.to(target.dtype))`` verifies it; an action that does not write
(``keep``) is verified untouched by the tensor's version counter.

Order of work: check every row against the model and the checkpoint as they are now; compute
what the actions ``prepare`` (``reinit``'s fresh values); snapshot what will be written (kept
for ``Report.undo()``, or dropped once the apply succeeded with ``undo=False``); write in place
under ``no_grad``; verify; on any failure, Ctrl-C included, put back what was written.
Parameters keep their identity, dtype, device and ``requires_grad``.

Meta-device tensors have a shape and no storage: writing into one would silently do nothing, so
apply refuses them unless ``materialise=device`` is given. Then each chosen meta tensor gets real
storage on that device in place (``torch.utils.swap_tensors``: the same Parameter object, so
optimizers and ties hold), is written and verified; undo swaps the meta tensor back. The rest stay
on the meta device, and the report says so.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

from ckptviz.core._torch_private import tensor_version
from ckptviz.core.actions import (
    DetailContext,
    OptionValue,
    PrepareContext,
    RowContext,
    ValueContext,
    action_named,
    checkpoint_keys_read,
    registered_actions,
)
from ckptviz.core.checkpoint import Checkpoint, TensorInfo, TensorSource
from ckptviz.core.errors import ApplyError, CheckpointError, PlanError
from ckptviz.core.plan import refusal
from ckptviz.core.reading import read_checkpoint
from ckptviz.core.report import Report, ReportEntry
from ckptviz.core.snapshot import (
    Snapshot,
    SnapshotChoice,
    choose_snapshot,
    nbytes_of,
    new_snapshot,
    swap_tensors,
)

if TYPE_CHECKING:
    from ckptviz.core.diff import Diff, Row
    from ckptviz.core.plan import Plan


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
    """The one place a model tensor is written (tests inject failures here): every action's
    value is the complete new value (``copy_`` casts it to the tensor's dtype)."""
    target.copy_(value)


def _materialised_like(target: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Uninitialised storage for a meta tensor, of its kind, to swap in before it is written."""
    empty = torch.empty(target.shape, dtype=target.dtype, device=device)
    if isinstance(target, torch.nn.Parameter):
        return torch.nn.Parameter(empty, requires_grad=target.requires_grad)
    return empty


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
    row: Row,
    action: str,
    model: torch.nn.Module,
    now: tuple[tuple[int, ...], str] | None,
    options: Mapping[str, OptionValue] | None = None,
    diff: Diff | None = None,
) -> str | None:
    """Why ``action`` on ``row`` (of ``diff``) no longer fits the model, whose tensor there has the
    (shape, dtype name) ``now`` (``None``: it has none); ``None`` when it fits."""
    m = row.model
    assert m is not None
    if now is None:
        return "not in this model"
    shape, dtype = now
    if shape != m.shape or dtype != m.dtype:
        return f"the model has {list(shape)} {dtype}, the plan expects {list(m.shape)} {m.dtype}"
    if why := refusal(row, action, model, options, diff):
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
        options = plan.chosen_options(row.key)
        if why := model_row_problem(row, action, model, declared, options, plan.diff):
            problems[row.model.key] = why
    return problems


def checkpoint_drift(ckpt: Checkpoint, want: TensorInfo) -> str | None:
    """Why ``ckpt`` no longer holds ``want`` as the plan saw it (gone, or another shape or
    dtype); ``None`` if it still does."""
    now = ckpt.tensors.get(want.key)
    if now is None:
        return f"{ckpt.source} no longer has {want.key!r}"
    if now.shape != want.shape or now.dtype != want.dtype:
        return (
            f"{ckpt.source} now has {want.key!r} as {list(now.shape)} {now.dtype}, the plan "
            f"expects {list(want.shape)} {want.dtype}"
        )
    return None


def _check_checkpoint(plan: Plan, ckpt: Checkpoint) -> dict[str, str]:
    """Every checkpoint tensor the plan reads (each row's own, and what an action ``needs``)
    is still in ``ckpt`` with the shape and dtype the plan saw."""
    problems: dict[str, str] = {}
    recorded = plan.diff.checkpoint.tensors
    for row, action in plan:
        if row.model is None:
            continue
        definition = action_named(action)
        ctx = RowContext(row, None, MappingProxyType(plan.options(row.key)), plan.diff)
        for key in checkpoint_keys_read(definition, ctx):
            if drift := checkpoint_drift(ckpt, recorded[key]):
                problems[row.key] = drift
        planned = plan.diff.checkpoint.adapter
        if definition.needs is not None and planned is not None and row.key not in problems:
            found = ckpt.adapter
            if found is None:
                problems[row.key] = (
                    f"{ckpt.source} was read without an adapter config, and the plan's "
                    f"{definition.name} needs the one it was made with ({planned.source}); "
                    "apply from the adapter's directory"
                )
            elif replace(found, source="") != replace(planned, source=""):
                problems[row.key] = (
                    f"{ckpt.source}: the adapter config is not the one the plan was made with "
                    f"({planned.source}); compare again to plan with the config as it is now"
                )
    return problems


def _check_targets(
    plan: Plan, targets: dict[str, torch.Tensor], materialise: torch.device | None
) -> dict[str, str]:
    problems: dict[str, str] = {}
    for row, action in plan:
        if row.model is None or not action_named(action).writes:
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
    if action_named(action).reads_current:
        return (
            f"{action} keeps part of the tensor's present values, but a meta tensor has no "
            "values to keep; "
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


def _prepared(
    plan: Plan,
    model: torch.nn.Module,
    materialise: torch.device | None,
    only: str | None = None,
) -> dict[str, torch.Tensor]:
    """What the actions with a ``prepare`` step compute for their rows before anything is
    written (``reinit``: each module's initialiser run once on a copy), by model key; for the
    row ``only`` alone when given."""
    prepared: dict[str, torch.Tensor] = {}
    for action in registered_actions():
        if action.prepare is None:
            continue
        rows = [
            (row, plan.options(row.key))
            for row, a in plan
            if a == action.name and row.model and only in (None, row.key)
        ]
        if rows:
            prepared.update(action.prepare(PrepareContext(rows, model, plan.seed, materialise)))
    return prepared


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

    written = [(row, a) for row, a in plan if row.model is not None and action_named(a).writes]
    # The snapshot is what makes a failure part-way leave the model as it was; with undo=False
    # it is dropped as soon as the apply has succeeded. Made (and on disk, its space reserved)
    # before anything is read or written, so a full disk refuses the apply up front.
    # which memory each written row covers (tied rows: the same), worked out once
    idents = {row.key: _storage_id(targets[row.key]) for row, _ in written}
    old_bytes = _old_values_bytes(written, targets, idents)
    choice = choose_snapshot(snapshot, old_bytes, memory_budget)
    saved = new_snapshot(choice, old_bytes, snapshot_dir)
    try:
        prepared = _prepared(plan, model, device)
        versions = {k: tensor_version(t) for k, t in targets.items()}
        notes: list[str] = []
        with ckpt.open() as data:
            values = _Values(plan, model, written, targets, data, prepared, device)
            _check_tied_sources(written, values, targets, idents, notes)
            values.forget()
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


def preview_value(plan: Plan, key: str, *, source: Any = None) -> torch.Tensor:
    """The value the row ``key``'s action would write into the plan's model (cast to the model
    tensor's dtype), worked out as ``apply`` does, without writing anything."""
    model, row, action = plan.diff.model, plan.diff.row(key), plan.action(key)
    if model is None or row.model is None:
        raise PlanError(f"{key}: nothing to preview (no live model, or no model tensor here)")
    live = read_checkpoint(model).tensors.get(key)
    now = None if live is None else (live.shape, live.dtype)
    if why := model_row_problem(row, action, model, now, plan.chosen_options(key)):
        raise PlanError(f"cannot preview {key}: {why}", {key: why})
    target: torch.Tensor = model.state_dict(keep_vars=True)[key]
    if not action_named(action).writes:
        return target.detach().clone()
    if target.is_meta and (why := _meta_refusal(target, action, torch.device("cpu"))):
        raise PlanError(f"cannot preview {key}: {why}", {key: why})
    ckpt = _checkpoint_for(plan, source)
    prepared = _prepared(plan, model, None, only=key)
    with ckpt.open() as data:
        values = _Values(plan, model, [(row, action)], {key: target}, data, prepared, None)
        return values[key].detach().to(target.dtype, copy=True)


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


class _Values(Mapping[str, torch.Tensor]):
    """model key -> its new value, computed by its action when asked for.

    A checkpoint tensor is read from the file when a value needs it and only the last one is
    kept, so an apply holds one tensor's bytes at a time (a format that reads everything in one
    pass, such as DCP, hands its tensors over already read). The last value is kept too (a row
    is written and then verified); a row sharing memory with another written view keeps its
    value until it is verified again at the end (``keep_for``).
    """

    def __init__(
        self,
        plan: Plan,
        model: torch.nn.Module,
        written: list[tuple[Row, str]],
        targets: dict[str, torch.Tensor],
        data: TensorSource,
        prepared: dict[str, torch.Tensor],
        materialise: torch.device | None,
    ) -> None:
        self._plan, self._model, self._targets = plan, model, targets
        self._data, self._prepared, self._materialise = data, prepared, materialise
        self._rows = {row.key: (row, action_named(a)) for row, a in written}
        defaults = {a.name: a.defaults() for _, a in self._rows.values()}
        self._options = {
            key: {**defaults[a.name], **plan.chosen_options(key)}
            for key, (_, a) in self._rows.items()
        }
        self._needed: dict[str, tuple[str, ...]] = {}
        for key, (row, action) in self._rows.items():
            if action.needs is not None:
                ctx = RowContext(row, model, MappingProxyType(self._options[key]), plan.diff)
                self._needed[key] = tuple(action.needs(ctx))
        from_checkpoint = [
            row.checkpoint.key
            for row, action in self._rows.values()
            if action.reads_checkpoint and row.checkpoint is not None
        ]
        from_checkpoint += [k for keys in self._needed.values() for k in keys]
        self._read = data.get_many(from_checkpoint) if data.reads_at_once else None
        self._last_read: tuple[str, torch.Tensor] | None = None
        self._last_value: tuple[str, torch.Tensor] | None = None
        self._kept: dict[str, torch.Tensor] = {}
        self.keep_for: set[str] = set()

    def _checkpoint_tensor(self, checkpoint_key: str) -> torch.Tensor:
        if self._read is not None:
            return self._read[checkpoint_key]
        if self._last_read is None or self._last_read[0] != checkpoint_key:
            self._last_read = None  # drop the last tensor before reading the next
            self._last_read = (checkpoint_key, self._data[checkpoint_key])
        return self._last_read[1]

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self._kept:
            return self._kept[key]
        if self._last_value is not None and self._last_value[0] == key:
            return self._last_value[1]
        row, action = self._rows[key]
        checkpoint_key = row.checkpoint.key if row.checkpoint is not None else None
        reader = None
        if action.reads_checkpoint and checkpoint_key is not None:

            def reader() -> torch.Tensor:
                return self._checkpoint_tensor(checkpoint_key)

        assert action.value is not None  # registration requires it of a writing action
        ctx = ValueContext(
            row=row,
            model=self._model,
            options=self._options[key],
            seed=self._plan.seed,
            materialise=self._materialise,
            current=self._targets[key],
            prepared=self._prepared,
            read_checkpoint=reader,
            diff=self._plan.diff,
            read_needed=self._checkpoint_tensor,
            needed_keys=self._needed.get(key, ()),
        )
        self._last_value = None
        value = action.value(ctx)
        self._last_value = (key, value)
        if key in self.keep_for:
            self._kept[key] = value
        return value

    def options(self, key: str) -> dict[str, OptionValue]:
        return self._options[key]

    @property
    def diff(self) -> Diff:
        return self._plan.diff

    @property
    def model(self) -> torch.nn.Module:
        """The model written to."""
        return self._model

    def forget(self) -> None:
        """Drop the values worked out so far: the next ask computes them from the model as it
        is then (a value may start from the tensor's present values)."""
        self._last_value = None
        self._kept.clear()

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)


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
    values: _Values,
    snapshot: Snapshot,
    verify: bool,
    changes: Callable[[], str | None],
    materialise: torch.device | None,
) -> list[ReportEntry]:
    """Save, write and verify each storage once, one at a time (while its data is in cache).

    Each storage's old values go into the snapshot just before it is written (a meta target:
    the meta tensor it is swapped for), so a disk snapshot is written in the same streamed pass,
    and its new value is worked out right then (from the model as it is at that moment).
    A row whose memory overlaps another written storage (views of one tensor that are not the
    same view) is verified again once everything is written, as a later write may change it.
    Last, the checkpoint's files must be as they were when it was read (``changes``): data
    read from a file rewritten meanwhile may mix two saves, each tensor "verified" against
    what was read.
    """
    overlapping = _overlapping_rows(written, targets)
    values.keep_for = overlapping  # verified again once everything is written
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
                        snapshot.save(row.key, target)
                    _write(target, values[row.key], action)
                fresh = id(target) in materialised
                options = values.options(row.key)
                entries.append(
                    _checked(
                        row,
                        action,
                        target,
                        values[row.key],
                        options,
                        verify,
                        fresh,
                        values.diff,
                        values.model,
                    )
                )
            for row, action in written:
                if row.key in overlapping:
                    current = row.key
                    target = targets[row.key]
                    options = values.options(row.key)
                    value = values[row.key]
                    diff, model = values.diff, values.model
                    _checked(row, action, target, value, options, verify, diff=diff, model=model)
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
    options: Mapping[str, OptionValue],
    verify: bool,
    materialised: bool = False,
    diff: Diff | None = None,
    model: torch.nn.Module | None = None,
) -> ReportEntry:
    ok, detail = True, "not verified (verify=False)"
    if verify:
        context = DetailContext(row, target, value, options, diff, model)
        ok, detail = _verify(target, value, action, context)
    if materialised:
        detail = f"materialised on {target.device}; {detail}"
    if not ok:
        raise ApplyError(f"verification failed for {row.key}: {detail}")
    source_key = row.checkpoint_key if action_named(action).reads_checkpoint else None
    nbytes = target.numel() * target.element_size()
    numel = target.numel()
    return ReportEntry(row.key, action, source_key, numel, nbytes, ok, detail, dict(options))


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
        if row.model is None or action_named(action).writes:
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
        entries.append(ReportEntry(row.key, action, None, target.numel(), nbytes, ok, detail))
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
    target: torch.Tensor, value: torch.Tensor, action: str, ctx: DetailContext
) -> tuple[bool, str]:
    """The written tensor equals its action's value bit for bit (in the tensor's dtype); the
    words from the action."""
    ok = bitwise_equal(target, value.to(target.dtype))
    return ok, action_named(action).verified_detail(ctx)
