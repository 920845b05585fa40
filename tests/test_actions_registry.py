"""The actions registry: a new action added through the public API alone is driven end to end
(plan, apply, verify, undo, JSON, to_code, the widget), incomplete definitions are refused when
registered, and options are checked where they are set and where a plan is read."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import ckptviz
from ckptviz.core.actions import registered
from ckptviz.core.apply import bitwise_equal
from ckptviz.core.explain import explain_row


def negated(tensor: torch.Tensor, scale: float) -> torch.Tensor:
    return tensor * -scale


def _refuse(ctx: ckptviz.RowContext) -> str | None:
    m, c = ctx.row.model, ctx.row.checkpoint
    if c is None or m is None or m.shape != c.shape:
        return "needs a checkpoint tensor of the model's shape"
    return None


def _value(ctx: ckptviz.ValueContext) -> torch.Tensor:
    return negated(ctx.checkpoint_tensor, float(ctx.options["scale"]))  # type: ignore[arg-type]


def _code(ctx: ckptviz.CodeContext) -> ckptviz.CodePart:
    pairs = {row.key: (row.checkpoint_key, options["scale"]) for row, options in ctx.rows}
    return ckptviz.CodePart(
        data=[f"negate = {pairs!r}"],
        body=[
            "for name, (ckpt_name, scale) in negate.items():",
            "    params[name].copy_(negated(state[ckpt_name], scale))",
        ],
        functions=[negated],
    )


def negate_action(**changes: object) -> ckptviz.ActionDef:
    fields: dict[str, object] = dict(
        name="negate",
        label="minus the checkpoint's value",
        symbol="−",
        colour="bad",
        explain="negate writes minus the checkpoint's tensor, times scale: a test action.",
        refuse=_refuse,
        value=_value,
        reads_checkpoint=True,
        verified_detail=lambda ctx: f"minus {ctx.options['scale']} times the checkpoint",
        code=_code,
        options={"scale": ckptviz.OptionSpec(float, 1.0, "how much to scale the negated value")},
    )
    fields.update(changes)
    return ckptviz.ActionDef(**fields)  # type: ignore[arg-type]


@pytest.fixture
def negate() -> Iterator[ckptviz.ActionDef]:
    action = ckptviz.register_action(negate_action())
    try:
        yield action
    finally:
        ckptviz.unregister_action("negate")


class Two(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 3)
        self.b = torch.nn.Linear(3, 2)


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    state = {k: v.detach().clone() for k, v in Two().state_dict().items()}
    path = tmp_path / "two.pt"
    torch.save(state, path)
    return path, state


def test_an_action_registered_through_the_public_api_runs_end_to_end(
    negate: ckptviz.ActionDef, saved: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    path, state = saved
    assert negate in ckptviz.registered_actions()
    model = Two()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    plan = ckptviz.compare(model, path).plan()
    assert plan.set("a.weight", "negate", scale=2) == ["a.weight"]
    assert plan.options("a.weight") == {"scale": 2.0}
    assert plan.options("a.bias") == {}

    text = plan.to_json()
    row = next(r for r in json.loads(text)["rows"] if r["model_key"] == "a.weight")
    assert row["action"] == "negate" and row["options"] == {"scale": 2.0}
    again = ckptviz.Plan.from_json(text)
    assert again.action("a.weight") == "negate" and again.options("a.weight") == {"scale": 2.0}

    code = plan.to_code()
    assert "def negated(" in code  # the very function apply runs
    by_code = Two()
    by_code.load_state_dict(before)
    exec(code, {"model": by_code})

    report = plan.apply(model)
    assert report.verified
    entry = next(e for e in report.entries if e.key == "a.weight")
    assert (entry.action, entry.checkpoint_key) == ("negate", "a.weight")
    assert entry.detail == "minus 2.0 times the checkpoint"
    assert bitwise_equal(model.a.weight.detach(), state["a.weight"] * -2.0)
    for key, value in model.state_dict().items():
        assert bitwise_equal(value, by_code.state_dict()[key]), key
    assert "negate" in report.summary()
    report.undo()
    for key, value in model.state_dict().items():
        assert bitwise_equal(value, before[key]), key


def test_the_widget_sends_every_registered_action_and_sets_one_with_options(
    negate: ckptviz.ActionDef, saved: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    path, _ = saved
    loader = ckptviz.Loader(Two(), path)
    sent = [a["name"] for a in loader._vocabulary["actions"] if a["chosen"]]
    assert sent == [a.name for a in ckptviz.registered_actions()]
    assert sent[-1] == "negate"
    codes = [a["code"] for a in loader._vocabulary["actions"]]
    assert len(set(codes)) == len(codes)
    assert loader.set_action("b.weight", "negate", scale=0.5) == ["b.weight"]
    assert loader.plan.options("b.weight") == {"scale": 0.5}
    assert loader.plan.action("b.weight") == "negate"


def test_a_definition_without_a_step_is_refused_when_made() -> None:
    with pytest.raises(TypeError, match="value must be a function"):
        negate_action(value=None)
    with pytest.raises(TypeError, match="code must be a function"):
        negate_action(code=None)
    with pytest.raises(TypeError, match="colour"):
        negate_action(colour="purple")
    with pytest.raises(TypeError, match=r"taken by plan\.set"):
        negate_action(options={"pattern": ckptviz.OptionSpec(str, "x", "clashes")})


def test_a_name_already_registered_is_refused(negate: ckptviz.ActionDef) -> None:
    with pytest.raises(ValueError, match="registered already"):
        ckptviz.register_action(negate_action())
    with pytest.raises(ValueError, match="built-in"):
        ckptviz.unregister_action("load")


def test_options_are_checked_where_they_are_set_and_where_a_plan_is_read(
    negate: ckptviz.ActionDef, saved: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    path, _ = saved
    plan = ckptviz.compare(Two(), path).plan()
    with pytest.raises(ckptviz.PlanError, match="unknown option 'scael'"):
        plan.set("a.weight", "negate", scael=2.0)
    with pytest.raises(ckptviz.PlanError, match="expected a float, got str"):
        plan.set("a.weight", "negate", scale="2")
    with pytest.raises(ckptviz.PlanError, match=r"unknown option 'fill'.*none"):
        plan.set("a.weight", "load", fill="mean")
    assert plan.action("a.weight") == "load"  # nothing changed

    plan.set("a.weight", "negate", scale=3.0)
    data = json.loads(plan.to_json())
    for row in data["rows"]:
        if row["model_key"] == "a.weight":
            row["options"] = {"scale": True}
    with pytest.raises(ckptviz.PlanError, match=r"a\.weight: negate: option 'scale'"):
        ckptviz.Plan.from_json(json.dumps(data))
    # the default is not written, and a plan without "options" loads (as saved before options)
    plan.set("a.weight", "negate", scale=1.0)
    data = json.loads(plan.to_json())
    assert all("options" not in row for row in data["rows"])
    assert ckptviz.Plan.from_json(json.dumps(data)).options("a.weight") == {"scale": 1.0}


def test_plan_editing_returns_the_model_keys_whose_pairing_changed(tmp_path: Path) -> None:
    state = {k.replace("b.", "old_b."): v for k, v in Two().state_dict().items()}
    plan = ckptviz.compare(Two(), state).plan()
    diff_before = plan.diff
    changed = plan.rename(r"^old_b\.", "b.")
    assert changed == ["b.weight", "b.bias"]
    assert plan.diff is not diff_before and diff_before.status("b.weight") == "missing"
    assert plan.pair("b.bias", "old_b.bias") == []  # already fed from it


def test_an_actions_advice_reaches_the_explanation_of_the_rows_it_speaks_about(
    saved: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    path, state = saved
    state["b.weight"] = torch.zeros(5, 3)  # b.weight becomes a shape row
    torch.save(state, path)

    def advise(ctx: ckptviz.RowContext) -> str | None:
        return f"negate fits {ctx.row.key}." if ctx.row.key.startswith("b.") else None

    diff = ckptviz.compare(Two(), path)
    assert "negate fits" not in explain_row(diff, diff.row("b.weight"))
    with registered(negate_action(advise=advise)):
        said = explain_row(diff, diff.row("b.weight"))
        assert said.endswith(" negate fits b.weight.")
    with pytest.raises(TypeError, match="advise must be a function"):
        negate_action(advise="resample it")


def test_a_refusal_that_reads_the_model_sees_the_whole_model_in_the_widget(
    saved: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    path, _ = saved
    asked: list[int] = []

    def refuse(ctx: ckptviz.RowContext) -> str | None:
        assert ctx.model is not None
        asked.append(sum(1 for _ in ctx.model.named_modules()))  # more than get_submodule
        return "only for b" if not ctx.row.key.startswith("b.") else None

    with registered(negate_action(refuse=refuse, refusal_needs_model=True)):
        loader = ckptviz.Loader(Two(), path)
        loader.set_action("b.weight", "negate")
        with pytest.raises(ckptviz.PlanError, match="only for b"):
            loader.set_action("a.weight", "negate")
    assert asked and set(asked) == {3}
