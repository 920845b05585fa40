"""Reading: sources, nested checkpoints, metadata without data, safety by default."""

from __future__ import annotations

import os
import pickle
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import SmallCNN
from safetensors.torch import save_file

import ckptviz
from ckptviz.core import reading


def test_reads_metadata_of_a_torch_zip_file_with_any_extension(tmp_path: Path) -> None:
    model = SmallCNN(16)
    path = tmp_path / "weights.ckpt.bak"  # content decides, not the name
    torch.save(model.state_dict(), path)
    ckpt = ckptviz.read_checkpoint(path)
    assert ckpt.format == "torch"
    assert ckpt.keys() == list(model.state_dict())
    info = ckpt["conv1.weight"]
    assert info.shape == (16, 3, 3, 3)
    assert info.dtype == "float32"
    assert info.nbytes == 16 * 3 * 3 * 3 * 4
    assert ckpt.total_numel == sum(v.numel() for v in model.state_dict().values())


def test_torch_load_is_always_called_weights_only_and_mmap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "m.pt"
    # a torch.Size is more than plain tensors in dicts: torch.load reads this file (plain files
    # get their metadata from a restricted unpickler that runs nothing of torch)
    torch.save({**SmallCNN().state_dict(), "input_size": torch.Size([3, 8, 8])}, path)
    calls: list[dict[str, object]] = []
    real_load = torch.load

    def recording_load(*args: object, **kwargs: object) -> object:
        calls.append(kwargs)
        return real_load(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "load", recording_load)
    ckpt = ckptviz.read_checkpoint(path)
    with ckpt.open() as data:
        data["fc.bias"]
    assert calls, "torch.load was not used"
    assert all(c.get("weights_only") is True and c.get("mmap") is True for c in calls), calls


def test_safetensors_reads_the_header_and_fetches_one_tensor_on_demand(tmp_path: Path) -> None:
    state = {k: v.contiguous() for k, v in SmallCNN().state_dict().items()}
    path = tmp_path / "m.safetensors"
    save_file(state, str(path), metadata={"epoch": "3"})
    ckpt = ckptviz.read_checkpoint(path)
    assert ckpt.format == "safetensors"
    assert ckpt.metadata == {"epoch": "3"}
    assert {k: (i.shape, i.dtype) for k, i in ckpt.tensors.items()} == {
        k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()
    }
    with ckpt.open() as data:
        assert torch.equal(data["conv1.weight"], state["conv1.weight"])


def test_pt_and_safetensors_of_one_model_give_the_same_diff(tmp_path: Path) -> None:
    state = {k: v.contiguous() for k, v in SmallCNN(16).state_dict().items()}
    torch.save(state, tmp_path / "m.pt")
    save_file(state, str(tmp_path / "m.safetensors"))
    model = SmallCNN(32)
    a = ckptviz.compare(model, tmp_path / "m.pt").to_records()
    b = ckptviz.compare(model, tmp_path / "m.safetensors").to_records()
    assert a == b
    assert {r["status"] for r in a} == {"match", "shape"}


def test_in_memory_state_dict_and_module_sources() -> None:
    source = SmallCNN(16)
    from_module = ckptviz.read_checkpoint(source)
    from_dict = ckptviz.read_checkpoint(source.state_dict())
    assert from_module.keys() == from_dict.keys()
    assert from_module["bn1.running_mean"].kind == "buffer"
    assert from_module["conv1.weight"].kind == "parameter"
    assert from_module["conv1.weight"].module_type == "Conv2d"
    diff = ckptviz.compare(SmallCNN(16), source)
    assert diff.counts["match"] == len(source.state_dict())


def test_a_module_tensor_is_a_parameter_when_any_module_holds_it_as_one() -> None:
    shared = torch.nn.Linear(2, 2)
    model = torch.nn.ModuleDict({"a": shared, "b": torch.nn.Linear(2, 2), "c": shared})
    model["b"].weight = shared.weight  # tied: a parameter of "a" (and "c") held by "b" too
    model["b"].register_buffer("scale", torch.ones(2))
    # a buffer of "b" that is the very tensor of a's bias: a parameter, as a's own key says
    model.register_module("d", torch.nn.Module())
    model["d"].register_buffer("alias", shared.bias)

    def extra(module: torch.nn.Module, state: dict[str, Any], prefix: str, *_: Any) -> None:
        state[prefix + "b.extra"] = shared.weight  # a hook's key that is no registration

    model.register_state_dict_post_hook(extra)
    kinds = {k: (t.kind, t.module_type) for k, t in ckptviz.read_checkpoint(model).tensors.items()}
    assert kinds == {
        "a.weight": ("parameter", "Linear"),
        "a.bias": ("parameter", "Linear"),
        "b.weight": ("parameter", "Linear"),
        "b.bias": ("parameter", "Linear"),
        "b.scale": ("buffer", "Linear"),
        "c.weight": ("parameter", "Linear"),
        "c.bias": ("parameter", "Linear"),
        "d.alias": ("parameter", "Module"),
        "b.extra": ("parameter", "Linear"),
    }


