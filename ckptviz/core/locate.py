"""Finding the state dict inside a nested checkpoint, and its tensors' metadata.

A checkpoint file often holds more than weights (Lightning's ``state_dict`` next to optimizer
state, an ``ema`` copy, training args): ``locate`` picks the mapping that holds the tensors, known
names first, and lists the other candidates; ``tensor_table`` describes its tensors and finds the
ones that share a storage. Every source (files, state dicts, modules) ends in
``checkpoint_from_object``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from itertools import islice, repeat
from math import prod
from pathlib import Path
from typing import Any

import torch
from torch.nn import Parameter

from ckptviz.core.checkpoint import (
    Checkpoint,
    DeclaredTensor,
    FileFingerprint,
    TensorInfo,
    TensorSource,
    declarations_of,
    dtype_facts,
    dtype_names,
    trusted_tensor_info,
)
from ckptviz.core.errors import CheckpointError

#: Where checkpoints commonly keep their weights, most specific first.
STATE_DICT_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "net",
    "network",
    "model_ema",
    "state_dict_ema",
    "ema",
    "ema_state_dict",
    "params",
    "weights",
)


_TENSOR_TYPES = (torch.Tensor, DeclaredTensor)


def _tensor_count(obj: Mapping[Any, Any], first: int | None = None) -> int:
    """How many of ``obj``'s values (of its ``first`` ones only, if given) are tensors."""
    values = obj.values() if first is None else islice(obj.values(), first)
    # ``isinstance`` of each value, called from C (``map``): a state dict can hold 100,000
    return sum(map(isinstance, values, repeat(_TENSOR_TYPES)))


def _looks_like_state_dict(obj: object, loose: bool = False) -> bool:
    if not isinstance(obj, Mapping) or not obj:
        return False
    # At least half its values tensors (any one, loose): when the first half already are (a
    # state dict's values nearly always all are), the rest need not be looked at.
    enough = 1 if loose else (len(obj) + 1) // 2
    if _tensor_count(obj, enough) == enough:
        return True
    tensors = _tensor_count(obj)
    return tensors > 0 and (loose or tensors * 2 >= len(obj))


def _find_candidates(
    obj: Mapping[Any, Any], depth: int = 3, loose: bool = False
) -> list[tuple[str, ...]]:
    """Paths to every nested mapping that looks like a state dict, breadth first.

    ``loose`` takes any mapping holding a tensor: the fallback for a state dict whose entries
    are mostly not tensors (an epoch counter, args, a history list next to a few weights).
    """
    found: list[tuple[str, ...]] = []
    frontier: list[tuple[tuple[str, ...], Mapping[Any, Any]]] = [((), obj)]
    for _ in range(depth + 1):
        next_frontier = []
        for path, node in frontier:
            if _looks_like_state_dict(node, loose):
                found.append(path)
                continue
            for name, value in node.items():
                if isinstance(name, str) and isinstance(value, Mapping):
                    next_frontier.append(((*path, name), value))
        frontier = next_frontier
    return found


def _rank(path: tuple[str, ...]) -> tuple[int, int]:
    """Known state-dict names first, shallower first."""
    scores = [STATE_DICT_KEYS.index(p) for p in path if p in STATE_DICT_KEYS]
    return (min(scores) if scores else len(STATE_DICT_KEYS), len(path))


def _is_optimizer_state(obj: Mapping[Any, Any]) -> bool:
    """torch.optim's ``Optimizer.state_dict()`` (exactly its two entries), saved on its own."""
    if type(obj) in (dict, OrderedDict) and len(obj) != 2:  # (their length counts their keys)
        return False  # without a set of all of a state dict's 100,000 keys
    return (
        set(obj) == {"state", "param_groups"}
        and isinstance(obj["state"], Mapping)
        and isinstance(obj["param_groups"], list)
    )


