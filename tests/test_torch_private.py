"""Each function of ``ckptviz.core._torch_private`` on a tiny real input.

These fail when torch moves or changes the private thing underneath, naming it.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from ckptviz.core import _torch_private as private


class _Anything:
    """Stands for every global, so a pickle is walked without building torch objects."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass


class _Recorder(pickle.Unpickler):
    """Walks a pickle this test wrote, noting every (module, name) global it names."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.named: set[tuple[str, str]] = set()

    def find_class(self, module: str, name: str) -> object:
        self.named.add((module, name))
        return _Anything

    def persistent_load(self, pid: object) -> object:
        return None  # torch.save's storages: only the globals matter here


def _pickle_globals(data: bytes) -> set[tuple[str, str]]:
    recorder = _Recorder(data)
    recorder.load()
    return recorder.named


def test_weights_only_unpickler_reads_plain_data_and_refuses_code() -> None:
    plain = {"a": [1, 2.5, "x"], "b": (None, True)}
    assert private.weights_only_unpickler(io.BytesIO(pickle.dumps(plain, protocol=2))).load() == (
        plain
    )
    hostile = pickle.dumps(os.system, protocol=2)  # a GLOBAL naming os.system
    with pytest.raises(pickle.UnpicklingError):
        private.weights_only_unpickler(io.BytesIO(hostile)).load()


def test_weights_only_allowed_globals_are_the_defaults_plus_safe_globals() -> None:
    defaults = private.weights_only_allowed_globals()
    assert "torch._utils._rebuild_tensor_v2" in defaults
    assert "argparse.Namespace" not in defaults
    with torch.serialization.safe_globals([argparse.Namespace]):
        assert "argparse.Namespace" in private.weights_only_allowed_globals()


def test_saved_tensor_globals_are_what_torch_save_writes() -> None:
    buffer = io.BytesIO()
    torch.save({"t": torch.zeros(2), "p": nn.Parameter(torch.ones(3))}, buffer)
    with zipfile.ZipFile(buffer) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    tensor, parameter = private.saved_tensor_globals()
    assert {tensor, parameter} <= _pickle_globals(data)


def test_storage_identity_is_shared_by_views_and_wrappers() -> None:
    base = torch.arange(6.0)
    view = base[2:]
    other = torch.arange(6.0)
    assert private.storage_identity(base.untyped_storage()) == private.storage_identity(
        view.untyped_storage()
    )
    assert private.storage_identity(base.untyped_storage()) != private.storage_identity(
        other.untyped_storage()
    )
    meta = torch.UntypedStorage(16, device="meta")
    on_meta = torch.empty(0, device="meta").set_(meta, 0, (4,), (1,))
    assert private.storage_identity(on_meta.untyped_storage()) == private.storage_identity(meta)


def test_typed_storage_wraps_without_warning() -> None:
    untyped = torch.UntypedStorage(8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        typed = private.typed_storage(untyped, torch.float16)
    assert isinstance(typed, torch.storage.TypedStorage)
    assert typed.dtype == torch.float16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # size() of a TypedStorage warns that it is deprecated
        assert typed.size() == 4


def test_tensor_version_moves_on_in_place_writes_only() -> None:
    tensor = torch.zeros(3)
    before = private.tensor_version(tensor)
    _ = tensor + 1
    assert private.tensor_version(tensor) == before
    tensor.add_(1)
    assert private.tensor_version(tensor) == before + 1
    tensor[0] = 5
    assert private.tensor_version(tensor) == before + 2


def test_forward_pre_hooks_lists_weight_norm() -> None:
    layer = nn.Linear(2, 2)
    assert private.forward_pre_hooks(layer) == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # weight_norm is deprecated in favour of parametrize
        nn.utils.weight_norm(layer)
    hooks = private.forward_pre_hooks(layer)
    assert [type(h).__name__ for h in hooks] == ["WeightNorm"]
    assert hooks[0].name == "weight"


def _dcp_metadata_globals(tmp_path: Path) -> set[tuple[str, str]]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    state = {"w": torch.ones(2, 3).to(memory_format=torch.contiguous_format)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=FileSystemWriter(tmp_path), no_dist=True)
    return _pickle_globals((tmp_path / ".metadata").read_bytes())


def test_dcp_private_classes_are_what_metadata_names(tmp_path: Path) -> None:
    named = _dcp_metadata_globals(tmp_path)
    classes = private.dcp_private_metadata_classes()
    assert private.dcp_storage_info_class() in classes
    for cls in classes:
        assert (cls.__module__, cls.__qualname__) in named
    layout_global, get_layout = private.pickled_layout_global()
    assert layout_global in named
    assert get_layout("torch.strided") is torch.strided


def test_dcp_legacy_metadata_classes_are_plain_classes_or_absent() -> None:
    legacy = private.dcp_legacy_metadata_classes()
    assert all(isinstance(cls, type) for cls in legacy)
    assert [cls.__name__ for cls in legacy] in ([], ["TensorProperties", "MEM_FORMAT_ENCODING"])


def test_module_tables_include_none_registrations() -> None:
    layer = nn.Linear(3, 2, bias=False)
    layer.register_buffer("scale", torch.ones(2))
    layer.register_buffer("absent", None)
    parameters, buffers, children = private.module_tables(layer)
    assert parameters == {"weight": layer.weight, "bias": None}
    assert set(buffers) == {"scale", "absent"} and buffers["absent"] is None
    assert children == {}
    outer = nn.Sequential(layer)
    assert private.module_tables(outer)[2] == {"0": layer}


def test_module_with_tables_is_a_shallow_copy_with_its_own_registrations() -> None:
    layer = nn.Linear(3, 2)
    weight = nn.Parameter(torch.zeros(2, 3))
    twin = private.module_with_tables(layer, {"weight": weight, "bias": None}, {}, {})
    assert type(twin) is nn.Linear and twin.in_features == 3
    assert twin.weight is weight and twin.bias is None
    twin.reset_parameters()  # the initialiser writes the copy's tensors only
    assert not torch.equal(weight, torch.zeros(2, 3))
    assert layer.bias is not None and layer.weight is not weight
    assert private.module_tables(layer)[0]["weight"] is layer.weight


def test_saves_state_as_module_does_is_false_where_state_dict_writes_otherwise() -> None:
    class Scaled(nn.Linear):
        def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
            super()._save_to_state_dict(destination, prefix, keep_vars)
            destination[prefix + "scale"] = torch.ones(1)

    class Stepped(nn.Linear):
        def get_extra_state(self) -> int:
            return 3

    assert private.saves_state_as_module_does(nn.Linear)
    assert private.saves_state_as_module_does(nn.Sequential)
    # torch's state_dict calls these very methods: what each one adds is there
    assert list(Scaled(2, 2).state_dict()) == ["weight", "bias", "scale"]
    assert list(Stepped(2, 2).state_dict()) == ["weight", "bias", "_extra_state"]
    assert not private.saves_state_as_module_does(Scaled)
    assert not private.saves_state_as_module_does(Stepped)
    # what torch.jit.script makes: its tables are wrappers of a C++ module
    assert not private.saves_state_as_module_does(torch.jit.RecursiveScriptModule)


def test_state_tables_are_what_state_dict_reads_or_none_with_a_hook() -> None:
    layer = nn.Linear(3, 2)
    layer.register_buffer("scratch", torch.zeros(1), persistent=False)
    tables = private.state_tables(layer)
    assert tables is not None
    parameters, buffers, non_persistent, children = tables
    assert parameters is private.module_tables(layer)[0] and children == {}
    assert set(buffers) == {"scratch"} and non_persistent == {"scratch"}
    assert list(layer.state_dict()) == ["weight", "bias"]  # the set's buffers left out
    hooked = nn.Linear(3, 2)
    handle = hooked.register_state_dict_post_hook(lambda *_: None)
    assert private.state_tables(hooked) is None
    handle.remove()
    assert private.state_tables(hooked) is not None
    hooked.register_state_dict_pre_hook(lambda *_: None)
    assert private.state_tables(hooked) is None
    patched = nn.Linear(3, 2)
    patched.state_dict = lambda *a, **k: {}  # type: ignore[method-assign,assignment]
    assert private.state_tables(patched) is None
