"""Reading a torch zip file's metadata from its pickle alone gives what torch.load would, and
hands anything unusual to torch.load."""

from __future__ import annotations

import argparse
import itertools
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TiedLM
from torch import nn

import ckptviz
from ckptviz.core.apply import bitwise_equal
from ckptviz.core.formats.torch_zip import _declared_object, check_archive, read_torch_file


def _both_ways(path: Path, key: str | None = None) -> tuple[ckptviz.Checkpoint, Any]:
    fast = ckptviz.read_checkpoint(path, key=key)
    wanted = tuple(key.split("/")) if key else None
    slow = read_torch_file(path, key=wanted, trusted=False, allow=(), mmap=True)
    return fast, slow


def _same_metadata(fast: ckptviz.Checkpoint, slow: ckptviz.Checkpoint) -> None:
    assert fast.tensors == slow.tensors
    assert sorted(fast.ties) == sorted(slow.ties)
    assert (fast.location, fast.candidates, fast.skipped) == (
        slow.location,
        slow.candidates,
        slow.skipped,
    )


def _declares(path: Path) -> bool:
    """Whether the fast reader reads ``path`` itself (rather than handing it to torch.load)."""
    with zipfile.ZipFile(path) as archive:
        return _declared_object(path, archive, check_archive(path, archive)) is not None


def test_every_plain_dtype_shape_and_layout(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        f"{dtype}".removeprefix("torch."): torch.ones(3, 2, dtype=dtype)
        for dtype in (
            torch.float64,
            torch.float32,
            torch.float16,
            torch.bfloat16,
            torch.int64,
            torch.int32,
            torch.int16,
            torch.int8,
            torch.uint8,
            torch.bool,
            torch.complex64,
        )
    }
    state |= {
        "transposed": base.t(),
        "row": base[2],
        "column": base[:, 3],
        "scalar": torch.tensor(5.0),
        "empty": torch.zeros(0, 7),
        "parameter": nn.Parameter(torch.randn(2, 2)),
    }
    path = tmp_path / "plain.pt"
    torch.save(state, path)
    assert _declares(path)
    fast, slow = _both_ways(path)
    _same_metadata(fast, slow)
    assert fast.tensors["transposed"].shape == (6, 4)
    _same_data(fast, path)


def _same_data(fast: ckptviz.Checkpoint, path: Path) -> None:
    """The tensors read from the file equal what torch.load reads, bit for bit and layout."""
    loaded = torch.load(path, weights_only=True)
    node = loaded
    for part in fast.location:
        node = node[part]
    with fast.open() as data:
        for key in fast.tensors:
            got, want = data[key], node[key]
            assert got.dtype == want.dtype and got.shape == want.shape, key
            assert got.stride() == want.stride(), key
            assert bitwise_equal(got, want), key
        tied = [(data[a], data[b]) for group in fast.ties for a, b in itertools.pairwise(group)]
        assert all(bitwise_equal(a, b) for a, b in tied)  # each read on its own, equal


def test_ties_and_a_nested_training_checkpoint(tmp_path: Path) -> None:
    model = TiedLM()
    path = tmp_path / "lightning.ckpt"
    torch.save(
        {
            "epoch": 3,
            "global_step": 120,
            "state_dict": model.state_dict(),
            "ema": {"module": {k: v.clone() for k, v in model.state_dict().items()}},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}],
            "hparams": {"name": "tiny", "layers": [1, 2]},
        },
        path,
    )
    assert _declares(path)
    fast, slow = _both_ways(path)
    _same_metadata(fast, slow)
    assert fast.location == ("state_dict",)
    assert ("embed.weight", "head.weight") in fast.ties
    _same_data(fast, path)
    ema, slow_ema = _both_ways(path, key="ema/module")
    _same_metadata(ema, slow_ema)
    _same_data(ema, path)


def test_a_file_that_needs_other_globals_goes_to_torch_load(tmp_path: Path) -> None:
    path = tmp_path / "args.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1)}, path)
    assert not _declares(path)
    with pytest.raises(ckptviz.UnsafeCheckpointError, match=r"argparse\.Namespace"):
        ckptviz.read_checkpoint(path)


def test_a_storage_declared_beyond_its_record_is_refused(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(1000)}, good)
    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(bad, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("/data/0"):
                data = data[:400]  # 100 of the 1000 values the pickle declares
            target.writestr(info, data)
    assert _declares(good)
    with pytest.raises(
        ckptviz.CheckpointError, match=r"bad\.pt: tensor .w. declares 1,000 .*only 400 bytes"
    ):
        ckptviz.read_checkpoint(bad)


def test_a_big_endian_file_goes_to_torch_load(tmp_path: Path) -> None:
    little = tmp_path / "little.pt"
    torch.save({"w": torch.ones(4)}, little)
    big = tmp_path / "big.pt"
    with zipfile.ZipFile(little) as source, zipfile.ZipFile(big, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            target.writestr(info, b"big" if info.filename.endswith("/byteorder") else data)
    assert _declares(little)
    assert not _declares(big)  # torch.load swaps its bytes; the metadata path does not
