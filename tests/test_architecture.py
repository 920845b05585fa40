"""DESIGN.md's arrows: the core imports no view and no UI or plotting library."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import REPO

VIEW_LIBRARIES = {"pandas", "matplotlib", "ipywidgets", "anywidget", "IPython", "tqdm", "traitlets"}


def _imports(path: str) -> set[str]:
    tree = ast.parse((REPO / path).read_text(), filename=path)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_core_modules_import_only_the_core() -> None:
    core = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "ckptviz/core").rglob("*.py"))
    assert len(core) >= 10
    offenders = {}
    for path in core:
        bad = {
            name
            for name in _imports(path)
            if name.split(".")[0] in VIEW_LIBRARIES
            or (name.startswith("ckptviz") and not name.startswith("ckptviz.core"))
        }
        if bad:
            offenders[path] = sorted(bad)
    assert not offenders, f"the core imports views: {offenders}"


def test_import_ckptviz_in_a_plain_process_loads_no_view_library() -> None:
    # torch itself imports some of these (tqdm): only what ckptviz adds counts
    code = (
        "import sys, torch\n"
        "before = set(sys.modules)\n"
        "import ckptviz\n"
        "added = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        f"print(','.join(sorted(added & {VIEW_LIBRARIES!r})))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert result.stdout.strip() == ""
