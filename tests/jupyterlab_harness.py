"""A real JupyterLab for browser tests: a server on 127.0.0.1 in a temporary folder, Debian's
Chromium driven by Playwright, and the few notebook moves the tests need.

Lessons built in: open ``/lab/tree/NB.ipynb?token=…&reset`` so old tabs do not come back; scope
every selector to the visible notebook panel; the first cell run after the kernel turns idle is
occasionally lost, so a run waits for the cell's own output and retries a bounded number of
times; the news pop-up is switched off (and cells are never virtualised away) through an
``overrides.json`` in a temporary app settings folder; the server is stopped at the end.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nbformat
import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SETTINGS_OVERRIDES = {
    "@jupyterlab/apputils-extension:notification": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
    # every cell stays in the DOM, so outputs below the fold can be read; the notebook's own
    # kernel starts without the "Select Kernel" dialog that otherwise appears now and then
    "@jupyterlab/notebook-extension:tracker": {
        "windowingMode": "none",
        "autoStartDefaultKernel": True,
    },
}


#: True once the visible notebook's kernel connection is connected, handles comms and has the
#: widget manager's comm target (``window.jupyterapp``: the server is started with
#: ``expose_app_in_browser``).
WIDGET_TARGET_READY = """() => {
  const panel = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const session = panel && panel.sessionContext && panel.sessionContext.session;
  const kernel = session && session.kernel;
  return Boolean(
    kernel && kernel.connectionStatus === "connected" && kernel.handleComms &&
    kernel._targetRegistry && "jupyter.widget" in kernel._targetRegistry
  );
}"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_notebook(path: Path, cells: list[str]) -> None:
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(source) for source in cells]
    notebook.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(notebook, path)


def wait_until(condition: Callable[[], Any], timeout: float, what: str, step: float = 0.2) -> Any:
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)


class LabServer:
    """``jupyter lab`` serving ``root``, with its own settings, workspaces and log file."""

    def __init__(self, root: Path, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = root.parent / f"{root.name}-jupyterlab.log"
        self._env = env
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90) -> None:
        state = self.root.parent / f"{self.root.name}-lab-state"
        app_settings = state / "app-settings"
        app_settings.mkdir(parents=True, exist_ok=True)
        (app_settings / "overrides.json").write_text(json.dumps(SETTINGS_OVERRIDES))
        env = dict(self._env if self._env is not None else os.environ)
        env["JUPYTERLAB_SETTINGS_DIR"] = str(state / "user-settings")
        env["JUPYTERLAB_WORKSPACES_DIR"] = str(state / "workspaces")
        env["JUPYTER_RUNTIME_DIR"] = str(state / "runtime")
        command = [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--allow-root",
            "--ip=127.0.0.1",
            f"--port={self.port}",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root}",
            f"--LabApp.app_settings_dir={app_settings}",
            f"--LabApp.user_settings_dir={state / 'user-settings'}",
            f"--LabApp.workspaces_dir={state / 'workspaces'}",
            "--LabApp.news_url=",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            # window.jupyterapp: tests switch the theme through the app's own command
            "--LabApp.expose_app_in_browser=True",
        ]
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                command,
                cwd=self.root,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_until(self._ready, timeout, f"JupyterLab on port {self.port} (log: {self.log_path})")

    def _ready(self) -> bool:
        if self._process is not None and self._process.poll() is not None:
            raise RuntimeError(
                f"JupyterLab exited with {self._process.returncode}:\n{self.log_tail()}"
            )
        try:
            with urllib.request.urlopen(
                f"{self.url}/api/status?token={self.token}", timeout=2
            ) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        # the server shuts its kernels down on SIGINT-like termination; wait, then insist
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def notebook_url(self, name: str) -> str:
        return f"{self.url}/lab/tree/{name}?token={self.token}&reset"


@contextmanager
def running_lab(root: Path) -> Iterator[LabServer]:
    server = LabServer(root)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@contextmanager
def chromium_page(width: int = 1500, height: int = 1100) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            yield page
        finally:
            browser.close()


