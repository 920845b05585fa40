"""The status and action vocabulary has one source (core/vocabulary.py): the core's tuples come
from it, every row's status and action is in it, and the widget sends it to the front end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import comm
import pytest
import torch
from conftest import SmallCNN
from widget_frontend import RecordingComm, table_rows

import ckptviz
from ckptviz import widget, widget_columns
from ckptviz.core.actions import SKIP, action_names, action_terms
from ckptviz.core.vocabulary import COLOUR_ROLES, STATUS_TERMS, Status

ACTION_TERMS = action_terms()


def test_every_status_and_action_has_words_a_symbol_and_a_known_colour() -> None:
    assert set(STATUS_TERMS) == set(Status)
    assert set(ACTION_TERMS) == {*action_names(), SKIP}
    for term in (*STATUS_TERMS.values(), *ACTION_TERMS.values()):
        assert term.label and term.symbol and term.colour in COLOUR_ROLES
    assert len({t.symbol for t in STATUS_TERMS.values()}) == len(Status)  # not by colour alone


def test_the_core_names_come_from_the_vocabulary() -> None:
    assert tuple(s.value for s in Status) == ckptviz.STATUSES
    assert tuple(a.name for a in ckptviz.registered_actions()) == action_names()
    assert SKIP not in action_names()
    assert Status.MATCH == "match" and str(Status.SHAPE) == "shape"
    assert json.dumps([Status.SHAPE]) == '["shape"]'


def test_every_row_says_a_status_and_an_action_of_the_vocabulary(
    old_cnn_path: Path, tmp_path: Path
) -> None:
    state = torch.load(old_cnn_path, weights_only=True)
    state["extra.weight"] = torch.zeros(2)
    state["bn1.num_batches_tracked"] = state["bn1.num_batches_tracked"].int()
    del state["bn1.running_mean"]
    torch.save(state, tmp_path / "mixed.pt")
    plan = ckptviz.compare(SmallCNN(32), tmp_path / "mixed.pt").plan()
    assert {r.status for r in plan.diff.rows} == set(Status)
    assert {action for _, action in plan} <= set(ACTION_TERMS)
    assert set(plan.counts) == set(ACTION_TERMS)


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, old_cnn_path: Path) -> dict[str, Any]:
    """The state the front end receives first, as JSON (with an extra column declared)."""
    monkeypatch.setattr(comm, "create_comm", RecordingComm)
    monkeypatch.chdir(tmp_path)
    extra = widget_columns.Column("numel", "values", lambda t: t.numel, "text", width="short")
    monkeypatch.setattr(widget_columns, "COLUMNS", (*widget_columns.COLUMNS, extra))
    loader = widget.Loader(SmallCNN(32), old_cnn_path)
    (state,) = [d["state"] for t, d in loader.comm.sent if t == "comm_open"]
    # as JSON, the rows' buffer as loader.js parses it
    return dict(json.loads(json.dumps(state, default=lambda buffer: json.loads(buffer))))


def test_the_widget_sends_the_vocabulary(opened: dict[str, Any]) -> None:
    vocabulary = opened["_vocabulary"]
    assert [s["name"] for s in vocabulary["statuses"]] == [s.value for s in Status]
    assert [a["name"] for a in vocabulary["actions"]] == [*action_names(), SKIP]
    for sent in vocabulary["statuses"]:
        term = STATUS_TERMS[Status(sent["name"])]
        assert (sent["label"], sent["symbol"], sent["colour"]) == (
            term.label,
            term.symbol,
            term.colour,
        )
    chosen = [a["name"] for a in vocabulary["actions"] if a["chosen"]]
    assert chosen == list(action_names())
    codes = {a["code"]: a["name"] for a in vocabulary["actions"]}
    assert len(codes) == len(ACTION_TERMS)  # the letters of the action string decode one way
    rows = opened["_rows"]
    assert {codes[c] for c in rows["actions"]} <= set(ACTION_TERMS)
    assert vocabulary["colours"] == list(COLOUR_ROLES)


def test_a_new_column_is_one_entry(opened: dict[str, Any]) -> None:
    """The extra column declared in the fixture travels in every row and in ``_columns``."""
    assert [c["key"] for c in opened["_columns"]] == ["key", "shape", "dtype", "bytes", "numel"]
    assert opened["_columns"][-1]["title"] == "values"
    keys = [c["key"] for c in opened["_columns"]]
    model = SmallCNN(32).state_dict()
    for row in table_rows(opened["_rows"], keys):
        assert row["model_numel"] == model[row["model_key"]].numel()
        assert row["checkpoint_numel"] is not None


def test_a_side_of_fields_is_read_at_once_and_sent_as_each_column_makes_it() -> None:
    from ckptviz.core.checkpoint import TensorInfo

    info = TensorInfo("blocks.0.w", (2, 3), "float16", 12)
    columns = widget_columns.COLUMNS
    each = [column.value(info) for column in columns]
    at_once = widget_columns.side_values(columns)(info)
    assert json.dumps(list(at_once)) == json.dumps(each) == '["blocks.0.w", [2, 3], "float16", 12]'
    extra = widget_columns.Column("numel", "values", lambda t: t.numel, "text", width="short")
    mixed = widget_columns.side_values((*columns, extra))(info)
    assert json.dumps(list(mixed)) == '["blocks.0.w", [2, 3], "float16", 12, 6]'
