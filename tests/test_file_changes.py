"""A checkpoint truncated or rewritten while apply or statistics read it (a trainer re-saving
``last.ckpt``) ends in ``CheckpointError``, the model bitwise unchanged: never a SIGBUS that kills
the process, never a "verified" mix of two saves.

The change is made between two tensor reads, from inside apply (its one write function) or
statistics (its pair reader). A truncation runs in a child process: code that touches mapped
pages of a file that shrank is killed there by SIGBUS instead of taking pytest with it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import ckptviz
from ckptviz import CheckpointError
from ckptviz.core import apply as apply_module
from ckptviz.core import stats as stats_module
from ckptviz.core.apply import bitwise_equal

FORMATS = ["pt", "safetensors", "sharded", "pt-allow-globals"]
HOUR_NS = 3600 * 10**9


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(96, 96) for _ in range(4))


def _state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in Stack().state_dict().items()}


def _save(fmt: str, folder: Path, state: dict[str, torch.Tensor]) -> tuple[Path, Path]:
    """(what to compare against, the file whose data apply reads first) for ``fmt``."""
    if fmt == "pt":
        torch.save(state, folder / "last.ckpt")
        return folder / "last.ckpt", folder / "last.ckpt"
    if fmt == "pt-allow-globals":  # a global outside plain tensors: read through torch.load
        torch.save({"state_dict": state, "args": argparse.Namespace(lr=0.1)}, folder / "last.ckpt")
        return folder / "last.ckpt", folder / "last.ckpt"
    if fmt == "safetensors":
        save_file(state, str(folder / "model.safetensors"))
        return folder / "model.safetensors", folder / "model.safetensors"
    keys = list(state)
    half = len(keys) // 2
    shards = {"model-1.safetensors": keys[:half], "model-2.safetensors": keys[half:]}
    for name, shard_keys in shards.items():
        save_file({k: state[k] for k in shard_keys}, str(folder / name))
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index, folder / "model-1.safetensors"


def _source(fmt: str, path: Path) -> ckptviz.Checkpoint:
    allow = ["argparse.Namespace"] if fmt == "pt-allow-globals" else []
    return ckptviz.read_checkpoint(path, allow_globals=allow)


def _saved_an_hour_ago(fmt: str, folder: Path) -> tuple[Path, Path]:
    """The checkpoint of seed 1, its files dated an hour back (as a save from the last epoch):
    a rewrite now shows in their modification time on any file system clock."""
    compared, first_read = _save(fmt, folder, _state(1))
    for path in folder.iterdir():
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns - HOUR_NS))
    return compared, first_read


def _truncate(path: Path) -> None:
    """Cuts the file's last 24 KiB: the data of its last tensors (the headers before stay)."""
    with path.open("r+b") as stream:
        stream.truncate(path.stat().st_size - 24 * 1024)


def _rewrite_in_place(fmt: str, folder: Path) -> Callable[[Path], None]:
    """Rewrites a file in place (same name, inode and size) with the values of another seed."""
    elsewhere = folder / "elsewhere"
    elsewhere.mkdir()
    _save(fmt, elsewhere, _state(2))

    def rewrite(path: Path) -> None:
        new = (elsewhere / path.name).read_bytes()
        assert len(new) == path.stat().st_size
        path.write_bytes(new)  # truncates, then writes: what torch.save(obj, path) does

    return rewrite


def _before_second_write(monkeypatch: pytest.MonkeyPatch, change: Callable[[], None]) -> None:
    """``change()`` once the first tensor is written and verified, before the second is written."""
    real_write = apply_module._write
    writes = []

    def write(target: torch.Tensor, value: torch.Tensor, action: str) -> None:
        writes.append(target)
        if len(writes) == 2:
            change()
        real_write(target, value, action)

    monkeypatch.setattr(apply_module, "_write", write)


def _after_first_pair(monkeypatch: pytest.MonkeyPatch, change: Callable[[], None]) -> None:
    real_fetch = stats_module.PairReader.fetch
    fetched = []

    def fetch(self: stats_module.PairReader, keys: list[str]) -> list[torch.Tensor]:
        pair = real_fetch(self, keys)
        fetched.append(keys)
        if len(fetched) == 1:
            change()
        return pair

    monkeypatch.setattr(stats_module.PairReader, "fetch", fetch)


def _apply_refused(source: ckptviz.Checkpoint, model: Stack) -> str:
    """Applies, expecting a refusal that leaves ``model`` as it was; returns the message."""
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    plan = ckptviz.compare(model, source).plan()
    with pytest.raises(CheckpointError) as caught:
        plan.apply(model)
    now = model.state_dict()
    assert all(bitwise_equal(now[k], before[k]) for k in before)
    assert all(p is params[k] for k, p in model.named_parameters())
    return str(caught.value)


# -- rewritten in place, same size: detected at the end ----------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_file_rewritten_during_apply_is_refused_not_mixed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    compared, first_read = _saved_an_hour_ago(fmt, tmp_path)
    rewrite = _rewrite_in_place(fmt, tmp_path)
    source = _source(fmt, compared)
    _before_second_write(monkeypatch, lambda: rewrite(first_read))
    message = _apply_refused(source, Stack())
    assert "the checkpoint changed while it was being applied" in message
    assert str(first_read) in message and "rewritten in place" in message
    assert "nothing was changed in the model" in message and "Re-run" in message


