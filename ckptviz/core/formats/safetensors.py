"""``.safetensors`` files: metadata from the header alone, data through ``safe_open``."""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ckptviz.core.checkpoint import (
    ITEMSIZES,
    Checkpoint,
    FileFingerprint,
    TensorInfo,
    TensorSource,
    declarations_of,
)
from ckptviz.core.errors import CheckpointError, first_line
from ckptviz.core.formats.base import FileFormat
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
                with declarations_of(path):
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


def read_code(ckpt: Checkpoint, keys: list[str]) -> list[str]:
    """Plain-PyTorch lines that put the tensors of a ``.safetensors`` file in ``state``."""
    return ["from safetensors.torch import load_file", "", f"state = load_file({str(ckpt.path)!r})"]


FORMAT = FileFormat("safetensors", is_safetensors, read_safetensors, read_code)
