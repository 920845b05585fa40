"""The documentation site: built by the README's one command, offline, and read in a real browser.

The build executes the notebooks (so it takes tens of seconds): one build per test session,
shared by the checks below.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import REPO
from jupyterlab_harness import CHROMIUM, chromium_page, free_port, wait_until
from mkdocs.structure.files import File, Files

import ckptviz
from ckptviz.tables import STATUS_MARKS

NOTEBOOK_PAGES = (
    "notebooks/01_quickstart.html",
    "notebooks/02_new_classes.html",
    "notebooks/03_wrapped_and_renamed.html",
    "notebooks/04_comparing_checkpoints.html",
    "notebooks/05_transfer_learning.html",
)


def _hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ckptviz_docs_hooks", REPO / "docs" / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _readme_docs_command() -> str:
    """The README's one command for the site (after the install that precedes it)."""
    readme = (REPO / "README.md").read_text()
    spans = re.findall(r"`([^`]*mkdocs build[^`]*)`", readme)
    assert len(spans) == 1, "the README should name the docs command once"
    command = spans[0].split("&&")[-1].strip()
    assert command.startswith("mkdocs build"), command
    return command


# -- without a browser ---------------------------------------------------------------------------


def test_api_page_lists_exactly_what_ckptviz_exports() -> None:
    hooks = _hooks()
    assert hooks.exported_names() == list(ckptviz.__all__)
    page = hooks.api_page()
    assert [
        line[len("::: ckptviz.") :] for line in page.splitlines() if line.startswith(":::")
    ] == (list(ckptviz.__all__))


@pytest.mark.parametrize("present", [True, False], ids=["with", "without"])
def test_security_page_is_in_the_navigation_only_when_security_md_exists(
    present: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hooks = _hooks()
    security = tmp_path / "SECURITY.md"
    if present:
        security.write_text("# Security\n")
    monkeypatch.setattr(hooks, "SECURITY", security)
    about = {"About this site": "about.md"}
    config: Any = type("Config", (), {"nav": [{"Home": "index.md"}, about]})()
    hooks.on_config(config)
    expected = [{"Home": "index.md"}, {"Security": "security.md"}, about]
    assert config.nav == (expected if present else [{"Home": "index.md"}, about])


def test_repository_links_in_the_home_and_security_pages_still_work_in_the_site(
    tmp_path: Path,
) -> None:
    hooks = _hooks()
    (tmp_path / "api.md").write_text("# API\n")
    files = Files([File("api.md", str(tmp_path), str(tmp_path / "site"), False)])
    text = (
        "[the API](api.md#compare), [the README](README.md#safety), "
        "[`ckptviz/core/safety.py`](ckptviz/core/safety.py), [the rules](ckptviz/core/safety.py), "
        "[PyTorch](https://pytorch.org), [below](#limits), ![shot](notebooks/images/loader.png)"
    )
    assert hooks.repository_links(text, files) == (
        "[the API](api.md#compare), [the README](index.md#safety), "
        "`ckptviz/core/safety.py`, the rules (`ckptviz/core/safety.py` in the repository), "
        "[PyTorch](https://pytorch.org), [below](#limits), ![shot](notebooks/images/loader.png)"
    )


# -- the built site ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site built by the README's command, into a temporary folder."""
    target = tmp_path_factory.mktemp("docs") / "site"
    command = [*_readme_docs_command().split(), "--site-dir", str(target)]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", *command[1:]],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, f"the docs build failed:\n{build.stdout}\n{build.stderr}"
    return target


# the attribute through which a page fetches each kind of element
FETCHED_BY = {"script": "src", "img": "src", "iframe": "src", "source": "src", "link": "href"}


class _ExternalReferences(HTMLParser):
    """Every script, style sheet, image or frame a page would fetch from another host."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        wanted = FETCHED_BY.get(tag)
        if tag == "link" and (values.get("rel") or "") not in ("stylesheet", "preload", "icon"):
            wanted = None  # a plain link to another site is not fetched
        url = values.get(wanted or "") or ""
        if url.startswith(("http://", "https://", "//")):
            self.found.append(f"<{tag} {wanted}={url}>")
        self._in_style = tag == "style"

    def handle_data(self, data: str) -> None:
        if self._in_style and ("url(http" in data or "@import" in data):
            self.found.append(f"<style> {data.strip()[:120]}")

    def handle_endtag(self, tag: str) -> None:
        if tag == "style":
            self._in_style = False


@pytest.mark.browser
def test_built_pages_fetch_nothing_from_another_host(site: Path) -> None:
    pages = sorted(site.rglob("*.html"))
    assert len(pages) >= 8
    external = {}
    for page in pages:
        reader = _ExternalReferences()
        reader.feed(page.read_text(encoding="utf-8"))
        if reader.found:
            external[str(page.relative_to(site))] = reader.found
    for sheet in site.rglob("*.css"):
        if "url(http" in sheet.read_text(encoding="utf-8"):
            external[str(sheet.relative_to(site))] = ["url(http...)"]
    assert not external


@pytest.mark.browser
def test_site_has_the_readme_notebooks_and_api_pages(site: Path) -> None:
    home = (site / "index.html").read_text(encoding="utf-8")
    assert "See and fix PyTorch checkpoint/model mismatches" in home
    for page in NOTEBOOK_PAGES:
        assert (site / page).is_file(), page
    assert (site / "api.html").is_file()
    assert (site / "security.html").is_file() == (REPO / "SECURITY.md").is_file()


@pytest.fixture(scope="module")
def served(site: Path) -> Iterator[str]:
    """The built site on http://127.0.0.1:PORT/, stopped when the tests are done."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=site,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/"

    def answers() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    try:
        wait_until(answers, 30, f"the site's server on {url}")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def browser_page(served: str) -> Iterator[Any]:
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} is missing (apt-get install chromium)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI needs the browser test: {reason}")
        pytest.skip(reason)
    requested: list[str] = []
    with chromium_page(width=1300, height=900) as page:
        page.on("request", lambda request: requested.append(request.url))
        yield page
    elsewhere = [u for u in requested if not u.startswith((served, "data:", "blob:"))]
    assert not elsewhere, f"the pages asked another host for: {elsewhere}"


