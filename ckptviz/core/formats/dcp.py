"""torch.distributed.checkpoint (DCP) directories, as FSDP/DTensor trainers write them.

A DCP directory holds ``.metadata`` (a pickle describing every entry: global shape, dtype, which
chunks sit in which ``*.distcp`` file) and the data files. Reading needs only ``.metadata`` and no
process group; tensor data comes through DCP's own single-process load path
(``torch.distributed.checkpoint.load(..., no_dist=True)``), which reassembles tensors saved in
chunks by many ranks.

``.metadata`` is untrusted input. torch's own ``FileSystemReader.read_metadata`` unpickles it
with plain ``pickle.load`` (it could run any code), and torch's ``weights_only`` unpickler cannot
read it (protocol-4 frames), so it is read here with an unpickler that only builds DCP's own
metadata classes, torch sizes, dtypes and layouts, and paths; it must be a regular file of at
most ``MAX_METADATA_BYTES``. Its content is checked too: data files must be plain file names in
the directory; every tensor's chunks must tile it exactly (no value left unset, none written
twice), each with a storage record large enough to hold it. Non-tensor entries (pickled Python
objects) are listed as skipped and never unpickled. Whatever torch's loader raises (its
``CheckpointException`` derives from ``BaseException``) becomes ``CheckpointError``.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import math
import pathlib
import pickle
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ckptviz.core._torch_private import (
    dcp_legacy_metadata_classes,
    dcp_private_metadata_classes,
    dcp_storage_info_class,
    pickled_layout_global,
)
from ckptviz.core.checkpoint import Checkpoint, FileFingerprint, TensorSource
from ckptviz.core.errors import CheckpointError, torch_reason
from ckptviz.core.errors import first_line as _first_line
from ckptviz.core.formats import base
from ckptviz.core.formats.base import FileFormat, SliceReader
from ckptviz.core.formats.sharded import member_file, read_regular_file
from ckptviz.core.locate import checkpoint_from_object as _checkpoint_from_object
from ckptviz.core.safety import GlobalSpec, allowed_globals, allowed_pairs, refusal

METADATA_NAME = ".metadata"
#: The largest ``.metadata`` read. DCP pickles ~150-250 bytes per chunk, so this holds about five
#: million chunks (1,000 tensors each sharded over 5,000 ranks).
MAX_METADATA_BYTES = 2**30
#: Chunk layouts split along more dimensions of one tensor are refused: the exact coverage check
#: costs 2**dims per chunk, and real sharding (FSDP, tensor, expert parallel) splits one to three.
MAX_SPLIT_DIMS = 6


def is_dcp(path: Path, head: bytes) -> bool:
    """A directory holding ``.metadata`` (any kind of file but a directory: ``read_dcp`` refuses
    a FIFO or device by name), or that ``.metadata`` file itself."""
    if path.is_dir():
        entry = path / METADATA_NAME
        try:
            entry.lstat()
        except OSError:
            return False
        return not entry.is_dir()
    return path.name == METADATA_NAME and head[:1] == b"\x80"


# -- reading .metadata safely ------------------------------------------------------------------


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """(module, name) -> object for everything a DCP ``.metadata`` pickle may name."""
    import torch.distributed.checkpoint.metadata as dcp_metadata

    allowed: dict[tuple[str, str], Any] = {}
    classes: tuple[type, ...] = (
        dcp_metadata.Metadata,
        dcp_metadata.MetadataIndex,
        dcp_metadata.TensorStorageMetadata,
        dcp_metadata.BytesStorageMetadata,
        dcp_metadata.ChunkStorageMetadata,
        dcp_metadata.TensorProperties,
        dcp_metadata.StorageMeta,
        *dcp_private_metadata_classes(),
        *dcp_legacy_metadata_classes(),
    )
    for cls in classes:
        allowed[(cls.__module__, cls.__qualname__)] = cls
    allowed[("torch", "Size")] = torch.Size
    for name, value in vars(torch).items():
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            allowed[("torch", name)] = value
    layout_global, get_layout = pickled_layout_global()
    allowed[layout_global] = get_layout
    for path_type in (pathlib.PurePosixPath, pathlib.PureWindowsPath, pathlib.PosixPath):
        allowed[("pathlib", path_type.__name__)] = path_type
    return allowed


class _Refused:
    """Stands in for a global that is not allowed, so unpickling can go on to list them all."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, stream: io.BufferedIOBase, allowed: Mapping[tuple[str, str], Any]):
        super().__init__(stream)
        self.allowed = allowed
        self.refused: list[str] = []

    def find_class(self, module: str, name: str) -> Any:
        found = self.allowed.get((module, name))
        if found is not None:
            return found
        self.refused.append(f"{module}.{name}")
        return _Refused


