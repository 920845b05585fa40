"""The ``ckptviz`` command line, run as a subprocess: outputs, exit codes, colour, safety."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import pty
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_stats import make_pair

from ckptviz.cli import main

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def run(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ckptviz", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env if env is not None else os.environ.copy(),
        check=False,
    )


@pytest.fixture
def call(capsys: pytest.CaptureFixture[str]) -> object:
    """Run the command line in this process (the same code as the subprocess runs, minus
    the few seconds each new interpreter spends importing torch)."""

    def invoke(*args: str | Path) -> subprocess.CompletedProcess[str]:
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse's own exits
            code = int(exc.code or 0)
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, captured.out, captured.err)

    return invoke


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return make_pair(tmp_path)


@pytest.fixture
def nested(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A Lightning-style checkpoint: wrapped keys under 'state_dict', an EMA copy, a config
    string inside the state dict, and training state around it."""
    torch.manual_seed(3)
    state = {
        "module.conv.weight": torch.randn(4, 3, 3, 3),
        "module.conv.bias": torch.randn(4),
        "module.fc.weight": torch.randn(2, 16).half(),
        "module.config": "resnet-ish",
    }
    ema = {"conv.weight": torch.randn(4, 3, 3, 3), "conv.bias": torch.randn(4)}
    path = tmp_path / "nested.ckpt"
    torch.save({"state_dict": state, "ema": ema, "epoch": 7, "optimizer": {"lr": 0.1}}, path)
    return path, {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def assert_clean_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("ckptviz: error: ") or result.stderr.startswith("usage:")
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


# -- inspect ---------------------------------------------------------------------------------------


def test_inspect_table(nested: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, tensors = nested
    result = run("inspect", path)
    assert result.returncode == 0 and result.stderr == ""
    out = result.stdout
    assert "\x1b[" not in out  # not a terminal: no colour
    assert "state dict found at 'state_dict'" in out
    assert "wrapper prefix: every key starts with 'module.'" in out
    assert "module.config (str)" in out  # the entry that is not a tensor
    assert "other candidates (pick one with key=...): ema" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("name "))
    table = lines[header + 2 :]
    for key, value in tensors.items():
        line = next(line for line in table if line.startswith(key + " "))
        cells = re.split(r"\s{2,}", line)
        assert cells[1] == "[" + ", ".join(map(str, value.shape)) + "]"
        assert cells[2] == str(value.dtype).removeprefix("torch.")
        assert cells[3] == f"{value.numel():,}"
    total = sum(v.numel() for v in tensors.values())
    assert re.split(r"\s{2,}", table[-1])[:2] == ["total", f"{total:,}"]
    # aligned: every row's shape cell starts where the header's "shape" does
    column = lines[header].index("shape")
    for line in table[:-1]:
        assert line[column - 2 : column] == "  " and line[column] == "["


def test_inspect_json_and_csv(nested: tuple[Path, dict[str, torch.Tensor]], call: Any) -> None:
    path, tensors = nested
    result = call("inspect", path, "--json")
    assert result.returncode == 0
    data = json.loads(result.stdout)
    assert data["location"] == "state_dict" and data["wrapper_prefix"] == "module."
    assert data["candidates"] == ["ema"]
    assert data["skipped"] == {"module.config": "str"}
    assert data["total_numel"] == sum(v.numel() for v in tensors.values())
    assert [(t["name"], tuple(t["shape"]), t["dtype"], t["nbytes"]) for t in data["tensors"]] == [
        (k, tuple(v.shape), str(v.dtype).removeprefix("torch."), v.numel() * v.element_size())
        for k, v in tensors.items()
    ]

    rows = list(csv.DictReader(io.StringIO(call("inspect", path, "--csv").stdout)))
    assert [r["name"] for r in rows] == list(tensors)
    assert [int(r["numel"]) for r in rows] == [v.numel() for v in tensors.values()]


def test_inspect_other_key(nested: tuple[Path, dict[str, torch.Tensor]], call: Any) -> None:
    path, _ = nested
    data = json.loads(call("inspect", path, "--key", "ema", "--json").stdout)
    assert data["location"] == "ema" and data["wrapper_prefix"] == ""
    assert [t["name"] for t in data["tensors"]] == ["conv.weight", "conv.bias"]
    assert_clean_error(call("inspect", path, "--key", "nope"), str(path), "no entry 'nope'")


# -- diff ------------------------------------------------------------------------------------------


def test_diff_of_identical_files_exits_0(pair: tuple, tmp_path: Path) -> None:
    path_a, _, _, _ = pair
    copy = tmp_path / "copy.pt"
    shutil.copy(path_a, copy)
    result = run("diff", path_a, copy)
    assert result.returncode == 0, result.stdout
    assert "identical: same keys, shapes, dtypes and bytes" in result.stdout
    assert run("diff", path_a, copy, "--stats").returncode == 0


def test_diff_table_and_exit_1(pair: tuple) -> None:
    path_a, path_b, _, _ = pair
    result = run("diff", path_a, path_b)
    assert result.returncode == 1 and result.stderr == ""
    rows = {}  # the first key shown on a row (the b key for unexpected rows) -> status
    for line in result.stdout.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0] in ("match", "dtype", "shape", "missing", "unexpected"):
            rows[cells[1]] = cells[0]
    assert rows["head.weight"] == "shape" and rows["embed.weight"] == "dtype"
    assert rows["norm.weight"] == "missing" and rows["final_norm.weight"] == "unexpected"
    assert "values not compared (add --stats)" in result.stdout


