"""The data model: a checkpoint's tensors as metadata, and the guarded way to their data.

``TensorInfo`` is one tensor without its data, ``Checkpoint`` a source's tensors with where they
were found, ``FileFingerprint`` what notices a file replaced since it was read, and
``TensorSource`` the open checkpoint that fetches data one tensor at a time, checking each
against what was read. ``DeclaredTensor`` is a tensor as a file's pickle declares it (storage,
offset, shape, stride), before any data is read.
"""

from __future__ import annotations

import gc
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ckptviz.core.errors import CheckpointError
from ckptviz.core.text import visible

if TYPE_CHECKING:
    from ckptviz.core.formats.peft_adapter import AdapterConfig


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``: the spelling used in tables and JSON."""
    return str(dtype).removeprefix("torch.")


class DtypeNames(dict[torch.dtype, str]):
    """dtype -> name, remembered: reading a large checkpoint asks for a few dtypes many times."""

    def __missing__(self, dtype: torch.dtype) -> str:
        self[dtype] = name = dtype_name(dtype)
        return name


#: dtype -> name for the dtypes seen so far
dtype_names = DtypeNames()


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"unknown dtype {name!r}: expected a torch dtype name like 'float32'")
    return dtype


#: Bytes per element of every torch dtype, by name.
ITEMSIZES = {
    dtype_name(dtype): dtype.itemsize
    for dtype in vars(torch).values()
    if isinstance(dtype, torch.dtype)
}


#: Most dimensions a declared tensor may have: torch's own kernels stop at 64 (``MAX_DIMS``
#: in its TensorIterator), so a file declaring more is damaged or crafted.
MAX_RANK = 64
#: torch holds sizes, strides and offsets as signed 64-bit integers.
INT64_LIMIT = 2**63


class InvalidDeclaration(CheckpointError):
    """A tensor declared with a key, shape, dtype or size that no torch tensor can have.

    Raised by ``TensorInfo`` itself, so no format can hand one on; the reader that built it
    adds the file's name (``declarations_of``).
    """


def declaration_problem(key: object, shape: object, dtype: object, nbytes: object) -> str | None:
    """Why a declaration is not one of a torch tensor, or ``None`` when it is."""
    if type(key) is not str:
        return f"has a key of type {type(key).__name__}, not a string"
    if type(shape) is not tuple:
        return f"has a shape of type {type(shape).__name__}, not a tuple of sizes"
    if len(shape) > MAX_RANK:
        return f"has {len(shape)} dimensions, more than the {MAX_RANK} torch supports"
    numel = 1
    for size in shape:
        if type(size) is not int or not 0 <= size < INT64_LIMIT:
            return f"has a shape {shape!r} that is not a tuple of non-negative 64-bit integers"
        numel *= size
    if numel >= INT64_LIMIT:
        return f"has a shape {list(shape)} of more elements than torch can count"
    itemsize = ITEMSIZES.get(dtype) if type(dtype) is str else None
    if itemsize is None:
        return f"has dtype {dtype!r}, which is not a torch dtype"
    if type(nbytes) is not int or nbytes != numel * itemsize:
        return f"declares {nbytes!r} bytes, but {list(shape)} {dtype} is {numel * itemsize:,}"
    return None


@dataclass(frozen=True, init=False)
class TensorInfo:
    """What is known about one checkpoint tensor without reading its data.

    Checked when built: ``key`` a ``str``, ``shape`` a tuple of non-negative ``int`` (at most
    ``MAX_RANK``), ``dtype`` the name of a torch dtype and ``nbytes`` what they make; anything
    else raises ``InvalidDeclaration``. Everything downstream (tables, the widget, generated
    code) can rely on that.
    """

    key: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    #: for tensors read from a live module: "parameter" or "buffer", and the owning module's class
    kind: str | None = None
    module_type: str | None = None

    def __init__(
        self,
        key: str,
        shape: tuple[int, ...],
        dtype: str,
        nbytes: int,
        kind: str | None = None,
        module_type: str | None = None,
    ) -> None:
        # Checked before anything is set. The common case inline (a table of 100,000 tensors
        # builds 100,000 of these); any doubt goes to declaration_problem, which says what is
        # wrong. Fields are written one by one, in one order, into the instance's dict: it
        # stays a key-sharing dict (64 bytes more a tensor than object.__setattr__, which costs
        # 1 us more a tensor, a third of a second at 100,000 rows on both sides; a single
        # ``__dict__.update`` would unshare the keys, ~200 bytes more).
        if type(key) is str and type(shape) is tuple and len(shape) <= MAX_RANK:
            limit, numel = INT64_LIMIT, 1
            for size in shape:
                if not (type(size) is int and 0 <= size < limit):
                    break
                numel *= size
            else:
                itemsize = ITEMSIZES.get(dtype) if type(dtype) is str else None
                if (
                    itemsize is not None
                    and numel < limit
                    and type(nbytes) is int
                    and nbytes == numel * itemsize
                ):
                    _write_fields(self.__dict__, key, shape, dtype, nbytes, kind, module_type)
                    return
        problem = declaration_problem(key, shape, dtype, nbytes)
        raise InvalidDeclaration(f"tensor {_shown(key)} {problem}")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _write_fields(
    fields: dict[str, Any],
    key: str,
    shape: tuple[int, ...],
    dtype: str,
    nbytes: int,
    kind: str | None,
    module_type: str | None,
) -> None:
    """A ``TensorInfo``'s fields, one by one in one order, into its instance dict: the one
    place that lists them (the dict stays key-sharing)."""
    fields["key"] = key
    fields["shape"] = shape
    fields["dtype"] = dtype
    fields["nbytes"] = nbytes
    fields["kind"] = kind
    fields["module_type"] = module_type


def trusted_tensor_info(
    key: str,
    shape: tuple[int, ...],
    dtype: str,
    nbytes: int,
    kind: str | None = None,
    module_type: str | None = None,
) -> TensorInfo:
    """A ``TensorInfo`` of a live torch tensor, unchecked: only for what torch itself
    guarantees (a plain ``str`` key, non-negative 64-bit sizes, a real dtype and the bytes they
    make). Torch makes tensors of more than ``MAX_RANK`` dimensions: those go through the
    checked constructor, which refuses them. Data from a file never comes here."""
    if len(shape) > MAX_RANK:
        return TensorInfo(key, shape, dtype, nbytes, kind, module_type)
    info = object.__new__(TensorInfo)
    _write_fields(info.__dict__, key, shape, dtype, nbytes, kind, module_type)
    return info


class DtypeFacts(dict[torch.dtype, tuple[str, int]]):
    """dtype -> (name, bytes an element), remembered: one look-up a tensor for both."""

    def __missing__(self, dtype: torch.dtype) -> tuple[str, int]:
        name = dtype_names[dtype]
        self[dtype] = facts = (name, ITEMSIZES[name])
        return facts


#: dtype -> (name, ``ITEMSIZES`` of the name) for the dtypes seen so far
dtype_facts = DtypeFacts()


def _shown(key: object) -> str:
    """A key as error text: its repr, cut short (a hostile key may be megabytes long)."""
    text = repr(key)
    return text if len(text) <= 200 else f"{text[:200]}..."


@contextmanager
def declarations_of(source: object) -> Iterator[None]:
    """Name ``source`` (the file) in an ``InvalidDeclaration`` raised while reading it."""
    try:
        yield
    except InvalidDeclaration as exc:
        raise CheckpointError(
            f"{source}: {exc}. The checkpoint is damaged or was crafted; nothing was read from "
            "it. Re-save it (torch.save or safetensors) from the model that wrote it."
        ) from None


class NotPlain(Exception):
    """The pickle holds more than plain tensors in dicts: ``torch.load`` must read it."""


class _Sealed:
    """Set once in ``__init__``, never again: a pickle's BUILD (``__setstate__``) or any later
    attribute write on a declaration is refused, so what was checked is what is read."""

    __slots__ = ()

    def __setattr__(self, name: str, value: object) -> None:
        raise NotPlain(f"a write to {name!r} of a declared {type(self).__name__}")

    def __delattr__(self, name: str) -> None:
        raise NotPlain(f"a delete of {name!r} of a declared {type(self).__name__}")

    def __setstate__(self, state: object) -> None:
        raise NotPlain(f"a pickle BUILD on a declared {type(self).__name__}")

    def __reduce__(self) -> Any:
        raise TypeError(f"a declared {type(self).__name__} is not picklable")


class DeclaredStorage(_Sealed):
    """A storage as a torch zip file's pickle declares it: its record, dtype and element count."""

    __slots__ = ("dtype", "key", "numel")
    dtype: str
    key: str
    numel: int

    def __init__(self, key: str, dtype: str, numel: int) -> None:
        if not 0 <= numel < INT64_LIMIT:
            raise NotPlain("a storage of a negative or overflowing size")
        set_key, set_dtype, set_numel = _STORAGE_SLOTS
        set_key(self, key)
        set_dtype(self, dtype)
        set_numel(self, numel)


