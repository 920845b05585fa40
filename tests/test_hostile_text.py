"""Everything a file controls is text: never markup, math, a terminal command or code.

Keys, shapes, dtypes, metadata, file names and plan JSON fields are built here with hostile
content, then shown every way ckptviz shows them: static HTML tables (parsed, so no element but
the table's own may appear), matplotlib plots (drawn, so no name may be read as mathtext),
``str``/``repr``/the CLI (no control character may reach the terminal), ``--csv`` (no formula)
and ``to_code()`` (parsed and run, so no name may become a statement).
"""

from __future__ import annotations

import ast
import json
import os
import unicodedata
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import matplotlib
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import ckptviz
from ckptviz import CkptvizError
from ckptviz.cli import main
from ckptviz.core.checkpoint import Checkpoint, TensorInfo
from ckptviz.core.text import format_table
from ckptviz.widget import static_html, static_text

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.text import Text

# -- HTML ----------------------------------------------------------------------------------------

MARKUP = (
    "<img src=x onerror=alert(1)>",
    "<script>alert(1)</script>",
    "a&amp;b \"q\" 'q' <b>",
    "$\\href{javascript:alert(1)}{x}$",
)
#: a key breaks after its dots (wbr); a clipped key shows whole in its span's title
TABLE_TAGS = {"style", "table", "thead", "tbody", "tr", "th", "td", "caption", "wbr", "span"}
#: the Loader's static view wraps its table in these
LOADER_TAGS = {"div", "p", "strong", "span", "br", "code"}


VOID_TAGS = {"br", "img", "hr", "wbr", "input", "meta", "link"}


class Elements(HTMLParser):
    """The tags and the text of an HTML document, and the text MathJax would typeset (text
    with a ``$`` outside any element of class ``mathjax_ignore``)."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []
        self.text: list[str] = []
        self.math: list[str] = []
        self.open: list[tuple[str, bool]] = []  # (tag, inside an element MathJax ignores)
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))
        if tag not in VOID_TAGS:
            classes = (dict(attrs).get("class") or "").split()
            ignored = "mathjax_ignore" in classes or bool(self.open and self.open[-1][1])
            self.open.append((tag, ignored))

    def handle_endtag(self, tag: str) -> None:
        while self.open and self.open.pop()[0] != tag:
            pass

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        in_style = bool(self.open and self.open[-1][0] == "style")
        if "$" in data and not in_style and not (self.open and self.open[-1][1]):
            self.math.append(data)


def assert_inert_html(
    html: str, payloads: tuple[str, ...], allowed: set[str], math_ignored: bool = True
) -> None:
    """No element or event handler but the view's own; each payload shown as text (and, for
    ckptviz's own views, kept from MathJax)."""
    parsed = Elements(html)
    foreign = {tag for tag, _ in parsed.tags} - allowed
    assert not foreign, f"elements from file data: {foreign}"
    handlers = [name for _, attrs in parsed.tags for name, _ in attrs if name.startswith("on")]
    assert not handlers, handlers
    text = "".join(parsed.text)
    for payload in payloads:
        assert payload in text, f"{payload!r} is not shown as text"
    assert not (math_ignored and parsed.math), f"MathJax would typeset {parsed.math}"


class HostileNames(nn.Module):
    """A model whose module names are markup (nn.Module allows any name without a dot)."""

    def __init__(self) -> None:
        super().__init__()
        for i, name in enumerate(MARKUP):
            self.add_module(name, nn.Linear(2, 2 + i))
        self.add_module("plain", nn.Linear(2, 2))


