"""The Loader's front end as the tests stand it in: a comm that records what the kernel would
send, and ``FrontEnd``, which keeps of it what loader.js keeps and reads the table as
``loadRows`` reads it (``table_rows``)."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from typing import Any

from comm.base_comm import BaseComm

from ckptviz.widget import Loader, action_codes

CODE_ACTIONS = {code: action for action, code in action_codes().items()}


class RecordingComm(BaseComm):
    """Stands in for the kernel's comm: keeps every message the widget would put on the wire."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []
        super().__init__(*args, **kwargs)

    def publish_msg(
        self,
        msg_type: str,
        data: Any = None,
        metadata: Any = None,
        buffers: Any = None,
        **kwargs: Any,
    ) -> None:
        data = copy.deepcopy(data)
        # put the binary buffers back where the front end finds them (as DataViews)
        for path, buffer in zip((data or {}).get("buffer_paths", []), buffers or [], strict=True):
            place = data["state"]
            for part in path[:-1]:
                place = place[part]
            place[path[-1]] = bytes(buffer)
        self.sent.append((msg_type, data))


def wire_bytes(data: Any) -> int:
    """What the kernel's JSON packer would send for one message's data."""
    buffers: list[int] = []

    def buffer(value: bytes) -> None:  # a binary buffer travels as it is, beside the JSON
        buffers.append(len(value))

    return len(json.dumps(data, ensure_ascii=False, default=buffer).encode()) + sum(buffers)


def table_rows(
    rows_state: Mapping[str, Any], column_keys: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """The Loader's ``_rows`` as the front end reads it (``loadRows`` in loader.js), one flat
    dict per row: ``status``, ``model_<column>`` and ``checkpoint_<column>`` per declared column
    (``column_keys``, else the declared ``COLUMNS``), ``note``, ``refused`` (a reason code per
    action, or 0), ``tied``, ``place``, ``renamed``."""
    from ckptviz.widget_columns import COLUMNS

    keys = list(column_keys) if column_keys is not None else [c.key for c in COLUMNS]
    data = rows_state["data"]
    values_of = json.loads(data) if isinstance(data, bytes | bytearray | memoryview) else data
    sets = rows_state["refusal_sets"]
    decoded = []
    for values in values_of:
        row = dict(zip(rows_state["fields"], values, strict=True))
        model, checkpoint = row.pop("model"), row.pop("checkpoint")
        if checkpoint == rows_state["same_as_model"]:
            checkpoint = model
        for side, sent in (("model", model), ("checkpoint", checkpoint)):
            assert sent is None or len(sent) == len(keys)
            for i, key in enumerate(keys):
                row[f"{side}_{key}"] = None if sent is None else sent[i]
        row["refused"] = sets[row["refused"] - 1] if row["refused"] else 0
        decoded.append(row)
    return decoded


class FrontEnd:
    """What loader.js keeps of the widget's state, fed only by what the kernel sent."""

    def __init__(self, loader: Loader) -> None:
        self.loader = loader
        self.comm: RecordingComm = loader.comm
        self.seen = 0
        self.state: dict[str, Any] = {}
        self.codes = ""
        self.explanations: dict[int, str] = {}
        self.done: list[Any] = []
        # each row's options that differ from its action's defaults, by row index
        self.options: dict[int, dict[str, Any]] = {}
        self.receive()

    def receive(self) -> list[tuple[str, dict[str, Any]]]:
        """Take in the messages sent since the last call; returns them."""
        new = self.comm.sent[self.seen :]
        self.seen = len(self.comm.sent)
        for msg_type, data in new:
            if msg_type == "comm_open" or data.get("method") == "update":
                self.state.update(data["state"])
                if "_rows" in data["state"]:
                    self.codes = data["state"]["_rows"]["actions"]
                    self.options = {i: o for i, o in data["state"]["_rows"]["options"]}
            elif data.get("method") == "custom":
                self.on_custom(data["content"])
        return new

    def on_custom(self, msg: dict[str, Any]) -> None:
        if msg["type"] == "actions":
            assert msg["gen"] == self.state["_rows"]["gen"]
            if "all" in msg:
                self.codes = msg["all"]
            else:
                codes = list(self.codes)
                for index, code in msg["changes"]:
                    codes[index] = code
                self.codes = "".join(codes)
            self.state["_rows"]["counts"] = msg["counts"]
            if "options" in msg:
                if msg.get("options_full"):
                    self.options = {}
                for index, chosen in msg["options"]:
                    if chosen:
                        self.options[index] = chosen
                    else:
                        self.options.pop(index, None)
        elif msg["type"] == "explain":
            self.explanations[msg["index"]] = msg["text"]
        elif msg["type"] == "done":
            self.done.append(msg["id"])

    def send(self, **content: Any) -> list[tuple[str, dict[str, Any]]]:
        """A message from the browser, through the comm as the kernel delivers it."""
        self.comm.handle_msg(
            {
                "content": {
                    "comm_id": self.comm.comm_id,
                    "data": {"method": "custom", "content": content},
                },
                "buffers": [],
            }
        )
        return self.receive()

    # what the table shows
    def rows(self) -> list[dict[str, Any]]:
        # one UTF-8 JSON buffer, read as loader.js reads it
        return table_rows(self.state["_rows"], [c["key"] for c in self.state["_columns"]])

    def actions(self) -> dict[str, str]:
        return {
            row["model_key"]: CODE_ACTIONS[code]
            for row, code in zip(self.rows(), self.codes, strict=True)
            if row["model_key"] is not None
        }

    def refused(self, key: str, action: str) -> str:
        state = self.state["_rows"]
        for row in self.rows():
            if row["model_key"] == key:
                if not row["refused"]:
                    return ""
                code = row["refused"][state["actions_order"].index(action)]
                return state["reasons"][code - 1] if code else ""
        raise KeyError(key)

    def options_by_key(self) -> dict[str, dict[str, Any]]:
        keys = [row["model_key"] for row in self.rows()]
        return {keys[i]: o for i, o in self.options.items()}
