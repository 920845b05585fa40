"""Where apply keeps the old values: in memory or in a temporary file on disk; either way a
failure part-way (Ctrl-C included) or undo() puts the model back bit for bit, and the file is
freed when it is no longer needed."""

from __future__ import annotations

import errno
import gc
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import ckptviz
from ckptviz import ApplyError, PlanError
from ckptviz.core import apply as apply_module
from ckptviz.core import snapshot as snapshot_module
from ckptviz.core.apply import bitwise_equal
from ckptviz.core.snapshot import DiskSnapshot, Snapshot

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/fd")


class Mixed(nn.Module):
    """Tied weights, a bfloat16 buffer, an integer buffer, a non-contiguous buffer and NaNs with
    payloads and a -0.0: everything a byte-for-byte restore could get wrong."""

    def __init__(self, seed: int, vocab: int = 40, dim: int = 8) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("low_precision", torch.randn(5, 3).to(torch.bfloat16))
        self.register_buffer("steps", torch.arange(7) * seed)
        self.register_buffer("flipped", torch.randn(6, 4).t())
        bits = torch.tensor([0x7FC00001 + seed, -0x3FFFFFFE, -(2**31), seed], dtype=torch.int32)
        self.register_buffer("odd_floats", bits.view(torch.float32))


class State:
    """The model's tensor objects and their values, to check nothing changed in any way."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.objects = dict(model.state_dict(keep_vars=True))
        self.values = {k: v.detach().clone() for k, v in self.objects.items()}
        self.layout = {k: (v.dtype, v.device, v.shape, v.stride()) for k, v in self.objects.items()}

    def assert_intact(self) -> None:
        now = dict(self.model.state_dict(keep_vars=True))
        assert now.keys() == self.objects.keys()
        assert all(now[k] is self.objects[k] for k in now), "a tensor object was replaced"
        assert {k: (v.dtype, v.device, v.shape, v.stride()) for k, v in now.items()} == self.layout
        changed = [k for k in now if not bitwise_equal(now[k].detach(), self.values[k])]
        assert not changed, f"changed: {changed}"
        assert self.model.head.weight is self.model.embed.weight, "the tie was broken"


def _checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "other.pt"
    torch.save({k: v.clone() for k, v in Mixed(seed=2).state_dict().items()}, path)
    return path


def _plan(model: nn.Module, path: Path) -> ckptviz.Plan:
    plan = ckptviz.compare(model, path).plan()
    assert set(plan.keys_with("load")) == set(model.state_dict())
    return plan


def _fail_write_at(monkeypatch: pytest.MonkeyPatch, at: int, failure: BaseException) -> list[str]:
    """Make the ``at``-th write into the model (1-based) raise ``failure``."""
    real_write = apply_module._write
    calls: list[str] = []

    def failing(target: torch.Tensor, value: torch.Tensor, action: str) -> None:
        calls.append(action)
        if len(calls) == at:
            raise failure
        real_write(target, value, action)

    monkeypatch.setattr(apply_module, "_write", failing)
    return calls


def _snapshot_files(folder: Path) -> list[str]:
    """Files this process holds open in ``folder`` (an unnamed file shows as ``#inode`` or
    ``name (deleted)``); on other systems, the names left in it."""
    if not sys.platform.startswith("linux"):
        return os.listdir(folder)
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(f"{folder}{os.sep}"):
            found.append(target)
    return found


UNIQUE_WRITES = 7  # embed/head tied (one write), proj.weight, proj.bias and four buffers


@pytest.mark.parametrize("at", [1, UNIQUE_WRITES // 2 + 1, UNIQUE_WRITES], ids=str)
@pytest.mark.parametrize("undo", [True, False])
def test_a_failure_at_the_first_middle_or_last_tensor_restores_from_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at: int, undo: bool
) -> None:
    path = _checkpoint(tmp_path)
    model = Mixed(seed=1)
    state = State(model)
    plan = _plan(model, path)
    calls = _fail_write_at(monkeypatch, at, RuntimeError("disk on fire"))
    folder = tmp_path / "undo"
    folder.mkdir()
    with pytest.raises(ApplyError, match="disk on fire"):
        plan.apply(model, undo=undo, snapshot="disk", snapshot_dir=folder)
    assert len(calls) == at
    state.assert_intact()
    assert _snapshot_files(folder) == []


def test_the_failure_points_above_are_the_first_middle_and_last_write(tmp_path: Path) -> None:
    model = Mixed(seed=1)
    calls: list[str] = []
    real_write = apply_module._write

    def counting(target: torch.Tensor, value: torch.Tensor, action: str) -> None:
        calls.append(action)
        real_write(target, value, action)

    apply_module._write = counting
    try:
        _plan(model, _checkpoint(tmp_path)).apply(model, snapshot="disk")
    finally:
        apply_module._write = real_write
    assert len(calls) == UNIQUE_WRITES


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_ctrl_c_while_writing_the_model_restores_it_and_is_passed_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    model = Mixed(seed=1)
    state = State(model)
    plan = _plan(model, _checkpoint(tmp_path))
    _fail_write_at(monkeypatch, 4, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        plan.apply(model, snapshot=kind, snapshot_dir=tmp_path)
    state.assert_intact()
    assert _snapshot_files(tmp_path) == []


def test_ctrl_c_half_way_through_writing_the_snapshot_file_restores_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = Mixed(seed=1)
    state = State(model)
    plan = _plan(model, _checkpoint(tmp_path))
    real_save = DiskSnapshot.save
    saves: list[str] = []

    def interrupted_save(self: DiskSnapshot, key: str, target: torch.Tensor) -> object:
        saves.append(key)
        if len(saves) == 3:  # half of this tensor's bytes reach the file, then Ctrl-C
            data = target.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            self._file.write(data[: len(data) // 2])
            raise KeyboardInterrupt
        return real_save(self, key, target)

    monkeypatch.setattr(DiskSnapshot, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        plan.apply(model, snapshot="disk", snapshot_dir=tmp_path)
    assert len(saves) == 3
    state.assert_intact()
    assert _snapshot_files(tmp_path) == []


@pytest.mark.skipif(not hasattr(signal, "raise_signal"), reason="needs signal.raise_signal")
@pytest.mark.parametrize("kind", ["memory", "disk"])
@pytest.mark.parametrize("when", ["failed apply", "undo"])
def test_a_second_ctrl_c_while_restoring_waits_until_everything_is_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, when: str
) -> None:
    model = Mixed(seed=1)
    state = State(model)
    plan = _plan(model, _checkpoint(tmp_path))
    owner = DiskSnapshot if kind == "disk" else Snapshot
    real_restore = owner._restore_entry
    restored: list[str] = []

    def restore_with_ctrl_c(self: Snapshot, entry: snapshot_module._Entry) -> None:
        restored.append(entry.key)
        if len(restored) == 2:
            signal.raise_signal(signal.SIGINT)  # the person presses Ctrl-C again
        real_restore(self, entry)

    monkeypatch.setattr(owner, "_restore_entry", restore_with_ctrl_c)
    if when == "failed apply":
        _fail_write_at(monkeypatch, UNIQUE_WRITES, RuntimeError("late failure"))
        with pytest.raises(KeyboardInterrupt):
            plan.apply(model, snapshot=kind, snapshot_dir=tmp_path)
        assert len(restored) == UNIQUE_WRITES
    else:
        report = plan.apply(model, snapshot=kind, snapshot_dir=tmp_path)
        with pytest.raises(KeyboardInterrupt):
            report.undo()
        assert len(restored) == UNIQUE_WRITES
        assert report.undone and not report.can_undo
    state.assert_intact()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_undo_from_disk_restores_bit_for_bit_and_frees_the_file(tmp_path: Path) -> None:
    model = Mixed(seed=1)
    state = State(model)
    written = Mixed(seed=2).state_dict()
    report = _plan(model, _checkpoint(tmp_path)).apply(
        model, snapshot="disk", snapshot_dir=tmp_path
    )
    assert report.verified
    now = model.state_dict()
    assert all(bitwise_equal(now[k], written[k]) for k in written)
    assert report.snapshot_kind == "disk" and report.snapshot_dir == tmp_path
    unique = {k: v for k, v in state.values.items() if k != "head.weight"}  # tied: saved once
    assert report.snapshot_bytes == sum(v.numel() * v.element_size() for v in unique.values())
    assert f"on disk in {tmp_path}" in report.summary()
    assert len(_snapshot_files(tmp_path)) == 1
    assert report.undo() == UNIQUE_WRITES
    state.assert_intact()
    assert _snapshot_files(tmp_path) == []
    assert report.snapshot_bytes == 0 and not report.can_undo


def test_the_snapshot_file_is_freed_when_the_report_is_dropped(tmp_path: Path) -> None:
    model = Mixed(seed=1)
    report = _plan(model, _checkpoint(tmp_path)).apply(
        model, snapshot="disk", snapshot_dir=tmp_path
    )
    assert len(_snapshot_files(tmp_path)) == 1
    del report
    gc.collect()
    assert _snapshot_files(tmp_path) == []


def test_with_undo_false_the_snapshot_file_is_freed_at_once(tmp_path: Path) -> None:
    model = Mixed(seed=1)
    report = _plan(model, _checkpoint(tmp_path)).apply(
        model, undo=False, snapshot="disk", snapshot_dir=tmp_path
    )
    assert _snapshot_files(tmp_path) == []
    assert report.snapshot_kind == "disk" and report.snapshot_bytes == 0
    assert "no undo kept" in report.summary()


def test_undo_refused_after_the_model_changed_frees_the_file(tmp_path: Path) -> None:
    model = Mixed(seed=1)
    report = _plan(model, _checkpoint(tmp_path)).apply(
        model, snapshot="disk", snapshot_dir=tmp_path
    )
    model.proj.weight = nn.Parameter(torch.zeros_like(model.proj.weight))
    state = State(model)
    with pytest.raises(PlanError, match=r"no longer in the model.*snapshot was discarded"):
        report.undo()
    state.assert_intact()
    assert _snapshot_files(tmp_path) == [] and not report.can_undo
    with pytest.warns(UserWarning, match="snapshot was discarded"):
        assert report.undo() == 0


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_overlapping_views_come_back_when_restored_newest_first(tmp_path: Path, kind: str) -> None:
    class OverlappingViews(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            base = torch.arange(6, dtype=torch.float32)
            self.register_buffer("low", base[0:4])
            self.register_buffer("high", base[2:6])

    path = tmp_path / "views.pt"
    # agrees with itself on the shared entries, so the apply succeeds
    torch.save(
        {"low": torch.tensor([10.0, 11, 12, 13]), "high": torch.tensor([12.0, 13, 14, 15])}, path
    )
    model = OverlappingViews()
    report = ckptviz.compare(model, path).plan().apply(model, snapshot=kind, snapshot_dir=tmp_path)
    assert torch.equal(model.low, torch.tensor([10.0, 11, 12, 13]))
    report.undo()
    assert torch.equal(model.low, torch.tensor([0.0, 1, 2, 3]))
    assert torch.equal(model.high, torch.tensor([2.0, 3, 4, 5]))


def test_partial_and_reinit_rows_with_a_disk_snapshot(tmp_path: Path) -> None:
    model = Mixed(seed=1)
    state = State(model)
    grown = {k: v.clone() for k, v in Mixed(seed=2).state_dict().items()}
    grown["proj.weight"] = torch.randn(10, 10)  # the model's is 8 x 8: copy the overlap
    path = tmp_path / "grown.pt"
    torch.save(grown, path)
    plan = ckptviz.compare(model, path).plan()
    plan.set("proj.weight", "partial")
    plan.set("proj.bias", "reinit")
    report = plan.apply(model, snapshot="disk", snapshot_dir=tmp_path)
    details = {e.key: e.detail for e in report.entries}
    assert details["proj.weight"] == "copied the [8, 8] overlap"
    assert torch.equal(model.proj.weight.detach(), grown["proj.weight"][:8, :8])
    report.undo()
    state.assert_intact()


def test_a_meta_model_materialised_with_a_disk_snapshot_goes_back_to_meta(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with torch.device("meta"):
        model = Mixed(seed=1)
    objects = dict(model.state_dict(keep_vars=True))
    plan = _plan(model, _checkpoint(tmp_path))
    report = plan.apply(model, materialise="cpu", snapshot="disk", snapshot_dir=tmp_path)
    assert report.snapshot_bytes == 0  # nothing to save: the meta tensors hold no values
    assert not any(t.is_meta for t in model.state_dict().values())
    report.undo()
    assert all(t.is_meta for t in model.state_dict().values())
    assert all(model.state_dict(keep_vars=True)[k] is v for k, v in objects.items())
    _fail_write_at(monkeypatch, UNIQUE_WRITES, RuntimeError("late failure"))
    with pytest.raises(ApplyError):
        plan.apply(model, materialise="cpu", snapshot="disk", snapshot_dir=tmp_path)
    assert all(t.is_meta for t in model.state_dict().values())


# -- refused before anything is written ---------------------------------------------------------


def _never_written(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    return _fail_write_at(monkeypatch, 1, AssertionError("the model was written"))


@pytest.mark.parametrize("where", ["missing folder", "a file"])
def test_a_snapshot_dir_that_cannot_hold_a_file_refuses_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    folder = tmp_path / "nowhere"
    if where == "a file":
        folder.write_text("not a folder")
    model = Mixed(seed=1)
    state = State(model)
    plan = _plan(model, _checkpoint(tmp_path))
    calls = _never_written(monkeypatch)
    with pytest.raises(PlanError, match=r"cannot create the undo snapshot file in .*nowhere"):
        plan.apply(model, snapshot="disk", snapshot_dir=folder)
    assert calls == []
    state.assert_intact()


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="reserves with posix_fallocate")
def test_a_snapshot_larger_than_a_file_may_grow_refuses_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The system's own refusal: a file-size limit (RLIMIT_FSIZE) below the snapshot's size."""
    import resource

    model = Mixed(seed=1)
    state = State(model)
    plan = _plan(model, _checkpoint(tmp_path))
    calls = _never_written(monkeypatch)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (512, hard))
    try:
        with pytest.raises(PlanError, match=r"cannot reserve 1\.\d KiB for the undo snapshot"):
            plan.apply(model, snapshot="disk", snapshot_dir=tmp_path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert calls == []
    state.assert_intact()
    assert _snapshot_files(tmp_path) == []


@pytest.mark.parametrize("reservation", ["no space", "not supported, and too little free"])
def test_a_full_disk_refuses_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reservation: str
) -> None:
    def fallocate(fd: int, offset: int, length: int) -> None:
        code = errno.ENOSPC if reservation == "no space" else errno.EOPNOTSUPP
        raise OSError(code, os.strerror(code))

    class Usage:
        free = 100

    monkeypatch.setattr(snapshot_module.os, "posix_fallocate", fallocate, raising=False)
    monkeypatch.setattr(snapshot_module.shutil, "disk_usage", lambda folder: Usage())
    model = Mixed(seed=1)
    state = State(model)
    plan = _plan(model, _checkpoint(tmp_path))
    calls = _never_written(monkeypatch)
    with pytest.raises(
        PlanError, match=r"cannot reserve .* for the undo snapshot in .*snapshot_dir="
    ):
        plan.apply(model, snapshot="disk", snapshot_dir=tmp_path)
    assert calls == []
    state.assert_intact()


