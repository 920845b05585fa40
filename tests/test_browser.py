"""The Loader in a real JupyterLab: tick rows and a module group in the rendered widget, Apply,
then check in the kernel that exactly the chosen tensors changed; Undo and check again. And a
hostile checkpoint (script payloads in its keys, metadata and file name) shown as a static table
and as the Loader runs nothing in the page.

One JupyterLab server and one browser serve every test of this module."""

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


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    require_chromium()
    root = tmp_path_factory.mktemp("lab")
    with running_lab(root) as server:
        yield server


@pytest.fixture(scope="module")
def browser_page(lab: LabServer) -> Iterator[Any]:
    with chromium_page() as page:
        yield page


@pytest.fixture
def nb(browser_page: Any) -> NotebookUI:
    browser_page.set_viewport_size({"width": 1500, "height": 1100})
    return NotebookUI(browser_page)


@pytest.fixture
def shots(tmp_path: Path) -> Iterator[Path]:
    """Where a test puts its screenshots; kept in test-output/browser afterwards."""
    folder = tmp_path / "screenshots"
    try:
        yield folder
    finally:
        for shot in sorted(folder.glob("*.png")):
            keep_copy(shot, REPO / "test-output" / "browser")


def _screenshot_on_failure(nb: NotebookUI, shots: Path, name: str, drive: Any) -> None:
    try:
        drive()
    except Exception:
        nb.screenshot(shots / f"{name}-failure.png")
        raise


def test_loader_ticks_apply_and_undo_in_jupyterlab(
    lab: LabServer, nb: NotebookUI, shots: Path
) -> None:
    write_notebook(lab.root / "NB.ipynb", [SETUP, SHOW, CHECK, BIG, STEM])
    _screenshot_on_failure(
        nb, shots, "loader", lambda: _drive(nb, lab.notebook_url("NB.ipynb"), shots)
    )


def _drive(nb: NotebookUI, url: str, shots: Path) -> None:
    nb.open(url)
    nb.run_cell(0, lambda: "SETUP" in nb.output_text(0))
    keys = json_after("SETUP", nb.output_text(0))

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
    result = json_after("CHECK 1", nb.output_text(2))
    expected = sorted([k for k, a in chosen_rows.items() if a != "keep"] + bn1_keys)
    assert result["changed"] == expected
    assert {k: result["actions"][k] for k in chosen_rows} == chosen_rows
    assert all(result["actions"][k] == "reinit" for k in bn1_keys)
    assert result["partial_copied_old_filters"]
    assert result["partial_kept_new_filters"]
    assert result["bn1_reinitialised"]
    assert "verified" in result["report"]

    undo = widget.locator("button", has_text="Undo")
    assert undo.get_attribute("aria-disabled") == "false"
    undo.click()
    wait_until(lambda: "undone" in report.inner_text(), 60, "the report to say undone")
    assert undo.get_attribute("aria-disabled") == "true"
    nb.run_cell(2, lambda: "CHECK 2 " in nb.output_text(2))
    assert json_after("CHECK 2", nb.output_text(2))["changed"] == []

    # Save plan writes next to the notebook; saving again asks before replacing the file
    notice, confirm = widget.locator(".ckv-notice"), widget.locator(".ckv-confirm")
    save = widget.locator("button", has_text="Save plan")
    save.click()
    wait_until(lambda: "plan saved to" in notice.inner_text(), 30, "the plan to be saved")
    save.click()
    wait_until(lambda: confirm.is_visible() and "Replace" in confirm.inner_text(), 30, "a question")
    assert "exists already" in widget.locator(".ckv-error").inner_text()
    confirm.locator("button", has_text="Replace it").click()
    wait_until(lambda: "plan saved to" in notice.inner_text(), 30, "the plan to be replaced")
    assert not confirm.is_visible()

    _keyboard_only(nb, widget, shots)
    assert serious_violations(nb) == []

    # the dark theme: the widget follows JupyterLab's colours; the focus ring shows there too
    nb.set_theme("JupyterLab Dark")
    try:
        widget.locator(".ckv-lines [tabindex='0']").focus()
        nb.page.keyboard.press("ArrowDown")  # a key press: the ring :focus-visible draws
        nb.screenshot(shots / "loader-dark.png", element=widget)
        assert serious_violations(nb) == []
    finally:
        nb.set_theme("JupyterLab Light")

    # a big model opens on its differences; n jumps to the next one through closed groups
    _big_model(nb, shots)

    # a stem conv for one input channel: its row offers adapt_channels, ordinary rows do not
    stem = _specialised_button(nb, shots)
    assert _clipped_buttons(widget) == [] and _clipped_buttons(stem) == []

    # medium and narrow: the same widgets stay usable, every button whole
    nb.page.set_viewport_size({"width": 1130, "height": 1800})
    wait_until(lambda: "ckv-medium" in (widget.get_attribute("class") or ""), 30, "medium mode")
    assert _clipped_buttons(widget) == [] and _clipped_buttons(stem) == []
    nb.screenshot(shots / "loader-stem-medium.png", element=stem)
    nb.screenshot(shots / "loader-medium.png", element=widget)
    nb.page.set_viewport_size({"width": 700, "height": 1800})
    wait_until(lambda: "ckv-narrow" in (widget.get_attribute("class") or ""), 30, "narrow mode")
    assert _clipped_buttons(widget) == [] and _clipped_buttons(stem) == []
    nb.screenshot(shots / "loader-narrow.png", element=widget)
    nb.screenshot(shots / "loader-stem-narrow.png", element=stem)