def markup_file(tmp_path: Path) -> Path:
    """A safetensors file named with markup, whose keys and metadata are markup too: one tensor
    that loads, one of another shape and dtype, and unexpected ones."""
    model = HostileNames()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state[f"{MARKUP[1]}.weight"] = torch.zeros(7, 2)
    state[f"{MARKUP[2]}.bias"] = state[f"{MARKUP[2]}.bias"].double()
    for payload in MARKUP:
        state[f"extra.{payload}"] = torch.zeros(1)
    path = tmp_path / "ckpt <img src=x onerror=alert(2)> & 'q'.safetensors"
    save_file(state, path, metadata={payload: payload for payload in MARKUP})
    return path


def declared_checkpoint(source: str, keys: list[str]) -> Checkpoint:
    """A checkpoint as metadata whose source, format and keys hold markup: the tables must
    escape them whatever the readers let through (a dtype or shape cannot: ``TensorInfo``
    refuses anything but a torch dtype and non-negative ints)."""
    with pytest.raises(CkptvizError, match="not a torch dtype"):
        TensorInfo(keys[0], (1,), MARKUP[0], 4)
    tensors = {key: TensorInfo(key, (1,), "float32", 4) for key in keys}
    return Checkpoint(source=source, format=MARKUP[0], tensors=tensors)


def html_views(tmp_path: Path) -> Iterator[tuple[str, str, set[str]]]:
    """(what, its HTML, the elements it may hold) for every HTML view of hostile data."""
    path = markup_file(tmp_path)
    model = HostileNames()
    diff = ckptviz.compare(model, path)
    yield "Diff", diff._repr_html_(), TABLE_TAGS
    plan = diff.plan()
    yield "Plan", plan._repr_html_(), TABLE_TAGS
    report = plan.apply(model)
    yield "Report", report._repr_html_(), TABLE_TAGS
    other = tmp_path / f"other {MARKUP[1].replace('/', '')}.safetensors"
    save_file({f"extra.{p}": torch.ones(1) for p in MARKUP}, other)
    between = ckptviz.compare(path, other)
    yield "Diff of two checkpoints", between._repr_html_(), TABLE_TAGS
    # a plain pandas DataFrame: pandas escapes it; only MathJax's reading of it is not ours
    yield "their value statistics (DataFrame)", between.stats(progress=False).to_html(), TABLE_TAGS
    yield "their value statistics", ckptviz.value_stats(between)._repr_html_(), TABLE_TAGS
    declared = ckptviz.compare(
        declared_checkpoint(MARKUP[0], [f"k{p}" for p in MARKUP]),
        declared_checkpoint(MARKUP[1], [f"k{p}" for p in MARKUP[:2]]),
    )
    yield "Diff of declared markup", declared._repr_html_(), TABLE_TAGS
    loader = ckptviz.Loader(HostileNames(), path)
    yield "Loader (static)", static_html(loader), TABLE_TAGS | LOADER_TAGS


def test_static_html_shows_file_data_as_text_never_as_markup(tmp_path: Path) -> None:
    views = list(html_views(tmp_path))
    for what, html, allowed in views:
        try:
            assert_inert_html(html, MARKUP, allowed, math_ignored="DataFrame" not in what)
        except AssertionError as exc:
            raise AssertionError(f"{what}: {exc}") from None


def test_every_public_html_view_is_covered_by_the_markup_test() -> None:
    """A new class with an HTML view must join ``html_views`` above."""
    covered = {"Diff", "Plan", "Report", "ValueStats", "Loader"}
    with_html = {
        name
        for name in ckptviz.__all__
        if isinstance(obj := getattr(ckptviz, name), type)
        and (hasattr(obj, "_repr_html_") or hasattr(obj, "_repr_mimebundle_"))
    }
    assert with_html == covered


# -- plots ---------------------------------------------------------------------------------------

MATH = ("$x^2$", "$\\frac{a}{$", "a$b")