def _slot_setters(cls: type, *names: str) -> tuple[Callable[[Any, Any], None], ...]:
    """The setters of ``cls``'s slots, past its sealed ``__setattr__``: calling a slot's own
    descriptor is the cheapest write, and a file of 500,000 tensors makes millions."""
    return tuple(cls.__dict__[name].__set__ for name in names)


_STORAGE_SLOTS = _slot_setters(DeclaredStorage, "key", "dtype", "numel")


class DeclaredTensor(_Sealed):
    """A tensor as a torch zip file's pickle declares it: which storage, where, what shape.

    Refuses (``NotPlain``) what torch's ``set_`` would refuse or not read the same way: a
    size, stride or offset that is not a non-negative 64-bit ``int``, sizes and strides of
    different lengths or more than ``MAX_RANK``, or elements beyond its storage.
    """

    __slots__ = ("nbytes", "numel", "offset", "shape", "storage", "stride")
    storage: DeclaredStorage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    numel: int
    nbytes: int

    def __init__(
        self,
        storage: DeclaredStorage,
        offset: int,
        shape: tuple[int, ...],
        stride: tuple[int, ...],
    ) -> None:
        limit = INT64_LIMIT  # a local: read four times a dimension
        if not (
            type(offset) is int
            and type(shape) is tuple
            and type(stride) is tuple
            and 0 <= offset < limit
            and len(shape) == len(stride) <= MAX_RANK
        ):
            raise NotPlain("an unusual tensor")
        numel, last = 1, offset
        for size, step in zip(shape, stride, strict=True):
            if not (
                type(size) is int and type(step) is int and 0 <= size < limit and 0 <= step < limit
            ):
                raise NotPlain("a tensor with a size or stride torch would not take")
            numel *= size
            last += (size - 1) * step
        if numel >= limit or not (last < storage.numel if numel else offset <= storage.numel):
            raise NotPlain("a tensor beyond its storage")
        set_storage, set_offset, set_shape, set_stride, set_numel, set_nbytes = _TENSOR_SLOTS
        set_storage(self, storage)
        set_offset(self, offset)
        set_shape(self, shape)
        set_stride(self, stride)
        set_numel(self, numel)
        set_nbytes(self, numel * ITEMSIZES[storage.dtype])


