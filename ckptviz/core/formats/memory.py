"""In-memory sources: a (nested) state dict and a live ``nn.Module``.

They are not files, so they are not in ``FORMATS``: ``read_checkpoint`` reads them by type.
Their data is the tensors themselves, detached.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from ckptviz.core._torch_private import module_tables
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
    state = module.state_dict(keep_vars=True)

    @contextmanager
    def opener(ckpt: Checkpoint) -> Iterator[TensorSource]:
        yield TensorSource(ckpt, lambda k: _data_of(state[k], ckpt.source, k))

    # one walk of the module tree for what owns each key (``named_modules`` plus
    # ``named_parameters`` would walk it twice, on top of ``state_dict``'s own walk): every
    # name a module is reachable under, shared ones included
    owners = dict(module.named_modules(remove_duplicate=False))
    # A key's tensor is a parameter when it is a parameter of any module (a tied parameter is
    # one under every key). Almost always it is its own owner's, under its own name: that is
    # asked first, and every module's parameters are gathered only for a key where it is not.
    parameter_ids: set[int] | None = None
    described: dict[str, tuple[str, str | None]] = {}
    for name, value in state.items():
        owner_name, _, leaf = str(name).rpartition(".")  # (a custom hook's key: maybe no str)
        owner = owners.get(owner_name)
        if owner is not None and module_tables(owner)[0].get(leaf) is value:
            described[name] = ("parameter", type(owner).__name__)
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
        described[name] = (
            "parameter" if id(value) in parameter_ids else "buffer",
            None if owner is None else type(owner).__name__,
        )
    # the table is built once, with each tensor's kind and owner
    return checkpoint_from_object(
        state,
        source=f"<{type(module).__name__} module>",
        fmt=MODULE,
        key=None,
        opener=opener,
        described=described,
    )


def _data_of(tensor: torch.Tensor, source: str, key: str) -> torch.Tensor:
    if tensor.device.type == "meta":
        raise CheckpointError(
            f"{source}: {key!r} is on the meta device and has no data to copy; materialise the "
            "source first (e.g. module.to_empty(device='cpu') and load real weights into it)."
        )
    return tensor.detach()
