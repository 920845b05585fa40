"""Checkpoint vs checkpoint: the Diff, and value statistics checked against torch/numpy by hand."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Classifier
from safetensors.torch import save_file

import ckptviz
from ckptviz.core.errors import CheckpointError, PlanError
from ckptviz.core.stats import PairReader, value_stats, values_equal


def make_pair(
    directory: Path,
) -> tuple[Path, Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Two checkpoints that differ in known ways: ``block.1.linear.weight`` scaled by 3, the
    head grown from 5 to 7 outputs (reshaped), ``norm.weight`` renamed to ``final_norm.weight``,
    a NaN in ``block.0.linear.bias``, ``embed.weight`` saved as float16, a zero ``gate`` that
    became ones, ``pos`` of another rank; the rest is equal."""
    generator = torch.Generator().manual_seed(5)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    a = {
        "embed.weight": randn(10, 4),
        "block.0.linear.weight": randn(8, 4),
        "block.0.linear.bias": randn(8),
        "block.1.linear.weight": randn(8, 8),
        "block.1.linear.bias": randn(8),
        "gate": torch.zeros(3),
        "pos": randn(6),
        "norm.weight": randn(8),
        "head.weight": randn(5, 8),
        "head.bias": randn(5),
        "steps": torch.tensor(1200, dtype=torch.int64),
        "empty": torch.zeros(0),
    }
    b = {key: value.clone() for key, value in a.items()}
    b["embed.weight"] = a["embed.weight"].to(torch.float16)
    b["block.0.linear.bias"][2] = float("nan")
    b["block.1.linear.weight"] = a["block.1.linear.weight"] * 3
    b["gate"] = torch.ones(3)
    b["pos"] = a["pos"].reshape(2, 3) + 1
    b["final_norm.weight"] = b.pop("norm.weight")
    head = torch.cat([a["head.weight"] + 0.5, randn(2, 8)])
    b["head.weight"] = head
    b["head.bias"] = torch.cat([a["head.bias"], randn(2)])
    path_a, path_b = directory / "base.pt", directory / "tuned.safetensors"
    torch.save(a, path_a)
    save_file({k: v.contiguous() for k, v in b.items()}, str(path_b))
    return path_a, path_b, a, b


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return make_pair(tmp_path)


def expected(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """The measures computed the plain way, on whole tensors, with numpy."""
    x = a.detach().double().numpy().ravel()
    y = b.detach().double().numpy().ravel()
    diff = x - y
    return {
        "relative_change": float(np.linalg.norm(diff) / np.linalg.norm(x)),
        "max_abs_diff": float(np.abs(diff).max()) if diff.size else 0.0,
        "cosine": float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))),
        "diff_norm": float(np.linalg.norm(diff)),
        "norm_a": float(np.linalg.norm(x)),
        "norm_b": float(np.linalg.norm(y)),
        "mean_a": float(x.mean()),
        "mean_b": float(y.mean()),
        "std_a": float(x.std()),
        "std_b": float(y.std()),
    }


def assert_close(row: object, wanted: dict[str, float], rel: float = 1e-12) -> None:
    for name, value in wanted.items():
        got = getattr(row, name) if not isinstance(row, dict) else row[name]
        if math.isnan(value):
            assert math.isnan(got), name
        else:
            assert got == pytest.approx(value, rel=rel, abs=1e-12), name


# -- the Diff of two checkpoints -------------------------------------------------------------------


def test_two_checkpoints_give_the_same_diff_structure(pair: tuple) -> None:
    path_a, path_b, _, _ = pair
    diff = ckptviz.compare(path_a, path_b)
    assert not diff.against_model
    statuses = {row.key: row.status for row in diff}
    assert statuses == {
        "embed.weight": "dtype",
        "block.0.linear.weight": "match",
        "block.0.linear.bias": "match",
        "block.1.linear.weight": "match",
        "block.1.linear.bias": "match",
        "gate": "match",
        "pos": "shape",
        "norm.weight": "missing",
        "final_norm.weight": "unexpected",
        "head.weight": "shape",
        "head.bias": "shape",
        "steps": "match",
        "empty": "match",
    }
    assert not diff.identical
    assert diff.side_names == (str(path_a), str(path_b))
    renamed = ckptviz.compare(path_a, path_b, rename={r"^final_norm\.": "norm."})
    assert renamed.status("norm.weight") == "match"
    assert "renamed from final_norm.weight (by rename rule)" in renamed.row("norm.weight").note


