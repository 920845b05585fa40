"""The Loader widget driven exactly as its front end drives it: comm messages in, synced state and
custom messages out, recorded on a stand-in comm. Every check on the model looks at its tensors."""

from __future__ import annotations

import copy
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import comm
import pytest
import torch
from conftest import Classifier, SmallCNN, assert_bitwise_same, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from widget_frontend import FrontEnd, RecordingComm, table_rows, wire_bytes

import ckptviz
from ckptviz import widget
from ckptviz.core.apply import bitwise_equal
from ckptviz.widget import ROW_FIELDS, STATIC_ROWS, Loader, action_codes
from ckptviz.widget_columns import COLUMNS


@pytest.fixture(autouse=True)
def recording_comms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(comm, "create_comm", RecordingComm)


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loaders keep plan files in the working directory they were made in: a test's own."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def grown(old_cnn_path: Path) -> Iterator[tuple[SmallCNN, Loader, FrontEnd]]:
    torch.manual_seed(3)
    model = SmallCNN(32)
    loader = Loader(model, old_cnn_path)
    yield model, loader, FrontEnd(loader)


def test_the_front_end_sees_every_row_with_its_status_and_default_action(
    grown: tuple[SmallCNN, Loader, FrontEnd], old_cnn_path: Path
) -> None:
    model, _, ui = grown
    old = torch.load(old_cnn_path, weights_only=True)
    rows = {r["model_key"]: r for r in ui.rows()}
    assert list(rows) == list(model.state_dict())
    for key, value in model.state_dict().items():
        row = rows[key]
        assert row["model_shape"] == list(value.shape)
        assert row["checkpoint_shape"] == list(old[key].shape)
        assert row["status"] == ("match" if value.shape == old[key].shape else "shape")
        assert row["model_bytes"] == value.numel() * value.element_size()
    model_shapes = {k: v.shape for k, v in model.state_dict().items()}
    expected = {k: "load" if v.shape == model_shapes[k] else "keep" for k, v in old.items()}
    assert ui.actions() == expected
    assert "shapes differ" in ui.refused("conv1.weight", "load")
    assert ui.refused("fc.bias", "load") == ""
    assert set(ui.state["_info"]["module_types"].items()) == {
        ("conv1", "Conv2d"),
        ("bn1", "BatchNorm2d"),
        ("fc", "Linear"),
    }


def test_ticks_apply_and_undo_through_front_end_messages(
    grown: tuple[SmallCNN, Loader, FrontEnd], old_cnn_path: Path
) -> None:
    model, loader, ui = grown
    before = snapshot(model)
    old = torch.load(old_cnn_path, weights_only=True)
    ui.send(do="set_action", pattern="conv1.weight", action="partial")
    ui.send(do="set_action", pattern="fc.bias", action="keep")
    ui.send(do="set_module", module="bn1", action="reinit")
    assert ui.actions()["conv1.weight"] == "partial"
    assert ui.actions() == loader.plan.actions
    assert loader.error == ""

    ui.send(do="apply", id=7)
    assert ui.done == [7]
    assert ui.state["_report"]["verified"] is True
    assert ui.state["_report"]["can_undo"] is True
    now = model.state_dict()
    assert torch.equal(now["conv1.weight"][:16], old["conv1.weight"])
    assert torch.equal(now["conv1.weight"][16:], before["conv1.weight"][16:])
    fresh = nn.BatchNorm2d(32)
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(now[f"bn1.{name}"], getattr(fresh, name)), name
    written = {"conv1.weight", *(k for k in now if k.startswith("bn1."))}
    for key in now.keys() - written:  # keep writes nothing: fc.bias was a load by default
        assert bitwise_equal(now[key], before[key]), key

    ui.send(do="undo", id=8)
    assert_bitwise_same(model, before)
    assert ui.state["_report"]["undone"] is True
    assert ui.state["_report"]["can_undo"] is False
    ui.send(do="undo")
    assert "nothing to undo" in loader.error
    assert_bitwise_same(model, before)


def test_a_refused_tick_shows_the_reason_and_changes_nothing(
    grown: tuple[SmallCNN, Loader, FrontEnd],
) -> None:
    _, loader, ui = grown
    before_actions = loader.plan.actions
    sent = ui.send(do="set_action", pattern="conv1.weight", action="load")
    assert "shapes differ" in loader.error and "partial" in loader.error
    assert ui.state["error"] == loader.error
    assert loader.plan.actions == before_actions
    assert [data.get("method") for _, data in sent] == ["update"]  # only the error text
    ui.send(do="set_action", pattern="conv1.weight", action="partial")
    assert loader.error == ""
    assert ui.state["error"] == ""


def test_a_module_group_sets_what_it_can_and_names_the_refused_rows(
    grown: tuple[SmallCNN, Loader, FrontEnd],
) -> None:
    _, loader, ui = grown
    ui.send(do="set_module", module="fc", action="load")
    # fc.bias already loads; fc.weight grew, so load is refused for it
    assert ui.actions()["fc.weight"] == "keep"
    assert "fc.weight" in loader.notice and "shapes differ" in loader.notice
    assert "1 of 2 rows" in loader.notice
    ui.send(do="set_module", module="fc", action="partial")
    assert ui.actions()["fc.weight"] == ui.actions()["fc.bias"] == "partial"
    assert loader.notice == ""


