"""apply writes and verifies one tensor at a time, reads the checkpoint without mapping it, and
still leaves the model bitwise unchanged on any failure, with or without undo."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_bitwise_same, snapshot
from safetensors.torch import load_file, save_file
from torch import nn

import ckptviz
from ckptviz.core import apply as apply_module
from ckptviz.core.apply import bitwise_equal

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and madvise")


class Stack(nn.Module):
    """Big enough tensors (256 KiB each) that their pages are worth dropping."""

    def __init__(self, layers: int = 4, width: int = 256) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))


def _saved(tmp_path: Path, fmt: str) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(3)
    state = {k: v.clone() for k, v in Stack().state_dict().items()}
    path = tmp_path / f"stack.{fmt}"
    if fmt == "pt":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    return path, state


def _mapped_rss_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of ``path``, from /proc/self/smaps."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:
                inside = len(fields) == 6 and fields[5] == str(path.resolve())
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
@pytest.mark.parametrize("undo", [True, False])
def test_apply_loads_every_tensor_from_a_file(tmp_path: Path, fmt: str, undo: bool) -> None:
    path, state = _saved(tmp_path, fmt)
    model = Stack()
    before = snapshot(model)
    report = ckptviz.compare(model, path).plan().apply(model, undo=undo)
    assert report.verified and report.can_undo == undo
    now = model.state_dict()
    assert all(bitwise_equal(now[k], state[k]) for k in state)
    if undo:
        report.undo()
        assert_bitwise_same(model, before)


@linux_only
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_apply_reads_the_file_without_mapping_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    """Checked reads, not a mapping: nothing of the file is resident in this process while apply
    writes (a mapped file that shrinks would kill the process on the next touch)."""
    path, state = _saved(tmp_path, fmt)
    model = Stack()
    plan = ckptviz.compare(model, path).plan()
    real_write = apply_module._write
    mapped: list[int] = []

    def write(target: torch.Tensor, value: torch.Tensor, action: str) -> None:
        mapped.append(_mapped_rss_kib(path))
        real_write(target, value, action)

    monkeypatch.setattr(apply_module, "_write", write)
    assert plan.apply(model).verified
    assert len(mapped) == len(state) and set(mapped) == {0}, mapped
    now = model.state_dict()
    assert all(bitwise_equal(now[k], state[k]) for k in state)


@pytest.mark.parametrize("undo", [True, False])
@pytest.mark.parametrize("failure", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_a_failure_part_way_leaves_the_model_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, undo: bool, failure: BaseException
) -> None:
    path, _ = _saved(tmp_path, "pt")
    model = Stack()
    before = snapshot(model)
    plan = ckptviz.compare(model, path).plan()
    real_write = apply_module._write
    calls = []

    def failing_write(target: torch.Tensor, value: torch.Tensor, action: str) -> None:
        calls.append(action)
        if len(calls) == 5:
            raise failure
        real_write(target, value, action)

    monkeypatch.setattr(apply_module, "_write", failing_write)
    expected = ckptviz.ApplyError if isinstance(failure, Exception) else KeyboardInterrupt
    with pytest.raises(expected):
        plan.apply(model, undo=undo)
    assert len(calls) == 5  # four tensors were written before the failure
    assert_bitwise_same(model, before)


def test_a_failed_verification_of_a_late_row_restores_the_earlier_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = _saved(tmp_path, "safetensors")
    model = Stack()
    before = snapshot(model)
    plan = ckptviz.compare(model, path).plan()
    real_verify = apply_module._verify
    last = list(model.state_dict())[-1]

    def verify(
        target: torch.Tensor, value: torch.Tensor, action: str, saved: torch.Tensor | None
    ) -> tuple[bool, str]:
        ok, detail = real_verify(target, value, action, saved)
        return (False, "bit flip") if target is model.get_parameter(last) else (ok, detail)

    monkeypatch.setattr(apply_module, "_verify", verify)
    with pytest.raises(ckptviz.ApplyError, match=f"verification failed for {last}"):
        plan.apply(model, undo=False)
    assert_bitwise_same(model, before)


class OverlappingViews(nn.Module):
    """Two buffers that are different views of one storage, overlapping in two entries."""

    def __init__(self) -> None:
        super().__init__()
        base = torch.zeros(6)
        self.register_buffer("low", base[0:4])
        self.register_buffer("high", base[2:6])


def test_a_later_write_through_an_overlapping_view_is_caught(tmp_path: Path) -> None:
    path = tmp_path / "views.pt"
    # the checkpoint disagrees with itself on the shared entries: one of the writes must lose
    torch.save({"low": torch.ones(4), "high": torch.full((4,), 2.0)}, path)
    model = OverlappingViews()
    before = snapshot(model)
    with pytest.raises(ckptviz.ApplyError, match="verification failed for low"):
        ckptviz.compare(model, path).plan().apply(model, undo=False)
    assert_bitwise_same(model, before)


@linux_only
def test_no_shard_of_a_sharded_checkpoint_is_mapped_while_apply_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index is not the file the data lives in: every shard is read with checked reads, so
    none of them is resident in this process while apply writes."""
    torch.manual_seed(3)
    state = {k: v.clone() for k, v in Stack().state_dict().items()}
    folder = tmp_path / "sharded"
    folder.mkdir()
    shards = {"a.safetensors": list(state)[:4], "b.safetensors": list(state)[4:]}
    for name, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(folder / name))
    weight_map = {k: name for name, keys in shards.items() for k in keys}
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    real_write = apply_module._write
    mapped: list[int] = []

    def write(target: torch.Tensor, value: torch.Tensor, action: str) -> None:
        mapped.append(sum(_mapped_rss_kib(folder / name) for name in shards))
        real_write(target, value, action)

    monkeypatch.setattr(apply_module, "_write", write)
    model = Stack()
    assert ckptviz.compare(model, index).plan().apply(model).verified
    assert all(bitwise_equal(model.state_dict()[k], state[k]) for k in state)
    assert len(mapped) == len(state) and set(mapped) == {0}, mapped


@linux_only
def test_a_model_living_in_a_mapped_file_is_never_released(tmp_path: Path) -> None:
    """A model loaded with assign=True from safetensors lives in a private mapping of that file;
    if the data written comes from the same mapping, dropping its pages after the writes would
    bring back the file's bytes over what was just written (and verified)."""
    path = tmp_path / "small.safetensors"
    torch.manual_seed(4)
    save_file(nn.Linear(10, 10).state_dict(), str(path))  # weight and bias share one page
    mapped = load_file(str(path))
    model = nn.Linear(10, 10)
    model.load_state_dict(mapped, assign=True)
    assert model.bias.data_ptr() == mapped["bias"].data_ptr()
    new_weight = torch.full((10, 10), 7.0)
    # the weight from memory, the bias from the model's own mapping (written onto itself)
    ckptviz.compare(model, {"weight": new_weight, "bias": mapped["bias"]}).plan().apply(model)
    assert bitwise_equal(model.weight.detach(), new_weight)