def parse_key(key: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if key is None:
        return None
    if isinstance(key, str):
        return tuple(part for part in key.split("/") if part)
    return tuple(key)


def locate(
    obj: object, source: str, key: tuple[str, ...] | None
) -> tuple[Mapping[Any, Any], tuple[str, ...], list[tuple[str, ...]]]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{source}: expected a state dict (a dict of tensors) or a dict holding one, "
            f"found {type(obj).__name__}. If this is a whole pickled model, load it yourself "
            "and pass model.state_dict()."
        )
    if key is not None:
        node: object = obj
        for i, part in enumerate(key):
            if not isinstance(node, Mapping) or part not in node:
                where = "/".join(key[:i]) or "the top level"
                have = ", ".join(repr(k) for k in node) if isinstance(node, Mapping) else "-"
                raise CheckpointError(
                    f"{source}: no entry {part!r} at {where}; it has: {have}. "
                    "Pass key= as a path like 'state_dict' or 'ema/module'."
                )
            node = node[part]
        if not isinstance(node, Mapping):
            raise CheckpointError(
                f"{source}: the entry {'/'.join(key)!r} is a {type(node).__name__}, not a dict "
                "of tensors; pick another key=."
            )
        others = [c for c in _find_candidates(obj) if c != key]
        return node, key, others
    if _is_optimizer_state(obj):
        raise CheckpointError(
            f"{source}: an optimizer's state (torch.optim's state_dict(): 'state', "
            "'param_groups'), not model weights: its tensors are per-parameter statistics such "
            "as momentum, not values to load into a model. Pass the model's weights instead; "
            "accelerate's save_state writes them next to optimizer.bin as model.safetensors "
            "(pytorch_model.bin with safe_serialization=False), or pass that directory."
        )
    candidates = sorted(_find_candidates(obj), key=_rank)
    if not candidates:
        candidates = sorted(_find_candidates(obj, loose=True), key=_rank)
    if not candidates:
        entries = ", ".join(f"{k!r} ({type(v).__name__})" for k, v in list(obj.items())[:12])
        raise CheckpointError(
            f"{source}: found no dict of tensors in this checkpoint. Top-level entries: "
            f"{entries or 'none'}. Pass key='...' if the weights are stored under another name."
        )
    chosen = candidates[0]
    return navigate(obj, chosen), chosen, candidates[1:]


def _storage_identity(
    value: torch.Tensor, shape: tuple[int, ...]
) -> tuple[object, int, tuple[int, ...], tuple[int, ...]]:
    """What tied tensors share: storage, offset, shape and stride."""
    storage = value.untyped_storage()
    return (storage.data_ptr(), int(value.storage_offset()), shape, tuple(value.stride()))


#: (kind, owning module's type) of a tensor not read from a live module
_UNDESCRIBED: tuple[None, None] = (None, None)


def tensor_table(
    state: Mapping[Any, Any],
    described: Sequence[tuple[str | None, str | None]] | None = None,
) -> tuple[dict[str, TensorInfo], dict[str, str], list[tuple[str, ...]]]:
    """Metadata of every tensor in ``state``; ``described`` gives a live module's tensors
    their kind and owning module's type: (kind, module type) of each entry, in the state's
    order (read alongside it, rather than looked up by key).

    Ties are keys whose tensors share storage, offset, shape and stride (the same values)."""
    tensors: dict[str, TensorInfo] = {}
    skipped: dict[str, str] = {}
    by_storage: dict[tuple[object, int, tuple[int, ...], tuple[int, ...]], list[str]] = {}
    # plain tensors with data, by the address of their first element: only those sharing one
    # can be tied, so their storage, offset and stride are asked for only then (3 torch calls
    # fewer each); the addresses are compared once, after the loop
    addresses: list[int] = []
    addressed: list[str] = []
    others_in_storage = False  # a tensor subclass was grouped by storage directly
    facts = dtype_facts
    descriptions = repeat(_UNDESCRIBED) if described is None else described
    for (name, value), (kind, module_type) in zip(
        state.items(), descriptions, strict=described is not None
    ):
        value_type = type(value)
        if type(name) is str and (value_type is torch.Tensor or value_type is Parameter):
            # The common case, a plain tensor under a plain key, with as few torch calls as can
            # be (a state dict can hold 100,000 tensors): shape and dtype. They come from the
            # torch tensor itself (its exact type checked above), not from a file, and torch
            # guarantees what ``TensorInfo`` would check (non-negative 64-bit sizes, a countable
            # element count, a real dtype) except the rank: torch makes tensors of more than
            # ``MAX_RANK`` dimensions, and those still go through ``TensorInfo``, which refuses
            # them. Files always go through ``TensorInfo``, which checks every field.
            shape = tuple(value.shape)
            dtype, itemsize = facts[value.dtype]
            nbytes = prod(shape) * itemsize  # the product of the sizes is the numel()
            tensors[name] = trusted_tensor_info(name, shape, dtype, nbytes, kind, module_type)
            if nbytes:  # (0 exactly when there are no elements: no dtype has 0 bytes)
                address = value.data_ptr()
                if address:  # (0 on the meta device)
                    addresses.append(address)
                    addressed.append(name)
                    continue
            if value.is_meta:  # no storage to compare: tied meta tensors are one object
                by_storage.setdefault((id(value), -1, shape, ()), []).append(name)
            continue
        if not isinstance(name, str):
            skipped[repr(name)] = f"key of type {type(name).__name__}, not a string"
            continue
        if type(name) is not str:  # a str subclass (numpy.str_): its plain text is the key
            name = str.__str__(name)
        if isinstance(value, DeclaredTensor):
            tensors[name] = TensorInfo(name, value.shape, value.storage.dtype, value.nbytes)
            if value.numel:
                declared = (value.storage.key, value.offset, value.shape, value.stride)
                by_storage.setdefault(declared, []).append(name)
            continue
        if not isinstance(value, torch.Tensor):
            what = "list" if isinstance(value, list) else type(value).__name__
            if isinstance(value, Mapping):
                what = f"nested dict with {_tensor_count(value)} tensors"
            skipped[name] = what
            continue
        shape = tuple(value.shape)
        nbytes = value.numel() * value.element_size()
        dtype = dtype_names[value.dtype]
        tensors[name] = TensorInfo(name, shape, dtype, nbytes, kind, module_type)
        if value.is_meta:  # no storage to compare: tied meta tensors are one object
            by_storage.setdefault((id(value), -1, shape, ()), []).append(name)
        elif value.numel() > 0:
            others_in_storage = True
            by_storage.setdefault(_storage_identity(value, shape), []).append(name)
    # a tensor subclass may share storage with any plain tensor: then all are grouped by
    # storage; otherwise only those whose first element's address another one has
    if others_in_storage or len(set(addresses)) < len(addresses):
        at_address: dict[int, list[str]] = {}
        for address, name in zip(addresses, addressed, strict=True):
            at_address.setdefault(address, []).append(name)
        for names in at_address.values():
            if others_in_storage or len(names) > 1:
                for name in names:
                    identity = _storage_identity(state[name], tensors[name].shape)
                    by_storage.setdefault(identity, []).append(name)
    ties = [keys for keys in by_storage.values() if len(keys) > 1]
    if ties:  # keys in the state's order, groups in the order of their first key
        order = {key: i for i, key in enumerate(tensors)}
        ties = sorted(
            (sorted(keys, key=order.__getitem__) for keys in ties), key=lambda k: order[k[0]]
        )
    return tensors, skipped, [tuple(keys) for keys in ties]


