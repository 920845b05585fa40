"""Checkpoint file formats: one module each, and the one ordered list files are matched against.

A file (or directory) is read by the first format whose ``detect`` says yes. A new format is one
module here (a ``FORMAT = FileFormat(...)``: detect, read, code export) plus one line below.
"""

from ckptviz.core.formats import dcp, peft_adapter, safetensors, sharded, torch_legacy, torch_zip
from ckptviz.core.formats.base import FORMATS, FileFormat, format_named

FORMATS[:] = [
    # Directory formats first: a DCP ``.metadata`` file would otherwise pass for a legacy pickle.
    dcp.FORMAT,
    # before sharded: a directory holding an adapter and a model's weights is refused as such
    peft_adapter.FORMAT,
    sharded.FORMAT,
    safetensors.FORMAT,
    torch_zip.FORMAT,
    torch_legacy.FORMAT,
]

__all__ = ["FORMATS", "FileFormat", "format_named"]