def read_metadata(folder: Path, *, trusted: bool = False, allow: Sequence[GlobalSpec] = ()) -> Any:
    """The ``Metadata`` of a DCP directory, unpickled without running code (unless trusted)."""
    path = folder / METADATA_NAME
    try:
        from torch.distributed.checkpoint.metadata import Metadata

        allowed = _allowed_globals()
    except ImportError as exc:  # torch built without distributed support
        raise CheckpointError(
            f"{path}: a torch.distributed.checkpoint directory, but this torch "
            f"{torch.__version__} has no usable torch.distributed ({_first_line(exc)}); read it "
            "with a torch build that has it (the standard Linux, macOS and Windows wheels do)."
        ) from None
    for obj, name in allowed_pairs(allow):  # refuses any that can run code
        module, _, attr = name.rpartition(".")
        allowed[(module, attr)] = obj
    raw = read_regular_file(
        path, limit=MAX_METADATA_BYTES, what="a torch.distributed.checkpoint metadata file"
    )
    try:
        stream = io.BytesIO(raw)
        if trusted:
            metadata = pickle.load(stream)
            refused: list[str] = []
        else:
            unpickler = _MetadataUnpickler(stream, allowed)
            metadata = unpickler.load()
            refused = sorted(dict.fromkeys(unpickler.refused))
    except Exception as exc:
        raise CheckpointError(
            f"{path}: not a readable torch.distributed.checkpoint metadata file "
            f"({_first_line(exc)}). It may be truncated or damaged; save the checkpoint again."
        ) from None
    if refused:
        raise refusal(folder, refused, [name for _, name in allowed_globals(allow)])
    if not isinstance(metadata, Metadata):
        raise CheckpointError(
            f"{path}: expected torch.distributed.checkpoint Metadata, found "
            f"{type(metadata).__name__}; this is not a DCP checkpoint directory."
        )
    return metadata


# -- checking what .metadata says ----------------------------------------------------------------


def _size(value: Any) -> tuple[int, ...] | None:
    if not isinstance(value, (torch.Size, tuple, list)):
        return None
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value):
        return None
    return tuple(value)


Box = tuple[tuple[int, ...], tuple[int, ...]]
"""A chunk: its offsets in the tensor and its sizes, one int per dimension."""


def _describe(number: int, box: Box) -> str:
    return f"chunk {number} (offsets {list(box[0])}, sizes {list(box[1])})"


def _covering(boxes: Sequence[Box], element: tuple[int, ...]) -> list[int]:
    """The numbers of the chunks that hold ``element``."""
    return [
        number
        for number, (offsets, sizes) in enumerate(boxes)
        if all(o <= e < o + s for o, s, e in zip(offsets, sizes, element, strict=True))
    ]


