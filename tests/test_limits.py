"""Bounded resources: what a small hostile file (or plan JSON) makes ckptviz do stays bounded.

Values of repeated (``expand``-ed, stride-0) tensors are computed from their stored values; views
that repeat values in ways that are not plain repeats are refused past a bound; rename regexes
run in a linear-time engine. Runs that would not end on unbounded code go to a subprocess whose
timeout is only a safety net: the tests assert on what the run returns, never on its time.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ckptviz
from ckptviz.cli import main as cli_main
from ckptviz.core.errors import CheckpointError
from ckptviz.core.stats import value_stats, values_equal

SAFETY_TIMEOUT = 300  # seconds; a net for unbounded code, far above what a bounded run takes


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=SAFETY_TIMEOUT,
        env=os.environ.copy(),
        check=False,
    )


def plain_measures(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """The measures on the logical tensors, materialised, with numpy."""
    x = a.double().contiguous().numpy().ravel()
    y = b.double().contiguous().numpy().ravel()
    return {
        "diff_norm": float(np.linalg.norm(x - y)),
        "max_abs_diff": float(np.abs(x - y).max()),
        "cosine": float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))),
        "norm_a": float(np.linalg.norm(x)),
        "norm_b": float(np.linalg.norm(y)),
        "mean_a": float(x.mean()),
        "mean_b": float(y.mean()),
        "std_a": float(x.std()),
        "std_b": float(y.std()),
    }


# -- repeated (stride-0) tensors: computed from their stored values --------------------------------


def test_expanded_tensors_give_the_statistics_of_their_logical_values(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(3)
    row = torch.randn(1, 300, generator=generator)
    other_row = torch.randn(1, 300, generator=generator)
    a = {
        "both": row.expand(200, 300),  # repeated along dim 0 on both sides
        "one": row.expand(200, 300),  # repeated on this side only
        "nan": torch.tensor([1.0, float("nan"), float("inf")]).expand(50, 3),
        "grown": row.expand(200, 300),  # a shape row: each side whole, the overlap compared
    }
    b = {
        "both": (row * 2 + 1).expand(200, 300),
        "one": torch.randn(200, 300, generator=generator),
        "nan": torch.tensor([1.0, 2.0, 3.0]).expand(50, 3),
        "grown": other_row.expand(250, 300),
    }
    torch.save(a, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    diff = ckptviz.compare(tmp_path / "a.pt", tmp_path / "b.pt")
    stats = value_stats(diff, progress=False)
    for key in ("both", "one"):
        entry = stats[key]
        for name, value in plain_measures(a[key], b[key]).items():
            assert getattr(entry, name) == pytest.approx(value, rel=1e-9, abs=1e-12), (key, name)
    nan = stats["nan"]
    assert (nan.nan_a, nan.inf_a, nan.nan_b, nan.inf_b) == (50, 50, 0, 0)
    grown = stats["grown"]
    assert grown.norm_b == pytest.approx(float(b["grown"].double().norm()), rel=1e-9)
    assert grown.std_b == pytest.approx(float(b["grown"].double().std(unbiased=False)), rel=1e-9)
    overlap = plain_measures(a["grown"], b["grown"][:200])
    assert grown.diff_norm == pytest.approx(overlap["diff_norm"], rel=1e-9)
    assert grown.max_abs_diff == pytest.approx(overlap["max_abs_diff"], rel=1e-9)
    same = ckptviz.compare(tmp_path / "a.pt", {k: v.contiguous() for k, v in a.items()})
    equal = values_equal(same, progress=False)
    assert equal == {"both": True, "one": True, "nan": True, "grown": True}
    stats_equal = value_stats(same, progress=False)
    assert all(entry.equal for entry in stats_equal)


_HUGE_VIEWS = r"""
import json, sys
from pathlib import Path
import torch
import ckptviz
from ckptviz.core.stats import value_stats, values_equal
from ckptviz.plots import plot_values

