"""torch zip files (``torch.save`` since 1.6, any extension).

Metadata is read from ``data.pkl`` alone where the file holds plain tensors in dicts: the C
unpickler, knowing only the globals ``torch.save`` writes for those, records each tensor's
declaration (storage, offset, shape, stride) and runs nothing of torch. Anything else (or a file
read with ``trusted``/``allow_globals``) goes through ``torch.load(weights_only=True,
mmap=True)``, after ``safety`` has checked every declared storage against the file. Data comes
from one private memory mapping of the file.
"""

from __future__ import annotations

import io
import pickle
import struct
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ckptviz.core._torch_private import saved_tensor_globals
from ckptviz.core.checkpoint import (
    ITEMSIZES,
    Checkpoint,
    DeclaredStorage,
    DeclaredTensor,
    NotPlain,
    TensorSource,
    dtype_from_name,
    gc_paused,
)
from ckptviz.core.errors import CheckpointError, first_line
from ckptviz.core.formats.base import FileFormat, ViewSlices
from ckptviz.core.formats.filedata import CheckedFile, plain
from ckptviz.core.locate import checkpoint_from_object, navigate
from ckptviz.core.safety import (
    GLOBALS_REFUSAL,
    GlobalSpec,
    allowed_globals,
    check_legacy_storages,
    check_zip_storages,
    recorded_globals,
    safe_globals_lines,
    safe_globals_scope,
    unsafe_error,
    unsafe_globals,
)

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


_REBUILD_TENSOR, _REBUILD_PARAMETER = saved_tensor_globals()


@dataclass(frozen=True)
class _StorageKind:
    dtype: str