def tiling_problems(shape: tuple[int, ...], boxes: Sequence[Box]) -> list[str]:
    """Why ``boxes`` (each inside ``shape``) do not hold every element exactly once; [] if they do.

    Exact, in O(n * 2**k) for n chunks split along k dimensions (dimensions every chunk spans
    whole are left out). A box's indicator function is a signed sum of the orthants
    {x >= corner} at its 2**k corners, and orthants at distinct corners are linearly
    independent; so the chunks cover each element exactly once if and only if their signed
    corner weights, minus the tensor's own, cancel at every corner. When they do not, the
    smallest corner left with a weight (in lexicographic order) is an element held 1 + weight
    times, and the largest, one step back in every dimension, is wrong too: each is reported with
    the chunks holding it.
    """
    numel = 1
    for size in shape:
        numel *= size
    if numel == 0:
        return []
    split = [d for d in range(len(shape)) if any(o[d] != 0 or s[d] != shape[d] for o, s in boxes)]
    if len(split) > MAX_SPLIT_DIMS:
        return [
            f"it is split along {len(split)} dimensions, more than the {MAX_SPLIT_DIMS} whose "
            "coverage ckptviz checks, so it cannot be verified"
        ]
    # corner i of a box takes the upper end in the dimensions where choice i is True, in the
    # order itertools.product yields them; its sign is -1 for an odd number of upper ends
    choices = itertools.product((False, True), repeat=len(split))
    signs = [-1 if sum(upper) % 2 else 1 for upper in choices]
    weights: dict[tuple[int, ...], int] = {}

    def add(offsets: tuple[int, ...], sizes: tuple[int, ...], sign: int) -> None:
        ends = [(offsets[d], offsets[d] + sizes[d]) for d in split]
        for corner, corner_sign in zip(itertools.product(*ends), signs, strict=True):
            weights[corner] = weights.get(corner, 0) + sign * corner_sign

    total = 0
    for offsets, sizes in boxes:
        volume = 1
        for size in sizes:
            volume *= size
        if volume:  # an empty chunk holds nothing (and its corners would cancel anyway)
            total += volume
            add(offsets, sizes, 1)
    add((0,) * len(shape), shape, -1)
    wrong = [corner for corner, weight in weights.items() if weight]
    if not wrong:
        return []
    witnesses = [min(wrong), tuple(c - 1 for c in max(wrong))]
    problems = []
    for witness in dict.fromkeys(witnesses):
        element = [0] * len(shape)
        for d, c in zip(split, witness, strict=True):
            element[d] = c
        holders = _covering(boxes, tuple(element))
        if not holders:
            problems.append(f"element {element} is in no chunk")
        elif len(holders) > 1:
            named = ", ".join(_describe(n, boxes[n]) for n in holders[:3])
            more = f" and {len(holders) - 3} more" if len(holders) > 3 else ""
            problems.append(f"element {element} is in {len(holders)} chunks: {named}{more}")
    if total != numel:
        problems.append(f"their sizes add up to {total:,} of its {numel:,} values")
    return problems


def _check_chunks(where: str, fqn: str, shape: tuple[int, ...], chunks: Any) -> list[Box]:
    """The chunks of ``fqn``, each inside the tensor, together holding each value once."""
    if not isinstance(chunks, list):
        raise CheckpointError(f"{where}: {fqn!r} has no chunk list; the metadata is damaged.")
    boxes: list[Box] = []
    for number, chunk in enumerate(chunks):
        offsets, sizes = (
            _size(getattr(chunk, "offsets", None)),
            _size(getattr(chunk, "sizes", None)),
        )
        if (
            offsets is None
            or sizes is None
            or len(offsets) != len(shape)
            or len(sizes) != len(shape)
            or any(o + s > d for o, s, d in zip(offsets, sizes, shape, strict=True))
        ):
            raise CheckpointError(
                f"{where}: {fqn!r} {list(shape)} has chunk {number} at {offsets} of size {sizes}, "
                "which does not lie inside it (offsets and sizes must be non-negative integers); "
                "the metadata is damaged or crafted. Save the checkpoint again."
            )
        boxes.append((offsets, sizes))
    problems = tiling_problems(shape, boxes)
    if problems:
        raise CheckpointError(
            f"{where}: the {len(boxes)} chunk(s) of {fqn!r} {list(shape)} do not hold each of "
            f"its values exactly once: {'; '.join(problems)}. Loading it would leave values "
            "unset or write them twice. The checkpoint is incomplete (a rank's files "
            "missing?), damaged or crafted; save it again or use another copy."
        )
    return boxes


def _check_records(
    where: str,
    fqn: str,
    boxes: Sequence[Box],
    itemsize: int,
    records: Mapping[tuple[str, tuple[int, ...]], Any],
) -> None:
    """Each non-empty chunk has a storage record, big enough unless it is transformed."""
    for number, (offsets, sizes) in enumerate(boxes):
        volume = 1
        for size in sizes:
            volume *= size
        if not volume:
            continue  # DCP reads nothing for it
        record = records.get((fqn, offsets))
        if record is None:
            raise CheckpointError(
                f"{where}: {fqn!r} {_describe(number, (offsets, sizes))} has no storage record "
                "(the table of where each chunk's bytes are); the metadata is damaged or from "
                "another save. Save the checkpoint again."
            )
        if not record.transform_descriptors and record.length < volume * itemsize:
            raise CheckpointError(
                f"{where}: {fqn!r} {_describe(number, (offsets, sizes))} needs at least "
                f"{volume * itemsize:,} bytes, but its storage record in {record.relative_path} "
                f"has {record.length:,}; the metadata is damaged. Save the checkpoint again."
            )


