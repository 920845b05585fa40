"""Plan and apply: defaults, refusals, all-or-nothing, identity, ties, undo, JSON, code."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import Classifier, SmallCNN, TiedLM, assert_bitwise_same, snapshot
from safetensors.torch import save_file
from torch import nn

import ckptviz
from ckptviz.core import apply as apply_module


def test_defaults_follow_the_recipe_and_unexpected_rows_are_skipped() -> None:
    state = dict(SmallCNN(16).state_dict())
    state["old_head.weight"] = torch.zeros(2)
    del state["fc.bias"]
    state["conv1.bias"] = state["conv1.bias"].double()
    plan = ckptviz.compare(SmallCNN(16, classes=12), state).plan()
    assert plan.action("conv1.weight") == "load"  # match
    assert plan.action("conv1.bias") == "load"  # dtype
    assert plan.action("fc.weight") == "keep"  # shape
    assert plan.action("fc.bias") == "keep"  # missing
    assert plan.action("old_head.weight") == "skip"  # unexpected
    assert plan.counts["skip"]["rows"] == 1


def test_refusals_name_the_reason() -> None:
    class NoInit(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

    class Net(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.lin = nn.Linear(4, width)
            self.custom = NoInit()

    plan = ckptviz.compare(Net(6), Net(4).state_dict()).plan()
    with pytest.raises(ckptviz.PlanError, match="shapes differ") as err:
        plan.set("lin.weight", "load")
    assert "lin.weight" in err.value.rows
    with pytest.raises(ckptviz.PlanError, match="no reset_parameters"):
        plan.set("custom.scale", "reinit")
    with pytest.raises(ckptviz.PlanError, match="unknown action 'copy'"):
        plan.set("lin", "copy")
    with pytest.raises(ckptviz.PlanError, match="names no row"):
        plan.set("nothing.*", "keep")
    allowed = plan.allowed("lin.weight")
    assert allowed == {
        "load": plan.refusal("lin.weight", "load"),
        "keep": None,
        "reinit": None,
        "partial": None,
        # a grown linear weight is neither a grid nor an input conv
        "resample": allowed["resample"],
        "adapt_channels": allowed["adapt_channels"],
    }
    assert allowed["resample"] and allowed["adapt_channels"]
    assert plan.action("lin.weight") == "keep"  # refused sets changed nothing
    changed = plan.set("*", "reinit", skip_refused=True)
    assert sorted(changed) == ["lin.bias", "lin.weight"]
    assert plan.action("custom.scale") == "load"


def test_module_and_glob_patterns() -> None:
    plan = ckptviz.compare(SmallCNN(32), SmallCNN(16).state_dict()).plan()
    assert sorted(plan.set("conv1", "partial")) == ["conv1.bias", "conv1.weight"]
    assert plan.set("bn1.running_*", "reinit") == ["bn1.running_mean", "bn1.running_var"]
    assert plan.keys_with("partial") == ["conv1.weight", "conv1.bias"]


def test_apply_keeps_parameter_identity_dtype_requires_grad_and_optimizer(
    old_cnn_path: Path,
) -> None:
    model = SmallCNN(16)
    model.fc.bias.requires_grad_(False)
    params = {name: p for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    report = ckptviz.compare(model, old_cnn_path).plan().apply(model)
    assert report.verified and len(report.keys("load")) == 9
    for name, p in model.named_parameters():
        assert p is params[name]
        assert p.dtype == torch.float32
    assert model.fc.bias.requires_grad is False and model.fc.weight.requires_grad is True
    state = torch.load(old_cnn_path, weights_only=True)
    assert torch.equal(model.conv1.weight, state["conv1.weight"])
    loss = model(torch.randn(2, 3, 8, 8)).sum()
    loss.backward()
    before_step = model.conv1.weight.detach().clone()
    optimizer.step()  # the optimizer still holds the live parameters
    assert not torch.equal(model.conv1.weight, before_step)


def test_fp16_checkpoint_into_fp32_model(tmp_path: Path) -> None:
    source = SmallCNN()
    half = {k: v.half() if v.is_floating_point() else v for k, v in source.state_dict().items()}
    path = tmp_path / "half.safetensors"
    save_file(half, str(path))
    model = SmallCNN()
    diff = ckptviz.compare(model, path)
    assert diff.status("conv1.weight") == "dtype"
    report = diff.plan().apply(model)
    assert model.conv1.weight.dtype == torch.float32
    assert torch.equal(model.conv1.weight, half["conv1.weight"].float())
    assert "cast float16 -> float32" in next(
        e.detail for e in report.entries if e.key == "conv1.weight"
    )


def test_batchnorm_buffers_load_and_reinit(old_cnn_path: Path) -> None:
    model = SmallCNN(16)
    model.bn1.running_mean.fill_(5.0)
    plan = ckptviz.compare(model, old_cnn_path).plan()
    plan.set("bn1.running_mean", "reinit")
    plan.set("bn1.running_var", "keep")
    model.bn1.running_var.fill_(7.0)
    plan.apply(model)
    assert torch.equal(model.bn1.running_mean, torch.zeros(16))  # reset_running_stats
    assert torch.equal(model.bn1.running_var, torch.full((16,), 7.0))
    state = torch.load(old_cnn_path, weights_only=True)
    assert torch.equal(model.bn1.weight, state["bn1.weight"])


def test_reinit_touches_only_the_chosen_tensor_of_a_module(tmp_path: Path) -> None:
    model = Classifier(10)
    trained = Classifier(10)
    plan = ckptviz.compare(model, trained.state_dict()).plan()
    plan.set("head.weight", "reinit")
    plan.apply(model)
    assert torch.equal(model.head.bias, trained.head.bias)  # loaded, not re-initialised
    assert not torch.equal(model.head.weight, trained.head.weight)
    bound = 1 / 32**0.5  # nn.Linear's own init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert model.head.weight.abs().max() <= bound


def test_tied_weights_are_written_once_and_stay_tied() -> None:
    source = TiedLM()
    model = TiedLM()
    report = ckptviz.compare(model, source.state_dict()).plan().apply(model)
    assert model.head.weight is model.embed.weight
    assert torch.equal(model.embed.weight, source.embed.weight)
    assert any("written once" in note for note in report.notes)
    diff = ckptviz.compare(model, source.state_dict())
    assert diff.row("head.weight").tied == ("embed.weight",)


def test_a_checkpoint_that_disagrees_with_itself_on_tied_tensors_is_flagged() -> None:
    state = {k: v.clone() for k, v in TiedLM().state_dict().items()}
    state["head.weight"] = state["head.weight"] + 1
    model = TiedLM()
    before = snapshot(model)
    with pytest.raises(ckptviz.PlanError, match="tied") as err:
        ckptviz.compare(model, state).plan().apply(model)
    assert set(err.value.rows) == {"embed.weight", "head.weight"}
    assert_bitwise_same(model, before)
    plan = ckptviz.compare(model, state).plan()
    plan.set("head.weight", "keep")
    report = plan.apply(model)
    assert torch.equal(model.head.weight, state["embed.weight"])
    keep = next(e for e in report.entries if e.key == "head.weight")
    assert "tied" in keep.detail


@pytest.mark.parametrize("fail_at", [0, 2, -1])
def test_failure_mid_apply_leaves_the_model_bitwise_unchanged(
    old_cnn_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: int
) -> None:
    model = SmallCNN(16)
    before = snapshot(model)
    params = dict(model.named_parameters())
    plan = ckptviz.compare(model, old_cnn_path).plan()
    n_writes = len(plan.keys_with("load"))
    target = fail_at % n_writes
    calls = {"n": 0}
    real_write = apply_module._write

    def failing_write(*args: object) -> None:
        if calls["n"] == target:
            raise OSError("disk went away")
        calls["n"] += 1
        real_write(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(apply_module, "_write", failing_write)
    with pytest.raises(ckptviz.ApplyError, match="disk went away") as err:
        plan.apply(model)
    assert "restored" in str(err.value)
    assert calls["n"] == target  # the earlier writes really happened, then were undone
    assert_bitwise_same(model, before)
    assert all(p is params[n] for n, p in model.named_parameters())


def test_undo_restores_bitwise_and_second_undo_is_a_noop(old_cnn_path: Path) -> None:
    model = SmallCNN(32)
    before = snapshot(model)
    plan = ckptviz.compare(model, old_cnn_path).plan()
    plan.set("conv1", "partial")
    plan.set("fc", "reinit")
    report = plan.apply(model)
    assert report.can_undo and report.snapshot_bytes > 0
    assert report.undo() > 0
    assert_bitwise_same(model, before)
    with pytest.warns(UserWarning, match="already undone"):
        assert report.undo() == 0
    no_snapshot = plan.apply(model, undo=False)
    assert not no_snapshot.can_undo and no_snapshot.snapshot_bytes == 0


def test_json_round_trip_reapplies_on_its_own(old_cnn_path: Path) -> None:
    model = SmallCNN(32)
    start = copy.deepcopy(model)
    plan = ckptviz.compare(model, old_cnn_path).plan()
    plan.set("conv1", "partial")
    plan.set("bn1.weight", "reinit")
    text = plan.to_json()
    again = ckptviz.Plan.from_json(text)
    assert again.actions == plan.actions
    assert json.loads(again.to_json()) == json.loads(text)
    plan.apply(model)
    other = copy.deepcopy(start)
    again.apply(other)
    for key, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key


def test_a_plan_applied_to_another_model_names_the_rows_and_changes_nothing(
    old_cnn_path: Path,
) -> None:
    plan = ckptviz.Plan.from_json(ckptviz.compare(SmallCNN(16), old_cnn_path).plan().to_json())
    other = SmallCNN(8)
    before = snapshot(other)
    with pytest.raises(ckptviz.PlanError, match="does not fit this model") as err:
        plan.apply(other)
    assert "conv1.weight" in err.value.rows
    assert "[8, 3, 3, 3]" in err.value.rows["conv1.weight"]
    assert_bitwise_same(other, before)


def test_a_changed_checkpoint_names_the_rows_that_no_longer_fit(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(SmallCNN(16).state_dict(), path)
    plan = ckptviz.Plan.from_json(ckptviz.compare(SmallCNN(16), path).plan().to_json())
    state = SmallCNN(16).state_dict()
    state["fc.weight"] = torch.zeros(3, 3)
    torch.save(state, path)
    model = SmallCNN(16)
    before = snapshot(model)
    with pytest.raises(ckptviz.PlanError, match="does not fit the checkpoint") as err:
        plan.apply(model)
    assert list(err.value.rows) == ["fc.weight"]
    assert_bitwise_same(model, before)


def test_malformed_plan_json_is_refused() -> None:
    with pytest.raises(ckptviz.PlanError, match="malformed"):
        ckptviz.Plan.from_json("{not json")
    with pytest.raises(ckptviz.PlanError, match="not a ckptviz plan"):
        ckptviz.Plan.from_json('{"format": "something else"}')
    data = json.loads(ckptviz.compare(SmallCNN(), SmallCNN().state_dict()).plan().to_json())
    data["rows"][0]["action"] = "teleport"
    with pytest.raises(ckptviz.PlanError, match="teleport") as err:
        ckptviz.Plan.from_json(json.dumps(data))
    assert data["rows"][0]["model_key"] in err.value.rows


def test_comparing_two_checkpoints_cannot_plan(tmp_path: Path) -> None:
    diff = ckptviz.compare(SmallCNN().state_dict(), SmallCNN(32).state_dict())
    assert not diff.against_model
    with pytest.raises(ckptviz.PlanError, match="nothing to apply to"):
        diff.plan()


def test_to_code_for_safetensors_nested_and_renamed_checkpoints(tmp_path: Path) -> None:
    source = SmallCNN(16)
    nested = tmp_path / "nested.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}}, nested)
    flat = tmp_path / "flat.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(flat))
    for path in (nested, flat):
        model = SmallCNN(16)
        start = copy.deepcopy(model)
        plan = ckptviz.compare(model, path).plan()
        plan.apply(model)
        namespace = {"model": start}
        exec(compile(plan.to_code(), "<plan>", "exec"), namespace)
        for key, value in model.state_dict().items():
            assert torch.equal(start.state_dict()[key], value), (path, key)
        assert torch.equal(start.conv1.weight, source.conv1.weight)


def test_after_undo_no_row_of_the_report_says_verified(tmp_path: Path) -> None:
    """A reader of an undone report must not see rows marked verified: the model no longer
    holds what was written."""
    model = nn.Linear(4, 3)
    source = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    report = ckptviz.compare(model, source).plan().apply(model)
    assert "✓ yes" in report._repr_html_()
    report.undo()
    html = report._repr_html_()
    text = str(report)
    assert "✓ yes" not in html and "↶ undone" in html
    table = text.split("\n\n", 1)[1]
    assert " yes " not in table and "undone" in table
