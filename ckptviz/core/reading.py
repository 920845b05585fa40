"""Reading: a checkpoint's tensor metadata, without its data, from any source.

Sources are torch zip files (any extension), legacy torch pickles, ``.safetensors`` files,
in-memory (nested) state dicts and ``nn.Module`` objects. File formats are found by content, in
``FORMATS``: a new format (sharded indexes, distributed checkpoint directories) is one more entry.

Tensor data is only fetched through ``Checkpoint.open()``, one tensor at a time, after checking
that the file is still the one that was read.
"""

from __future__ import annotations

import gc
import importlib
import io
import os
import pickle
import re
import struct
import sys
import tarfile
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ckptviz.core.errors import CheckpointError, UnsafeCheckpointError
from ckptviz.core.pickles import (
    check_legacy_storages,
    check_zip_storages,
    pickle_globals,
    runs_code,
    torch_allowed_globals,
)
from ckptviz.core.text import visible

#: Where checkpoints commonly keep their weights, most specific first.
STATE_DICT_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "net",
    "network",
    "model_ema",
    "state_dict_ema",
    "ema",
    "ema_state_dict",
    "params",
    "weights",
)

GlobalSpec = str | Callable[..., Any] | type


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``: the spelling used in tables and JSON."""
    return str(dtype).removeprefix("torch.")


class _DtypeNames(dict[torch.dtype, str]):
    """dtype -> name, remembered: reading a large checkpoint asks for a few dtypes many times."""

    def __missing__(self, dtype: torch.dtype) -> str:
        self[dtype] = name = dtype_name(dtype)
        return name


_dtype_names = _DtypeNames()


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"unknown dtype {name!r}: expected a torch dtype name like 'float32'")
    return dtype


_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "C64": "complex64",
}


@dataclass(frozen=True)
class TensorInfo:
    """What is known about one checkpoint tensor without reading its data."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    #: for tensors read from a live module: "parameter" or "buffer", and the owning module's class
    kind: str | None = None
    module_type: str | None = None

    @property
    def numel(self) -> int:
        n = 1
        for size in self.shape:
            n *= size
        return n


@dataclass(frozen=True)
class FileFingerprint:
    """Size, modification time and inode: enough to notice a file replaced since it was read.

    The inode catches a same-size file moved into place (``os.replace``) within one tick of the
    file system's clock, which the modification time alone can miss.
    """

    size: int
    mtime_ns: int
    inode: int = 0

    @classmethod
    def of(cls, path: Path) -> FileFingerprint:
        stat = path.stat()
        return cls(stat.st_size, stat.st_mtime_ns, stat.st_ino)


class TensorSource(Mapping[str, torch.Tensor]):
    """An open checkpoint: ``source[key]`` fetches one tensor's data (CPU, possibly mmap-backed).

    ``get_many(keys)`` fetches several at once: formats that read faster in one go (a DCP
    directory loads them in one pass) give ``fetch_many``; others fetch one key at a time.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        fetch: Callable[[str], torch.Tensor],
        fetch_many: Callable[[list[str]], dict[str, torch.Tensor]] | None = None,
    ) -> None:
        self._checkpoint = checkpoint
        self._fetch = fetch
        self._fetch_many = fetch_many

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._checkpoint.tensors:
            raise KeyError(key)
        return self._as_read(key, self._guarded(key, self._fetch, key))

    def get_many(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """key -> tensor for every key, each checked like ``source[key]``."""
        wanted = list(dict.fromkeys(keys))
        for key in wanted:
            if key not in self._checkpoint.tensors:
                raise KeyError(key)
        if self._fetch_many is None or not wanted:
            return {key: self[key] for key in wanted}
        fetched = self._guarded(", ".join(wanted[:3]), self._fetch_many, wanted)
        return {key: self._as_read(key, fetched[key]) for key in wanted}

    def _guarded(self, what: str, fetch: Callable[[Any], Any], arg: Any) -> Any:
        try:
            return fetch(arg)
        except (CheckpointError, KeyError):
            raise
        except Exception as exc:
            raise CheckpointError(
                f"{self._checkpoint.source}: could not read the data of {what!r}: {exc}. "
                "The file may be truncated or damaged; re-save it or pick another copy."
            ) from exc

    def _as_read(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` if it has data and still the shape and dtype read from the metadata."""
        info = self._checkpoint.tensors[key]
        if tensor.device.type == "meta":
            raise CheckpointError(
                f"{self._checkpoint.source}: {key!r} is on the meta device in the checkpoint: it "
                "was saved without data, so there is nothing to copy from it. Keep that row, or "
                "save the checkpoint again from a model with real weights."
            )
        if tuple(tensor.shape) != info.shape or dtype_name(tensor.dtype) != info.dtype:
            raise CheckpointError(
                f"{self._checkpoint.source}: {key!r} is now {list(tensor.shape)} "
                f"{dtype_name(tensor.dtype)}, but was {list(info.shape)} {info.dtype} when read. "
                "The checkpoint changed; compare again."
            )
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._checkpoint.tensors)

    def __len__(self) -> int:
        return len(self._checkpoint.tensors)


