"""Tensor data read from a checkpoint file with checked reads, not through a memory mapping.

A trainer re-saving ``last.ckpt`` truncates it and writes it again. A process that maps the file
and touches a page past its new end is killed by the kernel (SIGBUS: the notebook's kernel dies),
and pages of a file rewritten in place under a mapping hand out new bytes next to old ones.
Reading each tensor's bytes into fresh memory turns the first into a ``CheckpointError`` naming
the file and the key (a short read); the fingerprint check once an apply or a statistics run is
done catches the second. Only one tensor's bytes are read at a time, so memory stays as low as
with a mapping whose pages are dropped after use.
"""

from __future__ import annotations

import ctypes
import io
import os
import sys
from pathlib import Path
from typing import Any

import torch

from ckptviz.core.checkpoint import FileFingerprint
from ckptviz.core.errors import CheckpointError


def span(offset: int, shape: tuple[int, ...], stride: tuple[int, ...]) -> tuple[int, int]:
    """The elements ``[first, end)`` of its storage a tensor with this layout covers."""
    if any(size == 0 for size in shape):
        return offset, offset
    last = offset + sum((size - 1) * step for size, step in zip(shape, stride, strict=True))
    return offset, last + 1


class CheckedFile:
    """A checkpoint file open for checked reads of tensor data.

    Opening compares the open file with ``expected`` (the fingerprint taken when the checkpoint
    was read), so a file replaced between that check and the open is caught; every read after
    that is of this very file, and a read that comes back short raises.
    """

    def __init__(self, path: Path, expected: FileFingerprint | None) -> None:
        self.path = path
        try:
            self._file: io.FileIO = io.FileIO(path, "r")
        except OSError as exc:
            raise CheckpointError(
                f"{path}: cannot open the checkpoint to read its data ({exc.strerror}); "
                "restore the file or compare against another one."
            ) from None
        stat = os.fstat(self._file.fileno())
        self.fingerprint = FileFingerprint.of_stat(stat)
        self._device = stat.st_dev
        if expected is not None and self.fingerprint != expected:
            self._file.close()
            raise CheckpointError(
                f"{path}: the file changed since it was read "
                f"({expected.change_to(self.fingerprint)}); compare again before applying."
            )

    def __enter__(self) -> CheckedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def read_into(self, target: torch.Tensor, offset: int, key: str) -> None:
        """Fill the (contiguous, CPU) ``target`` with the file's bytes from ``offset`` on."""
        nbytes = target.numel() * target.element_size()
        if nbytes:
            memory = (ctypes.c_ubyte * nbytes).from_address(target.data_ptr())
            self._fill(memoryview(memory).cast("B"), offset, key)

    def read_bytes(self, offset: int, nbytes: int, key: str) -> bytes:
        """Exactly ``nbytes`` bytes from ``offset`` (a short read raises, naming ``key``)."""
        buffer = bytearray(nbytes)
        self._fill(memoryview(buffer), offset, key)
        return bytes(buffer)

    def _fill(self, buffer: memoryview, offset: int, key: str) -> None:
        nbytes, done = len(buffer), 0
        self._file.seek(offset)
        while done < nbytes:
            got = self._file.readinto(buffer[done:])
            if not got:
                raise CheckpointError(
                    f"{self.path}: the data of {key!r} should be bytes {offset:,}.."
                    f"{offset + nbytes:,}, but the file ends at {offset + done:,}: it was "
                    "truncated, or is being written right now. Re-run when the file is "
                    "complete, or re-save it."
                )
            done += got

    def tensor(
        self,
        key: str,
        dtype: torch.dtype,
        start: int,
        offset: int,
        shape: tuple[int, ...],
        stride: tuple[int, ...],
    ) -> torch.Tensor:
        """The tensor of ``shape``/``stride`` at element ``offset`` of a storage whose first
        byte is at ``start`` in the file, read now into memory of its own (only the elements
        it covers)."""
        first, end = span(offset, shape, stride)
        if first == end:
            return torch.empty_strided(shape, stride, dtype=dtype)
        data = torch.empty(end - first, dtype=dtype)
        self.read_into(data, start + first * dtype.itemsize, key)
        return torch.empty(0, dtype=dtype).set_(data.untyped_storage(), 0, shape, stride)

    def mapped_regions(self) -> list[tuple[int, int, int]] | None:
        """``(start, end, file offset)`` of every mapping of this file in this process, from
        ``/proc/self/maps`` (matched by device and inode, or by path); ``None`` where the
        system does not say (not Linux)."""
        if not sys.platform.startswith("linux"):
            return None
        real = os.path.realpath(self.path)
        device = f"{os.major(self._device):02x}:{os.minor(self._device):02x}"
        regions = []
        try:
            with open("/proc/self/maps") as maps:
                for line in maps:
                    fields = line.split(maxsplit=5)
                    if len(fields) < 6:
                        continue
                    same_file = (fields[3], fields[4]) == (device, str(self.fingerprint.inode))
                    if same_file or fields[5].rstrip("\n") == real:
                        low, _, high = fields[0].partition("-")
                        regions.append((int(low, 16), int(high, 16), int(fields[2], 16)))
        except OSError:
            return None
        return regions

    def copy_of_mapped(
        self, tensor: torch.Tensor, key: str, regions: list[tuple[int, int, int]]
    ) -> torch.Tensor:
        """``tensor`` with its values read from the file with a checked read when its storage
        lies in a mapping of this file (``regions``); as it is when its data is in memory."""
        storage = tensor.untyped_storage()
        address, nbytes = storage.data_ptr(), storage.nbytes()
        for low, high, file_offset in regions:
            if nbytes and low <= address < high:
                start = file_offset + address - low
                shape, stride = tuple(tensor.shape), tuple(tensor.stride())
                return self.tensor(
                    key, tensor.dtype, start, int(tensor.storage_offset()), shape, stride
                )
        return tensor


def plain(tensor: Any) -> bool:
    """A dense, strided, unquantized tensor whose values are its storage's bytes (or a meta
    tensor, which has no values to read): not a conjugate or negative view, whose values are
    its bytes conjugated or negated."""
    return (
        type(tensor) in (torch.Tensor, torch.nn.Parameter)
        and tensor.layout == torch.strided
        and not tensor.is_quantized
        and not tensor.is_conj()
        and not tensor.is_neg()
        and tensor.device.type in ("cpu", "meta")
    )