_TENSOR_SLOTS = _slot_setters(
    DeclaredTensor, "storage", "offset", "shape", "stride", "numel", "nbytes"
)


@dataclass(frozen=True)
class FileFingerprint:
    """What notices a file replaced or rewritten since it was read.

    Size and modification time catch most changes; the inode catches a same-size file moved into
    place (``os.replace``), and the status-change time a same-size rewrite in place whose
    modification time was set back (``os.utime``, some copy tools). A rewrite within one tick of
    the file system's clock that restores the modification time can still pass: no fingerprint
    short of reading every byte again catches that.
    """

    size: int
    mtime_ns: int
    inode: int = 0
    ctime_ns: int = 0

    @classmethod
    def of(cls, path: Path) -> FileFingerprint:
        return cls.of_stat(path.stat())

    @classmethod
    def of_stat(cls, stat: os.stat_result) -> FileFingerprint:
        return cls(stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns)

    def change_to(self, now: FileFingerprint) -> str | None:
        """How ``now`` differs from this fingerprint, in words (``None``: it does not)."""
        if now == self:
            return None
        if now.size != self.size:
            return f"size {self.size:,} -> {now.size:,} bytes"
        if now.inode != self.inode:
            return "replaced by another file of the same size"
        return "rewritten in place (same size, new modification or status-change time)"


