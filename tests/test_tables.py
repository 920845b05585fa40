"""Static HTML tables: capped for big diffs (differing rows first, the rest counted), keys that
break only at dots or lose their middle with the whole key on hover, cells on one line."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import torch
from torch import nn

import ckptviz
from ckptviz.core.checkpoint import Checkpoint, TensorInfo
from ckptviz.core.diff import Diff
from ckptviz.core.formats.memory import MODULE
from ckptviz.core.matching import KeyMapping
from ckptviz.tables import KEY_WIDTH, TABLE_ROWS

BLOCKS = 1_000
NAMES = [f"{kind}{j}" for j in range(10) for kind in ("weight", "bias")]  # 20,000 rows in all
GROWN = {f"layers.{i}.weight3" for i in range(0, BLOCKS, 10)}  # 100 shape rows
HALF = {f"layers.{i}.bias8" for i in range(5, BLOCKS, 50)}  # 20 dtype rows


def declared(source: str, fmt: str, grown: bool) -> Checkpoint:
    tensors = {}
    for i in range(BLOCKS):
        for name in NAMES:
            key = f"layers.{i}.{name}"
            shape = (4, 2) if grown and key in GROWN else (3, 2)
            dtype = "float16" if grown and key in HALF else "float32"
            itemsize = 2 if dtype == "float16" else 4
            tensors[key] = TensorInfo(key, shape, dtype, shape[0] * shape[1] * itemsize)
    return Checkpoint(source=source, format=fmt, tensors=tensors)


def big_diff() -> Diff:
    """20,000 rows without a live model (metadata only, quick): 120 of them differ."""
    return Diff(declared("Wide", MODULE, False), declared("wide.pt", "torch", True), KeyMapping())


class Table(HTMLParser):
    """The body rows of a table as lists of cell texts, and every cell's ``title``."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[list[str]] = []
        self.titles: list[str] = []
        self.tags: set[str] = set()
        self._in_body = False
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        if tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self.rows.append([])
        elif tag == "td":
            self._cell = []
        title = dict(attrs).get("title")
        if title is not None:
            self.titles.append(title)

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None and self._in_body:
            self.rows[-1].append("".join(self._cell))
            self._cell = None
        elif tag == "tbody":
            self._in_body = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def test_a_big_diff_shows_the_rows_that_differ_first_and_counts_the_rest() -> None:
    diff = big_diff()
    text = diff._repr_html_()
    table = Table(text)
    body, last = table.rows[:-1], table.rows[-1]
    assert len(body) == TABLE_ROWS
    statuses = [row[0].split()[-1] for row in body]
    # every one of the 120 rows that differ, in model order, then rows that match
    differing = [r for r in diff.rows if r.status != "match"]
    assert [row[1] for row in body[: len(differing)]] == [r.key for r in differing]
    assert set(statuses[len(differing) :]) == {"match"}
    hidden = len(diff.rows) - TABLE_ROWS
    assert last == [f"{hidden:,} more rows: {hidden:,} match (to_frame() lists all 20,000)"]
    assert "showing 200 of 20,000 rows" in text
    # 13.4 MB before the cap; the size no longer grows with the rows
    assert len(text.encode()) < 300_000
    assert len(diff.to_frame()) == 20_000


def test_a_big_plan_puts_changed_actions_first_and_counts_the_rest_per_action() -> None:
    plan = Diff(declared("Wide", MODULE, False), declared("w.pt", "torch", False), KeyMapping())
    plan = plan.plan()
    plan.set("layers.900", "keep")
    table = Table(plan._repr_html_())
    body = table.rows[:-1]
    assert [row[1] for row in body[: len(NAMES)]] == [f"layers.900.{n}" for n in NAMES]
    assert {row[-2] for row in body[: len(NAMES)]} == {"keep"}
    assert {row[-2] for row in body[len(NAMES) :]} == {"load"}
    rest = 20_000 - TABLE_ROWS
    more = f"{rest:,} more rows: {rest:,} match → load (to_frame() lists all 20,000)"
    assert table.rows[-1] == [more]
    assert len(plan.to_frame()) == 20_000


def test_a_report_and_value_statistics_are_capped_too() -> None:
    model = nn.Sequential(*(nn.Linear(1, 1) for _ in range(150)))  # 300 tensors
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["7.weight"] = state["7.weight"] + 1
    plan = ckptviz.compare(model, state).plan()
    plan.set("3", "keep")
    table = Table(plan.apply(model)._repr_html_())
    assert [row[0] for row in table.rows[:2]] == ["3.weight", "3.bias"]
    assert len(table.rows) == TABLE_ROWS + 1
    assert table.rows[-1] == ["100 more rows: 100 load, verified (to_frame() lists all 300)"]

    other = nn.Sequential(*(nn.Linear(1, 1) for _ in range(150)))
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other[140].bias += 1
    stats = ckptviz.value_stats(ckptviz.compare(model, other.state_dict()), progress=False)
    table = Table(stats._repr_html_())
    assert table.rows[0][0] == "140.bias" and table.rows[0][-2] == "no"
    assert {row[-2] for row in table.rows[1:-1]} == {"yes"}
    assert table.rows[-1] == ["100 more rows: 100 match, equal (to_frame() lists all 300)"]


def test_keys_break_only_at_dots_and_a_long_key_shows_whole_on_hover() -> None:
    long_key = "encoder." * 15 + "attn \"<b>&'.weight"
    tensors = {
        long_key: TensorInfo(long_key, (2,), "float32", 8),
        "a.b": TensorInfo("a.b", (2, 3, 4, 5, 6, 7), "float32", 4 * 5040),
    }
    left = Checkpoint(source="m", format=MODULE, tensors=tensors)
    right = Checkpoint(source="c", format="torch", tensors={})
    text = Diff(left, right, KeyMapping())._repr_html_()
    table = Table(text)
    assert {"script", "b"}.isdisjoint(table.tags)
    shown = table.rows[0][1]
    assert len(shown) == KEY_WIDTH and "…" in shown
    assert shown.startswith("encoder.encoder.") and shown.endswith("attn \"<b>&'.weight")
    assert table.titles == [long_key]  # whole, and escaped (it parsed back to the same text)
    assert "encoder.<wbr>encoder.<wbr>" in text  # a long key breaks after its dots
    assert table.rows[1][1] == "a.b" and ">a.b<" in text  # a short one stays whole
    assert table.rows[1][2] == "[2, 3, 4, 5, 6, 7]"
    css = re.search(r"<style[^>]*>(.*?)</style>", text, re.S)
    assert css is not None
    td = re.search(r"td \{([^}]*)\}", css.group(1))
    assert td is not None
    assert "text-align: left" in td.group(1) and "white-space: nowrap" in td.group(1)
    # only the key columns (and prose) wrap, at the break points the cells offer
    wrapping = re.findall(r"td\.col(\d+) \{\s*white-space: normal", css.group(1))
    assert [int(i) for i in wrapping] == [1, 4, 7]
