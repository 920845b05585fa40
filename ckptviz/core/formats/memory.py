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

    # one walk of the module tree for both what owns each key and which tensors are parameters
    # (``named_modules`` and ``named_parameters`` would walk it once each, on top of
    # ``state_dict``'s own walk): every name a module is reachable under, shared ones included
    owners: dict[str, str] = {}
    parameter_ids: set[int] = set()
    for owner_name, owner in module.named_modules(remove_duplicate=False):
        owners[owner_name] = type(owner).__name__
        parameter_ids.update(map(id, module_tables(owner)[0].values()))
    parameter_ids.discard(id(None))  # (a parameter registered as None, like a Linear's bias)
    described: dict[str, tuple[str, str | None]] = {}
    for name, value in state.items():
        owner_name = str(name).rpartition(".")[0]  # (a custom hook's key may not be a str)
        owner_type = owners.get(owner_name)
        if owner_type is None:  # a custom hook's key
            try:
                owner_type = type(module.get_submodule(owner_name)).__name__
            except AttributeError:
                owner_type = None
        described[name] = ("parameter" if id(value) in parameter_ids else "buffer", owner_type)
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
