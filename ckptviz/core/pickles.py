"""A look into a torch file's pickles before ``torch.load`` reads its data.

``torch.load(weights_only=True)`` refuses unsafe pickle globals, but for pre-1.6 files it names
only the first one, and it believes the storage sizes a pickle declares: the pre-1.6 format
allocates every storage at its declared size before reading it (a few bytes of pickle can ask for
terabytes), and a memory-mapped zip file lets a tensor run past its own record into whatever
bytes follow it (other tensors, the zip directory) without a word.

Here the pickle is read with torch's own weights-only unpickler, under the same allowed globals,
with every storage replaced by a data-less ``meta`` storage: that gives each tensor's declared
shape, dtype and extent, which are checked against the bytes the file really holds before
``torch.load`` runs. Nothing here reads or allocates tensor data.
"""

from __future__ import annotations

import importlib
import io
import mmap
import pickle
import pickletools
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import torch

from ckptviz.core.errors import CheckpointError

# torch's weights-only unpickler and its storage classes carry no type hints
_weights_only: Any = importlib.import_module("torch._weights_only_unpickler")
_UntypedStorage: Any = torch.UntypedStorage
_TypedStorage: Any = torch.storage.TypedStorage

#: Modules whose functions can run arbitrary code when a pickle calls them.
CODE_RUNNING_MODULES = frozenset(
    {
        "os",
        "posix",
        "nt",
        "sys",
        "subprocess",
        "builtins",
        "__builtin__",
        "shutil",
        "socket",
        "importlib",
        "runpy",
        "pickle",
        "_pickle",
        "marshal",
        "ctypes",
        "pty",
        "code",
        "codeop",
        "types",
        "operator",
        "functools",
        "webbrowser",
        "pydoc",
        "timeit",
    }
)
#: Single globals that look harmless but unpickle or execute without restriction.
CODE_RUNNING_GLOBALS = frozenset(
    {
        "torch.load",
        "torch.serialization.load",
        "torch.storage._load_from_bytes",
        "torch.jit.load",
        "numpy.load",
        "numpy.lib.npyio.load",
    }
)

# Bounds on the walk over an unpickled object: it is hostile input too.
_MAX_DEPTH = 8
_MAX_NODES = 1_000_000
# The size of every stand-in meta storage: big enough that torch's own bounds check never fires,
# so the extents are checked here, against the file, with the tensor's name in the message.
_UNBOUNDED = 2**62


def runs_code(name: str) -> bool:
    """A pickle global that can run arbitrary code: allowing it is the same as ``trusted=True``."""
    module = name.split(".", 1)[0]
    return module in CODE_RUNNING_MODULES or name in CODE_RUNNING_GLOBALS


def torch_allowed_globals() -> set[str]:
    """What ``torch.load(weights_only=True)`` accepts right now (defaults and allow-lists)."""
    return set(_weights_only._get_allowed_globals()) | set(
        _weights_only._get_user_allowed_globals()
    )


class _Bytes:
    """``read``/``readline`` over a file's bytes that will not read past its end.

    A length inside a pickle that the file cannot hold is damage (or an attack), not a reason to
    allocate that much: it is refused, naming the offset.
    """

    def __init__(self, data: bytes | mmap.mmap, path: Path) -> None:
        self._data = data
        self._path = path
        self._pos = 0

    def tell(self) -> int:
        return self._pos

    def read(self, n: int = -1) -> bytes:
        remaining = len(self._data) - self._pos
        if n < 0:
            n = remaining
        if n > remaining:
            if remaining == 0 and n == 1:
                return b""  # the end of the stream: the unpickler raises EOFError
            raise CheckpointError(
                f"{self._path}: its pickle asks for {n:,} bytes at offset {self._pos:,}, but "
                f"only {remaining:,} follow. The file is truncated or damaged; nothing was "
                "allocated or read. Re-save the checkpoint with torch.save."
            )
        chunk = bytes(self._data[self._pos : self._pos + n])
        self._pos += n
        return chunk

    def readline(self) -> bytes:
        end = self._data.find(b"\n", self._pos)
        end = len(self._data) if end < 0 else end + 1
        chunk = bytes(self._data[self._pos : end])
        self._pos = end
        return chunk


def pickle_globals(path: Path) -> list[str]:
    """Every global named by the pickles at the start of a pre-1.6 torch file or plain pickle.

    Read statically with ``pickletools``: nothing is imported or called. A pre-1.6 torch file is
    several pickles in a row, then raw storage bytes; the walk stops at the first thing that is
    not a pickle.
    """
    names: list[str] = []
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        stream = _Bytes(data, path)
        for _ in range(5):  # magic number, protocol, sys info, the object, the storage keys
            start = stream.tell()
            try:
                for opcode, arg, _ in pickletools.genops(cast(IO[bytes], stream)):
                    if opcode.name in ("GLOBAL", "INST") and isinstance(arg, str):
                        names.append(arg.replace(" ", "."))
            except Exception:
                break
            if stream.tell() == start:
                break
    return list(dict.fromkeys(names))


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: torch.dtype
    nbytes: int


class _NotAStoragePickle(Exception):
    """The pickle holds something this check does not model; ``torch.load`` has the last word."""


