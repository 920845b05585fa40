"""The fast ``.pt`` reader reads exactly what ``torch.load(weights_only=True)`` reads, or hands
the file to it, or refuses it; never other values. Every file here is built by hand in
``tmp_path``; each test names the trick it stops."""

from __future__ import annotations

import dataclasses
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torchzip_craft import (
    PROTO,
    entries,
    floats,
    integer,
    rewrite_zip,
    state_dict,
    storage,
    tensor,
    text,
    torch_reads,
    write_zip,
)

import ckptviz
from ckptviz import CheckpointError
from ckptviz.core import checkpoint as checkpoint_module
from ckptviz.core.apply import bitwise_equal
from ckptviz.core.checkpoint import (
    DeclaredStorage,
    DeclaredTensor,
    InvalidDeclaration,
    NotPlain,
    TensorInfo,
)
from ckptviz.core.formats import torch_zip
from ckptviz.core.formats.torch_zip import _declared_object, check_archive


def _declares(path: Path) -> bool:
    """Whether the fast reader reads ``path`` itself (rather than handing it to torch.load)."""
    with zipfile.ZipFile(path) as archive:
        return _declared_object(path, archive, check_archive(path, archive)) is not None


def _ckptviz_reads(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor ckptviz reads from ``path``, as read (views keep their strides)."""
    ckpt = ckptviz.read_checkpoint(path)
    with ckpt.open() as data:
        return {key: data[key] for key in ckpt}


def _same_as_torch(path: Path) -> None:
    """ckptviz's values, dtypes, shapes and strides are torch.load's, bit for bit."""
    loaded: Any = torch_reads(path)
    want = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    got = _ckptviz_reads(path)
    assert got.keys() == want.keys()
    for key, value in got.items():
        expected = want[key]
        assert value.dtype == expected.dtype and value.shape == expected.shape, key
        assert value.stride() == expected.stride(), key
        assert bitwise_equal(
            value.resolve_conj().resolve_neg(), expected.resolve_conj().resolve_neg()
        ), key


def _refused_like_torch(path: Path) -> None:
    with pytest.raises(Exception):  # noqa: B017 - torch raises what it raises
        torch_reads(path)
    with pytest.raises(CheckpointError, match=str(path.name)):
        _ckptviz_reads(path)


# -- 1. declarations cannot change once checked ----------------------------------------------


def test_a_build_cannot_point_a_declared_storage_at_another_record(tmp_path: Path) -> None:
    # BUILD (None, {"key": "1"}) on storage "0": torch.load ignores the attribute and reads
    # data/0; a writable declaration read data/1 instead
    repoint = b"N}" + text("key") + text("1") + b"s\x86b"
    pickle = state_dict(("w", tensor(storage("0", 2) + repoint, 0, (2,), (1,))))
    path = write_zip(tmp_path / "repoint.pt", pickle, {"0": floats(1, 2), "1": floats(66, 77)})
    assert torch_reads(path)["w"].tolist() == [1.0, 2.0]
    _same_as_torch(path)


def test_a_build_that_moves_a_declared_tensor_is_refused_like_torch(tmp_path: Path) -> None:
    # BUILD (None, {"offset": 2}) on the tensor after its bounds were checked: torch.load's
    # set_(None, {...}) fails, and ckptviz read the moved tensor
    move = b"N}" + text("offset") + integer(2) + b"s\x86b"
    pickle = state_dict(("w", tensor(storage("0", 4), 0, (2,), (1,)) + move))
    path = write_zip(tmp_path / "moved.pt", pickle, {"0": floats(1, 2, 3, 4)})
    _refused_like_torch(path)


def test_a_build_with_no_state_on_a_plain_value_is_refused_like_torch(tmp_path: Path) -> None:
    # the C unpickler no-ops BUILD None on an int; torch's refuses it
    pickle = state_dict(("w", tensor(storage("0", 2), 0, (2,), (1,))), ("n", integer(1) + b"Nb"))
    _refused_like_torch(write_zip(tmp_path / "build_int.pt", pickle, {"0": floats(1, 2)}))


def test_declarations_are_sealed() -> None:
    store = DeclaredStorage("0", "float32", 4)
    declared = DeclaredTensor(store, 0, (2,), (1,))
    for target, name, value in ((store, "key", "1"), (declared, "offset", 2)):
        with pytest.raises(NotPlain):
            setattr(target, name, value)
        with pytest.raises(NotPlain):
            target.__setstate__((None, {name: value}))
        assert not hasattr(target, "__dict__")
    assert (store.key, declared.offset) == ("0", 0)


def test_a_state_dict_with_attributes_is_still_read_fast(tmp_path: Path) -> None:
    # model.state_dict() carries _metadata: torch.save writes a BUILD on its OrderedDict
    path = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    assert _declares(path)
    _same_as_torch(path)


# -- 2. what the fast reader does not fully understand goes to torch.load or is refused -------


def test_conj_and_neg_views_load_with_their_sign(tmp_path: Path) -> None:
    z = torch.complex(torch.tensor([1.0, 2.0]), torch.tensor([3.0, -4.0]))
    path = tmp_path / "views.pt"
    torch.save({"conj": z.conj(), "neg": torch._neg_view(torch.tensor([1.0, -2.0]))}, path)
    assert not _declares(path)
    got = _ckptviz_reads(path)
    assert got["conj"].resolve_conj().tolist() == [1 - 3j, 2 + 4j]
    assert got["neg"].resolve_neg().tolist() == [-1.0, 2.0]


@pytest.mark.parametrize(
    ("what", "options"),
    [
        ("requires_grad=True", {"requires_grad": b"\x88"}),
        ("a backward hook", {"hooks": b"ccollections\nOrderedDict\n)R" + integer(1) + b"Ns"}),
        ("metadata", {"metadata": b"}" + text("conj") + b"\x88s"}),
    ],
)
def test_non_default_rebuild_arguments_go_to_torch_load(
    tmp_path: Path, what: str, options: dict[str, bytes]
) -> None:
    pickle = state_dict(
        ("w", tensor(storage("0", 2, "ComplexFloatStorage"), 0, (2,), (1,), **options))
    )
    path = write_zip(tmp_path / "odd.pt", pickle, {"0": floats(1, 2, 3, 4)})
    assert not _declares(path), what


def test_an_integer_parameter_that_requires_grad_goes_to_torch_load(tmp_path: Path) -> None:
    parameter = (
        b"ctorch._utils\n_rebuild_parameter\n("
        + tensor(storage("0", 2, "LongStorage"), 0, (2,), (1,))
        + b"\x88ccollections\nOrderedDict\n)RtR"
    )
    path = write_zip(tmp_path / "p.pt", state_dict(("p", parameter)), {"0": bytes(16)})
    assert not _declares(path)
    _refused_like_torch(path)


def test_a_compressed_data_record_is_refused(tmp_path: Path) -> None:
    pickle = state_dict(("w", tensor(storage("0", 64), 0, (64,), (1,))))
    path = write_zip(
        tmp_path / "deflated.pt",
        pickle,
        {"0": floats(*range(64))},
        record_compression=zipfile.ZIP_DEFLATED,
    )
    with pytest.raises(CheckpointError, match=r"deflated\.pt: .*data/0' is compressed"):
        ckptviz.read_checkpoint(path)


def test_a_compressed_pickle_is_read_bounded_and_the_same(tmp_path: Path) -> None:
    pickle = state_dict(("w", tensor(storage("0", 3), 0, (3,), (1,))))
    path = write_zip(
        tmp_path / "deflated_pickle.pt",
        pickle,
        {"0": floats(1, 2, 3)},
        pickle_compression=zipfile.ZIP_DEFLATED,
    )
    assert _declares(path)
    _same_as_torch(path)


def test_duplicate_entries_are_refused_whichever_one_a_reader_takes(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(3)}, good)
    items = entries(good)
    record = next(item for item in items if item[0].filename.endswith("/data/0"))
    twice = rewrite_zip(tmp_path / "twice.pt", [*items, (record[0], floats(7, 7, 7))])
    with pytest.raises(CheckpointError, match=r"twice\.pt: .*two entries named"):
        ckptviz.read_checkpoint(twice)
    # torch's zip reader finds names ignoring case: BYTEORDER next to byteorder is a duplicate
    folder = items[0][0].filename.split("/")[0]
    shouting = rewrite_zip(
        tmp_path / "case.pt", [*items, (zipfile.ZipInfo(f"{folder}/BYTEORDER"), b"big")]
    )
    with pytest.raises(CheckpointError, match=r"case\.pt: .*two entries named"):
        ckptviz.read_checkpoint(shouting)


def test_a_byte_order_record_in_capitals_is_seen(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save({"w": torch.tensor([1.0, 2.0])}, good)
    items = [
        (zipfile.ZipInfo(info.filename.replace("byteorder", "BYTEORDER")), b"big")
        if info.filename.endswith("/byteorder")
        else (info, data)
        for info, data in entries(good)
    ]
    path = rewrite_zip(tmp_path / "big.pt", items)
    assert not _declares(path)  # torch.load swaps the bytes
    _same_as_torch(path)


def test_a_second_pickle_is_refused(tmp_path: Path) -> None:
    pickle = state_dict(("w", tensor(storage("0", 1), 0, (1,), (1,))))
    other = state_dict(("w", tensor(storage("0", 1), 0, (1,), (1,))))
    path = write_zip(
        tmp_path / "two.pt", pickle, {"0": floats(1)}, extra=[("other/data.pkl", other)]
    )
    with pytest.raises(CheckpointError, match=r"two\.pt: the zip holds 2 pickles"):
        ckptviz.read_checkpoint(path)


@pytest.mark.parametrize("record", [floats(1, 2) + b"\x00\x00\x00", floats(1, 2, 3)])
def test_a_record_of_another_size_than_declared_is_refused(tmp_path: Path, record: bytes) -> None:
    # torch.load refuses both: "record size ... does not match expected size"
    pickle = state_dict(("w", tensor(storage("0", 2), 0, (2,), (1,))))
    path = write_zip(tmp_path / "sized.pt", pickle, {"0": record})
    _refused_like_torch(path)
    with pytest.raises(CheckpointError, match=r"tensor 'w' declares 2 float32 values"):
        ckptviz.read_checkpoint(path)


@pytest.mark.parametrize(
    ("trick", "value"),
    [
        # SHORT_BINUNICODE: the C unpickler reads it, torch's does not know it
        ("an opcode torch does not know", b"\x8c\x02hi"),
        # SETITEM into a list: the C unpickler allows it, torch only into dicts
        ("a SETITEM on a list", b"]" + integer(1) + b"a" + integer(0) + integer(7) + b"s"),
        # an empty SETITEMS on a list: the C unpickler skips it, torch checks the target
        ("an empty SETITEMS on a list", b"](u"),
        # NEWOBJ of an OrderedDict: the C unpickler and torch agree: torch.load reads it
        ("an OrderedDict made by NEWOBJ", b"ccollections\nOrderedDict\n)\x81"),
    ],
)
def test_opcodes_the_two_unpicklers_read_differently(
    tmp_path: Path, trick: str, value: bytes
) -> None:
    pickle = state_dict(("w", tensor(storage("0", 2), 0, (2,), (1,))), ("x", value))
    path = write_zip(tmp_path / "trick.pt", pickle, {"0": floats(1, 2)})
    assert not _declares(path), trick
    try:
        torch_reads(path)
    except Exception:
        _refused_like_torch(path)
    else:
        _same_as_torch(path)


def test_a_dict_of_a_thousand_tensors_is_still_read_fast(tmp_path: Path) -> None:
    # torch.save ends such a dict with an empty SETITEMS, which is rewritten, not refused
    path = tmp_path / "thousand.pt"
    torch.save({f"t{i}": torch.full((2,), float(i)) for i in range(1000)}, path)
    assert _declares(path)
    _same_as_torch(path)


def test_lists_keep_working(tmp_path: Path) -> None:
    path = tmp_path / "lists.pt"
    torch.save({"w": torch.ones(2), "history": [1, [2, 3], []], "one": [4]}, path)
    assert _declares(path)
    ckpt = ckptviz.read_checkpoint(path)
    assert ckpt.skipped == {"history": "list", "one": "list"}


# -- 3. every declaration is validated before it leaves the reader ----------------------------


@pytest.mark.parametrize(
    ("key", "shape", "dtype", "nbytes", "problem"),
    [
        (1, (2,), "float32", 8, "key of type int"),
        ("k", "(2,)", "float32", 8, "shape of type str"),
        ("k", [2], "float32", 8, "shape of type list"),
        ("k", (True,), "float32", 4, "not a tuple of non-negative"),
        ("k", (-1,), "float32", -4, "not a tuple of non-negative"),
        ("k", ("2",), "float32", 8, "not a tuple of non-negative"),
        ("k", (1,) * 65, "float32", 4, "65 dimensions"),
        ("k", (2**40, 2**40), "float32", 2**82, "more elements than torch can count"),
        ("k", (2,), "float33", 8, "not a torch dtype"),
        ("k", (2,), "<b>", 8, "not a torch dtype"),
        ("k", (2,), "float32", 9, "declares 9 bytes"),
    ],
)
def test_a_tensor_info_checks_itself(
    key: Any, shape: Any, dtype: Any, nbytes: Any, problem: str
) -> None:
    with pytest.raises(InvalidDeclaration, match=problem):
        TensorInfo(key, shape, dtype, nbytes)


def test_a_checkpoint_holds_each_tensor_under_its_own_key() -> None:
    with pytest.raises(CheckpointError, match=r"x\.pt: the entry 'a' does not describe"):
        checkpoint_module.Checkpoint(
            source="x.pt", format="torch", tensors={"a": TensorInfo("b", (1,), "float32", 4)}
        )
    # one read (whose table is known to be keyed right) copied with other tensors is checked
    read = ckptviz.read_checkpoint({"b": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"the entry 'a' does not describe"):
        dataclasses.replace(read, tensors={"a": read["b"]})


def test_a_file_declaring_an_impossible_tensor_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "deep.pt"
    torch.save({"deep": torch.zeros([1] * 65)}, path)
    with pytest.raises(CheckpointError, match=r"deep\.pt: tensor 'deep' has 65 dimensions"):
        ckptviz.read_checkpoint(path)


def test_live_tensors_beyond_torchs_kernels_are_refused_as_files_are() -> None:
    # torch makes a tensor of 65 dimensions; the trusted path for live tensors still refuses it
    with pytest.raises(CheckpointError, match=r"tensor 'deep' has 65 dimensions"):
        ckptviz.read_checkpoint({"deep": torch.zeros([1] * 65)})


def test_live_tensors_are_described_as_a_checked_declaration_would_be() -> None:
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    module[0].weight = torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.float16))
    live = ckptviz.read_checkpoint(module)
    for info in live.tensors.values():
        checked = TensorInfo(
            info.key, info.shape, info.dtype, info.nbytes, info.kind, info.module_type
        )
        assert info == checked and vars(info) == vars(checked)
    assert live.tensors["0.weight"].nbytes == 2 * 3 * 2
    assert live.tensors["1.num_batches_tracked"].nbytes == 8


def test_numpy_string_keys_become_plain_strings() -> None:
    ckpt = ckptviz.read_checkpoint({np.str_("w"): torch.ones(2)})
    (key,) = ckpt.keys()
    assert type(key) is str and key == "w"
    with ckpt.open() as data:
        assert data["w"].tolist() == [1.0, 1.0]


# -- 4. bounds ---------------------------------------------------------------------------------


def test_a_pickle_over_the_size_cap_is_refused_before_it_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "big_pickle.pt"
    torch.save({"w": torch.ones(2), "note": "x" * 5000}, path)
    monkeypatch.setattr(torch_zip, "MAX_PICKLE_BYTES", 4096)
    with pytest.raises(
        CheckpointError, match=r"big_pickle\.pt: its pickle \(data\.pkl\) is .* over 4,096 bytes"
    ):
        ckptviz.read_checkpoint(path)
    with pytest.raises(CheckpointError, match="over 4,096 bytes"):  # torch.load's path too
        ckptviz.read_checkpoint(path, allow_globals=["argparse.Namespace"])


def test_a_pickle_building_too_many_objects_is_refused_before_building(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch_zip, "MAX_PICKLE_NODES", 1000)
    path = tmp_path / "dicts.pt"
    # 5,000 empty dicts in a list: 5 KB of pickle, 5,000 objects
    pickle = state_dict(
        ("w", tensor(storage("0", 1), 0, (1,), (1,))), ("many", b"](" + b"}" * 5000 + b"e")
    )
    write_zip(path, pickle, {"0": floats(1)})
    with pytest.raises(
        CheckpointError, match=r"dicts\.pt: its pickle \(data\.pkl\) has over 1,000 container"
    ):
        ckptviz.read_checkpoint(path)


def test_copies_of_a_big_dict_are_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch_zip, "MAX_PICKLE_NODES", 1000)
    # one dict of 100 entries, then OrderedDict(it) 50 times: 40 opcodes build 5,000 entries
    big = b"}q\x01(" + b"".join(integer(i) + b"N" for i in range(100)) + b"u0"
    copies = b"ccollections\nOrderedDict\nq\x02" + b"0" + b"](" + b"h\x02h\x01\x85R" * 50 + b"e"
    pickle = (
        PROTO
        + big.replace(b"u0", b"u")
        + b"}"
        + text("w")
        + tensor(storage("0", 1), 0, (1,), (1,))
        + b"s"
        + text("copies")
        + copies.replace(b"q\x02" + b"0", b"q\x02")
        + b"s."
    )
    path = write_zip(tmp_path / "copies.pt", pickle, {"0": floats(1)})
    with pytest.raises(
        CheckpointError, match=r"copies\.pt: its pickle \(data\.pkl\) copies over 1,000"
    ):
        ckptviz.read_checkpoint(path)


def test_a_huge_memo_slot_goes_to_torch_load(tmp_path: Path) -> None:
    # LONG_BINPUT 0xFFFFFFF0: the C unpickler would allocate an array of 64 GiB for it
    pickle = state_dict(("w", tensor(storage("0", 1), 0, (1,), (1,)) + b"r\xf0\xff\xff\xff"))
    path = write_zip(tmp_path / "memo.pt", pickle, {"0": floats(1)})
    assert not _declares(path)
    _same_as_torch(path)


def test_the_default_bounds_leave_room_for_real_checkpoints(tmp_path: Path) -> None:
    path = tmp_path / "wide.pt"
    torch.save({f"layers.{i}.weight": torch.zeros(2, 2) for i in range(5000)}, path)
    with zipfile.ZipFile(path) as archive:
        pickle = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    building = len(pickle) - len(pickle.translate(None, torch_zip._BUILDING_OPCODES))
    # 500,000 tensors of this kind stay within both caps
    assert building * 100 < torch_zip.MAX_PICKLE_NODES
    assert len(pickle) * 100 < torch_zip.MAX_PICKLE_BYTES
    assert _declares(path)


def test_parameters_and_views_sharing_storage_are_read_fast(tmp_path: Path) -> None:
    base = torch.arange(24.0).reshape(4, 6)
    path = tmp_path / "views.pt"
    torch.save(
        {
            "p": torch.nn.Parameter(torch.randn(3)),
            "t": base.t(),
            "row": base[1],
            "col": base[:, 2],
            "expanded": torch.ones(3)[:1].expand(5),
            "b": torch.tensor([True, False]),
            "bf": torch.ones(2, dtype=torch.bfloat16),
            "c": torch.ones(2, dtype=torch.complex64),
            "meta": OrderedDict(),
        },
        path,
    )
    assert _declares(path)
    _same_as_torch(path)


def test_a_record_not_aligned_to_its_elements_is_read_without_a_crash(tmp_path: Path) -> None:
    # zipfile writes records wherever they fall; torch.save aligns them to 64 bytes. A complex128
    # read in place at an odd address crashed the process (torch.load(mmap=True) too)
    def odd_file(name: str, metadata: bytes = b"") -> Path:
        for pad in range(16):
            declared = storage("0", 2, "ComplexDoubleStorage")
            pickle = state_dict(
                ("pad", text("x" * pad)),
                ("z", tensor(declared, 0, (2,), (1,), metadata=metadata)),
            )
            values = struct.pack("<4d", 1.5, -2, 3, 4.25)
            path = write_zip(tmp_path / f"{name}{pad}.pt", pickle, {"0": values})
            with zipfile.ZipFile(path) as archive:
                record = archive.getinfo("archive/data/0")
            if (record.header_offset + 30 + len(record.filename) + len(record.extra)) % 16:
                return path
        raise AssertionError("every padding left the record aligned")

    fast = odd_file("fast")
    assert _declares(fast)
    _same_as_torch(fast)
    # conj bits send the file to torch.load(mmap=True), which maps it in place too
    deferred = odd_file("deferred", b"}" + text("conj") + b"\x88s")
    assert not _declares(deferred)
    _same_as_torch(deferred)