def test_wrapper_prefix_is_found_between_two_checkpoints(tmp_path: Path) -> None:
    state = Classifier().state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "a.pt")
    torch.save(state, tmp_path / "b.pt")
    diff = ckptviz.compare(tmp_path / "a.pt", tmp_path / "b.pt")
    assert diff.mapping.model_prefix == "module."
    assert diff.counts["match"] == len(state)
    assert diff.model_side.location == ("state_dict",)


def test_plan_refuses_when_neither_side_is_a_model(pair: tuple) -> None:
    path_a, path_b, _, _ = pair
    diff = ckptviz.compare(path_a, path_b)
    with pytest.raises(PlanError, match="nothing to apply to") as caught:
        diff.plan()
    assert str(path_a) in str(caught.value)
    assert "live nn.Module" in str(caught.value)


# -- statistics ------------------------------------------------------------------------------------


def test_stats_frame_matches_hand_computed_values(pair: tuple) -> None:
    path_a, path_b, a, b = pair
    frame = ckptviz.compare(path_a, path_b).stats(progress=False)
    rows = {record["key"]: record for record in frame.to_dict("records")}
    # rows with both sides only, in model order
    assert list(frame["key"]) == [
        "embed.weight",
        "block.0.linear.weight",
        "block.0.linear.bias",
        "block.1.linear.weight",
        "block.1.linear.bias",
        "gate",
        "pos",
        "head.weight",
        "head.bias",
        "steps",
        "empty",
    ]
    assert frame.attrs == {"a": str(path_a), "b": str(path_b), "order": "in model order"}

    scaled = rows["block.1.linear.weight"]
    assert_close(scaled, expected(a["block.1.linear.weight"], b["block.1.linear.weight"]))
    assert scaled["relative_change"] == pytest.approx(2.0)
    assert scaled["cosine"] == pytest.approx(1.0)
    assert not scaled["equal"]

    same = rows["block.0.linear.weight"]
    assert same["equal"] and same["relative_change"] == 0 and same["max_abs_diff"] == 0
    assert rows["steps"]["equal"] and rows["steps"]["mean_a"] == 1200

    cast = rows["embed.weight"]
    assert_close(cast, expected(a["embed.weight"], b["embed.weight"]))
    assert not cast["equal"]
    assert 0 < cast["max_abs_diff"] < 1e-2  # float16 rounding, nothing more
    assert "float32 vs float16" in cast["note"]


def test_nan_is_counted_and_propagates(pair: tuple) -> None:
    path_a, path_b, a, _ = pair
    stats = value_stats(ckptviz.compare(path_a, path_b), progress=False)
    row = stats["block.0.linear.bias"]
    assert (row.nan_a, row.nan_b, row.inf_a, row.inf_b) == (0, 1, 0, 0)
    assert row.nonfinite and not row.equal
    for name in ("relative_change", "max_abs_diff", "cosine", "norm_b", "mean_b", "std_b"):
        assert math.isnan(getattr(row, name)), name
    assert row.norm_a == pytest.approx(float(np.linalg.norm(a["block.0.linear.bias"].numpy())))
    assert "b has 1 NaN" in row.note


def test_shape_rows_compare_the_overlap_and_each_whole_side(pair: tuple) -> None:
    path_a, path_b, a, b = pair
    stats = value_stats(ckptviz.compare(path_a, path_b), progress=False)
    head = stats["head.weight"]
    assert head.compared == "overlap" and head.compared_shape == (5, 8)
    overlap = expected(a["head.weight"], b["head.weight"][:5])
    assert_close(head, {k: overlap[k] for k in ("relative_change", "max_abs_diff", "cosine")})
    assert head.max_abs_diff == pytest.approx(0.5)
    whole_b = b["head.weight"].double().numpy()
    assert head.norm_b == pytest.approx(float(np.linalg.norm(whole_b)))
    assert head.std_b == pytest.approx(float(whole_b.std()))
    assert head.norm_a_compared == pytest.approx(overlap["norm_a"])
    assert not head.equal

    grown = stats["head.bias"]  # old outputs kept: the overlap did not change
    assert grown.relative_change == 0 and grown.compared_shape == (5,)

    other_rank = stats["pos"]
    assert other_rank.compared == "none" and other_rank.compared_shape is None
    assert math.isnan(other_rank.relative_change) and math.isnan(other_rank.cosine)
    assert other_rank.norm_b == pytest.approx(float(np.linalg.norm(b["pos"].numpy())))
    assert "ranks differ" in other_rank.note


