"""The two scenarios everyone meets: a conv that grew, a classifier head that grew."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import Classifier, SmallCNN, assert_bitwise_same, snapshot

import ckptviz


def test_plain_pytorch_refuses_the_grown_conv(old_cnn_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"size mismatch for conv1\.weight"):
        SmallCNN(32).load_state_dict(torch.load(old_cnn_path, weights_only=True))


def test_grown_conv_diff_statuses(old_cnn_path: Path) -> None:
    diff = ckptviz.compare(SmallCNN(32), old_cnn_path)
    statuses = {row.key: row.status for row in diff}
    assert statuses == {
        "conv1.weight": "shape",
        "conv1.bias": "shape",
        "bn1.weight": "shape",
        "bn1.bias": "shape",
        "bn1.running_mean": "shape",
        "bn1.running_var": "shape",
        "bn1.num_batches_tracked": "match",
        "fc.weight": "shape",
        "fc.bias": "match",
    }
    assert "16 filters" in diff.explain("conv1.weight")
    assert "32" in diff.explain("conv1.weight")


def test_grown_conv_default_plan_is_the_filter_and_update_recipe(old_cnn_path: Path) -> None:
    model = SmallCNN(32)
    before = snapshot(model)
    report = ckptviz.compare(model, old_cnn_path).plan().apply(model)
    state = torch.load(old_cnn_path, weights_only=True)
    # the article's recipe, by hand, on a copy of the same starting model
    reference = SmallCNN(32)
    reference.load_state_dict(before)
    wanted = reference.state_dict()
    wanted.update({k: v for k, v in state.items() if v.shape == wanted[k].shape})
    for key, value in model.state_dict().items():
        assert torch.equal(value, wanted[key]), key
    assert report.verified
    assert sorted(report.keys("load")) == ["bn1.num_batches_tracked", "fc.bias"]


def test_grown_conv_partial_copies_the_old_filters(old_cnn_path: Path) -> None:
    model = SmallCNN(32)
    before = snapshot(model)
    plan = ckptviz.compare(model, old_cnn_path).plan()
    plan.set("conv1", "partial")
    report = plan.apply(model)
    old = torch.load(old_cnn_path, weights_only=True)
    assert torch.equal(model.conv1.weight[:16], old["conv1.weight"])
    assert torch.equal(model.conv1.weight[16:], before["conv1.weight"][16:])
    assert torch.equal(model.conv1.bias[:16], old["conv1.bias"])
    report.undo()
    assert_bitwise_same(model, before)


def test_head_grows_from_10_to_12_classes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained = Classifier(10)
    path = tmp_path / "classifier.pt"
    torch.save(trained.state_dict(), path)
    model = Classifier(12)
    before = snapshot(model)
    plan = ckptviz.compare(model, path).plan()
    assert plan.action("head.weight") == "keep"
    plan.set("head.*", "partial")
    plan.apply(model)
    assert torch.equal(model.head.weight[:10], trained.head.weight)
    assert torch.equal(model.head.weight[10:], before["head.weight"][10:])
    assert torch.equal(model.head.bias[:10], trained.head.bias)
    for key in ("body.0.weight", "body.2.bias"):
        assert torch.equal(model.state_dict()[key], trained.state_dict()[key])


def test_to_code_reproduces_apply_on_a_fresh_copy(old_cnn_path: Path) -> None:
    model = SmallCNN(32)
    start = copy.deepcopy(model)
    plan = ckptviz.compare(model, old_cnn_path).plan()
    plan.set("conv1", "partial")
    plan.set("bn1", "reinit")
    plan.set("fc", "reinit")
    plan.apply(model)
    code = plan.to_code()
    assert "ckptviz" not in code.replace("# ckptviz plan", "")
    other = copy.deepcopy(start)
    exec(compile(code, "<plan>", "exec"), {"model": other})
    for key, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key
    # and it really changed something, so the comparison above is not vacuous
    assert not torch.equal(start.conv1.weight, model.conv1.weight)
    assert not torch.equal(start.fc.weight, model.fc.weight)
