"""The teaching notebooks: stored clean, executed headlessly, and readable once exported to HTML."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import nbformat
import pytest
from conftest import REPO
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.util import run_sync
from nbconvert import HTMLExporter
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from ckptviz.tables import STATUS_COLOURS, STATUS_MARKS

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
TEACHING = (
    "01_quickstart",
    "02_new_classes",
    "03_wrapped_and_renamed",
    "04_comparing_checkpoints",
    "05_transfer_learning",
)

_executed: dict[Path, Any] = {}

# One line per thing a reader can have done in a "try it" widget before running the cells below
# it; each is what the widget's buttons call (Apply is ``apply()``, Undo is ``undo()``).
READER_CLICKS = {
    "untouched": "",
    "applied": "{w}.apply()",
    "applied_then_undone": "{w}.apply()\n{w}.undo()",
}
# What the reader left in the widget, kept in the kernel to compare with at the end of the run.
_REMEMBER = (
    "_reader_left_{w} = ({w}.report, {w}.plan.actions, "
    "{{k: v.clone() for k, v in {w}.model.state_dict().items()}})"
)
_STILL_AS_LEFT = """\
import torch as _torch
_report, _actions, _values = _reader_left_{w}
assert {w}.report is _report, "a cell below the widget applied or undid in the reader's widget"
assert {w}.plan.actions == _actions, "a cell below the widget changed the reader's choices"
assert all(_torch.equal(v, _values[k]) for k, v in {w}.model.state_dict().items()), (
    "a cell below the widget changed the model the reader's widget works on"
)
"""
WITH_WIDGETS = ("01_quickstart", "02_new_classes", "03_wrapped_and_renamed", "05_transfer_learning")


def try_it_widgets(nb: Any) -> dict[int, str]:
    """Cell index -> variable of each Loader the reader sees: made in the cell and shown as its
    last line."""
    found = {}
    for index, cell in enumerate(nb.cells):
        lines = [line.strip() for line in cell.source.splitlines() if line.strip()]
        if cell.cell_type == "code" and lines:
            made = re.findall(r"^(\w+) = ckptviz\.Loader\(", cell.source, re.M)
            if lines[-1] in made:
                found[index] = lines[-1]
    return found


def run_notebook(
    path: Path, workdir: Path, clicks: str = "", kernel: AsyncKernelManager | None = None
) -> Any:
    """Execute the notebook top to bottom in ``workdir``; right after each "try it" widget,
    run ``clicks`` (a ``READER_CLICKS`` value) on it, as a reader clicking there would; at the
    end, check that no later cell touched what the reader left in a widget.

    Raises ``CellExecutionError``, with the cell and its traceback, on any error. The injected
    code runs in the same kernel but is not added to the returned notebook. With ``kernel`` the
    run reuses that kernel (its namespace emptied first); without, a fresh one is started.
    """
    nb = nbformat.read(path, as_version=4)
    widgets = try_it_widgets(nb)
    client = NotebookClient(
        nb,
        km=kernel,
        kernel_name="python3",
        timeout=300,
        resources={"metadata": {"path": str(workdir)}},
    )

    def run(source: str) -> None:
        client.execute_cell(nbformat.v4.new_code_cell(source), 0, store_history=False)

    with client.setup_kernel(env={**os.environ, "OMP_NUM_THREADS": "1"}):
        try:
            if kernel is not None:
                run(f"%reset -f\nimport os\nos.chdir({str(workdir)!r})\ndel os")
            for index, cell in enumerate(nb.cells):
                client.execute_cell(cell, index)
                if index in widgets:
                    w = widgets[index]
                    run(clicks.format(w=w) + "\n" + _REMEMBER.format(w=w))
            for w in widgets.values():
                run(_STILL_AS_LEFT.format(w=w))
        finally:
            if kernel is not None:
                client.kc.stop_channels()
    return nb


def executed(path: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The notebook run top to bottom in a fresh python3 kernel, once per test session, its
    widgets left untouched (as "Run All" leaves them).

    The kernel's working directory is a temporary folder (the files a notebook writes stay out
    of the repo); it imports this checkout's ckptviz through PYTHONPATH, set by conftest. It
    runs torch on one thread: the notebooks' models are tiny, and on a busy 2-core machine
    torch's default threads wait on each other (measured: 39 s instead of 7 s for notebook 02).
    """
    if path not in _executed:
        _executed[path] = run_notebook(path, tmp_path_factory.mktemp(path.stem))
    return _executed[path]