class Frozen(nn.Module):
    """A module with a bare parameter and no reset_parameters: reinit is refused for it."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))


class WithFrozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 4), Frozen())


def test_reinit_is_refused_where_no_initialiser_exists(tmp_path: Path) -> None:
    torch.save(WithFrozen().state_dict(), tmp_path / "f.pt")
    model = WithFrozen()
    loader = Loader(model, tmp_path / "f.pt")
    ui = FrontEnd(loader)
    assert "reset_parameters" in ui.refused("block.1.scale", "reinit")
    ui.send(do="set_module", module="block", action="reinit")
    assert ui.actions() == {
        "block.0.weight": "reinit",
        "block.0.bias": "reinit",
        "block.1.scale": "load",
    }
    assert "block.1.scale" in loader.notice


def test_bulk_by_status_filter_regex_all_and_none(
    grown: tuple[SmallCNN, Loader, FrontEnd], old_cnn_path: Path
) -> None:
    model, loader, ui = grown
    old = torch.load(old_cnn_path, weights_only=True)
    shape_keys = {k for k, v in model.state_dict().items() if v.shape != old[k].shape}

    ui.send(do="set_bulk", action="reinit", statuses=["shape"])
    assert {k for k, a in ui.actions().items() if a == "reinit"} == shape_keys

    ui.send(do="set_bulk", action="keep")  # none
    assert set(ui.actions().values()) == {"keep"}
    ui.send(do="set_bulk", action="load")  # all that fit; the rest say why
    assert {k for k, a in ui.actions().items() if a == "load"} == set(old) - shape_keys
    assert f"{len(shape_keys)} cannot take it" in loader.notice

    ui.send(do="set_bulk", action="partial", filter="BN1.RUNNING")  # substring, any case
    assert {k for k, a in ui.actions().items() if a == "partial"} == {
        "bn1.running_mean",
        "bn1.running_var",
    }
    ui.send(do="set_bulk", action="reinit", filter=r"^(conv1|fc)\.bias$", regex=True)
    assert {k for k, a in ui.actions().items() if a == "reinit"} == {"conv1.bias", "fc.bias"}
    assert ui.actions() == loader.plan.actions

    ui.send(do="set_bulk", action="keep", filter="(", regex=True)
    assert "not a valid regular expression" in loader.error
    ui.send(do="set_bulk", action="keep", filter="no such layer")
    assert "no model rows are shown" in loader.error

    ui.send(do="reset")
    assert loader.plan.actions == ckptviz.compare(model, old_cnn_path).plan().actions
    assert ui.actions() == loader.plan.actions


def test_hovering_a_row_explains_it(grown: tuple[SmallCNN, Loader, FrontEnd]) -> None:
    _, loader, ui = grown
    index = [r["model_key"] for r in ui.rows()].index("conv1.weight")
    ui.send(do="explain", index=index, gen=ui.state["_rows"]["gen"])
    assert ui.explanations[index] == loader.explain("conv1.weight")
    assert "16 filters" in ui.explanations[index]
    ui.send(do="explain", index=index, gen=-1)  # a stale table: no answer
    assert len(ui.explanations) == 1


def test_a_late_view_gets_the_current_actions(grown: tuple[SmallCNN, Loader, FrontEnd]) -> None:
    _, loader, ui = grown
    loader.set_action("conv1", "partial")
    late = FrontEnd(loader)
    late.seen = len(late.comm.sent)
    late.state = copy.deepcopy(ui.state)
    late.codes = late.state["_rows"]["actions"]  # what the synced state alone would say
    assert late.actions() != loader.plan.actions
    late.send(do="hello")
    assert late.actions() == loader.plan.actions


OPERATIONS = st.one_of(
    st.tuples(
        st.just("set_action"),
        st.sampled_from(["conv1.weight", "conv1.bias", "bn1.running_var", "fc.bias", "fc.*"]),
        st.sampled_from([a.name for a in ckptviz.registered_actions()]),
    ),
    st.tuples(
        st.just("set_module"),
        st.sampled_from(["conv1", "bn1", "fc"]),
        st.sampled_from([a.name for a in ckptviz.registered_actions()]),
    ),
    st.tuples(
        st.just("set_bulk"),
        st.sampled_from(["", "bn1", "weight"]),
        st.sampled_from([a.name for a in ckptviz.registered_actions()]),
    ),
    st.tuples(st.just("reset"), st.just(""), st.just("")),
)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=st.lists(OPERATIONS, max_size=10))
def test_the_front_end_copy_always_equals_the_plan(
    grown: tuple[SmallCNN, Loader, FrontEnd], steps: list[tuple[str, str, str]]
) -> None:
    _, loader, ui = grown
    for do, target, action in steps:
        if do == "set_action":
            ui.send(do=do, pattern=target, action=action)
        elif do == "set_module":
            ui.send(do=do, module=target, action=action)
        elif do == "set_bulk":
            ui.send(do=do, action=action, filter=target)
        else:
            ui.send(do=do)
        assert ui.actions() == loader.plan.actions
        counts = {a: [c["rows"], c["numel"]] for a, c in loader.plan.counts.items()}
        assert ui.state["_rows"]["counts"] == counts


class Wide(nn.Module):
    def __init__(self, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(layers))


@pytest.mark.parametrize("rows", [1_000, 10_000])
def test_one_tick_is_one_small_message(tmp_path: Path, rows: int) -> None:
    model = Wide(rows // 2)
    torch.save(model.state_dict(), tmp_path / "wide.pt")
    loader = Loader(model, tmp_path / "wide.pt")
    ui = FrontEnd(loader)
    opened = [data for msg_type, data in loader.comm.sent if msg_type == "comm_open"]
    assert len(opened) == 1 and len(ui.rows()) == rows
    initial = wire_bytes(opened[0])

    key = f"layers.{rows // 4}.weight"
    sent = ui.send(do="set_action", pattern=key, action="reinit")
    assert len(sent) == 1
    ((_, tick),) = sent
    assert tick["method"] == "custom" and tick["content"]["changes"] == [[rows // 2, "r"]]
    group = ui.send(do="set_module", module=f"layers.{rows // 4 + 1}", action="keep")
    assert len(group) == 1 and len(group[0][1]["content"]["changes"]) == 2
    assert ui.actions() == loader.plan.actions

    tick_bytes, group_bytes = wire_bytes(tick), wire_bytes(group[0][1])
    # small and the same at any table size: the counters plus the changed rows, never the table
    assert tick_bytes < 300 and group_bytes < 320
    assert initial > 100 * tick_bytes
    print(
        f"\n{rows} rows: initial state {initial:,} B, one tick {tick_bytes} B, "
        f"a 2-row group {group_bytes} B"
    )
    report = Path(__file__).resolve().parents[1] / "test-output" / "widget-sync.txt"
    report.parent.mkdir(exist_ok=True)
    with report.open("a") as out:
        out.write(f"{rows} rows: initial {initial} B, tick {tick_bytes} B, group {group_bytes} B\n")


def test_a_rename_is_suggested_accepted_and_applied(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained = Classifier(10)
    state = {k.replace("head.", "classifier."): v for k, v in trained.state_dict().items()}
    torch.save(state, tmp_path / "renamed.pt")
    model = Classifier(10)
    loader = Loader(model, tmp_path / "renamed.pt")
    ui = FrontEnd(loader)
    statuses = {r["model_key"] or r["checkpoint_key"]: r["status"] for r in ui.rows()}
    assert statuses["head.weight"] == "missing" and statuses["classifier.weight"] == "unexpected"
    suggested = ui.state["_suggestions"]
    assert suggested, "a rename should be suggested"
    generation = ui.state["_rows"]["gen"]

    ui.send(do="accept", which=0)
    assert ui.state["_rows"]["gen"] == generation + 1  # new rows, sent once
    by_key = {r["model_key"]: r for r in ui.rows() if r["model_key"]}
    assert by_key["head.weight"]["checkpoint_key"] == "classifier.weight"
    assert by_key["head.weight"]["status"] == "match"
    assert ui.actions()["head.weight"] == "load"
    loader.apply()
    assert torch.equal(model.head.weight, trained.head.weight)
    assert torch.equal(model.head.bias, trained.head.bias)

    ui.send(do="accept", which=99)
    assert "no suggestion #99" in loader.error


def test_pairing_by_hand(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained = Classifier(10)
    state = trained.state_dict()
    state["output.b"] = state.pop("head.bias")
    torch.save(state, tmp_path / "odd.pt")
    model = Classifier(10)
    before = snapshot(model)
    loader = Loader(model, tmp_path / "odd.pt")
    ui = FrontEnd(loader)
    ui.send(do="pair", model_key="head.bias", checkpoint_key="output.b")
    assert {r["model_key"]: r["checkpoint_key"] for r in ui.rows()}["head.bias"] == "output.b"
    assert ui.actions()["head.bias"] == "load"
    ui.send(do="apply")
    assert torch.equal(model.head.bias, trained.head.bias)
    ui.send(do="undo")
    assert_bitwise_same(model, before)
    ui.send(do="pair", model_key="head.bias", checkpoint_key="nope")
    assert "has no tensor 'nope'" in loader.error


def test_rows_sit_where_the_model_would_have_them(tmp_path: Path) -> None:
    """A DataParallel checkpoint: the prefix is not a rename; an extra key is placed under the
    module name it would have in the model; a key paired by hand is shown as renamed."""
    torch.manual_seed(0)
    state = {f"module.{k}": v for k, v in Classifier(10).state_dict().items()}
    state["module.extra.scale"] = state.pop("module.head.bias")
    torch.save(state, tmp_path / "dp.pt")
    loader = Loader(Classifier(10), tmp_path / "dp.pt")
    ui = FrontEnd(loader)
    rows = {r["model_key"] or r["checkpoint_key"]: r for r in ui.rows()}
    assert rows["body.0.weight"]["checkpoint_key"] == "module.body.0.weight"
    assert rows["body.0.weight"]["renamed"] == 0
    assert rows["module.extra.scale"]["status"] == "unexpected"
    assert rows["module.extra.scale"]["place"] == "extra.scale"
    assert rows["head.bias"]["place"] is None  # in the tree at its own key
    ui.send(do="pair", model_key="head.bias", checkpoint_key="module.extra.scale")
    paired = {r["model_key"]: r for r in ui.rows() if r["model_key"]}["head.bias"]
    assert paired["renamed"] == 1 and paired["checkpoint_key"] == "module.extra.scale"


def test_code_shows_what_apply_does(grown: tuple[SmallCNN, Loader, FrontEnd]) -> None:
    model, loader, ui = grown
    start = copy.deepcopy(model)
    ui.send(do="set_module", module="conv1", action="partial")
    ui.send(do="set_module", module="fc", action="reinit")
    ui.send(do="show_code")
    code = ui.state["_code"]
    assert code == loader.code == loader.plan.to_code()
    loader.apply()
    exec(compile(code, "<widget code>", "exec"), {"model": start})
    for key, value in model.state_dict().items():
        assert bitwise_equal(start.state_dict()[key], value), key
    ui.send(do="hide_code")
    assert ui.state["_code"] == ""


def test_a_failed_apply_shows_the_error_and_leaves_the_model_alone(
    grown: tuple[SmallCNN, Loader, FrontEnd], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, loader, ui = grown
    before = snapshot(model)
    ui.send(do="set_module", module="bn1", action="reinit")
    from ckptviz.core import apply as apply_module

    real_write = apply_module._write
    writes = []

    def failing_write(target: torch.Tensor, value: torch.Tensor, action: str) -> None:
        writes.append(action)
        if len(writes) == 3:
            raise RuntimeError("disk on fire")
        real_write(target, value, action)

    monkeypatch.setattr(apply_module, "_write", failing_write)
    ui.send(do="apply", id=1)
    assert ui.done == [1]
    assert "disk on fire" in loader.error
    assert ui.state["error"] == loader.error
    assert loader.report is None and ui.state["_report"] == {}
    assert_bitwise_same(model, before)


def test_a_model_changed_since_is_refused_with_the_key(
    grown: tuple[SmallCNN, Loader, FrontEnd],
) -> None:
    model, loader, _ = grown
    model.fc = nn.Linear(32 * 64, 3)
    before = snapshot(model)
    with pytest.raises(ckptviz.PlanError, match=r"fc\.weight"):
        loader.apply()
    assert "fc.weight" in loader.error
    assert_bitwise_same(model, before)


def test_a_plan_saved_from_the_widget_loads_into_a_new_one(
    grown: tuple[SmallCNN, Loader, FrontEnd], old_cnn_path: Path, tmp_path: Path
) -> None:
    _, loader, ui = grown
    ui.send(do="set_module", module="conv1", action="partial")
    ui.send(do="set_action", pattern="fc.bias", action="reinit")
    path = tmp_path / "plan.json"
    ui.send(do="save_plan", path=str(path), id=1)
    assert str(path) in loader.notice
    assert ckptviz.Plan.from_json(path).actions == loader.plan.actions

    other = Loader(SmallCNN(32), old_cnn_path)
    other_ui = FrontEnd(other)
    other_ui.send(do="load_plan", path=str(path))
    assert other.error == ""
    assert other_ui.actions() == loader.plan.actions

    # a plan for another model does not fit: nothing changes, the error names the rows
    misfit = tmp_path / "misfit.json"
    Loader(Classifier(10), path_of_state(tmp_path, Classifier(10))).save_plan(misfit)
    actions = other.plan.actions
    other_ui.send(do="load_plan", path=str(misfit))
    assert "does not fit" in other.error and "body.0.weight" in other.error
    assert other.plan.actions == actions == other_ui.actions()
    other_ui.send(do="load_plan", path=str(tmp_path / "absent.json"))
    assert "absent.json" in other.error


def path_of_state(folder: Path, model: nn.Module) -> Path:
    path = folder / f"{type(model).__name__}.pt"
    torch.save(model.state_dict(), path)
    return path


def test_script_calls_raise_and_show_the_same_error(
    grown: tuple[SmallCNN, Loader, FrontEnd],
) -> None:
    _, loader, _ = grown
    with pytest.raises(ckptviz.PlanError, match="unknown action"):
        loader.set_action("fc", "teleport")
    assert "unknown action" in loader.error
    with pytest.raises(TypeError, match=r"nn\.Module"):
        Loader("not a model", "x.pt")  # type: ignore[arg-type]


def test_an_unknown_request_is_reported(grown: tuple[SmallCNN, Loader, FrontEnd]) -> None:
    _, loader, ui = grown
    ui.send(do="format_disk")
    assert "unknown request" in loader.error


# -- where widgets do not render --------------------------------------------------------------


def test_the_static_view_shows_the_plan_table_and_summary(
    grown: tuple[SmallCNN, Loader, FrontEnd],
) -> None:
    model, loader, _ = grown
    loader.set_action("conv1", "partial")
    data, _ = loader._repr_mimebundle_()
    html = data["text/html"]
    assert "application/vnd.jupyter.widget-view+json" in data
    for key in model.state_dict():
        assert key in html and key in data["text/plain"]
    assert "✗ shape" in html and "partial" in html and "<table" in html
    assert loader.diff.summary().splitlines()[0] in html
    assert not data["text/plain"].startswith("Loader(")
    assert "partial" in data["text/plain"]
    loader.apply()
    assert "verified" in loader._repr_mimebundle_()[0]["text/html"]


def test_the_static_view_of_a_big_plan_shows_the_rows_that_differ_first(tmp_path: Path) -> None:
    model = Wide(200)
    state = model.state_dict()
    state["layers.150.weight"] = torch.zeros(3, 2)
    torch.save(state, tmp_path / "w.pt")
    loader = Loader(model, tmp_path / "w.pt")
    html = loader._repr_mimebundle_()[0]["text/html"]
    assert f"showing {STATIC_ROWS} of 400 rows" in html
    assert "layers.150.weight" in html  # the mismatch is shown although it is far down
    assert html.count("<tr") == STATIC_ROWS + 1  # the header and the rows shown


@pytest.mark.parametrize("with_widget_state", [False, True], ids=["no-state", "widget-state"])
def test_an_executed_notebook_exported_to_html_shows_the_table(
    tmp_path: Path, with_widget_state: bool
) -> None:
    """Without widget state (JupyterLab's default save) and with it (what nbclient and "Save
    Widget State" write; a front end then renders the widget view, which is empty without the
    live model): the static table is its own output, so every reader sees it."""
    import nbformat
    from nbclient import NotebookClient
    from nbconvert import HTMLExporter

    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_code_cell(
            "import torch, ckptviz\n"
            "from torch import nn\n"
            "model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32))\n"
            "old = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16))\n"
            "torch.save(old.state_dict(), 'old.pth')\n"
            "ckptviz.Loader(model, 'old.pth')"
        )
    ]
    NotebookClient(
        notebook,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
        store_widget_state=with_widget_state,
    ).execute()
    static, live = notebook.cells[0].outputs
    assert "application/vnd.jupyter.widget-view+json" not in static["data"]
    assert "ckptviz-loader-static" in static["data"]["text/html"]
    assert "application/vnd.jupyter.widget-view+json" in live["data"]
    assert ("widgets" in notebook.metadata) is with_widget_state
    body, _ = HTMLExporter().from_notebook_node(notebook)
    assert "ckptviz.Loader" in body
    assert re.search(r"0\.weight.*✗ shape", body, re.S)
    assert "✓ match" in body
    assert "Loader(" not in body


def test_import_ckptviz_does_not_load_the_widget_stack() -> None:
    import subprocess

    code = (
        "import sys, ckptviz; "
        "heavy = [m for m in ('anywidget', 'ipywidgets', 'pandas', 'matplotlib') "
        "if m in sys.modules]; "
        "print(heavy); assert 'Loader' in ckptviz.__all__; "
        "ckptviz.Loader; print('anywidget' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "True"


def test_the_row_fields_are_what_the_front_end_reads() -> None:
    """The front end reads each row field by name and the state's keys that decode them."""
    script = (Path(ckptviz.__file__).parent / "static" / "loader.js").read_text()
    for field in ROW_FIELDS:
        assert f'get("{field}")' in script, field
    for key in ("refusal_sets", "same_as_model", "reasons", "actions_order", "fields"):
        assert f"state.{key}" in script, key


