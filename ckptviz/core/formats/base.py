"""What a checkpoint file format is, and the list every file is matched against.

The list is filled, in order, by ``ckptviz/core/formats/__init__.py``; it lives here so the
formats that read other formats (a sharded index reads its shards) can import it.

A format may also serve *slices*: boxes of its tensors, read by one rank of a
``torch.distributed`` job without loading the rest (``FileFormat.slices``, a ``SliceReader``
class; ``apply_distributed`` asks ``slice_reader``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from ckptviz.core.checkpoint import Checkpoint, dtype_from_name
from ckptviz.core.errors import CheckpointError


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
    in the order the model registered its tensors. ``slices`` is the ``SliceReader`` class
    through which a rank of a job reads boxes of such a checkpoint's tensors, or ``None`` when
    a rank could only load all of it.
    """

    name: str
    detect: Callable[[Path, bytes], bool]
    read: Callable[..., Checkpoint]
    read_code: Callable[[Checkpoint, list[str]], list[str]]
    produces: tuple[str, ...] = ()
    eager: bool = False
    unordered: tuple[str, ...] = ()
    slices: type[SliceReader] | None = None

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


# -- slices: what one rank of a job reads ---------------------------------------------------------


@dataclass(frozen=True)
class Box:
    """A block of a global tensor: ``offsets`` and ``sizes`` per dimension."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @classmethod
    def whole(cls, shape: Sequence[int]) -> Box:
        return cls((0,) * len(shape), tuple(shape))

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)

    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + s) for o, s in zip(self.offsets, self.sizes, strict=True))

    def intersect(self, other: Box) -> Box:
        offsets, sizes = [], []
        for o1, s1, o2, s2 in zip(
            self.offsets, self.sizes, other.offsets, other.sizes, strict=True
        ):
            start, stop = max(o1, o2), min(o1 + s1, o2 + s2)
            offsets.append(start)
            sizes.append(max(stop - start, 0))
        return Box(tuple(offsets), tuple(sizes))

    def within(self, outer: Box) -> tuple[slice, ...]:
        """This box as slices of ``outer``'s local tensor (this box lies inside ``outer``)."""
        return tuple(
            slice(o - p, o - p + s)
            for o, s, p in zip(self.offsets, self.sizes, outer.offsets, strict=True)
        )

    def text(self) -> str:
        return (
            "["
            + ", ".join(f"{o}:{o + s}" for o, s in zip(self.offsets, self.sizes, strict=True))
            + "]"
        )


class SliceReader(ABC):
    """Reads boxes of one checkpoint's tensors on one rank of a ``torch.distributed`` job.

    ``group`` is the job's process group (``None``: the default group). A ``collective``
    reader's reads are collective calls: every rank makes them together, so a job reads all its
    boxes at once with ``read_all`` before writing anything. Other readers read box by box with
    ``read``, each right before it is written. Constructing a reader does no I/O.
    """

    #: Whether reads are collective calls (every rank of ``group`` calls them together).
    collective: ClassVar[bool] = False

    def __init__(self, ckpt: Checkpoint, group: Any = None) -> None:
        self.ckpt = ckpt
        self.group = group

    def empty(self, key: str, box: Box) -> torch.Tensor:
        """Uninitialised memory for the box of checkpoint tensor ``key``."""
        return torch.empty(box.sizes, dtype=dtype_from_name(self.ckpt.tensors[key].dtype))

    @abstractmethod
    def read(self, key: str, box: Box) -> torch.Tensor:
        """The box of checkpoint tensor ``key``, in memory of its own."""

    def read_all(
        self, wanted: Mapping[str, tuple[str, Box]]
    ) -> dict[str, tuple[torch.Tensor, int]]:
        """name -> (the box, bytes read for it) for every ``name: (key, box)`` of ``wanted``."""
        out = {}
        for name, (key, box) in wanted.items():
            value = self.read(key, box)
            out[name] = (value, value.nbytes)
        return out

    @abstractmethod
    def code(self) -> tuple[list[str], list[str]]:
        """(imports, lines) of plain PyTorch defining ``read_all(requests)``: ``requests`` maps
        a name to ``(key, offsets, sizes)``, the result maps each name to that box of checkpoint
        tensor ``key``. The lines may call ``region(offsets, sizes)``, the box as slices."""


def _is_dtensor(value: object) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(value, DTensor)


class ViewSlices(SliceReader):
    """Slices of tensors ``Checkpoint.open()`` hands out: each box is copied out of the tensor,
    one tensor at a time (the checkpoint is opened for each, so nothing read piles up)."""

    def read(self, key: str, box: Box) -> torch.Tensor:
        if box.numel == 0:
            return self.empty(key, box)
        with self.ckpt.open() as source:
            whole = source[key]
            if _is_dtensor(whole):
                raise CheckpointError(
                    f"{self.ckpt.source}: {key!r} is a DTensor; pass plain tensors as source= "
                    "(e.g. a file path), each rank reads its own slices"
                )
            value: torch.Tensor = whole[box.slices()].clone()
            del whole
        return value


class InMemorySlices(ViewSlices):
    """Slices of a checkpoint that is no file (a state dict or a module in this process)."""

    def code(self) -> tuple[list[str], list[str]]:
        return [], [
            f"# The checkpoint was {self.ckpt.source}, not a file: put that state dict in `state`.",
            "state = state_dict",
            "",
            "",
            "def read_all(requests):",
            "    return {name: state[key][region(offsets, sizes)].clone()",
            "            for name, (key, offsets, sizes) in requests.items()}",
        ]


def slice_reader(ckpt: Checkpoint, group: Any = None) -> SliceReader | None:
    """How a rank of ``group`` reads boxes of ``ckpt``'s tensors; ``None`` when its format
    cannot serve slices (a rank would have to load all of it)."""
    fmt = format_named(ckpt.format)
    if fmt is not None:
        return None if fmt.slices is None else fmt.slices(ckpt, group)
    if ckpt.path is None:  # not read from a file: its tensors are in memory already
        return InMemorySlices(ckpt, group)
    return None
