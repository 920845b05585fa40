"""Hugging Face sharded checkpoints: read as one checkpoint, validated, applied shard by shard."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import Classifier, assert_bitwise_same, snapshot
from huggingface_hub import save_torch_state_dict
from safetensors.torch import save_file
from torch import nn

import ckptviz
from ckptviz import CheckpointError
from ckptviz.core.checkpoint import Checkpoint


def _state(seed: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in Classifier(10).state_dict().items()}


def _hf_save(state: dict[str, torch.Tensor], folder: Path, *, safe: bool = True) -> Path:
    """Shards written by huggingface_hub itself (what save_pretrained uses), ~1 KiB each."""
    folder.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict(state, folder, max_shard_size=1500, safe_serialization=safe)
    (index,) = folder.glob("*.index.json")
    return index


def _weight_map(index: Path) -> dict[str, str]:
    result: dict[str, str] = json.loads(index.read_text())["weight_map"]
    return result


def _hand_save(
    folder: Path, shards: dict[str, dict[str, torch.Tensor]], weight_map: object
) -> Path:
    """Shards and an index written by hand, for the indexes save_pretrained would never write."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, tensors in shards.items():
        save_file(tensors, folder / name)
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_reads_every_shard_as_one_checkpoint(tmp_path: Path, safe: bool) -> None:
    state = _state()
    index = _hf_save(state, tmp_path / "ckpt", safe=safe)
    assert len(set(_weight_map(index).values())) >= 3  # really sharded
    for source in (index, index.parent):
        ckpt = ckptviz.read_checkpoint(source)
        assert ckpt.format == ("safetensors-sharded" if safe else "torch-sharded")
        assert ckpt.path == index
        assert {k: (i.shape, i.dtype) for k, i in ckpt.tensors.items()} == {
            k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()
        }
        assert ckpt.metadata["shards"] == str(len(set(_weight_map(index).values())))
        with ckpt.open() as data:
            for key, value in state.items():
                assert torch.equal(data[key], value), key


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_compare_and_apply_end_to_end(tmp_path: Path, safe: bool) -> None:
    old = _state()
    index = _hf_save(old, tmp_path / "ckpt", safe=safe)
    model = Classifier(12)  # the head grew from 10 to 12 classes
    before = snapshot(model)
    diff = ckptviz.compare(model, index)
    assert diff.status("head.weight") == "shape"
    assert diff.status("body.0.weight") == "match"
    plan = diff.plan()
    plan.set("head", "partial")
    report = plan.apply(model)
    assert report.verified
    now = model.state_dict()
    for key, value in old.items():
        if key.startswith("head."):
            rows = value.shape[0]
            assert torch.equal(now[key][:rows], value)
            assert torch.equal(now[key][rows:], before[key][rows:])
        else:
            assert torch.equal(now[key], value), key
    report.undo()
    assert_bitwise_same(model, before)


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_to_code_reads_only_the_needed_shards_and_matches_apply(tmp_path: Path, safe: bool) -> None:
    index = _hf_save(_state(), tmp_path / "ckpt", safe=safe)
    model = Classifier(10)
    start = snapshot(model)
    plan = ckptviz.compare(model, index).plan()
    plan.set("body", "keep")
    code = plan.to_code()
    plan.apply(model)
    applied = snapshot(model)
    fresh = Classifier(10)
    fresh.load_state_dict(start)
    exec(code, {"model": fresh})
    assert_bitwise_same(fresh, applied)


def _record_opens(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    opened: list[Path] = []
    real_open = Checkpoint.open

    def recording_open(self: Checkpoint) -> object:
        assert self.path is not None
        opened.append(self.path)
        return real_open(self)

    monkeypatch.setattr(Checkpoint, "open", recording_open)
    return opened


def test_apply_opens_only_the_shards_holding_selected_tensors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = _hf_save(_state(), tmp_path / "ckpt")
    weight_map = _weight_map(index)
    model = Classifier(10)
    plan = ckptviz.compare(model, index).plan()
    plan.set("*", "keep")
    plan.set("head", "load")
    expected = {index.parent / weight_map[k] for k in ("head.weight", "head.bias")}
    assert expected != {index.parent / s for s in weight_map.values()}  # others exist
    opened = _record_opens(monkeypatch)
    plan.apply(model)
    shard_paths = {p for p in opened if p != index}
    assert shard_paths == expected


def test_unneeded_shards_may_even_be_gone(tmp_path: Path) -> None:
    state = _state()
    index = _hf_save(state, tmp_path / "ckpt")
    weight_map = _weight_map(index)
    model = Classifier(10)
    plan = ckptviz.compare(model, index).plan()
    plan.set("*", "keep")
    plan.set("head.weight", "load")
    needed = weight_map["head.weight"]
    for shard in set(weight_map.values()) - {needed}:
        (index.parent / shard).unlink()
    report = plan.apply(model)
    assert report.keys("load") == ["head.weight"]
    assert torch.equal(model.head.weight, state["head.weight"])


def test_a_changed_shard_is_refused_and_the_model_kept(tmp_path: Path) -> None:
    index = _hf_save(_state(), tmp_path / "ckpt")
    shard = index.parent / _weight_map(index)["head.weight"]
    model = Classifier(10)
    before = snapshot(model)
    plan = ckptviz.compare(model, index).plan()
    other = _state(seed=2)
    save_file(
        {k: other[k] for k in _weight_map(index) if _weight_map(index)[k] == shard.name}, shard
    )
    os.utime(shard, ns=(1, 1))  # a different mtime even on a coarse clock
    with pytest.raises(CheckpointError, match="changed since it was read"):
        plan.apply(model)
    assert_bitwise_same(model, before)


def test_a_plan_saved_as_json_reads_the_index_again(tmp_path: Path) -> None:
    state = _state()
    index = _hf_save(state, tmp_path / "ckpt")
    model = Classifier(10)
    text = ckptviz.compare(model, index).plan().to_json()
    report = ckptviz.Plan.from_json(text).apply(model)
    assert report.verified
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value)