def _clipped_buttons(widget: Any) -> list[str]:
    """The action buttons (and "never applied" notes) of the lines in view that stick out of
    their cell or out of the table's visible width, as "key: text": the action column fits the
    widest line, and a layout is chosen only where its columns fit side by side."""
    return widget.evaluate(
        """(root) => [...root.querySelectorAll(".ckv-lines .ckv-act")].flatMap((cell) => {
          const box = cell.getBoundingClientRect();
          const view = root.querySelector(".ckv-scroll").getBoundingClientRect();
          const line = cell.closest("[data-line]");
          const key = line.dataset.key || line.dataset.group;
          return [...cell.querySelectorAll("button, .ckv-never")]
            .filter((b) => {
              const r = b.getBoundingClientRect();
              const out = r.left < box.left - 0.5 || r.right > box.right + 0.5;
              return out || r.right > view.right + 0.5 || b.scrollWidth > b.clientWidth + 1;
            })
            .map((b) => `${key}: ${b.textContent}`);
        })"""
    )


STEM = """torch.manual_seed(4)
rgb = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1))
torch.save(rgb.state_dict(), "rgb.pth")
gray = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1))
stem = ckptviz.Loader(gray, "rgb.pth")
stem"""


def _specialised_button(nb: NotebookUI, shots: Path) -> Any:
    """An action not shown on every row (adapt_channels) has its button on the one row it fits
    and that row's group line only; the arrow keys reach it past the general actions, and the
    other rows name the rare actions in one short line."""
    nb.page.set_viewport_size({"width": 1500, "height": 1100})
    stem = nb.cell(4).locator(".ckv")
    nb.run_cell(4, lambda: stem.locator(".ckv-row").count() == 4, timeout=90)

    def buttons(selector: str) -> list[str]:
        return [
            b.get_attribute("data-a") or ""
            for b in stem.locator(f"{selector} .ckv-act button[data-a]").all()
        ]

    general = ["load", "keep", "reinit", "partial"]
    assert buttons('.ckv-row[data-key="0.weight"]') == [*general, "adapt_channels"]
    assert buttons('.ckv-group[data-group="0"]') == [*general, "adapt_channels"]
    for ordinary in ("0.bias", "2.weight", "2.bias"):
        assert buttons(f'.ckv-row[data-key="{ordinary}"]') == general, ordinary
    assert buttons('.ckv-group[data-group="2"]') == general

    # ArrowRight from the last general action reaches the specialised one; Enter picks it
    stem.locator('.ckv-row[data-key="0.weight"] button[data-a="partial"]').focus()
    keys = nb.page.keyboard
    keys.press("ArrowRight")
    now = focus_of(nb)
    assert (now["key"], now["text"], now["ring"]) == ("0.weight", "adapt_channels", True), now
    keys.press("ArrowRight")  # the line's last button: focus stays
    assert focus_of(nb)["text"] == "adapt_channels"
    keys.press("Enter")
    wait_until(lambda: focus_of(nb)["pressed"] == "true", 30, "Enter to pick adapt_channels")
    keys.press("ArrowDown")  # 0.bias has no such button: the nearest column, partial
    assert (focus_of(nb)["key"], focus_of(nb)["text"]) == ("0.bias", "partial")
    keys.press("ArrowLeft")
    assert focus_of(nb)["text"] == "reinit"

    # the row's details: the rare actions in one line, their reasons on hover
    stem.locator('.ckv-row[data-key="0.bias"] .ckv-status').hover()
    also = stem.locator(".ckv-details .ckv-also")
    wait_until(lambda: also.count() == 1, 30, "the rare actions' line")
    assert also.inner_text() == "also: resample, adapt_channels, merge do not fit this row"
    assert "merge: " in (also.get_attribute("title") or "")
    assert "merge not possible" not in stem.locator(".ckv-details").inner_text()
    assert serious_violations(nb) == []
    nb.screenshot(shots / "loader-stem.png", element=stem)
    return stem