class MathNames(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for i, name in enumerate(MATH):
            self.add_module(name, nn.Linear(2, 2 + i))


def assert_plain_text(fig: Any, names: tuple[str, ...]) -> None:
    """The figure draws, and each name is drawn as it is (no mathtext, no TeX) somewhere."""
    fig.canvas.draw()
    texts = [t for t in fig.findobj(Text) if t.get_visible() and "$" in t.get_text()]
    math = [t.get_text() for t in texts if t.get_parse_math() or t.get_usetex()]
    assert not math, f"drawn as math: {math}"
    drawn = " ".join(t.get_text() for t in texts)
    for name in names:
        assert name in drawn, f"{name!r} is not drawn"
    plt.close(fig)


def test_plots_draw_names_as_plain_text_never_as_mathtext(tmp_path: Path) -> None:
    model = MathNames()
    a, b = tmp_path / "$a$.safetensors", tmp_path / "$b^2$.safetensors"
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_file(state, a)
    save_file({k: v + 1 for k, v in state.items()}, b)
    between = ckptviz.compare(a, b)
    assert_plain_text(between.plot(), MATH)
    key = f"{MATH[1]}.weight"
    assert_plain_text(ckptviz.plot_values(between, key), (key, "$a$", "$b^2$"))
    for by in ("tensor", "module"):
        assert_plain_text(ckptviz.plot_changes(between, by=by, progress=False).figure, MATH)
    assert_plain_text(ckptviz.plot_change_strip(between, progress=False).figure, ("$a$", *MATH))
    report = ckptviz.compare(model, b).plan().apply(model)
    assert_plain_text(report.plot(), (*MATH, "$b^2$"))


# -- terminals -----------------------------------------------------------------------------------

#: ESC sequences (clear screen, OSC title), a C1 CSI, CR, BEL, DEL, NUL, bidi overrides and
#: isolates, zero-width and other format characters, a line separator
CONTROLS = (
    "\x1b[2J\x1b]0;owned\x07",
    "\x9b31m",
    "over\rwrite",
    "del\x7f\x00",
    "\u202egnp.exe",
    "\u2066iso\u2069",
    "zero\u200bwidth\ufeff",
    "line\u2028sep\n",
)


def assert_terminal_safe(text: str, what: str) -> None:
    """Only printable characters and line breaks; the hostile characters shown as escapes."""
    bad = sorted({c for c in text if not c.isprintable() and c != "\n"})
    assert not bad, f"{what}: {[unicodedata.name(c, hex(ord(c))) for c in bad]} reach the terminal"


class ControlNames(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for i, name in enumerate(CONTROLS):
            self.add_module(name.replace(".", "_"), nn.Linear(2, 2 + i))


@pytest.fixture(params=["safetensors", "torch"])
def control_file(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A file named with an ESC sequence and a bidi override; keys and metadata with every
    control character; one tensor of another shape, one renamed, unexpected ones. The torch
    file also nests its state dict under a hostile name, holds entries that are not tensors
    and a key with a lone surrogate (which ``print`` could not even encode)."""
    model = ControlNames()
    state: dict[str, Any] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    first = next(iter(state))
    state[first] = torch.zeros(9, 2)
    moved = list(state)[1]
    state[f"module{CONTROLS[0]}.{moved}"] = state.pop(moved)
    for name in CONTROLS:
        state[f"extra.{name}"] = torch.full((2,), float("nan"))
    path = tmp_path / f"ckpt\x1b[31m\u202e.{request.param}"
    if request.param == "safetensors":
        save_file(state, path, metadata={name: name for name in CONTROLS})
    else:
        state["extra.\udc80"] = torch.zeros(1)
        state.update({f"note{name}": name for name in CONTROLS})
        torch.save({f"state{CONTROLS[0]}dict": state, "epoch": 1}, path)
    return path


def test_str_and_repr_of_every_object_show_control_characters_as_escapes(
    control_file: Path,
) -> None:
    model = ControlNames()
    ckpt = ckptviz.read_checkpoint(control_file)
    diff = ckptviz.compare(model, control_file)
    plan = diff.plan()
    report = plan.apply(model)
    between = ckptviz.compare(control_file, control_file)
    stats = ckptviz.value_stats(between, progress=False)
    shown = {
        "Checkpoint": [str(ckpt), repr(ckpt), ckpt.summary()],
        "Diff": [str(diff), repr(diff), diff.summary()],
        "Row": [repr(r) for r in diff.rows],
        "explain": [diff.explain(r.key) for r in diff.rows],
        "suggestions": [repr(diff.suggestions), repr(diff.rule_suggestions)],
        "Plan": [str(plan), repr(plan), plan.summary()],
        "Report": [str(report), repr(report), report.summary()],
        "Diff of two checkpoints": [str(between), repr(between)],
        "ValueStats": [str(stats), repr(stats), *(repr(e) for e in stats)],
        "Loader": [static_text(ckptviz.Loader(ControlNames(), control_file))],
    }
    for what, texts in shown.items():
        for text in texts:
            assert_terminal_safe(text, what)
    assert "\\x1b[2J" in str(diff) and "\\u202e" in str(diff)


def test_error_messages_show_control_characters_as_escapes(control_file: Path) -> None:
    with pytest.raises(ckptviz.PlanError) as caught:
        ckptviz.compare(control_file, control_file).plan()  # no model to apply to
    assert_terminal_safe(str(caught.value), "PlanError")
    assert "\\x1b[31m\\u202e" in str(caught.value)


def test_cli_shows_control_characters_as_escapes(
    control_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = [
        ["inspect", control_file, "--color", "never"],
        ["diff", control_file, control_file, "--stats", "--no-progress", "--color", "never"],
        ["diff", control_file, control_file, "--csv", "--no-progress"],
        ["inspect", str(control_file) + "\x1b[2J-missing"],
    ]
    for args in runs:
        main([str(a) for a in args])
        captured = capsys.readouterr()
        assert_terminal_safe(captured.out + captured.err, " ".join(map(str, args)))
        assert "\\x1b" in captured.out + captured.err


def test_cli_quotes_unsafe_global_names_in_its_advice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The names of globals come from the file: the advice never puts one in a command line
    (a global off the harmless list can only be opted into with --trusted)."""
    import zipfile

    path = tmp_path / "global.pt"
    torch.save({"w": torch.zeros(1)}, path)
    name = "evil;touch pwned"
    with zipfile.ZipFile(path) as z:
        records = {i.filename: z.read(i.filename) for i in z.infolist()}
    pkl = next(k for k in records if k.endswith("data.pkl"))
    # a GLOBAL opcode naming module "x" and attribute "evil;touch pwned", as the pickle's value
    records[pkl] = b"\x80\x02cx\n" + name.encode() + b"\n."
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for filename, data in records.items():
            z.writestr(filename, data)
    code = main(["inspect", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    assert name in err, err
    assert "--allow-global x.evil" not in err and "--allow-global 'x.evil" not in err
    assert "--trusted" in err


def test_tables_cap_every_column_and_look_at_little_of_a_huge_name() -> None:
    from ckptviz.core.text import visible

    huge = "k" * 1_200_000
    table = format_table(["name", "other"], [[huge, "x" * 5000], ["short", "\x1b[2J"]])
    assert max(len(line) for line in table.splitlines()) <= 2 * 60 + 2
    assert "\\x1b[2J" in table
    assert visible(huge, 10) == "kkkkk…kkkk"
    long_key = "encoder." * 20 + "attn.weight"
    assert visible(long_key, 40) == "encoder.encoder.enco…encoder.attn.weight"  # both ends
    assert visible("\x1b" * 50, 10) == "\\x1b\\…\\x1b"


def test_cli_table_of_a_huge_key_stays_narrow(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    huge = "layer." + "k" * 1_200_000
    path = tmp_path / "huge.safetensors"
    save_file({huge: torch.zeros(1), "small": torch.zeros(1)}, path)
    for args in (["inspect", path], ["diff", path, path, "--stats", "--no-progress"]):
        main([str(a) for a in args])
        out = capsys.readouterr().out
        assert max(len(line) for line in out.splitlines()) < 1000, args


def test_csv_cells_never_start_a_formula_and_json_stays_exact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import csv
    import io

    formulas = ["=cmd|' /C calc'!A0", "+1+1", "-2+3", "@SUM(1)", "\tx", "\rx"]
    path = tmp_path / "formulas.safetensors"
    save_file({f: torch.zeros(1) for f in formulas}, path)
    main(["inspect", str(path), "--csv"])
    names = [row["name"] for row in csv.DictReader(io.StringIO(capsys.readouterr().out))]
    assert sorted(names) == sorted(
        ["'=cmd|' /C calc'!A0", "'+1+1", "'-2+3", "'@SUM(1)", "\\tx", "\\rx"]
    )
    main(["diff", str(path), str(path), "--csv", "--stats", "--no-progress"])
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert all(not row[c].startswith(("=", "+", "-", "@")) for row in rows for c in row)
    main(["inspect", str(path), "--json"])
    document = json.loads(capsys.readouterr().out)
    assert sorted(t["name"] for t in document["tensors"]) == sorted(formulas)


# -- generated code ------------------------------------------------------------------------------

INJECTION = "x\nimport os; open('MARKER', 'w').write('ran')\n#"


def shape_of(code: str) -> list[str]:
    """The code's syntax tree without its literals: what statements and expressions it runs."""
    return [type(node).__name__ for node in ast.walk(ast.parse(code))]


def run_code(code: str, namespace: dict[str, Any], where: Path) -> None:
    cwd = os.getcwd()
    os.chdir(where)
    try:
        exec(compile(code, "<plan code>", "exec"), namespace)
    finally:
        os.chdir(cwd)


def test_to_code_keeps_a_plan_json_source_a_literal(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    state = {k: v.detach().clone() + 1 for k, v in model.state_dict().items()}
    data = ckptviz.compare(model, state).plan().to_dict()
    benign = ckptviz.Plan.from_json(json.dumps(data)).to_code()
    data["checkpoint"]["source"] = INJECTION
    data["model"]["type"] = INJECTION
    code = ckptviz.Plan.from_json(json.dumps(data)).to_code()
    assert shape_of(code) == shape_of(benign)
    run_code(code, {"model": model, "state_dict": state}, tmp_path)
    assert not (tmp_path / "MARKER").exists()
    assert torch.equal(model.weight, state["weight"])


def test_to_code_keeps_file_names_and_keys_literals(tmp_path: Path) -> None:
    class QuotedNames(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.add_module("a'\nimport os; open('MARKER', 'w')#", nn.Linear(2, 3))
            self.add_module('b"""\n', nn.Linear(3, 3))

    model = QuotedNames()
    state = {k: v.detach().clone() + 1 for k, v in model.state_dict().items()}
    state[f"{INJECTION}.extra"] = torch.zeros(1)
    hostile = tmp_path / f"ck{INJECTION}.pt"
    plain = tmp_path / "plain.pt"
    for path in (hostile, plain):
        torch.save(state, path)
    benign = ckptviz.compare(model, plain).plan().to_code()
    plan = ckptviz.compare(model, hostile).plan()
    plan.set(next(iter(plan.actions)), "reinit")
    code = plan.to_code()
    plan_benign = ckptviz.compare(model, plain).plan()
    plan_benign.set(next(iter(plan_benign.actions)), "reinit")
    assert shape_of(code) == shape_of(plan_benign.to_code())
    assert shape_of(benign) != shape_of(code)  # the reinit block is there: the check can tell
    run_code(code, {"model": model}, tmp_path)
    assert not (tmp_path / "MARKER").exists()
    key = list(state)[-2]
    assert torch.equal(model.state_dict()[key], state[key])
