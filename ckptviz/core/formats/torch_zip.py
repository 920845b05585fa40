"""torch zip files (``torch.save`` since 1.6, any extension).

Metadata is read from ``data.pkl`` alone where the file holds plain tensors in dicts: the C
unpickler, knowing only the globals ``torch.save`` writes for those, records each tensor's
declaration (storage, offset, shape, stride) and runs nothing of torch. Anything else (or a file
read with ``trusted``/``allow_globals``) goes through ``torch.load(weights_only=True,
mmap=True)``, after ``safety`` has checked every declared storage against the file. Data comes
from one private memory mapping of the file.
"""

from __future__ import annotations

import functools
import io
import pickle
import re
import secrets
import struct
import sys
import zipfile
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch

from ckptviz.core._torch_private import saved_tensor_globals
from ckptviz.core.checkpoint import (
    ITEMSIZES,
    Checkpoint,
    DeclaredStorage,
    DeclaredTensor,
    NotPlain,
    TensorSource,
    _Sealed,
    dtype_from_name,
    gc_paused,
)
from ckptviz.core.errors import CheckpointError, first_line, torch_reason
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

#: Largest ``data.pkl`` read (inflated size, as declared in the zip directory and as read). It
#: takes about 100 bytes a tensor: 64 MiB is ~600,000 tensors, several times the largest
#: checkpoints published. It also bounds the memory of the objects the pickle builds that are
#: not counted below (ints, floats, strings, references: at most ~16 bytes per pickle byte).
MAX_PICKLE_BYTES = 64 * 2**20
#: Most container-building opcodes (dict, set, tuple, list, call, global: up to ~220 bytes of
#: memory each) plus entries copied into OrderedDicts. Counted as the bytes of the pickle that
#: could be such an opcode, an over-count; torch.save writes ~9 a tensor, so real checkpoints
#: of up to ~500,000 tensors pass.
MAX_PICKLE_NODES = 5_000_000
#: The bytes of those opcodes: EMPTY_DICT EMPTY_SET TUPLE1-3 TUPLE EMPTY_LIST REDUCE BINPERSID
#: BUILD GLOBAL.
_BUILDING_OPCODES = b"}\x8f\x85\x86\x87t]RQbc"
#: Highest memo slot the C unpickler is given: it allocates an array up to the slot (4 bytes of
#: pickle could ask for 64 GiB); torch.save's memo holds ~8 slots a tensor.
_MAX_MEMO_SLOT = 1 << 22


@functools.cache
def _torch_opcode_run() -> re.Pattern[bytes]:
    """A run of pickle opcodes that torch's weights-only unpickler reads exactly as the C one.

    Every other opcode is refused by torch.load(weights_only=True), so a pickle using one is
    not read here. Left out of the run, for ``_scan`` to look at one by one: EMPTY_LIST and
    BUILD (rewritten, see ``_Rewrites``), a MARK right before SETITEMS or APPENDS (rewritten
    too), LONG_BINPUT past ``_MAX_MEMO_SLOT``, a BINUNICODE of 256 bytes or more,
    SHORT_BINSTRING, LONG1 and STOP.
    """
    short_text = b"|".join(
        re.escape(struct.pack("<I", length)) + b".{%d}" % length for length in range(256)
    )
    opcode = (  # the most frequent in torch.save's pickles first
        rb"r..[\x00-\x3f]\x00"  # LONG_BINPUT below _MAX_MEMO_SLOT
        rb"|[Khq\x80]."  # BININT1 BINGET BINPUT PROTO
        rb"|[\x81Rsu)}\x8fQ\x85\x86\x87N\x89\x88aet]"  # no argument
        rb"|X(?:" + short_text + rb")"  # BINUNICODE
        rb"|\((?![ue])"  # MARK
        rb"|M..|[Jj]....|G.{8}"  # BININT2 BININT LONG_BINGET BINFLOAT
        rb"|c[^\n]*\n[^\n]*\n"  # GLOBAL
    )
    return re.compile(rb"(?:" + opcode + rb")*+", re.DOTALL)