def test_an_unsharded_hugging_face_directory_reads_its_single_file(tmp_path: Path) -> None:
    state = _state()
    folder = tmp_path / "small"
    folder.mkdir()
    save_file(state, folder / "model.safetensors")
    ckpt = ckptviz.read_checkpoint(folder)
    assert ckpt.format == "safetensors"
    assert ckpt.path == folder / "model.safetensors"
    assert set(ckpt.tensors) == set(state)


def test_symlinked_shards_as_in_the_hugging_face_cache_are_followed(tmp_path: Path) -> None:
    """The hub cache keeps files in blobs/ and links them from snapshots/<revision>/."""
    state = _state()
    built = _hf_save(state, tmp_path / "built")
    blobs, snapshot_dir = tmp_path / "repo" / "blobs", tmp_path / "repo" / "snapshots" / "abc"
    blobs.mkdir(parents=True)
    snapshot_dir.mkdir(parents=True)
    for i, file in enumerate(sorted(built.parent.iterdir())):
        blob = blobs / f"blob{i}"
        file.rename(blob)
        (snapshot_dir / file.name).symlink_to(Path("../../blobs") / blob.name)
    ckpt = ckptviz.read_checkpoint(snapshot_dir)
    with ckpt.open() as data:
        assert all(torch.equal(data[k], v) for k, v in state.items())


# -- a hostile or damaged index: each error names the index, the key and the shard -------------


def _one_shard(tmp_path: Path, weight_map: dict[str, str]) -> Path:
    state = _state()
    return _hand_save(tmp_path / "ckpt", {"a.safetensors": state}, weight_map)


@pytest.mark.parametrize(
    "shard_name",
    ["../outside.safetensors", "/etc/passwd", "sub/a.safetensors", "..", ""],
    ids=["dotdot", "absolute", "subdirectory", "parent", "empty"],
)
def test_shard_names_must_be_plain_file_names(tmp_path: Path, shard_name: str) -> None:
    (tmp_path / "outside.safetensors").write_bytes(b"")
    (tmp_path / "ckpt" / "sub").mkdir(parents=True)
    state = _state()
    weight_map = dict.fromkeys(state, "a.safetensors")
    weight_map["head.bias"] = shard_name
    index = _hand_save(tmp_path / "ckpt", {"a.safetensors": state}, weight_map)
    with pytest.raises(CheckpointError, match="not a plain file name") as error:
        ckptviz.read_checkpoint(index)
    assert str(index) in str(error.value) and "'head.bias'" in str(error.value)
    assert repr(shard_name) in str(error.value)


def test_a_missing_shard_is_named(tmp_path: Path) -> None:
    state = _state()
    weight_map = dict.fromkeys(state, "a.safetensors")
    weight_map["head.bias"] = "gone.safetensors"
    index = _hand_save(tmp_path / "ckpt", {"a.safetensors": state}, weight_map)
    with pytest.raises(CheckpointError, match="does not exist") as error:
        ckptviz.read_checkpoint(index)
    assert all(s in str(error.value) for s in (str(index), "'head.bias'", "gone.safetensors"))


