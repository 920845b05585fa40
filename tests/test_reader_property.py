"""Property: for any torch zip file, built by ``torch.save`` and then damaged or tampered with,
what ckptviz reads is what ``torch.load(weights_only=True)`` reads, or ckptviz refuses it with a
``CheckpointError``. Never other values, never another exception.

The files hold random nested dicts of tensors of every common dtype (complex, bool and bfloat16
too), views sharing one storage (transposed, offset, strided, expanded), conj and neg views and
parameters. The mutations rewrite ``data.pkl`` (a byte flipped or replaced by an opcode, a BUILD
or another opcode inserted, cut short), change an entry's compression, duplicate an entry, grow
or shrink a data record, or cut the file short. The zip is rebuilt around a mutated entry, so its
CRC is right and the damage reaches the readers.

``torch.load`` is called with ``map_location="cpu"``, as ckptviz reads (a mutation of the saved
device string would otherwise fail only for lack of that device). The examples are derandomized
(a fixed seed) when ``CI`` is set. ``READER_EXAMPLES=2000`` runs more.
"""

from __future__ import annotations

import os
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torchzip_craft import entries, rewrite_zip

import ckptviz
from ckptviz import CheckpointError
from ckptviz.core.apply import bitwise_equal

IN_CI = bool(os.environ.get("CI"))
EXAMPLES = int(os.environ.get("READER_EXAMPLES", "150"))

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
]


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    """A tensor, often a view of a bigger one (its storage shared with siblings)."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    numel = 1
    for size in shape:
        numel *= size
    base = torch.arange(max(numel, 1) * 3, dtype=torch.float64)
    base = (base * 1.5 - 4).to(dtype) if dtype != torch.bool else base.remainder(2).bool()
    value = base[draw(st.integers(0, max(numel, 1))) :][:numel].reshape(shape)
    view = draw(st.sampled_from(["plain", "transposed", "strided", "expanded", "conj", "neg"]))
    if view == "transposed" and value.dim() >= 2:
        value = value.transpose(0, 1)
    elif view == "strided" and value.dim() >= 1:
        value = value[::2]
    elif view == "expanded" and value.dim() >= 1 and value.shape[0] >= 1:
        value = value[:1].expand(3, *value.shape[1:])
    elif view == "conj" and dtype.is_complex:
        value = value.conj()
    elif view == "neg" and (dtype.is_floating_point or dtype.is_complex):
        value = torch._neg_view(value)
    if draw(st.booleans()) and dtype.is_floating_point:
        value = torch.nn.Parameter(value.detach().clone(), requires_grad=draw(st.booleans()))
    return value


def nested(children: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.text("abcw.", min_size=1, max_size=6), children, max_size=4)


# a dict with tensors at its top level (a state dict), and maybe more around them
STATES = st.builds(
    lambda around, tensors: {**around, **tensors},
    nested(st.recursive(tensors(), nested, max_leaves=6) | st.integers() | st.none()),
    st.dictionaries(st.text("abcw.", min_size=1, max_size=6), tensors(), min_size=1, max_size=4),
)

# opcodes worth inserting: BUILD with None and with a slot state, SETITEM on what is there,
# empty SETITEMS/APPENDS, an empty list, a SHORT_BINUNICODE, a NEWOBJ, a POP, a huge memo put
INSERTS = [
    b"Nb",
    b"N}X\x06\x00\x00\x00offsetK\x01s\x86b",
    b"N}X\x03\x00\x00\x00keyX\x01\x00\x00\x001s\x86b",
    b"K\x00K\x01s",
    b"(u",
    b"(e",
    b"]",
    b"\x8c\x01x",
    b"\x81",
    b"0",
    b"r\xff\xff\xff\x7f",
    b"\x89",
    b"K\x05",
]


@st.composite
def mutations(draw: st.DrawFn) -> tuple[str, int, bytes]:
    kind = draw(
        st.sampled_from(
            [
                "none",
                "flip",
                "replace",
                "insert",
                "cut pickle",
                "cut file",
                "compress record",
                "compress pickle",
                "duplicate",
                "grow record",
                "shrink record",
            ]
        )
    )
    return kind, draw(st.integers(0, 2**31)), draw(st.sampled_from(INSERTS))


def mutate(path: Path, kind: str, where: int, insert: bytes) -> None:
    if kind == "cut file":
        data = path.read_bytes()
        path.write_bytes(data[: where % len(data)])
        return
    items = entries(path)
    pickle_at = next(i for i, (info, _) in enumerate(items) if info.filename.endswith("data.pkl"))
    records = [i for i, (info, _) in enumerate(items) if "/data/" in info.filename]
    info, pickle = items[pickle_at]
    at = where % len(pickle)
    if kind == "flip":
        items[pickle_at] = (
            info,
            pickle[:at] + bytes([pickle[at] ^ (1 << where % 8)]) + pickle[at + 1 :],
        )
    elif kind == "replace":
        items[pickle_at] = (info, pickle[:at] + insert[:1] + pickle[at + 1 :])
    elif kind == "insert":
        items[pickle_at] = (info, pickle[:at] + insert + pickle[at:])
    elif kind == "cut pickle":
        items[pickle_at] = (info, pickle[:at])
    elif kind == "compress pickle":
        info.compress_type = zipfile.ZIP_DEFLATED
    elif records and kind in ("compress record", "duplicate", "grow record", "shrink record"):
        index = records[where % len(records)]
        record, data = items[index]
        if kind == "compress record":
            record.compress_type = zipfile.ZIP_DEFLATED
        elif kind == "duplicate":
            items.insert(where % (len(items) + 1), (record, bytes(len(data))))
        elif kind == "grow record":
            items[index] = (record, data + struct.pack("<I", where)[: 1 + where % 4])
        else:
            items[index] = (record, data[: max(len(data) - 1 - where % 4, 0)])
    rewrite_zip(path, items)


def _tensors_at(obj: Any, location: tuple[str, ...]) -> Any:
    for part in location:
        obj = obj[part]
    return obj


@pytest.mark.filterwarnings("ignore")  # torch's unpickler warns about the odd protocols met
@settings(
    max_examples=EXAMPLES,
    derandomize=IN_CI,
    database=None if IN_CI else settings.default.database,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(state=STATES, mutation=mutations())
def test_ckptviz_reads_what_torch_load_reads_or_refuses(
    state: dict[str, Any], mutation: tuple[str, int, bytes]
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "checkpoint.pt"
        torch.save(state, path)
        mutate(path, *mutation)
        try:
            wanted: Any = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            wanted = exc
        try:
            ckpt = ckptviz.read_checkpoint(path)
            with ckpt.open() as data:
                got = {key: data[key] for key in ckpt}
                assert not isinstance(wanted, Exception), f"torch.load refused: {wanted!r}"
                expected = _tensors_at(wanted, ckpt.location)
                for key, value in got.items():
                    want = expected[key]
                    assert value.dtype == want.dtype, key
                    assert value.shape == want.shape, key
                    assert value.stride() == want.stride(), key
                    # (each tensor is read into memory of its own: where it starts in its
                    # storage may differ from torch's shared storage, its values may not)
                    resolved = value.resolve_conj().resolve_neg()
                    assert bitwise_equal(resolved, want.resolve_conj().resolve_neg()), key
        except CheckpointError:
            pass  # refusing is always allowed
