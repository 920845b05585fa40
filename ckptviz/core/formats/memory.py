"""In-memory sources: a (nested) state dict and a live ``nn.Module``.

They are not files, so they are not in ``FORMATS``: ``read_checkpoint`` reads them by type.
Their data is the tensors themselves, detached.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from ckptviz.core._torch_private import (
    module_tables,
    saves_state_as_module_does,
    state_tables,
)
from ckptviz.core.checkpoint import Checkpoint, TensorSource
from ckptviz.core.errors import CheckpointError
from ckptviz.core.locate import checkpoint_from_object, navigate

#: ``Checkpoint.format`` of a checkpoint read from a state dict, and from a module.
STATE_DICT = "state dict"
MODULE = "module"


def read_mapping(obj: Mapping[Any, Any], key: tuple[str, ...] | None) -> Checkpoint:
    holder: list[Mapping[str, torch.Tensor]] = []

    @contextmanager
    def opener(ckpt: Checkpoint) -> Iterator[TensorSource]:
        yield TensorSource(ckpt, lambda k: _data_of(holder[0][k], ckpt.source, k))

    ckpt = checkpoint_from_object(
        obj, source="<state dict>", fmt=STATE_DICT, key=key, opener=opener
    )
    holder.append(navigate(obj, ckpt.location))
    return ckpt


def read_module(module: torch.nn.Module) -> Checkpoint:
    walked = _state_in_one_walk(module)
    if walked is None:  # a hook or an override may change the keys: torch's own state_dict
        state = module.state_dict(keep_vars=True)
        described = _described_by_path(module, state)
    else:
        state, described = walked

    @contextmanager
    def opener(ckpt: Checkpoint) -> Iterator[TensorSource]:
        yield TensorSource(ckpt, lambda k: _data_of(state[k], ckpt.source, k))

    # the table is built once, with each tensor's kind and owner
    return checkpoint_from_object(
        state,
        source=f"<{type(module).__name__} module>",
        fmt=MODULE,
        key=None,
        opener=opener,
        described=described,
    )


#: (kind, owning module's type) of each key of a state dict, in its order
_Described = list[tuple[str, str | None]]


def _state_in_one_walk(
    root: torch.nn.Module,
) -> tuple[dict[str, torch.Tensor], _Described] | None:
    """``root.state_dict(keep_vars=True)`` and each key's kind and owner's type, in one walk
    of the module tree (``state_dict`` and ``named_modules`` would walk it twice, then each key
    be looked up by its path); ``None`` where torch's own ``state_dict`` must be asked.

    Exact where every module saves its state as ``nn.Module`` does (no state-dict hook or
    pre-hook, no override: ``saves_state_as_module_does``, ``state_tables``) and no name has
    a dot (``add_module`` and ``register_*`` refuse one; a name put into the tables directly
    could make two keys, or two modules' paths, one). Then, as ``Module.state_dict`` does, it
    writes each module's parameters, then its persistent buffers (``None`` ones left out), then
    its children's, depth first in registration order; every key is written once, and the
    module that wrote it is the one at the key's path, as ``_described_by_path`` finds it.
    """
    state: dict[str, torch.Tensor] = {}
    described: _Described = []
    buffers: list[tuple[int, torch.Tensor, str]] = []  # (place in the state, buffer, owner's type)
    parameter_tables: list[dict[str, torch.nn.Parameter | None]] = []  # of every module walked
    plain_classes: dict[type[torch.nn.Module], bool] = {}
    stack: list[tuple[str, torch.nn.Module]] = [("", root)]
    while stack:
        prefix, module = stack.pop()
        cls = type(module)
        plain = plain_classes.get(cls)
        if plain is None:
            plain = plain_classes[cls] = saves_state_as_module_does(cls)
        tables = state_tables(module) if plain else None
        if tables is None:
            return None
        parameters, buffer_table, non_persistent, children = tables
        parameter_tables.append(parameters)
        owner = ("parameter", cls.__name__)  # one tuple for all of the module's parameters
        for name, parameter in parameters.items():
            if parameter is not None:
                key = prefix + name
                if "." in name:
                    return None
                state[key] = parameter
                described.append(owner)
        if buffer_table:
            for name, buffer in buffer_table.items():
                if buffer is not None and name not in non_persistent:
                    key = prefix + name
                    if "." in name or name in parameters:  # (the second: one key twice)
                        return None
                    state[key] = buffer
                    buffers.append((len(described), buffer, cls.__name__))
                    described.append(owner)  # its kind is known once every module is walked
        if children:
            for name, child in reversed(children.items()):  # popped in registration order
                if child is not None:
                    if type(name) is not str or not name or "." in name:
                        return None
                    stack.append((f"{prefix}{name}.", child))
    if buffers:  # a buffer is a parameter where any module has it as one (a tied one)
        parameter_ids = {
            id(parameter)
            for parameters in parameter_tables
            for parameter in parameters.values()
            if parameter is not None
        }
        for place, buffer, owner_type in buffers:
            kind = "parameter" if id(buffer) in parameter_ids else "buffer"
            described[place] = (kind, owner_type)
    return state, described


def _described_by_path(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> _Described:
    """Each key's kind and owner's type, looked up by the key's path in the module tree: for
    a state dict a hook or an override may have changed."""
    # one walk of the module tree for what owns each key: every name a module is reachable
    # under, shared ones included
    owners = dict(module.named_modules(remove_duplicate=False))
    # A key's tensor is a parameter when it is a parameter of any module (a tied parameter is
    # one under every key). Almost always it is its own owner's, under its own name: that is
    # asked first, and every module's parameters are gathered only for a key where it is not.
    parameter_ids: set[int] | None = None
    described: _Described = []
    for name, value in state.items():
        owner_name, _, leaf = str(name).rpartition(".")  # (a custom hook's key: maybe no str)
        owner = owners.get(owner_name)
        # (``in`` and ``[]``: a script module's tables are wrappers without ``get``)
        parameters = module_tables(owner)[0] if owner is not None else {}
        if leaf in parameters and parameters[leaf] is value:
            described.append(("parameter", type(owner).__name__))
            continue
        if parameter_ids is None:
            parameter_ids = {
                id(parameter)
                for each in owners.values()
                for parameter in module_tables(each)[0].values()
                if parameter is not None  # (registered as None, like a Linear's bias)
            }
        if owner is None:  # a custom hook's key
            try:
                owner = module.get_submodule(owner_name)
            except AttributeError:
                owner = None
        described.append(
            (
                "parameter" if id(value) in parameter_ids else "buffer",
                None if owner is None else type(owner).__name__,
            )
        )
    return described


def _data_of(tensor: torch.Tensor, source: str, key: str) -> torch.Tensor:
    if tensor.device.type == "meta":
        raise CheckpointError(
            f"{source}: {key!r} is on the meta device and has no data to copy; materialise the "
            "source first (e.g. module.to_empty(device='cpu') and load real weights into it)."
        )
    return tensor.detach()
