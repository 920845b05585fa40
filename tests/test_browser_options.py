"""An action's options in a real JupyterLab: point at a grown embedding, pick partial, reach its
``fill`` control with the keyboard, choose ``mean``, Apply, and check in the kernel that the new
rows hold the mean of the copied ones. The controls come from the option specs Python sends;
axe-core finds no serious violation with them shown."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyterlab_harness import (
    LabServer,
    NotebookUI,
    chromium_page,
    focus_of,
    json_after,
    keep_copy,
    require_chromium,
    running_lab,
    serious_violations,
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

class Words(nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.emb = nn.Embedding(vocab, 4)
        self.head = nn.Linear(4, 3)

torch.manual_seed(1)
old = Words(10).state_dict()
torch.save(old, "vocab.pth")
torch.manual_seed(2)
model = Words(16)
print("SETUP done")"""

# the Loader in a cell of its own, after the kernel has answered once (as test_browser does)
SHOW = """\
w = ckptviz.Loader(model, "vocab.pth")
w"""

CHECK = """\
state = model.state_dict()
emb = state["emb.weight"]
result = {
    "overlap_copied": torch.equal(emb[:10], old["emb.weight"]),
    "new_rows_are_the_mean": torch.equal(emb[10:], old["emb.weight"].mean(0).expand(6, 4)),
    "options": w.plan.chosen_options("emb.weight"),
    "detail": {e.key: e.detail for e in w.report.entries}["emb.weight"] if w.report else None,
}
print("CHECK " + json.dumps(result))"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    require_chromium()
    root = tmp_path_factory.mktemp("lab-options")
    with running_lab(root) as server:
        yield server


def test_a_fill_is_chosen_through_the_widget_and_applied(lab: LabServer, tmp_path: Path) -> None:
    write_notebook(lab.root / "Options.ipynb", [SETUP, SHOW, CHECK])
    shots = tmp_path / "screenshots"
    with chromium_page() as page:
        nb = NotebookUI(page)
        try:
            _choose_mean_fill(nb, lab.notebook_url("Options.ipynb"), shots)
        except Exception:
            nb.screenshot(shots / "options-failure.png")
            raise
        finally:
            for shot in sorted(shots.glob("*.png")):
                keep_copy(shot, REPO / "test-output" / "browser")


def _choose_mean_fill(nb: NotebookUI, url: str, shots: Path) -> None:
    nb.open(url)
    nb.run_cell(0, lambda: "SETUP done" in nb.output_text(0))
    widget = nb.cell(1).locator(".ckv")
    rows = widget.locator(".ckv-row")
    nb.run_cell(1, lambda: rows.count() == 3, timeout=90)
    row = widget.locator('.ckv-row[data-key="emb.weight"]')
    partial = row.locator('button[data-a="partial"]')
    options = widget.locator(".ckv-options")

    # an action without options shows no controls
    row.locator(".ckv-status").hover()
    assert not options.is_visible()
    partial.click()
    wait_until(lambda: partial.get_attribute("aria-pressed") == "true", 30, "partial picked")
    fill = options.locator('select[data-option="fill"]')
    wait_until(lambda: fill.is_visible(), 30, "the fill control")
    # the choices and words are the ones Python declared
    assert fill.locator("option").all_inner_texts() == ["model", "zeros", "mean", "mean_noise"]
    assert "Hewitt 2021" in options.inner_text()
    label = options.locator("label.ckv-option-label")
    assert label.locator(".ckv-option-name").inner_text() == "fill"
    assert label.locator("select").count() == 1

    # keyboard: from the grid's cell, Tab reaches the control; it shows its focus ring
    partial.focus()
    nb.page.keyboard.press("Tab")
    focused = focus_of(nb)
    assert focused["ring"], focused
    assert nb.page.evaluate("() => document.activeElement.getAttribute('data-option')") == "fill"
    nb.page.keyboard.press("ArrowDown")  # zeros
    wait_until(lambda: "zeros" in partial.inner_text(), 30, "the table to show partial · zeros")
    nb.page.keyboard.press("ArrowDown")  # mean
    wait_until(lambda: "mean" in partial.inner_text(), 30, "the table to show partial · mean")
    # the control kept the focus through the kernel's answers
    assert nb.page.evaluate("() => document.activeElement.getAttribute('data-option')") == "fill"
    assert fill.input_value() == "mean"
    details = widget.locator(".ckv-details")
    assert "action: partial · fill mean" in details.inner_text()
    assert serious_violations(nb) == []
    nb.screenshot(shots / "options-fill-mean.png", element=widget)

    widget.locator("button", has_text="Apply").click()
    report = widget.locator(".ckv-report")
    wait_until(lambda: "applied and verified" in report.inner_text(), 60, "the report")

    nb.run_cell(2, lambda: "CHECK " in nb.output_text(2))
    result: dict[str, Any] = json_after("CHECK", nb.output_text(2))
    assert result["options"] == {"fill": "mean"}
    assert result["overlap_copied"] and result["new_rows_are_the_mean"]
    assert result["detail"] == (
        "copied the [10, 4] overlap, filled 6 new rows with the mean of the copied rows"
    )