class _DeclarationUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` with tensors as declarations: no data is read and no function of
    torch runs. Only the globals torch.save writes for plain tensors in dicts are known, each
    standing for a function of this class; any other global stops it (``NotPlain``)."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.storages: dict[str, DeclaredStorage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if (module, name) == _REBUILD_TENSOR:
            return self._tensor
        if (module, name) == _REBUILD_PARAMETER:
            return self._parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageKind(_STORAGE_DTYPES[name])
        raise NotPlain(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if not (
            type(pid) is tuple
            and len(pid) == 5
            and pid[0] == "storage"
            and type(pid[1]) is _StorageKind
            and type(pid[2]) is str
            and type(pid[4]) is int
        ):
            raise NotPlain("an unusual storage")
        kind, key, numel = pid[1], pid[2], pid[4]
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = DeclaredStorage(key, kind.dtype, numel)
        elif (storage.dtype, storage.numel) != (kind.dtype, numel):
            raise NotPlain("one storage declared two ways")
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
    ) -> DeclaredTensor:
        if not (type(storage) is DeclaredStorage and type(offset) is int):
            raise NotPlain("an unusual tensor")
        shape, strides = tuple(size), tuple(stride)
        for n in shape + strides:
            if type(n) is not int:
                raise NotPlain("an unusual tensor")
        return DeclaredTensor(storage, offset, shape, strides)

    def _parameter(self, data: Any, requires_grad: Any, backward_hooks: Any) -> DeclaredTensor:
        if type(data) is not DeclaredTensor:
            raise NotPlain("an unusual parameter")
        return data


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
    except Exception:  # NotPlain, or anything odd: torch.load decides what it is
        return None
    records = {}
    for storage in unpickler.storages.values():
        record = names.get(f"{prefix}data/{storage.key}")
        if record is None or record.file_size < storage.numel * ITEMSIZES[storage.dtype]:
            return None
        records[storage.key] = record
    return obj, records


def _declared_opener(
    path: Path, obj: object, records: dict[str, zipfile.ZipInfo]
) -> Callable[[Checkpoint], AbstractContextManager[TensorSource]]:
    """Tensor data for a file read by ``_declared_object``: each tensor's bytes (offsets from
    the local zip headers) read from the file when asked for, into memory of its own, as
    ``torch.load`` would build it, without unpickling the file again (see ``filedata``)."""

    @contextmanager
    def opener(ckpt: Checkpoint) -> Iterator[TensorSource]:
        state: Mapping[str, Any] = navigate(obj, ckpt.location)  # of DeclaredTensor
        starts: dict[str, int] = {}
        with CheckedFile(path, ckpt.fingerprint) as file:

            def fetch(key: str) -> torch.Tensor:
                declared = state[key]
                if not isinstance(declared, DeclaredTensor):
                    raise KeyError(key)
                storage = declared.storage
                start = starts.get(storage.key)
                if start is None:
                    record = records[storage.key]
                    local = file.read_bytes(record.header_offset, 30, key)
                    if local[:4] != b"PK\x03\x04":
                        raise CheckpointError(
                            f"{path}: the zip entry of {key!r} is damaged; re-save the file."
                        )
                    name_length, extra_length = struct.unpack("<HH", local[26:30])
                    start = starts[storage.key] = (
                        record.header_offset + 30 + name_length + extra_length
                    )
                dtype = dtype_from_name(storage.dtype)
                shape, stride = declared.shape, declared.stride
                return file.tensor(key, dtype, start, declared.offset, shape, stride)

            yield TensorSource(ckpt, fetch)

    return opener


def is_torch_zip(path: Path, head: bytes) -> bool:
    return head.startswith(b"PK\x03\x04")


def load_torch(
    path: Path,
    *,
    trusted: bool,
    allow: Sequence[GlobalSpec],
    mmap: bool,
    check_sizes: bool = False,
) -> object:
    allowed = [name for _, name in allowed_globals(allow)]  # refuses any that can run code
    with safe_globals_scope(allow):
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
                GLOBALS_REFUSAL.search(message) or unsafe_globals(path, message, allowed)
            ):
                raise unsafe_error(path, exc, allowed) from None
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


def torch_opener(
    path: Path, *, mmap: bool
) -> Callable[[Checkpoint], AbstractContextManager[TensorSource]]:
    """Tensor data through ``torch.load``. With ``mmap``, torch maps the file; each tensor is
    then read from the file with a checked read at the place its storage is mapped from (see
    ``filedata``), never by touching the mapping. Where that place cannot be known for sure
    (not Linux, a byte-swapped file, tensors that are not plain), the file is loaded without a
    mapping: every tensor in memory at once, the cost of the file's size."""

    @contextmanager
    def opener(ckpt: Checkpoint) -> Iterator[TensorSource]:
        def state_of(mapped: bool) -> Mapping[str, Any]:
            loaded = load_torch(path, trusted=ckpt.trusted, allow=ckpt.allow_globals, mmap=mapped)
            return navigate(loaded, ckpt.location)

        with CheckedFile(path, ckpt.fingerprint) as file:
            mapped = mmap and sys.platform.startswith("linux") and _native_byte_order(path)
            state = state_of(mapped)
            regions = file.mapped_regions() if mapped else None
            if mapped and (regions is None or not all(plain(state[k]) for k in ckpt.tensors)):
                # where a tensor's bytes are in the file is not known for sure: read them all now
                state, regions = state_of(False), None
            if regions is None:
                yield TensorSource(ckpt, state.__getitem__)
            else:
                found = regions
                yield TensorSource(ckpt, lambda key: file.copy_of_mapped(state[key], key, found))

    return opener


def _native_byte_order(path: Path) -> bool:
    """Whether a torch zip file's tensors are stored in this machine's byte order (else
    torch swaps them in memory, and the mapped bytes are no longer the file's)."""
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.rpartition("/")[2] == "byteorder"]
        return all(archive.read(n) == sys.byteorder.encode() for n in names)


def read_torch_file(
    path: Path,
    *,
    key: tuple[str, ...] | None,
    trusted: bool,
    allow: Sequence[GlobalSpec],
    mmap: bool,
) -> Checkpoint:
    obj = load_torch(path, trusted=trusted, allow=allow, mmap=mmap, check_sizes=True)
    allow_names = recorded_globals(path, allow) if allow and not trusted else ()
    return checkpoint_from_object(
        obj,
        source=str(path),
        fmt="torch" if mmap else "torch-legacy",
        key=key,
        path=path,
        opener=torch_opener(path, mmap=mmap),
        trusted=trusted,
        allow_globals=allow_names,
    )


def read_torch_zip(
    path: Path, *, key: tuple[str, ...] | None, trusted: bool, allow: Sequence[GlobalSpec]
) -> Checkpoint:
    try:
        archive = zipfile.ZipFile(path)
    except Exception as exc:  # zipfile raises more than BadZipFile on damaged directories
        raise CheckpointError(
            f"{path}: starts like a zip file but cannot be opened as one ({first_line(exc)}); "
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
        return checkpoint_from_object(
            obj,
            source=str(path),
            fmt="torch",
            key=key,
            path=path,
            opener=_declared_opener(path, obj, records),
        )
    return read_torch_file(path, key=key, trusted=trusted, allow=allow, mmap=True)


def read_code(ckpt: Checkpoint, keys: list[str]) -> list[str]:
    """Plain-PyTorch lines that put a torch file's state dict in ``state`` (``weights_only``,
    with the allowed globals by name, or fully unpickled for a trusted file)."""
    path = str(ckpt.path)
    where = "".join(f"[{part!r}]" for part in ckpt.location)
    if ckpt.trusted:
        return [
            "# trusted=True: full unpickling, only for files you trust (it can run code).",
            f"checkpoint = torch.load({path!r}, map_location='cpu', weights_only=False)",
            f"state = checkpoint{where}",
        ]
    if ckpt.allow_globals:
        return [
            *safe_globals_lines(ckpt.allow_globals),
            "with torch.serialization.safe_globals(safe):",
            f"    checkpoint = torch.load({path!r}, map_location='cpu', weights_only=True)",
            f"state = checkpoint{where}",
        ]
    if not where:
        return [f"state = torch.load({path!r}, map_location='cpu', weights_only=True)"]
    return [
        f"checkpoint = torch.load({path!r}, map_location='cpu', weights_only=True)",
        f"state = checkpoint{where}",
    ]


class TorchFileSlices(ViewSlices):
    """Boxes of a torch zip file's tensors: each copied out of its tensor as ``open()`` reads
    it (with checked reads); in generated code, out of ``torch.load(mmap=True)``'s tensor."""

    def code(self) -> tuple[list[str], list[str]]:
        ckpt = self.ckpt
        where = "".join(f"[{part!r}]" for part in ckpt.location)
        unsafe = ckpt.trusted or bool(ckpt.allow_globals)
        load = [
            f"checkpoint = torch.load({str(ckpt.path)!r}, map_location='cpu', mmap=True,"
            f" weights_only={not unsafe})",
            f"state = checkpoint{where}",
        ]
        if unsafe:
            load.insert(0, "# trusted: full unpickling, only for files you trust (it runs code).")
        return [], [
            *load,
            "",
            "",
            "def read_all(requests):  # memory-mapped: a slice reads only the pages it touches",
            "    return {name: state[key][region(offsets, sizes)].clone()",
            "            for name, (key, offsets, sizes) in requests.items()}",
        ]


FORMAT = FileFormat("torch", is_torch_zip, read_torch_zip, read_code, slices=TorchFileSlices)