folder = Path(sys.argv[1])
torch.save(
    {
        "w": torch.zeros(1).expand(10**9),
        "grid": torch.full((1,), 2.0).as_strided((10**6, 10**6), (0, 0)),
        "empty": torch.empty(10**15, 0),
    },
    folder / "a.pt",
)
torch.save(
    {
        "w": torch.ones(1).expand(10**9),
        "grid": torch.full((1,), 2.0).as_strided((10**6, 10**6), (0, 0)),
        "empty": torch.empty(10**15, 0),
    },
    folder / "b.pt",
)
diff = ckptviz.compare(folder / "a.pt", folder / "b.pt")
stats = value_stats(diff, progress=False)
figure = plot_values(diff, "grid")
print(json.dumps({
    "sizes": [(folder / n).stat().st_size for n in ("a.pt", "b.pt")],
    "stats": {e.key: e.to_record() for e in stats},
    "equal": values_equal(diff, progress=False),
    "legend": [t.get_text() for t in figure.axes[0].get_legend().get_texts()],
}))
"""


def test_a_small_file_declaring_huge_repeated_views_is_computed_from_its_stored_values(
    tmp_path: Path,
) -> None:
    result = run_python(_HUGE_VIEWS, str(tmp_path))
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert max(out["sizes"]) < 4096  # the whole hostile input is a few KB
    w, grid, empty = (out["stats"][k] for k in ("w", "grid", "empty"))
    assert w["norm_a"] == 0.0 and w["norm_b"] == pytest.approx(math.sqrt(10**9))
    assert w["diff_norm"] == pytest.approx(math.sqrt(10**9)) and w["max_abs_diff"] == 1.0
    assert w["mean_b"] == 1.0 and w["std_b"] == 0.0 and not w["equal"]
    assert grid["equal"] and grid["norm_a"] == pytest.approx(2.0 * 10**6)
    assert grid["mean_a"] == 2.0 and grid["relative_change"] == 0.0
    assert empty["equal"] and empty["norm_a"] == 0.0
    assert out["equal"] == {"w": False, "grid": True, "empty": True}
    assert out["legend"][0].startswith("a.pt: [1000000, 1000000] float32, mean 2")


def test_cli_diff_of_huge_repeated_views_finishes_with_the_right_answer(tmp_path: Path) -> None:
    def grid(value: float) -> torch.Tensor:  # 10**12 values declared over one stored value
        return torch.full((1,), value).as_strided((10**6, 10**6), (0, 0))

    torch.save({"w": grid(0.0), "v": torch.arange(3.0)}, tmp_path / "a.pt")
    torch.save({"w": grid(1.0), "v": torch.arange(3.0)}, tmp_path / "b.pt")
    torch.save({"w": grid(0.0), "v": torch.arange(3.0)}, tmp_path / "c.pt")
    code = (
        "import sys; from ckptviz.cli import main\n"
        "first = main(sys.argv[1:4] + ['--stats', '--json', '--no-progress'])\n"
        "print()\n"
        "second = main([sys.argv[1], sys.argv[2], sys.argv[4], '--no-progress'])\n"
        "print('exits', first, second)\n"
    )
    result = run_python(
        code, "diff", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), str(tmp_path / "c.pt")
    )
    assert result.returncode == 0, result.stderr
    report_text, _, identical_text = result.stdout.partition("\n\n")
    report = json.loads(report_text)
    w = next(row for row in report["rows"] if row["a_key"] == "w")
    assert w["norm_b"] == pytest.approx(10.0**6) and w["values_equal"] is False
    assert "identical" in identical_text
    assert identical_text.strip().endswith("exits 1 0")


# -- views that repeat values in other ways: refused past a bound ----------------------------------


def test_overlapping_strides_are_refused_naming_the_file_and_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    window = torch.randn(2000).as_strided((1000, 1000), (1, 1))  # a sliding window: 2000 stored
    torch.save({"window": window, "fine": torch.randn(4)}, tmp_path / "a.pt")
    other = torch.randn(2000).as_strided((1000, 1000), (1, 1))
    torch.save({"window": other, "fine": torch.randn(4)}, tmp_path / "b.pt")
    diff = ckptviz.compare(tmp_path / "a.pt", tmp_path / "b.pt")
    for run in (
        lambda: value_stats(diff, progress=False),
        lambda: values_equal(diff, progress=False),
        lambda: diff.stats(progress=False),
    ):
        with pytest.raises(CheckpointError) as caught:
            run()
        message = str(caught.value)
        assert "'window'" in message and str(tmp_path / "a.pt") in message
        assert "1,000,000 values" in message and ".contiguous()" in message
    assert value_stats(diff, keys=["fine"], progress=False)["fine"].norm_a > 0
    pytest.importorskip("matplotlib")
    from ckptviz.plots import plot_values

    with pytest.raises(CheckpointError, match=r"'window' in a\.pt.*contiguous"):
        plot_values(diff, "window")
    status = cli_main(["diff", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--stats"])
    assert status == 2
    assert "'window'" in capsys.readouterr().err


def test_sides_repeating_along_different_dimensions_are_refused_past_the_bound(
    tmp_path: Path,
) -> None:
    # each side stores 2000 values; every pair of them meets once: 4,000,000 pairs to compare
    a = torch.randn(2000, 1).expand(2000, 2000)
    b = torch.randn(1, 2000).expand(2000, 2000)
    small_a, small_b = torch.randn(60, 1).expand(60, 60), torch.randn(1, 60).expand(60, 60)
    torch.save({"cross": a, "small": small_a}, tmp_path / "a.pt")
    torch.save({"cross": b, "small": small_b}, tmp_path / "b.pt")
    diff = ckptviz.compare(tmp_path / "a.pt", tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match=r"'cross' in .*a\.pt and .*b\.pt"):
        value_stats(diff, progress=False)
    small = value_stats(diff, keys=["small"], progress=False)["small"]
    for name, value in plain_measures(small_a, small_b).items():
        assert getattr(small, name) == pytest.approx(value, rel=1e-9), name


# -- rename rules from files and command lines: linear time, or refused ----------------------------

# Python's backtracking `re` takes about 2**len steps for this pattern on a's followed by a b
CATASTROPHIC = r"^(a+)+$"
ALL_A = "a" * 5000  # matches: renamed to "bias"
ALMOST = "a" * 60 + "b"  # does not match: stays unexpected


def _plan_with_catastrophic_rule() -> str:
    """A plan JSON whose rename rule backtracks catastrophically in Python's ``re`` on a key it
    names; written by hand (no rule applied here) so that building it cannot hang."""
    model = torch.nn.Linear(2, 2)
    state = {"weight": torch.zeros(2, 2), ALL_A: torch.zeros(2), ALMOST: torch.zeros(3)}
    data = ckptviz.compare(model, state).pair("bias", ALL_A).plan().to_dict()
    data["mapping"]["pairs"] = []
    data["mapping"]["rules"] = [[CATASTROPHIC, "bias"]]
    return json.dumps(data)


_FROM_JSON = r"""
import json, sys
import ckptviz
from ckptviz.cli import main