def test_a_side_is_sent_once_when_both_sides_agree(old_cnn_path: Path) -> None:
    """A key loaded as it is sends its checkpoint side as one number; every other row sends
    both sides in full, and the decoded table holds every column of every side."""
    model = SmallCNN(32)
    loader = Loader(model, old_cnn_path)
    state = loader._rows
    sent = json.loads(state["data"])
    checkpoint_at = state["fields"].index("checkpoint")
    rows = table_rows(state)
    for row, values, decoded in zip(loader.diff.rows, sent, rows, strict=True):
        same = row.model is not None and row.checkpoint is not None
        same = same and (row.model.key, row.model.shape, row.model.dtype) == (
            row.checkpoint.key,
            row.checkpoint.shape,
            row.checkpoint.dtype,
        )
        assert (values[checkpoint_at] == state["same_as_model"]) == same, row.key
        for side, info in (("model", row.model), ("checkpoint", row.checkpoint)):
            for column in COLUMNS:
                expected = None if info is None else column.value(info)
                assert decoded[f"{side}_{column.key}"] == (
                    list(expected) if isinstance(expected, tuple) else expected
                )
    assert any(v[checkpoint_at] == state["same_as_model"] for v in sent)
    assert any(isinstance(v[checkpoint_at], list) for v in sent)