def _keyboard_only(nb: NotebookUI, widget: Any, shots: Path) -> None:
    """Tab into the grid, move with arrows, pick with Space and Enter, Apply with Enter, and
    check in the kernel what was applied. No key reaches the notebook."""
    keys = nb.page.keyboard
    widget.locator(".ckv-filter").focus()
    for _ in range(40):  # the toolbars' controls, then the grid: one tab stop
        keys.press("Tab")
        if focus_of(nb)["inGrid"]:
            break
    start = focus_of(nb)
    assert start["inGrid"] and start["ring"], start
    cell_before = start["activeCell"]

    keys.press("End")  # the last line: fc.bias
    assert focus_of(nb)["key"] == "fc.bias"
    for _ in range(4):
        keys.press("ArrowLeft")
    keys.press("ArrowRight")  # the second action: keep
    now = focus_of(nb)
    assert now["text"] == "keep" and now["ring"], now
    keys.press("Space")
    wait_until(lambda: focus_of(nb)["pressed"] == "true", 30, "Space to pick keep on fc.bias")
    keys.press("ArrowUp")  # fc.weight, same column
    keys.press("ArrowRight")
    keys.press("ArrowRight")  # partial
    assert focus_of(nb)["key"] == "fc.weight" and focus_of(nb)["text"] == "partial"
    keys.press("Enter")
    wait_until(lambda: focus_of(nb)["pressed"] == "true", 30, "Enter to pick partial")
    # none of these keys moved the notebook's active cell or reached its command mode
    assert focus_of(nb)["activeCell"] == cell_before
    assert nb.panel.locator(".jp-Notebook .jp-Cell").count() == 5

    keys.press("Tab")  # one tab stop: next the options of the row's action (partial's fill)
    assert focus_of(nb)["ring"]
    assert nb.page.evaluate("() => document.activeElement.dataset.option") == "fill"
    keys.press("Tab")  # then Apply, below the table
    assert focus_of(nb)["text"] == "Apply"
    keys.press("Shift+Tab")
    keys.press("Shift+Tab")  # back into the grid, on the cell it left
    assert focus_of(nb)["key"] == "fc.weight" and focus_of(nb)["text"] == "partial"
    keys.press("Tab")
    keys.press("Tab")
    keys.press("Enter")
    report = widget.locator(".ckv-report")
    wait_until(lambda: "#3 apply" in report.inner_text(), 60, "the second apply in the history")
    after = focus_of(nb)
    assert after["text"] == "Apply" and after["ring"], after  # the focus stays where it was
    applied = widget.locator('.ckv-row[data-key="fc.weight"] .ckv-applied')
    assert applied.count() == 1 and "partial" in (applied.get_attribute("title") or "")
    nb.screenshot(shots / "loader-keyboard.png", element=widget)

    nb.run_cell(2, lambda: "CHECK 3 " in nb.output_text(2))
    result = json_after("CHECK 3", nb.output_text(2))
    assert result["actions"]["fc.bias"] == "keep" and result["actions"]["fc.weight"] == "partial"
    assert "fc.weight" in result["changed"] and "fc.bias" not in result["changed"]


BIG = """big = nn.Sequential(*[nn.Linear(2, 2) for _ in range(600)])
state = big.state_dict()
state["450.weight"] = torch.zeros(3, 2)
big_loader = ckptviz.Loader(big, state)
big_loader"""


