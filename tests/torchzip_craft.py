"""Torch zip files built by hand, opcode by opcode, for tests of the fast ``.pt`` reader.

``torch.save`` writes a zip holding ``<folder>/data.pkl`` (a protocol-2 pickle naming each
storage by a persistent id), ``<folder>/data/<key>`` (each storage's raw bytes), ``byteorder``
and ``version``. These helpers write the same, or any variation of it, into ``tmp_path``.
"""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Iterable
from pathlib import Path

import torch

PROTO = b"\x80\x02"
REBUILD = b"ctorch._utils\n_rebuild_tensor_v2\n"
EMPTY_HOOKS = b"ccollections\nOrderedDict\n)R"


def text(value: str) -> bytes:
    """BINUNICODE."""
    raw = value.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def integer(n: int) -> bytes:
    """BININT1 or BININT."""
    return b"K" + bytes([n]) if 0 <= n < 256 else b"J" + struct.pack("<i", n)


def marked_tuple(*items: bytes) -> bytes:
    """MARK ... TUPLE."""
    return b"(" + b"".join(items) + b"t"


def storage(key: str, numel: int, kind: str = "FloatStorage") -> bytes:
    """BINPERSID of ("storage", torch.<kind>, key, "cpu", numel): a storage on the stack."""
    kind_global = b"ctorch\n" + kind.encode() + b"\n"
    return marked_tuple(text("storage"), kind_global, text(key), text("cpu"), integer(numel)) + b"Q"


def tensor(
    storage_ops: bytes,
    offset: int,
    size: Iterable[int],
    stride: Iterable[int],
    *,
    requires_grad: bytes = b"\x89",
    hooks: bytes = EMPTY_HOOKS,
    metadata: bytes = b"",
) -> bytes:
    """_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])."""
    size_ops = marked_tuple(*map(integer, size))
    stride_ops = marked_tuple(*map(integer, stride))
    args = storage_ops + integer(offset) + size_ops + stride_ops + requires_grad + hooks + metadata
    return REBUILD + b"(" + args + b"tR"


def state_dict(*entries: tuple[str, bytes]) -> bytes:
    """A whole data.pkl: a dict of the entries, each value given as opcodes."""
    body = b"".join(text(key) + value + b"s" for key, value in entries)
    return PROTO + b"}" + body + b"."


def floats(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def write_zip(
    path: Path,
    pickle: bytes,
    records: dict[str, bytes],
    *,
    folder: str = "archive",
    extra: Iterable[tuple[str, bytes]] = (),
    pickle_compression: int = zipfile.ZIP_STORED,
    record_compression: int = zipfile.ZIP_STORED,
) -> Path:
    """A torch zip file: data.pkl first (torch takes the folder of the first entry), then
    byteorder, every data record, version and any ``extra`` entries, in that order."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{folder}/data.pkl", pickle, compress_type=pickle_compression)
        archive.writestr(f"{folder}/byteorder", "little")
        for key, data in records.items():
            archive.writestr(f"{folder}/data/{key}", data, compress_type=record_compression)
        archive.writestr(f"{folder}/version", "3\n")
        for name, data in extra:
            archive.writestr(name, data)
    return path


def entries(path: Path) -> list[tuple[zipfile.ZipInfo, bytes]]:
    """Every entry of a zip file with its (inflated) bytes, in order."""
    with zipfile.ZipFile(path) as archive:
        return [(info, archive.read(info)) for info in archive.infolist()]


def rewrite_zip(path: Path, items: list[tuple[zipfile.ZipInfo, bytes]]) -> Path:
    """A zip of exactly ``items`` (CRCs and sizes recomputed), duplicates allowed."""
    import warnings

    with zipfile.ZipFile(path, "w") as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name": wanted here
        for info, data in items:
            fresh = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            fresh.compress_type = info.compress_type
            archive.writestr(fresh, data)
    return path


def torch_reads(path: Path) -> object:
    """What ``torch.load(weights_only=True)`` reads, on the CPU."""
    return torch.load(path, map_location="cpu", weights_only=True)