# -- plan files stay in one folder ------------------------------------------------------------


@pytest.fixture
def folders(tmp_path: Path, old_cnn_path: Path) -> tuple[Path, Path, Loader, FrontEnd]:
    """A notebook folder (the working directory when the Loader is made) and one beside it."""
    inside, outside = tmp_path / "notebook", tmp_path / "elsewhere"
    inside.mkdir()
    outside.mkdir()
    os.chdir(inside)
    loader = Loader(SmallCNN(32), old_cnn_path)
    os.chdir(tmp_path)  # the kernel's directory may change later: the plan folder does not
    return inside, outside, loader, FrontEnd(loader)


def files_in(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def test_plan_files_go_to_the_folder_the_loader_was_made_in(
    folders: tuple[Path, Path, Loader, FrontEnd],
) -> None:
    inside, _, loader, ui = folders
    assert loader.plan_dir == inside.resolve()
    ui.send(do="set_module", module="conv1", action="partial")
    ui.send(do="save_plan", path="mine.plan.json", id=1)
    assert loader.error == "" and ui.done == [1]
    assert ckptviz.Plan.from_json(inside / "mine.plan.json").actions == loader.plan.actions
    assert str(inside / "mine.plan.json") in loader.notice
    assert not (inside.parent / "mine.plan.json").exists()
    # an absolute path inside the folder is the same file
    ui.send(do="reset")
    ui.send(do="load_plan", path=str(inside / "mine.plan.json"))
    assert loader.error == "" and ui.actions()["conv1.weight"] == "partial"
    assert ui.state["_info"]["plan_dir"] == str(inside.resolve())


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("../escaped.json", "contains '..'"),
        ("sub/../../escaped.json", "contains '..'"),
        ("OUTSIDE/escaped.json", "is outside"),
        ("~/escaped.json", "starts with '~'"),
        ("", "name the plan file"),
        (".", "the plan folder itself"),
    ],
)
def test_a_plan_file_outside_the_folder_is_refused(
    folders: tuple[Path, Path, Loader, FrontEnd], name: str, words: str
) -> None:
    inside, outside, loader, ui = folders
    name = name.replace("OUTSIDE", str(outside))
    (outside / "escaped.json").write_text(loader.plan.to_json())
    before = files_in(inside.parent)
    actions = loader.plan.actions
    ui.send(do="save_plan", path=name, id=1)
    assert words in loader.error and ui.state["error"] == loader.error
    assert f"inside {str(inside.resolve())!r}" in loader.error  # where plan files may go
    ui.send(do="set_module", module="fc", action="reinit")
    ui.send(do="load_plan", path=name, id=2)
    assert words in loader.error
    assert ui.done == [1, 2]
    assert files_in(inside.parent) == before
    assert loader.plan.actions == {**actions, "fc.weight": "reinit", "fc.bias": "reinit"}
    with pytest.raises(ckptviz.PlanError, match=re.escape(words)):
        loader.save_plan(name, overwrite=True)