def _big_model(nb: NotebookUI, shots: Path) -> None:
    nb.page.set_viewport_size({"width": 1500, "height": 1100})
    widget = nb.cell(3).locator(".ckv")
    nb.run_cell(3, lambda: widget.locator(".ckv-group").count() > 0, timeout=90)
    # 1,200 rows open with every group closed but the one holding the difference
    assert widget.locator(".ckv-row").count() == 0  # the open group is far down
    assert "1 row differ" in widget.locator(".ckv-jumps").inner_text()
    widget.locator(".ckv-lines [tabindex='0']").focus()
    nb.page.keyboard.press("n")
    wait_until(lambda: focus_of(nb)["key"] == "450.weight", 30, "n to reach the difference")
    assert widget.locator(".ckv-path-bar").inner_text().startswith("in ")
    nb.screenshot(shots / "loader-big.png", element=widget)


# -- a hostile checkpoint: everything it controls is shown as text, nothing runs ---------------

IMG = '<img src=x onerror="window.__ckptviz_pwned=1">'
SCRIPT = "<script>window.__ckptviz_pwned=1</script>"
#: the torch.save'd checkpoint's own name carries a payload too (no "/" in it: a file name)
HOSTILE_PT = f"weights{IMG}.pt"

HOSTILE_SETUP = """\
import torch
from torch import nn
import ckptviz

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)

model = Net()
print("READY")"""


def _write_hostile_checkpoints(folder: Path) -> None:
    """A safetensors file and a torch.save'd dict whose keys and metadata carry payloads: the
    model's ``fc.bias`` appears renamed under a payload module (a rename suggestion), extra keys
    are an image and a script element, ``head.bias`` has another shape (a refused action)."""
    import torch
    from safetensors.torch import save_file

    tensors = {
        "fc.weight": torch.zeros(3, 4),
        f"{IMG}fc.bias": torch.zeros(3),
        "head.weight": torch.zeros(2, 3, dtype=torch.float64),
        "head.bias": torch.zeros(5),
        f"extra.{SCRIPT}": torch.zeros(2),
        f"head.{IMG}": torch.zeros(1),
    }
    save_file(
        tensors,
        str(folder / "hostile.safetensors"),
        metadata={"format": "pt", f"note{IMG}": SCRIPT, "about": IMG},
    )
    torch.save({**tensors, f"meta{SCRIPT}": torch.ones(1)}, folder / HOSTILE_PT)


def _pwned(nb: NotebookUI) -> Any:
    return nb.page.evaluate("() => window.__ckptviz_pwned")


def test_a_hostile_checkpoint_in_the_loader_runs_nothing(
    lab: LabServer, nb: NotebookUI, shots: Path
) -> None:
    _write_hostile_checkpoints(lab.root)
    cells = [
        HOSTILE_SETUP,
        'ckptviz.Loader(model, "hostile.safetensors")',
        f"ckptviz.Loader(model, {HOSTILE_PT!r})",
    ]
    write_notebook(lab.root / "HOSTILE_LOADER.ipynb", cells)

    def drive() -> None:
        nb.open(lab.notebook_url("HOSTILE_LOADER.ipynb"))
        nb.run_cell(0, lambda: "READY" in nb.output_text(0))
        # the safetensors file: its rows render as text; the torch file (the same keys, one
        # more, and a hostile file name) is explored in every part of the widget
        first = nb.cell(1).locator(".ckv")
        nb.run_cell(1, lambda: first.locator(".ckv-row").count() >= 5, timeout=90)
        keys = [row.get_attribute("data-key") for row in first.locator(".ckv-row").all()]
        assert f"{IMG}fc.bias" in keys and f"extra.{SCRIPT}" in keys
        assert first.locator("img, script").count() == 0
        assert _pwned(nb) is None
        widget = nb.cell(2).locator(".ckv")
        nb.run_cell(2, lambda: widget.locator(".ckv-row").count() >= 5, timeout=90)
        _explore_hostile_loader(nb, widget, shots / "hostile-loader.png")
        assert _pwned(nb) is None
        title = nb.cell(2).locator(".ckv-title").inner_text()
        assert HOSTILE_PT in title  # the file name, shown as text
        assert _pwned(nb) is None

    _screenshot_on_failure(nb, shots, "hostile-loader", drive)