class NotebookUI:
    """The open notebook in JupyterLab; every selector is scoped to its visible panel."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.panel = page.locator(".jp-NotebookPanel:visible")

    def open(self, url: str, timeout: float = 90) -> None:
        self.page.goto(url)
        self.panel.locator(".jp-Cell").first.wait_for(timeout=timeout * 1000)
        self.wait_idle(timeout)
        self.accept_kernel_dialog()
        self.wait_widget_manager(timeout)
        # give the notebook the whole width: close the file browser that &reset opens
        browser_tab = self.page.locator(
            ".jp-SideBar.jp-mod-left li[data-id='filebrowser'].lm-mod-current"
        )
        if browser_tab.count():
            browser_tab.click()

    def accept_kernel_dialog(self) -> None:
        """Should the "Select Kernel" dialog come up anyway, take the notebook's own kernel."""
        dialog = self.page.locator(".jp-Dialog", has_text="Select Kernel")
        if dialog.count():
            dialog.locator("button", has_text="Select").click()
            self.wait_idle()

    def wait_widget_manager(self, timeout: float = 90) -> None:
        """Wait until the notebook's kernel connection is connected and takes widget comms.

        A widget output renders "Error displaying widget: model not found" when its model's
        ``comm_open`` was not handled within 2 s of the output (ipywidgets' ``get_model``), as
        when it reached a kernel connection without the ``jupyter.widget`` comm target: the
        widget manager registers it on each new connection, and the execution indicator can
        turn idle first. ``_targetRegistry`` is JupyterLab's own (private) table of targets."""
        wait_until(
            lambda: self.page.evaluate(WIDGET_TARGET_READY),
            timeout,
            "the notebook's kernel connection to accept widget comms (jupyter.widget)",
        )

    def wait_idle(self, timeout: float = 90) -> None:
        self.panel.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for(
            timeout=timeout * 1000
        )

    def cell(self, index: int) -> Any:
        return self.panel.locator(".jp-Notebook .jp-Cell").nth(index)

    def output_text(self, index: int) -> str:
        outputs = self.cell(index).locator(".jp-OutputArea-output")
        return "\n".join(outputs.all_inner_texts())

    def run_cell(
        self, index: int, done: Callable[[], bool], timeout: float = 60, attempts: int = 3
    ) -> None:
        """Run cell ``index`` until ``done()`` holds. A run that never started (its prompt
        neither turned to ``[*]`` nor got a new count: the lost first run) is sent again, a
        bounded number of times."""
        prompt = self.cell(index).locator(".jp-InputPrompt")
        for attempt in range(1, attempts + 1):
            self.accept_kernel_dialog()
            before = prompt.inner_text()
            prompt.click()
            self.page.keyboard.press("Control+Enter")
            try:
                wait_until(
                    lambda before=before: done() or prompt.inner_text() != before,
                    10,
                    f"cell {index} to start (attempt {attempt})",
                )
            except TimeoutError:
                if attempt == attempts:
                    raise
                continue
            wait_until(done, timeout, f"cell {index} to finish")
            return

    def set_theme(self, name: str, timeout: float = 30) -> None:
        """Switch JupyterLab's theme ("JupyterLab Light", "JupyterLab Dark") and wait for it."""
        self.page.evaluate(
            "name => window.jupyterapp.commands.execute('apputils:change-theme', {theme: name})",
            name,
        )
        self.page.locator(f"body[data-jp-theme-name='{name}']").wait_for(
            state="attached", timeout=timeout * 1000
        )

    def screenshot(self, path: Path, element: Any = None) -> None:
        """The page (or one element of it) as a PNG; an element is scrolled into view first."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if element is None:
            self.page.screenshot(path=str(path))
        else:
            element.scroll_into_view_if_needed()
            element.screenshot(path=str(path))


def keep_copy(source: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / source.name
    shutil.copyfile(source, target)
    return target


def require_chromium() -> None:
    if CHROMIUM.exists():
        return
    reason = f"{CHROMIUM} is missing (apt-get install chromium)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI needs the browser test: {reason}")
    pytest.skip(reason)


def json_after(marker: str, text: str) -> Any:
    match = re.search(re.escape(marker) + r" (\{.*\}|\[.*\])", text)
    assert match, f"no {marker!r} in the cell output:\n{text}"
    return json.loads(match.group(1))


def focus_of(nb: NotebookUI) -> dict[str, Any]:
    """What has the keyboard focus: its text, line, column, and its focus ring."""
    return nb.page.evaluate(
        """() => {
          const e = document.activeElement;
          const line = e.closest("[data-line]");
          const style = getComputedStyle(e);
          return {
            text: e.textContent, inGrid: Boolean(e.closest(".ckv-lines")),
            key: line ? line.getAttribute("data-key") || line.getAttribute("data-group") : null,
            pressed: e.getAttribute("aria-pressed"),
            ring: style.outlineStyle !== "none" && parseFloat(style.outlineWidth) >= 2,
            activeCell: [...document.querySelectorAll(".jp-NotebookPanel:not(.lm-mod-hidden) "
              + ".jp-Notebook .jp-Cell")].findIndex((c) => c.classList.contains("jp-mod-active")),
          };
        }"""
    )


def serious_violations(nb: NotebookUI) -> list[str]:
    """axe-core (bundled with axe-playwright-python, nothing fetched) on the widget's root."""
    from axe_playwright_python.sync_playwright import Axe

    results = Axe().run(nb.page, context=".ckv")
    return [
        f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']][:3]}"
        for v in results.response["violations"]
        if v["impact"] in ("serious", "critical")
    ]
