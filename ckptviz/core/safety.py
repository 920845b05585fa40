"""What may be unpickled, and the words of every refusal.

Globals. ``torch.load(weights_only=True)`` builds only tensors and plain containers; a file that
names any other pickle global is refused, and the refusal (``refusal``) lists *every* global the
file needs, read statically from the file, in one error. ``allow_globals`` may then allow a
global for one read (``safe_globals_scope``: nothing leaks into torch), but only one from the
short list below (``HARMLESS_GLOBALS``). A pickle calls a global it names with arguments of its
own choosing (and sets the state of what it builds), so any global whose call can reach code
(``io.open``, ``torch.save``, ``builtins.getattr``, fx's ``reduce_graph_module``, numpy's
``runstring``, a class whose ``__setstate__`` does work) would run the file's code. ckptviz
cannot tell which globals are like that, so every global off the list is named as able to run
code, ``allow_globals`` refuses it (``not_allowable``), and the only opt-in offered for it is
``trusted=True``, named as running that code. Following an error's advice therefore never runs a
file's code: what it suggests to allow is harmless, and ``trusted=True`` is never a call to copy.

The list, and why:

- ``argparse.Namespace`` (old research checkpoints save their ``args``): built empty, then its
  attributes set from the pickle; it has no ``__setstate__`` and runs nothing it is given.
- numpy's array, scalar and dtype reconstruction, under both names numpy has written them
  (``numpy.core.multiarray`` up to numpy 1, ``numpy._core.multiarray`` since numpy 2):
  ``_reconstruct`` (an empty ``ndarray``), ``ndarray`` (its ``__setstate__`` copies raw bytes, or
  for an object array takes a list the same restricted unpickler already built: numpy never
  unpickles bytes there), ``scalar`` (a scalar from raw bytes), ``dtype`` and each concrete
  ``numpy.dtypes.*`` class (``numpy.dtype(...)`` returns an instance of one, which the file never
  names, and torch sets the state of allowed classes only, so allowing ``numpy.dtype`` allows
  them too). They parse data; they call nothing the
  file chooses.
- ``builtins.frozenset`` and ``builtins.slice``: an immutable set of values already unpickled,
  and three stored values. (``set``, ``complex``, ``bytearray``, ``collections.OrderedDict`` and
  ``collections.Counter`` need no opt-in: torch allows them by default.)
- ``pathlib`` paths (``PurePosixPath``, ``PureWindowsPath``, ``PosixPath``, ``WindowsPath``;
  Lightning ``hyper_parameters`` hold them): built from their parts as strings, touching no file.

Left off on purpose: ``collections.defaultdict`` (torch's unpickler cannot fill one even when
allowed, and its factory is called on every missing key later), ``builtins.getattr`` (fetches
any attribute, running properties, of anything already built), and mmengine's ``HistoryBuffer``:
a real one pickles its statistics methods through ``builtins.getattr``, and its ``__setstate__``
puts whatever the file holds into a registry shared by every buffer in the process, which
mmengine later calls. An mmengine runner checkpoint therefore needs ``trusted=True``.

Storages. Before ``torch.load`` reads a file, its pickles are looked into: torch believes the
storage sizes a pickle declares: the pre-1.6 format allocates every storage at its declared
size before reading it (a few bytes of pickle can ask for terabytes), and a memory-mapped zip file
lets a tensor run past its own record into whatever bytes follow it (other tensors, the zip
directory) without a word.

Here the pickle is read with torch's own weights-only unpickler, under the same allowed globals,
with every storage replaced by a data-less ``meta`` storage: that gives each tensor's declared
shape, dtype and extent, which are checked against the bytes the file really holds before
``torch.load`` runs. Nothing here reads or allocates tensor data.
"""

from __future__ import annotations

import _compat_pickle
import importlib
import io
import os
import pickle
import pickletools
import re
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