def test_a_symlink_leaving_the_directory_is_refused(tmp_path: Path) -> None:
    state = _state()
    save_file(state, tmp_path / "elsewhere.safetensors")
    index = _hand_save(tmp_path / "ckpt", {}, dict.fromkeys(state, "a.safetensors"))
    (index.parent / "a.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(CheckpointError, match="is a symlink to") as error:
        ckptviz.read_checkpoint(index)
    assert str(index) in str(error.value) and "a.safetensors" in str(error.value)


def test_a_shard_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    state = _state()
    index = _hand_save(tmp_path / "ckpt", {}, dict.fromkeys(state, "a.safetensors"))
    (index.parent / "a.safetensors").mkdir()
    with pytest.raises(CheckpointError, match="not a regular file"):
        ckptviz.read_checkpoint(index)


def test_a_key_missing_from_its_shard_is_named(tmp_path: Path) -> None:
    state = _state()
    shards = {"a.safetensors": {k: v for k, v in state.items() if k != "head.bias"}}
    index = _hand_save(tmp_path / "ckpt", shards, dict.fromkeys(state, "a.safetensors"))
    with pytest.raises(CheckpointError, match="has no such tensor") as error:
        ckptviz.read_checkpoint(index)
    assert all(s in str(error.value) for s in (str(index), "'head.bias'", "a.safetensors"))


def test_a_key_listed_twice_is_refused(tmp_path: Path) -> None:
    state = _state()
    shards = {"a.safetensors": state, "b.safetensors": {"head.bias": state["head.bias"]}}
    index = _hand_save(tmp_path / "ckpt", shards, {})
    entries = ", ".join(f'"{k}": "a.safetensors"' for k in state)
    index.write_text('{"weight_map": {' + entries + ', "head.bias": "b.safetensors"}}')
    with pytest.raises(CheckpointError, match="listed twice") as error:
        ckptviz.read_checkpoint(index)
    assert all(s in str(error.value) for s in (str(index), "'head.bias'", "b.safetensors"))


def test_a_key_held_by_two_shards_is_refused(tmp_path: Path) -> None:
    state = _state()
    shards = {"a.safetensors": state, "b.safetensors": {"head.bias": state["head.bias"]}}
    weight_map = dict.fromkeys(state, "a.safetensors")
    weight_map["zzz"] = "b.safetensors"  # b is listed, and also holds a stale head.bias
    shards["b.safetensors"]["zzz"] = torch.zeros(1)
    index = _hand_save(tmp_path / "ckpt", shards, weight_map)
    with pytest.raises(CheckpointError, match="in both") as error:
        ckptviz.read_checkpoint(index)
    message = str(error.value)
    assert all(s in message for s in (str(index), "'head.bias'", "a.safetensors", "b.safetensors"))


def test_a_tensor_the_index_does_not_list_is_refused(tmp_path: Path) -> None:
    state = _state()
    weight_map = dict.fromkeys(state, "a.safetensors")
    del weight_map["head.bias"]
    index = _hand_save(tmp_path / "ckpt", {"a.safetensors": state}, weight_map)
    with pytest.raises(CheckpointError, match="does not list") as error:
        ckptviz.read_checkpoint(index)
    assert all(s in str(error.value) for s in (str(index), "'head.bias'", "a.safetensors"))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"metadata": {}}', "no 'weight_map'"),
        ('{"weight_map": []}', "must map tensor names"),
        ('{"weight_map": {"a": 3}}', "not a shard file name"),
    ],
)
def test_a_malformed_index_is_refused(tmp_path: Path, content: str, message: str) -> None:
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(content)
    with pytest.raises(CheckpointError, match=message) as error:
        ckptviz.read_checkpoint(index)
    assert str(index) in str(error.value)


def test_an_index_naming_itself_as_a_shard_does_not_recurse(tmp_path: Path) -> None:
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": index.name}}))
    with pytest.raises(CheckpointError, match="neither a safetensors nor a torch file"):
        ckptviz.read_checkpoint(index)


def test_a_directory_with_several_indexes_asks_which(tmp_path: Path) -> None:
    for name in ("first.safetensors.index.json", "second.safetensors.index.json"):
        (tmp_path / name).write_text('{"weight_map": {}}')
    with pytest.raises(CheckpointError, match="several sharded checkpoint indexes"):
        ckptviz.read_checkpoint(tmp_path)


def test_bin_shards_are_read_with_weights_only(tmp_path: Path) -> None:
    import argparse

    state = _state()
    index = _hand_save(tmp_path / "ckpt", {}, dict.fromkeys(state, "a.bin"))
    torch.save({**state, "args": argparse.Namespace(lr=0.1)}, index.parent / "a.bin")
    with pytest.raises(ckptviz.UnsafeCheckpointError) as error:
        ckptviz.read_checkpoint(index)
    assert error.value.unsafe_globals == ["argparse.Namespace"]
    ckpt = ckptviz.read_checkpoint(index, allow_globals=["argparse.Namespace"])
    assert ckpt.allow_globals == ("argparse.Namespace",)
    assert "args" in ckpt.skipped
    with ckpt.open() as data:  # the shard is opened again under the same allow-list
        assert torch.equal(data["head.bias"], state["head.bias"])


def test_meta_model_against_a_sharded_checkpoint(tmp_path: Path) -> None:
    state = _state()
    index = _hf_save(state, tmp_path / "ckpt")
    with torch.device("meta"):
        model = Classifier(10)
    plan = ckptviz.compare(model, index).plan()
    plan.apply(model, materialise="cpu")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert isinstance(model.head.weight, nn.Parameter)