@dataclass(eq=False)
class Checkpoint:
    """A checkpoint's tensors as metadata; ``open()`` fetches data only when asked.

    ``location`` is where the state dict sits inside a nested checkpoint (``("state_dict",)``
    for Lightning), ``candidates`` the other places that also looked like one, ``skipped`` the
    entries that are not tensors (key -> what they are) and ``ties`` the groups of keys that
    share one storage.
    """

    source: str
    format: str
    tensors: dict[str, TensorInfo]
    path: Path | None = None
    location: tuple[str, ...] = ()
    candidates: list[tuple[str, ...]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    ties: list[tuple[str, ...]] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    fingerprint: FileFingerprint | None = None
    trusted: bool = False
    allow_globals: tuple[str, ...] = ()
    _opener: Callable[[Checkpoint], AbstractContextManager[TensorSource]] | None = field(
        default=None, repr=False
    )

    # -- mapping-like access to the metadata --------------------------------------------------
    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __contains__(self, key: object) -> bool:
        return key in self.tensors

    def __getitem__(self, key: str) -> TensorInfo:
        try:
            return self.tensors[key]
        except KeyError:
            raise KeyError(f"{self.source} has no tensor {key!r}") from None

    def keys(self) -> list[str]:
        return list(self.tensors)

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    @property
    def total_numel(self) -> int:
        return sum(info.numel for info in self.tensors.values())

    @property
    def location_text(self) -> str:
        return "/".join(self.location) if self.location else "(top level)"

    def summary(self) -> str:
        """A few lines: where the tensors came from and what was passed over."""
        lines = [
            f"{visible(self.source)} ({visible(self.format)}): {len(self.tensors)} tensors, "
            f"{self.total_numel:,} values, {human_bytes(self.total_bytes)}"
        ]
        if self.location:
            lines.append(f"state dict found at '{visible(self.location_text)}'")
        if self.candidates:
            others = ", ".join(visible("/".join(c)) or "(top level)" for c in self.candidates)
            lines.append(f"other candidates (pick one with key=...): {others}")
        if self.skipped:
            shown = ", ".join(
                f"{visible(k)} ({visible(v)})" for k, v in list(self.skipped.items())[:5]
            )
            more = f" and {len(self.skipped) - 5} more" if len(self.skipped) > 5 else ""
            lines.append(f"not tensors, passed over: {shown}{more}")
        if self.ties:
            tied = "; ".join(" = ".join(visible(k) for k in t) for t in self.ties)
            lines.append(f"tied (shared storage): {tied}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<Checkpoint {self.summary().splitlines()[0]}>"

    # -- data ----------------------------------------------------------------------------------
    def open(self) -> AbstractContextManager[TensorSource]:
        """Open the checkpoint for reading tensor data, checking it did not change on disk."""
        if self._opener is None:
            raise CheckpointError(
                f"{self.source}: this checkpoint was rebuilt from metadata only and has no data; "
                "read it again with ckptviz.read_checkpoint(path)."
            )
        if self.path is not None and self.fingerprint is not None:
            self.check_unchanged()
        return self._opener(self)

    def check_unchanged(self) -> None:
        """Raise if the file was replaced, truncated or deleted since it was read."""
        if self.path is None or self.fingerprint is None:
            return
        try:
            now = FileFingerprint.of(self.path)
        except OSError as exc:
            raise CheckpointError(
                f"{self.path}: the checkpoint is gone since it was read ({exc.strerror}); "
                "restore the file or compare against another one."
            ) from exc
        if now != self.fingerprint:
            raise CheckpointError(
                f"{self.path}: the file changed since it was read (size {self.fingerprint.size} "
                f"-> {now.size} bytes); compare again before applying."
            )


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


# -- finding the state dict inside a nested checkpoint ------------------------------------------


def _tensor_count(obj: Mapping[Any, Any]) -> int:
    return sum(isinstance(v, (torch.Tensor, _DeclaredTensor)) for v in obj.values())


def _looks_like_state_dict(obj: object, loose: bool = False) -> bool:
    if not isinstance(obj, Mapping) or not obj:
        return False
    tensors = _tensor_count(obj)
    return tensors > 0 and (loose or tensors * 2 >= len(obj))


def _find_candidates(
    obj: Mapping[Any, Any], depth: int = 3, loose: bool = False
) -> list[tuple[str, ...]]:
    """Paths to every nested mapping that looks like a state dict, breadth first.

    ``loose`` takes any mapping holding a tensor: the fallback for a state dict whose entries
    are mostly not tensors (an epoch counter, args, a history list next to a few weights).
    """
    found: list[tuple[str, ...]] = []
    frontier: list[tuple[tuple[str, ...], Mapping[Any, Any]]] = [((), obj)]
    for _ in range(depth + 1):
        next_frontier = []
        for path, node in frontier:
            if _looks_like_state_dict(node, loose):
                found.append(path)
                continue
            for name, value in node.items():
                if isinstance(name, str) and isinstance(value, Mapping):
                    next_frontier.append(((*path, name), value))
        frontier = next_frontier
    return found


def _rank(path: tuple[str, ...]) -> tuple[int, int]:
    """Known state-dict names first, shallower first."""
    scores = [STATE_DICT_KEYS.index(p) for p in path if p in STATE_DICT_KEYS]
    return (min(scores) if scores else len(STATE_DICT_KEYS), len(path))


def _parse_key(key: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if key is None:
        return None
    if isinstance(key, str):
        return tuple(part for part in key.split("/") if part)
    return tuple(key)


def _locate(
    obj: object, source: str, key: tuple[str, ...] | None
) -> tuple[Mapping[Any, Any], tuple[str, ...], list[tuple[str, ...]]]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{source}: expected a state dict (a dict of tensors) or a dict holding one, "
            f"found {type(obj).__name__}. If this is a whole pickled model, load it yourself "
            "and pass model.state_dict()."
        )
    if key is not None:
        node: object = obj
        for i, part in enumerate(key):
            if not isinstance(node, Mapping) or part not in node:
                where = "/".join(key[:i]) or "the top level"
                have = ", ".join(repr(k) for k in node) if isinstance(node, Mapping) else "-"
                raise CheckpointError(
                    f"{source}: no entry {part!r} at {where}; it has: {have}. "
                    "Pass key= as a path like 'state_dict' or 'ema/module'."
                )
            node = node[part]
        if not isinstance(node, Mapping):
            raise CheckpointError(
                f"{source}: the entry {'/'.join(key)!r} is a {type(node).__name__}, not a dict "
                "of tensors; pick another key=."
            )
        others = [c for c in _find_candidates(obj) if c != key]
        return node, key, others
    candidates = sorted(_find_candidates(obj), key=_rank)
    if not candidates:
        candidates = sorted(_find_candidates(obj, loose=True), key=_rank)
    if not candidates:
        entries = ", ".join(f"{k!r} ({type(v).__name__})" for k, v in list(obj.items())[:12])
        raise CheckpointError(
            f"{source}: found no dict of tensors in this checkpoint. Top-level entries: "
            f"{entries or 'none'}. Pass key='...' if the weights are stored under another name."
        )
    chosen = candidates[0]
    return _navigate(obj, chosen), chosen, candidates[1:]


def _tensor_table(
    state: Mapping[Any, Any],
    described: Mapping[str, tuple[str, str | None]] | None = None,
) -> tuple[dict[str, TensorInfo], dict[str, str], list[tuple[str, ...]]]:
    """Metadata of every tensor in ``state``; ``described`` gives a live module's tensors
    their kind and owning module's type (key -> (kind, module type))."""
    tensors: dict[str, TensorInfo] = {}
    skipped: dict[str, str] = {}
    by_storage: dict[tuple[object, int, tuple[int, ...], tuple[int, ...]], list[str]] = {}
    for name, value in state.items():
        if not isinstance(name, str):
            skipped[repr(name)] = f"key of type {type(name).__name__}, not a string"
            continue
        if isinstance(value, _DeclaredTensor):
            tensors[name] = TensorInfo(name, value.shape, value.storage.dtype, value.nbytes)
            if value.numel:
                declared = (value.storage.key, value.offset, value.shape, value.stride)
                by_storage.setdefault(declared, []).append(name)
            continue
        if not isinstance(value, torch.Tensor):
            what = type(value).__name__
            if isinstance(value, Mapping):
                what = f"nested dict with {_tensor_count(value)} tensors"
            skipped[name] = what
            continue
        shape = tuple(value.shape)
        kind, module_type = described.get(name, (None, None)) if described else (None, None)
        nbytes = value.numel() * value.element_size()
        dtype = _dtype_names[value.dtype]
        tensors[name] = TensorInfo(name, shape, dtype, nbytes, kind, module_type)
        if value.is_meta:  # no storage to compare: tied meta tensors are one object
            by_storage.setdefault((id(value), -1, shape, ()), []).append(name)
        elif value.numel() > 0:
            storage = value.untyped_storage()
            ident = (storage.data_ptr(), int(value.storage_offset()), shape, tuple(value.stride()))
            by_storage.setdefault(ident, []).append(name)
    ties = [tuple(keys) for keys in by_storage.values() if len(keys) > 1]
    return tensors, skipped, ties


# -- safety: pickle globals ----------------------------------------------------------------------


def global_name(spec: GlobalSpec) -> str:
    """The dotted name of an ``allow_globals`` entry (checked to exist)."""
    return _resolve_global(spec)[1]


def _resolve_global(spec: GlobalSpec) -> tuple[Any, str]:
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


# torch refusals that are about globals (not damage), and the names such a refusal mentions
_GLOBALS_REFUSAL = re.compile(
    r"Unsupported global|allowlisted via|unrecognized function|GLOBAL \S+ whose"
)
_NAMED_IN_REFUSAL = re.compile(r"GLOBAL ([\w.]+)|<class '([\w.]+)'>")


def _unsafe_globals(path: Path, message: str, allowed: Sequence[str]) -> list[str]:
    """Every global a refused file needs: read statically from the file, plus any torch named."""
    names: list[str] = []
    try:
        if zipfile.is_zipfile(path):
            names = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        else:
            permitted = torch_allowed_globals()
            names = [n for n in pickle_globals(path) if n not in permitted]
    except Exception:
        names = []  # the static read failed; torch's own message still names one
    for match in _NAMED_IN_REFUSAL.finditer(message):
        names.append(match.group(1) or match.group(2))
    return sorted(n for n in dict.fromkeys(names) if n not in allowed)


def _unsafe_error(path: Path, exc: Exception, allowed: Sequence[str]) -> UnsafeCheckpointError:
    names = _unsafe_globals(path, str(exc), allowed)
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


def _safe_globals_scope(allow: Sequence[GlobalSpec]) -> AbstractContextManager[Any]:
    if not allow:
        return nullcontext()
    resolved = [_resolve_global(spec) for spec in allow]
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


# -- torch zip files: tensor metadata from the pickle alone ------------------------------------

#: The storage classes torch.save names for plain tensors, and their dtypes.
_STORAGE_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
}


_ITEMSIZES = {name: dtype_from_name(name).itemsize for name in _STORAGE_DTYPES.values()}


class _NotPlain(Exception):
    """The pickle holds more than plain tensors in dicts: ``torch.load`` must read it."""


@dataclass(frozen=True)
class _StorageKind:
    dtype: str


class _DeclaredStorage:
    __slots__ = ("dtype", "key", "numel")

    def __init__(self, key: str, dtype: str, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel


class _DeclaredTensor:
    """A tensor as a torch zip file's pickle declares it: which storage, where, what shape."""

    __slots__ = ("nbytes", "numel", "offset", "shape", "storage", "stride")

    def __init__(
        self,
        storage: _DeclaredStorage,
        offset: int,
        shape: tuple[int, ...],
        stride: tuple[int, ...],
    ) -> None:
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride
        numel, last = 1, offset
        for size, step in zip(shape, stride, strict=True):
            numel *= size
            last += (size - 1) * step
        self.numel = numel
        self.nbytes = numel * _ITEMSIZES[storage.dtype]
        inside = last < storage.numel if numel else offset <= storage.numel
        if offset < 0 or min(shape + stride, default=0) < 0 or not inside:
            raise _NotPlain("a tensor beyond its storage")


class _DeclarationUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` with tensors as declarations: no data is read and no function of
    torch runs. Only the globals torch.save writes for plain tensors in dicts are known, each
    standing for a function of this class; any other global stops it (``_NotPlain``)."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.storages: dict[str, _DeclaredStorage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return self._parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageKind(_STORAGE_DTYPES[name])
        raise _NotPlain(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if not (
            type(pid) is tuple
            and len(pid) == 5
            and pid[0] == "storage"
            and type(pid[1]) is _StorageKind
            and type(pid[2]) is str
            and type(pid[4]) is int
        ):
            raise _NotPlain("an unusual storage")
        kind, key, numel = pid[1], pid[2], pid[4]
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = _DeclaredStorage(key, kind.dtype, numel)
        elif (storage.dtype, storage.numel) != (kind.dtype, numel):
            raise _NotPlain("one storage declared two ways")
        return storage

    def _tensor(
        self,
        storage: Any,
        offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any,
        backward_hooks: Any,
        metadata: Any = None,
    ) -> _DeclaredTensor:
        if not (type(storage) is _DeclaredStorage and type(offset) is int):
            raise _NotPlain("an unusual tensor")
        shape, strides = tuple(size), tuple(stride)
        for n in shape + strides:
            if type(n) is not int:
                raise _NotPlain("an unusual tensor")
        return _DeclaredTensor(storage, offset, shape, strides)

    def _parameter(self, data: Any, requires_grad: Any, backward_hooks: Any) -> _DeclaredTensor:
        if type(data) is not _DeclaredTensor:
            raise _NotPlain("an unusual parameter")
        return data


@contextmanager
def gc_paused() -> Iterator[None]:
    """Building many small objects sets off full garbage collections that walk every object
    torch keeps alive; none of them can free anything here."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _declared_object(archive: zipfile.ZipFile) -> tuple[object, dict[str, zipfile.ZipInfo]] | None:
    """A torch zip file's saved object with each tensor as its declaration, or ``None`` when
    the file holds anything else or declares a tensor beyond the bytes its record holds: then
    ``torch.load`` reads it, with its own checks and errors.

    This is what makes reading metadata cheap: ``torch.load(weights_only=True)`` unpickles in
    Python and builds a tensor per entry, here the C unpickler builds small records.
    """
    names = {info.filename: info for info in archive.infolist()}
    pickles = [name for name in names if name.rpartition("/")[2] == "data.pkl"]
    if len(pickles) != 1 or names[pickles[0]].compress_type != zipfile.ZIP_STORED:
        return None
    prefix = pickles[0][: -len("data.pkl")]
    byteorder = names.get(f"{prefix}byteorder")
    try:
        if byteorder is not None and archive.read(byteorder) != sys.byteorder.encode():
            return None  # torch.load swaps the bytes
        unpickler = _DeclarationUnpickler(archive.read(pickles[0]))
        with gc_paused():
            obj: object = unpickler.load()
    except Exception:  # _NotPlain, or anything odd: torch.load decides what it is
        return None
    records = {}
    for storage in unpickler.storages.values():
        record = names.get(f"{prefix}data/{storage.key}")
        if record is None or record.file_size < storage.numel * _ITEMSIZES[storage.dtype]:
            return None
        records[storage.key] = record
    return obj, records


def _declared_opener(
    path: Path, obj: object, records: dict[str, zipfile.ZipInfo]
) -> Callable[[Checkpoint], AbstractContextManager[TensorSource]]:
    """Tensor data for a file read by ``_declared_object``: one private mapping of the file,
    each tensor a view of its record's bytes, as ``torch.load(mmap=True)`` builds them, without
    unpickling the file again."""

    @contextmanager
    def opener(ckpt: Checkpoint) -> Iterator[TensorSource]:
        state: Mapping[str, Any] = _navigate(obj, ckpt.location)  # of _DeclaredTensor
        size = path.stat().st_size
        mapped = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
        storages: dict[str, torch.UntypedStorage] = {}
        with path.open("rb") as stream:

            def fetch(key: str) -> torch.Tensor:
                declared = state[key]
                if not isinstance(declared, _DeclaredTensor):
                    raise KeyError(key)
                storage = declared.storage
                data = storages.get(storage.key)
                if data is None:
                    record = records[storage.key]
                    stream.seek(record.header_offset)
                    local = stream.read(30)
                    if len(local) < 30 or local[:4] != b"PK\x03\x04":
                        raise CheckpointError(
                            f"{path}: the zip entry of {key!r} is damaged; re-save the file."
                        )
                    name_length, extra_length = struct.unpack("<HH", local[26:30])
                    start = record.header_offset + 30 + name_length + extra_length
                    end = start + storage.numel * _ITEMSIZES[storage.dtype]
                    if end > size:
                        raise CheckpointError(
                            f"{path}: the data of {key!r} runs past the end of the file; the "
                            "file is truncated or damaged. Re-save it with torch.save."
                        )
                    data = storages[storage.key] = mapped[start:end]
                tensor = torch.empty(0, dtype=dtype_from_name(storage.dtype))
                return tensor.set_(data, declared.offset, declared.shape, declared.stride)

            yield TensorSource(ckpt, fetch)

    return opener


# -- file formats --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileFormat:
    """One way to read checkpoints from disk: ``detect`` sees the path and its first bytes."""

    name: str
    detect: Callable[[Path, bytes], bool]
    read: Callable[..., Checkpoint]


def _is_safetensors(path: Path, head: bytes) -> bool:
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and header_len > 1


def _is_torch_zip(path: Path, head: bytes) -> bool:
    return head.startswith(b"PK\x03\x04")


def _is_legacy_pickle(path: Path, head: bytes) -> bool:
    return head[:1] == b"\x80"


def _load_torch(
    path: Path,
    *,
    trusted: bool,
    allow: Sequence[GlobalSpec],
    mmap: bool,
    check_sizes: bool = False,
) -> object:
    allowed = [_resolve_global(spec)[1] for spec in allow]
    with _safe_globals_scope(allow):
        try:
            if check_sizes and not trusted:
                # before torch.load, which believes the sizes the pickle declares
                (check_zip_storages if mmap else check_legacy_storages)(path)
            return torch.load(path, map_location="cpu", weights_only=not trusted, mmap=mmap)
        except CheckpointError:
            raise
        except pickle.UnpicklingError as exc:
            message = str(exc)
            if not trusted and (
                _GLOBALS_REFUSAL.search(message) or _unsafe_globals(path, message, allowed)
            ):
                raise _unsafe_error(path, exc, allowed) from None
            raise CheckpointError(
                f"{path}: not a checkpoint I can read safely ({_torch_reason(exc)}). "
                "Expected a file written by torch.save or safetensors; re-save it with one."
            ) from None
        except Exception as exc:
            raise CheckpointError(
                f"{path}: the file looks like a torch checkpoint but cannot be read "
                f"({_torch_reason(exc)}). It may be truncated or damaged; re-save it with "
                "torch.save."
            ) from None


def _torch_reason(exc: BaseException) -> str:
    """torch's reason for a refusal, without its advice to retry with weights_only=False."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _checkpoint_from_object(
    obj: object,
    *,
    source: str,
    fmt: str,
    key: tuple[str, ...] | None,
    path: Path | None = None,
    opener: Callable[[Checkpoint], AbstractContextManager[TensorSource]] | None = None,
    described: Mapping[str, tuple[str, str | None]] | None = None,
    **extra: Any,
) -> Checkpoint:
    state, location, candidates = _locate(obj, source, key)
    tensors, skipped, ties = _tensor_table(state, described)
    if not tensors:
        raise CheckpointError(
            f"{source}: the entry at {'/'.join(location) or 'the top level'} holds no tensors "
            f"(found {', '.join(skipped.values()) or 'nothing'}); pick another key=."
        )
    return Checkpoint(
        source=source,
        format=fmt,
        tensors=tensors,
        path=path,
        location=location,
        candidates=candidates,
        skipped=skipped,
        ties=ties,
        fingerprint=FileFingerprint.of(path) if path is not None else None,
        _opener=opener,
        **extra,
    )


def _navigate(obj: object, location: tuple[str, ...]) -> Mapping[str, torch.Tensor]:
    for part in location:
        obj = obj[part]  # type: ignore[index]
    assert isinstance(obj, Mapping)
    return obj


def _torch_opener(
    path: Path, *, mmap: bool
) -> Callable[[Checkpoint], AbstractContextManager[TensorSource]]:
    @contextmanager
    def opener(ckpt: Checkpoint) -> Iterator[TensorSource]:
        loaded = _load_torch(path, trusted=ckpt.trusted, allow=ckpt.allow_globals, mmap=mmap)
        state = _navigate(loaded, ckpt.location)
        yield TensorSource(ckpt, state.__getitem__)

    return opener


def _read_torch_file(
    path: Path,
    *,
    key: tuple[str, ...] | None,
    trusted: bool,
    allow: Sequence[GlobalSpec],
    mmap: bool,
) -> Checkpoint:
    obj = _load_torch(path, trusted=trusted, allow=allow, mmap=mmap, check_sizes=True)
    allow_names = tuple(_resolve_global(a)[1] for a in allow)
    return _checkpoint_from_object(
        obj,
        source=str(path),
        fmt="torch" if mmap else "torch-legacy",
        key=key,
        path=path,
        opener=_torch_opener(path, mmap=mmap),
        trusted=trusted,
        allow_globals=allow_names,
    )


def _read_torch_zip(
    path: Path, *, key: tuple[str, ...] | None, trusted: bool, allow: Sequence[GlobalSpec]
) -> Checkpoint:
    try:
        archive = zipfile.ZipFile(path)
    except Exception as exc:  # zipfile raises more than BadZipFile on damaged directories
        raise CheckpointError(
            f"{path}: starts like a zip file but cannot be opened as one ({_first_line(exc)}); "
            "it may be truncated. Re-save it with torch.save."
        ) from None
    with archive:
        names = archive.namelist()
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            raise CheckpointError(
                f"{path}: this is a TorchScript archive (torch.jit.save), not a checkpoint. "
                "Load it with torch.jit.load(path) and pass its .state_dict() to ckptviz."
            )
        if not any(n.endswith("data.pkl") for n in names):
            raise CheckpointError(
                f"{path}: a zip file, but not one written by torch.save (no data.pkl inside). "
                "Expected a torch checkpoint or a .safetensors file."
            )
        declared = None if trusted or allow else _declared_object(archive)
    if declared is not None:
        obj, records = declared
        return _checkpoint_from_object(
            obj,
            source=str(path),
            fmt="torch",
            key=key,
            path=path,
            opener=_declared_opener(path, obj, records),
        )
    return _read_torch_file(path, key=key, trusted=trusted, allow=allow, mmap=True)


def _read_legacy(
    path: Path, *, key: tuple[str, ...] | None, trusted: bool, allow: Sequence[GlobalSpec]
) -> Checkpoint:
    # The pre-1.6 format cannot be memory-mapped: torch reads its data eagerly.
    return _read_torch_file(path, key=key, trusted=trusted, allow=allow, mmap=False)


def _read_safetensors(
    path: Path, *, key: tuple[str, ...] | None, trusted: bool, allow: Sequence[GlobalSpec]
) -> Checkpoint:
    from safetensors import SafetensorError, safe_open

    if key:
        raise CheckpointError(
            f"{path}: a .safetensors file is one flat dict of tensors; key={'/'.join(key)!r} "
            "does not apply. Drop key=."
        )
    tensors: dict[str, TensorInfo] = {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a Mapping
                view = handle.get_slice(name)
                shape = tuple(int(s) for s in view.get_shape())
                dtype = _SAFETENSORS_DTYPES.get(view.get_dtype())
                if dtype is None:
                    raise CheckpointError(
                        f"{path}: tensor {name!r} has dtype {view.get_dtype()!r}, which torch "
                        "cannot hold; convert the file or drop that tensor."
                    )
                n = 1
                for s in shape:
                    n *= s
                tensors[name] = TensorInfo(name, shape, dtype, n * dtype_from_name(dtype).itemsize)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(
            f"{path}: not a valid .safetensors file ({_first_line(exc)}). "
            "It may be truncated or damaged; re-save it with safetensors.torch.save_file."
        ) from None

    @contextmanager
    def opener(ckpt: Checkpoint) -> Iterator[TensorSource]:
        try:
            with safe_open(str(path), framework="pt") as handle:
                yield TensorSource(ckpt, handle.get_tensor)
        except SafetensorError as exc:
            raise CheckpointError(f"{path}: cannot read tensor data ({exc}).") from None

    return Checkpoint(
        source=str(path),
        format="safetensors",
        tensors=tensors,
        path=path,
        metadata=metadata,
        fingerprint=FileFingerprint.of(path),
        _opener=opener,
    )


#: ckptviz/core/__init__.py puts the directory formats (dcp, sharded) in front of these.
FORMATS: list[FileFormat] = [
    FileFormat("safetensors", _is_safetensors, _read_safetensors),
    FileFormat("torch", _is_torch_zip, _read_torch_zip),
    FileFormat("torch-legacy", _is_legacy_pickle, _read_legacy),
]


def _read_path(
    path: Path, *, key: tuple[str, ...] | None, trusted: bool, allow: Sequence[GlobalSpec]
) -> Checkpoint:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file. Check the path (cwd is {os.getcwd()}).")
    head = b""
    if path.is_file():
        try:
            with path.open("rb") as stream:
                head = stream.read(16)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot open it ({exc.strerror}).") from None
        if not head:
            raise CheckpointError(
                f"{path}: the file is empty; expected a torch or safetensors "
                "checkpoint. Was the save interrupted?"
            )
    for fmt in FORMATS:
        if fmt.detect(path, head):
            return fmt.read(path, key=key, trusted=trusted, allow=allow)
    if path.is_dir():
        raise CheckpointError(
            f"{path}: is a directory, but holds neither a Hugging Face sharded checkpoint "
            "(*.index.json and its shards) nor a torch.distributed.checkpoint (.metadata and "
            "*.distcp). For a checkpoint file (.pt, .pth, .bin, .ckpt or .safetensors), pass "
            "the file inside it."
        )
    if path.is_file() and tarfile.is_tarfile(path):
        raise CheckpointError(
            f"{path}: a tar archive (the pre-2018 torch.save format); not a checkpoint I can "
            "read safely. Load it with an old torch and re-save it with torch.save."
        )
    raise CheckpointError(
        f"{path}: not a checkpoint I can read safely (it starts with {head[:8]!r}). Expected a "
        "file written by torch.save (zip) or safetensors; if it was one, it is truncated or "
        "damaged: re-save it or use another copy."
    )


def read_checkpoint(
    source: str | os.PathLike[str] | Mapping[Any, Any] | torch.nn.Module | Checkpoint,
    *,
    key: str | Sequence[str] | None = None,
    trusted: bool = False,
    allow_globals: Sequence[GlobalSpec] = (),
) -> Checkpoint:
    """Read a checkpoint's tensor metadata: names, shapes, dtypes, sizes; no tensor data.

    ``source`` is a file path (format found by content), a state dict or nested checkpoint dict,
    an ``nn.Module`` or a ``Checkpoint``. ``key`` picks the state dict inside a nested checkpoint
    (``"state_dict"``, or a path like ``"ema/module"``). Files are opened with
    ``weights_only=True``; ``allow_globals`` allows named pickle globals for this read only, and
    ``trusted=True`` unpickles fully (only for files you trust: it can run code).
    """
    with gc_paused():
        return _read(source, _parse_key(key), trusted, allow_globals)


def _read(
    source: str | os.PathLike[str] | Mapping[Any, Any] | torch.nn.Module | Checkpoint,
    wanted: tuple[str, ...] | None,
    trusted: bool,
    allow_globals: Sequence[GlobalSpec],
) -> Checkpoint:
    if isinstance(source, Checkpoint):
        if wanted is not None and wanted != source.location:
            raise CheckpointError(
                f"{source.source}: already read at {source.location_text!r}; read the file again "
                "to use another key=."
            )
        return source
    if isinstance(source, torch.nn.Module):
        return _read_module(source)
    if isinstance(source, Mapping):
        return _read_mapping(source, wanted)
    if isinstance(source, (str, os.PathLike)):
        return _read_path(Path(source), key=wanted, trusted=trusted, allow=allow_globals)
    raise CheckpointError(
        f"cannot read a checkpoint from a {type(source).__name__}: pass a path, a state dict, "
        "an nn.Module or a Checkpoint."
    )


def _read_mapping(obj: Mapping[Any, Any], key: tuple[str, ...] | None) -> Checkpoint:
    holder: list[Mapping[str, torch.Tensor]] = []

    @contextmanager
    def opener(ckpt: Checkpoint) -> Iterator[TensorSource]:
        yield TensorSource(ckpt, lambda k: _data_of(holder[0][k], ckpt.source, k))

    ckpt = _checkpoint_from_object(
        obj, source="<state dict>", fmt="state dict", key=key, opener=opener
    )
    holder.append(_navigate(obj, ckpt.location))
    return ckpt


def _read_module(module: torch.nn.Module) -> Checkpoint:
    state = module.state_dict(keep_vars=True)
    parameter_ids = {id(p) for _, p in module.named_parameters(remove_duplicate=False)}

    @contextmanager
    def opener(ckpt: Checkpoint) -> Iterator[TensorSource]:
        yield TensorSource(ckpt, lambda k: _data_of(state[k], ckpt.source, k))

    owners = {name: type(m).__name__ for name, m in module.named_modules()}
    described: dict[str, tuple[str, str | None]] = {}
    for name, value in state.items():
        owner_name = str(name).rpartition(".")[0]  # (a custom hook's key may not be a str)
        owner_type = owners.get(owner_name)
        if owner_type is None:  # a module shared under a second name, or a custom hook's key
            try:
                owner_type = type(module.get_submodule(owner_name)).__name__
            except AttributeError:
                owner_type = None
        described[name] = ("parameter" if id(value) in parameter_ids else "buffer", owner_type)
    # the table is built once, with each tensor's kind and owner
    return _checkpoint_from_object(
        state,
        source=f"<{type(module).__name__} module>",
        fmt="module",
        key=None,
        opener=opener,
        described=described,
    )


def _data_of(tensor: torch.Tensor, source: str, key: str) -> torch.Tensor:
    if tensor.device.type == "meta":
        raise CheckpointError(
            f"{source}: {key!r} is on the meta device and has no data to copy; materialise the "
            "source first (e.g. module.to_empty(device='cpu') and load real weights into it)."
        )
    return tensor.detach()