def test_a_symbolic_link_out_of_the_folder_is_refused(
    folders: tuple[Path, Path, Loader, FrontEnd],
) -> None:
    inside, outside, loader, ui = folders
    loader.save_plan("real.json")
    (outside / "target.json").write_text((inside / "real.json").read_text())
    (inside / "link.json").symlink_to(outside / "target.json")
    (inside / "linked-dir").symlink_to(outside, target_is_directory=True)
    (inside / "alias.json").symlink_to(inside / "real.json")
    before = files_in(outside)
    for name in ("link.json", "linked-dir/new.json", "linked-dir/target.json"):
        ui.send(do="save_plan", path=name, overwrite=True)
        assert "is outside" in loader.error and "symbolic link" in loader.error, name
        ui.send(do="load_plan", path=name)
        assert "is outside" in loader.error and "symbolic link" in loader.error, name
    assert files_in(outside) == before
    ui.send(do="load_plan", path="alias.json")  # a link that stays inside is followed
    assert loader.error == ""


def test_saving_over_a_file_asks_first(folders: tuple[Path, Path, Loader, FrontEnd]) -> None:
    inside, _, loader, ui = folders
    ui.send(do="save_plan", path="p.json")
    first = (inside / "p.json").read_bytes()
    ui.send(do="set_module", module="bn1", action="reinit")
    sent = ui.send(do="save_plan", path="p.json", id=3)
    assert "exists already" in loader.error and "overwrite=True" in loader.error
    assert (inside / "p.json").read_bytes() == first  # nothing replaced silently
    asks = [d["content"] for _, d in sent if d.get("method") == "custom"]
    assert {"type": "confirm_overwrite", "path": "p.json"} in asks
    assert ui.done == [3]
    with pytest.raises(widget.PlanFileExistsError):
        loader.save_plan("p.json")
    ui.send(do="save_plan", path="p.json", overwrite="yes")  # only a real True replaces
    assert "overwrite must be True or False" in loader.error
    assert (inside / "p.json").read_bytes() == first
    # what the "Replace it" button sends
    ui.send(do="save_plan", path="p.json", overwrite=True)
    assert loader.error == ""
    assert ckptviz.Plan.from_json(inside / "p.json").actions == loader.plan.actions


