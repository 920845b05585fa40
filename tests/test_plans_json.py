"""Saved plans that are malformed, tampered with or meant for another model.

Each is refused with ``PlanError`` naming the field or the rows, and the model is unchanged. A
plan file never grants trust: ``trusted``/``allow_globals`` come from the caller only.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Classifier, SmallCNN, assert_bitwise_same, snapshot
from torch import nn

import ckptviz
from ckptviz import Plan, PlanError, UnsafeCheckpointError


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """A grown-conv plan with partial and reinit rows, as JSON data, and its checkpoint."""
    torch.manual_seed(0)
    path = tmp_path / "old.pth"
    torch.save(SmallCNN(4).state_dict(), path)
    model = SmallCNN(6)
    plan = ckptviz.compare(model, path).plan()
    plan.set("conv1", "partial")
    plan.set("fc.weight", "reinit")
    return path, json.loads(plan.to_json())


def row_of(data: dict[str, Any], key: str) -> dict[str, Any]:
    return next(r for r in data["rows"] if r["model_key"] == key)


def test_a_saved_plan_applies_like_the_original(saved: tuple[Path, dict[str, Any]]) -> None:
    path, data = saved
    torch.manual_seed(7)
    first = SmallCNN(6)
    second = copy.deepcopy(first)
    plan = ckptviz.compare(first, path).plan()
    plan.set("conv1", "partial")
    plan.set("fc.weight", "reinit")
    plan.apply(first)
    Plan.from_json(json.dumps(data)).apply(second)
    for key, value in first.state_dict().items():
        assert torch.equal(second.state_dict()[key], value), key


def test_a_plan_file_path_is_read(saved: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(data := saved[1]))
    assert Plan.from_json(plan_path).actions == Plan.from_json(str(plan_path)).actions
    assert (
        Plan.from_json(plan_path).action("fc.weight")
        == "reinit"
        == row_of(data, "fc.weight")["action"]
    )


# Not JSON, or not a plan: the whole document is refused.
MALFORMED_TEXT = {
    "empty text": ("", "empty"),
    "not JSON": ("{nope", "malformed"),
    "a JSON list": ("[]", "format 'ckptviz.plan'"),
    "JSON null": ("null", "format 'ckptviz.plan'"),
    "a number": ("3", "format 'ckptviz.plan'"),
    "another JSON object": ('{"rows": []}', "format 'ckptviz.plan'"),
    "a path that does not exist": ("no/such/plan.json", "malformed"),
}


@pytest.mark.parametrize("case", list(MALFORMED_TEXT))
def test_text_that_is_not_a_plan_is_refused(case: str) -> None:
    text, fragment = MALFORMED_TEXT[case]
    with pytest.raises(PlanError, match="not a ckptviz plan") as caught:
        Plan.from_json(text)
    assert fragment in str(caught.value)


def set_row(key: str, field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda data: row_of(data, key).__setitem__(field, value)


def set_top(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda data: data.__setitem__(field, value)


def set_ckpt(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda data: data["checkpoint"].__setitem__(field, value)


# A valid plan with one thing broken: the error names it (a row key when a row is at fault).
TAMPERED: dict[str, tuple[Callable[[dict[str, Any]], None], str, str | None]] = {
    "unknown action": (
        set_row("fc.bias", "action", "explode"),
        "unknown action 'explode'",
        "fc.bias",
    ),
    "action missing": (set_row("fc.bias", "action", None), "unknown action None", "fc.bias"),
    "refused action": (
        set_row("conv1.weight", "action", "load"),
        "shapes differ",
        "conv1.weight",
    ),
    "status that does not fit": (
        set_row("fc.bias", "status", "shape"),
        "status 'shape'",
        "fc.bias",
    ),
    "unknown status": (set_row("fc.bias", "status", "great"), "status 'great'", "fc.bias"),
    "row twice": (
        lambda d: d["rows"].append(copy.deepcopy(row_of(d, "fc.bias"))),
        "more than one row",
        "fc.bias",
    ),
    "checkpoint key the mapping does not give": (
        set_row("fc.bias", "checkpoint_key", "fc.weight"),
        "'fc.weight'",
        "fc.bias",
    ),
    "unknown dtype": (
        set_row("fc.bias", "model_dtype", "float99"),
        "unknown dtype 'float99'",
        None,
    ),
    "dtype that is a torch attribute": (
        set_row("fc.bias", "model_dtype", "Tensor"),
        "unknown dtype 'Tensor'",
        None,
    ),
    "shape of strings": (set_row("fc.bias", "model_shape", "ten"), "malformed key, shape", None),
    "shape of booleans": (set_row("fc.bias", "model_shape", [True]), "malformed key, shape", None),
    "negative shape": (set_row("fc.bias", "model_shape", [-10]), "malformed key, shape", None),
    "key not a string": (set_row("fc.bias", "model_key", 5), "malformed key, shape", None),
    "row not an object": (lambda d: d["rows"].__setitem__(0, 5), "row 0 is not an object", None),
    "rows not a list": (set_top("rows", {}), "needs 'rows'", None),
    "no checkpoint": (set_top("checkpoint", "old.pth"), "needs 'checkpoint'", None),
    "model not an object": (set_top("model", []), "'model' must be an object", None),
    "seed not an integer": (set_top("seed", "42"), "'seed' must be an integer", None),
    "version from the future": (set_top("version", 99), "version 99 is not supported", None),
    "mapping rules not pairs": (
        lambda d: d["mapping"].__setitem__("rules", [["only one"]]),
        "mapping 'rules'",
        None,
    ),
    "mapping rules not a list": (lambda d: d["mapping"].__setitem__("rules", 5), "'rules'", None),
    "mapping rule not a regex": (
        lambda d: d["mapping"].__setitem__("rules", [["(", "x"]]),
        "not a valid regex",
        None,
    ),
    "mapping pairs of numbers": (
        lambda d: d["mapping"].__setitem__("pairs", [[1, 2]]),
        "mapping 'pairs'",
        None,
    ),
    "mapping prefix not a string": (
        lambda d: d["mapping"].__setitem__("checkpoint_prefix", 3),
        "'checkpoint_prefix'",
        None,
    ),
    "checkpoint key as a string": (set_ckpt("key", "state_dict"), "list of names", None),
    "checkpoint key a number": (set_ckpt("key", 5), "list of names", None),
    "checkpoint path a number": (set_ckpt("path", 5), "'path' must be a string", None),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_a_tampered_plan_is_refused_naming_what_is_wrong(
    saved: tuple[Path, dict[str, Any]], case: str
) -> None:
    edit, fragment, row = TAMPERED[case]
    data = copy.deepcopy(saved[1])
    edit(data)
    model = SmallCNN(6)
    before = snapshot(model)
    with pytest.raises(PlanError) as caught:
        Plan.from_json(json.dumps(data)).apply(model)
    assert fragment in str(caught.value), str(caught.value)
    if row is not None:
        assert row in caught.value.rows
        assert row in str(caught.value)
    assert_bitwise_same(model, before)


def test_every_bad_row_is_named_at_once(saved: tuple[Path, dict[str, Any]]) -> None:
    data = copy.deepcopy(saved[1])
    row_of(data, "fc.bias")["action"] = "explode"
    row_of(data, "bn1.bias")["action"] = "nuke"
    with pytest.raises(PlanError) as caught:
        Plan.from_json(json.dumps(data))
    assert {"fc.bias", "bn1.bias"} <= set(caught.value.rows)


@pytest.mark.parametrize(
    "other",
    [lambda: Classifier(10), lambda: SmallCNN(8), lambda: SmallCNN(6).double()],
    ids=["another architecture", "other widths", "other dtype"],
)
def test_a_plan_for_another_model_is_refused_naming_the_rows(
    saved: tuple[Path, dict[str, Any]], other: Callable[[], nn.Module]
) -> None:
    model = other()
    before = snapshot(model)
    params = dict(model.named_parameters())
    plan = Plan.from_json(json.dumps(saved[1]))
    with pytest.raises(PlanError) as caught:
        plan.apply(model)
    assert caught.value.rows
    assert "does not fit this model" in str(caught.value)
    for key in list(caught.value.rows)[:3]:
        assert key in str(caught.value)
    assert_bitwise_same(model, before)
    assert all(p is params[k] for k, p in model.named_parameters())


# -- trust never comes from the JSON ---------------------------------------------------------------


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch '{self.marker}'",))


def test_a_plan_json_cannot_grant_trust(tmp_path: Path) -> None:
    """A plan edited to say trusted=True must not make apply unpickle a malicious file."""
    ckpt = tmp_path / "model.pt"
    torch.save(nn.Linear(2, 2).state_dict(), ckpt)
    model = nn.Linear(2, 2)
    data = json.loads(ckptviz.compare(model, ckpt).plan().to_json())
    data["checkpoint"]["trusted"] = True
    data["checkpoint"]["allow_globals"] = ["posix.system"]
    # the file is swapped for one whose pickle runs code, same tensors
    marker = tmp_path / "marker"
    torch.save({**nn.Linear(2, 2).state_dict(), "x": Payload(marker)}, ckpt)
    before = snapshot(model)
    plan = Plan.from_json(json.dumps(data))
    assert not plan.diff.checkpoint.trusted and not plan.diff.checkpoint.allow_globals
    with pytest.raises(UnsafeCheckpointError):
        plan.apply(model)
    assert not marker.exists()
    assert_bitwise_same(model, before)


def test_trust_given_by_the_caller_is_used(tmp_path: Path) -> None:
    ckpt = tmp_path / "research.pt"
    torch.manual_seed(1)
    state = nn.Linear(2, 2).state_dict()
    torch.save({"model": state, "args": argparse.Namespace(lr=0.1)}, ckpt)
    model = nn.Linear(2, 2)
    diff = ckptviz.compare(model, ckpt, allow_globals=["argparse.Namespace"])
    text = diff.plan().to_json()
    with pytest.raises(UnsafeCheckpointError, match=r"argparse\.Namespace"):
        Plan.from_json(text).apply(model)
    Plan.from_json(text, allow_globals=["argparse.Namespace"]).apply(model)
    assert torch.equal(model.weight, state["weight"])
