"""Hugging Face sharded checkpoints: an index JSON that names, per tensor, the shard holding it.

``model.safetensors.index.json`` / ``pytorch_model.bin.index.json`` (or a directory holding one)
read as one checkpoint. Reading looks only at each shard's header (safetensors) or memory-maps
it (torch, ``weights_only=True``); ``Checkpoint.open()`` opens a shard the first time one of its
tensors is asked for, so an apply reads only the shards that hold the tensors it writes.

The index is untrusted: it must be a regular file of at most ``MAX_INDEX_BYTES`` (a FIFO or
device is refused without waiting on it or reading it), each shard must be a plain file name next
to the index (a symlink is followed only when it stays in the index's own directory, or in the
directory the index itself links into, as in the Hugging Face cache), every listed key must be in
the shard named for it, and no key may sit in two shards.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from ckptviz.core.checkpoint import Checkpoint, FileFingerprint, TensorInfo, TensorSource
from ckptviz.core.errors import CheckpointError, UnsafeCheckpointError
from ckptviz.core.formats.base import FORMATS, Box, FileFormat, ViewSlices
from ckptviz.core.formats.safetensors import read_slice as read_safetensors_slice
from ckptviz.core.safety import GlobalSpec, allowed_globals, refusal, safe_globals_lines
from ckptviz.core.safety import resolve_global as _resolve_global

#: Index names Hugging Face writes, preferred in this order when a directory holds several.
INDEX_NAMES = (
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
#: Single-file weights a Hugging Face directory may hold instead of shards.
SINGLE_FILE_NAMES = ("model.safetensors", "pytorch_model.bin")
#: The file formats a shard may have (never an index or a directory: no recursion).
SHARD_FORMATS = ("safetensors", "torch", "torch-legacy")
#: The largest index read: real ones are a few megabytes (about 80 bytes per tensor, so a
#: 10,000-shard index of 100,000 tensors is ~8 MB); anything bigger is not one.
MAX_INDEX_BYTES = 64 * 2**20
#: open() flags for untrusted metadata files: a FIFO opens without waiting for a writer (then
#: fstat refuses it) and a terminal device never becomes the controlling terminal.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _not_regular(path: Path, mode: int, what: str) -> CheckpointError:
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
    return CheckpointError(
        f"{path}: {what} is {kind}, not a regular file; nothing was read from it. Pass the "
        "checkpoint's own file (copy it in place of whatever is at this path)."
    )


@contextmanager
def open_regular(path: Path, *, what: str) -> Iterator[Any]:
    """``path`` opened for binary reading, refused with ``CheckpointError`` unless it is a
    regular file (after following symlinks).

    It is checked before opening, so no device is ever opened, and again on the open file, so
    swapping in a FIFO meanwhile cannot make the read wait forever: the open does not block.
    """
    try:
        before = path.stat()
        if not stat.S_ISREG(before.st_mode):
            raise _not_regular(path, before.st_mode, what)
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open {what} ({exc.strerror}).") from None
    with os.fdopen(fd, "rb") as stream:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode, what)
        yield stream


def read_regular_file(path: Path, *, limit: int, what: str) -> bytes:
    """All of ``path``, a regular file of at most ``limit`` bytes (else ``CheckpointError``).

    Reads at most ``limit + 1`` bytes, so a file that grows while it is read cannot exhaust
    memory either.
    """
    with open_regular(path, what=what) as stream:
        size = os.fstat(stream.fileno()).st_size
        data = b"" if size > limit else stream.read(limit + 1)
    if size > limit or len(data) > limit:
        raise CheckpointError(
            f"{path}: {max(size, len(data)):,} bytes is more than ckptviz reads for {what} (at "
            f"most {limit:,}); this is not one, or it is damaged. Pass the checkpoint's own file."
        )
    return data


def member_file(folder: Path, name: str, *, what: str, anchors: tuple[Path, ...] = ()) -> Path:
    """``folder/name`` if ``name`` is a plain file name there, naming a regular file.

    A symlink is followed only when its target lies in ``folder`` or in one of ``anchors``
    (resolved directories). Raises ``CheckpointError`` opening with ``what`` otherwise.
    """
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or "/" in name
        or "\\" in name
        or "\x00" in name
    ):
        raise CheckpointError(
            f"{what} {name!r}, which is not a plain file name in {folder} (no directories, "
            "'..' or absolute paths are allowed): the file may be damaged or crafted; "
            "regenerate it."
        )
    candidate = folder / name
    try:
        info = candidate.lstat()
    except OSError:
        raise CheckpointError(
            f"{what} {name!r}, but {candidate} does not exist; download or copy the missing file, "
            "or regenerate the index."
        ) from None
    if stat.S_ISLNK(info.st_mode):
        target = candidate.resolve()
        allowed = {folder.resolve(), *anchors}
        if target.parent not in allowed:
            raise CheckpointError(
                f"{what} {name!r}, but {candidate} is a symlink to {target}, outside "
                f"{folder}; copy the real file next to the index instead."
            )
        if not target.is_file():
            raise CheckpointError(
                f"{what} {name!r}, but {candidate} links to {target}, which is not a regular "
                "file; download or copy the missing file."
            )
        return target
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(
            f"{what} {name!r}, but {candidate} is not a regular file; expected a shard written "
            "by save_pretrained."
        )
    return candidate


# -- detection -------------------------------------------------------------------------------


def _index_in(folder: Path) -> Path | None:
    """The index (or single weights file) a Hugging Face directory holds, if any."""
    for name in (*INDEX_NAMES, *SINGLE_FILE_NAMES):
        if (folder / name).is_file():
            if name in SINGLE_FILE_NAMES:
                _one_model_only(folder, name)
            return folder / name
    indexes = sorted(folder.glob("*.index.json"))
    if len(indexes) > 1:
        names = ", ".join(p.name for p in indexes)
        raise CheckpointError(
            f"{folder}: holds several sharded checkpoint indexes ({names}); pass the one you "
            "mean, e.g. ckptviz.compare(model, 'path/to/that.index.json')."
        )
    return indexes[0] if indexes else None


def _one_model_only(folder: Path, name: str) -> None:
    """Refuses a folder holding the weights of several models: accelerate's ``save_state``
    writes ``model.safetensors`` for the first prepared model, ``model_1.safetensors`` for the
    second and so on (``pytorch_model_1.bin`` ... as pickle); which one is meant is the user's
    choice, not ours."""
    more = sorted(
        entry.name
        for entry in folder.iterdir()
        if re.fullmatch(r"(model_[0-9]+\.safetensors|pytorch_model_[0-9]+\.bin)", entry.name)
    )
    if more:
        names = ", ".join([name, *more])
        raise CheckpointError(
            f"{folder}: holds the weights of several models ({names}), as accelerate's "
            "save_state writes one file per prepared model in the order prepare() got them; "
            f"pass the file of the model you mean, e.g. ckptviz.compare(model, "
            f"{str(folder / more[0])!r})."
        )


def is_sharded(path: Path, head: bytes) -> bool:
    """A JSON index (by name and first byte), or a directory holding an index or weights file."""
    if path.is_dir():
        try:
            return _index_in(path) is not None
        except CheckpointError:
            return True  # ambiguous: let read_sharded say so
    return path.name.endswith(".json") and head.lstrip()[:1] == b"{"


# -- reading ---------------------------------------------------------------------------------


def _no_duplicate_keys(index: Path) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    def build(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                raise CheckpointError(
                    f"{index}: {key!r} is listed twice (as {result[key]!r} and {value!r}); a "
                    "tensor may sit in one shard only. Regenerate the index."
                )
            result[key] = value
        return result

    return build


def _load_index(index: Path) -> tuple[dict[str, str], dict[str, str]]:
    """weight_map (key -> shard name) and the index's metadata, validated."""
    raw = read_regular_file(index, limit=MAX_INDEX_BYTES, what="a sharded checkpoint index")
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys(index))
    except CheckpointError:
        raise
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, too deep, huge numbers
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"{index}: not valid JSON ({reason}); expected a sharded checkpoint index "
            "such as model.safetensors.index.json. Regenerate or re-download it."
        ) from None
    if not isinstance(data, dict) or "weight_map" not in data:
        raise CheckpointError(
            f"{index}: a JSON file, but not a sharded checkpoint index (no 'weight_map' "
            "entry); pass model.safetensors.index.json, pytorch_model.bin.index.json or a "
            "checkpoint file."
        )
    weight_map = data["weight_map"]
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f"{index}: 'weight_map' must map tensor names to shard file names, found "
            f"{type(weight_map).__name__} {str(weight_map)[:80]}."
        )
    for key, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(
                f"{index}: weight_map puts {key!r} in {shard!r}, which is not a shard file "
                "name; regenerate the index."
            )
    metadata = data.get("metadata") or {}
    if not isinstance(metadata, dict):
        metadata = {}
    return weight_map, {str(k): str(v) for k, v in metadata.items()}


