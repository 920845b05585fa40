"""Slice reading is a capability of each checkpoint format, which ``apply_distributed`` asks for.

One process, no process group: each format's reader on real files, and a format added to the
registry is read (or refused) by the distributed apply without a word of it in distributed.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import ckptviz
from ckptviz import Plan
from ckptviz.core import distributed
from ckptviz.core.checkpoint import Checkpoint
from ckptviz.core.formats import FORMATS, FileFormat
from ckptviz.core.formats.base import Box, InMemorySlices, SliceReader, slice_reader

BOX = Box((1, 2), (2, 3))


def _state() -> dict[str, torch.Tensor]:
    return {
        "weight": torch.arange(30, dtype=torch.float32).reshape(5, 6),
        "bias": torch.arange(5, dtype=torch.float64),
    }


def _sources(tmp_path: Path) -> dict[str, Path | dict[str, torch.Tensor]]:
    state = _state()
    save_file(state, tmp_path / "one.safetensors")
    torch.save(state, tmp_path / "one.pt")
    index = tmp_path / "hf"
    index.mkdir()
    save_file({"weight": state["weight"]}, index / "a.safetensors")
    torch.save({"bias": state["bias"]}, index / "b.bin")
    weight_map = {"weight": "a.safetensors", "bias": "b.bin"}
    (index / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return {
        "safetensors": tmp_path / "one.safetensors",
        "torch": tmp_path / "one.pt",
        "mixed-sharded": index,
        "state dict": state,
    }


def test_each_format_reads_a_box_of_its_tensors(tmp_path: Path) -> None:
    state = _state()
    for fmt, source in _sources(tmp_path).items():
        ckpt = ckptviz.read_checkpoint(source)
        assert ckpt.format == fmt
        reader = slice_reader(ckpt)
        assert reader is not None and not reader.collective, fmt
        value = reader.read("weight", BOX)
        assert torch.equal(value, state["weight"][1:3, 2:5]), fmt
        value.fill_(-1)  # memory of its own: the checkpoint's tensor is untouched
        again = reader.read("weight", Box.whole((5, 6)))
        assert torch.equal(again, state["weight"]), fmt
        bias = reader.read("bias", Box((3,), (2,)))
        assert bias.dtype == torch.float64 and bias.tolist() == [3.0, 4.0], fmt
        empty = reader.read("weight", Box((5, 0), (0, 6)))
        assert empty.shape == (0, 6) and empty.dtype == torch.float32, fmt


def test_a_legacy_torch_file_serves_no_slices(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pt"
    torch.save(_state(), path, _use_new_zipfile_serialization=False)
    ckpt = ckptviz.read_checkpoint(path)
    assert ckpt.format == "torch-legacy"
    assert slice_reader(ckpt) is None


class _Toy(InMemorySlices):
    """A format's own slices: the values of the in-memory reader, its own generated code."""

    def code(self) -> tuple[list[str], list[str]]:
        return ["import toy_reader"], ["read_all = toy_reader.read_all"]


def _toy_format(slices: type[SliceReader] | None) -> FileFormat:
    """A format that claims checkpoints named "safetensors", ahead of the real one."""
    safetensors_format = next(f for f in FORMATS if f.name == "safetensors")

    def read_code(ckpt: Checkpoint, keys: list[str]) -> list[str]:
        return ["state = {}"]

    return FileFormat(
        "toy",
        safetensors_format.detect,
        safetensors_format.read,
        read_code,
        produces=("safetensors",),
        slices=slices,
    )


def _plan(tmp_path: Path) -> Plan:
    save_file(_state(), tmp_path / "toy.safetensors")
    return Plan(ckptviz.compare(nn.Linear(6, 5), tmp_path / "toy.safetensors"))


@pytest.fixture
def registry() -> Iterator[list[FileFormat]]:
    """The format registry, put back as it was after the test."""
    before = list(FORMATS)
    try:
        yield FORMATS
    finally:
        FORMATS[:] = before


@pytest.mark.parametrize("slices", [_Toy, None])
def test_the_distributed_apply_asks_the_format(
    tmp_path: Path, registry: list[FileFormat], slices: type[SliceReader] | None
) -> None:
    plan = _plan(tmp_path)
    registry.insert(0, _toy_format(slices))
    ckpt = plan.diff.checkpoint
    problems = distributed._checkpoint_problems(plan, ckpt)
    if slices is None:
        assert set(problems) == {"weight", "bias"}
        assert "cannot read a slice" in problems["weight"]
        with pytest.raises(ckptviz.PlanError, match="cannot read a slice"):
            distributed.distributed_code(plan)
        return
    assert problems == {}
    code = distributed.distributed_code(plan)
    assert "import toy_reader" in code and "read_all = toy_reader.read_all" in code
    assert "safe_open" not in code
    reader = distributed._SliceReader(slice_reader(ckpt))
    assert torch.equal(reader.read("weight", BOX), _state()["weight"][1:3, 2:5])
    assert [(r.checkpoint_key, r.nbytes) for r in reader.records] == [("weight", 6 * 4)]