class _Rewrites:
    """Opcodes whose effect the C unpickler and torch's differ on, routed to Python instead.

    BUILD: torch builds only an OrderedDict (``__dict__.update``), a tensor or a parameter; the
    C unpickler no-ops a BUILD with ``None`` state on anything. EMPTY_LIST: the C unpickler lets
    SETITEM write into a list, torch does not. An empty SETITEMS or APPENDS (MARK right before
    it: torch.save ends a dict of a multiple of 1,000 entries so): torch checks its target is
    a dict or a list, the C unpickler does nothing. Each becomes a persistent id carrying a
    token made for this read (a file cannot forge it), which ``_DeclarationUnpickler`` answers.
    """

    def __init__(self) -> None:
        self.tokens = {secrets.token_hex(16): name for name in ("build", "list", "dict?", "list?")}
        call = {
            name: b"X" + struct.pack("<I", 32) + token.encode()
            for token, name in self.tokens.items()
        }
        # BUILD: (inst, state, token); EMPTY_LIST: (token,); empty SETITEMS/APPENDS: (target, token)
        self.build = call["build"] + b"\x87Q"
        self.list = call["list"] + b"\x85Q"
        self.empty_setitems = call["dict?"] + b"\x86Q"
        self.empty_appends = call["list?"] + b"\x86Q"


def _scan(data: bytes, path: Path, rewrites: _Rewrites) -> bytes | None:
    """``data`` ready for the C unpickler, or ``None`` when it uses an opcode (or a memo slot)
    torch's weights-only unpickler would not read the same way: then torch.load decides.

    Also bounds what unpickling it may build, whoever unpickles it: a pickle with more than
    ``MAX_PICKLE_NODES`` container-building opcodes is refused before anything is built.
    Nesting needs no bound of its own: an object nests at most as deep as objects were built,
    and nothing in ckptviz or torch.load recurses over the saved object.
    """
    building = len(data) - len(data.translate(None, _BUILDING_OPCODES))
    if building > MAX_PICKLE_NODES:
        raise _bound_error(path, f"has over {MAX_PICKLE_NODES:,} container-building opcodes")
    run = _torch_opcode_run().match
    unpack = struct.unpack_from
    pos = 0
    spliced: list[tuple[int, int, bytes]] = []  # (where, length, new opcodes)
    try:
        while True:
            pos = run(data, pos).end()  # type: ignore[union-attr]  # matches the empty run
            code = data[pos]
            if code == 0x58:  # BINUNICODE of 256 bytes or more
                pos += 5 + unpack("<I", data, pos + 1)[0]
            elif code == 0x28:  # MARK right before SETITEMS (u) or APPENDS (e): an empty one
                after = data[pos + 1]
                spliced.append(
                    (pos, 2, rewrites.empty_setitems if after == 0x75 else rewrites.empty_appends)
                )
                pos += 2
            elif code == 0x5D:  # EMPTY_LIST
                spliced.append((pos, 1, rewrites.list))
                pos += 1
            elif code == 0x62:  # BUILD
                spliced.append((pos, 1, rewrites.build))
                pos += 1
            elif code == 0x55 or code == 0x8A:  # SHORT_BINSTRING, LONG1
                pos += 2 + data[pos + 1]
            elif code == 0x2E:  # STOP
                break
            else:
                # torch.load refuses the opcode ("Unsupported operand"), or it is a
                # LONG_BINPUT past _MAX_MEMO_SLOT, which only torch's dict memo holds cheaply
                return None
    except (IndexError, struct.error):
        return None  # truncated: torch.load says what is wrong
    if not spliced:
        return data
    pieces: list[bytes] = []
    last = 0
    for at, length, replacement in spliced:
        pieces += (data[last:at], replacement)
        last = at + length
    pieces.append(data[last:])
    return b"".join(pieces)