class TensorSource(Mapping[str, torch.Tensor]):
    """An open checkpoint: ``source[key]`` fetches one tensor's data (CPU; from a file, a copy).

    ``get_many(keys)`` fetches several at once: formats that read faster in one go (a DCP
    directory loads them in one pass) give ``fetch_many``; others fetch one key at a time
    (``reads_at_once`` says which). ``changes()`` says whether a file the data comes from changed
    since the checkpoint was read: formats whose data lives in more files than
    ``Checkpoint.path`` (shards, DCP data files) give ``changes`` to check those too.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        fetch: Callable[[str], torch.Tensor],
        fetch_many: Callable[[list[str]], dict[str, torch.Tensor]] | None = None,
        *,
        changes: Callable[[], str | None] | None = None,
    ) -> None:
        self._checkpoint = checkpoint
        self._fetch = fetch
        self._fetch_many = fetch_many
        self._changes = changes

    @property
    def reads_at_once(self) -> bool:
        """Whether ``get_many`` reads its keys in one pass (else one key at a time, on demand)."""
        return self._fetch_many is not None

    def changes(self) -> str | None:
        """What changed in the files this data is read from since the checkpoint was read:
        ``"<file>: <how>"``, or ``None`` when nothing did. Apply and statistics ask once they
        are done, so data read from a file rewritten meanwhile is never reported as good."""
        changed = self._checkpoint.changes()
        if changed is None and self._changes is not None:
            changed = self._changes()
        return changed

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
    share one storage. ``adapter`` is the config of a PEFT adapter read with its
    ``adapter_config.json`` (``None`` for anything else).
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
    adapter: AdapterConfig | None = None
    _opener: Callable[[Checkpoint], AbstractContextManager[TensorSource]] | None = field(
        default=None, repr=False
    )
    #: only ``checkpoint_from_object`` sets it: ``tensor_table`` made every ``TensorInfo`` of
    #: ``tensors`` and put it under its own key, so that each sits under its own key is known
    #: (a check of 7 ms at 100,000 tensors); ``dataclasses.replace`` checks again
    _keys_checked: InitVar[bool] = False

    def __post_init__(self, _keys_checked: bool) -> None:
        if _keys_checked:
            return
        # every TensorInfo checked itself when built; here each must sit under its own key
        for key, info in self.tensors.items():
            if not isinstance(info, TensorInfo) or info.key != key:
                raise CheckpointError(
                    f"{self.source}: the entry {_shown(key)} does not describe a tensor of that "
                    "name; the checkpoint is damaged or was crafted. Re-save it."
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

    def changes(self) -> str | None:
        """``"<file>: <how it changed>"`` if the file was replaced, rewritten, truncated or
        deleted since it was read, else ``None`` (also for a checkpoint with no file)."""
        if self.path is None or self.fingerprint is None:
            return None
        try:
            now = FileFingerprint.of(self.path)
        except OSError as exc:
            return f"{self.path}: gone ({exc.strerror})"
        how = self.fingerprint.change_to(now)
        return None if how is None else f"{self.path}: {how}"

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
                f"{self.path}: the file changed since it was read "
                f"({self.fingerprint.change_to(now)}); compare again before applying."
            )


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


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