def _read_file(
    index: Path,
    name: str,
    path: Path,
    *,
    key: tuple[str, ...] | None,
    trusted: bool,
    allow: Sequence[GlobalSpec],
) -> Checkpoint:
    """One weights file, read by content with the single-file formats only."""
    try:
        with open_regular(path, what=name) as stream:
            head = stream.read(16)
    except OSError as exc:
        raise CheckpointError(f"{index}: cannot read {name} ({exc.strerror}).") from None
    for fmt in FORMATS:
        if fmt.name in SHARD_FORMATS and fmt.detect(path, head):
            return fmt.read(path, key=key, trusted=trusted, allow=allow)
    raise CheckpointError(
        f"{index}: {name} is neither a safetensors nor a torch file (it starts with "
        f"{head[:8]!r}); re-download it."
    )


def _read_shard(
    index: Path, name: str, path: Path, *, trusted: bool, allow: Sequence[GlobalSpec]
) -> Checkpoint:
    shard = _read_file(index, f"shard {name}", path, key=None, trusted=trusted, allow=allow)
    if shard.location:
        raise CheckpointError(
            f"{index}: shard {name} is not a flat state dict (its tensors are under "
            f"{shard.location_text!r}); expected a shard written by save_pretrained."
        )
    return shard


def _sharded_format(shards: dict[str, Checkpoint]) -> str:
    kinds = {"safetensors" if s.format == "safetensors" else "torch" for s in shards.values()}
    return f"{kinds.pop()}-sharded" if len(kinds) == 1 else "mixed-sharded"


