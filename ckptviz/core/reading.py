"""Reading: a checkpoint's tensor metadata, without its data, from any source.

Sources are checkpoint files and directories (format found by content, in ``formats.FORMATS``),
in-memory (nested) state dicts and ``nn.Module`` objects (``formats.memory``).

Tensor data is only fetched through ``Checkpoint.open()``, one tensor at a time, after checking
that the file is still the one that was read.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ckptviz.core.checkpoint import Checkpoint, gc_paused
from ckptviz.core.errors import CheckpointError
from ckptviz.core.formats import FORMATS
from ckptviz.core.formats.memory import read_mapping, read_module
from ckptviz.core.locate import parse_key
from ckptviz.core.safety import GlobalSpec


def _read_path(
    path: Path, *, key: tuple[str, ...] | None, trusted: bool, allow: Sequence[GlobalSpec]
) -> Checkpoint:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file. Check the path (cwd is {os.getcwd()}).")
    head = b""
    if path.is_file():
        try:
            with path.open("rb") as stream:
                head = stream.read(16)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot open it ({exc.strerror}).") from None
        if not head:
            raise CheckpointError(
                f"{path}: the file is empty; expected a torch or safetensors "
                "checkpoint. Was the save interrupted?"
            )
    for fmt in FORMATS:
        if fmt.detect(path, head):
            return fmt.read(path, key=key, trusted=trusted, allow=allow)
    if path.is_dir():
        raise CheckpointError(
            f"{path}: is a directory, but holds none of the checkpoints ckptviz reads as a "
            "directory: a Hugging Face save_pretrained directory (model.safetensors, "
            "pytorch_model.bin, or *.index.json and its shards), a PEFT adapter "
            "(adapter_model.safetensors or adapter_model.bin, with adapter_config.json) or a "
            "torch.distributed.checkpoint (.metadata and *.distcp). For a checkpoint file (.pt, "
            ".pth, .bin, .ckpt or .safetensors), pass the file inside it."
        )
    if path.is_file() and tarfile.is_tarfile(path):
        raise CheckpointError(
            f"{path}: a tar archive (the pre-2018 torch.save format); not a checkpoint I can "
            "read safely. Load it with an old torch and re-save it with torch.save."
        )
    raise CheckpointError(
        f"{path}: not a checkpoint I can read safely (it starts with {head[:8]!r}). Expected a "
        "file written by torch.save (zip) or safetensors; if it was one, it is truncated or "
        "damaged: re-save it or use another copy."
    )


def read_checkpoint(
    source: str | os.PathLike[str] | Mapping[Any, Any] | torch.nn.Module | Checkpoint,
    *,
    key: str | Sequence[str] | None = None,
    trusted: bool = False,
    allow_globals: Sequence[GlobalSpec] = (),
) -> Checkpoint:
    """Read a checkpoint's tensor metadata: names, shapes, dtypes, sizes; no tensor data.

    ``source`` is a file path (format found by content), a state dict or nested checkpoint dict,
    an ``nn.Module`` or a ``Checkpoint``. ``key`` picks the state dict inside a nested checkpoint
    (``"state_dict"``, or a path like ``"ema/module"``). Files are opened with
    ``weights_only=True``; ``allow_globals`` allows named pickle globals for this read only, and
    ``trusted=True`` unpickles fully (only for files you trust: it can run code).
    """
    with gc_paused():
        return _read(source, parse_key(key), trusted, allow_globals)


def _read(
    source: str | os.PathLike[str] | Mapping[Any, Any] | torch.nn.Module | Checkpoint,
    wanted: tuple[str, ...] | None,
    trusted: bool,
    allow_globals: Sequence[GlobalSpec],
) -> Checkpoint:
    if isinstance(source, Checkpoint):
        if wanted is not None and wanted != source.location:
            raise CheckpointError(
                f"{source.source}: already read at {source.location_text!r}; read the file again "
                "to use another key=."
            )
        return source
    if isinstance(source, torch.nn.Module):
        return read_module(source)
    if isinstance(source, Mapping):
        return read_mapping(source, wanted)
    if isinstance(source, (str, os.PathLike)):
        return _read_path(Path(source), key=wanted, trusted=trusted, allow=allow_globals)
    raise CheckpointError(
        f"cannot read a checkpoint from a {type(source).__name__}: pass a path, a state dict, "
        "an nn.Module or a Checkpoint."
    )