def _bound_error(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: its pickle (data.pkl) {what}, past what ckptviz reads from a checkpoint; it "
        "was refused and nothing from it was loaded. A real checkpoint stays far below; if you "
        "trust this file, load it with torch.load yourself and pass the state dict to ckptviz."
    )


class _StorageKind(_Sealed):
    """What ``torch.FloatStorage`` and its kin stand for in a declaration: a dtype."""

    __slots__ = ("dtype",)
    dtype: str

    def __init__(self, dtype: str) -> None:
        object.__setattr__(self, "dtype", dtype)


class _List(list[Any]):
    """A list the pickle builds: it may be appended to, as torch allows, and nothing else."""

    __slots__ = ()

    def __setitem__(self, index: Any, value: Any) -> None:
        raise NotPlain("a SETITEM on a list")


class _DeclarationUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` with tensors as declarations: no data is read and no function of
    torch runs. Only the globals torch.save writes for plain tensors in dicts are known, each
    standing for a function of this class; any other global stops it (``NotPlain``), as does
    anything torch's ``_rebuild_tensor_v2`` would do more with than place a tensor in its
    storage (conj/neg bits, ``requires_grad``, hooks). Declarations are sealed once built."""

    def __init__(self, data: bytes, path: Path, rewrites: _Rewrites) -> None:
        # torch.load decodes SHORT_BINSTRING as UTF-8, strictly
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self.path = path
        self.rewrites = rewrites
        self.storages: dict[str, DeclaredStorage] = {}
        self.tensors: list[DeclaredTensor] = []
        self.copied = 0

    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return self._ordered_dict
        if (module, name) == _REBUILD_TENSOR:
            return self._tensor
        if (module, name) == _REBUILD_PARAMETER:
            return self._parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageKind(_STORAGE_DTYPES[name])
        raise NotPlain(f"{module}.{name}")

    def _ordered_dict(self, *args: Any) -> OrderedDict[Any, Any]:
        if not args:  # every tensor's backward hooks
            return OrderedDict()
        built: OrderedDict[Any, Any] = OrderedDict(*args)
        # copies of a big dict, made again and again, are the one way to build more objects
        # than the pickle has opcodes
        self.copied += len(built)
        if self.copied > MAX_PICKLE_NODES:
            raise _bound_error(self.path, f"copies over {MAX_PICKLE_NODES:,} dict entries")
        return built

    def persistent_load(self, pid: Any) -> Any:
        if type(pid) is tuple and len(pid) == 5:  # a storage: ("storage", kind, key, where, numel)
            kind, key, numel = pid[1], pid[2], pid[4]
            if not (
                type(pid[0]) is str
                and pid[0] == "storage"
                and type(kind) is _StorageKind
                and type(key) is str
                and type(numel) is int
            ):
                raise NotPlain("an unusual storage")
            storage = self.storages.get(key)
            if storage is None:
                storage = self.storages[key] = DeclaredStorage(key, kind.dtype, numel)
            elif storage.dtype != kind.dtype or storage.numel != numel:
                raise NotPlain("one storage declared two ways")
            return storage
        rewritten = self.rewrites.tokens.get(pid[-1]) if type(pid) is tuple and pid else None
        if rewritten == "build" and len(pid) == 3:
            return self._build(pid[0], pid[1])
        if rewritten == "list" and len(pid) == 1:
            return _List()
        # what torch checks of the target of an empty SETITEMS or APPENDS
        if rewritten == "dict?" and len(pid) == 2 and type(pid[0]) in (dict, OrderedDict):
            return pid[0]
        if rewritten == "list?" and len(pid) == 2 and type(pid[0]) is _List:
            return pid[0]
        raise NotPlain("an unusual persistent id")

    def _build(self, inst: Any, state: Any) -> Any:
        """A pickle BUILD, as torch's weights-only unpickler does it on an OrderedDict (the
        attributes of a ``state_dict()``); on anything else torch.load decides."""
        if type(inst) is not OrderedDict:
            raise NotPlain(f"a BUILD on a {type(inst).__name__}")
        inst.__dict__.update(state)
        return inst

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
        if (
            type(storage) is not DeclaredStorage
            or requires_grad is not False
            # torch.save writes empty hooks; torch.load would attach any others
            or type(backward_hooks) is not OrderedDict
            or backward_hooks
            or metadata  # conj/neg bits: torch.load sets them, a view here would not
        ):
            raise NotPlain("an unusual tensor")
        tensor = DeclaredTensor(storage, offset, size, stride)
        self.tensors.append(tensor)
        return tensor

    def _parameter(self, data: Any, requires_grad: Any, backward_hooks: Any) -> DeclaredTensor:
        if (
            type(data) is not DeclaredTensor
            or type(requires_grad) is not bool
            or type(backward_hooks) is not OrderedDict
            or backward_hooks
        ):
            raise NotPlain("an unusual parameter")
        dtype = dtype_from_name(data.storage.dtype)
        if requires_grad and not (dtype.is_floating_point or dtype.is_complex):
            raise NotPlain("a parameter torch would not let require gradients")
        return data


def _refuse(path: Path, problem: str, advice: str = "Re-save it with torch.save.") -> NoReturn:
    raise CheckpointError(f"{path}: {problem}; torch.save never writes that. {advice}")


@dataclass(frozen=True)
class _Archive:
    """A torch zip file's entries by the name torch's zip reader looks them up with."""

    prefix: str  # "archive/": the folder of the first entry, which torch reads records from
    entries: dict[bytes, zipfile.ZipInfo]  # ASCII-lower-cased raw name -> entry

    def get(self, name: str) -> zipfile.ZipInfo | None:
        return self.entries.get(_raw_name(self.prefix + name).lower())

    @property
    def pickle(self) -> zipfile.ZipInfo:
        info = self.get("data.pkl")
        assert info is not None
        return info


def _raw_name(name: str, utf8: bool = True) -> bytes:
    return name.encode("utf-8" if utf8 else "cp437", "surrogateescape")


def check_archive(path: Path, archive: zipfile.ZipFile) -> _Archive:
    """The entries of a torch zip file, refusing what torch's zip reader and Python's would
    read differently, so both paths (the declarations here and torch.load) read one file.

    torch's reader (miniz) takes the folder of the first entry as the archive's, finds names
    without regard to ASCII case, reads a name past a NUL byte and memory-maps tensor data
    records raw: so a duplicate name (in any case), a NUL in a name, a second ``data.pkl``,
    a compressed or encrypted data record, or a ``data.pkl`` over ``MAX_PICKLE_BYTES`` is
    refused here.
    """
    infos = archive.infolist()
    # zipfile cuts a name at a NUL byte (orig_filename keeps it whole); torch's reader does not
    for info in [i for i in infos if i.orig_filename is not i.filename]:
        if info.orig_filename != info.filename:
            _refuse(path, f"the zip entry {info.orig_filename!r} has a NUL byte in its name")
    flags = {info.flag_bits & 0x801 for info in infos}  # encrypted, UTF-8 name
    if any(flag & 0x1 for flag in flags):
        encrypted = next(info for info in infos if info.flag_bits & 0x1)
        _refuse(path, f"the zip entry {encrypted.filename!r} is encrypted")
    if len(flags) <= 1:
        # one encoding for all: encode them at once (no name holds a NUL, checked above)
        joined = "\0".join(info.filename for info in infos)
        raw_names = _raw_name(joined, 0x800 in flags).lower().split(b"\0")
    else:
        raw_names = [_raw_name(i.filename, bool(i.flag_bits & 0x800)).lower() for i in infos]
    entries = dict(zip(raw_names, infos, strict=True))
    if len(entries) != len(infos):
        first: dict[bytes, zipfile.ZipInfo] = {}
        twice = next(
            info
            for raw, info in zip(raw_names, infos, strict=True)
            if first.setdefault(raw, info) is not info
        )
        _refuse(
            path,
            f"the zip holds two entries named {twice.filename!r} (names are compared ignoring "
            "case, as torch's zip reader does): torch.load reads one of them, ckptviz could "
            "read the other",
        )
    folder, slash, _ = infos[0].filename.partition("/") if infos else ("", "", "")
    if not slash:
        _refuse(path, "the first zip entry is not in a folder, where torch.load looks")
    found = _Archive(f"{folder}/", entries)
    pickles = [
        info.filename
        for raw, info in zip(raw_names, infos, strict=True)
        if raw.endswith(b"data.pkl")
    ]
    if len(pickles) != 1 or found.get("data.pkl") is None:
        _refuse(
            path,
            f"the zip holds {len(pickles)} pickles ({', '.join(map(repr, pickles[:4]))}), and "
            f"torch.load reads only {folder}/data.pkl",
        )
    data_folder = _raw_name(f"{folder}/data/").lower()
    compressed = [
        info.filename
        for raw, info in entries.items()
        if info.compress_type != zipfile.ZIP_STORED and raw.startswith(data_folder)
    ]  # (the compress_type test first: it is the cheap one)
    if compressed:
        _refuse(
            path,
            f"the tensor data record {compressed[0]!r} is compressed (torch.load would map "
            "its compressed bytes as tensor values)",
        )
    pickle_info = found.pickle
    if pickle_info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        _refuse(path, f"data.pkl is compressed with method {pickle_info.compress_type}")
    if pickle_info.file_size > MAX_PICKLE_BYTES:
        raise _bound_error(
            path, f"is {pickle_info.file_size:,} bytes, over {MAX_PICKLE_BYTES:,} bytes"
        )
    return found


def _read_pickle(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """data.pkl, inflated at most to ``MAX_PICKLE_BYTES`` (zipfile stops at the size the zip
    directory declares, which ``check_archive`` bounded, and checks the CRC)."""
    with archive.open(info) as stream:
        data = stream.read(MAX_PICKLE_BYTES + 1)
    if len(data) > MAX_PICKLE_BYTES:
        raise _bound_error(path, f"inflates past {MAX_PICKLE_BYTES:,} bytes")
    return data


def _declared_object(
    path: Path, archive: zipfile.ZipFile, found: _Archive
) -> tuple[object, dict[str, zipfile.ZipInfo]] | None:
    """A torch zip file's saved object with each tensor as its declaration, or ``None`` when
    the file holds anything else, or anything torch.load would read in another way than a
    view of its record's bytes: then ``torch.load`` reads it, with its own checks and errors.

    Afterwards every declared tensor is checked again against its own zip record (dtype,
    offset, shape, stride, size): the declarations are sealed, and this says it twice.

    This is what makes reading metadata cheap: ``torch.load(weights_only=True)`` unpickles in
    Python and builds a tensor per entry, here the C unpickler builds small records.
    """
    byteorder = found.get("byteorder")
    alignment = found.get(".storage_alignment")
    try:
        if byteorder is not None and archive.read(byteorder) != sys.byteorder.encode():
            return None  # torch.load swaps the bytes, or refuses an unknown byte order
        if alignment is not None:
            int(archive.read(alignment))  # torch.load fails on anything int() does not read
        if not _known_version(archive, found):
            return None
        data = _read_pickle(path, archive, found.pickle)
    except CheckpointError:
        raise
    except Exception:  # a damaged entry: torch.load decides what it is
        return None
    rewrites = _Rewrites()
    scanned = _scan(data, path, rewrites)
    if scanned is None:
        return None
    unpickler = _DeclarationUnpickler(scanned, path, rewrites)
    try:
        with gc_paused():
            obj: object = unpickler.load()
    except CheckpointError:
        raise
    except Exception:  # NotPlain, or anything odd: torch.load decides what it is
        return None
    records: dict[str, zipfile.ZipInfo] = {}
    capacity: dict[str, int] = {}
    folder = f"{found.prefix}data/"
    data_folder = _raw_name(folder).lower()
    exact = archive.NameToInfo
    for key, storage in unpickler.storages.items():
        # the exact name first (fast); names are unique ignoring case, so it is torch's too
        record = exact.get(folder + key) or found.entries.get(data_folder + _raw_name(key).lower())
        if record is None:
            return None
        declared = storage.numel * ITEMSIZES[storage.dtype]
        if record.file_size != declared:
            only = "only " if record.file_size < declared else ""
            _refuse(
                path,
                f"tensor {_key_of(obj, storage)} declares {storage.numel:,} {storage.dtype} "
                f"values ({declared:,} bytes) in storage {key!r}, but the file holds "
                f"{only}{record.file_size:,} bytes for it (torch.load refuses such a file too)",
            )
        records[key] = record
        # the whole elements its record's bytes hold (every storage dtype is 1 byte or more):
        # an element ends inside the record exactly when its index is below this
        capacity[key] = record.file_size // ITEMSIZES[storage.dtype]
    # each declaration again, from its parts, against its own record: it must lie inside
    for tensor in unpickler.tensors:
        elements = capacity.get(tensor.storage.key)
        if elements is None:
            return None
        end = tensor.offset  # one past its last element, or its offset when it has none
        if tensor.numel:
            # sizes and strides are as many, checked when declared
            for size, step in zip(tensor.shape, tensor.stride, strict=False):
                end += (size - 1) * step
            end += 1
        if end > elements:
            return None
    return obj, records


def _key_of(obj: object, storage: DeclaredStorage) -> str:
    """Where in the saved object a tensor of ``storage`` sits ('state_dict/fc.weight'), for
    an error message; looked for breadth first, among the first objects only."""
    queue: deque[tuple[str, object]] = deque([("", obj)])
    for _ in range(100_000):
        if not queue:
            break
        where, node = queue.popleft()
        if type(node) is DeclaredTensor and node.storage is storage:
            return repr(where)
        if isinstance(node, Mapping):
            queue.extend((f"{where}/{k}".lstrip("/"), v) for k, v in node.items())
        elif isinstance(node, (list, tuple)):
            queue.extend((f"{where}/{i}".lstrip("/"), v) for i, v in enumerate(node))
    return "(not found)"


def _known_version(archive: zipfile.ZipFile, found: _Archive) -> bool:
    """The format version torch.save writes (1 to 3), read where torch's reader reads it."""
    record = found.get(".data/version") or found.get("version")
    if record is None or record.file_size > 16:
        return False
    return re.fullmatch(rb"[123]\n?", archive.read(record)) is not None


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
                f"{path}: not a checkpoint I can read safely ({torch_reason(exc)}). "
                "Expected a file written by torch.save or safetensors; re-save it with one."
            ) from None
        except Exception as exc:
            raise CheckpointError(
                f"{path}: the file looks like a torch checkpoint but cannot be read "
                f"({torch_reason(exc)}). It may be truncated or damaged; re-save it with "
                "torch.save."
            ) from None


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
    try:
        with zipfile.ZipFile(path) as archive:
            # torch's zip reader finds its records whatever their case
            names = [n for n in archive.namelist() if n.rpartition("/")[2].lower() == "byteorder"]
            return all(archive.read(n) == sys.byteorder.encode() for n in names)
    except (OSError, ValueError, zipfile.BadZipFile, zipfile.LargeZipFile):
        # Python's zip reader is stricter than torch's (a local header that disagrees with the
        # directory, a name that is not UTF-8): unsure, so no mapping; torch.load decides
        return False


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
        found = check_archive(path, archive)
        declared = None
        if not trusted and not allow:
            declared = _declared_object(path, archive, found)
        elif not trusted:  # torch.load unpickles it: bound what that may build first
            _scan(_read_pickle(path, archive, found.pickle), path, _Rewrites())
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
