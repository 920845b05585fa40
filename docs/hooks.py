"""What the documentation site takes from the rest of the repository, at build time.

MkDocs hooks (``hooks:`` in ``mkdocs.yml``); ``about.md`` says why the site is built this way.
Nothing here is copied into ``docs/``, so the site cannot drift from its sources:

- the home page is ``README.md`` (a remote image, such as the Binder badge, becomes its alt
  text: the site loads nothing from the network);
- the notebooks are executed here, each in a fresh kernel in a temporary folder, and
  mkdocs-jupyter renders the executed copies with their tables and plots;
- the API reference lists every name in ``ckptviz.__all__`` (read from ``ckptviz/__init__.py``
  without importing it), each rendered by mkdocstrings from its docstring;
- ``SECURITY.md`` becomes the "Security" page when it exists, and the page is left out when not;
- in those two pages, a link to a repository file that the site does not carry becomes plain
  text, so that ``strict`` mode does not fail on it;
- the benchmark notes (``benchmarks/README.md`` and ``RESULTS.md``) are the speed pages.
"""

from __future__ import annotations

import ast
import asyncio
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import nbformat
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
SECURITY = REPO / "SECURITY.md"
SECURITY_PAGE = {"Security": "security.md"}
PAGES_AS_THEY_ARE = ("benchmarks/README.md", "benchmarks/RESULTS.md")
REMOTE_IMAGE = re.compile(r"!\[([^\]]*)\]\(https?://[^)\s]+\)")
LINK = re.compile(r"(?<!!)\[([^\]]+)\]\(([^)\s]+)\)")
# pages written for the repository, whose relative links name repository files
FROM_THE_REPOSITORY = ("index.md", "security.md")

_workdir: Path | None = None


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    """The Security page is in the navigation only when there is a SECURITY.md to show."""
    if SECURITY.is_file() and SECURITY_PAGE not in config.nav:
        config.nav.insert(len(config.nav) - 1, SECURITY_PAGE)  # before "About this site"
    return config


@event_priority(100)  # before mkdocs-jupyter's on_files, which must see the notebooks
def on_files(files: Files, config: MkDocsConfig) -> Files:
    global _workdir
    _workdir = Path(tempfile.mkdtemp(prefix="ckptviz-docs-"))
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    files.append(File.generated(config, "index.md", content=REMOTE_IMAGE.sub(r"\1", readme)))
    files.append(File.generated(config, "api.md", content=api_page()))
    if SECURITY.is_file():
        files.append(File.generated(config, "security.md", abs_src_path=str(SECURITY)))
    for name in PAGES_AS_THEY_ARE:
        files.append(File.generated(config, name, abs_src_path=str(REPO / name)))
    for image in sorted((REPO / "notebooks" / "images").glob("*.png")):
        uri = image.relative_to(REPO).as_posix()
        files.append(File.generated(config, uri, abs_src_path=str(image)))
    notebooks = sorted((REPO / "notebooks").glob("*.ipynb"))
    execute(notebooks, _workdir)
    for notebook in notebooks:
        # a File read from the temporary folder, not File.generated: mkdocs-jupyter's wrapper
        # finds a notebook's path through the folder it was read from
        uri = notebook.relative_to(REPO).as_posix()
        files.append(File(uri, str(_workdir), config.site_dir, config.use_directory_urls))
    return files


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    if page.file.src_uri in FROM_THE_REPOSITORY:
        return repository_links(markdown, files)
    return markdown


def repository_links(markdown: str, files: Files) -> str:
    """Links between files of the repository, made to work in the site: ``README.md`` is the
    home page, and a file the site does not carry (a source file, say) is named in plain text
    instead of a link that would be broken."""

    def site_link(match: re.Match[str]) -> str:
        label, target = match.groups()
        path, hash_, anchor = target.partition("#")
        if not path or re.match(r"[a-z][a-z0-9+.-]*:", path):  # an anchor, or another site
            return match.group(0)
        if path == "README.md":
            return f"[{label}](index.md{hash_}{anchor})"
        if files.get_file_from_path(path) is not None:
            return match.group(0)
        return label if path in label else f"{label} (`{path}` in the repository)"

    return LINK.sub(site_link, markdown)


def on_post_build(config: MkDocsConfig) -> None:
    _remove_workdir()


def on_build_error(error: Exception) -> None:
    _remove_workdir()


def _remove_workdir() -> None:
    global _workdir
    if _workdir is not None:
        shutil.rmtree(_workdir, ignore_errors=True)
        _workdir = None


def execute(notebooks: list[Path], workdir: Path) -> None:
    """Run each notebook top to bottom in a fresh python3 kernel, all at once; write the
    executed copies to ``workdir/notebooks/``.

    Executed here rather than by mkdocs-jupyter's ``execute: true``, which stores the widgets'
    state in the notebook: the page would then load a widget manager from a CDN and show an
    empty box where the Loader is. Without that state, each Loader shows its static table, as on
    GitHub or nbviewer. The files a notebook writes stay in ``workdir``; the kernels import this
    checkout's ckptviz and run torch on one thread (the models are tiny; on a busy machine
    torch's threads wait on each other). A failing cell fails the build, naming the cell.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    (workdir / "notebooks").mkdir()
    runs = []
    for notebook in notebooks:
        rundir = workdir / notebook.stem
        rundir.mkdir()
        nb = nbformat.read(notebook, as_version=4)
        client = NotebookClient(
            nb,
            kernel_name="python3",
            timeout=600,
            store_widget_state=False,
            resources={"metadata": {"path": str(rundir)}},
        )
        runs.append((client.async_execute(env=env), nb, workdir / "notebooks" / notebook.name))

    async def run_all() -> None:
        # concurrently: most of a notebook's time is its kernel starting and importing torch
        await asyncio.gather(*(run for run, _, _ in runs))

    asyncio.run(run_all())
    for _, nb, executed in runs:
        nbformat.write(nb, executed)


def exported_names() -> list[str]:
    """``ckptviz.__all__``, read from the source (importing ckptviz would import torch)."""
    tree = ast.parse((REPO / "ckptviz" / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            names: Any = ast.literal_eval(node.value)
            return list(names)
    raise RuntimeError("ckptviz/__init__.py has no literal __all__ to build the API page from")


def api_page() -> str:
    lines = [
        "# API reference",
        "",
        "Everything `import ckptviz` offers (its `__all__`), from the docstrings. The README's",
        "[API in brief](index.md#the-api-in-brief) says the same in one table.",
        "",
    ]
    for name in exported_names():
        lines += [f"::: ckptviz.{name}", ""]
    return "\n".join(lines)