def _explore_hostile_loader(nb: NotebookUI, widget: Any, shot: Path) -> None:
    """Open everything that shows a key: groups, details, explanations, a refusal, the rename
    suggestion and its accepted row, the code, and an error naming a hostile plan file."""
    details = widget.locator(".ckv-details")
    # expand rows: collapse every group, then open them again one by one through the tree
    widget.locator("button", has_text="collapse all").click()
    wait_until(lambda: widget.locator(".ckv-row").count() == 0, 30, "every group collapsed")
    widget.locator("button", has_text="expand all").click()
    wait_until(lambda: widget.locator(".ckv-row").count() >= 5, 30, "every group open again")
    twisty = widget.locator(".ckv-group .ckv-twisty").last
    twisty.click()
    twisty = widget.locator(".ckv-group .ckv-twisty").last
    twisty.click()
    wait_until(lambda: widget.locator(".ckv-row").count() >= 5, 30, "the last group open again")

    rows = widget.locator(".ckv-row")
    hostile = [
        i for i in range(rows.count()) if "pwned" in (rows.nth(i).get_attribute("data-key") or "")
    ]
    assert len(hostile) >= 3
    for i in hostile:
        row = rows.nth(i)
        key = row.get_attribute("data-key") or ""
        assert IMG in key or SCRIPT in key, key
        row.locator(".ckv-status").hover()
        wait_until(
            lambda k=key: k in details.inner_text() and "…" not in details.inner_text(),
            30,
            "the hostile row's explanation",
        )
    group = widget.locator(".ckv-group").filter(has_text=f"{IMG}fc")
    group.locator(".ckv-gname").hover()
    wait_until(lambda: f"{IMG}fc" in details.inner_text(), 30, "the group's details")

    # a refused action says why in the details line
    refused = widget.locator('.ckv-row button[aria-disabled="true"]').first
    refused.click(force=True)  # aria-disabled: Playwright would wait for it to enable
    wait_until(lambda: "not possible" in details.inner_text(), 30, "the refusal")

    # the rename suggestion names the hostile key as text; accepting it shows the renamed row
    suggestions = widget.locator(".ckv-suggest")
    assert IMG in suggestions.inner_text()
    suggestions.locator("button[data-accept]").first.click()
    renamed = widget.locator('.ckv-row[data-key="fc.bias"] .ckv-name.ckv-ck')
    # a long key is cut in the middle in its cell; the whole of it is in the title, as text
    wait_until(
        lambda: (
            renamed.count() and (renamed.get_attribute("title") or "").startswith(f"{IMG}fc.bias")
        ),
        30,
        "the renamed row's checkpoint key",
    )
    shown = renamed.locator(".ckv-key").inner_text()
    assert shown == f"{IMG}fc.bias" or ("…" in shown and shown.endswith("bias")), shown

    # the code names every key as a Python literal, shown as text
    widget.locator("button", has_text="Code").click()
    code = widget.locator(".ckv-code pre")
    wait_until(lambda: code.count() and IMG in code.inner_text(), 30, "the code")

    # an error about a hostile plan file name is text too
    path = widget.locator(".ckv-path")
    path.fill(f"../{IMG}.json")
    widget.locator("button", has_text="Save plan").click()
    error = widget.locator(".ckv-error")
    wait_until(lambda: IMG in error.inner_text(), 30, "the refusal of the plan file")

    assert widget.locator("img, script").count() == 0
    nb.screenshot(shot, element=widget)


def test_a_hostile_checkpoint_in_a_static_table_runs_nothing(
    lab: LabServer, nb: NotebookUI, shots: Path
) -> None:
    """``ckptviz.compare(model, path)`` as the last line of a cell: the README's way."""
    _write_hostile_checkpoints(lab.root)
    cells = [
        HOSTILE_SETUP,
        'ckptviz.compare(model, "hostile.safetensors")',
        f"ckptviz.compare(model, {HOSTILE_PT!r})",
    ]
    write_notebook(lab.root / "HOSTILE_TABLE.ipynb", cells)

    def drive() -> None:
        nb.open(lab.notebook_url("HOSTILE_TABLE.ipynb"))
        nb.run_cell(0, lambda: "READY" in nb.output_text(0))
        for index in (1, 2):
            nb.run_cell(index, lambda i=index: "fc.weight" in nb.output_text(i))
            output = nb.cell(index).locator(".jp-OutputArea-output")
            text = output.inner_text()
            assert IMG in text and SCRIPT in text, text
            assert output.locator("img, script").count() == 0
            assert _pwned(nb) is None
        nb.screenshot(shots / "hostile-table.png", element=nb.cell(2))

    _screenshot_on_failure(nb, shots, "hostile-table", drive)
