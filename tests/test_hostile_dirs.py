"""Checkpoint directories whose index or ``.metadata`` is not a plain small file: a FIFO (reading
it waited forever), ``/dev/zero`` (read until memory ran out), an oversized file. Each is refused
with ``CheckpointError`` naming the file, without opening a device or waiting on a pipe.

The FIFO and ``/dev/zero`` reads run in a child process with a memory limit and a timeout, only
as a safety net: on a reader that hangs or reads forever, the test fails instead of the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import Classifier
from huggingface_hub import save_torch_state_dict

import ckptviz
from ckptviz import CheckpointError
from ckptviz.core.formats.dcp import MAX_METADATA_BYTES, read_metadata
from ckptviz.core.formats.sharded import MAX_INDEX_BYTES

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs and /dev/zero")

INDEX = "model.safetensors.index.json"


def _hf_dir(folder: Path) -> Path:
    folder.mkdir(parents=True)
    save_torch_state_dict(Classifier(10).state_dict(), folder, max_shard_size=1500)
    return folder


def _dcp_dir(folder: Path) -> Path:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save(dict(Classifier(10).state_dict()), checkpoint_id=folder, no_dist=True)
    return folder


def _replace(path: Path, kind: str) -> None:
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")


#: Reads each path given in a child process with at most 1 GiB more address space than it has
#: after importing (argv: the module holding read_metadata, then pairs of how and path); prints
#: one JSON line per path: the exception type and message.
_CHILD = """
import importlib, json, pathlib, resource, sys
import ckptviz
read_metadata = importlib.import_module(sys.argv[1]).read_metadata
status = open("/proc/self/status").read().split("VmSize:")[1].split()[0]
limit = int(status) * 1024 + 2**30
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
for how, path in zip(sys.argv[2::2], sys.argv[3::2]):
    try:
        if how == "read_metadata":
            read_metadata(pathlib.Path(path))
        else:
            ckptviz.read_checkpoint(path)
        outcome = ["read", ""]
    except BaseException as exc:
        outcome = [type(exc).__name__, str(exc)]
    print(json.dumps(outcome), flush=True)
"""


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str, Path]]:
    """case -> (exception type, message, the file) for every non-regular file, read in one child."""
    root = tmp_path_factory.mktemp("hostile")
    cases: dict[str, tuple[str, Path, Path]] = {}
    for kind in ("fifo", "zero"):
        folder = _hf_dir(root / f"hf-{kind}")
        _replace(folder / INDEX, kind)
        cases[f"index-{kind}"] = ("read_checkpoint", folder, folder / INDEX)
        folder = _dcp_dir(root / f"dcp-{kind}")
        _replace(folder / ".metadata", kind)
        cases[f"metadata-{kind}"] = ("read_checkpoint", folder, folder / ".metadata")
        cases[f"read_metadata-{kind}"] = ("read_metadata", folder, folder / ".metadata")
    argv = [str(x) for how, folder, _ in cases.values() for x in (how, folder)]
    try:
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, read_metadata.__module__, *argv],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        lines = done.stdout.splitlines()
        failure = done.stderr[-2000:]
    except subprocess.TimeoutExpired as exc:
        lines = (exc.stdout or b"").decode().splitlines() if exc.stdout else []
        failure = "the reader hung (killed after 120 s)"
    result = {}
    for number, (case, (_, _, path)) in enumerate(cases.items()):
        if number < len(lines):
            kind, message = json.loads(lines[number])
            result[case] = (kind, message, path)
        else:
            result[case] = ("no outcome", failure, path)
    return result


@pytest.mark.parametrize(
    ("case", "what"),
    [
        ("index-fifo", "a FIFO (named pipe)"),
        ("index-zero", "a character device"),
        ("metadata-fifo", "a FIFO (named pipe)"),
        ("metadata-zero", "a character device"),
        ("read_metadata-fifo", "a FIFO (named pipe)"),
        ("read_metadata-zero", "a character device"),
    ],
)
def test_an_index_or_metadata_that_is_no_regular_file_is_refused_at_once(
    outcomes: dict[str, tuple[str, str, Path]], case: str, what: str
) -> None:
    kind, message, path = outcomes[case]
    assert kind == "CheckpointError", message
    assert message.startswith(f"{path}: ")
    assert f"is {what}, not a regular file; nothing was read from it" in message


def _sparse(path: Path, head: bytes, size: int) -> None:
    """``path`` holding ``head`` then zeros up to ``size`` bytes, without writing the zeros."""
    with path.open("r+b" if path.exists() else "wb") as stream:
        stream.seek(0)
        stream.write(head)
        stream.truncate(size)


def test_an_oversized_metadata_is_refused_before_it_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real ``.metadata`` padded past the cap: unpickling stops at its end, so it used to read."""
    folder = _dcp_dir(tmp_path / "c")
    metadata = folder / ".metadata"
    _sparse(metadata, metadata.read_bytes(), MAX_METADATA_BYTES + 1)

    def no_full_read(*args: object) -> bytes:
        raise AssertionError("an oversized file must be refused from its size, not read")

    monkeypatch.setattr(Path, "read_bytes", no_full_read)
    with pytest.raises(CheckpointError) as error:
        ckptviz.read_checkpoint(folder)
    assert str(error.value).startswith(f"{metadata}: {MAX_METADATA_BYTES + 1:,} bytes is more")
    assert f"(at most {MAX_METADATA_BYTES:,})" in str(error.value)


