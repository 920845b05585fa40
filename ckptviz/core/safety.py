"""What may be unpickled, and the words of every refusal.

``allow_globals`` entries are resolved here (``resolve_global``), allowed for one read
(``safe_globals_scope``), and a refused file is explained here (``unsafe_error``): which globals
it needs, and whether any of them can run code (``runs_code``), in which case allowing it is the
same as ``trusted=True`` and the error says so.

Before ``torch.load`` reads a file, its pickles are looked into: ``torch.load(weights_only=True)``
refuses unsafe pickle globals, but for pre-1.6 files it names only the first one, and it believes
the storage sizes a pickle declares: the pre-1.6 format allocates every storage at its declared
size before reading it (a few bytes of pickle can ask for terabytes), and a memory-mapped zip file
lets a tensor run past its own record into whatever bytes follow it (other tensors, the zip
directory) without a word.

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
import re
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import torch

from ckptviz.core._torch_private import (
    storage_identity,
    typed_storage,
    weights_only_allowed_globals,
    weights_only_unpickler,
)
from ckptviz.core.errors import CheckpointError, UnsafeCheckpointError

# torch's storage class carries no type hints for its meta-device constructor
_UntypedStorage: Any = torch.UntypedStorage

#: An ``allow_globals`` entry: a dotted name, or the object itself.
GlobalSpec = str | Callable[..., Any] | type

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
            self.by_storage[storage_identity(storage)] = declared
        storage = self.by_key[key][0]
        return typed_storage(storage, dtype)


def _unpickle(stream: _Bytes | io.BytesIO, recorder: _StorageRecorder | None = None) -> Any:
    unpickler = weights_only_unpickler(cast(IO[bytes], stream))
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
    for key, (_, stored) in recorder.by_key.items():
        # torch.load without mmap refuses this too; with mmap it would read past the record
        if key in sizes and sizes[key] != stored.nbytes:
            raise CheckpointError(
                f"{path}: storage {key!r} declares {stored.nbytes:,} bytes, but the file holds "
                f"{sizes[key]:,} bytes for it. The file is damaged or was crafted; nothing was "
                "read from it. Re-save the checkpoint with torch.save."
            )
    for name, tensor in tensors:
        declared = recorder.by_storage.get(storage_identity(tensor.untyped_storage()))
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
        storage = recorder.by_storage.get(storage_identity(tensor.untyped_storage()))
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
            if recorder.by_storage.get(storage_identity(t.untyped_storage())) == largest
        ]
        who = f" (the largest, {largest.nbytes:,} bytes, holds {', '.join(users[:3])})"
        raise CheckpointError(
            f"{path}: the file declares {needed:,} bytes of tensor data{who if users else ''}, "
            f"but only {data_bytes:,} bytes follow its pickle. The file is truncated, damaged "
            "or crafted; nothing was allocated or read. Re-save the checkpoint with torch.save."
        )


# -- allowed globals, and the refusal that lists what a file needs -------------------------------


def global_name(spec: GlobalSpec) -> str:
    """The dotted name of an ``allow_globals`` entry (checked to exist)."""
    return resolve_global(spec)[1]


def resolve_global(spec: GlobalSpec) -> tuple[Any, str]:
    if not isinstance(spec, str):
        name = f"{getattr(spec, '__module__', '?')}.{getattr(spec, '__qualname__', spec)}"
        return spec, name
    parts = spec.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            value: Any = importlib.import_module(module_name)
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                value = getattr(value, attr)
        except AttributeError:
            continue
        return value, spec
    raise CheckpointError(
        f"allow_globals: cannot find {spec!r}; give the full dotted name as the error listed it "
        "(e.g. 'argparse.Namespace'), or pass the object itself."
    )


#: torch refusals that are about globals (not damage)
GLOBALS_REFUSAL = re.compile(
    r"Unsupported global|allowlisted via|unrecognized function|GLOBAL \S+ whose"
)
# the names such a refusal mentions
_NAMED_IN_REFUSAL = re.compile(r"GLOBAL ([\w.]+)|<class '([\w.]+)'>")


def unsafe_globals(path: Path, message: str, allowed: Sequence[str]) -> list[str]:
    """Every global a refused file needs: read statically from the file, plus any torch named."""
    names: list[str] = []
    try:
        if zipfile.is_zipfile(path):
            names = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        else:
            permitted = weights_only_allowed_globals()
            names = [n for n in pickle_globals(path) if n not in permitted]
    except Exception:
        names = []  # the static read failed; torch's own message still names one
    for match in _NAMED_IN_REFUSAL.finditer(message):
        names.append(match.group(1) or match.group(2))
    return sorted(n for n in dict.fromkeys(names) if n not in allowed)


def unsafe_error(path: Path, exc: Exception, allowed: Sequence[str]) -> UnsafeCheckpointError:
    names = unsafe_globals(path, str(exc), allowed)
    code = [n for n in names if runs_code(n)]
    if code:
        return UnsafeCheckpointError(
            f"{path}: this file asks to call {', '.join(code)}, which can run any code on this "
            "machine. It was refused and nothing from it ran. Do not open it unless you made it "
            f"yourself: both allow_globals={code!r} and trusted=True would run that code.",
            names,
        )
    listed = ", ".join(names) if names else "(torch did not name them)"
    allow = repr([*allowed, *names]) if names else "['module.Name', ...]"
    needs = (
        "also needs pickle globals not in allow_globals"
        if allowed
        else ("needs pickle globals that are not allowed by default")
    )
    return UnsafeCheckpointError(
        f"{path}: this checkpoint {needs}: {listed}. Nothing from it was run. If you trust the "
        f"file, either allow exactly these for this read: ckptviz.read_checkpoint("
        f"{str(path)!r}, allow_globals={allow}), or unpickle it fully (this runs any code the "
        f"file contains): ckptviz.read_checkpoint({str(path)!r}, trusted=True).",
        names,
    )


def safe_globals_scope(allow: Sequence[GlobalSpec]) -> AbstractContextManager[Any]:
    if not allow:
        return nullcontext()
    resolved = [resolve_global(spec) for spec in allow]
    # torch's (object, name) form keeps the exact spelling in the file (numpy.core vs numpy._core)
    pairs: list[Any] = [(obj, name) for obj, name in resolved]
    return torch.serialization.safe_globals(pairs + _numpy_dtype_classes(resolved))


def _numpy_dtype_classes(resolved: Sequence[tuple[Any, str]]) -> list[Any]:
    """Allowing ``numpy.dtype`` allows its concrete classes (``numpy.dtypes.Float64DType``, ...).

    torch rebuilds a pickled dtype as an instance of one of them, and the file never names them,
    so an allow-list copied from the error would otherwise fail on them one by one.
    """
    numpy = sys.modules.get("numpy")
    if numpy is None or not any(obj is numpy.dtype for obj, _ in resolved):
        return []
    dtypes = getattr(numpy, "dtypes", None)
    return [getattr(dtypes, name) for name in getattr(dtypes, "__all__", ())]