# -- choosing ---------------------------------------------------------------------------------


def _old_bytes(model: nn.Module) -> int:
    unique = {k: v for k, v in model.state_dict().items() if k != "head.weight"}
    return sum(v.numel() * v.element_size() for v in unique.values())


def test_auto_uses_memory_up_to_the_budget_and_disk_beyond(tmp_path: Path) -> None:
    model = Mixed(seed=1)
    plan = _plan(model, _checkpoint(tmp_path))
    size = _old_bytes(model)
    at_budget = plan.apply(model, memory_budget=size, snapshot_dir=tmp_path)
    assert at_budget.snapshot_kind == "memory" and at_budget.snapshot_dir is None
    assert "in memory" in at_budget.summary()
    over = plan.apply(model, memory_budget=size - 1, snapshot_dir=tmp_path)
    assert over.snapshot_kind == "disk" and over.snapshot_dir == tmp_path
    assert (
        over.snapshot_reason is not None
        and "would exceed the memory budget" in over.snapshot_reason
    )
    assert any("undo snapshot on disk" in n for n in over.notes)
    over.undo()
    at_budget.undo()


@pytest.mark.parametrize(("available", "kind"), [(4, "memory"), (3, "disk")])
def test_the_default_budget_is_a_quarter_of_the_memory_available(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, available: int, kind: str
) -> None:
    model = Mixed(seed=1)
    plan = _plan(model, _checkpoint(tmp_path))
    size = _old_bytes(model)
    monkeypatch.setattr(snapshot_module, "available_memory", lambda: available * size)
    report = plan.apply(model, snapshot_dir=tmp_path)
    assert report.snapshot_kind == kind
    assert report.snapshot_reason is not None and "a quarter of the" in report.snapshot_reason


def test_the_default_snapshot_of_a_small_model_is_in_memory(tmp_path: Path) -> None:
    model = Mixed(seed=1)
    report = _plan(model, _checkpoint(tmp_path)).apply(model)
    assert report.snapshot_kind == "memory"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"snapshot": "ram"}, "snapshot='ram' is not a snapshot mode"),
        ({"memory_budget": -1}, "memory_budget=-1 must be a number of bytes"),
        ({"memory_budget": 2.5}, "memory_budget=2.5 must be a number of bytes"),
    ],
)
def test_unknown_snapshot_options_are_refused_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: dict[str, object], message: str
) -> None:
    model = Mixed(seed=1)
    plan = _plan(model, _checkpoint(tmp_path))
    calls = _never_written(monkeypatch)
    apply: Callable[..., object] = plan.apply
    with pytest.raises(PlanError, match=message):
        apply(model, **options)
    assert calls == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/meminfo")
def test_available_memory_is_what_the_system_reports_at_most() -> None:
    with open("/proc/meminfo") as info:
        total = next(int(ln.split()[1]) * 1024 for ln in info if ln.startswith("MemTotal:"))
    available = snapshot_module.available_memory()
    assert available is not None and 0 < available <= total
