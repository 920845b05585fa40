"""Hostile and broken checkpoint files: nothing runs, nothing half-loads, every error helps.

Each hostile file is built here, byte by byte where the case needs it, and each test checks the
outcome a user sees: a ``CheckpointError`` naming the file (and the key, when there is one) with
the next step, or a correct result; never code run from the file and never a changed model.
"""

from __future__ import annotations

import argparse
import builtins
import io
import json
import os
import pickle
import random
import struct
import tarfile
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import SmallCNN, assert_bitwise_same, snapshot
from safetensors.torch import save_file
from torch import nn

import ckptviz
from ckptviz import CheckpointError, CkptvizError, UnsafeCheckpointError, read_checkpoint

# -- building hostile files ------------------------------------------------------------------


class WritesMarker:
    """Unpickling this object runs ``run(arg)``: a stand-in for a malicious payload."""

    def __init__(self, run: Callable[..., Any], arg: str) -> None:
        self.run, self.arg = run, arg

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.run, (self.arg,))


def marker_payloads(marker: Path) -> dict[str, WritesMarker]:
    return {
        "os.system": WritesMarker(os.system, f"touch '{marker}'"),
        "builtins.exec": WritesMarker(builtins.exec, f"open({str(marker)!r}, 'w').write('pwned')"),
    }


def rewrite_zip(src: Path, dst: Path, edit: Callable[[str, bytes], bytes]) -> None:
    """Copy a torch zip file record by record, passing each record through ``edit``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, edit(info.filename, zin.read(info.filename)))


def pickle_int(n: int) -> bytes:
    """The LONG1 opcode: any integer, so the size a pickle declares is ours to choose."""
    body = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(body)]) + body


def pickle_str(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def pickle_tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def tensor_pickle(key: str, storage_numel: int, shape: tuple[int, ...]) -> bytes:
    """A hand-written torch ``data.pkl``: ``{key: float32 tensor of shape}`` on storage '0'."""
    stride = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        stride[i] = stride[i + 1] * shape[i + 1]
    storage = pickle_tuple(
        pickle_str("storage"),
        b"ctorch\nFloatStorage\n",
        pickle_str("0"),
        pickle_str("cpu"),
        pickle_int(storage_numel),
    )
    rebuild = (
        b"ctorch._utils\n_rebuild_tensor_v2\n"
        + pickle_tuple(
            storage + b"Q",
            pickle_int(0),
            pickle_tuple(*(pickle_int(s) for s in shape)),
            pickle_tuple(*(pickle_int(s) for s in stride)),
            b"\x89",
            b"ccollections\nOrderedDict\n)R",
        )
        + b"R"
    )
    return b"\x80\x02}" + pickle_str(key) + rebuild + b"s."


def safetensors_bytes(
    header: dict[str, Any] | bytes, data: bytes, length: int | None = None
) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def entry(dtype: str, shape: list[int], start: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


@pytest.fixture
def load_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """Every torch.load call's keyword arguments, to prove no unsafe fallback ever happens."""
    calls: list[dict[str, Any]] = []
    real_load = torch.load

    def recording_load(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    yield calls


def assert_names_and_helps(err: BaseException, path: Path, *fragments: str) -> None:
    text = str(err)
    assert str(path) in text, text
    for fragment in fragments:
        assert fragment.lower() in text.lower(), f"{fragment!r} not in: {text}"
    # ckptviz never passes on torch's advice to retry unsafely
    assert "weights_only=False" not in text and "weights_only` set to `False" not in text


# -- 1. code in the pickle ----------------------------------------------------------------------


@pytest.mark.parametrize("payload", ["os.system", "builtins.exec"])
def test_the_payload_really_runs_when_unpickled_unsafely(tmp_path: Path, payload: str) -> None:
    """The control: without ckptviz, these files do run code, so 'marker absent' means refused."""
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps({"x": marker_payloads(marker)[payload]}, protocol=2))
    assert marker.exists()