def test_diff_stats_json_matches_numpy(pair: tuple) -> None:
    path_a, path_b, a, b = pair
    result = run("diff", path_a, path_b, "--stats", "--json")
    assert result.returncode == 1
    data = json.loads(result.stdout)  # strict JSON: NaN/Inf became null
    assert data["values_compared"] == "stats" and not data["identical"]
    assert data["counts"] == {"match": 7, "dtype": 1, "shape": 3, "missing": 1, "unexpected": 1}
    rows = {r["a_key"] or r["b_key"]: r for r in data["rows"]}
    x = a["block.1.linear.weight"].double().numpy()
    y = b["block.1.linear.weight"].double().numpy()
    scaled = rows["block.1.linear.weight"]
    assert scaled["relative_change"] == pytest.approx(np.linalg.norm(x - y) / np.linalg.norm(x))
    assert scaled["max_abs_diff"] == pytest.approx(np.abs(x - y).max())
    assert scaled["values_equal"] is False
    nan_row = rows["block.0.linear.bias"]
    assert nan_row["nan_b"] == 1 and nan_row["relative_change"] is None
    assert rows["gate"]["relative_change"] is None  # infinite: a was all zeros
    assert rows["block.0.linear.weight"]["values_equal"] is True
    assert rows["norm.weight"]["relative_change"] is None and rows["norm.weight"]["status"] == (
        "missing"
    )
    assert "hold NaN/Inf: block.0.linear.bias" in data["verdict"]


def test_diff_stats_text_and_csv(pair: tuple, call: Any) -> None:
    path_a, path_b, a, b = pair
    text = call("diff", path_a, path_b, "--stats").stdout
    cells = {
        row[1]: row
        for row in (re.split(r"\s{2,}", line) for line in text.splitlines())
        if len(row) > 7
    }
    x = a["block.1.linear.weight"].double().numpy()
    y = b["block.1.linear.weight"].double().numpy()
    assert cells["block.1.linear.weight"][7:13] == [
        "differ",
        "2",
        f"{np.abs(x - y).max():.3g}",
        "1",
        "0/0",
        "0/0",
    ]
    assert cells["block.0.linear.bias"][7:13] == ["differ", "nan", "nan", "nan", "0/0", "1/0"]

    rows = list(
        csv.DictReader(io.StringIO(call("diff", path_a, path_b, "--stats", "--csv").stdout))
    )
    by_key = {r["a_key"] or r["b_key"]: r for r in rows}
    assert float(by_key["block.1.linear.weight"]["relative_change"]) == pytest.approx(2.0)
    assert by_key["head.weight"]["compared_shape"] == "[5, 8]"
    assert by_key["block.0.linear.bias"]["relative_change"] == "nan"
    assert by_key["norm.weight"]["relative_change"] == ""


def test_same_structure_other_values_exits_1(pair: tuple, tmp_path: Path, call: Any) -> None:
    path_a, _, a, _ = pair
    changed = {k: v.clone() for k, v in a.items()}
    changed["block.1.linear.bias"][0] += 1e-3
    other = tmp_path / "other.pt"
    torch.save(changed, other)
    result = call("diff", path_a, other)
    assert result.returncode == 1
    assert "values differ in 1 of 12 tensor pairs" in result.stdout
    structure_only = call("diff", path_a, other, "--no-values")
    assert structure_only.returncode == 0
    assert "values not compared" in structure_only.stdout