def _status_cell(status: str) -> re.Pattern[str]:
    """The text of a table cell that says ``status``: its mark, then the word."""
    return re.compile(rf"^\s*{re.escape(STATUS_MARKS[status])} {status}\s*$")


def _images_drawn(page: Any) -> list[int]:
    """The natural width of every <img> in the page's article, once each has loaded."""
    page.wait_for_function(
        "() => [...document.querySelectorAll('article img')].every(i => i.complete)"
    )
    widths: list[int] = page.eval_on_selector_all(
        "article img", "images => images.map(i => i.naturalWidth)"
    )
    return widths


@pytest.mark.browser
def test_quickstart_page_shows_the_diff_table_and_the_plots(served: str, browser_page: Any) -> None:
    page = browser_page
    page.goto(served + NOTEBOOK_PAGES[0])
    diff_table = page.locator("table", has=page.locator("caption", has_text="3 shape")).first
    diff_table.scroll_into_view_if_needed()
    assert diff_table.is_visible()
    for status, rows in (("shape", 3), ("match", 1)):
        cells = diff_table.locator("td").filter(has_text=_status_cell(status))
        assert cells.count() == rows, status
        assert all(cells.nth(i).is_visible() for i in range(rows))
    assert diff_table.locator("td", has_text="[32, 3, 3, 3]").first.is_visible()
    # where the widget is, a reader without a kernel sees the Loader's static plan table
    loader = page.locator(".ckptviz-loader-static").first
    loader.scroll_into_view_if_needed()
    assert (
        loader.is_visible()
        and loader.locator("td").filter(has_text=_status_cell("shape")).count() == 3
    )
    widths = _images_drawn(page)
    assert len(widths) >= 3 and all(w > 0 for w in widths), widths


@pytest.mark.browser
def test_every_notebook_page_draws_its_plots(served: str, browser_page: Any) -> None:
    for path in NOTEBOOK_PAGES[1:]:
        browser_page.goto(served + path)
        widths = _images_drawn(browser_page)
        assert widths and all(w > 0 for w in widths), (path, widths)


@pytest.mark.browser
def test_api_page_shows_compare_and_loader_with_their_signatures(
    served: str, browser_page: Any
) -> None:
    page = browser_page
    page.goto(served + "api.html")
    for name, parts in (
        ("compare", ("compare(", "model: Source", "source: Source", "rename:", "-> Diff")),
        ("Loader", ("Loader(", "model: Module", "source: Any", "**compare_kwargs: Any")),
    ):
        heading = page.locator(f"[id='ckptviz.{name}']")
        heading.scroll_into_view_if_needed()
        assert heading.is_visible(), name
        signature = page.locator(f"div.doc-object:has(> [id='ckptviz.{name}']) .doc-signature")
        text = signature.first.inner_text()
        assert signature.first.is_visible()
        for part in parts:
            assert part in text, f"{part!r} not in the signature of {name}: {text}"
