"""An action's options through the Loader, as its front end drives them: the specs come from
Python with the vocabulary, ``set_action`` carries ``options``, and every row's chosen options
reach the front end (in the rows, as deltas, and whole to a late view)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import SmallCNN
from ipywidgets import comm
from widget_frontend import FrontEnd, RecordingComm

from ckptviz.core.actions import action_named
from ckptviz.widget import Loader


@pytest.fixture(autouse=True)
def recording_comms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(comm, "create_comm", RecordingComm)


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def plan_options(loader: Loader) -> dict[str, dict[str, Any]]:
    return {
        key: dict(loader.plan.chosen_options(key))
        for key in loader.plan.actions
        if loader.plan.chosen_options(key)
    }


@pytest.fixture
def grown(old_cnn_path: Path) -> Iterator[tuple[SmallCNN, Loader, FrontEnd]]:
    torch.manual_seed(3)
    model = SmallCNN(32)
    loader = Loader(model, old_cnn_path)
    yield model, loader, FrontEnd(loader)


def test_the_vocabulary_declares_each_actions_options() -> None:
    loader = Loader(SmallCNN(16), {k: v for k, v in SmallCNN(16).state_dict().items()})
    actions = {a["name"]: a for a in loader._vocabulary["actions"]}
    spec = action_named("partial").options["fill"]
    assert actions["partial"]["options"] == [
        {
            "name": "fill",
            "kind": "str",
            "default": "model",
            "choices": ["model", "zeros", "mean", "mean_noise"],
            "words": spec.words,
        }
    ]
    assert actions["load"]["options"] == [] and actions["skip"]["options"] == []


def test_an_option_set_from_the_front_end_is_applied_and_shown(
    grown: tuple[SmallCNN, Loader, FrontEnd], old_cnn_path: Path
) -> None:
    model, loader, ui = grown
    old = torch.load(old_cnn_path, weights_only=True)
    ui.send(do="set_action", pattern="conv1.weight", action="partial")
    assert ui.options == {}
    ui.send(do="set_action", pattern="conv1.weight", action="partial", options={"fill": "mean"})
    assert loader.error == ""
    assert ui.actions()["conv1.weight"] == "partial"
    assert ui.options_by_key() == {"conv1.weight": {"fill": "mean"}} == plan_options(loader)
    ui.send(do="apply", id=1)
    assert ui.state["_report"]["verified"] is True
    written = model.conv1.weight.detach()
    assert torch.equal(written[:16], old["conv1.weight"])
    assert torch.equal(written[16:], old["conv1.weight"].mean(dim=0).expand(16, 3, 3, 3))
    assert loader.report is not None
    details = {entry.key: entry.detail for entry in loader.report.entries}
    assert details["conv1.weight"].endswith("16 new rows with the mean of the copied rows")
    # back to the default: the front end hears the row has no options again
    ui.send(do="set_action", pattern="conv1.weight", action="partial", options={"fill": "model"})
    assert ui.options == {} and plan_options(loader) == {}


def test_a_refused_option_changes_nothing_and_says_why(
    grown: tuple[SmallCNN, Loader, FrontEnd],
) -> None:
    _, loader, ui = grown
    ui.send(do="set_action", pattern="fc.weight", action="partial")
    before = copy.deepcopy(ui.options)
    # fc.weight grows along its inputs only ([10, 1024] -> [10, 2048]): a mean fills it, but
    # a bias that keeps its shape has nothing to fill
    ui.send(do="set_action", pattern="fc.bias", action="partial", options={"fill": "zeros"})
    assert "nothing to fill" in loader.error
    ui.send(do="set_action", pattern="fc.weight", action="partial", options={"fill": "avg"})
    assert "'avg' is not one of" in loader.error
    assert ui.options == before and plan_options(loader) == {}


def test_options_changing_make_the_shown_code_stale(
    grown: tuple[SmallCNN, Loader, FrontEnd],
) -> None:
    _, _, ui = grown
    ui.send(do="set_action", pattern="conv1.weight", action="partial")
    ui.send(do="show_code")
    assert ui.state["code_stale"] is False
    ui.send(do="set_action", pattern="conv1.weight", action="partial", options={"fill": "zeros"})
    assert ui.state["code_stale"] is True
    ui.send(do="show_code")
    assert ui.state["code_stale"] is False and "'zeros'" in ui.state["_code"]


def test_a_late_view_and_a_script_edit_bring_the_options(
    grown: tuple[SmallCNN, Loader, FrontEnd],
) -> None:
    _, loader, ui = grown
    loader.set_action("conv1.weight", "partial", fill="mean_noise")
    assert ui.receive() is not None and ui.options_by_key() == plan_options(loader)
    late = FrontEnd(loader)
    late.seen = len(late.comm.sent)
    late.state = copy.deepcopy(ui.state)
    late.options = {}
    late.send(do="hello")
    assert late.options_by_key() == {"conv1.weight": {"fill": "mean_noise"}}
    # the plan edited directly, then refresh(): the whole set again
    loader.plan.set("conv1.weight", "partial", fill="zeros")
    loader.refresh()
    ui.receive()
    assert ui.options_by_key() == {"conv1.weight": {"fill": "zeros"}}