def read_sharded(
    path: Path, *, key: tuple[str, ...] | None, trusted: bool, allow: Sequence[GlobalSpec]
) -> Checkpoint:
    """A sharded checkpoint (index file or directory) as one Checkpoint; see the module doc."""
    index = _index_in(path) if path.is_dir() else path
    if index is None:  # is_sharded said yes, so the directory changed meanwhile
        raise CheckpointError(f"{path}: no sharded checkpoint index or weights file in it.")
    if index.name in SINGLE_FILE_NAMES:  # an unsharded Hugging Face directory
        return _read_file(index, index.name, index, key=key, trusted=trusted, allow=allow)
    if key:
        raise CheckpointError(
            f"{index}: a sharded checkpoint is one flat dict of tensors; key={'/'.join(key)!r} "
            "does not apply. Drop key=."
        )
    weight_map, metadata = _load_index(index)
    folder = index.parent
    anchors = (index.resolve().parent,)
    names = sorted(set(weight_map.values()))
    first_key: dict[str, str] = {}
    for k, shard_name in weight_map.items():
        first_key.setdefault(shard_name, k)
    shards: dict[str, Checkpoint] = {}
    allowed = [name for _, name in allowed_globals(allow)]  # refuses any that can run code
    needed: list[str] = []  # the globals every refused shard needs: one error lists them all
    for name in names:
        shard_path = member_file(
            folder,
            name,
            what=f"{index}: weight_map puts {first_key[name]!r} in",
            anchors=anchors,
        )
        try:
            shards[name] = _read_shard(index, name, shard_path, trusted=trusted, allow=allow)
        except UnsafeCheckpointError as exc:
            needed += exc.unsafe_globals
    if needed:
        raise refusal(index, sorted(set(needed)), allowed)

    tensors: dict[str, TensorInfo] = {}
    shard_of: dict[str, str] = {}
    skipped: dict[str, str] = {}
    ties: list[tuple[str, ...]] = []
    for name, shard in shards.items():
        for k, info in shard.tensors.items():
            listed = weight_map.get(k)
            if listed is None:
                raise CheckpointError(
                    f"{index}: shard {name} holds {k!r}, which weight_map does not list; the "
                    "index and the shards are from different saves. Regenerate the index."
                )
            if k in shard_of or listed != name:
                other = shard_of.get(k, listed)
                raise CheckpointError(
                    f"{index}: {k!r} is in both {other} and {name}; a tensor may sit in one "
                    "shard only. Remove the stale shard or regenerate the checkpoint."
                )
            tensors[k] = info
            shard_of[k] = name
        skipped.update({k: f"{what} (in {name})" for k, what in shard.skipped.items()})
        ties += shard.ties
    for k, name in weight_map.items():
        if k not in shard_of:
            have = ", ".join(list(shards[name].tensors)[:5]) or "no tensors"
            raise CheckpointError(
                f"{index}: weight_map puts {k!r} in {name}, but that shard has no such tensor "
                f"(it has {have}...); the index and the shards are from different saves. "
                "Regenerate the index or re-download the shards."
            )
    metadata["shards"] = str(len(shards))
    return Checkpoint(
        source=str(index),
        format=_sharded_format(shards),
        tensors=tensors,
        path=index,
        skipped=skipped,
        ties=ties,
        metadata=metadata,
        fingerprint=FileFingerprint.of(index),
        trusted=trusted,
        # as the shards spell them (so exported code allows exactly those), else as given
        allow_globals=tuple(dict.fromkeys(n for s in shards.values() for n in s.allow_globals))
        or tuple(_resolve_global(a)[1] for a in allow),
        _opener=_lazy_opener(shards, shard_of),
    )


