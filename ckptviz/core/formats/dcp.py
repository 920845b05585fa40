"""torch.distributed.checkpoint (DCP) directories, as FSDP/DTensor trainers write them.

A DCP directory holds ``.metadata`` (a pickle describing every entry: global shape, dtype, which
chunks sit in which ``*.distcp`` file) and the data files. Reading needs only ``.metadata`` and no
process group; tensor data comes through DCP's own single-process load path
(``torch.distributed.checkpoint.load(..., no_dist=True)``), which reassembles tensors saved in
chunks by many ranks.

``.metadata`` is untrusted input. torch's own ``FileSystemReader.read_metadata`` unpickles it
with plain ``pickle.load`` (it could run any code), and torch's ``weights_only`` unpickler cannot
read it (protocol-4 frames), so it is read here with an unpickler that only builds DCP's own
metadata classes, torch sizes, dtypes and layouts, and paths. Its content is checked too: data
files must be plain file names in the directory, chunks must lie inside their tensor and cover it.
Non-tensor entries (pickled Python objects) are listed as skipped and never unpickled.
"""

from __future__ import annotations

import io
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
from ckptviz.core.errors import CheckpointError, UnsafeCheckpointError
from ckptviz.core.errors import first_line as _first_line
from ckptviz.core.formats.base import FileFormat
from ckptviz.core.formats.sharded import member_file
from ckptviz.core.locate import checkpoint_from_object as _checkpoint_from_object
from ckptviz.core.safety import GlobalSpec
from ckptviz.core.safety import resolve_global as _resolve_global

METADATA_NAME = ".metadata"
#: Above this many chunks per tensor, overlap is not checked pair by pair (size still is).
_MAX_CHUNKS_PAIRWISE = 128


def is_dcp(path: Path, head: bytes) -> bool:
    """A directory holding ``.metadata``, or that ``.metadata`` file itself."""
    if path.is_dir():
        return (path / METADATA_NAME).is_file()
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
    from torch.distributed.checkpoint.metadata import Metadata

    path = folder / METADATA_NAME
    allowed = _allowed_globals()
    for spec in allow:
        obj, name = _resolve_global(spec)
        module, _, attr = name.rpartition(".")
        allowed[(module, attr)] = obj
    try:
        with path.open("rb") as stream:
            if trusted:
                metadata = pickle.load(stream)
                refused: list[str] = []
            else:
                unpickler = _MetadataUnpickler(stream, allowed)
                metadata = unpickler.load()
                refused = sorted(dict.fromkeys(unpickler.refused))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read it ({exc.strerror}).") from None
    except Exception as exc:
        raise CheckpointError(
            f"{path}: not a readable torch.distributed.checkpoint metadata file "
            f"({_first_line(exc)}). It may be truncated or damaged; save the checkpoint again."
        ) from None
    if refused:
        raise UnsafeCheckpointError(
            f"{path}: this DCP metadata names Python objects that are not allowed by default: "
            f"{', '.join(refused)}. Nothing from it was run (torch's own reader would unpickle "
            "it fully). If you trust the directory, allow exactly these for this read: "
            f"ckptviz.read_checkpoint({str(folder)!r}, allow_globals={refused!r}), or read it "
            f"fully (this runs any code the file contains): "
            f"ckptviz.read_checkpoint({str(folder)!r}, trusted=True).",
            refused,
        )
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


def _check_chunks(where: str, fqn: str, shape: tuple[int, ...], chunks: Any) -> None:
    if not isinstance(chunks, list):
        raise CheckpointError(f"{where}: {fqn!r} has no chunk list; the metadata is damaged.")
    boxes = []
    total = 0
    numel = 1
    for s in shape:
        numel *= s
    for chunk in chunks:
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
                f"{where}: {fqn!r} {list(shape)} has a chunk at {offsets} of size {sizes} that "
                "does not lie inside it; the metadata is damaged or crafted."
            )
        volume = 1
        for s in sizes:
            volume *= s
        total += volume
        boxes.append((offsets, sizes))
    overlapping = len(boxes) <= _MAX_CHUNKS_PAIRWISE and any(
        all(oa < ob + sb and ob < oa + sa for oa, sa, ob, sb in zip(a, sa_, b, sb_, strict=True))
        for i, (a, sa_) in enumerate(boxes)
        for b, sb_ in boxes[i + 1 :]
        if all(s > 0 for s in sa_) and all(s > 0 for s in sb_)
    )
    if total != numel or overlapping:
        raise CheckpointError(
            f"{where}: the chunks of {fqn!r} {list(shape)} cover {total:,} of its {numel:,} "
            f"values{' and overlap' if overlapping else ''}; loading it would leave values "
            "unset. The checkpoint is incomplete (a rank's files missing?) or damaged."
        )


def _check_storage(folder: Path, metadata: Any) -> dict[str, FileFingerprint]:
    """Every data file the metadata points into: a plain name in ``folder``; their fingerprints."""
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
    for index, info in storage.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, storage_info):
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
    return files


class PickledObject:
    """Stands for a non-tensor DCP entry (a pickled Python object): listed, never unpickled."""


def _entries(where: str, metadata: Any) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
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
            _check_chunks(where, fqn, shape, entry.chunks)
            value: Any = torch.empty(shape, dtype=dtype, device="meta")
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
    """fqn -> tensor for each wanted fqn, through ``torch.distributed.checkpoint.load``."""
    from torch.distributed.checkpoint.state_dict_loader import load

    state = {fqn: torch.empty(shape, dtype=dtype) for fqn, (shape, dtype) in wanted.items()}
    with warnings.catch_warnings():
        # no_dist=True is exactly what is meant here; torch still warns about it
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        load(state, storage_reader=_vetted_reader(folder, metadata), no_dist=True)
    return state


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
    fingerprint = FileFingerprint.of(metadata_path)
    metadata = read_metadata(folder, trusted=trusted, allow=allow)
    files = _check_storage(folder, metadata)
    tree, fqn_of = _entries(str(metadata_path), metadata)
    entries = metadata.state_dict_metadata

    def fetch_many(ckpt: Checkpoint, keys: list[str]) -> dict[str, torch.Tensor]:
        fqns = {k: fqn_of[(*ckpt.location, k)] for k in keys}
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
        allow_globals=tuple(_resolve_global(a)[1] for a in allow),
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


FORMAT = FileFormat("dcp", is_dcp, read_dcp, read_code)