@pytest.mark.parametrize("container", ["raw pickle", "torch zip", "torch legacy", "hand-made"])
@pytest.mark.parametrize("payload", ["os.system", "builtins.exec"])
def test_code_in_the_pickle_is_refused_and_never_runs(
    tmp_path: Path, container: str, payload: str, load_calls: list[dict[str, Any]]
) -> None:
    marker = tmp_path / "marker"
    evil = marker_payloads(marker)[payload]
    path = tmp_path / "evil.pt"
    state = {"weight": torch.ones(2, 2), "bias": torch.zeros(2), "extra": evil}
    if container == "raw pickle":
        path.write_bytes(pickle.dumps(state, protocol=2))
    elif container == "torch zip":
        torch.save(state, path)
    elif container == "torch legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:  # written opcode by opcode, naming the module as a person would ("os", not "posix")
        module, _, name = payload.rpartition(".")
        call = b"c" + f"{module}\n{name}\n".encode() + pickle_str(evil.arg) + b"\x85R"
        path.write_bytes(b"\x80\x02" + call + b".")

    model = nn.Linear(2, 2)
    before = snapshot(model)
    with pytest.raises(UnsafeCheckpointError) as caught:
        read_checkpoint(path)
    with pytest.raises(UnsafeCheckpointError):
        ckptviz.compare(model, path)

    assert not marker.exists()
    assert_bitwise_same(model, before)
    err = caught.value
    assert err.unsafe_globals, "the error names the globals"
    assert any(name.endswith(payload.rpartition(".")[2]) for name in err.unsafe_globals)
    assert_names_and_helps(err, path, "can run any code", "nothing from it ran")
    # the code-running global is named as such, not offered as something to allow
    assert "would run that code" in str(err) and "allow exactly these" not in str(err)
    assert all(call.get("weights_only") is True for call in load_calls), load_calls


