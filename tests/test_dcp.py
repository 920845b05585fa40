"""torch.distributed.checkpoint directories: metadata without data or a process group, tensors
through DCP's own load path, and ``.metadata`` treated as untrusted input."""

from __future__ import annotations

import dataclasses
import itertools
import os
import pickle
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from conftest import Classifier, assert_bitwise_same, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, WriteItem, WriteItemType

import ckptviz
from ckptviz import CheckpointError, UnsafeCheckpointError
from ckptviz.cli import main
from ckptviz.core.formats.dcp import MAX_SPLIT_DIMS, read_metadata, tiling_problems


@pytest.fixture(autouse=True)
def _quiet_single_process_warning() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def _save(state: dict[str, Any], folder: Path, **kwargs: Any) -> Path:
    dcp.save(state, storage_writer=FileSystemWriter(folder, **kwargs), no_dist=True)
    return folder


def _trained(seed: int = 1) -> tuple[Classifier, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Classifier(10)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 20)).sum().backward()
    optimizer.step()
    return model, optimizer


@pytest.fixture
def training_dir(tmp_path: Path) -> tuple[Path, Classifier]:
    """What a trainer writes: the model, its optimizer and a step counter, in two data files."""
    model, optimizer = _trained()
    state = {"model": model.state_dict(), "optim": optimizer.state_dict(), "step": 7}
    return _save(state, tmp_path / "step7", thread_count=2), model