def test_zero_base_and_empty_tensors(pair: tuple) -> None:
    path_a, path_b, _, _ = pair
    stats = value_stats(ckptviz.compare(path_a, path_b), progress=False)
    gate = stats["gate"]
    assert gate.relative_change == math.inf and math.isnan(gate.cosine)
    assert gate.max_abs_diff == 1 and "all zeros" in gate.note
    empty = stats["empty"]
    assert empty.equal and empty.relative_change == 0 and math.isnan(empty.mean_a)


def test_blockwise_reduction_equals_whole_tensor_values(pair: tuple) -> None:
    """Tiny blocks (7 values) force every tensor through the chunked path."""
    path_a, path_b, a, b = pair
    diff = ckptviz.compare(path_a, path_b)
    whole = value_stats(diff, progress=False)
    chunked = value_stats(diff, progress=False, block_elements=7, memory_budget=64)
    for big, small in zip(whole, chunked, strict=True):
        assert big.key == small.key and big.equal == small.equal
        for name in ("relative_change", "max_abs_diff", "cosine", "norm_a", "std_a", "std_b"):
            x, y = getattr(big, name), getattr(small, name)
            assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=1e-12), name
    scaled = chunked["block.1.linear.weight"]
    assert_close(scaled, expected(a["block.1.linear.weight"], b["block.1.linear.weight"]))


def test_model_against_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Classifier()
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    with torch.no_grad():
        model.head.weight.mul_(1.1)
    frame = ckptviz.compare(model, path).stats(progress=False)
    changed = frame[~frame["equal"]]
    assert list(changed["key"]) == ["head.weight"]
    saved = torch.load(path, weights_only=True)["head.weight"]
    wanted = expected(model.head.weight, saved)
    assert_close(changed.iloc[0].to_dict(), {k: wanted[k] for k in ("relative_change", "cosine")})
    assert frame.attrs == {"a": "model", "b": "checkpoint", "order": "in model order"}


def test_stats_of_chosen_keys_and_refusal_of_one_sided_rows(pair: tuple) -> None:
    path_a, path_b, _, _ = pair
    diff = ckptviz.compare(path_a, path_b)
    frame = diff.stats(["gate", "steps"], progress=False)
    assert list(frame["key"]) == ["gate", "steps"]
    with pytest.raises(KeyError, match=r"norm\.weight"):
        diff.stats(["norm.weight"])


def test_empty_stats_frame_keeps_its_columns(tmp_path: Path) -> None:
    torch.save({"x": torch.ones(2)}, tmp_path / "a.pt")
    torch.save({"y": torch.ones(2)}, tmp_path / "b.pt")
    frame = ckptviz.compare(tmp_path / "a.pt", tmp_path / "b.pt").stats(progress=False)
    assert len(frame) == 0
    assert {"key", "relative_change", "equal", "nan_b"} <= set(frame.columns)


def test_values_equal_checks_bytes(pair: tuple, tmp_path: Path) -> None:
    path_a, path_b, _, _ = pair
    diff = ckptviz.compare(path_a, path_b)
    equal = values_equal(diff, progress=False, block_elements=5)
    unchanged = {"block.0.linear.weight", "block.1.linear.bias", "steps", "empty"}
    assert {k for k, same in equal.items() if same} == unchanged
    assert set(equal) == {r.key for r in diff if r.model and r.checkpoint}
    # the same NaN on both sides is the same bytes (torch.equal would say otherwise)
    with_nan = {"w": torch.tensor([1.0, float("nan"), 3.0])}
    torch.save(with_nan, tmp_path / "x.pt")
    save_file(with_nan, str(tmp_path / "y.safetensors"))
    assert not torch.equal(with_nan["w"], with_nan["w"].clone())
    same = ckptviz.compare(tmp_path / "x.pt", tmp_path / "y.safetensors")
    assert values_equal(same, progress=False) == {"w": True}
    assert value_stats(same, progress=False)["w"].equal