# Bounds on the walk over an unpickled object: it is hostile input too.
_MAX_DEPTH = 8
_MAX_NODES = 1_000_000
# The size of every stand-in meta storage: big enough that torch's own bounds check never fires,
# so the extents are checked here, against the file, with the tensor's name in the message.
_UNBOUNDED = 2**62


class _Bytes:
    """``read``/``readline`` over an open file that will not read past its end.

    A length inside a pickle that the file cannot hold is damage (or an attack), not a reason to
    allocate that much: it is refused, naming the offset. Every read is a checked read of the
    file (never a memory mapping, whose pages past a truncated end kill the process with
    SIGBUS): a file that shrinks while it is read gives a short read, refused naming the file.
    Only what the unpickler asks for is read, so memory stays bounded by the pickle, not the
    file (a pre-1.6 file's tensor data, after its pickles, is never read).
    """

    def __init__(self, handle: IO[bytes], path: Path) -> None:
        self._handle = handle
        self._path = path
        self._size = os.fstat(handle.fileno()).st_size
        self._pos = 0

    @property
    def size(self) -> int:
        """The file's size when it was opened."""
        return self._size

    def tell(self) -> int:
        return self._pos

    def read(self, n: int = -1) -> bytes:
        remaining = self._size - self._pos
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
        chunk = self._handle.read(n)  # the handle is at ``_pos``: only this reads from it
        self._check(n, chunk)
        self._pos += n
        return chunk

    def readline(self) -> bytes:
        remaining = self._size - self._pos
        chunk = self._handle.readline(remaining)
        if not chunk.endswith(b"\n"):  # ran to the end of the file: it must hold all of it
            self._check(remaining, chunk)
        self._pos += len(chunk)
        return chunk

    def _check(self, wanted: int, chunk: bytes) -> None:
        if len(chunk) < wanted:
            raise CheckpointError(
                f"{self._path}: the file ended at byte {self._pos + len(chunk):,} while its "
                f"pickle was read (it had {self._size:,} bytes when opened): it was truncated "
                "or is being written right now. Re-run when the file is complete, or re-save it."
            )