def test_reads_shapes_and_dtypes_without_data_or_process_group(
    training_dir: tuple[Path, Classifier], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, trained = training_dir
    assert len(list(folder.glob("*.distcp"))) == 2

    def no_data(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("reading metadata must not read tensor data")

    monkeypatch.setattr(FileSystemReader, "read_data", no_data)
    ckpt = ckptviz.read_checkpoint(folder)
    assert ckpt.format == "dcp"
    assert ckpt.location == ("model",)
    assert ("optim", "state", "0") in ckpt.candidates
    assert {k: (i.shape, i.dtype) for k, i in ckpt.tensors.items()} == {
        k: (tuple(v.shape), str(v.dtype).removeprefix("torch."))
        for k, v in trained.state_dict().items()
    }
    assert ckptviz.read_checkpoint(folder / ".metadata").tensors == ckpt.tensors
    assert not dist.is_initialized()


def test_other_parts_are_reachable_with_key(training_dir: tuple[Path, Classifier]) -> None:
    folder, trained = training_dir
    ckpt = ckptviz.read_checkpoint(folder, key="optim/state/0")
    assert set(ckpt.tensors) == {"step", "exp_avg", "exp_avg_sq"}
    assert ckpt.tensors["exp_avg"].shape == tuple(trained.body[0].weight.shape)


def test_compare_and_apply_end_to_end(training_dir: tuple[Path, Classifier]) -> None:
    folder, trained = training_dir
    model = Classifier(12)  # the head grew
    before = snapshot(model)
    diff = ckptviz.compare(model, folder)
    assert diff.counts == {"match": 4, "dtype": 0, "shape": 2, "missing": 0, "unexpected": 0}
    plan = diff.plan()
    plan.set("head", "partial")
    report = plan.apply(model)
    assert report.verified
    for key, value in trained.state_dict().items():
        rows = value.shape[0]
        assert torch.equal(model.state_dict()[key][:rows], value), key
    assert torch.equal(model.head.weight[10:], before["head.weight"][10:])
    report.undo()
    assert_bitwise_same(model, before)
    assert not dist.is_initialized()


def test_a_plan_saved_as_json_and_to_code_reproduce_apply(
    training_dir: tuple[Path, Classifier],
) -> None:
    folder, trained = training_dir
    model = Classifier(10)
    start = snapshot(model)
    plan = ckptviz.compare(model, folder).plan()
    plan.set("body.0", "keep")
    code = plan.to_code()
    ckptviz.Plan.from_json(plan.to_json()).apply(model)
    applied = snapshot(model)
    assert torch.equal(applied["head.weight"], trained.head.weight)
    assert torch.equal(applied["body.0.weight"], start["body.0.weight"])
    fresh = Classifier(10)
    fresh.load_state_dict(start)
    exec(code, {"model": fresh})
    assert_bitwise_same(fresh, applied)


class TwoRanks(DefaultSavePlanner):
    """Saves each tensor of two rows or more as two chunks, as two FSDP ranks would."""

    def create_local_plan(self) -> SavePlan:
        plan = super().create_local_plan()
        items: list[WriteItem] = []
        for item in plan.items:
            data = item.tensor_data
            if item.type != WriteItemType.TENSOR or data is None or data.size[0] < 2:
                items.append(item)
                continue
            half = data.size[0] // 2
            for start, length in ((0, half), (half, data.size[0] - half)):
                offsets = torch.Size([start] + [0] * (len(data.size) - 1))
                chunk = ChunkStorageMetadata(offsets, torch.Size([length, *data.size[1:]]))
                items.append(
                    dataclasses.replace(
                        item,
                        index=MetadataIndex(item.index.fqn, offsets),
                        type=WriteItemType.SHARD,
                        tensor_data=dataclasses.replace(data, chunk=chunk),
                    )
                )
        self.plan = dataclasses.replace(plan, items=items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> Any:
        if write_item.type != WriteItemType.SHARD or write_item.tensor_data is None:
            return super().resolve_data(write_item)
        whole = self.lookup_object(MetadataIndex(write_item.index.fqn))
        chunk = write_item.tensor_data.chunk
        return whole.narrow(0, chunk.offsets[0], chunk.sizes[0])


def test_tensors_saved_in_chunks_are_read_whole(tmp_path: Path) -> None:
    model, _ = _trained()
    folder = tmp_path / "fsdp"
    dcp.save(model.state_dict(), checkpoint_id=folder, planner=TwoRanks(), no_dist=True)
    chunks = read_metadata(folder).state_dict_metadata["body.0.weight"].chunks
    assert len(chunks) == 2
    ckpt = ckptviz.read_checkpoint(folder)
    assert ckpt.tensors["body.0.weight"].shape == (32, 20)  # the global shape
    fresh = Classifier(10)
    ckptviz.compare(fresh, folder).plan().apply(fresh)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_non_tensor_entries_are_listed_never_unpickled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained, _ = _trained()
    state = dict(trained.state_dict())
    state["step"] = 7  # a Python object: DCP pickles it into the data file
    folder = _save(state, tmp_path / "c")

    def no_unpickling(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("DCP's load_bytes unpickles with weights_only=False")

    monkeypatch.setattr(DefaultLoadPlanner, "load_bytes", no_unpickling)
    ckpt = ckptviz.read_checkpoint(folder)
    assert ckpt.skipped == {"step": "PickledObject"}
    assert "step" not in ckpt.tensors
    model = Classifier(10)
    assert ckptviz.compare(model, folder).plan().apply(model).verified
    assert torch.equal(model.head.weight, trained.head.weight)


# -- .metadata is untrusted ---------------------------------------------------------------------


class RunsCode:
    """Unpickling this makes a directory: the stand-in for any code a crafted file could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def _hostile_dir(tmp_path: Path) -> tuple[Path, Path]:
    folder = _save(dict(Classifier(10).state_dict()), tmp_path / "hostile")
    marker = tmp_path / "code-ran"
    with (folder / ".metadata").open("wb") as stream:
        pickle.dump(RunsCode(marker), stream)
    return folder, marker


def test_torch_own_reader_would_run_code_from_metadata(tmp_path: Path) -> None:
    """Why ckptviz reads .metadata itself: torch 2.13's FileSystemReader unpickles it fully."""
    folder, marker = _hostile_dir(tmp_path)
    with pytest.raises(AttributeError):  # os.mkdir returned None: no Metadata, but it ran
        FileSystemReader(folder).read_metadata()
    assert marker.exists()


def test_metadata_naming_code_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    folder, marker = _hostile_dir(tmp_path)
    with pytest.raises(UnsafeCheckpointError) as error:
        ckptviz.compare(Classifier(10), folder)
    assert not marker.exists()
    assert error.value.unsafe_globals == [f"{os.mkdir.__module__}.mkdir"]
    message = str(error.value)
    assert str(folder) in message and "trusted=True" in message and "allow_globals=" in message


def _rewrite_metadata(folder: Path, change: Any) -> None:
    metadata = read_metadata(folder)
    change(metadata)
    with (folder / ".metadata").open("wb") as stream:
        pickle.dump(metadata, stream)


def test_extra_globals_in_metadata_need_an_explicit_opt_in(tmp_path: Path) -> None:
    import argparse

    trained, _ = _trained()
    folder = _save(dict(trained.state_dict()), tmp_path / "c")

    def add_namespace(metadata: Any) -> None:
        metadata.storage_meta.modules = [argparse.Namespace(note="written by a custom trainer")]

    _rewrite_metadata(folder, add_namespace)
    with pytest.raises(UnsafeCheckpointError) as error:
        ckptviz.read_checkpoint(folder)
    assert error.value.unsafe_globals == ["argparse.Namespace"]
    for options in ({"allow_globals": ["argparse.Namespace"]}, {"trusted": True}):
        model = Classifier(10)
        report = ckptviz.compare(model, folder, **options).plan().apply(model)
        assert report.verified
        assert torch.equal(model.head.weight, trained.head.weight)
    assert ckptviz.read_checkpoint(folder, allow_globals=["argparse.Namespace"]).allow_globals == (
        "argparse.Namespace",
    )


def _point_storage(metadata: Any, relative_path: str) -> None:
    storage = metadata.storage_data
    index = next(i for i in storage if i.fqn == "head.bias")
    storage[index] = dataclasses.replace(storage[index], relative_path=relative_path)


@pytest.mark.parametrize(
    ("relative_path", "message"),
    [
        ("../outside.distcp", "not a plain file name"),
        ("/etc/passwd", "not a plain file name"),
        ("missing.distcp", "does not exist"),
    ],
)
def test_data_files_must_be_plain_names_in_the_directory(
    tmp_path: Path, relative_path: str, message: str
) -> None:
    folder = _save(dict(Classifier(10).state_dict()), tmp_path / "c")
    (tmp_path / "outside.distcp").write_bytes((next(folder.glob("*.distcp"))).read_bytes())
    _rewrite_metadata(folder, lambda md: _point_storage(md, relative_path))
    with pytest.raises(CheckpointError, match=message) as error:
        ckptviz.read_checkpoint(folder)
    assert "'head.bias'" in str(error.value) and ".metadata" in str(error.value)


def test_chunks_that_leave_values_unset_are_refused(tmp_path: Path) -> None:
    folder = _save(dict(Classifier(10).state_dict()), tmp_path / "c")

    def shrink(metadata: Any) -> None:
        entry = metadata.state_dict_metadata["head.weight"]
        entry.chunks = [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([5, 32]))]

    _rewrite_metadata(folder, shrink)
    with pytest.raises(CheckpointError, match="add up to 160 of its 320 values"):
        ckptviz.read_checkpoint(folder)


def test_a_truncated_data_file_is_refused_when_read(tmp_path: Path) -> None:
    folder = _save(dict(Classifier(10).state_dict()), tmp_path / "c")
    data = next(folder.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated"):
        ckptviz.read_checkpoint(folder)


def test_a_data_file_changed_after_compare_is_refused_and_the_model_kept(tmp_path: Path) -> None:
    folder = _save(dict(_trained()[0].state_dict()), tmp_path / "c")
    model = Classifier(10)
    before = snapshot(model)
    plan = ckptviz.compare(model, folder).plan()
    data = next(folder.glob("*.distcp"))
    data.write_bytes(data.read_bytes() + b"\0")
    with pytest.raises(CheckpointError, match="changed or is gone"):
        plan.apply(model)
    assert_bitwise_same(model, before)


def test_not_a_metadata_pickle(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / ".metadata").write_bytes(pickle.dumps({"not": "metadata"}))
    with pytest.raises(CheckpointError, match=r"expected torch\.distributed\.checkpoint Metadata"):
        ckptviz.read_checkpoint(folder)
    (folder / ".metadata").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointError, match="not a readable"):
        ckptviz.read_checkpoint(folder)


def test_meta_model_against_a_dcp_directory(training_dir: tuple[Path, Classifier]) -> None:
    folder, trained = training_dir
    with torch.device("meta"):
        model = Classifier(10)
    report = ckptviz.compare(model, folder).plan().apply(model, materialise="cpu")
    assert report.verified
    for key, value in trained.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


# -- chunk coverage, for any number of chunks ----------------------------------------------------


class Grid(DefaultSavePlanner):
    """Saves every tensor as ``rows`` x ``cols`` chunks (split along dimensions 0 and 1), as a
    2-D device mesh of FSDP and tensor-parallel ranks would; uneven splits included."""

    def __init__(self, rows: int, cols: int = 1) -> None:
        super().__init__()
        self.rows, self.cols = rows, cols

    @staticmethod
    def _cuts(length: int, parts: int) -> list[tuple[int, int]]:
        bounds = [length * i // parts for i in range(parts + 1)]
        return [(a, b - a) for a, b in itertools.pairwise(bounds) if b > a]

    def create_local_plan(self) -> SavePlan:
        plan = super().create_local_plan()
        items: list[WriteItem] = []
        for item in plan.items:
            data = item.tensor_data
            if item.type != WriteItemType.TENSOR or data is None or not data.size:
                items.append(item)
                continue
            shape = list(data.size)
            cols = self._cuts(shape[1], self.cols) if len(shape) > 1 else [(0, 0)]
            for row, height in self._cuts(shape[0], self.rows):
                for col, width in cols:
                    offsets = [row, col, *[0] * (len(shape) - 2)][: len(shape)]
                    sizes = [height, width, *shape[2:]][: len(shape)]
                    chunk = ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))
                    items.append(
                        dataclasses.replace(
                            item,
                            index=MetadataIndex(item.index.fqn, torch.Size(offsets)),
                            type=WriteItemType.SHARD,
                            tensor_data=dataclasses.replace(data, chunk=chunk),
                        )
                    )
        self.plan = dataclasses.replace(plan, items=items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> Any:
        if write_item.type != WriteItemType.SHARD or write_item.tensor_data is None:
            return super().resolve_data(write_item)
        value = self.lookup_object(MetadataIndex(write_item.index.fqn))
        chunk = write_item.tensor_data.chunk
        for dim, (offset, size) in enumerate(zip(chunk.offsets, chunk.sizes, strict=True)):
            value = value.narrow(dim, offset, size)
        return value.clone()


class Wide(torch.nn.Module):
    """One 300 x 6 weight and a 300 bias: saved by ``Grid(300)`` as 300 chunks each."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(6, 300)


def _many_chunks(tmp_path: Path, rows: int = 300, cols: int = 1) -> tuple[Path, Wide]:
    torch.manual_seed(3)
    model = Wide()
    folder = tmp_path / "many"
    dcp.save(model.state_dict(), checkpoint_id=folder, planner=Grid(rows, cols), no_dist=True)
    return folder, model


def _move_chunk(metadata: Any, fqn: str, number: int, offsets: list[int], sizes: list[int]) -> None:
    entry = metadata.state_dict_metadata[fqn]
    entry.chunks[number] = ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))


@pytest.mark.parametrize(("rows", "cols"), [(300, 1), (60, 4)], ids=["300-rows", "60x4-grid"])
def test_many_chunks_read_and_apply_exactly(tmp_path: Path, rows: int, cols: int) -> None:
    folder, saved = _many_chunks(tmp_path, rows, cols)
    assert len(read_metadata(folder).state_dict_metadata["proj.weight"].chunks) == rows * cols
    model = Wide()
    report = ckptviz.compare(model, folder).plan().apply(model)
    assert report.verified
    assert_bitwise_same(model, snapshot(saved))


def test_a_hole_among_many_chunks_is_refused(tmp_path: Path) -> None:
    """Above 128 chunks the old check compared sizes only: chunk 41 moved onto chunk 42 left row
    41 unset (uninitialised memory, copied into the model and reported verified)."""
    folder, _ = _many_chunks(tmp_path)
    _rewrite_metadata(folder, lambda md: _move_chunk(md, "proj.weight", 41, [42, 0], [1, 6]))
    with pytest.raises(CheckpointError) as error:
        ckptviz.compare(Wide(), folder)
    message = str(error.value)
    assert str(folder) in message and "'proj.weight'" in message
    assert "element [41, 0] is in no chunk" in message
    assert "chunk 41 (offsets [42, 0], sizes [1, 6])" in message  # and what overlaps instead
    assert "chunk 42 (offsets [42, 0], sizes [1, 6])" in message


def test_an_overlap_among_many_chunks_is_refused(tmp_path: Path) -> None:
    folder, _ = _many_chunks(tmp_path)
    _rewrite_metadata(folder, lambda md: _move_chunk(md, "proj.bias", 200, [200], [2]))
    with pytest.raises(CheckpointError) as error:
        ckptviz.read_checkpoint(folder)
    message = str(error.value)
    assert str(folder) in message and "'proj.bias'" in message
    assert "element [201] is in 2 chunks: chunk 200 (offsets [200], sizes [2])" in message
    assert "chunk 201 (offsets [201], sizes [1])" in message


@pytest.mark.parametrize(
    ("offsets", "sizes"),
    [([-1, 0], [1, 6]), ([3, 0], [1, -6]), ([3.0, 0], [1, 6]), ([True, 0], [1, 6])],
    ids=["negative-offset", "negative-size", "float", "bool"],
)
def test_chunk_offsets_and_sizes_must_be_non_negative_ints(
    tmp_path: Path, offsets: list[Any], sizes: list[Any]
) -> None:
    folder, _ = _many_chunks(tmp_path, rows=150)

    def tamper(metadata: Any) -> None:  # torch.Size refuses these; a crafted file need not
        metadata.state_dict_metadata["proj.weight"].chunks[3] = ChunkStorageMetadata(
            tuple(offsets), tuple(sizes)
        )

    _rewrite_metadata(folder, tamper)
    with pytest.raises(CheckpointError, match=r"'proj\.weight' \[300, 6\] has chunk 3 at"):
        ckptviz.read_checkpoint(folder)


def test_a_chunk_without_a_storage_record_is_refused(tmp_path: Path) -> None:
    folder, _ = _many_chunks(tmp_path, rows=150)

    def drop_record(metadata: Any) -> None:
        del metadata.storage_data[MetadataIndex("proj.weight", torch.Size([6, 0]))]

    _rewrite_metadata(folder, drop_record)
    with pytest.raises(CheckpointError) as error:
        ckptviz.read_checkpoint(folder)
    message = str(error.value)
    assert "'proj.weight' chunk 3 (offsets [6, 0], sizes [2, 6]) has no storage record" in message
    assert str(folder) in message


def test_a_storage_record_too_small_for_its_chunk_is_refused(tmp_path: Path) -> None:
    folder, _ = _many_chunks(tmp_path, rows=150)

    def shrink_record(metadata: Any) -> None:
        index = MetadataIndex("proj.weight", torch.Size([6, 0]))
        metadata.storage_data[index] = dataclasses.replace(metadata.storage_data[index], length=40)

    _rewrite_metadata(folder, shrink_record)
    with pytest.raises(CheckpointError, match=r"chunk 3 .* needs at least 48 bytes, but its"):
        ckptviz.read_checkpoint(folder)


def test_a_shape_torch_cannot_hold_is_refused(tmp_path: Path) -> None:
    folder = _save(dict(Classifier(10).state_dict()), tmp_path / "c")

    def enlarge(metadata: Any) -> None:
        entry = metadata.state_dict_metadata["head.bias"]
        entry.size = torch.Size([2**62])
        entry.chunks = [ChunkStorageMetadata(torch.Size([0]), torch.Size([2**62]))]

    _rewrite_metadata(folder, enlarge)
    with pytest.raises(
        CheckpointError, match=r"'head\.bias' declares shape \[4611686018427387904\]"
    ):
        ckptviz.read_checkpoint(folder)


def test_chunks_split_along_too_many_dimensions_are_refused_not_checked_for_ever() -> None:
    """The exact check costs 2**k per chunk for k split dimensions: k is bounded."""
    shape = (2,) * (MAX_SPLIT_DIMS + 1)
    boxes = [(corner, (1,) * len(shape)) for corner in itertools.product((0, 1), repeat=len(shape))]
    assert _brute_force_tiles(shape, boxes)  # a real tiling, but not one ckptviz can vouch for
    (problem,) = tiling_problems(shape, boxes)
    assert problem.startswith(f"it is split along {MAX_SPLIT_DIMS + 1} dimensions, more than")
    assert tiling_problems(shape[1:], [(c[:-1], s[:-1]) for c, s in boxes[::2]]) == []


def _brute_force_tiles(shape: tuple[int, ...], boxes: list[Any]) -> bool:
    counts = torch.zeros(shape, dtype=torch.int64)
    for offsets, sizes in boxes:
        counts[tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))] += 1
    return bool((counts == 1).all())


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_the_coverage_check_agrees_with_counting_every_element(data: st.DataObject) -> None:
    """Exact: the corner-weight check says "tiles" exactly when every element is held once, and
    otherwise names an element that is in no chunk or in several."""
    shape = tuple(data.draw(st.lists(st.integers(1, 4), min_size=0, max_size=3)))
    if data.draw(st.booleans()):  # a real tiling: a random grid, then maybe one change
        boxes = [((), ())] if not shape else []
        if shape:
            cuts = [
                sorted({0, n, *data.draw(st.lists(st.integers(0, n), max_size=3))}) for n in shape
            ]
            for cell in itertools.product(*(list(itertools.pairwise(c)) for c in cuts)):
                boxes.append((tuple(a for a, _ in cell), tuple(b - a for a, b in cell)))
        if data.draw(st.booleans()) and boxes:
            del boxes[data.draw(st.integers(0, len(boxes) - 1))]
    else:

        def box() -> tuple[tuple[int, ...], tuple[int, ...]]:
            offsets = tuple(data.draw(st.integers(0, n)) for n in shape)
            room = [n - o for n, o in zip(shape, offsets, strict=True)]
            sizes = tuple(data.draw(st.integers(0, r)) for r in room)
            return offsets, sizes

        boxes = [box() for _ in range(data.draw(st.integers(0, 6)))]
    problems = tiling_problems(shape, boxes)
    assert (problems == []) == _brute_force_tiles(shape, boxes)
    if problems:
        assert "is in no chunk" in problems[0] or " chunks: chunk " in problems[0]


def test_the_coverage_check_handles_tens_of_thousands_of_chunks() -> None:
    """200 x 200 = 40,000 chunks of a 2-D grid: exact, and one chunk dropped is found by name."""
    shape = (400, 600)
    boxes = [((2 * r, 3 * c), (2, 3)) for r in range(200) for c in range(200)]
    assert tiling_problems(shape, boxes) == []
    boxes[12_345] = ((boxes[12_345][0][0], boxes[12_345][0][1] + 1), (2, 3))
    problems = tiling_problems(shape, boxes)
    assert problems[0] == "element [122, 435] is in no chunk"
    assert "chunk 12345 (offsets [122, 436], sizes [2, 3])" in problems[1]


# -- whatever torch raises while loading becomes CheckpointError ---------------------------------


def _damage_record(folder: Path, fqn: str) -> None:
    """Overwrite the start of ``fqn``'s record (same length): .metadata still checks out."""
    info = next(v for k, v in read_metadata(folder).storage_data.items() if k.fqn == fqn)
    path = folder / info.relative_path
    data = bytearray(path.read_bytes())
    data[info.offset : info.offset + 40] = b"x" * 40
    path.write_bytes(bytes(data))


def test_a_damaged_data_record_is_a_checkpoint_error_and_the_model_kept(tmp_path: Path) -> None:
    """torch wraps the failure in CheckpointException, a BaseException: it escaped every
    ``except Exception`` (the notebook got torch's traceback, the CLI exited 1)."""
    folder = _save(dict(_trained()[0].state_dict()), tmp_path / "c")
    _damage_record(folder, "head.weight")
    ckpt = ckptviz.read_checkpoint(folder)  # the metadata is fine
    with pytest.raises(CheckpointError) as error, ckpt.open() as data:
        data["head.weight"]
    message = str(error.value)
    assert str(folder) in message and "'head.weight'" in message
    assert "save the checkpoint again" in message and "weights_only" not in message
    model = Classifier(10)
    before = snapshot(model)
    with pytest.raises(ckptviz.CkptvizError):
        ckptviz.compare(model, folder).plan().apply(model)
    assert_bitwise_same(model, before)


def test_an_interrupt_during_a_dcp_load_stays_an_interrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _save(dict(Classifier(10).state_dict()), tmp_path / "c")

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(FileSystemReader, "read_data", interrupted)
    with pytest.raises(KeyboardInterrupt), ckptviz.read_checkpoint(folder).open() as data:
        data["head.weight"]


def test_transformed_records_are_refused_before_torch_expands_them(tmp_path: Path) -> None:
    folder = _save(dict(Classifier(10).state_dict()), tmp_path / "c")

    def compress(metadata: Any) -> None:
        storage = metadata.storage_data
        index = next(i for i in storage if i.fqn == "head.bias")
        storage[index] = dataclasses.replace(
            storage[index], transform_descriptors=["stream.zstd/1"]
        )

    _rewrite_metadata(folder, compress)
    ckpt = ckptviz.read_checkpoint(folder)
    assert "head.bias" in ckpt.tensors
    with (
        pytest.raises(CheckpointError, match=r"'head\.bias' is stored transformed"),
        ckpt.open() as data,
    ):
        data["head.bias"]


@pytest.mark.parametrize("command", ["diff", "inspect"])
def test_the_cli_exits_2_on_a_damaged_dcp_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    state = dict(_trained()[0].state_dict())
    good = _save(state, tmp_path / "good")
    bad = _save(state, tmp_path / "bad")
    if command == "diff":  # the data is read to compare values
        _damage_record(bad, "head.weight")
        argv = ["diff", "--no-progress", str(good), str(bad)]
    else:  # metadata only: a hole among 300 chunks
        bad, _ = _many_chunks(tmp_path)
        _rewrite_metadata(bad, lambda md: _move_chunk(md, "proj.weight", 41, [42, 0], [1, 6]))
        argv = ["inspect", str(bad)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "weight'" in err and "Traceback" not in err


def test_a_torch_without_distributed_is_a_checkpoint_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _save(dict(Classifier(10).state_dict()), tmp_path / "c")
    monkeypatch.setitem(sys.modules, "torch.distributed.checkpoint.metadata", None)
    with pytest.raises(CheckpointError, match=r"has no usable torch\.distributed") as error:
        ckptviz.read_checkpoint(folder)
    assert str(folder) in str(error.value)
