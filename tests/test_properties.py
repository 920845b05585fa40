"""Property tests: random small models, checkpoints and plans; apply does exactly the plan.

For any model, any checkpoint derived from it (keys dropped or added, a wrapper prefix, dims
grown or shrunk, ranks and dtypes changed) and any plan a person could choose (each row gets one
of its allowed actions): after apply, every ``load`` row equals the checkpoint's tensor cast to
the model's dtype, every ``keep`` row is unchanged, every ``partial`` row equals the checkpoint
on the overlap and its old value outside, every ``reinit`` row is the owning module's own
initialisation under the plan's seed, and nothing outside the plan moves. ``undo()`` restores
everything; a failure at any write restores everything. Random bytes in a real file end in a
``CheckpointError`` or a correct read, never another exception.

The examples are derandomized (a fixed seed) when ``CI`` is set, so CI runs are reproducible.
"""

from __future__ import annotations

import copy
import io
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as safetensors_save
from torch import nn

import ckptviz
from ckptviz import ApplyError, CheckpointError
from ckptviz.core import apply as apply_module
from ckptviz.core.actions.reinit import reinit_seed
from ckptviz.core.apply import bitwise_equal

IN_CI = bool(os.environ.get("CI"))


def profile(examples: int) -> Any:
    return settings(
        max_examples=examples,
        derandomize=IN_CI,
        database=None if IN_CI else settings.default.database,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
Shape = tuple[int, ...]


class Block(nn.Module):
    """A module with the tensors a spec asks for, its own initialiser and a scratch buffer."""

    def __init__(self, spec: dict[str, tuple[Shape, torch.dtype, str]]) -> None:
        super().__init__()
        for name, (shape, dtype, kind) in spec.items():
            if dtype.is_floating_point:
                value = torch.randn(shape).to(dtype)
            else:
                value = torch.randint(0, 1000, shape, dtype=dtype)
            if kind == "parameter":
                self.register_parameter(name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)
        # not in the state dict, so in no plan: apply must never touch it
        self.register_buffer("scratch", torch.randn(3), persistent=False)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for name, tensor in self.state_dict(keep_vars=True).items():
                if tensor.is_floating_point():
                    tensor.normal_(mean=float(len(name)))
                else:
                    tensor.random_(0, 1000)


class Random(nn.Module):
    def __init__(self, spec: list[dict[str, tuple[Shape, torch.dtype, str]]]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(s) for s in spec)


shapes = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)
tensor_specs = st.one_of(
    st.tuples(shapes, st.sampled_from(FLOATS), st.sampled_from(["parameter", "buffer"])),
    st.tuples(shapes, st.just(torch.int64), st.just("buffer")),
)
model_specs = st.lists(
    st.dictionaries(st.sampled_from(["weight", "bias", "scale", "stat"]), tensor_specs, min_size=1),
    min_size=1,
    max_size=3,
)


@st.composite
def changed_shape(draw: st.DrawFn, shape: Shape) -> Shape:
    """The same rank with dims grown or shrunk, or another rank."""
    if draw(st.booleans()) and shape:
        return tuple(max(1, size + draw(st.integers(-2, 2))) for size in shape)
    return draw(shapes)


@st.composite
def cases(draw: st.DrawFn) -> tuple[Random, dict[str, torch.Tensor], str]:
    """A model and a checkpoint derived from it, maybe behind a wrapper prefix."""
    spec = draw(model_specs)
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    model = Random(spec)
    state: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        change = draw(st.sampled_from(["same", "same", "drop", "shape", "dtype"]))
        if change == "drop":
            continue
        shape = tuple(tensor.shape)
        dtype = tensor.dtype
        if change == "shape":
            shape = draw(changed_shape(shape))
        if change == "dtype":
            dtype = draw(st.sampled_from([*FLOATS, torch.int64]))
        fresh = torch.randn(shape) * 3
        state[key] = fresh.to(dtype) if dtype.is_floating_point else fresh.round().to(dtype)
    # an empty checkpoint is refused on its own (tested elsewhere): keep at least one entry
    for i in range(draw(st.integers(0 if state else 1, 2))):
        state[f"extra{i}.weight"] = torch.randn(2)
    prefix = draw(st.sampled_from(["", "", "module.", "_orig_mod."]))
    return model, {prefix + k: v for k, v in state.items()}, prefix


@st.composite
def planned(draw: st.DrawFn) -> tuple[Random, dict[str, torch.Tensor], ckptviz.Plan]:
    model, state, prefix = draw(cases())
    plan = ckptviz.compare(model, state).plan()
    if prefix:  # the wrapper prefix lines up exactly the rows the bare keys would
        bare = {k.removeprefix(prefix): v for k, v in state.items()}
        assert plan.diff.counts == ckptviz.compare(model, bare).counts
    for key in plan.actions:
        allowed = [a for a, why in plan.allowed(key).items() if why is None]
        plan.set(key, draw(st.sampled_from(allowed)))
    return model, state, plan