class _StorageRecorder:
    """``persistent_load`` that hands out data-less meta storages and notes what was declared."""

    def __init__(self) -> None:
        self.by_key: dict[str, tuple[Any, _Storage]] = {}
        self.by_storage: dict[int, _Storage] = {}

    def __call__(self, saved_id: Any) -> Any:
        if not isinstance(saved_id, tuple) or len(saved_id) < 5:
            raise _NotAStoragePickle
        typename = saved_id[0]
        if isinstance(typename, bytes):
            typename = typename.decode("ascii", "replace")
        storage_type, key, numel = saved_id[1], str(saved_id[2]), saved_id[4]
        if storage_type is torch.UntypedStorage:
            dtype: object = torch.uint8
        else:
            dtype = getattr(storage_type, "dtype", None)
        if typename != "storage" or not isinstance(dtype, torch.dtype):
            raise _NotAStoragePickle
        if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
            raise _NotAStoragePickle
        if key not in self.by_key:
            storage = _UntypedStorage(_UNBOUNDED, device="meta")
            declared = _Storage(key, dtype, numel * dtype.itemsize)
            self.by_key[key] = (storage, declared)
            self.by_storage[storage._cdata] = declared
        storage = self.by_key[key][0]
        return _TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)


def _unpickle(stream: _Bytes | io.BytesIO, recorder: _StorageRecorder | None = None) -> Any:
    unpickler = _weights_only.Unpickler(cast(IO[bytes], stream), encoding="utf-8")
    if recorder is not None:
        unpickler.persistent_load = recorder
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.load warns the user itself right after
        return unpickler.load()


def _tensors_in(obj: object) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a nested checkpoint object, with its path ("state_dict/fc.weight")."""
    stack: list[tuple[tuple[str, ...], object, int]] = [((), obj, 0)]
    visited = 0
    while stack and visited < _MAX_NODES:
        path, node, depth = stack.pop()
        visited += 1
        if isinstance(node, torch.Tensor):
            yield "/".join(path), node
        elif depth < _MAX_DEPTH and isinstance(node, Mapping):
            stack.extend(((*path, str(k)), v, depth + 1) for k, v in node.items())
        elif depth < _MAX_DEPTH and isinstance(node, (list, tuple)):
            stack.extend(((*path, str(i)), v, depth + 1) for i, v in enumerate(node))


def _extent(tensor: torch.Tensor) -> int:
    """Bytes of its storage a tensor reaches, from the start of the storage."""
    if tensor.numel() == 0:
        return 0
    last = tensor.storage_offset() + sum(
        (size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True)
    )
    return int(last + 1) * tensor.element_size()


def _describe(name: str, tensor: torch.Tensor) -> str:
    dtype = str(tensor.dtype).removeprefix("torch.")
    return f"tensor {name!r} ({list(tensor.shape)} {dtype})"


def check_zip_storages(path: Path) -> None:
    """Refuse a torch zip file in which a tensor reaches past the bytes of its storage record."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pickle_name = next(n for n in names if n.endswith("data.pkl"))
            prefix = pickle_name.removesuffix("data.pkl")
            sizes = {
                n.removeprefix(f"{prefix}data/"): archive.getinfo(n).file_size
                for n in names
                if n.startswith(f"{prefix}data/")
            }
            data = archive.read(pickle_name)
        recorder = _StorageRecorder()
        # data.pkl is already in memory: a short read cannot allocate, torch.load reads it too
        obj = _unpickle(io.BytesIO(data), recorder)
        tensors = list(_tensors_in(obj))
    except (pickle.UnpicklingError, CheckpointError):
        raise
    except Exception:
        return
    for name, tensor in tensors:
        declared = recorder.by_storage.get(tensor.untyped_storage()._cdata)
        if declared is None:
            continue
        have = sizes.get(declared.key)
        need = _extent(tensor)
        if have is None or need > have:
            held = "no data record" if have is None else f"only {have:,} bytes"
            raise CheckpointError(
                f"{path}: {_describe(name, tensor)} needs {need:,} bytes of storage "
                f"{declared.key!r}, but the file holds {held} for it. The file is damaged or "
                "was crafted; nothing was read from it. Re-save the checkpoint with torch.save."
            )


def check_legacy_storages(path: Path) -> None:
    """Refuse a pre-1.6 torch file whose pickle declares more storage than the file holds.

    torch reads this format eagerly and allocates each storage at the declared size first.
    """
    try:
        with (
            path.open("rb") as handle,
            mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data,
        ):
            stream = _Bytes(data, path)
            if _unpickle(stream) != torch.serialization.MAGIC_NUMBER:
                return  # not a torch file: torch.load says so
            if _unpickle(stream) != torch.serialization.PROTOCOL_VERSION:
                return
            _unpickle(stream)  # system info
            recorder = _StorageRecorder()
            obj = _unpickle(stream, recorder)
            _unpickle(stream)  # the storage keys
            data_bytes = len(data) - stream.tell()
        tensors = list(_tensors_in(obj))
    except (pickle.UnpicklingError, CheckpointError):
        raise
    except Exception:
        return
    declared = [d for _, d in recorder.by_key.values()]
    # each storage is written as an 8-byte element count followed by its bytes
    needed = sum(8 + d.nbytes for d in declared)
    for name, tensor in tensors:
        storage = recorder.by_storage.get(tensor.untyped_storage()._cdata)
        if storage is not None and _extent(tensor) > storage.nbytes:
            raise CheckpointError(
                f"{path}: {_describe(name, tensor)} reaches past the end of its storage "
                f"{storage.key!r} ({storage.nbytes:,} bytes). The file is damaged or was "
                "crafted; nothing was read from it. Re-save the checkpoint with torch.save."
            )
    if needed > data_bytes:
        largest = max(declared, key=lambda d: d.nbytes)
        users = [
            name
            for name, t in tensors
            if recorder.by_storage.get(t.untyped_storage()._cdata) == largest
        ]
        who = f" (the largest, {largest.nbytes:,} bytes, holds {', '.join(users[:3])})"
        raise CheckpointError(
            f"{path}: the file declares {needed:,} bytes of tensor data{who if users else ''}, "
            f"but only {data_bytes:,} bytes follow its pickle. The file is truncated, damaged "
            "or crafted; nothing was allocated or read. Re-save the checkpoint with torch.save."
        )
