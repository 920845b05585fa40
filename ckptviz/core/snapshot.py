"""Where apply keeps the old values of what it writes: in memory, or in a temporary file.

The snapshot is what makes an apply all-or-nothing: each model tensor's current values are saved
just before the tensor is written (one streamed pass), and on any failure, Ctrl-C included, or on
``Report.undo()``, everything saved is put back, newest first, so views that overlap come back
right. Two kinds, one interface:

- ``MemorySnapshot`` clones each tensor on its own device: fast, and costs the written size in
  fresh memory for as long as the snapshot lives.
- ``DiskSnapshot`` writes the bytes sequentially to an unnamed temporary file (``tempfile``'s
  ``TemporaryFile``: unlinked at once on POSIX, deleted on close on Windows, so the system frees
  the space even if the process is killed). The space is reserved before anything is written to
  the model, so a full disk refuses the apply up front. Reads come back only on failure or undo,
  one tensor at a time.

``choose_snapshot`` picks between them for ``snapshot="auto"``: on disk when the in-memory copy
would exceed the memory budget (by default a quarter of the memory available when apply starts).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sys
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import torch

from ckptviz.core.checkpoint import human_bytes
from ckptviz.core.errors import PlanError

SnapshotMode = Literal["auto", "memory", "disk"]
SNAPSHOT_MODES: tuple[str, ...] = ("auto", "memory", "disk")

#: Gives a tensor object another tensor's storage, keeping the object (torch's own helper).
swap_tensors: Callable[[torch.Tensor, torch.Tensor], None] = torch.utils.swap_tensors

#: Writes to the snapshot file go through a buffer this big: small tensors cost no system call
#: each; larger ones are written straight from the tensor's memory.
_WRITE_BUFFER = 1 << 20


class SnapshotRestoreError(RuntimeError):
    """Some saved tensors could not be put back; the message names them."""


@dataclass(slots=True)
class _Entry:
    """One saved model tensor: its values in memory (``copy``), its ``nbytes`` bytes at
    ``offset`` in the snapshot file (``file``), or the meta tensor it replaced (``swap``:
    ``value`` is the object that holds the meta tensor once the swap happened)."""

    key: str
    target: torch.Tensor
    how: Literal["copy", "file", "swap"]
    value: torch.Tensor | None = None
    offset: int = 0
    nbytes: int = 0
    shape: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float32


def nbytes_of(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Snapshot(ABC):
    """The old values of every model tensor an apply writes, saved one at a time."""

    #: "memory" or "disk"
    kind: str

    def __init__(self) -> None:
        self._entries: list[_Entry] = []
        self.closed = False

    # -- saving (the streamed pass) --------------------------------------------------------------
    @abstractmethod
    def save(self, key: str, target: torch.Tensor) -> torch.Tensor | None:
        """Save ``target``'s current values before it is written; returns the in-memory copy if
        this snapshot keeps one (``None`` if they went to disk)."""

    def save_swap(self, key: str, target: torch.Tensor, replacement: torch.Tensor) -> None:
        """``target`` is a meta tensor about to be swapped with ``replacement`` (real storage):
        after the swap ``replacement`` holds the meta tensor, which is what restoring puts back."""
        self._entries.append(_Entry(key, target, "swap", replacement))

    def _keep_copy(self, key: str, target: torch.Tensor) -> torch.Tensor:
        copy = target.detach().clone()
        self._entries.append(_Entry(key, target, "copy", copy))
        return copy

    # -- what it holds ---------------------------------------------------------------------------
    @property
    def targets(self) -> list[torch.Tensor]:
        return [e.target for e in self._entries]

    @property
    def memory_bytes(self) -> int:
        return sum(
            nbytes_of(e.value) for e in self._entries if e.value is not None and e.how == "copy"
        )

    @property
    def disk_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries if e.how == "file")

    @property
    def nbytes(self) -> int:
        """Bytes of old values held, in memory and on disk."""
        return self.memory_bytes + self.disk_bytes

    @property
    def directory(self) -> Path | None:
        """The folder of the temporary file (``None`` in memory)."""
        return None

    # -- putting back --------------------------------------------------------------------------
    def restore(self) -> int:
        """Put every saved tensor back bit for bit, newest first; returns how many.

        Ctrl-C while restoring is held until the end (a half-restored model is the one outcome
        that must not happen), then raised. A tensor that cannot be put back does not stop the
        others; the error names every one that failed.
        """
        failed: dict[str, str] = {}
        interrupted = False
        try:
            with torch.no_grad(), interrupts_deferred():
                for entry in reversed(self._entries):
                    try:
                        self._restore_entry(entry)
                    except Exception as exc:
                        failed[entry.key] = f"{type(exc).__name__}: {exc}"
        except KeyboardInterrupt:  # held while restoring; passed on once everything is back
            interrupted = True
        if failed:
            shown = "; ".join(f"{k} ({v})" for k, v in list(failed.items())[:5])
            raise SnapshotRestoreError(
                f"{len(failed)} tensor(s) could not be restored from the {self.kind} snapshot and "
                f"now hold partly written values: {shown}. The others were restored. Reload the "
                "model from a known-good checkpoint."
            )
        if interrupted:
            raise KeyboardInterrupt
        return len(self._entries)

    def _restore_entry(self, entry: _Entry) -> None:
        target = entry.target
        if entry.how == "swap":
            assert entry.value is not None
            # only if the swap happened: a meta target not yet materialised has nothing to undo
            if entry.value.is_meta and not target.is_meta:
                swap_tensors(target, entry.value)
        else:
            assert entry.how == "copy" and entry.value is not None
            target.copy_(entry.value)

    def close(self) -> None:
        """Let go of everything saved (frees the memory or the file)."""
        self._entries = []
        self.closed = True


class MemorySnapshot(Snapshot):
    """A clone of each written tensor, on its own device."""

    kind = "memory"

    def save(self, key: str, target: torch.Tensor) -> torch.Tensor | None:
        return self._keep_copy(key, target)


def _byte_view(t: torch.Tensor) -> Any:
    """A CPU, contiguous tensor's bytes as a writable buffer, without a copy."""
    return t.reshape(-1).view(torch.uint8).numpy()


