"""``.safetensors`` files: metadata from the header alone, data through ``safe_open``."""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch

from ckptviz.core.checkpoint import (
    ITEMSIZES,
    Checkpoint,
    FileFingerprint,
    TensorInfo,
    TensorSource,
    declarations_of,
    dtype_from_name,
)
from ckptviz.core.errors import CheckpointError, first_line
from ckptviz.core.formats.base import Box, FileFormat, SliceReader
from ckptviz.core.formats.filedata import CheckedFile
from ckptviz.core.safety import GlobalSpec

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
#: safetensors refuses headers above this size; so does reading the data here.
MAX_HEADER_BYTES = 100_000_000


def is_safetensors(path: Path, head: bytes) -> bool:
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and header_len > 1


def read_safetensors(
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
        # one context for all tensors (one a tensor costs ~2 us, 40 ms at 20,000 tensors)
        with safe_open(str(path), framework="pt") as handle, declarations_of(path):
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
                tensors[name] = TensorInfo(name, shape, dtype, n * ITEMSIZES[dtype])
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(
            f"{path}: not a valid .safetensors file ({first_line(exc)}). "
            "It may be truncated or damaged; re-save it with safetensors.torch.save_file."
        ) from None

    @contextmanager
    def opener(ckpt: Checkpoint) -> Iterator[TensorSource]:
        if sys.byteorder != "little":  # safetensors swaps the little-endian bytes itself
            try:
                with safe_open(str(path), framework="pt") as handle:
                    yield TensorSource(ckpt, handle.get_tensor)
            except SafetensorError as exc:
                raise CheckpointError(f"{path}: cannot read tensor data ({exc}).") from None
            return
        with CheckedFile(path, ckpt.fingerprint) as file:
            places = _data_places(path, file)

            def fetch(key: str) -> torch.Tensor:
                info = ckpt.tensors[key]
                place = places.get(key)
                declared = (info.dtype, list(info.shape), info.nbytes)
                if place is None or (place.dtype, place.shape, place.end - place.start) != declared:
                    raise CheckpointError(
                        f"{path}: the header no longer declares {key!r} as {list(info.shape)} "
                        f"{info.dtype}; the file changed since it was read. Compare again."
                    )
                tensor = torch.empty(info.shape, dtype=dtype_from_name(info.dtype))
                file.read_into(tensor, place.start, key)
                return tensor

            yield TensorSource(ckpt, fetch)

    return Checkpoint(
        source=str(path),
        format="safetensors",
        tensors=tensors,
        path=path,
        metadata=metadata,
        fingerprint=FileFingerprint.of(path),
        _opener=opener,
    )


class _Place(NamedTuple):
    """Where a tensor's bytes are in the file, and what the header says they are."""

    dtype: str
    shape: object
    start: int
    end: int


def _data_places(path: Path, file: CheckedFile) -> dict[str, _Place]:
    """key -> where its bytes are in the file, from the header as it is now.

    The header was checked by ``safe_open`` when the file was read; it is read again here (a
    few bytes) so the offsets are those of the very file being read, checked against its size.
    """
    size = file.fingerprint.size
    (header_len,) = struct.unpack("<Q", file.read_bytes(0, 8, "the header length"))
    if not 2 <= header_len <= min(size - 8, MAX_HEADER_BYTES):
        raise CheckpointError(
            f"{path}: the header length ({header_len:,} bytes) does not fit the file "
            f"({size:,} bytes); it changed since it was read or is damaged. Re-save it."
        )
    try:
        header = json.loads(file.read_bytes(8, header_len, "the header"))
    except (UnicodeDecodeError, ValueError):
        header = None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the header is no longer valid JSON; re-save the file.")
    base = 8 + header_len
    places = {}
    for key, entry in header.items():
        if key == "__metadata__" or not isinstance(entry, dict):
            continue
        offsets = entry.get("data_offsets")
        dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))  # type: ignore[arg-type]
        if (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(n) is int for n in offsets)
            and 0 <= offsets[0] <= offsets[1] <= size - base
            and dtype is not None
        ):
            places[key] = _Place(dtype, entry.get("shape"), base + offsets[0], base + offsets[1])
    return places


def read_code(ckpt: Checkpoint, keys: list[str]) -> list[str]:
    """Plain-PyTorch lines that put the tensors of a ``.safetensors`` file in ``state``."""
    return ["from safetensors.torch import load_file", "", f"state = load_file({str(ckpt.path)!r})"]


def read_slice(path: Path, key: str, box: Box) -> torch.Tensor:
    """The ``box`` of tensor ``key`` of the ``.safetensors`` file ``path``: only those bytes are
    copied out of safetensors' mapping of the file."""
    import safetensors  # looked up at call time, so a test can count what is read

    with safetensors.safe_open(str(path), framework="pt") as handle:
        value: torch.Tensor = handle.get_slice(key)[box.slices()]
    return value


class SafetensorsSlices(SliceReader):
    """Boxes of a ``.safetensors`` file's tensors (``safe_open(...).get_slice(key)[box]``)."""

    def read(self, key: str, box: Box) -> torch.Tensor:
        if box.numel == 0:
            return self.empty(key, box)
        assert self.ckpt.path is not None
        return read_slice(self.ckpt.path, key, box)

    def code(self) -> tuple[list[str], list[str]]:
        return ["from safetensors import safe_open"], [
            f"checkpoint = {str(self.ckpt.path)!r}",
            "",
            "",
            "def read_all(requests):  # only the slices this rank's shards hold",
            "    with safe_open(checkpoint, framework='pt') as f:",
            "        return {name: f.get_slice(key)[region(offsets, sizes)]",
            "                for name, (key, offsets, sizes) in requests.items()}",
        ]


#: safetensors headers list tensors sorted by name: the model's order is lost.
FORMAT = FileFormat(
    "safetensors",
    is_safetensors,
    read_safetensors,
    read_code,
    unordered=("safetensors",),
    slices=SafetensorsSlices,
)