def open_shard(shard: Checkpoint) -> AbstractContextManager[TensorSource]:
    """Open one shard for its data (checks it did not change since it was read)."""
    return shard.open()


def _lazy_opener(
    shards: dict[str, Checkpoint], shard_of: dict[str, str]
) -> Callable[[Checkpoint], AbstractContextManager[TensorSource]]:
    @contextmanager
    def opener(ckpt: Checkpoint) -> Iterator[TensorSource]:
        with ExitStack() as stack:
            opened: dict[str, TensorSource] = {}

            def fetch(key: str) -> Any:
                name = shard_of[key]
                source = opened.get(name)
                if source is None:
                    source = stack.enter_context(open_shard(shards[name]))
                    opened[name] = source
                return source[key]

            def changes() -> str | None:
                return next(filter(None, (source.changes() for source in opened.values())), None)

            yield TensorSource(ckpt, fetch, changes=changes)

    return opener


def read_code(ckpt: Checkpoint, keys: list[str]) -> list[str]:
    """Plain-Python lines that put the tensors ``keys`` of a sharded checkpoint in ``state``."""
    assert ckpt.path is not None
    lines = [
        "import json",
        "from pathlib import Path",
        "",
    ]
    safetensors = ckpt.format in ("safetensors-sharded", "mixed-sharded")
    torch_files = ckpt.format in ("torch-sharded", "mixed-sharded")
    if safetensors:
        lines += ["from safetensors import safe_open", ""]
    if torch_files and ckpt.allow_globals:
        lines += [*safe_globals_lines(ckpt.allow_globals), ""]
    lines += [
        f"index = Path({str(ckpt.path)!r})",
        'weight_map = json.loads(index.read_text())["weight_map"]',
        f"wanted = {sorted(keys)!r}",
        "state = {}",
        "for shard in sorted({weight_map[k] for k in wanted}):  # only the shards needed",
        "    keys = [k for k in wanted if weight_map[k] == shard]",
    ]
    safetensors_lines = [
        "with safe_open(index.parent / shard, framework='pt') as f:",
        "    state.update({k: f.get_tensor(k) for k in keys})",
    ]
    load = [
        "shard_state = torch.load(index.parent / shard, map_location='cpu', weights_only=True, "
        "mmap=True)"
    ]
    if ckpt.allow_globals:  # the harmless globals the shards need, as they spell them
        load = ["with torch.serialization.safe_globals(safe):", f"    {load[0]}"]
    torch_lines = [*load, "state.update({k: shard_state[k] for k in keys})"]
    if safetensors and torch_files:
        lines.append("    if shard.endswith('.safetensors'):")
        lines += ["        " + line for line in safetensors_lines]
        lines.append("    else:")
        lines += ["        " + line for line in torch_lines]
    else:
        lines += ["    " + line for line in (safetensors_lines if safetensors else torch_lines)]
    return lines