def test_reading_never_falls_back_to_full_unpickling(
    tmp_path: Path, load_calls: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every path through read/compare/plan/apply: weights_only=True, pickle never used."""
    unrestricted: list[str] = []

    class NoUnpickler:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            unrestricted.append("Unpickler")
            raise AssertionError("an unrestricted Unpickler was created")

    def no_load(*args: Any, **kwargs: Any) -> Any:
        unrestricted.append("load")
        raise AssertionError("pickle.load(s) was called")

    monkeypatch.setattr(pickle, "Unpickler", NoUnpickler)
    monkeypatch.setattr(pickle, "load", no_load)
    monkeypatch.setattr(pickle, "loads", no_load)

    good = tmp_path / "good.pt"
    torch.manual_seed(0)
    torch.save({"state_dict": SmallCNN(4).state_dict(), "epoch": 3}, good)
    research = tmp_path / "research.pt"
    torch.save(
        {"model": nn.Linear(2, 2).state_dict(), "args": argparse.Namespace(lr=0.1)}, research
    )
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(1), "x": WritesMarker(os.system, "true")}, evil)

    model = SmallCNN(4)
    ckptviz.compare(model, good).plan().apply(model).undo()
    for path in (research, evil):
        with pytest.raises(UnsafeCheckpointError):
            ckptviz.compare(nn.Linear(2, 2), path)
    linear = nn.Linear(2, 2)
    ckptviz.compare(linear, research, allow_globals=["argparse.Namespace"]).plan().apply(linear)

    assert load_calls, "torch.load was used"
    assert all(call.get("weights_only") is True for call in load_calls), load_calls
    assert not unrestricted


# -- 2. old research checkpoints: argparse.Namespace, numpy ------------------------------------


def research_state() -> dict[str, Any]:
    torch.manual_seed(3)
    return {
        "model": nn.Linear(3, 2).state_dict(),
        "args": argparse.Namespace(lr=0.1, arch="linear"),
        "best_acc": np.float64(0.93),
        "epoch": np.int64(12),
        "history": np.arange(4.0),
    }


def save_with_numpy_spelling(
    path: Path, state: dict[str, Any], container: str, spelling: str
) -> None:
    """Save ``state`` so that its numpy globals are spelled ``spelling`` in the file.

    numpy 2 pickles as ``numpy._core``; files from numpy 1 say ``numpy.core``. Protocol 2 writes
    globals as text (``c<module>\\n<name>\\n``), so the spelling is set by rewriting that text.
    """
    buffer = io.BytesIO()
    torch.save(state, buffer, _use_new_zipfile_serialization=(container == "zip"))
    written = buffer.getvalue()
    here = b"cnumpy._core.multiarray\n"
    wanted = b"c" + spelling.encode() + b".multiarray\n"

    def respell(data: bytes) -> bytes:
        assert here in data or wanted in data
        return data.replace(here, wanted)

    if container == "zip":
        staging = path.with_suffix(".staging")
        staging.write_bytes(written)
        rewrite_zip(
            staging, path, lambda name, data: respell(data) if name.endswith(".pkl") else data
        )
        staging.unlink()
        with zipfile.ZipFile(path) as archive:
            pickled = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    else:
        pickled = respell(written)
        path.write_bytes(pickled)
    other = "numpy._core" if spelling == "numpy.core" else "numpy.core"
    assert wanted in pickled and (b"c" + other.encode() + b".multiarray\n") not in pickled


@pytest.mark.parametrize("container", ["zip", "legacy"])
@pytest.mark.parametrize("spelling", ["numpy.core", "numpy._core"])
def test_research_checkpoint_refused_then_loaded_with_the_named_globals(
    tmp_path: Path, container: str, spelling: str, load_calls: list[dict[str, Any]]
) -> None:
    path = tmp_path / "research.pth"
    state = research_state()
    save_with_numpy_spelling(path, state, container, spelling)
    safe_before = set(torch.serialization.get_safe_globals())

    with pytest.raises(UnsafeCheckpointError) as caught:
        read_checkpoint(path)
    err = caught.value
    expected = {
        "argparse.Namespace",
        f"{spelling}.multiarray._reconstruct",
        f"{spelling}.multiarray.scalar",
        "numpy.dtype",
        "numpy.ndarray",
    }
    assert expected <= set(err.unsafe_globals), err.unsafe_globals
    other = "numpy._core" if spelling == "numpy.core" else "numpy.core"
    assert not any(name.startswith(f"{other}.") for name in err.unsafe_globals)
    assert_names_and_helps(err, path, "allow_globals=", "argparse.Namespace")
    # every name is harmless: the one opt-in offered is allowing them, not full unpickling
    assert "trusted=True" not in str(err)

    # the allow-list copied from the error is enough, for this read only
    ckpt = read_checkpoint(path, allow_globals=err.unsafe_globals)
    assert ckpt.location == ("model",)
    assert set(ckpt.tensors) == set(state["model"])
    with ckpt.open() as source:
        for key, value in state["model"].items():
            assert torch.equal(source[key], value)

    trusted = read_checkpoint(path, trusted=True)
    assert set(trusted.tensors) == set(state["model"])

    # nothing leaked into torch's global allow-list
    assert set(torch.serialization.get_safe_globals()) == safe_before
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    trusted_calls = [c for c in load_calls if c.get("weights_only") is False]
    assert len(trusted_calls) == 1, "only the trusted=True read unpickled fully"


def test_allow_globals_accepts_the_objects_and_applies_through_compare(tmp_path: Path) -> None:
    path = tmp_path / "research.pth"
    state = research_state()
    torch.save(state, path)
    objects = [
        argparse.Namespace,
        np.dtype,
        np.ndarray,
        np._core.multiarray._reconstruct,
        np._core.multiarray.scalar,
    ]
    safe_before = set(torch.serialization.get_safe_globals())
    model = nn.Linear(3, 2)
    report = ckptviz.compare(model, path, allow_globals=objects).plan().apply(model)
    assert report.verified
    for key, value in state["model"].items():
        assert torch.equal(model.state_dict()[key], value)
    assert set(torch.serialization.get_safe_globals()) == safe_before


def test_a_partial_allow_list_names_only_what_is_still_needed(tmp_path: Path) -> None:
    path = tmp_path / "research.pth"
    torch.save(research_state(), path)
    with pytest.raises(UnsafeCheckpointError) as caught:
        read_checkpoint(path, allow_globals=["argparse.Namespace"])
    err = caught.value
    assert "argparse.Namespace" not in err.unsafe_globals
    assert "numpy.ndarray" in err.unsafe_globals
    assert "also needs" in str(err)
    # the suggested list keeps what was already allowed
    assert "'argparse.Namespace'" in str(err).split("allow_globals=")[1]


def test_an_allow_global_that_does_not_exist_is_named(tmp_path: Path) -> None:
    path = tmp_path / "research.pth"
    torch.save(research_state(), path)
    with pytest.raises(CheckpointError, match=r"numpy\.nothing_here.*full dotted name"):
        read_checkpoint(path, allow_globals=["numpy.nothing_here"])


# -- 3. files that are not checkpoints ---------------------------------------------------------


def legacy_tar(path: Path) -> None:
    """The pre-2018 torch.save layout: a tar with sys_info, pickle, storages and tensors."""
    with tarfile.open(path, "w") as tar:
        for name in ("sys_info", "pickle", "storages", "tensors"):
            data = pickle.dumps({"name": name}, protocol=2)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def torchscript(path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated, still seen
        torch.jit.save(torch.jit.script(nn.Linear(2, 2)), path)


def random_bytes(prefix: bytes) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        rng = random.Random(len(prefix))
        path.write_bytes(prefix + bytes(rng.randrange(256) for _ in range(4096)))

    return write


NOT_CHECKPOINTS: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "empty file": (lambda p: p.write_bytes(b""), ("empty",)),
    "random bytes": (random_bytes(b"\x17"), ("not a checkpoint I can read safely", "torch.save")),
    "random bytes after a pickle header": (
        random_bytes(b"\x80\x02"),
        ("not a checkpoint I can read safely", "re-save"),
    ),
    "random bytes after a zip header": (random_bytes(b"PK\x03\x04"), ("zip", "torch.save")),
    "text file": (
        lambda p: p.write_text("epoch,loss\n1,0.5\n2,0.4\n"),
        ("not a checkpoint I can read safely", "torch.save"),
    ),
    "directory": (lambda p: p.mkdir(), ("directory", "pass the file inside it")),
    "missing path": (lambda p: None, ("no such file", "check the path")),
    "legacy tar": (legacy_tar, ("tar", "not a checkpoint I can read safely", "re-save")),
    "TorchScript archive": (torchscript, ("TorchScript", "torch.jit.load")),
    "zip without data.pkl": (
        lambda p: zipfile.ZipFile(p, "w").writestr("notes.txt", "hello"),
        ("not one written by torch.save", "safetensors"),
    ),
}


@pytest.mark.parametrize("case", list(NOT_CHECKPOINTS))
def test_not_a_checkpoint(tmp_path: Path, case: str) -> None:
    write, fragments = NOT_CHECKPOINTS[case]
    path = tmp_path / "model.pt"
    write(path)
    with pytest.raises(CheckpointError) as caught:
        read_checkpoint(path)
    assert type(caught.value) is CheckpointError
    assert_names_and_helps(caught.value, path, *fragments)


# -- 4. truncated files --------------------------------------------------------------------------


def cut_points(size: int) -> list[int]:
    return sorted({1, 7, 8, 9, 64, size // 4, size // 2, size - 100, size - 22, size - 1})


@pytest.fixture
def cnn_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(5)
    return SmallCNN(4).state_dict()


@pytest.mark.parametrize("kind", ["torch zip", "torch legacy", "safetensors"])
def test_truncated_files_are_refused_at_every_cut(
    tmp_path: Path, kind: str, cnn_state: dict[str, torch.Tensor]
) -> None:
    whole = tmp_path / "whole"
    if kind == "torch zip":
        torch.save(cnn_state, whole)
    elif kind == "torch legacy":
        torch.save(cnn_state, whole, _use_new_zipfile_serialization=False)
    else:
        save_file(cnn_state, str(whole))
    data = whole.read_bytes()
    assert set(read_checkpoint(whole).tensors) == set(cnn_state)  # the uncut file is fine
    for cut in cut_points(len(data)):
        path = tmp_path / f"cut{cut}.bin"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as caught:
            read_checkpoint(path)
        assert_names_and_helps(caught.value, path, "re-save")


# -- 5. malformed safetensors headers -------------------------------------------------------------

F32_PAIR = {"a": entry("F32", [2], 0, 8)}
MALFORMED_SAFETENSORS: dict[str, bytes] = {
    "header shorter than 8 bytes": b"\x05\x00\x00",
    "header length past the end": safetensors_bytes(F32_PAIR, b"\0" * 8, length=10**6),
    "header length absurd": safetensors_bytes(F32_PAIR, b"\0" * 8, length=2**62),
    "non-UTF-8 header": safetensors_bytes(b'{"a\xff\xfe": {}}', b""),
    "non-JSON header": safetensors_bytes(b"{this is not json", b""),
    "overlapping offsets": safetensors_bytes(
        {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, b"\0" * 12
    ),
    "gapped offsets": safetensors_bytes(
        {"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 8, 12)}, b"\0" * 12
    ),
    "shape x dtype != byte size": safetensors_bytes({"a": entry("F32", [3], 0, 8)}, b"\0" * 8),
    "unknown dtype": safetensors_bytes({"a": entry("Q99", [1], 0, 4)}, b"\0" * 4),
    "dtype torch cannot hold": safetensors_bytes({"a": entry("F4", [2], 0, 1)}, b"\0"),
    "trailing bytes": safetensors_bytes(F32_PAIR, b"\0" * 8 + b"trailing"),
    "negative dimension": safetensors_bytes({"a": entry("F32", [-1], 0, 4)}, b"\0" * 4),
    "shape overflows": safetensors_bytes({"a": entry("F32", [2**62, 2**62], 0, 4)}, b"\0" * 4),
    "huge shape, tiny data": safetensors_bytes(
        {"a": entry("F32", [10**6, 10**6], 0, 4)}, b"\0" * 4
    ),
    "duplicate key": safetensors_bytes(
        b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
        b'"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}',
        b"\0" * 8,
    ),
}


def test_the_hand_built_safetensors_writer_makes_valid_files(tmp_path: Path) -> None:
    """The control for the malformed cases: the same builder, used correctly, reads back."""
    path = tmp_path / "good.safetensors"
    values = torch.tensor([1.5, -2.0])
    path.write_bytes(
        safetensors_bytes(
            {"a": entry("F32", [2], 0, 8), "b": entry("I64", [1], 8, 16)},
            values.numpy().tobytes() + torch.tensor([7]).numpy().tobytes(),
        )
    )
    ckpt = read_checkpoint(path)
    with ckpt.open() as source:
        assert torch.equal(source["a"], values)
        assert source["b"].tolist() == [7]


@pytest.mark.parametrize("case", list(MALFORMED_SAFETENSORS))
def test_malformed_safetensors_is_refused(tmp_path: Path, case: str) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(MALFORMED_SAFETENSORS[case])
    with pytest.raises(CheckpointError) as caught:
        read_checkpoint(path)
    text = str(caught.value)
    assert_names_and_helps(caught.value, path)
    assert "safetensors" in text
    if case == "dtype torch cannot hold":
        assert "'a'" in text and "F4" in text and "convert" in text


# -- 6. values that are not tensors, keys that are not strings -------------------------------


def mixed_state() -> dict[Any, Any]:
    torch.manual_seed(2)
    linear = nn.Linear(2, 2)
    return {
        "weight": linear.weight.detach().clone(),
        "bias": linear.bias.detach().clone(),
        "epoch": 3,
        "name": "run-7",
        "nested": [[1, 2], [3]],
        "nothing": None,
        7: torch.ones(1),
        ("a", 1): torch.zeros(1),
    }


@pytest.mark.parametrize("where", ["in memory", "in a file"])
def test_non_tensor_values_and_keys_are_shown_as_skipped(tmp_path: Path, where: str) -> None:
    state = mixed_state()
    source: Any = state
    if where == "in a file":
        source = tmp_path / "mixed.pt"
        torch.save(state, source)
    ckpt = read_checkpoint(source)
    assert set(ckpt.tensors) == {"weight", "bias"}
    assert ckpt.skipped == {
        "epoch": "int",
        "name": "str",
        "nested": "list",
        "nothing": "NoneType",
        "7": "key of type int, not a string",
        "('a', 1)": "key of type tuple, not a string",
    }
    assert "not tensors, passed over: epoch (int)" in ckpt.summary()

    model = nn.Linear(2, 2)
    diff = ckptviz.compare(model, source)
    assert diff.counts["match"] == 2 and diff.identical
    assert "6 checkpoint entries are not tensors" in diff.summary()
    diff.plan().apply(model)
    assert torch.equal(model.weight, state["weight"]) and torch.equal(model.bias, state["bias"])


def test_a_state_dict_of_mostly_non_tensors_is_still_found() -> None:
    ckpt = read_checkpoint({"w": torch.ones(2), "a": 1, "b": "x", "c": None, "d": [1]})
    assert list(ckpt.tensors) == ["w"]
    assert set(ckpt.skipped) == {"a", "b", "c", "d"}


def test_a_tensor_expected_but_something_else_found_is_a_missing_row() -> None:
    model = nn.Linear(2, 2)
    before = snapshot(model)
    diff = ckptviz.compare(model, {"weight": torch.ones(2, 2), "bias": [0.0, 0.0]})
    assert diff.status("bias") == "missing"
    assert diff.checkpoint.skipped == {"bias": "list"}
    report = diff.plan().apply(model)
    assert report.keys("keep") == ["bias"]
    assert torch.equal(model.bias, before["bias"])


def test_only_non_string_keys_is_refused_clearly() -> None:
    with pytest.raises(CheckpointError, match="key of type int, not a string"):
        read_checkpoint({0: torch.ones(1), 1: torch.ones(1)})


def test_no_tensors_anywhere_lists_what_there_is(tmp_path: Path) -> None:
    path = tmp_path / "notes.pt"
    torch.save({"epoch": 3, "loss": 0.5}, path)
    with pytest.raises(CheckpointError) as caught:
        read_checkpoint(path)
    assert_names_and_helps(caught.value, path, "no dict of tensors", "'epoch' (int)", "key=")


# -- 7. a huge declared tensor in a tiny file -----------------------------------------------------

HUGE = 2**40  # elements: 4 TiB of float32


def huge_zip(tmp_path: Path, storage_numel: int, shape: tuple[int, ...]) -> Path:
    small = tmp_path / "small.pt"
    torch.save({"weight": torch.arange(4.0)}, small)
    path = tmp_path / "huge.pt"
    hand_made = tensor_pickle("weight", storage_numel, shape)
    rewrite_zip(small, path, lambda name, data: hand_made if name.endswith("data.pkl") else data)
    return path


def test_the_hand_built_torch_pickle_is_what_torch_save_writes(tmp_path: Path) -> None:
    """The control for the huge cases: the hand-made pickle, declaring the true size, loads."""
    path = huge_zip(tmp_path, 4, (2, 2))
    ckpt = read_checkpoint(path)
    assert ckpt["weight"].shape == (2, 2)
    with ckpt.open() as source:
        assert torch.equal(source["weight"], torch.arange(4.0).reshape(2, 2))


@pytest.mark.parametrize(
    ("storage_numel", "shape"),
    [(HUGE, (HUGE,)), (HUGE, (2**20, 2**20)), (4, (HUGE,)), (8, (8,))],
    ids=["storage and shape huge", "2-d huge", "shape past a small storage", "8 values on 4"],
)
def test_a_torch_zip_declaring_more_than_it_holds_is_refused_before_loading(
    tmp_path: Path, storage_numel: int, shape: tuple[int, ...], load_calls: list[dict[str, Any]]
) -> None:
    path = huge_zip(tmp_path, storage_numel, shape)
    with pytest.raises(CheckpointError) as caught:
        read_checkpoint(path)
    assert_names_and_helps(caught.value, path, "'weight'", "only 16 bytes", "re-save")
    assert not load_calls, "refused from the pickle alone, before torch.load mapped any data"


def test_a_legacy_file_declaring_terabytes_is_refused_before_any_allocation(
    tmp_path: Path, load_calls: list[dict[str, Any]]
) -> None:
    """The pre-1.6 loader allocates each storage at its declared size before reading it."""
    buffer = io.BytesIO()
    torch.save({"weight": torch.arange(4.0)}, buffer, _use_new_zipfile_serialization=False)
    # the storage's persistent id ends: location 'cpu', memo put, numel 4, no view
    declared = b"X\x03\x00\x00\x00cpuq\x06K\x04N"
    assert buffer.getvalue().count(declared) == 1
    path = tmp_path / "legacy.pt"
    path.write_bytes(buffer.getvalue().replace(declared, declared[:10] + pickle_int(HUGE) + b"N"))
    with pytest.raises(CheckpointError) as caught:
        read_checkpoint(path)
    assert_names_and_helps(caught.value, path, "weight", "nothing was allocated", "re-save")
    assert f"{4 * HUGE + 8:,} bytes" in str(caught.value)
    assert not load_calls


def test_a_safetensors_header_declaring_a_huge_shape_is_refused_from_the_header(
    tmp_path: Path,
) -> None:
    """read_checkpoint reads only the header; the library refuses it there, before any data."""
    path = tmp_path / "huge.safetensors"
    header = {"a": entry("F32", [2**20, 2**20], 0, 4 * 2**40)}
    path.write_bytes(safetensors_bytes(header, b"\0" * 4))
    with pytest.raises(CheckpointError) as caught:
        read_checkpoint(path)
    assert_names_and_helps(caught.value, path, "safetensors", "re-save")


# -- 8. the file changes or disappears between compare and apply ---------------------------------


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
@pytest.mark.parametrize(
    "change", ["deleted", "other size", "same size replaced", "same size in place", "truncated"]
)
def test_a_file_changed_after_compare_fails_apply_cleanly(
    tmp_path: Path, fmt: str, change: str
) -> None:
    torch.manual_seed(11)
    path = tmp_path / ("ckpt.pt" if fmt == "torch" else "ckpt.safetensors")

    def save(state: dict[str, torch.Tensor], to: Path) -> None:
        if fmt == "torch":
            torch.save(state, to)
        else:
            save_file(state, str(to))

    save(SmallCNN(4).state_dict(), path)
    model = SmallCNN(4)
    before, params = snapshot(model), params_of(model)
    plan = ckptviz.compare(model, path).plan()

    if change == "deleted":
        path.unlink()
    elif change == "other size":
        save(SmallCNN(8).state_dict(), path)
    elif change == "same size replaced":
        other = tmp_path / "other"
        save(SmallCNN(4).state_dict(), other)
        assert other.stat().st_size == path.stat().st_size or fmt == "torch"
        os.replace(other, path)
    elif change == "same size in place":
        stat = path.stat()
        data = bytearray(path.read_bytes())
        data[-8:] = b"\x7f" * 8
        path.write_bytes(bytes(data))
        # a later clock tick, as any real rewrite shows eventually
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    with pytest.raises(CheckpointError) as caught:
        plan.apply(model)
    assert str(path) in str(caught.value)
    assert "gone" in str(caught.value) or "changed since it was read" in str(caught.value)
    assert_bitwise_same(model, before)
    assert all(p is params[k] for k, p in params_of(model).items())


def test_a_saved_plan_applied_after_the_file_changed_names_the_rows(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(SmallCNN(4).state_dict(), path)
    model = SmallCNN(4)
    text = ckptviz.compare(model, path).plan().to_json()
    torch.save(SmallCNN(6).state_dict(), path)
    before = snapshot(model)
    with pytest.raises(CkptvizError) as caught:
        ckptviz.Plan.from_json(text).apply(model)
    assert "conv1.weight" in str(caught.value) and "[6, 3, 3, 3]" in str(caught.value)
    assert_bitwise_same(model, before)
