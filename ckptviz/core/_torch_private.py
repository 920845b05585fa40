"""Every private torch name ckptviz relies on, each behind one small function.

torch may change any of these in a release without notice. Each function here has a test in
``tests/test_torch_private.py`` that runs it on a tiny real input, so a torch upgrade that moves
or changes one fails there, naming it, rather than somewhere deep in a read or an apply.
Nothing else in ckptviz names a private torch module, class, function or attribute.
"""

from __future__ import annotations

import importlib
from typing import IO, Any

import torch

# torch's weights-only unpickler and its TypedStorage constructor carry no type hints
_weights_only: Any = importlib.import_module("torch._weights_only_unpickler")
_TypedStorage: Any = torch.storage.TypedStorage


def weights_only_unpickler(stream: IO[bytes]) -> Any:
    """The unpickler ``torch.load(weights_only=True)`` uses, over ``stream``: it refuses every
    global not allowed by default or by ``torch.serialization.safe_globals``."""
    return _weights_only.Unpickler(stream, encoding="utf-8")


def weights_only_allowed_globals() -> set[str]:
    """The dotted names ``torch.load(weights_only=True)`` accepts right now: its defaults and
    whatever ``torch.serialization.safe_globals``/``add_safe_globals`` added."""
    return set(_weights_only._get_allowed_globals()) | set(
        _weights_only._get_user_allowed_globals()
    )


def saved_tensor_globals() -> tuple[tuple[str, str], tuple[str, str]]:
    """The (module, name) globals ``torch.save`` writes to rebuild a tensor and a parameter."""
    return ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter")


def storage_identity(storage: torch.UntypedStorage) -> int:
    """One number per underlying storage: ``tensor.untyped_storage()`` builds a new Python
    object on each call, and this is what they share (also for data-less ``meta`` storages)."""
    return int(storage._cdata)


def typed_storage(storage: torch.UntypedStorage, dtype: torch.dtype) -> Any:
    """A ``TypedStorage`` of ``dtype`` over ``storage``, as torch's own ``persistent_load``
    returns it to the unpickler (``_internal=True`` skips the deprecation warning)."""
    return _TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)


def tensor_version(tensor: torch.Tensor) -> int:
    """The tensor's in-place write counter: it moves on every in-place write to its storage."""
    return int(tensor._version)


def forward_pre_hooks(module: torch.nn.Module) -> list[Any]:
    """The forward pre-hooks registered on ``module`` (``weight_norm`` and ``spectral_norm``
    of ``torch.nn.utils`` register theirs there)."""
    return list(module._forward_pre_hooks.values())


def dcp_private_metadata_classes() -> tuple[type, ...]:
    """The private classes a ``torch.distributed.checkpoint`` ``.metadata`` pickle names: the
    memory-format encoding of ``TensorProperties`` and the file system's ``_StorageInfo``."""
    import torch.distributed.checkpoint.filesystem as dcp_filesystem
    import torch.distributed.checkpoint.metadata as dcp_metadata

    return (dcp_metadata._MEM_FORMAT_ENCODING, dcp_filesystem._StorageInfo)


def dcp_storage_info_class() -> type[Any]:
    """The class of each ``Metadata.storage_data`` value a file-system DCP save writes."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    return _StorageInfo


def dcp_legacy_metadata_classes() -> tuple[type, ...]:
    """Where torch < 2.1 kept ``TensorProperties`` (still plain data), for ``.metadata`` files
    it wrote; ``()`` once torch no longer has them."""
    try:
        import torch.distributed._shard.sharded_tensor.metadata as shard_metadata

        return (shard_metadata.TensorProperties, shard_metadata.MEM_FORMAT_ENCODING)
    except (ImportError, AttributeError):
        return ()


def pickled_layout_global() -> tuple[tuple[str, str], Any]:
    """The (module, name) global a pickled ``torch.layout`` names, and the function it means."""
    return ("torch.serialization", "_get_layout"), torch.serialization._get_layout


def module_tables(
    module: torch.nn.Module,
) -> tuple[
    dict[str, torch.nn.Parameter | None],
    dict[str, torch.Tensor | None],
    dict[str, torch.nn.Module | None],
]:
    """A module's own parameter, buffer and submodule tables, as registered: ``None`` entries
    included (``Linear(bias=False)`` registers ``bias`` as ``None``), which the public
    ``named_parameters``/``named_buffers``/``named_children`` leave out. A
    ``torch.jit.ScriptModule``'s are wrappers that answer ``in``, ``[]``, ``items()`` and
    ``values()`` only (no ``get``): read them with those."""
    return module._parameters, module._buffers, module._modules


def saves_state_as_module_does(cls: type[torch.nn.Module]) -> bool:
    """Whether ``state_dict()`` of a ``cls`` walks and writes as ``nn.Module``'s own does:
    ``cls`` overrides none of ``state_dict``, ``_save_to_state_dict`` and ``get_extra_state``
    (torch writes an ``_extra_state`` key for a class that does), nor ``named_modules`` or
    ``__hash__`` (which ``named_modules`` asks of every module); and it is no
    ``torch.jit.ScriptModule``, whose tables are wrappers of its C++ module, not dicts."""
    module = torch.nn.Module
    return (
        not issubclass(cls, torch.jit.ScriptModule)
        and cls.state_dict is module.state_dict
        and cls._save_to_state_dict is module._save_to_state_dict
        and getattr(cls, "get_extra_state", module.get_extra_state) is module.get_extra_state
        and cls.named_modules is module.named_modules
        and cls.__hash__ is module.__hash__
    )


def state_tables(
    module: torch.nn.Module,
) -> (
    tuple[
        dict[str, torch.nn.Parameter | None],
        dict[str, torch.Tensor | None],
        set[str],
        dict[str, torch.nn.Module | None],
    ]
    | None
):
    """What ``nn.Module.state_dict`` reads of ``module`` itself: its parameter, buffer and
    submodule tables and the names of its non-persistent buffers; ``None`` when ``module``
    has a state-dict hook or pre-hook (either may change the keys) or sets ``state_dict``,
    ``_save_to_state_dict`` or ``named_modules`` on the instance. Its class is asked of
    ``saves_state_as_module_does`` apart."""
    # read from the instance's dict, where ``nn.Module.__init__`` puts them: a walk asks this of
    # every module of a model, and a dict look-up costs less than an attribute on a module
    own = module.__dict__
    try:
        if own["_state_dict_hooks"] or own["_state_dict_pre_hooks"]:
            return None
        tables = (
            own["_parameters"],
            own["_buffers"],
            own["_non_persistent_buffers_set"],
            own["_modules"],
        )
    except KeyError:  # not on the instance (a module never initialised?): torch reads it
        return None
    # the methods ``state_dict`` calls, set on the instance itself
    if "state_dict" in own or "_save_to_state_dict" in own or "named_modules" in own:
        return None
    return tables


def module_with_tables(
    module: torch.nn.Module,
    parameters: dict[str, torch.nn.Parameter | None],
    buffers: dict[str, torch.Tensor | None],
    children: dict[str, torch.nn.Module | None],
) -> torch.nn.Module:
    """A shallow copy of ``module`` (its class, its attributes) with these tables of its own.

    No ``__new__`` or ``__init__`` runs (FSDP2's ``__new__`` would build the module again), and
    the copy's tables are not ``module``'s: writes into the copy's registrations leave
    ``module`` as it is."""
    twin = object.__new__(type(module))
    twin.__dict__.update(module.__dict__)
    twin._parameters = parameters
    twin._buffers = buffers
    twin._modules = children
    return twin