def test_diff_rename_and_nested_keys(pair: tuple, nested: tuple, tmp_path: Path, call: Any) -> None:
    path_a, path_b, _, _ = pair
    data = json.loads(
        call("diff", path_a, path_b, "--rename", r"^final_norm\.=norm.", "--json").stdout
    )
    norm = next(r for r in data["rows"] if r["a_key"] == "norm.weight")
    assert norm["status"] == "match" and norm["b_key"] == "final_norm.weight"
    assert data["mapping"].startswith("rule '^final_norm")

    nested_path, tensors = nested
    flat = tmp_path / "flat.pt"
    torch.save({k.removeprefix("module."): v for k, v in tensors.items()}, flat)
    result = call("diff", flat, nested_path, "--key-b", "state_dict", "--json")
    data = json.loads(result.stdout)
    assert data["b"]["location"] == "state_dict"
    assert {r["status"] for r in data["rows"]} == {"match"}
    assert result.returncode == 1  # the keys differ by the wrapper prefix
    ema = json.loads(call("diff", nested_path, flat, "--key-a", "ema", "--json").stdout)
    assert ema["a"]["location"] == "ema"


def test_errors_exit_2_without_traceback(pair: tuple, tmp_path: Path, call: Any) -> None:
    path_a, _, _, _ = pair
    missing = tmp_path / "nope.pt"
    result = run("diff", path_a, missing)
    assert_clean_error(result, str(missing), "no such file")
    assert result.stdout == ""
    assert_clean_error(run("diff", path_a), "usage:")
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    assert_clean_error(call("inspect", text), str(text), "torch.save")
    assert_clean_error(call("diff", path_a, path_a, "--rename", "(=x"), "not a valid regex")
    assert_clean_error(call("diff", path_a, path_a, "--memory-budget", "0"), "--memory-budget")


def test_unsafe_checkpoints_need_an_explicit_opt_in(tmp_path: Path, call: Any) -> None:
    path = tmp_path / "with_args.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.1)}, path)
    refused = call("inspect", path)
    assert_clean_error(
        refused, str(path), "argparse.Namespace", "--allow-global argparse.Namespace"
    )
    assert call("inspect", path, "--allow-global", "argparse.Namespace").returncode == 0
    assert call("inspect", path, "--trusted").returncode == 0


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, ...]]:
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_checkpoint_runs_nothing(tmp_path: Path, call: Any) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "payload": _Payload(marker)}, path)
    assert_clean_error(run("inspect", path), str(path), "--trusted")
    assert_clean_error(call("diff", path, path, "--stats"), str(path))
    assert not marker.exists()


# -- terminal behaviour ----------------------------------------------------------------------------


def _run_on_terminal(*args: str | Path, env: dict[str, str]) -> str:
    """Run with stdout on a pseudo-terminal, as a person at a terminal would."""
    leader, follower = pty.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "ckptviz", *map(str, args)],
            stdout=follower,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: the child is done
                break
            if not chunk:
                break
            chunks.append(chunk)
        process.wait(timeout=120)
    finally:
        os.close(leader)
    return b"".join(chunks).decode()


def test_colour_only_on_a_terminal_and_never_with_no_color(pair: tuple) -> None:
    path_a, path_b, _, _ = pair
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    on_terminal = _run_on_terminal("diff", path_a, path_b, env=env)
    assert "\x1b[32mmatch" in on_terminal and "\x1b[31mshape" in on_terminal
    plain = ANSI.sub("", on_terminal).replace("\r\n", "\n")
    assert plain == run("diff", path_a, path_b, env=env).stdout  # same table, only coloured
    assert "\x1b[" not in _run_on_terminal("diff", path_a, path_b, env={**env, "NO_COLOR": "1"})
    assert "\x1b[32mmatch" in run("diff", path_a, path_b, "--color", "always", env=env).stdout


def test_version_and_help(call: Any) -> None:
    result = run("--version")
    assert result.returncode == 0 and result.stdout.startswith("ckptviz ")
    helped = call("diff", "--help")
    assert helped.returncode == 0
    for option in ("--stats", "--rename", "--key-a", "--json", "--csv", "--trusted"):
        assert option in helped.stdout


@pytest.mark.skipif(shutil.which("ckptviz") is None, reason="the package is not installed")
def test_installed_command(pair: tuple) -> None:
    path_a, path_b, _, _ = pair
    result = subprocess.run(
        ["ckptviz", "diff", str(path_a), str(path_b), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert json.loads(result.stdout)["counts"]["shape"] == 3