def test_a_dcp_data_file_rewritten_during_apply_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    for seed, folder in ((1, tmp_path / "step7"), (2, tmp_path / "elsewhere")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns that no process group is set up
            dcp.save(_state(seed), storage_writer=FileSystemWriter(folder), no_dist=True)
    [data] = (tmp_path / "step7").glob("*.distcp")
    stat = data.stat()
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns - HOUR_NS))
    source = ckptviz.read_checkpoint(tmp_path / "step7")
    new = (tmp_path / "elsewhere" / data.name).read_bytes()
    assert len(new) == stat.st_size
    _before_second_write(monkeypatch, lambda: data.write_bytes(new))
    message = _apply_refused(source, Stack())
    assert "the checkpoint changed while it was being applied" in message
    assert str(data) in message and "nothing was changed in the model" in message


def test_stats_of_a_file_rewritten_meanwhile_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared, first_read = _saved_an_hour_ago("pt", tmp_path)
    rewrite = _rewrite_in_place("pt", tmp_path)
    diff = ckptviz.compare(Stack(), compared)
    _after_first_pair(monkeypatch, lambda: rewrite(first_read))
    with pytest.raises(CheckpointError) as caught:
        diff.stats()
    message = str(caught.value)
    assert "changed while its statistics were computed" in message and str(first_read) in message


def test_a_file_left_as_it_was_still_applies(tmp_path: Path) -> None:
    compared, _ = _saved_an_hour_ago("sharded", tmp_path)
    model = Stack()
    assert ckptviz.compare(model, compared).plan().apply(model).verified
    state = _state(1)
    assert all(bitwise_equal(v, state[k]) for k, v in model.state_dict().items())


# -- truncated: a checked read comes back short (in a child process: SIGBUS on mapped pages) --


def truncated_during(what: str, fmt: str, folder: str) -> None:
    """The child process: truncates the checkpoint during ``what`` and prints the outcome."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        compared, first_read = _saved_an_hour_ago(fmt, Path(folder))
        source = _source(fmt, compared)
        if what == "apply":
            _before_second_write(monkeypatch, lambda: _truncate(first_read))
            print("refused:", _apply_refused(source, Stack()))
            return
        diff = ckptviz.compare(Stack(), source)
        _after_first_pair(monkeypatch, lambda: _truncate(first_read))
        try:
            diff.stats()
        except CheckpointError as exc:
            print("refused:", exc)


def _in_child(what: str, fmt: str, folder: Path) -> subprocess.CompletedProcess[str]:
    tests = Path(__file__).parent
    code = (
        f"import sys; sys.path.insert(0, {str(tests)!r}); import test_file_changes as t; "
        f"t.truncated_during({what!r}, {fmt!r}, {str(folder)!r})"
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_file_truncated_during_apply_is_refused_not_a_crash(tmp_path: Path, fmt: str) -> None:
    result = _in_child("apply", fmt, tmp_path)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])  # -7: SIGBUS
    message = result.stdout
    assert message.startswith("refused:"), (message, result.stderr[-2000:])
    assert "the checkpoint changed while it was being applied" in message
    assert "size" in message and str(tmp_path) in message
    assert "nothing was changed in the model" in message


def test_a_file_truncated_during_stats_is_refused_not_a_crash(tmp_path: Path) -> None:
    result = _in_child("stats", "pt", tmp_path)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])  # -7: SIGBUS
    message = result.stdout
    assert message.startswith("refused:"), (message, result.stderr[-2000:])
    message = message.replace(str(tmp_path), "<folder>")  # (the folder's name says truncated)
    assert "<folder>/last.ckpt" in message and "truncated" in message and "'layers." in message


@pytest.mark.parametrize("fmt", ["pt", "safetensors", "pt-allow-globals"])
def test_a_short_read_names_the_file_and_the_key(tmp_path: Path, fmt: str) -> None:
    compared, first_read = _save(fmt, tmp_path, _state(1))
    source = _source(fmt, compared)
    last = list(source.tensors)[-1]
    with source.open() as data:
        _truncate(first_read)
        with pytest.raises(CheckpointError) as caught:
            data[last]
    message = str(caught.value).replace(str(first_read), "<file>")
    assert "<file>" in message and repr(last) in message and "truncated" in message


def _mapped(path: Path) -> bool:
    """Whether this process maps ``path`` (Linux)."""
    real = os.path.realpath(path)
    with open("/proc/self/maps") as maps:
        return any(line.rstrip("\n").endswith(" " + real) for line in maps)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps")
def test_tensors_that_are_more_than_their_bytes_are_read_without_a_mapping(
    tmp_path: Path,
) -> None:
    """A quantized tensor is not its storage's bytes alone, so it cannot be read back from the
    file at the place its storage is mapped from: such a file is loaded whole, unmapped."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated in torch
        quantized = torch.quantize_per_tensor(torch.randn(4, 4), 0.1, 0, torch.qint8)
        path = tmp_path / "quantized.pt"
        torch.save({"q": quantized, "w": torch.randn(3)}, path)
        source = ckptviz.read_checkpoint(path, trusted=True)
        with source.open() as data:
            assert not _mapped(path)
            assert torch.equal(data["q"].int_repr(), quantized.int_repr())