Records = dict[tuple[str, tuple[int, ...]], Any]
"""(fqn, chunk offsets) -> where that chunk's bytes are (a DCP ``_StorageInfo``)."""


def _check_storage(folder: Path, metadata: Any) -> tuple[dict[str, FileFingerprint], Records]:
    """Every data file the metadata points into: a plain name in ``folder``; their fingerprints,
    and the storage records by (fqn, offsets)."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    storage_info = dcp_storage_info_class()

    where = str(folder / METADATA_NAME)
    storage = metadata.storage_data
    if not isinstance(storage, dict):
        raise CheckpointError(
            f"{where}: has no storage table (written by a storage other than the file "
            "system?); expected a directory written by torch.distributed.checkpoint.save."
        )
    files: dict[str, FileFingerprint] = {}
    records: Records = {}
    for index, info in storage.items():
        if (
            not isinstance(index, MetadataIndex)
            or not isinstance(info, storage_info)
            or not isinstance(index.fqn, str)
        ):
            raise CheckpointError(f"{where}: malformed storage entry {index!r}; it is damaged.")
        name = info.relative_path
        offset, length = info.offset, info.length
        if not (isinstance(offset, int) and isinstance(length, int) and offset >= 0 <= length):
            raise CheckpointError(
                f"{where}: {index.fqn!r} has offset {offset!r} and length {length!r} in {name!r}; "
                "expected non-negative integers. The metadata is damaged."
            )
        descriptors = info.transform_descriptors
        if descriptors is not None and not (
            isinstance(descriptors, (list, tuple)) and all(isinstance(d, str) for d in descriptors)
        ):
            raise CheckpointError(f"{where}: {index.fqn!r} has malformed transform descriptors.")
        if name not in files:
            member = member_file(folder, name, what=f"{where}: {index.fqn!r} is stored in")
            files[name] = FileFingerprint.of(member)
        if offset + length > files[name].size:
            raise CheckpointError(
                f"{where}: {index.fqn!r} is stored at bytes {offset}..{offset + length} of "
                f"{name}, which has {files[name].size} bytes; the file is truncated."
            )
        offsets = _size(index.offset)
        if offsets is not None:
            records[(index.fqn, offsets)] = info
    return files, records


class PickledObject:
    """Stands for a non-tensor DCP entry (a pickled Python object): listed, never unpickled."""


def _entries(
    where: str, metadata: Any, records: Records
) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """A nested dict of meta tensors in the saved structure, and each leaf's path -> fqn."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    entries = metadata.state_dict_metadata
    if not isinstance(entries, dict):
        raise CheckpointError(f"{where}: has no entry table; it is damaged.")
    planner_data = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    tree: dict[str, Any] = {}
    fqn_of: dict[tuple[str, ...], str] = {}
    for fqn, entry in entries.items():
        if not isinstance(fqn, str):
            raise CheckpointError(f"{where}: entry name {fqn!r} is not a string; it is damaged.")
        raw_path = planner_data.get(fqn, (fqn,))
        if not isinstance(raw_path, (tuple, list)) or not raw_path:
            raw_path = (fqn,)
        path = tuple(str(p) for p in raw_path)
        if isinstance(entry, TensorStorageMetadata):
            shape = _size(entry.size)
            dtype = getattr(entry.properties, "dtype", None)
            if shape is None or not isinstance(dtype, torch.dtype):
                raise CheckpointError(
                    f"{where}: {fqn!r} has a malformed shape or dtype; the metadata is damaged."
                )
            try:
                value: Any = torch.empty(shape, dtype=dtype, device="meta")
            except (TypeError, RuntimeError):  # more values than torch can count
                raise CheckpointError(
                    f"{where}: {fqn!r} declares shape {list(shape)}, more values than a torch "
                    "tensor can hold; the metadata is damaged or crafted."
                ) from None
            boxes = _check_chunks(where, fqn, shape, entry.chunks)
            _check_records(where, fqn, boxes, dtype.itemsize, records)
        elif isinstance(entry, BytesStorageMetadata):
            value = PickledObject()
        else:
            raise CheckpointError(
                f"{where}: {fqn!r} is described by a {type(entry).__name__}; the metadata is "
                "damaged."
            )
        node = tree
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise CheckpointError(f"{where}: {fqn!r} nests under a value; it is damaged.")
            node = child
        if path[-1] in node:
            raise CheckpointError(f"{where}: {fqn!r} is listed twice; the metadata is damaged.")
        node[path[-1]] = value
        fqn_of[path] = fqn
    return tree, fqn_of