def test_only_a_regular_plan_file_is_read(folders: tuple[Path, Path, Loader, FrontEnd]) -> None:
    inside, _, loader, ui = folders
    os.mkfifo(inside / "pipe.json")  # reading a FIFO would hang the kernel
    ui.send(do="load_plan", path="pipe.json")
    assert "not a regular file" in loader.error
    ui.send(do="save_plan", path="pipe.json", overwrite=True)
    assert "not a regular file" in loader.error
    (inside / "folder.json").mkdir()
    ui.send(do="load_plan", path="folder.json")
    assert "not a regular file" in loader.error
    (inside / "broken.json").write_text('{"format": ')
    ui.send(do="load_plan", path="broken.json")
    assert "malformed" in loader.error and "broken.json" in loader.error
    ui.send(do="load_plan", path="absent.json")
    assert "no such plan file" in loader.error
    ui.send(do="save_plan", path=7)
    assert "name the plan file" in loader.error


def test_plan_dir_chooses_another_folder(tmp_path: Path, old_cnn_path: Path) -> None:
    plans = tmp_path / "plans"
    plans.mkdir()
    loader = Loader(SmallCNN(32), old_cnn_path, plan_dir=plans)
    written = loader.save_plan("a.json")
    assert written == (plans / "a.json").resolve() and written.is_file()
    with pytest.raises(ckptviz.PlanError, match="is outside"):
        loader.save_plan(tmp_path / "b.json")
    with pytest.raises(ckptviz.PlanError, match="not a folder"):
        Loader(SmallCNN(32), old_cnn_path, plan_dir=tmp_path / "absent")