def _to_disk(t: torch.Tensor) -> bool:
    """Plain dense tensors go to disk byte for byte; anything else (quantized, sparse, a tensor
    subclass whose bytes are not its values) is cloned in memory instead."""
    return (
        type(t) in (torch.Tensor, torch.nn.Parameter)
        and t.layout == torch.strided
        and not t.is_quantized
        and not t.is_meta
    )


class DiskSnapshot(Snapshot):
    """The bytes of each written tensor, appended to an unnamed temporary file in ``directory``.

    ``reserve`` bytes are allocated before anything is written to the model: a disk too full or
    a folder that cannot be written refuses the apply with a ``PlanError``, the model untouched.
    """

    kind = "disk"

    def __init__(self, directory: str | os.PathLike[str] | None, reserve: int) -> None:
        super().__init__()
        folder = Path(directory) if directory is not None else Path(tempfile.gettempdir())
        self._directory = folder
        self._size = 0
        hint = (
            "pass snapshot_dir= a folder with room (or snapshot='memory' if the old values fit "
            "in memory)"
        )
        try:
            # owned by the snapshot, which outlives this call: close() closes it
            self._file: IO[bytes] = tempfile.TemporaryFile(  # noqa: SIM115
                "w+b", buffering=_WRITE_BUFFER, prefix="ckptviz-undo-", dir=folder
            )
        except OSError as exc:
            raise PlanError(
                f"cannot create the undo snapshot file in {folder} ({exc.strerror or exc}); "
                f"{hint}. Nothing was changed"
            ) from None
        try:
            _reserve(self._file, folder, reserve)
        except OSError as exc:
            self._file.close()
            raise PlanError(
                f"cannot reserve {human_bytes(reserve)} for the undo snapshot in {folder} "
                f"({exc.strerror or exc}); {hint}. Nothing was changed"
            ) from None

    @property
    def directory(self) -> Path | None:
        return self._directory

    def save(self, key: str, target: torch.Tensor) -> torch.Tensor | None:
        if not _to_disk(target):
            return self._keep_copy(key, target)
        data = target.detach()
        if data.device.type != "cpu":
            data = data.to("cpu")
        data = data.contiguous()
        nbytes = nbytes_of(data)
        if nbytes:
            self._file.write(_byte_view(data))
        # recorded only once all its bytes are written: an interrupted write leaves no entry
        entry = _Entry(
            key, target, "file", offset=self._size, nbytes=nbytes, shape=tuple(data.shape)
        )
        entry.dtype = data.dtype
        self._entries.append(entry)
        self._size += nbytes
        return None

    def _restore_entry(self, entry: _Entry) -> None:
        if entry.how == "file":
            entry.target.copy_(self._read(entry))
        else:
            super()._restore_entry(entry)

    def _read(self, entry: _Entry) -> torch.Tensor:
        """One saved tensor, read back into fresh memory of its size (one at a time)."""
        buffer = torch.empty(entry.shape, dtype=entry.dtype)
        if entry.nbytes:
            self._file.flush()
            self._file.seek(entry.offset)
            got = self._file.readinto(_byte_view(buffer))  # type: ignore[attr-defined]
            if got != entry.nbytes:
                raise OSError(
                    f"the snapshot file ended after {got} of {entry.nbytes} bytes of {entry.key}"
                )
        return buffer

    def close(self) -> None:
        super().close()
        self._file.close()  # an unnamed file: closing it frees its space