# -- loading tensors through DCP --------------------------------------------------------------


def _vetted_reader(folder: Path, metadata: Any) -> Any:
    """DCP's own file-system reader, handed the metadata read safely here."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class VettedReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return VettedReader(folder)


def load_tensors(
    folder: Path, metadata: Any, wanted: Mapping[str, tuple[tuple[int, ...], torch.dtype]]
) -> dict[str, torch.Tensor]:
    """fqn -> tensor for each wanted fqn, through ``torch.distributed.checkpoint.load``.

    Whatever torch raises becomes ``CheckpointError``, including its ``CheckpointException``
    (a ``BaseException``, which wraps every failure, even an interrupt: that one is re-raised).
    """
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict_loader import load

    state = {fqn: torch.empty(shape, dtype=dtype) for fqn, (shape, dtype) in wanted.items()}
    try:
        with warnings.catch_warnings():
            # no_dist=True is exactly what is meant here; torch still warns about it
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            load(state, storage_reader=_vetted_reader(folder, metadata), no_dist=True)
    except (Exception, CheckpointException) as exc:
        cause = _load_failure(exc)
        if not isinstance(cause, Exception):
            raise cause from None  # KeyboardInterrupt and the like, as they are
        names = ", ".join(repr(fqn) for fqn in list(wanted)[:3])
        more = f" and {len(wanted) - 3} more" if len(wanted) > 3 else ""
        raise CheckpointError(
            f"{folder}: torch.distributed.checkpoint could not load {names}{more} "
            f"({type(cause).__name__}: {torch_reason(cause)}). A data file is damaged or from "
            "another save than .metadata; save the checkpoint again or use another copy."
        ) from None
    return state


def _load_failure(exc: BaseException) -> BaseException:
    """The exception behind torch's ``CheckpointException``, which wraps each rank's failure."""
    for _ in range(8):  # torch nests them at most once or twice
        failures = getattr(exc, "failures", None)
        if not isinstance(failures, dict) or not failures:
            break
        wrapped = next(iter(failures.values()))
        inner = wrapped[0] if isinstance(wrapped, tuple) and wrapped else wrapped
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return exc


def read_dcp(
    path: Path,
    *,
    key: tuple[str, ...] | None,
    trusted: bool,
    allow: Sequence[GlobalSpec],
) -> Checkpoint:
    """A DCP directory (or its ``.metadata``) as a Checkpoint; see the module doc."""
    folder = path if path.is_dir() else path.parent
    metadata_path = folder / METADATA_NAME
    try:
        fingerprint = FileFingerprint.of(metadata_path)
    except OSError as exc:
        raise CheckpointError(f"{metadata_path}: cannot read it ({exc.strerror}).") from None
    metadata = read_metadata(folder, trusted=trusted, allow=allow)
    files, records = _check_storage(folder, metadata)
    tree, fqn_of = _entries(str(metadata_path), metadata, records)
    entries = metadata.state_dict_metadata
    transformed = {
        fqn: list(info.transform_descriptors)
        for (fqn, _), info in records.items()
        if info.transform_descriptors
    }

    def fetch_many(ckpt: Checkpoint, keys: list[str]) -> dict[str, torch.Tensor]:
        fqns = {k: fqn_of[(*ckpt.location, k)] for k in keys}
        for fqn in fqns.values():
            if fqn in transformed:
                raise CheckpointError(
                    f"{metadata_path}: {fqn!r} is stored transformed ({transformed[fqn]}, e.g. "
                    "compressed); ckptviz does not read such records, as it cannot bound or "
                    "check what they expand to. Load it with torch.distributed.checkpoint "
                    "yourself if you trust it, and save it again without _extensions."
                )
        _check_files(folder, files)
        wanted = {
            fqn: (ckpt.tensors[k].shape, entries[fqn].properties.dtype) for k, fqn in fqns.items()
        }
        loaded = load_tensors(folder, metadata, wanted)
        return {k: loaded[fqn] for k, fqn in fqns.items()}

    @contextmanager
    def opener(ckpt: Checkpoint) -> Iterator[TensorSource]:
        yield TensorSource(
            ckpt,
            lambda k: fetch_many(ckpt, [k])[k],
            lambda keys: fetch_many(ckpt, keys),
            changes=lambda: _changed_file(folder, files),
        )

    ckpt = _checkpoint_from_object(
        tree,
        source=str(folder),
        fmt="dcp",
        key=key,
        path=metadata_path,
        opener=opener,
        trusted=trusted,
        allow_globals=tuple(name for _, name in allowed_globals(allow)),
    )
    ckpt.fingerprint = fingerprint  # taken before .metadata was read: a save meanwhile shows
    return ckpt


def _changed_file(folder: Path, files: Mapping[str, FileFingerprint]) -> str | None:
    """``"<file>: <how>"`` for the first data file that changed or went since it was read."""
    for name, before in files.items():
        try:
            now = FileFingerprint.of(folder / name)
        except OSError as exc:
            return f"{folder / name}: gone ({exc.strerror})"
        how = before.change_to(now)
        if how is not None:
            return f"{folder / name}: {how}"
    return None


def _check_files(folder: Path, files: Mapping[str, FileFingerprint]) -> None:
    changed = _changed_file(folder, files)
    if changed is not None:
        raise CheckpointError(
            f"{changed}: the data file changed or is gone since the checkpoint was read; "
            "compare again before applying."
        )


def read_code(ckpt: Checkpoint, keys: list[str]) -> list[str]:
    """Plain-PyTorch lines that put the tensors ``keys`` of a DCP checkpoint in ``state``."""
    assert ckpt.path is not None
    folder = str(ckpt.path.parent)
    wanted = {
        k: (".".join((*ckpt.location, k)), list(ckpt.tensors[k].shape), ckpt.tensors[k].dtype)
        for k in sorted(keys)
    }
    lines = [
        "import torch.distributed.checkpoint as dcp",
        "",
        "# torch's reader unpickles the directory's .metadata fully (it can run code): run this",
        "# only on a checkpoint you trust. ckptviz read it with a restricted unpickler.",
        "wanted = {  # key: (name in the checkpoint, shape, dtype)",
    ]
    lines += [f"    {k!r}: {v!r}," for k, v in wanted.items()]
    lines += [
        "}",
        "flat = {name: torch.empty(shape, dtype=getattr(torch, dtype))",
        "        for name, shape, dtype in wanted.values()}",
        f"dcp.load(flat, checkpoint_id={folder!r}, no_dist=True)",
        "state = {k: flat[name] for k, (name, _, _) in wanted.items()}",
    ]
    return lines


class DcpSlices(SliceReader):
    """Boxes of a DCP directory's tensors, through DCP's own load path on the job's process
    group: its planner helper ``create_read_items_for_chunk_list``, given each box as the local
    chunk, makes the same reads DCP plans for a ``DTensor`` target. DCP reads whole stored
    chunks: those overlapping the box (a checkpoint saved by one process stores each tensor as
    one chunk). Reads are collective: every rank of ``group`` calls ``read_all`` together."""

    collective = True

    def read(self, key: str, box: base.Box) -> torch.Tensor:
        return self.read_all({key: (key, box)})[key][0]

    def read_all(
        self, wanted: Mapping[str, tuple[str, base.Box]]
    ) -> dict[str, tuple[torch.Tensor, int]]:
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
        from torch.distributed.checkpoint.state_dict_loader import load

        ckpt = self.ckpt
        assert ckpt.path is not None
        folder = ckpt.path.parent
        metadata = read_metadata(folder, trusted=ckpt.trusted, allow=ckpt.allow_globals)
        entries = metadata.state_dict_metadata
        buffers: dict[str, torch.Tensor] = {}
        names: dict[str, str] = {}
        for row_key, (key, box) in wanted.items():
            name = ".".join((*ckpt.location, key))
            if name not in entries:
                raise CheckpointError(f"{folder}: no entry {name!r} in its .metadata")
            names[row_key] = name  # filled per row: two rows may read other boxes of one entry
            buffers[row_key] = self.empty(key, box)

        class BoxPlanner(DefaultLoadPlanner):
            """DCP's planner, with each row's box as the local chunk to fill."""

            def create_local_plan(self) -> LoadPlan:
                items = []
                for row_key, (_, box) in wanted.items():
                    if box.numel == 0:
                        continue
                    chunk = ChunkStorageMetadata(
                        offsets=torch.Size(box.offsets), sizes=torch.Size(box.sizes)
                    )
                    name = names[row_key]
                    for item in create_read_items_for_chunk_list(name, entries[name], [chunk]):
                        dest = dataclasses.replace(item.dest_index, fqn=row_key, offset=None)
                        items.append(dataclasses.replace(item, dest_index=dest))
                return LoadPlan(items)

        planner = BoxPlanner(flatten_state_dict=False, allow_partial_load=True)
        load(buffers, storage_reader=_vetted_reader(folder, metadata), planner=planner,
             process_group=self.group)  # fmt: skip
        out = {}
        for row_key, (_, box) in wanted.items():
            itemsize = buffers[row_key].element_size()
            stored = [
                chunk
                for chunk in entries[names[row_key]].chunks
                if base.Box(tuple(chunk.offsets), tuple(chunk.sizes)).intersect(box).numel
            ]
            nbytes = sum(math.prod(chunk.sizes) * itemsize for chunk in stored)
            out[row_key] = (buffers[row_key], nbytes)
        return out

    def code(self) -> tuple[list[str], list[str]]:
        ckpt = self.ckpt
        assert ckpt.path is not None
        prefix = "".join(f"{part}." for part in ckpt.location)
        dtypes = {k: info.dtype for k, info in ckpt.tensors.items()}
        imports = [
            "import dataclasses",
            "",
            "import torch.distributed.checkpoint as dcp",
            "from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner",
            "from torch.distributed.checkpoint.metadata import ChunkStorageMetadata",
            "from torch.distributed.checkpoint.planner import LoadPlan",
            "from torch.distributed.checkpoint.planner_helpers import "
            "create_read_items_for_chunk_list",
        ]
        lines = [
            "# torch's reader unpickles the directory's .metadata fully (it can run code): run",
            "# this only on a checkpoint you trust. ckptviz read it with a restricted unpickler.",
            f"checkpoint = {str(ckpt.path.parent)!r}",
            f"dtypes = {dtypes!r}",
            "",
            "",
            "class BoxPlanner(DefaultLoadPlanner):",
            '    """DCP\'s planner: a request reads only the stored chunks overlapping its box."""',
            "",
            "    def __init__(self, requests):",
            "        super().__init__(flatten_state_dict=False, allow_partial_load=True)",
            "        self.requests = requests",
            "",
            "    def create_local_plan(self):",
            "        items = []",
            "        for name, (key, offsets, sizes) in self.requests.items():",
            "            if 0 in sizes:",
            "                continue",
            "            chunk = ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))",
            f"            stored = self.metadata.state_dict_metadata[{prefix!r} + key]",
            f"            for item in create_read_items_for_chunk_list({prefix!r} + key, stored, "
            "[chunk]):",
            "                dest = dataclasses.replace(item.dest_index, fqn=name, offset=None)",
            "                items.append(dataclasses.replace(item, dest_index=dest))",
            "        return LoadPlan(items)",
            "",
            "",
            "def read_all(requests):",
            "    values = {name: torch.empty(sizes, dtype=getattr(torch, dtypes[key]))",
            "              for name, (key, _, sizes) in requests.items()}",
            "    dcp.load(values, checkpoint_id=checkpoint, planner=BoxPlanner(requests))",
            "    return values",
        ]
        return imports, lines


FORMAT = FileFormat("dcp", is_dcp, read_dcp, read_code, slices=DcpSlices)
