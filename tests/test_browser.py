"""The Loader in a real JupyterLab: tick rows and a module group in the rendered widget, Apply,
then check in the kernel that exactly the chosen tensors changed; Undo and check again."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from jupyterlab_harness import (
    CHROMIUM,
    NotebookUI,
    chromium_page,
    keep_copy,
    running_lab,
    wait_until,
    write_notebook,
)

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.browser

SETUP = """\
import json
import torch
from torch import nn
import ckptviz

class SmallCNN(nn.Module):
    def __init__(self, filters=16, classes=10, size=8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, filters, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(filters)
        self.fc = nn.Linear(filters * size * size, classes)

torch.manual_seed(1)
old = SmallCNN(16).state_dict()
torch.save(old, "old.pth")
torch.manual_seed(2)
model = SmallCNN(32)
# a model that has trained a while: every value differs from the checkpoint and from a fresh init
with torch.no_grad():
    for value in model.state_dict().values():
        fill = torch.randn_like(value) if value.is_floating_point() else torch.full_like(value, 7)
        value.copy_(fill)
before = {key: value.clone() for key, value in model.state_dict().items()}
print("SETUP", json.dumps(sorted(before)))"""

SHOW = """\
w = ckptviz.Loader(model, "old.pth")
w"""

CHECK = """\
_checks = globals().get("_checks", 0) + 1
state = model.state_dict()
result = {
    "changed": sorted(k for k in state if not torch.equal(state[k], before[k])),
    "actions": w.plan.actions,
    "partial_copied_old_filters": torch.equal(state["conv1.weight"][:16], old["conv1.weight"]),
    "partial_kept_new_filters": torch.equal(
        state["conv1.weight"][16:], before["conv1.weight"][16:]
    ),
    "bn1_reinitialised": bool((state["bn1.weight"] == 1).all() and (state["bn1.bias"] == 0).all()),
    "report": w.report.summary() if w.report else None,
}
print(f"CHECK {_checks} " + json.dumps(result))"""


def _require_chromium() -> None:
    if CHROMIUM.exists():
        return
    reason = f"{CHROMIUM} is missing (apt-get install chromium)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI needs the browser test: {reason}")
    pytest.skip(reason)


def _json_after(marker: str, text: str) -> Any:
    match = re.search(re.escape(marker) + r" (\{.*\}|\[.*\])", text)
    assert match, f"no {marker!r} in the cell output:\n{text}"
    return json.loads(match.group(1))


def test_loader_ticks_apply_and_undo_in_jupyterlab(tmp_path: Path) -> None:
    _require_chromium()
    root = tmp_path / "lab"
    root.mkdir()
    write_notebook(root / "NB.ipynb", [SETUP, SHOW, CHECK])
    shots = tmp_path / "screenshots"
    try:
        with running_lab(root) as lab, chromium_page() as page:
            nb = NotebookUI(page)
            try:
                _drive(nb, lab.notebook_url("NB.ipynb"), shots)
            except Exception:
                nb.screenshot(shots / "failure.png")
                raise
    finally:
        for shot in sorted(shots.glob("*.png")):
            keep_copy(shot, REPO / "test-output" / "browser")


def _drive(nb: NotebookUI, url: str, shots: Path) -> None:
    nb.open(url)
    nb.run_cell(0, lambda: "SETUP" in nb.output_text(0))
    keys = _json_after("SETUP", nb.output_text(0))

    widget = nb.cell(1).locator(".ckv")
    rows = widget.locator(".ckv-row")
    nb.run_cell(1, lambda: rows.count() == len(keys), timeout=90)

    def row_button(key: str, action: str) -> Any:
        return widget.locator(f'.ckv-row[data-key="{key}"] button[data-a="{action}"]')

    # the defaults: match rows load, the rest keep; load is refused for the grown conv, and why
    assert row_button("fc.bias", "load").get_attribute("aria-pressed") == "true"
    assert row_button("conv1.weight", "load").get_attribute("aria-disabled") == "true"
    assert "partial" in (row_button("conv1.weight", "load").get_attribute("title") or "")

    # pointing at a row explains it in plain words (fetched from the kernel)
    widget.locator('.ckv-row[data-key="conv1.weight"] .ckv-status').hover()
    details = widget.locator(".ckv-details")
    wait_until(lambda: "16 filters" in details.inner_text(), 30, "the row explanation")

    # tick rows: the grown conv copies its 16 old filters; the head's bias keeps its value
    chosen_rows = {"conv1.weight": "partial", "conv1.bias": "partial", "fc.bias": "keep"}
    for key, action in chosen_rows.items():
        button = row_button(key, action)
        button.click()
        wait_until(
            lambda b=button: b.get_attribute("aria-pressed") == "true",
            30,
            f"{key} to show {action}",
        )
    # a module group row: every tensor of bn1 re-initialised at once
    bn1_keys = [k for k in keys if k.startswith("bn1.")]
    widget.locator('.ckv-group[data-group="bn1"] button[data-a="reinit"]').click()
    wait_until(
        lambda: all(
            row_button(k, "reinit").get_attribute("aria-pressed") == "true" for k in bn1_keys
        ),
        30,
        "every bn1 row to show reinit",
    )
    counters = widget.locator(".ckv-counters").inner_text()
    assert f"reinit {len(bn1_keys)} rows" in counters, counters

    widget.locator("button", has_text="Apply").click()
    report = widget.locator(".ckv-report")
    wait_until(lambda: "applied and verified" in report.inner_text(), 60, "the report")
    widget.locator('.ckv-row[data-key="conv1.weight"] .ckv-status').hover()
    wait_until(lambda: "16 filters" in details.inner_text(), 30, "the row explanation")
    nb.screenshot(shots / "loader-applied.png", element=widget)

    # in the kernel: exactly the chosen tensors changed, and in the chosen way
    nb.run_cell(2, lambda: "CHECK 1 " in nb.output_text(2))
    result = _json_after("CHECK 1", nb.output_text(2))
    expected = sorted([k for k, a in chosen_rows.items() if a != "keep"] + bn1_keys)
    assert result["changed"] == expected
    assert {k: result["actions"][k] for k in chosen_rows} == chosen_rows
    assert all(result["actions"][k] == "reinit" for k in bn1_keys)
    assert result["partial_copied_old_filters"]
    assert result["partial_kept_new_filters"]
    assert result["bn1_reinitialised"]
    assert "verified" in result["report"]

    undo = widget.locator("button", has_text="Undo")
    assert undo.is_enabled()
    undo.click()
    wait_until(lambda: "undone" in report.inner_text(), 60, "the report to say undone")
    assert not undo.is_enabled()
    nb.run_cell(2, lambda: "CHECK 2 " in nb.output_text(2))
    assert _json_after("CHECK 2", nb.output_text(2))["changed"] == []

    # narrow: the same widget stays usable in a narrow notebook
    nb.page.set_viewport_size({"width": 700, "height": 1800})
    wait_until(lambda: "ckv-narrow" in (widget.get_attribute("class") or ""), 30, "narrow mode")
    nb.screenshot(shots / "loader-narrow.png", element=widget)