def checkpoint_from_object(
    obj: object,
    *,
    source: str,
    fmt: str,
    key: tuple[str, ...] | None,
    path: Path | None = None,
    opener: Callable[[Checkpoint], AbstractContextManager[TensorSource]] | None = None,
    described: Sequence[tuple[str | None, str | None]] | None = None,
    **extra: Any,
) -> Checkpoint:
    """The checkpoint of the state dict ``locate`` finds in ``obj``; ``described`` gives the
    kind and owning module's type of each entry of ``obj`` (a live module's state), in order."""
    state, location, candidates = locate(obj, source, key)
    if described is not None and location:  # the entries of a mapping found inside ``obj``
        described = _described_by_key(navigate(obj, ()), described, state)
    with declarations_of(source):
        tensors, skipped, ties = tensor_table(state, described)
    if not tensors:
        raise CheckpointError(
            f"{source}: the entry at {'/'.join(location) or 'the top level'} holds no tensors "
            f"(found {', '.join(skipped.values()) or 'nothing'}); pick another key=."
        )
    return Checkpoint(
        source=source,
        format=fmt,
        tensors=tensors,
        path=path,
        location=location,
        candidates=candidates,
        skipped=skipped,
        ties=ties,
        fingerprint=FileFingerprint.of(path) if path is not None else None,
        _opener=opener,
        _keys_checked=True,  # tensor_table put each TensorInfo it made under its own key
        **extra,
    )


def _described_by_key(
    obj: Mapping[Any, Any],
    described: Sequence[tuple[str | None, str | None]],
    state: Mapping[Any, Any],
) -> list[tuple[str | None, str | None]]:
    """``described`` of ``obj``'s entries, for ``state``'s entries: by key (a key of ``state``
    as ``tensor_table`` names it, a ``str`` subclass as its plain text)."""
    by_key = dict(zip(obj, described, strict=True))
    return [
        by_key.get(str.__str__(name), _UNDESCRIBED) if isinstance(name, str) else _UNDESCRIBED
        for name in state
    ]


def navigate(obj: object, location: tuple[str, ...]) -> Mapping[str, torch.Tensor]:
    for part in location:
        obj = obj[part]  # type: ignore[index]
    assert isinstance(obj, Mapping)
    return obj