def code_cells(nb: Any) -> list[Any]:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def output_text(cell: Any) -> str:
    parts = []
    for output in cell.get("outputs", []):
        parts.append(output.get("text", ""))
        parts.append(output.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def test_the_teaching_notebooks_are_there() -> None:
    assert [p.stem for p in NOTEBOOKS if p.stem in TEACHING] == list(TEACHING)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    cells = code_cells(nb)
    dirty = [i for i, cell in enumerate(cells) if cell.outputs or cell.execution_count is not None]
    assert not dirty, f"{path.name}: code cells {dirty} have outputs; clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_headless_and_shows_the_pytorch_error_first(
    path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    nb = executed(path, tmp_path_factory)
    cells = code_cells(nb)
    errors = [o for cell in cells for o in cell.outputs if o.output_type == "error"]
    assert not errors
    if path.stem not in TEACHING:
        return
    first_error = next(
        i for i, cell in enumerate(cells) if "Error(s) in loading state_dict" in output_text(cell)
    )
    first_ckptviz = next(i for i, cell in enumerate(cells) if "ckptviz." in cell.source)
    assert first_error < first_ckptviz, "show PyTorch's own error before the fix"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_plot_is_shown_exactly_once(
    path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    nb = executed(path, tmp_path_factory)
    plot_cells = [
        cell for cell in code_cells(nb) if re.search(r"\.plot\(|\bplot_\w+\(", cell.source)
    ]
    if path.stem in TEACHING:
        assert plot_cells, f"{path.name} shows no ckptviz plot"
    for cell in plot_cells:
        images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
        assert len(images) == 1, f"{len(images)} images for:\n{cell.source}"


def _cell_styles(page: str) -> dict[str, str]:
    """CSS id -> declarations, from the <style> rules pandas' Styler writes per cell."""
    styles: dict[str, str] = {}
    for selectors, body in re.findall(r"([^{}<>]+)\{([^{}]*)\}", page):
        for selector in selectors.split(","):
            selector = selector.strip()
            if selector.startswith("#T_"):
                styles[selector[1:]] = styles.get(selector[1:], "") + body
    return styles


class _CellReader(HTMLParser):
    """(id, text) of every <td> with an id, whatever the order of its attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[tuple[str, str]] = []
        self._open: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "td":
            self._open = dict(attrs).get("id") or ""
            self._text = []

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._open is not None:
            self.cells.append((self._open, "".join(self._text).strip()))
            self._open = None


def _table_cells(page: str) -> list[tuple[str, str]]:
    reader = _CellReader()
    reader.feed(page)
    return [(cell_id, text) for cell_id, text in reader.cells if cell_id.startswith("T_")]


def _assert_grown_conv_table(fragment: str) -> None:
    """The quickstart's table of the conv that grew: every ``shape`` and ``match`` cell says its
    status in words and is highlighted in that status's colour."""
    styles = _cell_styles(fragment)
    by_text: dict[str, list[str]] = {}
    for cell_id, text in _table_cells(fragment):
        by_text.setdefault(text, []).append(cell_id)
    for status in ("shape", "match"):
        word = f"{STATUS_MARKS[status]} {status}"
        assert by_text.get(word), f"no {word!r} cell in the exported table"
        for cell_id in by_text[word]:
            assert f"background-color: {STATUS_COLOURS[status]}" in styles.get(cell_id, ""), (
                f"{word!r} cell {cell_id} is not highlighted"
            )
    assert len(by_text[f"{STATUS_MARKS['shape']} shape"]) == 3  # conv1.weight, .bias, fc.weight
    assert "conv1.weight" in by_text and "[32, 3, 3, 3]" in by_text and "[16, 3, 3, 3]" in by_text


def test_quickstart_exported_to_html_keeps_the_highlighted_table(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    nb = executed(REPO / "notebooks" / "01_quickstart.ipynb", tmp_path_factory)
    page, _ = HTMLExporter().from_notebook_node(nb)
    caption = page.index("<caption>4 rows: 1 match, 3 shape")  # the Diff's table
    _assert_grown_conv_table(
        page[page.rindex("<style", 0, caption) : page.index("</table>", caption)]
    )
    # the plots are in the page as images, not as "<Figure ...>" lines
    assert page.count("data:image/png;base64") >= 3


def test_quickstart_loader_falls_back_to_a_static_table_in_exported_html(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Saved from JupyterLab (which by default keeps no widget state) and shared as HTML or on
    GitHub, the widget's output is its static view: the plan table, highlighted."""
    nb = copy.deepcopy(executed(REPO / "notebooks" / "01_quickstart.ipynb", tmp_path_factory))
    nb.metadata.pop("widgets", None)
    page, _ = HTMLExporter().from_notebook_node(nb)
    assert "application/vnd.jupyter.widget-view+json" not in page
    start = page.index('class="ckptviz-loader-static"')
    fragment = page[start : page.index("</table>", start)]
    assert "<strong>ckptviz.Loader</strong>: SimpleCNN" in fragment
    _assert_grown_conv_table(fragment)


@pytest.fixture(scope="module")
def reader_kernel(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One kernel for every clicked run: the imports (torch, matplotlib) are paid once."""
    kernel = AsyncKernelManager(kernel_name="python3")
    cwd = tmp_path_factory.mktemp("reader-kernel")
    run_sync(kernel.start_kernel)(env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=str(cwd))
    yield kernel
    run_sync(kernel.shutdown_kernel)(now=True)


def test_the_notebooks_with_try_it_widgets_are_found() -> None:
    found = [p.stem for p in NOTEBOOKS if try_it_widgets(nbformat.read(p, as_version=4))]
    assert found == list(WITH_WIDGETS)


@pytest.mark.parametrize("clicks", READER_CLICKS)
@pytest.mark.parametrize("name", WITH_WIDGETS)
def test_cells_below_a_widget_work_whatever_the_reader_clicked(
    name: str,
    clicks: str,
    reader_kernel: AsyncKernelManager,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Nothing, Apply, or Apply then Undo in each "try it" widget, then the rest of the
    notebook: no cell fails, and none touches what the reader left in the widget."""
    path = REPO / "notebooks" / f"{name}.ipynb"
    if clicks == "untouched":  # as "Run All" leaves them: the run the other tests read
        executed(path, tmp_path_factory)
    else:
        run_notebook(path, tmp_path, READER_CLICKS[clicks], reader_kernel)


# -- binder/: what mybinder.org installs to run these notebooks -----------------------------------

BINDER = REPO / "binder"
CPU_INDEX = "--extra-index-url https://download.pytorch.org/whl/cpu"


def _binder_requirements() -> tuple[list[str], dict[str, Requirement], list[str]]:
    """(pip options, requirements by normalised name, local installs) of binder/requirements.txt."""
    options: list[str] = []
    requirements: dict[str, Requirement] = {}
    local: list[str] = []
    for raw in (BINDER / "requirements.txt").read_text().splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line in (".", "-e ."):
            local.append(line)
        elif line.startswith("-"):
            options.append(line)
        else:
            requirement = Requirement(line)
            requirements[canonicalize_name(requirement.name)] = requirement
    return options, requirements, local


def _project_requirements() -> dict[str, Requirement]:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + project["optional-dependencies"]["notebook"]
    return {canonicalize_name(r.name): r for r in map(Requirement, lines)}


def test_binder_installs_the_project_and_the_cpu_build_of_torch() -> None:
    options, requirements, local = _binder_requirements()
    assert CPU_INDEX in options
    assert local in (["."], ["-e ."]), "binder must install this project itself"
    torch_pin = requirements["torch"].specifier
    assert len(torch_pin) == 1 and next(iter(torch_pin)).operator == "==", (
        "pin torch so that the CPU index's +cpu build of that version is the one chosen"
    )


def test_binder_requirements_agree_with_pyproject() -> None:
    _, binder, _ = _binder_requirements()
    project = _project_requirements()
    assert set(binder) == set(project), (
        f"only in pyproject.toml: {sorted(set(project) - set(binder))}; "
        f"only in binder/requirements.txt: {sorted(set(binder) - set(project))}"
    )
    for name, wanted in project.items():
        given = binder[name].specifier
        if given == wanted.specifier:
            continue
        pins = [spec.version for spec in given if spec.operator == "=="]
        assert len(given) == 1 and pins, f"{name}: binder {given}, pyproject {wanted.specifier}"
        assert wanted.specifier.contains(pins[0], prereleases=True), (
            f"{name}: binder pins {pins[0]}, outside pyproject's {wanted.specifier}"
        )


def test_binder_start_runs_torch_on_one_thread_unless_told_otherwise() -> None:
    start = BINDER / "start"
    assert os.access(start, os.X_OK)
    show = [str(start), sys.executable, "-c", "import os; print(os.environ['OMP_NUM_THREADS'])"]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    assert subprocess.run(show, env=env, capture_output=True, text=True).stdout == "1\n"
    env["OMP_NUM_THREADS"] = "3"
    assert subprocess.run(show, env=env, capture_output=True, text=True).stdout == "3\n"