def test_an_oversized_index_is_refused(tmp_path: Path) -> None:
    folder = _hf_dir(tmp_path / "hf")
    index = folder / INDEX
    _sparse(index, index.read_bytes(), MAX_INDEX_BYTES + 1)
    with pytest.raises(CheckpointError) as error:
        ckptviz.read_checkpoint(folder)
    assert str(error.value).startswith(f"{index}: {MAX_INDEX_BYTES + 1:,} bytes is more")


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "maximum recursion depth"),  # was a RecursionError
        (b'{"weight_map": {"a": 1' + b"0" * 5000 + b"}}", "Exceeds the limit"),
        (b'{"weight_map": {"\xff": "a.safetensors"}}', "can't decode byte 0xff"),
    ],
    ids=["deep-nesting", "huge-number", "not-utf8"],
)
def test_an_index_json_that_python_cannot_parse_is_a_checkpoint_error(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    index = _hf_dir(tmp_path / "hf") / INDEX
    index.write_bytes(content)
    with pytest.raises(CheckpointError) as error:
        ckptviz.read_checkpoint(index.parent)
    assert str(error.value).startswith(f"{index}: not valid JSON (")
    assert reason in str(error.value)


def test_a_metadata_that_is_a_directory_is_not_taken_for_a_dcp_checkpoint(tmp_path: Path) -> None:
    """An Eclipse workspace has a ``.metadata`` directory: not a checkpoint, said as before."""
    (tmp_path / ".metadata").mkdir()
    with pytest.raises(
        CheckpointError, match="holds none of the checkpoints ckptviz reads as a directory"
    ):
        ckptviz.read_checkpoint(tmp_path)


def test_clean_directories_read_as_before(tmp_path: Path) -> None:
    """The regular-file checks change nothing for real directories, symlinked indexes included
    (the Hugging Face cache links every file into a blobs directory)."""
    torch.manual_seed(0)
    hf = _hf_dir(tmp_path / "hf")
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / "index").write_bytes((hf / INDEX).read_bytes())
    (hf / INDEX).unlink()
    (hf / INDEX).symlink_to(blobs / "index")
    folder = _dcp_dir(tmp_path / "dcp")
    for source in (hf, folder):
        ckpt = ckptviz.read_checkpoint(source)
        assert set(ckpt.tensors) == set(Classifier(10).state_dict())
        model = Classifier(10)
        assert ckptviz.compare(model, source).plan().apply(model).verified
