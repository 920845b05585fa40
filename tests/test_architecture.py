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


def test_no_module_outside_the_actions_package_names_an_action() -> None:
    """What an action does lives in its definition (core/actions/): the rest of the package looks
    actions up and never branches on a name, so a new action is one file and one registry line.
    Docstrings may name actions; code may not."""
    from ckptviz.core.actions import SKIP, action_names

    names = {*action_names(), SKIP}
    package = REPO / "ckptviz"
    found = []
    for path in sorted(package.rglob("*.py")):
        if "actions" in path.relative_to(package).parts[:2]:
            continue
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and node.value in names
                and id(node) not in docstrings
            ):
                found.append(f"{path.relative_to(package)}:{node.lineno} {node.value!r}")
    assert found == []