def _registrations_of_every_kind() -> torch.nn.ModuleDict:
    """A model without hooks whose registrations a walk of its own could get wrong: a shared
    module, a tied parameter, a parameter held as another module's buffer, a parameter and a
    buffer registered as None, a non-persistent buffer, a child registered as None."""
    shared = torch.nn.Linear(2, 2)
    model = torch.nn.ModuleDict({"a": shared, "b": torch.nn.Linear(2, 2), "c": shared})
    model["b"].weight = shared.weight
    model["b"].register_buffer("scale", torch.ones(2))
    model["b"].register_buffer("scratch", torch.zeros(2), persistent=False)
    model["b"].register_buffer("unset", None)
    model.register_module("d", torch.nn.Module())
    model["d"].register_buffer("alias", shared.bias)
    model.register_module("e", torch.nn.Sequential(torch.nn.Linear(2, 3, bias=False)))
    model.register_module("gone", None)
    model["e"].register_parameter("unset", None)
    return model


def test_a_module_without_hooks_reads_as_its_state_dict_with_each_keys_kind_and_owner() -> None:
    model = _registrations_of_every_kind()
    ckpt = ckptviz.read_checkpoint(model)
    assert ckpt.keys() == list(model.state_dict())  # the same keys in the same order
    kinds = {k: (t.kind, t.module_type) for k, t in ckpt.tensors.items()}
    assert kinds == {
        "a.weight": ("parameter", "Linear"),
        "a.bias": ("parameter", "Linear"),
        "b.weight": ("parameter", "Linear"),
        "b.bias": ("parameter", "Linear"),
        "b.scale": ("buffer", "Linear"),
        "c.weight": ("parameter", "Linear"),
        "c.bias": ("parameter", "Linear"),
        "d.alias": ("parameter", "Module"),
        "e.0.weight": ("parameter", "Linear"),
    }
    assert ckpt.ties == [("a.weight", "b.weight", "c.weight"), ("a.bias", "c.bias", "d.alias")]
    # torch's own state_dict (a hook that changes nothing makes it the one asked) agrees
    model.register_state_dict_post_hook(lambda *_: None)
    hooked = ckptviz.read_checkpoint(model)
    assert (hooked.tensors, hooked.ties) == (ckpt.tensors, ckpt.ties)


def _save_with_a_scale(
    module: torch.nn.Module, destination: Any, prefix: str, keep_vars: bool
) -> None:
    torch.nn.Module._save_to_state_dict(module, destination, prefix, keep_vars)
    destination[prefix + "scale"] = torch.ones(1)


class _SavesAScale(torch.nn.Linear):
    _save_to_state_dict = _save_with_a_scale


class _WithExtraState(torch.nn.Linear):
    def get_extra_state(self) -> dict[str, int]:
        return {"step": 3}


def _renamed(module: torch.nn.Module, state: dict[str, Any], prefix: str, *_: Any) -> None:
    state[prefix + "kernel"] = state.pop(prefix + "weight")


def _adds_a_buffer(module: torch.nn.Module, prefix: str, keep_vars: bool) -> None:
    if not hasattr(module, "counter"):
        module.register_buffer("counter", torch.zeros(1))


@pytest.mark.parametrize(
    ("how", "keys"),
    [
        ("post-hook", ["0.bias", "0.kernel"]),
        ("pre-hook", ["0.weight", "0.bias", "0.counter"]),
        ("override", ["0.weight", "0.bias", "0.scale"]),
        ("instance", ["0.weight", "0.bias", "0.scale"]),
        ("extra state", ["0.weight", "0.bias"]),
    ],
)
def test_a_state_dict_hook_or_override_gives_the_keys_torch_gives(
    how: str, keys: list[str]
) -> None:
    layer: torch.nn.Module = torch.nn.Linear(2, 2)
    if how == "post-hook":
        layer._register_state_dict_hook(_renamed)
    elif how == "pre-hook":
        layer.register_state_dict_pre_hook(_adds_a_buffer)
    elif how == "override":
        layer = _SavesAScale(2, 2)
    elif how == "instance":  # a method set on the instance, past its class
        layer._save_to_state_dict = types.MethodType(_save_with_a_scale, layer)  # type: ignore[method-assign]
    else:
        layer = _WithExtraState(2, 2)
    ckpt = ckptviz.read_checkpoint(torch.nn.Sequential(layer))
    assert ckpt.keys() == keys
    if how == "extra state":
        assert ckpt.skipped == {"0._extra_state": "nested dict with 0 tensors"}


