"""loader.js builds the page from kernel values as DOM text only, and restates none of the
vocabulary or columns Python declares. These read the script's text: a sink that could parse a
value as HTML, or run it, fails the test wherever it is added."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ckptviz import widget_columns
from ckptviz.core.actions import action_terms
from ckptviz.core.vocabulary import COLOUR_ROLES, Status

STATIC = Path(__file__).resolve().parents[1] / "ckptviz" / "static"
SCRIPT = (STATIC / "loader.js").read_text()
STYLE = (STATIC / "loader.css").read_text()

_LINE_COMMENT = re.compile(r"^\s*//.*$", re.M)
_BLOCK_COMMENT = re.compile(r"/\*.*?\*/", re.S)
_STRING = re.compile(r'"(?:[^"\\\n]|\\.)*"|\'(?:[^\'\\\n]|\\.)*\'|`(?:[^`\\]|\\.)*`', re.S)


def code_of(script: str) -> str:
    """The script without its comments (their words may name what the code must not do)."""
    return _BLOCK_COMMENT.sub("", _LINE_COMMENT.sub("", script))


CODE = code_of(SCRIPT)

#: Every way a string can become markup, script or a style in a page.
SINKS = [
    "innerHTML",
    "outerHTML",
    "insertAdjacentHTML",
    "document.write",
    "createContextualFragment",
    "DOMParser",
    "setHTMLUnsafe",
    "parseHTMLUnsafe",
    "srcdoc",
    "cssText",
    "className",
    "eval(",
    "Function(",
    "import(",
    'setAttribute("style"',
    "insertRule",
]


@pytest.mark.parametrize("sink", SINKS)
def test_no_html_or_script_sink(sink: str) -> None:
    assert sink not in CODE, f"loader.js uses {sink}: build nodes and set textContent instead"


def test_no_markup_in_any_string() -> None:
    markup = [s for s in _STRING.findall(CODE) if re.search(r"<\s*[a-zA-Z!/]", s)]
    assert markup == [], "loader.js holds HTML in a string"


def test_attribute_names_are_fixed_and_harmless() -> None:
    calls = re.findall(r"setAttribute\(\s*([^,)]*)", CODE)
    assert calls, "the check found no setAttribute call: is the pattern still right?"
    for name in calls:
        assert re.fullmatch(r'"[a-z][a-z-]*"', name), f"setAttribute({name}, …): not a literal"
        literal = name.strip('"')
        assert not literal.startswith("on") and literal not in ("style", "href", "src"), name
    assert not re.search(r"\.on[a-z]+\s*=", CODE), "event handlers are added with addEventListener"


def test_style_is_set_only_from_numbers_the_script_counts() -> None:
    """No style string is made from a kernel value: heights and offsets are counts of lines,
    the depth an integer of the tree, the column tracks fixed strings picked by width hint."""
    uses = re.findall(r"\.style\b[^;]*", CODE)
    allowed = [
        r"\.style\.height = `\$\{total \* height\}px`",
        r"\.style\.maxHeight = `\$\{headerHeight \+ VISIBLE_LINES \* height \+ 2\}px`",
        r"\.style\.top = `\$\{k \* height\}px`",
        r'\.style\.setProperty\("--ckv-depth", String\(Math\.min\(Math\.trunc\(depth\), '
        r"MAX_DEPTH\)\)\)",
        r'\.style\.setProperty\("--ckv-cols", tracks\.join\(" "\)\)',
        # the action column: a width in pixels the script measured from its own buttons
        r'\.style\.setProperty\("--ckv-act-track", `\$\{need\}px`\)',
    ]
    for use in uses:
        assert any(re.fullmatch(a, use.strip()) for a in allowed), f"style set as {use!r}"
    tracks = re.search(r"const side = this\.sideColumns\(\)\.map\(\(c\) => (.*?)\);", CODE)
    assert tracks and tracks.group(1) == "WIDTH_TRACK[c.width] || WIDTH_TRACK.short"


def test_a_class_is_built_from_a_value_only_after_checking_the_vocabulary() -> None:
    built = re.findall(r"`ckv-[\w-]*\$\{[^`]*`|[\"']ckv-[\w-]*[\"']\s*\+", CODE)
    assert built == ["`ckv-role-${role}`"]
    role_class = re.search(r"roleClass\(role\) \{(.*?)\n  \}", CODE, re.S)
    assert role_class is not None
    assert "this.colours.has(role) ? `ckv-role-${role}` : " in role_class.group(1)


def test_the_checks_catch_what_the_old_script_did() -> None:
    """The patterns above match the markup-building lines the script had before."""
    old = code_of(
        "this.title.innerHTML = `Load <b>${escapeHtml(info.checkpoint)}</b>`;\n"
        'const open = `<div class="ckv-line" style="top:${top}px">`;\n'
        "node.setAttribute(name, value);\n"
    )
    assert "innerHTML" in old
    assert [s for s in _STRING.findall(old) if re.search(r"<\s*[a-zA-Z!/]", s)]
    assert re.findall(r"setAttribute\(\s*([^,)]*)", old) == ["name"]


# -- the vocabulary and the columns come from Python -------------------------------------------


def test_no_status_or_action_name_is_written_into_the_script() -> None:
    names = {s.value for s in Status} | set(action_terms())
    literals = {s[1:-1] for s in _STRING.findall(CODE)}
    restated = names & literals - set(widget_columns.COLUMN_KINDS)  # "shape" is also a kind
    assert restated == set(), "loader.js restates the vocabulary instead of reading _vocabulary"
    assert "ACTION_HELP" not in CODE and "MARK" not in CODE


def test_the_stylesheet_knows_colour_roles_not_names() -> None:
    names = {s.value for s in Status} | set(action_terms())
    kind_classes = re.search(r"const KIND_CLASS = \{(.*?)\};", CODE)
    assert kind_classes
    # a column kind's class (.ckv-shape: how a shape is drawn) is no status
    classes = set(re.findall(r"\.(ckv-[\w-]+)", STYLE)) - set(
        re.findall(r'"(ckv-[\w-]+)"', kind_classes.group(1))
    )
    for name in names:
        assert not [c for c in classes if c.endswith(f"-{name}")], name
    for role in COLOUR_ROLES:
        assert f".ckv-role-{role} {{ --c:" in STYLE, role
    assert f".ckv-span-{len(widget_columns.COLUMNS)} {{" in STYLE


def test_the_script_draws_every_declared_kind_and_width() -> None:
    for table, names in (
        ("WIDTH_TRACK", widget_columns.WIDTHS),
        ("KIND_CLASS", widget_columns.COLUMN_KINDS),
    ):
        declared = re.search(rf"const {table} = \{{(.*?)\}};", CODE)
        assert declared, table
        assert set(re.findall(r"(\w+):", declared.group(1))) == set(names), table
