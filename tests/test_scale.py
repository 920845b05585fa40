"""50,000 tensors: compare, plan, bulk set, apply and undo stay correct (speed: benchmarks/)."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import ckptviz

CELLS = 2_500  # twenty tensors each: 50,000 (fewer, wider modules keep the test quick to build)


class Cell(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for j in range(10):
            self.register_parameter(f"weight{j}", nn.Parameter(torch.zeros(3, 2)))
            self.register_parameter(f"bias{j}", nn.Parameter(torch.zeros(3)))


class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Cell() for _ in range(CELLS))


GROWN = {f"layers.{i}.weight5" for i in range(0, CELLS, 50)}  # 3 rows in the model, 2 saved
HALF = {f"layers.{i}.bias7" for i in range(0, CELLS, 25)}  # saved as float16
RENAMED = {f"layers.{CELLS - 1}.{n}{j}" for j in range(5) for n in ("weight", "bias")}


@pytest.fixture(scope="module")
def wide_checkpoint(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict[str, torch.Tensor]]:
    """Under DataParallel's ``module.`` prefix, with grown, float16 and renamed rows."""
    torch.manual_seed(0)
    saved: dict[str, torch.Tensor] = {}
    for key, value in Wide().state_dict().items():
        fresh = torch.randn(value.shape)
        if key in GROWN:
            fresh = fresh[:2]
        if key in HALF:
            fresh = fresh.half()
        name = key.replace("layers.", "blocks.") if key in RENAMED else key
        saved[f"module.{name}"] = fresh
    path = tmp_path_factory.mktemp("wide") / "wide.safetensors"
    save_file(saved, path)
    return path, saved


def test_fifty_thousand_tensors(wide_checkpoint: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, saved = wide_checkpoint
    model = Wide()
    keys = list(model.state_dict())
    assert len(keys) == 50_000

    diff = ckptviz.compare(model, path)
    assert diff.mapping.checkpoint_prefix == "module."
    assert diff.counts == {
        "match": 50_000 - len(GROWN) - len(HALF) - len(RENAMED),
        "dtype": len(HALF),
        "shape": len(GROWN),
        "missing": len(RENAMED),
        "unexpected": len(RENAMED),
    }
    assert {s.model_key for s in diff.suggestions} == RENAMED
    assert any(r.pairs == len(RENAMED) for r in diff.rule_suggestions)

    plan = diff.plan()
    loads = {k for k, a in plan.actions.items() if a == "load"}
    changed = plan.set("layers.1*", "keep")
    assert set(changed) == {k for k in loads if fnmatch.fnmatchcase(k, "layers.1*")}
    assert len(changed) > 10_000
    weight5 = re.compile(r"^layers\.\d+\.weight5$")
    partial = plan.set(weight5, "partial")
    assert set(partial) == {k for k in keys if weight5.match(k)}
    assert set(partial) >= GROWN

    report = plan.apply(model)
    assert report.verified
    now = model.state_dict()
    for key in keys:
        action = plan.action(key)
        value = saved.get(f"module.{key}")
        if action == "load":
            assert value is not None and torch.equal(now[key], value.float()), key
        elif action == "partial":
            assert value is not None
            assert torch.equal(now[key][: value.shape[0]], value), key
            assert not now[key][value.shape[0] :].any(), key
        else:
            assert not now[key].any(), key
    assert report.undo() == sum(1 for a in plan.actions.values() if a != "keep")
    assert not any(t.any() for t in model.state_dict().values())


def test_fifty_thousand_tensors_on_the_meta_device(
    wide_checkpoint: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    path, _ = wide_checkpoint
    with torch.device("meta"):
        model = Wide()
    diff = ckptviz.compare(model, path)
    assert diff.counts["match"] == 50_000 - len(GROWN) - len(HALF) - len(RENAMED)
    records = diff.to_records()
    assert len(records) == 50_000 + len(RENAMED)