def test_reader_reopens_files_after_the_budget(pair: tuple) -> None:
    path_a, path_b, a, b = pair
    diff = ckptviz.compare(path_a, path_b)
    keys = ["block.0.linear.weight", "block.1.linear.weight", "block.1.linear.bias"]
    budget = 600  # pairs of 256, 512 and 64 bytes: the second overflows it, the third fits
    with PairReader([diff.model_side, diff.checkpoint], budget) as reader:
        for key in keys:
            left, right = reader.fetch([key, key])
            assert torch.equal(left, a[key]) and torch.equal(right, b[key])
        assert reader.reopens == 1  # before block.1.linear.weight; the small bias then fits


def test_file_replaced_during_a_run_is_refused(pair: tuple) -> None:
    path_a, path_b, a, _ = pair
    diff = ckptviz.compare(path_a, path_b)
    torch.save({**a, "extra": torch.ones(3)}, path_a)
    with pytest.raises(CheckpointError, match="changed since it was read"):
        value_stats(diff, progress=False)


def test_progress_bar_only_when_asked_or_long(pair: tuple, capsys: pytest.CaptureFixture) -> None:
    path_a, path_b, _, _ = pair
    diff = ckptviz.compare(path_a, path_b)
    diff.stats(progress=False)
    diff.stats()  # automatic: a run this short shows nothing
    assert capsys.readouterr().err == ""
    diff.stats(progress=True)
    err = capsys.readouterr().err
    assert "comparing values" in err and "100%" in err


# -- memory ---------------------------------------------------------------------------------------

_MEASURE = """
import json, sys, time
import ckptviz
from ckptviz.core.stats import value_stats


def status(field):
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) for line in lines if line.startswith(field)) * 1024


path, budget = sys.argv[1], int(sys.argv[2])
diff = ckptviz.compare(path, path)
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")  # restart the peak (VmHWM) from here: import-time peaks do not count
before = status("VmRSS:")
start = time.perf_counter()
stats = value_stats(diff, progress=False, memory_budget=budget)
seconds = time.perf_counter() - start
print(json.dumps({"growth": status("VmHWM:") - before, "seconds": seconds,
                  "equal": stats.all_equal, "pairs": len(stats),
                  "worst": max(e.relative_change for e in stats)}))
"""


def _measure(path: Path, budget: int) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path), str(budget)],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ.copy(),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    measured: dict[str, float] = json.loads(result.stdout)
    return measured


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_stats_memory_stays_bounded_on_a_file_larger_than_the_budget(tmp_path: Path) -> None:
    """A 400 MB file of 50 tensors of 8 MB, compared with itself (800 MB read through two
    sides) under a 32 MiB budget: peak RSS growth stays under a quarter of the file size. Each
    tensor is read into memory of its own and freed once reduced (nothing of the file stays
    mapped), so it stays that low with a budget above the file size too.

    The peak is the child's VmHWM, not ru_maxrss: Linux carries the parent's peak into a
    child's ru_maxrss across fork and exec, so it would measure pytest, not the run."""
    generator = torch.Generator().manual_seed(0)
    path = tmp_path / "large.pt"
    torch.save(
        {f"layers.{i}.weight": torch.randn(2_000_000, generator=generator) for i in range(50)},
        path,
    )
    size = path.stat().st_size
    assert size > 400e6
    bounded = _measure(path, 32 * 2**20)
    assert bounded["equal"] and bounded["pairs"] == 50 and bounded["worst"] == 0
    assert bounded["growth"] < 0.25 * size, bounded
    unbounded = _measure(path, 4 * size)
    assert unbounded["growth"] < 0.25 * size, unbounded
    print(
        f"\nstats on {size / 1e6:.0f} MB x 2 sides: bounded growth "
        f"{bounded['growth'] / 1e6:.0f} MB in {bounded['seconds']:.2f} s "
        f"({2 * size / 1e6 / bounded['seconds']:.0f} MB/s); unbounded growth "
        f"{unbounded['growth'] / 1e6:.0f} MB"
    )