plan = ckptviz.Plan.from_json(sys.argv[1])
diff = plan.diff
print(json.dumps({
    "statuses": {row.key[:8]: row.status for row in diff.rows},
    "bias_from": diff.row("bias").checkpoint_key,
    "note": diff.row("bias").note[:40],
}))
sys.stdout.flush()
status = main(["diff", sys.argv[2], sys.argv[3], "--rename", sys.argv[4] + "=bias", "--json"])
print("exit", status)
"""


def test_a_catastrophic_rename_pattern_from_a_plan_or_the_cli_finishes_with_the_right_answer(
    tmp_path: Path,
) -> None:
    torch.save({"bias": torch.zeros(2)}, tmp_path / "a.pt")
    torch.save({ALL_A: torch.zeros(2), ALMOST: torch.zeros(3)}, tmp_path / "b.pt")
    result = run_python(
        _FROM_JSON,
        _plan_with_catastrophic_rule(),
        str(tmp_path / "a.pt"),
        str(tmp_path / "b.pt"),
        CATASTROPHIC,
    )
    assert result.returncode == 0, result.stderr
    plan_line, cli_text = result.stdout.split("\n", 1)
    plan = json.loads(plan_line)
    assert plan["statuses"] == {"weight": "match", "bias": "match", "aaaaaaaa": "unexpected"}
    assert plan["bias_from"] == ALL_A
    assert plan["note"].startswith("renamed from aaaa")
    report_text, _, exit_line = cli_text.rpartition("exit ")
    assert exit_line.strip() == "1"  # different: ALMOST is in b only
    rows = {(r["a_key"], r["b_key"]): r["status"] for r in json.loads(report_text)["rows"]}
    assert rows == {("bias", ALL_A): "match", (None, ALMOST): "unexpected"}


@pytest.mark.parametrize(
    "pattern",
    [r"(blocks)\.\1", r"(?P<name>\w+)\.(?P=name)", r"(?<!pre)blocks", r"blocks(?=\.0)"],
)
def test_backreferences_and_lookarounds_are_refused_saying_what_is_allowed(
    tmp_path: Path, pattern: str, capsys: pytest.CaptureFixture[str]
) -> None:
    model, state = torch.nn.Linear(2, 2), {"weight": torch.zeros(2, 2), "bias": torch.zeros(2)}
    diff = ckptviz.compare(model, state)
    for run in (
        lambda: ckptviz.compare(model, state, rename={pattern: "x"}),
        lambda: diff.rename(pattern, "x"),
        lambda: ckptviz.Plan.from_json(_with_rules(diff, [[pattern, "x"]])),
    ):
        with pytest.raises(ckptviz.PlanError) as caught:
            run()
        message = str(caught.value)
        assert repr(pattern) in message and "is not allowed" in message
        assert "linearly" in message and "no backreferences" in message
        assert "no lookarounds" in message
    torch.save(state, tmp_path / "a.pt")
    written = pattern.replace("=", "\\=")  # on the command line the first bare = splits
    status = cli_main(
        ["diff", str(tmp_path / "a.pt"), str(tmp_path / "a.pt"), "--rename", f"{written}=x"]
    )
    assert status == 2
    error = capsys.readouterr().err
    assert "rename rule" in error
    if "=" not in pattern:
        assert "no backreferences" in error


def _with_rules(diff: ckptviz.Diff, rules: list[list[str]]) -> str:
    data = diff.plan().to_dict()
    data["mapping"]["rules"] = rules
    return json.dumps(data)


@pytest.mark.parametrize(
    ("pattern", "replacement", "key"),
    [
        (r"^blocks\.", "layers.", "blocks.0.weight"),  # the README's example
        (r"^(\w+)\.(\d+)\.", r"\2.\1.", "blocks.0.weight"),
        (r"(?P<head>[a-z]+)_(?P<n>\d)", r"\g<n>\g<head>\g<0>", "fc_1.w_2"),
        (r"\.", r"\\", "a.b.c"),
        (r"x*", "-", "abxd"),  # empty matches next to others, as re.sub places them
        (r"$", ".weight", "head"),
        (r"^", "module.", "fc.bias"),
        (r"é", "e", "café.w"),
        (r"(?i)BLOCK", "stage", "Block.block"),
        (r"(a)|b", r"[\1]", "abab"),  # a group that did not take part is empty
    ],
)
def test_rename_rules_replace_as_python_re_sub_does(
    pattern: str, replacement: str, key: str
) -> None:
    import re

    from ckptviz.core.matching import KeyMapping

    mapping = KeyMapping(rules=((pattern, replacement),))
    assert mapping.checkpoint_name(key) == re.sub(pattern, replacement, key)


@pytest.mark.parametrize(
    ("replacement", "why"),
    [(r"\q", "bad escape"), (r"\3", "invalid group reference"), (r"\g<nope>", "unknown group")],
)
def test_a_bad_replacement_is_refused_before_any_key_is_renamed(replacement: str, why: str) -> None:
    with pytest.raises(ckptviz.PlanError, match=why):
        ckptviz.compare(torch.nn.Linear(2, 2), {"w": torch.zeros(2)}, rename={r"(\w)": replacement})


def test_a_rule_matching_a_key_too_often_is_refused_not_run() -> None:
    from ckptviz.core.matching import MAX_RULE_MATCHES

    key = "a." * (MAX_RULE_MATCHES + 1)
    with pytest.raises(ckptviz.PlanError, match=r"more than \d+ times"):
        ckptviz.compare(torch.nn.Linear(2, 2), {key: torch.zeros(2)}, rename={r"\.": "_"})


def test_a_command_line_rule_splits_at_the_first_equals_sign_without_a_backslash() -> None:
    from ckptviz.core.matching import parse_rules

    assert parse_rules([r"^a\=b\.=c="]) == ((r"^a\=b\.", "c="),)
    renamed = ckptviz.compare(
        {"c=.w": torch.zeros(1)}, {"a=b.w": torch.zeros(1)}, rename=[r"^a\=b\.=c=."]
    )
    assert renamed.counts["match"] == 1