def _reserve(file: IO[bytes], folder: Path, nbytes: int) -> None:
    """Allocate ``nbytes`` for ``file`` now, or fail with the reason (no space, file too large)."""
    if nbytes <= 0:
        return
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(file.fileno(), 0, nbytes)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
    # no way to reserve here: at least check that the room is there now
    free = shutil.disk_usage(folder).free
    if free < nbytes:
        raise OSError(errno.ENOSPC, f"{human_bytes(free)} free, {human_bytes(nbytes)} needed")


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block is done, then raise KeyboardInterrupt once.

    Only the main thread receives signals, so elsewhere this holds nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    except ValueError:  # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(
            signal.SIGINT, previous if previous is not None else signal.default_int_handler
        )
    if caught:
        raise KeyboardInterrupt


# -- choosing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SnapshotChoice:
    """Which snapshot an apply uses, and why (said in the report)."""

    kind: str
    reason: str


def available_memory() -> int | None:
    """Bytes of memory this process could still take, where the system says: Linux's
    MemAvailable, lowered by a cgroup (container) limit; elsewhere half the physical memory."""
    system = sys.platform  # (a variable: mypy would judge the other branch unreachable)
    if system.startswith("linux"):
        available = _meminfo_available()
        room = _cgroup_room()
        if available is not None and room is not None:
            return min(available, room)
        return available if available is not None else room
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (AttributeError, ValueError, OSError):
        return None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room() -> int | None:
    """The room left under this process's cgroup v2 memory limit, if it has one."""
    try:
        with open("/proc/self/cgroup") as groups:
            line = next((ln for ln in groups if ln.startswith("0::")), None)
        if line is None:
            return None
        folder = Path("/sys/fs/cgroup") / line[3:].strip().lstrip("/")
        limit = (folder / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((folder / "memory.current").read_text()))
    except (OSError, ValueError):
        return None


#: The budget when the system does not say how much memory is available.
FALLBACK_BUDGET = 1 << 30


def default_memory_budget() -> tuple[int, str]:
    """A quarter of the memory available now, and how it was found."""
    available = available_memory()
    if available is None:
        return FALLBACK_BUDGET, "the fallback, as this system does not say what memory is free"
    return available // 4, f"a quarter of the {human_bytes(available)} of memory available"


def choose_snapshot(mode: str, nbytes: int, memory_budget: int | None) -> SnapshotChoice:
    """``memory`` or ``disk`` for ``nbytes`` of old values, as ``mode`` asks."""
    if mode not in SNAPSHOT_MODES:
        raise PlanError(
            f"snapshot={mode!r} is not a snapshot mode: pass 'auto' (disk when the old values "
            "would exceed memory_budget), 'memory' or 'disk'"
        )
    if memory_budget is not None and (
        isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 0
    ):
        raise PlanError(
            f"memory_budget={memory_budget!r} must be a number of bytes (an int >= 0), "
            "e.g. memory_budget=8 * 2**30"
        )
    if mode == "memory":
        return SnapshotChoice("memory", "snapshot='memory'")
    if mode == "disk":
        return SnapshotChoice("disk", "snapshot='disk'")
    if memory_budget is None:
        budget, how = default_memory_budget()
    else:
        budget, how = memory_budget, "memory_budget"
    if nbytes > budget:
        return SnapshotChoice(
            "disk",
            f"{human_bytes(nbytes)} would exceed the memory budget of "
            f"{human_bytes(budget)} ({how})",
        )
    return SnapshotChoice(
        "memory", f"{human_bytes(nbytes)} fits the memory budget of {human_bytes(budget)} ({how})"
    )


def new_snapshot(
    choice: SnapshotChoice, nbytes: int, directory: str | os.PathLike[str] | None
) -> Snapshot:
    if choice.kind == "disk":
        return DiskSnapshot(directory, nbytes)
    return MemorySnapshot()
