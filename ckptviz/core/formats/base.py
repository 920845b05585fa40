"""What a checkpoint file format is, and the list every file is matched against.

The list is filled, in order, by ``ckptviz/core/formats/__init__.py``; it lives here so the
formats that read other formats (a sharded index reads its shards) can import it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ckptviz.core.checkpoint import Checkpoint


@dataclass(frozen=True)
class FileFormat:
    """One way to read checkpoints from disk.

    ``detect(path, head)`` sees the path and the file's first 16 bytes (``b""`` for a
    directory). ``read(path, key=, trusted=, allow=)`` returns the ``Checkpoint`` (metadata, and
    its opener for the data). ``read_code(ckpt, keys)`` gives the plain-PyTorch lines
    ``Plan.to_code()`` uses to put the tensors ``keys`` of such a checkpoint in ``state``.
    ``produces`` lists the ``Checkpoint.format`` names it gives besides ``name``; ``eager`` says
    its ``open()`` reads every tensor into memory (nothing is mapped: reopening reads the whole
    file again, and there are no file pages to release). ``unordered`` lists the
    ``Checkpoint.format`` names whose keys come back in the file's order (sorted by name), not
    in the order the model registered its tensors.
    """

    name: str
    detect: Callable[[Path, bytes], bool]
    read: Callable[..., Checkpoint]
    read_code: Callable[[Checkpoint, list[str]], list[str]]
    produces: tuple[str, ...] = ()
    eager: bool = False
    unordered: tuple[str, ...] = ()

    def makes(self, format_name: str) -> bool:
        """Whether a ``Checkpoint`` with this ``format`` was read by this format."""
        return format_name == self.name or format_name in self.produces


#: Every file format, in the order files are matched against them (see ``formats/__init__.py``).
FORMATS: list[FileFormat] = []


def format_named(format_name: str) -> FileFormat | None:
    """The format that reads checkpoints whose ``Checkpoint.format`` is ``format_name``."""
    for fmt in FORMATS:
        if fmt.makes(format_name):
            return fmt
    return None