def everything(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the model, persistent or not."""
    tensors = {k: t.detach().clone() for k, t in model.state_dict().items()}
    tensors.update({k: b.detach().clone() for k, b in model.named_buffers()})
    return tensors


def assert_all_equal(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    now = everything(model)
    assert now.keys() == before.keys()
    changed = [k for k in now if not bitwise_equal(now[k], before[k])]
    assert not changed, f"changed: {changed}"


def overlap(a: Shape, b: Shape) -> tuple[slice, ...]:
    return tuple(slice(0, min(x, y)) for x, y in zip(a, b, strict=True))


def expected_reinit(pristine: nn.Module, key: str, seed: int | None) -> torch.Tensor:
    """The owning module's own initialiser, run on a copy under the plan's per-module seed."""
    module_name, _, name = key.rpartition(".")
    clone = copy.deepcopy(pristine.get_submodule(module_name))
    assert seed is not None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(reinit_seed(seed, module_name))
        clone.reset_parameters()
    value: torch.Tensor = clone.state_dict()[name]
    return value


@profile(examples=150)
@given(planned())
def test_apply_does_exactly_the_plan_and_undo_restores_everything(
    case: tuple[Random, dict[str, torch.Tensor], ckptviz.Plan],
) -> None:
    model, state, plan = case
    pristine = copy.deepcopy(model)
    before = everything(model)
    params = dict(model.named_parameters())

    report = plan.apply(model)

    now = model.state_dict()
    for row, action in plan:
        if row.model is None:
            continue
        value, old = now[row.key], before[row.key]
        source = state[row.checkpoint_key] if row.checkpoint_key else None
        assert value.shape == old.shape and value.dtype == old.dtype, row.key
        if action == "load":
            assert source is not None
            assert bitwise_equal(value, source.to(value.dtype)), row.key
        elif action == "keep":
            assert bitwise_equal(value, old), row.key
        elif action == "partial":
            assert source is not None
            region = overlap(tuple(value.shape), tuple(source.shape))
            assert bitwise_equal(value[region], source[region].to(value.dtype)), row.key
            outside = torch.ones(value.shape, dtype=torch.bool)
            outside[region] = False
            assert bitwise_equal(value[outside], old[outside]), row.key
        else:
            assert action == "reinit"
            assert bitwise_equal(value, expected_reinit(pristine, row.key, plan.seed)), row.key
    for block_name, block in model.named_modules():
        if isinstance(block, Block):
            assert bitwise_equal(block.scratch, before[f"{block_name}.scratch"])
    assert all(p is params[k] for k, p in model.named_parameters())
    for action in [a.name for a in ckptviz.registered_actions()]:
        assert sorted(report.keys(action)) == sorted(plan.keys_with(action))
    assert report.verified

    report.undo()
    assert_all_equal(model, before)
    assert all(p is params[k] for k, p in model.named_parameters())


@profile(examples=100)
@given(planned(), st.data())
def test_a_failure_at_any_write_changes_nothing(
    case: tuple[Random, dict[str, torch.Tensor], ckptviz.Plan], data: st.DataObject
) -> None:
    model, _, plan = case
    written = [k for k, a in plan.actions.items() if a != "keep"]
    if not written:
        return
    fail_at = data.draw(st.integers(0, len(written) - 1), label="fail at write")
    before = everything(model)
    params = dict(model.named_parameters())
    calls = 0
    real_write = apply_module._write

    def failing(*args: Any) -> None:
        nonlocal calls
        calls += 1
        if calls - 1 == fail_at:
            raise RuntimeError("injected")
        real_write(*args)

    apply_module._write = failing
    try:
        with pytest.raises(ApplyError, match="injected"):
            plan.apply(model)
    finally:
        apply_module._write = real_write
    assert_all_equal(model, before)
    assert all(p is params[k] for k, p in model.named_parameters())


# -- random damage to real files ------------------------------------------------------------------


def file_bytes(kind: str) -> bytes:
    torch.manual_seed(0)
    state = {"a.weight": torch.randn(3, 4), "a.bias": torch.randn(3), "b.steps": torch.tensor(7)}
    if kind == "safetensors":
        return safetensors_save(state)
    buffer = io.BytesIO()
    torch.save(state, buffer, _use_new_zipfile_serialization=(kind == "torch zip"))
    return buffer.getvalue()


ORIGINALS = {kind: file_bytes(kind) for kind in ("torch zip", "torch legacy", "safetensors")}


@st.composite
def damaged(draw: st.DrawFn) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(list(ORIGINALS)))
    data = bytearray(ORIGINALS[kind])
    for _ in range(draw(st.integers(1, 6))):
        position = draw(st.integers(0, len(data) - 1))
        data[position] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return kind, bytes(data)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@profile(examples=300)
@given(damaged())
def test_damaged_files_end_in_a_checkpoint_error_or_a_correct_read(
    tmp_path_factory: pytest.TempPathFactory, case: tuple[str, bytes]
) -> None:
    _, data = case
    path: Path = tmp_path_factory.mktemp("damaged") / "ckpt.bin"
    path.write_bytes(data)
    try:
        ckpt = ckptviz.read_checkpoint(path)
    except CheckpointError as err:
        assert str(path) in str(err)
        return
    try:
        with ckpt.open() as source:
            for key, info in ckpt.tensors.items():
                tensor = source[key]
                assert tuple(tensor.shape) == info.shape
    except CheckpointError as err:
        assert str(path) in str(err)