def _python3_name(module: str, name: str) -> str:
    """A global as a Python 3 unpickler (and torch's) reads it: ``__builtin__.set`` is
    ``builtins.set``."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    else:
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return f"{module}.{name}"


def pickle_globals(path: Path) -> list[str]:
    """Every global named by the pickles at the start of a pre-1.6 torch file or plain pickle.

    Read statically with ``pickletools``: nothing is imported or called. A pre-1.6 torch file is
    several pickles in a row, then raw storage bytes; the walk stops at the first thing that is
    not a pickle.
    """
    names: list[str] = []
    with path.open("rb") as handle:
        stream = _Bytes(handle, path)
        for _ in range(5):  # magic number, protocol, sys info, the object, the storage keys
            start = stream.tell()
            try:
                for opcode, arg, _ in pickletools.genops(cast(IO[bytes], stream)):
                    if opcode.name in ("GLOBAL", "INST") and isinstance(arg, str):
                        names.append(_python3_name(*arg.split(" ", 1)))
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
        with path.open("rb") as handle:
            stream = _Bytes(handle, path)
            if _unpickle(stream) != torch.serialization.MAGIC_NUMBER:
                return  # not a torch file: torch.load says so
            if _unpickle(stream) != torch.serialization.PROTOCOL_VERSION:
                return
            _unpickle(stream)  # system info
            recorder = _StorageRecorder()
            obj = _unpickle(stream, recorder)
            _unpickle(stream)  # the storage keys
            data_bytes = stream.size - stream.tell()
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

#: The globals ``allow_globals`` may allow, by every name a pickle uses for them (numpy 2 writes
#: ``numpy._core``, numpy 1 wrote ``numpy.core``). ``numpy.dtypes.*`` stands for each concrete
#: dtype class of the running numpy (``numpy.dtypes.Float64DType``, ...). Why each is here, and
#: why nothing else is, is in the module docstring.
HARMLESS_GLOBALS: tuple[str, ...] = (
    "argparse.Namespace",
    "builtins.frozenset",
    "builtins.slice",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.dtypes.*",
    "pathlib.PurePosixPath",
    "pathlib.PureWindowsPath",
    "pathlib.PosixPath",
    "pathlib.WindowsPath",
)
_NUMPY_MULTIARRAY = ("numpy.core.multiarray", "numpy._core.multiarray")
# where numpy's multiarray functions are imported from: numpy 2 first (its numpy.core is a
# deprecated shim), numpy 1 otherwise
_NUMPY_MULTIARRAY_HOMES = ("numpy._core.multiarray", "numpy.core.multiarray")


def _import(location: str) -> Any:
    module, _, attr = location.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _numpy_dtype_classes() -> list[str]:
    """``numpy.dtypes.<name>`` for each concrete dtype class of the running numpy."""
    try:
        dtypes = importlib.import_module("numpy.dtypes")
    except ImportError:
        return []
    return [f"numpy.dtypes.{name}" for name in getattr(dtypes, "__all__", ())]


def is_harmless(name: str) -> bool:
    """A global on the short list ``allow_globals`` accepts (``HARMLESS_GLOBALS``)."""
    if name.startswith("numpy.dtypes."):
        return name in _numpy_dtype_classes()
    return name in HARMLESS_GLOBALS


def runs_code(name: str) -> bool:
    """A pickle global that may run code: everything off the harmless list (a pickle calls a
    global with arguments of its choosing, and ckptviz cannot tell what that runs)."""
    return not is_harmless(name)


def harmless_location(name: str) -> str:
    """Where the harmless global ``name`` is imported from in this environment."""
    if not is_harmless(name):
        raise not_allowable([name])
    module, _, attr = name.rpartition(".")
    homes = _NUMPY_MULTIARRAY_HOMES if module in _NUMPY_MULTIARRAY else (module,)
    failure: BaseException | None = None
    for home in homes:
        try:
            _import(f"{home}.{attr}")
        except (ImportError, AttributeError) as exc:
            failure = exc
            continue
        return f"{home}.{attr}"
    raise CheckpointError(
        f"allow_globals: {name!r} cannot be imported here ({failure}); install the package that "
        "wrote it (numpy?) in this environment."
    )


def _harmless_objects() -> list[tuple[str, Any]]:
    """(name, object) for every harmless global importable here, under each of its names."""
    found = []
    for name in (*HARMLESS_GLOBALS, *_numpy_dtype_classes()):
        if not is_harmless(name):
            continue  # the "numpy.dtypes.*" entry
        try:
            found.append((name, _import(harmless_location(name))))
        except CheckpointError:
            continue  # numpy is not installed: nothing of it can be allowed, or needed
    return found


def allowed_globals(allow: Sequence[GlobalSpec]) -> list[tuple[Any, str]]:
    """(object, name) for each ``allow_globals`` entry, all checked to be harmless.

    An entry is a dotted name from ``HARMLESS_GLOBALS`` or the object itself. Every entry off
    the list is refused, all of them in one error, and nothing is imported for them.
    """
    resolved: list[tuple[Any, str]] = []
    refused: list[str] = []
    harmless: list[tuple[str, Any]] | None = None
    for spec in allow:
        if isinstance(spec, str):
            if is_harmless(spec):
                resolved.append((_import(harmless_location(spec)), spec))
            else:
                refused.append(spec)
            continue
        own = f"{getattr(spec, '__module__', '?')}.{getattr(spec, '__qualname__', spec)}"
        if harmless is None:
            harmless = _harmless_objects()
        names = [name for name, obj in harmless if obj is spec]
        if names:
            resolved.append((spec, own if own in names else names[0]))
        else:
            refused.append(own)
    if refused:
        raise not_allowable(refused)
    return resolved


def resolve_global(spec: GlobalSpec) -> tuple[Any, str]:
    """The object and dotted name of one harmless ``allow_globals`` entry."""
    return allowed_globals([spec])[0]


def global_name(spec: GlobalSpec) -> str:
    """The dotted name of a harmless ``allow_globals`` entry."""
    return resolve_global(spec)[1]


def allowed_pairs(allow: Sequence[GlobalSpec]) -> list[tuple[Any, str]]:
    """(object, name) pairs to allow for ``allow``: each object under every name a pickle may
    use for it, and with ``numpy.dtype`` its concrete classes, which torch rebuilds a pickled
    dtype as although no file names them."""
    objects = [obj for obj, _ in allowed_globals(allow)]
    if not objects:
        return []
    harmless = _harmless_objects()
    numpy_dtype = dict(harmless).get("numpy.dtype")
    with_dtypes = numpy_dtype is not None and any(obj is numpy_dtype for obj in objects)
    return [
        (obj, name)
        for name, obj in harmless
        if any(obj is o for o in objects) or (with_dtypes and name.startswith("numpy.dtypes."))
    ]


def safe_globals_scope(allow: Sequence[GlobalSpec]) -> AbstractContextManager[Any]:
    """``allow`` allowed for one ``torch.load`` (torch's ``safe_globals``; nothing leaks)."""
    pairs: list[Any] = allowed_pairs(allow)
    return torch.serialization.safe_globals(pairs) if pairs else nullcontext()


def recorded_globals(path: Path, allow: Sequence[GlobalSpec]) -> tuple[str, ...]:
    """The allowed globals to record for a file read with ``allow``: those the file names, as
    it spells them (so exported code allows exactly that spelling), then any other entry."""
    resolved = allowed_globals(allow)
    named = [name for name in unsafe_globals(path, "", ()) if is_harmless(name)]
    covered = [_import(harmless_location(name)) for name in named]
    rest = [name for obj, name in resolved if not any(obj is c for c in covered)]
    return tuple(dict.fromkeys([*named, *rest]))


def safe_globals_lines(names: Sequence[str]) -> list[str]:
    """Plain-Python lines that put in ``safe`` the (object, name) pairs for
    ``torch.serialization.safe_globals``: each harmless global under the name the file spells it
    with, imported from where it lives here, and numpy's concrete dtype classes with
    ``numpy.dtype`` (numpy builds a dtype as one of them; the file never names them)."""
    where = {name: harmless_location(name) for name in names}
    lines = [
        "import importlib",
        "",
        "def allowed(name, location):  # a pickle global, allowed under the name the file uses",
        "    module, _, attr = location.rpartition('.')",
        "    return (getattr(importlib.import_module(module), attr), name)",
        "",
        "file_globals = {  # the harmless pickle globals this checkpoint names: where each lives",
        *(f"    {name!r}: {location!r}," for name, location in where.items()),
        "}",
        "safe = [allowed(name, location) for name, location in file_globals.items()]",
    ]
    if "numpy.dtype" in names:
        lines += [
            "# numpy.dtype(...) builds an instance of a concrete class the file does not name",
            "dtypes = importlib.import_module('numpy.dtypes').__all__",
            "safe += [allowed(f'numpy.dtypes.{n}', f'numpy.dtypes.{n}') for n in dtypes]",
        ]
    return lines


#: torch refusals that are about globals (not damage)
GLOBALS_REFUSAL = re.compile(
    r"Unsupported global|allowlisted via|unrecognized function|GLOBAL \S+ whose"
)
# the names such a refusal mentions
_NAMED_IN_REFUSAL = re.compile(r"GLOBAL ([\w.]+)|<class '([\w.]+)'>")


def unsafe_globals(path: Path, message: str, allowed: Sequence[str]) -> list[str]:
    """Every global a file needs beyond torch's defaults and ``allowed``: read statically from
    the file (nothing is imported or called), plus any that torch's refusal ``message`` names."""
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


def _harmless_list_text() -> str:
    return ", ".join(
        "numpy.dtypes.* (numpy's concrete dtype classes)" if "*" in name else name
        for name in HARMLESS_GLOBALS
    )


def _only_trusted(them: str, *, command_line: bool) -> str:
    allow = "--allow-global" if command_line else "allow_globals=[...]"
    trusted = "--trusted" if command_line else "trusted=True"
    return (
        f"{allow} cannot allow {them}: the only way to read a file that needs {them} is "
        f"{trusted}, which would run that code. Use it only for a file you made yourself or "
        "fully trust; otherwise ask for the weights alone (a state dict saved with torch.save, "
        "or a .safetensors file)."
    )


def refusal_text(
    where: str | Path, needed: Sequence[str], allowed: Sequence[str], *, command_line: bool
) -> str:
    """Why a file was refused and the one opt-in that reads it: the same words for the Python
    API and the command line, only the opt-in spelled for each (``command_line``).

    ``needed`` is every global the file needs beyond what is allowed: all are listed at once.
    When all of them are harmless the opt-in is allowing exactly them; when any is not, it is
    ``trusted=True`` alone, named as running the file's code, with no call to copy.
    """
    listed = ", ".join(needed)
    option = "--allow-global" if command_line else "allow_globals"
    if not needed:
        head = (
            f"{where}: this checkpoint needs pickle globals that could not be read from the "
            "file; they could be anything, including ones that run code."
        )
    elif allowed:
        head = f"{where}: this checkpoint also needs pickle globals not in {option}: {listed}."
    else:
        head = (
            f"{where}: this checkpoint needs pickle globals that are not allowed by default: "
            f"{listed}."
        )
    code = [n for n in needed if runs_code(n)]
    if needed and not code:
        everything = [*allowed, *needed]
        if command_line:
            call = "run again with " + " ".join(f"--allow-global {n}" for n in everything)
        else:
            call = f"ckptviz.read_checkpoint({str(where)!r}, allow_globals={everything!r})"
        return (
            f"{head} Each is on ckptviz's short list of harmless globals: rebuilding it runs "
            "nothing the file chooses. Nothing from it ran. To read it, allow exactly these "
            f"for this read: {call}."
        )
    if code:
        one = len(code) == 1
        named = code[0] if one else f"{', '.join(code[:-1])} and {code[-1]}"
        head += (
            f" {named} {'is' if one else 'are'} not on ckptviz's list of harmless globals: a "
            f"pickle can call {'it' if one else 'them'} with arguments of its choosing, so "
            f"{'it' if one else 'they'} can run any code on this machine."
        )
    them = "it" if len(code) == 1 else "them"
    return f"{head} Nothing from it ran. {_only_trusted(them, command_line=command_line)}"


def refusal(
    where: str | Path, needed: Sequence[str], allowed: Sequence[str]
) -> UnsafeCheckpointError:
    """The error for a file that needs the globals ``needed`` (see ``refusal_text``)."""
    return UnsafeCheckpointError(
        refusal_text(where, needed, allowed, command_line=False),
        list(needed),
        command_line_message=refusal_text(where, needed, allowed, command_line=True),
    )


def unsafe_error(path: Path, exc: Exception, allowed: Sequence[str]) -> UnsafeCheckpointError:
    """The error for a torch file whose load torch refused over a global: every global it
    needs, read from the file, not only the one torch stopped at."""
    return refusal(path, unsafe_globals(path, str(exc), allowed), allowed)


def not_allowable(names: Sequence[str]) -> UnsafeCheckpointError:
    """The error for ``allow_globals`` entries off the harmless list."""

    def text(command_line: bool) -> str:
        option = "--allow-global" if command_line else "allow_globals"
        them = "it" if len(names) == 1 else "them"
        return (
            f"{option}: {', '.join(names)} cannot be allowed by name: {option} takes only "
            "ckptviz's short list of harmless globals, by their full dotted name as a refusal "
            f"lists them{'' if command_line else ' (or the objects themselves)'}: "
            f"{_harmless_list_text()}. Any other global can be called by a pickle with "
            "arguments of its choosing, which can run any code. Nothing was read. "
            + _only_trusted(them, command_line=command_line)
        )

    return UnsafeCheckpointError(text(False), list(names), command_line_message=text(True))