# -- renames at scale, history, applied rows, stale code, the opening view ---------------------


class Renamed(nn.Module):
    """``count`` tiny blocks under ``container``, and a head kept under its own name."""

    def __init__(self, container: str, count: int) -> None:
        super().__init__()
        self.add_module(container, nn.ModuleList(nn.Linear(1, 1) for _ in range(count)))
        self.head = nn.Linear(1, 2)


def test_a_rule_claims_every_key_it_pairs_not_the_suggestions_shown(tmp_path: Path) -> None:
    """1,002 renamed blocks are 2,004 keys; suggestions stop at 200, the rule does not."""
    torch.save(Renamed("blocks", 1002).state_dict(), tmp_path / "old.pt")
    loader = Loader(Renamed("layers", 1002), tmp_path / "old.pt")
    ui = FrontEnd(loader)
    (rule, *pairs) = ui.state["_suggestions"]
    assert rule["kind"] == "rule" and rule["pairs"] == 2004
    assert rule["readable"] == "blocks.* → layers.*"
    old, new = rule["examples"][0]
    assert re.sub("^blocks", "layers", old) == new
    assert pairs == []  # every suggested pair is covered by the rule: listed under it, not again
    missing = {r["model_key"] for r in ui.rows() if r["status"] == "missing"}
    assert len(missing) == 2004

    ui.send(do="accept", which=rule["index"])
    fed = {r["model_key"] for r in ui.rows() if r["model_key"] in missing and r["checkpoint_key"]}
    assert len(fed) == rule["pairs"]
    assert ui.state["_suggestions"] == []


def test_accept_all_takes_every_rule_and_every_pair(tmp_path: Path) -> None:
    old = Renamed("blocks", 3)
    state = old.state_dict()
    state["classifier.weight"] = state.pop("head.weight")  # one lone rename: a pair, no rule
    torch.save(state, tmp_path / "old.pt")
    loader = Loader(Renamed("layers", 3), tmp_path / "old.pt")
    ui = FrontEnd(loader)
    kinds = [s["kind"] for s in ui.state["_suggestions"]]
    assert kinds == ["rule", "pair"]
    lone = loader.suggestions[ui.state["_suggestions"][1]["index"]]  # what accept(i) takes
    assert (lone.checkpoint_key, lone.model_key) == ("classifier.weight", "head.weight")
    fed = loader.accept_all()
    assert fed == 7
    assert loader.diff.counts["missing"] == loader.diff.counts["unexpected"] == 0
    ui.receive()
    assert ui.state["_suggestions"] == []
    ui.send(do="accept_all")
    assert "no rename suggestions" in loader.error


def test_history_marks_the_latest_undoable_apply_and_the_applied_rows(
    grown: tuple[SmallCNN, Loader, FrontEnd],
) -> None:
    _, loader, ui = grown
    keys = [r["model_key"] for r in ui.rows()]
    assert loader.history == [] and loader.applied_codes() == "." * len(keys)
    ui.send(do="apply", id=1)
    ui.send(do="set_action", pattern="conv1.weight", action="partial")
    ui.send(do="apply", id=2)
    first, second = loader.history
    assert (first.kind, first.undoable, second.kind, second.undoable) == (
        "apply",
        False,
        "apply",
        True,
    )
    applied = ui.state["_report"]["applied"]
    assert applied[keys.index("conv1.weight")] == action_codes()["partial"]
    assert applied[keys.index("fc.bias")] == action_codes()["load"]
    assert applied[keys.index("fc.weight")] == "."  # keep writes nothing

    ui.send(do="undo", id=3)
    *_, undo = loader.history
    assert undo.kind == "undo" and "#2" in undo.summary
    assert [e.undoable for e in loader.history] == [True, False, False]
    applied = ui.state["_report"]["applied"]
    assert applied[keys.index("conv1.weight")] == "."  # the partial apply is undone
    assert applied[keys.index("fc.bias")] == action_codes()["load"]  # the first stays in effect
    assert [h["undoable"] for h in ui.state["_report"]["history"]] == [True, False, False]
    ui.send(do="undo", id=4)
    assert ui.state["_report"]["applied"] == "." * len(keys)
    assert ui.state["_report"]["can_undo"] is False