class _KeepsAStep(torch.nn.Module):
    def get_extra_state(self) -> dict[str, torch.Tensor]:
        return {"step": torch.zeros(1, dtype=torch.int64)}


def test_a_module_state_whose_tensors_are_found_nested_reads_them_undescribed() -> None:
    """More extra states than tensors: the state dict is found inside an extra state, whose
    tensors are no module's parameter or buffer."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), _KeepsAStep(), _KeepsAStep(), _KeepsAStep())
    ckpt = ckptviz.read_checkpoint(model)
    assert ckpt.location == ("1._extra_state",)
    assert [(k, t.kind, t.module_type) for k, t in ckpt.tensors.items()] == [("step", None, None)]


def test_a_mapping_is_the_state_dict_when_at_least_half_its_values_are_tensors() -> None:
    t = torch.zeros(1)
    nested = {"x": t}
    half_last = {"a": 1, "w": t, "v": t, "nested": nested}  # 2 of 4, after the others
    assert ckptviz.read_checkpoint(half_last).location == ()
    fewer = {"w": t, "v": t, "a": 1, "b": 2, "nested": nested}  # 2 of 5, first
    assert ckptviz.read_checkpoint(fewer).location == ("nested",)
    half_first = {"w": t, "v": t, "a": 1, "nested": nested}
    assert ckptviz.read_checkpoint(half_first).location == ()


def test_lightning_style_checkpoint_is_found_and_other_candidates_listed(tmp_path: Path) -> None:
    model = SmallCNN()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    checkpoint = {
        "epoch": 7,
        "global_step": 700,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "state_dict_ema": ema,
        "optimizer_states": [{"state": {}, "param_groups": []}],
        "hyper_parameters": {"lr": 0.1},
    }
    path = tmp_path / "last.ckpt"
    torch.save(checkpoint, path)
    ckpt = ckptviz.read_checkpoint(path)
    assert ckpt.location == ("state_dict",)
    assert ("state_dict_ema",) in ckpt.candidates
    assert "state_dict_ema" in ckpt.summary()
    diff = ckptviz.compare(SmallCNN(), path)
    assert diff.mapping.checkpoint_prefix == "model."
    assert diff.counts["match"] == len(model.state_dict())
    chosen = ckptviz.read_checkpoint(path, key="state_dict_ema")
    with chosen.open() as data:
        assert torch.equal(data["conv1.weight"], ema["conv1.weight"])


def test_nested_key_path_and_helpful_error_for_a_wrong_key(tmp_path: Path) -> None:
    path = tmp_path / "nested.pt"
    torch.save({"ema": {"module": SmallCNN().state_dict()}, "step": 3}, path)
    assert ckptviz.read_checkpoint(path, key="ema/module").location == ("ema", "module")
    with pytest.raises(ckptviz.CheckpointError, match="no entry 'modle'") as err:
        ckptviz.read_checkpoint(path, key="ema/modle")
    assert str(path) in str(err.value) and "'module'" in str(err.value)


def test_non_tensor_entries_are_listed_not_fatal(tmp_path: Path) -> None:
    state = dict(SmallCNN().state_dict())
    state["note"] = "trained on Tuesday"  # type: ignore[assignment]
    state["epochs"] = 3  # type: ignore[assignment]
    path = tmp_path / "m.pt"
    torch.save(state, path)
    ckpt = ckptviz.read_checkpoint(path)
    assert ckpt.skipped == {"note": "str", "epochs": "int"}
    assert "note (str)" in ckpt.summary()


class Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch MARKER_SHOULD_NOT_EXIST",))


def test_malicious_pickle_is_refused_without_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.ones(2), "payload": Payload()}, path)
    with pytest.raises(ckptviz.UnsafeCheckpointError) as err:
        ckptviz.read_checkpoint(path)
    assert not (tmp_path / "MARKER_SHOULD_NOT_EXIST").exists()
    message = str(err.value)
    assert "system" in message and str(path) in message
    assert "trusted=True" in message and "allow_globals=" in message
    assert any("system" in name for name in err.value.unsafe_globals)


def test_unsafe_globals_are_named_and_the_scoped_allow_list_works(tmp_path: Path) -> None:
    import argparse

    path = tmp_path / "research.pth"
    torch.save({"args": argparse.Namespace(lr=0.1), "model": SmallCNN().state_dict()}, path)
    with pytest.raises(ckptviz.UnsafeCheckpointError) as err:
        ckptviz.read_checkpoint(path)
    assert err.value.unsafe_globals == ["argparse.Namespace"]
    ckpt = ckptviz.read_checkpoint(path, allow_globals=["argparse.Namespace"])
    assert ckpt.location == ("model",)
    with ckpt.open() as data:  # re-opening uses the same scoped allow-list
        assert data["fc.bias"].shape == (10,)
    # the allow-list did not leak into the process
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    assert ckptviz.read_checkpoint(path, trusted=True).location == ("model",)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "empty"),
        (b"hello, I am a text file\n", "not a checkpoint I can read safely"),
        (bytes(range(256)) * 4, "not a checkpoint I can read safely"),
    ],
)
def test_bad_files_get_an_error_naming_the_file(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(ckptviz.CheckpointError, match=expected) as err:
        ckptviz.read_checkpoint(path)
    assert str(path) in str(err.value)


def test_missing_path_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ckptviz.CheckpointError, match="no such file"):
        ckptviz.read_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(ckptviz.CheckpointError, match="directory"):
        ckptviz.read_checkpoint(tmp_path)


def test_truncated_torch_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save(SmallCNN().state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ckptviz.CheckpointError) as err:
        ckptviz.read_checkpoint(path)
    assert str(path) in str(err.value)


def test_file_changed_after_reading_is_noticed(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save(SmallCNN().state_dict(), path)
    ckpt = ckptviz.read_checkpoint(path)
    torch.save(SmallCNN(8).state_dict(), path)
    with pytest.raises(ckptviz.CheckpointError, match="changed since it was read"):
        ckpt.open()


def test_tied_tensors_in_a_checkpoint_are_reported() -> None:
    from conftest import TiedLM

    ckpt = reading.read_checkpoint(TiedLM().state_dict())
    assert ckpt.ties == [("embed.weight", "head.weight")]


def _safetensors_by_hand(path: Path, entries: list[tuple[str, str, torch.Tensor]]) -> None:
    """Tensors laid out in the given order with no padding (save_file would align them)."""
    import json
    import struct

    header: dict[str, object] = {}
    blob = b""
    for name, code, value in entries:
        raw = value.numpy().tobytes()
        header[name] = {
            "dtype": code,
            "shape": list(value.shape),
            "data_offsets": [len(blob), len(blob) + len(raw)],
        }
        blob += raw
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + blob)


def test_safetensors_tensors_at_unaligned_offsets_read_correctly(tmp_path: Path) -> None:
    odd = torch.arange(3, dtype=torch.int8)
    floats = torch.randn(5)
    halves = torch.randn(4).half()
    path = tmp_path / "unaligned.safetensors"
    # float32 at byte 3 and float16 at byte 23: not aligned for their dtypes
    entries = [("odd", "I8", odd), ("floats", "F32", floats), ("halves", "F16", halves)]
    _safetensors_by_hand(path, entries)
    ckpt = ckptviz.read_checkpoint(path)
    assert ckpt["floats"].shape == (5,) and ckpt["halves"].dtype == "float16"
    with ckpt.open() as data:
        assert torch.equal(data["odd"], odd)
        assert torch.equal(data["floats"], floats)
        assert torch.equal(data["halves"], halves)
    model_like = {"floats": torch.zeros(5), "halves": torch.zeros(4, dtype=torch.float16)}
    diff = ckptviz.compare(model_like, path)
    assert diff.counts["match"] == 2 and diff.counts["unexpected"] == 1


def test_a_scripted_model_is_read_and_applied() -> None:
    """``torch.jit.script`` modules keep their tables in wrappers (no ``dict.get``): each key
    is still read with its kind, and a plan applies and undoes bit for bit."""
    torch.manual_seed(0)
    layers = (torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.BatchNorm1d(2))
    model = torch.jit.script(torch.nn.Sequential(*layers))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: (v + 1 if v.is_floating_point() else v + 3) for k, v in before.items()}
    diff = ckptviz.compare(model, state)
    kinds = {info.key: info.kind for info in diff.model_side.tensors.values()}
    assert kinds == {
        "0.weight": "parameter",
        "0.bias": "parameter",
        "2.weight": "parameter",
        "2.bias": "parameter",
        "2.running_mean": "buffer",
        "2.running_var": "buffer",
        "2.num_batches_tracked": "buffer",
    }
    report = diff.plan().apply(model)
    assert report.verified
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)
    report.undo()
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