class ShardedSlices(ViewSlices):
    """Boxes of a sharded checkpoint's tensors: from a safetensors shard only the box's bytes
    (``get_slice``); from a torch shard, the tensor read by ``open()`` and the box copied out."""

    @cached_property
    def _shard_of(self) -> dict[str, str]:
        assert self.ckpt.path is not None  # an index: read_sharded checked every shard in it
        return _load_index(self.ckpt.path)[0]

    def read(self, key: str, box: Box) -> torch.Tensor:
        if box.numel == 0:
            return self.empty(key, box)
        index = self.ckpt.path
        assert index is not None
        shard = self._shard_of.get(key)
        if shard is None or not shard.endswith(".safetensors"):
            return super().read(key, box)
        anchors = (index.resolve().parent,)
        path = member_file(index.parent, shard, what=f"{index}: weight_map puts {key!r} in",
                           anchors=anchors)  # fmt: skip
        return read_safetensors_slice(path, key, box)

    def code(self) -> tuple[list[str], list[str]]:
        lines = [
            f"index = Path({str(self.ckpt.path)!r})",
            "weight_map = json.loads(index.read_text())['weight_map']",
            "",
            "",
            "def read_all(requests):  # only the shards needed, only the slices this rank holds",
            "    values = {}",
            "    for shard in sorted({weight_map[key] for key, _, _ in requests.values()}):",
            "        mine = {n: r for n, r in requests.items() if weight_map[r[0]] == shard}",
            "        if shard.endswith('.safetensors'):",
            "            with safe_open(str(index.parent / shard), framework='pt') as f:",
            "                for name, (key, offsets, sizes) in mine.items():",
            "                    values[name] = f.get_slice(key)[region(offsets, sizes)]",
            "        else:  # memory-mapped: a slice reads only the pages it touches",
            "            state = torch.load(index.parent / shard, map_location='cpu',",
            "                               weights_only=True, mmap=True)",
            "            for name, (key, offsets, sizes) in mine.items():",
            "                values[name] = state[key][region(offsets, sizes)].clone()",
            "    return values",
        ]
        imports = [
            "import json",
            "from pathlib import Path",
            "",
            "from safetensors import safe_open",
        ]
        return imports, lines


SHARDED_FORMATS = ("safetensors-sharded", "torch-sharded", "mixed-sharded")
FORMAT = FileFormat(
    "sharded",
    is_sharded,
    read_sharded,
    read_code,
    produces=SHARDED_FORMATS,
    unordered=("safetensors-sharded",),  # its shards' headers are sorted by name
    slices=ShardedSlices,
)
