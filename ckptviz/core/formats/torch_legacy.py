"""Pre-1.6 torch files: a run of pickles followed by the raw storage bytes.

Read with ``torch.load(weights_only=True)`` after ``safety`` has checked that the file holds
every byte its pickle declares. This format cannot be memory-mapped: torch reads its data
eagerly, so ``open()`` reads the whole file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ckptviz.core.checkpoint import Checkpoint
from ckptviz.core.formats import torch_zip
from ckptviz.core.formats.base import FileFormat
from ckptviz.core.safety import GlobalSpec


def is_legacy_pickle(path: Path, head: bytes) -> bool:
    return head[:1] == b"\x80"


def read_legacy(
    path: Path, *, key: tuple[str, ...] | None, trusted: bool, allow: Sequence[GlobalSpec]
) -> Checkpoint:
    # The pre-1.6 format cannot be memory-mapped: torch reads its data eagerly.
    return torch_zip.read_torch_file(path, key=key, trusted=trusted, allow=allow, mmap=False)


FORMAT = FileFormat("torch-legacy", is_legacy_pickle, read_legacy, torch_zip.read_code, eager=True)