def test_the_code_is_stale_only_while_the_plan_differs_from_it(
    grown: tuple[SmallCNN, Loader, FrontEnd],
) -> None:
    _, _, ui = grown
    assert ui.state["code_stale"] is False
    ui.send(do="show_code")
    ui.send(do="set_action", pattern="fc.bias", action="keep")
    assert ui.state["code_stale"] is True
    ui.send(do="set_action", pattern="fc.bias", action="load")  # back to what the code does
    assert ui.state["code_stale"] is False
    ui.send(do="apply", id=1)  # applying changes no action
    assert ui.state["code_stale"] is False
    ui.send(do="set_module", module="fc", action="keep")
    ui.send(do="show_code")
    assert ui.state["code_stale"] is False
    ui.send(do="hide_code")
    ui.send(do="reset")
    assert ui.state["code_stale"] is False  # no code shown: nothing is stale


def test_a_big_table_opens_on_the_groups_that_hold_differences(tmp_path: Path) -> None:
    model = Wide(200)
    state = model.state_dict()
    state["layers.150.weight"] = torch.zeros(3, 2)
    torch.save(state, tmp_path / "w.pt")
    big = FrontEnd(Loader(model, tmp_path / "w.pt"))
    assert big.state["_rows"]["expanded"] == ["layers", "layers.150"]
    torch.save(Wide(3).state_dict(), tmp_path / "s.pt")
    small = FrontEnd(Loader(Wide(3), tmp_path / "s.pt"))
    assert small.state["_rows"]["expanded"] is None  # a small table opens fully


def test_incremental_ticks_keep_the_counters_equal_to_the_plan(tmp_path: Path) -> None:
    model = Wide(40)
    state = model.state_dict()
    state["layers.3.weight"] = torch.zeros(3, 2)
    torch.save(state, tmp_path / "w.pt")
    loader = Loader(model, tmp_path / "w.pt")
    ui = FrontEnd(loader)
    ui.send(do="set_action", pattern="layers.3.weight", action="partial")
    ui.send(do="set_module", module="layers.7", action="reinit")
    ui.send(do="set_bulk", action="keep", filter="layers.1")
    ui.send(do="set_action", pattern="layers.9.*", action="keep")
    loader.plan.set("layers.2.bias", "keep")  # edited directly: refresh compares every row
    loader.refresh()
    ui.receive()
    assert ui.actions() == loader.plan.actions
    counts = {a: [c["rows"], c["numel"]] for a, c in loader.plan.counts.items()}
    assert ui.state["_rows"]["counts"] == counts


def test_a_big_tie_group_does_not_make_the_table_grow_with_its_square() -> None:
    """A file can tie thousands of keys to one storage: each row names a few of them and how
    many more, not all of them (2,000 x 2,000 names would be millions of strings)."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            shared = nn.Parameter(torch.zeros(2))
            for i in range(2_000):
                self.register_parameter(f"p{i}", shared)

    model = Tied()
    state = {f"p{i}": model.p0.detach() for i in range(2_000)}  # one storage, 2,000 keys
    front = FrontEnd(Loader(model, state))
    rows = front.rows()
    tied = [row["tied"] for row in rows]
    assert len(rows) == 2_000
    assert max(len(t) for t in tied) == widget.TIED_SHOWN + 1
    assert tied[0][-1] == f"… and {1_999 - widget.TIED_SHOWN:,} more"
    assert all(name.startswith("p") for name in tied[0][:-1])


def test_the_vocabulary_says_which_actions_have_a_button_on_every_row(
    grown: tuple[SmallCNN, Loader, FrontEnd],
) -> None:
    """The front end learns from the actions registry which buttons every row shows (the
    general actions, refused ones struck through) and which only where they fit."""
    _, loader, _ = grown
    sent = {a["name"]: a for a in loader._vocabulary["actions"]}
    shown = {name for name, a in sent.items() if a["always_shown"]}
    assert shown == {"load", "keep", "reinit", "partial"}
    assert not any(sent[name]["always_shown"] for name in ("resample", "adapt_channels", "merge"))
    assert sent["skip"]["always_shown"] is False and sent["skip"]["chosen"] is False
    # the flag is the actions' own declaration, not a list kept in the widget
    for definition in ckptviz.core.actions.registered_actions():
        assert sent[definition.name]["always_shown"] is definition.always_shown
