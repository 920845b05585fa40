"""The benchmark harness runs end to end at the small size (a smoke test: no timing asserted)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import REPO

from benchmarks.run import END, SNAPSHOT_GROUP, START, WIDGET_GROUP, groups_for, write_results
from benchmarks.synth import FORMATS, SIZES, SNAPSHOT_SPECS, WIDGET_ROWS, widget_spec


def test_small_run_measures_every_case_and_writes_results(tmp_path: Path) -> None:
    raw, results, scratch = tmp_path / "raw.json", tmp_path / "RESULTS.md", tmp_path / "scratch"
    scratch.mkdir()
    results.write_text("# Benchmark results\n\nnotes kept by hand\n")
    options = ["--size", "small", "--repeat", "1", "--json", str(raw), "--tmpdir", str(scratch)]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", *options, "--write-results", "--results", results],
        cwd=REPO,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    figures = json.loads(raw.read_text())
    assert figures["size"] == "small"
    measured = {(r["model"], r["format"], r["group"]): r for r in figures["results"]}
    for spec in SIZES["small"]:
        for fmt in FORMATS:
            for group in groups_for(fmt):
                result = measured[(spec.name, fmt, group.title)]
                cases = {group.baseline.case, *(v.case for v in group.variants)}
                assert set(result["cases"]) == cases
                for case in result["cases"].values():
                    assert len(case["wall"]) == len(case["cpu"]) == 1
                    assert all(math.isfinite(t) and t > 0 for t in case["wall"] + case["cpu"])
                    assert case["rss_growth"] >= 0
                path = Path(result["file"])
                assert result["file_bytes"] > 0 and not path.exists()  # measured, then removed
    snapshot = measured[(SNAPSHOT_SPECS["small"].name, "safetensors", SNAPSHOT_GROUP.title)]
    assert set(snapshot["cases"]) == {SNAPSHOT_GROUP.baseline.case} | {
        v.case for v in SNAPSHOT_GROUP.variants
    }
    assert list(scratch.iterdir()) == []  # generated checkpoints cleaned up
    for rows in WIDGET_ROWS["small"]:
        result = measured[(widget_spec(rows).name, "state dict", WIDGET_GROUP.title)]
        (payload,) = result["cases"]["widget.loader"]["extra"]
        model_rows = rows  # every tensor of the model is a row; renamed biases add a row each
        assert model_rows < payload["rows"] < model_rows * 1.1
        assert payload["table_bytes"] > 10 * payload["rows"]  # keys, shapes, dtypes per row
        assert 0 < payload["tick_bytes"] < payload["table_bytes"]

    text = results.read_text()
    assert text.startswith("# Benchmark results") and "notes kept by hand" in text
    block = text[text.index(START) : text.index(END)]
    assert f"| torch | {torch.__version__} |" in block
    assert f"| cores | {os.cpu_count()} |" in block
    variants = sum(len(g.variants) for fmt in FORMATS for g in groups_for(fmt))
    widget = len(WIDGET_GROUP.variants) * len(WIDGET_ROWS["small"])
    readings = [line for line in block.splitlines() if line.startswith("- ")]
    snapshot_readings = len(SNAPSHOT_GROUP.variants)
    assert len(readings) == variants * len(SIZES["small"]) + widget + snapshot_readings
    assert "### 3. The widget's payload" in block
    for label in ("read_checkpoint + compare", "plan.apply(model, undo=False)", ".stats()"):
        assert label in block
    assert "Target:" not in block  # targets are judged on the large size only


def test_writing_results_replaces_only_the_generated_block(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    write_results(path, f"{START}\nfirst run\n{END}")
    assert path.read_text().count(START) == 1
    kept = "\n## Before and after\n\nwritten by hand\n"
    path.write_text(path.read_text() + kept)
    write_results(path, f"{START}\nsecond run\n{END}")
    text = path.read_text()
    assert "second run" in text and "first run" not in text
    assert text.endswith(kept)
